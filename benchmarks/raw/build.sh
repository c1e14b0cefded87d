#!/bin/sh
# Build the raw libfabric baselines: fi_bench (single NIC) and fi_kbench (k NICs).
# FI_BENCH_OUT / FI_KBENCH_OUT override the output paths.  (Not OUT: the
# device machines set OUT to a results folder.)  Without pkg-config data for
# libfabric (the device machines), plain -lfabric is used.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
FI_BENCH_OUT=${FI_BENCH_OUT:-"$HERE/fi_bench"}
FI_KBENCH_OUT=${FI_KBENCH_OUT:-"$HERE/fi_kbench"}
FLAGS=$(pkg-config --cflags --libs libfabric 2>/dev/null || echo -lfabric)
gcc -O2 -Wall -Wextra -o "$FI_BENCH_OUT" "$HERE/fi_bench.c" $FLAGS
gcc -O2 -Wall -Wextra -pthread -o "$FI_KBENCH_OUT" "$HERE/fi_kbench.c" $FLAGS
