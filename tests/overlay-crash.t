#!/usr/bin/python3
# dirty-bitmap-overlay: kill -9 while a writer runs (32 requests in flight,
# a FLUSH every 100), three times over the same overlay.  After each
# crash: qemu-img check finds no errors (leaks are allowed, as for qemu);
# after the restart every write acknowledged before the last completed
# flush reads back, every other write reads either as before or as
# written (never anything else, and nothing else on the disk changed),
# and the bitmap shows every granule of every acknowledged or visible
# write dirty (a superset is allowed).
import os
import random
import signal
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd
from overlaytest import (bitmaps_in_file, check_no_errors, dirty_set, nbdinfo_map, read_all,
                         same_bytes, serve)

# (overlay, its creation parameters, the bitmap's granularity, rounds):
# 64K clusters keep the disk in one L2 table; 4K clusters need sixteen,
# made (and their L1 entries written) while the writer runs.
K, M = 1024, 1024 * 1024
OVERLAYS = [("ov64.qcow2", [], 64 * K, 3),
            ("ov4.qcow2", ["cluster-size=4K", "granularity=16K"], 16 * K, 2)]
t = nbdtest.Test(plan=sum(3 + 6 * rounds for *_, rounds in OVERLAYS),
                 watchdog=600 if nbdtest.SANITIZED else 240)
tmp = t.tmp
random.seed(9)
SLOT = 4 * K           # each request stays inside one slot, so inside one cluster
SIZE = 16 * M

# The base: random data with a hole.
data = bytearray(random.randbytes(SIZE))
data[4 * M:6 * M] = bytes(2 * M)
base = os.path.join(tmp, "base.raw")
with open(base, "wb") as f:
    f.truncate(SIZE)
    f.write(data[:4 * M])
    f.seek(6 * M)
    f.write(data[6 * M:])

# Per overlay:
disk = None                     # what the disk must read as, where known
free_slots = []                 # slots never written yet
must_be_dirty = set()           # granules that every later map must show dirty
G = 0                           # the bitmap's granularity


class Request:
    def __init__(self, kind, offset, payload):
        self.kind, self.offset, self.payload = kind, offset, payload
        self.old = bytes(disk[offset:offset + len(payload)])
        self.acked = False
        self.done_before_flush = False


def next_request():
    slot = free_slots.pop()
    kind = random.choice(("write", "write", "write", "zero"))
    n = random.choice((SLOT, random.randint(1, SLOT)))
    off = slot * SLOT + random.randint(0, SLOT - n)
    return Request(kind, off, random.randbytes(n) if kind == "write" else bytes(n))


def crash_round(number, h, pid, kill_after):
    """Requests until KILL_AFTER have completed, then kill -9 the server
    with requests in flight; returns (requests, durable ones)."""
    requests, durable, flushes = [], set(), 0
    completed = []

    def on_done(req, err):
        if err.value == 0:
            req.acked = True
            completed.append(req)
        return 1

    def on_flush(covered, err):
        if err.value == 0:
            durable.update(covered)
        return 1

    killed = False
    try:
        while True:
            # Requests go on after the kill, until the connection dies:
            # some reach the server as it dies.
            while h.aio_in_flight() < 32:
                req = next_request()
                requests.append(req)
                cb = lambda err, req=req: on_done(req, err)
                if req.kind == "write":
                    h.aio_pwrite(req.payload, req.offset, completion=cb)
                else:
                    h.aio_zero(len(req.payload), req.offset, completion=cb, flags=nbd.CMD_FLAG_NO_HOLE
                               if random.random() < 0.5 else 0)
                if len(requests) % 100 == 0:
                    covered = frozenset(id(r) for r in completed)
                    h.aio_flush(completion=lambda err, c=covered: on_flush(c, err))
                    flushes += 1
            if not killed and len(completed) >= kill_after:
                os.kill(pid, signal.SIGKILL)
                killed = True
            h.poll(-1)
    except nbd.Error:
        pass  # the connection died with the server
    t.diag("%s: %d requests sent, %d acknowledged, %d durable, %d flushes sent, killed with %d in flight"
           % (number, len(requests), len(completed), len(durable), flushes,
              len(requests) - len(completed)))
    return requests, {r for r in requests if id(r) in durable}


def check_after(number, uri, requests, durable):
    h = t.connect(uri)
    lost, wrong = [], []
    seen = {"new": 0, "old": 0}
    for req in requests:
        got = h.pread(len(req.payload), req.offset)
        if req in durable:
            if got != req.payload:
                lost.append(req)
        elif got not in (req.old, req.payload):
            wrong.append(req)
        elif req.old != req.payload:
            seen["new" if got == req.payload else "old"] += 1
        if got == req.payload and got != req.old or req.acked:
            must_be_dirty.update(range(req.offset // G, (req.offset + len(req.payload) + G - 1) // G))
        disk[req.offset:req.offset + len(req.payload)] = got
    t.diag("%s: of the requests not covered by a flush, %d read as written, %d as before"
           % (number, seen["new"], seen["old"]))
    t.ok(not lost, "%s: every write acknowledged before a completed flush is there (%d)"
         % (number, len(durable)))
    for req in lost[:5]:
        t.diag("lost: %s at %d, %d bytes" % (req.kind, req.offset, len(req.payload)))
    t.ok(not wrong, "%s: every other request reads either as before or as written" % number)
    for req in wrong[:5]:
        t.diag("neither old nor new: %s at %d, %d bytes" % (req.kind, req.offset, len(req.payload)))
    same_bytes(t, read_all(h, SIZE), bytes(disk), "%s: nothing else on the disk changed" % number)
    runs = nbdinfo_map(uri, "qemu:dirty-bitmap:b1")
    missing = must_be_dirty - dirty_set(runs, G) if isinstance(runs, list) else runs
    if not t.ok(not missing, "%s: every granule written (%d) is dirty in b1"
                % (number, len(must_be_dirty))):
        t.diag("not dirty: %s" % (sorted(missing)[:20] if isinstance(missing, set) else missing))
    h.shutdown()


for name, params, G, rounds in OVERLAYS:
    ov = os.path.join(tmp, name)
    disk = bytearray(data)
    free_slots = list(range(SIZE // SLOT))
    random.shuffle(free_slots)
    must_be_dirty = set()
    label = name.split(".")[0]
    uri, sock = serve(t, label + "-0", ov, "base=" + base, "bitmap=b1", *params)
    for i in range(1, rounds + 1):
        number = "%s round %d" % (label, i)
        h = t.connect(uri)
        requests, durable = crash_round(number, h, t.last_server.pid, random.randint(300, 900))
        del h
        t.stop(sig=signal.SIGKILL)
        report = check_no_errors(t, ov, "%s: after kill -9, qemu-img check finds no errors" % number)
        if isinstance(report, dict):
            t.diag("%s: qemu-img check: %d leaked clusters" % (number, report.get("leaks", 0)))
        server = "%s-%d" % (label, i)
        uri, sock = serve(t, server, ov, "bitmap=b1")
        t.ok("not closed cleanly" in t.log(server), "%s: the restart recovers the overlay" % number)
        check_after(number, uri, requests, durable)
    t.is_(t.stop(), 0, "%s: the last server stops cleanly" % label)
    check_no_errors(t, ov, "%s: qemu-img check after the last clean stop: no errors" % label)
    t.ok("in-use" not in bitmaps_in_file(ov).get("b1", (0, ("missing",)))[1],
         "%s: b1 is no longer in use after the clean stop" % label)
t.finish()
