#!/bin/bash
# qcow2-readonly reads what qemu reads: for images made here by qemu-img
# and qemu-io (v2 and v3, cluster sizes 512 to 2M, zlib and zstd
# compression, extended L2 subclusters, a raw/qcow2 backing chain with
# relative names and a short layer, external data files, internal
# snapshots), nbdcopy of the export equals `qemu-img convert -O raw`
# byte for byte, and nbdinfo --map agrees with qemu-img map on what is
# data and what reads as zero.
. "$(dirname "$0")/lib/functions.sh"
requires nbdcopy nbdinfo qemu-img qemu-io
plan 36

export out  # for the --run commands below

# serve_copy OUT ARGS...: nbdcopy the export of qcow2-readonly ARGS to OUT.
serve_copy() {
    out=$1; shift
    rm -f "$out"
    nbdserve -U - qcow2-readonly "$@" --run 'nbdcopy "$uri" "$out"' > "$tmp/serve.log" 2>&1 ||
        diag_file "$tmp/serve.log"
}

# same DESCRIPTION REFERENCE.raw ARGS...: the export of ARGS has exactly
# the bytes of REFERENCE.raw (a missing copy fails the cmp too).
same() {
    local desc=$1 ref=$2; shift 2
    serve_copy "$tmp/got.raw" "$@"
    check "$desc" cmp "$ref" "$tmp/got.raw"
}

# same_as_qemu DESCRIPTION IMAGE [ARGS...]: the export of IMAGE equals
# what qemu-img convert makes of it.
same_as_qemu() {
    local desc=$1 img=$2; shift 2
    rm -f "$tmp/ref.raw"
    qemu-img convert -O raw "$img" "$tmp/ref.raw" || diag "qemu-img convert $img failed"
    same "$desc" "$tmp/ref.raw" file="$img" "$@"
}

# runs MODE < JSON: a map (qemu-img map --output=json, or nbdinfo --map
# --json) as "start length value" lines, neighbours of equal value
# merged, so that only the boundaries that matter are compared.
# Values: qemu-kind/nbd-kind "data" or "zero" (nbdinfo type 0 is data,
# 3 hole,zero; 2, zero alone, also reads as zero); nbd-type the type
# itself (the depth, for qemu:allocation-depth).
cat > "$tmp/runs.py" <<'EOF_PY'
import json, sys
mode = sys.argv[1]
def value(e):
    if mode == "qemu-kind":
        return "data" if e["data"] else "zero" if e["zero"] else "unallocated"
    if mode == "nbd-kind":
        return {0: "data", 2: "zero", 3: "zero"}.get(e["type"], "type%d" % e["type"])
    return e["type"]
runs = []
for e in json.load(sys.stdin):
    start = e["start"] if mode.startswith("qemu") else e["offset"]
    v = value(e)
    if runs and runs[-1][2] == v and runs[-1][0] + runs[-1][1] == start:
        runs[-1][1] += e["length"]
    else:
        runs.append([start, e["length"], v])
for r in runs:
    print(*r)
EOF_PY
runs() { python "$tmp/runs.py" "$@"; }
qemu_map() { qemu-img map --output=json "$1" | runs qemu-kind; }
# our_map IMAGE [CONTEXT]: nbdinfo --map of our export of IMAGE.
our_map() {
    out=$tmp/map.json
    rm -f "$out"
    nbdserve -U - qcow2-readonly file="$1" --run "nbdinfo --map${2:+=$2} --json \"\$uri\" > \"\$out\"" ||
        diag "nbdinfo --map of $1 failed"
    runs "${3:-nbd-kind}" < "$out"
}
same_map() {
    local q o
    q=$(qemu_map "$2"); o=$(our_map "$2")
    if [ -n "$q" ] && [ "$q" = "$o" ]; then ok "$1"
    else not_ok "$1"; diag "qemu-img map:"; diag "$q"; diag "nbdinfo --map:"; diag "$o"; fi
}

# writes IMAGE: the same handful of writes for every cluster size:
# unaligned, across cluster boundaries, zeroed stretches, and data at
# the far end (in another L2 table when clusters are small).
writes() {
    qemu-io -f qcow2 -c 'write -P 0x11 0 4k' -c 'write -P 0x22 1000 3000' \
        -c 'write -P 0x33 65000 140000' -c 'write -P 0x44 1M 512k' \
        -c 'write -z 1200k 200k' -c 'write -P 0x55 2M 2M' -c 'write -z 3M 4k' \
        -c 'write -P 0x66 6143k 1k' "$1" > /dev/null
}

