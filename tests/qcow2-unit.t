#!/bin/bash
# The qcow2 library's C unit test (tests/lib/qcow2-unit.c): images built
# byte by byte, read through common/qcow2 directly.  The program prints
# its own TAP; this wrapper gives it a private directory in $tmp and a
# time limit, so a deadlock in the cache or a thread shows as a failure.
# The whole file's watchdog (functions.sh, 300 s by default) must not
# cut short the unit's own limit below.
TEST_TIMEOUT=${TEST_TIMEOUT:-1300}
. "$(dirname "$0")/lib/functions.sh"

unit="$top/tests/lib/qcow2-unit"
[ -x "$unit" ] || skip_all "tests/lib/qcow2-unit is not built (run make)"

# Sanitizer builds run the threaded part many times slower (TSAN: about
# 260 s alone on 2 CPUs): the limit is for a deadlock, not for speed.
limit=300
grep -q -- '-fsanitize=thread' "$top/.build-flags" 2> /dev/null && limit=1200
timeout -k 5 $limit "$unit" "$tmp"
rc=$?
[ $rc -eq 124 ] && echo "# qcow2-unit ran for over $limit s"
cleanup
trap - EXIT
exit $rc
