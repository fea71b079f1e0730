"""The queue contract, one behaviour per test, on the real database."""
from datetime import timedelta

import pytest
from django.utils import timezone

from workers.jobs import leases, maintenance, queue, registry
from workers.models import Job, Meta

pytestmark = pytest.mark.django_db

W = "worker:testhost:scan:1"


def heartbeat(key=W, age=0.0, boot="boot1"):
    Meta.objects.update_or_create(key=key, defaults={"value": {"boot_id": boot, "host": "testhost"},
                                                     "updated_at": timezone.now() - timedelta(seconds=age)})


def test_enqueue_dedups_active_keys_only():
    assert queue.enqueue("scan", "k1", {"a": 1})
    assert not queue.enqueue("scan", "k1", {"a": 2})
    assert queue.enqueue("tag", "k1"), "the key is per queue"
    [job] = queue.claim("scan", W, "b", 1)
    queue.complete([job.id], W)
    assert queue.enqueue("scan", "k1"), "a finished job no longer blocks its key"
    assert Job.objects.filter(queue="scan", key="k1").count() == 2


def test_enqueue_many_counts_only_new_rows():
    n = queue.enqueue_many("scan", [queue.NewJob(key=f"k{i % 5}") for i in range(12)])
    assert n == 5
    assert Job.objects.count() == 5


def test_claim_orders_by_priority_then_id_and_sets_lease():
    queue.enqueue("scan", "low", priority=200)
    queue.enqueue("scan", "high", priority=10)
    queue.enqueue("scan", "mid", priority=100)
    jobs = queue.claim("scan", W, "boot1", limit=2)
    assert [j.key for j in sorted(jobs, key=lambda j: Job.objects.get(id=j.id).priority)] == ["high", "mid"]
    row = Job.objects.get(key="high")
    assert row.state == "running" and row.claimed_by == W and row.boot_id == "boot1"
    assert row.attempts == 1 and row.lease_expires > timezone.now()
    assert [j.key for j in queue.claim("scan", W, "boot1", limit=5)] == ["low"]
    assert queue.claim("scan", W, "boot1", limit=5) == []


def test_claim_respects_run_after():
    queue.enqueue("scan", "later")
    Job.objects.update(run_after=timezone.now() + timedelta(hours=1))
    assert queue.claim("scan", W, "b") == []


def test_complete_only_by_the_holder():
    queue.enqueue("scan", "k")
    [job] = queue.claim("scan", W, "b")
    assert queue.complete([job.id], "worker:other:scan:2") == 0
    assert queue.complete([job.id], W, {job.id: {"files": 3}}) == 1
    row = Job.objects.get(id=job.id)
    assert row.state == "done" and row.result == {"files": 3} and row.finished_at is not None


def test_fail_backs_off_then_fails_for_good_with_reason():
    queue.enqueue("scan", "k", max_attempts=2)
    [job] = queue.claim("scan", W, "b")
    assert queue.fail(job, W, "boom 1") == "queued"
    row = Job.objects.get(id=job.id)
    assert row.last_error == "boom 1" and row.run_after > timezone.now() + timedelta(seconds=9)
    Job.objects.update(run_after=timezone.now())
    [job] = queue.claim("scan", W, "b")
    assert job.attempts == 2
    assert queue.fail(job, W, "boom 2") == "failed"
    row = Job.objects.get(id=job.id)
    assert row.state == "failed" and row.last_error == "boom 2"


def test_backoff_grows_exponentially():
    assert 10 <= queue.backoff_seconds(1) <= 12
    assert 40 <= queue.backoff_seconds(3) <= 48
    assert queue.backoff_seconds(30) <= queue.BACKOFF_CAP_S * 1.2


def test_permanent_failure_skips_retries():
    queue.enqueue("scan", "k", max_attempts=5)
    [job] = queue.claim("scan", W, "b")
    assert queue.fail(job, W, "not audio", retry=False) == "failed"


def test_release_does_not_count_an_attempt():
    queue.enqueue("scan", "k")
    [job] = queue.claim("scan", W, "b")
    assert queue.release([job.id], W) == 1
    row = Job.objects.get(id=job.id)
    assert row.state == "queued" and row.attempts == 0 and row.claimed_by == ""


def test_extend_leases_only_for_this_boot():
    queue.enqueue("scan", "a")
    queue.enqueue("scan", "b")
    queue.claim("scan", W, "boot1", 1)
    queue.claim("scan", W, "boot2", 1)
    Job.objects.update(lease_expires=timezone.now())
    assert leases.extend_leases(W, "boot1", 600) == 1
    assert Job.objects.get(key="a").lease_expires > timezone.now() + timedelta(seconds=500)


