"""A safe tag write keeps the file's identity and never loses a user's last-moment edit (issue 13).

Two promises, checked on real files of each format:

* **edit detection** (case 6): a user's program that rewrites the file in
  place between the safe write's copy and its rename, with the same size and
  the same mtime (second-resolution filesystems, or a program that restores
  mtime with ``os.utime``), is detected: the write is refused with
  ``FileChangedError``, the file holds the user's bytes, no clone is left.
  The edit is forced for real, from inside the write: the hook is the audio
  verification (``safewrite.verify_same_audio``), which runs after the copy
  and before the rename;
* **identity** (case 7): after a write the file has the same ``user.*``
  extended attributes, POSIX ACL, owner, group, mode (setgid included) and
  access time as before; its mtime is the time of the write (so music
  servers and backups see the change). A hard-linked file is refused, both
  links left as they were, since a rename would silently split them.
"""
from __future__ import annotations

import errno
import os
import struct
import types
from pathlib import Path

import pytest

from tests.tagfiles.test_tagfile import FIELDS, make_user_file, sha, temp_files
from workers.tagfiles import safewrite
from workers.tagfiles.safewrite import FileChangedError, TagWriteError, safe_write_tags

FORMATS = ["mp3-v24", "flac", "ogg", "opus", "m4a"]
OLD_ATIME_NS = 978_307_200 * 10**9  # 2001-01-01
OLD_MTIME_NS = 1_009_843_200 * 10**9  # 2002-01-01


def write(path: Path, fields=FIELDS):
    st = path.stat()
    return safe_write_tags(path, fields, st.st_size, st.st_mtime_ns)


def edit_in_place_keeping_size_and_times(path: Path) -> bytes:
    """What a user's tagger might do: rewrite the title's bytes in place, same length, then
    put the old atime and mtime back with ``os.utime``. Returns the file's new bytes."""
    st = os.stat(path)
    data = path.read_bytes()
    assert b"Blue in Green" in data
    edited = data.replace(b"Blue in Green", b"Blue in Gr33n", 1)
    with open(path, "r+b") as f:
        f.write(edited)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    return edited


def while_verifying(monkeypatch, action) -> None:
    """Run ``action(original_path)`` inside the write, after the copy and before the rename."""
    real_verify = safewrite.verify_same_audio

    def verify_then_act(original, copy, fmt=None):
        method = real_verify(original, copy, fmt)
        action(Path(original))
        return method

    monkeypatch.setattr(safewrite, "verify_same_audio", verify_then_act)


# ------------------------------------------------------------- case 6: edits

@pytest.mark.parametrize("case", FORMATS)
def test_same_size_same_mtime_edit_just_before_the_rename_is_kept(tmp_path, monkeypatch, case):
    path = make_user_file(tmp_path, case)
    edited = {}
    while_verifying(monkeypatch, lambda original: edited.update(bytes=edit_in_place_keeping_size_and_times(original)))
    with pytest.raises(FileChangedError, match="changed while"):
        write(path)
    assert path.read_bytes() == edited["bytes"]
    assert temp_files(tmp_path) == []


def test_an_edit_is_caught_by_content_where_ctime_does_not_move(tmp_path, monkeypatch):
    """On vfat/exFAT (USB sticks, SD cards) st_ctime is the creation time and mtime has 2 s
    resolution: only the content check can see a same-size edit that kept the mtime. Simulated
    by making lstat report the original's pre-edit ctime after the edit."""
    path = make_user_file(tmp_path, "flac")
    creation_ctime = path.stat().st_ctime_ns
    edited = {}
    real_lstat = os.lstat

    def lstat_without_ctime(target, *args, **kwargs):
        st = real_lstat(target, *args, **kwargs)
        if "bytes" not in edited or os.fsdecode(target) != str(path):
            return st
        fields = {name: getattr(st, name) for name in dir(st) if name.startswith("st_")}
        fields.update(st_ctime_ns=creation_ctime, st_ctime=creation_ctime / 1e9)
        return types.SimpleNamespace(**fields)

    monkeypatch.setattr(safewrite.os, "lstat", lstat_without_ctime)
    while_verifying(monkeypatch, lambda original: edited.update(bytes=edit_in_place_keeping_size_and_times(original)))
    with pytest.raises(FileChangedError, match="content"):
        write(path)
    assert path.read_bytes() == edited["bytes"]
    assert temp_files(tmp_path) == []


def test_a_hard_link_made_during_the_write_is_not_broken(tmp_path, monkeypatch):
    path = make_user_file(tmp_path, "mp3-v24")
    digest, inode = sha(path), path.stat().st_ino
    other = tmp_path / "other name.mp3"
    while_verifying(monkeypatch, lambda original: os.link(original, other))
    with pytest.raises(FileChangedError):
        write(path)
    assert path.stat().st_ino == other.stat().st_ino == inode
    assert sha(path) == sha(other) == digest
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------- case 7: identity

def _xattrs_supported(directory: Path, name: str = "user.earmark-probe", value: bytes = b"1") -> str | None:
    """None if ``directory``'s filesystem takes the xattr, else why not (for the skip)."""
    probe = directory / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, name, value)
        return None
    except OSError as exc:
        return f"{directory} does not support {name.split('.')[0]}.* extended attributes ({exc.strerror})"
    finally:
        probe.unlink()


def user_xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name) for name in os.listxattr(path) if name.startswith("user.")}


