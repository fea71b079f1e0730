#!/usr/bin/env bash
# Set up .venv with the test dependencies and run the whole test suite.
#   deploy/test.sh            # everything
#   deploy/test.sh -k queue   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
deploy/bootstrap.sh --test
exec .venv/bin/python -m pytest "$@"
