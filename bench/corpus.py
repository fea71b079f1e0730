"""A corpus of real music for the benchmarks: freely licensed game soundtracks from Debian packages.

Each Debian package is one album. ``apt-get download`` fetches the package
(the only network access; Debian's mirrors), its music files (any ``.ogg``,
``.opus``, ``.flac`` or ``.mp3`` under a directory named ``music``) are
streamed out of the package's data tarball (``dpkg-deb --fsys-tarfile``,
nothing else is unpacked), a few tracks of at least ``MIN_SECONDS`` are picked
evenly over the album's sorted file names, and each is re-encoded into every
format Earmark supports (``workers.audio.encode.write_audio``) with the tags a
user's tagger would have left: title from the file name, album = the package,
artist, track number, genre "Soundtrack".

Everything is cached under ``var/corpus/`` (git-ignored): ``debs/`` the
packages, ``src/<package>/`` the extracted music, ``encoded/<clip>/<package>/<format>/``
the re-encoded files with a ``manifest.json`` per clip length, so a rerun
encodes nothing. A clip of ``seconds`` (0: the whole track) is cut from the
middle of the track, where a song is most itself (game tracks often open with
a sting or silence).

The music is the packages' own (GPL / CC BY-SA and similar; see each package's
``/usr/share/doc/<package>/copyright``); it is used here only to measure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import ROOT

CACHE = ROOT / "var" / "corpus"
#: One album each; all in Debian 12 (main), music in Ogg Vorbis or Opus, 40-160 MB per package.
DEFAULT_PACKAGES = ("wesnoth-1.16-music", "hedgewars-data", "supertux-data", "warzone2100-music",
                    "extremetuxracer-data")
MUSIC_EXTENSIONS = (".ogg", ".opus", ".flac", ".mp3")
MIN_SECONDS = 30.0  # jingles (victory, defeat stings) are not what a library is made of
ARTISTS = {"wesnoth-1.16-music": "The Battle for Wesnoth", "hedgewars-data": "Hedgewars",
           "supertux-data": "SuperTux", "warzone2100-music": "Warzone 2100",
           "extremetuxracer-data": "Extreme Tux Racer", "widelands-data": "Widelands",
           "0ad-data": "0 A.D.", "supertuxkart-data": "SuperTuxKart", "megaglest-data": "MegaGlest"}


@dataclass
class Track:
    """One picked track: where it came from and its re-encodings (format key -> path)."""

    package: str
    number: int
    title: str
    source: str
    seconds: float  # of the clip that was encoded
    files: dict[str, str]


def _deb(package: str) -> Path:
    """The package's .deb in the cache, downloaded once."""
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        proc = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise RuntimeError(f"apt-get download {package} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return found[-1]


def _is_music(name: str) -> bool:
    parts = [p.lower() for p in Path(name).parts]
    return name.lower().endswith(MUSIC_EXTENSIONS) and "music" in parts[:-1]


def extract(package: str) -> list[Path]:
    """The package's music files, extracted once into ``var/corpus/src/<package>/`` (sorted)."""
    target = CACHE / "src" / package
    done = target / ".extracted"
    if not done.exists():
        deb = _deb(package)
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and _is_music(member.name):
                    tar.extract(member, target, filter="data")
        if proc.wait() != 0:
            raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} exited {proc.returncode}")
        done.write_text(deb.name + "\n")
    return sorted(p for p in target.rglob("*") if p.is_file() and p.name.lower().endswith(MUSIC_EXTENSIONS))


def _duration(path: Path) -> float:
    from workers.audio.decode import probe

    return probe(path).duration or 0.0


def pick(files: list[Path], count: int) -> list[Path]:
    """``count`` tracks of at least ``MIN_SECONDS``, evenly spread over the sorted names."""
    long_enough = [f for f in files if _duration(f) >= MIN_SECONDS]
    if count >= len(long_enough):
        return long_enough
    step = len(long_enough) / count
    return [long_enough[int(i * step + step / 2)] for i in range(count)]


def title_of(path: Path) -> str:
    """``breaking_the_chains.ogg`` -> ``Breaking The Chains``; ``track17`` -> ``Track 17``."""
    words = re.sub(r"(?<=[a-z])(?=[0-9])", " ", re.sub(r"[_\-]+", " ", path.stem)).split()
    return " ".join(w[:1].upper() + w[1:] for w in words)


