#!/usr/bin/python3
"""nbdserve benchmark: the same workloads against nbdserve, nbdkit and
qemu-nbd, in alternation (A B C A B C ...), one warm-up round and then
ROUNDS measured rounds.  Reports median and spread per server and the
ratio nbdserve / best peer, computed per round, then its median.

    make bench                 full run (about 35 minutes), writes docs/performance.md
    BENCH_QUICK=1 make bench   2 rounds, no warm-up, small sizes, a few minutes
    BENCH_SMOKE=1 bench/bench.py  nbdserve only, tiny sizes, a few seconds (used by make check)

Environment: ROUNDS (default 5), FIO_SECONDS (default 10), BENCH_OUT (output directory; default
docs/, or a temporary directory under BENCH_SMOKE), BENCH_ONLY (comma
separated measurement names: seq-read, qd1, multi-conn, tls-multi-conn,
loops-read, qcow2-read, idle, rbd-read...: the first element of each MEASUREMENTS entry),
BENCH_QEMU_AIO (qemu-nbd's --aio for the qcow2 rows; default threads).
"""
# SPDX-License-Identifier: BSD-3-Clause
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NBDSERVE = os.path.join(TOP, "nbdserve")
ENV = os.environ
SMOKE = ENV.get("BENCH_SMOKE") == "1"
QUICK = ENV.get("BENCH_QUICK") == "1"

if SMOKE:
    ROUNDS, WARMUP, SIZE, FIO_SECONDS, IDLE_CONNS = 1, 0, 16 << 20, 1, 50
elif QUICK:
    ROUNDS, WARMUP, SIZE, FIO_SECONDS, IDLE_CONNS = 2, 0, 64 << 20, 1, 500
else:
    ROUNDS, WARMUP, SIZE, FIO_SECONDS, IDLE_CONNS = 5, 1, 1 << 30, 10, 1000
ROUNDS = int(ENV.get("ROUNDS", ROUNDS))
FIO_SECONDS = int(ENV.get("FIO_SECONDS", FIO_SECONDS))
# nbdcopy's threads take the disk in pieces of 128 MiB, one at a time: on
# a disk of fewer pieces than connections some connections carry nothing
# (a 64 MiB disk is all read over one).  The 4-connection rows therefore
# read at least 4 pieces, one per connection in a quick run.  A smoke run
# only checks that the rows work, and keeps its tiny disk.
NBDCOPY_PIECE = 128 << 20
MULTI_SIZE = SIZE if SMOKE else max(SIZE, 4 * NBDCOPY_PIECE)

SERVERS = ["nbdserve", "nbdkit", "qemu-nbd"]
if SMOKE:
    SERVERS = ["nbdserve"]

# The CPUs this process may use: nbdserve's default number of connection
# loops, and the larger side of the --loops scaling table.
CPUS = len(os.sched_getaffinity(0))


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---- Servers -----------------------------------------------------------------

# The qcow2 backends serve an image made once per run by make_images(),
# read-only; nbdkit 1.32 has no qcow2 reader, so only these servers
# take part in their rows.
QCOW2_IMAGES = {"qcow2": "plain.qcow2", "qcow2-zstd": "zstd.qcow2"}
QCOW2_SERVERS = ("nbdserve", "qemu-nbd")
# The "overlay" backend: a fresh writable qcow2 overlay over a sparse raw
# base, with a bitmap recording every write: nbdserve's
# dirty-bitmap-overlay, and qemu-nbd -f qcow2 on an overlay made by
# qemu-img (backing file, bitmap b1 added); nbdkit has no qcow2 writer.
OVERLAY_SERVERS = ("nbdserve", "qemu-nbd")


def serves(kind, backend):
    if backend == "overlay":
        return kind in OVERLAY_SERVERS
    return backend not in QCOW2_IMAGES or kind in QCOW2_SERVERS


