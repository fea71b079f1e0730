"""``manage.py install_models`` on the real musicnn wheel."""
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from workers.tagging import install, loading, musicnn


EXPECTED_FILES = {f"{n}.safetensors" for n in musicnn.MODEL_NAMES} | {"labels.json", "LICENSE", "manifest.json"}


def _install(models_dir, wheel=None, *extra):
    from io import StringIO

    out = StringIO()
    args = ["--models-dir", str(models_dir), *extra]
    if wheel is not None:
        args += ["--from-wheel", str(wheel)]
    call_command("install_models", *args, stdout=out)
    return out.getvalue()


def _snapshot(models_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in models_dir.iterdir()}


@pytest.fixture
def broken_wheel(musicnn_wheel, tmp_path):
    """A copy of the wheel with bytes flipped inside one compressed checkpoint member."""
    path = tmp_path / install.WHEEL_FILENAME
    shutil.copyfile(musicnn_wheel, path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("musicnn/MTT_musicnn/.data-00000-of-00001")
    data = bytearray(path.read_bytes())
    middle = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))
    return path


def test_install_then_already_installed(musicnn_wheel, tmp_path):
    models_dir = tmp_path / "models"
    out = _install(models_dir, musicnn_wheel)
    assert "Installed musicnn models" in out and "MTT_musicnn@" in out
    assert {p.name for p in models_dir.iterdir()} == EXPECTED_FILES  # no temp files left behind
    before = _snapshot(models_dir)

    out = _install(models_dir, musicnn_wheel)
    assert "already installed" in out
    assert _snapshot(models_dir) == before  # nothing rewritten

    contents = {name: (models_dir / name).read_bytes() for name in EXPECTED_FILES}
    _install(models_dir, musicnn_wheel, "--force")
    after = _snapshot(models_dir)
    assert all(after[name][0] != before[name][0] for name in EXPECTED_FILES)  # replaced by rename
    assert {name: (models_dir / name).read_bytes() for name in EXPECTED_FILES} == contents


def test_conversion_is_deterministic(musicnn_wheel, installed_models_dir, tmp_path):
    _install(tmp_path, musicnn_wheel)
    for name in EXPECTED_FILES:
        assert (tmp_path / name).read_bytes() == (installed_models_dir / name).read_bytes(), name


def test_installed_contents(installed_models_dir):
    manifest = json.loads((installed_models_dir / "manifest.json").read_text())
    assert manifest["source"]["wheel_sha256"] == install.WHEEL_SHA256
    assert manifest["source"]["version"] == "0.1.0"
    for name in musicnn.MODEL_NAMES:
        entry = manifest["models"][name]
        assert entry["version"] == loading.model_version(name, installed_models_dir)
        assert entry["sha256"] == install.sha256_file(installed_models_dir / entry["file"])
    labels = json.loads((installed_models_dir / "labels.json").read_text())
    assert len(labels["mtt"]) == len(labels["msd"]) == 50
    assert labels["mtt"][:3] == ["guitar", "classical", "slow"]
    license_text = (installed_models_dir / "LICENSE").read_text()
    assert "Copyright (c) Music Technology Group, Universitat Pompeu Fabra 2019" in license_text
    assert "Permission to use, copy, modify, and/or distribute" in license_text


def test_damaged_install_is_repaired(musicnn_wheel, tmp_path):
    _install(tmp_path, musicnn_wheel)
    (tmp_path / "MSD_vgg.safetensors").write_bytes(b"oops")
    assert not install.is_installed(tmp_path)
    assert "Installed" in _install(tmp_path, musicnn_wheel)
    assert install.is_installed(tmp_path)


def test_wrong_hash_wheel_is_refused(musicnn_wheel, tmp_path):
    wheel = tmp_path / install.WHEEL_FILENAME
    wheel.write_bytes(musicnn_wheel.read_bytes() + b"\0")
    with pytest.raises(CommandError, match="not the musicnn 0.1.0 wheel.*SHA-256"):
        _install(tmp_path / "models", wheel)
    assert not (tmp_path / "models" / "manifest.json").exists()


def test_missing_wheel_file(tmp_path):
    with pytest.raises(CommandError, match="does not exist"):
        _install(tmp_path / "models", tmp_path / "nope.whl")


def test_corrupted_zip_is_refused(broken_wheel, tmp_path):
    # Through the command the hash check catches it first...
    with pytest.raises(CommandError, match="SHA-256"):
        _install(tmp_path / "models", broken_wheel)
    # ...and should the hash match, the damaged member is still reported clearly.
    with pytest.raises(install.InstallError, match="damaged"):
        install.convert_wheel(broken_wheel, expected_sha256=install.sha256_file(broken_wheel))


def test_truncated_zip_is_refused(musicnn_wheel, tmp_path):
    wheel = tmp_path / install.WHEEL_FILENAME
    wheel.write_bytes(musicnn_wheel.read_bytes()[:1_000_000])
    with pytest.raises(install.InstallError, match="not a readable wheel"):
        install.convert_wheel(wheel, expected_sha256=install.sha256_file(wheel))


def test_offline_download_gives_clear_error(tmp_path, monkeypatch):
    # No index and no config: pip cannot find the package, as when offline.
    monkeypatch.setenv("EARMARK_WHEEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(CommandError, match="pip could not download.*--from-wheel"):
        _install(tmp_path / "models")
    assert not list((tmp_path / "cache").glob("*.whl"))


def test_download_uses_cache(musicnn_wheel, monkeypatch):
    # The session fixture already fetched it: a second call must not run pip.
    monkeypatch.setattr(install, "_pip_download", lambda target: pytest.fail("pip ran despite a cached wheel"))
    assert install.download_wheel(musicnn_wheel.parent) == musicnn_wheel


def test_labels_parsed_without_executing():
    source = "import os\nos.system('false')\nMTT_LABELS = " + repr([f"t{i}" for i in range(50)]) + \
        "\nMSD_LABELS = " + repr([f"s{i}" for i in range(50)]) + "\n"
    labels = install.parse_labels(source)
    assert labels["mtt"][0] == "t0" and labels["msd"][-1] == "s49"
    with pytest.raises(install.InstallError):
        install.parse_labels("MTT_LABELS = ['a']\n")
