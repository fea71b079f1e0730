"""Install the pretrained musicnn weights: wheel -> safetensors, labels, licence.

The weights are only published inside the ``musicnn`` 0.1.0 wheel on PyPI, as
TensorFlow checkpoints, and that package cannot be installed here (it needs
TensorFlow and an old numpy). So we fetch the wheel file alone with pip, check
it is exactly the release we ported against (SHA-256), read the checkpoints
straight out of the zip with :mod:`workers.tagging.checkpoint`, convert them to
the PyTorch modules' state dicts and write into the models directory:

* ``<name>.safetensors`` for MTT_musicnn, MSD_musicnn, MTT_vgg, MSD_vgg
* ``labels.json``: the 50 MTT and 50 MSD tags, in output order
* ``LICENSE``: musicnn's ISC licence with its copyright notice (the licence
  requires the notice to travel with copies of the weights)
* ``manifest.json`` (written last): wheel hash, and each file's hash and
  version tag; its presence with matching files means "installed".

Every file is written to a temporary name and renamed into place, so a crash
never leaves a half-written file under a real name.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from workers.tagging import checkpoint, loading, musicnn
from workers.tagging.labels import LABELS_FILE

MUSICNN_VERSION = "0.1.0"
WHEEL_FILENAME = f"musicnn-{MUSICNN_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "f38a4890c648c1ddbb141c5d96d2b0a8cfcd36746002d896989f7b88beb65cfa"
LICENSE_MEMBER = f"musicnn-{MUSICNN_VERSION}.dist-info/LICENSE.md"
CONFIG_MEMBER = "musicnn/configuration.py"
COPYRIGHT_MARK = "Copyright (c) Music Technology Group, Universitat Pompeu Fabra"
MANIFEST_FILE = "manifest.json"
LICENSE_FILE = "LICENSE"
MANIFEST_FORMAT = 1
PIP_TIMEOUT_S = 600


class InstallError(Exception):
    """Installation failed for a reason a person can act on; the message says which."""


@dataclass
class InstallResult:
    """What :func:`install_models` did, for the command to report."""

    status: str  # "installed" or "already installed"
    models_dir: Path
    manifest: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- obtaining the wheel


def default_cache_dir() -> Path:
    """Where downloaded wheels are kept: ``$EARMARK_WHEEL_CACHE`` or ``<data dir>/cache/wheels``."""
    if os.environ.get("EARMARK_WHEEL_CACHE"):
        return Path(os.environ["EARMARK_WHEEL_CACHE"])
    from django.conf import settings

    return Path(settings.DATA_DIR) / "cache" / "wheels"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (the wheel is ~30 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_wheel(path: Path, expected_sha256: str = WHEEL_SHA256) -> None:
    """Refuse any file but the exact musicnn 0.1.0 wheel the port was checked against."""
    if not path.is_file():
        raise InstallError(f"The wheel file {path} does not exist.")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise InstallError(
            f"{path} is not the musicnn {MUSICNN_VERSION} wheel Earmark expects: its SHA-256 is "
            f"{actual}, expected {expected_sha256}. The file may be corrupt, truncated or a different release; "
            f"delete it and download musicnn=={MUSICNN_VERSION} again."
        )


def _pip_download(target: Path) -> None:
    """Run ``pip download --no-deps musicnn==0.1.0`` into ``target`` with this interpreter's pip."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
        "--disable-pip-version-check", "--dest", str(target), f"musicnn=={MUSICNN_VERSION}",
    ]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"Could not run pip to download musicnn {MUSICNN_VERSION}: {exc}.") from exc
    if proc.returncode != 0:
        detail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise InstallError(
            f"pip could not download the musicnn {MUSICNN_VERSION} wheel (is this machine offline, or PyPI "
            f"unreachable?). Download {WHEEL_FILENAME} elsewhere and run "
            f"`manage.py install_models --from-wheel PATH`. pip said:\n{detail}"
        )


