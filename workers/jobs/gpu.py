"""Which GPU a tagger process uses, decided before torch is imported.

supervisord starts ``EARMARK_TAGGERS`` tagger processes numbered 0..N-1. With
``EARMARK_GPUS`` GPUs, process ``n`` gets GPU ``n % EARMARK_GPUS``
(round-robin), so any number of processes spreads evenly and GPU ``g`` serves
processes g, g+G, g+2G, ... Each process sees only its GPU, as ``cuda:0``,
through ``CUDA_VISIBLE_DEVICES``. ``EARMARK_GPUS=0`` (the default when no
GPU is configured) leaves the environment alone: CPU, or whatever is visible.
"""
from __future__ import annotations

import os


def gpu_for_process(process_number: int, gpus: int) -> int | None:
    """The GPU index for a tagger process, or None when there are no GPUs."""
    if gpus <= 0:
        return None
    if process_number < 0:
        raise ValueError("process numbers start at 0")
    return process_number % gpus


def pin_from_environment(environ=os.environ) -> str | None:
    """Set ``CUDA_VISIBLE_DEVICES`` for this process from its number; returns the value set.

    Must run before torch initialises CUDA (``run_tagger`` calls it first),
    because CUDA reads the variable once. An explicit ``CUDA_VISIBLE_DEVICES``
    set by the operator wins.
    """
    if "CUDA_VISIBLE_DEVICES" in environ:
        return environ["CUDA_VISIBLE_DEVICES"]
    gpus = int(environ.get("EARMARK_GPUS", "0") or 0)
    number = environ.get("EARMARK_WORKER_NUMBER", "")
    if not gpus or not number.isdigit():
        return None
    device = str(gpu_for_process(int(number), gpus))
    environ["CUDA_VISIBLE_DEVICES"] = device
    return device


#: Files per batch on a GPU: their patches share forward passes (``--batch``).
FILES_PER_BATCH = 32


def decode_workers(environ=os.environ) -> int:
    """Decode processes per batching tagger: this host's cores shared among its taggers, less their own.

    ``EARMARK_DECODE_WORKERS`` overrides; ``EARMARK_TAGGERS`` (set by
    ``deploy/env.sh``) is how many taggers share the host.
    """
    taggers = max(1, int(environ.get("EARMARK_TAGGERS") or 1))
    return int(environ.get("EARMARK_DECODE_WORKERS") or max(1, (os.cpu_count() or 2) // taggers - 1))
