#!/usr/bin/python3
# TLS: X.509 and PSK with real clients (libnbd's nbdinfo/nbdcopy, qemu-img),
# --tls=require refusing plaintext, --tls=on serving both, bad keys and
# untrusted certificates failing cleanly while good clients go on, and
# the STARTTLS rules of the protocol checked with a raw client.
# Certificates and keys are made by the test with certtool and psktool.
import os, shutil, socket, ssl, stat, struct, subprocess, sys, time
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import nbdtest

for tool in ("certtool", "psktool", "qemu-img", "nbdcopy", "nbdinfo"):
    if shutil.which(tool) is None:
        print("1..0 # SKIP %s is not installed" % tool)
        sys.exit(0)

t = nbdtest.Test(plan=41, watchdog=300)
tmp = t.tmp


def run(*args, timeout=60, **kw):
    return subprocess.run(list(args), capture_output=True, timeout=timeout, **kw)


def tool_ok(*args):
    r = run(*args)
    if r.returncode != 0:
        t.diag("%s failed: %s" % (" ".join(args), r.stderr.decode(errors="replace")[:500]))
    return r.returncode == 0


# ---- Credentials ----------------------------------------------------------
def make_ca(name):
    d = os.path.join(tmp, name)
    os.mkdir(d)
    key, cert = os.path.join(d, "ca-key.pem"), os.path.join(d, "ca-cert.pem")
    info = os.path.join(d, "ca.info")
    open(info, "w").write("cn = %s\nca\ncert_signing_key\nexpiration_days = 30\n" % name)
    run("certtool", "--generate-privkey", "--outfile", key)
    run("certtool", "--generate-self-signed", "--load-privkey", key, "--template", info,
        "--outfile", cert)
    return key, cert


def make_cert(ca, outdir, role, cn):
    """role: server or client; writes ROLE-key.pem, ROLE-cert.pem and ca-cert.pem."""
    ca_key, ca_cert = ca
    os.makedirs(outdir, exist_ok=True)
    key = os.path.join(outdir, role + "-key.pem")
    cert = os.path.join(outdir, role + "-cert.pem")
    info = os.path.join(outdir, role + ".info")
    usage = "tls_www_server\ndns_name = localhost\nip_address = 127.0.0.1\n" \
        if role == "server" else "tls_www_client\n"
    open(info, "w").write("organization = nbdserve tests\ncn = %s\n%sencryption_key\n"
                          "signing_key\nexpiration_days = 30\n" % (cn, usage))
    run("certtool", "--generate-privkey", "--outfile", key)
    os.chmod(key, 0o600)
    run("certtool", "--generate-certificate", "--load-ca-certificate", ca_cert,
        "--load-ca-privkey", ca_key, "--load-privkey", key, "--template", info,
        "--outfile", cert)
    os.unlink(info)
    shutil.copy(ca_cert, os.path.join(outdir, "ca-cert.pem"))


