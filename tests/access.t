#!/bin/bash
# Access control: --allow/--deny by address prefix (TCP) and by peer
# uid/gid (Unix sockets), -u/-g dropping root after binding, and plugins
# that anybody could replace refused.  Refused clients are closed before
# the handshake; the server goes on serving the clients it should.
. "$(dirname "$0")/lib/functions.sh"
plan 17

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# tcp_server NAME ARGS...: a TCP server on 127.0.0.1; sets $port and $server_pid.
tcp_server() {
    local name=$1; shift
    port=$(free_port)
    "$NBDSERVE" -f -i 127.0.0.1 -p "$port" "$@" 2> "$tmp/$name.log" &
    server_pid=$!
    server_pids+=("$server_pid")
    for _ in $(seq 100); do
        nbdinfo --size "nbd://127.0.0.1:$port/" > /dev/null 2>&1 && return 0
        grep -q "refusing a connection" "$tmp/$name.log" 2> /dev/null && return 0
        sleep 0.05
    done
    diag "server $name did not start"; diag_file "$tmp/$name.log"
}

tcp_works() { [ "$(nbdinfo --size "nbd://127.0.0.1:$port/" 2> /dev/null)" = "$1" ]; }

tcp_server allow-self --allow=127.0.0.0/8 memory 1M
check "--allow=127.0.0.0/8: a loopback client is served" tcp_works 1048576
stop_server

tcp_server allow-other --allow=10.0.0.0/8 --allow=2001:db8::/32 memory 1M
check_fails "--allow=10.0.0.0/8 (and an IPv6 prefix): 127.0.0.1 is refused" tcp_works 1048576
like "... and the refusal names the client" "$(cat "$tmp/allow-other.log")" \
    "refusing a connection: 127\.0\.0\.1 is not allowed"
stop_server

tcp_server deny-one --allow=127.0.0.0/8 --deny=127.0.0.1 memory 1M
check_fails "--deny=127.0.0.1 wins over --allow=127.0.0.0/8" tcp_works 1048576
stop_server

# A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; IPv4 rules
# must still apply to them.
if "$PYTHON" -c 'import socket; s=socket.socket(socket.AF_INET6); s.bind(("::1",0))' 2> /dev/null; then
    port=$(free_port)
    "$NBDSERVE" -f -p "$port" --allow=127.0.0.1/32 --allow=::1 memory 2M 2> "$tmp/dual.log" &
    server_pid=$!; server_pids+=("$server_pid")
    for _ in $(seq 100); do (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null && break; sleep 0.05; done
    check "dual stack: 127.0.0.1 matches --allow=127.0.0.1/32" tcp_works 2097152
    is "dual stack: ::1 matches --allow=::1" "$(nbdinfo --size "nbd://[::1]:$port/" 2>&1)" 2097152
    stop_server
else
    skip "no IPv6 on this machine"; skip "no IPv6 on this machine"
fi

# ---- Unix sockets: peer credentials ----
start_server uid-root --allow=uid:root memory 1M
is "--allow=uid:root: root is served" "$(nbdinfo --size "$uri" 2>&1)" 1048576
stop_server

start_server deny-root --deny=uid:0 memory 1M
out=$(nbdinfo --size "$uri" 2>&1); rc=$?
like "--deny=uid:0: root is refused before the handshake" "$rc $(cat "$tmp/deny-root.log")" \
    "^[1-9].*uid 0 gid 0 .* is not allowed"
stop_server

if id nobody > /dev/null 2>&1 && command -v setpriv > /dev/null; then
    nogroup=$(id -gn nobody)
    chmod 755 "$tmp"   # so that nobody can reach the sockets
    start_server uid-nobody --allow=uid:nobody --allow=gid:root memory 1M
    chmod 777 "$sock"
    is "--allow=uid:nobody: nobody is served" \
       "$(setpriv --reuid=nobody --regid="$nogroup" --clear-groups /usr/bin/nbdinfo --size "$uri" 2>&1)" 1048576
    is "--allow=gid:root: a root-group client is served" "$(nbdinfo --size "$uri" 2>&1)" 1048576
    stop_server
    start_server gid-only --allow=gid:root memory 1M
    chmod 777 "$sock"
    out=$(setpriv --reuid=nobody --regid="$nogroup" --clear-groups /usr/bin/nbdinfo --size "$uri" 2>&1); rc=$?
    check "--allow=gid:root: nobody (group $nogroup) is refused" test "$rc" -ne 0
    is "... while root still is served" "$(nbdinfo --size "$uri" 2>&1)" 1048576
    stop_server
else
    for i in 1 2 3 4; do skip "no 'nobody' user or no setpriv"; done
fi

# ---- -u/-g: root is dropped once the socket is bound ----
if [ "$(id -u)" = 0 ] && id nobody > /dev/null 2>&1; then
    # As with systemd's RuntimeDirectory: the socket's directory belongs to
    # the user, who can then remove the socket at exit.
    mkdir -m 755 "$tmp/run"
    chown nobody "$tmp/run"
    sock="$tmp/run/nbd.sock"
    "$NBDSERVE" -f -U "$sock" -u nobody -g "$(id -gn nobody)" memory 1M 2> "$tmp/user.log" &
    server_pid=$!; server_pids+=("$server_pid")
    wait_for_socket "$sock" "$server_pid"
    uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$server_pid/status")
    nobody_uid=$(id -u nobody)
    is "-u nobody: every uid of the server is nobody's" "$uids" "$nobody_uid $nobody_uid $nobody_uid $nobody_uid"
    is "-u nobody: it serves" "$(nbdinfo --size "nbd+unix:///?socket=$sock" 2>&1)" 1048576
    stop_server
    check "-u nobody: it removed its socket at exit" test ! -e "$sock"
else
    for i in 1 2 3; do skip "needs root and a 'nobody' user"; done
fi

# ---- plugins anybody could replace ----
mkdir -m 777 "$tmp/open"
cp "$top/plugins/memory/nbdserve-memory-plugin.so" "$tmp/open/"
nbdserve -U - "$tmp/open/nbdserve-memory-plugin.so" 1M --run true > "$tmp/ww.out" 2>&1; rc=$?
like "a plugin in a world-writable directory is refused" "$rc $(cat "$tmp/ww.out")" \
    "^1 .*anybody may write to its directory"
mkdir -m 755 "$tmp/closed"
cp "$top/plugins/memory/nbdserve-memory-plugin.so" "$tmp/closed/"
chmod 777 "$tmp/closed/nbdserve-memory-plugin.so"
nbdserve -U - "$tmp/closed/nbdserve-memory-plugin.so" 1M --run true > "$tmp/ww2.out" 2>&1; rc=$?
like "a world-writable plugin file is refused" "$rc $(cat "$tmp/ww2.out")" "^1 .*anybody may write to it"
finish
