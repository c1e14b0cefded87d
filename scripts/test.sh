#!/usr/bin/env bash
# The test command: set up what is missing, then run the whole suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k imm -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test,demo,docs
exec .venv/bin/python -m pytest "$@"
