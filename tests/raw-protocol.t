#!/usr/bin/python3
# What libnbd never sends: malformed handshakes and requests.  Each gets
# the specification's answer or a clean disconnect, and the server keeps
# serving other clients.
import os, struct, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from rawclient import *

top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tmp = tempfile.mkdtemp(dir="/dev/shm")
sock = os.path.join(tmp, "s")
count = failed = 0

def ok(cond, desc):
    global count, failed
    count += 1
    failed += 0 if cond else 1
    print("%s %d - %s" % ("ok" if cond else "not ok", count, desc))
    sys.stdout.flush()

def good_client_works():
    c = Client(sock)
    c.negotiate()
    c.go()
    c.request(CMD_WRITE, 0, 5, payload=b"alive", cookie=7)
    r1 = c.read_reply()
    c.request(CMD_READ, 0, 5, cookie=8)
    r2 = c.read_reply()
    c.request(CMD_DISC)
    c.close()
    return r1["error"] == 0 and r2["chunks"][0][1][8:] == b"alive"

def transmitting(structured=True, extended=False):
    c = Client(sock)
    c.negotiate(structured=structured, extended=extended)
    c.go()
    return c

server = subprocess.Popen([os.path.join(top, "nbdserve"), "-f", "-U", sock, "memory", "64M"],
                          stderr=subprocess.DEVNULL)
for _ in range(200):
    if os.path.exists(sock):
        break
    time.sleep(0.05)

print("1..27")
try:
    # ---- handshake ----
    c = Client(sock)
    c.greeting(flags=0x80)
    ok(c.is_closed(), "unknown client flags: disconnect")

    c = Client(sock); c.greeting()
    c.option(OPT_LIST, magic=0x1234)
    ok(c.is_closed(), "bad option magic: disconnect")

    c = Client(sock); c.greeting()
    ok(c.simple_option(99)[1] == REP_ERR_UNSUP, "unknown option: NBD_REP_ERR_UNSUP")
    ok(c.simple_option(OPT_LIST, b"junk")[1] == REP_ERR_INVALID, "LIST with data: NBD_REP_ERR_INVALID")
    ok(c.simple_option(OPT_STARTTLS)[1] == REP_ERR_POLICY, "STARTTLS without TLS: NBD_REP_ERR_POLICY")
    ok(c.simple_option(OPT_GO, b"\x00\x00\x00\x09ab")[1] == REP_ERR_INVALID, "truncated GO: NBD_REP_ERR_INVALID")
    found, last = c.meta(OPT_SET_META_CONTEXT, ["base:allocation"])
    ok(last == REP_ERR_INVALID, "SET_META_CONTEXT before structured replies: NBD_REP_ERR_INVALID")
    ok(c.simple_option(OPT_STRUCTURED_REPLY)[1] == REP_ACK, "STRUCTURED_REPLY: ack")
    found, last = c.meta(OPT_LIST_META_CONTEXT, [])
    ok(found == {"base:allocation": 0} and last == REP_ACK, "LIST_META_CONTEXT, no query: all contexts %r" % found)
    found, last = c.meta(OPT_LIST_META_CONTEXT, ["base:"])
    ok(found == {"base:allocation": 0}, "LIST_META_CONTEXT 'base:' lists the namespace")
    found, last = c.meta(OPT_LIST_META_CONTEXT, ["qemu:", "qemu:dirty-bitmap:"])
    ok(found == {} and last == REP_ACK, "LIST_META_CONTEXT 'qemu:' lists what is declared (none here)")
    found, last = c.meta(OPT_SET_META_CONTEXT, ["base:", "nosuch:thing", "base:allocation"])
    ok(list(found) == ["base:allocation"] and last == REP_ACK, "SET_META_CONTEXT picks the exact name only")
    c.option(OPT_LIST, length=1 << 20)  # and never send the megabyte
    rep = None
    try:
        rep = c.reply()[1]
    except Closed:
        pass
    ok(rep in (None, REP_ERR_TOO_BIG) and c.is_closed(), "option of 1 MiB: refused unread, disconnect")
    ok(good_client_works(), "a second client is unaffected")

    # ---- transmission ----
    c = transmitting()
    c.request(99, 0, 512, cookie=5)
    r = c.read_reply()
    ok(r["error"] == EINVAL and r["cookie"] == 5, "unknown command: EINVAL")
    c.request(CMD_READ, 0, 512, flags=0x80)
    ok(c.read_reply()["error"] == EINVAL, "unknown command flag: EINVAL")
    c.request(CMD_BLOCK_STATUS, 0, 512)
    ok(c.read_reply()["error"] == EINVAL, "BLOCK_STATUS without a selected context: EINVAL")
    c.request(CMD_WRITE, 1 << 30, 16, payload=b"x" * 16)
    ok(c.read_reply()["error"] == ENOSPC, "write past the end: ENOSPC (payload consumed)")
    c.request(CMD_READ, 0, 16, cookie=9)
    ok(c.read_reply()["cookie"] == 9, "connection still in step after the refused write")
    c.request(CMD_WRITE, 0, 64 << 20)  # no payload follows: over the 32M limit
    ok(c.is_closed(), "write payload over the limit: disconnect")

    c = transmitting()
    c.request(CMD_READ, 0, 512, magic=EXT_REQUEST_MAGIC)
    ok(c.is_closed(), "extended request without negotiating: disconnect")
    c = transmitting()
    c.send(b"\xde\xad\xbe\xef" * 8)
    ok(c.is_closed(), "garbage mid-stream: disconnect")
    c = transmitting()
    c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 1, 0, 0) +
           struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 2, 0, 512))
    ok(c.is_closed(), "requests after DISC: closed without a reply")
    ok(good_client_works(), "a second client is unaffected after all that")

    # ---- extended headers ----
    c = Client(sock)
    c.negotiate(extended=True)
    found, _ = c.meta(OPT_SET_META_CONTEXT, ["base:allocation"])
    size, flags = c.go()
    data = os.urandom(8192)
    c.request(CMD_WRITE, 65536, len(data), flags=FLAG_PAYLOAD_LEN, payload=data, cookie=1)
    r = c.read_reply()
    c.request(CMD_READ, 65536, len(data), cookie=2)
    r2 = c.read_reply()
    ok(r["error"] == 0 and r2["chunks"][0][1][8:] == data and flags & (1 << 12),
       "extended headers: write with PAYLOAD_LEN, read back, BLOCK_STAT_PAYLOAD advertised")
    c.request(CMD_BLOCK_STATUS, 0, 1 << 20, cookie=3)
    r = c.read_reply()
    rtype, payload = r["chunks"][0]
    ctx, n = struct.unpack(">II", payload[:8])
    descs = [struct.unpack(">QQ", payload[8 + 16 * i:24 + 16 * i]) for i in range(n)]
    ok(rtype == REPLY_TYPE_BLOCK_STATUS_EXT and ctx == found["base:allocation"] and
       descs[0] == (131072, 0) and descs[1][1] == 3,  # pages 0-1 written, then holes
       "extended headers: BLOCK_STATUS_EXT reply %r" % descs[:3])
    c.request(CMD_WRITE, 0, 0, cookie=4)  # WRITE without PAYLOAD_LEN
    ok(c.read_reply()["error"] == EINVAL, "extended headers: WRITE without PAYLOAD_LEN is EINVAL")
finally:
    server.terminate()
    server.wait()
    subprocess.run(["rm", "-rf", tmp])
sys.exit(1 if failed else 0)
