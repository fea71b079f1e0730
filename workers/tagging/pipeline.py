"""Audio file to raw per-label scores: decode → log-mel → 3 s patches → networks → mean and spread.

It imports torch, as the network modules do (``musicnn``, ``fast``,
``loading``, ``frontend``); only tagger processes import it. Default tagging runs MTT_musicnn and
MSD_musicnn on the same patches, so each file is decoded and transformed once.

Memory is bounded whatever the file's length: audio is decoded in chunks and
turned into log-mel frames chunk by chunk (each chunk carries one hop of real
neighbouring audio on both sides, so its frames equal those of a whole-file
transform), patches are scored as they fill, and only running sums of the
scores are kept. Patch layout follows ``frontend.patch_starts``: back-to-back
3 s patches, plus one end-aligned patch when at least half a patch remains; a
file shorter than one patch is repeat-padded (``frontend.patches``), and one
shorter than ``MIN_SECONDS`` is refused as too short to tell anything.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
import torch

from workers.audio.decode import TARGET_SR, DecodeError, iter_decode
from workers.features.extract import StreamMeasure
from workers.tagging import converge, fast, features_torch, frontend, labels, loading
from workers.tagging.manifest import DEFAULT_MODELS

HOP = frontend.HOP
PATCH = frontend.PATCH_FRAMES
MIN_SECONDS = 1.0
CHUNK_PATCHES = 20  # 60 s of audio per decode chunk


class TooShortError(ValueError):
    """The file holds less audio than the networks can say anything about."""


@dataclass
class Analysis:
    """One file's raw scores: per label, the mean and the spread (std) over its patches."""

    labels: tuple[str, ...]
    means: np.ndarray
    spreads: np.ndarray
    patches: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    patches_total: int = 0  # the file's patches; a fast analysis scores ``patches`` of them (converge)
    features: dict = field(default_factory=dict)  # tempo, key, loudness: ``workers.features`` JSON

    def mappings(self) -> tuple[dict[str, float], dict[str, float]]:
        """``({label: mean}, {label: spread})``, as ``build_tags`` takes them."""
        return (dict(zip(self.labels, map(float, self.means))), dict(zip(self.labels, map(float, self.spreads))))