def download_wheel(cache_dir: Path | None = None) -> Path:
    """Return a verified copy of the wheel in ``cache_dir``, downloading it only if needed.

    The download lands in a temporary folder beside the cache and is renamed in
    only after its hash checks out, so the cache never holds a bad wheel.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    cached = cache_dir / WHEEL_FILENAME
    if cached.is_file() and sha256_file(cached) == WHEEL_SHA256:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        _pip_download(Path(tmp))
        downloaded = Path(tmp) / WHEEL_FILENAME
        if not downloaded.is_file():
            raise InstallError(f"pip finished but did not produce {WHEEL_FILENAME}.")
        verify_wheel(downloaded)
        os.replace(downloaded, cached)
    return cached


# --------------------------------------------------------------------------- reading the wheel


def _read_member(wheel: zipfile.ZipFile, name: str) -> bytes:
    """One file out of the wheel; a missing or damaged member is an InstallError."""
    try:
        return wheel.read(name)
    except KeyError:
        raise InstallError(f"The wheel has no {name}; it is not the musicnn {MUSICNN_VERSION} wheel.") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise InstallError(f"The wheel is damaged: reading {name} failed ({exc}). Download it again.") from exc


def parse_labels(config_source: str) -> dict[str, list[str]]:
    """Extract MTT_LABELS and MSD_LABELS from musicnn/configuration.py without running it.

    ``ast.literal_eval`` on the two assignments: the file is data, and code from
    a downloaded package has no business executing during installation.
    """
    found = {}
    for node in ast.parse(config_source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("MTT_LABELS", "MSD_LABELS"):
                found[node.targets[0].id[:3].lower()] = ast.literal_eval(node.value)
    for dataset in ("mtt", "msd"):
        tags = found.get(dataset)
        if not isinstance(tags, list) or len(tags) != musicnn.N_TAGS or not all(isinstance(t, str) for t in tags):
            raise InstallError(f"{CONFIG_MEMBER} in the wheel does not define 50 {dataset.upper()} labels.")
    return {"mtt": found["mtt"], "msd": found["msd"]}


def read_license(wheel: zipfile.ZipFile) -> str:
    """musicnn's licence text, checked to carry the copyright notice we must keep."""
    text = _read_member(wheel, LICENSE_MEMBER).decode("utf-8").strip()
    if COPYRIGHT_MARK not in text:
        raise InstallError(f"{LICENSE_MEMBER} in the wheel lacks musicnn's copyright notice.")
    return (
        f"The model weights in this directory were converted from the musicnn {MUSICNN_VERSION} package\n"
        "(Pons & Serra, https://github.com/jordipons/musicnn), which is distributed under this licence:\n\n"
        f"{text}\n"
    )


def read_checkpoint(wheel: zipfile.ZipFile, name: str) -> dict[str, np.ndarray]:
    """TF variables of checkpoint ``name`` (stored as ``musicnn/<name>/.index`` + data)."""
    index = _read_member(wheel, f"musicnn/{name}/.index")
    data = _read_member(wheel, f"musicnn/{name}/.data-00000-of-00001")
    try:
        return checkpoint.read_checkpoint(index, data)
    except checkpoint.CheckpointError as exc:
        raise InstallError(f"The {name} checkpoint in the wheel cannot be read: {exc}.") from exc


def convert_model(wheel: zipfile.ZipFile, name: str) -> bytes:
    """safetensors bytes of the PyTorch state dict for checkpoint ``name``."""
    from safetensors.torch import save

    try:
        state = musicnn.convert_tf_variables(name, read_checkpoint(wheel, name))
    except (KeyError, ValueError) as exc:
        raise InstallError(f"The {name} checkpoint does not have the expected variables: {exc}.") from exc
    bad = [key for key, tensor in state.items() if not bool(tensor.isfinite().all())]
    if bad:
        raise InstallError(f"The {name} checkpoint holds non-finite values in {', '.join(bad)}.")
    # One metadata key only: safetensors writes metadata in hash-map order, and
    # byte-identical output is what keeps version tags stable across installs.
    metadata = {"source": f"{name} from musicnn {MUSICNN_VERSION} (ISC licence, see LICENSE)"}
    return save(state, metadata=metadata)


