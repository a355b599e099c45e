"""Shared helpers for the Python tests: TAP output, servers, clean-up.

    import nbdtest
    t = nbdtest.Test(plan=3)
    uri = t.server("mem", "memory", "64M")
    h = t.connect(uri)
    t.ok(h.pread(512, 0) == bytes(512), "reads zeroes")
    t.finish()

A watchdog (SIGALRM) ends a test that hangs; servers are stopped and the
temporary directory removed however the test ends.
"""
# SPDX-License-Identifier: BSD-3-Clause
import atexit
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# NBDSERVE_BINARY runs the tests against another server (e.g. a wrapper
# around nbdkit, to check the tests themselves).
NBDSERVE = os.environ.get("NBDSERVE_BINARY") or os.path.join(TOP, "nbdserve")

try:
    import nbd
except ImportError:
    nbd = None


def _sanitized():
    """Whether the server is a sanitizer build (make SANITIZE=1 or
    TSAN=1): their allocators keep freed memory in quarantine and shadow
    memory, so memory figures mean nothing there."""
    try:
        out = subprocess.run(["ldd", NBDSERVE], capture_output=True, text=True).stdout
    except OSError:
        return False
    return "libasan" in out or "libtsan" in out


SANITIZED = _sanitized()


class Hang(Exception):
    """The watchdog fired."""


class Test:
    def __init__(self, plan, watchdog=240, filters=()):
        if nbd is None:
            print("1..0 # SKIP python3-libnbd is not installed")
            sys.exit(0)
        for f in filters:
            built = os.path.join(TOP, "filters", f, "nbdserve-%s-filter.so" % f)
            if not os.environ.get("NBDSERVE_BINARY") and not os.path.exists(built):
                print("1..0 # SKIP the %s filter is not built" % f)
                sys.exit(0)
        self.planned = plan
        self.count = 0
        self.failed = 0
        self.servers = []
        parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.tmp = tempfile.mkdtemp(prefix="nbdserve-test.", dir=parent)
        os.environ["TMPDIR"] = self.tmp
        atexit.register(self.cleanup)
        signal.signal(signal.SIGALRM, self._hang)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        # A hang, not slowness, is what the watchdog is for: sanitizer
        # builds run several times slower (TSAN most).
        signal.alarm(watchdog * 4 if SANITIZED else watchdog)
        print("1..%d" % plan, flush=True)

    @staticmethod
    def _hang(*_):
        raise Hang("watchdog: the test took too long")

    # ---- TAP ----
    def ok(self, cond, desc, todo=None):
        """todo: the reason a failure is a known server bug (TAP TODO):
        shown, but it does not fail the suite."""
        self.count += 1
        if not cond and not todo:
            self.failed += 1
        print("%s %d - %s%s" % ("ok" if cond else "not ok", self.count, desc,
                                " # TODO " + todo if todo else ""), flush=True)
        return cond

    def is_(self, got, want, desc):
        if not self.ok(got == want, desc):
            self.diag("got:      %r" % (got,))
            self.diag("expected: %r" % (want,))

    def diag(self, msg):
        for line in str(msg).splitlines():
            print("# " + line, flush=True)

    def skip(self, desc):
        self.count += 1
        print("ok %d # SKIP %s" % (self.count, desc), flush=True)

    # ---- servers ----
    def server(self, name, *args):
        """Start `nbdserve -f -U SOCK ARGS`; returns its URI."""
        sock = os.path.join(self.tmp, name + ".sock")
        log = open(os.path.join(self.tmp, name + ".log"), "w")
        p = subprocess.Popen([NBDSERVE, "-f", "-U", sock] + list(args), stderr=log)
        p.sock = sock
        p.name = name
        self.servers.append(p)
        for _ in range(200):
            if os.path.exists(sock) or p.poll() is not None:
                break
            time.sleep(0.05)
        if not os.path.exists(sock):
            self.diag("server %s did not start: %s" % (name, " ".join(args)))
            self.diag(self.log(name))
            raise RuntimeError("server did not start")
        self.last_server = p
        return "nbd+unix:///?socket=" + sock

    def log(self, name):
        try:
            with open(os.path.join(self.tmp, name + ".log")) as f:
                return f.read()
        except OSError:
            return ""

    def freeze(self, p, timeout=10):
        """SIGSTOP a server and wait until every one of its threads is
        stopped: kill() returns before the stop takes effect, and on a
        loaded machine a thread can still answer a request after it."""
        p.send_signal(signal.SIGSTOP)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            states = []
            for task in os.listdir("/proc/%d/task" % p.pid):
                try:
                    with open("/proc/%d/task/%s/stat" % (p.pid, task)) as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
                except OSError:
                    pass
            if states and all(s in ("T", "t") for s in states):
                return
            time.sleep(0.01)
        raise RuntimeError("server %s did not stop on SIGSTOP" % p.name)

    def stop(self, p=None, sig=signal.SIGTERM, timeout=10):
        """Stop a server (the last one by default); returns its exit status."""
        p = p or self.last_server
        if p.poll() is None:
            p.send_signal(sig)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.diag("server %s ignored signal %d; killing it" % (p.name, sig))
            p.kill()
            rc = p.wait()
        if p in self.servers:
            self.servers.remove(p)
        self.check_sanitizer(p.name)
        return rc

    def check_sanitizer(self, name):
        text = self.log(name)
        if "AddressSanitizer" in text or "runtime error:" in text or "ThreadSanitizer" in text:
            self.failed += 1
            self.diag("sanitizer report from server %s:" % name)
            self.diag(text[:4000])

    def connect(self, uri, contexts=(), strict=True):
        h = nbd.NBD()
        for c in contexts:
            h.add_meta_context(c)
        h.connect_uri(uri)
        if not strict:
            # Let the server, not libnbd, judge the requests.
            h.set_strict_mode(0)
        return h

    def cleanup(self):
        signal.alarm(0)
        for p in list(self.servers):
            self.stop(p)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self):
        self.cleanup()
        if self.count != self.planned:
            self.diag("planned %d tests but ran %d" % (self.planned, self.count))
            sys.exit(1)
        sys.exit(1 if self.failed else 0)


