# Defaults for every setting deploy/supervisord.conf reads; sourced by
# earmark-supervisord and earmark-ctl. Variables already set win.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export EARMARK_HOME="${EARMARK_HOME:-$here}"
export EARMARK_DATA_DIR="${EARMARK_DATA_DIR:-$EARMARK_HOME/var}"
export EARMARK_PYTHON="${EARMARK_PYTHON:-$EARMARK_HOME/.venv/bin/python}"
export EARMARK_LOG_DIR="${EARMARK_LOG_DIR:-$EARMARK_DATA_DIR/log}"
export EARMARK_RUN_DIR="${EARMARK_RUN_DIR:-$EARMARK_DATA_DIR/run}"
export EARMARK_SUPERVISOR_SOCKET="${EARMARK_SUPERVISOR_SOCKET:-$EARMARK_RUN_DIR/supervisor.sock}"
export EARMARK_WEB_HOST="${EARMARK_WEB_HOST:-127.0.0.1}"
export EARMARK_WEB_PORT="${EARMARK_WEB_PORT:-8000}"
export EARMARK_WEB_AUTOSTART="${EARMARK_WEB_AUTOSTART:-true}"
export EARMARK_SCANNERS="${EARMARK_SCANNERS:-4}"
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-project.settings}"
