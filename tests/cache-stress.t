#!/usr/bin/python3
# The cache filter under load: with cache-max-size=1M (16 blocks), 256 MiB
# of random writes, zeroes and trims of every size and alignment from two
# connections at once (up to 32 requests in flight on each, never two
# overlapping), then reads of mixed sizes and alignments, nbdcopy of the
# whole disk, and the plugin's file after FLUSH, all equal to a
# reference.  Then durability in writeback mode: after kill -9, what was
# flushed or written with FUA is in the file, and what was not is, block
# by block, either old or new.
import os, random, select, signal, subprocess, sys, time
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd

MiB = 1 << 20
t = nbdtest.Test(plan=11, watchdog=900 if nbdtest.SANITIZED else 300, filters=("cache",))
CTL = os.path.join(nbdtest.TOP, "nbdserve-ctl")
rng = random.Random(1717)

SIZE = 64 * MiB
TOTAL = 256 * MiB
QD = 32
disk = os.path.join(t.tmp, "disk.img")
ref = bytearray(rng.randbytes(SIZE))
with open(disk, "wb") as f:
    f.write(ref)
pool = rng.randbytes(4 * MiB)

ctl = os.path.join(t.tmp, "stress.ctl")
uri = t.server("stress", "--control=" + ctl, "--filter=cache", "file", disk,
               "cache-max-size=1M")
handles = [t.connect(uri), t.connect(uri)]


def pump(timeout=1.0):
    """Wait for either connection to be ready, then let libnbd move."""
    r, w = [], []
    for h in handles:
        d = h.aio_get_direction()
        if d & nbd.AIO_DIRECTION_READ:
            r.append(h.aio_get_fd())
        if d & nbd.AIO_DIRECTION_WRITE:
            w.append(h.aio_get_fd())
    rr, ww, _ = select.select(r, w, [], timeout)
    for h in handles:
        if h.aio_get_fd() in rr:
            h.aio_notify_read()
        if h.aio_get_fd() in ww:
            h.aio_notify_write()


def drain():
    while any(h.aio_in_flight() for h in handles):
        pump()


in_flight = {}  # key: (lo, hi) of every write in flight
errors = []
next_key = [0]


def overlaps(lo, hi):
    return any(lo < b and a < hi for a, b in in_flight.values())


def finished(key, err):
    if err.value:
        errors.append(err.value)
    in_flight.pop(key, None)
    return 1


def pick_size():
    x = rng.random()
    if x < 0.4:
        return rng.randrange(1, 8192)
    if x < 0.8:
        return rng.randrange(8192, 128 * 1024)
    return rng.randrange(128 * 1024, 512 * 1024)


FLAGS_ZERO = [0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA]
t0 = time.monotonic()
written, requests = 0, 0
while written < TOTAL:
    for h in handles:
        if h.aio_in_flight() >= QD:
            continue
        n = pick_size()
        off = rng.randrange(0, SIZE - n)
        if overlaps(off, off + n):
            continue
        key = next_key[0] = next_key[0] + 1
        cb = (lambda err, key=key: finished(key, err))
        in_flight[key] = (off, off + n)
        what = rng.random()
        if what < 0.85:
            p = rng.randrange(0, len(pool) - n)
            data = pool[p:p + n]
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off, completion=cb,
                         flags=nbd.CMD_FLAG_FUA if rng.random() < 0.02 else 0)
            ref[off:off + n] = data
        elif what < 0.95:
            h.aio_zero(n, off, completion=cb, flags=rng.choice(FLAGS_ZERO))
            ref[off:off + n] = bytes(n)
        else:
            h.aio_trim(n, off, completion=cb)
            ref[off:off + n] = bytes(n)  # the file plugin punches holes
        written += n
        requests += 1
    if all(h.aio_in_flight() >= QD for h in handles) or rng.random() < 0.3:
        pump(0.01)
