"""``manage.py tag_file PATH [--json] [--dry-run] [--full|--fast]``: tag one file now and print its scores and tags.

Files inside a configured library are written with that library's write
mode and recorded in the database; any other file is only analysed (nothing
outside the library roots is ever written). The analysis is the library's
(``Library.analysis``; fast outside any library) unless ``--full`` or ``--fast`` says otherwise.
"""
import json
import os

from django.core.management.base import BaseCommand, CommandError

from workers.library import folders, paths, scan
from workers.audio.decode import DecodeError
from workers.jobs.gpu import pin_from_environment
from workers.models import Library, Track
from workers.tagging import calibrated, converge, measures, scores
from workers.tagging.apply import write_track_tags
from workers.tagging.tagset import build_tags


class Command(BaseCommand):
    help = "Tag one file synchronously and print its scores and tags."

    def add_arguments(self, parser):
        parser.add_argument("path")
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")
        parser.add_argument("--dry-run", action="store_true", help="Analyse only; write nothing.")
        parser.add_argument("--device", default="auto")
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--full", dest="analysis", action="store_const", const="full",
                          help="Score every patch of the file.")
        mode.add_argument("--fast", dest="analysis", action="store_const", const="fast",
                          help="Stop scoring once the tags are settled (the default for a library).")

    def handle(self, *args, path, json: bool, dry_run: bool, device: str, analysis: str | None = None, **options):
        pin_from_environment()  # before torch sees CUDA
        from workers.tagging.pipeline import Analyzer, TooShortError, use_threads

        use_threads()
        real = os.path.realpath(os.fsencode(path))
        library = _library_of(real)
        analyzer = Analyzer(device)
        rule = converge.rule_for(library, calibrated.current(), analysis)
        try:
            analysis = analyzer.analyze(real, until=rule)
        except (DecodeError, TooShortError, FileNotFoundError) as exc:
            raise CommandError(f"{path}: {exc}") from None
        model_version = analyzer.model_version
        means, spreads = analysis.mappings()
        written = None
        if dry_run or library is None:
            mode = "full" if library and library.write_mode == Library.WriteMode.FULL else "minimal"
            tagset = build_tags(means, spreads, calibrated.current(), mode, models=model_version)
        else:
            track = _track_for(library, real)
            scores.save(track, model_version, analysis.labels, analysis.means, analysis.spreads, analysis.patches)
            measures.attach(track, analysis.features)
            result = write_track_tags(track, means, spreads, model_version, calibrated.current())
            measures.record(track)
            measures.share_album(track)
            tagset, written = result.tagset, result.changed
        out = {
            "path": paths.to_text(real),
            "library": library.name if library else None,
            "written": written,
            "seconds": analysis.seconds,
            "patches": analysis.patches,
            "patches_total": analysis.patches_total,
            "analysis": "full" if rule is None else "fast",
            "tags": tagset.categories,
            "features": {k: v for k, v in analysis.features.items() if k != "album_data"},
            "version": tagset.version,
            "scores": {label: {"mean": round(m, 4), "spread": round(spreads[label], 4)} for label, m in means.items()},
            "timings": {k: round(v, 4) for k, v in analysis.timings.items()},
        }
        if json:
            self.stdout.write(_dumps(out))
        else:
            self._print(out, library, dry_run)

    def _print(self, out, library, dry_run):
        self.stdout.write(f"{out['path']}: {out['seconds']} s, {out['patches']} of {out['patches_total']} patches "
                          f"scored ({out['analysis']} analysis)")
        for category, values in out["tags"].items():
            self.stdout.write(f"  {category:10} {', '.join(values) or '-'}")
        top = sorted(out["scores"].items(), key=lambda kv: -kv[1]["mean"])[:10]
        self.stdout.write("  top scores: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in top))
        if dry_run:
            self.stdout.write("  dry run: nothing written")
        elif library is None:
            self.stdout.write("  not inside a configured library: analysed only, nothing written")
        else:
            self.stdout.write(f"  tags {'written' if out['written'] else 'already up to date'} ({out['version']})")


def _library_of(real: bytes) -> Library | None:
    for library in Library.objects.all():
        if paths.is_within(real, scan.resolved_root(library)):
            return library
    return None


def _track_for(library: Library, real: bytes) -> Track:
    """The file's track, scanned now if Earmark has not seen it yet."""
    text = paths.to_text(real)
    track = Track.objects.filter(path=text).select_related("library").first()
    if track is None:
        track = Track.objects.create(library=library, path=text, folder=paths.to_text(os.path.dirname(real)))
    track = folders.rescan_track(track)
    if track is None:
        raise CommandError("the file cannot be read as audio (see `library show`)")
    return track


def _dumps(data) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)
