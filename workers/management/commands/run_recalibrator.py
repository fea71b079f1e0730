"""``manage.py run_recalibrator``: one recalibrator worker process (supervisord runs N; never imports torch)."""
from workers.management.worker_command import WorkerCommand
from workers.calibration.recalibrate_worker import RecalibrateWorker


class Command(WorkerCommand):
    help = ("Run a recalibrator worker: rewrites tags from stored scores when the calibration changes "
            "(no networks, no torch).")

    def make_worker(self, options):
        return RecalibrateWorker()
