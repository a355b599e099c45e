#!/usr/bin/python3
# The log filter: every request of a scripted session is logged with the
# fields it was sent with; errors from a layer below are logged by name;
# under a 10-second full-speed fio run and with a log nobody reads, lines logged +
# lines reported dropped == lines the requests made, and every line is
# whole; logappend; --help agrees with log.md.
import json, os, re, shutil, subprocess, sys, threading
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd, errno_of, NBDSERVE, TOP

t = nbdtest.Test(plan=23, filters=("log", "error"))

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
REQUEST = re.compile(r"^(%s) conn=(\d+) export=(\"[^\" ]*\") (Read|Write|Zero|Trim|Flush|Cache|Extents)"
                     r" offset=(\d+) length=(\d+) flags=([A-Z_,]+|-) result=(OK|E[A-Z]+)"
                     r" latency=(\d+)us( context=\S+)?$" % TIME)
EVENT = re.compile(r"^(%s) conn=(\d+) export=(\"[^\" ]*\") (Connect|Disconnect) peer=(\S+)$" % TIME)
DROPPED = re.compile(r"^(%s) dropped (\d+) lines$" % TIME)


def parse(text):
    """(requests, events, dropped, bad lines) of a log."""
    reqs, events, dropped, bad = [], [], 0, []
    for line in text.split("\n")[:-1]:
        m = REQUEST.match(line)
        if m:
            reqs.append(m.groups())
            continue
        m = EVENT.match(line)
        if m:
            events.append(m.groups())
            continue
        m = DROPPED.match(line)
        if m:
            dropped += int(m.group(2))
            continue
        bad.append(line)
    if text and not text.endswith("\n"):
        bad.append(text.rsplit("\n", 1)[-1])
    return reqs, events, dropped, bad


def read(path):
    with open(path) as f:
        return f.read()


# ---- 1. a scripted session, field by field ----
logfile = os.path.join(t.tmp, "session-requests.log")
uri = t.server("session", "-v", "--filter=log", "memory", "1M", "logfile=" + logfile)
h = t.connect(uri, contexts=("base:allocation",))
fua = nbd.CMD_FLAG_FUA if h.can_fua() else 0
sent = []  # (command, offset, length, flags) as the filter should see them
h.pwrite(b"a" * 4096, 8192, fua)
sent.append(("Write", 8192, 4096, "FUA" if fua else "-"))
h.pread(512, 8192)
sent.append(("Read", 8192, 512, "-"))
h.zero(4096, 16384)  # no NO_HOLE: the server may punch a hole
sent.append(("Zero", 16384, 4096, "MAY_TRIM"))
if h.can_fast_zero():
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
    sent.append(("Zero", 0, 4096, "FAST_ZERO"))
h.trim(4096, 8192)
sent.append(("Trim", 8192, 4096, "-"))
h.flush()
sent.append(("Flush", 0, 0, "-"))
if h.can_cache():
    h.cache(65536, 0)
    sent.append(("Cache", 0, 65536, "-"))
