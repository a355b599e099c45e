#!/usr/bin/python3
# dirty-bitmap-overlay: live checkpoints (issue 19), driven by real
# clients while a writer keeps writing.
#
# 1. Exactness: a python libnbd writer keeps 8 random writes (4K to 64K,
#    random offsets, never two overlapping at once) in flight and logs for
#    each its bytes, when it was sent and when its completion arrived.
#    Three checkpoints are taken meanwhile.  From the log alone each @cN
#    is rebuilt: every write acknowledged before the command was sent is
#    in, every write sent after it returned is out, each write in flight
#    across the instant is wholly in or wholly out (the in-flight ones
#    that overlap are tried in every order the log allows), and one
#    instant separates what is in from what is out.  Each write is in the
#    bitmap of its own epoch: the ended bitmap on @cN for those in cN and
#    not in c(N-1), the newest bitmap on the live export for those after
#    the last checkpoint; b2 (carried over) holds them all.
# 2. The backup cycle of the plugin's page, extracted from the page and
#    run as it is: a full backup, then five incremental rounds with the
#    writer running; each backup equals @cN read whole (cmp).
# 3. The same cycle with kill -9 after a checkpoint, after the
#    incremental copy, in the middle of a release and in the middle of a
#    checkpoint, restarting with the same command line: the frozen
#    exports read as before, the cycle goes on exactly; qemu-img check of
#    every file finds no errors, qemu-img info lists the bitmaps.
# 4. Refusals: a name in use (checkpoint or bitmap), bad names, release of
#    an unknown name, a server without bitmap=, writes to @NEW (EPERM);
#    a connection open across a release keeps reading.
# The writes-held-us figures and the writer's p99 latency during and away
# from checkpoints are printed as diagnostics.
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd
from overlaytest import PLUGIN, bitmaps_in_file, check_clean, check_image, check_no_errors, dirty_set, nbdinfo_map, \
    read_all, run

TOP = nbdtest.TOP
CTL = os.path.join(TOP, "nbdserve-ctl")
PAGE_DIR = os.path.join(TOP, "plugins", PLUGIN)
os.environ["PATH"] = TOP + ":" + os.environ["PATH"]  # the page's script calls nbdserve-ctl
K, M = 1024, 1024 * 1024
SIZE = 16 * M
G = 64 * K  # the bitmaps' granularity (the default)
ROUNDS = 5
CRASH_ROUNDS = 6

t = nbdtest.Test(plan=158, watchdog=900 if nbdtest.SANITIZED else 300)
tmp = t.tmp
random.seed(19)

held_us = []            # writes-held-us of every checkpoint taken
windows = {"checkpoint": [], "release": []}  # (sent, returned) of each command
all_writes = {}         # label: every write of the writers of a part, for the latency figures

# The base: random data with a hole in the middle.
base_bytes = bytearray(random.randbytes(SIZE))
base_bytes[6 * M:8 * M] = bytes(2 * M)
BASE = os.path.join(tmp, "base.raw")
with open(BASE, "wb") as f:
    f.write(base_bytes[:6 * M])
    f.seek(8 * M)
    f.write(base_bytes[8 * M:])


# ---- servers, the control socket --------------------------------------------------
def start(name, ctl, *params):
    """nbdserve -f -U NAME.sock --control=CTL dirty-bitmap-overlay PARAMS,
    its log appended to NAME.log, so that a restart (same command line)
    keeps the earlier log."""
    sock = os.path.join(tmp, name + ".sock")
    for stale in (sock, ctl):
        if os.path.exists(stale):
            os.unlink(stale)
    log = open(os.path.join(tmp, name + ".log"), "a")
    p = subprocess.Popen([nbdtest.NBDSERVE, "-f", "-U", sock, "--control=" + ctl, PLUGIN] + list(params),
                         stderr=log)
    log.close()
    p.sock, p.name, p.ctl = sock, name, ctl
    t.servers.append(p)
    for _ in range(400):
        if (os.path.exists(sock) and os.path.exists(ctl)) or p.poll() is not None:
            break
        time.sleep(0.025)
    if not os.path.exists(sock) or not os.path.exists(ctl):
        t.diag(t.log(name))
        raise RuntimeError("server %s did not start" % name)
    return p


def uri_of(p, export=""):
    return "nbd+unix:///%s?socket=%s" % (export, p.sock)


def ctl(p, *words):
    """nbdserve-ctl: (exit status, stdout lines, stderr)."""
    sent = time.monotonic()
    r = run([CTL, p.ctl] + list(words))
    returned = time.monotonic()
    command = words[0].split(".")[-1]
    if command in windows:
        windows[command].append((sent, returned))
    if command == "checkpoint" and r.returncode == 0:
        held_us.append(int(field(r.stdout, "writes-held-us")))
    return r.returncode, r.stdout.splitlines(), r.stderr.strip(), sent, returned


def field(text, key):
    for line in text.splitlines() if isinstance(text, str) else text:
        if line.startswith(key + "="):
            return line[len(key) + 1:]
    return None


def listed(p):
    """The checkpoints command: {name: {time, bitmap, preserved, connections}}."""
    rc, lines, err, *_ = ctl(p, "dirty-bitmap-overlay.checkpoints")
    out = {}
    for line in lines:
        m = re.match(r"checkpoint=(\S+) time=(\d+) bitmap=(\S*) preserved=(\d+) connections=(\d+)$", line)
        if m:
            out[m.group(1)] = {"time": int(m.group(2)), "bitmap": m.group(3),
                               "preserved": int(m.group(4)), "connections": int(m.group(5))}
    return out


