"""supervisord from the admin (issue 15): the process table beside the worker rows (which process is
stale), start/stop/restart per process, and changing the number of a program's processes through the
config file supervisord includes, against a real supervisord."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.admin.models import LogEntry
from django.test import Client, override_settings
from django.utils import timezone

from workers.jobs import processes
from workers.live import numprocs, supervised
from workers.live.supervisor_client import Process
from workers.live.views import control_permission
from workers.models import Meta

from tests.conftest import ROOT, wait_for
from tests.supervisor_harness import Supervisor

DASHBOARD = "/admin/dashboard/"
NUMPROCS = "/admin/dashboard/supervisor/numprocs/"
CONTROL = "/admin/dashboard/supervisor/"
TABLE = "/admin/dashboard/supervisor/table/"


def process(name="scanner_00", group="scanner", state="RUNNING", pid=100, uptime=120) -> Process:
    return Process(group=group, name=name, state=state, pid=pid, description="", uptime=uptime, exitstatus=0,
                   spawnerr="")


def worker(queue="scan", number="0", pid=100, age=0.5, host="h", state="idle") -> dict:
    return {"id": f"worker:{host}:{queue}:{number}", "host": host, "queue": queue, "number": number, "pid": pid,
            "state": state, "heartbeat_age": age}


# --- which process is stale (no supervisord needed) -------------------------------------------------


def test_a_process_whose_row_agrees_is_healthy_and_shows_the_workers_state():
    [row] = supervised.rows([process()], [worker(state="busy")], host="h")
    assert (row.worker_id, row.worker, row.stale) == ("worker:h:scan:0", "busy", False)
    assert row.uptime == "2 min"


@pytest.mark.parametrize("proc, rows, says", [
    (process(pid=100), [worker(pid=55)], "row is pid 55's, supervisord runs pid 100"),
    (process(), [worker(age=20)], "heartbeat 20 s ago (late)"),
    (process(uptime=600), [], "no worker row after 10 min running"),
    (process(state="STOPPED", pid=0, uptime=0), [worker(pid=77)], "row left behind by pid 77"),
    (process(state="EXITED", pid=0, uptime=0), [worker(pid=77)], "row left behind by pid 77"),
])
def test_stale_processes_say_what_disagrees(proc, rows, says):
    [row] = supervised.rows([proc], rows, host="h")
    assert row.stale and says in row.worker, row.worker


def test_fresh_starts_and_passing_states_are_not_stale():
    starting = supervised.rows([process(uptime=2)], [], host="h")[0]
    assert (starting.worker, starting.stale) == ("no worker row yet", False)
    replaced = supervised.rows([process(uptime=2, pid=100)], [worker(pid=55)], host="h")[0]
    assert not replaced.stale, "a restarted process has a beat's time to replace its predecessor's row"
    stopping = supervised.rows([process(state="STOPPING")], [worker()], host="h")[0]
    assert not stopping.stale
    stopped = supervised.rows([process(state="STOPPED", pid=0, uptime=0)], [], host="h")[0]
    assert (stopped.worker, stopped.stale, stopped.uptime) == ("", False, "")


def test_the_number_maps_processes_to_their_own_rows_and_other_rows_are_listed_after():
    procs = [process("tagger_00", "tagger", pid=1), process("tagger_01", "tagger", pid=2),
             process("web", "web", pid=3)]
    rows = [worker("tag", "0", pid=1), worker("tag", "1", pid=2), worker("tag", "p999", pid=999, age=40),
            worker("tag", "7", pid=8, host="elsewhere"), worker("scan", "0", pid=5)]
    table = supervised.rows(procs, rows, host="h")
    assert [r.worker_id for r in table] == ["worker:h:tag:0", "worker:h:tag:1", "", "worker:h:scan:0",
                                            "worker:h:tag:p999"]
    assert [r.stale for r in table] == [False, False, False, False, True]
    assert "not run by this supervisord" in table[3].worker and table[3].process is None
    assert table[2].worker == "", "the web program has no worker row to compare"


def test_durations_read_at_a_glance():
    assert [supervised.duration(s) for s in (5, 59, 60, 3599, 3600, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == [
        "5 s", "59 s", "1 min", "59 min", "1 h 0 min", "3 h 5 min", "2 d 4 h"]


# --- the numprocs file --------------------------------------------------------------------------


@pytest.mark.parametrize("count", ["0", "17", "-1", "two", "", "2.5"])
def test_counts_out_of_bounds_or_not_numbers_are_refused(count):
    with pytest.raises(ValueError):
        numprocs.check_count("tagger", count)


def test_only_worker_programs_are_resized():
    with pytest.raises(ValueError, match="cannot be changed here"):
        numprocs.check_count("web", 2)
    assert numprocs.check_count("scanner", " 16 ") == 16 and numprocs.check_count("tagger", 1) == 1


def test_the_file_round_trips_and_ignores_what_it_does_not_own(tmp_path):
    with override_settings(EARMARK_SUPERVISOR_CONF_DIR=str(tmp_path)):
        assert numprocs.chosen() == {}
        numprocs._write(numprocs._render({"tagger": 3, "scanner": 5}))
        assert numprocs.chosen() == {"tagger": 3, "scanner": 5}
        text = numprocs.conf_path().read_text()
        assert "[program:scanner]\nnumprocs = 5" in text and "[program:tagger]\nnumprocs = 3" in text
        numprocs.conf_path().write_text("[program:web]\nnumprocs = 4\n[program:tagger]\nnumprocs = x\n")
        assert numprocs.chosen() == {}
        numprocs.conf_path().write_text("not a config file")
        assert numprocs.chosen() == {}


PARSE_CONFIG = """
from supervisor.options import ServerOptions
options = ServerOptions()
options.configfile = "deploy/supervisord.conf"
options.process_config(do_usage=False)
for group in options.process_group_configs:
    for p in group.process_configs:
        print(group.name, p.name, p.environment.get("EARMARK_TAGGERS", "-"))
