#!/usr/bin/python3
# Server limits: --handshake-timeout closes a client that stalls in the
# handshake, --max-connections refuses extra clients at once; in both
# cases the good clients keep being served, byte for byte.
import os, socket, struct, subprocess, sys, threading, time
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest

t = nbdtest.Test(plan=14)
NBDMAGIC = b"NBDMAGIC"


def raw(uri):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(uri.split("socket=")[1])
    return s


def read_all(s):
    """Everything the server sends until it closes; None if it does not."""
    data = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return data
            data += chunk
    except socket.timeout:
        return None


def round_trip(uri, tag):
    h = t.connect(uri)
    payload = bytes([tag]) * 65536
    h.pwrite(payload, tag * 65536)
    ok = h.pread(65536, tag * 65536) == payload
    h.shutdown()
    return ok


# ---- handshake timeout ----
uri = t.server("timeout", "--handshake-timeout=1", "memory", "16M")
stalled = raw(uri)
greeting = stalled.recv(18)
t.ok(greeting[:8] == NBDMAGIC, "a stalled client gets the greeting")
t.ok(round_trip(uri, 1), "a good client is served while another stalls in the handshake")
start = time.monotonic()
rest = read_all(stalled)
took = time.monotonic() - start
t.ok(rest == b"" and took < 5, "the stalled client is closed after the timeout (%.2f s)" % took)
# A client that finished its handshake is not subject to the timeout.
h = t.connect(uri)
time.sleep(1.5)
t.ok(h.pread(4, 0) == b"\0" * 4, "a connected client idle past the timeout keeps its connection")
h.shutdown()
t.ok("handshake not finished in time" in t.log("timeout"), "the timeout is logged")
t.stop()

# --handshake-timeout=0 means no limit: the client is still open later.
uri = t.server("notimeout", "--handshake-timeout=0", "memory", "1M")
s = raw(uri)
s.recv(18)
s.settimeout(1.5)
try:
    closed = s.recv(1) == b""
except socket.timeout:
    closed = False
t.ok(not closed, "--handshake-timeout=0: a slow client is not closed")
s.close()
t.stop()

# ---- max connections ----
uri = t.server("maxconn", "--max-connections=2", "memory", "16M")
held = [t.connect(uri), t.connect(uri)]
extra = raw(uri)
got = read_all(extra)
t.ok(got == b"", "a third client over --max-connections=2 is closed before the greeting")
held[0].pwrite(b"held" * 1024, 0)
t.ok(held[1].pread(4096, 0) == b"held" * 1024, "the two held clients keep working")
held[0].shutdown()
time.sleep(0.2)
t.ok(round_trip(uri, 3), "once one leaves, a new client is served")
held[1].shutdown()
t.ok("--max-connections" in t.log("maxconn"), "the refusal is logged")
t.stop()

# ---- options per handshake ----
uri = t.server("options", "memory", "1M")
s = raw(uri)
s.recv(18)
flood = struct.pack(">I", 3) + (b"IHAVEOPT" + struct.pack(">II", 99, 0)) * 16400
# Send from a thread: the server answers as it reads, and a client that
# only sends would fill both directions and wait forever.
def send_flood():
    try:
        s.sendall(flood)
    except OSError:
        pass  # closed by the server before the end: expected


sender = threading.Thread(target=send_flood, daemon=True)
sender.start()
replies, data = 0, b""
s.settimeout(30)
while True:
    try:
        chunk = s.recv(65536)
    except (socket.timeout, ConnectionError):
        break
    if not chunk:
        break
    data += chunk
while len(data) >= 20:
    length = struct.unpack(">I", data[16:20])[0]
    data = data[20 + length:]
    replies += 1
t.is_(replies, 16384, "a client sending 16,400 options gets 16,384 answers, then is closed")
t.ok(round_trip(uri, 4), "the server serves others afterwards")
t.stop()

# ---- a client that never reads does not keep a stopping server alive ----
uri = t.server("deaf", "memory", "64M")
s = raw(uri)
s.recv(18)
s.sendall(struct.pack(">I", 1) + b"IHAVEOPT" + struct.pack(">II", 7, 6) + struct.pack(">IH", 0, 0))
time.sleep(0.3)
s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 16 << 20) for i in range(8)))
time.sleep(0.5)
start = time.monotonic()
rc = t.stop(timeout=30)
took = time.monotonic() - start
t.ok(rc == 0 and took < 20 and "dropping them" in t.log("deaf"),
     "SIGTERM with a client not reading 128 MiB of replies: exit %s after %.1f s" % (rc, took))
s.close()

bad = [subprocess.run([nbdtest.NBDSERVE, "-U", "-", opt, "memory", "1M", "--run", "true"],
                      capture_output=True, text=True, timeout=30)
       for opt in ("--handshake-timeout=-1", "--handshake-timeout=soon", "--max-connections=x")]
t.ok(all(r.returncode == 1 and "nbdserve:" in r.stderr for r in bad),
     "bad limit values are refused: " + " | ".join(r.stderr.strip() for r in bad))
t.finish()
