#!/bin/bash
# qcow2-readonly metadata contexts: qemu:allocation-depth over a backing
# chain and qemu:dirty-bitmap:NAME from persistent bitmaps, each compared
# with qemu-nbd on the same images; which bitmaps are offered (bitmap=,
# an in-use bitmap, snapshot=) and what LIST_META_CONTEXT answers.
. "$(dirname "$0")/lib/functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo
requires_python_nbd
plan 29

# start_qemu_nbd NAME ARGS...: a read-only qemu-nbd on $tmp/NAME.sock,
# sets $qsock, $quri, $qemu_pid.  Its pid joins server_pids so that
# cleanup stops it even when the test dies half-way.
start_qemu_nbd() {
    local name=$1; shift
    qsock="$tmp/$name.sock"
    quri="nbd+unix:///?socket=$qsock"
    /usr/bin/qemu-nbd -t -r -k "$qsock" "$@" 2> "$tmp/$name.log" &
    qemu_pid=$!
    server_pids+=("$qemu_pid")
    wait_for_socket "$qsock" "$qemu_pid" && return 0
    diag "qemu-nbd $name did not start: qemu-nbd $*"
    diag_file "$tmp/$name.log"
    return 1
}

# extents URI CONTEXT: the map as "OFFSET+LENGTH:VALUE ..." on one line,
# adjacent extents of equal value merged (servers may split extents at
# different places; only what they say about each byte must agree).
# A failed nbdinfo gives a message naming the URI, so that two failing
# servers never "agree".
extents() {
    local map
    map=$(nbdinfo --map="$2" "$1") || { echo "nbdinfo --map=$2 $1 failed"; return; }
    printf '%s\n' "$map" | awk '
        { if (n && $3 == v && $1 == s + l) l += $2
          else { if (n) printf "%d+%d:%d ", s, l, v; s = $1; l = $2; v = $3; n = 1 } }
        END { if (n) printf "%d+%d:%d", s, l, v }'
}

# expected_bitmap SIZE GRANULARITY OFFSET:LENGTH...: the map a bitmap must
# give after those writes: each write rounded out to whole granules (the
# last one cut at the end of the disk), every other byte clean.
expected_bitmap() {
    local size=$1 g=$2; shift 2
    printf '%s\n' "$@" | awk -F: -v g="$g" -v size="$size" '
        { s = int($1 / g) * g; e = int(($1 + $2 + g - 1) / g) * g; if (e > size) e = size; print s, e }' |
    sort -n | awk -v size="$size" '
        function out(a, b, v) { if (b > a) { printf "%s%d+%d:%d", sep, a, b - a, v; sep = " " } }
        { if (n && $1 <= de) { if ($2 > de) de = $2; next }
          if (n) out(ds, de, 1); out(n ? de : 0, $1, 0); ds = $1; de = $2; n = 1 }
        END { if (n) { out(ds, de, 1); out(de, size, 0) } else out(0, size, 0) }'
}

# contexts URI [QUERY...]: the sorted answer to LIST_META_CONTEXT with
# these queries (none: the empty query, which asks for every context).
cat > "$tmp/list.py" << 'EOF'
import sys, nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
for q in sys.argv[2:]:
    h.add_meta_context(q)
names = []
def seen(name):
    names.append(name)
    return 0
h.opt_list_meta_context(seen)
h.opt_abort()
print(" ".join(sorted(names)))
EOF
contexts() { python "$tmp/list.py" "$@"; }

