"""The state broker: the one place that turns database changes into dashboard events.

Workers write their state to the database and never call ``send_event``: it
cannot reach another process without Redis or a GRIP proxy. Instead, each web
process runs one broker thread (started on first use, stopped by the ASGI
lifespan shutdown or at exit) that

1. glances at the database every ``poll`` seconds (50 ms): on SQLite
   ``PRAGMA data_version``, a counter that moves when another connection
   commits and that reads no table and takes no lock; on PostgreSQL, whether
   a notification came on the queue channels or ``earmark_state`` (LISTEN on
   a connection of its own, ``dialect.ChangeFeed``), which enqueues, worker
   rows and operator actions notify; every ``fallback`` seconds (2 s) it
   counts as changed anyway, for writes that notify nobody;
2. re-reads the channels (``workers.live.snapshots``) only when that counter moved
   or a snapshot's own ``refresh_at`` passed, and at most once every
   ``min_interval`` seconds (250 ms; longer when a read is costly, see
   ``READ_COST_FACTOR``), so a burst of commits becomes one batch;
3. diffs what it read against what it last sent and sends, per channel, one
   ``delta`` event with the changed and removed keys; nothing when nothing
   changed, so an idle system sends nothing but django-eventstream's keep-alives.

Consistency: each channel has a sequence number. A delta carries ``seq`` and
the ``base`` it applies to; ``snapshots(channels)`` returns the state with the
seq it is at. A client applies a delta only on top of its own seq and
reconnects (getting a fresh snapshot) on a gap, which covers events that
django-eventstream drops (a slow client's overflow, events queued while a
stream opens). The keep-alives carry the current seqs (``views.events``), so
even a dropped last delta is noticed within one keep-alive period.

While no client listens, the broker reads nothing; a new client's snapshot
request wakes it for one read on its own connection first.
"""
from __future__ import annotations

import atexit
import copy
import logging
import os
import threading
import time

from django.conf import settings
from django.db import close_old_connections, connection, connections

from workers.jobs import dialect, queue
from workers.live import snapshots

log = logging.getLogger("earmark.broker")

# A read may use at most 1/READ_COST_FACTOR of the broker's time: on a large job table,
# where one read takes 100 ms, reads are spaced 500 ms apart instead of 250 ms.
READ_COST_FACTOR = 5

EVENT_DELTA = "delta"
EVENT_SNAPSHOT = "snapshot"


def diff(old: dict, new: dict) -> tuple[dict, list]:
    """The keys of ``new`` whose values differ from ``old``, and the keys ``new`` no longer has."""
    changed = {k: v for k, v in new.items() if old.get(k, diff) != v}
    removed = sorted(k for k in old if k not in new)
    return changed, removed


class ChannelState:
    """What the broker last sent on one channel, and that message's sequence number."""

    def __init__(self):
        self.seq = 0
        self.state: dict = {}
        self.refresh_at: float | None = None

    def advance(self, channel: str, new: dict) -> dict | None:
        """Adopt ``new``; returns the delta event's payload, or None when nothing changed."""
        changed, removed = diff(self.state, new)
        if not changed and not removed:
            return None
        self.seq += 1
        self.state = new
        return {"channel": channel, "seq": self.seq, "base": self.seq - 1, "set": changed, "del": removed}


def _send(channel: str, event_type: str, payload: dict) -> None:
    from django_eventstream import send_event

    send_event(channel, event_type, payload)


def _has_listeners() -> bool:
    from django_eventstream.views import get_listener_manager

    manager = get_listener_manager()
    with manager.lock:
        return bool(manager.listeners_by_channel)


