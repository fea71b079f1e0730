"""``python -m bench.tagger``: tagging throughput on this machine, against a decode-only ceiling.

CPU (default): a demo library is tagged by 1 and 2 ``run_tagger`` processes
(MTT_musicnn + MSD_musicnn, one thread each); reported as tracks/s and ×
realtime (seconds of audio per wall second), with the time split into decode,
front end, networks and tag write (summed from the jobs' own timings). In the
same run, a bare decode loop over the same files gives the ceiling of a
pipeline that does nothing but decode.

Pipeline (always): the GPU host's path, one ``run_tagger --batch N`` process
whose decode processes decode and write while the next batch is claimed
(``workers.tagging.tag_worker``), against the ceiling of the same number of decode
processes doing nothing but decode and cut patches. Without ``--gpu`` the
tagger's networks are a stand-in that costs nothing (``bench.stand_in_tagger``):
a GPU's forward passes take milliseconds, so this is what such a tagger can be
fed on this machine's cores; with ``--gpu`` the real networks run on the GPU.

Full vs fast analysis (CPU, always; ``bench.fastpath``): the demo library and
the real-music corpus (``bench.corpus``: whole tracks of Debian game
soundtracks in ``--corpus-formats``) are tagged with the library's analysis
set to full and to fast, at 1 and 2 processes, side by side in one run: ×
realtime, patches scored, peak memory per process, agreement of the written
(track, category, value) tags and tracks that lost their genre, mean absolute
difference of calibrated scores; then one tagger that overlaps decoding with
its networks (``--batch 4`` and one decode process) against two plain ones,
and the anchors (the original ``musicnn`` package, essentia's musicnn models)
where they install. The CPU rows above are the fast runs of the demo library.
``--quick`` makes it a short smoke run.

GPU (``--gpu``): also an in-process sweep of files per batch (patches of several
files in one forward pass, fed by spawned decode processes), with tracks/s,
× realtime and GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from bench import fastpath
from bench.common import ROOT, Procs, Workspace, connect, manage, median, print_table, scalar, stopwatch, wait_until

CACHE = ROOT / "var" / "bench-cache"
TARGET_CPU_X_REALTIME = 50.0
TARGET_GPU_X_REALTIME = 2000.0


def demo_library(tracks: int, min_s: float, max_s: float) -> Path:
    """A demo library made once and reused (``var/bench-cache``)."""
    path = CACHE / f"tagger-{tracks}-{min_s:g}-{max_s:g}"
    if not (path / "demo-manifest.json").exists():
        env = dict(os.environ, DJANGO_SETTINGS_MODULE="project.settings", SECRET_KEY="bench",
                   EARMARK_DATA_DIR=str(CACHE))
        manage("make_demo_library", path, "--tracks", tracks, "--min-seconds", min_s, "--max-seconds", max_s,
               "--jobs", os.cpu_count() or 1, env=env, timeout=3600)
    return path


def models_dir() -> Path:
    """Installed models (installed once into the bench cache from the cached wheel)."""
    target = Path(os.environ.get("EARMARK_MODELS_DIR") or CACHE / "models")
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="project.settings", SECRET_KEY="bench",
               EARMARK_DATA_DIR=str(CACHE), EARMARK_MODELS_DIR=str(target))
    wheel = sorted((ROOT / "var" / "cache" / "wheels").glob("musicnn-0.1.0-*.whl"))
    manage("install_models", *(["--from-wheel", wheel[0]] if wheel else []), env=env, timeout=1200)
    return target


def audio_files(root: Path) -> list[Path]:
    from workers.audio.formats import format_for_path

    return sorted(p for p in root.rglob("*") if p.is_file() and format_for_path(p.name))


def decode_ceiling(files: list[Path]) -> tuple[float, float]:
    """(files/s, × realtime) of decoding alone to 16 kHz mono, in this process."""
    from workers.audio.decode import decode

    audio = 0.0
    with stopwatch() as elapsed:
        for f in files:
            audio += decode(f).duration
    return len(files) / elapsed(), audio / elapsed()


def pool_ceiling(files: list[Path], workers: int) -> tuple[float, float]:
    """(files/s, × realtime) of ``workers`` decode processes doing only their share of a tagger's work.

    That is decoding and cutting patches (``pipeline.prepare_file``), in the
    same spawned processes a batching tagger uses, warmed up first.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from workers.tagging.pipeline import _decode_worker_init, prepare_file

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_decode_worker_init) as pool:
        list(pool.map(prepare_file, files[:workers]))
        with stopwatch() as elapsed:
            done = list(pool.map(prepare_file, files))
        wall = elapsed()
    audio = sum(p.samples for p in done) / 16000
    return len(files) / wall, audio / wall


