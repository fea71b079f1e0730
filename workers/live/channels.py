"""django-eventstream's channel manager for Earmark: which channels exist and who may read them.

This is the second wall. The first is ``views.events``, which refuses
non-staff users before a stream opens (django-eventstream itself answers a
refused channel with an HTTP 200 stream holding one ``stream-error`` event,
which an EventSource would take for a working connection). Should the view
ever be routed without its guard, this check still keeps every channel closed
to anyone but active staff holding ``workers.view_dashboard``.
"""
from __future__ import annotations

from django_eventstream.channelmanager import ChannelManagerBase

from workers.live.snapshots import CHANNELS


#: Who may read the channels: staff holding ``workers.view_dashboard`` (migration 0009).
READ_PERMISSION = "workers.view_dashboard"


def is_staff(user) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active and user.is_staff)


class StaffChannelManager(ChannelManagerBase):
    def get_channels_for_request(self, request, view_kwargs):
        """The channels named by ``?channel=`` (repeatable); unknown names are dropped."""
        return {c for c in request.GET.getlist("channel") if c in CHANNELS}

    def can_read_channel(self, user, channel):
        return channel in CHANNELS and is_staff(user) and user.has_perm(READ_PERMISSION)

    def is_channel_reliable(self, channel):
        """No event storage: a (re)connecting client gets a fresh snapshot instead of a replay.

        Storing every event in the database would also be a write per event on
        the same SQLite file the workers contend for.
        """
        return False
