#!/bin/bash
# Graceful shutdown: SIGTERM (or SIGINT) with requests in flight lets them
# finish; every acknowledged write is in the file afterwards; idle clients
# do not hold the server up.
. "$(dirname "$0")/lib/functions.sh"
requires cc
requires_python_nbd
plan 15

# A plugin whose writes take 300 ms: the requests are surely in flight
# when the signal comes.  It writes through to file=PATH.
cat > "$tmp/slowfile.c" <<'C'
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "nbdserve-plugin.h"
static int fd = -1, started_fd = -1, started;
static int s_config(const char *k, const char *v)
{
  int *dest = strcmp(k, "file") == 0 ? &fd : strcmp(k, "started") == 0 ? &started_fd : NULL;
  if (dest == NULL) return -1;
  *dest = open(v, O_RDWR | O_CREAT, 0644);
  return *dest < 0 ? -1 : 0;
}
static void *s_open(int r, const char *n) { (void) r; (void) n; return &fd; }
static int64_t s_size(void *h) { (void) h; return lseek(fd, 0, SEEK_END); }
static int s_read(void *h, void *b, uint32_t c, uint64_t o, uint32_t f)
{ (void) h; (void) f; return pread(fd, b, c, (off_t) o) == (ssize_t) c ? 0 : -1; }
static int s_write(void *h, const void *b, uint32_t c, uint64_t o, uint32_t f)
{
  (void) h; (void) f;
  /* Tell the test how many writes have reached the plugin. */
  char count[16];
  snprintf(count, sizeof count, "%-15d", __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST));
  if (pwrite(started_fd, count, 15, 0) != 15) return -1;
  usleep(300000);
  return pwrite(fd, b, c, (off_t) o) == (ssize_t) c ? 0 : -1;
}
static struct nbdserve_plugin p = { NBDSERVE_PLUGIN_INIT, .name = "slowfile",
  .magic_config_key = "file", .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .config = s_config, .open = s_open, .get_size = s_size, .pread = s_read, .pwrite = s_write };
NBDSERVE_REGISTER_PLUGIN(p)
C
build_plugin slowfile.so "$tmp/slowfile.c"

# inflight NAME SIGNAL ARGS...: 16 aio writes of 4K, then SIGNAL once the
# plugin has started all 16 (or after 300 ms when it cannot tell); writes
# $tmp/NAME.acked (indices acknowledged) and checks the file afterwards.
cat > "$tmp/inflight.py" <<'PY'
import nbd, os, sys, time
uri, pid, sig, out, started = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
h = nbd.NBD(); h.connect_uri(uri)
done = {}
for i in range(16):
    h.aio_pwrite(bytes([i + 1]) * 4096, i * 4096,
                 completion=lambda err, i=i: done.__setitem__(i, err.value) or 1)
def count_started():
    try:
        return int(open(started).read().strip() or 0)
    except (OSError, ValueError):
        return -1
deadline = time.time() + (10 if count_started() >= 0 else 0.3)
while time.time() < deadline:       # let every request reach the server
    h.poll(10)
    if count_started() >= 16:
        break
os.kill(pid, sig)
try:
    while h.aio_in_flight() > 0:
        h.poll(1000)
except nbd.Error:
    pass
with open(out, "w") as f:
    f.write(" ".join(str(i) for i, e in sorted(done.items()) if e == 0) + "\n")
PY
cat > "$tmp/verify.py" <<'PY'
import sys
path, acked = sys.argv[1], [int(x) for x in open(sys.argv[2]).read().split()]
data = open(path, "rb").read()
bad = [i for i in acked if data[i * 4096:(i + 1) * 4096] != bytes([i + 1]) * 4096]
print("missing %r" % bad if bad else "all on disk")
PY

inflight() {
    local name=$1 sig=$2; shift 2
    truncate -s 1M "$tmp/$name.img"
    if ! start_server "$name" -t 16 "$@" file="$tmp/$name.img"; then
        not_ok "$name: server started"; not_ok "$name: writes acknowledged (no server)"; not_ok "$name: writes on disk (no server)"
        return
    fi
    python "$tmp/inflight.py" "$uri" "$server_pid" "$sig" "$tmp/$name.acked" "$tmp/$name.started" \
        2> "$tmp/$name.py.log"
    stop_server   # the signal was sent already; this waits (and reaps)
    is "$name: exit status 0 after signal $sig" "$stopped_rc" 0
    is "$name: all 16 writes in flight were acknowledged" "$(wc -w < "$tmp/$name.acked" 2> /dev/null)" 16
    is "$name: every acknowledged write is in the file" \
       "$("$PYTHON" "$tmp/verify.py" "$tmp/$name.img" "$tmp/$name.acked" 2>&1)" "all on disk"
}
: > "$tmp/slow-term.started"; : > "$tmp/slow-int.started"
inflight slow-term 15 "$tmp/slowfile.so" started="$tmp/slow-term.started"
inflight slow-int 2 "$tmp/slowfile.so" started="$tmp/slow-int.started"
if have_filter delay; then
    inflight delay-filter 15 --filter=delay file delay-write=300ms
