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

from workers.tagging import calibrated
from workers.jobs import gpu
from workers.library import checks, paths
from workers.audio.decode import DecodeError
from workers.models import Track
from workers.jobs.queue import ClaimedJob
from workers.jobs.runtime import Context, LeaseLost, PermanentError, Worker
from workers.tagfiles.safewrite import safe_write_tags
from workers.tagging import apply, converge, measures, scores

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
        from workers.tagging.pipeline import Analyzer, resolve_device, use_threads

        use_threads(self.threads)
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
        calibration = calibrated.current()  # the stop rules of fast analyses judge the tags by it
        pending = self.analyzer.submit([paths.to_bytes(checked[i].path) for i in readable],
                                       [converge.rule_for(checked[i].library, calibration) for i in readable])
        batch = _Batch(checked, {job_id: i for i, job_id in enumerate(readable)}, pending)
        self.batches.update((job.id, batch) for job in jobs)

    def process(self, job: ClaimedJob, ctx: Context) -> dict:
        batch = self.batches.pop(job.id, None)
        if batch is not None and job.id in batch.decoded:
            return self._process_batched(job, batch, ctx)
        return self._process_one(job.id, batch.track(job.id) if batch else checks.track_for_job(job.track_id), ctx)

    def _process_one(self, job_id: int, track: Track, ctx: Context) -> dict:
        """One file, top to bottom: file facts → decode and infer → calibrate → tag set → safe write → record."""
        ctx.update(file=track.path)
        if track.state == Track.State.MISSING:  # file facts: ``checks.track_for_job`` found it gone
            return {"missing": True}
        ctx.progress(0.0, "analysing")
        calibration = calibrated.current()  # calibrate (a fast analysis stops once these tags are settled)
        analysis = _analyzed(track, lambda: self.analyzer.analyze(  # decode → infer
            paths.to_bytes(track.path), progress=lambda seconds: ctx.progress(_share(seconds, track.duration)),
            until=converge.rule_for(track.library, calibration)))
        measures.attach(track, analysis.features)  # tempo, key, loudness: measured in the same decode
        write = apply.plan(track, *analysis.mappings(), self.analyzer.model_version, calibration)  # tag set
        ctx.progress(0.8, "writing tags")
        ctx.ensure_held(job_id)  # a job taken from us is written by its new holder, not twice at once
        written = apply.write(write)  # safe write
        return self._record(track, analysis, written)  # record

    def _process_batched(self, job: ClaimedJob, batch: "_Batch", ctx: Context) -> dict:
        """One file of a GPU batch: the same stages, with decode, infer and the write shared by the batch."""
        track = batch.track(job.id)
        ctx.update(file=track.path)
        ctx.progress(0.1, "waiting for the batch's decoding")
        analysis = _analyzed(track, lambda: self._scored(batch, ctx)[job.id])  # decode → infer → calibrate → tag set
        ctx.progress(0.8, "writing tags")
        written = apply.reported(track, lambda: _offloaded_write(*batch.writes[job.id]))  # safe write
        return self._record(track, analysis, written)  # record

    def _record(self, track: Track, analysis, written: apply.Written) -> dict:
        """Scores and the track row in one transaction; the job's result for the admin."""
        started = time.perf_counter()
        with transaction.atomic():
            scores.save(track, self.analyzer.model_version, analysis.labels, analysis.means, analysis.spreads,
                        analysis.patches)
            apply.record(track, written)
            measures.record(track)
        measures.share_album(track)  # committed first: another tagger may be finishing the same album
        timings = {**analysis.timings, "write": written.seconds, "record": time.perf_counter() - started}
        result = {"patches": analysis.patches, "patches_total": analysis.patches_total,
                  "seconds": analysis.seconds, "written": written.changed,
                  "tags": written.tagset.categories, "measured": written.tagset.measured, "timings": {k: round(v, 4) for k, v in timings.items()}}
        if self.analyzer.device != "cpu":
            result["gpu_memory"] = self._gpu_memory()
        return result

    def _scored(self, batch: "_Batch", ctx: Context) -> dict:
        """The batch's analyses by job id; the first call scores the batch and starts its tag writes."""
        if batch.analyses is None:
            started = time.perf_counter()
            batch.charged = ctx.begin(list(batch.decoded))  # the forward pass works on all of them at once
            results = batch.pending.results()
            ctx.update(gpu_memory=self._gpu_memory())
            analyses = {job_id: results[i] for job_id, i in batch.decoded.items()}
            cal, version = calibrated.current(), self.analyzer.model_version
            ours = ctx.still_held(list(batch.charged))  # the fence before the writes, as in ``_process_one``
            for job_id, analysis in analyses.items():
                if job_id not in ours:
                    analyses[job_id] = LeaseLost(f"job {job_id} was taken from this worker")
                if isinstance(analyses[job_id], BaseException):
                    continue
                try:
                    measures.attach(batch.checked[job_id], analysis.features)
                    write = apply.plan(batch.checked[job_id], *analysis.mappings(), version, cal)
                    args = write.args
                    batch.writes[job_id] = (write, self.analyzer.offload(safe_write_tags, *args) if args else None)
                except Exception as exc:  # noqa: BLE001 - that file's job fails with it, the others go on
                    analyses[job_id] = exc
            batch.analyses = analyses
            log.debug("batch of %d files decoded and scored in %.2f s", len(results), time.perf_counter() - started)
        return batch.analyses

    @staticmethod
    def _checked_tracks(jobs: list[ClaimedJob]) -> dict[int, Track | Exception]:
        """``checks.track_for_job`` for a whole batch in one query; a job's exception in its place."""
        tracks = checks.tracks_by_id([j.track_id for j in jobs])
        checked = {}
        for job in jobs:
            try:
                checked[job.id] = checks.checked(tracks.get(job.track_id))
            except Exception as exc:  # noqa: BLE001 - process() raises it for the runner to record
                checked[job.id] = exc
        return checked


def _share(seconds: float, duration: float | None) -> float:
    """The progress bar's place after ``seconds`` of a file scored: analysis is the first 80% of a job."""
    return round(0.8 * min(1.0, seconds / duration), 3) if duration else 0.4


def _analyzed(track: Track, compute):
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
    charged: set = field(default_factory=set)  # job ids charged an attempt when the batch was scored
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


def models_installed() -> bool:
    from workers.tagging.manifest import current_model_version

    return current_model_version(settings.EARMARK_MODELS_DIR) is not None
