#!/usr/bin/python3
# Load: 500 concurrent connections doing mixed I/O with verification,
# 10,000 connect/disconnect cycles without fd or memory growth, and a
# client that never reads its replies holding bounded memory while the
# others are served.  Every check ends with the data verified byte for byte.
import os, random, resource, socket, struct, sys, time
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd, raw_go, recv_exactly

t = nbdtest.Test(plan=9, watchdog=400)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))

CONNS = 500
REGION = 64 * 1024  # each connection owns one region of the disk


def server_pid():
    return t.last_server.pid


def rss_kib():
    with open("/proc/%d/status" % server_pid()) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def open_fds():
    return len(os.listdir("/proc/%d/fd" % server_pid()))


def pattern(i):
    return (b"%06d" % i) * (4096 // 6) + b"\n" * (4096 % 6)


def wait_all(handles):
    """Run every handle's commands in flight to completion."""
    busy = [h for h in handles if h.aio_in_flight() > 0]
    while busy:
        for h in busy:
            h.poll(0)
        busy = [h for h in busy if h.aio_in_flight() > 0]


# ---- 500 concurrent connections, mixed I/O -------------------------------------
uri = t.server("many", "memory", str(CONNS * REGION))
handles = []
try:
    for i in range(CONNS):
        handles.append(t.connect(uri))
except nbd.Error as e:
    t.diag("connection %d failed: %s" % (len(handles), e))
t.is_(len(handles), CONNS, "%d clients connected at once" % CONNS)

# Each writes its region: a pattern (every 4th with FUA), zeroes part of
# it, trims another part, then flushes; all in flight together.
for i, h in enumerate(handles):
    base = i * REGION
    for k in range(8):
        flags = nbd.CMD_FLAG_FUA if i % 4 == 0 else 0
        h.aio_pwrite(pattern(i), base + k * 4096, flags=flags)
wait_all(handles)
for i, h in enumerate(handles):
    base = i * REGION
    h.aio_zero(4096, base + 4096)
    h.aio_trim(4096, base + 2 * 4096)
    h.aio_flush()
wait_all(handles)

expected = {}
bufs = []
for i, h in enumerate(handles):
    b = nbd.Buffer(8 * 4096)
    bufs.append(b)
    h.aio_pread(b, i * REGION)
wait_all(handles)
bad = []
for i, b in enumerate(bufs):
    want = pattern(i) + bytes(4096) + bytes(4096) + pattern(i) * 5
    if b.to_bytearray() != want:
        bad.append(i)
t.ok(not bad, "every connection reads back exactly what it wrote, zeroed and trimmed (%d wrong)" % len(bad))
for h in handles:
    h.shutdown()
del handles, bufs

# A fresh client sees all 500 regions.
h = t.connect(uri)
wrong = [i for i in range(CONNS) if h.pread(4096, i * REGION + 3 * 4096) != pattern(i)]
t.ok(not wrong, "a later client sees every region intact (%d wrong)" % len(wrong))
h.shutdown()
t.stop()


# ---- 10,000 connect/disconnect cycles ----------------------------------------------
uri = t.server("cycles", "memory", "16M")
sock = uri.split("socket=")[1]
h = t.connect(uri)
h.pwrite(b"keep" * 1024, 0)
h.shutdown()


def cycle(i):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    try:
        kind = i % 4
        if kind == 0:
            return  # connect and close at once
        recv_exactly(s, 18)
        s.sendall(struct.pack(">I", 1))
        if kind == 1:
            s.sendall(b"IHAVEOPT" + struct.pack(">II", 2, 0))  # ABORT
            recv_exactly(s, 20)
        elif kind == 2:
            s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, 6) + struct.pack(">IH", 0, 0))
            while True:
                _m, _o, rtype, length = struct.unpack(">QIII", recv_exactly(s, 20))
                recv_exactly(s, length)
                if rtype == 1:
                    break
            # a read, then leave without NBD_CMD_DISC
            s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 4096))
            recv_exactly(s, 16 + 4096)
        else:
            s.sendall(b"IHAVEOPT")  # half an option header, then gone
    finally:
        s.close()


def cycles(first, last):
    """Cycles FIRST to LAST-1; returns how many failed, once the server
    has had a moment to close them all."""
    failed = 0
    for i in range(first, last):
        try:
            cycle(i)
        except (OSError, EOFError):
            failed += 1
    time.sleep(0.5)
    return failed


errors = cycles(0, 1000)
fds_1k, rss_1k = open_fds(), rss_kib()
errors += cycles(1000, 10000)
fds_10k, rss_10k = open_fds(), rss_kib()
t.is_(errors, 0, "10,000 connect/disconnect cycles of four kinds, none failed")
t.ok(fds_10k == fds_1k, "open descriptors after 1,000 and 10,000 cycles: %d and %d" % (fds_1k, fds_10k))
if nbdtest.SANITIZED:
    t.skip("memory growth: the sanitizer's allocator keeps freed memory")
else:
    t.ok(rss_10k - rss_1k < 4096, "server memory after 1,000 and 10,000 cycles: %d and %d KiB"
         % (rss_1k, rss_10k))
h = t.connect(uri)
t.ok(h.pread(4096, 0) == b"keep" * 1024, "data written before the cycles is intact")
h.shutdown()
t.stop()


# ---- A client that does not read its replies ---------------------------------------
uri = t.server("stuck", "memory", "1G")
sock = uri.split("socket=")[1]
h = t.connect(uri)
block = os.urandom(1 << 20)
for off in range(0, 1 << 30, 1 << 20):
    h.aio_pwrite(block, off)
    if h.aio_in_flight() > 32:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.shutdown()

before = rss_kib()
stuck = raw_go(sock)
# 64 reads of 32 MiB (simple replies: all data), and then never read.
stuck.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 32) << 25, 32 << 20)
                       for i in range(64)))
time.sleep(2)
during = rss_kib()
other = t.connect(uri)
served = other.pread(1 << 20, 5 << 20) == block
t.ok(during - before < 200 * 1024 and served,
     "64 unread 32 MiB reads hold %d MiB of server memory; another client is served meanwhile"
     % ((during - before) // 1024))
other.shutdown()
stuck.close()
time.sleep(1)
after = rss_kib()
if nbdtest.SANITIZED:
    t.skip("memory given back: the sanitizer's allocator keeps freed memory")
else:
    t.ok(after - before < 16 * 1024, "once it leaves, that memory is given back (%d MiB above before)"
         % ((after - before) // 1024))
t.stop()
t.finish()
