#!/usr/bin/python3
# The cache filter at the edges: unaligned writes, zeroes (with and
# without MAY_TRIM, with FUA) and trims at the head of a block, its tail,
# both, inside one block and aligned, on blocks not cached, cached clean
# and dirty, in every mode with and without cache-on-read, checked byte
# for byte against a reference through the server and in the plugin's
# file once flushed; block status shows dirty blocks as data; FAST_ZERO;
# multi-conn as the plugin has it; cache-dir; bad parameters; --help
# agreeing with cache.md.
import os, random, subprocess, sys
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd, errno_of

MODES = ("writeback", "writethrough", "unsafe")
BAD = [
    ("cache-mode=sometimes", "cache-mode=sometimes: expected writeback, writethrough or unsafe"),
    ("cache-block-size=3000", "must be a power of two from 4K to 32M"),
    ("cache-block-size=2K", "must be a power of two from 4K to 32M"),
    ("cache-block-size=64M", "must be a power of two from 4K to 32M"),
    ("cache-block-size=junk", "junk"),
    ("cache-max-size=32K", "is smaller than one block"),
    ("cache-on-read=perhaps", "perhaps"),
    ("cache-dir=/nonexistent/dir", "cache-dir=/nonexistent/dir: No such file"),
    ("cache-dir=/etc/passwd", "not a directory"),
]
t = nbdtest.Test(plan=16 + len(BAD) + 11, filters=("cache",))
random.seed(17)

B = 4096
SIZE = 64 * B + 1000  # a partial block at the end
disk = os.path.join(t.tmp, "disk.img")

