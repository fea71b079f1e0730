"""``/admin/preview/<library id>/``: what each standard-tags policy would write for sample tracks (read only)."""
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, render

from workers.models import Library
from workers.tagfiles import standard
from workers.tagging.preview import preview


def preview_page(request, library_id: int):
    if not request.user.has_perm("workers.view_track"):
        raise PermissionDenied
    library = get_object_or_404(Library, id=library_id)
    sample = request.GET.get("sample", "5")
    sample = min(max(int(sample), 1), 50) if sample.isdigit() else 5
    return render(request, "workers/preview.html", {
        **admin.site.each_context(request),
        "title": f"Tag preview: {library.name}",
        "library": library,
        "rows": preview(library, sample),
        "policies": standard.POLICIES,
        "fields": standard.CATEGORY_FIELDS,
    })
