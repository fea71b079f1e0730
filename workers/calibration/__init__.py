"""Library calibration: computing and activating a calibration from stored scores (``compute``), the
automatic trigger (``auto``), JSON export/import (``transfer``) and the recalibrator worker.
May import ``workers.jobs``, ``workers.library``, ``workers.tagfiles``, tagging's torch-free parts and
the models; never torch.
"""
