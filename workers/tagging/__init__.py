"""Listening: the musicnn networks in PyTorch, the log-mel front end and analysis pipeline, labels and
categories, tag sets, the calibration in force, and the tag worker. May import ``workers.jobs``,
``workers.audio``, ``workers.library``, ``workers.tagfiles`` and the models. Only the network modules
(musicnn, fast, loading, frontend, pipeline, install, tag_worker's setup) import torch; labels, categories, tagset,
manifest, calibrated, scores and apply are torch-free and may be used by any layer above the queue core.
"""
