"""``python -m bench.safewrite``: safe tag writes per second, by format.

For each format, ``--files`` genuinely encoded clips of ``--seconds`` (30 s
stereo 44.1 kHz: a 2.4 MB FLAC, a 0.7 MB MP3) are written in a temporary
directory (``--dir`` picks the filesystem: a btrfs or XFS one shows reflink
copies). Each file is then tagged ``--rounds`` times, alternating between two
tag sets so that every write really changes the file, in two ways:

- **in place**: ``tagfile.write_earmark_tags``, mutagen editing the file
  directly: the cost of the tag edit alone, with no safety;
- **safe**: ``safewrite.safe_write_tags``: clone, write, verify (tags, user
  tags, stream parameters, first decoded packets, audio bytes), fsync,
  atomic replace, fsync of the directory. This is "the bare loop of the safe
  write alone" that recalibration throughput is compared against.

Also shown: the median milliseconds of each stage of the safe write, the
copy method the filesystem allowed and the verification method the format
uses. Page cache is warm (the files were just written), as for a
recalibration pass over recently scanned files.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import fmt_rate, fmt_ratio, print_table
from workers.tagfiles import namespace as tagfile
from workers.audio.encode import write_audio
from workers.audio.formats import FORMATS
from workers.audio.synth import synth_clip
from workers.tagfiles.safewrite import safe_write_tags

TAGS_A = {
    "genre": ["jazz", "blues"], "mood": ["mellow"], "instrument": ["piano"],
    "vocals": ["instrumental"], "era": ["1960s"],
    "version": ["earmark/1 models=MTT_musicnn@abcd1234+MSD_musicnn@ef567890 calibration=lib-v1"],
}
TAGS_B = {**TAGS_A, "genre": ["jazz"], "version": [TAGS_A["version"][0].replace("lib-v1", "lib-v2")]}
STAGES = ("read", "copy", "write", "verify", "replace")


def make_files(directory: Path, fmt: str, count: int, seconds: float) -> list[Path]:
    """``count`` clips of one format, with a few user tags like a real library's."""
    paths = []
    for i in range(count):
        path = directory / f"{fmt}-{i}{FORMATS[fmt].extension}"
        write_audio(path, synth_clip(i, seconds, 44100, 2), 44100, fmt,
                    tags={"title": f"Track {i}", "artist": "Bench", "album": "Bench"})
        paths.append(path)
    return paths


def run_in_place(paths: list[Path], rounds: int) -> float:
    """Writes per second of the bare mutagen edit."""
    start = time.perf_counter()
    for r in range(rounds):
        for path in paths:
            tagfile.write_earmark_tags(path, TAGS_A if r % 2 == 0 else TAGS_B)
    return rounds * len(paths) / (time.perf_counter() - start)


def run_safe(paths: list[Path], rounds: int) -> tuple[float, dict[str, float], str, str]:
    """Writes per second of the safe write, median ms per stage, and methods."""
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    known = {p: os.stat(p) for p in paths}
    sizes = {p: (st.st_size, st.st_mtime_ns) for p, st in known.items()}
    copy_method = verify_method = "-"
    start = time.perf_counter()
    for r in range(rounds):
        for path in paths:
            size, mtime = sizes[path]
            result = safe_write_tags(path, TAGS_B if r % 2 == 0 else TAGS_A, size, mtime)
            sizes[path] = (result.size, result.mtime_ns)
            copy_method, verify_method = result.copy_method, result.verify_method
            for stage in STAGES:
                stages[stage].append(result.timings.get(stage, 0.0))
    per_second = rounds * len(paths) / (time.perf_counter() - start)
    return per_second, {s: 1000 * statistics.median(v) for s, v in stages.items()}, copy_method, verify_method


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.safewrite", description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated format keys")
    p.add_argument("--files", type=int, default=10, help="files per format")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each clip")
    p.add_argument("--rounds", type=int, default=6, help="writes per file (alternating tag sets)")
    p.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="earmark-bench-safewrite-", dir=args.dir))
    rows = []
    try:
        for fmt in [f for f in args.formats.split(",") if f]:
            directory = workdir / fmt
            directory.mkdir()
            paths = make_files(directory, fmt, args.files, args.seconds)
            size_mb = statistics.mean(p.stat().st_size for p in paths) / 1e6
            in_place = run_in_place(paths, args.rounds)
            safe, stage_ms, copy_method, verify_method = run_safe(paths, args.rounds)
            rows.append([fmt, f"{size_mb:.1f}", fmt_rate(in_place), fmt_rate(safe),
                         fmt_ratio(in_place / safe),
                         *(f"{stage_ms[s]:.1f}" for s in STAGES), copy_method, verify_method])
            shutil.rmtree(directory)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(
        ["format", "MB", "in place/s", "safe/s", "cost", *(f"{s} ms" for s in STAGES), "copy", "verify"],
        rows,
        title=(f"Tag writes per second, {args.files} files x {args.rounds} rounds of {args.seconds:g} s clips "
               f"({os.cpu_count()} CPUs, Python {sys.version.split()[0]})"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
