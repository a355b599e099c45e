#!/bin/bash
# The benchmark script works: a BENCH_SMOKE run (nbdserve only, tiny
# sizes, one round) produces a figure for every workload.  No timings
# are judged here; `make bench` is where speed is measured.
. "$(dirname "$0")/lib/functions.sh"
requires fio
plan 3

BENCH_SMOKE=1 BENCH_OUT="$tmp/out" timeout 300 "$PYTHON" "$top/bench/bench.py" \
    > "$tmp/table" 2> "$tmp/bench.log"
rc=$?
is "BENCH_SMOKE run: exit status 0" "$rc" 0
[ $rc = 0 ] || diag_file "$tmp/bench.log" 40
rows=$(grep '^| [a-z0-9]' "$tmp/table" | grep -vc '^| workload ')
with_numbers=$(awk -F'|' '/^\| [a-z0-9]/ && $4 ~ /^ [0-9.]+ \(/' "$tmp/table" | wc -l)
is "every workload row has a figure for nbdserve ($rows rows)" "$with_numbers" "$rows"
check "the report is written to BENCH_OUT" test -s "$tmp/out/performance.md"
finish
