"""Libraries and their files: adding libraries, path encoding and root containment, scans (``scan``,
``folders``, ``scan_worker``), file facts and the user's tags (``fileinfo``), checks before a file is used,
and the library watcher (``watch``, over ``inotify`` and ``polling``).
May import ``workers.jobs``, ``workers.audio``, ``workers.tagfiles`` (its temp-file names), the models,
and tagging's torch-free model manifest.
"""
