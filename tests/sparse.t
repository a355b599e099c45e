#!/bin/bash
# Holes are reported as holes: nbdinfo --map and qemu-img map on a sparse
# file and on a 1T memory disk with three small writes; trim punches holes.
. "$(dirname "$0")/lib/functions.sh"
requires nbdinfo nbdsh qemu-img
plan 11

# map URI: "offset length type;" for every extent nbdinfo reports.
map() { nbdinfo --map "$1" | awk '{printf "%s %s %s;", $1, $2, $3}'; }
# qmap URI: "start:data" for every extent qemu-img reports.
qmap() {
    qemu-img map -f raw --output=json "$1" | "$PYTHON" -c '
import json, sys
print(" ".join("%d:%s" % (e["start"], e["data"]) for e in json.load(sys.stdin)))'
}

# ---- file plugin: a 16M file with 1M of data at 4M ----
truncate -s 16M "$tmp/sparse.img"
head -c 1M /dev/urandom | dd of="$tmp/sparse.img" bs=1M seek=4 conv=notrunc status=none
start_server file file "$tmp/sparse.img"
is "file: nbdinfo --map shows hole, data, hole" "$(map "$uri")" \
   "0 4194304 3;4194304 1048576 0;5242880 11534336 3;"
is "file: qemu-img map agrees" "$(qmap "$uri")" "0:False 4194304:True 5242880:False"
nbdcopy "$uri" "$tmp/copy"
check "file: a read across the holes compares equal" cmp "$tmp/sparse.img" "$tmp/copy"

# Trim punches a hole in the file itself.
before=$(stat -c %b "$tmp/sparse.img")
nbdsh -u "$uri" -c 'h.trim(1 << 20, 4 << 20); h.flush()'
after=$(stat -c %b "$tmp/sparse.img")
if [ "$after" -lt "$before" ]; then ok "file: trim frees the blocks ($before -> $after)"
else not_ok "file: trim frees the blocks ($before -> $after)"; fi
is "file: after trim the whole file is one hole" "$(map "$uri")" "0 16777216 3;"
# Written through, the file has no hole left (and the plugin takes the
# short way: a file with as many blocks as bytes is all data).
head -c 16M /dev/urandom > "$tmp/full"
nbdcopy "$tmp/full" "$uri"
is "file: once written in full, the whole file is one data extent" "$(map "$uri")" \
   "0 16777216 0;"
stop_server

# ---- memory plugin: 1T, pages of 64K, three writes ----
start_server big memory 1T
nbdsh -u "$uri" -c '
h.pwrite(b"a" * 4096, 0)
h.pwrite(b"b" * 4096, 1 << 30)
h.pwrite(b"c" * 4096, (1 << 40) - 65536)
'
is "memory 1T: nbdinfo --map shows exactly the three pages" "$(map "$uri")" \
   "0 65536 0;65536 1073676288 3;1073741824 65536 0;1073807360 1098437754880 3;1099511562240 65536 0;"
is "memory 1T: qemu-img map agrees" "$(qmap "$uri")" \
   "0:True 65536:False 1073741824:True 1073807360:False 1099511562240:True"
is "memory 1T: data reads back around the holes" "$(nbdsh -u "$uri" -c '
print(h.pread(8192, 0) == b"a" * 4096 + bytes(4096),
      h.pread(4096, 1 << 30) == b"b" * 4096,
      h.pread(65536, (1 << 40) - 65536) == b"c" * 4096 + bytes(61440),
      h.pread(65536, 1 << 39) == bytes(65536))')" "True True True True"
# Trimming and zeroing whole pages gives them back.
nbdsh -u "$uri" -c '
h.trim(65536, 1 << 30)
h.zero(65536, (1 << 40) - 65536)
'
is "memory 1T: trim and zero of whole pages leave holes" "$(map "$uri")" \
   "0 65536 0;65536 1099511562240 3;"
nbdsh -u "$uri" -c 'h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE)'
is "memory 1T: zero with NO_HOLE reads as zeroes" \
   "$(nbdsh -u "$uri" -c 'print(h.pread(65536, 0) == bytes(65536))')" "True"
stop_server
finish
