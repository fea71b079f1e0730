"""API tokens: made in the admin or by ``manage.py api_token``, the key shown once, only a digest stored, revocable.

The key is in the admin's message after the add view and on the command's
stdout, and nowhere else: not in the row, not in ``list``, not on a later page.
"""
from __future__ import annotations

import io

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse

from workers.api import tokens
from workers.models import ApiToken

ADD, CHANGELIST = reverse("admin:workers_apitoken_add"), reverse("admin:workers_apitoken_changelist")


def _command(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("api_token", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def _stored_text(token: ApiToken) -> str:
    return " ".join(str(v) for v in ApiToken.objects.filter(id=token.id).values().get().values())


def test_the_command_creates_lists_and_revokes(world):
    key, note = _command("create", "beets", "--library", "A", "--library", "B")
    key = key.strip()
    assert key.startswith("em_") and "beets" in note and key not in note
    token = ApiToken.objects.get(name="beets")
    assert sorted(lib.name for lib in token.libraries.all()) == ["A", "B"]
    assert key.split("_", 2)[2] not in _stored_text(token) and token.digest == tokens.digest(key)
    assert world.post({"paths": [str(world.other)]}, key=key).status_code == 202, "B is in this token's scope"

    listing, _ = _command("list")
    lines = dict(line.split("\t", 1) for line in listing.splitlines())
    assert set(lines) == {"beets", "lidarr"}
    assert lines["beets"].startswith(f"{token.prefix}\tA,B\tlive\tused ")
    assert lines["lidarr"].endswith("never used") and key not in listing

    out, _ = _command("revoke", "beets")
    assert "revoked 1" in out
    assert world.post({"paths": [str(world.other)]}, key=key).status_code == 401
    assert "\trevoked " in dict(line.split("\t", 1) for line in _command("list")[0].splitlines())["beets"]
    assert "revoked already" in _command("revoke", token.prefix)[0]  # by prefix too; twice is harmless
    assert world.post({"paths": [str(world.song)]}).status_code == 202, "the other token is untouched"


@pytest.mark.parametrize("args, message", [
    (("create", "x", "--library", "nope"), "no library named 'nope'"),
    (("create", "lidarr", "--library", "A"), "exists already"),
    (("create", " ", "--library", "A"), "needs a name"),
    (("revoke", "nobody"), "no token named"),
])
def test_the_command_refuses_what_it_cannot_do(world, args, message):
    with pytest.raises(CommandError, match=message):
        _command(*args)
    assert ApiToken.objects.count() == 1


def test_a_revoked_name_may_be_used_again(world):
    tokens.revoke(ApiToken.objects.all())
    assert _command("create", "lidarr", "--library", "A")[0].strip().startswith("em_")
    assert ApiToken.objects.filter(name="lidarr").count() == 2


def test_the_admin_shows_the_key_once_and_revokes(world, admin_user):
    client = Client()
    client.force_login(admin_user)
    response = client.post(ADD, {"name": "picard", "libraries": [world.a.id]}, follow=True)
    assert response.status_code == 200
    token = ApiToken.objects.get(name="picard")
    [message] = [str(m) for m in response.context["messages"] if "em_" in str(m)]
    key = next(word for word in message.split() if word.startswith("em_")).rstrip(".")
    assert token.digest == tokens.digest(key) and token.created_by == admin_user
    assert world.post({"paths": [str(world.song)]}, key=key).status_code == 202
    for url in (CHANGELIST, reverse("admin:workers_apitoken_change", args=[token.id])):
        page = client.get(url)
        assert page.status_code == 200 and key not in page.content.decode() and token.digest not in page.content.decode()

    response = client.post(CHANGELIST, {"action": "revoke", "_selected_action": [token.id]}, follow=True)
    assert "Revoked 1 token(s)." in [str(m) for m in response.context["messages"]]
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert world.post({"paths": [str(world.song)]}, key=key).status_code == 401
    assert "revoked" in client.get(CHANGELIST).content.decode()


def test_the_admin_refuses_a_duplicate_live_name(world, admin_user):
    client = Client()
    client.force_login(admin_user)
    response = client.post(ADD, {"name": "lidarr", "libraries": [world.a.id]})
    assert response.status_code == 200 and "exists already" in response.content.decode()
    assert ApiToken.objects.count() == 1


def test_staff_need_the_token_permissions(world, django_user_model):
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    client = Client()
    client.force_login(staff)
    assert client.get(ADD).status_code == 403
    assert client.post(ADD, {"name": "sneaky", "libraries": [world.a.id]}).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_apitoken"))
    assert client.get(CHANGELIST).status_code == 200
    token = ApiToken.objects.get()
    client.post(CHANGELIST, {"action": "revoke", "_selected_action": [token.id]})
    token.refresh_from_db()
    assert token.revoked_at is None, "revoking needs the change permission"
    assert ApiToken.objects.count() == 1