class Broker(threading.Thread):
    """Polls, diffs and sends; ``snapshots()`` is safe to call from any thread."""

    def __init__(self, poll: float | None = None, min_interval: float | None = None, send=_send,
                 has_listeners=_has_listeners, fallback: float | None = None):
        super().__init__(name="earmark-broker", daemon=True)
        self.poll = poll if poll is not None else getattr(settings, "EARMARK_BROKER_POLL_SECONDS", 0.05)
        self.min_interval = (min_interval if min_interval is not None
                             else getattr(settings, "EARMARK_BROKER_MIN_INTERVAL", 0.25))
        self.send, self.has_listeners = send, has_listeners
        self.channels = {name: ChannelState() for name in snapshots.CHANNELS}
        self.lock = threading.Lock()  # guards channels: a send and a snapshot never interleave
        self.stop_event = threading.Event()
        self.wake = threading.Event()  # set by snapshots(): read now, listeners or not
        self.read_done = threading.Condition()
        self.reads_started = 0
        self.reads = 0  # finished; reads run one at a time, in order
        self.events_sent = 0
        self.fallback = (fallback if fallback is not None
                         else getattr(settings, "EARMARK_BROKER_FALLBACK_SECONDS", 2.0))
        self.feed: dialect.ChangeFeed | None = None  # opened in the broker's own thread
        self.dirty = True  # the database may differ from what we last read
        self.last_read = 0.0
        self.spacing = self.min_interval  # grows with the cost of a read (READ_COST_FACTOR)
        self.pid = os.getpid()

    # -- the loop --------------------------------------------------------------

    def run(self) -> None:
        log.info("broker started (poll %.3fs, at most one read per %.3fs)", self.poll, self.min_interval)
        try:
            while not self.stop_event.is_set():
                self.tick()
                self.wake.wait(self.poll)
        finally:
            if self.feed is not None:
                self.feed.close()
            connections.close_all()
            with self.read_done:
                self.read_done.notify_all()
            log.info("broker stopped after %d reads and %d events", self.reads, self.events_sent)

    def tick(self) -> None:
        """One glance; a read when something may have changed, someone listens and the spacing allows.

        A snapshot request (``wake``) forces a read whatever the gate says.
        """
        try:
            forced = self.wake.is_set()
            self.wake.clear()
            self.dirty |= self._database_moved() or self._refresh_due()
            if forced or (self.dirty and self.has_listeners()
                          and time.monotonic() - self.last_read >= self.spacing):
                self.read_and_send()
        except Exception:  # a locked or restarting database must not kill the broker: next tick retries
            log.exception("broker tick failed")
            self.dirty = True
            close_old_connections()
            time.sleep(self.min_interval)

    def _database_moved(self) -> bool:
        """Did another process commit? SQLite: ``data_version`` moved; PostgreSQL: a notification came."""
        if self.feed is None:
            channels = [dialect.queue_channel(q) for q in queue.QUEUES] + [dialect.STATE_CHANNEL]
            self.feed = dialect.ChangeFeed(connection, channels, fallback=self.fallback)
            return True
        return self.feed.changed()

    def _refresh_due(self) -> bool:
        now = time.time()
        return any(c.refresh_at is not None and c.refresh_at <= now for c in self.channels.values())

    def read_and_send(self) -> None:
        """Read every channel, then send one delta per channel that changed."""
        with self.read_done:
            self.reads_started += 1
        self.dirty = False
        self.last_read = time.monotonic()
        fresh = snapshots.read_all()
        self.spacing = max(self.min_interval, READ_COST_FACTOR * (time.monotonic() - self.last_read))
        with self.lock:
            for name, snap in fresh.items():
                channel = self.channels[name]
                channel.refresh_at = snap.refresh_at
                payload = channel.advance(name, snap.state)
                if payload is not None:
                    self.send(name, EVENT_DELTA, payload)
                    self.events_sent += 1
        with self.read_done:
            self.reads += 1
            self.read_done.notify_all()

    # -- for the views -----------------------------------------------------------

    def snapshots(self, channels, timeout: float = 5.0) -> list[dict]:
        """Each channel's full state and seq, after one read that sees every commit made before the call."""
        with self.read_done:
            target = self.reads_started + 1  # a read already under way may have missed recent commits
            self.wake.set()
            self.read_done.wait_for(lambda: self.reads >= target or not self.is_alive(), timeout)
        with self.lock:
            return [{"channel": name, "seq": self.channels[name].seq, "state": copy.deepcopy(self.channels[name].state)}
                    for name in channels]

    def seqs(self) -> dict[str, int]:
        with self.lock:
            return {name: c.seq for name, c in self.channels.items()}

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


_broker: Broker | None = None
_broker_lock = threading.Lock()


def get_broker() -> Broker:
    """This process's broker, started on first use (a forked child starts its own)."""
    global _broker
    with _broker_lock:
        if _broker is None or _broker.pid != os.getpid() or not _broker.is_alive():
            _broker = Broker()
            _broker.start()
        return _broker


def running_broker() -> Broker | None:
    return _broker if _broker is not None and _broker.is_alive() and _broker.pid == os.getpid() else None


def stop_broker() -> None:
    """Stop this process's broker, if it runs (ASGI lifespan shutdown, interpreter exit)."""
    global _broker
    with _broker_lock:
        broker, _broker = _broker, None
    if broker is not None and broker.pid == os.getpid():
        broker.stop()


atexit.register(stop_broker)
