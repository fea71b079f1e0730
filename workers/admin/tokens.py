"""The admin's API token pages: make a key (shown once), scope it to libraries, see when it was used, revoke it.

Adding needs the "add API token" permission; the revoke action, the "change"
one. Only the digest is stored, so the key appears once, in the message after
the add view, and never again: a lost key is revoked and replaced.
"""
from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from workers.api import tokens
from workers.models import ApiToken


class ApiTokenForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["name", "libraries"]
        help_texts = {"name": "Who uses the key (lidarr, beets…): it appears in the API log.",
                      "libraries": "The libraries whose paths the key may queue and read; any other path is 403."}

    def clean_name(self):
        try:
            return tokens.validate_name(self.cleaned_data["name"], exclude_id=self.instance.pk)
        except ValidationError as exc:
            raise forms.ValidationError(exc.messages) from None


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    form = ApiTokenForm
    list_display = ["name", "prefix", "scope", "status", "created_by", "created_at", "last_used_at"]
    list_filter = ["libraries"]
    search_fields = ["name", "prefix"]
    readonly_fields = ["prefix", "created_by", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        return ["name", "libraries"] if obj is None else ["name", "libraries", *self.readonly_fields]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("created_by").prefetch_related("libraries")

    def save_model(self, request, obj, form, change):
        """A new token gets its key here; the message that shows it is the only time anyone sees it."""
        if change:
            return super().save_model(request, obj, form, change)
        key = tokens.issue(obj)
        obj.created_by = request.user
        super().save_model(request, obj, form, change)
        self.message_user(request, f"The key for {obj.name} is {key}. Copy it now: it is stored only as a "
                                   "digest and cannot be shown again.", messages.WARNING)

    @admin.display(description="libraries")
    def scope(self, obj):
        return ", ".join(lib.name for lib in obj.libraries.all()) or "none (every path is 403)"

    @admin.display(description="status", ordering="revoked_at")
    def status(self, obj):
        return f"revoked {obj.revoked_at:%Y-%m-%d %H:%M}" if obj.revoked_at else "live"

    @admin.action(description="Revoke (the key stops working at once; the row stays for the log)",
                  permissions=["change"])
    def revoke(self, request, queryset):
        n = tokens.revoke(queryset)
        self.message_user(request, f"Revoked {n} token(s).", messages.SUCCESS)
