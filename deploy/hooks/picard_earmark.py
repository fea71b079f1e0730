"""Earmark for MusicBrainz Picard 2.x: queue every file Picard saves for Earmark's tagger.

Install: Picard → Options → Plugins → Install plugin… → this file, then enable it.
Set EARMARK_ENQUEUE to the path of Earmark's ``deploy/earmark-enqueue`` in the
environment Picard starts in (default ``/opt/earmark/deploy/earmark-enqueue``).
The files of one save (an album) go in one call, a second after the last one
is saved; the command runs in the background, so Picard never waits for it.
Picard and Earmark must see the files at the same paths (the same host, or
the same mount point).
"""
import os
import subprocess
import threading

from picard import log
from picard.file import register_file_post_save_processor

PLUGIN_NAME = "Earmark"
PLUGIN_AUTHOR = "Earmark"
PLUGIN_DESCRIPTION = "Queue saved files for Earmark's tagger (manage.py enqueue)."
PLUGIN_VERSION = "1.0"
PLUGIN_API_VERSIONS = ["2.0", "2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "2.7", "2.8", "2.9", "2.10", "2.11",
                       "2.12", "2.13"]
PLUGIN_LICENSE = "MIT"

SETTLE_SECONDS = 1.0
_pending = set()
_lock = threading.Lock()
_timer = None


def _send():
    global _timer
    with _lock:
        files, _timer = sorted(_pending), None
        _pending.clear()
    command = os.environ.get("EARMARK_ENQUEUE", "/opt/earmark/deploy/earmark-enqueue")
    try:
        subprocess.Popen([command, *files], stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("Earmark: queued %d file(s)", len(files))
    except OSError as exc:
        log.error("Earmark: cannot run %s: %s", command, exc)


def on_file_saved(file):
    global _timer
    with _lock:
        _pending.add(file.filename)
        if _timer is not None:
            _timer.cancel()
        _timer = threading.Timer(SETTLE_SECONDS, _send)
        _timer.daemon = True
        _timer.start()


register_file_post_save_processor(on_file_saved)
