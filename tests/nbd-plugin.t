#!/usr/bin/python3
# The nbd plugin: nbdserve in front of another NBD server.  In front of
# nbdserve, nbdkit and qemu-nbd (raw, and qcow2 with a dirty bitmap):
# nbdcopy round trips compared with cmp, nbdinfo --map (base:allocation,
# qemu:dirty-bitmap:NAME, qemu:allocation-depth) and qemu-img map equal
# to what the backend itself says, capabilities passed through; TLS to
# the backend (PSK and X.509); a backend killed mid-request gives clean
# errors and the front server goes on; with retry= a restarted backend is
# picked up, also by requests that waited for it; bad parameters are
# refused with clear messages.  Every wait of the test is bounded.
import json, os, shutil, signal, subprocess, sys, time
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd

for tool in ("nbdcopy", "nbdinfo", "qemu-img", "qemu-nbd", "qemu-io", "nbdkit", "certtool",
             "psktool"):
    if shutil.which(tool) is None:
        print("1..0 # SKIP %s is not installed" % tool)
        sys.exit(0)
if not os.path.exists(os.path.join(nbdtest.TOP, "plugins", "nbd", "nbdserve-nbd-plugin.so")):
    print("1..0 # SKIP the nbd plugin is not built")
    sys.exit(0)

t = nbdtest.Test(plan=65, watchdog=400, filters=("delay",))
tmp = t.tmp
MiB = 1 << 20


def run(*args, timeout=120):
    r = subprocess.run(list(args), capture_output=True, timeout=timeout)
    if r.returncode != 0:
        t.diag("%s: exit %d: %s" % (" ".join(args), r.returncode,
                                    r.stderr.decode(errors="replace")[:600]))
    return r


def out(*args):
    r = run(*args)
    return r.stdout.decode() if r.returncode == 0 else None


def backend(name, argv, sock):
    """Start a peer server (qemu-nbd, nbdkit) that listens on SOCK."""
    log = open(os.path.join(tmp, name + ".log"), "w")
    p = subprocess.Popen(argv, stdout=log, stderr=log)
    p.name, p.sock = name, sock
    t.servers.append(p)
    for _ in range(200):
        if os.path.exists(sock) or p.poll() is not None:
            break
        time.sleep(0.05)
    if not os.path.exists(sock):
        t.diag(t.log(name))
        raise RuntimeError("%s did not start" % name)
    return "nbd+unix:///?socket=" + sock


def kill(p):
    p.kill()
    p.wait(10)
    t.servers.remove(p)
    if os.path.exists(p.sock):
        os.unlink(p.sock)


def front(name, *params, options=()):
    return t.server(name, *options, "nbd", *params)


def uri_socket(uri):
    return uri.split("socket=", 1)[1]


def info_json(uri):
    text = out("nbdinfo", "--json", uri)
    if text is None:
        return {}
    e = json.loads(text)["exports"][0]
    e.pop("uri", None)
    e.pop("export-name", None)
    return e


def same_caps(front_uri, back_uri):
    """The proxy's capabilities against the backend's.  A backend that
    advertises no block size gets the server's defaults in front."""
    f, b = info_json(front_uri), info_json(back_uri)
    for k in ("block_size_minimum", "block_size_preferred", "block_size_maximum"):
        if k not in b:
            f.pop(k, None)
    if f != b:
        t.diag("proxy:   %r" % f)
        t.diag("backend: %r" % b)
    return f == b and f != {}