good_ca, other_ca = make_ca("good-ca"), make_ca("other-ca")
server_pki = os.path.join(tmp, "server")
client_pki = os.path.join(tmp, "client")
stranger_pki = os.path.join(tmp, "stranger")   # signed by another CA
nocert_pki = os.path.join(tmp, "nocert")       # trusts the CA, has no certificate
make_cert(good_ca, server_pki, "server", "localhost")
make_cert(good_ca, client_pki, "client", "good client")
make_cert(other_ca, stranger_pki, "client", "stranger")
os.mkdir(nocert_pki)
shutil.copy(good_ca[1], nocert_pki)
t.ok(all(os.path.exists(os.path.join(server_pki, f))
         for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem")),
     "certtool made a CA, a server and two client certificates")

# PSK: the server knows alice and bob; qemu wants the file as DIR/keys.psk.
psk_dir = os.path.join(tmp, "psk")
os.mkdir(psk_dir)
psk_file = os.path.join(psk_dir, "keys.psk")
for user in ("alice", "bob"):
    run("psktool", "-u", user, "-p", psk_file)
os.chmod(psk_file, 0o600)
keys = dict(line.split(":") for line in open(psk_file).read().split())
wrong_key_file = os.path.join(tmp, "wrong.psk")
open(wrong_key_file, "w").write("alice:" + "00" * 32 + "\n")
stranger_file = os.path.join(tmp, "stranger.psk")
open(stranger_file, "w").write("mallory:" + keys["alice"] + "\n")
t.ok(set(keys) == {"alice", "bob"} and len(keys["alice"]) == 64,
     "psktool made keys for alice and bob")

data = os.path.join(tmp, "data.bin")
with open(data, "wb") as f:
    f.write(os.urandom(16 * 1024 * 1024))


def sock_of(uri):
    return uri.split("socket=")[1]


def psk_uri(uri, user="alice", keyfile=psk_file):
    return "nbds+unix://%s@/?socket=%s&tls-psk-file=%s" % (user, sock_of(uri), keyfile)


def x509_uri(uri, pki=client_pki):
    return "nbds+unix:///?socket=%s&tls-certificates=%s" % (sock_of(uri), pki)


def round_trip(uri, name):
    back = os.path.join(tmp, name + ".back")
    ok = tool_ok("nbdcopy", data, uri) and tool_ok("nbdcopy", uri, back)
    want = open(data, "rb").read()
    same = ok and open(back, "rb").read(len(want)) == want
    if os.path.exists(back):
        os.unlink(back)
    return same


def nbdinfo(uri, *extra):
    return run("nbdinfo", *extra, uri, timeout=30)


# ---- A raw client: the protocol rules libnbd would not break -------------
NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT, NBD_OPT_LIST, NBD_OPT_STARTTLS = 1, 2, 3, 5
NBD_OPT_INFO, NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY = 6, 7, 8
REP_ACK, ERR_POLICY, ERR_INVALID, ERR_TLS_REQD = 1, 2**31 + 2, 2**31 + 3, 2**31 + 5
REP_SERVER = 2


class Raw:
    def __init__(self, uri):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(sock_of(uri))
        greeting = self.read(18)
        assert greeting[:8] == b"NBDMAGIC", greeting
        self.s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes

    def read(self, n):
        return nbdtest.recv_exactly(self.s, n)  # works on the TLS socket too

    def option(self, opt, payload=b""):
        self.s.sendall(b"IHAVEOPT" + struct.pack(">II", opt, len(payload)) + payload)

    def replies(self):
        """Every reply to the option just sent, as (type, payload)."""
        out = []
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self.read(20))
            out.append((rtype, self.read(length)))
            if rtype != REP_SERVER:
                return out

    def starttls(self, pki=client_pki, cert=True, trust=client_pki):
        self.option(NBD_OPT_STARTTLS)
        got = self.replies()
        if got[-1][0] != REP_ACK:
            return got
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(os.path.join(trust, "ca-cert.pem"))
        if cert:
            ctx.load_cert_chain(os.path.join(pki, "client-cert.pem"),
                                os.path.join(pki, "client-key.pem"))
        # Ragged EOFs raise, so that a clean close_notify is told apart.
        self.s = ctx.wrap_socket(self.s, server_hostname="localhost", suppress_ragged_eofs=False)
        return got

    def closed_by_server(self):
        try:
            return self.s.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True


export_payload = struct.pack(">I", 0) + struct.pack(">H", 0)  # name "", no info requests

# ---- PSK, --tls=require ---------------------------------------------------
uri = t.server("psk", "--tls=require", "--tls-psk=" + psk_file, "memory", "64M")
t.ok(round_trip(psk_uri(uri), "psk"), "PSK (alice): 16 MiB nbdcopy round trip compares equal")
r = nbdinfo(psk_uri(uri, "bob"))
t.ok(r.returncode == 0 and b"with TLS" in r.stdout, "PSK (bob): nbdinfo reports TLS")

for desc, u, logword in (("wrong key", psk_uri(uri, "alice", wrong_key_file), "handshake failed"),
                         ("unknown identity", psk_uri(uri, "mallory", stranger_file),
                          "unknown PSK identity 'mallory'")):
    bad = nbdinfo(u)
    t.ok(bad.returncode != 0 and logword in t.log("psk"),
         "PSK %s: the client fails, the server logs '%s'" % (desc, logword))