drain()
took = time.monotonic() - t0
t.ok(not errors, "%d MiB in %d writes, zeroes and trims on two connections, %.1f s, no errors"
     % (written // MiB, requests, took))

# Reads of mixed sizes and alignments, both connections, many in flight.
bad = []
reads = 0


def check_read(buf, off, n, err):
    if err.value:
        bad.append("error %d at %d+%d" % (err.value, off, n))
    elif buf.to_bytearray() != ref[off:off + n]:
        bad.append("%d+%d" % (off, n))
    return 1


while reads < 3000:
    for h in handles:
        while h.aio_in_flight() < QD and reads < 3000:
            n = pick_size()
            off = rng.randrange(0, SIZE - n)
            buf = nbd.Buffer(n)
            h.aio_pread(buf, off,
                        completion=lambda err, buf=buf, off=off, n=n: check_read(buf, off, n, err))
            reads += 1
    pump(0.01)
drain()
t.ok(not bad, "3000 reads of mixed sizes and alignments equal the reference (%d wrong)" % len(bad))
for b in bad[:5]:
    t.diag("wrong: " + b)

copy = os.path.join(t.tmp, "copy.img")
p = subprocess.run(["nbdcopy", uri, copy], capture_output=True, text=True, timeout=120)
with open(copy, "rb") as f:
    t.ok(p.returncode == 0 and f.read() == bytes(ref), "nbdcopy of the whole disk equals the reference")
os.unlink(copy)

handles[0].flush()
with open(disk, "rb") as f:
    t.ok(f.read() == bytes(ref), "after FLUSH the plugin's file equals the reference")

out = subprocess.run([CTL, ctl, "cache.stats"], capture_output=True, text=True).stdout
stats = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
t.ok(int(stats.get("evictions", 0)) > 1000 and stats.get("dirty_blocks") == "0"
     and int(stats.get("cached_blocks", 99)) <= 16,
     "the 16-block cache evicted (%s), holds at most 16 blocks (%s), none dirty (%s)"
     % (stats.get("evictions"), stats.get("cached_blocks"), stats.get("dirty_blocks")))
for h in handles:
    h.shutdown()
t.is_(t.stop(), 0, "the server stops cleanly")

# ---- durability: kill -9 in writeback mode ------------------------------------------
SIZE2 = 16 * MiB
old = rng.randbytes(SIZE2)
with open(disk, "wb") as f:
    f.write(old)
uri = t.server("durable", "--filter=cache", "file", disk, "cache-max-size=64M")
h = t.connect(uri)
flushed = rng.randbytes(MiB)
h.pwrite(flushed, 1000)  # unaligned: partial blocks at both ends
h.flush()
fua = rng.randbytes(300000)
h.pwrite(fua, 5 * MiB + 12345, nbd.CMD_FLAG_FUA)
unflushed = rng.randbytes(MiB)
h.pwrite(unflushed, 9 * MiB)
t.last_server.send_signal(signal.SIGKILL)
t.last_server.wait()
t.servers.remove(t.last_server)
with open(disk, "rb") as f:
    now = f.read()
t.ok(now[1000:1000 + MiB] == flushed, "data written then FLUSHed survives kill -9")
t.ok(now[5 * MiB + 12345:5 * MiB + 12345 + 300000] == fua, "a FUA write survives kill -9")
B = 65536
blocks_ok = all(now[o:o + B] in (old[o:o + B], unflushed[o - 9 * MiB:o - 9 * MiB + B])
                for o in range(9 * MiB, 10 * MiB, B))
t.ok(blocks_ok, "unflushed data is lost or present, block by block, never mixed")
expect = bytearray(old)
expect[1000:1000 + MiB] = flushed
expect[5 * MiB + 12345:5 * MiB + 12345 + 300000] = fua
t.ok(now[:9 * MiB] == bytes(expect[:9 * MiB]) and now[10 * MiB:] == bytes(expect[10 * MiB:]),
     "nothing else in the file changed")
uri = t.server("again", "--filter=cache", "file", disk)
h = t.connect(uri)
t.ok(h.pread(MiB, 1000) == flushed and h.pread(300000, 5 * MiB + 12345) == fua,
     "a server restarted over the same file reads the flushed data")
h.shutdown()
t.finish()
