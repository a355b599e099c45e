#!/usr/bin/python3
# dirty-bitmap-overlay end to end, checked with real clients and qemu:
#  1. scripted writes, zeroes (with and without may-trim) and trims at
#     known offsets: nbdinfo --map=qemu:dirty-bitmap:b1 shows exactly their
#     granules, and qemu-img map through qemu's NBD client agrees;
#  2. LIST_META_CONTEXT answers for "qemu:", "qemu:dirty-bitmap:", one
#     bitmap, base:allocation and the empty query;
#  3. reads equal the base with the requests applied (a model built here),
#     over a raw base (64K clusters) and a qcow2 base (4K clusters), with
#     heads and tails of clusters and a disk size no cluster divides; the
#     base never changes;
#  4. after a stop: qemu-img check clean, qemu-img info lists the bitmaps,
#     convert and commit give the model, qcow2-readonly and qemu-nbd serve
#     the same bytes and bitmaps;
#  5. a restart keeps data and bitmaps; kill -9 after a FLUSH loses nothing;
#  6. clear=b1 starts an empty epoch, b2 keeps its bits;
#  7. an incremental backup from b1's dirty extents reproduces the disk;
#  8. creation without a base, and what is refused: a granularity that
#     does not match, a missing overlay, files that are not usable
#     overlays, a second server; --dump-plugin lists the bitmaps;
#  9. four connections writing disjoint regions at once (multi-conn).
# Two checks fail until the plugin is fixed (each says BUG where it is):
# a bitmap not named at the recovering start is refused afterwards, and
# write/trim cycles without a flush exhaust the refcount table.
# The crash of a server in the middle of a writer is tests/overlay-crash.t.
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd
from overlaytest import (Model, bitmaps_in_file, check_clean, check_no_errors, image_info, nbdinfo_map,
                         qemu_dirty_map, read_all, refused, run, same_bytes, serve, set_in_use)

for tool in ("qemu-img", "qemu-nbd", "nbdinfo", "nbdcopy"):
    if shutil.which(tool, path="/usr/bin:/bin") is None:
        print("1..0 # SKIP %s is not installed" % tool)
        sys.exit(0)

t = nbdtest.Test(plan=127, watchdog=600 if nbdtest.SANITIZED else 240)
tmp = t.tmp
random.seed(16)
K, M = 1024, 1024 * 1024


def round512(n):
    return (n + 511) // 512 * 512


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_base(path, size, holes):
    """A raw file of random data with HOLES ((offset, length) never
    written: sparse, reading as zero); returns its bytes."""
    data = bytearray(random.randbytes(size))
    for off, n in holes:
        data[off:off + n] = bytes(n)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 4096):
            block = data[off:off + 4096]
            if any(block):
                f.seek(off)
                f.write(block)
    return bytes(data)


