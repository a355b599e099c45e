#!/usr/bin/env bash
# Hostile qcow2 images: good images made by qemu-img/qemu-io, then one
# header or table field patched in each.  A defect the library sees at
# open must refuse the image cleanly (non-zero exit, a message naming the
# defect, no crash or hang); a defect in a table only reads reach must
# fail that read with EIO while other reads, and new clients, are still
# served the right bytes.  Controls first show that every good image
# (and the patching helpers themselves) are served correctly, so that a
# refusal or an EIO below comes from the one patched field.
. "$(dirname "$0")/lib/functions.sh"
requires qemu-img qemu-io zstd
requires_python_nbd
[ -n "${NBDSERVE_BINARY:-}" ] || [ -f "$top/plugins/qcow2-readonly/nbdserve-qcow2-readonly-plugin.so" ] ||
    skip_all "the qcow2-readonly plugin is not built"
plan 72

# Sanitizer builds map huge shadow regions: the memory bound means nothing there.
asan=
ldd "$NBDSERVE" 2> /dev/null | grep -qE 'libasan|libtsan' && asan=yes
sanitizer_re='AddressSanitizer|LeakSanitizer|runtime error'
bail() { echo "Bail out! $*"; exit 1; }

# ---- Helpers ------------------------------------------------------------------
# q2 COMMAND IMG ...: read or patch an image (all qcow2 fields are big-endian).
cat > "$tmp/q2.py" << 'EOF'
import os, struct, sys, zlib

MASK = 0x00fffffffffffe00  # host offset bits 9-55 of L1/L2 entries


def header(f):
    f.seek(0)
    b = f.read(112)
    version, = struct.unpack_from(">I", b, 4)
    cb, = struct.unpack_from(">I", b, 20)
    inc = struct.unpack_from(">Q", b, 72)[0] if version >= 3 else 0
    hlen = struct.unpack_from(">I", b, 100)[0] if version >= 3 else 72
    return {"cb": cb, "cs": 1 << cb, "l1": struct.unpack_from(">Q", b, 40)[0],
            "ebytes": 16 if inc & 16 else 8, "hlen": hlen}


def peek(f, off, fmt):
    f.seek(off)
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def poke(f, off, fmt, value):
    f.seek(off)
    f.write(struct.pack(fmt, value))


