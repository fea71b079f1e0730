"""``python -m bench.stand_in_tagger run_tagger ...``: a tagger whose networks cost nothing.

For ``bench.tagger``'s pipeline rows only. A GPU scores a batch's patches in a
few milliseconds, so a GPU tagger's speed is that of everything around the
networks: decoding, patch cutting, tag writes, the database. This runs the
real ``run_tagger`` (the same runner, batches, decode processes and safe
writes) with ``Analyzer.score_patches`` replaced by random probabilities of
the right shape, so that a machine without a GPU can measure what the pipeline
feeds. The tags it writes are nonsense: use it on benchmark copies only.
"""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import torch
    from django.core.management import execute_from_command_line

    from workers.tagging import pipeline

    def stand_in(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.rand(patches.shape[0], len(self.labels))

    pipeline.Analyzer.score_patches = stand_in
    execute_from_command_line(["manage.py", *sys.argv[1:]])
