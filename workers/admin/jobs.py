"""The admin's job pages: every queue's jobs, their attempts and errors; retry and cancel (operate queues)."""
from __future__ import annotations

from django.contrib import admin, messages

from workers.admin.common import WorkerRows, json_block, pre, short
from workers.jobs import queue
from workers.live.views import OPERATE_PERMISSION, log_action
from workers.models import Job


@admin.register(Job)
class JobAdmin(WorkerRows, admin.ModelAdmin):
    """Jobs come from scans and actions, with their dedup keys; the page retries and cancels them."""

    list_display = ["id", "queue", "key", "state", "priority", "attempts_of", "claimed_by", "created_at",
                    "finished_at", "short_error"]
    list_filter = ["queue", "state", "library"]
    search_fields = ["key", "last_error", "claimed_by"]
    actions = ["retry", "cancel"]
    show_full_result_count = False
    fields = ["queue", "key", "state", "priority", "attempts", "max_attempts", "run_after", "claimed_by", "boot_id",
              "lease_expires", "library", "track", "created_at", "started_at", "finished_at", "payload_json",
              "result_json", "error"]

    @admin.display(description="attempts")
    def attempts_of(self, obj):
        return f"{obj.attempts}/{obj.max_attempts}"

    @admin.display(description="error")
    def short_error(self, obj):
        return short(obj.last_error)

    @admin.display(description="error (in full)")
    def error(self, obj):
        return pre(obj.last_error)

    @admin.display(description="payload")
    def payload_json(self, obj):
        return json_block(obj.payload)

    @admin.display(description="result")
    def result_json(self, obj):
        return json_block(obj.result)

    def has_operate_permission(self, request) -> bool:
        """Retry and cancel are queue work, the operators' job: ``workers.operate_queues``, as on the dashboard.

        Not ``change_job``: no one edits a job's row by hand, and an operator
        who may pause a whole queue may surely retry one of its jobs.
        """
        return request.user.has_perm(OPERATE_PERMISSION)

    @admin.action(description="Retry (failed or cancelled jobs)", permissions=["operate"])
    def retry(self, request, queryset):
        ids = list(queryset.values_list("id", flat=True))
        n = queue.retry(ids)
        log_action(request, "retry", f"requeued {n} of {len(ids)} chosen job(s)", what="jobs")
        self.message_user(request, f"Requeued {n} job(s).", messages.SUCCESS)

    @admin.action(description="Cancel (queued jobs; running ones finish)", permissions=["operate"])
    def cancel(self, request, queryset):
        ids = list(queryset.values_list("id", flat=True))
        n = queue.cancel(ids)
        log_action(request, "cancel", f"cancelled {n} of {len(ids)} chosen job(s)", what="jobs")
        self.message_user(request, f"Cancelled {n} job(s).", messages.SUCCESS)