class Server:
    """One server process serving BACKEND (memory, file, or one of the
    QCOW2_IMAGES) over a Unix socket or TCP, optionally with TLS-PSK."""

    def __init__(self, work, kind, backend, tcp=False, tls=False, loops=None, size=SIZE,
                 chain=None, control=False):
        self.kind, self.backend, self.tcp, self.tls = kind, backend, tcp, tls
        self.size = size  # of a memory or file disk; a qcow2 image has SIZE
        self.loops = loops  # nbdserve's --loops; None leaves its default
        self.control = os.path.join(work, "ctl") if control else None  # nbdserve's --control
        self.work = work
        self.sock = os.path.join(work, "%s.sock" % kind)
        self.port = free_port() if tcp else None
        self.qcow2 = backend in QCOW2_IMAGES
        self.overlay = backend == "overlay"
        self.base = os.path.join(work, "overlay-base.img")
        if self.qcow2:
            self.disk = os.path.join(work, QCOW2_IMAGES[backend])
        elif self.overlay:
            self.disk = os.path.join(work, "overlay.qcow2")
        else:
            self.disk = os.path.join(work, "disk.img")
        self.chain = chain  # filters over the plugin, by server: see with_filters()
        self.proc = None

    def command(self):
        size = str(self.size)
        if self.kind == "nbdserve":
            cmd = [NBDSERVE, "-f"]
            if self.loops is not None:
                cmd.append("--loops=%d" % self.loops)
            if self.control:
                cmd.append("--control=" + self.control)
            cmd += ["-i", "127.0.0.1", "-p", str(self.port)] if self.tcp else ["-U", self.sock]
            if self.tls:
                cmd += ["--tls=require", "--tls-psk=" + psk_file(self.work)]
            if self.qcow2:
                cmd += ["qcow2-readonly", "file=" + self.disk]
            elif self.overlay:
                cmd += ["dirty-bitmap-overlay", "base=" + self.base, "overlay=" + self.disk,
                        "bitmap=b1"]
            elif self.backend == "memory":
                cmd += ["memory", "size=" + size]
            else:
                cmd += ["file", "file=" + self.disk]
        elif self.kind == "nbdkit":
            assert not self.qcow2, "nbdkit 1.32 has no qcow2 reader"
            cmd = ["nbdkit", "-f"]
            cmd += ["-i", "127.0.0.1", "-p", str(self.port)] if self.tcp else ["-U", self.sock]
            if self.tls:
                cmd += ["--tls=require", "--tls-psk=" + psk_file(self.work)]
            cmd += ["memory", size] if self.backend == "memory" else ["file", self.disk]
        elif self.overlay:
            cmd = ["qemu-nbd", "-f", "qcow2", "-t", "-e", "2000", "--cache=writeback",
                   "--aio=" + QEMU_QCOW2_AIO, "-k", self.sock, self.disk]
        elif self.qcow2:
            # -t and -e: persistent, several clients, as in the raw rows.
            # --cache=writeback (qemu's default, spelt out): reads go
            # through the page cache with plain preads, as nbdserve's do;
            # "none" asks for O_DIRECT, which on tmpfs still copies from
            # the same page cache, with alignment rules on top.  The L2
            # cache needs no option: qemu 7.2 sizes it to cover the whole
            # image (up to 32 MiB of L2 tables), as nbdserve's default
            # l2-cache-size=32M does.  --aio: see QEMU_QCOW2_AIO.
            cmd = ["qemu-nbd", "-r", "-f", "qcow2", "-t", "-e", "2000", "--cache=writeback",
                   "--aio=" + QEMU_QCOW2_AIO, "-k", self.sock, self.disk]
        else:
            # qemu-nbd has no RAM disk: "memory" rows serve a file in /dev/shm.
            cmd = ["qemu-nbd", "-f", "raw", "-t", "-e", "2000", "--cache=writeback"]
            cmd += ["-b", "127.0.0.1", "-p", str(self.port)] if self.tcp else ["-k", self.sock]
            if self.tls:
                cmd += ["--object", "tls-creds-psk,id=tls0,endpoint=server,dir=" + self.work,
                        "--tls-creds", "tls0"]
            cmd += [self.disk]
        return with_filters(self, cmd)

    def uri(self):
        scheme = "nbds" if self.tls else "nbd"
        user = "bench@" if self.tls else ""
        query = "tls-psk-file=" + psk_file(self.work) if self.tls else ""
        if self.tcp:
            return "%s://%s127.0.0.1:%d/%s" % (scheme, user, self.port, "?" + query if query else "")
        return "%s+unix://%s/?socket=%s%s" % (scheme, user, self.sock, "&" + query if query else "")

    def start(self):
        if self.overlay:
            self.make_overlay()
        elif not self.qcow2 and (self.kind == "qemu-nbd" or self.backend == "file"):
            make_disk(self.disk, self.size)
        self.log = open(os.path.join(self.work, self.kind + ".log"), "w")
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited: %s" % (self.kind, open(self.log.name).read()))
            if self.ready():
                return self
            time.sleep(0.02)
        raise RuntimeError("%s did not start" % self.kind)

    def make_overlay(self):
        """A sparse base of SIZE bytes, and for qemu-nbd a fresh overlay
        made by qemu-img with bitmap b1 (nbdserve creates its own)."""
        if not os.path.exists(self.base):
            make_disk(self.base, self.size)
        if os.path.exists(self.disk):
            os.unlink(self.disk)
        if self.kind == "qemu-nbd":
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.base, "-F", "raw",
                 "-o", "cluster_size=64k", self.disk])
            run(["qemu-img", "bitmap", "--add", self.disk, "b1"])

    def ready(self):
        try:
            if self.tcp:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=1)
            else:
                if not os.path.exists(self.sock):
                    return False
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(1)
                s.connect(self.sock)
            ok = s.recv(8) == b"NBDMAGIC"
            s.close()
            return ok
        except OSError:
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        # A qcow2 image outlives the server: it is made once per run.
        for path in (self.sock,) if self.qcow2 else (self.sock, self.disk):
            if os.path.exists(path):
                os.unlink(path)

    def cpu_seconds(self):
        """User and system time of the server so far, all threads."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def loop_cpu_seconds(self):
        """User and system time of each of nbdserve's connection loop
        threads so far, by thread name (loop-0, loop-1...)."""
        tick = os.sysconf("SC_CLK_TCK")
        per_thread = {}
        task_dir = "/proc/%d/task" % self.proc.pid
        for tid in os.listdir(task_dir):
            try:
                with open(os.path.join(task_dir, tid, "stat")) as f:
                    stat = f.read()
            except FileNotFoundError:  # a thread that just ended
                continue
            # The name sits in parentheses and may hold spaces: split after it.
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            if name.startswith("loop-"):
                per_thread[name] = (int(fields[11]) + int(fields[12])) / tick
        return per_thread

    def rss_kib(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


# Backends served by a Server class of their own (the rbd block below).
SERVER_CLASSES = {}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_disk(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


def data_file(work, size):
    """The random data file of SIZE bytes, written through the servers:
    data.bin, made at the start, or a larger one made the first time a
    row needs it."""
    if size == SIZE:
        return os.path.join(work, "data.bin")
    path = os.path.join(work, "data-%dM.bin" % (size >> 20))
    if not os.path.exists(path):
        with open(path + ".new", "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        os.rename(path + ".new", path)
    return path


def psk_file(work):
    return os.path.join(work, "keys.psk")


# qemu-nbd's --aio for the qcow2 rows.  "threads" is qemu's default,
# the one the raw rows get too; "native" needs O_DIRECT (--cache=none),
# and io_uring, tried against threads on these images (sequential and
# 4K random reads, 1 GiB, /dev/shm, alternated runs on a busy 2-CPU
# machine), was no faster: reads from tmpfs never wait, so there is
# little for it to save.  BENCH_QEMU_AIO=io_uring reruns the rows with it.
QEMU_QCOW2_AIO = ENV.get("BENCH_QEMU_AIO", "threads")
IMAGE_MIB = {}  # file size of each image made, for the report


def make_images(work, backends):
    """The qcow2 images, SIZE bytes of virtual disk each, made once per
    run with qemu-img, so both servers read what qemu itself wrote."""
    for backend in sorted(backends & set(QCOW2_IMAGES)):
        image = os.path.join(work, QCOW2_IMAGES[backend])
        start = time.monotonic()
        if backend == "qcow2":
            # The random data file: every cluster is allocated and holds
            # data (convert leaves all-zero clusters unallocated).
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                 os.path.join(work, "data.bin"), image])
        else:
            source = os.path.join(work, "text.bin")
            make_text(source)
            try:
                run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
                     "-o", "compression_type=zstd", source, image])
            finally:
                os.unlink(source)
        IMAGE_MIB[QCOW2_IMAGES[backend]] = os.path.getsize(image) >> 20
        log("%s: %d MiB image in %.1f s" % (QCOW2_IMAGES[backend], IMAGE_MIB[QCOW2_IMAGES[backend]],
                                            time.monotonic() - start))


def make_text(path):
    """SIZE bytes of compressible data that is not zero: lines of words
    drawn from a made-up vocabulary, with English-like letter frequencies.
    zstd gets it to about half its size, so every cluster of the image is
    compressed (qemu-img stores a cluster raw when compression does not
    shrink it, and random data would not shrink).  A fixed seed gives the
    same image every run.  One 4 MiB passage is repeated: larger than a
    cluster, which is compressed on its own, so the repetition is no
    help to the compressor."""
    import random
    rng = random.Random(2026)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    vocab = ["".join(rng.choices(letters, weights, k=rng.randint(2, 11))) for _ in range(8192)]
    words = rng.choices(vocab, k=1 << 19)
    seps = rng.choices(" " * 11 + "\n", k=len(words))
    passage = "".join(w + sep for w, sep in zip(words, seps)).encode()
    with open(path, "wb") as f:
        left = SIZE
        while left:
            f.write(passage[:left])
            left -= min(left, len(passage))


# ---- Measurements ------------------------------------------------------------

def run(cmd, timeout=600):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(cmd), r.stderr.strip()[-400:]))
    return r.stdout


def timed(cmd):
    start = time.monotonic()
    run(cmd)
    return time.monotonic() - start


# nbdcopy asks a source file for its holes; on tmpfs each SEEK_HOLE in a
# file without holes walks every page to the end of the file, which made
# a 1 GiB copy take 6 s whatever the server.  The data file has no holes.
COPY_IN = ["nbdcopy", "--flush", "--no-extents"]


def fill(server, work):
    """Write the data file through the server, so reads meet real data.
    A qcow2 image holds its data already, and is served read-only."""
    if server.qcow2:
        return
    run(COPY_IN + [data_file(work, server.size), server.uri()])


def fio(server, rw, depth, jobs=1):
    """One fio run; with JOBS > 1 each job is a process of its own with
    its own connection, and the figures are the jobs' sum."""
    cmd = ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + server.uri(), "--rw=" + rw,
           "--bs=4k", "--iodepth=%d" % depth, "--numjobs=%d" % jobs, "--group_reporting",
           "--time_based", "--runtime=%d" % FIO_SECONDS, "--size=%d" % SIZE,
           "--output-format=json"]
    out = run(cmd)
    job = json.loads(out[out.index("{"):])["jobs"][0]  # after fio's "connected" line
    return job["read"] if rw.endswith("read") else job["write"]


def seq_read(server, work, connections=1):
    fill(server, work)
    return copy_out(server, connections)


