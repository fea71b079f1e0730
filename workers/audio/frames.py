"""Decoded PyAV frames as numpy arrays: the native samples, and the mono mean the networks hear."""
from __future__ import annotations

import av
import numpy as np

# PyAV 18 miscounts the planes of a planar frame with 8 or more channels (7.1 and up: one
# more than there are) and its ``to_ndarray`` then reads past them and crashes the process.
# Such frames are converted to packed samples, which are one plane whatever the layout.
MAX_PLANAR_CHANNELS = 7


def float_format(frame) -> str:
    return "fltp" if len(frame.layout.channels) <= MAX_PLANAR_CHANNELS else "flt"


def frame_array(frame) -> np.ndarray:
    """``frame.to_ndarray()``, except where PyAV would crash (then ``native_samples``)."""
    if frame.format.is_planar and len(frame.layout.channels) > MAX_PLANAR_CHANNELS:
        return native_samples(frame)
    return frame.to_ndarray()


def float_planes(frame) -> list[np.ndarray] | None:
    """The channels of a float planar frame as float32 views of its own buffers; None for other formats.

    Read in place: PyAV's ``to_ndarray`` stacks the planes into a new array first, which on
    MP3's 1,152-sample frames costs more than the work done with the samples.
    """
    if frame.format.name != "fltp" or len(frame.layout.channels) > MAX_PLANAR_CHANNELS:
        return None
    return [np.frombuffer(plane, dtype=np.float32, count=frame.samples) for plane in frame.planes]


def native_planes(frame) -> list[np.ndarray]:
    """A decoded frame as one float32 array per channel in [-1, 1], whatever its sample format."""
    planes = float_planes(frame)
    if planes is None:
        x = native_samples(frame)
        planes = [x[:, c] for c in range(x.shape[1])]
    return planes


def native_samples(frame) -> np.ndarray:
    """A decoded frame as float32 ``(frames, channels)`` in [-1, 1], whatever its sample format."""
    channels = len(frame.layout.channels)
    if frame.format.is_planar and channels > MAX_PLANAR_CHANNELS:
        packed = av.AudioResampler(format="flt", layout=frame.layout.name, rate=frame.sample_rate)
        pts, frame.pts = frame.pts, None
        out = [f.to_ndarray().reshape(-1, channels) for f in packed.resample(frame) + packed.resample(None)]
        frame.pts = pts
        return np.concatenate(out) if out else np.zeros((0, channels), np.float32)
    planes = frame.to_ndarray()
    x = planes.T if frame.format.is_planar else planes.reshape(-1, channels)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    if x.dtype.kind == "u":  # u8: centred on 128
        return (x.astype(np.float32) - 128.0) / 128.0
    return x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))


def average_channels(frame) -> np.ndarray:
    """Plain mean over channels of a float frame (planar, or packed for 8+ channels): musicnn's idea of mono."""
    if not frame.format.is_planar:
        return frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1, dtype=np.float32)
    planes = float_planes(frame)
    if planes is None:
        planes = list(frame.to_ndarray())
    total = planes[0].astype(np.float32, copy=True)
    for plane in planes[1:]:  # row after row, as numpy's mean over the first axis adds them
        total += plane
    if len(planes) > 1:
        total /= np.float32(len(planes))
    return total
