"""The queue contract under random interleavings (issue 13): a short profile of ``bench.adversity``.

Hypothesis drives enqueue, claim, begin, heartbeat, the fence, complete,
fail, release, lease expiry, worker death and restart, rescue, retry,
cancel, pause/resume and prune across three simulated workers, and checks
after every step that the rows are what the contract says (none lost, none
done twice, attempts charged only for work begun, finished stays finished,
one holder at most, counts match). This module runs on PostgreSQL too
(``POSTGRES_MODULES``). The long run: ``python -m bench.adversity --minutes N``.
"""
import pytest
from hypothesis.stateful import run_state_machine_as_test

from bench.adversity import QueueMachine, profile

pytestmark = pytest.mark.django_db


def test_the_queue_keeps_its_contract_in_every_interleaving():
    run_state_machine_as_test(QueueMachine, settings=profile(examples=60, steps=50))
