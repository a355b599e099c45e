#!/bin/bash
# Connection details from outside the tree: a filter compiled here
# against include/ only records what the connection-detail helpers tell
# it (peer address or credentials, connection id, export description, a
# per-connection string), refuses clients by uid or address, and
# disconnects a client when a write asks it to.
. "$(dirname "$0")/lib/functions.sh"
requires cc
requires_python_nbd
plan 20

# has DESCRIPTION TEXT STRING: TEXT holds STRING, literally.
has() {
    if grep -qF -- "$3" <<< "$2"; then ok "$1"
    else not_ok "$1"; diag "got:      '$2'"; diag "expected to hold: '$3'"; fi
}

cat > "$tmp/peertest.c" <<'C'
/* A test filter.  Parameters: peerlog=FILE (one line per open and per
 * close), deny-uid=N, deny-addr=A.B.C.D, delay=MS (writes below 1 MiB
 * sleep that long).  A write at 1 MiB asks for a graceful disconnect,
 * one at 2 MiB for a forced one.  It lists one export, "disk", with a
 * description, and names it the default export. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "nbdserve-filter.h"

static const char *log_path;
static long deny_uid = -1;
static const char *deny_addr;
static int delay_ms;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static void logline(const char *fmt, ...) NBDSERVE_PRINTF(1, 2);
static void logline(const char *fmt, ...)
{
  if (log_path == NULL)
    return;
  pthread_mutex_lock(&log_lock);
  FILE *f = fopen(log_path, "a");
  if (f) {
    va_list args;
    va_start(args, fmt);
    vfprintf(f, fmt, args);
    va_end(args);
    fclose(f);
  }
  pthread_mutex_unlock(&log_lock);
}

static int p_config(const char *key, const char *value)
{
  if (strcmp(key, "peerlog") == 0) { log_path = nbdserve_strdup_connection(value); return 1; }
  if (strcmp(key, "deny-uid") == 0) { deny_uid = atol(value); return 1; }
  if (strcmp(key, "deny-addr") == 0) { deny_addr = nbdserve_strdup_connection(value); return 1; }
  if (strcmp(key, "delay") == 0) { delay_ms = atoi(value); return 1; }
  return 0;
}

static int p_list_exports(struct nbdserve_next *next, int readonly, int is_tls,
                          struct nbdserve_exports *exports)
{
  (void) next, (void) readonly, (void) is_tls;
  return nbdserve_add_export(exports, "disk", "the test disk");
}

static const char *p_default_export(struct nbdserve_next *next, int readonly, int is_tls)
{
  (void) next, (void) readonly, (void) is_tls;
  char name[16];
  snprintf(name, sizeof name, "d%s", "isk");
  return nbdserve_strdup_connection(name);
}

struct handle { const char *tag; };

static void *p_open(struct nbdserve_next *next, int readonly, const char *export_name)
{
  (void) next, (void) readonly;
  struct sockaddr_storage ss;
  socklen_t len = 0;
  char addr[INET6_ADDRSTRLEN] = "-";
  unsigned port = 0;
  int family = -1;
  if (nbdserve_peer_address(&ss, &len) == 0) {
    family = ss.ss_family;
    if (ss.ss_family == AF_INET) {
      struct sockaddr_in *sin = (struct sockaddr_in *) &ss;
      inet_ntop(AF_INET, &sin->sin_addr, addr, sizeof addr);
      port = ntohs(sin->sin_port);
    }
  }
  uid_t uid = 0; gid_t gid = 0; pid_t pid = 0;
  int cred = nbdserve_peer_credentials(&uid, &gid, &pid);
  int cred_errno = cred == -1 ? errno : 0;
  char *desc = nbdserve_export_description(export_name);
  logline("open id=%u export=%s name=%s family=%s addr=%s port=%u cred=%s uid=%u gid=%u "
          "pid=%d desc=%s\n",
          nbdserve_connection_id(), export_name, nbdserve_peer_name(),
          family == AF_INET ? "inet" : family == AF_UNIX ? "unix" : "other", addr, port,
          cred == 0 ? "ok" : cred_errno == ENOTSUP ? "ENOTSUP" : "error",
          (unsigned) uid, (unsigned) gid, (int) pid, desc ? desc : "(none)");
  free(desc);
  if ((cred == 0 && deny_uid >= 0 && (long) uid == deny_uid) ||
      (deny_addr && strcmp(addr, deny_addr) == 0)) {
    nbdserve_error("peertest: refusing %s", nbdserve_peer_name());
    nbdserve_disconnect(1);
    return NULL;
  }
  struct handle *h = malloc(sizeof *h);
  if (h == NULL)
    return NULL;
  char tag[64];
  snprintf(tag, sizeof tag, "tag-of-%u", nbdserve_connection_id());
  h->tag = nbdserve_strdup_connection(tag); /* must outlive close */
  return h;
}

