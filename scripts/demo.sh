#!/usr/bin/env bash
# The main job: set up what is missing, then run the demo on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test,demo
exec .venv/bin/python -m examples.kvcache "$@"
