"""Full vs fast analysis, side by side in one run (``python -m bench.tagger`` prints it; see there).

Each library is tagged by real ``run_tagger`` processes (``bench.tagger.run_taggers``)
with the library's ``analysis`` set to ``full`` and then ``fast``, at 1 and at
2 processes, the two modes alternating within each repeat so that both see
the same load. Reported per library: tracks/s and × realtime (medians over
repeats), the share of patches scored, the taggers' peak memory; then the
agreement of the written (track, category, value) tags of the fast runs with
the full runs', tracks whose genre the fast path lost, and the mean absolute
difference of the calibrated scores (strengths), under the calibration the
runs wrote with (uncalibrated: the libraries are under the auto-calibration
size) and under a p5/p95 calibration computed from the full run's scores, as
a later recalibration would apply to the stored scores.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from bench.common import median, print_table

MODES = ("full", "fast")


def run_pair(ws, library: Path, models: Path, processes: list[int], repeats: int) -> dict:
    """{(mode, processes): [run, ...]}, full and fast alternating."""
    from bench.tagger import run_taggers

    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(repeats):
        for n in processes:
            for mode in MODES:
                runs.setdefault((mode, n), []).append(run_taggers(ws, library, models, n, "cpu", None, analysis=mode))
    return runs


def tag_set(runs: list[dict]) -> set[tuple[str, str, str]]:
    return {(path, category, value) for path, cats in runs[0]["tags"].items()
            for category, values in cats.items() for value in values}


def quality(full: dict, fast: dict) -> dict:
    """Agreement and score error of a fast run against a full run of the same files."""
    from bench.common import setup_django

    setup_django()
    from workers.tagging.calibrated import LibraryCalibration
    from workers.tagging.categories import LABELS
    from workers.tagging.tagset import GENRE_FLOOR, UNCALIBRATED, build_tags

    a, b = tag_set([full]), tag_set([fast])
    lost = sum(1 for p, cats in full["tags"].items() if cats.get("genre") and not fast["tags"].get(p, {}).get("genre"))
    labels = list(LABELS)
    paths = sorted(set(full["means"]) & set(fast["means"]))
    matrix = np.stack([full["means"][p] for p in paths]) if paths else np.zeros((0, len(labels)))
    stats = {label: {"p5": float(np.percentile(matrix[:, i], 5)), "p95": float(np.percentile(matrix[:, i], 95))}
             for i, label in enumerate(labels)} if paths else {}
    out = {"tags": len(a | b), "agreement": len(a & b) / max(1, len(a | b)), "lost_genre": lost}
    for key, cal in (("uncalibrated", UNCALIBRATED), ("recalibrated", LibraryCalibration("bench", stats))):
        diffs, same, union = [], 0, 0
        for p in paths:
            m_full, m_fast = full["means"][p], fast["means"][p]
            diffs.append(np.mean([abs(cal.scale(l, float(m_fast[i])) - cal.scale(l, float(m_full[i])))
                                  for i, l in enumerate(labels)]))
            sets = []
            for m in (m_full, m_fast):
                ts = build_tags(dict(zip(labels, map(float, m))), None, cal, models="m@1", genre_floor=GENRE_FLOOR)
                sets.append({(c, v) for c, vs in ts.categories.items() for v in vs})
            same, union = same + len(sets[0] & sets[1]), union + len(sets[0] | sets[1])
        out[f"mad_{key}"] = float(np.mean(diffs)) if diffs else float("nan")
        out[f"agreement_{key}"] = same / max(1, union)
    return out


def report(name: str, runs: dict, processes: list[int]) -> dict:
    rows, xrt = [], {}
    for mode in MODES:
        for n in processes:
            rs = runs[(mode, n)]
            xrt[(mode, n)] = median([r["audio"] / r["wall"] for r in rs])
            scored = sum(r["patches"] for r in rs) / max(1, sum(r["patches_total"] for r in rs))
            rows.append([f"{name}: {mode}", n, f"{median([r['tracks'] / r['wall'] for r in rs]):.2f}",
                         f"{xrt[(mode, n)]:.1f}", f"{scored:.0%}", f"{max(r['peak_mb'] for r in rs):.0f}",
                         sum(r["failed"] for r in rs)])
    print()
    first = runs[("full", processes[0])][0]
    print_table(["library / analysis", "procs", "tracks/s", "x realtime", "patches scored", "peak MB/proc", "failed"],
                rows, title=f"{name}: {first['tracks']} tracks, {first['audio'] / 60:.1f} min of audio per run "
                            f"(medians over {len(runs[('full', processes[0])])} repeats)")
    q = quality(runs[("full", processes[0])][0], runs[("fast", processes[0])][0])
    print(f"written (track, category, value) tags, fast vs full: {q['agreement']:.1%} the same of {q['tags']} "
          f"(target 98%); tracks that lost their genre: {q['lost_genre']}")
    print(f"mean |difference| of calibrated scores: {q['mad_uncalibrated']:.4f} as written (uncalibrated); "
          f"{q['mad_recalibrated']:.4f} under a p5/p95 calibration of the full run's scores, whose tags agree "
          f"{q['agreement_recalibrated']:.1%}")
    print("fast / full x realtime: " + ", ".join(f"{n} proc {xrt[('fast', n)] / xrt[('full', n)]:.2f}x"
                                                for n in processes))
    return {"xrt": xrt, "quality": q}


def anchors() -> list[list[str]]:
    """The taggers a user would otherwise run, where they install; else why not."""
    rows = []
    if importlib.util.find_spec("musicnn") is not None:
        rows.append(["musicnn 0.1.0 (pip)", "installed, not timed here: Earmark's full analysis runs its weights"])
    else:
        rows.append(["musicnn 0.1.0 (pip)", "not installable: it pins numpy<1.17, which has no Python 3.11 build "
                                            "(pip's source build fails); Earmark's full analysis runs its weights"])
    graph = Path(os.environ.get("EARMARK_ESSENTIA_MUSICNN", "var/cache/essentia/msd-musicnn-1.pb"))
    if importlib.util.find_spec("essentia") is None:
        rows.append(["essentia-tensorflow musicnn", "not installable: essentia-tensorflow is not in this environment"])
    elif not graph.exists():
        rows.append(["essentia-tensorflow musicnn", "not installable: essentia-tensorflow installs from PyPI, but its "
                                                    f"musicnn graphs are a separate download (none at {graph})"])
    else:
        rows.append(["essentia-tensorflow musicnn", f"graph {graph} present; not timed by this version"])
    return rows


def corpus_library(ws, tracks: int, formats: list[str], seconds: float) -> Path | None:
    """The real-music corpus (``bench.corpus``), whole tracks by default, copied into one library folder."""
    from bench import corpus

    try:
        picked = corpus.build(corpus.DEFAULT_PACKAGES, tracks, formats, seconds, None,
                              log=lambda *a, **k: print(*a, **k))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"real corpus unavailable: {exc}")
        return None
    root = ws.dir / "corpus"
    for track in picked:
        for fmt, path in track.files.items():
            target = root / track.package / fmt / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return root