def copy_out(server, connections):
    """MB/s of a copy of the whole disk to nothing over CONNECTIONS
    connections.  nbdcopy opens no more connections than it has threads,
    and its thread count defaults to the CPUs (2 here): --threads makes
    the 4 connections real.  It also falls back to one connection,
    silently, when the server does not advertise multi-conn; a row of
    several connections must not measure one, so that is an error."""
    cmd = ["nbdcopy", "--connections=%d" % connections, server.uri(), "null:"]
    if connections > 1:
        cmd[1:1] = ["--threads=%d" % connections]
        r = subprocess.run(["nbdinfo", "--can", "multi-conn", server.uri()],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError("%s does not advertise multi-conn %s" % (server.kind, r.stderr.strip()))
    return server.size / timed(cmd) / 1e6


def seq_write(server, work):
    t = timed(COPY_IN + [os.path.join(work, "data.bin"), server.uri()])
    return SIZE / t / 1e6


def rand_iops(server, work, rw, name, jobs=1):
    """IOPS, and the server's CPU time per request: with the client
    taking a core of its own, the CPU a server spends on each request
    says more about it than the IOPS alone."""
    if rw == "randread":
        fill(server, work)
    before = server.cpu_seconds()
    result = fio(server, rw, 32, jobs)
    cpu = server.cpu_seconds() - before
    return {name: result["iops"], name + "-cpu": cpu / max(result["total_ios"], 1) * 1e6}


def idle_connections(server, work):
    """Open IDLE_CONNS connections that complete the handshake (NBD_OPT_GO)
    and stay idle; returns (seconds to get them all in, KiB of server RSS
    per connection)."""
    before = server.rss_kib()
    socks = []
    start = time.monotonic()
    for _ in range(IDLE_CONNS):
        if server.tcp:
            s = socket.create_connection(("127.0.0.1", server.port))
        else:
            s = socket.socket(socket.AF_UNIX)
            s.connect(server.sock)
        s.settimeout(30)
        socks.append(s)
    for s in socks:
        greeting = recv_exactly(s, 18)
        assert greeting[:8] == b"NBDMAGIC"
        s.sendall(struct.pack(">I", 1))  # fixed newstyle
        s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, 6) + struct.pack(">IH", 0, 0))
    for s in socks:
        while True:
            _magic, _opt, rtype, length = struct.unpack(">QIII", recv_exactly(s, 20))
            recv_exactly(s, length)
            if rtype == 1:
                break
            if rtype & 0x80000000:
                raise RuntimeError("%s refused an idle connection" % server.kind)
    took = time.monotonic() - start
    time.sleep(0.2)
    per_conn = (server.rss_kib() - before) / IDLE_CONNS
    for s in socks:
        s.close()
    return took, per_conn


def recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("server closed the connection")
        buf += chunk
    return buf


# ---- Workloads -----------------------------------------------------------------
# A measurement starts a server with OPTS, runs FN(server, work) and gets
# one figure per row it feeds (the QD1 run gives both percentiles, the
# idle run both time and memory).

def qd1(server, work):
    fill(server, work)
    clat = fio(server, "randread", 1)["clat_ns"]["percentile"]
    return {"qd1-p50": clat["50.000000"] / 1000.0, "qd1-p99": clat["99.000000"] / 1000.0}


def overlay_checkpoints(server, work):
    """4K random writes into the overlay, first alone, then with a
    checkpoint taken (and the previous one released) every second: the
    writes' p99 latency both ways, and the longest time a checkpoint held
    the writes (nbdserve-ctl's writes-held-us)."""
    import threading
    ctl = os.path.join(TOP, "nbdserve-ctl")
    plain = fio(server, "randwrite", 32)["clat_ns"]["percentile"]["99.000000"] / 1000.0
    held, stop = [], threading.Event()

    def checkpoints():
        n = 0
        while not stop.wait(1.0):
            out = run([ctl, server.control, "dirty-bitmap-overlay.checkpoint", "name=k%d" % n])
            held.extend(int(l.split("=")[1]) for l in out.splitlines() if l.startswith("writes-held-us="))
            if n > 0:
                run([ctl, server.control, "dirty-bitmap-overlay.release", "name=k%d" % (n - 1)])
            n += 1

    taker = threading.Thread(target=checkpoints)
    taker.start()
    try:
        during = fio(server, "randwrite", 32)["clat_ns"]["percentile"]["99.000000"] / 1000.0
    finally:
        stop.set()
        taker.join()
    values = {"overlay-write-p99": plain, "overlay-ckpt-write-p99": during}
    if held:
        values["overlay-ckpt-held"] = max(held) / 1000.0
    return values


def tls_multi_conn(server, work):
    """The 4-connection TLS read; for nbdserve also the CPU time each
    connection loop thread spent during the copy alone (not the fill),
    and the share of the copy's wall time that is: with connections
    spread over the loops, every loop thread should be doing crypto."""
    fill(server, work)
    if server.kind != "nbdserve":
        return {"tls-multi-conn": copy_out(server, 4)}
    before, cpu_before = server.loop_cpu_seconds(), server.cpu_seconds()
    start = time.monotonic()
    mbps = copy_out(server, 4)
    wall = time.monotonic() - start
    after, cpu_after = server.loop_cpu_seconds(), server.cpu_seconds()
    threads = {name: after[name] - before.get(name, 0.0) for name in after}
    threads["all threads"] = cpu_after - cpu_before
    return {"tls-multi-conn": mbps, "tls-loop-cpu": (threads, wall)}


def idle(server, work):
    took, per_conn = idle_connections(server, work)
    return {"idle-accept": took, "idle-rss": per_conn}


LOOP_VARIANTS = [("--loops=1", "nbdserve", dict(loops=1)),
                 ("--loops=%d" % CPUS, "nbdserve", dict(loops=CPUS))]

MEASUREMENTS = [
    ("seq-read", dict(backend="memory"), lambda s, w: {"seq-read": seq_read(s, w, 1)}),
    ("seq-write", dict(backend="memory"), lambda s, w: {"seq-write": seq_write(s, w)}),
    ("randread", dict(backend="memory"), lambda s, w: rand_iops(s, w, "randread", "randread")),
    ("randwrite", dict(backend="memory"), lambda s, w: rand_iops(s, w, "randwrite", "randwrite")),
    ("qd1", dict(backend="memory"), qd1),
    ("multi-conn", dict(backend="memory", size=MULTI_SIZE),
     lambda s, w: {"multi-conn": seq_read(s, w, 4)}),
    ("file-multi-conn", dict(backend="file", size=MULTI_SIZE),
     lambda s, w: {"file-multi-conn": seq_read(s, w, 4)}),
    ("randread-4", dict(backend="memory"),
     lambda s, w: rand_iops(s, w, "randread", "randread-4", jobs=4)),
    ("tcp-read", dict(backend="memory", tcp=True), lambda s, w: {"tcp-read": seq_read(s, w, 1)}),
    ("file-read", dict(backend="file"), lambda s, w: {"file-read": seq_read(s, w, 1)}),
    ("file-randread", dict(backend="file"), lambda s, w: rand_iops(s, w, "randread", "file-randread")),
    ("file-randwrite", dict(backend="file"),
     lambda s, w: rand_iops(s, w, "randwrite", "file-randwrite")),
    # The 1-connection TLS read is the yardstick of the 4-connection one,
    # so it reads the same disk.
    ("tls-read", dict(backend="memory", tls=True, size=MULTI_SIZE),
     lambda s, w: {"tls-read": seq_read(s, w, 1)}),
    ("tls-multi-conn", dict(backend="memory", tls=True, size=MULTI_SIZE), tls_multi_conn),
    ("idle", dict(backend="memory"), idle),
    ("qcow2-read", dict(backend="qcow2"), lambda s, w: {"qcow2-read": seq_read(s, w, 1)}),
    ("qcow2-zstd-read", dict(backend="qcow2-zstd"),
     lambda s, w: {"qcow2-zstd-read": seq_read(s, w, 1)}),
    ("qcow2-randread", dict(backend="qcow2"),
     lambda s, w: rand_iops(s, w, "randread", "qcow2-randread")),
    ("overlay-seq-write", dict(backend="overlay"),
     lambda s, w: {"overlay-seq-write": seq_write(s, w)}),
    ("overlay-randwrite", dict(backend="overlay"),
     lambda s, w: rand_iops(s, w, "randwrite", "overlay-randwrite")),
    ("overlay-checkpoints", dict(backend="overlay", control=True), overlay_checkpoints,
     [("nbdserve", "nbdserve", {})]),
    # nbdserve alone at one loop and at one per CPU, alternated like the
    # servers of the other rows: the 4th element lists the variants run
    # (the name of the column, then options for Server).
    ("loops-read", dict(backend="memory", size=MULTI_SIZE),
     lambda s, w: {"loops-read": seq_read(s, w, 4)}, LOOP_VARIANTS),
    ("loops-tls-read", dict(backend="memory", tls=True, size=MULTI_SIZE),
     lambda s, w: {"loops-tls-read": seq_read(s, w, 4)}, LOOP_VARIANTS),
]

