#!/usr/bin/python3
"""Write the seed corpora of the fuzzing harnesses into tests/fuzz/TARGET/.

Seeds are small, valid (or nearly valid) examples of what each harness
parses, so the fuzzer starts from inputs that reach deep into the code.
Run it again after changing it; the files are checked in.
"""
# SPDX-License-Identifier: BSD-3-Clause
import os
import shutil
import struct
import subprocess
import tempfile

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(TOP, "tests", "fuzz")

REQ_MAGIC, EXT_MAGIC = 0x25609513, 0x21e41c71
CMD = dict(READ=0, WRITE=1, DISC=2, FLUSH=3, TRIM=4, CACHE=5, WRITE_ZEROES=6, BLOCK_STATUS=7)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = 1, 2, 4, 8, 16, 32


def opt(kind, payload=b""):
    return b"IHAVEOPT" + struct.pack(">II", kind, len(payload)) + payload


def name(s):
    return struct.pack(">I", len(s)) + s


def info_go(kind, export=b"", infos=()):
    return opt(kind, name(export) + struct.pack(">H", len(infos)) +
               b"".join(struct.pack(">H", i) for i in infos))


def meta(kind, export=b"", queries=()):
    return opt(kind, name(export) + struct.pack(">I", len(queries)) + b"".join(name(q) for q in queries))


FLAGS = struct.pack(">I", 3)


def req(cmd, offset=0, length=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, CMD[cmd], cookie, offset, length) + payload


