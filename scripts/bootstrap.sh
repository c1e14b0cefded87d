#!/usr/bin/env bash
# Installs what aiote needs on a fresh Debian/Ubuntu machine, idempotently:
#   libfabric headers (apt, when root), a virtualenv in .venv, and aiote with
#   its native part built (pip install -e .[EXTRAS]).
# Usage: scripts/bootstrap.sh [EXTRAS]      (default extras: test)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
PY="${PYTHON:-python3}"

if ! pkg-config --exists libfabric 2>/dev/null && [ -z "${LIBFABRIC_ROOT:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing libfabric-dev (apt)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq libfabric-dev libfabric-bin pkg-config >/dev/null
  else
    echo "bootstrap: libfabric development files are missing. Install them with:" >&2
    echo "  sudo apt-get install -y libfabric-dev libfabric-bin pkg-config" >&2
    echo "or point LIBFABRIC_ROOT at a libfabric install (e.g. /opt/amazon/efa)." >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$PY" -m venv .venv
fi
# Build requirements first, then build without isolation (offline-friendly, faster).
.venv/bin/python -m pip install -q --disable-pip-version-check "setuptools>=64" wheel "cffi>=1.16"
stamp=.venv/.aiote-installed-$extras
if [ ! -f "$stamp" ] || [ native -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
   || [ -n "$(find native -newer "$stamp" -print -quit 2>/dev/null)" ] || ! .venv/bin/python -c "import aiote._native" 2>/dev/null; then
  echo "bootstrap: installing aiote[$extras] (builds the native part)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[$extras]"
  touch "$stamp"
fi
