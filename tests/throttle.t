#!/usr/bin/python3
# The throttle filter: a copy at rate=20M runs at 20 MiB/s, fio at
# iops=500 makes 500 requests a second, two connections under
# connection-rate=10M get 10 MiB/s each while an unthrottled server runs
# at full speed, throttle.set and the rate file change the rate within a
# second, and 500 connections with requests waiting take no thread and
# leave another connection's latency alone.
import json, os, subprocess, sys, threading, time
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd

MiB = 1 << 20
t = nbdtest.Test(plan=25, filters=("throttle",))
CTL = os.path.join(nbdtest.TOP, "nbdserve-ctl")

# Data, not holes: the server answers holes without a read, and so
# without charging them (see throttle.md, Limits).
disk = os.path.join(t.tmp, "disk.img")
with open(disk, "wb") as f:
    f.write(os.urandom(100 * MiB))


def copy(uri):
    """Seconds nbdcopy takes to read the whole disk on one connection."""
    t0 = time.monotonic()
    p = subprocess.run(["nbdcopy", "--connections=1", uri, "null:"], capture_output=True)
    took = time.monotonic() - t0
    if p.returncode != 0:
        t.diag(p.stderr.decode())
    return took


def within(got, want, tol=0.10):
    """GOT is WANT, the rate set, within TOL.  What a throttle promises
    is the upper side, and that stays; reaching the rate takes the CPU
    to get there, which a sanitizer build (TSAN above all, several times
    slower) may lack on a loaded machine: there 60% of it will do, still
    far from what a throttle waiting twice too long would give."""
    low = min(1 - tol, 0.6) if nbdtest.SANITIZED else 1 - tol
    return want * low <= got <= want * (1 + tol)


def ctl(sock, *args):
    p = subprocess.run([CTL, sock] + list(args), capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def stream(h, seconds, events=(), size=64 * 1024, qd=4):
    """Read on H at queue depth QD for SECONDS; EVENTS are (time, fn)
    to call on the way.  Returns [(completion time, bytes)], times from
    the start."""
    done, cookies, off = [], set(), 0
    start = time.monotonic()
    events = sorted(events, key=lambda e: e[0])
    while True:
        now = time.monotonic() - start
        while events and now >= events[0][0]:
            events.pop(0)[1]()
        if now >= seconds:
            break
        while len(cookies) < qd:
            cookies.add(h.aio_pread(nbd.Buffer(size), off))
            off = (off + size) % (50 * MiB)
        h.poll(20)
        while True:
            c = h.aio_peek_command_completed()
            if c == 0:
                break
            h.aio_command_completed(c)
            cookies.discard(c)
            done.append((time.monotonic() - start, size))
    while h.aio_in_flight() > 0:
        h.poll(100)
    return done


def rate_between(done, a, b):
    return sum(n for (at, n) in done if a <= at < b) / (b - a)


# ---- rate=20M: 100 MiB in 5 s ---------------------------------------
uri = t.server("rate", "--filter=throttle", "file", disk, "rate=20M")
took = copy(uri)
mibs = 100 / took
t.ok(within(mibs, 20), "rate=20M: nbdcopy reads 100 MiB at %.2f MiB/s (20 +- 10%%)" % mibs)
t.is_(t.stop(), 0, "... and the server stops cleanly")

# ---- iops=500: fio QD32 -------------------------------------------------
uri = t.server("iops", "--filter=throttle", "file", disk, "iops=500")
out = subprocess.run(["fio", "--name=throttle", "--ioengine=nbd", "--uri=" + uri,
                      "--rw=randread", "--bs=4k", "--iodepth=32", "--time_based",
                      "--runtime=5", "--size=%d" % (100 * MiB), "--output-format=json"],
                     capture_output=True, text=True, timeout=30).stdout
try:
    iops = json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]
except ValueError:
    t.diag(out)
    iops = 0
t.ok(within(iops, 500), "iops=500: fio 4K random reads at QD32 make %.0f requests/s (500 +- 10%%)" % iops)
t.stop()

