"""The library watcher (``manage.py run_watcher``, one per host): new and changed music is scanned by itself.

Every enabled library is watched with inotify (``workers.library.inotify``), or
polled by a stat walk every ``Library.poll_seconds`` where inotify cannot see its
changes (``workers.library.polling``: NFS, SMB, FUSE …, ``Library.watch = "poll"``,
``EARMARK_WATCH_FORCE_POLL``). Changes are gathered per folder and queued once the
folder has **settled**: no event in it or below it for ``EARMARK_WATCH_SETTLE_SECONDS``
(2 s), so an album copied in is one folder job, not one per file.

A settled folder is first compared with its track rows (``polling.folder_state``), by the
scanner's own rule (a file is new or changed unless a track has its path, size and
``mtime_ns``), so a folder whose files are all as recorded queues nothing, whoever
touched it. That is how Earmark's own tag writes are told apart: the safe writer's
clone (``.earmark-tmp-*``) makes no event at all, and the rename over the track is
followed by the tagger recording the file's new size and mtime; while a track's job
runs (between the rename and the record) its folder is looked at again a settle time
later, for up to ``BUSY_SECONDS``. What is left goes to the queue at
``enqueue.DEFAULT_PRIORITY``: a changed folder as a targeted job of that folder alone
(``targeted``, swept where a known subfolder vanished), a new folder with all below it
through ``enqueue.enqueue_paths``.

Nothing is missed: starting to watch a library, and missing events (the kernel's
queue overflowed, a watch limit), request an incremental library scan
(``scan.request_scan``); out of inotify watches, the library is polled. A root that is
gone, unreadable or empty while tracks are known queues nothing, is reported, and is
tried again every ``EARMARK_WATCH_RELOAD_SECONDS``. Each library's state (mode and why,
folders, last event, last poll, errors) is one meta row per library and host,
``watch:<library id>:<host>``, shown on the library's admin page.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from workers.library import enqueue, inotify, paths, polling, scan, targeted
from workers.models import Library, Meta

log = logging.getLogger("earmark.watch")

PRIORITY = enqueue.DEFAULT_PRIORITY
BUSY_SECONDS = 30.0  # how long a folder waits for a running job to record the file it wrote
STATUS_SECONDS = 60.0  # a status row is rewritten at least this often (the admin sees the watcher is alive)
STATUS_MIN_SECONDS = 1.0  # and at most this often (a burst of events is not a burst of writes)


def status_key(library_id: int, host: str | None = None) -> str:
    return f"watch:{library_id}:{host or settings.EARMARK_HOSTNAME}"


def statuses(library: Library) -> list[dict]:
    """Every host's watcher status for the library (for the admin), newest first."""
    rows = Meta.objects.filter(key__startswith=f"watch:{library.id}:").order_by("-updated_at")
    return [{**row.value, "updated_at": row.updated_at.isoformat()} for row in rows]


def _setting(name: str, default):
    return type(default)(getattr(settings, name, default))


@dataclass
class Pending:
    """What happened in one folder since it was last queued."""

    first: float
    last: float
    new_dirs: set = field(default_factory=set)  # folders that appeared in it
    gone_dirs: set = field(default_factory=set)  # folders deleted or moved away from it
    not_before: float = 0.0  # busy: look again then


