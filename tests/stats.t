#!/usr/bin/python3
# The stats filter: totals per kind equal what a client sent (one read
# failed on purpose by the error filter underneath), size histograms put
# 512, 4096 and 65536 in their buckets, per-connection lines, the same
# figures from stats.show, SIGUSR1 and the exit printout, and --help
# agreeing with stats.md.
import os, re, signal, subprocess, sys, time
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import errno_of

t = nbdtest.Test(plan=25, filters=("stats", "error"))
CTL = os.path.join(nbdtest.TOP, "nbdserve-ctl")


def parse(text):
    d = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            d[k] = v
    return d


def blocks(path):
    """The printouts in PATH, each a dict."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return []
    return [parse(b) for b in text.split("\n\n") if b.strip()]


def wait_for(cond, secs=10):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def kind_figures(d, prefix):
    """{kind: (requests, bytes, errors)} from a printout."""
    out = {}
    for k in ("read", "write", "zero", "trim", "flush", "cache", "extents"):
        out[k] = tuple(int(d.get("%s.%s.%s" % (prefix, k, f), "-1"))
                       for f in ("requests", "bytes", "errors"))
    return out


def histogram(d, prefix, kind, what):
    pat = re.compile(r"^%s\.%s\.%s\.(\d+)$" % (re.escape(prefix), kind, what))
    return {int(m.group(1)): int(v) for k, v in d.items() for m in [pat.match(k)] if m}


ctl = os.path.join(t.tmp, "stats.ctl")
out = os.path.join(t.tmp, "stats.out")
fail = os.path.join(t.tmp, "fail-reads")
uri = t.server("stats", "--control=" + ctl, "--filter=stats", "--filter=error",
               "memory", "1M", "error-pread-rate=1", "error-pread-file=" + fail,
               "statsfile=" + out)
server = t.last_server
h = t.connect(uri)

# Known numbers of requests of known sizes.
for i in range(3):
    h.pwrite(b"a" * 4096, i * 4096)
for i in range(2):
    h.pwrite(b"b" * 65536, 65536 * (i + 1))
for i in range(4):
    h.pread(512, i * 512)
h.pread(65536, 0)
h.zero(4096, 0)
h.zero(4096, 8192)
h.trim(65536, 131072)
for _ in range(3):
    h.flush()
open(fail, "w").close()
err = errno_of(lambda: h.pread(4096, 0))
os.unlink(fail)
t.is_(err, "EIO", "the error filter underneath fails the one read")

want = {
    "read": (6, 4 * 512 + 65536 + 4096, 1),
    "write": (5, 3 * 4096 + 2 * 65536, 0),
    "zero": (2, 8192, 0),
    "trim": (1, 65536, 0),
    "flush": (3, 0, 0),
    "cache": (0, 0, 0),
    # The server asks block status itself before a structured read of
    # 64 KiB, to send holes as such: the filter sees that query too.
    "extents": (1, 65536, 0),
}

r = subprocess.run([CTL, ctl, "stats.show"], capture_output=True, text=True, timeout=30)
show = parse(r.stdout)
t.is_(r.returncode, 0, "stats.show answers ok")
t.is_(show.get("stats"), "show", "stats.show: stats=show")
t.is_(kind_figures(show, "server"), want, "stats.show: server totals are what was sent")
conns = sorted({k.split(".")[1] for k in show if k.startswith("conn.")})
t.is_(len(conns), 1, "stats.show: one connection has lines")
cid = conns[0] if conns else "?"
t.is_(show.get("conn.%s.state" % cid), "open", "stats.show: the connection is open")
t.ok(show.get("conn.%s.peer" % cid, "").startswith("unix:"), "stats.show: the peer is named")
t.is_({k: v for k, v in kind_figures(show, "conn." + cid).items() if v[0] > 0},
      {k: v for k, v in want.items() if v[0] > 0},
      "stats.show: per-connection totals are what was sent")
t.is_(histogram(show, "server", "read", "size"), {512: 4, 4096: 1, 65536: 1},
      "read sizes 512, 4096, 65536 land in their buckets")
t.is_(histogram(show, "server", "write", "size"), {4096: 3, 65536: 2},
      "write sizes land in their buckets")
t.is_(histogram(show, "server", "trim", "size"), {65536: 1}, "trim size bucket")
t.is_(histogram(show, "server", "flush", "size"), {}, "no size histogram for flush")
lat = histogram(show, "server", "write", "latency_us")
t.ok(sum(lat.values()) == 5 and all(b == 0 or b & (b - 1) == 0 for b in lat),
     "write latencies: 5 requests in power-of-two buckets %r" % lat)

r = subprocess.run([CTL, ctl, "stats.show", "server"], capture_output=True, text=True,
                   timeout=30)
only = parse(r.stdout)
t.ok(r.returncode == 0 and kind_figures(only, "server") == want
     and not any(k.startswith("conn.") for k in only),
     "stats.show server: totals without per-connection lines")

# SIGUSR1 while serving: a block in the statsfile, same figures.
server.send_signal(signal.SIGUSR1)
wait_for(lambda: any(b.get("stats") == "signal" for b in blocks(out)))
sig = [b for b in blocks(out) if b.get("stats") == "signal"]
t.ok(len(sig) == 1 and server.poll() is None, "SIGUSR1 prints one block and the server goes on")
t.is_(kind_figures(sig[0] if sig else {}, "server"), want, "SIGUSR1: same totals as stats.show")
t.ok(h.pread(512, 0) == bytes(512), "the server still serves after SIGUSR1")
h.shutdown()

# A second connection, then the exit printout.
h2 = t.connect(uri)
h2.pwrite(b"c" * 512, 0)
h2.shutdown()
rc = t.stop()
t.is_(rc, 0, "the server exits cleanly")
ex = [b for b in blocks(out) if b.get("stats") == "exit"]
t.is_(len(ex), 1, "one exit block in the statsfile")
e = ex[0] if ex else {}
want_exit = dict(want)
want_exit["read"] = (7, want["read"][1] + 512, 1)
want_exit["write"] = (6, want["write"][1] + 512, 0)
t.is_(kind_figures(e, "server"), want_exit, "exit: totals of both connections")
states = {k.split(".")[1]: v for k, v in e.items() if re.match(r"^conn\.\d+\.state$", k)}
t.ok(len(states) == 2 and set(states.values()) == {"closed"} and e.get("server.open") == "0",
     "exit: both connections have lines, closed: %r" % states)

# Without statsfile= the printout goes to stderr.
uri = t.server("stderr", "--filter=stats", "memory", "1M")
h = t.connect(uri)
h.pwrite(b"d" * 4096, 0)
h.shutdown()
t.stop()
log = parse(t.log("stderr"))
t.ok(log.get("stats") == "exit" and log.get("server.write.requests") == "1",
     "without statsfile= the exit printout goes to stderr")

# An unopenable statsfile stops the server at start-up.
r = subprocess.run([nbdtest.NBDSERVE, "-f", "-U", os.path.join(t.tmp, "x.sock"),
                    "--filter=stats", "memory", "1M",
                    "statsfile=" + os.path.join(t.tmp, "no", "such", "dir")],
                   capture_output=True, text=True, timeout=30)
t.ok(r.returncode != 0 and "statsfile" in r.stderr, "an unopenable statsfile stops start-up")

# --help agrees with stats.md: the same parameters and defaults.
r = subprocess.run([nbdtest.NBDSERVE, "--help", "--filter=stats", "memory"],
                   capture_output=True, text=True, timeout=30)
helptext = r.stdout[r.stdout.find("Filter stats"):]
with open(os.path.join(nbdtest.TOP, "filters", "stats", "stats.md")) as f:
    md = f.read()
help_keys = set(re.findall(r"^(stat[a-z-]*)=", helptext, re.M))
md_params = md[md.find("## Parameters"):md.find("## Output")]
md_keys = set(re.findall(r"^`(stat[a-z-]*)=", md_params, re.M))
t.ok(help_keys and help_keys == md_keys, "--help and stats.md list the same parameters: %r %r"
     % (sorted(help_keys), sorted(md_keys)))
t.ok("default: 16" in helptext and "(default 16)" in md and "SIGUSR1" in helptext
     and "SIGUSR1" in md and "stats.show" in helptext,
     "--help and stats.md agree on the default of stats-keep, SIGUSR1 and stats.show")

t.finish()