# ---- connection-rate=10M: two connections, and another server ---------------
uri = t.server("conn", "--filter=throttle", "file", disk, "connection-rate=10M")
os.truncate(disk, 50 * MiB)  # 5 s a connection
free_uri = t.server("free", "file", disk)
alone = copy(free_uri)
procs = []
t0 = time.monotonic()
for _ in range(2):
    procs.append(subprocess.Popen(["nbdcopy", "--connections=1", uri, "null:"]))
time.sleep(1)
during = copy(free_uri)
ends = []
for p in procs:
    p.wait()
    ends.append(time.monotonic() - t0)
for i, e in enumerate(ends):
    t.ok(within(50 / e, 10), "connection-rate=10M: connection %d reads 50 MiB at %.2f MiB/s "
         "(10 +- 10%%)" % (i + 1, 50 / e))
# Not a speed check: a read throttled like the others would take 5 s.
t.ok(during < 2.5,
     "... while an unthrottled server reads it in %.2f s (alone: %.2f s)"
     % (during, alone))
t.stop()
t.stop(t.servers[-1])

# ---- throttle.set, and the rate file ---------------------------------------------
ctlsock = os.path.join(t.tmp, "set.ctl")
uri = t.server("set", "--control=" + ctlsock, "--filter=throttle", "file", disk, "rate=5M")
h = t.connect(uri)
answers = []
done = stream(h, 3.0, [(1.0, lambda: answers.append(ctl(ctlsock, "throttle.set", "rate=20M")))])
t.ok(answers and answers[0][0] == 0 and "rate=20971520" in answers[0][1],
     "throttle.set rate=20M is answered with the new rate")
before, after = rate_between(done, 0.2, 1.0) / MiB, rate_between(done, 2.0, 3.0) / MiB
t.ok(within(before, 5, 0.15) and within(after, 20, 0.15),
     "throttle.set: %.2f MiB/s before (5), %.2f MiB/s from 1 s after (20)" % (before, after))
rc, out = ctl(ctlsock, "throttle.set", "rate=fast")
t.ok(rc == 1 and "rate=fast" in out, "throttle.set refuses a bad rate: %s" % out.strip())
rc, out = ctl(ctlsock, "throttle.show")
t.ok(rc == 0 and "rate=20971520" in out and "connections=1" in out,
     "throttle.show: the rate in force, one connection")
h.shutdown()
del h
t.stop()

rate_file = os.path.join(t.tmp, "rate")
with open(rate_file, "w") as f:
    f.write("# the rate\nrate=5M\n")
uri = t.server("file", "--filter=throttle", "file", disk, "rate-file=" + rate_file)
h = t.connect(uri)


def rewrite():
    with open(rate_file + ".new", "w") as f:
        f.write("20M\n")
    os.rename(rate_file + ".new", rate_file)


done = stream(h, 3.5, [(1.0, rewrite)])
before, after = rate_between(done, 0.2, 1.0) / MiB, rate_between(done, 2.1, 3.5) / MiB
t.ok(within(before, 5, 0.15) and within(after, 20, 0.15),
     "rate-file: %.2f MiB/s before (5), %.2f MiB/s from 1.1 s after the file says 20M"
     % (before, after))
h.shutdown()
del h
t.stop()

# ---- 500 connections waiting ------------------------------------------------------
# connection-rate=200K: each of 500 connections asks for 4 MiB, which
# waits some 20 s.  A probe connection reads 4 KiB every 30 ms (133 KiB/s,
# under its limit, so it never waits) before and while they wait.
uri = t.server("many", "--filter=throttle", "file", disk, "connection-rate=200K")
pid = t.last_server.pid


def threads():
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])


def cpu_seconds():
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def probe(n=150):
    """p99 and max latency of n 4K reads, and the server's CPU seconds
    and the wall seconds they took."""
    lat = []
    cpu0, wall0 = cpu_seconds(), time.monotonic()
    for i in range(n):
        t0 = time.monotonic()
        probe_h.pread(4096, (i * 4096) % (50 * MiB))
        lat.append(time.monotonic() - t0)
        time.sleep(0.03)
    lat.sort()
    return (lat[int(len(lat) * 0.99) - 1], lat[-1],
            cpu_seconds() - cpu0, time.monotonic() - wall0)


