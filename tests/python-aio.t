#!/usr/bin/python3
# python3-libnbd: pipelined aio, per-capability commands, error codes.
import errno, os, random, subprocess, sys, tempfile, time
import nbd

top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tmp = tempfile.mkdtemp(dir="/dev/shm")
count = 0
failed = 0
procs = []

def ok(cond, desc):
    global count, failed
    count += 1
    if not cond:
        failed += 1
    print("%s %d - %s" % ("ok" if cond else "not ok", count, desc))

def server(name, *args):
    sock = os.path.join(tmp, name + ".sock")
    p = subprocess.Popen([os.path.join(top, "nbdserve"), "-f", "-U", sock] + list(args))
    procs.append(p)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    return "nbd+unix:///?socket=" + sock

def connect(uri, contexts=()):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h

def errno_of(fn):
    try:
        fn()
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, e.errno) if isinstance(e.errno, int) else e.errno
    return "no error"

print("1..16")
try:
    uri = server("mem", "memory", "64M")
    h = connect(uri, ["base:allocation"])

    # 64 writes in flight, then 64 reads in flight, all verified.
    blocks = {i: os.urandom(65536) for i in range(64)}
    order = list(blocks)
    random.shuffle(order)
    cookies = [h.aio_pwrite(blocks[i], i * 65536) for i in order]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    ok(all(h.aio_command_completed(c) for c in cookies), "64 pipelined aio writes complete")
    bufs = {}
    for i in order:
        bufs[i] = nbd.Buffer(65536)
        h.aio_pread(bufs[i], i * 65536)
    ok(h.aio_in_flight() > 1, "reads are pipelined (%d in flight)" % h.aio_in_flight())
    while h.aio_in_flight() > 0:
        h.poll(-1)
    ok(all(bytes(bufs[i].to_bytearray()) == blocks[i] for i in blocks), "64 pipelined aio reads return the written data")

    # Commands per capability.
    h.pwrite(b"\xff" * 8192, 1 << 20, nbd.CMD_FLAG_FUA)
    ok(h.pread(8192, 1 << 20) == b"\xff" * 8192, "FUA write")
    h.flush()
    h.trim(65536, 1 << 20)
    ok(h.pread(65536, 1 << 20) == bytes(65536), "trim reads back as zeroes")
    h.pwrite(b"\x01" * 65536, 2 << 20)
    h.zero(65536, 2 << 20, nbd.CMD_FLAG_FAST_ZERO)
    ok(h.pread(65536, 2 << 20) == bytes(65536), "fast zero")
    h.pwrite(b"\x02" * 4096, 3 << 20)
    h.zero(4096, 3 << 20, nbd.CMD_FLAG_NO_HOLE)
    ok(h.pread(4096, 3 << 20) == bytes(4096), "zero with NO_HOLE")
    h.cache(1 << 20, 0)
    ok(True, "cache accepted")

    h.set_strict_mode(0)  # let the server, not libnbd, judge bad requests
    ok(errno_of(lambda: h.pread(4096, 64 << 20)) == "EINVAL", "read beyond the end: EINVAL")
    ok(errno_of(lambda: h.pwrite(b"x" * 4096, (64 << 20) - 100)) == "ENOSPC", "write beyond the end: ENOSPC")

    # DF: a read answered in one piece.
    chunks = []
    h.pread_structured(131072, 4 << 20,
                       lambda buf, off, st, err: chunks.append(st) or 0, nbd.CMD_FLAG_DF)
    ok(chunks == [nbd.READ_DATA], "DF read is a single data chunk (%r)" % chunks)
    # Without DF, holes come back as hole chunks.
    chunks = []
    h.pread_structured(1 << 20, 40 << 20, lambda buf, off, st, err: chunks.append(st) or 0)
    ok(nbd.READ_HOLE in chunks, "sparse read uses hole chunks (%r)" % chunks)

    # REQ_ONE: exactly one extent, not past the request.
    seen = []
    h.block_status(10 << 20, 0, lambda ctx, off, ents, err: seen.append(list(ents)) or 0,
                   nbd.CMD_FLAG_REQ_ONE)
    ok(len(seen) == 1 and len(seen[0]) == 2 and seen[0][0] <= 10 << 20,
       "REQ_ONE gives one extent (%r)" % seen)
    h.shutdown()

    # Read-only server refuses writes with EPERM.
    ro = connect(server("ro", "-r", "memory", "1M"))
    ro.set_strict_mode(0)
    ok(errno_of(lambda: ro.pwrite(b"x" * 512, 0)) == "EPERM", "write on -r: EPERM")
    ok(ro.pread(512, 0) == bytes(512), "read on -r works")
    ro.shutdown()

    # Several connections at once (multi-conn) see each other's writes.
    a, b = connect(uri), connect(uri)
    a.pwrite(b"shared", 0)
    a.flush()
    ok(b.pread(6, 0) == b"shared", "multi-conn: second connection sees the write")
finally:
    for p in procs:
        p.terminate()
        p.wait()
    subprocess.run(["rm", "-rf", tmp])
sys.exit(1 if failed else 0)