# ---- v2 and v3 headers ------------------------------------------------------
for compat in 0.10 1.1; do
    qemu-img create -q -f qcow2 -o compat=$compat "$tmp/v$compat.qcow2" 6M
    writes "$tmp/v$compat.qcow2"
    same_as_qemu "compat=$compat: reads as qemu reads it" "$tmp/v$compat.qcow2"
done

# ---- cluster sizes ----------------------------------------------------------
for cs in 512 4k 64k 2M; do
    qemu-img create -q -f qcow2 -o cluster_size=$cs "$tmp/cs$cs.qcow2" 6M
    writes "$tmp/cs$cs.qcow2"
    same_as_qemu "cluster_size=$cs: reads as qemu reads it" "$tmp/cs$cs.qcow2"
done
# 8M of random bytes in 512-byte clusters: 256 L2 tables of 512 bytes,
# many more than the 64 slices a 64K cache holds, so reads must evict
# and reload them (and a wrong table would give other bytes).
head -c 8M /dev/urandom > "$tmp/random8M.raw"
qemu-img convert -f raw -O qcow2 -o cluster_size=512 "$tmp/random8M.raw" "$tmp/cache.qcow2"
same "cluster_size=512, l2-cache-size=64K: 8M of data through a small cache" \
    "$tmp/random8M.raw" file="$tmp/cache.qcow2" l2-cache-size=64K
same_map "cluster_size=4k: map agrees with qemu-img map" "$tmp/cs4k.qcow2"

# ---- compressed clusters ----------------------------------------------------
# 4M that compresses but is not all zeroes: text, a zero stretch, random
# bytes (stored uncompressed, as they do not shrink), a repeating pattern
# and a zero tail.
python -c '
import os, sys
text = b"".join(b"line %d of a compressible disk\n" % i for i in range(40000))
data = text[:1 << 20] + bytes(512 << 10) + os.urandom(1 << 20) \
     + bytes(range(256)) * (5 << 10) + bytes(256 << 10) + b"x" * (256 << 10)
sys.stdout.buffer.write(data)' > "$tmp/plain.raw"
for how in "zlib 64k" "zstd 64k" "zlib 4k" "zstd 2M"; do
    set -- $how
    qemu-img convert -c -f raw -O qcow2 -o compression_type=$1,cluster_size=$2 \
        "$tmp/plain.raw" "$tmp/c-$1-$2.qcow2"
    same "compressed $1, cluster_size=$2: equals the raw data" "$tmp/plain.raw" file="$tmp/c-$1-$2.qcow2"
done
# A compressed image then overwritten in part: compressed, plain and zero
# clusters side by side.
qemu-io -f qcow2 -c 'write -P 0x77 100k 10k' -c 'write -z 3M 64k' \
    -c 'write -c -P 0x78 1536k 64k' "$tmp/c-zstd-64k.qcow2" > /dev/null
same_as_qemu "compressed zstd, partly overwritten: reads as qemu reads it" "$tmp/c-zstd-64k.qcow2"
same_map "compressed zstd: map agrees with qemu-img map" "$tmp/c-zstd-64k.qcow2"
same_map "compressed zlib 4k: map agrees with qemu-img map" "$tmp/c-zlib-4k.qcow2"

# ---- extended L2: 32 subclusters of 2K per 64K cluster ----------------------
# Over a raw backing file of non-zero bytes, so that an unallocated
# subcluster (backing data) and a zero one (zeroes) read differently.
python -c 'import os, sys; sys.stdout.buffer.write(os.urandom(4 << 20))' > "$tmp/xbase.raw"
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k \
    -b "$tmp/xbase.raw" -F raw "$tmp/ext.qcow2" 4M
qemu-io -f qcow2 -c 'write -P 0x11 0 4k' -c 'write -P 0x12 16k 4k' -c 'write -z 8k 4k' \
    -c 'write -z 40k 6k' -c 'write -P 0x13 62k 4k' -c 'write -P 0x14 130k 2k' \
    -c 'write -z 256k 64k' -c 'write -P 0x15 512k 64k' -c 'write -z 1M 2k' \
    -c 'write -P 0x16 1050624 2k' -c 'write -c -P 0x17 2M 64k' -c 'write -z 3207168 8k' \
    "$tmp/ext.qcow2" > /dev/null
