#!/bin/bash
# The control socket (--control) and nbdserve-ctl: every built-in
# command, a plugin's own command, the SO_PEERCRED check against another
# uid, floods of clients and malformed lines that leave NBD service
# untouched, and shutdown through the socket.
. "$(dirname "$0")/lib/functions.sh"
requires nbdcopy nbdinfo
requires_python_nbd
plan 30

CTL="$top/nbdserve-ctl"
ctl() { timeout -k 5 "$CLIENT_TIMEOUT" "$CTL" "$@"; }
# field KEY: the value of KEY in the status in $tmp/status.
field() { sed -n "s/^$1=//p" "$tmp/status"; }

# A plugin with commands: ctltest.echo answers its arguments,
# ctltest.fail fails with a message, ctltest.late tells whether a
# registration from open was refused (as it must be).
cat > "$tmp/ctltest.c" <<'C'
#include <errno.h>
#include <string.h>
#include "nbdserve-plugin.h"

static int late_errno = -1;

static int c_echo(int argc, const char *const *keys, const char *const *values,
                  struct nbdserve_reply *reply)
{
  nbdserve_reply_add(reply, "argc", "%d", argc);
  for (int i = 0; i < argc; i++)
    nbdserve_reply_add(reply, keys[i], "%s", values[i]);
  return 0;
}

static int c_fail(int argc, const char *const *keys, const char *const *values,
                  struct nbdserve_reply *reply)
{
  (void) argc; (void) keys; (void) values;
  nbdserve_reply_error(reply, "failing on purpose");
  return -1;
}

static int c_late(int argc, const char *const *keys, const char *const *values,
                  struct nbdserve_reply *reply)
{
  (void) argc; (void) keys; (void) values;
  nbdserve_reply_add(reply, "late_register", "%s",
                     late_errno == EPERM ? "EPERM" : late_errno == -1 ? "not tried" : "other");
  return 0;
}

static int t_load(void)
{
  return nbdserve_register_command("echo", "answer the arguments", c_echo);
}

static int t_config_complete(void)
{
  if (nbdserve_register_command("echo", "twice", c_echo) != -1 || errno != EEXIST)
    return -1;
  if (nbdserve_register_command("Bad Name", "x", c_echo) != -1 || errno != EINVAL)
    return -1;
  if (nbdserve_register_command("fail", "fail with a message", c_fail) == -1)
    return -1;
  return nbdserve_register_command("late", "whether open could register", c_late);
}

static void *t_open(int readonly, const char *export_name)
{
  (void) readonly; (void) export_name;
  if (nbdserve_register_command("late", "too late", c_late) == -1)
    late_errno = errno;
  else
    late_errno = 0;
  return (void *) 1;
}

static int64_t t_get_size(void *h) { (void) h; return 1 << 20; }
static int t_pread(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) offset; (void) flags;
  memset(buf, 0, count);
  return 0;
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "ctltest",
  .flags = NBDSERVE_PLUGIN_NEVER_BLOCKS,
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .load = t_load,
  .config_complete = t_config_complete,
  .open = t_open,
  .get_size = t_get_size,
  .pread = t_pread,
};
NBDSERVE_REGISTER_PLUGIN(plugin)
C
build_plugin ctltest.so "$tmp/ctltest.c" || { diag "the test plugin does not build"; }

# ---- Built-in commands ------------------------------------------------------
start_server mem --control="$tmp/ctl" memory 64M
nbd_sock=$sock
ctl "$tmp/ctl" help > "$tmp/help"; rc=$?
is "help: exit 0, a line for each built-in command" \
    "$rc $(grep -cE '^(help|status|set-verbose|shutdown)=.' "$tmp/help")" "0 4"
is "the control socket is mode 0600" "$(stat -c %a "$tmp/ctl")" 600

ctl "$tmp/ctl" status > "$tmp/status"; rc=$?
like "status: exit 0 and the version" "$rc $(field version)" '^0 [0-9]+\.[0-9]+\.[0-9]+$'
like "status: uptime, loops, workers, connections" \
    "$(field uptime) $(field loops) $(field workers) $(field connections)" '^[0-9.]+ [1-9][0-9]* [0-9]+ 0$'
read0=$(field bytes_read); written0=$(field bytes_written); reads0=$(field requests_read)
is "status: nothing served yet" "$read0 $written0 $reads0" "0 0 0"

head -c 4M /dev/urandom > "$tmp/pattern"
nbdcopy "$tmp/pattern" "$uri"
nbdcopy "$uri" "$tmp/back"
check "the data written comes back" cmp -n 4194304 "$tmp/pattern" "$tmp/back"
ctl "$tmp/ctl" status > "$tmp/status"
is "status: bytes written are the 4 MiB copied in" "$(field bytes_written)" 4194304
# nbdcopy skips the holes of the 64 MiB disk: at least the data is read.
is "status: bytes read cover the 4 MiB of data copied out" "$(( $(field bytes_read) >= 4194304 ))" 1
like "status: read and write requests counted" "$(field requests_read) $(field requests_write)" '^[1-9][0-9]* [1-9][0-9]*$'

