"""Features measured from the decoded signal: ReplayGain 2.0 loudness and true peak, tempo, key.

``extract.analyze(native, rate)`` (or ``extract.FeatureAnalyzer`` fed chunk by chunk) gives a
``Features`` record; ``loudness``, ``tempo`` and ``key`` are usable on their own, ``synth``
makes the clips with known answers that the tests and ``bench.features`` measure against.
Imports nothing of the project and neither torch nor Django: only numpy and scipy (and numba
for ``kernels``, imported only when something is measured), so any layer may use it (it sits
beside ``workers.audio``).
"""
from .extract import FEATURES_VERSION, FeatureAnalyzer, Features, album, analyze

__all__ = ["FEATURES_VERSION", "FeatureAnalyzer", "Features", "album", "analyze"]
