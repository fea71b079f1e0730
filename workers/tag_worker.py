"""The tagger's ``Worker``: score a track with the networks, store the scores, write the tags.

torch is imported in ``setup`` only, so importing this module (as the
command registry does) costs nothing in other processes. On a GPU a claimed
batch of files is decoded in threads and scored in shared forward passes
(``prepare``); on the CPU one file at a time with one patch per pass measured
fastest.
"""
from __future__ import annotations

import logging
import os
import time

from django.conf import settings

from workers import calibration, paths, scanner
from workers.audio.decode import DecodeError
from workers.models import Track
from workers.queue import ClaimedJob
from workers.runtime import Context, PermanentError, Worker
from workers.tagging import scores
from workers.tagging.apply import write_track_tags

log = logging.getLogger("earmark.tagger")

GPU_FILES_PER_BATCH = 16


class TagWorker(Worker):
    queue = "tag"

    def __init__(self, device: str = "auto", batch: int | None = None, threads: int | None = None):
        self.requested_device, self.requested_batch = device, batch
        self.threads = threads or int(os.environ.get("EARMARK_TORCH_THREADS", "1"))
        self.analyzer = None
        self.prepared: dict[int, object] = {}

    def setup(self, ctx: Context) -> None:
        import torch

        from workers.tagging.pipeline import Analyzer, resolve_device

        torch.set_num_threads(self.threads)
        on_gpu = resolve_device(self.requested_device) != "cpu"
        self.analyzer = Analyzer(self.requested_device, decode_workers=decode_workers() if on_gpu else 0)
        self.batch_size = self.requested_batch or (GPU_FILES_PER_BATCH if on_gpu else 1)
        ctx.update(device=self._describe_device(), gpu_memory=self._gpu_memory(),
                   model_version=self.analyzer.model_version)
        log.info("tagger ready on %s (models %s, %d files per batch)", self.analyzer.device,
                 self.analyzer.model_version, self.batch_size)

    def teardown(self) -> None:
        if self.analyzer is not None:
            self.analyzer.close()

    def _describe_device(self) -> str:
        import torch

        device = self.analyzer.device
        if device.startswith("cuda"):
            name = torch.cuda.get_device_name(torch.device(device))
            return f"{device} ({name}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'all')})"
        return f"cpu ({self.threads} thread{'s' if self.threads > 1 else ''})"

    def _gpu_memory(self) -> int | None:
        import torch

        if self.analyzer.device.startswith("cuda"):
            return int(torch.cuda.memory_reserved(torch.device(self.analyzer.device)))
        return None

    # -- jobs ------------------------------------------------------------------------

    def prepare(self, jobs: list[ClaimedJob], ctx: Context) -> None:
        """Decode the batch in threads and score all its patches together (the GPU default)."""
        checked = {}
        for job in jobs:
            try:
                checked[job.id] = self._checked_track(job)
            except Exception:  # noqa: BLE001 - process() meets the same error again and reports it
                continue
        ids = list(checked)
        ctx.update(detail=f"scoring {len(ids)} files together")
        results = self.analyzer.analyze_many([paths.to_bytes(checked[i].path) for i in ids])
        self.prepared = dict(zip(ids, results))
        ctx.update(gpu_memory=self._gpu_memory())

    def process(self, job: ClaimedJob, ctx: Context) -> dict:
        track = self._checked_track(job)
        ctx.update(file=track.path)
        if track.state == Track.State.MISSING:
            return {"missing": True}
        analysis = self._analysis(job, track)
        ctx.progress(0.8, "writing tags")
        scores.save(track, self.analyzer.model_version, analysis.labels, analysis.means, analysis.spreads,
                    analysis.patches)
        means, spreads = analysis.mappings()
        started = time.perf_counter()
        written = write_track_tags(track, means, spreads, self.analyzer.model_version, _calibration())
        timings = {**analysis.timings, "write": time.perf_counter() - started}
        calibration.maybe_recalibrate()  # cheap: looks at the database at most every 30 s per process
        result = {"patches": analysis.patches, "seconds": analysis.seconds, "written": written.changed,
                  "tags": written.tagset.categories, "timings": {k: round(v, 4) for k, v in timings.items()}}
        if self.analyzer.device != "cpu":
            result["gpu_memory"] = self._gpu_memory()
        return result

    def _checked_track(self, job: ClaimedJob) -> Track:
        """The job's track, its file inside the library and unchanged since its scan (else re-scanned)."""
        track = Track.objects.select_related("library").filter(id=job.track_id).first()
        if track is None:
            raise PermanentError("the track no longer exists")
        path = paths.to_bytes(track.path)
        if not paths.is_within(os.path.realpath(path), scanner.resolved_root(track.library)):
            raise PermanentError(f"{track.path} is outside the library root {track.library.root}; not read")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            Track.objects.filter(id=track.id).update(state=Track.State.MISSING)
            track.state = Track.State.MISSING
            return track
        if (st.st_size, st.st_mtime_ns) != (track.size, track.mtime_ns):
            track = scanner.rescan_track(track)
            if track is None:
                raise PermanentError("the file changed since it was scanned and can no longer be read")
        return track

    def _analysis(self, job: ClaimedJob, track: Track):
        from workers.tagging.pipeline import TooShortError

        try:
            result = self.prepared.pop(job.id, None) or self.analyzer.analyze(paths.to_bytes(track.path))
            if isinstance(result, BaseException):
                raise result
            return result
        except DecodeError as exc:
            if exc.kind == "vanished":
                Track.objects.filter(id=track.id).update(state=Track.State.MISSING)
                raise PermanentError(f"the file vanished: {exc.reason}") from None
            if exc.kind == "unreadable":
                raise  # may be a passing condition (a NAS hiccup): retried with backoff
            Track.objects.filter(id=track.id).update(state=Track.State.FAILED, error=exc.reason)
            raise PermanentError(exc.reason) from None
        except TooShortError as exc:
            Track.objects.filter(id=track.id).update(state=Track.State.FAILED, error=str(exc))
            raise PermanentError(str(exc)) from None


def decode_workers() -> int:
    """Decode processes feeding one GPU tagger: a GPU outruns any single decoder many times over."""
    return int(os.environ.get("EARMARK_DECODE_WORKERS") or min(8, max(1, (os.cpu_count() or 2) - 1)))


def _calibration():
    """The library calibration in force (``UNCALIBRATED`` until one exists), cached per process."""
    return calibration.current()


def models_installed() -> bool:
    from workers.tagging.manifest import current_model_version

    return current_model_version(settings.EARMARK_MODELS_DIR) is not None