def raw_command(p, line):
    """Sends one control line without waiting for the answer; the socket."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(p.ctl)
    s.sendall(line.encode() + b"\n")
    return s


def answer_of(s):
    """The answer to a control line sent on S, up to its final line."""
    lines = []
    for line in s.makefile():
        lines.append(line)
        if line == "ok\n" or line.startswith("error:"):
            break
    return "".join(lines)


def read_export(p, export):
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(p.sock)
    data = read_all(h, h.get_size())
    h.shutdown()
    return data


def bitmap_granules(p, export, bitmap):
    runs = nbdinfo_map(uri_of(p, export), "qemu:dirty-bitmap:" + bitmap)
    return dirty_set(runs, G) if isinstance(runs, list) else runs


def files_ok(label, files):
    """qemu-img check of each file: exit 0, or 3 for leaks only; no errors."""
    bad = []
    for path in files:
        rc, report = check_image(path)
        if rc not in (0, 3) or not isinstance(report, dict) or report.get("check-errors") or \
                report.get("corruptions"):
            bad.append("%s: exit %d, %s" % (os.path.basename(path), rc, report))
    if not t.ok(files and not bad, "%s: qemu-img check of %s: no errors" %
                (label, ", ".join(os.path.basename(f) for f in files))):
        t.diag("\n".join(bad))


def granules(w):
    return set(range(w.offset // G, (w.offset + len(w.data) - 1) // G + 1))


# ---- the writer --------------------------------------------------------------------------
class Write:
    __slots__ = ("offset", "data", "length", "sent", "acked", "error")

    def __init__(self, offset, data):
        self.offset, self.data, self.length = offset, data, len(data)
        self.sent = self.acked = None
        self.error = 0

    def end(self):
        return self.offset + self.length


class Reader(threading.Thread):
    """Random reads of frozen exports, one connection each, compared with
    what each export read as when it was taken, until stopped."""

    def __init__(self, p, frozen):
        super().__init__(daemon=True)
        self.handles = {}
        for export in frozen:
            h = nbd.NBD()
            h.set_export_name(export)
            h.connect_unix(p.sock)
            self.handles[export] = h
        self.frozen, self.rng = frozen, random.Random(7)
        self.reads, self.wrong, self.failure = 0, [], None
        self.stopping = threading.Event()
        self.start()

    def run(self):
        try:
            while not self.stopping.is_set():
                for export, h in self.handles.items():
                    length = self.rng.randrange(4 * K, 256 * K)
                    offset = self.rng.randrange(0, SIZE - length)
                    if h.pread(length, offset) != self.frozen[export][offset:offset + length]:
                        self.wrong.append((export, offset, length))
                    self.reads += 1
            for h in self.handles.values():
                h.shutdown()
        except nbd.Error as e:
            self.failure = str(e)

    def finish(self):
        self.stopping.set()
        self.join(60)
        return self.failure is None and not self.is_alive() and not self.wrong and self.reads > 0


class Writer(threading.Thread):
    """DEPTH random writes in flight on one connection, never two that
    overlap at once, so that two writes to the same byte are ordered: the
    later one was sent after the earlier one's completion arrived.  Each
    write's 'sent' is taken before libnbd may send it and 'acked' when its
    completion arrives: both err on the safe side."""
    DEPTH = 8

    def __init__(self, p, seed, label, keep_data=True, span=None):
        super().__init__(daemon=True)
        self.p, self.rng, self.keep_data = p, random.Random(seed), keep_data
        self.label, self.span = label, span or SIZE
        self.log = []
        self.stopping = threading.Event()
        self.failure = None
        self.start()

    def pick(self, in_flight):
        for _ in range(50):
            length = self.rng.randrange(4 * K, 64 * K + 1)
            if self.rng.random() < 0.5:
                length &= ~4095
                offset = self.rng.randrange(0, self.span - length + 1) & ~4095
            else:
                offset = self.rng.randrange(0, self.span - length + 1)
            if all(offset >= w.end() or offset + length <= w.offset for w in in_flight):
                return offset, length
        return None

    def done(self, w, in_flight, err):
        w.acked = time.monotonic()
        w.error = err.value
        in_flight.remove(w)
        if not self.keep_data:
            w.data = b""
        return 1

    def run(self):
        in_flight = []
        try:
            h = nbd.NBD()
            h.connect_unix(self.p.sock)
            while in_flight or not self.stopping.is_set():
                while not self.stopping.is_set() and len(in_flight) < self.DEPTH:
                    where = self.pick(in_flight)
                    if where is None:
                        break
                    w = Write(where[0], os.urandom(where[1]))
                    in_flight.append(w)
                    self.log.append(w)
                    w.sent = time.monotonic()
                    h.aio_pwrite(w.data, w.offset,
                                 completion=lambda err, w=w: self.done(w, in_flight, err))
                h.poll(-1)
            h.shutdown()
        except nbd.Error as e:
            self.failure = str(e)
        all_writes.setdefault(self.label, []).extend(self.log)

    def finish(self):
        self.stopping.set()
        self.join(60)
        return self.failure is None and not self.is_alive()


# ---- 1. exactness of a checkpoint under writes -----------------------------------------
def state_at(log, sent, returned, before):
    """For a checkpoint commanded between SENT and RETURNED: BEFORE (the
    base) with every write acknowledged before SENT applied, those
    writes, and the writes in flight across the command."""
    known_in = [w for w in log if w.acked < sent]
    uncertain = [w for w in log if w.sent < returned and w.acked >= sent]
    image = bytearray(before)
    for w in known_in:
        image[w.offset:w.end()] = w.data
    return image, known_in, uncertain


def components(writes):
    """The uncertain writes grouped by overlap (each group in send order)."""
    groups = []
    for w in writes:
        touching = [g for g in groups if any(w.offset < v.end() and v.offset < w.end() for v in g)]
        merged = [w]
        for g in touching:
            groups.remove(g)
            merged = g + merged
        groups.append(sorted(merged, key=lambda v: v.sent))
    return groups


def resolve(group, image, frozen):
    """Which writes of an overlapping group are in: the subsets the log
    allows (a write in means every earlier write overlapping it is in),
    each applied in send order over IMAGE, compared with FROZEN over the
    group's span.  The subset that matches, or None."""
    lo = min(w.offset for w in group)
    hi = max(w.end() for w in group)
    want = bytes(frozen[lo:hi])
    if len(group) > 12:
        return None
    for mask in range(1 << len(group)):
        ok = True
        for i, w in enumerate(group):
            if mask >> i & 1:
                for j in range(i):
                    v = group[j]
                    if not mask >> j & 1 and v.offset < w.end() and w.offset < v.end():
                        ok = False
        if not ok:
            continue
        span = bytearray(image[lo:hi])
        for i, w in enumerate(group):
            if mask >> i & 1:
                span[w.offset - lo:w.end() - lo] = w.data
        if span == want:
            return [w for i, w in enumerate(group) if mask >> i & 1]
    return None