class LibraryWatch:
    """One library: its mode, its inotify tree or last walk, the folders waiting to settle, its status."""

    def __init__(self, library: Library, skip: tuple[bytes, ...] = ()):
        self.library, self.skip = library, skip
        self.root = scan.resolved_root(library)
        self.mode, self.reason = polling.choose_mode(library, self.root)
        self.tree: inotify.Tree | None = None
        self.snapshot: dict | None = None
        self.pending: dict[bytes, Pending] = {}
        self.error = ""
        self.broken = False  # the root is not there: try again at the next reload
        self.next_poll = 0.0
        self.info = {"events": 0, "folders_queued": 0, "last_event": None, "last_queued": None, "last_poll": None,
                     "missed": None, "started_at": timezone.now().isoformat()}
        self.dirty = True

    @property
    def settle(self) -> float:
        return _setting("EARMARK_WATCH_SETTLE_SECONDS", 2.0)

    # --- starting and stopping ------------------------------------------------------

    def start(self, now: float) -> None:
        """Set up the watches (or the first walk) and ask for an incremental scan of what happened before."""
        if self.mode == "off":
            return
        self.dirty = True
        problem = self.root_problem()
        if problem:
            self._break(problem)
            return
        if self.mode == "inotify":
            try:
                self.tree = inotify.Tree(self.root, self.skip)
            except inotify.WatchLimit as exc:
                self._fall_back_to_polling(f"{exc.strerror}; the library is polled instead")
            except OSError as exc:
                self._break(f"the library root {self.library.root} cannot be watched ({exc.strerror})")
                return
        if self.mode == "poll" and not self._first_walk(now):
            return
        self.broken, self.error = False, ""
        if _setting("EARMARK_WATCH_SCAN_ON_START", True):
            scan.request_scan(self.library)
        log.info("library %s: watching (%s: %s), %d folders", self.library.name, self.mode, self.reason,
                 self.folders)

    def _first_walk(self, now: float) -> bool:
        try:
            self.snapshot = polling.walk(self.root, self.skip)
        except OSError as exc:
            self._break(f"the library root {self.library.root} cannot be read ({exc.strerror})")
            return False
        self.info["last_poll"] = timezone.now().isoformat()
        self.next_poll = now + max(1, self.library.poll_seconds)
        return True

    def _fall_back_to_polling(self, why: str) -> None:
        self.close()
        self.mode, self.reason = "poll", why
        log.warning("library %s: %s", self.library.name, why)

    def _break(self, problem: str) -> None:
        self.close()
        if problem != self.error:  # tried again every reload: said once
            log.warning("library %s: %s", self.library.name, problem)
        self.broken, self.error, self.dirty, self.pending = True, problem, True, {}

    def close(self) -> None:
        if self.tree is not None:
            self.tree.close()
            self.tree = None

    def root_problem(self) -> str:
        """Why nothing may be queued now (the root gone, unreadable, or empty with tracks known), or ""."""
        try:
            scan.check_root(self.library)
        except scan.ScanError as exc:
            return str(exc).replace("Nothing was marked missing.", "Nothing is queued until it is back.")
        return ""

    @property
    def folders(self) -> int:
        if self.tree is not None:
            return self.tree.folders
        return len(self.snapshot) if self.snapshot is not None else 0

    # --- changes --------------------------------------------------------------------

    def read(self, now: float) -> None:
        """Take the inotify events waiting now."""
        try:
            changes = self.tree.read()
        except inotify.WatchLimit as exc:
            self._fall_back_to_polling(f"{exc.strerror} (a new folder could not be watched); polled instead")
            self.start(now)
            self._missed("the inotify watch limit was reached")
            return
        self.add(changes, now)

    def add(self, changes: list[inotify.Change], now: float) -> None:
        """Note the changes in their folders' pending entries (and keep the folders above them waiting)."""
        for change in changes:
            if change.kind == "overflow":
                self._missed("the kernel's inotify event queue overflowed")
                continue
            if change.kind == "root-gone":
                self._break(f"the library root {self.library.root} was deleted, moved or unmounted; "
                            "it is watched again once it is back")
                return
            folder = change.path if change.kind == "listing" else os.path.dirname(change.path)
            entry = self.pending.get(folder)
            if entry is None:
                entry = self.pending[folder] = Pending(now, now)
            if change.kind == "changed" and change.is_dir:
                entry.new_dirs.add(change.path)
            elif change.kind == "gone" and change.is_dir:
                entry.new_dirs.discard(change.path)
                entry.gone_dirs.add(change.path)
            self._touch(folder, now)
        if changes:
            self.info["events"] += len(changes)
            self.info["last_event"] = timezone.now().isoformat()
            self.dirty = True

    def _touch(self, folder: bytes, now: float) -> None:
        while True:
            entry = self.pending.get(folder)
            if entry is not None:
                entry.last = now
            if len(folder) <= len(self.root):
                return
            folder = os.path.dirname(folder)

    def _missed(self, why: str) -> None:
        """Events were lost: an incremental library scan finds what they said."""
        scan.request_scan(self.library)
        self.info["missed"] = f"{timezone.now().isoformat()}: {why}; a library scan was requested"
        self.dirty = True
        log.warning("library %s: %s; a library scan was requested", self.library.name, why)

    # --- the clock ------------------------------------------------------------------

    def next_deadline(self, now: float) -> float:
        times = [max(p.last + self.settle, p.not_before) for p in self.pending.values()]
        if self.mode == "poll" and self.snapshot is not None and not self.broken:
            times.append(self.next_poll)
        return min(times, default=now + 3600)

    def tick(self, now: float) -> None:
        if self.broken or self.mode == "off":
            return
        polled = self.mode == "poll" and now >= self.next_poll
        if polled:
            self.poll(now)
        self.flush(now)
        if polled:  # while folders wait to settle, walk again a settle time later: a copy still running shows there
            self.next_poll = now + (self.settle if self.pending else max(1, self.library.poll_seconds))

    def poll(self, now: float) -> None:
        problem = self.root_problem()
        if problem:
            self.error, self.dirty = problem, True
            return
        try:
            walked = polling.walk(self.root, self.skip, self.snapshot)
        except OSError as exc:
            self.error = f"the library root {self.library.root} cannot be read ({exc.strerror})"
        else:
            changes = polling.diff(self.snapshot or {}, walked)
            self.snapshot, self.error = walked, ""
            self.add(changes, now)
        self.info["last_poll"] = timezone.now().isoformat()
        self.dirty = True

    def flush(self, now: float, force: bool = False) -> int:
        """Queue the folders that have settled (all of them when ``force``); returns the folders queued."""
        due = [f for f, p in self.pending.items() if force or (now - p.last >= self.settle and now >= p.not_before)]
        if not due:
            return 0
        problem = self.root_problem()
        if problem:
            self._break(problem)
            return 0
        stale, new_dirs, done = [], set(), []
        for folder in due:
            entry = self.pending[folder]
            if self._covered(folder):  # inside a new folder that is queued whole
                done.append(folder)
                continue
            new_dirs |= {d for d in entry.new_dirs if os.path.isdir(d) and not os.path.islink(d)}
            state, sweep = polling.folder_state(self.library, folder, entry.gone_dirs)
            if state == "busy" and not force and now - entry.first < BUSY_SECONDS:
                entry.not_before, entry.new_dirs = now + self.settle, set()
                continue
            if state != "fresh":
                stale.append((folder, sweep))
            done.append(folder)
        queued = self._queue(stale, sorted(new_dirs))
        for folder in done:
            self.pending.pop(folder, None)
        self.dirty = True
        return queued

    def _covered(self, folder: bytes) -> bool:
        """Whether the folder lies in a new folder that its parent's entry will queue with all below it."""
        at = folder
        while len(at) > len(self.root):
            parent = os.path.dirname(at)
            entry = self.pending.get(parent)
            if entry is not None and at in entry.new_dirs:
                return True
            at = parent
        return False

    def _queue(self, stale: list[tuple[bytes, bool]], new_dirs: list[bytes]) -> int:
        count = len(stale) + len(new_dirs)
        if not count:
            return 0
        if count > _setting("EARMARK_WATCH_MAX_FOLDERS", 1000):
            scan.request_scan(self.library, priority=PRIORITY)
            log.info("library %s: %d folders changed at once; a library scan was requested", self.library.name, count)
        else:
            jobs = [targeted.new_job(self.library.id, [paths.to_text(f)], False, PRIORITY, "watcher", sweep=sweep)
                    for f, sweep in stale]
            if jobs:
                targeted.enqueue_jobs(jobs)
            for outcome in enqueue.enqueue_paths(new_dirs, priority=PRIORITY, reason="watcher") if new_dirs else []:
                if not outcome.ok:
                    log.info("library %s: %s: %s", self.library.name, outcome.path, outcome.error)
            log.info("library %s: queued %d changed and %d new folders", self.library.name, len(stale), len(new_dirs))
        self.info["folders_queued"] += count
        self.info["last_queued"] = timezone.now().isoformat()
        self.dirty = True
        return count

    # --- status ---------------------------------------------------------------------

    def status(self) -> dict:
        return {"host": settings.EARMARK_HOSTNAME, "pid": os.getpid(), "library": self.library.name,
                "mode": self.mode, "reason": self.reason, "state": "error" if self.error else (
                    "off" if self.mode == "off" else "watching"),
                "error": self.error, "folders": self.folders,
                "unreadable_folders": self.tree.unreadable if self.tree else 0,
                "pending_folders": len(self.pending),
                "poll_seconds": self.library.poll_seconds if self.mode == "poll" else None, **self.info}


