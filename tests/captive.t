#!/bin/bash
# Ways of running the server: --run (captive mode) and its variables and
# exit status, -U - private sockets, TCP with a pidfile, -s on
# stdin/stdout, daemonizing, --exit-with-parent.
. "$(dirname "$0")/lib/functions.sh"
requires nbdinfo nbdsh
plan 18

nbdserve -U - memory 1M --run 'exit 7'
is "--run: the command's exit status is the server's" "$?" 7
nbdserve -U - memory 1M --run 'true'
is "--run: exit status 0" "$?" 0
nbdserve -U - memory 1M --run 'kill -TERM $$' 2> "$tmp/killed.log"
rc=$?
if [ $rc -ne 0 ]; then ok "--run: a command killed by a signal is a failure (exit $rc)"
else not_ok "--run: a command killed by a signal is a failure (exit 0)"; fi

out=$(nbdserve -U - -e foo memory 1M --run 'echo "$uri|$exportname|$unixsocket"; test -S "$unixsocket" && echo socket-ok')
like "--run: \$uri, \$exportname, \$unixsocket set" "$(echo $out)" \
    "^nbd\+unix:///foo\?socket=(/[^|]*)/socket\|foo\|/[^|]*/socket socket-ok$"

dir=$(nbdserve -U - memory 1M --run 'dirname "$unixsocket"')
if [ -n "$dir" ] && [ ! -e "$dir" ]; then ok "-U -: the private socket's directory is removed at exit"
else not_ok "-U -: private directory left behind: '$dir'"; fi

check "--run: nbdinfo through \$uri" nbdserve -U - memory 1M --run 'nbdinfo --size "$uri" | grep -qx 1048576'
check "--run: qemu-img through \$uri" nbdserve -U - memory 1M --run '/usr/bin/qemu-img info "$uri" | grep -q "virtual size: 1 MiB"'
# The server is gone when --run returns: nothing left listening.
nbdserve -U - memory 1M --run 'echo "$unixsocket" > '"$tmp/captive.sock"
check_fails "--run: nothing listens after the command ends" nbdinfo "nbd+unix:///?socket=$(cat "$tmp/captive.sock")"

# TCP on loopback, a free port from the kernel; pidfile; $port in --run.
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=$(nbdserve -i 127.0.0.1 -p "$port" memory 1M --run 'echo "$port $uri"; nbdinfo --size "$uri"')
is "--run over TCP: \$port, \$uri and a working connection" "$(echo $out)" "$port nbd://127.0.0.1:$port/ 1048576"

"$NBDSERVE" -f -i 127.0.0.1 -p "$port" -P "$tmp/tcp.pid" memory 1M 2> "$tmp/tcp.log" &
pid=$!; server_pids+=("$pid"); server_pid=$pid
for _ in $(seq 200); do [ -s "$tmp/tcp.pid" ] && break; sleep 0.05; done
is "-P: the pidfile holds the server's pid" "$(cat "$tmp/tcp.pid" 2> /dev/null)" "$pid"
is "TCP: nbdinfo over 127.0.0.1:$port" "$(nbdinfo --size "nbd://127.0.0.1:$port/" 2>&1)" 1048576
stop_server
is "SIGTERM: exit status 0" "$stopped_rc" 0

# -s: one client on stdin/stdout.
is "-s: a client on stdin/stdout" "$(nbdsh -c '
h.connect_command(["'"$NBDSERVE"'", "-s", "memory", "2M"])
h.pwrite(b"single", 0)
print(h.get_size(), h.pread(6, 0).decode())')" "2097152 single"

# gone PID: true once PID has exited (a zombie not yet reaped by whoever
# adopted it counts as exited), waiting up to 10 s.
gone() {
    local _
    for _ in $(seq 200); do
        case $(ps -o stat= -p "$1" 2> /dev/null) in ''|Z*) return 0;; esac
        sleep 0.05
    done
    return 1
}

# Without -f: the server daemonizes; the pidfile names the daemon.
"$NBDSERVE" -U "$tmp/daemon.sock" -P "$tmp/daemon.pid" memory 1M 2> "$tmp/daemon.log"
rc=$?
for _ in $(seq 200); do [ -s "$tmp/daemon.pid" ] && [ -S "$tmp/daemon.sock" ] && break; sleep 0.05; done
daemon=$(cat "$tmp/daemon.pid" 2> /dev/null)
[ -n "$daemon" ] && server_pids+=("$daemon")
is "daemon: the command returns 0 and the daemon serves" \
   "$rc $(nbdinfo --size "nbd+unix:///?socket=$tmp/daemon.sock" 2>&1)" "0 1048576"
[ -n "$daemon" ] && kill "$daemon"
if [ -n "$daemon" ] && gone "$daemon"; then ok "daemon: stops on SIGTERM"
else not_ok "daemon: stops on SIGTERM (pid '$daemon')"; fi

# --exit-with-parent: the server goes when the shell that started it does.
# exit_with_parent NAME WAIT ARGS...: a subshell starts the server with
# ARGS, waits for its socket if WAIT is "wait", and exits.
exit_with_parent() {
    local name=$1 wait=$2 pid; shift 2
    ( "$NBDSERVE" --exit-with-parent -U "$tmp/$name.sock" "$@" 2> "$tmp/$name.log" &
      echo $! > "$tmp/$name.child"
      [ "$wait" != wait ] || wait_for_socket "$tmp/$name.sock" $! )
    pid=$(cat "$tmp/$name.child" 2> /dev/null)
    [ -n "$pid" ] && server_pids+=("$pid")
    if [ -n "$pid" ] && gone "$pid"; then ok "--exit-with-parent ($name): gone with its parent"
    else not_ok "--exit-with-parent ($name): still running after its parent exited (pid '$pid')"
        diag_file "$tmp/$name.log"; fi
}
exit_with_parent ready wait memory 1M
# The parent leaves before the server is ready: no signal will come.
exit_with_parent early nowait memory 1M
# Changing user clears the death signal: it must be armed after -u.
if [ "$(id -u)" = 0 ] && id nobody > /dev/null 2>&1; then
    exit_with_parent as-nobody wait -u nobody memory 1M
else
    skip "-u nobody needs root"
fi
finish