t.ok(nbdinfo(psk_uri(uri)).returncode == 0, "PSK: good clients are served after the failures")
t.ok(keys["alice"] not in t.log("psk") and keys["bob"] not in t.log("psk"),
     "no key appears in the server's log")

plain = nbdinfo(uri)
t.ok(plain.returncode != 0, "--tls=require: a plaintext nbdinfo is refused")
plain_list = nbdinfo(uri, "--list")
t.ok(plain_list.returncode != 0 and b"export-name" not in plain_list.stdout,
     "--tls=require: a plaintext nbdinfo --list sees no export")

raw = Raw(uri)
answers = []
for opt, payload in ((NBD_OPT_LIST, b""), (NBD_OPT_INFO, export_payload),
                     (NBD_OPT_GO, export_payload), (NBD_OPT_STRUCTURED_REPLY, b""), (99, b"")):
    raw.option(opt, payload)
    answers.append(raw.replies()[-1][0])
t.is_(answers, [ERR_TLS_REQD] * 5,
      "--tls=require: LIST, INFO, GO, STRUCTURED_REPLY and an unknown option get TLS_REQD")
raw.option(NBD_OPT_EXPORT_NAME, b"")
t.ok(raw.closed_by_server(), "--tls=require: EXPORT_NAME in plaintext closes the connection")

raw = Raw(uri)
raw.option(NBD_OPT_ABORT)
t.is_(raw.replies()[-1][0], REP_ACK, "--tls=require: ABORT is answered in plaintext")

raw = Raw(uri)
raw.option(NBD_OPT_STARTTLS, b"junk")
t.is_(raw.replies()[-1][0], ERR_INVALID, "STARTTLS with a payload: ERR_INVALID")

# qemu-img with tls-creds-psk (the object wants DIR/keys.psk).
qemu_psk = ["--object", "tls-creds-psk,id=tls0,endpoint=client,dir=%s,username=alice" % psk_dir]
qemu_opts = "driver=nbd,path=%s,tls-creds=tls0" % sock_of(uri)
r = run("qemu-img", "info", *qemu_psk, "--image-opts", qemu_opts)
t.ok(r.returncode == 0 and b"67108864" in r.stdout, "qemu-img info over TLS-PSK")
out = os.path.join(tmp, "qemu-psk.raw")
r = run("qemu-img", "convert", "-O", "raw", *qemu_psk, "--image-opts", qemu_opts, out)
t.ok(r.returncode == 0 and open(out, "rb").read(len(open(data, "rb").read())) == open(data, "rb").read(),
     "qemu-img convert over TLS-PSK reads back the data nbdcopy wrote")
os.unlink(out)
t.stop()

# ---- X.509 with client certificates, --tls=require --tls-verify-peer -----
uri = t.server("x509", "--tls=require", "--tls-certificates=" + server_pki, "--tls-verify-peer",
               "-v", "memory", "64M")
t.ok(round_trip(x509_uri(uri), "x509"), "X.509: 16 MiB nbdcopy round trip compares equal")
t.ok("peer O=nbdserve tests, CN=good client" in t.log("x509"),
     "X.509: the client's DN is known to the server")

qemu_x509 = ["--object", "tls-creds-x509,id=tls0,endpoint=client,dir=%s" % client_pki]
qemu_opts = "driver=nbd,path=%s,tls-creds=tls0,tls-hostname=localhost" % sock_of(uri)
r = run("qemu-img", "info", *qemu_x509, "--image-opts", qemu_opts)
t.ok(r.returncode == 0 and b"67108864" in r.stdout, "qemu-img info over TLS-X.509")
out = os.path.join(tmp, "qemu-x509.raw")
r = run("qemu-img", "convert", "-O", "raw", *qemu_x509, "--image-opts", qemu_opts, out)
t.ok(r.returncode == 0 and open(out, "rb").read(16 << 20) == open(data, "rb").read(),
     "qemu-img convert over TLS-X.509 reads back the data nbdcopy wrote")
