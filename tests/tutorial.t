#!/bin/bash
# The tutorial of docs/plugin-api.md (section 1), as a new user would
# follow it: nbdserve installed (make install DESTDIR=...), every C block
# of the section extracted into the file its marker names, compiled
# with pkg-config's flags, every command whose output the section shows
# run and its output compared; then the plugin, with the filter in
# front, round-trips a sparse image through nbdcopy and its block
# status matches what qemu-img says of the image.
. "$(dirname "$0")/lib/functions.sh"
requires nbdinfo nbdcopy nbdsh qemu-img pkg-config cc
requires_python_nbd
plan 14

doc="$top/docs/plugin-api.md"
work="$tmp/work"
dest="$tmp/dest"
mkdir -p "$work"

# ---- nbdserve installed, found through pkg-config --------------------------
check "make install DESTDIR=..." make_install "$dest"
prefix="$dest/usr/local"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$dest"
export PATH="$prefix/bin:$PATH"
is "pkg-config finds the installed headers" "$(pkg-config --cflags nbdserve 2>&1 | sed 's/ *$//')" "-I$prefix/include"

# ---- the tutorial's C blocks --------------------------------------------------
# Section 1 runs from its heading to the next "## ".  A C block is
# preceded by "<!-- tutorial: FILE -->"; blocks of one FILE are joined
# in order.  Unmarked C blocks are counted: there must be none.
section() { awk '/^## 1\. / { on = 1; print; next } /^## / { on = 0 } on' "$doc"; }
unmarked=$(section | awk '
    /^<!-- tutorial: [a-z0-9_.-]+\.c -->$/ { file = $3; next }
    /^```c$/ { if (file == "") n++; inside = 1; next }
    inside && /^```$/ { inside = 0; file = ""; next }
    !inside && NF { file = "" }
    END { print n + 0 }')
is "every C block of the tutorial says which file it belongs to" "$unmarked" 0
section | awk -v dir="$work" '
    /^<!-- tutorial: [a-z0-9_.-]+\.c -->$/ { file = dir "/" $3; next }
    file && /^```c$/ { inside = 1; next }
    inside && /^```$/ { inside = 0; print "" > file; file = ""; next }
    inside { print > file }'
is "the files the tutorial writes" "$(cd "$work" && ls | tr '\n' ' ')" "ramblocks.c skip.c "
# Stricter than the tutorial asks: the project's own warnings.
for f in ramblocks skip; do
    check "$f.c compiles under the project's strict warnings" \
          cc -std=gnu11 -Wall -Wextra -Werror -Wshadow -Wformat=2 -Wpointer-arith \
             -Wstrict-prototypes -Wmissing-prototypes -Wvla -fsyntax-only \
             $(pkg-config --cflags nbdserve) "$work/$f.c"
done

# ---- the commands whose output the tutorial shows ------------------------------
# In a block preceded by "<!-- tutorial: output -->", a line "$ COMMAND"
# is run in the work directory (by the installed nbdserve, with the
# pkg-config above), and the lines up to the next "$ " or the end of
# the block are what it must print, on stdout and stderr together.
mkdir -p "$tmp/cmds"
section | awk -v dir="$tmp/cmds" '
    /^<!-- tutorial: output -->$/ { want = 1; next }
    want && /^```$/ && !inside { inside = 1; next }
    inside && /^```$/ { inside = 0; want = 0; next }
    inside && /^\$ / { n++; f = sprintf("%s/%02d", dir, n); print substr($0, 3) > (f ".cmd"); printf "" > (f ".want"); next }
    inside { print >> (f ".want") }
    !inside && NF { want = 0 }'
ncmds=$(ls "$tmp/cmds"/*.cmd 2> /dev/null | wc -l)
like "the tutorial shows commands with their output (builds, then runs)" "$ncmds" '^([5-9]|[1-9][0-9])$'
failed=
for cmd in "$tmp/cmds"/*.cmd; do
    (cd "$work" && timeout -k 5 "$CLIENT_TIMEOUT" bash -c "$(cat "$cmd")") > "${cmd%.cmd}.got" 2>&1
    if ! cmp -s "${cmd%.cmd}.got" "${cmd%.cmd}.want"; then
        failed="$failed $(basename "$cmd" .cmd)"
        diag "\$ $(cat "$cmd")"; diag "printed:"; diag_file "${cmd%.cmd}.got"
        diag "the tutorial shows:"; diag_file "${cmd%.cmd}.want"
    fi
done
is "each prints what the tutorial shows (plugin and filter build without a warning)" "$failed" ""
is "... and they built ramblocks.so and skip.so" \
   "$(cd "$work" && ls ramblocks.so skip.so 2>&1 | tr '\n' ' ')" "ramblocks.so skip.so "

# ---- a sparse image through the filter and the plugin --------------------------
# 3 MiB: random data in two places (64 KiB-aligned, as the plugin's
# blocks are), holes elsewhere.  Served 4 MiB with skip=1M in front.
truncate -s 3M "$tmp/src.img"
dd if=/dev/urandom of="$tmp/src.img" bs=64K count=1 conv=notrunc status=none
dd if=/dev/urandom of="$tmp/src.img" bs=64K seek=20 count=3 conv=notrunc status=none
dd if=/dev/urandom of="$tmp/src.img" bs=64K seek=47 count=1 conv=notrunc status=none # the last block
cd "$work" || exit 1
out=$(images=$tmp timeout -k 5 "$CLIENT_TIMEOUT" nbdserve -U - --filter=./skip.so ./ramblocks.so 4M skip=1M --run '
    nbdinfo --size "$uri" &&
    nbdcopy "$images/src.img" "$uri" &&
    nbdcopy "$uri" "$images/out.img" &&
    nbdinfo --map "$uri" > "$images/map.txt"' 2>&1)
is "served through the filter: the export is 4M - skip=1M" "$out" 3145728
check "nbdcopy in and out: the same bytes" cmp "$tmp/src.img" "$tmp/out.img"
# What qemu-img says of the image, against what nbdinfo says of the
# export: "start length data|hole" lines, neighbours merged.
qemu-img map -f raw --output=json "$tmp/src.img" | "$PYTHON" -c '
import json, sys
for e in json.load(sys.stdin):
    print(e["start"], e["length"], "data" if e["data"] else "hole")' > "$tmp/want.map"
awk '{ print $1, $2, ($4 ~ /hole/ ? "hole" : "data") }' "$tmp/map.txt" > "$tmp/got.map"
if cmp -s "$tmp/want.map" "$tmp/got.map" && [ -s "$tmp/want.map" ]; then
    ok "nbdinfo --map through the filter is qemu-img map of the image ($(wc -l < "$tmp/got.map") extents)"
else
    not_ok "nbdinfo --map through the filter is qemu-img map of the image"
    diag "qemu-img map:"; diag_file "$tmp/want.map"; diag "nbdinfo --map:"; diag_file "$tmp/got.map"
fi

# ---- bad parameters: a message, not a crash ---------------------------------------
out=$(timeout -k 5 "$CLIENT_TIMEOUT" nbdserve -U - --filter=./skip.so ./ramblocks.so 1M skip=2M \
        --run 'nbdinfo --size "$uri"' 2>&1)
like "skip= past the end of the disk: the client is refused, the server says why" "$out" \
     'skip: skip=2097152 is more than the whole disk \(1048576 bytes\)'
# (A sanitizer's calloc would stop the process instead of failing.)
out=$(ASAN_OPTIONS=allocator_may_return_null=1 TSAN_OPTIONS="allocator_may_return_null=1 ${TSAN_OPTIONS:-}" timeout -k 5 "$CLIENT_TIMEOUT" \
      nbdserve -U - ./ramblocks.so 1E --run true 2>&1); rc=$?
like "a disk too big for its block table is refused at start-up" "$rc $(echo "$out" | grep ramblocks:)" \
     '^1 nbdserve: ramblocks: size=1152921504606846976 is too big: no memory for its block table$'
finish
