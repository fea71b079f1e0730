"""Tempo, key and loudness: ours against librosa and essentia on clips with known answers, and our cost.

    python -m bench.features [--quick]

One table, side by side: MIREX tempo rates (exact: within 2 % of the true BPM; octave-tolerant:
within 2 % of 1, 2, 1/2, 3 or 1/3 times it) on synthetic drum patterns, on drums under a loud
chord bed and on ``workers.audio.synth`` music-like clips; how many beat-free clips (pads, pink
noise, rubato) were given a BPM anyway; key accuracy and the MIREX weighted score (1 / 0.5 fifth
/ 0.3 relative / 0.2 parallel) on all 24 keys and on music-like clips; the largest integrated
loudness difference from pyloudnorm; and the cost per 30 s of 44.1 kHz stereo, median of several
runs on one thread (the tagger costs ~740 ms per 30 s on one core). librosa: ``feature.tempo``
and ``chroma_cqt`` averaged, matched with our default key profile; essentia:
``RhythmExtractor2013(multifeature)``, ``KeyExtractor`` and ``LoudnessEBUR128``. A library that
does not import is shown as "not installable: <reason>".
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from workers.features import analyze, synth  # noqa: E402
from workers.features import key as K  # noqa: E402
from workers.features import loudness as L  # noqa: E402
from workers.features import tempo as T  # noqa: E402

RATE = 44100
OCTAVES = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)


def _try_import(name):
    try:
        if name == "librosa":
            import librosa
            return librosa, None
        import essentia
        import essentia.standard as es
        essentia.log.infoActive = False
        essentia.log.warningActive = False
        return es, None
    except Exception as exc:  # noqa: BLE001 (any import failure is a reason to print)
        return None, f"not installable: {type(exc).__name__}: {exc}"[:70]


def _within(est, true, factors=(1.0,)):
    return est is not None and any(abs(est - true * f) <= 0.02 * true * f for f in factors)


# ------------------------------------------------------------------ data sets

def tempo_sets(quick: bool):
    tempos = np.linspace(60, 200, 8 if quick else 15).round(1)
    drums, mixed = [], []
    for i, bpm in enumerate(tempos):
        for timbre in synth.DRUM_TIMBRES:
            for swing in ((0.5, 0.62) if timbre in ("kit", "rock") else (0.5,)):
                drums.append((synth.drums(bpm, timbre, swing, 12.0, RATE, seed=i), bpm))
        for j, w in enumerate((0.6, 0.4)):
            beat = synth.drums(bpm, synth.DRUM_TIMBRES[(i + j) % 4], 0.5 + 0.1 * (i % 2), 12.0, RATE, seed=i)
            chords = synth.tonal(i % 12, ("major", "minor")[j], "chords", ("saw", "sine")[i % 2], 12.0, RATE, seed=i)
            mixed.append((w * beat + (1 - w) * chords, bpm))
    free = [(make(seconds=12.0, rate=RATE, seed=s), None)
            for make in (synth.pad, synth.pink_noise, synth.rubato) for s in range(1, 3 if quick else 5)]
    return drums, mixed, free


def music_sets(quick: bool):
    """workers.audio.synth clips: tempo where drums play, key where the scale is major or minor."""
    from workers.audio import synth as music
    tempo_clips, key_clips = [], []
    for seed in range(12 if quick else 40):
        plan = music.plan_for(np.random.default_rng(seed))
        clip = music.synth_clip(seed, 12.0, RATE, channels=1)[0]
        if "drums" in plan.voices:
            tempo_clips.append((clip, plan.tempo))
        if plan.scale in ("major", "minor", "harmonic_minor") and plan.voices & {"chords", "bass", "melody"}:
            key_clips.append((clip, (plan.root % 12, "major" if plan.scale == "major" else "minor")))
    return tempo_clips, key_clips


def key_set(quick: bool):
    out = []
    for tonic in range(12):
        for mode in ("major", "minor"):
            for kind in ("chords", "melody"):
                for timbre in (synth.TONAL_TIMBRES[:1] if quick else synth.TONAL_TIMBRES):
                    seed = tonic * 7 + 3 * (mode == "minor") + (kind == "melody") + 2 * (timbre == "saw")
                    out.append((synth.tonal(tonic, mode, kind, timbre, 12.0, RATE, seed), (tonic, mode)))
    return out


# ------------------------------------------------------------------ the three estimators

def ours_tempo(x):
    return T.estimate(x, RATE).bpm


def ours_key(x):
    k = K.estimate(x, RATE)
    return None if k.tonic is None else (k.tonic, k.mode)


def librosa_tempo(lib):
    return lambda x: float(lib.feature.tempo(y=x.astype(np.float32), sr=RATE)[0])


def librosa_key(lib):
    def run(x):
        chroma = lib.feature.chroma_cqt(y=x.astype(np.float32), sr=RATE).mean(axis=1)
        k = K.match(chroma / max(chroma.sum(), 1e-12))
        return None if k.tonic is None else (k.tonic, k.mode)
    return run


def essentia_tempo(es):
    rhythm = es.RhythmExtractor2013(method="multifeature")
    return lambda x: float(rhythm(x.astype(np.float32))[0])


def essentia_key(es):
    extractor = es.KeyExtractor(sampleRate=RATE)
    names = {n: i for i, n in enumerate(K.PITCH_CLASSES)}
    names.update({"C#": 1, "Db": 1, "D#": 3, "Gb": 6, "G#": 8, "A#": 10})

    def run(x):
        key, scale, _ = extractor(x.astype(np.float32))
        return names.get(key), scale
    return run


# ------------------------------------------------------------------ measuring

def tempo_rates(fn, clips):
    est = [fn(x) for x, _ in clips]
    exact = np.mean([_within(e, t) for e, (_, t) in zip(est, clips)])
    octave = np.mean([_within(e, t, OCTAVES) for e, (_, t) in zip(est, clips)])
    return f"{exact:6.1%} / {octave:6.1%}"


def key_rates(fn, clips):
    est = [fn(x) for x, _ in clips]
    correct = np.mean([e == r for e, (_, r) in zip(est, clips)])
    mirex = np.mean([K.mirex_score(e, r) for e, (_, r) in zip(est, clips)])
    return f"{correct:6.1%} / {mirex:.3f}"


def loudness_error(quick: bool):
    """The largest |integrated loudness - pyloudnorm| of ours and essentia's, with where it happened."""
    import pyloudnorm as pyln
    worst = {"ours": (0.0, ""), "essentia": (0.0, "")}
    es, _ = _try_import("essentia")
    from workers.audio import synth as music
    signals = []
    for rate in ((48000,) if quick else (44100, 48000, 96000, 192000)):
        for ch in (1, 2, 6):
            signals.append((synth.sine(997.0, 3.0, rate, -23.0, ch), rate, f"sine {rate // 1000} kHz"))
            signals.append((synth.noise(3.0, rate, -18.0, ch, seed=ch), rate, f"noise {rate // 1000} kHz"))
    for seed in range(2 if quick else 6):
        signals.append((music.synth_clip(seed, 8.0, 44100, channels=2).T.astype(np.float64), 44100, "music"))
    for x, rate, label in signals:
        ref_x = x[:, [0, 1, 2, 4, 5]] if x.shape[1] == 6 else x
        ref = pyln.Meter(rate).integrated_loudness(ref_x)
        err = abs(L.measure(x, rate).integrated_lufs - ref)
        if err > worst["ours"][0]:
            worst["ours"] = (err, label)
        if es is not None and x.shape[1] == 2:
            err = abs(es.LoudnessEBUR128(sampleRate=rate)(x.astype(np.float32))[2] - ref)
            if err > worst["essentia"][0]:
                worst["essentia"] = (err, label)
    return worst