# Rows of the report: name, label, unit, higher is better, and the
# ratio that counts as reaching the goal, when it is not 1 (the qcow2
# rows' goal, from the issue that added the plugin, is 1.2× qemu-nbd),
# and what that ratio is taken against, when it is not the best peer:
# a server (the multi-connection rows' goal is 1.2× nbdkit) or another
# row of nbdserve's own, round by round (the 4-connection TLS read is
# to be 1.1× nbdserve's 1-connection one).  The last column always
# gives the ratio to the best peer; a goal against something else is
# reported after it.
ROWS = [
    ("seq-read", "sequential read, 1 connection (memory)", "MB/s", True),
    ("seq-write", "sequential write (memory)", "MB/s", True),
    ("randread", "4K random read, QD32 (memory)", "IOPS", True),
    ("randread-cpu", "... server CPU time per read", "µs", False),
    ("randwrite", "4K random write, QD32 (memory)", "IOPS", True),
    ("randwrite-cpu", "... server CPU time per write", "µs", False),
    ("qd1-p50", "4K read latency QD1, p50 (memory)", "µs", False),
    ("qd1-p99", "4K read latency QD1, p99 (memory)", "µs", False),
    ("multi-conn", "sequential read, 4 connections (memory)", "MB/s", True, 1.2, "nbdkit"),
    ("randread-4", "4K random read, QD32, 4 fio jobs, a connection each (memory)", "IOPS", True),
    ("randread-4-cpu", "... server CPU time per read", "µs", False),
    ("tcp-read", "sequential read over TCP loopback (memory)", "MB/s", True),
    ("file-read", "sequential read (file in /dev/shm)", "MB/s", True),
    ("file-multi-conn", "sequential read, 4 connections (file in /dev/shm)", "MB/s", True,
     1.2, "nbdkit"),
    ("file-randread", "4K random read, QD32 (file in /dev/shm)", "IOPS", True),
    ("file-randread-cpu", "... server CPU time per read", "µs", False),
    ("file-randwrite", "4K random write, QD32 (file in /dev/shm)", "IOPS", True),
    ("file-randwrite-cpu", "... server CPU time per write", "µs", False),
    ("tls-read", "sequential read, TLS-PSK, 1 connection (memory)", "MB/s", True),
    ("tls-multi-conn", "sequential read, TLS-PSK, 4 connections (memory)", "MB/s", True,
     1.1, "tls-read"),
    ("idle-accept", "%d idle connections: time to accept them all", "s", False),
    ("idle-rss", "%d idle connections: server memory per connection", "KiB", False),
    ("qcow2-read", "sequential read (qcow2, every cluster allocated)", "MB/s", True, 1.2),
    ("qcow2-zstd-read", "sequential read (qcow2, zstd-compressed clusters)", "MB/s", True, 1.2),
    ("qcow2-randread", "4K random read, QD32 (qcow2, every cluster allocated)", "IOPS", True, 1.2),
    ("qcow2-randread-cpu", "... server CPU time per read", "µs", False),
    # The overlay's goals (its issue): at least qemu-nbd's speed, and at
    # most 1.25× the CPU per write of nbdserve's file plugin on a raw file.
    ("overlay-seq-write", "sequential write into a fresh qcow2 overlay, bitmap recording",
     "MB/s", True),
    ("overlay-randwrite", "4K random write, QD32, into a fresh qcow2 overlay, bitmap recording",
     "IOPS", True),
    ("overlay-randwrite-cpu", "... server CPU time per write", "µs", False, 0.8,
     "file-randwrite-cpu"),
    # Live checkpoints (nbdserve alone): the goal is a p99 no worse than 2x.
    ("overlay-write-p99", "4K random write latency QD32, p99 (qcow2 overlay)", "µs", False),
    ("overlay-ckpt-write-p99", "... with a checkpoint (and a release) each second", "µs", False, 0.5,
     "overlay-write-p99"),
    ("overlay-ckpt-held", "... longest time a checkpoint held the writes", "ms", False),
]
# Rows whose measurement no nbdkit can serve: their nbdkit cell says so.
NO_NBDKIT = {"qcow2-read", "qcow2-zstd-read", "qcow2-randread", "qcow2-randread-cpu"}
NO_NBDKIT_WRITER = {"overlay-seq-write", "overlay-randwrite", "overlay-randwrite-cpu", "overlay-write-p99",
                    "overlay-ckpt-write-p99", "overlay-ckpt-held"}


# ---- The cache filter (issue 17): hits against the plain memory plugin ---------------
# 4K random reads at QD32 of a disk the cache holds whole, with the delay
# filter under it (delay-read=10ms: a read that missed would show), and in
# the same round the same reads of the memory plugin without the cache.
# nbdserve alone: the goal is 0.8x its own uncached row.
class CacheOverDelayServer(Server):
    """nbdserve --filter=cache --filter=delay memory SIZE delay-read=10ms,
    with room in the cache for the whole disk."""

    def __init__(self, work, size):
        super().__init__(work, "nbdserve", "memory", size=size)
        self.sock = os.path.join(work, "cache-over-delay.sock")

    def command(self):
        cmd = super().command()
        plugin = cmd.index("memory")
        return (cmd[:plugin] + ["--filter=cache", "--filter=delay"] + cmd[plugin:] +
                ["delay-read=10ms", "cache-max-size=%d" % (self.size + (64 << 20))])


def cache_hits(server, work):
    figures = rand_iops(server, work, "randread", "cache-hits-memory")
    cached = CacheOverDelayServer(work, server.size).start()
    try:
        fill(cached, work)  # the writes land in the cache, whole blocks
        copy_out(cached, 1)  # and a full read finds every one of them there
        before = cached.cpu_seconds()
        result = fio(cached, "randread", 32)
        cpu = cached.cpu_seconds() - before
    finally:
        cached.stop()
    figures["cache-hits"] = result["iops"]
    figures["cache-hits-cpu"] = cpu / max(result["total_ios"], 1) * 1e6
    return figures


MEASUREMENTS.append(("cache-hits", dict(backend="memory"), cache_hits,
                     [("nbdserve", "nbdserve", {})]))
ROWS.extend([
    ("cache-hits", "4K random read, QD32, every read a cache hit (cache over delay over memory)",
     "IOPS", True, 0.8, "cache-hits-memory"),
    ("cache-hits-cpu", "... server CPU time per hit", "µs", False),
    ("cache-hits-memory", "... the same reads of the memory plugin without the cache", "IOPS",
     True),
    ("cache-hits-memory-cpu", "... server CPU time per read", "µs", False),
])
# ---- end of the cache filter's rows ---------------------------------------------------

# ---- Filters: nbdserve's against nbdkit's equivalents -------------------------
# Rows of nbdserve with one of its filters over the memory plugin against
# nbdkit with its nearest filter, in the same run: throttle against rate,
# log against log, stats against stats, fast-zero against nozero (nbdkit
# 1.32 has no fastzero filter).  qemu-nbd has no filters and takes no part.
# A measurement's variants give each server its chain: a dict of
# server kind -> (filter names, key=value parameters appended after the
# plugin's), "{work}" in a parameter being the work directory.

def with_filters(server, cmd):
    """CMD with SERVER's filters inserted before the plugin name and
    their parameters appended."""
    if not server.chain or server.kind not in server.chain:
        return cmd
    filters, params = server.chain[server.kind]
    plugin = "memory" if server.backend == "memory" else "file"
    at = cmd.index(plugin)
    return (cmd[:at] + ["--filter=" + f for f in filters] + cmd[at:]
            + [p.format(work=server.work) for p in params])


def filter_variants(ours, theirs):
    """The variants of a filter row: nbdserve with OURS, nbdkit with THEIRS,
    each (filter names, parameters)."""
    return [("nbdserve", "nbdserve", dict(chain={"nbdserve": ours})),
            ("nbdkit", "nbdkit", dict(chain={"nbdkit": theirs}))]


# The throttle rows: a sequential read under a limit both servers should
# hold (200 MiB/s; nbdkit's rate is in bits per second), and 4K random
# reads under a limit far above what they reach, which measures what the
# filter costs a request.  Both get nbdkit's default bucket depth, 2 s.
THROTTLE_SEQ_RATE = 200 << 20
THROTTLE_SEQ = filter_variants((["throttle"], ["rate=200M", "burst=2s"]),
                               (["rate"], ["rate=1600M", "burstiness=2"]))
