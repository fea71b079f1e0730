"""``manage.py run_scanner``: one scanner worker process (supervisord runs N)."""
from workers.management.worker_command import WorkerCommand
from workers.library.scan_worker import ScanWorker


class Command(WorkerCommand):
    help = "Run a scanner worker: walks library folders and reads new and changed files."

    def make_worker(self, options):
        return ScanWorker()