probe_h = t.connect(uri)
idle_p99, idle_max, idle_cpu, idle_wall = probe()
threads_idle = threads()
hs = [t.connect(uri) for _ in range(500)]
for i, h in enumerate(hs):
    h.aio_pread(nbd.Buffer(4 * MiB), (i % 12) * 4 * MiB)
time.sleep(0.5)
for h in hs:
    h.poll(0)
# Counted now, 0.5 s into waits of 20 s: on a loaded machine the probe
# below can take long enough for the first waits to end.
waiting = sum(h.aio_in_flight() for h in hs)
busy_p99, busy_max, busy_cpu, busy_wall = probe()
threads_busy = threads()
t.is_(waiting, 500, "500 connections each have a throttled 4 MiB read waiting")
t.ok(threads_busy <= threads_idle, "... and the server has %d threads (%d idle)"
     % (threads_busy, threads_idle))
# The probe has its own connection and bucket: it must never queue behind
# the waiting reads (each of which waits some 20 s) nor share a loop busy
# with them.  What that needs is checked with bounds no busy machine
# reaches by chance: every probe read answered well under a second, and
# the server's CPU time while 500 reads wait about what it is idle (a
# wait that polled would burn a CPU).  The p99 figures are reported, not
# compared: latency on a loaded CI machine is a benchmark's business.
slack = 4 if nbdtest.SANITIZED else 1   # sanitizer builds run several times slower
t.ok(busy_max < 0.5 * slack,
     "... another connection's 4K reads are answered at once: max %.1f ms, "
     "p99 %.3f ms (idle server: p99 %.3f ms)"
     % (busy_max * 1e3, busy_p99 * 1e3, idle_p99 * 1e3))
t.ok(busy_cpu < 1.0 * slack,
     "... and the 500 waits cost the server %.2f s of CPU over %.1f s (idle: %.2f s)"
     % (busy_cpu, busy_wall, idle_cpu))
# Leaving with the reads waiting cuts their waits short.
t0 = time.monotonic()
for h in hs:
    h.shutdown()
del hs, h
probe_h.shutdown()
del probe_h
t.is_(t.stop(), 0, "the server stops cleanly after 500 clients left mid-wait")
# The cut-short reads still copy 2 GiB, one connection after another
# as the client shuts them down (13 s here), which a sanitizer build does
# many times slower (TSAN: 85 s alone, over 90 s beside other tests),
# and a machine busy with other tests several times slower; left to the
# limit, they would take half an hour.
limit = 300 if nbdtest.SANITIZED else 30
t.ok(time.monotonic() - t0 < limit, "... promptly (%.2f s)" % (time.monotonic() - t0))
t.ok("error" not in t.log("many"), "no errors logged")

# ---- read-rate and write-rate: each limits its own direction ----------------------
# A copy of the whole 40 MiB disk, one way at the limit (4 s), the other
# way unlimited.  Client-side: bytes copied / wall time of nbdcopy.
rw_disk = os.path.join(t.tmp, "rw.img")
src = os.path.join(t.tmp, "src.img")
for path in (rw_disk, src):
    with open(path, "wb") as f:
        f.write(os.urandom(40 * MiB))


def copy_in(uri):
    """Seconds nbdcopy takes to write the 40 MiB source over one connection."""
    t0 = time.monotonic()
    p = subprocess.run(["nbdcopy", "--connections=1", src, uri], capture_output=True)
    took = time.monotonic() - t0
    if p.returncode != 0:
        t.diag(p.stderr.decode())
    return took


for key, limited, free in (("read-rate", copy, copy_in), ("write-rate", copy_in, copy)):
    uri = t.server(key, "--filter=throttle", "file", rw_disk, key + "=10M")
    slow = 40 / limited(uri)
    fast = 40 / free(uri)
    t.ok(within(slow, 10) and fast > 30,
         "%s=10M: %s at %.2f MiB/s (10 +- 10%%), %s unlimited at %.0f MiB/s (> 30)"
         % (key, "reads" if limited is copy else "writes", slow,
            "writes" if limited is copy else "reads", fast))
    t.stop()