same_as_qemu "extended_l2: subclusters data, zero and unallocated read as qemu reads them" \
    "$tmp/ext.qcow2"
same_map "extended_l2: map agrees with qemu-img map" "$tmp/ext.qcow2"
# The top layer alone: unallocated subclusters read as zero.
cp "$tmp/ext.qcow2" "$tmp/ext-alone.qcow2"
qemu-img rebase -u -b '' "$tmp/ext-alone.qcow2"
qemu-img convert -O raw "$tmp/ext-alone.qcow2" "$tmp/ext-alone.raw"
same "extended_l2, backing=off: the top layer alone" "$tmp/ext-alone.raw" \
    file="$tmp/ext.qcow2" backing=off

# ---- a chain: base.raw (3M) <- mid.qcow2 (4M) <- top.qcow2 (6M) ---------------
# Relative backing names, made from inside the directory; served from
# elsewhere, so they must be resolved against the image's directory.
mkdir "$tmp/chain"
(
    cd "$tmp/chain" || exit 1
    python -c 'import sys; sys.stdout.buffer.write(bytes([0xb0 + i % 13 for i in range(3 << 20)]))' > base.raw
    qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 4M
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 6M
    # mid: over base, across base's end, past it, a zeroed stretch.
    qemu-io -f qcow2 -c 'write -P 0x21 512k 100k' -c 'write -P 0x22 3141632 8k' \
        -c 'write -P 0x23 3584k 64k' -c 'write -z 1M 128k' mid.qcow2 > /dev/null
    # top: elsewhere, over mid's writes in part, past mid's end.
    qemu-io -f qcow2 -c 'write -P 0x31 0 64k' -c 'write -P 0x32 560k 100k' \
        -c 'write -z 2M 256k' -c 'write -P 0x33 5M 70k' top.qcow2 > /dev/null
) || diag "making the chain failed"
cd /
same_as_qemu "chain raw <- qcow2 <- qcow2, relative names, short layers: reads as qemu reads it" \
    "$tmp/chain/top.qcow2"
same_map "chain: map agrees with qemu-img map" "$tmp/chain/top.qcow2"
# qemu:allocation-depth as qemu-nbd serves it (qemu-img map's "depth"
# means something else: past a short layer's end qemu-nbd, like us,
# gives that layer's depth, where qemu-img map says "not present").
if command -v qemu-nbd > /dev/null; then
    q=$(nbdinfo --map=qemu:allocation-depth --json -- \
            [ qemu-nbd -r -A -f qcow2 "$tmp/chain/top.qcow2" ] | runs nbd-type)
    o=$(our_map "$tmp/chain/top.qcow2" qemu:allocation-depth nbd-type)
    if [ -n "$q" ] && [ "$q" = "$o" ]; then ok "chain: qemu:allocation-depth agrees with qemu-nbd -A"
    else
        not_ok "chain: qemu:allocation-depth agrees with qemu-nbd -A"
        diag "qemu-nbd:"; diag "$q"; diag "ours:"; diag "$o"
    fi
else
    skip "qemu-nbd is not installed"
fi
# backing=off: the top layer alone.
cp "$tmp/chain/top.qcow2" "$tmp/top-alone.qcow2"
qemu-img rebase -u -b '' "$tmp/top-alone.qcow2"
qemu-img convert -O raw "$tmp/top-alone.qcow2" "$tmp/top-alone.raw"
same "chain, backing=off: equals the top layer rebased onto nothing" \
    "$tmp/top-alone.raw" file="$tmp/chain/top.qcow2" backing=off
# The middle image served on its own keeps its own backing file.
same_as_qemu "chain: the middle image with its raw backing file" "$tmp/chain/mid.qcow2"

# ---- external data files -----------------------------------------------------
# The image names its data file relatively.  qemu opens that name from
# its working directory, so the reference is made from the image's
# directory; the server, run from /, must look beside the image.
mkdir "$tmp/ext-data"
for raw in off on; do
    (
        cd "$tmp/ext-data" || exit 1
        qemu-img create -q -f qcow2 -o data_file=d-$raw.data,data_file_raw=$raw d-$raw.qcow2 4M
        qemu-io -f qcow2 -c 'write -P 0x41 0 100k' -c 'write -P 0x42 1049088 300k' \
            -c 'write -z 50k 20k' -c 'write -P 0x43 4190208 4k' d-$raw.qcow2 > /dev/null
        qemu-img convert -O raw d-$raw.qcow2 ../d-$raw.raw
    ) || diag "making the data_file_raw=$raw image failed"
    same "external data file, data_file_raw=$raw: reads as qemu reads it" \
        "$tmp/d-$raw.raw" file="$tmp/ext-data/d-$raw.qcow2"
