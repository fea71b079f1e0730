"""``python -m bench.adversity --minutes N``: the queue contract under random interleavings, on both databases.

A Hypothesis state machine (``QueueMachine``) drives the public queue
functions with three simulated workers: enqueue, claim (charged or ahead of
the work), begin, heartbeat, complete, fail, release, lease expiry, worker
death at any step and restart, a live worker's stalled heartbeat, maintenance's rescue, operator retry and
cancel, pause/resume, prune, and time passing over retry backoffs. Beside
the database it keeps a model of what the contract says each job must be,
and after every step checks:

* every job is where the model says (state, owner, attempts): none lost,
  none done twice, attempts charged only when work began (a job only held
  ahead of the work is never charged), a finished job stays finished;
* at most one active job per key, and no job held by two workers: a worker
  whose job was rescued learns it (``leases.held``, ``complete`` → 0);
* ``queue.counts()`` matches the rows.

``tests/jobs/test_queue_properties.py`` runs a short profile in CI on
SQLite and PostgreSQL; this runs it for ``--minutes`` on each database (a
child process per database, on the test settings: a throwaway SQLite file
and a throwaway PostgreSQL server) and prints steps run, distinct
interleavings, deaths injected and invariant violations.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

KEYS = [f"k{n}" for n in range(5)]
WORKERS = 3
MAX_ATTEMPTS = 3
QUEUE = "scan"


@dataclass
class Totals:
    """What the runs did, for the report."""

    steps: int = 0
    examples: int = 0
    deaths: int = 0
    rescued: int = 0
    lost_leases_noticed: int = 0
    interleavings: set = field(default_factory=set)
    rules: Counter = field(default_factory=Counter)


TOTALS = Totals()


@dataclass
class ModelJob:
    key: str
    state: str = "queued"
    owner: tuple[int, str] | None = None  # (worker index, boot id) while running
    attempts: int = 0
    delayed: bool = False  # waiting on a retry backoff
    lease_expired: bool = False
    done: int = 0  # times completed: must stay 0 or 1


@dataclass
class SimWorker:
    number: int
    boot: str
    alive: bool = True
    stale: bool = False  # its heartbeat looks dead to the rescuer (dead, or alive but stalled)
    held: dict = field(default_factory=dict)  # job id -> charged

    @property
    def key(self) -> str:
        return f"worker:advhost:{QUEUE}:{self.number}"


class QueueMachine(RuleBasedStateMachine):
    """The queue as a black box, against a model of its contract (module docstring)."""

    def __init__(self):
        super().__init__()
        from workers.models import Job, Meta

        Job.objects.all().delete()
        Meta.objects.all().delete()
        # Retry backoffs last an hour here, so that only ``time_passes`` ends them: the model
        # knows no clock, and a slow step (a loaded machine) must not let one run out by itself.
        from workers.jobs import queue

        self.backoff = queue.BACKOFF_BASE_S, queue.BACKOFF_CAP_S
        queue.BACKOFF_BASE_S = queue.BACKOFF_CAP_S = 3600.0
        self.jobs: dict[int, ModelJob] = {}
        self.workers = [SimWorker(n, uuid.uuid4().hex[:16]) for n in range(WORKERS)]
        self.paused = False
        self.trace: list[str] = []
        TOTALS.examples += 1

    def teardown(self):
        from workers.jobs import queue

        queue.BACKOFF_BASE_S, queue.BACKOFF_CAP_S = self.backoff
        TOTALS.interleavings.add(hashlib.sha1(" ".join(self.trace).encode()).hexdigest())

    def _step(self, name: str) -> None:
        self.trace.append(name)
        TOTALS.steps += 1
        TOTALS.rules[name] += 1

    def _identity(self, w: SimWorker):
        from workers.jobs.registry import Identity

        return Identity(host="advhost", queue=QUEUE, number=str(w.number), pid=os.getpid(), boot_id=w.boot,
                        pid_start="")

    def alive(self) -> list[int]:
        return [w.number for w in self.workers if w.alive]

    def holding(self) -> list[int]:
        return [w.number for w in self.workers if w.alive and w.held]

    def in_state(self, *states: str) -> list[int]:
        return sorted(i for i, m in self.jobs.items() if m.state in states)

    def _owned(self, w: SimWorker, job_id: int) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.state == "running" and job.owner == (w.number, w.boot)

    def _rescue_job(self, job: ModelJob) -> None:
        job.owner = None
        if job.attempts >= MAX_ATTEMPTS:
            job.state = "failed"
        else:
            job.state, job.delayed = "queued", job.attempts >= 2
        TOTALS.rescued += 1

    @initialize()
    def workers_start(self):
        from workers.jobs import registry

        for w in self.workers:
            registry.write(self._identity(w), {"state": "idle"})

    # -- adding and taking work ---------------------------------------------------------

    @rule(key=st.sampled_from(KEYS))
    def enqueue(self, key):
        from workers.jobs import queue
        from workers.models import Job

        self._step("enqueue")
        active = any(j.key == key and j.state in ("queued", "running") for j in self.jobs.values())
        created = queue.enqueue(QUEUE, key, max_attempts=MAX_ATTEMPTS)
        assert created == (not active), f"enqueue {key}: created={created} with an active twin={active}"
        if created:
            new = Job.objects.exclude(id__in=list(self.jobs)).get(key=key)
            self.jobs[new.id] = ModelJob(key=key)

    @precondition(lambda self: self.alive() and self.in_state("queued"))
    @rule(limit=st.integers(1, 3), charge=st.booleans(), data=st.data())
    def claim(self, limit, charge, data):
        from workers.jobs import queue

        w = self.workers[data.draw(st.sampled_from(self.alive()))]
        self._step("claim")
        got = queue.claim(QUEUE, w.key, w.boot, limit, charge=charge)
        ready = sorted(i for i, j in self.jobs.items() if j.state == "queued" and not j.delayed)
        expected = [] if self.paused else ready[:limit]
        if [j.id for j in got] != expected:
            from django.utils import timezone

            from workers.models import Job

            odd = set(j.id for j in got) ^ set(expected)
            rows = list(Job.objects.filter(id__in=odd).values("id", "state", "run_after", "attempts", "claimed_by"))
            raise AssertionError(f"claim gave {[j.id for j in got]}, the contract says {expected}; rows {rows}, "
                                 f"model {[self.jobs.get(i) for i in odd]}, now {timezone.now()}, "
                                 f"trace {' '.join(self.trace[-25:])}")
        for job in got:
            m = self.jobs[job.id]
            m.state, m.owner, m.lease_expired = "running", (w.number, w.boot), False
            m.attempts += int(charge)
            assert job.attempts == m.attempts
            w.held[job.id] = charge

    @precondition(lambda self: any(w.alive and not all(w.held.values()) for w in self.workers))
    @rule(data=st.data())
    def begin(self, data):
        from workers.jobs import leases

        w = data.draw(st.sampled_from([w for w in self.workers if w.alive and not all(w.held.values())]))
        ahead = sorted(i for i, charged in w.held.items() if not charged)
        self._step("begin")
        job_id = data.draw(st.sampled_from(ahead))
        ours = self._owned(w, job_id)
        assert leases.begin([job_id], w.key, w.boot) == ({job_id} if ours else set())
        if ours:
            self.jobs[job_id].attempts += 1
            w.held[job_id] = True
        else:
            del w.held[job_id]  # the worker drops a job taken from it, as the runner does
            TOTALS.lost_leases_noticed += 1

    # -- finishing ----------------------------------------------------------------------

    def _pick_held(self, data) -> tuple[SimWorker, int]:
        w = self.workers[data.draw(st.sampled_from(self.holding()))]
        return w, data.draw(st.sampled_from(sorted(w.held)))

    @precondition(lambda self: self.holding())
    @rule(data=st.data())
    def fence(self, data):
        """The check before a tag write: true only while nobody can take the job from us."""
        from workers.jobs import leases

        w, job_id = self._pick_held(data)
        self._step("fence")
        expected = self._owned(w, job_id) and not self.jobs[job_id].lease_expired and not w.stale
        assert (job_id in leases.held([job_id], w.key, w.boot)) == expected
        if not expected:
            TOTALS.lost_leases_noticed += 1

    @precondition(lambda self: self.holding())
    @rule(data=st.data())
    def complete(self, data):
        from workers.jobs import queue

        w, job_id = self._pick_held(data)
        self._step("complete")
        ours = self._owned(w, job_id)
        assert queue.complete([job_id], w.key, boot_id=w.boot) == int(ours), "complete of a job not ours"
        del w.held[job_id]
        if ours:
            m = self.jobs[job_id]
            m.state, m.owner, m.done = "done", None, m.done + 1
        else:
            TOTALS.lost_leases_noticed += 1

    @precondition(lambda self: self.holding())
    @rule(retry=st.booleans(), data=st.data())
    def fail(self, retry, data):
        from workers.jobs import queue
        from workers.jobs.queue import ClaimedJob

        w, job_id = self._pick_held(data)
        self._step("fail")
        # (A stalled worker may still believe it holds a job rescued, finished and pruned since.)
        m, ours = self.jobs.get(job_id), self._owned(w, job_id)
        job = ClaimedJob(job_id, QUEUE, m.key if m else "gone", {}, None, None, m.attempts if m else 1, MAX_ATTEMPTS)
        state = queue.fail(job, w.key, "boom", retry=retry, boot_id=w.boot)
        del w.held[job_id]
        if not ours:
            assert state == "lost"
            return
        final = not retry or m.attempts >= MAX_ATTEMPTS
        assert state == ("failed" if final else "queued")
        m.state, m.owner, m.delayed = state, None, not final

    @precondition(lambda self: self.holding())
    @rule(data=st.data())
    def release(self, data):
        from workers.jobs import queue

        w = self.workers[data.draw(st.sampled_from(self.holding()))]
        self._step("release")
        ids = sorted(w.held)
        released = queue.release(ids, w.key, w.boot, uncharged=[i for i in ids if not w.held[i]])
        ours = [i for i in ids if self._owned(w, i)]
        assert released == len(ours)
        for job_id in ours:
            m = self.jobs[job_id]
            m.state, m.owner = "queued", None
            if w.held[job_id] and m.attempts > 0:
                m.attempts -= 1
        w.held.clear()

    # -- time, death and maintenance ----------------------------------------------------

    @precondition(lambda self: self.holding())
    @rule(data=st.data())
    def heartbeat(self, data):
        from workers.jobs import leases, registry

        w = self.workers[data.draw(st.sampled_from(self.holding()))]
        self._step("heartbeat")
        registry.write(self._identity(w), {"state": "busy" if w.held else "idle"})
        leases.extend_leases(w.key, w.boot)
        w.stale = False
        for m in self.jobs.values():
            if m.state == "running" and m.owner == (w.number, w.boot):
                m.lease_expired = False

    @precondition(lambda self: self.holding())
    @rule(data=st.data())
    def stall(self, data):
        """Alive, but its heartbeat stops for longer than the timeout (issue 13, case 1): it will act again."""
        from django.utils import timezone

        from workers.models import Meta

        w = self.workers[data.draw(st.sampled_from(self.holding()))]
        self._step("stall")
        w.stale = True
        Meta.objects.filter(key=w.key).update(updated_at=timezone.now() - timedelta(hours=1))

    @precondition(lambda self: self.holding())
    @rule(data=st.data())
    def die(self, data):
        """The process is gone; the heartbeat timeout passes without a beat from it."""
        from django.utils import timezone

        from workers.models import Meta

        w = self.workers[data.draw(st.sampled_from(self.holding()))]
        self._step("die")
        TOTALS.deaths += 1
        w.alive, w.stale, w.held = False, True, {}
        Meta.objects.filter(key=w.key).update(updated_at=timezone.now() - timedelta(hours=1))

    @precondition(lambda self: len(self.alive()) < WORKERS)
    @rule(data=st.data())
    def restart(self, data):
        """supervisord starts the worker again: a new boot, which hands back what the old one held."""
        from workers.jobs import queue, registry

        w = data.draw(st.sampled_from([w for w in self.workers if not w.alive]))
        self._step("restart")
        w.boot, w.alive, w.stale = uuid.uuid4().hex[:16], True, False
        registry.write(self._identity(w), {"state": "starting"})
        result = queue.rescue_predecessor(w.key, w.boot)
        mine = [m for m in self.jobs.values() if m.state == "running" and m.owner and m.owner[0] == w.number
                and m.owner[1] != w.boot]
        assert result.requeued + result.failed == len(mine)
        for m in mine:
            self._rescue_job(m)

    @precondition(lambda self: self.in_state("running"))
    @rule(data=st.data())
    def lease_runs_out(self, data):
        """A running job's lease passes without an extension (its worker's beat was held up)."""
        from django.utils import timezone

        from workers.models import Job

        self._step("lease_runs_out")
        job_id = data.draw(st.sampled_from(self.in_state("running")))
        Job.objects.filter(id=job_id).update(lease_expires=timezone.now() - timedelta(seconds=1))
        self.jobs[job_id].lease_expired = True

    @precondition(lambda self: self.in_state("running"))
    @rule()
    def maintenance(self):
        from workers.jobs import queue

        self._step("maintenance")
        stale = {w.number for w in self.workers if w.stale}
        due = [m for m in self.jobs.values() if m.state == "running" and (m.lease_expired or m.owner[0] in stale)]
        result = queue.rescue()
        assert (result.requeued, result.failed) == (sum(m.attempts < MAX_ATTEMPTS for m in due),
                                                    sum(m.attempts >= MAX_ATTEMPTS for m in due))
        for m in due:
            self._rescue_job(m)

    @precondition(lambda self: any(m.delayed for m in self.jobs.values()))
    @rule()
    def time_passes(self):
        """Retry backoffs run out."""
        from django.utils import timezone

        from workers.models import Job

        self._step("time_passes")
        Job.objects.filter(state="queued").update(run_after=timezone.now() - timedelta(seconds=1))
        for m in self.jobs.values():
            m.delayed = False

    # -- operators ----------------------------------------------------------------------

    @precondition(lambda self: self.in_state("queued"))
    @rule(data=st.data())
    def cancel(self, data):
        from workers.jobs import queue

        self._step("cancel")
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        queued = self.jobs[job_id].state == "queued"
        assert queue.cancel([job_id]) == int(queued)
        if queued:
            self.jobs[job_id].state = "cancelled"

    @precondition(lambda self: self.in_state("failed", "cancelled"))
    @rule()
    def retry(self):
        """Failed and cancelled jobs back in the queue, at most one per key (the dedup rule)."""
        from workers.jobs import queue
        from workers.models import Job

        self._step("retry")
        before = {i: m.state for i, m in self.jobs.items()}
        n = queue.retry()
        rows = dict(Job.objects.values_list("id", "state"))
        back = [i for i in before if before[i] in ("failed", "cancelled") and rows[i] == "queued"]
        assert n == len(back)
        for i in back:
            key = self.jobs[i].key
            assert not any(m.key == key and m.state in ("queued", "running") for j, m in self.jobs.items()
                           if j != i and before[j] in ("queued", "running")), f"retry made a twin of {key}"
            m = self.jobs[i]
            m.state, m.attempts, m.delayed, m.owner = "queued", 0, False, None
        keys_left = {m.key for i, m in self.jobs.items() if before[i] in ("failed", "cancelled") and i not in back}
        for key in keys_left:  # a key left out must have an active twin now
            assert any(m.key == key and m.state in ("queued", "running") for m in self.jobs.values())

    @precondition(lambda self: not self.paused and self.in_state("queued"))
    @rule()
    def pause(self):
        from workers.jobs import queue

        self._step("pause")
        queue.pause(QUEUE)
        self.paused = True

    @precondition(lambda self: self.paused)
    @rule()
    def resume(self):
        from workers.jobs import queue

        self._step("resume")
        queue.resume(QUEUE)
        self.paused = False

    @precondition(lambda self: self.in_state("done", "failed", "cancelled"))
    @rule()
    def prune(self):
        from workers.jobs import queue

        self._step("prune")
        finished = [i for i, m in self.jobs.items() if m.state in ("done", "failed", "cancelled")]
        time.sleep(0.001)  # finished_at must lie strictly before the cutoff
        assert queue.prune(retention_seconds=0) == len(finished)
        for i in finished:
            del self.jobs[i]

    # -- what must hold after every step --------------------------------------------------

    @invariant()
    def rows_match_the_contract(self):
        from workers.models import Job

        rows = {r[0]: r[1:] for r in Job.objects.values_list("id", "state", "claimed_by", "boot_id", "attempts")}
        assert set(rows) == set(self.jobs), f"jobs lost or made up: rows {sorted(rows)}, model {sorted(self.jobs)}"
        for job_id, m in self.jobs.items():
            state, claimed_by, boot, attempts = rows[job_id]
            assert state == m.state, f"job {job_id} is {state}, the contract says {m.state}"
            assert attempts == m.attempts, f"job {job_id} was charged {attempts} attempts, the contract says {m.attempts}"
            assert m.done <= 1, f"job {job_id} was done {m.done} times"
            if state == "running":
                w = self.workers[m.owner[0]]
                assert (claimed_by, boot) == (w.key, m.owner[1])

    @invariant()
    def one_active_job_per_key(self):
        active = Counter(m.key for m in self.jobs.values() if m.state in ("queued", "running"))
        assert all(n == 1 for n in active.values()), active

    @invariant()
    def one_holder_at_most(self):
        """No job is believed held, and allowed through the fence, by two live workers."""
        holders = Counter(i for w in self.workers if w.alive for i in w.held if self._owned(w, i))
        # (A stalled worker still believes it holds a rescued job; ``_owned`` is what the fence says.)
        assert all(n == 1 for n in holders.values()), holders

    @invariant()
    def counts_match_rows(self):
        from workers.jobs import queue

        counted = {s: n for s, n in queue.counts()[QUEUE].items() if n}
        assert counted == dict(Counter(m.state for m in self.jobs.values())), counted


def profile(examples: int, steps: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------ the long run


def _child(seconds: float) -> int:
    """Run the machine until ``seconds`` pass, in a database made for it; print the totals as JSON."""
    import django

    django.setup()
    from django.db import connection
    from django.test.utils import setup_databases

    setup_databases(verbosity=0, interactive=False)
    violations, failure = 0, ""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            run_state_machine_as_test(QueueMachine, settings=profile(examples=20, steps=60))
        except Exception as exc:  # noqa: BLE001 - the report says what broke
            violations, failure = violations + 1, f"{type(exc).__name__}: {exc}"[:2000]
            break
    print(json.dumps({"db": connection.vendor, "steps": TOTALS.steps, "examples": TOTALS.examples,
                      "interleavings": len(TOTALS.interleavings), "deaths": TOTALS.deaths,
                      "rescued": TOTALS.rescued, "lost_leases_noticed": TOTALS.lost_leases_noticed,
                      "violations": violations, "failure": failure, "rules": dict(TOTALS.rules)}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.adversity", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=2.0, help="per database (default 2)")
    p.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args.minutes * 60)
    results = []
    for db in (["sqlite", "postgres"] if args.db == "both" else [args.db]):
        env = dict(os.environ, DJANGO_SETTINGS_MODULE="project.settings_test", EARMARK_TEST_DB=db,
                   EARMARK_LOG_LEVEL="WARNING")
        env.pop("EARMARK_TEST_POSTGRES_URL", None)
        proc = subprocess.run([sys.executable, "-m", "bench.adversity", "--child", "--minutes", str(args.minutes)],
                              env=env, capture_output=True, text=True, timeout=args.minutes * 60 + 300)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"bench.adversity on {db} could not run (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            return 1
        results.append(json.loads(lines[-1]))
    print(f"bench.adversity: the queue contract, {args.minutes:g} min per database, {WORKERS} simulated workers")
    print(f"{'database':<12}{'steps':>9}{'examples':>10}{'interleavings':>15}{'deaths':>8}{'rescued':>9}"
          f"{'lost leases noticed':>21}{'violations':>12}")
    for r in results:
        print(f"{r['db']:<12}{r['steps']:>9,}{r['examples']:>10,}{r['interleavings']:>15,}{r['deaths']:>8,}"
              f"{r['rescued']:>9,}{r['lost_leases_noticed']:>21,}{r['violations']:>12}")
    for r in results:
        if r["violations"]:
            print(f"\n{r['db']}: {r['failure']}")
    return 1 if any(r["violations"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
