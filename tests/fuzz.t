#!/bin/bash
# The fuzzing harnesses build, and every input of their checked-in
# corpora (seeds, and crashes found earlier, kept as regressions) runs
# through them cleanly.  No fuzzing happens here: that is `make fuzz`.
. "$(dirname "$0")/lib/functions.sh"
requires clang
targets=(handshake transmission parsers qcow2 qcow2-overlay)
plan $((1 + ${#targets[@]}))

if make -s -C "$top" fuzz-build > "$tmp/build.log" 2>&1; then
    ok "make fuzz-build: the harnesses build with clang and libFuzzer"
else
    not_ok "make fuzz-build"; diag_file "$tmp/build.log" 40
fi
for t in "${targets[@]}"; do
    n=$(ls "$top/tests/fuzz/$t" | wc -l)
    if timeout 300 "$top/fuzz/build/$t" -runs=0 -close_fd_mask=2 "$top/tests/fuzz/$t" > "$tmp/$t.log" 2>&1; then
        ok "$t: the $n corpus inputs run cleanly"
    else
        not_ok "$t: a corpus input fails"; diag_file "$tmp/$t.log" 60
    fi
done
finish