def scripted(h, m):
    """Requests at known places, relative to the cluster size C: heads and
    tails of clusters, whole clusters, the short last cluster, and the
    transitions data -> zero -> data and data -> trimmed of one cluster."""
    C, S = m.cluster, m.size
    last = (S - 1) // C * C
    m.write(h, 0, b"\x01")
    m.write(h, 2 * C + 10, random.randbytes(100))               # head of a cluster
    m.write(h, 3 * C - 300, random.randbytes(300))              # tail of a cluster
    m.write(h, 5 * C - 1000, random.randbytes(2 * C + 2000))    # part, whole, whole, part
    m.write(h, S - 700, random.randbytes(700))                  # short last cluster, past the base
    m.zero(h, 10 * C, 3 * C)                                    # over base data
    m.zero(h, 14 * C, 2 * C, may_trim=True)
    m.zero(h, 20 * C + 512, 1000)                               # part of a cluster
    m.zero(h, 21 * C + 512, 1000, may_trim=True)
    m.zero(h, 60 * C + 100, 3 * C)                              # unaligned, over a base hole
    m.trim(h, 24 * C, 2 * C)                                    # whole clusters: read as zero
    m.trim(h, 30 * C + 100, 200)                                # a part: unchanged, yet dirty
    m.trim(h, 31 * C - 100, C + 200)                            # one whole cluster inside
    m.trim(h, 70 * C + 100, 3 * C)
    m.write(h, 40 * C, random.randbytes(C))                     # allocated, freed, allocated
    m.zero(h, 40 * C, C, may_trim=True)
    m.write(h, 40 * C + C // 2, random.randbytes(10))
    m.write(h, 42 * C, random.randbytes(C))                     # a zero cluster keeping its space:
    m.zero(h, 42 * C, C)                                        # the next write must not bring
    m.write(h, 42 * C + 5, random.randbytes(5))                 # the old bytes back
    m.write(h, 44 * C, random.randbytes(C))                     # over a base hole, trimmed:
    m.trim(h, 44 * C, C)                                        # unallocated again
    m.write(h, 46 * C + 3, random.randbytes(4097), nbd.CMD_FLAG_FUA)
    m.write(h, 50 * C + 777, random.randbytes(300000))
    m.write(h, 80 * C, random.randbytes(C))
    m.trim(h, 80 * C + 1, C - 1)                                # a part of written data: kept
    m.write(h, 90 * C - 1, b"\xaa\xbb")                         # across a cluster boundary
    m.zero(h, last, S - last, may_trim=True)                    # the short last cluster, whole
    m.write(h, S - 1, b"\x7f")


def base_holes(C):
    return [(44 * C, 4 * C), (60 * C, 4 * C)]


def random_reads(h, m, n=150):
    """Unaligned reads anywhere: how many differ from the model."""
    bad = 0
    for _ in range(n):
        off = random.randrange(m.size)
        count = random.randint(1, min(m.size - off, 3 * m.cluster + 777))
        if h.pread(count, off) != bytes(m.data[off:off + count]):
            bad += 1
    return bad


def block_status_from(h, m, name, n=60):
    """BLOCK_STATUS at unaligned offsets: the first extent starts there,
    and every byte of it has the state it reports.  How many do not."""
    bad = 0
    g = m.granularity[name]
    context = "qemu:dirty-bitmap:" + name
    for _ in range(n):
        off = random.randrange(m.size)
        got = []
        h.block_status(min(m.size - off, 4 * M), off,
                       lambda ctx, start, ents, err: got.append((ctx, start, ents[0], ents[1])) or 0)
        if len(got) != 1 or got[0][0] != context or got[0][1] != off:
            bad += 1
            continue
        length, flags = got[0][2], got[0][3]
        granules = range(off // g, (off + length - 1) // g + 1)
        if length == 0 or off + length > m.size or any((i in m.dirty[name]) != bool(flags & 1) for i in granules):
            bad += 1
    return bad


def same_disk(h, m, desc):
    same_bytes(t, read_all(h, m.size), bytes(m.data), desc)


def same_file(path, m, desc):
    try:
        with open(path, "rb") as f:
            got = f.read()
    except OSError as e:
        got = str(e).encode()
    same_bytes(t, got, bytes(m.data), desc)


def maps_agree(uri, m, names, label):
    for name in names:
        t.is_(nbdinfo_map(uri, "qemu:dirty-bitmap:" + name), m.map(name),
              "%s: nbdinfo --map=qemu:dirty-bitmap:%s shows exactly the granules written" % (label, name))


def list_contexts(uri, *queries):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    if hasattr(h, "set_request_meta_context"):  # libnbd >= 1.16: no SET_META_CONTEXT at opt_go
        h.set_request_meta_context(False)
    for q in queries:
        h.add_meta_context(q)
    names = []
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    h.opt_abort()
    return sorted(names)


def qemu_nbd(name, *args):
    """A read-only qemu-nbd on NAME.sock; stopped by t's clean-up."""
    sock = os.path.join(tmp, name + ".sock")
    p = subprocess.Popen(["qemu-nbd", "-t", "-r", "-k", sock] + list(args),
                         stderr=open(os.path.join(tmp, name + ".log"), "w"))
    p.name, p.sock = name, sock
    t.servers.append(p)
    for _ in range(200):
        if os.path.exists(sock) or p.poll() is not None:
            break
        time.sleep(0.05)
    t.last_server = p
    return "nbd+unix:///?socket=" + sock


def commit_into_copy(overlay, base, fmt, name):
    """qemu-img commit of a copy of OVERLAY into a copy of BASE; returns
    the path of the base's copy, as raw."""
    ov = os.path.join(tmp, name + ".qcow2")
    into = os.path.join(tmp, name + ".base")
    shutil.copyfile(overlay, ov)
    shutil.copyfile(base, into)
    for args in (["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", into, "-F", fmt, ov],
                 ["qemu-img", "commit", "-f", "qcow2", ov]):
        p = run(args)
        if p.returncode:
            t.diag(" ".join(args) + ": " + p.stderr)
    if fmt == "raw":
        return into
    out = into + ".raw"
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", into, out])
    return out


# =========================================================================
# A raw base, 64K clusters and granules, bitmaps b1 and b2.
# =========================================================================
C = 64 * K
base_size = 8 * M + 5000              # the overlay is 8M + 5120: no cluster size divides it
base = os.path.join(tmp, "base.raw")
base_bytes = make_base(base, base_size, base_holes(C))
base_sum = sha256(base)
ov = os.path.join(tmp, "ov.qcow2")
m = Model(base_bytes, round512(base_size), C, {"b1": C, "b2": C})

uri, sock = serve(t, "a", ov, "base=" + base, "bitmap=b1", "bitmap=b2")
h = t.connect(uri)
t.is_(h.get_size(), m.size, "a new overlay has the base's size rounded up to 512 bytes")
t.ok(h.can_multi_conn() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_flush(),
     "the export is writable with multi-conn, FUA, trim, zero and flush")

# ---- 2. LIST_META_CONTEXT ----
bitmaps = ["qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b2"]
t.is_(list_contexts(uri, "qemu:"), ["qemu:allocation-depth"] + bitmaps,
      "LIST_META_CONTEXT \"qemu:\": allocation depth and both bitmaps")
t.is_(list_contexts(uri, "qemu:dirty-bitmap:"), bitmaps, "LIST_META_CONTEXT \"qemu:dirty-bitmap:\": both bitmaps")
t.is_(list_contexts(uri, "qemu:dirty-bitmap:b1"), bitmaps[:1], "LIST_META_CONTEXT \"qemu:dirty-bitmap:b1\": b1 alone")
t.is_(list_contexts(uri, "base:allocation"), ["base:allocation"], "LIST_META_CONTEXT \"base:allocation\"")
t.is_(list_contexts(uri), ["base:allocation", "qemu:allocation-depth"] + bitmaps,
      "LIST_META_CONTEXT with no query: every context")
t.is_(list_contexts(uri, "qemu:dirty-bitmap:nosuch", "qemu:dirty-bitmap:b2"), bitmaps[1:],
      "LIST_META_CONTEXT of an unknown bitmap and b2: b2 alone")

t.is_(nbdinfo_map(uri, "qemu:dirty-bitmap:b1"), [(0, m.size, 0)], "a new bitmap is clean")
info = bitmaps_in_file(ov)
t.ok(all("in-use" in info.get(b, (0, ()))[1] for b in ("b1", "b2")),
     "while served, qemu-img info -U shows b1 and b2 in use")

# ---- 1 and 3. scripted requests ----
scripted(h, m)
same_disk(h, m, "raw base, 64K clusters: the disk reads as the base with the requests applied")
t.is_(random_reads(h, m), 0, "... and so do 150 unaligned reads")
maps_agree(uri, m, ["b1", "b2"], "raw base")
t.is_(qemu_dirty_map(sock, "b1"), m.map("b1"), "qemu-img map with x-dirty-bitmap=qemu:dirty-bitmap:b1 agrees")


hb = t.connect(uri, ["qemu:dirty-bitmap:b2"])
t.is_(block_status_from(hb, m, "b2"), 0, "BLOCK_STATUS of b2 at 60 unaligned offsets: each first extent is right")
hb.shutdown()

# base:allocation may only say zero where the disk reads as zero.
zmap = nbdinfo_map(uri, "base:allocation")
t.ok(isinstance(zmap, list) and all(not any(m.data[o:o + n]) for o, n, v in zmap if v & 2),
     "base:allocation says zero only where the disk reads as zero")
h.shutdown()
t.is_(t.stop(), 0, "the server stops cleanly on SIGTERM")

# ---- 4. after the stop ----
check_clean(t, ov, "qemu-img check: no errors, no leaks")
info = bitmaps_in_file(ov)
t.is_({k: v[0] for k, v in info.items()}, {"b1": C, "b2": C}, "qemu-img info lists b1 and b2 with 64K granules")
t.ok(all("in-use" not in v[1] for v in info.values()), "... neither in use after a clean stop")
t.is_(image_info(ov).get("backing-filename-format"), "raw", "... and the backing file's format is raw")
run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", ov, os.path.join(tmp, "conv.raw")])
same_file(os.path.join(tmp, "conv.raw"), m, "qemu-img convert -O raw of the overlay equals the model")
same_file(commit_into_copy(ov, base, "raw", "commit-a"), m, "qemu-img commit into a copy of the base gives the model")

ro = t.server("ro", "qcow2-readonly", "file=" + ov)
hr = t.connect(ro)
same_disk(hr, m, "qcow2-readonly serves the overlay with the same bytes")
maps_agree(ro, m, ["b1", "b2"], "qcow2-readonly")
hr.shutdown()
t.stop()

shutil.copyfile(ov, os.path.join(tmp, "q.qcow2"))
q = qemu_nbd("q", "-f", "qcow2", "-A", "-B", "b1", "-B", "b2", os.path.join(tmp, "q.qcow2"))
maps_agree(q, m, ["b1", "b2"], "qemu-nbd -B on the overlay")
qdepth = nbdinfo_map(q, "qemu:allocation-depth")
t.stop()

# ---- 5. restart ----
uri, sock = serve(t, "a2", ov, "bitmap=b1", "bitmap=b2")
h = t.connect(uri)
same_disk(h, m, "after a restart: the same data")
maps_agree(uri, m, ["b1", "b2"], "after a restart")
t.is_(nbdinfo_map(uri, "qemu:allocation-depth"), qdepth, "qemu:allocation-depth agrees with qemu-nbd -A")

# Requests, a FLUSH, then kill -9: all of them are there afterwards.
m.write(h, 100 * C + 17, random.randbytes(3 * C))
m.zero(h, 6 * C, C)
m.trim(h, 50 * C, 2 * C)
m.write(h, 120 * C - 5, random.randbytes(10))
m.zero(h, 104 * C, 5 * C + 3, may_trim=True)
h.flush()
# FUA requests after the flush are durable on their own.
m.write(h, 115 * C + 9, random.randbytes(C), nbd.CMD_FLAG_FUA)
m.zero(h, 117 * C, 2 * C, flags=nbd.CMD_FLAG_FUA)
m.trim(h, 1 * C, C, flags=nbd.CMD_FLAG_FUA)
t.stop(sig=signal.SIGKILL)
check_no_errors(t, ov, "after kill -9: qemu-img check finds no errors")
uri, sock = serve(t, "a3", ov, "bitmap=b1", "bitmap=b2")
h = t.connect(uri)
same_disk(h, m, "after kill -9 and a restart: every flushed or FUA request is there")
maps_agree(uri, m, ["b1", "b2"], "after kill -9")
t.ok("not closed cleanly" in t.log("a3"), "... and the server says the overlay was not closed cleanly")

# ---- 7, first half: the full backup at the end of the epoch ----
full = os.path.join(tmp, "full.img")
p = run(["nbdcopy", uri, full])
t.is_(p.returncode, 0, "nbdcopy takes the full backup")
h.shutdown()
t.stop()

# ---- 6. clear=b1 ----
uri, sock = serve(t, "a4", ov, "clear=b1", "bitmap=b2")
h = t.connect(uri)
b2_before = m.map("b2")
m.clear("b1")
t.is_(nbdinfo_map(uri, "qemu:dirty-bitmap:b1"), [(0, m.size, 0)], "clear=b1: b1 starts empty")
t.is_(nbdinfo_map(uri, "qemu:dirty-bitmap:b2"), b2_before, "... while b2 keeps its bits")
t.is_(list_contexts(uri, "qemu:dirty-bitmap:"), bitmaps, "... and clear= serves b1 too")
same_disk(h, m, "... and the data is untouched")
m.write(h, 7 * C + 100, random.randbytes(2 * C))
m.write(h, 110 * C, random.randbytes(C // 2))
m.zero(h, 5 * C, 2 * C, may_trim=True)
m.trim(h, 112 * C, 2 * C)
m.write(h, m.size - 3000, random.randbytes(3000))
maps_agree(uri, m, ["b1", "b2"], "the new epoch")

# ---- 7. the incremental backup ----
incr = os.path.join(tmp, "incr.img")
shutil.copyfile(full, incr)
extents = nbdinfo_map(uri, "qemu:dirty-bitmap:b1")
copied = 0
with open(incr, "r+b") as f:
    for off, n, v in extents if isinstance(extents, list) else []:
        if v & 1:
            f.seek(off)
            f.write(h.pread(n, off))
            copied += n
same_file(incr, m, "an incremental backup from b1's dirty extents onto the full one reproduces the disk")
t.ok(0 < copied < m.size // 8, "... copying only the dirty part (%d of %d bytes)" % (copied, m.size))
incr2 = os.path.join(tmp, "incr2.img")
shutil.copyfile(full, incr2)
p = run(["/usr/bin/python3", os.path.join(nbdtest.TOP, "plugins", "dirty-bitmap-overlay", "incremental-backup.py"),
         sock, "b1", incr2])
same_file(incr2, m, "so does the page's incremental-backup.py")
h.shutdown()
t.is_(t.stop(), 0, "the server stops cleanly")
check_no_errors(t, ov, "qemu-img check: no errors after the recovered crash and a clean stop")
run(["qemu-img", "check", "-q", "-r", "leaks", ov])
check_clean(t, ov, "... and none at all after qemu-img check -r leaks")
t.is_(sha256(base), base_sum, "the raw base never changed")

# A bitmap not named at the restart that recovers a crash is still a
# superset of its epoch's writes: a later start that names it again must
# serve it, with the bits it had (BUG until fixed: the recovering start
# clears the overlay's own marker but leaves b2 flagged in use, so the
# next start takes b2 for one left by another program and refuses it).
rec = os.path.join(tmp, "rec.qcow2")
uri, sock = serve(t, "rec1", rec, "size=1M", "bitmap=b1", "bitmap=b2")
h = t.connect(uri)
h.pwrite(b"r" * 100, 70000)
h.flush()
t.stop(sig=signal.SIGKILL)
rc, err = refused("overlay=" + rec, "bitmap=b1")
rc2, err2 = refused("overlay=" + rec, "bitmap=b1", "bitmap=b2")
if not t.ok(rc == 0 and rc2 == 0, "after a crash, a start naming only b1, then one naming b1 and b2: both start"):
    t.diag("exit %d, then %d: %s" % (rc, rc2, err2.strip()))
got = "b2 is refused"
if rc2 == 0:
    uri, sock = serve(t, "rec2", rec, "bitmap=b2")
    got = nbdinfo_map(uri, "qemu:dirty-bitmap:b2")
    t.stop()
t.is_(got, [(0, 65536, 0), (65536, 65536, 1), (131072, M - 131072, 0)], "... and b2 still shows the write dirty")

# =========================================================================
# A qcow2 base, 4K clusters, 16K granules.
# =========================================================================
C = 4 * K
raw = os.path.join(tmp, "qbase.raw")
qbase = os.path.join(tmp, "qbase.qcow2")
qbase_bytes = make_base(raw, base_size, base_holes(C) + [(2 * M, 1 * M)])
p = run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qbase])
qbase_sum = sha256(qbase)
ov2 = os.path.join(tmp, "ov2.qcow2")
m = Model(qbase_bytes, round512(base_size), C, {"b1": 16 * K})
# A small metadata cache for the base: its L2 tables are read again and again.
uri, sock = serve(t, "b", ov2, "base=" + qbase, "cluster-size=4K", "granularity=16K", "bitmap=b1",
                  "l2-cache-size=64K")
h = t.connect(uri)
t.is_(h.get_size(), m.size, "over a qcow2 base: the base's size")
scripted(h, m)
# Across the 2M that an L2 table of 4K clusters maps.
m.write(h, 2 * M - 5000, random.randbytes(10000))
m.zero(h, 4 * M - 100, 2 * M + 200, may_trim=True)
m.trim(h, 6 * M - 4 * K, 8 * K)
m.write(h, 6 * M - 2 * K, random.randbytes(4 * K))
same_disk(h, m, "qcow2 base, 4K clusters: the disk reads as the base with the requests applied")
t.is_(random_reads(h, m), 0, "... and so do 150 unaligned reads")
maps_agree(uri, m, ["b1"], "qcow2 base, 16K granules")
t.is_(qemu_dirty_map(sock, "b1"), m.map("b1"), "qemu-img map with x-dirty-bitmap agrees")
h.shutdown()
t.is_(t.stop(), 0, "the server stops cleanly")
check_clean(t, ov2, "qemu-img check: no errors, no leaks")
oinfo = image_info(ov2)
t.is_((oinfo.get("cluster-size"), oinfo.get("backing-filename-format"), {k: v[0] for k, v in bitmaps_in_file(ov2).items()}),
      (4096, "qcow2", {"b1": 16384}), "qemu-img info: 4K clusters, a qcow2 backing file, b1 with 16K granules")
run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", ov2, os.path.join(tmp, "conv2.raw")])
same_file(os.path.join(tmp, "conv2.raw"), m, "qemu-img convert -O raw equals the model")
same_file(commit_into_copy(ov2, qbase, "qcow2", "commit-b"), m, "qemu-img commit into a copy of the qcow2 base gives the model")
uri, sock = serve(t, "b2", ov2, "bitmap=b1")
depth = nbdinfo_map(uri, "qemu:allocation-depth")
t.stop()
shutil.copyfile(ov2, os.path.join(tmp, "q2.qcow2"))
q = qemu_nbd("q2", "-f", "qcow2", "-A", os.path.join(tmp, "q2.qcow2"))
t.is_(depth, nbdinfo_map(q, "qemu:allocation-depth"), "over a qcow2 base: qemu:allocation-depth agrees with qemu-nbd -A")
t.stop()
ro = t.server("ro2", "qcow2-readonly", "file=" + ov2)
hr = t.connect(ro)
same_disk(hr, m, "qcow2-readonly serves the same bytes")
maps_agree(ro, m, ["b1"], "qcow2-readonly")
hr.shutdown()
t.stop()
t.is_(sha256(qbase), qbase_sum, "the qcow2 base never changed")

# =========================================================================
# 9. Four connections writing disjoint regions at once.
# =========================================================================
C = 64 * K
pbase = os.path.join(tmp, "pbase.raw")
psize = 16 * M
pbase_bytes = make_base(pbase, psize, [(8 * M, 2 * M)])
ov3 = os.path.join(tmp, "ov3.qcow2")
m = Model(pbase_bytes, psize, C, {"b1": C})
uri, sock = serve(t, "p", ov3, "base=" + pbase, "bitmap=b1")

# Cut the disk into pieces of 1 byte to 40K; each piece goes to one of
# four connections, so that pieces of one cluster (whose first write
# copies the rest from the base) are written by several at once.
pieces = []
pos = 0
while pos < psize:
    n = min(random.choice((1, 511, 4096, 6000, 40000, random.randint(1, 40000))), psize - pos)
    if random.random() < 0.6:
        kind = "zero" if random.random() < 0.1 else "write"
        pieces.append((kind, pos, n, random.randbytes(n) if kind == "write" else None))
    pos += n
random.shuffle(pieces)
handles = [t.connect(uri) for _ in range(4)]
errors = []


def writer(h, mine):
    try:
        for i, (kind, off, n, data) in enumerate(mine):
            while h.aio_in_flight() >= 16:
                h.poll(-1)
            if kind == "write":
                h.aio_pwrite(data, off)
            else:
                h.aio_zero(n, off)
            if i % 500 == 499:
                h.aio_flush()
        while h.aio_in_flight() > 0:
            h.poll(-1)
    except nbd.Error as e:
        errors.append(str(e))


# A fifth connection reads, while they write, what nobody writes: it
# must read as the base all along, even in clusters being allocated.
untouched = []
pos = 0
for kind, off, n, data in sorted(pieces, key=lambda p: p[1]):
    if off > pos:
        untouched.append((pos, off - pos))
    pos = off + n
reader_handle = t.connect(uri)
stop_reading = threading.Event()
reader_bad = []
reads_done = [0]


def reader():
    try:
        while not stop_reading.is_set():
            off, n = random.choice(untouched)
            if reader_handle.pread(n, off) != pbase_bytes[off:off + n]:
                reader_bad.append((off, n))
            reads_done[0] += 1
    except nbd.Error as e:
        reader_bad.append(str(e))


threads = [threading.Thread(target=writer, args=(handles[i], pieces[i::4])) for i in range(4)]
rth = threading.Thread(target=reader)
rth.start()
for th in threads:
    th.start()
for th in threads:
    th.join()
stop_reading.set()
rth.join()
t.ok(not reader_bad and reads_done[0] > 0,
     "a fifth connection reading the untouched parts meanwhile sees the base (%d reads)" % reads_done[0])
if reader_bad:
    t.diag("wrong reads: %s" % reader_bad[:10])
for kind, off, n, data in pieces:
    if kind == "write":
        m.apply_write(off, data)
    else:
        m.apply_zero(off, n)
t.is_(errors, [], "4 connections: %d requests in parallel, 16 in flight each, without error" % len(pieces))
same_disk(handles[1], m, "... and the disk holds every one of them")
maps_agree(uri, m, ["b1"], "4 connections")
for h in handles + [reader_handle]:
    h.shutdown()
t.is_(t.stop(), 0, "the server stops cleanly")
check_clean(t, ov3, "qemu-img check after the parallel writes: no errors, no leaks")

# =========================================================================
# 8. Creation without a base; what is refused.
# =========================================================================
solo = os.path.join(tmp, "solo.qcow2")
uri, sock = serve(t, "solo", solo, "size=3145828", "bitmap=d", "granularity=128K")
h = t.connect(uri)
m = Model(b"", round512(3145828), 128 * K, {"d": 128 * K})
t.is_(h.get_size(), m.size, "size=: a new overlay without a base, its size rounded up to 512 bytes")
same_disk(h, m, "... reading as zeroes")
m.write(h, 1000, random.randbytes(200000))
m.zero(h, 2 * M, 300 * K)
m.write(h, m.size - 10, b"0123456789")
same_disk(h, m, "... and as written")
maps_agree(uri, m, ["d"], "without a base")
h.shutdown()
t.stop()
check_clean(t, solo, "qemu-img check of the overlay without a base: clean")
sinfo = image_info(solo)
t.ok("backing-filename" not in sinfo and sinfo.get("virtual-size") == m.size and sinfo.get("cluster-size") == 128 * K,
     "qemu-img info: no backing file, the size, 128K clusters (the granularity)")

rc, err = refused("overlay=" + solo, "bitmap=d", "granularity=64K")
t.ok(rc == 1 and "granularity" in err and "131072" in err,
     "granularity=64K against a bitmap of 128K: refused, saying both granularities")
rc, err = refused("overlay=" + solo, "bitmap=d")
t.is_((rc, err.strip()), (0, ""), "without granularity=, the existing bitmap keeps its own")
missing = os.path.join(tmp, "missing.qcow2")
rc, err = refused("overlay=" + missing, "bitmap=b1")
t.ok(rc == 1 and "does not exist" in err and not os.path.exists(missing),
     "a missing overlay without base= or size=: refused, nothing created")


def refused_file(name, content, want, desc):
    path = os.path.join(tmp, name)
    if content is not None:
        with open(path, "wb") as f:
            f.write(content)
    before = open(path, "rb").read()
    rc, err = refused("overlay=" + path, "bitmap=b1")
    if not t.ok(rc == 1 and path in err and want in err and "Sanitizer" not in err and
                open(path, "rb").read() == before, desc):
        t.diag("exit %d: %s" % (rc, err.strip()))


refused_file("empty.qcow2", b"", "", "an empty file as overlay: refused cleanly, not changed")
refused_file("text.qcow2", b"this is not a qcow2 image\n" * 100, "", "a text file as overlay: refused cleanly")
refused_file("random.qcow2", random.randbytes(1 << 20), "", "a random file as overlay: refused cleanly")
hdr = bytearray(open(solo, "rb").read())
refused_file("short.qcow2", bytes(hdr[:200]), "", "a truncated qcow2 file: refused cleanly")
bad = bytearray(hdr)
bad[40:48] = (1 << 60).to_bytes(8, "big")     # l1_table_offset far past the end of the file
refused_file("badl1.qcow2", bytes(bad), "", "a qcow2 whose L1 table lies past the end: refused cleanly")
v2 = os.path.join(tmp, "v2.qcow2")
run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M"])
refused_file("v2.qcow2", None, "", "a qcow2 version 2 image: refused cleanly")
snap = os.path.join(tmp, "snap.qcow2")
shutil.copyfile(solo, snap)
run(["qemu-img", "snapshot", "-c", "s1", snap])
refused_file("snap.qcow2", None, "snapshot", "an overlay with an internal snapshot: refused, saying why")

uri, sock = serve(t, "lock", solo, "bitmap=d")
rc, err = refused("overlay=" + solo, "bitmap=d")
t.ok(rc == 1 and "in use" in err, "a second server on the same overlay is refused (it is locked)")
t.stop()
# =========================================================================
# Overlays made by qemu; bitmaps left by others; tiny clusters.
# =========================================================================
# qemu-img's overlay over the raw base, written by qemu-io, with a bitmap
# b0 that the server is not told about: kept in the file, untouched.
qov = os.path.join(tmp, "qemu-made.qcow2")
for args in (["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", qov],
             ["qemu-img", "bitmap", "--add", qov, "b0"],
             ["qemu-io", "-f", "qcow2", "-c", "write -P 5 100K 200K", "-c", "write -z 1M 128K", qov]):
    p = run(args)
    if p.returncode:
        t.diag(" ".join(args) + ": " + p.stderr)
m = Model(base_bytes, round512(base_size), 64 * K, {"b0": 64 * K, "b1": 64 * K})
m.apply_write(100 * K, b"\x05" * (200 * K))
m.apply_zero(1 * M, 128 * K)
m.clear("b1")
rc, err = refused("overlay=" + qov, "base=" + os.path.join(tmp, "pbase.raw"), "bitmap=b1")
t.ok(rc == 1 and "not of base=" in err, "base= naming another file than the overlay's backing file: refused")
uri, sock = serve(t, "qm", qov, "base=" + base, "bitmap=b1")
h = t.connect(uri)
t.is_(list_contexts(uri, "qemu:dirty-bitmap:"), ["qemu:dirty-bitmap:b1"], "an overlay made by qemu-img: b0, not named, is not served")
same_disk(h, m, "... and reads as qemu-io wrote it")
b0_bits = set(m.dirty["b0"])
m.write(h, 150 * K, random.randbytes(100 * K))
m.zero(h, 1 * M + 64 * K, 64 * K)
m.trim(h, 2 * M, 256 * K)
m.write(h, 5 * M + 1, random.randbytes(3))
m.dirty["b0"] = b0_bits  # b0 records nothing here
same_disk(h, m, "... and as written since")
maps_agree(uri, m, ["b1"], "an overlay made by qemu-img")
h.shutdown()
t.is_(t.stop(), 0, "the server stops cleanly")
check_clean(t, qov, "qemu-img check of the qemu-made overlay: no errors, no leaks")
run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qov, os.path.join(tmp, "conv-qm.raw")])
same_file(os.path.join(tmp, "conv-qm.raw"), m, "... qemu-img convert equals the model")
shutil.copyfile(qov, os.path.join(tmp, "qm2.qcow2"))
q = qemu_nbd("qm2", "-f", "qcow2", "-B", "b0", "-B", "b1", os.path.join(tmp, "qm2.qcow2"))
t.is_(nbdinfo_map(q, "qemu:dirty-bitmap:b0"), m.map("b0"),
      "qemu-nbd -B b0: b0 is still in the file, as qemu-io left it")
maps_agree(q, m, ["b1"], "qemu-nbd -B b1 on the qemu-made overlay")
t.stop()

# A bitmap in use by another program (qemu killed while running the
# image) cannot be trusted: refused; clear= starts it anew.
inuse = os.path.join(tmp, "inuse.qcow2")
shutil.copyfile(qov, inuse)
set_in_use(inuse, "b1")
rc, err = refused("overlay=" + inuse, "bitmap=b1")
t.ok(rc == 1 and "b1" in err and "in use" in err, "a bitmap left in use by another program: refused, saying so")
rc, err = refused("overlay=" + inuse, "clear=b1")
t.is_(rc, 0, "... and clear=b1 starts it anew")
check_clean(t, inuse, "... leaving a clean image")

# An overlay with compressed clusters (qemu-img convert -c): they read;
# a write onto one fails with ENOTSUP, as documented; others work.
comp = os.path.join(tmp, "comp.qcow2")
run(["qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", "-B", base, "-F", "raw", qov, comp])
m = Model(open(os.path.join(tmp, "conv-qm.raw"), "rb").read(), round512(base_size), 64 * K, {"b1": 64 * K})
uri, sock = serve(t, "comp", comp, "bitmap=b1")
h = t.connect(uri)
same_disk(h, m, "compressed clusters read as qemu wrote them")
t.is_(nbdtest.errno_of(lambda: h.pwrite(b"x", 100 * K)), "ENOTSUP", "a write onto a compressed cluster: ENOTSUP")
m.write(h, 6 * M, random.randbytes(1000))
same_bytes(t, h.pread(1000, 6 * M), bytes(m.data[6 * M:6 * M + 1000]), "... a write elsewhere works")
h.shutdown()
t.stop()
check_no_errors(t, comp, "... and qemu-img check finds no errors")

# 512-byte clusters and granules: many refcount blocks, and the bitmap's
# data spans several clusters (one holds 4096 granules: 2M).
tiny = os.path.join(tmp, "tiny.qcow2")
uri, sock = serve(t, "tiny", tiny, "size=5M", "cluster-size=512", "granularity=512", "bitmap=f")
h = t.connect(uri)
m = Model(b"", 5 * M, 512, {"f": 512})
for _ in range(300):
    off = random.randrange(m.size)
    n = random.randint(1, min(20000, m.size - off))
    r = random.random()
    if r < 0.7:
        m.write(h, off, random.randbytes(n))
    elif r < 0.85:
        m.zero(h, off, n, may_trim=r < 0.8)
    else:
        m.trim(h, off, n)
m.write(h, 2 * M - 700, random.randbytes(1400))
same_disk(h, m, "512-byte clusters: reads equal the model after 300 random requests")
maps_agree(uri, m, ["f"], "512-byte granules")
t.ok(h.pread(512, 0) is not None and nbdtest.errno_of(lambda: h.zero(1000, 100, nbd.CMD_FLAG_FAST_ZERO)) == "ENOTSUP",
     "a fast zero of part of a cluster: ENOTSUP")
h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)
m.apply_zero(8192, 4096)
same_disk(h, m, "... a fast zero of whole clusters works")
h.shutdown()
t.is_(t.stop(), 0, "the server stops cleanly")
check_clean(t, tiny, "qemu-img check: no errors, no leaks")
run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", tiny, os.path.join(tmp, "tiny.raw")])
same_file(os.path.join(tmp, "tiny.raw"), m, "qemu-img convert equals the model")
uri, sock = serve(t, "tiny2", tiny, "bitmap=f")
maps_agree(uri, m, ["f"], "512-byte granules after a restart")
t.stop()