def round_trip(uri, size, label):
    """nbdcopy a random file in and out through URI; cmp."""
    src, back = os.path.join(tmp, "src.bin"), os.path.join(tmp, "back.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(size // 2))  # the second half stays a hole
        f.truncate(size)
    ok = run("nbdcopy", src, uri).returncode == 0 and run("nbdcopy", uri, back).returncode == 0
    ok = ok and run("cmp", "-n", str(size), src, back).returncode == 0
    t.ok(ok, "%s: nbdcopy in and out, cmp equal" % label)
    return src


def check_proxy(name, param, back_uri, size, label):
    """A front server with PARAM in front of BACK_URI: round trip, map and
    capabilities as the backend's; the front is stopped afterwards."""
    uri = front(name, param)
    round_trip(uri, size, label)
    t.is_(out("nbdinfo", "--map", uri), out("nbdinfo", "--map", back_uri),
          "%s: nbdinfo --map through the proxy equals the backend's" % label)
    t.ok(same_caps(uri, back_uri), "%s: capabilities pass through" % label)
    t.stop()


def deadline_wait(h, cookie, seconds):
    """Wait for an aio command, at most SECONDS; returns the errno name or 'ok'."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if h.aio_command_completed(cookie):
                return "ok"
        except nbd.Error as e:
            return e.errno if isinstance(e.errno, str) else str(e.errno)
        h.poll(100)
    return "timed out"


# ---- 1. In front of nbdserve memory -----------------------------------------------
back_uri = t.server("back", "memory", "64M")
uri = front("front", "socket=" + uri_socket(back_uri))
round_trip(uri, 32 * MiB, "nbdserve memory backend")
t.is_(out("nbdinfo", "--map", uri), out("nbdinfo", "--map", back_uri),
      "nbdinfo --map through the proxy equals the backend's")
t.ok(same_caps(uri, back_uri), "every capability and the block sizes pass through (nbdinfo --json)")

# Write-type requests with their flags reach the backend as such.
h = t.connect(uri)
h.pwrite(b"\x11" * 65536, 0, nbd.CMD_FLAG_FUA)
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
h.trim(65536, 65536)
h.flush()
h.cache(MiB, 0)
b = t.connect(back_uri)
t.ok(b.pread(131072, 0) == bytes(131072), "FUA write, fast zero, trim, flush, cache: "
     "the backend sees the zeroes")
# 64 pipelined reads of different data in flight at once.
for i in range(64):
    b.pwrite(bytes([i + 1]) * 4096, i * 4096)
bufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(bufs[i], i * 4096) for i in range(64)]
states = [deadline_wait(h, c, 20) for c in cookies]
t.ok(states == ["ok"] * 64 and
     all(bufs[i].to_bytearray() == bytes([i + 1]) * 4096 for i in range(64)),
     "64 pipelined reads all complete, each with its own data")
# A large read from a client that negotiated no block size (split by the server).
h2 = nbd.NBD()
h2.set_request_block_size(False)
h2.connect_uri(uri)
big = os.urandom(48 * MiB)
b.pwrite(big[:32 * MiB], 0)
b.pwrite(big[32 * MiB:], 32 * MiB)
t.ok(h2.pread(48 * MiB, 0) == big, "a 48 MiB read (above the 32 MiB block size) reads right")
h2.shutdown()
h.shutdown()
b.shutdown()
del h, h2, b

# connections=4: the backend allows multi-conn, so 4 links; nbdcopy over 4.
uri4 = front("front4", "uri=" + back_uri, "connections=4", options=("-v",))
src = os.path.join(tmp, "src4.bin")
with open(src, "wb") as f:
    f.write(os.urandom(16 * MiB))
back4 = os.path.join(tmp, "back4.bin")
ok = run("nbdcopy", "--connections=4", "--threads=4", src, uri4).returncode == 0 and \
    run("nbdcopy", "--connections=4", "--threads=4", uri4, back4).returncode == 0
t.ok(ok and run("cmp", "-n", str(16 * MiB), src, back4).returncode == 0,
     "connections=4 (multi-conn backend): nbdcopy over 4 connections in and out, cmp equal")
t.ok("nbd: 4 connections to the backend" in t.log("front4"),
     "... and the proxy kept its 4 backend connections")
t.stop()  # front4
t.stop(t.servers[-1])  # front
t.stop()  # back

# ---- 2. In front of nbdkit's memory plugin --------------------------------------
kit_sock = os.path.join(tmp, "kit.sock")
kit_uri = backend("nbdkit", ["nbdkit", "-f", "-U", kit_sock, "memory", "64M"], kit_sock)
check_proxy("front-kit", "uri=" + kit_uri, kit_uri, 16 * MiB, "nbdkit memory backend")
t.stop(t.servers[-1])
# Over TCP: hostname=, port=, export=.
import socket as socketmod
with socketmod.socket() as s_:
    s_.bind(("127.0.0.1", 0))
    port = s_.getsockname()[1]
log = open(os.path.join(tmp, "kit-tcp.log"), "w")
kp = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", "16M"],
                      stdout=log, stderr=log)
kp.name, kp.sock = "kit-tcp", os.path.join(tmp, "none")
t.servers.append(kp)
for _ in range(200):
    try:
        socketmod.create_connection(("127.0.0.1", port), timeout=1).close()
        break
    except OSError:
        time.sleep(0.05)
uri = front("front-tcp", "hostname=127.0.0.1", "port=%d" % port, "export=disk1")
round_trip(uri, 8 * MiB, "nbdkit over TCP (hostname=, port=, export=)")
t.stop()
t.stop(kp)

# ---- 3. In front of qemu-nbd: raw, then qcow2 with a bitmap ------------------------
raw = os.path.join(tmp, "disk.raw")
nbdtest.sparse_file(raw, 32 * MiB)
q_sock = os.path.join(tmp, "qraw.sock")
q_uri = backend("qemu-raw", ["qemu-nbd", "-f", "raw", "-t", "-e", "4", "-k", q_sock, raw], q_sock)
check_proxy("front-qraw", "socket=" + q_sock, q_uri, 32 * MiB, "qemu-nbd raw backend")
t.stop(t.servers[-1])

qcow2 = os.path.join(tmp, "disk.qcow2")
run("qemu-img", "create", "-q", "-f", "qcow2", qcow2, "64M")
run("qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 2M", "-c", "write -z 3M 1M", qcow2)
run("qemu-img", "bitmap", "--add", qcow2, "b1")
run("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 8M 64k", "-c", "write -P 0x43 20M 192k",
    "-c", "write -P 0x44 40M 1M", qcow2)
qq_sock = os.path.join(tmp, "qq.sock")
qq_uri = backend("qemu-qcow2", ["qemu-nbd", "-f", "qcow2", "-t", "-e", "4", "-B", "b1", "-A", "-r", "-k",
                                qq_sock, qcow2], qq_sock)
uri = front("front-qcow2", "socket=" + qq_sock)
contexts = out("nbdinfo", "--list", uri) or ""
t.ok(all(c in contexts for c in ("base:allocation", "qemu:dirty-bitmap:b1",
                                 "qemu:allocation-depth")),
     "qcow2 via qemu-nbd -B b1 -A: the proxy offers base:allocation, qemu:dirty-bitmap:b1 "
     "and qemu:allocation-depth")
for ctx in ("base:allocation", "qemu:dirty-bitmap:b1", "qemu:allocation-depth"):
    mine = out("nbdinfo", "--map=" + ctx, uri)
    t.ok(mine is not None and mine == out("nbdinfo", "--map=" + ctx, qq_uri),
         "nbdinfo --map=%s through the proxy equals qemu-nbd's" % ctx)
    if ctx == "qemu:dirty-bitmap:b1":
        t.ok(mine is not None and "dirty" in mine and "clean" in mine,
             "... and the bitmap has dirty and clean parts")
t.is_(out("qemu-img", "map", "--output=json", uri), out("qemu-img", "map", "--output=json", qq_uri),
      "qemu-img map (base:allocation and qemu:allocation-depth at once) equals qemu-nbd's")
ref = os.path.join(tmp, "ref.raw")
run("qemu-img", "convert", "-O", "raw", qcow2, ref)
copy = os.path.join(tmp, "copy.raw")
t.ok(run("nbdcopy", uri, copy).returncode == 0 and run("cmp", ref, copy).returncode == 0,
     "qcow2: nbdcopy out through the proxy equals qemu-img convert's raw image")
t.is_(info_json(uri).get("is_read_only"), True, "qemu-nbd -r: the proxy's export is read-only")
t.stop()
t.stop(t.servers[-1])

# ---- 4. TLS to the backend ----------------------------------------------------------
psk = os.path.join(tmp, "keys.psk")
run("psktool", "-u", "alice", "-p", psk)
back_uri = t.server("tls-back", "--tls=require", "--tls-psk=" + psk, "memory", "32M")
uri = front("front-psk", "socket=" + uri_socket(back_uri), "tls-psk=" + psk,
            "tls-username=alice")
round_trip(uri, 8 * MiB, "TLS-PSK to the backend (tls-psk=, tls-username=)")
t.ok(run("nbdinfo", "--size", back_uri).returncode != 0,
     "... which refuses clients without TLS (so the proxy did use it)")
uri_psk = "nbds+unix://alice@/?socket=%s&tls-psk-file=%s" % (uri_socket(back_uri), psk)
uri2 = front("front-nbds", "uri=" + uri_psk)
t.ok(out("nbdinfo", "--size", uri2) == "33554432\n", "uri=nbds+unix://alice@/?...&tls-psk-file=: "
     "the proxy serves the TLS backend")
t.stop()
t.stop(t.servers[-1])
# A wrong key: the front server does not start, and says why.
bad_psk = os.path.join(tmp, "bad.psk")
run("psktool", "-u", "alice", "-p", bad_psk)
r = run(nbdtest.NBDSERVE, "-f", "-U", os.path.join(tmp, "x.sock"), "nbd",
        "socket=" + uri_socket(back_uri), "tls-psk=" + bad_psk, "tls-username=alice", timeout=60)
t.ok(r.returncode != 0 and b"connection 0 to the backend" in r.stderr,
     "a wrong PSK: the front server stops at start-up with the backend's failure")
r = run(nbdtest.NBDSERVE, "-f", "-U", os.path.join(tmp, "x.sock"), "nbd",
        "socket=" + uri_socket(back_uri), "tls=off", timeout=60)
t.ok(r.returncode != 0, "tls=off to a backend that requires TLS: refused at start-up")
t.stop()

# X.509: a CA, a server and a client certificate.
def make_pki():
    ca_key, ca_cert = os.path.join(tmp, "ca-key.pem"), os.path.join(tmp, "ca-cert.pem")
    with open(os.path.join(tmp, "ca.info"), "w") as f:
        f.write("cn = test ca\nca\ncert_signing_key\nexpiration_days = 30\n")
    run("certtool", "--generate-privkey", "--outfile", ca_key)
    run("certtool", "--generate-self-signed", "--load-privkey", ca_key, "--template",
        os.path.join(tmp, "ca.info"), "--outfile", ca_cert)
    for role, usage in (("server", "tls_www_server\ndns_name = localhost\n"),
                        ("client", "tls_www_client\n")):
        d = os.path.join(tmp, role + "-pki")
        os.mkdir(d)
        key, cert = os.path.join(d, role + "-key.pem"), os.path.join(d, role + "-cert.pem")
        info = os.path.join(d, role + ".info")
        with open(info, "w") as f:
            f.write("cn = %s\n%sencryption_key\nsigning_key\nexpiration_days = 30\n" %
                    (role, usage))
        run("certtool", "--generate-privkey", "--outfile", key)
        os.chmod(key, 0o600)
        run("certtool", "--generate-certificate", "--load-ca-certificate", ca_cert,
            "--load-ca-privkey", ca_key, "--load-privkey", key, "--template", info,
            "--outfile", cert)
        os.unlink(info)
        shutil.copy(ca_cert, d)


make_pki()
back_uri = t.server("x509-back", "--tls=require",
                    "--tls-certificates=" + os.path.join(tmp, "server-pki"), "memory", "32M")
uri = front("front-x509", "socket=" + uri_socket(back_uri),
            "tls-certificates=" + os.path.join(tmp, "client-pki"), "tls=require")
round_trip(uri, 8 * MiB, "TLS with X.509 certificates to the backend (tls-certificates=)")
t.stop()
t.stop(t.servers[-1])

# ---- 5. The backend goes away ----------------------------------------------------------
back_uri = t.server("dying", "--filter=delay", "memory", "16M", "delay-read=1s")
back = t.last_server
uri = front("front-dying", "socket=" + uri_socket(back_uri))
fp = t.last_server
h = t.connect(uri)
h.pwrite(b"\x5a" * 4096, 0)
buf = nbd.Buffer(4096)
cookie = h.aio_pread(buf, 0)
time.sleep(0.3)  # the read waits in the backend's delay
kill(back)
state = deadline_wait(h, cookie, 10)
t.ok(state in ("EIO", "ESHUTDOWN"), "a read in flight when the backend dies fails with "
     "EIO or ESHUTDOWN, at once (%s)" % state)
t.ok(nbdtest.errno_of(lambda: h.pread(4096, 0)) in ("EIO", "ESHUTDOWN"),
     "the next read on that connection fails cleanly too (%s)" %
     nbdtest.errno_of(lambda: h.pread(4096, 0)))
t.ok(nbdtest.errno_of(lambda: h.pwrite(b"x" * 512, 0)) in ("EIO", "ESHUTDOWN"),
     "... and so does a write")
h.shutdown()
del h
t.ok(fp.poll() is None, "the front server is still running")
t.is_(out("nbdinfo", "--size", uri), "16777216\n",
      "... and still serves: a new client gets through the handshake and sees the export")
h = t.connect(uri)
t.ok(nbdtest.errno_of(lambda: h.pread(512, 0)) in ("EIO", "ESHUTDOWN"),
     "... whose requests fail cleanly without a backend")
h.shutdown()
del h
t.is_(t.stop(fp), 0, "the front server stops cleanly afterwards")

# A backend that stops answering (SIGSTOP) with a read in flight: SIGTERM
# still ends the front server, which cuts the backend connection after 5 s
# rather than hand the read's buffer back while libnbd may still fill it.
back_uri = t.server("frozen", "memory", "16M")
back = t.last_server
uri = front("front-frozen", "socket=" + uri_socket(back_uri))
fp = t.last_server
h = t.connect(uri)
t.freeze(back)
cookie = h.aio_pread(nbd.Buffer(65536), 0)
# h.poll returns once the request is written; give the front server time
# to read it and pass it to the frozen backend before SIGTERM, or the
# server stops with nothing in flight and there is nothing to cut.
settle = time.monotonic() + 1.5
while time.monotonic() < settle:
    h.poll(100)
t0 = time.monotonic()
rc = t.stop(fp, timeout=30)
took = time.monotonic() - t0
t.ok(rc == 0 and took < 20, "a frozen backend with a read in flight: SIGTERM ends the front "
     "server in %.1f s, exit %s" % (took, rc))
t.ok("cutting its connection" in t.log("front-frozen"), "... after cutting the backend connection")
back.send_signal(signal.SIGCONT)
t.stop(back)
del h

# ---- 6. retry=: a restarted backend is picked up -----------------------------------
sock = os.path.join(tmp, "phoenix.sock")


def start_phoenix(byte):
    """A new backend at the same path, holding BYTE: written before the
    socket moves there, so a front server waiting to reconnect can never
    read the backend before it holds the byte."""
    global phoenix
    t.server("phoenix", "memory", "16M")
    phoenix = t.last_server
    hb = t.connect("nbd+unix:///?socket=" + phoenix.sock)
    hb.pwrite(bytes([byte]) * 4096, 0)
    hb.shutdown()
    del hb
    os.rename(phoenix.sock, sock)  # the same path every time
    phoenix.sock = sock


start_phoenix(1)
uri = front("front-retry", "socket=" + sock, "retry=30s")
fp = t.last_server
h = t.connect(uri)
t.ok(h.pread(4096, 0) == b"\x01" * 4096, "retry=30s: reads from the first backend")
kill(phoenix)
time.sleep(0.5)
buf = nbd.Buffer(4096)
cookie = h.aio_pread(buf, 0)
time.sleep(1.5)
t.ok(h.aio_in_flight() == 1, "while the backend is away, a new read waits for it")
start_phoenix(2)
state = deadline_wait(h, cookie, 20)
t.ok(state == "ok" and buf.to_bytearray() == b"\x02" * 4096,
     "the backend restarted: the waiting read completes from it (%s)" % state)
t.ok(h.pread(4096, 0) == b"\x02" * 4096, "... and so do later requests on the same connection")
t.ok("is back" in t.log("front-retry"), "the front server logs the reconnection")
h.shutdown()
del h
t.stop(fp)

# retry=2: two attempts, then requests fail at once; a new client starts a new round.
uri = front("front-retry2", "socket=" + sock, "retry=2")
fp = t.last_server
h = t.connect(uri)
kill(phoenix)
t0 = time.monotonic()
e = nbdtest.errno_of(lambda: h.pread(512, 0))
t.ok(e in ("EIO", "ESHUTDOWN"), "retry=2: with the backend gone for good, a read fails (%s)" % e)
time.sleep(3)
t0 = time.monotonic()
e = nbdtest.errno_of(lambda: h.pread(512, 0))
t.ok(e in ("EIO", "ESHUTDOWN") and time.monotonic() - t0 < 5,
     "... after the 2 attempts, at once (%s)" % e)
t.ok("giving up" in t.log("front-retry2"), "... and the front server said it gave up")
start_phoenix(3)
h3 = t.connect(uri)  # a new client: a new round of attempts
end = time.monotonic() + 20
got = None
while time.monotonic() < end:
    try:
        got = h3.pread(4096, 0)
        break
    except nbd.Error:
        time.sleep(0.3)
t.ok(got == b"\x03" * 4096, "a new client after the backend came back starts a new round, "
     "and reads from it")
h.shutdown()
h3.shutdown()
del h, h3
t.is_(t.stop(fp), 0, "the front server stops cleanly")
t.stop(phoenix)

# ---- 6b. Clients that leave while their reads wait on the backend -----------------
# With --no-inline the front server's requests run on workers and wait for the backend's
# answers without a thread: parked on their connection, woken straight
# onto the workers (server/wait.c).  A client that leaves cuts those
# waits short; the backend's answers come later and find nothing to wake.
back_uri = t.server("slow-back", "--filter=delay", "memory", "16M", "delay-read=1s")
uri = front("front-leave", "socket=" + uri_socket(back_uri), options=("-v", "-t", "2", "--no-inline"))
fp = t.last_server
h = t.connect(uri)
h.pwrite(b"\x6b" * (1 << 20), 0)
h.shutdown()
del h
t.ok("requests run on worker threads" in t.log("front-leave"),
     "--no-inline: the nbd plugin's requests run on worker threads")
import struct
for round_ in range(3):
    raws = [nbdtest.raw_go(uri_socket(uri)) for _ in range(4)]
    for s in raws:
        s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, i * 65536, 65536)
                           for i in range(16)))
    time.sleep(0.3)  # the reads wait in the backend's delay
    for s in raws:
        s.close()
h = t.connect(uri)
t0 = time.monotonic()
data = h.pread(1 << 20, 0)
t.ok(fp.poll() is None and data == b"\x6b" * (1 << 20),
     "192 reads cut short by 12 clients that left: the front server still serves, "
     "the data intact (%.1f s)" % (time.monotonic() - t0))
h.shutdown()
del h
time.sleep(1.5)  # the backend's late answers arrive: their wakes find the waits over
t.is_(t.stop(fp), 0, "... and stops cleanly after the backend's late answers")
t.stop()

# ---- 7. Bad parameters ---------------------------------------------------------------
def refused(params, words, desc):
    try:
        r = subprocess.run([nbdtest.NBDSERVE, "-f", "-U", os.path.join(tmp, "bad.sock"), "nbd"]
                           + params, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        t.ok(False, desc + " (hung)")
        return
    err = r.stderr.decode(errors="replace")
    if not t.ok(r.returncode != 0 and all(w in err for w in words), desc):
        t.diag(err)


refused([], ["exactly one of uri=, socket= or hostname="], "no backend named: refused")
refused(["socket=/a", "hostname=b"], ["exactly one", "more than one"], "two backends: refused")
refused(["uri=http://x/"], ["nbd://"], "a URI of another scheme: refused")
refused(["socket=/a", "port=1"], ["port= goes with hostname="], "port= without hostname=")
refused(["uri=nbd://localhost/x", "export=y"], ["export="], "export= with uri=")
refused(["socket=/a", "tls=maybe"], ["tls=maybe", "off, on or require"], "tls=maybe")
refused(["socket=/a", "connections=0"], ["connections=0"], "connections=0")
refused(["socket=/a", "connections=17"], ["connections=17"], "connections=17")
refused(["socket=/a", "retry=soon"], ["retry=soon"], "retry=soon")
refused(["socket=/a", "retry=5x"], ["retry=5x"], "retry=5x (an unknown unit)")
refused(["socket=/a", "colour=blue"], ["unknown parameter 'colour'"], "an unknown parameter")
refused(["socket=/a", "socket=/b"], ["socket= is given twice"], "socket= twice")
refused(["socket=/a", "tls=off", "tls-psk=/x"], ["tls=off"], "tls=off with tls-psk=")
refused(["socket=" + os.path.join(tmp, "nobody.sock")], ["connection 0 to the backend",
                                                         "No such file"],
        "a backend that is not there: start-up fails with the reason")

t.finish()
