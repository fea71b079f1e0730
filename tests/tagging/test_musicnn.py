"""The PyTorch musicnn port: checkpoint reader, front end, networks, parity.

Reference outputs (tests/fixtures/musicnn_parity, see its README) come from the
original TensorFlow graphs and from librosa 0.11; a faithful port matches them
to 1e-4 absolute.
"""
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.tagging import checkpoint, frontend, labels, loading, musicnn
from workers.tagging import fast as fast_forms


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "musicnn_parity"
CLIPS = ("piano", "techno", "sine")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "reference.npz"))


@pytest.fixture(scope="module")
def frontend_reference():
    return dict(np.load(FIXTURES / "frontend_reference.npz"))


@pytest.fixture(scope="module")
def wheel_zip(musicnn_wheel):
    with zipfile.ZipFile(musicnn_wheel) as zf:
        yield zf


def _checkpoint_bytes(zf, name):
    return zf.read(f"musicnn/{name}/.index"), zf.read(f"musicnn/{name}/.data-00000-of-00001")


def _max_error(model, reference, name):
    errors = []
    with torch.inference_mode():
        for clip in CLIPS:
            out = model(torch.from_numpy(reference[f"input/{clip}"])).numpy()
            errors.append(np.abs(out - reference[f"{name}/{clip}"]).max())
    return max(errors)


# --------------------------------------------------------------------------- checkpoint reader


def test_crc32c_known_answer():
    # RFC 3720 / iSCSI check value, and the numpy lane path against the byte loop.
    assert checkpoint.crc32c(b"123456789") == 0xE3069283
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    assert checkpoint._crc_lanes(0xFFFFFFFF, data) == checkpoint._crc_bytes(0xFFFFFFFF, data)


@pytest.mark.parametrize("name", musicnn.MODEL_NAMES)
def test_checkpoint_reader_reads_every_tensor(wheel_zip, name):
    index, data = _checkpoint_bytes(wheel_zip, name)
    entries = checkpoint.read_entries(index)
    tensors = checkpoint.read_checkpoint(index, data)
    assert set(tensors) == {e.name for e in entries}
    assert sum(t.nbytes for t in tensors.values()) == len(data)  # coverage: nothing left unread
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert tensors["batch_normalization/moving_variance"].shape == (1,)
    if name in musicnn.MUSICNN_NAMES:
        assert len(tensors) == 150
        assert tensors["conv2d/kernel"].shape == (7, 38, 1, 204)
        assert tensors["conv2d_5/kernel"].shape == (7, 561, 1, 64)
        assert tensors["dense/kernel"].shape == (1506, 200)
    else:
        assert len(tensors) == 86
        assert tensors["2CNN/kernel"].shape == (3, 3, 128, 128)
        assert tensors["dense/kernel"].shape == (256, 50)


def test_checkpoint_reader_rejects_damage(wheel_zip):
    index, data = _checkpoint_bytes(wheel_zip, "MTT_vgg")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.read_checkpoint(index, bytes(flipped))
    with pytest.raises(checkpoint.CheckpointError, match="data file"):
        checkpoint.read_checkpoint(index, data[:-4])
    bad_index = bytearray(index)
    bad_index[40] ^= 0xFF  # inside the first data block
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.read_checkpoint(bytes(bad_index), data)
    with pytest.raises(checkpoint.CheckpointError, match="magic"):
        checkpoint.read_checkpoint(index[:-1] + b"\x00", data)


def test_protobuf_varint():
    assert checkpoint.read_varint(bytes([0xAC, 0x02]), 0) == (300, 2)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.read_varint(bytes([0x80]), 0)


# --------------------------------------------------------------------------- front end


@pytest.mark.parametrize("clip", ("piano", "techno"))
def test_frontend_matches_librosa(frontend_reference, clip):
    mel = frontend.logmel(frontend_reference[f"audio/{clip}"])
    expected = frontend_reference[f"logmel/{clip}"]
    assert mel.dtype == torch.float32 and tuple(mel.shape) == expected.shape == (751, 96)
    assert np.abs(mel.numpy() - expected).max() < TOLERANCE


def test_frontend_batched_equals_single(frontend_reference):
    audio = np.stack([frontend_reference["audio/piano"], frontend_reference["audio/techno"]])
    batched = frontend.logmel(audio)
    assert torch.equal(batched[1], frontend.logmel(audio[1]))


def test_frontend_tiny_and_empty_audio():
    assert tuple(frontend.logmel(np.zeros(100, np.float32)).shape) == (2, 96)
    with pytest.raises(ValueError):
        frontend.logmel(np.zeros(0, np.float32))


def test_patch_layout():
    assert frontend.patch_starts(1876) == [187 * i for i in range(10)]  # 30 s: 10 patches, 6 frames dropped
    assert frontend.patch_starts(187) == [0]
    assert frontend.patch_starts(280) == [0]  # remainder 93 < half a patch: dropped
    assert frontend.patch_starts(281) == [0, 94]  # remainder 94: one more patch, end-aligned