static void p_close(void *handle)
{
  struct handle *h = handle;
  logline("close id=%u tag=%s\n", nbdserve_connection_id(), h->tag);
  free(h);
}

static int p_pwrite(struct nbdserve_next *next, void *handle, const void *buf,
                    uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) handle;
  if (offset == 1 << 20 || offset == 2 << 20) {
    nbdserve_disconnect(offset == 2 << 20);
    return nbdserve_next_pwrite(next, buf, count, offset, flags);
  }
  if (delay_ms) {
    struct timespec ts = { delay_ms / 1000, (delay_ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
  }
  return nbdserve_next_pwrite(next, buf, count, offset, flags);
}

static struct nbdserve_filter filter = {
  NBDSERVE_FILTER_INIT,
  .name = "peertest",
  .config = p_config,
  .list_exports = p_list_exports,
  .default_export = p_default_export,
  .open = p_open,
  .close = p_close,
  .pwrite = p_pwrite,
};
NBDSERVE_REGISTER_FILTER(filter)
C
check "the test filter builds against include/ alone" build_plugin peertest.so "$tmp/peertest.c"
grep -q NBDSERVE_FILTER_INIT "$top/include/nbdserve-filter.h" || diag "no NBDSERVE_FILTER_INIT?"

# client.py MODE URI-or-PORT: connect as a client and print what the
# server should have recorded about it.
cat > "$tmp/client.py" <<'PY'
import nbd, os, socket, sys, time
mode, where = sys.argv[1], sys.argv[2]
h = nbd.NBD()
if mode == "unix":
    h.set_export_name("")
    h.set_full_info(True)
    h.connect_unix(where)
    print("uid=%d gid=%d pid=%d" % (os.getuid(), os.getgid(), os.getpid()))
    print("export=%s" % h.get_canonical_export_name())
    print("size=%d" % h.get_size())
elif mode == "tcp":
    s = socket.create_connection(("127.0.0.1", int(where)))
    h.set_export_name("disk")
    h.connect_socket(s.fileno())
    print("port=%d" % s.getsockname()[1])
    print("size=%d" % h.get_size())
elif mode in ("graceful", "force"):
    # Slow writes in flight, then the one that asks for the disconnect.
    h.set_export_name("disk")
    h.connect_unix(where)
    bufs = [bytes([i + 1]) * 65536 for i in range(4)]
    cookies = [h.aio_pwrite(bufs[i], i * 65536) for i in range(4)]
    # Let the slow writes reach the server's workers before the trigger.
    end = time.monotonic() + 0.1
    while time.monotonic() < end:
        h.poll(10)
    trigger = (1 if mode == "graceful" else 2) << 20
    t0 = time.monotonic()
    cookies.append(h.aio_pwrite(b"\xee" * 4096, trigger))
    try:
        while h.aio_in_flight() > 0:
            h.poll(5000)
    except nbd.Error:
        pass
    done = []
    for c in cookies:
        try:
            done.append("ok" if h.aio_command_completed(c) else "pending")
        except nbd.Error:
            done.append("failed")
    # The server closed: one more request cannot succeed.
    try:
        h.pread(512, 0)
        print("still-connected")
    except nbd.Error:
        print("closed")
    print(" ".join(done))
    print("elapsed=%.2f" % (time.monotonic() - t0))
elif mode == "readback":
    h.set_export_name("disk")
    h.connect_unix(where)
    got = [h.pread(65536, i * 65536) == bytes([i + 1]) * 65536 for i in range(4)]
    print("match=%s" % ",".join("y" if g else "n" for g in got))
PY

peerlog="$tmp/record.log"
start_server peer -v --no-inline --threads=8 --filter="$tmp/peertest.so" memory 4M \
    peerlog="$peerlog" delay=300 || true

# Unix socket: credentials of the client process, no TCP address.
out=$(python "$tmp/client.py" unix "$sock" 2>&1)
line=$(grep '^open ' "$peerlog" | tail -1)
uid=$(sed -n 's/^uid=\([0-9]*\).*/\1/p' <<< "$out")
gid=$(sed -n 's/.* gid=\([0-9]*\).*/\1/p' <<< "$out")
pid=$(sed -n 's/.* pid=\([0-9]*\)$/\1/p' <<< "$out")
has "unix: the client's uid" "$line" " cred=ok uid=$uid "
has "unix: the client's gid" "$line" " gid=$gid "
has "unix: the client's pid" "$line" " pid=$pid "
has "unix: the printable name" "$line" " name=unix:uid=$uid,gid=$gid,pid=$pid "
has "unix: the peer address is the Unix socket's" "$line" " family=unix "
has "the default export came from a per-connection string" "$out" "export=disk"
has "the description helper gives what list_exports gave" "$line" " desc=the test disk"
id=$(sed -n 's/^open id=\([0-9]*\) .*/\1/p' <<< "$line")
if grep -q "connection $id opened" "$tmp/peer.log"; then ok "the connection id is the -v log's ($id)"
else not_ok "the connection id is the -v log's ($id)"; diag_file "$tmp/peer.log"; fi
has "a per-connection string lives until close" "$(grep '^close ' "$peerlog" | tail -1)" \
    "close id=$id tag=tag-of-$id"

# NBD_INFO_DESCRIPTION goes through the same helper.
is "the handshake's description is the helper's" \
    "$(nbdinfo --json "nbd+unix:///disk?socket=$sock" 2> /dev/null |
       "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["exports"][0].get("description"))')" \
    "the test disk"

# Graceful disconnect: the writes in flight finish, then the client sees the end.
out=$(python "$tmp/client.py" graceful "$sock" 2>&1)
diag "graceful: $(tr "\n" " " <<< "$out")"
has "graceful: the client sees the connection closed" "$out" "closed"
has "graceful: the writes in flight were answered" "$out" "ok ok ok ok ok"
has "graceful: their bytes are on the disk" \
    "$(python "$tmp/client.py" readback "$sock" 2>&1)" "match=y,y,y,y"

# Forced: closed at once, the slow writes get no reply.
out=$(python "$tmp/client.py" force "$sock" 2>&1)
diag "force: $(tr "\n" " " <<< "$out")"
has "force: the client sees the connection closed" "$out" "closed"
el=$(sed -n 's/^elapsed=//p' <<< "$out")
if grep -q "^failed failed failed failed " <<< "$out" &&
   "$PYTHON" -c "import sys; sys.exit(not $el < 0.15)"; then
    ok "force: closed at once, the slow writes not answered"
else not_ok "force: closed at once, the slow writes not answered"; diag "$out"; fi
check "the server survived both" nbdinfo --size "nbd+unix:///disk?socket=$sock"

# TCP: the client's address and port; credentials are not there.
port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
tcplog="$tmp/tcp-record.log"
"$NBDSERVE" -f -v -i 127.0.0.1 -p "$port" --filter="$tmp/peertest.so" memory 1M \
    peerlog="$tcplog" 2> "$tmp/tcp.log" &
server_pids+=("$!")
for _ in $(seq 100); do (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null && break; sleep 0.05; done
out=$(python "$tmp/client.py" tcp "$port" 2>&1)
cport=$(sed -n 's/^port=//p' <<< "$out")
line=$(grep '^open ' "$tcplog" | grep "port=$cport " | tail -1)
has "tcp: 127.0.0.1 and the client's port" "$line" \
    " name=127.0.0.1:$cport family=inet addr=127.0.0.1 port=$cport cred=ENOTSUP "

# Refusals, as an allow/deny filter outside the core would make them.
start_server denyuid --filter="$tmp/peertest.so" memory 1M deny-uid="$(id -u)" || true
check_fails "a denied uid is refused" python "$tmp/client.py" unix "$sock"
port2=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$NBDSERVE" -f -i 127.0.0.1 -p "$port2" --filter="$tmp/peertest.so" memory 1M \
    deny-addr=127.0.0.1 2> "$tmp/denyaddr.log" &
server_pids+=("$!")
for _ in $(seq 100); do (exec 3<> "/dev/tcp/127.0.0.1/$port2") 2> /dev/null && break; sleep 0.05; done
check_fails "a denied address is refused" python "$tmp/client.py" tcp "$port2"

finish
