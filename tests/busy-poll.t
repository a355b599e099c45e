#!/bin/bash
# Busy polling (--busy-poll): under a heavy load the loop thread polls
# instead of sleeping between requests; it must stop as soon as the load
# does, never start at a light load, and stay off where it cannot help.
. "$(dirname "$0")/lib/functions.sh"
requires_python_nbd
plan 12

# load.py PID PACE: over one connection, write a pattern and read it back
# (16 requests in flight when PACE is 0, else one request each PACE
# seconds), then keep the connection open and idle for 1.2 s; prints the
# mismatching blocks (under load) and the server's CPU time over the last
# second.
cat > "$tmp/load.py" <<'PY'
import os, sys, time, nbd
pid, pace = int(sys.argv[2]), float(sys.argv[3])
h = nbd.NBD()
h.connect_uri(sys.argv[1])
BS, N = 4096, 4000
def block(i): return bytes([i % 251]) * (BS - 8) + i.to_bytes(8, 'little')
if pace:
    for i in range(100):
        h.pread(BS, i * BS); time.sleep(pace)
else:
    # 16 requests in flight: writes, then reads of the same blocks.
    writes = list(range(N))
    while writes or h.aio_in_flight():
        while h.aio_in_flight() < 16 and writes:
            i = writes.pop(); h.aio_pwrite(block(i), i * BS)
        h.poll(-1)
    reads = list(range(N)); got = {}
    while reads or h.aio_in_flight():
        while h.aio_in_flight() < 16 and reads:
            i = reads.pop(); b = nbd.Buffer(BS); got[i] = b; h.aio_pread(b, i * BS)
        h.poll(-1)
    bad = sum(1 for i, b in got.items() if b.to_bytearray() != block(i))
    print("mismatches", bad)
def cpu():
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) * 1000 // os.sysconf("SC_CLK_TCK")
time.sleep(0.2)
c0 = cpu(); time.sleep(1.0); c1 = cpu()
print("idle_cpu_ms", c1 - c0)
h.shutdown()
PY

# run_load NAME PACE ARGS...: a server with ARGS, the load, then stop it;
# leaves the client's output in $tmp/NAME.out, the debug log in NAME.log.
run_load() {
    local name=$1 pace=$2; shift 2
    start_server "$name" -v "$@" || return 1
    python "$tmp/load.py" "$uri" "$server_pid" "$pace" > "$tmp/$name.out" 2>&1
    stop_server
}

# The largest limit: any steady load polls.
run_load heavy 0 --busy-poll 1000 memory 64M
is "heavy load: every block reads back as written" \
    "$(grep '^mismatches' "$tmp/heavy.out")" "mismatches 0"
caught=$(sed -n 's/.*busy polling: [0-9]* inputs, \([0-9]*\) of them caught.*/\1/p' "$tmp/heavy.log")
if [ "${caught:-0}" -gt 0 ]; then ok "heavy load: the loop polled and caught $caught inputs"
else not_ok "heavy load: the loop polled"; diag_file "$tmp/heavy.log"; fi
idle=$(sed -n 's/^idle_cpu_ms //p' "$tmp/heavy.out")
if [ -n "$idle" ] && [ "$idle" -lt 150 ]; then
    ok "once the load stops, an open connection costs no CPU ($idle ms in 1 s)"
else not_ok "once the load stops, polling stops (server CPU ${idle:-?} ms in 1 s)"
    diag_file "$tmp/heavy.out"; fi

# One request each 5 ms is a light load: no polling at the default limit.
run_load light 0.005 memory 64M
contains "light load: the loop never polls" "$tmp/light.log" \
    'busy polling: [0-9]+ inputs, 0 of them caught while polling; 0 polling windows ran out; 0\.0 ms'

run_load off 0 --busy-poll 0 memory 64M
is "--busy-poll 0: every block reads back as written" \
    "$(grep '^mismatches' "$tmp/off.out")" "mismatches 0"
contains "--busy-poll 0: off" "$tmp/off.log" 'busy polling: off$'

# Requests that run on worker threads finish away from the loop: the
# loop does not poll for them.
truncate -s 64M "$tmp/disk.img"
start_server workers -v --busy-poll 1000 --no-inline file "$tmp/disk.img"
nbdinfo --size "$uri" > /dev/null
stop_server
contains "a backend on worker threads: off" "$tmp/workers.log" 'busy polling: off$'

# Spinning on the only CPU the server may use would starve its clients.
if command -v taskset > /dev/null 2>&1; then
    sock="$tmp/onecpu.sock"
    taskset -c 0 "$NBDSERVE" -f -v -U "$sock" --busy-poll 1000 memory 1M 2> "$tmp/onecpu.log" &
    server_pid=$!; server_pids+=("$server_pid")
    wait_for_socket "$sock" "$server_pid"
    # Served once: the loop has decided (and logged) before it accepted.
    nbdinfo --size "nbd+unix:///?socket=$sock" > /dev/null
    stop_server
    contains "one CPU: off" "$tmp/onecpu.log" 'busy polling: off, this process may use one CPU only'
else
    skip "taskset is not installed"
fi

# Under a cgroup CPU quota of less than two CPUs, polling would use up
# the quota and get the server throttled.  Made only where the cpu
# controller is there to use (v1, or v2 with it already enabled below
# the root): nothing of the machine's set-up is changed.
cg=
if [ -w /sys/fs/cgroup/cpu/cgroup.procs ] && mkdir "/sys/fs/cgroup/cpu/nbdserve-test.$$" 2> /dev/null; then
    cg=/sys/fs/cgroup/cpu/nbdserve-test.$$
    echo 100000 > "$cg/cpu.cfs_period_us" && echo 100000 > "$cg/cpu.cfs_quota_us" || cg_failed=1
elif grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2> /dev/null &&
     mkdir "/sys/fs/cgroup/nbdserve-test.$$" 2> /dev/null; then
    cg=/sys/fs/cgroup/nbdserve-test.$$
    echo "100000 100000" > "$cg/cpu.max" || cg_failed=1
fi
if [ -n "$cg" ] && [ -z "${cg_failed:-}" ]; then
    sock="$tmp/quota.sock"
    sh -c 'echo $$ > "$1/cgroup.procs" && exec "$2" -f -v -U "$3" --busy-poll 1000 memory 1M' \
        sh "$cg" "$NBDSERVE" "$sock" 2> "$tmp/quota.log" &
    server_pid=$!; server_pids+=("$server_pid")
    wait_for_socket "$sock" "$server_pid"
    nbdinfo --size "nbd+unix:///?socket=$sock" > /dev/null
    stop_server
    contains "a cgroup quota of one CPU: off" "$tmp/quota.log" \
        "busy polling: off, the cgroup's CPU quota is 1.00 CPUs"
else
    skip "no cgroup with the cpu controller can be made here"
fi
[ -n "$cg" ] && rmdir "$cg"

for bad in -1 1001 20us; do
    nbdserve -f -U "$tmp/bad.sock" --busy-poll "$bad" memory 1M > "$tmp/bad.out" 2>&1
    rc=$?
    if [ $rc -eq 1 ] && grep -q "^nbdserve: --busy-poll: '$bad' is not a number of microseconds from 0 (never) to 1000" "$tmp/bad.out"
    then ok "--busy-poll $bad is refused"
    else not_ok "--busy-poll $bad is refused (exit $rc)"; diag_file "$tmp/bad.out"; fi
done
finish
