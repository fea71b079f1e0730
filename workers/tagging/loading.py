"""Loading the installed musicnn weights: paths, version tags, ready networks.

Kept apart from :mod:`workers.tagging.musicnn` (the reference networks) and
:mod:`workers.tagging.fast` (their fast forms, built from the reference ones) so
imports run one way: loading -> fast -> musicnn. :func:`load` returns the fast
form; ``load(..., reference=True)`` the literal one.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workers.tagging.fast import make_fast
from workers.tagging.musicnn import MODEL_NAMES, N_FRAMES, N_MELS, N_TAGS, build_reference



def weights_path(name: str, models_dir: str | Path | None = None) -> Path:
    """Where ``install_models`` puts the weights of checkpoint ``name``."""
    from workers.tagging.labels import default_models_dir

    if name not in MODEL_NAMES:
        raise ValueError(f"unknown musicnn model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    return Path(models_dir or default_models_dir()) / f"{name}.safetensors"


def version_string(name: str, weights_sha256: str) -> str:
    """``MTT_musicnn@1a2b3c4d``: names the exact weights, stable across re-installs
    (the converted files are byte-for-byte deterministic)."""
    return f"{name}@{weights_sha256[:8]}"


def model_version(name: str, models_dir: str | Path | None = None) -> str:
    """Version tag of the installed weights of ``name``, from the install manifest
    (falling back to hashing the file if the manifest lacks it)."""
    path = weights_path(name, models_dir)
    manifest = path.parent / "manifest.json"
    if manifest.exists():
        import json

        entry = json.loads(manifest.read_text(encoding="utf-8")).get("models", {}).get(name)
        if entry and entry.get("version"):
            return entry["version"]
    return version_string(name, hashlib.sha256(path.read_bytes()).hexdigest())


def load(name: str, device: str | torch.device = "cpu", models_dir: str | Path | None = None,
         reference: bool = False) -> nn.Module:
    """Load installed network ``name`` in eval mode on ``device``.

    The result maps (batch, 187, 96) float32 log-mel patches to (batch, 50)
    sigmoid probabilities. It is the fast inference form unless ``reference``
    is set; run it under ``torch.inference_mode()``.
    """
    from safetensors.torch import load_file

    path = weights_path(name, models_dir)
    if not path.exists():
        raise FileNotFoundError(f"musicnn weights {path} are missing: run `manage.py install_models` first")
    ref = build_reference(name)
    ref.load_state_dict(load_file(str(path)), strict=True)
    ref.eval()
    model = ref if reference else make_fast(ref)
    return model.to(device).eval()


class MusicnnPair:
    """MTT_musicnn and MSD_musicnn run on the same patches: (n, 100) scores.

    Columns are MTT's 50 probabilities then MSD's 50, named by :attr:`labels`
    (``mtt:<tag>``, ``msd:<tag>``). ``batch_size`` defaults to 1 on the CPU, where
    one patch per forward pass measured fastest, and 256 elsewhere (a GPU wants
    big batches).
    """

    MODELS = ("MTT_musicnn", "MSD_musicnn")

    def __init__(self, device: str | torch.device = "cpu", models_dir: str | Path | None = None,
                 batch_size: int | None = None):
        from workers.tagging.labels import combined_labels

        self.device = torch.device(device)
        self.networks = [load(name, self.device, models_dir) for name in self.MODELS]
        self.labels = combined_labels(models_dir)
        self.version = "+".join(model_version(name, models_dir) for name in self.MODELS)
        self.batch_size = batch_size or (1 if self.device.type == "cpu" else 256)

    def scores(self, patches) -> np.ndarray:
        """(n, 187, 96) patches (numpy or torch, any device) -> (n, 100) float32 numpy."""
        x = torch.as_tensor(patches, dtype=torch.float32).to(self.device)
        if x.dim() != 3 or tuple(x.shape[1:]) != (N_FRAMES, N_MELS):
            raise ValueError(f"expected (n, {N_FRAMES}, {N_MELS}) patches, got {tuple(x.shape)}")
        with torch.inference_mode():
            out = torch.empty((x.shape[0], len(self.labels)), dtype=torch.float32, device=self.device)
            for start in range(0, x.shape[0], self.batch_size):
                batch = x[start:start + self.batch_size]
                for i, net in enumerate(self.networks):
                    out[start:start + batch.shape[0], i * N_TAGS:(i + 1) * N_TAGS] = net(batch)
        return out.cpu().numpy()

    __call__ = scores