h.block_status(65536, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
sent.append(("Extents", 0, 65536, "REQ_ONE"))
h.shutdown()
t.stop()  # unload writes every queued line before the server exits

reqs, events, dropped, bad = parse(read(logfile))
t.is_(bad, [], "session: every line has the documented format")
t.is_([(r[3], int(r[4]), int(r[5]), r[6]) for r in reqs], sent,
      "session: each request is logged once, in order, with its offset, length and flags")
t.ok(all(r[7] == "OK" for r in reqs), "session: every result is OK")
t.ok(len({r[1] for r in reqs} | {e[1] for e in events}) == 1 and reqs and reqs[0][1] != "0",
     "session: every line names the same connection id")
t.ok(all(r[2] == '""' for r in reqs), 'session: the default export is logged as ""')
t.is_([e[3] for e in events], ["Connect", "Disconnect"], "session: connect and disconnect lines")
t.ok(all(e[4].startswith("unix:uid=%d," % os.getuid()) for e in events),
     "session: the peer is the unix socket client (%s)" % (events[0][4] if events else "?"))
t.ok(dropped == 0, "session: nothing dropped")
t.ok(re.search(r"requests run on the loop threads$", t.log("session"), re.M),
     "session: the filter never blocks: a chain over memory runs on the loop threads")
times = [r[0] for r in reqs]
t.ok(times == sorted(times), "session: times are ISO 8601 with microseconds, in order")

# ---- 2. errors from below the filter ----
logfile = os.path.join(t.tmp, "error-requests.log")
uri = t.server("error", "--filter=log", "--filter=error", "memory", "1M",
               "error-pread-rate=100%", "logfile=" + logfile)
h = t.connect(uri)
werr = errno_of(lambda: h.pwrite(b"b" * 512, 0))
rerr = errno_of(lambda: h.pread(512, 0))
h.shutdown()
t.stop()
reqs, events, dropped, bad = parse(read(logfile))
t.is_((werr, rerr), ("no error", "EIO"), "error filter below: the client sees EIO on reads")
t.is_([(r[3], r[7]) for r in reqs], [("Write", "OK"), ("Read", "EIO")],
      "error filter below: the failed read is logged with result=EIO")

# ---- 3. fio at full speed for 10 s: nothing lost without saying so ----
logfile = os.path.join(t.tmp, "fio-requests.log")
uri = t.server("fio", "--filter=log", "memory", "64M", "logfile=" + logfile)
if shutil.which("fio"):
    out = subprocess.run(["fio", "--name=log", "--ioengine=nbd", "--uri=" + uri, "--rw=randrw",
                          "--bs=4k", "--iodepth=32", "--time_based", "--runtime=10",
                          "--size=64M", "--output-format=json"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    t.stop()
    reqs, events, dropped, bad = parse(read(logfile))
    os.unlink(logfile)  # some 100 MB of /dev/shm
    data = sum(1 for r in reqs if r[3] in ("Read", "Write"))
    t.diag("fio: %d requests, %d logged, %d dropped, %d other lines, %d connect/disconnect"
           % (ios, data, dropped, len(reqs) - data, len(events)))
    t.is_(bad, [], "fio: every line is whole and well formed (no interleaving)")
    t.ok(ios > 10000, "fio ran at speed for 10 s (%d requests)" % ios)
    # Every line the connections made is in the log or in a dropped count.
    # fio sends only reads and writes, and makes a connect and a
    # disconnect line per connection: when nothing is dropped, the events
    # logged say how many connections there were; a dropped line may be
    # one of them, so then the data lines are checked against the count
    # with room for the events alone.
    if dropped == 0:
        t.is_((data, len(reqs) - data, len(events) % 2), (ios, 0, 0),
              "fio: every read and write is logged, no other request, whole connections")
    else:
        t.ok(data <= ios <= data + dropped <= ios + len(events) + 2 * 4,
             "fio: reads and writes logged (%d) + lines dropped (%d) account for the %d sent"
             % (data, dropped, ios))
else:
    t.stop()
    for d in ("fio: lines whole", "fio: at speed", "fio: counted"):
        t.skip("fio is not installed: " + d)

# ---- 4. a log nobody reads: the queue fills, lines are dropped and counted ----
fifo = os.path.join(t.tmp, "log.fifo")
os.mkfifo(fifo)
rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that the server's open does not wait
uri = t.server("fifo", "--filter=log", "memory", "1M", "logfile=" + fifo, "logqueue=64K")
h = t.connect(uri)
N = 20000
buf = b"c" * 512
failures = []
for i in range(N):
    while h.aio_in_flight() >= 64:
        h.poll(-1)
    h.aio_pwrite(buf, (i % 2048) * 512,
                 completion=lambda err: (failures.append(err.value) if err.value else None) or 1)
while h.aio_in_flight():
    h.poll(-1)
t.ok(not failures, "fifo: %d writes succeed while the log is stuck" % N)
chunks = []


def reader():
    os.set_blocking(rfd, True)
    while True:
        b = os.read(rfd, 1 << 16)
        if not b:
            break
        chunks.append(b)


th = threading.Thread(target=reader)
th.start()
h.shutdown()
t.stop()
th.join(30)
os.close(rfd)
reqs, events, dropped, bad = parse(b"".join(chunks).decode())
t.is_(bad, [], "fifo: every line is whole and well formed")
t.ok(dropped > 0, "fifo: lines were dropped (%d) and reported" % dropped)
t.is_(len(reqs) + len(events) + dropped, N + 2,
      "fifo: lines logged (%d) + dropped (%d) == requests + connect + disconnect"
      % (len(reqs) + len(events), dropped))

# ---- 5. logappend ----
logfile = os.path.join(t.tmp, "appended.log")
with open(logfile, "w") as f:
    f.write("old line\n")
t.server("append", "--filter=log", "memory", "1M", "logfile=" + logfile)
t.stop()
t.is_(read(logfile), "old line\n", "default logappend=true keeps what the file held")
t.server("trunc", "--filter=log", "memory", "1M", "logfile=" + logfile, "logappend=false")
t.stop()
t.ok(read(logfile) == "", "logappend=false empties the file")

# ---- 6. --help and log.md agree ----
helptext = subprocess.run([NBDSERVE, "--help", "--filter=log", "memory"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True).stdout
section = helptext[helptext.index("Filter log"):]
in_help = set(re.findall(r"^(log\w*)=", section, re.M))
md = read(os.path.join(TOP, "filters", "log", "log.md"))
params = md[md.index("## Parameters"):]
params = params[:params.index("\n## ", 1)]
in_md = set(re.findall(r"^`(log\w*)=", params, re.M))
t.ok(in_help and in_help == in_md, "--help and log.md list the same parameters (%s / %s)"
     % (sorted(in_help), sorted(in_md)))
default_help = re.search(r"logqueue=SIZE.*?default (\w+)", section, re.S)
default_md = re.search(r"`logqueue=SIZE`.*?Default `(\w+)`", params, re.S)
t.ok(default_help and default_md and default_help.group(1) == default_md.group(1),
     "--help and log.md give the same logqueue default")

t.finish()