THROTTLE_HIGH = filter_variants((["throttle"], ["rate=10G"]), (["rate"], ["rate=80G"]))
LOG_FILE = filter_variants((["log"], ["logfile={work}/requests.log"]),
                           (["log"], ["logfile={work}/requests.log"]))
STATS_FILE = filter_variants((["stats"], ["statsfile={work}/stats.txt"]),
                             (["stats"], ["statsfile={work}/stats.txt"]))
# fast-zero=slow: a FAST_ZERO request fails at once with ENOTSUP, so
# qemu-img convert -n zeroes the holes without the flag; zero=emulate:
# every zero is written as data.
FAST_ZERO_SLOW = filter_variants((["fast-zero"], ["fast-zero=slow"]),
                                 (["nozero"], ["zeromode=plugin", "fastzeromode=slow"]))
ZERO_EMULATE = filter_variants((["fast-zero"], ["zero=emulate"]), (["nozero"], ["zeromode=emulate"]))


def logged_iops(rw, name):
    """rand_iops with the log filter; the log (some 100 MB at full
    speed) is removed as soon as it is written."""
    def measure(server, work):
        try:
            return rand_iops(server, work, rw, name)
        finally:
            path = os.path.join(work, "requests.log")
            if os.path.exists(path):
                os.unlink(path)
    return measure


def sparse_image(work, size):
    """A raw image of SIZE bytes: 1 MiB of random data in every 16 MiB,
    holes in between (made once per run)."""
    path = os.path.join(work, "sparse-%dM.img" % (size >> 20))
    if not os.path.exists(path):
        with open(path + ".new", "wb") as f:
            f.truncate(size)
            for off in range(0, size, 16 << 20):
                f.seek(off)
                f.write(os.urandom(min(1 << 20, size - off)))
        os.rename(path + ".new", path)
    return path


def convert_onto(name):
    """Seconds of qemu-img convert -n of the sparse image onto the export
    (the export's disk is not known to be zero, so qemu-img zeroes the
    holes of the source there)."""
    def measure(server, work):
        src = sparse_image(work, server.size)
        return {name: timed(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src,
                             server.uri()])}
    return measure


MEASUREMENTS += [
    ("throttle-seq", dict(backend="memory"),
     lambda s, w: {"throttle-seq": seq_read(s, w, 1)}, THROTTLE_SEQ),
    ("throttle-randread", dict(backend="memory"),
     lambda s, w: rand_iops(s, w, "randread", "throttle-randread"), THROTTLE_HIGH),
    ("log-randread", dict(backend="memory"), logged_iops("randread", "log-randread"), LOG_FILE),
    ("log-randwrite", dict(backend="memory"), logged_iops("randwrite", "log-randwrite"), LOG_FILE),
    ("stats-randread", dict(backend="memory"),
     lambda s, w: rand_iops(s, w, "randread", "stats-randread"), STATS_FILE),
    ("fast-zero-slow", dict(backend="memory"), convert_onto("fast-zero-slow"), FAST_ZERO_SLOW),
    ("zero-emulate", dict(backend="memory"), convert_onto("zero-emulate"), ZERO_EMULATE),
]
ROWS += [
    ("throttle-seq", "throttle rate=200M (%.1f MB/s) / nbdkit rate: sequential read (memory)"
     % (THROTTLE_SEQ_RATE / 1e6), "MB/s", True),
    ("throttle-randread", "throttle rate=10G / nbdkit rate: 4K random read, QD32 (memory)",
     "IOPS", True),
    ("throttle-randread-cpu", "... server CPU time per read", "µs", False),
    ("log-randread", "log to a file: 4K random read, QD32 (memory)", "IOPS", True),
    ("log-randread-cpu", "... server CPU time per read", "µs", False),
    ("log-randwrite", "log to a file: 4K random write, QD32 (memory)", "IOPS", True),
    ("log-randwrite-cpu", "... server CPU time per write", "µs", False),
    ("stats-randread", "stats: 4K random read, QD32 (memory)", "IOPS", True),
    ("stats-randread-cpu", "... server CPU time per read", "µs", False),
    ("fast-zero-slow", "fast-zero=slow / nozero fastzeromode=slow: qemu-img convert -n "
     "of a sparse image (1/16 data)", "s", False),
    ("zero-emulate", "fast-zero zero=emulate / nozero zeromode=emulate: qemu-img convert -n "
     "of a sparse image (1/16 data)", "s", False),
]
# ---- end of the filter rows ----------------------------------------------------



# ---- Ceph RBD ------------------------------------------------------------------
# The rbd plugin against qemu-nbd's rbd driver (Debian's qemu-block-extra)
# serving the same image of the same single-node cluster (one monitor,
# one OSD on memstore, 127.0.0.1), started once per run by
# tests/lib/ceph-cluster.sh on the first rbd row and stopped at exit.
# The image is imported from the data file once: reads meet real data
# and no row fills it again.  The OSD shares the 2 CPUs with client and
# server, so these rows say as much about Ceph's cost as about the
# servers'; the goal (from the issue that added the plugin) is 1.2×
# qemu-nbd.
RBD_IMAGE = "rbd/bench"
RBD_HELPER = os.path.join(TOP, "tests", "lib", "ceph-cluster.sh")
rbd_cluster_dir = None


def rbd_conf(work):
    """The cluster's configuration, starting the cluster if need be."""
    global rbd_cluster_dir
    if rbd_cluster_dir is None:
        import atexit
        parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        cdir = os.path.join(tempfile.mkdtemp(prefix="nbdserve-bench-ceph.", dir=parent), "c")
        env = dict(ENV, STORE_MB=str((SIZE >> 20) * 2 + 256), CEPH_OWNER_PID=str(os.getpid()))
        atexit.register(lambda: (subprocess.run([RBD_HELPER, "stop", cdir], timeout=120),
                                 shutil.rmtree(os.path.dirname(cdir), ignore_errors=True)))
        subprocess.run([RBD_HELPER, "start", cdir, "rbd"], env=env, check=True,
                       capture_output=True, timeout=180)
        rbd_cluster_dir = cdir
        conf = os.path.join(cdir, "ceph.conf")
        start = time.monotonic()
        # Without exclusive-lock: the servers take turns on the image, and
        # the lock a server killed by SIGTERM may leave behind would have
        # the next one break it (and Ceph blocklist a client) mid-row.
        run(["rbd", "-c", conf, "import", "--no-progress", "--image-feature", "layering",
             os.path.join(work, "data.bin"), RBD_IMAGE])
        log("rbd: cluster up, %d MiB image imported in %.1f s" % (SIZE >> 20, time.monotonic() - start))
    return os.path.join(rbd_cluster_dir, "ceph.conf")


class RbdServer(Server):
    """nbdserve's rbd plugin or qemu-nbd's rbd driver on RBD_IMAGE.  Like
    a qcow2 image, the image is made once per run: Server neither fills
    nor removes it (self.qcow2)."""

    def __init__(self, work, kind, **opts):
        super().__init__(work, kind, **opts)
        self.qcow2 = True
        self.conf = rbd_conf(work)

    def command(self):
        if self.kind == "nbdserve":
            return [NBDSERVE, "-f", "-U", self.sock, "rbd", "image=" + RBD_IMAGE,
                    "conf=" + self.conf]
        # --cache=writeback: qemu's default, which turns librbd's cache on
        # as nbdserve's librbd has it by default.
        return ["qemu-nbd", "-f", "raw", "-t", "-e", "2000", "--cache=writeback", "-k", self.sock,
                "rbd:%s:conf=%s" % (RBD_IMAGE, self.conf)]


