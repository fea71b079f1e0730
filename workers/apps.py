import os

from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"
    verbose_name = "Earmark"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        """Register the concerns' maintenance services with the queue core, which never imports them.

        Every process (workers and web) runs maintenance through the same
        ``workers.jobs.maintenance.SERVICES``; importing these modules fills it.
        Both are torch-free. A worker's heartbeat process only writes rows, and
        skips them (they bring numpy and mutagen: 25 MB in each such process).
        """
        if os.environ.get("EARMARK_HEARTBEAT_PROCESS"):
            return
        from workers.calibration import auto  # noqa: F401
        from workers.library import scan  # noqa: F401
