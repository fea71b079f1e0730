"""What every admin page shares: the site's name, the priority of work a person asks for, and display helpers.

Every page reads the database (never a worker's memory); every action only
writes rows (queue a job, retry, cancel) for the workers to pick up. Admin
actions are POSTs through Django's CSRF-protected changelist form. The live
dashboard itself lives in ``workers.live.views``; the admin index links to it.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from django.contrib import admin
from django.contrib.admin.utils import flatten_fieldsets
from django.utils.html import format_html, format_html_join

ADMIN_PRIORITY = 60  # work asked for by a person runs before bulk work (scan-queued tags are 100)

admin.site.index_template = "workers/admin_index.html"
admin.site.site_header = "Earmark"
admin.site.site_title = "Earmark"


def pre(text: str):
    """Multi-line text (errors, JSON) kept as written but wrapped, so a long traceback stays readable."""
    return format_html('<pre style="white-space:pre-wrap;margin:0">{}</pre>', text) if text else "—"


def json_block(value):
    """A stored JSON value, indented and key-sorted so two rows can be compared by eye."""
    return pre(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)) if value else "—"


def short(text: str, n: int = 80) -> str:
    """The start of a long text, so a list column stays one line."""
    return text if len(text) <= n else text[: n - 1] + "…"


def table(headers: Sequence[str], rows: Iterable[Sequence]):
    """An HTML table; every cell is escaped unless it is already safe HTML (a link built with format_html)."""
    head = format_html_join("", "<th>{}</th>", ((h,) for h in headers))
    body = format_html_join("", "<tr>{}</tr>", ((format_html_join("", "<td>{}</td>", ((c,) for c in row)),)
                                               for row in rows))
    return format_html("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>", head, body)


class WorkerRows:
    """Admin for rows the workers create (from scans and actions, with their dedup keys): never added by hand.

    Every field is shown read-only; the change permission stays, because the
    page's actions (retag, retry…) ask for it.
    """

    def has_add_permission(self, request):
        return False

    def get_readonly_fields(self, request, obj=None):
        return flatten_fieldsets(self.get_fieldsets(request, obj))


class ComputedRows(WorkerRows):
    """Admin for rows the workers compute: shown, never added or edited by hand."""

    def has_change_permission(self, request, obj=None):
        return False