# A connection held open shows in connections and in the export's count
# ("export_open=1 " and the default export's name, which is empty).
out=$(python - "$uri" "$CTL" "$tmp/ctl" <<'PY'
import nbd, subprocess, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
print(subprocess.run([sys.argv[2], sys.argv[3], "status"], capture_output=True, text=True).stdout)
PY
)
like "status: an open connection and its export" \
    "$(echo "$out" | grep -E '^(connections|export_open)=' | tr '\n' ' ')" '^connections=1 export_open=1  $'

ctl "$tmp/ctl" set-verbose on; rc=$?
nbdinfo --size "$uri" > /dev/null
is "set-verbose on: exit 0, debug messages appear" "$rc $(grep -c 'debug: control: debug messages on' "$tmp/mem.log")" "0 1"
ctl "$tmp/ctl" set-verbose off; rc=$?
lines=$(wc -l < "$tmp/mem.log"); nbdinfo --size "$uri" > /dev/null
is "set-verbose off: exit 0, quiet again" "$rc $(wc -l < "$tmp/mem.log")" "0 $lines"
ctl "$tmp/ctl" set-verbose maybe 2> "$tmp/err"; rc=$?
is "set-verbose with a bad word: exit 1 and the usage" "$rc $(cat "$tmp/err")" "1 nbdserve-ctl: usage: set-verbose on|off"
ctl "$tmp/ctl" frobnicate 2> "$tmp/err"; rc=$?
like "an unknown command: exit 1 and a message" "$rc $(cat "$tmp/err")" "^1 nbdserve-ctl: unknown command 'frobnicate'"
ctl "$tmp/nosuch" status 2> /dev/null; rc=$?
ctl 2> /dev/null; rc2=$?
is "no server or no command: exit 2" "$rc $rc2" "2 2"

# ---- Another uid -----------------------------------------------------------------
# The file's mode keeps other users out; to test the server's own check
# (SO_PEERCRED), the test opens the socket file to everyone and sees
# the server refuse the connection itself.
if [ "$(id -u)" -ne 0 ] || ! id nobody > /dev/null 2>&1 || ! command -v runuser > /dev/null; then
    skip "another uid needs root, runuser and a nobody user"
    skip "another uid needs root"
else
    mkdir "$tmp/pub"; cp "$CTL" "$tmp/pub/nbdserve-ctl"
    chmod 0711 "$tmp" "$tmp/pub"; chmod 0755 "$tmp/pub/nbdserve-ctl"
    ln "$tmp/ctl" "$tmp/pub/ctl" 2> /dev/null || ln -s "$tmp/ctl" "$tmp/pub/ctl"
    timeout 10 runuser -u nobody -- "$tmp/pub/nbdserve-ctl" "$tmp/pub/ctl" status > /dev/null 2>&1; rc=$?
    is "another uid: the socket's mode 0600 refuses it (connect fails, exit 2)" "$rc" 2
    chmod 0666 "$tmp/ctl"
    timeout 10 runuser -u nobody -- "$tmp/pub/nbdserve-ctl" "$tmp/pub/ctl" status > "$tmp/nobody.out" 2> "$tmp/nobody.err"; rc=$?
    is "another uid through an open file mode: refused by the server (SO_PEERCRED)" \
        "$rc $(cat "$tmp/nobody.err") $(wc -c < "$tmp/nobody.out")" "1 nbdserve-ctl: permission denied 0"
    chmod 0600 "$tmp/ctl"; chmod 0700 "$tmp"
fi

# ---- Floods ---------------------------------------------------------------------
out=$(python - "$tmp/ctl" <<'PY'
import socket, sys
socks = []
for i in range(100):
    s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sys.argv[1]); socks.append(s)
for s in socks:
    try: s.sendall(b"status\n")
    except OSError: pass
served = refused = other = 0
for s in socks:
    data = b""
    try:
        while not (data.endswith(b"ok\n") or b"error:" in data):
            chunk = s.recv(65536)
            if not chunk: break
            data += chunk
    except OSError: pass
    if data.startswith(b"version=") and data.endswith(b"ok\n"): served += 1
    elif data.startswith(b"error: too many control clients"): refused += 1
    else: other += 1
    s.close()
# At most 64 at once: a client still waiting in the listen queue when
# an earlier one has closed may be served in its place.
print("ok" if served >= 64 and served + refused == 100 and other == 0 else "bad",
      served, refused, other)
