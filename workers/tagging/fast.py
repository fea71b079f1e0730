"""Fast inference forms of the musicnn networks, for single-thread CPU (and GPU) tagging.

The reference classes in :mod:`workers.tagging.musicnn` follow the TensorFlow
graph line by line and are the readable specification; run as written they
spend most of their time on ReLU and batch-norm over maps that are only needed
pooled, and on layouts the hardware dislikes. :class:`FastMusicnn` and
:class:`FastVgg` are built from a loaded reference network and rearrange the
same function (pool before ReLU and batch-norm, fold batch-norms into dense
layers, oneDNN/GEMM convolutions). They must give the reference outputs, up to
float rounding: tests/tagging/test_musicnn.py checks both forms against the
TensorFlow parity fixtures.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from workers.tagging.musicnn import ConvBlock, FrozenBatchNorm, MusicnnNet, VggNet, exact_float32, tf_same_padding



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
    bf16 = False  # the timbral convs as a bfloat16 GEMM on the CPU (``use_bf16``): fast analysis only

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
        if self.bf16 and x.device.type == "cpu" and self.pool_kernel is None and self.weight.shape[3] > 1:
            return self._forward_gemm(x, torch.bfloat16)
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

    def _forward_gemm(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Convolution as ``windows @ weights``, then max over frequency.

        Windows come from strided views (``Tensor.unfold``) gathered by one
        reshape per chunk; ``F.unfold`` launches a kernel per patch on CUDA.
        The bias is added after the max, where it is one value per channel.
        Expects one input channel, as the musicnn front end has. ``dtype``
        bfloat16 runs the product in bfloat16 with float32 sums (``use_bf16``).
        """
        out_ch, _, kh, kw = self.weight.shape
        weight = self.weight.reshape(out_ch, kh * kw).t()
        x = F.pad(x[:, 0], (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        if dtype is not None:
            weight, x = weight.to(dtype), x.to(dtype)
        pooled = []
        for chunk in x.split(self.GEMM_CHUNK):
            windows = chunk.unfold(1, kh, 1).unfold(2, kw, 1)  # (b, out_h, out_w, kh, kw), a view
            b, out_h, out_w = windows.shape[:3]
            y = torch.matmul(windows.reshape(b, out_h * out_w, kh * kw), weight)  # (b, out_h*out_w, out_ch)
            pooled.append(y.view(b, out_h, out_w, out_ch).amax(dim=2))
        return (torch.cat(pooled).float() + self.bias).transpose(1, 2).unsqueeze(3)

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


@functools.lru_cache(maxsize=1)
def bf16_pays() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): ``$EARMARK_BF16`` (0/1) decides first.

    There the timbral convs as a bfloat16 GEMM took 21 ms a patch against
    30 ms for the float32 oneDNN conv (one thread); without it bfloat16 is
    emulated and slower.
    """
    import os

    forced = os.environ.get("EARMARK_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(model: nn.Module, on: bool) -> None:
    """Run a :class:`FastMusicnn`'s timbral convs (most of its time) in bfloat16, or back in float32.

    The sums stay float32; a patch's outputs move by up to ~1e-2, the mean
    over a file's patches by ~1e-4 (measured on 38 real tracks, whose tags did
    not change). Fast analysis uses it where ``bf16_pays``; full analysis never.
    """
    if isinstance(model, FastMusicnn):
        for conv in model.timbral:
            conv.bf16 = on


@contextlib.contextmanager
def bf16_timbral(models, on: bool = True):
    """``use_bf16`` on each of ``models`` for the block (when ``on``), float32 again after it."""
    for model in models:
        use_bf16(model, on)
    try:
        yield
    finally:
        for model in models:
            use_bf16(model, False)


def make_fast(ref: nn.Module) -> nn.Module:
    """The fast inference form of a loaded reference network."""
    if isinstance(ref, MusicnnNet):
        return FastMusicnn(ref).eval()
    if isinstance(ref, VggNet):
        return FastVgg(ref).eval()
    raise TypeError(f"no fast form for {type(ref).__name__}")
