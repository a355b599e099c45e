#!/usr/bin/python3
# The delay and error filters, alone and chained: delays where asked,
# errors mapped to the NBD errno the client sees, error-file switching
# injection on and off, chain order (first --filter named is outermost).
import os, subprocess, sys, time
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd, errno_of

t = nbdtest.Test(plan=26, filters=("delay", "error"))


def timed(fn):
    start = time.monotonic()
    err = errno_of(fn)
    return err, time.monotonic() - start


uri = None


def server_or_none(name, *args):
    global uri
    try:
        uri = t.server(name, *args)
        return t.connect(uri, strict=False)
    except Exception as e:
        t.diag("could not start or connect: %s" % e)
        return None


# ---- delay ----
h = server_or_none("delay-read", "--filter=delay", "memory", "1M", "delay-read=1s")
if h:
    err, wtime = timed(lambda: h.pwrite(b"delayed!", 0))
    rerr, rtime = timed(lambda: h.pread(8, 0))
    t.ok(rerr == "no error" and rtime >= 0.95, "delay-read=1s: a read takes %.3f s" % rtime)
    t.ok(err == "no error" and wtime < 0.5, "delay-read=1s: a write is not delayed (%.3f s)" % wtime)
    t.ok(h.pread(8, 0) == b"delayed!", "delay-read: the data passes through")
    h.shutdown()
    t.stop()
else:
    for d in ("delay-read: read delayed", "delay-read: write not", "delay-read: data"):
        t.ok(False, d)

h = server_or_none("delay-write", "--filter=delay", "memory", "1M", "delay-write=1s")
if h:
    err, wtime = timed(lambda: h.pwrite(b"x" * 4096, 0))
    rerr, rtime = timed(lambda: h.pread(4096, 0))
    t.ok(err == "no error" and wtime >= 0.95, "delay-write=1s: a write takes %.3f s" % wtime)
    t.ok(rerr == "no error" and rtime < 0.5, "delay-write=1s: a read is not delayed (%.3f s)" % rtime)
    # Delays on one connection do not serialize the others' requests.
    hs = [t.connect(uri) for _ in range(4)]
    start = time.monotonic()
    for i, o in enumerate(hs):
        o.aio_pwrite(bytes([i]) * 4096, i * 4096)
    for o in hs:
        while o.aio_in_flight():
            o.poll(-1)
    took = time.monotonic() - start
    t.ok(took < 2.5, "four delayed writes on four connections overlap (%.3f s)" % took)
    for o in hs:
        o.shutdown()
    h.shutdown()
    t.stop()
else:
    for d in ("delay-write: write delayed", "delay-write: read not", "delay-write: overlap"):
        t.ok(False, d)

# ---- error: each errno reaches the client ----
for e in ("EPERM", "EIO", "ENOSPC", "ENOMEM"):
    h = server_or_none("error-" + e, "--filter=error", "memory", "1M", "error=" + e, "error-rate=1")
    if h:
        got = (errno_of(lambda: h.pread(512, 0)), errno_of(lambda: h.pwrite(b"x" * 512, 0)))
        t.is_(got, (e, e), "error=%s error-rate=1: reads and writes fail with %s" % (e, e))
        h.shutdown()
        t.stop()
    else:
        t.ok(False, "error=%s: server" % e)

h = server_or_none("error-pread", "--filter=error", "memory", "1M", "error-pread=ENOSPC", "error-rate=1")
if h:
    t.is_(errno_of(lambda: h.pread(512, 0)), "ENOSPC", "error-pread=ENOSPC: reads fail with ENOSPC")
    h.shutdown()
    t.stop()
else:
    t.ok(False, "error-pread: server")

h = server_or_none("error-pwrite", "--filter=error", "memory", "1M", "error-pwrite=EPERM", "error-rate=1")
if h:
    t.is_(errno_of(lambda: h.pwrite(b"x" * 512, 0)), "EPERM", "error-pwrite=EPERM: writes fail with EPERM")
    h.shutdown()
    t.stop()
else:
    t.ok(False, "error-pwrite: server")

h = server_or_none("error-zero", "--filter=error", "memory", "1M", "error=EIO", "error-rate=0")
if h:
    h.pwrite(b"fine", 0)
    t.ok(h.pread(4, 0) == b"fine", "error-rate=0: no errors, data passes through")
    h.shutdown()
    t.stop()
else:
    t.ok(False, "error-rate=0: server")

h = server_or_none("error-half", "--filter=error", "memory", "1M", "error=EIO", "error-rate=0.5")
if h:
    results = [errno_of(lambda: h.pread(512, 0)) for _ in range(200)]
    fails, good = results.count("EIO"), results.count("no error")
    t.ok(fails > 0 and good > 0 and fails + good == 200,
         "error-rate=0.5: some of 200 reads fail with EIO (%d), some succeed (%d)" % (fails, good))
    h.shutdown()
    t.stop()