PY
)
is "100 clients at once: 64 or more served (64 at a time), the others refused politely" \
   "${out%% *}" "ok" || diag "served, refused, other: ${out#* }"

out=$(python - "$tmp/ctl" <<'PY'
import os, random, socket, sys, time
random.seed(7)
path = sys.argv[1]
def conn():
    s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(path); return s
def answers(s, n):
    # Read until N final lines (ok / error:) or the server closes.
    data = b""; finals = 0
    try:
        while finals < n:
            chunk = s.recv(65536)
            if not chunk: break
            data += chunk
            finals = sum(1 for l in data.split(b"\n") if l == b"ok" or l.startswith(b"error: "))
    except OSError: pass
    return data, finals
bad = 0; sent = 0
# 400 malformed lines on 8 connections: garbage, NULs, unknown commands,
# bad arguments, empty lines.
for c in range(8):
    s = conn(); lines = []
    for i in range(50):
        kind = i % 5
        if kind == 0: l = bytes(random.randrange(1, 256) for _ in range(random.randrange(1, 200))).replace(b"\n", b"x")
        elif kind == 1: l = b"status\0" + os.urandom(8).replace(b"\n", b"y")
        elif kind == 2: l = b"nosuch.command a=b " * 3
        elif kind == 3: l = b"set-verbose =x " + b"k=v " * 70
        else: l = b""
        lines.append(l + b"\n")
    s.sendall(b"".join(lines)); sent += 50
    data, finals = answers(s, 50)
    errors = sum(1 for l in data.split(b"\n") if l.startswith(b"error: "))
    if errors != 50: bad += 1
    s.close()
# 100 more: huge lines (closed after "line too long"), clients that
# leave mid-line, clients that never read 1 MiB of answers.
for i in range(40):
    s = conn(); s.sendall(b"help" + b"x" * 10000 + b"\n"); sent += 1
    data, finals = answers(s, 1)
    if data != b"error: line too long\n": bad += 1
    s.close()
for i in range(40):
    s = conn(); s.sendall(b"stat"); s.close(); sent += 1
for i in range(20):
    s = conn(); sent += 1
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for j in range(2000): s.send(b"help\nstatus\n" * 8, socket.MSG_DONTWAIT)
    except OSError: pass
    s.close()
print(sent, bad)
PY
)
is "500 malformed lines and rude clients: each answered with an error or dropped" "$out" "500 0"
ctl "$tmp/ctl" status > "$tmp/status"; rc=$?
is "the control socket still answers" "$rc $(field connections)" "0 0"
written1=$(field bytes_written)
nbdcopy "$tmp/pattern" "$uri"
nbdcopy "$uri" "$tmp/back"
check "NBD clients are still served, data intact" cmp -n 4194304 "$tmp/pattern" "$tmp/back"
ctl "$tmp/ctl" status > "$tmp/status"
is "status: bytes written grew by exactly the second copy" "$(( $(field bytes_written) - written1 ))" 4194304

# ---- Shutdown ---------------------------------------------------------------------
ctl "$tmp/ctl" shutdown; rc=$?
for _ in $(seq 100); do kill -0 "$server_pid" 2> /dev/null || break; sleep 0.1; done
if kill -0 "$server_pid" 2> /dev/null; then srv="still running"; else wait "$server_pid"; srv="exit $?"; fi
is "shutdown: ok, the server exits with status 0" "$rc $srv" "0 exit 0"
is "shutdown: both socket files are removed" "$(ls "$tmp/ctl" "$nbd_sock" 2> /dev/null)" ""
server_pids=()

# ---- A plugin's commands ------------------------------------------------------------
for mode in inline workers; do
    extra=; [ $mode = workers ] && extra=--no-inline
    start_server "plug-$mode" $extra --control="$tmp/pctl" "$tmp/ctltest.so"
    nbdinfo --size "$uri" > /dev/null
    ctl "$tmp/pctl" ctltest.echo a=1 b=two word > "$tmp/echo"; rc=$?
    is "$mode: the plugin's command answers through nbdserve-ctl" \
        "$rc $(tr '\n' ' ' < "$tmp/echo")" "0 argc=3 a=1 b=two word= "
    ctl "$tmp/pctl" ctltest.fail 2> "$tmp/err"; rc=$?
    is "$mode: the plugin's failure message" "$rc $(cat "$tmp/err")" "1 nbdserve-ctl: failing on purpose"
    if [ $mode = inline ]; then
        ctl "$tmp/pctl" help > "$tmp/help"
        is "help lists the plugin's commands as LAYER.NAME" \
            "$(grep -c '^ctltest\.\(echo\|fail\|late\)=' "$tmp/help")" 3
        is "a registration from open is refused (EPERM)" "$(ctl "$tmp/pctl" ctltest.late)" "late_register=EPERM"
    fi
    stop_server
done
finish
