"""Filesystem paths as text that a UTF-8 database can store, reversibly.

POSIX names are bytes; most are UTF-8 but old libraries hold Latin-1 names and
worse. ``to_text`` keeps valid UTF-8 as is, writes each undecodable byte as
``\\xNN`` and doubles a literal backslash, so ``to_bytes`` restores the exact
name and distinct files never collide.
"""
from __future__ import annotations

import os


def to_text(path: bytes | str) -> str:
    raw = os.fsencode(path)
    try:  # the usual name, valid UTF-8 without a backslash, is itself (a scan or a burst names thousands)
        text = raw.decode("utf-8")
        if "\\" not in text:
            return text
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":
            out.append("\\x%02x" % (ord(ch) - 0xDC00))
        else:
            out.append(ch)
    return "".join(out)


def to_bytes(text: str) -> bytes:
    if "\\" not in text:
        return text.encode("utf-8")
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and text[i + 1 : i + 2] == "\\":
            out += b"\\"
            i += 2
        elif ch == "\\" and text[i + 1 : i + 2] == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            out += ch.encode("utf-8")
            i += 1
    return bytes(out)


def is_within(path: bytes, root: bytes) -> bool:
    """True when ``path`` (already resolved) lies inside ``root`` (resolved)."""
    root = root.rstrip(b"/") or b"/"
    return path == root or path.startswith(root + b"/") or root == b"/"
