#!/bin/bash
# systemd socket activation: the listening socket arrives as fd 3 with
# LISTEN_PID and LISTEN_FDS set; the server serves on it and binds nothing
# of its own.
. "$(dirname "$0")/lib/functions.sh"
requires nbdinfo
plan 7

# A tiny "systemd": binds $2, execs the server (same pid, so LISTEN_PID
# matches) with the socket on fd 3.  Prints the pid first.
cat > "$tmp/activate.py" <<'PY'
import os, socket, sys
path, pidfile, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(16)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
    s.close()
os.set_inheritable(3, True)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
with open(pidfile, "w") as f:
    f.write("%d\n" % os.getpid())
os.execv(argv[0], argv)
PY

sock="$tmp/act.sock"
uri="nbd+unix:///?socket=$sock"
"$PYTHON" "$tmp/activate.py" "$sock" "$tmp/act.pid" "$NBDSERVE" -f memory 2M 2> "$tmp/act.log" &
act_pid=$!
server_pids+=("$act_pid")
for _ in $(seq 100); do [ -S "$sock" ] && [ -s "$tmp/act.pid" ] && break; sleep 0.05; done
is "the launcher execs the server in place" "$(cat "$tmp/act.pid" 2> /dev/null)" "$act_pid"
is "nbdinfo over the inherited socket" "$(CLIENT_TIMEOUT=10 nbdinfo --size "$uri" 2>&1)" 2097152
nbdsh -u "$uri" -c 'h.pwrite(b"activated", 4096)'
is "data written on one connection is read on the next" \
   "$(nbdsh -u "$uri" -c 'print(h.pread(9, 4096).decode())')" "activated"
if [ -d /proc/$act_pid ] && ! ls -l /proc/$act_pid/fd 2> /dev/null | grep -q "socket:" ; then
    not_ok "the server holds a socket"
else
    # Count listening sockets: only the inherited one (no TCP port 10809).
    inodes=$(ls -l /proc/$act_pid/fd 2> /dev/null | sed -n 's/.*socket:\[\([0-9]*\)\].*/\1/p')
    listening_tcp=0
    for ino in $inodes; do
        awk -v ino="$ino" '$10 == ino && $4 == "0A"' /proc/net/tcp /proc/net/tcp6 2> /dev/null | grep -q . &&
            listening_tcp=$((listening_tcp + 1))
    done
    is "no TCP listener of its own besides the inherited socket" "$listening_tcp" 0
fi
stop_server "$act_pid"
is "SIGTERM: clean exit" "$stopped_rc" 0

# libnbd's own socket activation: nbdinfo -- [ nbdserve ... ].
out=$(nbdinfo --size -- [ "$NBDSERVE" -P "$tmp/sub.pid" memory 3M ] 2>&1)
is "nbdinfo -- [ nbdserve memory 3M ] (libnbd socket activation)" "$out" 3145728
sleep 0.5
pid=$(cat "$tmp/sub.pid" 2> /dev/null)
if [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null; then
    not_ok "the activated server does not outlive its client (pid $pid still running)"
    kill "$pid"
else
    ok "the activated server does not outlive its client"
fi
finish