# Names given twice, and a bitmap added to an overlay that has data.
uri, sock = serve(t, "twice", ov, "bitmap=b1", "bitmap=b1", "clear=b2", "bitmap=b2", "bitmap=b3")
t.is_(list_contexts(uri, "qemu:dirty-bitmap:"), bitmaps + ["qemu:dirty-bitmap:b3"],
      "a name given twice is served once; bitmap=b3 adds a bitmap to the overlay")
t.is_([nbdinfo_map(uri, "qemu:dirty-bitmap:" + b) for b in ("b2", "b3")], [[(0, round512(base_size), 0)]] * 2,
      "... b2 (cleared) and the new b3 start empty")
t.stop()
check_clean(t, ov, "... and qemu-img check is clean")
t.is_(sorted(bitmaps_in_file(ov)), ["b1", "b2", "b3"], "... qemu-img info lists the three")

# Relative names: the backing file is stored as an absolute path.
p = run([nbdtest.NBDSERVE, "-U", "-", "dirty-bitmap-overlay", "rel.qcow2", "base=base.raw", "bitmap=b1",
         "--run", "true"], cwd=tmp)
t.is_((p.returncode, image_info(os.path.join(tmp, "rel.qcow2")).get("backing-filename")), (0, base),
      "overlay= and base= relative to the current directory: the backing file is stored absolute")

