#!/bin/bash
# The rbd plugin against a real single-node Ceph cluster that this test
# starts (tests/lib/ceph-cluster.sh: one monitor, one OSD on bluestore
# in a file of its own, 127.0.0.1) and stops, however it ends.
# SPDX-License-Identifier: BSD-3-Clause
. "$(dirname "$0")/lib/functions.sh"
requires nbdinfo nbdcopy nbdsh qemu-img
requires_python_nbd
for p in ceph-mon ceph-osd ceph rbd rados; do
    command -v $p > /dev/null || skip_all "$p is not installed (make deps installs Ceph)"
done
[ -n "${NBDSERVE_BINARY:-}" ] || [ -f "$top/plugins/rbd/nbdserve-rbd-plugin.so" ] ||
    skip_all "the rbd plugin is not built (librbd-dev missing)"
plan 38

cdir=$tmp/ceph
cluster() { "$top/tests/lib/ceph-cluster.sh" "$@"; }
at_cleanup cluster stop "$cdir"
# bluestore: the OSD is killed and restarted below, and memstore would
# come back empty.
if ! OBJECTSTORE=bluestore STORE_MB=1024 cluster start "$cdir" rbd > "$tmp/cluster.out" 2>&1; then
    diag_file "$tmp/cluster.out"
    skip_all "the Ceph cluster did not start"
fi
conf=$cdir/ceph.conf
rbd() { timeout -k 5 "$CLIENT_TIMEOUT" /usr/bin/rbd -c "$conf" "$@"; }
rbd create --size 64M rbd/disk
rbd create --size 16M rbd/sparse
rbd create --size 16M --image-feature layering rbd/shared

head -c 64M /dev/urandom > "$tmp/data"

# ---- parameters --------------------------------------------------------
nbdserve -U - rbd conf="$conf" --run true > "$tmp/p1.log" 2>&1
contains "no image: a clear message" "$tmp/p1.log" "which image\? give image=POOL/IMAGE"
nbdserve -U - rbd disk conf="$conf" --run true > "$tmp/p2.log" 2>&1
contains "an image without a pool: a clear message" "$tmp/p2.log" "names no pool"
nbdserve -U - rbd rbd/disk conf="$conf" colour=red --run true > "$tmp/p3.log" 2>&1
contains "an unknown parameter is refused" "$tmp/p3.log" "unknown parameter 'colour'"
nbdserve --help rbd > "$tmp/help" 2>&1
contains "--help lists timeout=" "$tmp/help" "timeout=SECONDS"

# ---- data: nbdcopy in and out, qemu-img convert, rbd export ------------
start_server disk rbd rbd/disk conf="$conf"
check "64 MiB written with nbdcopy" nbdcopy "$tmp/data" "$uri"
nbdcopy "$uri" "$tmp/out1"
check "nbdcopy reads back the data" cmp "$tmp/data" "$tmp/out1"
qemu-img convert -f raw -O raw "$uri" "$tmp/out2"
check "qemu-img convert reads back the data" cmp "$tmp/data" "$tmp/out2"
rbd export rbd/disk "$tmp/out3" > /dev/null 2>&1
check "rbd export (the Ceph side) equals the data" cmp "$tmp/data" "$tmp/out3"
is "multi-conn: not advertised writable with exclusive-lock on" \
    "$(nbdinfo --can multi-conn "$uri"; echo $?)" 2

