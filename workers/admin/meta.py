"""The admin's meta pages: the workers' IPC rows, shown and never edited."""
from __future__ import annotations

import json

from django.contrib import admin

from workers.admin.common import ComputedRows, json_block, short
from workers.models import Meta


@admin.register(Meta)
class MetaAdmin(ComputedRows, admin.ModelAdmin):
    """Read-only: these rows are the workers' IPC; editing one by hand would lie to them."""

    list_display = ["key", "updated_at", "preview"]
    search_fields = ["key"]
    fields = ["key", "updated_at", "value_json"]

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="value")
    def preview(self, obj):
        return short(json.dumps(obj.value, ensure_ascii=False), 120)

    @admin.display(description="value")
    def value_json(self, obj):
        return json_block(obj.value)