def describe_write(w, frozen, image):
    got = bytes(frozen[w.offset:w.end()])
    side = "its new bytes" if got == w.data else "the bytes before it" if got == image[w.offset:w.end()] \
        else "neither its bytes nor those before it"
    return "write [%d, +%d) sent %+.6f acked %+.6f reads as %s" % (w.offset, w.length, w.sent, w.acked, side)


def first_difference(a, b, log):
    if a == b:
        return None
    i = next(i for i in range(0, len(a), 4096) if a[i:i + 4096] != b[i:i + 4096])
    j = next(k for k in range(i, i + 4096) if a[k] != b[k])
    covering = [w for w in log if w.offset <= j < w.end()]
    return "first difference at byte %d; writes covering it: %s" % (
        j, "; ".join("[%d,+%d) sent %.6f acked %.6f" % (w.offset, w.length, w.sent, w.acked) for w in covering))


def union_granules(writes):
    return set().union(*(granules(w) for w in writes)) if writes else set()


def covers(got, need, desc):
    """A bitmap's dirty granules (or nbdinfo's error) hold NEED."""
    if not t.ok(isinstance(got, set) and need <= got, desc):
        t.diag(got if not isinstance(got, set) else "missing granules: %s" % sorted(need - got)[:20])
    elif got - need:
        t.diag("%d granules dirty that no write of the epoch touched (allowed: a superset)" % len(got - need))


def release_answer(p, name):
    rc, lines, err, *_ = ctl(p, "dirty-bitmap-overlay.release", "name=" + name)
    return (rc, lines) if rc == 0 else (rc, err)