def read_clip(path: Path, seconds: float):
    """(samples (channels, n) float32, rate, clip seconds): ``seconds`` from the middle (0: all)."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        channels = min(2, stream.codec_context.channels or 2)
        resampler = av.AudioResampler(format="fltp", layout="stereo" if channels == 2 else "mono", rate=rate)
        pieces = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                pieces.append(out.to_ndarray())
        for out in resampler.resample(None):
            pieces.append(out.to_ndarray())
    audio = np.concatenate(pieces, axis=1).astype(np.float32)
    if seconds and audio.shape[1] > seconds * rate:
        start = (audio.shape[1] - int(seconds * rate)) // 2
        audio = audio[:, start:start + int(seconds * rate)]
    return np.ascontiguousarray(audio), rate, audio.shape[1] / rate


def _encode_track(job: dict) -> dict:
    """Encode one source clip into every format (a process-pool job); returns the ``Track`` as a dict."""
    from workers.audio.encode import write_audio
    from workers.audio.formats import get_format

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    audio, rate, seconds = read_clip(Path(job["source"]), job["seconds"])
    files = {}
    for fmt in job["formats"]:
        out = Path(job["dir"]) / fmt / f"{job['number']:02d} {job['title']}{get_format(fmt).extension}"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(".partial-" + out.name)
            write_audio(partial, audio, rate, fmt, tags=job["tags"])
            partial.rename(out)
        files[fmt] = str(out)
    return asdict(Track(job["package"], job["number"], job["title"], job["source"], round(seconds, 3), files))


def build(packages=DEFAULT_PACKAGES, tracks: int = 15, formats=None, seconds: float = 60.0,
          jobs: int | None = None, log=print) -> list[Track]:
    """The corpus: ``tracks`` tracks spread over ``packages`` (one album each), in every format, cached."""
    from workers.audio.formats import FORMATS

    formats = list(formats or FORMATS)
    packages = list(packages)
    per = [tracks // len(packages) + (i < tracks % len(packages)) for i in range(len(packages))]
    root = CACHE / "encoded" / (f"{seconds:g}s" if seconds else "full")
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    todo, result = [], []
    for package, count in zip(packages, per):
        if not count:
            continue
        key = f"{package}:{count}"
        cached = [Track(**t) for t in manifest.get(key, [])]
        if cached and all(fmt in t.files and Path(t.files[fmt]).exists() for t in cached for fmt in formats):
            result.extend(Track(**{**asdict(t), "files": {f: t.files[f] for f in formats}}) for t in cached)
            continue
        picked = pick(extract(package), count)
        log(f"corpus: {package}: encoding {len(picked)} tracks into {len(formats)} formats")
        for number, source in enumerate(picked, 1):
            title = title_of(source)
            tags = {"title": title, "album": package, "artist": ARTISTS.get(package, package),
                    "albumartist": ARTISTS.get(package, package), "tracknumber": f"{number}/{len(picked)}",
                    "genre": "Soundtrack"}
            todo.append({"package": package, "number": number, "title": title, "source": str(source),
                         "seconds": seconds, "formats": sorted(set(formats) | set(_formats_of(manifest, key))),
                         "dir": str(root / package), "tags": tags, "key": key})
    if todo:
        with ProcessPoolExecutor(jobs or min(2, os.cpu_count() or 1)) as pool:
            done = list(pool.map(_encode_track, todo))
        for job, track in zip(todo, done):
            manifest.setdefault(job["key"], [])
            manifest[job["key"]] = [t for t in manifest[job["key"]] if t["number"] != track["number"]] + [track]
        root.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for job, track in zip(todo, done):
            result.append(Track(**{**track, "files": {f: track["files"][f] for f in formats}}))
    order = {p: i for i, p in enumerate(packages)}
    return sorted(result, key=lambda t: (order[t.package], t.number))


def _formats_of(manifest: dict, key: str) -> list[str]:
    """Formats already encoded for an album (kept in its manifest entry when more are added)."""
    return sorted({f for t in manifest.get(key, []) for f in t["files"]})