def cost_ms(fn, x, runs=5):
    fn(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sets (about a third)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    lib, lib_why = _try_import("librosa")
    es, es_why = _try_import("essentia")
    drums, mixed, free = tempo_sets(args.quick)
    music_tempo, music_key = music_sets(args.quick)
    keys = key_set(args.quick)
    cols = {"ours": (ours_tempo, ours_key)}
    cols["librosa"] = (librosa_tempo(lib), librosa_key(lib)) if lib else lib_why
    cols["essentia"] = (essentia_tempo(es), essentia_key(es)) if es else es_why

    rows = []

    def row(label, make):
        rows.append((label, {name: (make(c) if isinstance(c, tuple) else c) for name, c in cols.items()}))

    row(f"tempo: drum patterns ({len(drums)}) exact / octave", lambda c: tempo_rates(c[0], drums))
    row(f"tempo: drums under chords ({len(mixed)})", lambda c: tempo_rates(c[0], mixed))
    row(f"tempo: audio.synth music ({len(music_tempo)})", lambda c: tempo_rates(c[0], music_tempo))
    row(f"tempo: beat-free clips given a BPM ({len(free)})",
        lambda c: f"{sum(c[0](x) is not None for x, _ in free)} of {len(free)}")
    row(f"key: 24 keys synthetic ({len(keys)}) correct / MIREX", lambda c: key_rates(c[1], keys))
    row(f"key: audio.synth music ({len(music_key)})", lambda c: key_rates(c[1], music_key))
    worst = loudness_error(args.quick)
    rows.append(("loudness: max |LUFS - pyloudnorm|", {
        "ours": "{:.3f} LU ({})".format(*worst["ours"]), "librosa": "n/a (no loudness)" if lib else lib_why,
        "essentia": "{:.3f} LU (stereo; {})".format(*worst["essentia"]) if es else es_why}))
    from workers.audio import synth as music
    clip = music.synth_clip(3, 30.0, RATE, channels=2, style="band").T.copy()
    mono = clip.mean(axis=1)
    costs = {"ours": f"{cost_ms(lambda x: analyze(x, RATE), clip):.0f} ms (all three)"}
    costs["librosa"] = (f"{cost_ms(lambda x: (librosa_tempo(lib)(x), librosa_key(lib)(x)), mono, 3):.0f} ms "
                        "(tempo+key)") if lib else lib_why
    if es:
        loud = es.LoudnessEBUR128(sampleRate=RATE)
        et, ek = essentia_tempo(es), essentia_key(es)
        costs["essentia"] = (f"{cost_ms(lambda x: (et(x.mean(axis=1)), ek(x.mean(axis=1)), loud(x.astype(np.float32))), clip, 3):.0f} ms (all three)")  # noqa: E501
    else:
        costs["essentia"] = es_why
    parts = {
        "loudness": cost_ms(lambda x: L.measure(x, RATE), clip),
        "tempo": cost_ms(lambda x: T.estimate(x, RATE), mono),
        "key": cost_ms(lambda x: K.estimate(x, RATE), mono)}
    rows.append(("cost per 30 s 44.1 kHz stereo, median", costs))
    rows.append(("  ours by part", {"ours": " / ".join(f"{k} {v:.0f}" for k, v in parts.items()) + " ms",
                                    "librosa": "", "essentia": ""}))

    rows.extend(real_music_rows(cols, args.quick))

    width = max(len(r[0]) for r in rows) + 2
    colw = {name: max(len(name), *(len(str(r[1][name])) for r in rows)) + 2 for name in cols}
    print(f"{'':{width}}" + "".join(f"{name:{colw[name]}}" for name in cols))
    for label, values in rows:
        print(f"{label:{width}}" + "".join(f"{str(values[name]):{colw[name]}}" for name in cols))
    print()
    tagging_cost(args.quick)
    print(f"\n(this run took {time.perf_counter() - t0:.0f} s)")


def real_music_rows(cols: dict, quick: bool) -> list:
    """Real recordings have no known answer: how often librosa and essentia agree with ours, and loudness.

    The corpus's 60 s clips (from the middle of game-soundtrack tracks, FLAC), resampled to the
    bench's rate. Tempo agreement: within 2 % (exact) or of an octave; key: the same key and the
    MIREX score of theirs against ours.
    """
    import pyloudnorm as pyln
    from scipy import signal as sp

    from bench import corpus

    try:
        tracks = corpus.build(tracks=15, seconds=60, formats=("flac",), log=lambda *_: None)
    except Exception as exc:  # noqa: BLE001 - the corpus needs the Debian mirror once
        return [("real music", {name: f"not measured: {exc}" for name in cols})]
    clips = []
    for t in tracks[:: 3 if quick else 1]:
        audio, rate, _ = corpus.read_clip(t.files["flac"], 60)
        clips.append(sp.resample_poly(audio, RATE, rate, axis=1).T.copy() if rate != RATE else audio.T.copy())
    mono = [x.mean(axis=1) for x in clips]
    ours_bpm, ours_keys = [ours_tempo(x) for x in mono], [ours_key(x) for x in mono]
    n = len(clips)
    tempo, key = {}, {}
    for name, c in cols.items():
        if not isinstance(c, tuple):
            tempo[name] = key[name] = c
        elif name == "ours":
            tempo[name] = f"a BPM for {sum(b is not None for b in ours_bpm)} of {n}"
            key[name] = f"a key for {sum(k is not None for k in ours_keys)} of {n}"
        else:
            bpm, keys = [c[0](x) for x in mono], [c[1](x) for x in mono]
            both = [(o, b) for o, b in zip(ours_bpm, bpm) if o and b]
            exact, octave = (sum(_within(o, b, f) for o, b in both) for f in ((1.0,), OCTAVES))
            tempo[name] = f"{exact} / {octave} of {len(both)} as ours"
            pairs = [(k, o) for k, o in zip(keys, ours_keys) if o is not None]
            mirex = np.mean([K.mirex_score(k, o) for k, o in pairs] or [0.0])
            key[name] = f"{sum(k == o for k, o in pairs)} of {len(pairs)} as ours, MIREX {mirex:.3f}"
    worst = max(abs(L.measure(x, RATE).integrated_lufs - pyln.Meter(RATE).integrated_loudness(x)) for x in clips)
    return [(f"real music ({n} x 60 s): tempo agreeing exact / octave", tempo),
            ("real music: key agreeing", key),
            ("real music: max |LUFS - pyloudnorm|", {name: f"{worst:.3f} LU" if name == "ours" else ""
                                                     for name in cols})]


def tagging_cost(quick: bool, out=print) -> dict:
    """The tagger's own path (``Analyzer.analyze``, full and fast) on real files, features on and off, interleaved.

    Median ms per 30 s of audio over the runs; the ratio is what features add to tagging alone.
    """
    import tempfile
    from pathlib import Path

    from bench.common import setup_django
    from bench.tagger import models_dir

    models = models_dir()
    os.environ["EARMARK_MODELS_DIR"] = str(models)
    setup_django()
    from workers.audio import synth as music
    from workers.audio.encode import write_audio
    from workers.models import Library
    from workers.tagging import converge
    from workers.tagging.pipeline import Analyzer, use_threads

    use_threads(1)
    analyzer = Analyzer("cpu", models_dir=models)
    rule = converge.rule_for(Library(), None, "fast")  # a default library's fast analysis (uncalibrated)
    runs = 3 if quick else 5
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, fmt in enumerate(("flac", "mp3", "m4a", "opus")):
            path = Path(tmp) / f"clip{i}.{fmt}"
            write_audio(path, music.synth_clip(i, 30.0, RATE, channels=2, style="band"), RATE, fmt)
            files.append(path)
        for mode, until in (("full", None), ("fast", rule)):
            results[mode] = _with_and_without(analyzer, files, until, runs, f"{mode} analysis, 30 s clips", out)
    real = _real_tracks(3 if quick else 6, out)
    for mode, until in (("full", None), ("fast", rule)):
        if real:
            results[f"real {mode}"] = _with_and_without(
                analyzer, real, until, 3, f"{mode} analysis, {len(real)} whole real tracks", out)
    analyzer.measure_features = True
    return results


def _with_and_without(analyzer, files, until, runs: int, label: str, out) -> tuple[float, float]:
    """Total time of ``Analyzer.analyze`` over ``files``, features off and on interleaved, median of the runs."""
    times = {True: [], False: []}
    for path in files:  # once untimed: the files in the page cache, the kernels compiled, before either side
        analyzer.analyze(os.fsencode(path), until=until)
    for _ in range(runs):
        for on in (False, True):
            analyzer.measure_features = on
            t = time.perf_counter()
            for path in files:
                analyzer.analyze(os.fsencode(path), until=until)
            times[on].append(time.perf_counter() - t)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    out(f"tagging, {label} (median of {runs}): without features {off:.2f} s, with {on:.2f} s: "
        f"+{on - off:.2f} s = {100 * (on / off - 1):+.1f}% (target at most +15%)")
    return off, on


def _real_tracks(count: int, out) -> list:
    """Whole game-soundtrack tracks (48-654 s) from the real-music corpus, FLAC, MP3 and Opus in turn."""
    from bench import corpus

    formats = ("flac", "mp3", "opus")
    try:
        tracks = corpus.build(tracks=15, seconds=0, formats=formats, log=lambda *_: None)
    except Exception as exc:  # noqa: BLE001 - the corpus needs the Debian mirror once; say why it is missing
        out(f"tagging on real tracks: not measured, the corpus could not be built: {exc}")
        return []
    step = max(1, len(tracks) // count)
    return [t.files[formats[i % 3]] for i, t in enumerate(tracks[::step][:count])]


if __name__ == "__main__":
    main()