os.unlink(out)

r = nbdinfo(x509_uri(uri, nocert_pki))
t.ok(r.returncode != 0 and "No client certification received" in t.log("x509"),
     "--tls-verify-peer: a client without a certificate fails")
# GnuTLS keeps a certificate the server's CA list does not name to
# itself; Python's client sends it anyway, which reaches the check.
r = nbdinfo(x509_uri(uri, stranger_pki))
try:
    stranger = Raw(uri)
    stranger.starttls(pki=stranger_pki)
    stranger.option(NBD_OPT_LIST)
    stranger.replies()
    stranger_failed = False
except (ssl.SSLError, OSError, EOFError):
    stranger_failed = True
for _ in range(40):  # the server logs just after the client sees the failure
    if "not trusted" in t.log("x509"):
        break
    time.sleep(0.05)
t.ok(r.returncode != 0 and stranger_failed and "not trusted" in t.log("x509") or
     t.diag("nbdinfo rc %d, raw failed %s; log: %s" % (r.returncode, stranger_failed, t.log("x509")[-800:])),
     "--tls-verify-peer: certificates from another CA fail (nbdinfo, and a client sending it)")
t.ok(nbdinfo(x509_uri(uri)).returncode == 0, "X.509: a good client is served after the failures")

# Protocol rules after STARTTLS, with Python's TLS client.
raw = Raw(uri)
raw.starttls()
raw.option(NBD_OPT_STARTTLS)
t.is_(raw.replies()[-1][0], ERR_INVALID, "STARTTLS once TLS is up: ERR_INVALID")
raw.option(NBD_OPT_LIST)
got = raw.replies()
t.ok(got[-1][0] == REP_ACK and len(got) == 2, "after STARTTLS the options are served (LIST)")
raw.option(NBD_OPT_ABORT)
raw.replies()
try:
    notified = raw.s.recv(1) == b""  # b"" only after a close_notify
except (ssl.SSLError, OSError) as e:
    t.diag("after ABORT: %s" % e)
    notified = False
t.ok(notified, "ABORT over TLS: the server ends TLS with close_notify")

# Clients that vanish or stall mid-handshake do not disturb the others.
raw = Raw(uri)
raw.option(NBD_OPT_STARTTLS)
raw.replies()
raw.s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's first bytes
raw.s.close()
raw = Raw(uri)
raw.option(NBD_OPT_STARTTLS)
raw.replies()
raw.s.sendall(b"\x16\x03\x03\x00\x05hello")  # not TLS at all
t.ok(raw.closed_by_server(), "garbage instead of a TLS handshake: the server closes")
t.ok(nbdinfo(x509_uri(uri)).returncode == 0, "the server still serves after those clients")
t.stop()

# A client stalled in the TLS handshake is closed by --handshake-timeout.
uri = t.server("stall", "--tls=require", "--tls-certificates=" + server_pki,
               "--handshake-timeout=1", "memory", "1M")
raw = Raw(uri)
raw.option(NBD_OPT_STARTTLS)
raw.replies()
raw.s.sendall(b"\x16\x03\x01\x02\x00")  # a record header, then nothing
start = time.monotonic()
t.ok(raw.closed_by_server() and time.monotonic() - start < 5,
     "a client stalled mid TLS handshake is closed by the handshake timeout")
t.stop()

# ---- --tls=on: plaintext and TLS clients in one run ------------------------
uri = t.server("on", "--tls=on", "--tls-certificates=" + server_pki, "memory", "64M")
p = nbdinfo(uri)
s = nbdinfo(x509_uri(uri, nocert_pki))
t.ok(p.returncode == 0 and b"without TLS" in p.stdout, "--tls=on: a plaintext client is served")
t.ok(s.returncode == 0 and b"with TLS" in s.stdout,
     "--tls=on: a TLS client (no client certificate needed) is served")
t.ok(round_trip(x509_uri(uri, nocert_pki), "on"), "--tls=on: TLS round trip compares equal")
t.stop()