SERVER_CLASSES["rbd"] = RbdServer
RBD_VARIANTS = [("nbdserve", "nbdserve", {}), ("qemu-nbd", "qemu-nbd", {})]
MEASUREMENTS += [
    ("rbd-read", dict(backend="rbd"), lambda s, w: {"rbd-read": copy_out(s, 1)}, RBD_VARIANTS),
    ("rbd-write", dict(backend="rbd"), lambda s, w: {"rbd-write": seq_write(s, w)}, RBD_VARIANTS),
    ("rbd-randread", dict(backend="rbd"),
     lambda s, w: rand_iops(s, w, "randread", "rbd-randread"), RBD_VARIANTS),
]
ROWS += [
    ("rbd-read", "sequential read (Ceph RBD, 1 OSD on memstore)", "MB/s", True, 1.2, "qemu-nbd"),
    ("rbd-write", "sequential write (Ceph RBD)", "MB/s", True, 1.2, "qemu-nbd"),
    ("rbd-randread", "4K random read, QD32 (Ceph RBD)", "IOPS", True, 1.2, "qemu-nbd"),
    ("rbd-randread-cpu", "... server CPU time per read", "µs", False),
]

# The --loops scaling table: nbdserve alone, the ratio is --loops=N / --loops=1.
SCALING_ROWS = [
    ("loops-read", "sequential read, 4 connections (memory)", "MB/s"),
    ("loops-tls-read", "sequential read, TLS-PSK, 4 connections (memory)", "MB/s"),
]


# ---- The nbd plugin: a proxy in front of nbdserve memory --------------------------
# nbdserve's nbd plugin against nbdkit's nbd plugin, each in front of the
# same kind of backend: an nbdserve memory disk of its own, started
# afresh with the front.  The columns are the fronts; the backend, the
# same program for both, is not the server compared.  run_measurement
# starts the column's own server first: it only names the column here,
# and is stopped at once.

