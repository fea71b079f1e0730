#!/usr/bin/env python
"""Django's command-line entry point for Earmark.

Every failing command says why: Django prints a ``CommandError`` as one line;
anything else gets its traceback (for bug reports) and then one line naming
the command and the error, with a hint where the cause is usually outside
Earmark (a database that is busy or unreachable).
"""
import os
import sys
import traceback

HINTS = {
    "OperationalError": "the database is busy or unreachable; check DATABASE_URL and try again",
    "InterfaceError": "the database connection was lost; try again",
}


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last word on any failure
        traceback.print_exc()
        name = type(exc).__name__
        hint = HINTS.get(name)
        command = " ".join(sys.argv[1:3])
        sys.stderr.write(f"\nmanage.py {command} failed: {name}: {exc}" + (f" ({hint})" if hint else "") + "\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