"""


def test_the_admins_file_wins_over_the_environment_and_taggers_are_told_the_count_in_force(tmp_path):
    """supervisord's own parser on deploy/supervisord.conf: what any start or ``reloadConfig`` reads."""
    conf = tmp_path / "conf"
    for d in (conf, tmp_path / "log", tmp_path / "run"):
        d.mkdir()
    (conf / numprocs.FILE_NAME).write_text(numprocs._render({"tagger": 3, "scanner": 1}))
    env = {**os.environ, "EARMARK_SUPERVISOR_CONF_DIR": str(conf), "EARMARK_DATA_DIR": str(tmp_path),
           "EARMARK_PYTHON": sys.executable, "EARMARK_TAGGERS": "2", "EARMARK_SCANNERS": "4"}
    out = subprocess.run(["bash", "-c", 'source deploy/env.sh && exec "$EARMARK_PYTHON" -c "$0"', PARSE_CONFIG],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
    assert [line for line in out if line.startswith("tagger ")] == [f"tagger tagger_0{n} 3" for n in range(3)]
    assert [line for line in out if line.startswith("scanner ")] == ["scanner scanner_00 -"]


# --- against a real supervisord ----------------------------------------------------------------------


def _token(client) -> str:
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', client.get(DASHBOARD).content.decode()).group(1)


def _group(sup, group: str) -> dict[str, str]:
    return {name: state for name, state in sup.status().items() if name.startswith(f"{group}:")}


@pytest.mark.slow
def test_numprocs_and_per_process_control_from_the_admin(worker_env, tmp_path, django_user_model):
    sup = Supervisor(worker_env, tmp_path / "sup", EARMARK_SCANNERS=1, EARMARK_TAGGERS=2).start()
    conf_dir = sup.env["EARMARK_SUPERVISOR_CONF_DIR"]
    staff = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    operator = django_user_model.objects.create_user("op", password="pw", is_staff=True)
    operator.user_permissions.add(control_permission())
    from workers.live.views import ensure_groups

    for user in (staff, operator):  # both may look at the dashboard
        user.groups.add(ensure_groups()["viewer"])
    plain, op = Client(enforce_csrf_checks=True), Client(enforce_csrf_checks=True)
    plain.force_login(staff)
    op.force_login(operator)
    try:
        with override_settings(EARMARK_SUPERVISOR_SOCKET=sup.env["EARMARK_SUPERVISOR_SOCKET"],
                               EARMARK_SUPERVISOR_CONF_DIR=conf_dir):
            # Without the permission: no form, and the view refuses.
            page = plain.get(DASHBOARD).content.decode()
            assert "tagger:tagger_01" in page and 'name="numprocs"' not in page
            refused = plain.post(NUMPROCS, {"group": "tagger", "numprocs": "3", "csrfmiddlewaretoken": _token(plain)})
            assert refused.status_code == 403
            assert plain.post(CONTROL, {"action": "stop", "group": "scanner", "process": "scanner_00",
                                        "csrfmiddlewaretoken": _token(plain)}).status_code == 403
            assert len(_group(sup, "tagger")) == 2 and not Path(conf_dir, numprocs.FILE_NAME).exists()

            # Taggers 2 → 3: the file says so, supervisord runs three (stopped: the harness does not autostart them).
            page = op.get(DASHBOARD).content.decode()
            assert re.search(r'name="group" value="tagger">\s*<label>tagger processes\s*'
                             r'<input type="number" name="numprocs" value="2"', page), "the form shows the count"
            done = op.post(NUMPROCS, {"group": "tagger", "numprocs": "3", "csrfmiddlewaretoken": _token(op)},
                           follow=True)
            assert "Tagger: 3 process(es) (was 2)" in done.content.decode()  # the admin capitalises messages
            assert _group(sup, "tagger") == {f"tagger:tagger_{n:02d}": "STOPPED" for n in range(3)}
            assert numprocs.chosen() == {"tagger": 3}
            entry = LogEntry.objects.get(object_repr="supervisor: tagger")
            assert entry.user == operator and entry.change_message == "numprocs 2 → 3"

            # Out of bounds: said, nothing changed.
            for bad in ("17", "0", "many"):
                said = op.post(NUMPROCS, {"group": "tagger", "numprocs": bad, "csrfmiddlewaretoken": _token(op)},
                               follow=True).content.decode()
                assert "Not changed" in said and len(_group(sup, "tagger")) == 3, bad

            # A running group is resized and runs again: scanners 1 → 2, each with its own worker row.
            wait_for(lambda: _group(sup, "scanner") == {"scanner:scanner_00": "RUNNING"}, message="scanner_00 up")
            op.post(NUMPROCS, {"group": "scanner", "numprocs": "2", "csrfmiddlewaretoken": _token(op)})
            wait_for(lambda: _group(sup, "scanner") == {"scanner:scanner_00": "RUNNING",
                                                        "scanner:scanner_01": "RUNNING"},
                     timeout=60, message="two RUNNING scanners")
            rows = lambda: {k: v["pid"] for k, v in Meta.objects.filter(key__startswith="worker:testhost:scan:")
                            .values_list("key", "value")}
            wait_for(lambda: set(rows()) == {"worker:testhost:scan:0", "worker:testhost:scan:1"},
                     message="both scanners' rows")
            table = op.get(TABLE).content.decode()
            for key, pid in rows().items():
                name = f"scanner:scanner_0{key[-1]}"
                assert re.search(rf'data-process="{name}">\s*<td>{name}</td><td class="sv-running">RUNNING</td>'
                                 rf'\s*<td>{pid}</td>', table), table
            assert 'class="sv-stale"' not in table

            # One process: stop scanner_01 alone, then a restart of the stopped one starts it.
            op.post(CONTROL, {"action": "stop", "group": "scanner", "process": "scanner_01",
                              "csrfmiddlewaretoken": _token(op)})
            assert _group(sup, "scanner") == {"scanner:scanner_00": "RUNNING", "scanner:scanner_01": "STOPPED"}
            op.post(CONTROL, {"action": "restart", "group": "scanner", "process": "scanner_01",
                              "csrfmiddlewaretoken": _token(op)})
            assert _group(sup, "scanner")["scanner:scanner_01"] == "RUNNING"
            assert LogEntry.objects.filter(user=operator, object_repr="supervisor: scanner:scanner_01",
                                           change_message="restart done").exists()

            # A row no live process of supervisord's accounts for is marked stale (a live pid: not reaped).
            me = os.getpid()
            Meta.objects.create(key="worker:testhost:tag:2", value={
                "host": "testhost", "queue": "tag", "number": "2", "pid": me, "pid_start": processes.start_time(me),
                "boot_id": "x", "state": "idle"}, updated_at=timezone.now())
            table = op.get(TABLE).content.decode()
            assert re.search(r'data-process="tagger:tagger_02" class="sv-stale">.*?row left behind by pid '
                             + str(me), table, re.S), table
            Meta.objects.filter(key="worker:testhost:tag:2").delete()

            # supervisord refuses the config (another file it includes is broken): the count is put back.
            broken = Path(conf_dir, "broken.conf")
            broken.write_text("[program:broken]\n")  # a program without a command
            said = op.post(NUMPROCS, {"group": "tagger", "numprocs": "4", "csrfmiddlewaretoken": _token(op)},
                           follow=True).content.decode()
            assert "Could not change the number of tagger processes" in said
            assert numprocs.chosen() == {"tagger": 3, "scanner": 2} and len(_group(sup, "tagger")) == 3
            broken.unlink()
        sup.stop()
        # The count chosen in the admin outlives supervisord: a fresh start reads it from the included file.
        sup = Supervisor(worker_env, tmp_path / "sup", EARMARK_SCANNERS=1, EARMARK_TAGGERS=2).start()
        assert len(_group(sup, "tagger")) == 3 and len(_group(sup, "scanner")) == 2
    finally:
        sup.stop()
