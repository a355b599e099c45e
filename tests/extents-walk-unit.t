#!/bin/bash
# common/extents-walk.h's C unit test (tests/lib/extents-walk-unit.c):
# the walk that fills a BLOCK_STATUS reply for qcow2-readonly and
# dirty-bitmap-overlay, against a stand-in builder.  The program prints
# its own TAP.
. "$(dirname "$0")/lib/functions.sh"

unit="$top/tests/lib/extents-walk-unit"
[ -x "$unit" ] || skip_all "tests/lib/extents-walk-unit is not built (run make)"
timeout -k 5 60 "$unit"
rc=$?
cleanup
trap - EXIT
exit $rc
