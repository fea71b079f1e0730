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
* :class:`FastMusicnn` / :class:`FastVgg` are built from those and compute the
  same function with fewer operations, for single-thread CPU inference of one
  patch at a time (see their docstrings for each rewrite and why it is exact).

:func:`load` returns the fast form; ``load(..., reference=True)`` the literal one.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

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


# --------------------------------------------------------------------------- fast inference forms


def _pool_sign(bn: FrozenBatchNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sign, scale, shift) for pooling before a ReLU -> batch-norm pair.

    ``max(bn(relu(z)))`` equals ``bn(relu(max(z)))`` only where the batch-norm
    scale is positive; where it is negative the max of the output comes from the
    min of ``z``. Negating those channels' conv makes "min" a max again; ``sign``
    undoes the negation after pooling: ``bn(relu(sign * max(sign * z)))``.
    """
    scale, shift = bn.scale_shift()
    sign = torch.where(scale < 0, -1.0, 1.0)
    return sign, scale, shift


def _signed_bn_relu(pooled: torch.Tensor, sign: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """ReLU then batch-norm on a map pooled from sign-flipped convs (see _pool_sign)."""
    return torch.addcmul(shift, torch.relu(pooled * sign), scale)


def conv1d_by_matmul(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """``F.conv1d`` written as one matrix product per kernel tap, for CUDA.

    ``taps`` is the conv weight as (kernel, out, in). For the mid-end shapes
    (561 or 64 channels in, 7 taps, float32 without TF32) cuDNN picks FFT
    algorithms that took ~230 us per patch on an H200, half the whole network;
    seven plain GEMMs over shifted views do the same sum far faster, with no
    im2col buffer.
    """
    padded = F.pad(x, (padding, padding))
    length = padded.shape[2] - taps.shape[0] + 1
    y = torch.matmul(taps[0], padded[:, :, :length])
    for k in range(1, taps.shape[0]):
        y += torch.matmul(taps[k], padded[:, :, k:k + length])
    return y + bias.unsqueeze(1)


def _channel_view(t: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Shape a per-channel vector to broadcast over (B, C, *spatial)."""
    return t.reshape((-1,) + (1,) * spatial_dims).contiguous()