# ---- 1. allocation depth over a three-deep chain -----------------------------
# base.raw (2M) <- mid.qcow2 (4M) <- top.qcow2 (8M), with relative backing
# names, made in a directory that is not the server's: the raw hole past
# 512K is still depth 3 (qemu counts a raw layer as allocated everywhere),
# 2M-4M lies past the end of the raw base, 4M-8M past the end of mid, and
# zero writes in the top must count as the top's, even past mid's end.
# mid's unaligned zero write allocates its whole clusters, 1856K-2M.
mkdir "$tmp/chain"
(
    cd "$tmp/chain" || exit 1
    qemu-img create -q -f raw base.raw 2M &&
    qemu-io -f raw -c 'write -P 3 0 512K' base.raw &&
    qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 4M &&
    qemu-io -f qcow2 -c 'write -P 2 256K 512K' -c 'write -P 2 3M 512K' -c 'write -z 1900K 100K' mid.qcow2 &&
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 8M &&
    qemu-io -f qcow2 -c 'write -P 1 1M 256K' -c 'write -z 1536K 256K' -c 'write -z 3200K 64K' \
        -c 'write -z 5M 64K' -c 'write -P 1 7M 64K' -c 'write -P 1 8128K 64K' top.qcow2
) > "$tmp/chain.log" 2>&1 || { diag_file "$tmp/chain.log"; exit 1; }

start_server chain qcow2-readonly "$tmp/chain/top.qcow2"
start_qemu_nbd qchain -A -f qcow2 "$tmp/chain/top.qcow2"
ours=$(extents "$uri" qemu:allocation-depth)
theirs=$(extents "$quri" qemu:allocation-depth)
is "allocation depth of the chain agrees with qemu-nbd -A" "$ours" "$theirs"
# The same again from values worked out by hand, so that the check holds
# even if both servers were wrong in the same way.
is "... and is what the writes made" "$ours" \
    "0+262144:3 262144+524288:2 786432+262144:3 1048576+262144:1 1310720+262144:3 1572864+262144:1 1835008+65536:3 1900544+196608:2 2097152+1048576:3 3145728+131072:2 3276800+65536:1 3342336+327680:2 3670016+524288:3 4194304+1048576:2 5242880+65536:1 5308416+2031616:2 7340032+65536:1 7405568+917504:2 8323072+65536:1"
is "base:allocation of the chain agrees with qemu-nbd" "$(extents "$uri" base:allocation)" "$(extents "$quri" base:allocation)"
is "backing=off: depth is 1 or 0, never deeper" \
    "$(nbdserve -U - qcow2-readonly file="$tmp/chain/top.qcow2" backing=off \
        --run 'nbdinfo --map=qemu:allocation-depth "$uri"' | awk '$3 > 1' | wc -l)" 0
stop_server "$qemu_pid"
stop_server

# ---- 2. dirty bitmaps ---------------------------------------------------------
# 64M + 96K: the last 128K granule of b2 is cut by the end of the disk.
# "fine" (512-byte granules) spans four 4K slices of bitmap data: the write
# at 16383K crosses from the first into the second.  b3 is disabled, so
# the writes leave it clean.
size=$((64 * 1024 * 1024 + 96 * 1024))
writes="102400:10240 1024000:204800 16776192:2048 67108864:4096"
bm=$tmp/bm.qcow2
io_cmds=()
for w in $writes; do io_cmds+=(-c "write -P 1 ${w%:*} ${w#*:}"); done
{
    qemu-img create -q -f qcow2 "$bm" $size &&
    qemu-img bitmap --add "$bm" b1 &&
    qemu-img bitmap --add --granularity 128K "$bm" b2 &&
    qemu-img bitmap --add --disable "$bm" b3 &&
    qemu-img bitmap --add --granularity 512 "$bm" fine &&
    qemu-io -f qcow2 "${io_cmds[@]}" "$bm"
} > "$tmp/bm.log" 2>&1 || { diag_file "$tmp/bm.log"; exit 1; }

