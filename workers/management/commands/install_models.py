"""``manage.py install_models``: fetch and convert the pretrained musicnn weights.

A thin wrapper over :func:`workers.tagging.install.install_models`; see there
for what is written where.
"""
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from workers.tagging.install import InstallError, install_models


class Command(BaseCommand):
    help = (
        "Download the musicnn 0.1.0 wheel (or use --from-wheel), convert its four TensorFlow "
        "checkpoints to PyTorch and install them with their labels and licence into "
        "EARMARK_MODELS_DIR. Does nothing if they are already installed, unless --force."
    )

    def add_arguments(self, parser):
        parser.add_argument("--from-wheel", metavar="PATH", type=Path,
                            help="use this local musicnn-0.1.0-py3-none-any.whl instead of downloading it")
        parser.add_argument("--force", action="store_true", help="convert and rewrite even if already installed")
        parser.add_argument("--models-dir", metavar="DIR", type=Path,
                            help="install here instead of settings.EARMARK_MODELS_DIR")

    def handle(self, *args, **options):
        try:
            result = install_models(
                models_dir=options["models_dir"], wheel=options["from_wheel"], force=options["force"],
                log=lambda message: self.stdout.write(message),
            )
        except InstallError as exc:
            raise CommandError(str(exc)) from exc
        if result.status == "already installed":
            self.stdout.write(f"musicnn models already installed in {result.models_dir} (use --force to reinstall).")
            return
        versions = ", ".join(model["version"] for model in result.manifest["models"].values())
        self.stdout.write(self.style.SUCCESS(f"Installed musicnn models in {result.models_dir}: {versions}."))
