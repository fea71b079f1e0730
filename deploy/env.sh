# Defaults for every setting deploy/supervisord.conf reads; sourced by
# earmark-supervisord and earmark-ctl. Variables already set win.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export EARMARK_HOME="${EARMARK_HOME:-$here}"
export EARMARK_DATA_DIR="${EARMARK_DATA_DIR:-$EARMARK_HOME/var}"
export EARMARK_PYTHON="${EARMARK_PYTHON:-$EARMARK_HOME/.venv/bin/python}"
export EARMARK_LOG_DIR="${EARMARK_LOG_DIR:-$EARMARK_DATA_DIR/log}"
export EARMARK_RUN_DIR="${EARMARK_RUN_DIR:-$EARMARK_DATA_DIR/run}"
export EARMARK_SUPERVISOR_SOCKET="${EARMARK_SUPERVISOR_SOCKET:-$EARMARK_RUN_DIR/supervisor.sock}"
# Config files supervisord.conf includes: the admin writes numprocs.conf there (workers/live/numprocs.py).
export EARMARK_SUPERVISOR_CONF_DIR="${EARMARK_SUPERVISOR_CONF_DIR:-$EARMARK_DATA_DIR/supervisor}"
export EARMARK_WEB_HOST="${EARMARK_WEB_HOST:-127.0.0.1}"
export EARMARK_WEB_PORT="${EARMARK_WEB_PORT:-8000}"
export EARMARK_WEB_AUTOSTART="${EARMARK_WEB_AUTOSTART:-true}"
export EARMARK_SCANNERS="${EARMARK_SCANNERS:-4}"
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-project.settings}"
# GPUs on this host (nvidia-smi's count when not set) and taggers per GPU; two
# single-thread taggers on a CPU-only host measured fastest on 2 cores.
if [ -z "${EARMARK_GPUS:-}" ]; then
  EARMARK_GPUS=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU') || echo 0)
fi
export EARMARK_GPUS
export EARMARK_TAGGERS_PER_GPU="${EARMARK_TAGGERS_PER_GPU:-1}"
if [ "$EARMARK_GPUS" -gt 0 ]; then
  export EARMARK_TAGGERS="${EARMARK_TAGGERS:-$((EARMARK_GPUS * EARMARK_TAGGERS_PER_GPU))}"
else
  export EARMARK_TAGGERS="${EARMARK_TAGGERS:-2}"
fi
export EARMARK_TAGGER_DEVICE="${EARMARK_TAGGER_DEVICE:-auto}"
export EARMARK_TAGGER_AUTOSTART="${EARMARK_TAGGER_AUTOSTART:-true}"
# Recalibrators rewrite tags from stored scores (no torch): cheap, CPU light.
export EARMARK_RECALIBRATORS="${EARMARK_RECALIBRATORS:-2}"
export EARMARK_RECALIBRATOR_AUTOSTART="${EARMARK_RECALIBRATOR_AUTOSTART:-true}"
# The library watcher (one per host): new and changed files are scanned by themselves.
export EARMARK_WATCHER_AUTOSTART="${EARMARK_WATCHER_AUTOSTART:-true}"
