"""Integration: the project's supervisord config runs real scanner processes."""
import os
import stat

import pytest

from workers.library import scan
from workers.library.libraries import add_library
from workers.models import Meta, Track

from tests.conftest import manage, wait_for
from tests.supervisor_harness import Supervisor

pytestmark = pytest.mark.slow


def test_three_scanners_under_supervisord_scan_a_demo_library_and_stop_cleanly(worker_env, tmp_path):
    demo = tmp_path / "demo"
    manage("make_demo_library", demo, "--tracks", 40, "--min-seconds", 1, "--max-seconds", 2, env=worker_env,
           timeout=600)
    library = add_library("demo", str(demo))
    scan.request_scan(library)
    sup = Supervisor(worker_env, tmp_path / "sup", EARMARK_SCANNERS=3).start()
    try:
        sock = os.stat(sup.env["EARMARK_SUPERVISOR_SOCKET"])
        assert stat.S_IMODE(sock.st_mode) == 0o700
        wait_for(lambda: scan.progress(library).get("state") == "done", timeout=120, message="the scan to finish")
        assert Track.objects.filter(library=library, state="scanned").count() == 40
        rows = lambda: sorted(Meta.objects.filter(key__startswith="worker:testhost:scan:").values_list("key", flat=True))
        wait_for(lambda: len(rows()) == 3, message="three scanner rows")
        assert rows() == [f"worker:testhost:scan:{n}" for n in range(3)]
        scanners = lambda: {name: state for name, state in sup.status().items() if name.startswith("scanner")}
        wait_for(lambda: scanners() == {f"scanner:scanner_{n:02d}": "RUNNING" for n in range(3)},
                 message="three RUNNING scanner processes")
        sup.ctl("stop", "all")
        assert set(sup.status().values()) == {"STOPPED"}, sup.status()
        events = sup.log("supervisord")
        for n in range(3):
            assert f"stopped: scanner_{n:02d} (exit status 0)" in events, events
            log = sup.log(f"scanner_{n:02d}")
            assert "stopped" in log and "Traceback" not in log, log
        assert not Meta.objects.filter(key__startswith="worker:").exists(), "every worker removed its row"
    finally:
        sup.stop()
