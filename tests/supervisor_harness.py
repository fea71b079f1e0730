"""A real supervisord from deploy/supervisord.conf, on a temporary socket, for tests."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Supervisor:
    """Starts ``deploy/earmark-supervisord`` with test overrides; ``ctl`` runs supervisorctl against it."""

    def __init__(self, env: dict, run_dir: Path, **overrides):
        self.run_dir = Path(run_dir)
        self.env = dict(env)
        self.env.update(
            EARMARK_RUN_DIR=str(self.run_dir / "run"),
            EARMARK_LOG_DIR=str(self.run_dir / "log"),
            EARMARK_SUPERVISOR_SOCKET=str(self.run_dir / "run" / "supervisor.sock"),
            # Each test's own: the admin's numprocs.conf (workers/live/numprocs.py) never reaches another test.
            EARMARK_SUPERVISOR_CONF_DIR=str(self.run_dir / "conf"),
            EARMARK_WEB_AUTOSTART="false",
            EARMARK_TAGGER_AUTOSTART="false",
            EARMARK_RECALIBRATOR_AUTOSTART="false",
            EARMARK_WATCHER_AUTOSTART="false",
            EARMARK_PYTHON=str(Path(os.sys.executable)),
        )
        self.env.update({k: str(v) for k, v in overrides.items()})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "Supervisor":
        self.proc = subprocess.Popen([str(ROOT / "deploy" / "earmark-supervisord")], env=self.env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisord exited: {self.proc.stdout.read()}")
            if self.ctl("status", check=False).returncode in (0, 3):
                return self
            time.sleep(0.2)
        raise RuntimeError("supervisord did not answer on its socket")

    def ctl(self, *args, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(ROOT / "deploy" / "earmark-ctl"), *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        if check and proc.returncode not in (0, 3):
            raise AssertionError(f"supervisorctl {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def status(self) -> dict[str, str]:
        out = self.ctl("status", check=False).stdout
        return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}

    def log(self, name: str) -> str:
        path = self.run_dir / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
