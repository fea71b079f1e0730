"""URL routes: the admin and, from the live-admin issue on, the event stream."""
from django.contrib import admin
from django.urls import path

urlpatterns = [
    path("admin/", admin.site.urls),
]
