"""Helpers for the dirty-bitmap-overlay tests: a reference model of the
disk and its bitmaps, the maps that nbdinfo and qemu-img report, and the
qemu-img checks of an overlay.

    disk = Model(base_bytes, size, cluster=65536, bitmaps={"b1": 65536})
    disk.write(h, 1000, b"x" * 10)        # on the server and in the model
    t.is_(nbdinfo_map(uri, "qemu:dirty-bitmap:b1"), disk.map("b1"), ...)

Every expected figure comes from the model, which applies the documented
semantics: a write lands as given; a zero reads as zeroes; a trim makes
whole clusters read as zero and leaves parts of clusters as they were;
every request marks its range, rounded out to granules, in every bitmap.
"""
# SPDX-License-Identifier: BSD-3-Clause
import json
import os
import subprocess

import nbdtest
from nbdtest import nbd

# libnbd's tools (nbdsh) and python bindings are Debian's, not a pyenv's.
os.environ["PATH"] = "/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", "")

PLUGIN = "dirty-bitmap-overlay"
TIMEOUT = 120 if nbdtest.SANITIZED else 60


class Model:
    def __init__(self, base, size, cluster, bitmaps):
        self.size = size
        self.cluster = cluster
        self.data = bytearray(size)
        self.data[:len(base)] = base
        self.granularity = dict(bitmaps)
        self.dirty = {name: set() for name in bitmaps}

    # ---- what a request does ----
    def mark(self, offset, count):
        for name, g in self.granularity.items():
            self.dirty[name].update(range(offset // g, (offset + count + g - 1) // g))

    def clear(self, name):
        self.dirty[name] = set()

    def apply_write(self, offset, buf):
        self.mark(offset, len(buf))
        self.data[offset:offset + len(buf)] = buf

    def apply_zero(self, offset, count):
        self.mark(offset, count)
        self.data[offset:offset + count] = bytes(count)

    def apply_trim(self, offset, count):
        self.mark(offset, count)
        c = self.cluster
        start = (offset + c - 1) // c * c
        end = (offset + count) // c * c
        if offset + count == self.size:
            end = self.size  # the last, short cluster counts as whole
        if end > start:
            self.data[start:end] = bytes(end - start)

    # ---- the same on a server (h: a connected nbd.NBD) ----
    def write(self, h, offset, buf, flags=0):
        h.pwrite(buf, offset, flags)
        self.apply_write(offset, buf)

    def zero(self, h, offset, count, may_trim=False, flags=0):
        # NBD's zero may punch holes unless NO_HOLE forbids it.
        h.zero(count, offset, flags | (0 if may_trim else nbd.CMD_FLAG_NO_HOLE))
        self.apply_zero(offset, count)

    def trim(self, h, offset, count, flags=0):
        h.trim(count, offset, flags)
        self.apply_trim(offset, count)

    # ---- expectations ----
    def map(self, name):
        """The bitmap as merged (offset, length, 1 dirty / 0 clean) runs."""
        g = self.granularity[name]
        bits = self.dirty[name]
        runs = []
        for i in range((self.size + g - 1) // g):
            runs.append((i * g, min(g, self.size - i * g), 1 if i in bits else 0))
        return merge(runs)


def merge(runs):
    """Adjacent runs of equal value joined: servers may cut extents at
    different places; only what they say about each byte must agree."""
    out = []
    for off, length, value in runs:
        if length == 0:
            continue
        if out and out[-1][2] == value and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, value)
        else:
            out.append((off, length, value))
    return out


def dirty_set(runs, g):
    """The granule indexes that merged runs mark dirty."""
    s = set()
    for off, length, value in runs:
        if value & 1:
            s.update(range(off // g, (off + length + g - 1) // g))
    return s


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, **kw)


def nbdinfo_map(uri, context):
    """nbdinfo --map=CONTEXT as merged (offset, length, value) runs, or the
    error text if nbdinfo failed (so that two failures never agree)."""
    p = run(["nbdinfo", "--map=" + context, uri])
    if p.returncode != 0:
        return "nbdinfo failed: " + p.stderr.strip()
    runs = []
    for line in p.stdout.splitlines():
        f = line.split()
        runs.append((int(f[0]), int(f[1]), int(f[2])))
    return merge(runs)


def qemu_dirty_map(sock, bitmap):
    """qemu-img map through qemu's NBD client with x-dirty-bitmap: qemu
    puts the bitmap's bit 0 where it expects NBD_STATE_HOLE, so a dirty
    extent shows as "data": false and a clean one as "data": true."""
    p = run(["qemu-img", "map", "--output=json", "--image-opts",
             "driver=nbd,server.type=unix,server.path=%s,x-dirty-bitmap=qemu:dirty-bitmap:%s" % (sock, bitmap)])
    if p.returncode != 0:
        return "qemu-img map failed: " + p.stderr.strip()
    return merge([(e["start"], e["length"], 0 if e["data"] else 1) for e in json.loads(p.stdout)])


def read_all(h, size, chunk=4 << 20):
    out = bytearray()
    for off in range(0, size, chunk):
        out += h.pread(min(chunk, size - off), off)
    return bytes(out)


def first_difference(a, b):
    """A description of where two byte strings first differ, or None."""
    if a == b:
        return None
    n = min(len(a), len(b))
    for i in range(0, n, 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            j = next(k for k in range(i, min(i + 4096, n)) if a[k] != b[k])
            return "first difference at byte %d (got %r, expected %r)" % (j, a[j:j + 8], b[j:j + 8])
    return "lengths differ: %d and %d" % (len(a), len(b))


def same_bytes(t, got, want, desc):
    why = first_difference(got, want)
    if not t.ok(why is None, desc):
        t.diag(why)


def check_image(path):
    """qemu-img check of the overlay: (exit status, json report or text)."""
    p = run(["qemu-img", "check", "--output=json", "-f", "qcow2", path])
    try:
        return p.returncode, json.loads(p.stdout)
    except ValueError:
        return p.returncode, p.stdout + p.stderr


def check_clean(t, path, desc):
    """qemu-img check: exit 0, no errors, no leaks."""
    rc, report = check_image(path)
    good = rc == 0 and isinstance(report, dict) and not report.get("check-errors") and \
        not report.get("corruptions") and not report.get("leaks")
    if not t.ok(good, desc):
        t.diag("qemu-img check exit %d: %s" % (rc, report))


def check_no_errors(t, path, desc):
    """qemu-img check after a crash: leaks allowed (exit 3), errors not."""
    rc, report = check_image(path)
    good = rc in (0, 3) and isinstance(report, dict) and not report.get("check-errors") and \
        not report.get("corruptions")
    if not t.ok(good, desc):
        t.diag("qemu-img check exit %d: %s" % (rc, report))
    return report


def image_info(path):
    p = run(["qemu-img", "info", "--output=json", "-U", path])
    try:
        return json.loads(p.stdout)
    except ValueError:
        return {"error": p.stdout + p.stderr}


def bitmaps_in_file(path):
    """{name: (granularity, flags)} as qemu-img info reads them."""
    info = image_info(path)
    bms = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: (b["granularity"], tuple(b["flags"])) for b in bms}


def refused(*args):
    """Runs the plugin with ARGS and --run true: (exit status, stderr)."""
    p = run([nbdtest.NBDSERVE, "-U", "-", PLUGIN] + list(args) + ["--run", "true"])
    return p.returncode, p.stderr


def serve(t, name, overlay, *params):
    """Start the plugin on OVERLAY; returns (uri, socket path)."""
    uri = t.server(name, PLUGIN, "overlay=" + overlay, *params)
    return uri, t.last_server.sock


def set_in_use(path, name):
    """Sets the in-use flag of bitmap NAME in the qcow2 file's bitmap
    directory, as a qemu killed while running the image leaves it."""
    import struct
    with open(path, "r+b") as f:
        header = f.read(104)
        pos = struct.unpack(">I", header[100:104])[0]  # header_length: the extensions follow
        while True:
            f.seek(pos)
            kind, length = struct.unpack(">II", f.read(8))
            if kind == 0:
                raise ValueError("%s has no bitmaps extension" % path)
            if kind == 0x23852875:
                count, _, dir_size, dir_offset = struct.unpack(">IIQQ", f.read(24))
                break
            pos += 8 + (length + 7) // 8 * 8
        f.seek(dir_offset)
        directory = f.read(dir_size)
        p = 0
        for _ in range(count):
            flags, = struct.unpack(">I", directory[p + 12:p + 16])
            name_len, extra = struct.unpack(">HI", directory[p + 18:p + 24])
            if directory[p + 24 + extra:p + 24 + extra + name_len] == name.encode():
                f.seek(dir_offset + p + 12)
                f.write(struct.pack(">I", flags | 1))
                return
            p += (24 + extra + name_len + 7) // 8 * 8
    raise ValueError("%s has no bitmap %s" % (path, name))
