"""Tempo, key and loudness of one batch: the numpy path (a decode worker's) against the torch path.

    python -m bench.features_gpu [--files 16] [--seconds 30] [--repeats 3] [--device auto]

The same batch of ``workers.audio.synth`` music-like clips (44.1 kHz stereo, with a few 48 kHz
mono and 5.1 ones so the torch path groups and pads) is measured file by file by
``workers.features`` on one CPU thread, as a decode worker does, and in one call of
``workers.tagging.features_torch.measure_batch`` on the device (the first visible GPU, else the
CPU) from the int16 blocks a decode worker ships (``NativeCapture``). Prints the median time of each, the ratio,
audio seconds measured per second, and the parity of the answers (largest loudness and true-peak
difference, tempo and key agreement). ``bench/device_check.sh run`` runs it on a lent GPU.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from workers.audio.synth import synth_clip  # noqa: E402
from workers.features import extract  # noqa: E402

LAYOUTS = [(44100, 2)] * 5 + [(48000, 1), (44100, 6), (48000, 2)]  # cycled over the batch


def batch(files: int, seconds: float) -> list[tuple[np.ndarray, int]]:
    """(channel-major float32 samples, rate) per file, lengths 70-100 % of ``seconds`` so padding is real."""
    out = []
    for i in range(files):
        rate, channels = LAYOUTS[i % len(LAYOUTS)]
        out.append((synth_clip(i, seconds * (0.7 + 0.3 * ((i * 7) % 10) / 9), rate, channels), rate))
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` runs after one warm-up (compiles, caches, CUDA context), and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def feed(sink, x: np.ndarray, rate: int, frame: int = 1152):
    """Hand a clip to a native sink as a decoder does (1152-frame pieces, a float32 plane per channel); the sink."""
    for i in range(0, x.shape[1], frame):
        sink(list(x[:, i:i + frame]), rate)
    return sink


def decode_worker_ms(clips, repeats: int) -> tuple[float, float]:
    """Per file, what a decode worker spends on features: measuring them (``StreamMeasure``), or keeping
    the int16 blocks (``NativeCapture``) and pickling them to the tagger, the GPU path's hand-over."""
    from workers.tagging.features_torch import NativeCapture

    def measure():
        for x, rate in clips:
            feed(extract.StreamMeasure(), x, rate).result()

    def keep():
        for x, rate in clips:
            pickle.loads(pickle.dumps(feed(NativeCapture(), x, rate).native(), protocol=pickle.HIGHEST_PROTOCOL))

    measure_s, _ = timed(measure, repeats)
    keep_s, _ = timed(keep, repeats)
    return 1000 * measure_s / len(clips), 1000 * keep_s / len(clips)


def parity(reference: list[dict], got: list[dict]) -> dict:
    """The largest differences between two lists of ``Features.to_json()``."""
    def db(v):
        return 20 * math.log10(v) if v else -math.inf

    both = [(r, g) for r, g in zip(reference, got)]
    loud = [abs(r["loudness_lufs"] - g["loudness_lufs"]) for r, g in both if r["loudness_lufs"] is not None
            and g["loudness_lufs"] is not None]
    peak = [abs(db(r["true_peak"]) - db(g["true_peak"])) for r, g in both]
    bpm = [abs(g["bpm"] / r["bpm"] - 1) for r, g in both if r["bpm"] and g["bpm"]]
    return {"loudness LU": max(loud, default=0.0), "true peak dB": max(peak, default=0.0),
            "bpm rel": max(bpm, default=0.0),
            "same bpm presence": sum((r["bpm"] is None) == (g["bpm"] is None) for r, g in both),
            "same key": sum(r["key"] == g["key"] for r, g in both), "files": len(both)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto: the first GPU when there is one, else cpu")
    args = parser.parse_args(argv)

    import torch

    from workers.tagging import features_torch as ft
    from workers.tagging.pipeline import resolve_device

    device = resolve_device(args.device)
    threads = f"CPU, {torch.get_num_threads()} torch threads"
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else threads
    clips = batch(args.files, args.seconds)
    audio = sum(x.shape[1] / rate for x, rate in clips)
    natives = [feed(ft.NativeCapture(), x, rate).native() for x, rate in clips]
    cpu_s, reference = timed(lambda: [extract.analyze(x.T, rate).to_json() for x, rate in clips], args.repeats)
    dev_s, got = timed(lambda: ft.measure_batch(natives, device), args.repeats)
    print(f"batch: {args.files} files, {audio:.0f} s of audio ({audio / args.files:.1f} s a file), "
          f"{sum(n.planes.nbytes for n in natives) / 2**20:.0f} MB as shipped; device: {device} ({name})")
    print(f"{'path':<40}{'batch s':>9}{'ms/file':>9}{'x realtime':>12}")
    for label, seconds in (("numpy, file by file, 1 CPU thread", cpu_s), (f"torch measure_batch on {device}", dev_s)):
        print(f"{label:<40}{seconds:>9.3f}{1000 * seconds / args.files:>9.1f}{audio / seconds:>12.0f}")
    print(f"ratio numpy / torch: {cpu_s / dev_s:.2f}x")
    measure_ms, keep_ms = decode_worker_ms(clips, args.repeats)
    print(f"decode worker, per file: measuring {measure_ms:.1f} ms, keeping int16 + pickling {keep_ms:.1f} ms "
          f"({measure_ms / keep_ms:.1f}x less)")
    print("parity: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in parity(reference, got).items()))


if __name__ == "__main__":
    main()