# Other overlays that cannot be used.
orphan = os.path.join(tmp, "orphan.qcow2")
gone = os.path.join(tmp, "gone.raw")
nbdtest.sparse_file(gone, M)
run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", gone, "-F", "raw", orphan])
os.unlink(gone)
rc, err = refused("overlay=" + orphan, "bitmap=b1")
t.ok(rc == 1 and gone in err, "an overlay whose backing file is gone: refused, naming it")
r8 = os.path.join(tmp, "r8.qcow2")
run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=8", r8, "1M"])
rc, err = refused("overlay=" + r8, "bitmap=b1")
t.ok(rc == 1 and "refcount" in err, "8-bit refcounts: refused, saying so")

# Writes and trims over and over without a flush: a trim's clusters are
# freed only at the next flush, but a 2M disk must not run out of space
# (BUG until fixed: the allocator does not reclaim them first, and the
# 512-byte-cluster overlay fails with ENOSPC after about 4 disk sizes).
cycle = os.path.join(tmp, "cycle.qcow2")
uri, sock = serve(t, "cycle", cycle, "size=2M", "cluster-size=512", "bitmap=b1")
h = t.connect(uri)
failure = None
try:
    for r in range(6):
        for off in range(0, 2 * M, 64 * K):
            h.pwrite(bytes([r + 1]) * (64 * K), off)
        h.trim(2 * M, 0)
except nbd.Error as e:
    failure = "round %d: %s" % (r, e)
t.is_(failure, None, "six rounds of writing a whole 2M disk (512-byte clusters) and trimming it, without a flush")
h.shutdown()
t.stop()
check_clean(t, cycle, "... and qemu-img check is clean afterwards")

p = run([nbdtest.NBDSERVE, "--dump-plugin", "dirty-bitmap-overlay", "overlay=" + ov])
lines = p.stdout.splitlines()
t.is_(sorted(l for l in lines if l.startswith("overlay_bitmap=")),
      ["overlay_bitmap=b1 granularity=65536", "overlay_bitmap=b2 granularity=65536",
       "overlay_bitmap=b3 granularity=65536"],
      "--dump-plugin overlay=: one line per bitmap")
t.ok("overlay_size=%d" % round512(base_size) in lines and "overlay_cluster_size=65536" in lines,
     "... and the overlay's size and cluster size")
t.finish()