def use_threads(threads: int | None = None) -> int:
    """Set torch's threads for this process: ``$EARMARK_TORCH_THREADS`` or 1 (one thread per process is fastest)."""
    threads = threads or int(os.environ.get("EARMARK_TORCH_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def resolve_device(device: str = "auto") -> str:
    """``auto`` means the first visible GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but no CUDA GPU is visible")
    return device


class Analyzer:
    """Loads the networks once per process and scores files on one device."""

    measure_features = True  # tempo, key, loudness in the same decode (off only to measure their cost: bench)
    # Batched files' features measured here in torch (``features_torch``) rather than in the decode
    # workers: None means on a GPU only, where the decode workers are the bottleneck; True forces it.
    batched_features: bool | None = None

    def __init__(self, device: str = "auto", models_dir=None, names=DEFAULT_MODELS, patch_batch: int | None = None,
                 decode_workers: int = 0):
        self.device = resolve_device(device)
        self.names = tuple(names)
        self.nets = [loading.load(n, device=self.device, models_dir=models_dir) for n in self.names]
        self.model_version = "+".join(loading.model_version(n, models_dir) for n in self.names)
        self.labels = tuple(
            f"{labels.dataset_of(n)}:{tag}" for n in self.names for tag in labels.labels_for(n, models_dir)
        )
        # One patch per forward pass is fastest on the CPU (memory traffic); a GPU wants hundreds.
        self.patch_batch = patch_batch or (1 if self.device == "cpu" else 512)
        self.decode_workers = decode_workers
        self.pool = None

    # -- scoring -----------------------------------------------------------------

    @torch.inference_mode()
    def score_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(n, 187, 96) patches → (n, 100) probabilities, both networks side by side."""
        outs = []
        for start in range(0, patches.shape[0], self.patch_batch):
            batch = patches[start : start + self.patch_batch].to(self.device, non_blocking=True)
            outs.append(torch.cat([net(batch) for net in self.nets], dim=1))
        return torch.cat(outs).float().cpu()

    def analyze(self, path, max_seconds: float | None = None, progress=None, until=None) -> Analysis:
        """Score one file; raises ``DecodeError`` or ``TooShortError`` for files that cannot be tagged.

        ``progress(seconds)``, when given, hears how much audio is scored after
        each decoded chunk (a minute), so a long file's progress moves.
        ``until``, a ``converge.StopRule``, makes it a fast analysis; None scores every patch.
        """
        if until is not None:
            return self._analyze_fast(path, max_seconds, progress, until)
        timings = {"decode": 0.0, "frontend": 0.0, "networks": 0.0}
        acc = _Accumulator(len(self.labels))
        stream = _PatchStream()
        for patches in _patch_chunks(path, stream, timings, max_seconds, self.measure_features):
            t = time.perf_counter()
            acc.add(self.score_patches(patches))
            timings["networks"] += time.perf_counter() - t
            if progress is not None:
                progress(stream.samples / TARGET_SR)
        return self._finish(acc, stream.samples, timings, features=stream.features)

    def _analyze_fast(self, path, max_seconds, progress, rule) -> Analysis:
        """The whole file decoded and cut, its patches kept (``converge.PatchStore``), then scored in spread order."""
        timings = {"decode": 0.0, "frontend": 0.0, "networks": 0.0}
        store, stream = converge.PatchStore(), _PatchStream()
        for patches in _patch_chunks(path, stream, timings, max_seconds, self.measure_features):
            store.add(patches.numpy())
            if progress is not None:
                progress(stream.samples / TARGET_SR)
        t = time.perf_counter()
        [running] = converge.score_many([store.patches()], [rule], self.labels, self._score_array)
        timings["networks"] += time.perf_counter() - t
        return self._finish(running, stream.samples, timings, total=store.seen, features=stream.features)

    def _score_array(self, patches: np.ndarray) -> np.ndarray:
        """A fast analysis's scoring: bfloat16 timbral convs where the CPU pays for them (``fast.bf16_timbral``)."""
        with fast.bf16_timbral(self.nets, self.device == "cpu" and fast.bf16_pays()):
            return self.score_patches(torch.from_numpy(patches)).numpy()

    def _finish(self, acc: "_Accumulator", samples: int, timings, total: int | None = None,
                features: dict | None = None) -> Analysis:
        seconds = samples / TARGET_SR
        if seconds < MIN_SECONDS:
            raise TooShortError(f"too short to tag: {seconds:.2f} s of audio (at least {MIN_SECONDS:.0f} s needed)")
        means, spreads = acc.result()
        return Analysis(self.labels, means, spreads, acc.n, round(seconds, 3), timings,
                        acc.n if total is None else total, features or {})

    def analyze_many(self, paths, rules=None) -> list:
        """Score several files with their patches batched together: ``submit(paths, rules).results()``."""
        return self.submit(paths, rules).results()

    def submit(self, paths, rules=None) -> "PendingBatch":
        """Start decoding files and cutting their patches; returns at once.

        The work runs in ``decode_workers`` spawned processes (threads when 0),
        so a GPU tagger can write one batch's tags while the next is decoded.
        ``rules``: per path, a ``converge.StopRule`` (fast) or None (every patch).
        """
        paths = list(paths)
        native = self._ships_native()
        return PendingBatch(self, paths, [self._submit(prepare_file, p, native) for p in paths], rules)

    def _ships_native(self) -> bool:
        """Whether decode workers hand over native samples for ``score_prepared`` to measure in torch."""
        on = self.device.startswith("cuda") if self.batched_features is None else self.batched_features
        return bool(on and self.measure_features)

    def start_workers(self) -> None:
        """Start the decode processes now (spawning one imports torch: seconds), not on the first file."""
        for future in [self._submit(os.getpid) for _ in range(self.decode_workers)]:
            future.result()

    def offload(self, fn, *args):
        """Run ``fn(*args)`` in the decode workers (a GPU tagger's tag writes run there too); a future."""
        return self._submit(fn, *args)

    def _submit(self, fn, *args):
        try:
            return self._pool().submit(fn, *args)
        except BrokenProcessPool:  # broke since ``_pool`` looked: the next look replaces it
            return self._pool().submit(fn, *args)

    def score_prepared(self, prepared: list, rules=None) -> list:
        """Run the networks on the patches of several decoded files in shared forward passes.

        Files whose decode worker shipped native samples have their features measured here first,
        in one torch batch on the networks' device."""
        features_torch.measure_prepared([p for p in prepared if isinstance(p, Prepared)], self.device)
        rules = list(rules or [None] * len(prepared))
        self._score_converging([(p, r) for p, r in zip(prepared, rules) if isinstance(p, Prepared) and r is not None])
        ready = [p for p, r in zip(prepared, rules) if isinstance(p, Prepared) and r is None]
        if ready:
            t = time.perf_counter()
            scores = self.score_patches(torch.from_numpy(np.concatenate([p.patches for p in ready])))
            per_patch = (time.perf_counter() - t) / max(1, len(scores))
            for p, part in zip(ready, torch.split(scores, [len(p.patches) for p in ready])):
                p.timings["networks"] = per_patch * len(part)
                acc = _Accumulator(len(self.labels))
                acc.add(part)
                p.result = acc
        return [self._result(p) for p in prepared]

    def _score_converging(self, files: list) -> None:
        """Fast analyses of several files: each round scores the next patches of every file not yet settled."""
        t = time.perf_counter()
        runs = converge.score_many([p.patches for p, _ in files], [r for _, r in files], self.labels, self._score_array)
        per_patch = (time.perf_counter() - t) / max(1, sum(run.n for run in runs))
        for (p, _), run in zip(files, runs):
            p.result, p.timings["networks"] = run, per_patch * run.n

    def _pool(self):
        """Decode workers, made once (and again after a crash broke them).

        Processes are spawned, never forked: CUDA breaks in a forked child.
        A decode process that dies (a decoder crash) breaks the whole pool,
        which then refuses work (``_broken``); it is replaced here.
        """
        if self.pool is not None and getattr(self.pool, "_broken", False):
            self.close()
        if self.pool is None:
            if self.decode_workers > 0:
                self.pool = ProcessPoolExecutor(self.decode_workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_decode_worker_init)
            else:
                self.pool = ThreadPoolExecutor(4)
        return self.pool

    def _decode_alone(self, path):
        """Decode one file by itself after a decode process died: a crash now is this file's own."""
        try:
            return self._submit(prepare_file, path, self._ships_native()).result()
        except BrokenProcessPool:
            return DecodeError("corrupt", "the decoder crashed on this file (it killed its decode process)")

    def _result(self, prepared):
        if not isinstance(prepared, Prepared):
            return prepared
        try:
            return self._finish(prepared.result, prepared.samples, prepared.timings, total=len(prepared.patches),
                                features=prepared.features)
        except Exception as exc:  # noqa: BLE001 - reported per file
            return exc

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def _decode_worker_init() -> None:
    """Decode processes run one torch thread each, and leave signals to their tagger.

    The tagger decides when they stop (``close``); a Ctrl-C or a process
    group's SIGTERM reaching them directly would only break the pool under a
    tagger that is finishing its batch.
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def prepare_file(path, native: bool = False):
    """Decode one file and cut its patches (in a decode worker); the exception instead on failure.

    ``native``: keep the native-rate samples (``features_torch.NativeCapture``) for the tagger
    process to measure on its device, rather than measuring them here; a file too long for that
    is still measured here."""
    timings = {"decode": 0.0, "frontend": 0.0, "networks": 0.0}
    stream = _PatchStream()
    capture = features_torch.NativeCapture() if native else None
    try:
        parts = list(_patch_chunks(path, stream, timings, None, measure=capture))
    except Exception as exc:  # noqa: BLE001 - reported per file
        return exc
    patches = torch.cat(parts).numpy() if parts else np.zeros((0, PATCH, frontend.N_MELS), np.float32)
    return Prepared(patches, stream.samples, timings, features=stream.features,
                    native=capture.native() if capture is not None else None)


def _patch_chunks(path, stream, timings, max_seconds, features: bool = True, measure=None):
    """Patches of a file, chunk by chunk, timing decode, front end and features separately.

    Tempo, key and loudness ride on the same demux and decode, at the file's
    own rate and channels (``StreamMeasure``, or ``measure``, a sink like it);
    they land in ``stream.features`` once the file is decoded to its end.
    """
    measure = measure if measure is not None else StreamMeasure()
    chunks = iter_decode(path, TARGET_SR, chunk_seconds=CHUNK_PATCHES * PATCH * HOP / TARGET_SR,
                         max_seconds=max_seconds, native_sink=measure if features else None)
    timings.setdefault("features", 0.0)
    while True:
        t = time.perf_counter()
        before = measure.seconds
        chunk = next(chunks, None)
        timings["features"] += measure.seconds - before
        timings["decode"] += time.perf_counter() - t - (measure.seconds - before)
        if chunk is None and features:
            stream.features = measure.result(complete=max_seconds is None)
        t = time.perf_counter()
        patches = stream.feed(chunk) if chunk is not None else stream.finish()
        timings["frontend"] += time.perf_counter() - t
        if patches is not None and len(patches):
            yield patches
        if chunk is None:
            return


class _Accumulator:
    """Running sum and sum of squares per label (float64), so patches need not be kept."""

    def __init__(self, width: int):
        self.n = 0
        self.total = np.zeros(width, dtype=np.float64)
        self.squares = np.zeros(width, dtype=np.float64)

    def add(self, scores: torch.Tensor) -> None:
        values = scores.numpy().astype(np.float64)
        self.n += len(values)
        self.total += values.sum(axis=0)
        self.squares += np.square(values).sum(axis=0)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.total / max(1, self.n)
        var = np.maximum(self.squares / max(1, self.n) - mean**2, 0.0)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


class PendingBatch:
    """Files being decoded for one batch; ``results()`` waits for them and scores them together."""

    def __init__(self, analyzer: Analyzer, paths: list, futures: list, rules=None):
        self.analyzer, self.paths, self.futures, self.rules = analyzer, paths, futures, rules

    def results(self) -> list:
        """Per path, an ``Analysis`` or the exception that file raised.

        A file that kills its decode process (a decoder crash on a poison
        file) breaks the whole pool, and every file in flight with it; those
        files are decoded again one at a time in a fresh pool, so the culprit
        fails alone and the tagger itself lives on.
        """
        prepared = []
        for path, future in zip(self.paths, self.futures):
            try:
                prepared.append(future.result())
            except BrokenProcessPool:
                prepared.append(self.analyzer._decode_alone(path))
        return self.analyzer.score_prepared(prepared, self.rules)


@dataclass
class Prepared:
    """One file decoded and cut into patches, ready for the networks (picklable)."""

    patches: np.ndarray
    samples: int
    timings: dict
    result: _Accumulator | converge.Running | None = None
    features: dict = field(default_factory=dict)
    native: features_torch.Native | None = None  # samples for ``score_prepared`` to measure (then dropped)


class _PatchStream:
    """Turns audio chunks into the exact log-mel frames of a whole-file transform, then patches.

    A centred STFT frame at sample ``c`` needs audio ``c-256 .. c+256``. Each
    transform here covers whole hops of new audio plus one hop of real context
    on each side, so interior chunk borders match a whole-file transform; only
    the file's two ends are reflect-padded, as in the reference front end.
    """

    def __init__(self):
        self.pending = np.zeros(0, dtype=np.float32)  # audio not yet turned into frames
        self.context: np.ndarray | None = None  # the hop of audio before ``pending``
        self.frames: list[torch.Tensor] = []  # frames not yet cut into patches
        self.history: torch.Tensor | None = None  # the last full patch, for the end-aligned one
        self.samples = 0
        self.total_frames = 0
        self.features: dict = {}  # set by ``_patch_chunks`` at the end of the file

    def feed(self, chunk: np.ndarray) -> torch.Tensor | None:
        self.samples += len(chunk)
        self.pending = np.concatenate([self.pending, chunk.astype(np.float32, copy=False)])
        usable = (len(self.pending) - HOP) // HOP * HOP  # keep one hop of look-ahead
        if usable <= 0:
            return None
        self._transform(self.pending[: usable + HOP], frames=usable // HOP)
        self.context = self.pending[usable - HOP : usable]
        self.pending = self.pending[usable:]
        return self._cut()

    def finish(self) -> torch.Tensor | None:
        """The last frames (reflect-padded at the end) and the trailing patch rules."""
        if self.samples == 0:
            return None
        tail = self.pending
        head = self.context if self.context is not None else np.zeros(0, dtype=np.float32)
        mel = frontend.logmel(torch.from_numpy(np.concatenate([head, tail])))
        self.frames.append(mel[1:] if len(head) else mel)
        self.total_frames += len(self.frames[-1])
        self.pending = np.zeros(0, dtype=np.float32)
        out = self._cut()
        rest = torch.cat(self.frames) if self.frames else torch.empty(0, frontend.N_MELS)
        if self.history is None:  # shorter than one patch: repeat-pad it
            padded = frontend.patches(rest)
            return padded if out is None else torch.cat([out, padded])
        if len(rest) * 2 >= PATCH:
            last = torch.cat([self.history, rest])[-PATCH:].unsqueeze(0)
            return last if out is None else torch.cat([out, last])
        return out

    def _transform(self, audio: np.ndarray, frames: int) -> None:
        """Frames centred on the first ``frames`` hops of ``audio`` (after the context hop)."""
        if self.context is None:
            mel = frontend.logmel(torch.from_numpy(audio))[:frames]
        else:
            mel = frontend.logmel(torch.from_numpy(np.concatenate([self.context, audio])))[1 : frames + 1]
        self.frames.append(mel)
        self.total_frames += frames

    def _cut(self) -> torch.Tensor | None:
        frames = torch.cat(self.frames) if len(self.frames) > 1 else (self.frames[0] if self.frames else None)
        if frames is None or len(frames) < PATCH:
            self.frames = [frames] if frames is not None else []
            return None
        n = len(frames) // PATCH
        out = frames[: n * PATCH].reshape(n, PATCH, frontend.N_MELS)
        self.history = out[-1]
        self.frames = [frames[n * PATCH :]]
        return out.contiguous()
