#!/usr/bin/env bash
# Create or update .venv with everything Earmark needs. Idempotent and quick on reruns.
#   deploy/bootstrap.sh          # run-time dependencies (torch included)
#   deploy/bootstrap.sh --test   # plus test and benchmark dependencies
# EARMARK_TORCH_SPEC overrides the torch requirement, e.g. for a CUDA build:
#   EARMARK_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="ml"
[ "${1:-}" = "--test" ] && extras="ml,test,bench"
torch_spec="${EARMARK_TORCH_SPEC:-torch==2.13.0}"

python="${EARMARK_BOOTSTRAP_PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "Earmark needs Python 3.11 (found $("$python" --version 2>&1))." >&2
  exit 1
fi
if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' 2>/dev/null; then
  # Debian splits venv out of the interpreter package.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "Install python3-venv first (sudo apt-get install python3-venv)." >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv

# The browser test drives Debian's Chromium (never a downloaded browser build).
if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "Note: /usr/bin/chromium is missing; the browser test will be skipped (sudo apt-get install chromium)." >&2
  fi
fi

stamp=".venv/.earmark-$(cat pyproject.toml deploy/bootstrap.sh | sha256sum | cut -c1-16)-${extras//,/-}-$(echo "$torch_spec" | sha256sum | cut -c1-8)"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: an open range would pull a multi-GB CUDA build.
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $torch_spec
  .venv/bin/python -m pip install -q -e ".[${extras}]"
  rm -f .venv/.earmark-*
  touch "$stamp"
fi
