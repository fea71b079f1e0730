"""``manage.py api_token create|list|revoke``: the HTTP API's keys, beside the admin's API token pages.

``create NAME --library L…`` prints the key once (only its digest is stored);
``revoke NAME`` (or its prefix) stops it at once and keeps the row, so the log
stays attributable.
"""
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from workers.api import tokens
from workers.models import ApiToken, Library


class Command(BaseCommand):
    help = "Create, list and revoke API tokens for the hooks' HTTP API."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="Make a token; its key is printed once.")
        create.add_argument("name")
        create.add_argument("--library", action="append", default=[], metavar="LIBRARY", required=True,
                            help="A library (by name) whose paths the key may use; repeatable.")
        sub.add_parser("list", help="One line per token (never the key).")
        revoke = sub.add_parser("revoke", help="Revoke a live token by name or prefix.")
        revoke.add_argument("name")

    def handle(self, *args, action, **options):
        getattr(self, f"do_{action}")(**options)

    def do_create(self, name, library, **_):
        found = {lib.name: lib for lib in Library.objects.filter(name__in=library)}
        missing = [n for n in library if n not in found]
        if missing:
            raise CommandError(f"no library named {', '.join(map(repr, missing))}")
        try:
            made = tokens.create(name, found.values())
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stderr.write(f"created token {made.token.name} for {', '.join(sorted(found))}; its key "
                          "(shown only now; send it as Authorization: Bearer <key>):")
        self.stdout.write(made.key)

    def do_list(self, **_):
        for token in ApiToken.objects.prefetch_related("libraries"):
            libraries = ",".join(lib.name for lib in token.libraries.all()) or "-"
            used = f"used {token.last_used_at:%Y-%m-%d %H:%M:%S}" if token.last_used_at else "never used"
            state = f"revoked {token.revoked_at:%Y-%m-%d %H:%M:%S}" if token.revoked_at else "live"
            self.stdout.write(f"{token.name}\t{token.prefix}\t{libraries}\t{state}\t{used}")

    def do_revoke(self, name, **_):
        matching = tokens.find(name)
        if not matching.exists():
            raise CommandError(f"no token named {name!r}")
        n = tokens.revoke(matching)
        self.stdout.write(f"revoked {n} token(s) named {name}" if n else f"{name} was revoked already")