def exactness():
    ov = os.path.join(tmp, "exact.qcow2")
    ctlpath = os.path.join(tmp, "exact.ctl")
    p = start("exact", ctlpath, "base=" + BASE, "overlay=" + ov, "bitmap=b1", "bitmap=b2")
    writer = Writer(p, 1, "exact")
    taken = []
    for n in (1, 2, 3):
        time.sleep(0.4)
        rc, lines, err, sent, returned = ctl(p, "dirty-bitmap-overlay.checkpoint", "name=c%d" % n)
        taken.append((n, rc, lines, err, sent, returned))
    time.sleep(0.2)
    n1 = taken[0]
    t.is_((n1[1], [l for l in n1[2] if not l.startswith("writes-held-us=")]),
          (0, ["checkpoint=c1", "export=@c1", "ended-bitmap=b1", "recording-bitmap=c1"]),
          "exact: checkpoint c1 answers its export and the bitmaps ended and recording")
    t.ok(all(x[1] == 0 for x in taken), "exact: checkpoints c2 and c3 taken while the writer writes %s"
         % [x[3] for x in taken if x[3]])
    lst = run(["nbdinfo", "--list", "--json", uri_of(p)]).stdout
    t.ok(all('"@c%d"' % n in lst for n in (1, 2, 3)), "exact: NBD_OPT_LIST lists @c1, @c2 and @c3")
    ls = listed(p)
    t.is_(sorted((k, v["bitmap"], v["connections"]) for k, v in ls.items()),
          [("c1", "b1", 0), ("c2", "c1", 0), ("c3", "c2", 0)],
          "exact: the checkpoints command lists each with the bitmap that ended there")
    t.ok(all(v["preserved"] > 0 and abs(v["time"] - time.time()) < 600 for v in ls.values()),
         "exact: each lists the time it was taken and the bytes it preserves")
    info = run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", ov]).stdout
    t.ok(all(ov + "@c%d" % n in info for n in (1, 2, 3)), "exact: qemu-img info shows the checkpoints "
         "as the backing chain of the overlay")
    files_ok("exact, the writer running", [ov + "@c%d" % n for n in (1, 2, 3)])
    # What the frozen exports show, read while the writer goes on.
    frozen = {n: read_export(p, "@c%d" % n) for n in (1, 2, 3)}
    ended = {n: bitmap_granules(p, "@c%d" % n, "b1" if n == 1 else "c%d" % (n - 1)) for n in (1, 2, 3)}
    b2_at = {n: bitmap_granules(p, "@c%d" % n, "b2") for n in (1, 2, 3)}
    meta = run(["nbdinfo", "--json", uri_of(p, "@c3")]).stdout
    t.ok('"qemu:dirty-bitmap:c2"' in meta and '"qemu:dirty-bitmap:c3"' not in meta,
         "exact: @c3 offers the bitmap that ended there, not the one recording")

    # Releases, the writer still writing and readers reading the frozen
    # exports: the oldest first (merged into c2's layer), then the newest
    # (into the live overlay) and the last.
    readers = Reader(p, {"@c2": frozen[2], "@c3": frozen[3]})
    hold = nbd.NBD()
    hold.set_export_name("@c1")
    hold.connect_unix(p.sock)
    t.is_(release_answer(p, "c1"), (0, ["released=c1", "connections=1", "layers-merged=1"]),
          "exact: release of the oldest, c1, with a connection open: its layer merged into the next")
    t.ok(not os.path.exists(ov + "@c1") and sorted(listed(p)) == ["c2", "c3"],
         "exact: c1's file is gone, c2 and c3 stay listed")
    t.ok(read_all(hold, SIZE) == frozen[1], "exact: the connection open on @c1 still reads it whole, unchanged")
    hold.shutdown()
    t.ok(read_export(p, "@c2") == frozen[2] and read_export(p, "@c3") == frozen[3],
         "exact: @c2 (which took c1's layer in) and @c3 read as before")
    t.is_(release_answer(p, "c3"), (0, ["released=c3", "connections=1", "layers-merged=1"]),
          "exact: release of the newest, c3, a reader on it: merged into the live overlay")
    t.ok(not os.path.exists(ov + "@c3") and sorted(listed(p)) == ["c2"] and read_export(p, "@c2") == frozen[2],
         "exact: c3's file is gone; @c2 reads as before")
    t.is_(release_answer(p, "c2"), (0, ["released=c2", "connections=1", "layers-merged=1"]),
          "exact: release of the last, c2")
    t.ok(not glob.glob(ov + "@*") and listed(p) == {}, "exact: no checkpoint file is left, none listed")
    t.ok(readers.finish(), "exact: %d random reads of @c2 and @c3 across the releases all read as taken%s"
         % (readers.reads, " (%s)" % (readers.failure or readers.wrong[:5]) if readers.failure or readers.wrong
            else ""))
    t.ok(writer.finish(), "exact: the writer ran without error through three checkpoints and three releases "
         "(%d writes)" % len(writer.log))
    log = writer.log
    t.ok(all(w.error == 0 for w in log), "exact: every write succeeded")

    previous_in = set()
    for n, rc, lines, err, sent, returned in taken:
        image, known_in, uncertain = state_at(log, sent, returned, base_bytes)
        inside = set(id(w) for w in known_in)
        unresolved = []
        n_multi = 0
        for group in components(uncertain):
            n_multi += len(group) > 1
            chosen = resolve(group, image, frozen[n])
            if chosen is None:
                unresolved.append(group)
                continue
            for w in chosen:
                inside.add(id(w))
        # Applied in send order: writes to the same byte are ordered by it.
        image = bytearray(base_bytes)
        for w in log:
            if id(w) in inside:
                image[w.offset:w.end()] = w.data
        if not t.ok(not unresolved, "exact c%d: each of the %d writes in flight across the checkpoint is "
                    "wholly in or wholly out (%d in; %d groups of overlapping ones)"
                    % (n, len(uncertain), sum(1 for w in uncertain if id(w) in inside), n_multi)):
            for group in unresolved[:3]:
                for w in group:
                    t.diag(describe_write(w, frozen[n], image))
        why = first_difference(frozen[n], bytes(image), log)
        if not t.ok(why is None, "exact c%d: @c%d is the disk at the checkpoint: the %d writes acknowledged "
                    "before the command was sent are in, the %d sent after it returned are out"
                    % (n, n, len(known_in), sum(1 for w in log if w.sent >= returned))):
            t.diag(why)
        ins = [w for w in log if id(w) in inside]
        outs = [w for w in log if id(w) not in inside]
        t.ok(max((w.sent for w in ins), default=0) < min((w.acked for w in outs), default=float("inf")),
             "exact c%d: one instant parts the writes: every write in was sent before every write out was "
             "acknowledged" % n)
        epoch = [w for w in ins if id(w) not in previous_in]
        covers(ended[n], union_granules(epoch), "exact c%d: qemu:dirty-bitmap:%s on @c%d holds each of the %d "
               "writes of its epoch" % (n, "b1" if n == 1 else "c%d" % (n - 1), n, len(epoch)))
        covers(b2_at[n], union_granules(ins), "exact c%d: qemu:dirty-bitmap:b2 on @c%d holds each of the %d "
               "writes before it" % (n, n, len(ins)))
        previous_in = inside
    after = [w for w in log if id(w) not in previous_in]
    covers(bitmap_granules(p, "", "c3"), union_granules(after),
           "exact: qemu:dirty-bitmap:c3 on the live export holds each of the %d writes after c3" % len(after))
    covers(bitmap_granules(p, "", "b2"), union_granules(log),
           "exact: b2, carried over at each checkpoint, holds every write on the live export")
    meta = run(["nbdinfo", "--json", uri_of(p)]).stdout
    t.ok('"qemu:dirty-bitmap:c3"' in meta and '"qemu:dirty-bitmap:b2"' in meta and
         '"qemu:dirty-bitmap:b1"' not in meta and '"qemu:dirty-bitmap:c2"' not in meta,
         "exact: the live export offers c3 and b2, not the ended bitmaps")
    image = bytearray(base_bytes)
    for w in log:
        image[w.offset:w.end()] = w.data
    why = first_difference(read_export(p, ""), bytes(image), log)
    if not t.ok(why is None, "exact: the live disk holds every write, after the three releases"):
        t.diag(why)
    t.stop(p)
    check_clean(t, ov, "exact: qemu-img check of the overlay after a clean stop: no errors, no leak")
    t.is_(sorted(bitmaps_in_file(ov)), ["b2", "c3"], "exact: qemu-img info lists the bitmaps b2 and c3")