def test_patches_cut_and_repeat_pad():
    mel = torch.arange(500 * 96, dtype=torch.float32).reshape(500, 96)  # 2 patches + 126 frames
    cut = frontend.patches(mel)
    assert tuple(cut.shape) == (3, 187, 96)
    assert torch.equal(cut[1], mel[187:374]) and torch.equal(cut[2], mel[-187:])
    short = frontend.patches(mel[:50])
    assert tuple(short.shape) == (1, 187, 96)
    assert torch.equal(short[0, 50:100], mel[:50]) and torch.equal(short[0, 150:], mel[:37])
    with pytest.raises(ValueError):
        frontend.patches(mel[:0])
    with pytest.raises(ValueError):
        frontend.patches(torch.zeros(10, 95))


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize("name", musicnn.MODEL_NAMES)
def test_parity_with_tensorflow(installed_models_dir, reference, name):
    fast = loading.load(name, models_dir=installed_models_dir)
    ref = loading.load(name, models_dir=installed_models_dir, reference=True)
    assert _max_error(fast, reference, name) < TOLERANCE
    assert _max_error(ref, reference, name) < TOLERANCE


@pytest.mark.parametrize("name", ("MTT_musicnn", "MTT_vgg"))
def test_plain_conv_path_matches(installed_models_dir, reference, name):
    # The oneDNN-layout convolution is a CPU speed-up; the portable path (used on
    # GPUs or if oneDNN refuses) must compute the same function.
    model = loading.load(name, models_dir=installed_models_dir)
    for module in model.modules():
        if isinstance(module, fast_forms.PooledConv):
            module.use_mkldnn = False
    assert _max_error(model, reference, name) < TOLERANCE


@pytest.mark.parametrize("name", musicnn.MUSICNN_NAMES)
def test_gpu_conv_paths_match(installed_models_dir, reference, name):
    # The CUDA paths (unfold + GEMM front end, mid-end as shifted GEMMs) forced on the CPU.
    model = loading.load(name, models_dir=installed_models_dir)
    for module in model.modules():
        if isinstance(module, fast_forms.PooledConv):
            module.use_mkldnn, module.use_gemm, module.GEMM_CHUNK = False, True, 3
        if isinstance(module, fast_forms.FastMusicnn):
            module.midend_matmul = True
    assert _max_error(model, reference, name) < TOLERANCE


def test_conv1d_by_matmul():
    x, w, b = torch.randn(2, 5, 11), torch.randn(4, 5, 7), torch.randn(4)
    expected = torch.nn.functional.conv1d(x, w, b, padding=3)
    assert torch.allclose(fast_forms.conv1d_by_matmul(x, w.permute(2, 0, 1).contiguous(), b, 3), expected, atol=1e-5)


def test_single_patch_equals_batch(installed_models_dir, reference):
    model = loading.load("MSD_musicnn", models_dir=installed_models_dir)
    x = torch.from_numpy(reference["input/techno"])
    with torch.inference_mode():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(batched, single, atol=1e-6)


def test_model_version_is_stable(installed_models_dir):
    version = loading.model_version("MTT_musicnn", installed_models_dir)
    name, digest = version.split("@")
    assert name == "MTT_musicnn" and len(digest) == 8
    assert version == loading.model_version("MTT_musicnn", installed_models_dir)
    assert version != loading.model_version("MSD_musicnn", installed_models_dir)


def test_load_unknown_or_missing(tmp_path):
    with pytest.raises(ValueError, match="unknown musicnn model"):
        loading.load("MTT_resnet", models_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="install_models"):
        loading.load("MTT_musicnn", models_dir=tmp_path)


def test_pair_scores_and_labels(musicnn_pair, installed_models_dir, reference):
    x = reference["input/piano"]
    scores = musicnn_pair(x)
    assert scores.shape == (4, 100) and scores.dtype == np.float32
    assert np.abs(scores[:, :50] - reference["MTT_musicnn/piano"]).max() < TOLERANCE
    assert np.abs(scores[:, 50:] - reference["MSD_musicnn/piano"]).max() < TOLERANCE
    assert musicnn_pair.labels[0] == "mtt:guitar" and musicnn_pair.labels[50] == "msd:rock"
    assert musicnn_pair.labels == labels.combined_labels(installed_models_dir)
    assert len(set(musicnn_pair.labels)) == 100
    assert musicnn_pair.version.startswith("MTT_musicnn@") and "+MSD_musicnn@" in musicnn_pair.version


def test_label_lists(installed_models_dir):
    assert len(labels.mtt_labels(installed_models_dir)) == 50
    assert labels.msd_labels(installed_models_dir)[:3] == ["rock", "pop", "alternative"]
    assert labels.labels_for("MTT_vgg", installed_models_dir) == labels.mtt_labels(installed_models_dir)


def test_audio_to_scores_end_to_end(musicnn_pair, frontend_reference):
    # 12 s of audio -> 4 patches -> 100 probabilities each.
    cut = frontend.patches(frontend.logmel(frontend_reference["audio/techno"]))
    scores = musicnn_pair(cut)
    assert scores.shape == (4, 100)
    assert np.all((scores >= 0) & (scores <= 1))
