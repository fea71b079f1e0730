"""The tagger's ``Worker``: score a track with the networks, store the scores, write the tags.

torch is imported in ``setup`` only, so importing this module (as the
command registry does) costs nothing in other processes.

On the CPU one file at a time, with one patch per forward pass, measured
fastest: each process is its own pipeline, and two of them fill two cores.

A GPU outruns any single decoder many times over, so there a tagger works on
batches of files (``--batch``, any batch above one) as a pipeline: the
runner claims the next batch while this one finishes (``Worker.lookahead``);
``prepare`` checks a batch's tracks and hands the files to the decode
processes at once; the first ``process`` of a batch waits for its patches,
scores all of them in shared forward passes and hands each file's tag write
back to the decode processes; each ``process`` then waits for its file's
write and records scores and tags in one transaction. So the decode
processes never wait for the GPU or for the database, and the tagger's own
thread does only what must be serial: the networks and the database.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction

from workers.calibration import compute as calibration
from workers.jobs import gpu
from workers.library import paths, scanner
from workers.audio.decode import DecodeError
from workers.models import Track
from workers.jobs.queue import ClaimedJob
from workers.jobs.runtime import Context, PermanentError, Worker
from workers.tagfiles.safewrite import safe_write_tags
from workers.tagging import apply, scores

log = logging.getLogger("earmark.tagger")

#: A batched file's patches wait whole in memory for the networks (about 1.4 MB
#: per minute of audio); longer files take the streaming path one at a time.
BATCH_MAX_SECONDS = 20 * 60


class TagWorker(Worker):
    queue = "tag"

    def __init__(self, device: str = "auto", batch: int | None = None, threads: int | None = None):
        self.requested_device, self.requested_batch = device, batch
        self.threads = threads or int(os.environ.get("EARMARK_TORCH_THREADS", "1"))
        self.analyzer = None
        self.batches: dict[int, _Batch] = {}  # by job id: the batch in flight each job belongs to

    def setup(self, ctx: Context) -> None:
        import torch

        from workers.tagging.pipeline import Analyzer, resolve_device

        torch.set_num_threads(self.threads)
        on_gpu = resolve_device(self.requested_device) != "cpu"
        self.batch_size = self.requested_batch or (gpu.FILES_PER_BATCH if on_gpu else 1)
        self.lookahead = self.batch_size > 1
        self.analyzer = Analyzer(self.requested_device, decode_workers=gpu.decode_workers() if self.lookahead else 0)
        self.analyzer.start_workers()
        ctx.update(device=self._describe_device(), gpu_memory=self._gpu_memory(),
                   model_version=self.analyzer.model_version)
        log.info("tagger ready on %s (models %s, %d files per batch, %d decode processes)", self.analyzer.device,
                 self.analyzer.model_version, self.batch_size, self.analyzer.decode_workers)

    def teardown(self) -> None:
        if self.analyzer is not None:
            self.analyzer.close()  # lets tag writes in flight finish: each is atomic either way

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
        """Check a batch's tracks and start decoding its files in the decode processes; returns at once."""
        checked = self._checked_tracks(jobs)
        readable = [i for i, t in checked.items() if isinstance(t, Track) and t.state != Track.State.MISSING
                    and (t.duration or 0) <= BATCH_MAX_SECONDS]
        pending = self.analyzer.submit([paths.to_bytes(checked[i].path) for i in readable])
        batch = _Batch(checked, {job_id: i for i, job_id in enumerate(readable)}, pending)
        self.batches.update((job.id, batch) for job in jobs)

    def process(self, job: ClaimedJob, ctx: Context) -> dict:
        batch = self.batches.pop(job.id, None)
        track = batch.track(job.id) if batch else self._checked_track(job)
        ctx.update(file=track.path)
        if track.state == Track.State.MISSING:
            return {"missing": True}
        if batch and job.id in batch.decoded:
            ctx.progress(0.1, "waiting for the batch's decoding")
            analysis = self._analysis(track, lambda: self._scored(batch, ctx)[job.id])
            ctx.progress(0.8, "writing tags")
            written = apply.reported(track, lambda: _offloaded_write(*batch.writes[job.id]))
        else:
            analysis = self._analysis(track, lambda: self.analyzer.analyze(paths.to_bytes(track.path)))
            ctx.progress(0.8, "writing tags")
            means, spreads = analysis.mappings()
            written = apply.reported(track, lambda: apply.write_file_tags(track, means, spreads,
                                                                          self.analyzer.model_version, _calibration()))
        started = time.perf_counter()
        with transaction.atomic():
            scores.save(track, self.analyzer.model_version, analysis.labels, analysis.means, analysis.spreads,
                        analysis.patches)
            apply.record(track, written)
        timings = {**analysis.timings, "write": written.seconds, "record": time.perf_counter() - started}
        calibration.maybe_recalibrate()  # cheap: looks at the database at most every 30 s per process
        result = {"patches": analysis.patches, "seconds": analysis.seconds, "written": written.changed,
                  "tags": written.tagset.categories, "timings": {k: round(v, 4) for k, v in timings.items()}}
        if self.analyzer.device != "cpu":
            result["gpu_memory"] = self._gpu_memory()
        return result

    def _scored(self, batch: "_Batch", ctx: Context) -> dict:
        """The batch's analyses by job id; the first call scores the batch and starts its tag writes."""
        if batch.analyses is None:
            started = time.perf_counter()
            results = batch.pending.results()
            ctx.update(gpu_memory=self._gpu_memory())
            analyses = {job_id: results[i] for job_id, i in batch.decoded.items()}
            cal, version = _calibration(), self.analyzer.model_version
            for job_id, analysis in analyses.items():
                if isinstance(analysis, BaseException):
                    continue
                try:
                    write = apply.plan(batch.checked[job_id], *analysis.mappings(), version, cal)
                    args = write.args
                    batch.writes[job_id] = (write, self.analyzer.offload(safe_write_tags, *args) if args else None)
                except Exception as exc:  # noqa: BLE001 - that file's job fails with it, the others go on
                    analyses[job_id] = exc
            batch.analyses = analyses
            log.debug("batch of %d files decoded and scored in %.2f s", len(results), time.perf_counter() - started)
        return batch.analyses

    def _checked_tracks(self, jobs: list[ClaimedJob]) -> dict[int, Track | Exception]:
        """``_check`` for a whole batch, reading its tracks in one query; a job's exception in its place."""
        tracks = Track.objects.select_related("library").defer("tags").in_bulk([j.track_id for j in jobs])
        checked = {}
        for job in jobs:
            try:
                checked[job.id] = self._check(tracks.get(job.track_id))
            except Exception as exc:  # noqa: BLE001 - process() raises it for the runner to record
                checked[job.id] = exc
        return checked

    def _checked_track(self, job: ClaimedJob) -> Track:
        return self._check(Track.objects.select_related("library").defer("tags").filter(id=job.track_id).first())

    def _check(self, track: Track | None) -> Track:
        """The track, its file inside the library and unchanged since its scan (else re-scanned)."""
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

    @staticmethod
    def _analysis(track: Track, compute):
        """``compute()``'s analysis of the track's file; a file that cannot be tagged fails with its reason."""
        from workers.tagging.pipeline import TooShortError

        try:
            result = compute()
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


@dataclass
class _Batch:
    """A claimed batch in flight: its checked tracks, then its decoding, its analyses and its tag writes."""

    checked: dict  # job id -> Track, or the exception its check raised
    decoded: dict  # job id -> index in ``pending``, for the files being decoded
    pending: object  # pipeline.PendingBatch
    analyses: dict | None = None  # job id -> Analysis or exception, once scored
    writes: dict = field(default_factory=dict)  # job id -> (apply.TagWrite, future of its safe write or None)

    def track(self, job_id: int) -> Track:
        track = self.checked[job_id]
        if isinstance(track, Exception):
            raise track
        return track


def _offloaded_write(write: apply.TagWrite, future) -> apply.Written:
    """A write run in a decode process; redone here if a crash in that pool (another file's) lost it."""
    if future is None:
        return write.finish(None)
    try:
        return write.finish(future.result())
    except BrokenProcessPool:
        return write.finish(safe_write_tags(*write.args))


def _calibration():
    """The library calibration in force (``UNCALIBRATED`` until one exists), cached per process."""
    return calibration.current()


def models_installed() -> bool:
    from workers.tagging.manifest import current_model_version

    return current_model_version(settings.EARMARK_MODELS_DIR) is not None
