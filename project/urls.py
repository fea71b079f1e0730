"""URL routes: the admin with its live dashboard, the event stream that keeps it live, and the hooks' API."""
from django.contrib import admin
from django.shortcuts import redirect
from django.templatetags.static import static
from django.urls import path

from workers.admin import exports, preview
from workers.admin.failures import failures_page
from workers.api import views as api
from workers.live import views


def favicon(request):
    """Browsers ask for /favicon.ico before (or without) reading the page's icon link: send them to the SVG."""
    return redirect(static("workers/favicon.svg"))


urlpatterns = [
    # Before admin.site.urls, whose catch-all would otherwise claim these paths.
    path("admin/dashboard/", admin.site.admin_view(views.dashboard), name="earmark-dashboard"),
    path("admin/dashboard/plots/", admin.site.admin_view(views.plots_page), name="earmark-plots"),
    path("admin/dashboard/queues/", admin.site.admin_view(views.queue_control), name="earmark-queue-control"),
    path("admin/dashboard/supervisor/", admin.site.admin_view(views.supervisor_control), name="earmark-supervisor"),
    path("admin/dashboard/supervisor/table/", admin.site.admin_view(views.supervisor_table),
         name="earmark-supervisor-table"),
    path("admin/dashboard/supervisor/numprocs/", admin.site.admin_view(views.supervisor_numprocs),
         name="earmark-supervisor-numprocs"),
    path("admin/failures/", admin.site.admin_view(failures_page), name="earmark-failures"),
    path("admin/exports/navidrome/", admin.site.admin_view(exports.navidrome_download), name="earmark-export-navidrome"),
    path("admin/exports/playlists/", admin.site.admin_view(exports.playlists_download), name="earmark-export-playlists"),
    path("admin/preview/<int:library_id>/", admin.site.admin_view(preview.preview_page), name="earmark-preview"),
    path("admin/", admin.site.urls),
    path("events/", views.events, name="earmark-events"),
    path("favicon.ico", favicon, name="earmark-favicon"),
    # The hooks' HTTP API: token-authenticated, never by session (workers.api.views).
    path("api/enqueue", api.enqueue_view, name="earmark-api-enqueue"),
    path("api/tracks", api.tracks_view, name="earmark-api-tracks"),
]