else
    for i in 1 2 3; do skip "the delay filter is not built"; done
fi

# An idle client does not keep a terminating server alive.
start_server idle memory 1M
"$PYTHON" - "$uri" > /dev/null 2>&1 <<'PY' &
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
time.sleep(30)
PY
idler=$!
sleep 0.3
t0=$(date +%s%N)
stop_server
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
kill $idler 2> /dev/null; wait $idler 2> /dev/null
if [ "$stopped_rc" = 0 ] && [ $ms -lt 5000 ]; then ok "an idle client: the server still stops at once (${ms} ms)"
else not_ok "an idle client: the server still stops at once (exit $stopped_rc after ${ms} ms)"; fi
# A signal while the plugin is still getting ready (the socket exists, the
# loop that handles signals does not yet): the process ends as signalled,
# and leaves neither the socket file nor the private directory of -U -.
cat > "$tmp/slowready.c" <<'C'
/* get_ready creates the file marker=PATH, then takes 5 s. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "nbdserve-plugin.h"
static char marker[4096];
static int r_config(const char *k, const char *v)
{
  if (strcmp(k, "marker") != 0)
    return -1;
  snprintf(marker, sizeof marker, "%s", v);
  return 0;
}
static int r_get_ready(void)
{
  FILE *f = fopen(marker, "w");
  if (f)
    fclose(f);
  sleep(5);
  return 0;
}
static void *r_open(int ro, const char *name) { (void) ro, (void) name; return marker; }
static int64_t r_size(void *h) { (void) h; return 1 << 20; }
static int r_read(void *h, void *buf, uint32_t n, uint64_t off, uint32_t f)
{
  (void) h, (void) off, (void) f;
  memset(buf, 0, n);
  return 0;
}
static struct nbdserve_plugin p = { NBDSERVE_PLUGIN_INIT, .name = "slowready",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL, .config = r_config, .get_ready = r_get_ready,
  .open = r_open, .get_size = r_size, .pread = r_read };
NBDSERVE_REGISTER_PLUGIN(p)
C
build_plugin slowready.so "$tmp/slowready.c"

# wait_for_file PATH: up to 10 s.
wait_for_file() {
    local i
    for i in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done
    return 1
}

# early NAME SIGNAL STATUS SOCKET-ARGS...: start a server with SOCKET-ARGS,
# send SIGNAL during get_ready, expect exit STATUS and no socket left.
early() {
    local name=$1 sig=$2 want=$3; shift 3
    rm -f "$tmp/$name.ready"
    "$NBDSERVE" -f "$@" "$tmp/slowready.so" marker="$tmp/$name.ready" 2> "$tmp/$name.log" &
    local pid=$!
    server_pids+=("$pid")
    wait_for_file "$tmp/$name.ready" || diag "$name: get_ready never ran"
    stop_server "$pid" "$sig"
    local rc=$stopped_rc left
    left=$(ls -d "$tmp/$name.sock" "$tmp"/nbdserve.* 2> /dev/null | tr '\n' ' ')
    is "SIG$sig during start-up: killed by it (exit $want), nothing left (${left:-no socket})" \
        "$rc ${left:-none}" "$want none"
}
early early-term TERM 143 -U "$tmp/early-term.sock"
early early-int INT 130 -U "$tmp/early-int.sock"
early early-private TERM 143 -U -

# Without -f, the process the user started waits for the daemon to be
# ready.  Signalling that waiting parent ends the parent only: the daemon
# keeps its socket and serves once ready.
rm -f "$tmp/daemon.ready" "$tmp/daemon.pid"
"$NBDSERVE" -U "$tmp/daemon.sock" -P "$tmp/daemon.pid" "$tmp/slowready.so" \
    marker="$tmp/daemon.ready" 2> "$tmp/daemon.log" &
parent=$!
wait_for_file "$tmp/daemon.ready" || diag "daemon: get_ready never ran"
stop_pid "$parent"
is "a signalled parent of the daemon exits by the signal" "$stopped_rc" 143
if wait_for_file "$tmp/daemon.pid"; then
    daemon=$(cat "$tmp/daemon.pid")
    server_pids+=("$daemon")
    is "the daemon still serves on its socket" \
        "$(nbdinfo --size "nbd+unix:///?socket=$tmp/daemon.sock" 2>&1)" 1048576
    stop_server "$daemon"
else
    not_ok "the daemon still serves on its socket (it never became ready)"
    diag_file "$tmp/daemon.log"
fi
finish
