#!/bin/bash
# Holes are reported as holes (nbdinfo --map, qemu-img map, sparse reads).
. "$(dirname "$0")/lib/functions.sh"
plan 5

truncate -s 16M "$tmp/sparse.img"
printf 'data' | dd of="$tmp/sparse.img" bs=1M seek=4 conv=notrunc status=none
start_server file file "$tmp/sparse.img"
map=$(nbdinfo --map "$uri" | awk '{print $1, $2, $3}' | tr '\n' ';')
case "$map" in
    "0 4194304 3;4194304 "*" 0;"*" 3;") ok "file: nbdinfo --map shows hole, data, hole ($map)";;
    *) not_ok "file: nbdinfo --map shows hole, data, hole"; diag "$map";;
esac
qmap=$(qemu-img map -f raw --output=json "$uri" | /usr/bin/python3 -c "
import json, sys
print(' '.join('%d:%s' % (e['start'], e['data']) for e in json.load(sys.stdin)))")
case "$qmap" in
    "0:False 4194304:True "*":False") ok "file: qemu-img map agrees ($qmap)";;
    *) not_ok "file: qemu-img map agrees"; diag "$qmap";;
esac
# A big read over holes still returns the right bytes.
nbdcopy "$uri" "$tmp/copy"
check "file: sparse read compares equal" cmp "$tmp/sparse.img" "$tmp/copy"
stop_server

start_server big memory 1T
nbdsh -u "$uri" -c '
h.pwrite(b"a" * 4096, 0)
h.pwrite(b"b" * 4096, 1 << 30)
h.pwrite(b"c" * 4096, (1 << 40) - 65536)
' 
map=$(nbdinfo --map "$uri" | awk '{print $1, $2, $3}' | tr '\n' ';')
is "1T memory disk with 3 writes maps to exactly those pages" "$map" \
   "0 65536 0;65536 1073676288 3;1073741824 65536 0;1073807360 1098437754880 3;1099511562240 65536 0;"
qcount=$(qemu-img map -f raw --output=json "$uri" | /usr/bin/python3 -c "
import json, sys
print(sum(1 for e in json.load(sys.stdin) if e['data']))")
is "qemu-img map sees 3 data extents" "$qcount" 3
finish
