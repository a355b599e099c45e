#!/usr/bin/python3
# Error codes as a real client sees them: out-of-range requests, writes to
# read-only exports, oversized effect lengths.  libnbd's strict mode is
# off so that the server, not the client library, judges each request.
import os, sys
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest
from nbdtest import nbd, errno_of

t = nbdtest.Test(plan=23)
size = 64 << 20

uri = t.server("mem", "memory", "64M")
h = t.connect(uri, ["base:allocation"], strict=False)
t.is_(errno_of(lambda: h.pread(4096, size)), "EINVAL", "read starting at the end: EINVAL")
t.is_(errno_of(lambda: h.pread(4096, size - 100)), "EINVAL", "read crossing the end: EINVAL")
t.is_(errno_of(lambda: h.pread(512, 1 << 62)), "EINVAL", "read at offset 2^62: EINVAL")
t.is_(errno_of(lambda: h.pwrite(b"x" * 4096, size - 100)), "ENOSPC", "write crossing the end: ENOSPC")
t.is_(errno_of(lambda: h.zero(4096, size - 100)), "ENOSPC", "write zeroes crossing the end: ENOSPC")
t.is_(errno_of(lambda: h.trim(4096, size - 100)), "EINVAL", "trim crossing the end: EINVAL")
t.is_(errno_of(lambda: h.block_status(4096, size, lambda *a: 0)), "EINVAL",
      "block status at the end: EINVAL")
t.ok(h.pread(100, size - 100) == bytes(100), "the last bytes are still readable")
# Unspecified by the protocol: any answer but a hang or a disconnect.
t.ok(errno_of(lambda: h.pread(0, 0)) in ("no error", "EINVAL"), "zero-length read gets an answer")
# The connection stays usable after every refusal.
h.pwrite(b"still fine", 0)
t.ok(h.pread(10, 0) == b"still fine", "the connection still works after the errors")
# Effect lengths beyond the payload limit are fine for trim and zero.
h.pwrite(b"y" * 65536, 40 << 20)
t.is_(errno_of(lambda: h.zero(size, 0)), "no error", "zero of the whole 64M disk at once")
t.ok(h.pread(65536, 40 << 20) == bytes(65536), "... and it is zero")
h.shutdown()

uri = t.server("ro", "-r", "memory", "1M")
ro = t.connect(uri, strict=False)
t.is_(errno_of(lambda: ro.pwrite(b"x" * 512, 0)), "EPERM", "-r: write is EPERM")
t.is_(errno_of(lambda: ro.trim(512, 0)), "EPERM", "-r: trim is EPERM")
t.is_(errno_of(lambda: ro.zero(512, 0)), "EPERM", "-r: write zeroes is EPERM")
t.ok(ro.pread(512, 0) == bytes(512), "-r: reads work")
ro.shutdown()

path = os.path.join(t.tmp, "ro.img")
with open(path, "wb") as f:
    f.write(b"\x55" * 65536)
ro = t.connect(t.server("rofile", "-r", "file", path), strict=False)
t.ok(errno_of(lambda: ro.pwrite(b"x" * 512, 0)) == "EPERM" and ro.pread(4, 0) == b"\x55" * 4,
     "file -r: write is EPERM and the file is unchanged")
ro.shutdown()
# Commands the export did not advertise (the example plugin has no trim,
# flush, cache, FUA or fast zero) are refused, not half done.
ex = t.connect(t.server("example", "example", "1M"), strict=False)
t.ok(not (ex.can_trim() or ex.can_flush() or ex.can_cache() or ex.can_fua() or ex.can_fast_zero()),
     "example: trim, flush, cache, FUA, fast zero not advertised")
t.is_(errno_of(lambda: ex.trim(512, 0)), "EINVAL", "unadvertised TRIM: EINVAL")
t.is_(errno_of(lambda: ex.flush()), "EINVAL", "unadvertised FLUSH: EINVAL")
t.is_(errno_of(lambda: ex.cache(512, 0)), "EINVAL", "unadvertised CACHE: EINVAL")
t.ok(errno_of(lambda: ex.pwrite(b"new", 0, nbd.CMD_FLAG_FUA)) == "EINVAL" and ex.pread(3, 0) == b"sec",
     "unadvertised FUA on a write: EINVAL, and nothing written")
t.ok(errno_of(lambda: ex.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)) in ("EINVAL", "ENOTSUP")
     and ex.pread(3, 0) == b"sec", "unadvertised FAST_ZERO: refused, nothing zeroed")
ex.shutdown()
t.finish()
