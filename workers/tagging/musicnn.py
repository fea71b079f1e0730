"""The pretrained musicnn tagging networks, ported from TensorFlow to PyTorch.

Port of ``musicnn/models.py`` from the ``musicnn`` 0.1.0 package (Pons & Serra,
"musicnn: pre-trained convolutional neural networks for music audio tagging",
2019), which carries this notice:

    Copyright (c) Music Technology Group, Universitat Pompeu Fabra 2019.
    Code developed by Jordi Pons (www.jordipons.me).
    Permission to use, copy, modify, and/or distribute this software for any
    purpose with or without fee is hereby granted, provided that the above
    copyright notice and this permission notice appear in all copies.
    (ISC licence; the full text is installed next to the weights as LICENSE.)

Two families, four checkpoints: ``MTT_musicnn``/``MSD_musicnn`` (musically
motivated front-end, dense mid-end, global-pooling back-end) and
``MTT_vgg``/``MSD_vgg`` (five 3x3 conv blocks). All map ``(batch, 187, 96)``
log-mel patches (3 s, 96 mel bands) to ``(batch, 50)`` sigmoid probabilities.

Each family exists twice here, on purpose:

* :class:`MusicnnNet` / :class:`VggNet` follow the TensorFlow graph line by line
  (conv -> ReLU -> batch-norm -> pool, TF "same" padding, interleaved pooling,
  channels-last flattening). Their state dicts are what ``install_models``
  writes to ``<name>.safetensors``; they are the readable specification.
* :class:`~workers.tagging.fast.FastMusicnn` / :class:`~workers.tagging.fast.FastVgg`
  are built from those and compute the same function with fewer operations, for
  single-thread CPU inference of one patch at a time (see their docstrings for
  each rewrite and why it is exact).

:func:`workers.tagging.loading.load` returns the fast form (from
:mod:`workers.tagging.fast`); ``load(..., reference=True)`` the literal one.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.tagging.frontend import float32_exact

MUSICNN_NAMES = ("MTT_musicnn", "MSD_musicnn")
VGG_NAMES = ("MTT_vgg", "MSD_vgg")
MODEL_NAMES = MUSICNN_NAMES + VGG_NAMES
N_FRAMES = 187  # 3 s of 16 kHz audio at hop 256, as the models were trained
N_MELS = 96
N_TAGS = 50
BN_EPS = 1e-3  # tf.compat.v1.layers.batch_normalization default, not torch's 1e-5


def tf_same_padding(kernel: int) -> tuple[int, int]:
    """(before, after) padding TensorFlow's "same" uses at stride 1.

    TF puts the odd pixel at the end, so even kernels are padded asymmetrically
    (128 -> 63 before, 64 after); torch's ``padding="same"`` would differ.
    """
    total = kernel - 1
    return total // 2, total - total // 2


def exact_float32(forward):
    """Decorate a ``forward(self, x)`` to run without TF32 on CUDA (see float32_exact)."""

    @functools.wraps(forward)
    def wrapper(self, x: torch.Tensor) -> torch.Tensor:
        with float32_exact(x.device):
            return forward(self, x)

    return wrapper


class FrozenBatchNorm(nn.Module):
    """Inference-only batch norm over dim 1 with TF's epsilon.

    Only the four tensors a TF checkpoint holds are buffers, so the state dict
    maps one to one onto ``gamma/beta/moving_mean/moving_variance`` and there is
    no training mode that could silently use batch statistics.
    """

    def __init__(self, channels: int):
        super().__init__()
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), fill))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel affine map ``y = scale * x + shift`` this layer computes."""
        scale = self.weight / torch.sqrt(self.running_var + BN_EPS)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(view) + shift.view(view)


class ConvBlock(nn.Module):
    """conv -> ReLU -> batch-norm, the unit musicnn repeats everywhere."""

    def __init__(self, conv: nn.Module, channels: int):
        super().__init__()
        self.conv = conv
        self.bn = FrozenBatchNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)))


# --------------------------------------------------------------------------- reference: musicnn