def l1_entry(f, h, guest):
    per_table = h["cs"] // h["ebytes"]
    return h["l1"] + 8 * ((guest >> h["cb"]) // per_table)


def l2_entry(f, h, guest):
    per_table = h["cs"] // h["ebytes"]
    table = peek(f, l1_entry(f, h, guest), ">Q") & MASK
    if table == 0:
        sys.exit("no L2 table for guest offset %d" % guest)
    return table + h["ebytes"] * ((guest >> h["cb"]) % per_table)


def extension(f, h, want):
    pos = h["hlen"]
    while pos + 8 <= h["cs"]:
        f.seek(pos)
        typ, length = struct.unpack(">II", f.read(8))
        if typ == want:
            return pos
        if typ == 0:
            break
        pos += 8 + ((length + 7) & ~7)
    sys.exit("no header extension 0x%08x" % want)


def comp_desc(h, host, nsect):
    shift = 62 - (h["cb"] - 8)
    return (1 << 62) | ((nsect - 1) << shift) | host


cmd, img = sys.argv[1], sys.argv[2]
args = sys.argv[3:]
if cmd == "deflate":  # OUT LENGTH BYTE|random [CUT]: raw deflate of LENGTH bytes, maybe cut short
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    n = int(args[0])
    raw = os.urandom(n) if args[1] == "random" else bytes([int(args[1], 0)]) * n
    out = c.compress(raw) + c.flush()
    if len(args) > 2:
        out = out[:int(args[2])]
    open(img, "wb").write(out)
    sys.exit(0)
if cmd in ("zstd-window", "zstd-single"):  # OUT N: a zstd frame of 'Z's in RLE blocks
    # window: a window of 2^N bytes (descriptor byte (N-10) << 3), one
    # 64 KiB block; single: one segment of N blocks of 128 KiB.
    n = int(args[0])
    if cmd == "zstd-window":
        head, blocks, block = bytes([0x00, (n - 10) << 3]), 1, 65536
    else:
        head, blocks, block = bytes([0xe0]) + struct.pack("<Q", n << 17), n, 131072
    out = b"\x28\xb5\x2f\xfd" + head
    for i in range(blocks):  # block header: last, type 1 (RLE), size; then the byte
        out += struct.pack("<I", (i == blocks - 1) | 1 << 1 | block << 3)[:3] + b"Z"
    open(img, "wb").write(out)
    sys.exit(0)
with open(img, "r+b") as f:
    h = header(f)
    size = os.fstat(f.fileno()).st_size
    end = (size + h["cs"] - 1) // h["cs"] * h["cs"]  # first cluster past the file
    if cmd == "peek":  # OFFSET FORMAT
        print(peek(f, int(args[0], 0), args[1]))
    elif cmd == "poke":  # OFFSET FORMAT EXPR, with v (old value), end, cs
        off = int(args[0], 0)
        v = peek(f, off, args[1])
        poke(f, off, args[1], eval(args[2], {"v": v, "end": end, "cs": h["cs"]}))
    elif cmd == "bytes":  # OFFSET HEX
        f.seek(int(args[0], 0))
        f.write(bytes.fromhex(args[1]))
    elif cmd == "l1e":  # GUEST: file offset of the L1 entry
        print(l1_entry(f, h, int(args[0], 0)))
    elif cmd == "l2e":  # GUEST: file offset of the L2 entry
        print(l2_entry(f, h, int(args[0], 0)))
    elif cmd == "ext":  # TYPE: file offset of the header extension
        print(extension(f, h, int(args[0], 0)))
    elif cmd == "cdata":  # GUEST: host offset of the compressed bytes
        d = peek(f, l2_entry(f, h, int(args[0], 0)), ">Q")
        assert d & (1 << 62), "not a compressed cluster"
        print(d & ((1 << (62 - (h["cb"] - 8))) - 1))
    elif cmd == "comp":  # GUEST HOST NSECTORS: a compressed descriptor
        poke(f, l2_entry(f, h, int(args[0], 0)), ">Q",
             comp_desc(h, int(args[1], 0), int(args[2], 0)))
    elif cmd == "putcomp":  # GUEST FILE: these bytes, appended, as the cluster's compressed data
        data = open(args[1], "rb").read()
        nsect = (len(data) + 511) // 512
        f.seek(end)
        f.write(data + bytes(nsect * 512 - len(data)))
        poke(f, l2_entry(f, h, int(args[0], 0)), ">Q", comp_desc(h, end, nsect))
    else:
        sys.exit("unknown command " + cmd)
EOF
# A patch that fails leaves the image good: say so, and fail the test.
q2() {
    python "$tmp/q2.py" "$@" && return 0
    diag "q2 $* failed"; failures=$((failures + 1)); return 1
}

# The client: client.py MODE URI ARGS... exits 0 when the server did what
# was expected, else prints what it did.
cat > "$tmp/client.py" << 'EOF'
import errno, sys
import nbd

mode, uri = sys.argv[1], sys.argv[2]
args = [int(a, 0) for a in sys.argv[3:]] if mode != "context" else []


def connect(context=None):
    h = nbd.NBD()
    if context:
        h.add_meta_context(context)
    h.connect_uri(uri)
    return h


def expect(h, off, byte, length=4096):
    got = h.pread(length, off)
    if got != bytes([byte]) * length:
        sys.exit("read at %d: got %r..., expected 0x%02x" % (off, bytes(got[:8]), byte))


def expect_eio(what, fn):
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != errno.EIO:
            sys.exit("%s: failed with %s, not EIO" % (what, e))
        return
    sys.exit("%s succeeded" % what)


if mode == "read":  # OFFSET BYTE...: each offset reads as its byte
    h = connect()
    for off, byte in zip(args[0::2], args[1::2]):
        expect(h, off, byte)
elif mode == "eio":  # BAD GOOD BYTE [STATUS]
    bad, good, byte = args[:3]
    h = connect(nbd.CONTEXT_BASE_ALLOCATION)
    expect_eio("read at %d" % bad, lambda: h.pread(4096, bad))
    expect(h, good, byte)  # the same connection goes on
    expect_eio("read again at %d" % bad, lambda: h.pread(4096, bad))  # nothing cached the bad cluster
    if len(args) > 3 and args[3]:
        expect_eio("block status at %d" % bad, lambda: h.block_status(4096, bad, lambda *a: 0))
    expect(connect(), good, byte)  # and so does a new client
elif mode == "context":  # NAME: print whether the server offers it
    name = sys.argv[3]
    h = connect(name)
    print("offered" if h.can_meta_context(name) else "not offered")
    expect(h, 0, 0x11)
EOF

# fresh NAME [SOURCE]: a copy of a good image (default plain) to patch; sets $img.
fresh() {
    img="$tmp/$1.qcow2"
    cp "$tmp/${2:-plain}.qcow2" "$img"
}

# refused DESCRIPTION KEYWORD IMG [PARAMS...]: the server will not start
# on the image, says why (KEYWORD), and neither crashes nor hangs.
refused() {
    local desc=$1 key=$2 image=$3 rc; shift 3
    nbdserve -U - qcow2-readonly file="$image" "$@" --run true > "$tmp/refused.out" 2>&1
    rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -lt 128 ] && grep -qF -- "$key" "$tmp/refused.out" &&
        ! grep -Eq "$sanitizer_re" "$tmp/refused.out"; then
        ok "$desc: refused ($key)"
    else
        not_ok "$desc: refused, naming '$key' (exit $rc)"
        diag_file "$tmp/refused.out"
    fi
}

