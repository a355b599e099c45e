# Shared helpers for the shell tests: TAP output, starting and stopping
# servers, and time limits on every client so that no test can hang.
#
# Use:   . "$(dirname "$0")/lib/functions.sh"
#        requires nbdinfo
#        plan 3
#        start_server mem memory 1G      # sets $sock $uri $server_pid
#        is "size" "$(nbdinfo --size "$uri")" 1073741824
#        ...
#        finish
#
# SPDX-License-Identifier: BSD-3-Clause

set -u
# libnbd's Python bindings live in Debian's python3, not a pyenv one.
export PATH=/usr/bin:/bin:/usr/sbin:/sbin:$PATH
export LC_ALL=C

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# NBDSERVE_BINARY runs the tests against another server (e.g. a wrapper
# around nbdkit, to check the tests themselves).
NBDSERVE=${NBDSERVE_BINARY:-$top/nbdserve}
RAWCLIENT="$top/tests/lib/rawclient"
PYTHON=/usr/bin/python3
# Seconds any one client command may take before it counts as a hang.
CLIENT_TIMEOUT=${CLIENT_TIMEOUT:-60}

# Data lives in memory when possible: the tests write hundreds of MiB.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then tmp_parent=/dev/shm; else tmp_parent=${TMPDIR:-/tmp}; fi
tmp=$(mktemp -d "$tmp_parent/nbdserve-test.XXXXXX")
# Private sockets of `-U -` are made under $TMPDIR: keep them in ours.
export TMPDIR="$tmp"

test_count=0
failures=0
planned=
server_pids=()
server_pid=
sock=
uri=

