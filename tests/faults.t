#!/usr/bin/python3
# Faults: clients vanishing mid-payload and mid-reply, the server killed
# with SIGKILL after an acknowledged flush, a file system running out of
# space, and a long pipeline of injected errors.  After each, the server
# (or its successor) serves the data intact, byte for byte.
import os, socket, struct, subprocess, sys, time
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd, errno_of, raw_go, raw_request as request

t = nbdtest.Test(plan=9, watchdog=300, filters=("error",))


# ---- Clients that vanish -------------------------------------------------------
uri = t.server("vanish", "memory", "256M")
sock = uri.split("socket=")[1]
h = t.connect(uri)
keep = os.urandom(1 << 20)
h.pwrite(keep, 0)

s = raw_go(sock)
s.sendall(request(1, 8 << 20, 1 << 20) + os.urandom(100 * 1024))  # WRITE of 1 MiB, 100 KiB sent
s.close()
s = raw_go(sock)
s.sendall(request(0, 0, 32 << 20))  # READ of 32 MiB, 10 bytes of the reply read
nbdtest.recv_exactly(s, 10)
s.close()
for _ in range(20):  # and twenty more of each, quickly
    s = raw_go(sock)
    s.sendall(request(1, 0, 1 << 20) + b"x" * 1000)
    s.close()
    s = raw_go(sock)
    s.sendall(request(0, 0, 16 << 20))
    s.close()
time.sleep(0.5)
t.ok(h.pread(1 << 20, 0) == keep, "clients leaving mid-payload and mid-reply: other data intact")
t.ok(h.pread(1 << 20, 8 << 20) == bytes(1 << 20),
     "the half-sent write was not applied (its region still reads as zeroes)")
h2 = t.connect(uri)
h2.pwrite(b"after" * 100, 16 << 20)
t.ok(h.pread(500, 16 << 20) == b"after" * 100, "new clients are served afterwards")
h.shutdown()
h2.shutdown()
t.stop()

# ---- SIGKILL after an acknowledged flush (file plugin) ---------------------------
disk = nbdtest.sparse_file(os.path.join(t.tmp, "disk.img"), 64 << 20)
uri = t.server("kill1", "file", disk)
h = t.connect(uri)
data = os.urandom(4 << 20)
h.pwrite(data, 1 << 20)
h.pwrite(b"fua!" * 1024, 32 << 20, nbd.CMD_FLAG_FUA)
h.flush()
rc = t.stop(sig=9)
t.ok(rc == -9, "the server was killed with SIGKILL (status %s)" % rc)
uri = t.server("kill2", "file", disk)
h = t.connect(uri)
t.ok(h.pread(4 << 20, 1 << 20) == data and h.pread(4096, 32 << 20) == b"fua!" * 1024,
     "a new server on the same file reads back every acknowledged write")
h.shutdown()
t.stop()

# ---- ENOSPC from a full file system ------------------------------------------------
mnt = os.path.join(t.tmp, "small")
os.mkdir(mnt)
mounted = os.geteuid() == 0 and subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt], capture_output=True).returncode == 0
if not mounted:
    for _ in range(3):
        t.skip("mounting a small tmpfs needs root")
else:
    try:
        small = nbdtest.sparse_file(os.path.join(mnt, "sparse.img"), 64 << 20)
        uri = t.server("enospc", "file", small)
        h = t.connect(uri)
        first = os.urandom(1 << 20)
        h.pwrite(first, 0)
        errors = []
        for i in range(1, 32):
            err = errno_of(lambda: h.pwrite(os.urandom(1 << 20), i << 20))
            if err != "no error":
                errors.append(err)
                break
        t.is_(errors, ["ENOSPC"], "writing past what the file system holds: the client gets ENOSPC")
        t.ok(h.pread(1 << 20, 0) == first, "the data written before is intact")
        h2 = t.connect(uri)
        t.ok(h2.pread(1 << 20, 0) == first, "the server keeps serving new clients")
        h.shutdown()
        h2.shutdown()
        t.stop()
    finally:
        subprocess.run(["umount", "-l", mnt])

# ---- 1,000 injected errors in one pipeline -------------------------------------------
trigger = os.path.join(t.tmp, "fail")
uri = t.server("errors", "--filter=error", "memory", "64M", "error-pwrite=EIO",
               "error-pwrite-rate=1", "error-pwrite-file=" + trigger)
h = t.connect(uri)
good = os.urandom(1 << 20)
h.pwrite(good, 0)
open(trigger, "w").close()
failed = [0]


def count_failure(err):
    if err != 0:
        failed[0] += 1
    return 1  # the error is retired here, not raised


for i in range(1000):
    h.aio_pwrite(b"bad!" * 1024, (i % 256) * 4096, completion=lambda err: count_failure(err))
    if h.aio_in_flight() > 64:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
os.unlink(trigger)
h.pwrite(b"good" * 1024, 2 << 20)
t.ok(failed[0] == 1000 and h.pread(1 << 20, 0) == good and h.pread(4096, 2 << 20) == b"good" * 1024,
     "1,000 pipelined writes failed with EIO (%d), the data is untouched, and writes work again"
     % failed[0])
h.shutdown()
t.stop()
t.finish()