# --tls=off (the default): STARTTLS is refused by policy.
uri = t.server("off", "memory", "1M")
raw = Raw(uri)
raw.option(NBD_OPT_STARTTLS)
t.is_(raw.replies()[-1][0], ERR_POLICY, "without --tls: STARTTLS gets ERR_POLICY")
t.stop()


# ---- The identity filter: exports per TLS identity ------------------------
exports_dir = os.path.join(tmp, "exports")
os.mkdir(exports_dir)
for name in ("alice-disk", "bob-disk", "shared"):
    nbdtest.sparse_file(os.path.join(exports_dir, name), 1 << 20)
uri = t.server("ident", "--tls=require", "--tls-psk=" + psk_file, "--filter=identity",
               "file", "dir=" + exports_dir, "allow=alice-*:alice", "allow=bob-*:bob",
               "allow=shared:*")


def export_uri(user, export):
    return "nbds+unix://%s@/%s?socket=%s&tls-psk-file=%s" % (user, export, sock_of(uri), psk_file)


own, other = nbdinfo(export_uri("alice", "alice-disk")), nbdinfo(export_uri("alice", "bob-disk"))
t.ok(own.returncode == 0 and other.returncode != 0 and
     "alice may not open export 'bob-disk'" in t.log("ident"),
     "identity filter: alice opens alice-disk, not bob-disk")
listed = nbdinfo(export_uri("alice", ""), "--list", "--json")
names = sorted(e["export-name"] for e in __import__("json").loads(listed.stdout or b"{}").get("exports", []))
t.is_(names, ["alice-disk", "shared"], "identity filter: alice's export list holds only hers and shared")
t.ok(nbdinfo(export_uri("bob", "shared")).returncode == 0 and
     nbdinfo(export_uri("bob", "alice-disk")).returncode != 0,
     "identity filter: bob opens shared, not alice-disk")
t.stop()

uri = t.server("ident-x509", "--tls=require", "--tls-certificates=" + server_pki, "--tls-verify-peer",
               "--filter=identity", "memory", "1M", "allow=*:*CN=good client")
t.ok(nbdinfo(x509_uri(uri)).returncode == 0, "identity filter: a certificate DN pattern lets its client in")
t.stop()


# ---- Start-up errors -------------------------------------------------------
def start_fails(*args):
    r = run(nbdtest.NBDSERVE, "-U", "-", *args, "memory", "1M", "--run", "true", timeout=30)
    return r.returncode, r.stderr.decode(errors="replace").strip()


open_key_dir = os.path.join(tmp, "openkey")
shutil.copytree(server_pki, open_key_dir)
os.chmod(os.path.join(open_key_dir, "server-key.pem"), 0o644)
rc, err = start_fails("--tls=on", "--tls-certificates=" + open_key_dir)
t.ok(rc == 0 and "readable by group or others" in err,
     "a world-readable key: a warning, the server runs (%s)" % err)
rc, err = start_fails("--tls=on", "--tls-strict-keys", "--tls-certificates=" + open_key_dir)
t.ok(rc == 1 and "readable by group or others" in err,
     "--tls-strict-keys: a world-readable key stops the server (%s)" % err)

bad_psk = os.path.join(tmp, "bad.psk")
open(bad_psk, "w").write("carol:" + keys["bob"] + "\nnocolon-secret-material\n")
os.chmod(bad_psk, 0o600)
rc, err = start_fails("--tls=require", "--tls-psk=" + bad_psk)
t.ok(rc == 1 and "line 2" in err and "secret-material" not in err and keys["bob"] not in err,
     "a malformed PSK file names the line, not its contents (%s)" % err)

rc1, err1 = start_fails("--tls=require", "--tls-certificates=" + os.path.join(tmp, "nowhere"))
rc2, err2 = start_fails("--tls=require")
rc3, err3 = start_fails("--tls=on", "--tls-psk=" + psk_file, "--tls-verify-peer")
t.ok(rc1 == 1 and "server-cert.pem" in err1 and rc2 == 1 and "--tls-psk" in err2 and
     rc3 == 1 and "--tls-verify-peer" in err3,
     "missing certificates, no credentials, --tls-verify-peer with PSK: refused with reasons")
t.finish()