class ProxyPair:
    """A backend (nbdserve memory) and a front (KIND's nbd plugin) in front of it."""

    def __init__(self, work, kind, size=SIZE):
        self.kind, self.work, self.size, self.qcow2 = kind, work, size, False
        self.back_sock = os.path.join(work, "proxy-backend.sock")
        self.sock = os.path.join(work, "proxy-%s.sock" % kind)
        self.procs = []

    def _spawn(self, cmd, sock, name):
        log = open(os.path.join(self.work, name + ".log"), "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=log)
        self.procs.append((p, log, sock))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError("%s exited: %s" % (name, open(log.name).read()))
            if os.path.exists(sock):
                return p
            time.sleep(0.02)
        raise RuntimeError("%s did not start" % name)

    def start(self):
        self._spawn([NBDSERVE, "-f", "-U", self.back_sock, "memory", "size=%d" % self.size],
                    self.back_sock, "proxy-backend")
        front = [NBDSERVE] if self.kind == "nbdserve" else ["nbdkit"]
        self.proc = self._spawn(front + ["-f", "-U", self.sock, "nbd",
                                         "socket=" + self.back_sock],
                                self.sock, "proxy-" + self.kind)
        return self

    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    cpu_seconds = Server.cpu_seconds  # of the front, the server compared

    def stop(self):
        for p, log, sock in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            log.close()
            if os.path.exists(sock):
                os.unlink(sock)


def through_proxy(fn):
    """A measurement FN(server, work) run against a ProxyPair whose front
    is the column's server kind."""
    def measure(column_server, work):
        column_server.stop()
        pair = ProxyPair(work, column_server.kind).start()
        try:
            return fn(pair, work)
        finally:
            pair.stop()
    return measure


PROXY_VARIANTS = [("nbdserve", "nbdserve", {}), ("nbdkit", "nbdkit", {})]
MEASUREMENTS += [
    ("nbd-proxy-read", dict(backend="memory"),
     through_proxy(lambda s, w: {"nbd-proxy-read": seq_read(s, w, 1)}), PROXY_VARIANTS),
    ("nbd-proxy-randread", dict(backend="memory"),
     through_proxy(lambda s, w: rand_iops(s, w, "randread", "nbd-proxy-randread")),
     PROXY_VARIANTS),
]
ROWS += [
    ("nbd-proxy-read", "sequential read through the nbd plugin (in front of nbdserve memory)",
     "MB/s", True, 1.2, "nbdkit"),
    ("nbd-proxy-randread", "4K random read, QD32, through the nbd plugin (in front of nbdserve "
     "memory)", "IOPS", True, 1.2, "nbdkit"),
    ("nbd-proxy-randread-cpu", "... front server CPU time per read", "µs", False),
]


def variants(measurement):
    """(column, server kind, extra Server options) of each server run
    for MEASUREMENT: its own list, or every server that can serve it."""
    name, opts, fn, *own = measurement
    if own:
        return [v for v in own[0] if v[1] in SERVERS]
    return [(k, k, {}) for k in SERVERS if serves(k, opts["backend"])]


def run_measurement(work, measurement, results):
    name, opts, fn = measurement[:3]
    rounds = WARMUP + ROUNDS
    for rnd in range(rounds):
        for column, kind, extra in variants(measurement):
            server = SERVER_CLASSES.get(opts["backend"], Server)(work, kind, **opts, **extra).start()
            try:
                values = fn(server, work)
            except Exception as e:
                log("  %s %s round %d: %s" % (name, column, rnd, e))
                values = {}
            finally:
                server.stop()
            if rnd < WARMUP:
                continue
            for key, v in values.items():
                results.setdefault(key, {}).setdefault(column, []).append(v)
        log("  %s: round %d/%d done" % (name, rnd + 1, rounds))


# ---- Report ----------------------------------------------------------------------

def fmt(v):
    if v >= 1000:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    return "%.3g" % v


def cell(vals):
    return "%s (%s–%s)" % (fmt(statistics.median(vals)), fmt(min(vals)), fmt(max(vals)))


def round_ratio(ours, theirs, higher=True):
    """Median over rounds of OURS[i] / THEIRS(i), where THEIRS gives the
    figure to compare with in round i, or None."""
    ratios = []
    for i, v in enumerate(ours):
        other = theirs(i)
        if other is not None and v > 0 and other > 0:
            ratios.append(v / other)
    return statistics.median(ratios) if ratios else None


def summarize(results):
    rows = []
    for name, label, unit, higher, *goal_spec in ROWS:
        target = goal_spec[0] if goal_spec else 1.0
        against = goal_spec[1] if len(goal_spec) > 1 else None
        per_server = results.get(name, {})
        if "idle" in name:
            label = label % IDLE_CONNS
        cells = {}
        for kind in ["nbdserve", "nbdkit", "qemu-nbd"]:
            vals = per_server.get(kind, [])
            if vals:
                cells[kind] = cell(vals)
            elif kind == "nbdkit" and name in NO_NBDKIT:
                cells[kind] = "no qcow2 reader"
            elif kind == "nbdkit" and name in NO_NBDKIT_WRITER:
                cells[kind] = "no qcow2 writer"
            else:
                cells[kind] = "n/a"
        ours = per_server.get("nbdserve", [])

        def best_peer(i):
            peers = [per_server[k][i] for k in ("nbdkit", "qemu-nbd")
                     if k in per_server and len(per_server[k]) > i]
            if not peers:
                return None
            return max(peers) if higher else min(peers)

        def reference(i):
            if against in ("nbdkit", "qemu-nbd"):
                figures = per_server.get(against, [])
            else:  # another row of nbdserve's, measured in the same rounds
                figures = results.get(against, {}).get("nbdserve", [])
            return figures[i] if len(figures) > i else None

        ratio = round_ratio(ours, best_peer)
        goal_ratio = ratio if against is None else round_ratio(ours, reference)
        goal = None
        if goal_ratio is not None:
            goal = goal_ratio >= target if higher else goal_ratio <= 1 / target
        rows.append(dict(name=name, label=label, unit=unit, higher=higher, cells=cells,
                         ratio=ratio, goal=goal, target=target, against=against,
                         goal_ratio=goal_ratio))
    return rows


def summarize_scaling(results):
    """The --loops table: a cell per variant, and the ratio of the many
    loops' figure to the single loop's, round by round."""
    one, many = LOOP_VARIANTS[0][0], LOOP_VARIANTS[1][0]
    rows = []
    for name, label, unit in SCALING_ROWS:
        if name not in results:
            continue
        per_variant = results[name]
        singles = per_variant.get(one, [])
        ratio = round_ratio(per_variant.get(many, []),
                            lambda i: singles[i] if len(singles) > i else None)
        rows.append(dict(label=label, unit=unit,
                         cells=[cell(per_variant[v]) if per_variant.get(v) else "n/a"
                                for v in (one, many)],
                         ratio="n/a" if ratio is None else "%.2f×" % ratio))
    return rows


def summarize_loop_cpu(results):
    """CPU time of nbdserve's threads during the 4-connection TLS copy:
    a row per loop thread and one for the whole process, each with its
    share of the copy's wall time (100% is one CPU kept busy)."""
    runs = results.get("tls-loop-cpu", {}).get("nbdserve", [])
    if not runs:
        return []
    names = sorted({n for threads, _ in runs for n in threads if n.startswith("loop-")},
                   key=lambda n: int(n.split("-")[1]))
    rows = []
    for name in names + ["all threads"]:
        secs = [threads.get(name, 0.0) for threads, _ in runs]
        busy = [threads.get(name, 0.0) / wall * 100 for threads, wall in runs if wall > 0]
        label = "4-connection TLS read, %s" % (name if name == "all threads" else "thread " + name)
        rows.append(dict(label=label, unit="s", cells=[cell(secs), cell(busy) if busy else "n/a"]))
    return rows


def versions():
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "not installed"
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        m = re.search(r"model name\s*:\s*(.*)", f.read())
        if m:
            cpu = m.group(1)
    return {
        "machine": "%d CPUs, %s, Linux %s, %.0f GiB RAM" % (
            os.cpu_count(), cpu, platform.release(),
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "nbdserve": first_line([NBDSERVE, "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "clients": "%s; %s" % (first_line(["nbdcopy", "--version"]), first_line(["fio", "--version"])),
    }


def goal_text(r):
    """The goal of a row measured against something else than the best
    peer: what it is, and where this run stands."""
    if r["against"] in ("nbdkit", "qemu-nbd"):
        what = r["against"]
    else:
        what = "nbdserve's %s row" % r["against"]
    if r["goal_ratio"] is None:
        return "goal %.1f× %s: n/a" % (r["target"], what)
    return "goal %.1f× %s: %.2f× %s" % (r["target"], what, r["goal_ratio"],
                                        "✓" if r["goal"] else "✗")


def table(rows):
    out = ["| workload | unit | nbdserve | nbdkit | qemu-nbd | nbdserve / best peer |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        better = "higher is better" if r["higher"] else "lower is better"
        if r["against"] is not None:
            # The mark goes with the goal, given after the peer ratio.
            ratio = "n/a" if r["ratio"] is None else "%.2f× (%s)" % (r["ratio"], better)
            ratio += "; " + goal_text(r)
        elif r["ratio"] is None:
            ratio = "n/a"
        else:
            if r["target"] != 1.0:
                better += ", goal %.1f×" % r["target"]
            ratio = "%.2f× %s (%s)" % (r["ratio"], "✓" if r["goal"] else "✗", better)
        out.append("| %s | %s | %s | %s | %s | %s |" % (
            r["label"], r["unit"], r["cells"]["nbdserve"], r["cells"]["nbdkit"],
            r["cells"]["qemu-nbd"], ratio))
    return "\n".join(out)


def small_table(header, rows, last=None):
    """A table of a label, a unit and a few cells per row; LAST names a
    key of each row to end it with."""
    out = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        cells = [r["label"], r["unit"]] + r["cells"] + ([r[last]] if last else [])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def extra_tables(results):
    """The --loops scaling table and the loop threads' CPU time, as
    Markdown, or "" when neither ran."""
    parts = []
    scaling = summarize_scaling(results)
    if scaling:
        one, many = LOOP_VARIANTS[0][0], LOOP_VARIANTS[1][0]
        parts.append(small_table(["workload (nbdserve alone)", "unit", one, many,
                                  "%s / %s" % (many, one)], scaling, "ratio"))
    loop_cpu = summarize_loop_cpu(results)
    if loop_cpu:
        parts.append(small_table(["workload (nbdserve alone)", "unit", "CPU time",
                                  "CPU time / wall time of the copy (%)"], loop_cpu))
    return "\n\n".join(parts)


def chart(rows, out_dir):
    """Bar chart of the speed-up over the best peer (higher is better for
    every bar: lower-is-better rows are inverted)."""
    if shutil.which("gnuplot") is None:
        log("gnuplot is not installed: no chart")
        return False
    data = os.path.join(out_dir, ".performance.dat")
    with open(data, "w") as f:
        for r in rows:
            if r["ratio"]:
                speedup = r["ratio"] if r["higher"] else 1 / r["ratio"]
                f.write('"%s" %.3f\n' % (r["name"], speedup))
    script = """
set terminal pngcairo size 1100,500 noenhanced
set output '%s'
set title 'nbdserve against the best of nbdkit and qemu-nbd (above 1: nbdserve is better)'
set style fill solid 0.8
set boxwidth 0.7
set yrange [0:*]
set xtics rotate by -35
set grid ytics
set arrow from graph 0, first 1 to graph 1, first 1 nohead dt 2 lw 2
plot '%s' using 2:xtic(1) with boxes notitle lc rgb '#3465a4'
""" % (os.path.join(out_dir, "performance.png"), data)
    r = subprocess.run(["gnuplot"], input=script, capture_output=True, text=True)
    os.unlink(data)
    if r.returncode != 0:
        log("gnuplot failed: " + r.stderr)
    return r.returncode == 0


def write_report(rows, extra, out_dir, info, started):
    mode = "BENCH_SMOKE" if SMOKE else "BENCH_QUICK" if QUICK else "full"
    have_chart = chart(rows, out_dir) if not SMOKE else False
    text = """# Performance

Measured by `make bench` (bench/bench.py) on %(date)s, %(mode)s run:
%(rounds)d rounds after %(warmup)d warm-up round, servers run in alternation
(nbdserve, nbdkit, qemu-nbd, nbdserve, ...), each started afresh for each
measurement. Cells are the median (min–max) over the rounds; the last column
is the median over rounds of nbdserve's figure divided by the best peer's in
the same round. For throughput and IOPS higher is better; for latency, time
and memory lower is better. Disks are %(size)s (%(multi)s for the rows of 4
connections and the 1-connection TLS row they are compared with); fio runs
%(fio)d s per measurement.

- Machine: %(machine)s
- nbdserve: %(nbdserve)s
- nbdkit: %(nbdkit)s
- qemu-nbd: %(qemu)s
- Clients: %(clients)s

%(table)s

%(chart)s
## Connection loops

nbdserve serves its connections from %(cpus)d connection loops here
(`--loops`; by default one per CPU this process may use), each a thread of
its own (loop-0, loop-1...). The first table is nbdserve alone at one loop
and at %(cpus)d, alternated round by round; the last column is the median
over rounds of the ratio of the two. The second gives the user + system
time of each loop thread during the 4-connection TLS copy (from
/proc/PID/task/TID/stat, the fill left out), and that time as a share of
the copy's wall time (100%% is one CPU kept busy); "all threads" is the
whole process.

%(extra)s

What the design predicts on a machine with more CPUs: a connection's I/O
(its reads and writes on the socket, its TLS records, the requests a plugin
serves inline) is done by the one loop thread it was given when it was
accepted, so throughput over C connections scales with min(C, loops, CPUs
left after the client): no more loop threads work than there are
connections or loops, and they work in parallel only on the CPUs the
client leaves free. On this 2-CPU machine the client takes one of the two: nbdcopy's own work, and for
TLS its decryption with GnuTLS of all that the server encrypts, keep a CPU
busy, so a second loop has at most what is left of the other CPU, and
`--loops=%(cpus)d` can add little over `--loops=1`, or nothing when other
load on the machine takes that CPU. With more CPUs than the client needs,
each loop added brings a CPU of its own to its connections, and the curve
should keep rising with the loops until it meets the number of connections
or what the client itself can take.

How each row is measured:

- Sequential rows: `nbdcopy --connections=N URI null:` after filling the disk
  with random data (nbdcopy skips holes, so an empty disk would measure
  nothing); MB/s = disk size / wall time. Writes: `nbdcopy --flush --no-extents` of a
  random file in /dev/shm into a fresh server (without `--no-extents`,
  nbdcopy's SEEK_HOLE on the tmpfs source took 6 s per GiB, whatever the
  server). A fresh disk's memory is touched for the first time here, which
  is slow inside this VM for every server alike.
- Rows of 4 connections: `nbdcopy --threads=4 --connections=4` (nbdcopy
  opens no more connections than it has threads, and its threads default
  to the CPU count), after checking with `nbdinfo --can multi-conn` that
  the server advertises multi-conn, without which nbdcopy would quietly
  use one connection. nbdcopy's threads take the disk in 128 MiB pieces,
  so these rows read a disk of at least 4 of them, lest some connections
  carry nothing. nbdserve's memory and file plugins advertise it, as
  do nbdkit's; qemu-nbd does when `-e` lets more than one client in. The
  goal of the memory and file rows is 1.2× nbdkit, and that of the TLS row
  1.1× nbdserve's own 1-connection TLS row of the same round: the last
  column gives the ratio to the best peer, then the goal and where the
  run stands against it.
- Random and latency rows: fio's nbd engine, 4 KiB blocks, over the whole disk.
  On a 2-CPU machine fio itself takes a whole core at QD32, so the IOPS of
  the faster servers meet the client's limit; the "server CPU time" rows
  (the server process's user + system time during the run, divided by
  the requests served) show what each request costs the server. fio
  never sleeps there: each I/O costs it one poll, four recvfrom and one
  sendto whatever the server, and how fast those system calls go depends
  on what the server's thread does on the other CPU: a send that has to
  wake a sleeping server thread is dearer. With the memory plugin, and
  with the file plugin on a file in /dev/shm (which nbdserve serves on
  the connection thread, as it never waits for a disk), nbdserve's thread
  polls instead of sleeping under this load (`--busy-poll`, on by default;
  see nbdserve.md), and its CPU time then includes the polling. It
  polls at queue depth 1 too, where fio sends the next request within
  the 100 µs limit: in this VM, waking a thread whose CPU went idle costs
  tens of microseconds, more than the read itself. The memory random-read
  IOPS still swing by up to ±30%% between rounds for every server, with
  the load on the machine. The "4 fio jobs" row runs `--numjobs=4`: four
  fio processes, each with its own connection at QD32, their figures
  summed; four clients on 2 CPUs meet the client's limit sooner still.
- The memory rows use each server's RAM disk (nbdserve `memory`, nbdkit
  `memory`); qemu-nbd has none and serves a raw file in /dev/shm instead.
- TLS: pre-shared keys; each server negotiates its preferred cipher suite
  with nbdcopy (GnuTLS). nbdserve encrypts with mbedtls 2.28 and picks
  ChaCha20-Poly1305, its fastest suite here; nbdkit and qemu-nbd use
  GnuTLS. On the machine of the 2026-12-01 run, mbedtls alone encrypts
  348 MB/s with ChaCha20-Poly1305 and 259 MB/s with AES-128-GCM on one
  CPU, and a profile of nbdserve during this row shows 81%% of its time
  in mbedtls's crypto: the row measures the library's cipher code more
  than the server.
- qcow2 rows: nbdserve's `qcow2-readonly` plugin against `qemu-nbd -r -f
  qcow2 --cache=writeback --aio=%(aio)s` (qemu's own default cache and
  aio modes); nbdkit takes no part, as nbdkit 1.32 has no qcow2 reader. The images are made once per run by
  `qemu-img convert` and sit in /dev/shm: the plain one from the random
  data file, so every cluster is allocated and holds data; the compressed
  one (`-c -o compression_type=zstd`) from %(size)s of word-like text,
  which zstd halves, so every cluster is compressed; 64 KiB clusters.
  Image files: %(images)s. Sequential rows read them with
  `nbdcopy --connections=1 URI null:`, the random row with fio as above,
  over the whole virtual disk.
  The issue that added the plugin asks for 1.2× qemu-nbd on these rows,
  so their ✓ means 1.2× or better.
- Idle connections: %(idle)d clients connect over a Unix socket and finish
  the handshake (NBD_OPT_GO), then stay idle; time from the first connect to
  the last handshake, and the growth of the server's RSS divided by the
  number of clients.
""" % dict(date=time.strftime("%Y-%m-%d", time.localtime(started)), mode=mode, rounds=ROUNDS,
           warmup=WARMUP, size="%d MiB" % (SIZE >> 20), fio=FIO_SECONDS,
           multi="%d MiB" % (MULTI_SIZE >> 20),
           machine=info["machine"], nbdserve=info["nbdserve"], nbdkit=info["nbdkit"],
           qemu=info["qemu-nbd"], clients=info["clients"], table=table(rows),
           chart="![speed-up over the best peer](performance.png)\n" if have_chart else "",
           idle=IDLE_CONNS, aio=QEMU_QCOW2_AIO, cpus=CPUS,
           extra=extra or "(not measured in this run)",
           images=", ".join("%s %d MiB" % kv for kv in sorted(IMAGE_MIB.items())) or "not made")
    path = os.path.join(out_dir, "performance.md")
    with open(path, "w") as f:
        f.write(text)
    return path


# ---- Main ----------------------------------------------------------------------

def install_missing():
    needed = {"nbdkit": "nbdkit", "qemu-nbd": "qemu-utils", "qemu-img": "qemu-utils", "fio": "fio",
              "nbdcopy": "libnbd-bin", "psktool": "gnutls-bin"}
    if not SMOKE:
        needed["gnuplot"] = "gnuplot-nox"
    missing = sorted({pkg for tool, pkg in needed.items() if shutil.which(tool) is None})
    if missing and os.geteuid() == 0:
        log("installing " + " ".join(missing))
        subprocess.run(["apt-get", "install", "-y", "-q"] + missing,
                       env=dict(ENV, DEBIAN_FRONTEND="noninteractive"),
                       stdout=subprocess.DEVNULL)
    for tool in ("nbdcopy", "fio", "psktool"):
        if shutil.which(tool) is None:
            sys.exit("bench: %s is needed (install %s)" % (tool, needed[tool]))
    for kind in list(SERVERS[1:]):
        if shutil.which(kind) is None:
            log("%s is not installed: its column stays empty" % kind)
            SERVERS.remove(kind)


def main():
    install_missing()
    if not os.access(NBDSERVE, os.X_OK):
        sys.exit("bench: build nbdserve first (make)")
    out_dir = ENV.get("BENCH_OUT") or (tempfile.mkdtemp(prefix="nbdserve-bench-out.")
                                       if SMOKE else os.path.join(TOP, "docs"))
    os.makedirs(out_dir, exist_ok=True)
    only = set(filter(None, ENV.get("BENCH_ONLY", "").split(",")))

    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = tempfile.mkdtemp(prefix="nbdserve-bench.", dir=parent)
    started = time.time()
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
        with open(os.path.join(work, "data.bin"), "wb") as f:
            f.write(os.urandom(SIZE))
        subprocess.run(["psktool", "-u", "bench", "-p", psk_file(work)],
                       capture_output=True, check=True)
        os.chmod(psk_file(work), 0o600)
        chosen = [m for m in MEASUREMENTS if not only or m[0] in only]
        skipped = False
        if shutil.which("qemu-img") is None:
            # The qcow2 images are made by qemu-img; without it the rows go.
            log("qemu-img is not installed (qemu-utils): no qcow2 rows")
            skipped = any(m[1]["backend"] in QCOW2_IMAGES for m in chosen)
            chosen = [m for m in chosen if m[1]["backend"] not in QCOW2_IMAGES]
        make_images(work, {m[1]["backend"] for m in chosen})
        results = {}
        for m in chosen:
            log("%s (%s)" % (m[0], ", ".join(column if column == kind else kind + " " + column
                                              for column, kind, _ in variants(m))))
            run_measurement(work, m, results)
        rows = summarize(results)
        if only or skipped:  # just the rows of what ran
            rows = [r for r in rows if r["name"] in results]
        extra = extra_tables(results)
        path = write_report(rows, extra, out_dir, versions(), started)
        print(table(rows))
        if extra:
            print("\n" + extra)
        log("\nreport: %s (%.0f s)" % (path, time.time() - started))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
