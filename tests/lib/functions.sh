# Shared helpers for the shell tests (TAP output).
# SPDX-License-Identifier: BSD-3-Clause

set -u
# libnbd's Python tools (nbdsh) need Debian's python3, not a pyenv one.
export PATH=/usr/bin:/bin:/usr/sbin:/sbin:$PATH
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NBDSERVE="$top/nbdserve"
tmp=$(mktemp -d /dev/shm/nbdserve-test.XXXXXX)
test_count=0
failures=0
server_pids=()

cleanup() {
    for pid in "${server_pids[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

plan() { echo "1..$1"; }
ok() { test_count=$((test_count + 1)); echo "ok $test_count - $*"; }
not_ok() { test_count=$((test_count + 1)); failures=$((failures + 1)); echo "not ok $test_count - $*"; }
diag() { echo "# $*"; }
skip_all() { echo "1..0 # SKIP $*"; exit 0; }

# check DESCRIPTION COMMAND...: ok if the command succeeds.
check() {
    local desc=$1; shift
    if "$@" > "$tmp/check.out" 2>&1; then ok "$desc"
    else not_ok "$desc"; sed 's/^/#   /' "$tmp/check.out" | head -20; fi
}

# is DESCRIPTION GOT EXPECTED
is() {
    if [ "$2" = "$3" ]; then ok "$1"
    else not_ok "$1"; diag "got:      '$2'"; diag "expected: '$3'"; fi
}

# start_server NAME ARGS...: run the server in the foreground on
# $tmp/NAME.sock in the background; sets $sock and $uri.
start_server() {
    local name=$1; shift
    sock="$tmp/$name.sock"
    uri="nbd+unix:///?socket=$sock"
    "$NBDSERVE" -f -U "$sock" "$@" 2> "$tmp/$name.log" &
    server_pid=$!
    server_pids+=("$server_pid")
    for _ in $(seq 200); do
        [ -S "$sock" ] && return 0
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.05
    done
    echo "# server $name did not start:"; sed 's/^/#   /' "$tmp/$name.log"
    return 1
}

stop_server() {
    kill "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
}

finish() {
    [ "$failures" -eq 0 ]
    exit $?
}