# ---- TAP ------------------------------------------------------------------
plan() { planned=$1; echo "1..$1"; }
# todo REASON: the next test is a known server bug; its failure is shown
# (as TAP "# TODO") but does not fail the suite, and prove reports it
# when it starts passing.
todo_reason=
todo() { todo_reason=$*; }
ok() {
    local suffix=${todo_reason:+ # TODO $todo_reason}
    todo_reason=
    test_count=$((test_count + 1))
    echo "ok $test_count - $*$suffix"
}
not_ok() {
    local suffix=${todo_reason:+ # TODO $todo_reason}
    [ -n "$todo_reason" ] || failures=$((failures + 1))
    todo_reason=
    test_count=$((test_count + 1))
    echo "not ok $test_count - $*$suffix"
}
diag() { echo "# $*" >&2; }
# Show a file (a log, a client's output) as TAP comments.
diag_file() { [ -f "$1" ] && sed 's/^/#   /' "$1" | head -"${2:-30}" >&2; return 0; }
skip() { test_count=$((test_count + 1)); echo "ok $test_count # SKIP $*"; }
skip_all() { echo "1..0 # SKIP $*"; exit 0; }

# requires PROGRAM...: skip the whole test if a tool is missing.
requires() {
    local p
    for p in "$@"; do
        command -v "$p" > /dev/null 2>&1 || skip_all "$p is not installed"
    done
}

# requires_filter NAME...: skip the whole test if a filter is not built.
requires_filter() {
    local f
    for f in "$@"; do
        [ -n "${NBDSERVE_BINARY:-}" ] || [ -f "$top/filters/$f/nbdserve-$f-filter.so" ] ||
            skip_all "the $f filter is not built"
    done
}
# have_filter NAME: true if the filter is built (to skip single tests).
have_filter() { [ -n "${NBDSERVE_BINARY:-}" ] || [ -f "$top/filters/$1/nbdserve-$1-filter.so" ]; }

# requires_python_nbd: skip unless Debian's python3 has libnbd.
requires_python_nbd() {
    "$PYTHON" -c 'import nbd' 2> /dev/null || skip_all "python3-libnbd is not installed"
}

# check DESCRIPTION COMMAND...: ok if the command succeeds.
check() {
    local desc=$1; shift
    if "$@" > "$tmp/check.out" 2>&1; then ok "$desc"
    else not_ok "$desc (exit $?)"; diag_file "$tmp/check.out" 20; fi
}

# check_fails DESCRIPTION COMMAND...: ok if the command fails (and does
# not time out or crash).
check_fails() {
    local desc=$1 rc; shift
    "$@" > "$tmp/check.out" 2>&1; rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -lt 128 ]; then ok "$desc"
    else not_ok "$desc (exit $rc)"; diag_file "$tmp/check.out" 20; fi
}

# is DESCRIPTION GOT EXPECTED
is() {
    if [ "$2" = "$3" ]; then ok "$1"
    else not_ok "$1"; diag "got:      '$2'"; diag "expected: '$3'"; fi
}

# like DESCRIPTION GOT EXTENDED-REGEX
like() {
    if printf '%s\n' "$2" | grep -Eq -- "$3"; then ok "$1"
    else not_ok "$1"; diag "got:      '$2'"; diag "expected to match: '$3'"; fi
}

# contains DESCRIPTION FILE EXTENDED-REGEX: some line of FILE matches.
contains() {
    if grep -Eq -- "$3" "$2"; then ok "$1"
    else not_ok "$1"; diag "no line matches '$3' in:"; diag_file "$2"; fi
}

# ---- Clients, each with a time limit ----------------------------------------
# Shell functions shadow the programs, so every call in a test is bounded.
nbdinfo() { timeout -k 5 "$CLIENT_TIMEOUT" /usr/bin/nbdinfo "$@"; }
nbdcopy() { timeout -k 5 "$CLIENT_TIMEOUT" /usr/bin/nbdcopy "$@"; }
nbdsh() { timeout -k 5 "$CLIENT_TIMEOUT" /usr/bin/nbdsh "$@"; }
qemu-img() { timeout -k 5 "$CLIENT_TIMEOUT" /usr/bin/qemu-img "$@"; }
qemu-io() { timeout -k 5 "$CLIENT_TIMEOUT" /usr/bin/qemu-io "$@"; }
python() { timeout -k 5 "$CLIENT_TIMEOUT" "$PYTHON" "$@"; }
rawclient() { timeout -k 5 "$CLIENT_TIMEOUT" "$RAWCLIENT" "$@"; }
# nbdserve in captive mode (--run) or for a command line that must fail.
nbdserve() { timeout -k 5 "$CLIENT_TIMEOUT" "$NBDSERVE" "$@"; }

# ---- Servers ------------------------------------------------------------------
# wait_for_socket PATH PID: true once PATH is a socket, false if PID died
# or 10 seconds passed.
wait_for_socket() {
    local i
    for i in $(seq "${3:-200}"); do  # tries of 50 ms
        [ -S "$1" ] && return 0
        kill -0 "$2" 2> /dev/null || return 1
        sleep 0.05
    done
    return 1
}

# start_server NAME ARGS...: run `nbdserve -f -U $tmp/NAME.sock ARGS...` in
# the background; sets $sock, $uri and $server_pid.  Its stderr goes to
# $tmp/NAME.log.  Returns 1 (after showing the log) if it does not start.
start_server() {
    local name=$1; shift
    sock="$tmp/$name.sock"
    uri="nbd+unix:///?socket=$sock"
    "$NBDSERVE" -f -U "$sock" "$@" 2> "$tmp/$name.log" &
    server_pid=$!
    server_pids+=("$server_pid")
    if wait_for_socket "$sock" "$server_pid"; then return 0; fi
    diag "server $name did not start: nbdserve -f -U $sock $*"
    diag_file "$tmp/$name.log"
    return 1
}

# start_backend BACKEND: a new, empty 64 MiB export of one of $backends:
# memory; file, an image in $tmp (in RAM when $tmp is, and then served
# on the connection's thread); file-workers, the same on worker threads.
backends="memory file file-workers"
start_backend() {
    case $1 in
        memory) start_server "$1" memory 64M ;;
        file|file-workers)
            rm -f "$tmp/disk.img"; truncate -s 64M "$tmp/disk.img"
            if [ "$1" = file ]; then start_server "$1" file "$tmp/disk.img"
            else start_server "$1" --no-inline file "$tmp/disk.img"; fi ;;
    esac
}

# build_plugin OUT CC-ARGS...: compile a test plugin or filter against
# include/ alone, as an outside author would, into $tmp/OUT.
build_plugin() {
    local out=$1; shift
    cc -std=gnu11 -Wall -Wextra -Werror -fPIC -shared -I"$top/include" "$@" -o "$tmp/$out" \
        > "$tmp/cc.log" 2>&1 || { diag_file "$tmp/cc.log"; return 1; }
}