def ext(cmd, offset=0, length=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQQ", EXT_MAGIC, flags, CMD[cmd], cookie, offset, length) + payload


handshakes = {
    "go-default": FLAGS + info_go(7),
    "go-infos": FLAGS + info_go(7, b"", (0, 1, 2, 3)),
    "info-then-go": FLAGS + info_go(6, b"", (3,)) + info_go(7),
    "export-name": FLAGS + opt(1, b""),
    "export-name-nozeroes": struct.pack(">I", 1) + opt(1, b"x"),
    "list": FLAGS + opt(3) + opt(2),
    "abort": FLAGS + opt(2),
    "starttls": FLAGS + opt(5) + opt(2),
    "structured": FLAGS + opt(8) + info_go(7),
    "extended": FLAGS + opt(11) + info_go(7),
    "extended-then-structured": FLAGS + opt(11) + opt(8) + info_go(7),
    "list-meta-all": FLAGS + opt(8) + meta(9) + opt(2),
    "list-meta-qemu": FLAGS + opt(8) + meta(9, b"", (b"qemu:",)) + opt(2),
    "set-meta": FLAGS + opt(8) + meta(10, b"", (b"base:allocation", b"qemu:dirty-bitmap:x")) + info_go(7),
    "meta-without-structured": FLAGS + meta(10, b"", (b"base:allocation",)) + opt(2),
    "unknown-option": FLAGS + opt(99, b"abc") + opt(2),
    "bad-magic": FLAGS + b"IHAVEOPX" + struct.pack(">II", 7, 0),
    "long-option": FLAGS + b"IHAVEOPT" + struct.pack(">II", 3, 0x7fffffff),
    "truncated-go": FLAGS + b"IHAVEOPT" + struct.pack(">II", 7, 6) + b"\0\0",
    "go-then-read": FLAGS + opt(8) + info_go(7) + req("READ", 0, 512) + req("DISC"),
    "go-then-write": FLAGS + info_go(7) + req("WRITE", 0, 8, FUA, 2, b"abcdefgh") + req("READ", 0, 8, 0, 3),
    "bad-flags": struct.pack(">I", 0xffffffff),
}

requests = {
    "read": req("READ", 4096, 4096),
    "read-df": req("READ", 0, 131072, DF),
    "write": req("WRITE", 0, 16, FUA, 1, b"0123456789abcdef"),
    "write-then-read": req("WRITE", 512, 4, 0, 1, b"abcd") + req("READ", 512, 4, 0, 2),
    "flush": req("FLUSH"),
    "trim": req("TRIM", 0, 65536),
    "cache": req("CACHE", 0, 65536),
    "zero": req("WRITE_ZEROES", 0, 65536, NO_HOLE),
    "zero-fast": req("WRITE_ZEROES", 0, 65536, FAST_ZERO),
    "block-status": req("BLOCK_STATUS", 0, 1 << 20),
    "block-status-one": req("BLOCK_STATUS", 4096, 65536, REQ_ONE),
    "disc": req("DISC"),
    "out-of-range": req("READ", 1 << 20, 512),
    "huge-write": req("WRITE", 0, 64 << 20),
    "unknown-command": struct.pack(">IHHQQI", REQ_MAGIC, 0, 42, 1, 0, 0),
    "bad-magic": struct.pack(">IHHQQI", 0x12345678, 0, 0, 1, 0, 0),
    "unknown-flag": req("READ", 0, 512, 0x8000),
    "pipeline": b"".join(req("READ", i * 4096, 4096, 0, i) for i in range(16)),
    "ext-read": ext("READ", 0, 4096),
    "ext-write-payload-len": ext("WRITE", 0, 4, PAYLOAD_LEN, 1, b"wxyz"),
    "ext-block-status": ext("BLOCK_STATUS", 0, 1 << 20),
    "after-disc": req("DISC") + req("READ", 0, 512),
}


def write(target, seeds, prefix=b""):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    for label, data in seeds.items():
        with open(os.path.join(d, label), "wb") as f:
            f.write(prefix + data)


write("handshake", handshakes)
# transmission: the first byte picks the negotiation (0 plain, 1 structured,
# 2 extended headers, 3 structured + base:allocation).
for mode in range(4):
    write("transmission", {"%d-%s" % (mode, k): v for k, v in requests.items()
                           if (mode == 2) == k.startswith("ext-")}, bytes([mode]))
write("parsers", {k: v.encode() for k, v in {
    "size": "1G", "sectors": "8s", "exabyte": "1E", "max": "9223372036854775807",
    "too-big": "8E", "neg": "-1", "hex": "0x100", "spaces": " 12 ", "bool-yes": "yes",
    "bool-off": "off", "empty": "", "junk": "12Q",
}.items()})


# qcow2: small images made by qemu-img and qemu-io (512-byte to 16 KiB
# clusters, virtual sizes of 128 KiB to 1 MiB, so every seed stays a few
# tens of KiB), covering each feature the library parses.
def qemu(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def qcow2_image(tmp, label, size, opts, writes=(), backing=None):
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        cmd += ["-b", backing[0], "-F", backing[1]]
    qemu(*cmd, label, size, cwd=tmp)
    if writes:
        io = ["qemu-io", "-f", "qcow2"]
        for w in writes:
            io += ["-c", w]
        qemu(*io, label, cwd=tmp)
    return os.path.join(tmp, label)


def zero_snapshot_dates(image):
    # Snapshot entries hold the time they were taken: zeroed, the seed
    # comes out the same on every run.
    with open(image, "r+b") as f:
        head = f.read(72)
        count, = struct.unpack(">I", head[60:64])
        pos, = struct.unpack(">Q", head[64:72])
        for _ in range(count):
            f.seek(pos)
            fixed = f.read(40)
            id_len, name_len = struct.unpack(">HH", fixed[12:16])
            extra, = struct.unpack(">I", fixed[36:40])
            f.seek(pos + 16)
            f.write(bytes(8))
            pos += (40 + extra + id_len + name_len + 7) & ~7


def set_incompatible(data, bits):
    flags, = struct.unpack(">Q", data[72:80])
    return data[:72] + struct.pack(">Q", flags | bits) + data[80:]


def qcow2_seeds():
    seeds, labels = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        def image(label, *args, **kw):
            labels.append(label)
            return qcow2_image(tmp, label, *args, **kw)

        image("v2-512", "256K", "compat=0.10,cluster_size=512",
              ("write -P 0x11 0 4k", "write -P 0x22 100k 1536", "write -P 0x23 255k 1k"))
        image("v3-512", "128K", "cluster_size=512",
              ("write -P 0x31 0 2k", "write -z 4k 2k", "write -P 0x32 65000 3000"))
        image("v3-4k", "1M", "cluster_size=4k",
              ("write -P 0x33 0 8k", "write -z 64k 8k", "write -P 0x34 510k 8k", "write -P 0x35 1020k 4k"))
        image("zlib-4k", "256K", "cluster_size=4k",
              ("write -c -P 0x55 0 4k", "write -c -P 0x56 8k 4k", "write -P 0x57 16k 4k",
               "write -c -P 0x58 252k 4k"))
        image("zlib-512", "64K", "cluster_size=512",
              ("write -c -P 0x59 0 512", "write -c -P 0x5a 1k 512", "write -P 0x5b 2k 1k"))
        image("zstd-4k", "256K", "cluster_size=4k,compression_type=zstd",
              ("write -c -P 0x65 0 4k", "write -c -P 0x66 8k 4k", "write -P 0x67 16k 4k"))
        image("extl2-16k", "128K", "cluster_size=16k,extended_l2=on",
              ("write -P 0x88 0 1k", "write -z 4k 2k", "write -P 0x89 20k 512", "write -P 0x8a 33k 1k"))
        path = image("bitmap-4k", "1M", "cluster_size=4k")
        qemu("qemu-img", "bitmap", "--add", path, "b0", cwd=tmp)
        qemu("qemu-img", "bitmap", "--add", "-g", "512", path, "fine", cwd=tmp)
        qemu("qemu-img", "bitmap", "--add", path, "off", cwd=tmp)
        qemu("qemu-img", "bitmap", "--disable", path, "off", cwd=tmp)
        qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 64k 8k", "-c", "write -P 0xab 300k 512",
             "-c", "write -P 0xac 1020k 4k", path, cwd=tmp)
        path = image("snapshot-4k", "256K", "cluster_size=4k", ("write -P 0xbb 0 4k", "write -P 0xbc 128k 4k"))
        qemu("qemu-img", "snapshot", "-c", "s1", path, cwd=tmp)
        qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0xcc 0 4k", "-c", "write -z 128k 4k", path, cwd=tmp)
        zero_snapshot_dates(path)
        # The external data file is left behind: the harness never opens
        # a data file by the image's name (even-length inputs use the
        # image itself, odd-length ones a missing file).
        image("datafile-4k", "256K", "cluster_size=4k,data_file=data.raw", ("write -P 0xdd 0 4k",
              "write -P 0xde 200k 4k"))
        image("datafile-raw-4k", "256K", "cluster_size=4k,data_file=data2.raw,data_file_raw=on",
              ("write -P 0xdf 0 4k",))
        # Backing files: the harness serves "backing" as a copy of the
        # image without its own backing file.
        qcow2_image(tmp, "backing", "256K", "cluster_size=4k", ("write -P 0xee 0 64k",))
        image("backing-4k", "256K", "cluster_size=4k", ("write -P 0xef 4k 4k",), ("backing", "qcow2"))
        image("backing-raw-512", "128K", "cluster_size=512", ("write -P 0xf0 1k 1k",), ("backing", "raw"))
        for label in labels:  # read once every step above is done
            with open(os.path.join(tmp, label), "rb") as f:
                seeds[label] = f.read()
        # Header bits the library reacts to.
        seeds["dirty-bit"] = set_incompatible(seeds["v3-4k"], 1)
        seeds["corrupt-bit"] = set_incompatible(seeds["v3-4k"], 2)
        seeds["datafile-absent"] = seeds["datafile-4k"] + b"\0"
    return seeds


if shutil.which("qemu-img") and shutil.which("qemu-io"):
    write("qcow2", qcow2_seeds())
else:
    print("make-seeds.py: qemu-img or qemu-io is missing: the qcow2 seeds are left as they are")
