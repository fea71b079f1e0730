"""Tags inside files: Earmark's ``earmark`` namespace per tag family (``namespace``) and the verified
atomic safe write (``safewrite``, with ``verify``, ``tempfiles`` and ``errors``). May import only
``workers.audio`` and ``workers.jobs.processes`` (process liveness, for temp-file names).
"""
