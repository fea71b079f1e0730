"""The scanner's ``Worker``: each job is a library, folder or finalize step of a scan."""
from __future__ import annotations

from workers.jobs.queue import ClaimedJob
from workers.jobs.runtime import Context, Worker
from workers.library import scanner


class ScanWorker(Worker):
    queue = "scan"
    batch_size = 1  # a folder job is already a batch of files

    def process(self, job: ClaimedJob, ctx: Context) -> dict:
        ctx.update(file=job.payload.get("folder") or job.key)
        return scanner.process_job(job.payload, job.library_id, progress=ctx.progress)