# served IMG [PARAMS...] -- MODE ARGS...: start a server on IMG, run
# client.py MODE, and check that the server outlived it, stayed under
# 256 MiB, stops cleanly on SIGTERM and logged $key (if set).  Sets $why
# on failure (and the server's log in served.out).
nserver=0
served() {
    local image=$1 params=() rc alive hwm log; shift
    while [ $# -gt 0 ] && [ "$1" != -- ]; do params+=("$1"); shift; done
    shift
    nserver=$((nserver + 1))
    local name=srv$nserver
    why=
    if ! start_server "$name" qcow2-readonly file="$image" "${params[@]}"; then
        why="the server did not start"; return 1
    fi
    python "$tmp/client.py" "$1" "$uri" "${@:2}" > "$tmp/client.out" 2>&1
    rc=$?
    alive=no; kill -0 "$server_pid" 2> /dev/null && alive=yes
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$server_pid/status" 2> /dev/null)
    stop_server
    log=$(cat "$tmp/$name".log*)
    if [ $rc -ne 0 ]; then why="client: $(cat "$tmp/client.out")"
    elif [ $alive != yes ]; then why="the server died"
    elif [ -z "$asan" ] && [ "${hwm:-0}" -gt 262144 ]; then why="the server grew to $hwm KiB"
    elif [ "$stopped_rc" -ne 0 ]; then why="the server exited with $stopped_rc on SIGTERM"
    elif printf '%s\n' "$log" | grep -Eq "$sanitizer_re"; then why="a sanitizer report"
    elif [ -n "${key:-}" ] && ! printf '%s\n' "$log" | grep -qF -- "$key"; then why="no '$key' in the log"
    fi
    [ -z "$why" ] && return 0
    printf '%s\n' "$log" > "$tmp/served.out"
    return 1
}

# accepted DESCRIPTION IMG [PARAMS...] -- OFFSET BYTE...: served, and
# each offset reads as its byte.
accepted() {
    local desc=$1 image=$2 params=(); shift 2
    while [ $# -gt 0 ] && [ "$1" != -- ]; do params+=("$1"); shift; done
    shift
    key=
    if served "$image" "${params[@]}" -- read "$@"; then ok "$desc"
    else not_ok "$desc: $why"; diag_file "$tmp/served.out"; fi
}

# read_fails DESCRIPTION KEYWORD IMG BAD GOOD BYTE [STATUS]: reading the
# cluster at BAD fails with EIO (and so does block status, if STATUS),
# the server logs KEYWORD, and GOOD still reads as BYTE.
read_fails() {
    local desc=$1 image=$3
    key=$2
    if served "$image" -- eio "${@:4}"; then ok "$desc: EIO, other reads served ($2)"
    else not_ok "$desc: EIO for that read only, logging '$2': $why"; diag_file "$tmp/served.out"; fi
    key=
}

# ---- Good images --------------------------------------------------------------------
# Each has 0x11 in its first 64 KiB and 0x22 in the next, the rest unallocated.
good() {  # NAME SIZE [CREATE-OPTIONS...]
    local name=$1 size=$2; shift 2
    qemu-img create -q -f qcow2 "$@" "$tmp/$name.qcow2" "$size" &&
        qemu-io -f qcow2 -c 'write -P 0x11 0 64k' -c 'write -P 0x22 64k 64k' "$tmp/$name.qcow2" > /dev/null
}
good plain 1M || bail "making the good images"
# 4 KiB clusters, 4 MiB: two L2 tables (for 0-2M and 2M-4M), 0x33 at 2M.
good small 4M -o cluster_size=4096 &&
    qemu-io -f qcow2 -c 'write -P 0x33 2M 64k' "$tmp/small.qcow2" > /dev/null || bail "making the good images"
qemu-img convert -c -O qcow2 "$tmp/plain.qcow2" "$tmp/deflate.qcow2" || bail "making the good images"
qemu-img convert -c -O qcow2 -o compression_type=zstd "$tmp/plain.qcow2" "$tmp/zstd.qcow2" || bail "making the good images"
good extl2 1M -o extended_l2=on,cluster_size=64k || bail "making the good images"
# A backing chain: top (0x44 at 128K) over base.
good base 1M || bail "making the good images"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$tmp/top.qcow2" 1M &&
    qemu-io -f qcow2 -c 'write -P 0x44 128k 64k' "$tmp/top.qcow2" > /dev/null || bail "making the good images"
# An internal snapshot of the 0x11 state, then 0x55 over the first cluster.
good snap 1M && qemu-img snapshot -c snap1 "$tmp/snap.qcow2" &&
    qemu-io -f qcow2 -c 'write -P 0x55 0 64k' "$tmp/snap.qcow2" > /dev/null || bail "making the good images"
good bitmap 1M && qemu-img bitmap --add "$tmp/bitmap.qcow2" b0 || bail "making the good images"
# Chains of 32 and 33 images, the data in the bottom one.
good d1 1M || bail "making the good images"
for i in $(seq 2 33); do
    qemu-img create -q -f qcow2 -u -b "d$((i - 1)).qcow2" -F qcow2 "$tmp/d$i.qcow2" 1M || bail "making the good images"
done

# Compressed payloads for the decompression defects.
q2 deflate "$tmp/deflate-ok" 65536 0x5a
q2 deflate "$tmp/deflate-short" 1000 0x5a          # a whole stream, of too few bytes
q2 deflate "$tmp/deflate-cut" 65536 random 20000   # a stream cut off mid-block
head -c 65536 /dev/zero | tr '\0' Z | zstd -q -c > "$tmp/zstd-ok"
head -c 1000 /dev/zero | tr '\0' Z | zstd -q -c > "$tmp/zstd-short"
# Valid frames whose first 64 KiB is 'Z's.  libzstd's own default limit
# is a 128 MiB window (log 27), which it would allocate: a cluster needs
# at most 2 MiB, so the library must refuse these; a 64 KiB window is fine.
q2 zstd-window "$tmp/zstd-w16" 16
q2 zstd-window "$tmp/zstd-w27" 27    # a 128 MiB window
q2 zstd-single "$tmp/zstd-128m" 1024 # 128 MiB in one segment: the window is all of it
head -c 4096 /dev/urandom > "$tmp/garbage"

# ---- Controls: the good images, and the helpers' own patches -------------------------
accepted "control: plain image" "$tmp/plain.qcow2" -- 0 0x11 65536 0x22 131072 0
accepted "control: 4K clusters, two L2 tables" "$tmp/small.qcow2" -- 0 0x11 2097152 0x33 1048576 0
accepted "control: deflate-compressed image" "$tmp/deflate.qcow2" -- 0 0x11 65536 0x22
accepted "control: zstd-compressed image" "$tmp/zstd.qcow2" -- 0 0x11 65536 0x22
accepted "control: extended L2 entries" "$tmp/extl2.qcow2" -- 0 0x11 65536 0x22 131072 0
accepted "control: backing chain" "$tmp/top.qcow2" -- 0 0x11 131072 0x44
accepted "control: snapshot=snap1 serves the old state" "$tmp/snap.qcow2" snapshot=snap1 -- 0 0x11 65536 0x22
accepted "control: a chain of 32 images" "$tmp/d32.qcow2" -- 0 0x11 65536 0x22
fresh putdeflate deflate && q2 putcomp "$img" 0 "$tmp/deflate-ok"
accepted "control: a deflate cluster the test wrote" "$img" -- 0 0x5a 65536 0x22
fresh putzstd zstd && q2 putcomp "$img" 0 "$tmp/zstd-ok"
accepted "control: a zstd cluster the test wrote" "$img" -- 0 0x5a 65536 0x22
fresh putw16 zstd && q2 putcomp "$img" 0 "$tmp/zstd-w16"
accepted "control: a zstd frame with a 64 KiB window" "$img" -- 0 0x5a 65536 0x22
key=
if served "$tmp/bitmap.qcow2" -- context qemu:dirty-bitmap:b0 && [ "$(cat "$tmp/client.out")" = offered ]; then
    ok "control: bitmap b0 is offered"
else not_ok "control: bitmap b0 is offered: ${why:-$(cat "$tmp/client.out")}"; fi

# ---- The header --------------------------------------------------------------------
fresh magic && q2 bytes "$img" 0 51464958
refused "bad magic" "magic" "$img"
fresh v1 && q2 poke "$img" 4 '>I' 1
refused "version 1" "version 1 is not supported" "$img"
fresh v4 && q2 poke "$img" 4 '>I' 4
refused "version 4" "version 4 is not supported" "$img"
fresh cb8 && q2 poke "$img" 20 '>I' 8
refused "cluster_bits 8" "cluster_bits 8" "$img"
fresh cb22 && q2 poke "$img" 20 '>I' 22
refused "cluster_bits 22" "cluster_bits 22" "$img"
fresh hlen100 && q2 poke "$img" 100 '>I' 100
refused "header_length 100 (< 104)" "header_length 100" "$img"
fresh hlenbig && q2 poke "$img" 100 '>I' 65544
refused "header_length past the cluster" "header_length 65544" "$img"
fresh short && truncate -s 60 "$img"
refused "a file shorter than a header" "too short" "$img"
fresh incompat10 && q2 poke "$img" 72 '>Q' 'v | 1 << 10'
refused "unknown incompatible feature bit 10" "unknown incompatible feature (bit 10" "$img"
fresh aes && q2 poke "$img" 32 '>I' 1
refused "crypt_method 1" "encrypted (AES)" "$img"
fresh luks && q2 poke "$img" 32 '>I' 2
refused "crypt_method 2" "encrypted (LUKS)" "$img"
fresh corrupt && q2 poke "$img" 72 '>Q' 'v | 2'
refused "corrupt bit" "marked corrupt" "$img"
fresh refcount7 && q2 poke "$img" 96 '>I' 7
refused "refcount_order 7" "refcount_order 7" "$img"
# qemu writes a 112-byte header: compression_type (byte 104) is inside it.
fresh ctype1 && q2 poke "$img" 104 '>B' 1
refused "compression_type 1 without the feature bit" "feature bit is clear" "$img"
fresh ctype2 && q2 poke "$img" 104 '>B' 2 && q2 poke "$img" 72 '>Q' 'v | 8'
refused "compression bit with compression_type 2" "compression type 2" "$img"
fresh extl2small small && q2 poke "$img" 72 '>Q' 'v | 16'
refused "extended L2 bit with 4K clusters" "extended L2 entries need clusters" "$img"
fresh huge && q2 poke "$img" 24 '>Q' '1 << 63'
refused "virtual size 2^63" "too large" "$img"
fresh datafile && q2 poke "$img" 72 '>Q' 'v | 4'
refused "external data file bit, no file named" "names none" "$img"
fresh ext && q2 poke "$img" $(($(q2 ext "$img" 0x6803f857) + 4)) '>I' 65536
refused "header extension running past the cluster" "runs past the first cluster" "$img"

# ---- The L1 table ------------------------------------------------------------------
fresh l1small && q2 poke "$img" 36 '>I' 0
refused "L1 table too small for the size" "has 0 entries; the virtual size needs 1" "$img"
fresh l1big && q2 poke "$img" 36 '>I' $(((32 << 20) / 8 + 1))
refused "L1 table over 32 MiB" "MiB limit" "$img"
fresh l1unaligned && q2 poke "$img" 40 '>Q' 'v + 8'
refused "L1 offset unaligned" "not cluster aligned" "$img"
fresh l1header && q2 poke "$img" 40 '>Q' 0
refused "L1 offset inside the header" "inside the header cluster" "$img"
fresh l1eof && q2 poke "$img" 40 '>Q' 'end + 16 * cs'
refused "L1 offset past EOF" "lies past the end of the file" "$img"

# ---- The backing chain -------------------------------------------------------------
fresh backlen top && q2 poke "$img" 16 '>I' 1024
refused "backing file name of 1024 bytes" "out of bounds" "$img"
fresh backoff top && q2 poke "$img" 8 '>Q' 65536
refused "backing file name offset past the cluster" "out of bounds" "$img"
qemu-img create -q -f qcow2 "$tmp/loopb.qcow2" 1M &&
    qemu-img create -q -f qcow2 -b loopb.qcow2 -F qcow2 "$tmp/loopa.qcow2" 1M &&
    qemu-img rebase -u -b loopa.qcow2 -F qcow2 "$tmp/loopb.qcow2"
refused "backing chain loop a -> b -> a" "the backing chain loops" "$tmp/loopa.qcow2"
refused "a chain of 33 images" "deeper than 32" "$tmp/d33.qcow2"
# The backing format extension says "qcow2" (5 bytes): make it "vmdk" (4).
fresh vmdk top && pos=$(q2 ext "$img" 0xe2792aca) && q2 poke "$img" $((pos + 4)) '>I' 4 &&
    q2 bytes "$img" $((pos + 8)) "$(printf vmdk | od -An -tx1 | tr -d ' \n')000000"
refused "backing format vmdk" "format 'vmdk' is not supported" "$img"
fresh backnul top && q2 bytes "$img" "$(q2 peek "$img" 8 '>Q')" 00
refused "backing file name holding a NUL" "NUL byte" "$img"
# A defect in a backing file refuses the chain, naming that file; with
# backing=off the backing file is never opened.
mkdir "$tmp/chain" && cp "$tmp/base.qcow2" "$tmp/top.qcow2" "$tmp/chain/" &&
    q2 poke "$tmp/chain/base.qcow2" 4 '>I' 4
refused "backing file of version 4" "chain/base.qcow2: qcow2 version 4" "$tmp/chain/top.qcow2"
accepted "backing=off: the broken backing file is not opened" "$tmp/chain/top.qcow2" backing=off -- \
    0 0 131072 0x44

# ---- Snapshots (only read with snapshot=) -----------------------------------------------
fresh snapeof snap && q2 poke "$img" 64 '>Q' 'end + 16 * cs'
refused "snapshot table past EOF" "lies past the end of the file" "$img" snapshot=snap1
fresh snapalign snap && q2 poke "$img" 64 '>Q' 'v + 8'
refused "snapshot table unaligned" "snapshot table (1 entries" "$img" snapshot=snap1
fresh snapl1 snap && q2 poke "$img" "$(q2 peek "$img" 64 '>Q')" '>Q' 'end + 16 * cs'
refused "snapshot's L1 table past EOF" "snapshot's L1 table" "$img" snapshot=snap1
# An entry: L1 offset (8), L1 size (4), ..., extra data size (4) at 36, then
# the extra data: VM state size (8), disk size (8).
fresh snapsize snap && q2 poke "$img" $(($(q2 peek "$img" 64 '>Q') + 48)) '>Q' '1 << 63'
refused "snapshot's disk size 2^63" "invalid size" "$img" snapshot=snap1

# ---- Bitmaps ----------------------------------------------------------------------------
# The bitmaps extension: nb_bitmaps (4 bytes), reserved (4), directory size (8), offset (8).
bmext=$(q2 ext "$tmp/bitmap.qcow2" 0x23852875)
fresh bmshort bitmap && q2 poke "$img" $((bmext + 4)) '>I' 16
refused "bitmaps extension of 16 bytes" "too short" "$img"
fresh bmzero bitmap && q2 poke "$img" $((bmext + 8)) '>I' 0
refused "bitmap extension with nb_bitmaps 0" "bitmap directory is malformed" "$img"
fresh bmeof bitmap && q2 poke "$img" $((bmext + 24)) '>Q' 'end + 16 * cs'
refused "bitmap directory past EOF" "bitmap directory" "$img"
# A directory entry: table offset (8 bytes), table size (4)...
fresh bmsize bitmap && q2 poke "$img" $(($(q2 peek "$img" $((bmext + 24)) '>Q') + 8)) '>I' 'v + 1'
key=
if served "$img" -- context qemu:dirty-bitmap:b0 && [ "$(cat "$tmp/client.out")" = "not offered" ]; then
    ok "bitmap table size mismatch: the server starts, without the bitmap"
else not_ok "bitmap table size mismatch: the server starts, without the bitmap: ${why:-$(cat "$tmp/client.out")}"; fi
refused "bitmap table size mismatch, asked for by bitmap=b0" "table size does not match" "$img" bitmap=b0
fresh bminuse bitmap && q2 poke "$img" $(($(q2 peek "$img" $((bmext + 24)) '>Q') + 12)) '>I' 'v | 1'
refused "bitmap marked in use, asked for by bitmap=b0" "marked in use" "$img" bitmap=b0

# ---- Accepted defects ---------------------------------------------------------------------
# Refcounts may be stale, but reading needs none of them.
fresh dirty && q2 poke "$img" 72 '>Q' 'v | 1'
accepted "the dirty bit is accepted" "$img" -- 0 0x11 65536 0x22 131072 0

# ---- Tables met only by reads: EIO for that request ----------------------------------------
fresh l2unaligned small && q2 poke "$img" "$(q2 l1e "$img" 0)" '>Q' 'v + 512'
read_fails "L2 table offset unaligned" "L2 table offset is not cluster aligned" "$img" 0 2097152 0x33 1
fresh l2eof small && q2 poke "$img" "$(q2 l1e "$img" 0)" '>Q' '1 << 63 | (end + 16 * cs)'
read_fails "L2 table past EOF" "L2 table lies past the end of the file" "$img" 0 2097152 0x33 1
fresh dataeof && q2 poke "$img" "$(q2 l2e "$img" 0)" '>Q' '1 << 63 | (end + 16 * cs)'
read_fails "data cluster past EOF" "data cluster lies past the end" "$img" 0 65536 0x22 1
fresh dataunaligned && q2 poke "$img" "$(q2 l2e "$img" 0)" '>Q' 'v + 512'
read_fails "data cluster offset unaligned" "data cluster offset is not cluster aligned" "$img" 0 65536 0x22 1

fresh zgarbage deflate && q2 bytes "$img" "$(q2 cdata "$img" 0)" ffffffffffffffff
read_fails "deflate cluster with garbage bytes" "does not decompress" "$img" 0 65536 0x22
fresh zstdgarbage zstd && q2 bytes "$img" "$(q2 cdata "$img" 0)" ffffffffffffffff
read_fails "zstd cluster with garbage bytes" "does not decompress" "$img" 0 65536 0x22
fresh zrandom deflate && q2 putcomp "$img" 0 "$tmp/garbage"
read_fails "deflate cluster of random bytes" "does not decompress" "$img" 0 65536 0x22
fresh zstdrandom zstd && q2 putcomp "$img" 0 "$tmp/garbage"
read_fails "zstd cluster of random bytes" "does not decompress" "$img" 0 65536 0x22
fresh compeof deflate && q2 comp "$img" 0 $(($(stat -c %s "$img") + 65536)) 2
read_fails "compressed data past EOF" "compressed data lies past the end" "$img" 0 65536 0x22
fresh compheader deflate && q2 comp "$img" 0 512 2
read_fails "compressed data inside the header" "compressed data offset is inside the header" "$img" 0 65536 0x22
fresh zshort deflate && q2 putcomp "$img" 0 "$tmp/deflate-short"
read_fails "deflate stream ending before the cluster does" "does not decompress" "$img" 0 65536 0x22
fresh zcut deflate && q2 putcomp "$img" 0 "$tmp/deflate-cut"
read_fails "deflate stream cut off mid-block" "does not decompress" "$img" 0 65536 0x22
fresh zstdshort zstd && q2 putcomp "$img" 0 "$tmp/zstd-short"
read_fails "zstd frame ending before the cluster does" "does not decompress" "$img" 0 65536 0x22
fresh zstdwindow zstd && q2 putcomp "$img" 0 "$tmp/zstd-w27"
read_fails "zstd frame asking for a 128 MiB window" "does not decompress" "$img" 0 65536 0x22
fresh zstdsingle zstd && q2 putcomp "$img" 0 "$tmp/zstd-128m"
read_fails "zstd frame of 128 MiB in a single segment" "does not decompress" "$img" 0 65536 0x22

# Extended L2: the second word is the allocation bitmap (low 32 bits) and
# the zero bitmap (high 32).
fresh allocz extl2 && q2 poke "$img" $(($(q2 l2e "$img" 0) + 8)) '>Q' 'v | 1 << 32'
read_fails "extended L2: a subcluster both allocated and zero" "both allocated and zero" "$img" 0 65536 0x22 1
fresh allocunalloc extl2 && q2 poke "$img" $(($(q2 l2e "$img" 131072) + 8)) '>Q' 1
read_fails "extended L2: subclusters allocated in an unallocated cluster" "allocated in an unallocated cluster" \
    "$img" 131072 65536 0x22 1

finish