class MusicnnNet(nn.Module):
    """musicnn, literally as ``build_musicnn`` in the original models.py.

    Front-end: two timbral convs (7 x 38 and 7 x 67 mel bands, 204 filters) and
    three temporal convs (128/64/32 frames x 1 band, 51 filters), each max-pooled
    over all frequencies. Mid-end: three 7-frame 1-D convs (64 filters) with
    residual connections. Back-end: max and mean over time, dense 200, dense 50.
    """

    def __init__(self, midend_filters: int = 64, backend_units: int = 200, n_tags: int = N_TAGS):
        super().__init__()
        timbral, temporal = int(1.6 * 128), int(1.6 * 32)  # 204, 51
        self.input_bn = FrozenBatchNorm(1)
        self.timbral74 = ConvBlock(nn.Conv2d(1, timbral, (7, int(0.4 * N_MELS))), timbral)
        self.timbral77 = ConvBlock(nn.Conv2d(1, timbral, (7, int(0.7 * N_MELS))), timbral)
        self.temporal = nn.ModuleList(ConvBlock(nn.Conv2d(1, temporal, (k, 1)), temporal) for k in (128, 64, 32))
        frontend_channels = 2 * timbral + 3 * temporal  # 561
        self.midend = nn.ModuleList(
            ConvBlock(nn.Conv1d(c, midend_filters, 7, padding=3), midend_filters)
            for c in (frontend_channels, midend_filters, midend_filters)
        )
        pooled = 2 * (frontend_channels + 3 * midend_filters)  # 1506
        self.pool_bn = FrozenBatchNorm(pooled)
        self.dense = nn.Linear(pooled, backend_units)
        self.dense_bn = FrozenBatchNorm(backend_units)
        self.output = nn.Linear(backend_units, n_tags)

    def frontend(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 187, 96) log-mel -> (B, 561, 187) pooled front-end features."""
        x = self.input_bn(x.unsqueeze(1))  # (B, 1, T, F)
        padded = F.pad(x, (0, 0, 3, 3))  # time only: the freq axis is pooled away anyway
        features = [self.timbral74(padded).amax(dim=3), self.timbral77(padded).amax(dim=3)]
        for block in self.temporal:
            before, after = tf_same_padding(block.conv.kernel_size[0])
            features.append(block(F.pad(x, (0, 0, before, after))).amax(dim=3))
        return torch.cat(features, dim=1)

    @exact_float32
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        front = self.frontend(x)
        conv1 = self.midend[0](front)
        res2 = self.midend[1](conv1) + conv1
        res3 = self.midend[2](res2) + res2
        features = torch.cat([front, conv1, res2, res3], dim=1)  # (B, 753, T)
        # TF concatenates [max, mean] on a trailing axis and flattens: max_0, mean_0, max_1, ...
        pooled = torch.stack([features.amax(dim=2), features.mean(dim=2)], dim=2).flatten(1)
        hidden = self.dense_bn(torch.relu(self.dense(self.pool_bn(pooled))))
        return torch.sigmoid(self.output(hidden))


# --------------------------------------------------------------------------- reference: vgg


class VggNet(nn.Module):
    """The musicnn "vgg" baseline, literally as ``vgg`` in the original models.py.

    Five blocks of 3x3 "same" conv (128 filters) -> ReLU -> batch-norm -> max-pool
    (pools 4x1/2, 2x2/2, 2x2/2, 2x2/2, 4x4/4, all "valid"), then one dense layer
    on the (2, 1, 128) map flattened channels-last, as TF's NHWC flatten does.
    """

    POOLS = (((4, 1), (2, 2)), ((2, 2), (2, 2)), ((2, 2), (2, 2)), ((2, 2), (2, 2)), ((4, 4), (4, 4)))

    def __init__(self, filters: int = 128, n_tags: int = N_TAGS):
        super().__init__()
        self.input_bn = FrozenBatchNorm(1)
        self.blocks = nn.ModuleList(
            ConvBlock(nn.Conv2d(1 if i == 0 else filters, filters, 3, padding=1), filters) for i in range(5)
        )
        self.output = nn.Linear(2 * 1 * filters, n_tags)

    @exact_float32
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_bn(x.unsqueeze(1))
        for block, (kernel, stride) in zip(self.blocks, self.POOLS):
            x = F.max_pool2d(block(x), kernel, stride)
        return torch.sigmoid(self.output(x.permute(0, 2, 3, 1).flatten(1)))


def build_reference(name: str) -> nn.Module:
    """An untrained reference network of the right shape for checkpoint ``name``."""
    if name in MUSICNN_NAMES:
        return MusicnnNet()
    if name in VGG_NAMES:
        return VggNet()
    raise ValueError(f"unknown musicnn model {name!r}; expected one of {', '.join(MODEL_NAMES)}")


# --------------------------------------------------------------------------- TF variable mapping


def _bn_from_tf(prefix: str, tf_name: str) -> dict[str, str]:
    """State-dict keys of a FrozenBatchNorm -> TF variable names of a batch_normalization layer."""
    return {
        f"{prefix}.weight": f"{tf_name}/gamma",
        f"{prefix}.bias": f"{tf_name}/beta",
        f"{prefix}.running_mean": f"{tf_name}/moving_mean",
        f"{prefix}.running_var": f"{tf_name}/moving_variance",
    }


def _layer_from_tf(prefix: str, tf_name: str) -> dict[str, str]:
    """State-dict keys of a conv/dense layer -> TF kernel and bias names."""
    return {f"{prefix}.weight": f"{tf_name}/kernel", f"{prefix}.bias": f"{tf_name}/bias"}


def _bn_name(i: int) -> str:
    """TF names unnamed layers by creation order: batch_normalization, _1, _2, ..."""
    return "batch_normalization" if i == 0 else f"batch_normalization_{i}"


def musicnn_variable_map() -> dict[str, str]:
    """state-dict key -> TF variable, following the creation order in build_musicnn."""
    names = {**_bn_from_tf("input_bn", _bn_name(0))}
    blocks = ["timbral74", "timbral77", "temporal.0", "temporal.1", "temporal.2", "midend.0", "midend.1", "midend.2"]
    for i, block in enumerate(blocks):
        names.update(_layer_from_tf(f"{block}.conv", "conv2d" if i == 0 else f"conv2d_{i}"))
        names.update(_bn_from_tf(f"{block}.bn", _bn_name(i + 1)))
    names.update(_bn_from_tf("pool_bn", _bn_name(9)))
    names.update(_layer_from_tf("dense", "dense"))
    names.update(_bn_from_tf("dense_bn", _bn_name(10)))
    names.update(_layer_from_tf("output", "dense_1"))
    return names


def vgg_variable_map() -> dict[str, str]:
    """state-dict key -> TF variable for the vgg graph (convs are named 1CNN..5CNN)."""
    names = {**_bn_from_tf("input_bn", _bn_name(0))}
    for i in range(5):
        names.update(_layer_from_tf(f"blocks.{i}.conv", f"{i + 1}CNN"))
        names.update(_bn_from_tf(f"blocks.{i}.bn", _bn_name(i + 1)))
    names.update(_layer_from_tf("output", "dense"))
    return names


def _to_torch_layout(key: str, value: np.ndarray, target_dim: int) -> np.ndarray:
    """Reorder a TF weight into torch's layout.

    TF conv kernels are (kh, kw, in, out), torch wants (out, in, kh, kw); the
    mid-end "2-D" convs span the whole feature axis, so they become 1-D convs
    over time with the features as input channels: (7, C, 1, out) -> (out, C, 7).
    Dense kernels are (in, out), torch Linear wants (out, in).
    """
    if not key.endswith(".weight") or value.ndim == 1:
        return value
    if value.ndim == 2:
        return value.T
    if target_dim == 3:
        return value[:, :, 0, :].transpose(2, 1, 0)
    return value.transpose(3, 2, 0, 1)


def convert_tf_variables(name: str, variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Turn a checkpoint's TF variables into the reference module's state dict.

    Optimizer slots (``*/Adam*``, ``beta*_power``) are ignored. Every key of the
    module must be filled with a tensor of exactly the expected shape, so a
    wrong mapping fails here rather than producing a quietly broken tagger.
    """
    model = build_reference(name)
    variable_map = musicnn_variable_map() if name in MUSICNN_NAMES else vgg_variable_map()
    expected = model.state_dict()
    if set(variable_map) != set(expected):
        raise AssertionError(f"variable map and {type(model).__name__} disagree on keys")
    state = {}
    for key, tf_name in variable_map.items():
        if tf_name not in variables:
            raise KeyError(f"checkpoint {name} lacks variable {tf_name!r}")
        value = _to_torch_layout(key, variables[tf_name], expected[key].dim())
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{name}: {tf_name} has shape {value.shape}, {key} needs {tuple(expected[key].shape)}")
        state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return state
