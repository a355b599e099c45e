"""A raw NBD client for tests: sends what well-behaved clients never do.

Import it from a test (sys.path.insert(0, 'tests/lib')).  Every read has
a timeout, so a server that hangs fails the test instead of stalling it.
"""
# SPDX-License-Identifier: BSD-3-Clause
import socket
import struct

NBD_MAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003e889045565a9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21e41c71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668e33ef
EXT_REPLY_MAGIC = 0x6e8a278c

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = ERR | 1, ERR | 2, ERR | 3
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = ERR | 6, ERR | 9
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
FLAG_FUA, FLAG_DF, FLAG_REQ_ONE, FLAG_PAYLOAD_LEN = 1, 4, 8, 32
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE = 0, 1, 2
REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_BLOCK_STATUS_EXT = 5, 6
REPLY_TYPE_ERROR = (1 << 15) | 1
EINVAL, EPERM, ENOSPC = 22, 1, 28


class Closed(Exception):
    """The server closed the connection."""


class Client:
    def __init__(self, path, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.extended = False
        self.structured = False

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise Closed()
            buf += chunk
        return buf

    def is_closed(self):
        """True if the server closes the connection (within the timeout)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    # ---- handshake ----
    def greeting(self, flags=3):
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert magic == NBD_MAGIC and opt == IHAVEOPT, "bad greeting"
        self.send(struct.pack(">I", flags))
        return hflags

    def option(self, opt, data=b"", length=None, magic=IHAVEOPT):
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", magic, opt, length) + data)

    def reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == REP_MAGIC, "bad option reply magic %x" % magic
        return opt, rtype, self.recv(length)

    def simple_option(self, opt, data=b""):
        self.option(opt, data)
        return self.reply()

    def negotiate(self, structured=True, extended=False):
        self.greeting()
        if extended:
            assert self.simple_option(OPT_EXTENDED_HEADERS)[1] == REP_ACK
            self.extended = self.structured = True
        elif structured:
            assert self.simple_option(OPT_STRUCTURED_REPLY)[1] == REP_ACK
            self.structured = True

    @staticmethod
    def meta_payload(export, queries):
        data = struct.pack(">I", len(export)) + export.encode()
        data += struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q)) + q.encode()
        return data

    def meta(self, opt, queries, export=""):
        """Returns ({name: id}, final reply type)."""
        self.option(opt, self.meta_payload(export, queries))
        found = {}
        while True:
            _, rtype, payload = self.reply()
            if rtype != REP_META_CONTEXT:
                return found, rtype
            found[payload[4:].decode()] = struct.unpack(">I", payload[:4])[0]

    def go(self, export=""):
        """Returns (size, flags) or raises on error."""
        data = struct.pack(">I", len(export)) + export.encode() + struct.pack(">H", 0)
        self.option(OPT_GO, data)
        size = flags = None
        while True:
            _, rtype, payload = self.reply()
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
                size, flags = struct.unpack(">QH", payload[2:12])
            elif rtype == REP_ACK:
                return size, flags
            elif rtype & ERR:
                raise RuntimeError("GO failed: %x %r" % (rtype, payload))

    # ---- transmission ----
    def request(self, cmd, offset=0, length=0, flags=0, cookie=1, payload=b"",
                magic=None):
        if self.extended:
            hdr = struct.pack(">IHHQQQ", magic or EXT_REQUEST_MAGIC, flags, cmd, cookie,
                              offset, length)
        else:
            hdr = struct.pack(">IHHQQI", magic or REQUEST_MAGIC, flags, cmd, cookie,
                              offset, length)
        self.send(hdr + payload)

    def read_reply(self):
        """One reply, all chunks: returns dict(cookie, error, data, chunks)."""
        result = {"error": 0, "data": b"", "chunks": []}
        while True:
            magic = struct.unpack(">I", self.recv(4))[0]
            if magic == SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", self.recv(12))
                result.update(cookie=cookie, error=error, simple=True)
                return result
            if magic == STRUCTURED_REPLY_MAGIC:
                flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv(16))
            elif magic == EXT_REPLY_MAGIC:
                flags, rtype, cookie, _off, length = struct.unpack(">HHQQQ", self.recv(28))
            else:
                raise AssertionError("bad reply magic %x" % magic)
            payload = self.recv(length)
            result["cookie"] = cookie
            result["chunks"].append((rtype, payload))
            if rtype & (1 << 15):
                result["error"] = struct.unpack(">I", payload[:4])[0]
            if flags & 1:
                return result