else:
    t.ok(False, "error-rate=0.5: server")

# error-file: errors only while the file exists.
trigger = os.path.join(t.tmp, "inject")
h = server_or_none("error-file", "--filter=error", "memory", "1M", "error=EIO", "error-rate=1",
                   "error-file=" + trigger)
if h:
    first = errno_of(lambda: h.pread(512, 0))
    open(trigger, "w").close()
    during = errno_of(lambda: h.pread(512, 0))
    os.unlink(trigger)
    after = errno_of(lambda: h.pread(512, 0))
    t.is_(first, "no error", "error-file: no errors before the file exists")
    t.is_(during, "EIO", "error-file: EIO while it exists")
    t.is_(after, "no error", "error-file: no errors once it is gone")
    h.shutdown()
    t.stop()
else:
    for d in ("error-file: before", "error-file: during", "error-file: after"):
        t.ok(False, d)

# ---- chains: the first --filter named is the outermost ----
h = server_or_none("chain-de", "--filter=delay", "--filter=error", "memory", "1M",
                   "delay-read=1s", "error=EPERM", "error-rate=1", "error-file=" + trigger)
if h:
    h.pwrite(b"chained", 0)
    ok_err, ok_time = timed(lambda: h.pread(7, 0))
    t.ok(ok_err == "no error" and ok_time >= 0.95 and h.pread(7, 0) == b"chained",
         "delay then error: a read passes both (%.3f s)" % ok_time)
    open(trigger, "w").close()
    err, took = timed(lambda: h.pread(512, 0))
    os.unlink(trigger)
    t.ok(err == "EPERM" and took >= 0.95,
         "delay outside error: the EPERM arrives after the delay (%s, %.3f s)" % (err, took))
    h.shutdown()
    t.stop()
else:
    t.ok(False, "chain delay,error: server")
    t.ok(False, "chain delay,error: order")

h = server_or_none("chain-ed", "--filter=error", "--filter=delay", "memory", "1M",
                   "delay-read=1s", "error=EPERM", "error-rate=1", "error-file=" + trigger)
if h:
    open(trigger, "w").close()
    err, took = timed(lambda: h.pread(512, 0))
    os.unlink(trigger)
    t.ok(err == "EPERM" and took < 0.5,
         "error outside delay: the EPERM comes at once (%s, %.3f s)" % (err, took))
    h.shutdown()
    t.stop()
else:
    t.ok(False, "chain error,delay: order")

# A bad filter parameter is refused at start-up with a message.
r = subprocess.run([nbdtest.NBDSERVE, "-U", "-", "--filter=delay", "memory", "1M",
                    "delay-read=soon", "--run", "true"], capture_output=True, text=True, timeout=30)
t.ok(r.returncode == 1 and "delay-read" in r.stderr,
     "delay-read=soon: refused with a message (exit %d: %s)" % (r.returncode, r.stderr.strip()))
# Kind-specific settings win over the general ones, whatever their order.
h = server_or_none("error-kinds", "--filter=error", "memory", "1M", "error-pwrite-rate=0",
                   "error=ENOSPC", "error-rate=1", "error-flush=EPERM")
if h:
    got = (errno_of(lambda: h.pread(512, 0)), errno_of(lambda: h.pwrite(b"k" * 512, 0)),
           errno_of(lambda: h.flush()))
    t.is_(got, ("ENOSPC", "no error", "EPERM"),
          "error-pwrite-rate=0 and error-flush=EPERM override error= and error-rate=")
    h.shutdown()
    t.stop()
else:
    t.ok(False, "error kinds: server")

# A random delay range: every read lands inside it.
h = server_or_none("delay-range", "--filter=delay", "memory", "1M", "rdelay=50ms-120ms")
if h:
    times = [timed(lambda: h.pread(512, 0))[1] for _ in range(6)]
    t.ok(min(times) >= 0.049, "rdelay=50ms-120ms: no read is faster than 50 ms (%s)"
         % ", ".join("%.3f" % x for x in times))
    h.shutdown()
    t.stop()
else:
    t.ok(False, "delay range: server")

for args, word in ((("--filter=error", "error=EAGAIN"), "error"),
                   (("--filter=error", "error-rate=1.5"), "error-rate"),
                   (("--filter=delay", "delay-write=50ms-10ms"), "delay-write")):
    r = subprocess.run([nbdtest.NBDSERVE, "-U", "-", args[0], "memory", "1M", args[1],
                        "--run", "true"], capture_output=True, text=True, timeout=30)
    t.ok(r.returncode == 1 and word in r.stderr,
         "%s: refused with a message (exit %d: %s)" % (args[1], r.returncode, r.stderr.strip()))
t.finish()