# ---- 2. the backup cycle from the page -----------------------------------------------------
def page_script():
    with open(os.path.join(PAGE_DIR, PLUGIN + ".md")) as f:
        page = f.read()
    section = page.split("\n## Live checkpoints", 1)
    m = re.search(r"```sh\n(.*?)```", section[1], re.S) if len(section) == 2 else None
    return m.group(1) if m else None


def cycle():
    script = page_script()
    t.ok(script is not None, "cycle: the page's section 'Live checkpoints' holds the cycle's script")
    with open(os.path.join(PAGE_DIR, "backup-cycle.sh")) as f:
        shipped = f.read()
    t.ok(script is not None and shipped.endswith(script),
         "cycle: backup-cycle.sh beside the page is the page's script")
    workdir = os.path.join(tmp, "cycle")
    os.mkdir(workdir)
    path = os.path.join(workdir, "backup-cycle.sh")
    with open(path, "w") as f:
        f.write(script or "exit 1\n")
    os.symlink(os.path.join(PAGE_DIR, "incremental-backup.py"), os.path.join(workdir, "incremental-backup.py"))
    ov = os.path.join(tmp, "cycle.qcow2")
    ctlpath = os.path.join(tmp, "cycle.ctl")
    p = start("cycle", ctlpath, "base=" + BASE, "overlay=" + ov, "bitmap=start")
    writer = Writer(p, 2, "cycle", keep_data=False)
    backup = os.path.join(tmp, "backup")
    time.sleep(0.3)
    for n in range(ROUNDS + 1):
        r = run(["bash", path, ctlpath, p.sock, backup, str(n)])
        if not t.ok(r.returncode == 0, "cycle round %d: the script ran" % n):
            t.diag(r.stdout + r.stderr)
        frozen = read_export(p, "@c%d" % n)
        try:
            with open("%s.%d" % (backup, n), "rb") as f:
                mine = f.read()
        except OSError:
            mine = b""
        t.ok(mine == frozen, "cycle round %d: %s equals @c%d read whole" %
             (n, "the full backup" if n == 0 else "the full backup plus %d incremental ones" % n, n))
        if n > 0:
            t.ok(list(listed(p)) == ["c%d" % n] and glob.glob(ov + "@*") == [ov + "@c%d" % n],
                 "cycle round %d: c%d released and its file gone; c%d stays" % (n, n - 1, n))
            files_ok("cycle round %d" % n, glob.glob(ov + "@*"))
        time.sleep(0.2)
    t.ok(writer.finish(), "cycle: the writer ran throughout without error (%d writes)" % len(writer.log))
    rc, *_ = ctl(p, "dirty-bitmap-overlay.release", "name=c%d" % ROUNDS)
    live = read_export(p, "")
    t.stop(p)
    check_clean(t, ov, "cycle: qemu-img check of the overlay after the last release and a clean stop")
    p = start("cycle", ctlpath, "base=" + BASE, "overlay=" + ov, "bitmap=start")
    t.ok(rc == 0 and read_export(p, "") == live and listed(p) == {} and not glob.glob(ov + "@*"),
         "cycle: after the last release and a restart, the live disk is the same, no checkpoint left")
    t.stop(p)


# ---- 3. kill -9 between the steps ------------------------------------------------------
CRASH_SIZE = 48 * M
BULK = 16 * M  # written before each checkpoint, alternately at 16M and 32M
STRACE = shutil.which("strace")


def stalled(p, path, syscall, how, command, ready):
    """Runs COMMAND on P's control socket with strace holding the first
    SYSCALL that names PATH (how: delay_enter, before it runs, or
    delay_exit, after) for 60 s; returns once READY() says the server's
    thread is held there (or after 60 s), the strace process and the
    control socket to close after the kill."""
    out = os.path.join(tmp, "strace.out")
    st = subprocess.Popen([STRACE, "-f", "-P", path, "-e", "trace=" + syscall, "-e",
                           "inject=%s:%s=60000000:when=1" % (syscall, how), "-o", out, "-p", str(p.pid)],
                          stderr=subprocess.PIPE, text=True)
    st.stderr.readline()  # "Process N attached with M threads"
    s = raw_command(p, command)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ready(out):
        time.sleep(0.002)
    return st, s


def entered(syscall):
    def ready(out):
        try:
            with open(out) as f:
                return syscall + "(" in f.read()
        except OSError:
            return False
    return ready


