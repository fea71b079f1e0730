"""The loop over every decoded sample that numpy cannot make cheap, compiled by numba: K-weighting.

Loudness filters every sample of every track, and in scipy that was most of what the
features cost the tagger: ``sosfilt`` runs one scalar chain per channel and section
(13.6 ns a stereo frame at 44.1 kHz), then numpy needs passes for the square, the channel
sum and the peak. ``kweighted_energy`` is one pass with the channels' chains side by side
(6 ns a stereo frame, all of it), the same float64 arithmetic as scipy's direct form II
transposed (tests/features/test_loudness.py holds it to scipy's result).

Importing numba costs ~50 MB and the first call a compile (numba caches it on disk), so
only the measuring processes import this module, when a ``LoudnessMeter`` is built.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath={"contract"}, nogil=True)
def kweighted_energy(x, sos, state, weights, energy, peak):  # pragma: no cover - compiled
    """Per frame: ``energy[i]`` the channel-weighted square of the K-weighted signal, ``peak[i]`` max |x|.

    ``x`` (frames, channels) float; ``sos`` the two biquads (2, 6) of ``loudness.k_weighting_sos``;
    ``state`` (2, 2, channels), the direct-form II transposed delays, updated in place (the
    layout of scipy's ``sosfilt`` ``zi``), so consecutive chunks filter as one signal.
    """
    frames, channels = x.shape
    b00, b01, b02, a01, a02 = sos[0, 0], sos[0, 1], sos[0, 2], sos[0, 4], sos[0, 5]
    b10, b11, b12, a11, a12 = sos[1, 0], sos[1, 1], sos[1, 2], sos[1, 4], sos[1, 5]
    for i in range(frames):
        total = 0.0
        top = 0.0
        for c in range(channels):
            v = np.float64(x[i, c])
            y = b00 * v + state[0, 0, c]
            state[0, 0, c] = b01 * v - a01 * y + state[0, 1, c]
            state[0, 1, c] = b02 * v - a02 * y
            z = b10 * y + state[1, 0, c]
            state[1, 0, c] = b11 * y - a11 * z + state[1, 1, c]
            state[1, 1, c] = b12 * y - a12 * z
            total += weights[c] * z * z
            top = max(top, abs(v))
        energy[i] = total
        peak[i] = top