# ---- trim, zero, fast zero ---------------------------------------------
nbdsh -u "$uri" -c '
h.zero(1 << 20, 8 << 20)                                # may trim: librbd discards
assert h.pread(1 << 20, 8 << 20) == bytes(1 << 20)
try:
    h.zero(65536, 12 << 20, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    raise SystemExit("fast zero that must stay allocated succeeded")
except nbd.Error as e:
    assert e.errno == "ENOTSUP", e.errno
h.zero(65536, 12 << 20, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 12 << 20) == bytes(65536)
h.trim(4 << 20, 16 << 20)
h.flush()
' > "$tmp/zero.out" 2>&1
check "zero, fast zero (ENOTSUP only without MAY_TRIM) and trim" test ! -s "$tmp/zero.out"
diag_file "$tmp/zero.out"
# Put the data back for what follows.
nbdcopy "$tmp/data" "$uri"

# ---- base:allocation ----------------------------------------------------
start_server sparse rbd rbd/sparse conf="$conf"
nbdsh -u "$uri" -c 'h.pwrite(b"\1" * (4 << 20), 8 << 20); h.flush()'
is "base:allocation: the one object written is data, the rest holes" \
    "$(nbdinfo --map "$uri" | awk '{print $1, $2, $3}' | tr '\n' ' ')" \
    "0 8388608 3 8388608 4194304 0 12582912 4194304 3 "

# Without fast-diff every object is a question to an OSD, so answers are
# learned ahead of the client's questions (status.c); what was learned
# must stay true: data found stays data, a hole stops being one when
# this server writes it, or (another front end wrote it) 2 s on.
rbd create --size 512M --image-feature layering rbd/ahead
start_server ahead rbd rbd/ahead conf="$conf"
ahead_uri=$uri
nbdsh -u "$uri" -c '
for obj in (0, 40, 100, 127):
    h.pwrite(bytes([obj + 1]) * (4 << 20), obj << 22)
h.pwrite(b"\1" * 4096, (70 << 22) + 8192)             # a part of object 70
h.flush()'
is "base:allocation of 128 objects in one question: the five written are data" \
    "$(nbdinfo --map "$uri" | awk '$3 == 0 {print $1, $2}' | tr '\n' ' ')" \
    "0 4194304 167772160 4194304 293601280 12288 419430400 4194304 532676608 4194304 "
# Asked 32 MiB at a time, as a copy asks (nbdcopy: 128 MiB), most
# answers come from what the look-ahead found (a new server: nothing
# known yet).
start_server ahead-map rbd rbd/ahead conf="$conf"
python - "$uri" << 'EOF' > "$tmp/ahead-map.out" 2>&1
import sys, nbd
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
size, pos, data = h.get_size(), 0, []
def collect(ctx, offset, entries, err):
    global pos
    for i in range(0, len(entries), 2):
        if entries[i + 1] & nbd.STATE_HOLE == 0:
            if data and data[-1][0] + data[-1][1] == pos:
                data[-1][1] += entries[i]
            else:
                data.append([pos, entries[i]])
        pos += entries[i]
while pos < size:
    h.block_status(min(32 << 20, size - pos), pos, collect)
print(" ".join("%d %d" % (o, n) for o, n in data))
EOF
is "base:allocation of 128 objects, asked 32 MiB at a time: the five written are data" \
    "$(cat "$tmp/ahead-map.out")" \
    "0 4194304 167772160 4194304 293601280 12288 419430400 4194304 532676608 4194304"
start_server ahead2 rbd rbd/ahead conf="$conf"
python - "$ahead_uri" "$uri" << 'EOF' > "$tmp/ahead.out" 2>&1
import sys, time, nbd
def connect(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h
a, b = connect(sys.argv[1]), connect(sys.argv[2])
def data(h, obj):
    flags = []
    h.block_status(4096, obj << 22, lambda ctx, off, entries, err: flags.append(entries[1]))
    return flags[0] & nbd.STATE_HOLE == 0
assert not data(a, 8) and not data(a, 9), "objects 8 and 9 are holes"
a.pwrite(b"\xaa" * 4096, 8 << 22)
assert data(a, 8), "a hole this server wrote is still reported as a hole"
assert not data(a, 9)
b.pwrite(b"\xbb" * 4096, 9 << 22)
b.flush()
time.sleep(3)
assert data(a, 9), "another front end's write into a hole is not seen 3 s later"
print("ok")
EOF
contains "learned holes: gone at this server's write, and 2 s after another's" \
    "$tmp/ahead.out" "^ok$"
diag_file "$tmp/ahead.out"

# ---- snapshots as dirty bitmaps, incremental backup ---------------------
rbd snap create rbd/disk@s1 > /dev/null 2>&1
# The full backup: the snapshot, served read-only.
start_server snap rbd rbd/disk@s1 conf="$conf"
snap_uri=$uri
nbdcopy "$snap_uri" "$tmp/backup"
check "snapshot=: the snapshot's data" cmp "$tmp/data" "$tmp/backup"
check_fails "snapshot=: read-only" nbdsh -u "$snap_uri" -c 'h.pwrite(b"x", 0)'
uri="nbd+unix:///?socket=$tmp/disk.sock"
nbdsh -u "$uri" -c '
import os
h.pwrite(os.urandom(8192), 1048576 + 4096)
h.pwrite(os.urandom(65536), 20 << 20)
h.pwrite(os.urandom(512), (60 << 20) + 512)
h.flush()'
nbdinfo "$uri" > "$tmp/contexts"
contains "qemu:dirty-bitmap:s1 is offered" "$tmp/contexts" "qemu:dirty-bitmap:s1"
nbdinfo --map=qemu:dirty-bitmap:s1 "$uri" | awk '$3 == 1 {print $1, $2}' > "$tmp/dirty"
is "the dirty bitmap shows exactly the ranges written since s1" "$(tr '\n' ' ' < "$tmp/dirty")" \
    "1052672 8192 20971520 65536 62915072 512 "
# The incremental backup: only the dirty ranges, over the full one.
python - "$uri" "$tmp/backup" << 'EOF' > "$tmp/incr.out" 2>&1
import sys, nbd
uri, backup = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:s1")
h.connect_uri(uri)
size, pos, dirty = h.get_size(), 0, []
def collect(ctx, offset, entries, err):
    o = offset
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            dirty.append((o, entries[i]))
        o += entries[i]
    global pos
    pos = o
while pos < size:
    h.block_status(size - pos, pos, collect)
with open(backup, "r+b") as f:
    for off, length in dirty:
        f.seek(off)
        f.write(h.pread(length, off))
print(len(dirty), "ranges")
EOF
nbdcopy "$uri" "$tmp/now"
check "the incremental backup reproduces the image" cmp "$tmp/backup" "$tmp/now"
diag_file "$tmp/incr.out"
start_server snap2 rbd rbd/disk conf="$conf" bitmap=nosuch
is "bitmap=: only the snapshots named" \
    "$(nbdinfo "$uri" | grep -c dirty-bitmap)" 0
stop_server

# ---- two front ends on one image ----------------------------------------
start_server ro1 -r rbd rbd/disk conf="$conf"; u1=$uri
start_server ro2 -r rbd rbd/disk conf="$conf"; u2=$uri
is "two read-only front ends return the same bytes" \
    "$(nbdcopy "$u1" - | md5sum)" "$(nbdcopy "$u2" - | md5sum)"
is "multi-conn: advertised read-only" "$(nbdinfo --can multi-conn "$u1"; echo $?)" 0
start_server w1 rbd rbd/shared conf="$conf"; u1=$uri
start_server w2 rbd rbd/shared conf="$conf"; u2=$uri
is "multi-conn: advertised with exclusive-lock off" "$(nbdinfo --can multi-conn "$u1"; echo $?)" 0
nbdsh -u "$u1" -c 'h.pwrite(b"from one" * 512, 4096); h.flush()'
is "a write flushed on one front end is read on the other" \
    "$(nbdsh -u "$u2" -c 'print(h.pread(8, 4096).decode())')" "from one"
nbdsh -u "$u2" -c 'h.pwrite(b"from two" * 512, 4096); h.flush()'
is "and back" "$(nbdsh -u "$u1" -c 'print(h.pread(8, 4096).decode())')" "from two"

# ---- errors from Ceph ----------------------------------------------------
start_server missing rbd rbd/later conf="$conf"
check_fails "an image that does not exist: the client is refused" nbdinfo "$uri"
contains "... with a clear message" "$tmp/missing.log" "image rbd/later does not exist"
rbd create --size 1M rbd/later
is "... and the server keeps serving: once it exists, it is served" \
    "$(nbdinfo --size "$uri")" 1048576

ceph-authtool --create-keyring "$tmp/wrong.keyring" --gen-key -n client.admin > /dev/null
nbdserve -U - rbd rbd/disk conf="$conf" keyring="$tmp/wrong.keyring" timeout=10 \
    --run true > "$tmp/key.log" 2>&1
contains "a wrong key: a clear message" "$tmp/key.log" "cannot connect to the Ceph cluster .* as client.admin"

timeout 30 ceph -c "$conf" auth get-or-create client.reader mon 'profile rbd' \
    osd 'profile rbd-read-only pool=rbd' > "$tmp/reader.keyring"
start_server reader rbd rbd/shared conf="$conf" id=reader keyring="$tmp/reader.keyring"
check_fails "a key without write caps, served writable: the client is refused" nbdinfo "$uri"
contains "... with a clear message" "$tmp/reader.log" "client.reader may not open image rbd/shared for writing"
start_server reader-ro -r rbd rbd/shared conf="$conf" id=reader keyring="$tmp/reader.keyring"
is "... and with -r it reads" "$(nbdsh -u "$uri" -c 'print(h.pread(8, 4096).decode())')" "from two"

# ---- the OSD killed mid-stream -------------------------------------------
start_server osd rbd rbd/disk conf="$conf" timeout=3
osd_pid=$server_pid
python - "$uri" "$top/tests/lib/ceph-cluster.sh" "$cdir" << 'EOF' > "$tmp/osd.out" 2>&1
import subprocess, sys, time, nbd
uri, helper, cdir = sys.argv[1:4]
h = nbd.NBD()
h.connect_uri(uri)
h.pread(1 << 20, 0)
subprocess.run([helper, "stop-osd", cdir], check=True, timeout=60)
start = time.monotonic()
try:
    for i in range(64):                      # requests in flight when the OSD went
        h.pread(1 << 20, i << 20)
    print("reads went on without the OSD")
except nbd.Error as e:
    took = time.monotonic() - start
    print("error", e.errno, "after %.1f s" % took)
    if took > 3 + 15:
        print("... later than timeout= allows")
subprocess.run([helper, "restart-osd", cdir, "rbd"], check=True, timeout=120)
assert len(h.pread(1 << 20, 8 << 20)) == 1 << 20
h.pwrite(b"after" * 100, 0)
h.flush()
print("ok after restart")
EOF
contains "OSD killed: the client gets EIO within timeout=" "$tmp/osd.out" "^error EIO after"
check_fails "... not later" grep -q "later than\|went on" "$tmp/osd.out"
contains "OSD back: the same connection reads and writes again" "$tmp/osd.out" "ok after restart"
diag_file "$tmp/osd.out"
check "the server survived" kill -0 "$osd_pid"
contains "the log says the cluster did not answer" "$tmp/osd.log" "did not answer within timeout="
is "a new connection is served" "$(nbdsh -u "$uri" -c 'print(h.pread(5, 0).decode())')" "after"
finish