def run_taggers(ws: Workspace, library: Path, models: Path, processes: int, device: str, batch: int | None,
                decode_workers: int | None = None, stand_in: bool = False, analysis: str | None = None) -> dict:
    """Scan a fresh copy of the library, then time ``processes`` taggers draining its tag jobs.

    ``analysis`` (fast/full) sets the library's; the result then also holds
    each track's written tags and stored mean scores (by path in the
    library), the patches scored of all, and the taggers' peak memory.
    """
    db = ws.fresh_db()
    copy = ws.dir / f"lib-{db.stem}"
    shutil.copytree(library, copy)
    env = ws.env(db, EARMARK_MODELS_DIR=models, EARMARK_IDLE_POLL_SECONDS="0.05", EARMARK_TORCH_THREADS="1",
                 EARMARK_CALIBRATION_MIN_TRACKS="1000000",  # every run judges its tags uncalibrated, as runs compare
                 **({"EARMARK_DECODE_WORKERS": decode_workers} if decode_workers else {}))
    manage("library", "add", "bench", copy, env=env)
    if analysis:
        manage("library", "set", "bench", "--analysis", analysis, env=env)
    manage("scan", "bench", env=env)
    manage("run_scanner", "--exit-when-idle", env=env)
    manage("queue", "pause", "tag", env=env)
    args = ["run_tagger", "--exit-when-idle", "--device", device, *(["--batch", batch] if batch else [])]
    conn = connect(db)
    total = scalar(conn, "SELECT COUNT(*) FROM workers_job WHERE queue='tag'")
    program = ("-m", "bench.stand_in_tagger") if stand_in else (str(ROOT / "manage.py"),)
    with Procs([args + ["--number", n] for n in range(processes)], env, ws.log_dir, f"tagger{processes}",
               program=program) as procs:
        wait_until(lambda: scalar(conn, "SELECT COUNT(*) FROM workers_meta WHERE key LIKE 'worker:%:tag:%' "
                                        "AND value LIKE '%\"state\": \"idle\"%'") == processes,
                   timeout=300, message="taggers ready", procs=procs)
        with stopwatch() as elapsed:
            manage("queue", "resume", "tag", env=env)
            wait_until(lambda: scalar(conn, "SELECT COUNT(*) FROM workers_job WHERE queue='tag' "
                                            "AND state IN ('done','failed')") == total,
                       timeout=3600, interval=0.05, message="all tag jobs finished", procs=procs)
        wall = elapsed()
        peak_mb = max(_peak_rss_mb(p.pid) for p in procs.procs)  # before they exit: the high-water mark so far
        procs.check_exits(procs.wait(120))
    rows = [json.loads(r) for (r,) in conn.execute("SELECT result FROM workers_job WHERE queue='tag' AND state='done'")]
    failed = scalar(conn, "SELECT COUNT(*) FROM workers_job WHERE queue='tag' AND state='failed'")
    tags, means = {}, {}
    if analysis:
        import numpy as np

        for path, earmark, blob in conn.execute("SELECT t.path, t.earmark_tags, s.means FROM workers_track t "
                                                "JOIN workers_score s ON s.track_id = t.id"):
            rel = os.path.relpath(path, copy)
            tags[rel], means[rel] = json.loads(earmark or "{}"), np.frombuffer(blob, dtype="<f4")
    conn.close()
    shutil.rmtree(copy)
    audio = sum(r["seconds"] for r in rows)
    split = {k: sum(r["timings"].get(k, 0) for r in rows) for k in ("decode", "frontend", "networks", "write", "record")}
    gpu_mb = max((r.get("gpu_memory") or 0 for r in rows), default=0) / 2**20
    return {"tracks": len(rows), "failed": failed, "wall": wall, "audio": audio, "split": split, "gpu_mb": gpu_mb,
            "patches": sum(r.get("patches", 0) for r in rows),
            "patches_total": sum(r.get("patches_total", r.get("patches", 0)) for r in rows),
            "peak_mb": peak_mb, "tags": tags, "means": means}