def convert_wheel(wheel_path: Path, expected_sha256: str = WHEEL_SHA256) -> dict[str, bytes]:
    """Everything to install, as file name -> bytes (manifest excluded).

    ``expected_sha256`` exists so tests can feed a deliberately broken file past
    the hash check and see the zip and checkpoint errors.
    """
    verify_wheel(wheel_path, expected_sha256)
    try:
        wheel = zipfile.ZipFile(wheel_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InstallError(f"{wheel_path} is not a readable wheel (zip) file: {exc}. Download it again.") from exc
    with wheel:
        files = {f"{name}.safetensors": convert_model(wheel, name) for name in musicnn.MODEL_NAMES}
        labels = parse_labels(_read_member(wheel, CONFIG_MEMBER).decode("utf-8"))
        files[LABELS_FILE] = (json.dumps(labels, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
        files[LICENSE_FILE] = read_license(wheel).encode("utf-8")
    return files


# --------------------------------------------------------------------------- writing


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_manifest(files: dict[str, bytes], wheel_sha256: str) -> dict:
    """Describe an installation: where the weights came from and what each file hashes to."""
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    models = {
        name: {
            "file": f"{name}.safetensors",
            "sha256": hashes[f"{name}.safetensors"],
            "version": loading.version_string(name, hashes[f"{name}.safetensors"]),
            "labels": name.split("_", 1)[0].lower(),
        }
        for name in musicnn.MODEL_NAMES
    }
    return {
        "format": MANIFEST_FORMAT,
        "source": {"package": "musicnn", "version": MUSICNN_VERSION, "wheel": WHEEL_FILENAME,
                   "wheel_sha256": wheel_sha256, "license": "ISC"},
        "models": models,
        "files": hashes,
    }


def read_manifest(models_dir: Path) -> dict | None:
    """The installed manifest, or None if absent or unreadable."""
    try:
        return json.loads((models_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_installed(models_dir: Path) -> bool:
    """True when the manifest matches this release and every file it lists is intact."""
    manifest = read_manifest(models_dir)
    if not manifest or manifest.get("format") != MANIFEST_FORMAT:
        return False
    if manifest.get("source", {}).get("wheel_sha256") != WHEEL_SHA256:
        return False
    files = manifest.get("files", {})
    expected = {f"{n}.safetensors" for n in musicnn.MODEL_NAMES} | {LABELS_FILE, LICENSE_FILE}
    if set(files) != expected:
        return False
    return all((models_dir / name).is_file() and sha256_file(models_dir / name) == digest
               for name, digest in files.items())


def install_models(models_dir: Path | str | None = None, wheel: Path | str | None = None, force: bool = False,
                   cache_dir: Path | str | None = None, log: Callable[[str], None] = lambda msg: None,
                   ) -> InstallResult:
    """Install (or confirm) the musicnn weights in ``models_dir``.

    ``wheel``: a local copy of the wheel; otherwise it is downloaded with pip
    into ``cache_dir``. Without ``force``, an intact installation of the same
    release is left untouched. Raises :class:`InstallError` on any failure.
    """
    from workers.tagging.labels import default_models_dir

    models_dir = Path(models_dir or default_models_dir())
    if not force and is_installed(models_dir):
        return InstallResult("already installed", models_dir, read_manifest(models_dir))
    if wheel is None:
        log(f"Downloading musicnn {MUSICNN_VERSION} (weights only, no dependencies) with pip...")
        wheel_path = download_wheel(Path(cache_dir) if cache_dir else None)
    else:
        wheel_path = Path(wheel)
    log(f"Checking {wheel_path.name} and converting its TensorFlow checkpoints...")
    files = convert_wheel(wheel_path)
    manifest = build_manifest(files, WHEEL_SHA256)
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_atomic(models_dir / name, data)
        write_atomic(models_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    except OSError as exc:
        raise InstallError(f"Could not write the models into {models_dir}: {exc}.") from exc
    return InstallResult("installed", models_dir, manifest)

