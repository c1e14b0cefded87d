#!/bin/sh
# Build the raw libfabric baseline. OUT overrides the output path.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-"$HERE/fi_bench"}
gcc -O2 -Wall -Wextra -o "$OUT" "$HERE/fi_bench.c" $(pkg-config --cflags --libs libfabric)
