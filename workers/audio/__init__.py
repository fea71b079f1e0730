"""Audio files as signals: the supported formats, streaming decode to the taggers' rate, encoding real
files with user tags, synthetic music-like clips and the demo library. Imports nothing of the project
(only PyAV, numpy and mutagen), so every layer may use it.
"""