start_server bm qcow2-readonly file="$bm"
start_qemu_nbd qbm -B b1 -B b2 -B b3 -B fine -f qcow2 "$bm"
for b in b1:65536 b2:131072 b3:0 fine:512; do
    name=${b%:*} g=${b#*:}
    ours=$(extents "$uri" qemu:dirty-bitmap:$name)
    if [ "$g" = 0 ]; then expect=$(expected_bitmap $size 65536); else expect=$(expected_bitmap $size $g $writes); fi
    is "bitmap $name: the writes rounded out to its granularity" "$ours" "$expect"
    is "bitmap $name: agrees with qemu-nbd -B" "$ours" "$(extents "$quri" qemu:dirty-bitmap:$name)"
done
stop_server "$qemu_pid"

# A small-cluster image: 512-byte clusters hold 4096 bits, so the bitmap
# table has two entries and the write at 2M-1K..2M+1K straddles them.
small=$tmp/small.qcow2
{
    qemu-img create -q -f qcow2 -o cluster_size=512 "$small" 4M &&
    qemu-img bitmap --add --granularity 512 "$small" s &&
    qemu-io -f qcow2 -c 'write -P 1 2047K 2K' -c 'write -P 1 4095K 1K' "$small"
} > "$tmp/small.log" 2>&1 || { diag_file "$tmp/small.log"; exit 1; }
is "bitmap over two table entries (512-byte clusters)" \
    "$(nbdserve -U - qcow2-readonly "$small" --run 'nbdinfo --map=qemu:dirty-bitmap:s "$uri"' |
       awk '{ printf "%s%d+%d:%d", sep, $1, $2, $3; sep = " " }')" \
    "$(expected_bitmap $((4 * 1024 * 1024)) 512 2096128:2048 4193280:1024)"

# ---- 3. LIST_META_CONTEXT (on the bm server) -----------------------------------
bitmaps="qemu:dirty-bitmap:b1 qemu:dirty-bitmap:b2 qemu:dirty-bitmap:b3 qemu:dirty-bitmap:fine"
is "LIST_META_CONTEXT \"qemu:\": depth and every bitmap" "$(contexts "$uri" qemu:)" "qemu:allocation-depth $bitmaps"
is "LIST_META_CONTEXT \"qemu:dirty-bitmap:\": the bitmaps alone" "$(contexts "$uri" qemu:dirty-bitmap:)" "$bitmaps"
is "LIST_META_CONTEXT with no query: every context" "$(contexts "$uri")" "base:allocation qemu:allocation-depth $bitmaps"
is "LIST_META_CONTEXT of one bitmap and an unknown one: that bitmap" \
    "$(contexts "$uri" qemu:dirty-bitmap:b2 qemu:dirty-bitmap:nosuch)" "qemu:dirty-bitmap:b2"
# SET_META_CONTEXT of two bitmaps at once, then BLOCK_STATUS through the
# second: the reply must use that context's own bits (b2's first 128K).
is "SET of two bitmaps, BLOCK_STATUS reports each" "$(nbdsh --opt-mode -u "$uri" -c '
h.add_meta_context("qemu:dirty-bitmap:b1")
h.add_meta_context("qemu:dirty-bitmap:b2")
h.opt_go()
got = {}
def cb(ctx, off, ents, err):
    got[ctx] = ents[1]
    return 0
h.block_status(65536, 0, cb)
print(got.get("qemu:dirty-bitmap:b1"), got.get("qemu:dirty-bitmap:b2"))')" "0 1"
stop_server

# bitmap= picks; a name that is not there refuses to start.
start_server pick qcow2-readonly file="$bm" bitmap=b2
is "bitmap=b2: b2 alone is offered" "$(contexts "$uri" qemu:dirty-bitmap:)" "qemu:dirty-bitmap:b2"
stop_server
check_fails "bitmap=nosuch: the server refuses to start" \
    nbdserve -U - qcow2-readonly file="$bm" bitmap=b1 bitmap=nosuch --run "touch $tmp/ran"
contains "... saying the image has no such bitmap" "$tmp/check.out" 'bitmap=nosuch.*no bitmap'
is "... without running the command" "$([ -e "$tmp/ran" ] && echo ran)" ""

