"""The runner's claims under adversity: a worker never holds one job twice (issue 13, case 3).

The interleaving is forced with the public queue functions: a batching
worker holds a batch; maintenance rescues one of its jobs (its heartbeat
looked stale); the worker's lookahead claim takes that job again.
"""
import pytest

from workers.jobs import queue
from workers.jobs.runtime import Runner, Worker
from workers.models import Job

pytestmark = pytest.mark.django_db


class Batching(Worker):
    queue = "scan"
    batch_size = 4
    lookahead = True

    def process(self, job, ctx):
        return None


def test_a_rescued_job_claimed_again_by_its_own_worker_is_held_once():
    for n in range(4):
        queue.enqueue("scan", f"k{n}", {})
    runner = Runner(Batching(), number=1)
    batch = runner._claim(True)
    assert len(batch) == 4
    rescued = batch[0].id
    # Maintenance hands the job back (as ``queue.rescue`` does for a stale heartbeat).
    Job.objects.filter(id=rescued).update(state="queued", claimed_by="", boot_id="", lease_expires=None)
    ahead = runner._claim(True)
    assert rescued not in [j.id for j in ahead], "the lookahead must not hand out a job already in hand"
    assert rescued in runner.held and len(runner.held) == 4 + len(ahead)
    job = Job.objects.get(id=rescued)
    assert job.state == "running" and job.claimed_by == runner.identity.key, "the new claim renewed our lease"