class PooledConv(nn.Module):
    """A 2-D convolution immediately max-pooled, in oneDNN's own layout on the CPU.

    The front-end convolutions produce large maps (204 x 187 x 59 floats per
    patch) that are only needed pooled. Run through ``torch.mkldnn_convolution``
    with pre-packed weights, the map stays in oneDNN's blocked layout into the
    pooling op and only the small pooled result is converted back to a normal
    tensor; the plain ``F.conv2d`` path converts the whole map and repacks the
    weights on every call (about a quarter of the conv's time). On other devices,
    or if oneDNN is unavailable or refuses, the plain path is used; both compute
    the same numbers. ``pool_kernel=None`` pools over the whole last (frequency)
    axis, which the plain path does with ``amax``, cheaper than a wide max-pool.

    On CUDA the wide timbral kernels (7 x 38, 7 x 67) run as an explicit
    unfold + matrix product in chunks (``use_gemm``): cuDNN's float32 choices
    for one-input-channel convs with such kernels are FFT-based and slower.
    """

    GEMM_CHUNK = 64  # patches per unfold: bounds the im2col buffer to ~0.75 GB

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, padding: tuple[int, int],
                 pool_kernel: tuple[int, int] | None = None, pool_stride: tuple[int, int] | None = None):
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", bias.contiguous())
        self.padding = list(padding)
        self.pool_kernel = pool_kernel
        self.pool_stride = pool_stride
        self._packed = None  # (weight, bias) as oneDNN tensors, built on first CPU call
        self.use_mkldnn = torch.backends.mkldnn.is_available()
        self.use_gemm = None  # None: on CUDA for global pools over wide kernels

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reorder the weights once into oneDNN's preferred blocked format."""
        if self._packed is None:
            weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.to_mkldnn(), self.padding, [1, 1], [1, 1], 1
            )
            self._packed = (weight, self.bias.to_mkldnn())
        return self._packed

    def _forward_mkldnn(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._pack()
        y = torch.mkldnn_convolution(x.contiguous().to_mkldnn(), weight, bias, self.padding, [1, 1], [1, 1], 1)
        kernel = self.pool_kernel or (1, y.shape[3])
        return F.max_pool2d(y, kernel, self.pool_stride or kernel).to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_mkldnn and x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
            try:
                return self._forward_mkldnn(x)
            except RuntimeError:  # an unusual build or op set: fall back for good
                self.use_mkldnn, self._packed = False, None
        if self._wants_gemm(x):
            return self._forward_gemm(x)
        y = F.conv2d(x, self.weight, self.bias, padding=self.padding)
        if self.pool_kernel is None:
            return y.amax(dim=3, keepdim=True)
        return F.max_pool2d(y, self.pool_kernel, self.pool_stride)

    def _wants_gemm(self, x: torch.Tensor) -> bool:
        if self.pool_kernel is not None or self.weight.shape[1] != 1:
            return False  # the GEMM form is written for the one-channel, freq-pooled front end
        return x.is_cuda and self.weight.shape[3] > 1 if self.use_gemm is None else self.use_gemm

    def _forward_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution as ``windows @ weights``, then max over frequency.

        Windows come from strided views (``Tensor.unfold``) gathered by one
        reshape per chunk; ``F.unfold`` launches a kernel per patch on CUDA.
        The bias is added after the max, where it is one value per channel.
        Expects one input channel, as the musicnn front end has.
        """
        out_ch, _, kh, kw = self.weight.shape
        weight = self.weight.reshape(out_ch, kh * kw).t()
        x = F.pad(x[:, 0], (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        pooled = []
        for chunk in x.split(self.GEMM_CHUNK):
            windows = chunk.unfold(1, kh, 1).unfold(2, kw, 1)  # (b, out_h, out_w, kh, kw), a view
            b, out_h, out_w = windows.shape[:3]
            y = torch.matmul(windows.reshape(b, out_h * out_w, kh * kw), weight)  # (b, out_h*out_w, out_ch)
            pooled.append(y.view(b, out_h, out_w, out_ch).amax(dim=2))
        return (torch.cat(pooled) + self.bias).transpose(1, 2).unsqueeze(3)

    def _apply(self, fn, recurse=True):
        self._packed = None  # weights may have moved or changed dtype: repack lazily
        return super()._apply(fn, recurse)


class FastMusicnn(nn.Module):
    """:class:`MusicnnNet`'s function, rearranged for speed (exact up to float rounding).

    * Front-end: pool over frequency straight after each conv (with the sign
      trick of :func:`_pool_sign`), so ReLU and batch-norm touch 561 x 187 values
      instead of ~4.5 M, and the convs run through :class:`PooledConv`.
    * Back-end: max and mean are concatenated as two blocks rather than
      interleaved; the dense layer's input columns are permuted to match.
    * The batch-norms before each dense layer are folded into its weights
      (affine followed by linear is linear); the mid-end ones stay explicit
      because their outputs are also used for residuals and concatenation.
    * On CUDA the mid-end convs run as GEMMs (:func:`conv1d_by_matmul`) and the
      timbral convs as unfold + GEMM (:class:`PooledConv`), and TF32 is kept
      off (:func:`exact_float32`): together 4x the throughput of the plain
      cuDNN form on an H200, at full float32 accuracy.

    Measured on one CPU thread: ~30 ms per patch at batch 1 against ~50 ms for
    :class:`MusicnnNet`; batches of 10 cost more per patch (~45 ms), so feed the
    CPU one patch at a time.
    """

    def __init__(self, ref: MusicnnNet):
        super().__init__()
        ref = ref.float().eval()
        with torch.no_grad():
            self.register_buffer("input_affine", torch.stack(ref.input_bn.scale_shift()).flatten())
            self.timbral_pad = ref.timbral74.conv.kernel_size[0] // 2
            self.timbral = nn.ModuleList(self._pooled(block) for block in (ref.timbral74, ref.timbral77))
            self.temporal_pads = [tf_same_padding(block.conv.kernel_size[0]) for block in ref.temporal]
            self.temporal = nn.ModuleList(self._pooled(block) for block in ref.temporal)
            signs, scales, shifts = zip(*(_pool_sign(b.bn) for b in [ref.timbral74, ref.timbral77, *ref.temporal]))
            for name, parts in (("front_sign", signs), ("front_scale", scales), ("front_shift", shifts)):
                self.register_buffer(name, _channel_view(torch.cat(parts), 1))
            self._init_midend(ref)
            self._init_backend(ref)
        self.midend_matmul = None  # None: on CUDA (see conv1d_by_matmul); True/False forces it

    @staticmethod
    def _pooled(block: ConvBlock) -> PooledConv:
        """A PooledConv for a front-end block: sign-flipped conv, max over all frequencies."""
        sign, _, _ = _pool_sign(block.bn)
        weight = block.conv.weight * sign.view(-1, 1, 1, 1)
        return PooledConv(weight, block.conv.bias * sign, (0, 0))  # inputs come padded

    def _init_midend(self, ref: MusicnnNet) -> None:
        """Copy the three mid-end 1-D convs and their batch-norms as plain tensors."""
        for i, block in enumerate(ref.midend):
            scale, shift = block.bn.scale_shift()
            self.register_buffer(f"mid{i}_weight", block.conv.weight.clone())
            self.register_buffer(f"mid{i}_taps", block.conv.weight.permute(2, 0, 1).contiguous())
            self.register_buffer(f"mid{i}_bias", block.conv.bias.clone())
            self.register_buffer(f"mid{i}_scale", _channel_view(scale, 1))
            self.register_buffer(f"mid{i}_shift", _channel_view(shift, 1))

    def _init_backend(self, ref: MusicnnNet) -> None:
        """Fold the back-end batch-norms into the dense layers and de-interleave the pooling."""
        scale, shift = ref.pool_bn.scale_shift()
        weight = ref.dense.weight * scale
        bias = ref.dense.bias + ref.dense.weight @ shift
        self.register_buffer("dense_weight", torch.cat([weight[:, 0::2], weight[:, 1::2]], dim=1).contiguous())
        self.register_buffer("dense_bias", bias)
        scale, shift = ref.dense_bn.scale_shift()
        self.register_buffer("output_weight", (ref.output.weight * scale).contiguous())
        self.register_buffer("output_bias", ref.output.bias + ref.output.weight @ shift)

    def frontend(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 187, 96) log-mel -> (B, 561, 187) front-end features after ReLU and batch-norm."""
        x = (x * self.input_affine[0] + self.input_affine[1]).unsqueeze(1)
        padded = F.pad(x, (0, 0, self.timbral_pad, self.timbral_pad))
        pooled = [conv(padded) for conv in self.timbral]
        pooled += [conv(F.pad(x, (0, 0, *pad))) for conv, pad in zip(self.temporal, self.temporal_pads)]
        front = torch.cat(pooled, dim=1).squeeze(3)
        return _signed_bn_relu(front, self.front_sign, self.front_scale, self.front_shift)

    def _mid(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """One mid-end layer: 7-frame 1-D conv, ReLU, batch-norm (conv as GEMMs on CUDA)."""
        bias = getattr(self, f"mid{i}_bias")
        if x.is_cuda if self.midend_matmul is None else self.midend_matmul:
            y = conv1d_by_matmul(x, getattr(self, f"mid{i}_taps"), bias, padding=3)
        else:
            y = F.conv1d(x, getattr(self, f"mid{i}_weight"), bias, padding=3)
        return torch.addcmul(getattr(self, f"mid{i}_shift"), torch.relu_(y), getattr(self, f"mid{i}_scale"))

    @exact_float32
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        front = self.frontend(x)
        conv1 = self._mid(0, front)
        res2 = self._mid(1, conv1) + conv1
        res3 = self._mid(2, res2) + res2
        features = torch.cat([front, conv1, res2, res3], dim=1)
        pooled = torch.cat([features.amax(dim=2), features.mean(dim=2)], dim=1)
        hidden = torch.relu_(F.linear(pooled, self.dense_weight, self.dense_bias))
        return torch.sigmoid(F.linear(hidden, self.output_weight, self.output_bias))


class FastVgg(nn.Module):
    """:class:`VggNet`'s function with each max-pool moved before its ReLU and
    batch-norm (sign trick of :func:`_pool_sign`), so those run on maps 2-16x
    smaller, and the convs going through :class:`PooledConv`."""

    def __init__(self, ref: VggNet):
        super().__init__()
        ref = ref.float().eval()
        with torch.no_grad():
            self.register_buffer("input_affine", torch.stack(ref.input_bn.scale_shift()).flatten())
            self.convs = nn.ModuleList()
            for i, (block, (kernel, stride)) in enumerate(zip(ref.blocks, VggNet.POOLS)):
                sign, scale, shift = _pool_sign(block.bn)
                weight = block.conv.weight * sign.view(-1, 1, 1, 1)
                self.convs.append(PooledConv(weight, block.conv.bias * sign, (1, 1), kernel, stride))
                for name, value in (("sign", sign), ("scale", scale), ("shift", shift)):
                    self.register_buffer(f"bn{i}_{name}", _channel_view(value, 2))
            self.register_buffer("output_weight", ref.output.weight.clone())
            self.register_buffer("output_bias", ref.output.bias.clone())

    @exact_float32
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * self.input_affine[0] + self.input_affine[1]).unsqueeze(1)
        for i, conv in enumerate(self.convs):
            sign, scale, shift = (getattr(self, f"bn{i}_{n}") for n in ("sign", "scale", "shift"))
            x = _signed_bn_relu(conv(x), sign, scale, shift)
        return torch.sigmoid(F.linear(x.permute(0, 2, 3, 1).flatten(1), self.output_weight, self.output_bias))


def make_fast(ref: nn.Module) -> nn.Module:
    """The fast inference form of a loaded reference network."""
    if isinstance(ref, MusicnnNet):
        return FastMusicnn(ref).eval()
    if isinstance(ref, VggNet):
        return FastVgg(ref).eval()
    raise TypeError(f"no fast form for {type(ref).__name__}")


# --------------------------------------------------------------------------- loading


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