@pytest.mark.parametrize("case", FORMATS)
def test_user_xattrs_are_kept(tmp_path, case):
    if (why := _xattrs_supported(tmp_path)) is not None:
        pytest.skip(why)
    path = make_user_file(tmp_path, case)
    os.setxattr(path, "user.comment", "a note kept by the user's file manager".encode())
    os.setxattr(path, "user.xdg.origin.url", b"https://example.org/blue-in-green")
    os.setxattr(path, "user.binary", bytes(range(256)))
    before = user_xattrs(path)
    assert write(path).changed
    assert user_xattrs(path) == before


def test_an_xattr_that_cannot_be_kept_fails_the_write(tmp_path, monkeypatch):
    """Never drop one silently: the write is refused and the original keeps it."""
    if (why := _xattrs_supported(tmp_path)) is not None:
        pytest.skip(why)
    path = make_user_file(tmp_path, "flac")
    os.setxattr(path, "user.comment", b"keep me")
    digest = sha(path)
    real_setxattr = os.setxattr

    def refuse(target, name, value, *args, **kwargs):
        if name == "user.comment":
            raise OSError(errno.E2BIG, "Argument list too long")
        return real_setxattr(target, name, value, *args, **kwargs)

    monkeypatch.setattr(safewrite.os, "setxattr", refuse)
    with pytest.raises(TagWriteError, match="user.comment"):
        write(path)
    assert sha(path) == digest and os.getxattr(path, "user.comment") == b"keep me"
    assert temp_files(tmp_path) == []


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """The kernel's ``system.posix_acl_access`` value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


UNDEFINED_ID = 0xFFFFFFFF
# owner rw-, user 1234 r--, group r--, mask r--, other ---  (mode 0640)
ACL = posix_acl((0x01, 6, UNDEFINED_ID), (0x02, 4, 1234), (0x04, 4, UNDEFINED_ID), (0x10, 4, UNDEFINED_ID),
                (0x20, 0, UNDEFINED_ID))


@pytest.mark.parametrize("case", FORMATS)
def test_posix_acl_is_kept(tmp_path, case):
    if (why := _xattrs_supported(tmp_path, "system.posix_acl_access", ACL)) is not None:
        pytest.skip(why)
    path = make_user_file(tmp_path, case)
    os.setxattr(path, "system.posix_acl_access", ACL)
    acl, mode = os.getxattr(path, "system.posix_acl_access"), path.stat().st_mode
    assert write(path).changed
    assert os.getxattr(path, "system.posix_acl_access") == acl
    assert path.stat().st_mode == mode


@pytest.mark.parametrize("case", FORMATS)
def test_owner_group_mode_and_setgid_are_kept(tmp_path, case):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another uid/gid needs root; the tests run as root in CI")
    path = make_user_file(tmp_path, case)
    os.chown(path, 1234, 1234)
    os.chmod(path, 0o2640)  # after chown, which clears set-id bits
    before = path.stat()
    result = write(path)
    after = path.stat()
    assert result.changed and result.owner_preserved
    assert (after.st_uid, after.st_gid) == (1234, 1234)
    assert oct(after.st_mode) == oct(before.st_mode) and after.st_mode & 0o7777 == 0o2640


@pytest.mark.parametrize("case", FORMATS)
def test_atime_is_kept_and_mtime_is_the_write_time(tmp_path, case):
    """A tag write is not a play: atime stays. mtime moves, so servers and backups see the change."""
    path = make_user_file(tmp_path, case)
    os.utime(path, ns=(OLD_ATIME_NS, OLD_MTIME_NS))
    result = write(path)
    after = path.stat()
    assert after.st_atime_ns == OLD_ATIME_NS
    assert after.st_mtime_ns > OLD_MTIME_NS and result.mtime_ns == after.st_mtime_ns


@pytest.mark.parametrize("case", FORMATS)
def test_a_hard_linked_file_is_refused_and_both_links_kept(tmp_path, case):
    path = make_user_file(tmp_path, case)
    other = tmp_path / f"same song{path.suffix}"
    os.link(path, other)
    digest, inode = sha(path), path.stat().st_ino
    with pytest.raises(TagWriteError) as caught:
        write(path)
    assert "2 hard links" in caught.value.reason
    assert "does not write tags into hard-linked files" in caught.value.reason
    assert caught.value.errno == errno.EMLINK
    assert path.stat().st_ino == other.stat().st_ino == inode and path.stat().st_nlink == 2
    assert sha(path) == sha(other) == digest
    assert temp_files(tmp_path) == []


def test_an_acl_the_folder_would_give_the_copy_is_not_added(tmp_path):
    """A folder's default ACL gives every new file an access ACL; the rewritten file must not gain one."""
    default = posix_acl((0x01, 7, UNDEFINED_ID), (0x02, 4, 1234), (0x04, 5, UNDEFINED_ID), (0x10, 5, UNDEFINED_ID),
                        (0x20, 5, UNDEFINED_ID))
    if (why := _xattrs_supported(tmp_path, "system.posix_acl_access", ACL)) is not None:
        pytest.skip(why)
    path = make_user_file(tmp_path, "flac")
    mode = path.stat().st_mode
    os.setxattr(tmp_path, "system.posix_acl_default", default)
    assert write(path).changed
    assert "system.posix_acl_access" not in os.listxattr(path)
    assert path.stat().st_mode == mode
