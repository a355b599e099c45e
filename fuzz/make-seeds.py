#!/usr/bin/python3
"""Write the seed corpora of the fuzzing harnesses into tests/fuzz/TARGET/.

Seeds are small, valid (or nearly valid) examples of what each harness
parses, so the fuzzer starts from inputs that reach deep into the code.
Run it again after changing it; the files are checked in.
"""
# SPDX-License-Identifier: BSD-3-Clause
import os
import struct

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
