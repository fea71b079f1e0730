#!/usr/bin/env bash
# The GPU check of `python -m bench.tagger` and of the batched torch features
# (`python -m bench.features_gpu`: numpy path against torch path), as one prepared run on a lent GPU
# machine: it has Python 3 and a CUDA build of torch, but no network and none
# of Earmark's other packages.
#
#   bench/device_check.sh prepare   # here: fills .whl/ and .gpu/ (ignored by git)
#   bench/device_check.sh run       # there, from the repository root, with .whl
#                                   # and .gpu carried; the log goes to $OUT
#
# prepare downloads the compiled and plain dependencies as wheels for the
# device's Python (DEVICE_PY, default 3.12), copies the pure-Python packages
# the settings import from .venv, and installs the models from the cached
# musicnn wheel. run installs the wheels into /tmp/site and runs the GPU
# sweep and the batching tagger on the GPU (BENCH_ARGS to change sizes), then
# the features bench (FEATURES_ARGS). workers.features (there, and in the tagger's
# decode workers) needs numpy, scipy and numba on the device: their cp312 wheels are
# ~115 MB, over what a run may carry (64 MiB), so the device image must have them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
prepare)
  py="${DEVICE_PY:-3.12}"
  rm -rf .whl && mkdir -p .whl .gpu/stubs
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" -d .whl \
    "av==18.1.0" "Django>=5.2,<5.3" "django-environ>=0.12" "mutagen>=1.47" asgiref sqlparse
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for pkg in django_eventstream django_grip.py gripcontrol pubcontrol jwt whitenoise supervisor; do
    rm -rf ".gpu/stubs/$pkg" && cp -r "$site/$pkg" .gpu/stubs/
  done
  wheel=$(ls var/cache/wheels/musicnn-0.1.0-*.whl 2>/dev/null | head -1)
  EARMARK_MODELS_DIR="$PWD/.gpu/models" SECRET_KEY=prepare .venv/bin/python manage.py install_models \
    ${wheel:+--from-wheel "$wheel"}
  du -sh .whl .gpu
  ;;
run)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/.gpu/stubs" EARMARK_MODELS_DIR="$PWD/.gpu/models"
  nvidia-smi -L
  python3 -m bench.tagger --gpu ${BENCH_ARGS:---tracks 24 --pipeline-tracks 300 --repeats 2} 2>&1 \
    | tee "${OUT:-/tmp}/gpu-bench.txt"
  python3 -m bench.features_gpu ${FEATURES_ARGS:---files 32 --seconds 120 --repeats 3} 2>&1 \
    | tee "${OUT:-/tmp}/gpu-features.txt"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