def test_rescue_expired_lease_even_with_live_worker():
    heartbeat()
    queue.enqueue("scan", "k")
    [job] = queue.claim("scan", W, "boot1")
    Job.objects.update(lease_expires=timezone.now() - timedelta(seconds=1))
    r = queue.rescue()
    assert (r.requeued, r.failed) == (1, 0)
    row = Job.objects.get(id=job.id)
    assert row.state == "queued" and "stopped without finishing" in row.last_error


def test_rescue_dead_worker_before_its_long_lease_ends():
    heartbeat(age=60)  # the worker stopped heartbeating a minute ago
    queue.enqueue("scan", "k")
    queue.claim("scan", W, "boot1", lease_seconds=3600)
    assert queue.rescue(heartbeat_timeout=30).requeued == 1


def test_live_worker_keeps_its_job():
    heartbeat(age=1)
    queue.enqueue("scan", "k")
    queue.claim("scan", W, "boot1", lease_seconds=3600)
    assert queue.rescue(heartbeat_timeout=30).requeued == 0
    assert Job.objects.get(key="k").state == "running"


def test_quarantine_after_max_attempts_of_dying():
    queue.enqueue("scan", "poison", max_attempts=3)
    for attempt in range(1, 4):
        Job.objects.update(run_after=timezone.now())
        [job] = queue.claim("scan", W, f"boot{attempt}")
        assert job.attempts == attempt
        r = queue.rescue(heartbeat_timeout=30)  # no meta row at all: the worker is dead
    assert r.failed == 1
    row = Job.objects.get(key="poison")
    assert row.state == "failed" and row.last_error.startswith("worker died 3 times on this job")
    queue.enqueue("scan", "next")
    assert [j.key for j in queue.claim("scan", W, "x")] == ["next"], "the poison job does not block the queue"


def test_restarted_worker_hands_back_predecessor_claims():
    queue.enqueue("scan", "k")
    queue.claim("scan", W, "old-boot")
    heartbeat(boot="new-boot")
    assert queue.rescue_predecessor(W, "new-boot").requeued == 1
    assert Job.objects.get(key="k").state == "queued"


def test_cancel_and_retry():
    queue.enqueue("scan", "a")
    queue.enqueue("scan", "b")
    assert queue.cancel(queue="scan") == 2
    assert queue.claim("scan", W, "x") == []
    assert queue.retry(queue="scan") == 2
    assert len(queue.claim("scan", W, "x", 5)) == 2


def test_retry_skips_a_key_that_has_an_active_twin():
    queue.enqueue("scan", "a")
    queue.cancel(queue="scan")
    queue.enqueue("scan", "a")
    assert queue.retry(queue="scan") == 0


def test_pause_and_resume():
    queue.enqueue("tag", "k")
    queue.pause("tag")
    assert queue.is_paused("tag")
    assert queue.claim("tag", W, "b") == []
    queue.resume("tag")
    assert len(queue.claim("tag", W, "b")) == 1


def test_prune_removes_old_finished_jobs_only():
    for k in ("old", "new", "open"):
        queue.enqueue("scan", k)
    old, new = queue.claim("scan", W, "b", 2)
    queue.complete([old.id, new.id], W)
    Job.objects.filter(id=old.id).update(finished_at=timezone.now() - timedelta(days=30))
    assert queue.prune(retention_seconds=7 * 86400) == 1
    assert set(Job.objects.values_list("key", flat=True)) == {"new", "open"}


def test_counts_cover_every_queue_and_state():
    queue.enqueue("scan", "a")
    queue.enqueue("tag", "b")
    c = queue.counts()
    assert set(c) == {"scan", "tag", "calibrate"}
    assert c["scan"]["queued"] == 1 and c["tag"]["queued"] == 1 and c["calibrate"]["done"] == 0


def test_unknown_queue_is_refused():
    with pytest.raises(ValueError):
        queue.enqueue("nope", "k")


def test_reap_removes_stale_and_dead_local_workers():
    heartbeat("worker:elsewhere:scan:1", age=600)
    Meta.objects.create(key="worker:testhost:scan:2", value={"host": "testhost", "pid": 2 ** 22 + 12345},
                        updated_at=timezone.now())
    ident = registry.new_identity("scan", 3)
    registry.write(ident, {"state": "idle"})
    assert registry.reap(heartbeat_timeout=30) == 2
    assert [w["id"] for w in registry.live_workers()] == [ident.key]


def test_maintenance_runs_once_per_interval():
    assert maintenance.take_turn()
    assert not maintenance.take_turn()