def _peak_rss_mb(pid: int) -> float:
    """A live process's peak resident memory (``VmHWM``), in MB; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0.0


def gpu_sweep(files: list[Path], models: Path, batches: list[int], workers: int, device: str) -> list[dict]:
    """In-process: files per batch vs throughput and GPU memory (decode processes feed the GPU)."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ.setdefault("SECRET_KEY", "bench")
    os.environ["EARMARK_MODELS_DIR"] = str(models)
    django.setup()
    import torch

    from workers.tagging.pipeline import Analyzer

    analyzer = Analyzer(device, decode_workers=workers)
    analyzer.analyze_many(files[: 2 * workers])  # warm-up: decode processes, kernels, allocator
    rows = []
    on_gpu = device.startswith("cuda")
    for batch in batches:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        audio, done = 0.0, 0
        with stopwatch() as elapsed:
            for start in range(0, len(files), batch):
                for r in analyzer.analyze_many(files[start : start + batch]):
                    if not isinstance(r, BaseException):
                        audio += r.seconds
                        done += 1
        rows.append({"batch": batch, "tracks_s": done / elapsed(), "x_rt": audio / elapsed(),
                     "gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else 0.0})
    return rows


def print_cpu(results: dict[int, list[dict]], ceiling: tuple[float, float]) -> None:
    print(f"\n{'run':34} {'tracks/s':>9} {'x realtime':>11} {'decode':>8} {'front':>8} {'nets':>8} {'write':>8}"
          f" {'record':>8} {'GPU MB/proc':>12}")
    for n, runs in results.items():
        tps = median([r["tracks"] / r["wall"] for r in runs])
        xrt = median([r["audio"] / r["wall"] for r in runs])
        split = {k: median([r["split"][k] / max(1, r["tracks"]) * 1000 for r in runs]) for k in runs[0]["split"]}
        gpu = max(r["gpu_mb"] for r in runs)
        print(f"{f'{n} tagger process(es)':34} {tps:9.2f} {xrt:11.1f} " +
              " ".join(f"{split[k]:6.0f}ms" for k in ("decode", "frontend", "networks", "write", "record")) +
              (f" {gpu:12.0f}" if gpu else ""))
    print(f"{'decode-only loop (1 process)':34} {ceiling[0]:9.2f} {ceiling[1]:11.1f}")
    two = median([r["audio"] / r["wall"] for r in results.get(2, results[max(results)])])
    print("\nper-track split is CPU time inside each job (ms per track); medians over repeats")
    print(f"2 processes: {two:.1f}x realtime = {two / TARGET_CPU_X_REALTIME:.2f} x the 50x target; "
          f"decode-only ceiling per process {ceiling[1]:.0f}x ({two / ceiling[1]:.1%} of it)")
    if 1 in results and 2 in results:
        one = median([r["audio"] / r["wall"] for r in results[1]])
        print(f"scaling 1 -> 2 processes: {two / one:.2f}x")


def print_pipeline(runs: list[dict], pool: tuple[float, float], workers: int, batch: int, device: str | None) -> None:
    """The batching tagger against its decode processes' ceiling; ``device`` None: stand-in networks."""
    nets = f"networks on {device}" if device else "stand-in networks"
    label = f"1 tagger, {batch}/batch, {workers} decode proc"
    print(f"\npipeline ({nets}; {runs[0]['tracks'] if runs else 0} tracks per run)")
    print(f"{'run':40} {'tracks/s':>9} {'x realtime':>11} {'write':>8} {'record':>8} {'GPU MB':>8}")
    tps = median([r["tracks"] / r["wall"] for r in runs])
    xrt = median([r["audio"] / r["wall"] for r in runs])
    split = {k: median([r["split"][k] / max(1, r["tracks"]) * 1000 for r in runs]) for k in ("write", "record")}
    gpu = max(r["gpu_mb"] for r in runs)
    print(f"{label:40} {tps:9.2f} {xrt:11.1f} {split['write']:6.0f}ms {split['record']:6.0f}ms" +
          (f" {gpu:8.0f}" if gpu else ""))
    print(f"{f'{workers} decode procs, decode+patches only':40} {pool[0]:9.2f} {pool[1]:11.1f}")
    print(f"\ntagger / decode-only ceiling of its decode processes: {xrt / pool[1]:.2f}x "
          f"(the tagger's processes also write every file's tags)")
    if device:
        print(f"{device}: {xrt:.0f}x realtime = {xrt / TARGET_GPU_X_REALTIME:.2f} x the 2,000x target")


def main(argv=None) -> None:
    from workers.jobs.gpu import FILES_PER_BATCH, decode_workers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracks", type=int, default=24, help="library for the one-file-at-a-time CPU taggers")
    parser.add_argument("--pipeline-tracks", type=int, default=192, help="library for the batching tagger")
    parser.add_argument("--min-seconds", type=float, default=20)
    parser.add_argument("--max-seconds", type=float, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", default="1,2", help="CPU tagger processes to run side by side")
    parser.add_argument("--batch", type=int, default=FILES_PER_BATCH, help="files per batch of the pipeline")
    parser.add_argument("--decode-workers", type=int, default=decode_workers())
    parser.add_argument("--gpu", action="store_true", help="GPU sweep, and the pipeline with the real networks")
    parser.add_argument("--device", default=None, help="with --gpu: the device (default cuda; cpu to try the path)")
    parser.add_argument("--batches", default="8,32,96", help="with --gpu: files per batch in the sweep")
    parser.add_argument("--corpus-tracks", type=int, default=15, help="real-music tracks (bench.corpus); 0: none")
    parser.add_argument("--corpus-formats", default="flac,mp3,opus", help="formats of the real corpus")
    parser.add_argument("--corpus-seconds", type=float, default=0, help="clip of each real track (0: whole tracks)")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="skip the run that overlaps decoding with the networks (1 tagger + 1 decode process)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: small libraries, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.tracks, args.pipeline_tracks, args.repeats = min(args.tracks, 4), min(args.pipeline_tracks, 8), 1
        args.corpus_tracks, args.corpus_formats, args.corpus_seconds = min(args.corpus_tracks, 2), "flac", 60

    library = demo_library(args.tracks, args.min_seconds, args.max_seconds)
    big = demo_library(args.pipeline_tracks, args.min_seconds, args.max_seconds)
    models = models_dir()
    files, big_files = audio_files(library), audio_files(big)
    print(f"libraries: {len(files)} files in {library}; {len(big_files)} files in {big}")
    device = (args.device or "cuda") if args.gpu else "cpu"
    if args.gpu:
        rows = gpu_sweep(big_files, models, [int(b) for b in args.batches.split(",")], args.decode_workers, device)
        print(f"\n{'files/batch':>11} {'tracks/s':>9} {'x realtime':>11} {'GPU MB':>8}")
        for r in rows:
            print(f"{r['batch']:11} {r['tracks_s']:9.1f} {r['x_rt']:11.0f} {r['gpu_mb']:8.0f}")
    results: dict[int, list[dict]] = {}
    pipeline: list[dict] = []
    processes = [int(p) for p in args.processes.split(",")]
    compared, overlap = {}, []
    with Workspace() as ws:
        ceiling = decode_ceiling(files)
        pool = pool_ceiling(big_files, args.decode_workers)
        if not args.gpu:  # full vs fast, side by side (bench.fastpath); the fast runs are the CPU rows below
            compared["demo"] = fastpath.run_pair(ws, library, models, processes, args.repeats)
            results = {n: compared["demo"][("fast", n)] for n in processes}
            real = fastpath.corpus_library(ws, args.corpus_tracks, args.corpus_formats.split(","),
                                           args.corpus_seconds) if args.corpus_tracks else None
            if real is not None:
                compared["real corpus"] = fastpath.run_pair(ws, real, models, processes, args.repeats)
                if args.overlap:
                    overlap = [run_taggers(ws, real, models, 1, "cpu", 4, 1, analysis="fast")
                               for _ in range(args.repeats)]
        for _ in range(args.repeats):
            pipeline.append(run_taggers(ws, big, models, 1, device, args.batch, args.decode_workers,
                                        stand_in=not args.gpu))
    if results:
        print_cpu(results, ceiling)
    for name, runs in compared.items():
        fastpath.report(name, runs, processes)
    if overlap:
        xrt = median([r["audio"] / r["wall"] for r in overlap])
        two = median([r["audio"] / r["wall"] for r in compared["real corpus"][("fast", max(processes))]])
        print(f"\noverlap (real corpus, fast): 1 tagger --batch 4 with 1 decode process {xrt:.1f}x realtime, "
              f"{max(processes)} plain taggers {two:.1f}x: {xrt / two:.2f}x")
    if not args.gpu:
        print()
        print_table(["anchor", "on the same files"], fastpath.anchors(), title="anchors")
    print_pipeline(pipeline, pool, args.decode_workers, args.batch, device if args.gpu else None)


if __name__ == "__main__":
    main()
