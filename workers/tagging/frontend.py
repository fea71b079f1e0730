"""Audio -> log-mel patches, the input musicnn was trained on, in torch.

musicnn computed its input with librosa 0.x:
``melspectrogram(sr=16000, n_fft=512, hop_length=256, n_mels=96)`` (Hann
window, centred frames, power 2, Slaney mel scale and area normalisation), then
``log10(10000 * S + 1)``, and cut the result into 3 s patches of 187 frames.
librosa is a heavy dependency for one filterbank, so this module rebuilds the
same computation: the filterbank in numpy (identical arithmetic to
``librosa.filters.mel``), the STFT and projection in torch so that it can run
on the GPU next to the networks. ``frontend_reference.npz`` checks it against
librosa 0.11 output.

Two deliberate departures from musicnn's own pre-processing:

* The mel power stays float32. musicnn cast it to float16 before ``10000 * S``,
  which overflows to infinity on loud frames.
* Centre padding is ``reflect`` (librosa 0.11's default became ``constant``;
  the older librosa musicnn used reflected), as the parity fixture was made.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 256
N_MELS = 96
PATCH_FRAMES = 187  # 3 s: librosa.time_to_frames(3, sr=16000, hop_length=256) + 1


@contextmanager
def float32_exact(device: torch.device | str):
    """Run CUDA float32 convolutions and matmuls in true float32, then restore the flags.

    cuDNN defaults to TF32 (10-bit mantissa) for float32 convolutions, which
    moved musicnn's outputs by up to 2e-3 on an H200, 20x the parity tolerance;
    the mel projection drifts by 4e-4 if matmul TF32 is switched on. The flags
    are process-global, so they are set only for the duration of the call.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- mel filterbank


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    hz = np.asanyarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mels = hz / f_sp
    log_region = hz >= min_log_hz
    return np.where(log_region, min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep, mels)


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mels = np.asanyarray(mels, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) float32 triangular filters with Slaney area norm.

    Same operation order and dtypes as ``librosa.filters.mel`` (float64 maths,
    float32 storage, normalisation applied to the stored float32 weights) so the
    filters agree to the last bit rather than merely closely.
    """
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_freqs = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2.0), n_mels + 2))
    widths = np.diff(mel_freqs)
    ramps = np.subtract.outer(mel_freqs, fft_freqs)
    weights = np.zeros((n_mels, len(fft_freqs)), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / widths[i]
        upper = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:n_mels + 2] - mel_freqs[:n_mels]))[:, np.newaxis]
    return weights


@lru_cache(maxsize=8)
def _filterbank_tensor(device: str) -> torch.Tensor:
    """The filterbank transposed to (freq, mel) on ``device``, built once per device."""
    return torch.from_numpy(mel_filterbank().T.copy()).to(device)


@lru_cache(maxsize=8)
def _window(device: str) -> torch.Tensor:
    """Periodic Hann window (scipy ``get_window('hann', n, fftbins=True)``)."""
    return torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------- log-mel


def _as_audio_tensor(audio) -> torch.Tensor:
    """Accept numpy or torch mono audio, (samples,) or (batch, samples), as float32."""
    audio = torch.as_tensor(audio)
    if audio.dtype != torch.float32:
        audio = audio.to(torch.float32)
    if audio.dim() not in (1, 2) or audio.shape[-1] == 0:
        raise ValueError(f"expected mono audio of shape (samples,) or (batch, samples), got {tuple(audio.shape)}")
    return audio


def logmel(audio, device: str | torch.device | None = None) -> torch.Tensor:
    """16 kHz mono float32 audio -> (frames, 96) log-mel, or (batch, frames, 96).

    ``frames = 1 + samples // 256`` (centred frames). Audio shorter than half a
    window cannot be reflect-padded, so it is first zero-extended to 257 samples;
    that only concerns clips under 16 ms, which carry no usable music anyway.
    """
    audio = _as_audio_tensor(audio)
    if device is not None:
        audio = audio.to(device)
    if audio.shape[-1] <= N_FFT // 2:
        audio = torch.nn.functional.pad(audio, (0, N_FFT // 2 + 1 - audio.shape[-1]))
    dev = str(audio.device)
    with float32_exact(audio.device):
        spec = torch.stft(audio, N_FFT, HOP, window=_window(dev), center=True, pad_mode="reflect",
                          return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (..., freq, frames)
        mel = torch.matmul(power.transpose(-1, -2), _filterbank_tensor(dev))  # (..., frames, mel)
    return torch.log10(mel * 10000.0 + 1.0)


# --------------------------------------------------------------------------- patches


def patch_starts(n_frames: int, length: int = PATCH_FRAMES) -> list[int]:
    """First frame of each patch for a log-mel of ``n_frames`` frames.

    Non-overlapping patches from the start (musicnn's own batch mode uses
    hop = patch length). A trailing remainder of at least half a patch gets one
    more patch aligned to the end (overlapping its neighbour), so the last
    seconds of a song are heard; a shorter remainder is dropped as musicnn does.
    """
    if n_frames <= length:
        return [0]
    starts = list(range(0, n_frames - length + 1, length))
    remainder = n_frames - (starts[-1] + length)
    if remainder * 2 >= length:
        starts.append(n_frames - length)
    return starts


def patches(mel, length: int = PATCH_FRAMES) -> torch.Tensor:
    """(frames, 96) log-mel -> (n, 187, 96) patches for the networks.

    Layout: see :func:`patch_starts`. A log-mel shorter than one patch is
    repeated end to end until it fills one (musicnn's training used this
    "repeat-pad" for short clips, so the networks have seen it; zero padding
    would instead add silence, which reads as "quiet"/"ambient"). Empty input
    raises ``ValueError``. The patches are copies, contiguous, on ``mel``'s device.
    """
    mel = torch.as_tensor(mel)
    if mel.dim() != 2 or mel.shape[1] != N_MELS:
        raise ValueError(f"expected a (frames, {N_MELS}) log-mel, got {tuple(mel.shape)}")
    n_frames = mel.shape[0]
    if n_frames == 0:
        raise ValueError("cannot cut patches from an empty log-mel")
    if n_frames < length:
        repeats = -(-length // n_frames)
        return mel.repeat(repeats, 1)[:length].unsqueeze(0).contiguous()
    return torch.stack([mel[s:s + length] for s in patch_starts(n_frames, length)])