def errno_of(fn):
    """Run fn; the symbolic errno of the nbd.Error it raises, or 'no error'."""
    try:
        fn()
    except nbd.Error as e:
        # libnbd gives the symbolic name ("EPERM"); older versions a number.
        if isinstance(e.errno, str) and e.errno:
            return e.errno
        if isinstance(e.errno, int):
            return errno.errorcode.get(e.errno, str(e.errno))
        return "nbd.Error without errno: %s" % e
    return "no error"


# ---- Raw protocol, for what libnbd will not do -------------------------------
def sparse_file(path, size):
    """Create PATH as a file of SIZE bytes with no data in it; returns PATH."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def recv_exactly(s, n):
    """N bytes from socket S; EOFError if the server closes first."""
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def raw_go(sock, flags=1):
    """A raw Unix-socket connection taken through NBD_OPT_GO for the
    default export (client FLAGS: 1 = fixed newstyle), with simple
    replies: every READ reply carries all its data."""
    import socket
    import struct
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    recv_exactly(s, 18)
    s.sendall(struct.pack(">I", flags) + b"IHAVEOPT" + struct.pack(">II", 7, 6) +
              struct.pack(">IH", 0, 0))
    while True:
        _magic, _opt, rtype, length = struct.unpack(">QIII", recv_exactly(s, 20))
        recv_exactly(s, length)
        if rtype == 1:
            return s
        if rtype & 0x80000000:
            raise RuntimeError("NBD_OPT_GO refused (%#x)" % rtype)


def raw_request(cmd, offset, length, cookie=1, flags=0):
    """A compact request header."""
    import struct
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)
