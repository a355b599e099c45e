#!/usr/bin/python3
# python3-libnbd: 64 pipelined aio writes and reads complete and carry the
# right data; each command behaves as its capability says; DF and REQ_ONE
# are honoured; connections see each other's writes.
import os, random, sys
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd

t = nbdtest.Test(plan=26)
random.seed(1)


def drain(h):
    while h.aio_in_flight() > 0:
        h.poll(-1)


def pipelined(t, h, label, block=65536, n=64):
    """n aio writes in flight, then n aio reads in flight, all verified."""
    blocks = {i: random.randbytes(block) for i in range(n)}
    order = list(blocks)
    random.shuffle(order)
    done = []
    cookies = [h.aio_pwrite(blocks[i], i * block,
                            completion=lambda err, i=i: done.append((i, err.value)) or 1)
               for i in order]
    t.ok(h.aio_in_flight() > 1, "%s: writes are pipelined (%d in flight)" % (label, h.aio_in_flight()))
    drain(h)
    t.ok(len(done) == n and all(e == 0 for _, e in done) and len(set(cookies)) == n,
         "%s: %d pipelined aio writes complete without error" % (label, n))
    bufs = {i: nbd.Buffer(block) for i in blocks}
    for i in order:
        h.aio_pread(bufs[i], i * block)
    in_flight = h.aio_in_flight()
    drain(h)
    good = sum(1 for i in blocks if bytes(bufs[i].to_bytearray()) == blocks[i])
    t.ok(in_flight > 1 and good == n,
         "%s: %d pipelined aio reads (%d in flight) return the written data (%d good)"
         % (label, n, in_flight, good))


def commands(t, h, label):
    """FUA, flush, trim, zero, fast zero, cache, each checked by reading."""
    h.pwrite(b"\xff" * 8192, 1 << 20, nbd.CMD_FLAG_FUA)
    t.ok(h.pread(8192, 1 << 20) == b"\xff" * 8192, "%s: FUA write" % label)
    h.flush()
    h.pwrite(b"\x07" * (128 << 10), 1 << 20)
    h.trim(65536, 1 << 20)
    t.ok(h.pread(65536, 1 << 20) == bytes(65536) and
         h.pread(65536, (1 << 20) + 65536) == b"\x07" * 65536,
         "%s: trim reads back as zeroes, and only where asked" % label)
    h.pwrite(b"\x01" * 65536, 2 << 20)
    h.zero(65536, 2 << 20, nbd.CMD_FLAG_FAST_ZERO)
    t.ok(h.pread(65536, 2 << 20) == bytes(65536), "%s: fast zero" % label)
    h.pwrite(b"\x02" * 4096, 3 << 20)
    h.zero(1000, (3 << 20) + 100, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    t.ok(h.pread(4096, 3 << 20) == b"\x02" * 100 + bytes(1000) + b"\x02" * 2996,
         "%s: unaligned zero with NO_HOLE and FUA" % label)
    h.cache(1 << 20, 0)
    t.ok(h.pread(4096, 3 << 20)[:100] == b"\x02" * 100, "%s: cache accepted" % label)


uri = t.server("mem", "memory", "64M")
h = t.connect(uri, ["base:allocation"])
pipelined(t, h, "memory")
commands(t, h, "memory")

# DF: a read over data and holes comes back as one data chunk.
h.pwrite(b"d" * 4096, 4 << 20)
chunks = []
h.pread_structured(262144, 4 << 20, lambda buf, off, st, err: chunks.append((st, off, len(buf))) or 0,
                   nbd.CMD_FLAG_DF)
t.is_(chunks, [(nbd.READ_DATA, 4 << 20, 262144)], "DF: the read is one data chunk")
# Holes as hole chunks, for a client that does not track allocation
# itself (one that selected base:allocation skips holes on its own).
plain = t.connect(uri)
chunks = []
plain.pread_structured(262144, 4 << 20,
                       lambda buf, off, st, err: chunks.append((st, off, len(buf))) or 0)
hole_chunks = chunks
chunks = []
h.pread_structured(262144, 4 << 20, lambda buf, off, st, err: chunks.append((st, off, len(buf))) or 0)
t.ok(nbd.READ_HOLE in [c[0] for c in hole_chunks] and sum(c[2] for c in hole_chunks) == 262144
     and chunks == [(nbd.READ_DATA, 4 << 20, 262144)],
     "without DF, holes come back as hole chunks covering the range (%r), unless the client "
     "selected base:allocation (%r)" % (hole_chunks, chunks))
plain.shutdown()

# REQ_ONE: exactly one extent, not longer than the request.
seen = []
h.block_status(10 << 20, 0, lambda ctx, off, ents, err: seen.append((ctx, list(ents))) or 0,
               nbd.CMD_FLAG_REQ_ONE)
t.ok(len(seen) == 1 and seen[0][0] == "base:allocation" and len(seen[0][1]) == 2
     and seen[0][1][0] <= 10 << 20, "REQ_ONE gives one extent (%r)" % seen)
seen = []
h.block_status(10 << 20, 0, lambda ctx, off, ents, err: seen.append(list(ents)) or 0)
t.ok(len(seen) == 1 and len(seen[0]) > 2, "without REQ_ONE, several extents (%r)" % seen)

# Several connections (multi-conn): a flushed write is seen by the others.
others = [t.connect(uri) for _ in range(4)]
others[0].pwrite(b"shared!", 0)
others[0].flush()
t.ok(all(o.pread(7, 0) == b"shared!" for o in others[1:]) and h.pread(7, 0) == b"shared!",
     "multi-conn: other connections see a flushed write")
# Interleaved aio from several connections at once.
bufs = []
for j, o in enumerate(others):
    o.aio_pwrite(bytes([j + 1]) * 65536, (8 << 20) + j * 65536)
for o in others:
    drain(o)
for j, o in enumerate(others):
    b = nbd.Buffer(65536)
    others[(j + 1) % 4].aio_pread(b, (8 << 20) + j * 65536)
    bufs.append(b)
for o in others:
    drain(o)
t.ok(all(bytes(b.to_bytearray()) == bytes([j + 1]) * 65536 for j, b in enumerate(bufs)),
     "aio on four connections at once")
for o in others:
    o.shutdown()
h.shutdown()

# The same with the file plugin.
path = nbdtest.sparse_file(os.path.join(t.tmp, "disk.img"), 64 << 20)
uri = t.server("file", "file", path)
h = t.connect(uri)
pipelined(t, h, "file")
commands(t, h, "file")
h.shutdown()
t.stop()
with open(path, "rb") as f:
    f.seek(1 << 20)
    t.ok(f.read(65536) == bytes(65536), "file: the trimmed range is zero in the file itself")
# One worker thread: pipelining must still not deadlock.
h = t.connect(t.server("file-t1", "-t", "1", "file", path))
pipelined(t, h, "file -t 1")
h.shutdown()
t.stop()
t.finish()
