"""``manage.py run_tagger``: one tagger worker process (supervisord runs GPUs × workers per GPU)."""
from django.core.management.base import CommandError

from workers.jobs.gpu import pin_from_environment
from workers.management.worker_command import WorkerCommand
from workers.tagging.tag_worker import TagWorker, models_installed


class Command(WorkerCommand):
    help = "Run a tagger worker: decodes tracks, runs the musicnn networks, stores scores and writes tags."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("--device", default="auto", help="auto (GPU when visible), cpu, cuda or cuda:N.")
        parser.add_argument("--threads", type=int, default=None,
                            help="torch threads (default $EARMARK_TORCH_THREADS or 1: one thread per process is fastest).")

    def make_worker(self, options):
        pin_from_environment()  # before torch sees CUDA
        if not models_installed():
            raise CommandError("the models are not installed: run `manage.py install_models` first")
        return TagWorker(options["device"], options["batch"], options["threads"])
