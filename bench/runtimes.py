"""``python -m bench.runtimes``: the musicnn networks' time per patch batch under each CPU runtime, and their tags.

Every runtime runs the same installed MTT_musicnn + MSD_musicnn weights, one
thread per process (``pipeline.use_threads(1)``, as the tagger runs), on real
3 s patches of the corpus (``var/corpus/encoded``). Timing is interleaved:
each round times one batch of every runtime in turn, so all of them see the
same load on a shared machine; medians and ratios against the current path
(``torch``: the fp32 oneDNN forms in ``workers.tagging.fast``) are printed.

Quality is judged on tags, not raw scores: every patch of every track is
scored by each runtime, per-track means and spreads go through
``tagset.build_tags`` (uncalibrated, as the bench taggers write them), and
``bench.fastpath.quality`` compares the (track, category, value) tags and the
calibrated scores with the current full path's.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, median, print_table

CORPUS = ROOT / "var" / "corpus" / "encoded"
CACHE = ROOT / "var" / "bench-cache"


def corpus_patches(variant: str, fmt: str = "flac") -> dict[str, np.ndarray]:
    """{track: (n, 187, 96) patches} of every ``fmt`` file in ``var/corpus/encoded/<variant>``, cached as npz."""
    cache = CACHE / f"runtimes-patches-{variant}-{fmt}.npz"
    if cache.exists():
        return dict(np.load(cache))
    import torch

    from workers.tagging import pipeline

    out = {}
    for path in sorted((CORPUS / variant).glob(f"*/{fmt}/*.{fmt}")):
        timings = {"decode": 0.0, "frontend": 0.0, "networks": 0.0}
        parts = list(pipeline._patch_chunks(path, pipeline._PatchStream(), timings, None, False))
        out[str(path.relative_to(CORPUS / variant))] = torch.cat(parts).numpy()
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def time_interleaved(runtimes: dict, every: np.ndarray, batches: list[int], rounds: int) -> dict:
    """{(name, batch): [seconds per patch, ...]}: each round runs every runtime at every batch size in turn.

    All pairs share one loop, so a batch-8 runtime and the batch-1 current path
    see the same load on a shared machine and their ratio means something.
    """
    rng = np.random.default_rng(0)
    picks = {b: [every[rng.choice(len(every), b, replace=False)] for _ in range(16)] for b in batches}
    for fn in runtimes.values():  # warm-up: first-call packing, compilation, allocator growth
        for b in batches:
            fn(picks[b][0])
    times = {(name, b): [] for name in runtimes for b in batches}
    for r in range(rounds):
        for (name, b), ts in times.items():
            t = time.perf_counter()
            runtimes[name](picks[b][r % 16])
            ts.append((time.perf_counter() - t) / b)
    return times


def track_scores(fn, tracks: dict[str, np.ndarray], batch: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{track: (means, spreads)} over every patch, ``batch`` patches per call."""
    out = {}
    for name, patches in tracks.items():
        scores = np.concatenate([fn(patches[i:i + batch]) for i in range(0, len(patches), batch)]).astype(np.float64)
        out[name] = (scores.mean(axis=0), scores.std(axis=0))
    return out


def as_run(scores: dict, labels: tuple[str, ...]) -> dict:
    """The shape ``bench.fastpath.quality`` compares: written tags and means in ``categories.LABELS`` order."""
    from workers.tagging.categories import LABELS
    from workers.tagging.tagset import GENRE_FLOOR, UNCALIBRATED, build_tags

    order = [labels.index(label) for label in LABELS]
    tags, means = {}, {}
    for track, (m, s) in scores.items():
        ts = build_tags(dict(zip(labels, map(float, m))), dict(zip(labels, map(float, s))), UNCALIBRATED,
                        models="m@1", genre_floor=GENRE_FLOOR)
        tags[track] = {c: list(v) for c, v in ts.categories.items()}
        means[track] = m[order].astype(np.float32)
    return {"tags": tags, "means": means}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="full", help="corpus variant under var/corpus/encoded (full, 60s, 20s)")
    parser.add_argument("--formats", nargs="+", default=["flac"], help="corpus formats (flac, mp3, opus)")
    parser.add_argument("--rounds", type=int, default=60, help="timed batches per runtime")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="patches per forward pass")
    parser.add_argument("--only", nargs="*", help="runtimes to run (default: all that load)")
    parser.add_argument("--no-quality", action="store_true", help="timing only")
    parser.add_argument("--no-fusion", action="store_true", help="skip the fused MTT+MSD front-end probe")
    args = parser.parse_args(argv)

    from bench.common import setup_django

    setup_django()
    from bench.fastpath import quality
    from bench.runtime_options import build_all, fusion_probe
    from bench.tagger import models_dir
    from workers.tagging import pipeline

    pipeline.use_threads(1)
    models = models_dir()
    tracks = {name: p for fmt in args.formats for name, p in corpus_patches(args.variant, fmt).items()}
    every = np.concatenate(list(tracks.values()))
    print(f"{len(tracks)} tracks, {len(every)} patches ({len(every) * 3 / 60:.0f} min) from "
          f"var/corpus/encoded/{args.variant}")
    runtimes, labels, skipped = build_all(models, every[:64], args.only)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    times = time_interleaved(runtimes, every, args.batch, args.rounds)
    base = median(times[("torch", 1)]) if ("torch", 1) in times else median(times[("torch", args.batch[0])])
    rows = [[name, b, f"{median(t) * 1e3 * b:.1f}", f"{median(t) * 1e3:.1f}", f"{base / median(t):.2f}x",
             f"{3.0 / median(t):.0f}x"] for (name, b), t in times.items()]
    print_table(["runtime", "batch", "ms / batch", "ms / patch", "speed vs torch batch 1", "networks x realtime"], rows,
                title=f"MTT+MSD musicnn, 1 thread, median of {args.rounds} rounds, all rows interleaved")
    if not args.no_fusion:
        rows = fusion_probe(models, every[0], False, args.rounds) + fusion_probe(models, every[0], True, args.rounds)[:2]
        print_table(["front-end conv (kernel)", "precision", "MTT + MSD apart ms", "one fused conv ms", "fused speed"],
                    rows, title="fusing the MTT and MSD front ends (an upper bound: they share only their input)")
    if args.no_quality:
        return
    reference = as_run(track_scores(runtimes["torch"], tracks, 1), labels)
    rows = []
    for name, fn in runtimes.items():
        if name == "torch":
            continue
        q = quality(reference, as_run(track_scores(fn, tracks, max(args.batch)), labels))
        rows.append([name, f"{q['agreement']:.1%} of {q['tags']}", q["lost_genre"], f"{q['mad_uncalibrated']:.4f}",
                     f"{q['mad_recalibrated']:.4f}", f"{q['agreement_recalibrated']:.1%}"])
    print_table(["runtime", "tags same as torch fp32", "lost genre", "mean |d| uncal", "mean |d| p5/p95",
                 "tags same p5/p95"], rows, title=f"tags over every patch of {len(tracks)} tracks, vs torch fp32")


if __name__ == "__main__":
    main()