FUA, NO_HOLE, FAST_ZERO = nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO
KINDS = ["write", "write-fua", "zero", "zero-nohole", "zero-fua", "trim", "trim-fua"]
# (start within its first block, end within its last block, blocks spanned)
SHAPES = {
    "head": lambda: (random.randrange(1, B), B, 2),
    "tail": lambda: (0, random.randrange(1, B), 2),
    "both": lambda: (random.randrange(1, B), random.randrange(1, B), 3),
    "inside": lambda: (random.randrange(1, B // 2), random.randrange(B // 2 + 1, B), 1),
    "aligned": lambda: (0, B, 2),
}
STATES = ("uncached", "clean", "dirty")


def do_op(h, ref, kind, off, n):
    if kind.startswith("write"):
        data = random.randbytes(n)
        h.pwrite(data, off, FUA if kind.endswith("fua") else 0)
        ref[off:off + n] = data
        return
    flags = {"zero": 0, "zero-nohole": NO_HOLE, "zero-fua": FUA, "trim": 0, "trim-fua": FUA}[kind]
    if kind.startswith("zero"):
        h.zero(n, off, flags)
    else:
        h.trim(n, off, flags)
    ref[off:off + n] = bytes(n)  # the file plugin punches holes: zeroes


def edge_session(mode, on_read):
    """Every kind x shape x state once, on fresh blocks each time, then
    the whole disk compared; returns (mismatches, ref, uri)."""
    label = "%s, cache-on-read=%s" % (mode, on_read)
    ref = bytearray(random.randbytes(SIZE))
    with open(disk, "wb") as f:
        f.write(ref)
    uri = t.server("edge", "--filter=cache", "file", disk, "cache-mode=" + mode,
                   "cache-block-size=%d" % B, "cache-max-size=%d" % (16 * B),
                   "cache-on-read=" + on_read)
    h = t.connect(uri)
    bad = []
    cases = [(k, s, st) for k in KINDS for s in SHAPES for st in STATES]
    # The last partial block gets a few cases of its own.
    for case_no, (kind, shape, state) in enumerate(cases):
        first = random.randrange(0, 62)
        lo, hi, span = SHAPES[shape]()
        off = first * B + lo
        end = (first + span - 1) * B + hi
        if case_no % 9 == 0:  # now and then, into the partial last block
            off, end = SIZE - 1000 - B + lo, SIZE - random.randrange(0, 500)
        span_lo, span_hi = off - off % B, min(SIZE, end + B - end % B)
        if state == "clean":
            h.pread(span_hi - span_lo, span_lo)
        elif state == "dirty":
            d = random.randbytes(span_hi - span_lo)
            h.pwrite(d, span_lo)
            ref[span_lo:span_hi] = d
        do_op(h, ref, kind, off, end - off)
        lo2, hi2 = max(0, span_lo - B), min(SIZE, span_hi + B)
        if h.pread(hi2 - lo2, lo2) != bytes(ref[lo2:hi2]):
            bad.append("%s %s %s at %d+%d" % (kind, shape, state, off, end - off))
    whole = h.pread(SIZE, 0)
    t.ok(not bad and whole == bytes(ref),
         "%s: %d unaligned write/zero/trim cases read back as the reference"
         % (label, len(cases)))
    for b in bad[:5]:
        t.diag("mismatch after " + b)
    return h, ref


for mode in MODES:
    for on_read in ("true", "false"):
        h, ref = edge_session(mode, on_read)
        label = "%s, cache-on-read=%s" % (mode, on_read)
        if mode != "unsafe":
            h.flush()
            with open(disk, "rb") as f:
                t.ok(f.read() == bytes(ref), "%s: after FLUSH the file equals the reference" % label)
        h.shutdown()
        t.stop()
        with open(disk, "rb") as f:
            t.ok(f.read() == bytes(ref), "%s: after disconnect the file equals the reference"
                 % label)

# ---- block status: dirty blocks are data ---------------------------------------
uri = t.server("extents", "--filter=cache", "memory", "4M")
h = t.connect(uri, contexts=[nbd.CONTEXT_BASE_ALLOCATION])
h.pwrite(b"\xaa" * 100000, (1 << 20) + 5000)
seen = []
h.block_status(1 << 20, 1 << 20,
               lambda meta, off, entries, err: seen.extend(zip(entries[0::2], entries[1::2])) or 0)
first_data = seen[0] if seen else None
t.ok(first_data is not None and first_data[1] == 0 and first_data[0] >= 5000 + 100000,
     "block status reports unflushed writes over a hole as data (%r)" % (seen[:3],))
got = h.pread(256 * 1024, (1 << 20) - 65536)
want = bytes(65536 + 5000) + b"\xaa" * 100000 + bytes(256 * 1024 - 65536 - 5000 - 100000)
t.ok(got == want, "a large read over unflushed writes to a hole returns the data")
p = subprocess.run(["nbdcopy", uri, os.path.join(t.tmp, "copy.img")], capture_output=True)
with open(os.path.join(t.tmp, "copy.img"), "rb") as f:
    copied = f.read()
t.ok(p.returncode == 0 and copied[(1 << 20) + 5000:(1 << 20) + 105000] == b"\xaa" * 100000
     and copied.count(0) == len(copied) - 100000,
     "nbdcopy (which reads holes as holes) copies the unflushed data")

# ---- FAST_ZERO: never slow, never half done --------------------------------------
# (nbdcopy's disconnect wrote the blocks back: dirty them again.)
h.pwrite(b"\xaa" * 100000, (1 << 20) + 5000)
t.is_(errno_of(lambda: h.zero(65536, 1 << 20, FAST_ZERO)), "ENOTSUP",
      "FAST_ZERO over dirty blocks fails with ENOTSUP")
t.ok(h.pread(100000, (1 << 20) + 5000) == b"\xaa" * 100000, "... and changes nothing")
h.flush()
h.zero(65536, 1 << 20, FAST_ZERO)
t.ok(h.pread(70000, 1 << 20) == bytes(65536) + b"\xaa" * 4464,
     "after FLUSH the same FAST_ZERO succeeds and zeroes just its range")
t.is_(h.can_multi_conn(), True, "multi-conn advertised over the memory plugin, which has it")
h.shutdown()
t.stop()

# ---- a plugin without multi-conn or flush -------------------------------------------
uri = t.server("example", "--filter=cache", "example", "1M")
h = t.connect(uri)
t.ok(not h.can_multi_conn() and h.can_flush() and h.can_fua(),
     "over the example plugin: no multi-conn; FLUSH and FUA still offered (they write back)")
h.pwrite(b"x" * 3000, 700)
h.flush()
t.ok(h.pread(4096, 0)[:700].startswith(b"sector 0") and h.pread(3000, 700) == b"x" * 3000,
     "and a write over its pattern reads back")
h.shutdown()
t.stop()

# ---- cache-dir: an unlinked file ------------------------------------------------------
cdir = os.path.join(t.tmp, "cdir")
os.mkdir(cdir)
uri = t.server("cdir", "--filter=cache", "memory", "8M", "cache-dir=" + cdir,
               "cache-max-size=1M")
h = t.connect(uri)
data = random.randbytes(4 << 20)
h.pwrite(data, 0)
t.ok(h.pread(4 << 20, 0) == data and os.listdir(cdir) == [],
     "cache-dir: data through a 1M cache in a file nobody sees (%r)" % os.listdir(cdir))
h.shutdown()
t.stop()

# ---- bad parameters -------------------------------------------------------------------
for arg, msg in BAD:
    p = subprocess.run([nbdtest.NBDSERVE, "-U", os.path.join(t.tmp, "bad.sock"),
                        "--filter=cache", "memory", "1M", arg, "--run", "true"],
                       capture_output=True, text=True, timeout=30)
    t.ok(p.returncode not in (0, 124) and p.returncode < 128 and msg in p.stderr,
         "%s is refused with a clear message" % arg)
    if msg not in p.stderr:
        t.diag(p.stderr)

# ---- --help agrees with cache.md --------------------------------------------------------
out = subprocess.run([nbdtest.NBDSERVE, "--help", "--filter=cache", "memory"],
                     capture_output=True, text=True).stdout
with open(os.path.join(nbdtest.TOP, "filters", "cache", "cache.md")) as f:
    md = f.read()
keys = ["cache-mode", "cache-block-size", "cache-max-size", "cache-on-read", "cache-dir"]
missing = [k for k in keys if ("\n%s=" % k) not in out or ("`%s=" % k) not in md]
t.is_(missing, [], "every parameter is in --help and in cache.md")
t.finish()
