"""``python -m bench.real``: the real tagger on real music, in every format, against a decode-only loop.

The corpus (``bench.corpus``) is freely licensed game soundtracks from Debian
packages, one album per package, a few tracks each, cut to a clip from the
middle of each track (``--seconds``, 0 for whole tracks) and re-encoded into
every format Earmark supports with ordinary user tags; it is built once and
cached under ``var/corpus/``.

Each file is tagged in this process by the worker's own path: the installed
MTT_musicnn + MSD_musicnn (``bench.tagger.models_dir``) in
``workers.tagging.pipeline.Analyzer`` on the CPU with one torch thread (what a
``run_tagger`` process does), then the tags a default library would get
(``workers.tagging.apply.plan``: minimal mode, uncalibrated, as a library under
100 tracks is, with the low-confidence genre fallback where the code has one).
Right before each file is tagged, the same file is decoded alone
(``workers.audio.decode.decode``, 16 kHz mono), so the decode-only ceiling is
measured under the same load.

Reported: per album, each track's genres and moods (from the FLAC copy, a
lossless copy of the source), its low-confidence fallback, how many tracks got
no genre at the threshold, and whether the other formats agree; per format, the
tagging speed (× realtime = seconds of audio / wall seconds, median over
tracks), the decode time inside tagging and the decode-only loop's speed; and
the agreement of tags across the formats of a track.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.common import machine_note, median, print_table

REFERENCE_FORMATS = ("flac", "wav", "aiff", "alac")  # lossless copies of the decoded source, in preference order


def _tag_function():
    """``(means, spreads, model_version) -> TagSet`` as the worker builds them, and what it is."""
    from workers.tagging.tagset import UNCALIBRATED, build_tags

    try:
        from workers.models import Library, Track
        from workers.tagging.apply import plan

        track = Track(library=Library(name="bench-real", root="/nonexistent"))
        probe = plan(track, {"mtt:rock": 0.5}, {"mtt:rock": 0.0}, "MTT_musicnn@00000000")
        if probe.tagset is None:
            raise TypeError("plan gave no tag set")
        return (lambda m, s, v: plan(track, m, s, v).tagset), "apply.plan for a default library (minimal, uncalibrated)"
    except Exception as exc:  # noqa: BLE001 - another shape of the tagging code: fall back to the pure function
        print(f"note: apply.plan unusable here ({exc!r}); using tagset.build_tags", file=sys.stderr)
        return (lambda m, s, v: build_tags(m, s, UNCALIBRATED, models=v)), "tagset.build_tags (uncalibrated)"


def tag_corpus(tracks, device: str = "cpu", log=print) -> tuple[list[dict], str]:
    """Decode alone, then tag, every file of every track; one row per file."""
    from bench.common import setup_django
    from bench.tagger import models_dir

    models = models_dir()
    os.environ["EARMARK_MODELS_DIR"] = str(models)
    setup_django()
    from workers.audio.decode import decode
    from workers.tagging.pipeline import Analyzer, use_threads

    threads = use_threads()
    analyzer = Analyzer(device, models_dir=models)
    tag, how = _tag_function()
    first = next(iter(tracks[0].files.values()))
    analyzer.analyze(first)  # warm-up: lazy initialisation, allocator
    decode(first)
    rows = []
    total = sum(len(t.files) for t in tracks)
    started = time.perf_counter()
    for track in tracks:
        for fmt, path in track.files.items():
            t0 = time.perf_counter()
            decoded = decode(path)
            t1 = time.perf_counter()
            analysis = analyzer.analyze(path)
            t2 = time.perf_counter()
            means, spreads = analysis.mappings()
            tagset = tag(means, spreads, analyzer.model_version)
            t3 = time.perf_counter()
            rows.append({"package": track.package, "number": track.number, "title": track.title, "format": fmt,
                         "path": path, "seconds": analysis.seconds, "patches": analysis.patches,
                         "decode_only_s": t1 - t0, "decode_only_seconds": decoded.duration, "tag_wall_s": t2 - t1,
                         "tags_s": t3 - t2, "timings": analysis.timings, "means": means,
                         "categories": {k: list(v) for k, v in tagset.categories.items()},
                         "low_confidence": list(getattr(tagset, "low_confidence", None) or ()),
                         "has_low_confidence": hasattr(tagset, "low_confidence")})
        done = len(rows)
        log(f"  tagged {done}/{total} files ({track.package} #{track.number}), "
            f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    return rows, f"{how}; {analyzer.device}, {threads} torch thread(s), models {analyzer.model_version}"


def _reference(by_format: dict) -> str:
    return next((f for f in REFERENCE_FORMATS if f in by_format), sorted(by_format)[0])


def summarise(rows: list[dict]) -> dict:
    """Per album (tracks, genres, moods, agreement), per format (speeds), and overall agreement."""
    tracks: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        tracks.setdefault((r["package"], r["number"]), {})[r["format"]] = r
    albums: dict[str, dict] = {}
    pairs = same = same_gm = 0
    per_format: dict[str, list[int]] = {}
    max_delta: dict[str, float] = {}
    for (package, number), by_format in tracks.items():
        ref_fmt = _reference(by_format)
        ref = by_format[ref_fmt]
        agree = []
        for fmt, r in by_format.items():
            if fmt == ref_fmt:
                continue
            equal = r["categories"] == ref["categories"] and r["low_confidence"] == ref["low_confidence"]
            equal_gm = all(r["categories"].get(c) == ref["categories"].get(c) for c in ("genre", "mood"))
            pairs, same, same_gm = pairs + 1, same + equal, same_gm + equal_gm
            per_format.setdefault(fmt, []).append(int(equal))
            delta = max(abs(r["means"][k] - ref["means"][k]) for k in ref["means"])
            max_delta[fmt] = max(max_delta.get(fmt, 0.0), delta)
            if not equal:
                cats = sorted(c for c in set(r["categories"]) | set(ref["categories"])
                              if r["categories"].get(c) != ref["categories"].get(c))
                agree.append(f"{fmt}: {'/'.join(cats) or 'genre confidence'}")
        genres = ref["categories"].get("genre") or []
        low = "genre" in ref["low_confidence"]
        album = albums.setdefault(package, {"tracks": [], "no_genre": 0, "no_genre_at_all": 0})
        album["tracks"].append({"number": number, "title": ref["title"], "seconds": ref["seconds"],
                                "reference": ref_fmt, "genre": [] if low else genres,
                                "fallback_genre": genres if low else [],
                                "mood": ref["categories"].get("mood") or [],
                                "instrument": ref["categories"].get("instrument") or [],
                                "differs_in": agree})
        album["no_genre"] += int(low or not genres)
        album["no_genre_at_all"] += int(not genres)
    formats = {}
    for fmt in dict.fromkeys(r["format"] for r in rows):
        mine = [r for r in rows if r["format"] == fmt]
        tag_x = median([r["seconds"] / r["tag_wall_s"] for r in mine])
        dec_x = median([r["decode_only_seconds"] / r["decode_only_s"] for r in mine])
        formats[fmt] = {"files": len(mine), "tag_x_realtime": tag_x, "decode_only_x_realtime": dec_x,
                        "ratio": tag_x / dec_x,
                        "decode_ms": median([r["timings"]["decode"] * 1000 for r in mine]),
                        "decode_ms_per_min": median([r["timings"]["decode"] * 60000 / r["seconds"] for r in mine]),
                        "networks_ms_per_min": median([r["timings"]["networks"] * 60000 / r["seconds"] for r in mine]),
                        "decode_only_ms": median([r["decode_only_s"] * 1000 for r in mine]),
                        "agreement": (sum(per_format[fmt]) / len(per_format[fmt])) if fmt in per_format else None,
                        "max_score_delta": max_delta.get(fmt)}
    overall = {"tag_x_realtime": median([r["seconds"] / r["tag_wall_s"] for r in rows]),
               "decode_only_x_realtime": median([r["decode_only_seconds"] / r["decode_only_s"] for r in rows]),
               "audio_seconds": sum(r["seconds"] for r in rows), "tag_wall_s": sum(r["tag_wall_s"] for r in rows),
               "pairs": pairs, "agreement": same / pairs if pairs else None,
               "agreement_genre_mood": same_gm / pairs if pairs else None}
    overall["ratio"] = overall["tag_x_realtime"] / overall["decode_only_x_realtime"]
    return {"albums": albums, "formats": formats, "overall": overall,
            "low_confidence_attribute": all(r["has_low_confidence"] for r in rows)}


def _join(values: list[str], limit: int = 3) -> str:
    return ", ".join(values[:limit]) + (" …" if len(values) > limit else "") if values else "-"


def report(summary: dict) -> None:
    for package, album in summary["albums"].items():
        rows = [[f"{t['number']:02d} {t['title']}", f"{t['seconds']:.0f}", _join(t["genre"]),
                 _join(t["fallback_genre"]) if summary["low_confidence_attribute"] else "n/a",
                 _join(t["mood"]), _join(t["instrument"], 2), "; ".join(t["differs_in"]) or "all same"]
                for t in album["tracks"]]
        print()
        print_table(["track", "s", "genre", "low-confidence genre", "mood", "instrument", "formats that differ"], rows,
                    title=f"{package}: {len(album['tracks'])} tracks, {album['no_genre']} without a genre at the "
                          f"threshold, {album['no_genre_at_all']} without any (tags of the "
                          f"{album['tracks'][0]['reference']} copy)")
    rows = [[fmt, f["files"], f"{f['tag_x_realtime']:.1f}", f"{f['decode_ms']:.0f}", f"{f['decode_ms_per_min']:.0f}",
             f"{f['networks_ms_per_min']:.0f}", f"{f['decode_only_x_realtime']:.0f}", f"{f['ratio']:.3f}x",
             "ref" if f["agreement"] is None else f"{f['agreement']:.0%}",
             "-" if f["max_score_delta"] is None else f"{f['max_score_delta']:.3f}"]
            for fmt, f in summary["formats"].items()]
    o = summary["overall"]
    rows.append(["all", sum(f["files"] for f in summary["formats"].values()), f"{o['tag_x_realtime']:.1f}", "", "", "",
                 f"{o['decode_only_x_realtime']:.0f}", f"{o['ratio']:.3f}x",
                 "-" if o["agreement"] is None else f"{o['agreement']:.0%}", ""])
    print()
    print_table(["format", "files", "tag x realtime", "decode ms", "decode ms/min", "nets ms/min",
                 "decode-only x rt", "tag / decode-only", "same tags as ref", "max |d score|"], rows,
                title="per format (medians over tracks; decode ms is the decode inside tagging)")
    print(f"\ntagging {o['audio_seconds']:.0f} s of audio took {o['tag_wall_s']:.0f} s: {o['tag_x_realtime']:.1f}x "
          f"realtime (median per file) against a decode-only loop at {o['decode_only_x_realtime']:.0f}x: "
          f"{o['ratio']:.3f}x of it")
    if o["pairs"]:
        print(f"tags identical to the lossless copy's in {o['agreement']:.1%} of {o['pairs']} (track, format) pairs; "
              f"genre and mood lists identical in {o['agreement_genre_mood']:.1%}")
    no_genre = sum(a["no_genre"] for a in summary["albums"].values())
    none_at_all = sum(a["no_genre_at_all"] for a in summary["albums"].values())
    count = sum(len(a["tracks"]) for a in summary["albums"].values())
    print(f"tracks without a genre at the threshold: {no_genre} of {count}; without any genre: {none_at_all}")


def main(argv=None) -> None:
    from bench import corpus

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracks", type=int, default=15, help="tracks in all, spread over the packages")
    parser.add_argument("--packages", default=",".join(corpus.DEFAULT_PACKAGES),
                        help="Debian packages, one album each (comma-separated)")
    parser.add_argument("--formats", default=None, help="formats to encode and tag (default: every supported one)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="clip from the middle of each track, in seconds (0: whole tracks)")
    parser.add_argument("--jobs", type=int, default=None, help="processes encoding the corpus (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every measurement here")
    args = parser.parse_args(argv)

    from workers.audio.formats import FORMATS

    formats = args.formats.split(",") if args.formats else list(FORMATS)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")
    packages = [p for p in args.packages.split(",") if p]
    started = time.perf_counter()
    tracks = corpus.build(packages, args.tracks, formats, args.seconds, args.jobs,
                          log=lambda *a, **k: print(*a, file=sys.stderr))
    built = time.perf_counter() - started
    print(f"corpus: {len(tracks)} tracks from {len(packages)} packages x {len(formats)} formats "
          f"({args.seconds:g} s clips; ready in {built:.0f} s) under {corpus.CACHE}; {machine_note()}")
    rows, how = tag_corpus(tracks, args.device, log=print)
    print(f"tagger: {how}")
    summary = summarise(rows)
    report(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tagger": how, "summary": summary, "files": rows}, f, indent=1)


if __name__ == "__main__":
    main()
