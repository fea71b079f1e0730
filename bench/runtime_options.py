"""The candidate runtimes ``bench.runtimes`` times: each a ``fn((b, 187, 96) float32) -> (b, 100)`` over MTT+MSD."""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np

NAMES = ("MTT_musicnn", "MSD_musicnn")


def _pair(nets, cast=None):
    """Both networks on one batch, MTT's 50 columns then MSD's, as ``Analyzer.score_patches`` returns them."""
    import torch

    def fn(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch)
        with torch.inference_mode():
            return torch.cat([net(x if cast is None else cast(x)) for net in nets], dim=1).float().numpy()

    return fn


def _copy(net):
    """A deep copy of a fast network (its oneDNN-packed weights, which cannot be copied, are packed again lazily)."""
    from workers.tagging import fast

    for m in net.modules():
        if isinstance(m, fast.PooledConv):
            m._packed = None
    return copy.deepcopy(net)


def _plain(net):
    """A copy of a fast network with oneDNN's own-layout convs off (F.conv2d), as export and compile need."""
    from workers.tagging import fast

    net = _copy(net)
    for m in net.modules():
        if isinstance(m, fast.PooledConv):
            m.use_mkldnn = False
    return net


def _ort_pair(paths: list[Path]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in paths]

    def fn(batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return np.concatenate([s.run(None, {"patches": x})[0] for s in sessions], axis=1)

    return fn


def _export(net, path: Path) -> Path:
    import torch

    torch.onnx.export(_plain(net), (torch.zeros(1, 187, 96),), str(path), input_names=["patches"],
                      output_names=["probabilities"], dynamic_axes={"patches": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    return path


class Int8PooledConv:
    """A timbral ``fast.PooledConv`` as an int8 x int8 -> int32 GEMM (``torch._int_mm``, VNNI), max over frequency.

    Weights: symmetric int8 per output channel. Each patch: ``x ~ c + s * q``
    over its own range, so ``conv(x) = s * wscale * (q @ wq) + c * sum(w) + bias``
    (exact in the padding, which is quantized with the rest); ``s * wscale > 0``,
    so the max over frequency is taken on the int32 sums and only the pooled
    values become floats again.
    """

    def __init__(self, conv):
        import torch

        self.conv = conv
        weight = conv.weight.reshape(conv.weight.shape[0], -1).t()  # (kh*kw, out)
        self.scale = weight.abs().amax(dim=0).clamp_min(1e-12) / 127.0
        self.q = torch.round(weight / self.scale).to(torch.int8).contiguous()
        self.sum = weight.sum(dim=0)

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        conv = self.conv
        out_ch, _, kh, kw = conv.weight.shape
        x = F.pad(x[:, 0], (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]))
        lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
        centre, step = (hi + lo) / 2, ((hi - lo) / 254.0).clamp_min(1e-12)
        windows = torch.round((x - centre) / step).clamp_(-127, 127).to(torch.int8).unfold(1, kh, 1).unfold(2, kw, 1)
        b, out_h, out_w = windows.shape[:3]
        sums = torch._int_mm(windows.reshape(b * out_h * out_w, kh * kw), self.q)
        pooled = sums.view(b, out_h, out_w, out_ch).amax(dim=2).float() * (step * self.scale)
        return (pooled + centre * self.sum + conv.bias).transpose(1, 2).unsqueeze(3)


def _int8_timbral(net):
    """A copy of a FastMusicnn whose two timbral convs run as ``Int8PooledConv``."""
    net = _copy(net)
    int8 = [Int8PooledConv(conv) for conv in net.timbral]
    net.frontend = _frontend_with(net, int8)
    return net


def _frontend_with(net, timbral):
    """``FastMusicnn.frontend`` with other callables in place of its timbral convs."""
    import torch
    import torch.nn.functional as F

    from workers.tagging.fast import _signed_bn_relu

    def frontend(x):
        x = (x * net.input_affine[0] + net.input_affine[1]).unsqueeze(1)
        padded = F.pad(x, (0, 0, net.timbral_pad, net.timbral_pad))
        pooled = [conv(padded) for conv in timbral]
        pooled += [conv(F.pad(x, (0, 0, *pad))) for conv, pad in zip(net.temporal, net.temporal_pads)]
        return _signed_bn_relu(torch.cat(pooled, dim=1).squeeze(3), net.front_sign, net.front_scale, net.front_shift)

    return frontend


class _Calibration:
    """onnxruntime's CalibrationDataReader over real patches, one at a time."""

    def __init__(self, patches: np.ndarray):
        self.items = iter([{"patches": p[None]} for p in patches])

    def get_next(self):
        return next(self.items, None)


def build_all(models: Path, calibration: np.ndarray, only=None):
    """({name: fn}, labels, {name: why skipped}); ``torch`` (the current full path) always comes first."""
    import torch

    from workers.tagging import fast, labels, loading

    nets = [loading.load(n, models_dir=models) for n in NAMES]
    label_list = tuple(f"{labels.dataset_of(n)}:{t}" for n in NAMES for t in labels.labels_for(n, models))
    out, skipped = {"torch": _pair(nets)}, {}

    def add(name, make):
        if only and name not in only:
            return
        try:
            out[name] = make()
        except Exception as exc:  # noqa: BLE001 - an option that does not load is reported, not fatal
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"

    def bf16():
        bf = [_copy(n) for n in nets]
        for n in bf:
            fast.use_bf16(n, True)
        return _pair(bf)

    def int8():
        return _pair([_int8_timbral(n) for n in nets])

    def channels_last():
        plain = [_plain(n) for n in nets]
        for n in plain:
            for m in n.modules():
                if isinstance(m, fast.PooledConv):
                    m.weight = m.weight.contiguous(memory_format=torch.channels_last)
        return _pair(plain, cast=lambda x: x.contiguous())

    def compiled():
        plain = [torch.compile(_plain(n), dynamic=False) for n in nets]
        return _pair(plain)

    def reference(quantized: bool):
        refs = [loading.load(n, models_dir=models, reference=True) for n in NAMES]
        if quantized:
            refs = [torch.ao.quantization.quantize_dynamic(r, {torch.nn.Linear}, dtype=torch.qint8) for r in refs]
        return _pair(refs)

    tmp = Path(tempfile.mkdtemp(prefix="earmark-onnx-"))

    def onnx_paths():
        return [p if p.exists() else _export(n, p) for n, p in zip(nets, (tmp / f"{x}.onnx" for x in NAMES))]

    def ort_dynamic():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        outs = []
        for p in onnx_paths():
            q = p.with_suffix(".dyn.onnx")
            quantize_dynamic(str(p), str(q), weight_type=QuantType.QInt8)
            outs.append(q)
        return _ort_pair(outs)

    def ort_static():
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        outs = []
        for p in onnx_paths():
            q = p.with_suffix(".static.onnx")
            quantize_static(str(p), str(q), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
            outs.append(q)
        return _ort_pair(outs)

    add("torch bf16 timbral", bf16)
    add("torch int8 timbral", int8)
    add("torch plain conv2d", lambda: _pair([_plain(n) for n in nets]))
    add("torch channels-last", channels_last)
    add("torch.compile", compiled)
    add("torch reference", lambda: reference(False))
    add("torch reference + dynamic int8", lambda: reference(True))
    add("onnxruntime fp32", lambda: _ort_pair(onnx_paths()))
    add("onnxruntime int8 dynamic", ort_dynamic)
    add("onnxruntime int8 static", ort_static)
    return out, label_list, skipped


def fusion_probe(models: Path, patch: np.ndarray, bf16: bool, rounds: int) -> list[list[str]]:
    """Rows: per front-end conv, MTT's and MSD's run apart against one conv holding both filter banks.

    The two networks share only their input: each has its own weights and its
    own input batch-norm, so a fused conv is not even the same function (it
    would need the two affine-mapped inputs as two channels). Its time is the
    most that fusing could save.
    """
    import torch
    import torch.nn.functional as F

    from workers.tagging import fast, loading

    nets = [loading.load(n, models_dir=models) for n in NAMES]
    x = torch.from_numpy(patch[None]).unsqueeze(1)
    rows = []
    pairs = [("timbral", i, nets[0].timbral_pad) for i in range(2)] + [("temporal", i, None) for i in range(3)]
    for kind, i, pad in pairs:
        convs = [getattr(n, kind)[i] for n in nets]
        fused = fast.PooledConv(torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs]), (0, 0))
        fused.bf16 = convs[0].bf16 = convs[1].bf16 = bf16
        padded = F.pad(x, (0, 0, pad, pad) if pad is not None else (0, 0, *nets[0].temporal_pads[i]))
        with torch.inference_mode():
            t = _interleaved({"apart": lambda: [c(padded) for c in convs], "fused": lambda: fused(padded)}, rounds)
        rows.append([f"{kind}[{i}] {tuple(convs[0].weight.shape[2:])}", "bf16" if bf16 and kind == "timbral" else "fp32",
                     f"{t['apart'] * 1e3:.2f}", f"{t['fused'] * 1e3:.2f}", f"{t['apart'] / t['fused']:.2f}x"])
    return rows


def _interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """{name: median seconds}, the calls alternating."""
    import time

    from bench.common import median

    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: median(ts) for name, ts in times.items()}