# make_install DESTDIR [VAR=value...]: `make install DESTDIR=DESTDIR` of
# this tree, with the sanitizer setting it was built with, so that the
# install finds everything up to date and rebuilds nothing (other tests
# run the tree's binaries meanwhile).  Its output goes to $tmp/install.log.
make_install() {
    local dest=$1 flags=() before; shift
    grep -q -- '-fsanitize=address' "$top/.build-flags" && flags+=(SANITIZE=1)
    grep -q -- '-fsanitize=thread' "$top/.build-flags" && flags+=(TSAN=1)
    before=$(cat "$top/.build-flags")
    make -s -C "$top" install DESTDIR="$dest" "${flags[@]}" "$@" > "$tmp/install.log" 2>&1 ||
        { diag_file "$tmp/install.log"; return 1; }
    [ "$before" = "$(cat "$top/.build-flags")" ] ||
        { diag "make install rebuilt the tree with other flags (CFLAGS, OPTFLAGS?)"; return 1; }
}

# uri_of EXPORT: a URI for another export of the current server.
uri_of() { echo "nbd+unix:///$1?socket=$sock"; }

# stop_pid PID [SIGNAL]: SIGNAL (default TERM), then SIGKILL after 10 s;
# sets $stopped_rc.
stop_pid() {
    local pid=$1 sig=${2:-TERM} i
    stopped_rc=
    kill -"$sig" "$pid" 2> /dev/null || { wait "$pid" 2> /dev/null; stopped_rc=$?; return 0; }
    for i in $(seq 200); do
        kill -0 "$pid" 2> /dev/null || break
        sleep 0.05
    done
    if kill -0 "$pid" 2> /dev/null; then
        diag "process $pid ignored SIG$sig for 10 s; killing it"
        kill -KILL "$pid" 2> /dev/null
    fi
    wait "$pid" 2> /dev/null
    stopped_rc=$?
}

# stop_server [PID [SIGNAL]]: stop the (last started) server; its exit
# status is left in $stopped_rc.  A sanitizer report in any server log
# fails the test.
stop_server() {
    local pid=${1:-$server_pid}
    [ -n "$pid" ] || return 0
    stop_pid "$pid" "${2:-TERM}"
    local i
    for i in "${!server_pids[@]}"; do
        [ "${server_pids[$i]}" = "$pid" ] && unset "server_pids[$i]"
    done
    check_sanitizer_logs
}

check_sanitizer_logs() {
    local log
    for log in "$tmp"/*.log; do
        [ -f "$log" ] || continue
        if grep -Eq 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|WARNING: ThreadSanitizer' "$log"; then
            failures=$((failures + 1))
            diag "sanitizer report in $(basename "$log"):"
            diag_file "$log" 40
            mv "$log" "$log.reported"
        fi
    done
}

# A last line of defence against a hang the per-command limits miss
# (a test bug such as a bare `wait`): after TEST_TIMEOUT seconds the
# script is terminated, which still runs cleanup.
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
( trap 'kill $sleeper 2> /dev/null; exit 0' TERM
  sleep "$TEST_TIMEOUT" & sleeper=$!
  wait $sleeper
  echo "# watchdog: the test ran for over $TEST_TIMEOUT s; stopping it"
  kill -TERM $$ ) &
watchdog_pid=$!

# at_cleanup COMMAND: run COMMAND (a shell word list) when the test
# ends, however it ends, after its servers are stopped and before $tmp
# goes (a cluster of daemons the test started, for example).
cleanup_hooks=()
at_cleanup() { cleanup_hooks+=("$*"); }

cleanup() {
    local pid hook
    [ -n "${watchdog_pid:-}" ] && kill "$watchdog_pid" 2> /dev/null && wait "$watchdog_pid" 2> /dev/null
    watchdog_pid=
    for pid in "${server_pids[@]:-}"; do
        [ -n "$pid" ] && stop_pid "$pid"
    done
    for hook in "${cleanup_hooks[@]:-}"; do
        [ -n "$hook" ] && eval "$hook"
    done
    cleanup_hooks=()
    check_sanitizer_logs
    cd / && rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# finish: the exit status tells prove whether anything failed, including
# a count that does not match the plan.
finish() {
    cleanup
    trap - EXIT
    if [ -n "$planned" ] && [ "$test_count" -ne "$planned" ]; then
        diag "planned $planned tests but ran $test_count"
        exit 1
    fi
    [ "$failures" -eq 0 ]
    exit $?
}
