#!/usr/bin/python3
# Where the cache filter stands in the chain is observable: over
# delay-read=10ms (and over throttle) the second full read with
# cache-on-read is at least 10x faster than the first; with delay (or
# throttle) outermost it is not.  cache.stats over --control counts what
# a scripted session did; a scan does not push out a block in use; the
# counters are logged at exit with -v.
import os, subprocess, sys, time
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest

MiB = 1 << 20
t = nbdtest.Test(plan=13, filters=("cache", "delay", "throttle"))
CTL = os.path.join(nbdtest.TOP, "nbdserve-ctl")
# A sanitizer build serves hits many times slower: the speed-up asked for
# is then smaller (correctness is checked the same).
FAST = 3 if nbdtest.SANITIZED else 10

# Data, not holes: the server answers holes without reading them.
disk = os.path.join(t.tmp, "disk.img")
data = os.urandom(32 * MiB)
with open(disk, "wb") as f:
    f.write(data)


def full_read(h, size, req):
    """Seconds to read the disk once, one request at a time; and whether
    it read what the file holds."""
    t0 = time.monotonic()
    good = True
    for off in range(0, size, req):
        if h.pread(req, off) != data[off:off + req]:
            good = False
    return time.monotonic() - t0, good


def two_reads(name, *args, size=16 * MiB, req=65536, repeats=3):
    """The first full read, and the best of REPEATS after it (other work
    on the machine only ever adds time)."""
    uri = t.server(name, *args)
    h = t.connect(uri)
    first, good = full_read(h, size, req)
    second = None
    for _ in range(repeats):
        took, good2 = full_read(h, size, req)
        good = good and good2
        second = took if second is None else min(second, took)
    h.shutdown()
    t.stop()
    return first, second, good


# 256 requests, each delayed 10 ms unless the cache answers it.
first, second, good = two_reads("cache-delay", "--filter=cache", "--filter=delay", "file", disk,
                                "delay-read=10ms")
t.ok(good and first >= FAST * second,
     "cache over delay-read=10ms: second full read %.3f s, first %.3f s (%.0fx; at least %dx)"
     % (second, first, first / second, FAST))
first, second, good = two_reads("delay-cache", "--filter=delay", "--filter=cache", "file", disk,
                                "delay-read=10ms", repeats=1)
t.ok(good and first < 2 * second,
     "delay over cache: second full read %.3f s, first %.3f s: no faster (%.1fx)"
     % (second, first, first / second))

# Issue 18's stacking check: 16 MiB at rate=5M take 3 s.
first, second, good = two_reads("cache-throttle", "--filter=cache", "--filter=throttle", "file",
                                disk, "rate=5M", req=256 * 1024)
t.ok(good and first >= FAST * second and first > 2.5,
     "cache over throttle rate=5M: second full read %.3f s, first %.3f s (%.0fx)"
     % (second, first, first / second))
first, second, good = two_reads("throttle-cache", "--filter=throttle", "--filter=cache", "file",
                                disk, "rate=5M", req=256 * 1024, repeats=1)
t.ok(good and first < 2 * second and second > 2.5,
     "throttle over cache: second full read %.3f s, first %.3f s: no faster (%.1fx)"
     % (second, first, first / second))

# ---- cache.stats --------------------------------------------------------------------
ctl = os.path.join(t.tmp, "cache.ctl")


def stats():
    p = subprocess.run([CTL, ctl, "cache.stats"], capture_output=True, text=True, timeout=30)
    d = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    d = {k: (int(v) if v.isdigit() else v) for k, v in d.items()}
    d["_ok"] = p.returncode == 0
    return d


# 64 blocks of 64K; probation holds 6 of them.
uri = t.server("stats", "-v", "--control=" + ctl, "--filter=cache", "file", disk,
               "cache-max-size=4M")
h = t.connect(uri)
s0 = stats()
t.ok(s0["_ok"] and s0["mode"] == "writeback" and s0["block_size"] == 65536
     and s0["max_blocks"] == 64 and s0["hits"] == 0 and s0["misses"] == 0,
     "cache.stats answers over --control: %s" % s0)
h.pread(65536, 0)           # a miss
h.pread(4096, 4096)         # a hit
h.pread(100000, 60000)      # a hit (block 0), two misses (blocks 1, 2)
h.pwrite(b"w" * 4096, 3 * 65536 + 100)  # a miss (read-modify-write), dirty
h.pwrite(b"w" * 65536, 5 * 65536)       # a whole block: no read, dirty
h.cache(2 * 65536, 8 * 65536)           # two misses
s1 = stats()
t.ok((s1["hits"], s1["misses"], s1["dirty_blocks"], s1["cached_blocks"]) == (2, 6, 2, 7),
     "hits 2, misses 6, dirty 2, cached 7 after a scripted session: %s"
     % {k: s1[k] for k in ("hits", "misses", "dirty_blocks", "cached_blocks")})
h.flush()
s2 = stats()
t.ok(s2["dirty_blocks"] == 0 and s2["written_back_blocks"] == 2
     and s2["written_back_bytes"] == 2 * 65536,
     "FLUSH writes the 2 dirty blocks back (%d bytes)" % s2["written_back_bytes"])
with open(disk, "rb") as f:
    f.seek(3 * 65536 + 100)
    t.ok(f.read(4096) == b"w" * 4096, "... into the file")
p = subprocess.run([CTL, ctl, "cache.stats", "extra"], capture_output=True, text=True)
t.ok(p.returncode != 0 and "no arguments" in p.stdout + p.stderr,
     "cache.stats with an argument is refused")

# ---- a scan leaves the blocks in use alone ------------------------------------------
# Blocks 16..23 are read now and again, then a scan of 27 MiB (432
# blocks, seven times the cache) passes; they are still hits.
hot = range(16 * 65536, 24 * 65536, 65536)
for rnd in range(3):
    for off in hot:
        h.pread(65536, off)
    for off in range(24 * 65536, 40 * 65536, 65536):  # others come in meanwhile
        h.pread(65536, off)
for off in range(5 * MiB, 32 * MiB, 65536):
    h.pread(65536, off)
before = stats()
for off in hot:
    h.pread(65536, off)
after = stats()
t.is_(after["hits"] - before["hits"], 8, "after a scan of 7x the cache, the 8 blocks in use still hit")
t.ok(after["evictions"] > 350, "... while the scan was evicted (%d evictions)" % after["evictions"])
h.shutdown()
t.is_(t.stop(), 0, "the server stops cleanly")
log = t.log("stats")
t.ok("cache: hits=%d misses=%d" % (after["hits"], after["misses"]) in log,
     "-v logs the counters at exit")
t.finish()
