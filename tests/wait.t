#!/usr/bin/python3
# Waiting without a thread: the delay filter parks requests on the
# connection loop's timer (nbdserve_retry_after) instead of sleeping in a
# worker.  64 delayed reads with 2 workers all finish in one delay, a
# write on another connection is not held up by them, SIGTERM with 1,000
# requests waiting ends the server at once without losing an
# acknowledged write, and a client that leaves mid-wait costs nothing.
import os, sys, time, signal
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd

t = nbdtest.Test(plan=11, filters=("delay",))


def drain(handles, deadline):
    while any(h.aio_in_flight() > 0 for h in handles) and time.monotonic() < deadline:
        for h in handles:
            if h.aio_in_flight() > 0:
                h.poll(10)


# ---- 64 connections, one delayed read each, 2 workers ------------------
t.server("inline", "-v", "--filter=delay", "memory", "1M", "delay-read=2s")
t.ok("requests run on the loop threads" in t.log("inline"),
     "the delay filter never blocks: over memory, requests stay on the loop threads")
t.stop()
# On 2 workers (--no-inline), so that a sleeping wait would need 64.
uri = t.server("reads", "-t", "2", "--no-inline", "--filter=delay", "memory", "64M", "delay-read=2s")
handles = [t.connect(uri) for _ in range(65)]
bufs = [nbd.Buffer(4096) for _ in range(64)]
start = time.monotonic()
for i, h in enumerate(handles[:64]):
    h.aio_pread(bufs[i], i * 4096)
# The 65th connection writes while the reads wait: no delay on writes.
w0 = time.monotonic()
handles[64].pwrite(b"\x5a" * 4096, 1 << 20)
write_took = time.monotonic() - w0
t.ok(write_took < 1.0, "a write on a 65th connection is answered at once (%.3f s)" % write_took)
t.ok(all(h.aio_in_flight() == 1 for h in handles[:64]), "... while all 64 reads still wait")
drain(handles[:64], start + 10)
took = time.monotonic() - start
t.ok(all(h.aio_in_flight() == 0 for h in handles[:64]) and took < 4.0,
     "64 reads delayed 2 s each, with 2 workers, all complete in %.2f s (< 4 s)" % took)
t.ok(took >= 1.9, "... and each did wait its delay (%.2f s)" % took)
t.ok(handles[64].pread(4096, 1 << 20) == b"\x5a" * 4096, "the write's data reads back (after the delay)")
for h in handles:
    h.shutdown()
del handles, h
t.is_(t.stop(), 0, "the server stops cleanly afterwards")

# ---- SIGTERM with 1,000 requests waiting ----------------------------------
disk = os.path.join(t.tmp, "disk.img")
nbdtest.sparse_file(disk, 64 << 20)
uri = t.server("term", "-t", "2", "--no-inline", "--filter=delay", "file", disk, "delay-read=30s")
hs = [t.connect(uri) for _ in range(10)]
# Acknowledged writes first (writes are not delayed), then the reads.
for i, h in enumerate(hs):
    h.pwrite(bytes([i + 1]) * 65536, i * 65536)
waiting = []
for i, h in enumerate(hs):
    for j in range(100):
        b = nbd.Buffer(512)
        waiting.append(b)
        h.aio_pread(b, (i * 100 + j) * 512)
for h in hs:
    h.poll(0)
time.sleep(0.3)
in_flight = sum(h.aio_in_flight() for h in hs)
t.ok(in_flight == 1000, "1,000 reads wait in the server (%d in flight)" % in_flight)
p = t.last_server
t0 = time.monotonic()
p.send_signal(signal.SIGTERM)
try:
    rc = p.wait(5)
except Exception:
    rc = None
stop_took = time.monotonic() - t0
t.ok(rc == 0 and stop_took < 2.0, "SIGTERM ends the server in %.2f s (< 2 s), exit %s" % (stop_took, rc))
with open(disk, "rb") as f:
    good = all(f.read(65536) == bytes([i + 1]) * 65536 for i in range(10))
t.ok(good, "every acknowledged write is in the file")
del hs, h
t.servers.remove(p)

# ---- a client that leaves while its requests wait --------------------------
uri = t.server("leave", "--filter=delay", "memory", "16M", "delay-read=30s")  # inline this time
h = t.connect(uri)
for j in range(50):
    h.aio_pread(nbd.Buffer(512), j * 512)
h.poll(0)
time.sleep(0.2)
del h  # gone, with 50 reads waiting
h2 = t.connect(uri)
h2.pwrite(b"\x11" * 512, 0)
t0 = time.monotonic()
rc = t.stop()
t.ok(rc == 0 and time.monotonic() - t0 < 2.0,
     "a client that left mid-wait: its waits end, and the server still stops at once")
t.finish()
