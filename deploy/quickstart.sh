#!/usr/bin/env bash
# Set everything up and run Earmark on its embedded default (SQLite), in the foreground.
#   deploy/quickstart.sh                 # a demo library is made under var/demo-library
#   deploy/quickstart.sh /path/to/music  # your own library instead
# Ctrl-C stops supervisord and every worker cleanly.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
deploy/bootstrap.sh
source deploy/env.sh
mkdir -p "$EARMARK_DATA_DIR"
chmod 0700 "$EARMARK_DATA_DIR"

# Secrets come from the environment; the quick start keeps a generated one in var/.
if [ -z "${SECRET_KEY:-}" ]; then
  [ -s "$EARMARK_DATA_DIR/secret-key" ] || (umask 077; .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(50))' > "$EARMARK_DATA_DIR/secret-key")
  SECRET_KEY="$(cat "$EARMARK_DATA_DIR/secret-key")"
  export SECRET_KEY
fi
manage() { .venv/bin/python manage.py "$@"; }

manage migrate --noinput -v0
manage collectstatic --noinput -v0
password="$(manage ensure_admin --username "${EARMARK_ADMIN_USER:-admin}" --password-file "$EARMARK_DATA_DIR/admin-password")"
manage install_models

library_path="${1:-}"
if [ -z "$library_path" ]; then
  library_path="$EARMARK_DATA_DIR/demo-library"
  [ -d "$library_path" ] || manage make_demo_library "$library_path" --tracks "${EARMARK_DEMO_TRACKS:-60}"
  library_name="demo"
else
  library_name="$(basename "$(realpath "$library_path")")"
fi
manage library show "$library_name" >/dev/null 2>&1 || manage library add "$library_name" "$library_path"
manage scan "$library_name"

cat <<INFO

  Earmark is starting.
  Admin:     http://$EARMARK_WEB_HOST:$EARMARK_WEB_PORT/admin/
  Dashboard: http://$EARMARK_WEB_HOST:$EARMARK_WEB_PORT/admin/dashboard/
  User:      ${EARMARK_ADMIN_USER:-admin}
  Password:  $password
  Library:   $library_name ($library_path)
  Control:   deploy/earmark-ctl status   (logs in $EARMARK_LOG_DIR)

INFO
exec deploy/earmark-supervisord