# ---- 4. an in-use bitmap --------------------------------------------------------
# Set in_use (bit 0 of the flags) in b2's directory entry, as a qemu that
# crashed while the bitmap was enabled would have left it.
cp "$bm" "$tmp/inuse.qcow2"
cat > "$tmp/inuse.py" << 'EOF'
import struct, sys
path, want = sys.argv[1], sys.argv[2].encode()
with open(path, "r+b") as f:
    hdr = f.read(104)
    pos = struct.unpack(">I", hdr[100:104])[0]  # header_length: extensions follow
    while True:
        f.seek(pos)
        typ, length = struct.unpack(">II", f.read(8))
        if typ == 0:
            sys.exit("no bitmaps extension")
        if typ == 0x23852875:
            count, _, dir_size, dir_offset = struct.unpack(">IIQQ", f.read(24))
            break
        pos += 8 + (length + 7) // 8 * 8
    f.seek(dir_offset)
    d = f.read(dir_size)
    p = 0
    for _ in range(count):
        flags, = struct.unpack(">I", d[p + 12:p + 16])
        name_len, extra = struct.unpack(">HI", d[p + 18:p + 24])
        name = d[p + 24 + extra:p + 24 + extra + name_len]
        if name == want:
            f.seek(dir_offset + p + 12)
            f.write(struct.pack(">I", flags | 1))
            sys.exit(0)
        p += (24 + extra + name_len + 7) // 8 * 8
    sys.exit("no bitmap " + want.decode())
EOF
python "$tmp/inuse.py" "$tmp/inuse.qcow2" b2 > "$tmp/inuse.log" 2>&1 || { diag_file "$tmp/inuse.log"; exit 1; }
qemu-img info --output=json "$tmp/inuse.qcow2" > "$tmp/inuse.json" 2>&1
is "qemu-img sees b2, and only b2, in use after the patch" "$(python -c '
import json, sys
bms = json.load(open(sys.argv[1]))["format-specific"]["data"]["bitmaps"]
print(" ".join(b["name"] for b in bms if "in-use" in b["flags"]))' "$tmp/inuse.json" 2>&1)" b2

start_server inuse -v qcow2-readonly file="$tmp/inuse.qcow2"
is "an in-use bitmap is not offered, the others are" "$(contexts "$uri" qemu:dirty-bitmap:)" \
    "qemu:dirty-bitmap:b1 qemu:dirty-bitmap:b3 qemu:dirty-bitmap:fine"
is "... nor negotiated by SET_META_CONTEXT" "$(nbdsh --opt-mode -u "$uri" -c '
h.add_meta_context("qemu:dirty-bitmap:b2")
h.add_meta_context("qemu:dirty-bitmap:b1")
h.opt_go()
print(h.can_meta_context("qemu:dirty-bitmap:b2"), h.can_meta_context("qemu:dirty-bitmap:b1"))')" "False True"
stop_server
contains "... and -v says why" "$tmp/inuse.log" "bitmap 'b2' is not exposed: .*in use"
check_fails "bitmap= naming the in-use bitmap refuses to start" \
    nbdserve -U - qcow2-readonly file="$tmp/inuse.qcow2" bitmap=b2 --run true
contains "... saying it is in use" "$tmp/check.out" 'bitmap=b2 cannot be served: .*in use'

# ---- 5. snapshot=: bitmaps describe the active image, none is offered -----------
cp "$bm" "$tmp/snap.qcow2"
qemu-img snapshot -c snap1 "$tmp/snap.qcow2" > "$tmp/snap.log" 2>&1 || { diag_file "$tmp/snap.log"; exit 1; }
start_server snap qcow2-readonly file="$tmp/snap.qcow2" snapshot=snap1
is "snapshot=snap1: no qemu:dirty-bitmap: context is listed" "$(contexts "$uri")" "base:allocation qemu:allocation-depth"
stop_server
finish