# ---- connection-iops: two connections, each at the limit ------------------------------
uri = t.server("conn-iops", "--filter=throttle", "file", disk, "connection-iops=200")
out = subprocess.run(["fio", "--name=throttle", "--ioengine=nbd", "--uri=" + uri,
                      "--rw=randread", "--bs=4k", "--iodepth=16", "--numjobs=2", "--time_based",
                      "--runtime=4", "--size=%d" % (40 * MiB), "--output-format=json"],
                     capture_output=True, text=True, timeout=30).stdout
try:
    jobs = json.loads(out[out.index("{"):])["jobs"]
    per_job = [j["read"]["iops"] for j in jobs]
except ValueError:
    t.diag(out)
    per_job = []
t.ok(len(per_job) == 2 and all(within(v, 200) for v in per_job),
     "connection-iops=200: two fio connections at QD16 make %s requests/s each (200 +- 10%%)"
     % " and ".join("%.0f" % v for v in per_job))
t.stop()

# ---- fairness under one shared rate ------------------------------------------------------
# Each connection reads at queue depth 1 on a thread of its own; the
# rate of a connection is the bytes of its completed reads over the time
# of its last completion, from a common start (at QD1 the next read
# starts when one ends, so this counts exactly what was served).


def reader(uri, size, seconds, start, out):
    h = t.connect(uri)
    lats, n, off, last = [], 0, 0, 0.0
    span = 48 * MiB - size
    while time.monotonic() - start < seconds:
        t0 = time.monotonic()
        h.pread(size, off)
        last = time.monotonic() - start
        lats.append(last - (t0 - start))
        n += 1
        off = (off + size) % span if span else 0
    h.shutdown()
    lats.sort()
    out.append((n * size / last / MiB if last else 0, n, lats))


def side_by_side(uri, sizes, seconds):
    start = time.monotonic()
    outs = [[] for _ in sizes]
    ths = [threading.Thread(target=reader, args=(uri, size, seconds, start, o))
           for size, o in zip(sizes, outs)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return [o[0] if o else (0, 0, [1.0]) for o in outs]


# Two connections of the same large reads share rate=10M equally.
uri = t.server("fair", "--filter=throttle", "file", disk, "rate=10M")
(a, _, _), (b, _, _) = side_by_side(uri, (MiB, MiB), 4.0)
t.ok(within(a, 5) and within(b, 5),
     "rate=10M, two connections of 1 MiB reads: %.2f and %.2f MiB/s (5 +- 10%% each)" % (a, b))
# 32 MiB reads against 4 KiB reads: the large ones are charged in pieces
# of 10 ms at the rate, and each small read takes its turn between two
# pieces (throttle.md), so it waits about a piece, not the 3.2 s of a
# whole 32 MiB read at 10 MiB/s, and the two together still get the rate.
(big, nbig, _), (small, nsmall, lats) = side_by_side(uri, (32 * MiB, 4096), 7.0)
p99 = lats[int(len(lats) * 0.99) - 1] if lats else 1.0
t.ok(within(big + small, 10) and nbig >= 2,
     "32 MiB reads (%.2f MiB/s) and 4K reads (%.2f MiB/s) together get the rate (10 +- 10%%)"
     % (big, small))
# Starved, a 4K read would wait out a whole 32 MiB read (3.2 s); taking
# turns, about a piece (10 ms).  The bound sits between the two, far from
# both, so a loaded machine does not trip it; the figure is reported.
t.ok(p99 < (2.0 if nbdtest.SANITIZED else 0.5) and nsmall / 7.0 > 10,
     "... and the 4K reads are not starved: %.0f a second, p99 latency %.1f ms "
     "(a whole 32 MiB read would be 3200)" % (nsmall / 7.0, p99 * 1e3))
t.stop()

# ---- --help agrees with throttle.md ------------------------------------------------
out = subprocess.run([nbdtest.NBDSERVE, "--help", "--filter=throttle", "memory"],
                     capture_output=True, text=True).stdout
with open(os.path.join(nbdtest.TOP, "filters", "throttle", "throttle.md")) as f:
    md = f.read()
keys = ["rate", "read-rate", "write-rate", "connection-rate", "iops", "connection-iops",
        "burst", "rate-file"]
missing = [k for k in keys if ("\n%s=" % k) not in out and (", %s=" % k) not in out
           or ("`%s=" % k) not in md]
t.is_(missing, [], "every parameter is in --help and in throttle.md")
t.finish()