def crash_cycle():
    """The cycle's steps one by one (the commands of the page's script),
    with kill -9 between them and inside them.  The writer writes the
    first 16M; before each checkpoint a bulk write fills one of two 16M
    areas beyond, in turn, so that a release has 16M to merge."""
    base = os.path.join(tmp, "crash-base.raw")
    with open(base, "wb") as f:
        f.write(base_bytes)
        f.truncate(CRASH_SIZE)
    # The overlay in a directory of its own; files of the same names as
    # its checkpoints' in the directory above must stay untouched.
    os.mkdir(os.path.join(tmp, "crashdir"))
    ov = os.path.join(tmp, "crashdir", "crash.qcow2")
    decoys = [os.path.join(tmp, "crash.qcow2" + x) for x in ("@c6", "@c8", ".new")]
    for d in decoys:
        with open(d, "w") as f:
            f.write("not the overlay's\n")
    ctlpath = os.path.join(tmp, "crash.ctl")
    params = ("base=" + base, "overlay=" + ov, "bitmap=start", "bitmap=keep")
    backup = os.path.join(tmp, "cbackup")
    state = {"p": start("crash", ctlpath, *params), "writer": None, "kills": 0, "writers": []}
    frozen = {}

    def writer_on():
        state["writer"] = Writer(state["p"], 100 + state["kills"], "crash", keep_data=False)
        state["writers"].append(state["writer"])
        time.sleep(0.1)

    def bulk(n):
        h = nbd.NBD()
        h.connect_unix(state["p"].sock)
        area = 16 * M + (n % 2) * BULK
        for off in range(0, BULK, 4 * M):
            h.pwrite(os.urandom(4 * M), area + off)
        h.shutdown()

    def kill_and_restart(label, extra=()):
        """kill -9 (then EXTRA: a control socket to close, a strace to
        end); qemu-img check and info of every file; restart with the same
        command line: the live export records into the newest
        checkpoint's bitmap, and no file is left that is not a listed
        checkpoint."""
        os.kill(state["p"].pid, signal.SIGKILL)
        for x in extra:
            if isinstance(x, subprocess.Popen):
                x.kill()
                x.wait()
            else:
                x.close()
        t.stop(state["p"], sig=signal.SIGKILL)
        state["writer"].finish()
        state["kills"] += 1
        files = [ov] + sorted(glob.glob(ov + "@*"), key=lambda f: int(f.rsplit("@c", 1)[1]))
        files_ok("crash " + label, files)
        # The chain as qemu-img follows it: OV, then each checkpoint's layer.
        chain = run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", ov]).stdout
        try:
            chain = [layer["filename"] for layer in json.loads(chain) if layer["filename"] != base]
        except ValueError:
            chain = [ov]
        bitmaps = {os.path.basename(f): sorted(bitmaps_in_file(f)) for f in chain}
        newest = chain[1].rsplit("@", 1)[1] if len(chain) > 1 else "?"
        want = {os.path.basename(ov): sorted(["keep", newest])}
        for f in chain[1:]:
            k = int(f.rsplit("@c", 1)[1])
            want[os.path.basename(f)] = sorted(["keep", "start" if k == 0 else "c%d" % (k - 1)])
        if not t.ok(bitmaps == want, "crash %s: qemu-img info lists the bitmaps of every file of the chain"
                    % label):
            t.diag("got:  %s\nwant: %s" % (bitmaps, want))
        state["p"] = start("crash", ctlpath, *params)
        writer_on()
        found = still_listed()
        rc, lines, *_ = ctl(state["p"], "dirty-bitmap-overlay.checkpoints")
        meta = run(["nbdinfo", "--json", uri_of(state["p"])]).stdout
        t.ok(found and field(lines, "recording-bitmap") == found[-1] and
             '"qemu:dirty-bitmap:%s"' % found[-1] in meta and '"qemu:dirty-bitmap:keep"' in meta,
             "crash %s: after the restart the live export records into %s (the newest checkpoint's) and keep"
             % (label, found[-1] if found else "?"))
        left = sorted(set(glob.glob(ov + "@*") + glob.glob(ov + ".new")) - set(ov + "@" + c for c in found))
        if not t.ok(not left, "crash %s: after the restart no file is left but the listed checkpoints'"
                    % label):
            t.diag("left: %s (listed: %s)" % (left, found))
        return files

    def checkpoint(n):
        bulk(n)
        rc, *_ = ctl(state["p"], "dirty-bitmap-overlay.checkpoint", "name=c%d" % n)
        frozen[n] = read_export(state["p"], "@c%d" % n)
        return rc == 0

    def incremental(n):
        shutil.copyfile("%s.%d" % (backup, n - 1), "%s.%d" % (backup, n))
        r = run(["/usr/bin/python3", os.path.join(PAGE_DIR, "incremental-backup.py"), state["p"].sock,
                 "c%d" % (n - 1), "%s.%d" % (backup, n), "@c%d" % n])
        if r.returncode != 0:
            t.diag(r.stderr.strip())
        return r.returncode == 0

    def release(name):
        return ctl(state["p"], "dirty-bitmap-overlay.release", "name=" + name)[0] == 0

    def exact(n, label):
        with open("%s.%d" % (backup, n), "rb") as f:
            mine = f.read()
        now = read_export(state["p"], "@c%d" % n)
        t.ok(mine == frozen[n] and now == frozen[n], "crash %s: @c%d reads as before, and the backup "
             "equals it" % (label, n))

    def still_listed():
        return sorted(listed(state["p"]), key=lambda c: int(c[1:]))

    def release_phase(prev, files, ok):
        """After a kill in the release of PREV: where it landed; finishes it."""
        if prev in still_listed():
            return "before the release was recorded", ok and release(prev)
        if ov + "@" + prev in files:
            return "after the release was recorded, its file still there (the restart finished it)", ok
        return "after the release", ok

    writer_on()
    ok = checkpoint(0)
    r = run(["nbdcopy", uri_of(state["p"], "@c0"), backup + ".0"])
    t.ok(ok and r.returncode == 0, "crash: checkpoint c0 and the full backup")

    label = "after checkpoint c1"
    ok = checkpoint(1)
    kill_and_restart(label)
    t.is_(still_listed(), ["c0", "c1"], "crash %s: c0 and c1 are found again" % label)
    t.ok(ok and incremental(1) and release("c0"), "crash %s: the cycle goes on" % label)
    exact(1, label)

    label = "after the copy of c2"
    ok = checkpoint(2) and incremental(2)
    kill_and_restart(label)
    found = still_listed()
    s = raw_command(state["p"], "dirty-bitmap-overlay.release name=c1")
    began = time.monotonic()
    answer = answer_of(s)
    took = time.monotonic() - began
    s.close()
    t.ok(ok and found == ["c1", "c2"] and answer.endswith("ok\n"), "crash %s: c1 is found again and "
         "released (in %.1f ms)" % (label, took * 1000))
    exact(2, label)

    # Killed in the release of the previous checkpoint, at fractions of
    # the time the last one took (where each lands is told, not required).
    for n, fraction in ((3, 0.2), (4, 0.4), (5, 0.6), (6, 0.8)):
        ok = checkpoint(n) and incremental(n)
        prev = "c%d" % (n - 1)
        label = "in the release of %s (after %.1f ms)" % (prev, fraction * took * 1000)
        s = raw_command(state["p"], "dirty-bitmap-overlay.release name=" + prev)
        time.sleep(fraction * took)
        files = kill_and_restart(label, [s])
        phase, ok = release_phase(prev, files, ok)
        t.ok(ok and still_listed() == ["c%d" % n] and not os.path.exists(ov + "@" + prev),
             "crash %s: landed %s; the release is done" % (label, phase))
        exact(n, label)

    # Killed in the release of c6, held (strace) just before deleting its
    # file: merged, the layer above pointing past it.
    n = 7
    ok = checkpoint(n) and incremental(n)
    label = "in the release of c6, before its file is deleted"
    if STRACE:
        st, s = stalled(state["p"], ov + "@c6", "unlink", "delay_enter",
                        "dirty-bitmap-overlay.release name=c6", entered("unlink"))
        files = kill_and_restart(label, [s, st])
        phase, ok = release_phase("c6", files, ok)
        if not t.ok(ok and still_listed() == ["c7"] and not os.path.exists(ov + "@c6"),
                    "crash %s: landed %s; the release is done" % (label, phase)):
            t.diag("listed: %s; %s exists: %s" % (still_listed(), ov + "@c6", os.path.exists(ov + "@c6")))
    else:
        for _ in range(5):
            t.skip("strace is not installed: " + label)
        ok = ok and release("c6")
    exact(n, label)

    # Killed in the checkpoint, held (strace) after the link to OV@cN is
    # made, then after the new overlay is renamed over OV.
    for n, syscall, path, what in ((8, "link", ov + "@c8", "after the link OV@c8 is made"),
                                   (9, "rename", ov, "after the new overlay is renamed over OV")):
        bulk(n)
        label = "in checkpoint c%d, %s" % (n, what)
        before = ["c%d" % (n - 1)]
        if STRACE:
            inode = os.stat(ov).st_ino
            if syscall == "link":
                ready = lambda out: os.path.exists(ov + "@c8")
            else:
                ready = lambda out, i=inode: os.stat(ov).st_ino != i
            st, s = stalled(state["p"], path, syscall, "delay_exit",
                            "dirty-bitmap-overlay.checkpoint name=c%d" % n, ready)
            kill_and_restart(label, [s, st])
            found = still_listed()
            t.ok(found in (before, before + ["c%d" % n]), "crash %s: landed %s the switch; the checkpoint is "
                 "whole or absent (%s)" % (label, "before" if found == before else "after", found))
        else:
            for _ in range(5):
                t.skip("strace is not installed: " + label)
            found = before
        if found == before:
            rc, lines, err, *_ = ctl(state["p"], "dirty-bitmap-overlay.checkpoint", "name=c%d" % n)
            ok = rc == 0
            if not ok and os.path.exists(ov + "@c%d" % n):
                # So that the checks after this one still run: remove the
                # leftover by hand and take the checkpoint again.
                t.diag("checkpoint c%d refused after the restart (%s); removing the leftover %s by hand"
                       % (n, err, ov + "@c%d" % n))
                os.unlink(ov + "@c%d" % n)
                ctl(state["p"], "dirty-bitmap-overlay.checkpoint", "name=c%d" % n)
        else:
            ok = True
        frozen[n] = read_export(state["p"], "@c%d" % n)
        copied = incremental(n)
        released = release("c%d" % (n - 1))
        t.ok(ok and copied and released, "crash %s: the cycle goes on" % label)
        exact(n, label)

    n = 10
    ok = checkpoint(n) and incremental(n) and release("c%d" % (n - 1))
    t.ok(ok, "crash: one more round after the kills: checkpoint c10, its incremental copy from bitmap c9, "
         "release c9")
    exact(n, "after the kills")
    t.ok(state["writer"].finish(), "crash: the last writer ran without error")
    # keep was carried over at every checkpoint, across every crash.
    acked = [w for x in state["writers"] for w in x.log if w.acked is not None and w.error == 0]
    need = union_granules(acked) | set(range(16 * M // G, CRASH_SIZE // G))
    covers(bitmap_granules(state["p"], "", "keep"), need, "crash: bitmap keep holds every acknowledged write "
           "of the %d writers and the bulk writes, across %d kills" % (len(state["writers"]), state["kills"]))
    t.ok(release("c%d" % n), "crash: the last checkpoint released")
    t.stop(state["p"])
    check_no_errors(t, ov, "crash: qemu-img check of the overlay at the end")
    t.is_(glob.glob(ov + "@*") + glob.glob(ov + ".new"), [], "crash: no checkpoint file is left")
    t.is_([d for d in decoys if os.path.exists(d)], decoys, "crash: the files named like the overlay's "
          "checkpoints in the directory above are untouched")


# ---- 4. refusals ------------------------------------------------------------------------
def refusals():
    ov = os.path.join(tmp, "refuse.qcow2")
    ctlpath = os.path.join(tmp, "refuse.ctl")
    p = start("refuse", ctlpath, "base=" + BASE, "overlay=" + ov, "bitmap=b1", "bitmap=b2")
    t.is_(ctl(p, "dirty-bitmap-overlay.checkpoint", "name=c1")[0], 0, "refuse: checkpoint c1 taken")
    files = sorted(os.listdir(tmp))
    for words, what, message in (
            (["checkpoint", "name=c1"], "a checkpoint's name in use", "already"),
            (["checkpoint", "name=b2"], "a bitmap's name in use", "already"),
            (["checkpoint", "name=c1.x/y"], "a name with a slash", "name=NAME"),
            (["checkpoint", "name=.hidden"], "a name starting with a dot", "name=NAME"),
            (["checkpoint", "name="], "an empty name", "name=NAME"),
            (["checkpoint", "name=" + "x" * 65], "a name of 65 bytes", "name=NAME"),
            (["checkpoint", "name=caf\u00e9"], "a name out of [A-Za-z0-9._-]", "name=NAME"),
            (["checkpoint"], "no name=", "name=NAME"),
            (["release", "name=nope"], "release of an unknown name", "no checkpoint"),
            (["release"], "release without a name", "no checkpoint")):
        rc, lines, err, *_ = ctl(p, *(["dirty-bitmap-overlay." + words[0]] + words[1:]))
        if not t.ok(rc != 0 and message in err, "refuse: %s (%s)" % (what, err)):
            t.diag("exit %d, %s" % (rc, lines))
    t.ok(sorted(os.listdir(tmp)) == files and sorted(listed(p)) == ["c1"],
         "refuse: the refusals left no file and no checkpoint")
    # @c1 is read-only; the server refuses writes itself.
    h = t.connect(uri_of(p, "@c1"), strict=False)
    t.ok(h.is_read_only(), "refuse: @c1 is advertised read-only")
    t.is_(nbdtest.errno_of(lambda: h.pwrite(b"x" * 4096, 0)), "EPERM", "refuse: a write to @c1 gets EPERM")
    t.is_(nbdtest.errno_of(lambda: h.zero(4096, 0)), "EPERM", "refuse: a zero to @c1 gets EPERM")
    t.is_(nbdtest.errno_of(lambda: h.trim(4096, 0)), "EPERM", "refuse: a trim of @c1 gets EPERM")
    t.ok(read_all(h, SIZE) == bytes(base_bytes), "refuse: @c1 still reads as the disk at c1")
    t.is_(nbdtest.errno_of(lambda: t.connect(uri_of(p, "@nope"))), "ENOENT",
          "refuse: an export @NAME that no checkpoint has is refused")
    # A connection open across the release keeps reading; a new one is refused.
    live = t.connect(uri_of(p))
    live.pwrite(b"n" * 65536, 0)
    t.is_(listed(p)["c1"]["connections"], 1, "refuse: the checkpoints command counts the connection on @c1")
    rc, lines, err, *_ = ctl(p, "dirty-bitmap-overlay.release", "name=c1")
    t.is_((rc, lines[:2]), (0, ["released=c1", "connections=1"]), "refuse: release c1 with a connection open")
    t.ok(read_all(h, SIZE) == bytes(base_bytes), "refuse: the open connection to @c1 still reads the disk at c1")
    t.ok("@c1" not in run(["nbdinfo", "--list", "--json", uri_of(p)]).stdout and
         nbdtest.errno_of(lambda: t.connect(uri_of(p, "@c1"))) != "no error",
         "refuse: @c1 is no longer listed, a new connection to it is refused")
    h.shutdown()
    t.ok(live.pread(65536, 0) == b"n" * 65536 and live.pread(65536, 65536) == bytes(base_bytes[65536:131072]),
         "refuse: the live disk is unchanged")
    live.shutdown()
    rc, lines, err, *_ = ctl(p, "dirty-bitmap-overlay.release", "name=c1")
    t.ok(rc != 0, "refuse: a second release of c1 is refused")
    t.stop(p)
    # A server without any bitmap.
    p = start("nobitmap", os.path.join(tmp, "nobitmap.ctl"), "base=" + BASE,
              "overlay=" + os.path.join(tmp, "nobitmap.qcow2"))
    rc, lines, err, *_ = ctl(p, "dirty-bitmap-overlay.checkpoint", "name=c1")
    t.ok(rc != 0 and "bitmap" in err and not glob.glob(os.path.join(tmp, "nobitmap.qcow2@*")),
         "refuse: a checkpoint on a server without bitmap= (%s)" % err)
    t.stop(p)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def figures():
    """Diagnostics: the writes-held-us answers, and the writers' latency
    (time from sending a write to its completion, as the client sees it)
    for the writes in flight during a checkpoint command, during a
    release, and the others."""
    if held_us:
        t.diag("writes-held-us over %d checkpoints: p50 %d, max %d" %
               (len(held_us), statistics.median(held_us), max(held_us)))

    def overlaps(w, kind):
        return any(w.sent <= r and w.acked >= s for s, r in windows[kind])
    for label, writes in sorted(all_writes.items()):
        writes = [w for w in writes if w.acked is not None]
        during = [w.acked - w.sent for w in writes if overlaps(w, "checkpoint")]
        releasing = [w.acked - w.sent for w in writes if overlaps(w, "release") and not overlaps(w, "checkpoint")]
        away = [w.acked - w.sent for w in writes if not overlaps(w, "checkpoint") and not overlaps(w, "release")]
        t.diag("%s writer, latency in us (writes, p50, p99, max): " % label + "; ".join(
            "%s %d %.0f %.0f %.0f" % (what, len(lat), percentile(lat, 0.5) * 1e6, percentile(lat, 0.99) * 1e6,
                                      max(lat, default=float("nan")) * 1e6)
            for what, lat in (("during a checkpoint", during), ("during a release", releasing),
                              ("away from both", away))))


took = []
for part in (exactness, cycle, crash_cycle, refusals):
    began = time.monotonic()
    part()
    took.append("%s %.1f s" % (part.__name__, time.monotonic() - began))
figures()
t.diag("time taken: " + ", ".join(took))
t.finish()