done
# data-file= overrides the name stored in the image.
mv "$tmp/ext-data/d-off.data" "$tmp/moved.data"
same "external data file moved, data-file= names it" "$tmp/d-off.raw" \
    file="$tmp/ext-data/d-off.qcow2" data-file="$tmp/moved.data"

# ---- internal snapshots --------------------------------------------------------
qemu-img create -q -f qcow2 "$tmp/snap.qcow2" 4M
qemu-io -f qcow2 -c 'write -P 0x51 0 1M' -c 'write -P 0x52 2M 512k' "$tmp/snap.qcow2" > /dev/null
qemu-img snapshot -c snap1 "$tmp/snap.qcow2"
qemu-io -f qcow2 -c 'write -P 0x53 512k 1M' -c 'write -z 2M 64k' -c 'write -P 0x54 3M 64k' \
    "$tmp/snap.qcow2" > /dev/null
qemu-img snapshot -c snap2 "$tmp/snap.qcow2"
qemu-io -f qcow2 -c 'write -P 0x55 0 64k' -c 'write -P 0x56 3178496 64k' -c 'write -z 2200k 100k' \
    "$tmp/snap.qcow2" > /dev/null
qemu-img convert -l snapshot.name=snap1 -O raw "$tmp/snap.qcow2" "$tmp/snap1.raw"
qemu-img convert -l snapshot.name=snap2 -O raw "$tmp/snap.qcow2" "$tmp/snap2.raw"
same "snapshot=snap1 equals qemu-img convert -l snapshot.name=snap1" \
    "$tmp/snap1.raw" file="$tmp/snap.qcow2" snapshot=snap1
same "snapshot=1 (by id) is snap1" "$tmp/snap1.raw" file="$tmp/snap.qcow2" snapshot=1
same "snapshot=snap2 equals qemu-img convert -l snapshot.name=snap2" \
    "$tmp/snap2.raw" file="$tmp/snap.qcow2" snapshot=snap2
same_as_qemu "snapshots: the active image reads as qemu reads it" "$tmp/snap.qcow2"
check_fails "snapshot=nosuch: the server refuses to start" \
    nbdserve -U - qcow2-readonly file="$tmp/snap.qcow2" snapshot=nosuch --run true
# The active image grown after the snapshot: snap1 keeps its own size
# (4M).  qemu-img convert -l reads a snapshot at the active image's size,
# so the reference is the snapshot applied (qemu-img snapshot -a).
cp "$tmp/snap.qcow2" "$tmp/grown.qcow2"
qemu-img resize -q "$tmp/grown.qcow2" 6M
qemu-io -f qcow2 -c 'write -P 0x57 5M 64k' "$tmp/grown.qcow2" > /dev/null
cp "$tmp/grown.qcow2" "$tmp/applied.qcow2"
qemu-img snapshot -a snap1 "$tmp/applied.qcow2"
qemu-img convert -O raw "$tmp/applied.qcow2" "$tmp/applied.raw"
same "grown image: snapshot=snap1 equals snap1 applied, at its own size" \
    "$tmp/applied.raw" file="$tmp/grown.qcow2" snapshot=snap1
same_as_qemu "grown image: the active image (6M) reads as qemu reads it" "$tmp/grown.qcow2"

# ---- a bare path is file= --------------------------------------------------------
out=$tmp/bare.raw
rm -f "$out"
nbdserve -U - qcow2-readonly "$tmp/v1.1.qcow2" --run 'nbdcopy "$uri" "$out"'
qemu-img convert -O raw "$tmp/v1.1.qcow2" "$tmp/v1.1.raw"
check "a bare path serves the image" cmp "$tmp/v1.1.raw" "$tmp/bare.raw"
same_map "compat=1.1: map agrees with qemu-img map" "$tmp/v1.1.qcow2"
same_map "compat=0.10: map agrees with qemu-img map" "$tmp/v0.10.qcow2"

finish