class Watcher:
    """Every library of the database, each a ``LibraryWatch``; the loop that reads, settles and queues."""

    def __init__(self):
        self.watches: dict[int, LibraryWatch] = {}
        self.signatures: dict[int, tuple] = {}
        self.stopping = False
        self.status_written: dict[int, float] = {}

    def stop(self, *_args) -> None:
        self.stopping = True

    def run(self, max_seconds: float | None = None) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        reload_every = _setting("EARMARK_WATCH_RELOAD_SECONDS", 10.0)
        started, next_reload = time.monotonic(), 0.0
        log.info("watcher started (pid %d)", os.getpid())
        try:
            while not self.stopping and (max_seconds is None or time.monotonic() - started < max_seconds):
                now = time.monotonic()
                if now >= next_reload:
                    self._guarded(self.reload, now)
                    next_reload = now + reload_every
                deadline = min([next_reload] + [w.next_deadline(now) for w in self.watches.values()])
                trees = {w.tree.fileno(): w for w in self.watches.values() if w.tree is not None}
                try:
                    ready = select.select(list(trees), [], [], min(1.0, max(0.02, deadline - now)))[0]
                except InterruptedError:
                    ready = []
                now = time.monotonic()
                for fd in ready:
                    if trees[fd].tree is not None:
                        self._guarded(trees[fd].read, now)
                for w in list(self.watches.values()):
                    self._guarded(w.tick, now)
                self._guarded(self.write_statuses, now)
        finally:
            self.shutdown()

    def _guarded(self, fn, *args) -> None:
        """One step; a database error is logged and the step is tried again next time round."""
        try:
            fn(*args)
        except DatabaseError as exc:
            log.warning("database error (tried again): %s", exc)
            close_old_connections()

    def reload(self, now: float) -> None:
        """Follow the libraries: new, changed and removed ones; a broken root tried again."""
        libraries = list(Library.objects.all())
        roots = [scan.resolved_root(lib) for lib in libraries]
        seen = set()
        for lib, root in zip(libraries, roots):
            seen.add(lib.id)
            skip = tuple(sorted(r for r in roots if r != root and r.startswith(root.rstrip(b"/") + b"/")))
            signature = (root, lib.enabled, lib.watch, lib.poll_seconds, skip)
            current = self.watches.get(lib.id)
            if current is not None and self.signatures.get(lib.id) == signature:
                current.library = lib
                if current.broken:
                    current.start(now)
                continue
            if current is not None:
                current.flush(now, force=True)
                current.close()
            self.watches[lib.id], self.signatures[lib.id] = LibraryWatch(lib, skip), signature
            self.watches[lib.id].start(now)
        for lib_id in [i for i in self.watches if i not in seen]:
            self.watches.pop(lib_id).close()
            self.signatures.pop(lib_id, None)
        mine = Meta.objects.filter(key__startswith="watch:", key__endswith=f":{settings.EARMARK_HOSTNAME}")
        for key in mine.values_list("key", flat=True):
            lib_id = key.split(":")[1]
            if not lib_id.isdigit() or int(lib_id) not in seen:
                Meta.objects.filter(key=key).delete()

    def write_statuses(self, now: float, state: str | None = None) -> None:
        for lib_id, w in self.watches.items():
            age = now - self.status_written.get(lib_id, -STATUS_SECONDS)
            if state is None and (age < STATUS_MIN_SECONDS or (not w.dirty and age < STATUS_SECONDS)):
                continue
            value = w.status()
            if state:
                value["state"] = state
            Meta.objects.update_or_create(key=status_key(lib_id), defaults={"value": value,
                                                                            "updated_at": timezone.now()})
            w.dirty, self.status_written[lib_id] = False, now

    def shutdown(self) -> None:
        """Queue what is still settling (a stop must lose nothing), say so in the status rows, close the watches."""
        now = time.monotonic()
        for w in self.watches.values():
            self._guarded(w.flush, now, True)
        self._guarded(self.write_statuses, now, "stopped")
        for w in self.watches.values():
            w.close()
        log.info("watcher stopped")
