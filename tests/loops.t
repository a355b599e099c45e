#!/bin/bash
# Connection loops (--loops): the count of loop threads, refused values,
# connections spread over the loops (the -v line names each one's loop),
# and two busy clients at once keeping both loops working, their data
# verified byte for byte, in plaintext and over TLS-PSK.
. "$(dirname "$0")/lib/functions.sh"
requires nbdcopy nproc
requires_python_nbd
plan 24

# loop_threads PID: the names of the server's loop threads, sorted.  The
# socket exists before the loop threads have named themselves, so this
# waits (up to 5 s) until the list is non-empty and the same for 200 ms.
loop_names() {
    local t
    for t in /proc/"$1"/task/*; do cat "$t/comm" 2> /dev/null; done | grep '^loop-' | sort | tr '\n' ' '
}
loop_threads() {
    local i same=0 last= now
    for i in $(seq 100); do
        now=$(loop_names "$1")
        if [ -n "$now" ] && [ "$now" = "$last" ]; then
            same=$((same + 1))
            [ $same -ge 4 ] && break
        else
            same=0
        fi
        last=$now
        sleep 0.05
    done
    echo "$now"
}

# loop_cpu PID NAME: utime+stime (clock ticks) of the thread named NAME
# (0 if there is none, which fails any check that wants it busy).
# The fields after "(comm)" are counted from 3, so utime (14) and stime
# (15) are the 12th and 13th after the closing parenthesis.
loop_cpu() {
    local t
    for t in /proc/"$1"/task/*; do
        [ "$(cat "$t/comm" 2> /dev/null)" = "$2" ] || continue
        sed 's/^.*) //' "$t/stat" | awk '{ print $12 + $13 }'
        return
    done
    echo 0
}

# A client that owns REGION bytes at ID*REGION: it connects, says so in
# READY, waits for the file GO (so that both clients are connected before
# either starts), then for SECONDS writes its region in 1 MiB requests
# with a pattern naming the client, the round and the piece, and reads
# every piece back.  Prints "rounds=N bad=M".
cat > "$tmp/region.py" <<'PY'
import nbd, os, sys, time
uri, ident, region, seconds, ready, go = sys.argv[1:]
ident, region, seconds = int(ident), int(region), float(seconds)
h = nbd.NBD()
h.set_uri_allow_local_file(True)  # for tls-psk-file=
h.connect_uri(uri)
open(ready, "w").close()
deadline = time.monotonic() + 20
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.01)
piece = 1 << 20
base = ident * region
rounds = bad = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    want = []
    for k in range(region // piece):
        data = (b"%02d:%06d:%04d|\n" % (ident, rounds, k)) * (piece // 16)
        h.pwrite(data, base + k * piece)
        want.append(data)
    for k, data in enumerate(want):
        if h.pread(piece, base + k * piece) != data:
            bad += 1
    rounds += 1
h.shutdown()
print("rounds=%d bad=%d" % (rounds, bad))
PY

# busy_pair NAME URI: two region clients at once against $server_pid;
# sets $cpu0 and $cpu1 (ticks each loop thread used while they ran) and
# leaves their output in $tmp/NAME.0.out and $tmp/NAME.1.out.
busy_pair() {
    local name=$1 u=$2 i pids=() before0 before1
    rm -f "$tmp/$name".*
    for i in 0 1; do
        python "$tmp/region.py" "$u" $i $((8 << 20)) 1.5 "$tmp/$name.ready$i" "$tmp/$name.go" \
            > "$tmp/$name.$i.out" 2>&1 &
        pids+=($!)
    done
    for i in $(seq 200); do
        [ -e "$tmp/$name.ready0" ] && [ -e "$tmp/$name.ready1" ] && break
        sleep 0.05
    done
    before0=$(loop_cpu "$server_pid" loop-0)
    before1=$(loop_cpu "$server_pid" loop-1)
    touch "$tmp/$name.go"
    for i in "${pids[@]}"; do wait "$i"; done
    cpu0=$(( $(loop_cpu "$server_pid" loop-0) - before0 ))
    cpu1=$(( $(loop_cpu "$server_pid" loop-1) - before1 ))
}

# pair_verified NAME DESCRIPTION: both clients did rounds, none bad.
pair_verified() {
    local out0 out1
    out0=$(cat "$tmp/$1.0.out"); out1=$(cat "$tmp/$1.1.out")
    if [[ $out0 =~ ^rounds=[1-9][0-9]*\ bad=0$ && $out1 =~ ^rounds=[1-9][0-9]*\ bad=0$ ]]; then
        ok "$2 ($out0; $out1)"
    else
        not_ok "$2"; diag_file "$tmp/$1.0.out"; diag_file "$tmp/$1.1.out"
    fi
}

# both_loops_busy DESCRIPTION: each loop thread used at least 50 ms of CPU.
both_loops_busy() {
    if [ "$cpu0" -ge 5 ] && [ "$cpu1" -ge 5 ]; then ok "$1 (loop-0 $cpu0, loop-1 $cpu1 ticks)"
    else not_ok "$1"; diag "CPU ticks while busy: loop-0 $cpu0, loop-1 $cpu1"; fi
}

# ---- How many loops ---------------------------------------------------------
start_server one --loops=1 memory 1M
is "--loops=1: one loop thread" "$(loop_threads "$server_pid")" "loop-0 "
stop_server

start_server dflt memory 1M
want=$(for i in $(seq 0 $(( $(nproc) - 1 ))); do echo "loop-$i"; done | sort | tr '\n' ' ')
is "default: as many loop threads as nproc ($(nproc))" "$(loop_threads "$server_pid")" "$want"
stop_server

start_server four --loops=4 memory 1M
is "--loops=4: four loop threads, even on $(nproc) CPUs" "$(loop_threads "$server_pid")" \
    "loop-0 loop-1 loop-2 loop-3 "
stop_server

for bad in 0 x -1 2x 1025; do
    out=$(nbdserve -f -U "$tmp/bad.sock" --loops=$bad memory 1M 2>&1 < /dev/null); rc=$?
    like "--loops=$bad: refused with a clear message" "$rc $out" \
        "^1 nbdserve: --loops: '$bad' is not a number of loops between 1 and [0-9]+$"
done
is "... and no server was left listening" "$(ls "$tmp"/bad.sock 2> /dev/null)" ""

# ---- Two busy clients on two loops ------------------------------------------
start_server busy -v --loops=2 memory 64M
is "--loops=2: two loop threads" "$(loop_threads "$server_pid")" "loop-0 loop-1 "
busy_pair plain "$uri"
pair_verified plain "two clients at once: every piece read back as written"
both_loops_busy "both loop threads used CPU while the two clients ran"
# The two clients were connected at the same time: least-loaded placement
# puts them on different loops, and the -v line says which.
contains "-v: 'connection N opened (loop K)'" "$tmp/busy.log" \
    '^nbdserve: debug: connection [0-9]+ opened \(loop [01]\)$'
is "the two simultaneous connections went to loops 0 and 1" \
    "$(grep -oE 'connection [12] opened \(loop [0-9]+\)' "$tmp/busy.log" | sed 's/.*loop //; s/)//' | sort | tr '\n' ' ')" \
    "0 1 "
# Once both are gone the loads are back to zero: the next two again
# spread over both loops rather than piling onto one.
busy_pair again "$uri"
pair_verified again "a second pair after the first closed: data verified"
is "... and again on loops 0 and 1" \
    "$(grep -oE 'connection [34] opened \(loop [0-9]+\)' "$tmp/busy.log" | sed 's/.*loop //; s/)//' | sort | tr '\n' ' ')" \
    "0 1 "
stop_server

# With one loop both clients share loop-0 (the counterpart of the above).
start_server single -v --loops=1 memory 64M
busy_pair one "$uri"
pair_verified one "--loops=1: two clients at once, data verified"
is "... both on loop 0" \
    "$(grep -oE 'connection [12] opened \(loop [0-9]+\)' "$tmp/single.log" | sed 's/.*loop //; s/)//' | tr '\n' ' ')" \
    "0 0 "
stop_server

# ---- TLS-PSK on two loops ---------------------------------------------------
if command -v psktool > /dev/null 2>&1; then
    psktool -u alice -p "$tmp/keys.psk" > /dev/null 2>&1
    chmod 600 "$tmp/keys.psk"
    start_server tls -v --loops=2 --tls=require --tls-psk="$tmp/keys.psk" memory 64M
    tls_uri="nbds+unix://alice@/?socket=$sock&tls-psk-file=$tmp/keys.psk"
    busy_pair tlsbusy "$tls_uri"
    pair_verified tlsbusy "TLS: two clients at once, every piece read back as written"
    both_loops_busy "TLS: both loop threads used CPU"
    # nbdcopy cannot write just a part of a disk: the disk is filled
    # first, then two nbdcopy clients (one connection each) copy it out
    # at the same time, and each copy must equal the source.
    head -c 64M /dev/urandom > "$tmp/random"
    check "TLS: nbdcopy fills the disk" nbdcopy "$tmp/random" "$tls_uri"
    nbdcopy --connections=1 "$tls_uri" "$tmp/copy0" > "$tmp/copy0.out" 2>&1 & p0=$!
    nbdcopy --connections=1 "$tls_uri" "$tmp/copy1" > "$tmp/copy1.out" 2>&1 & p1=$!
    wait $p0; rc0=$?; wait $p1; rc1=$?
    is "TLS: two concurrent nbdcopy reads exit 0" "$rc0 $rc1" "0 0"
    if cmp -s "$tmp/random" "$tmp/copy0" && cmp -s "$tmp/random" "$tmp/copy1"; then
        ok "TLS: both copies equal the data written"
    else
        not_ok "TLS: both copies equal the data written"; diag_file "$tmp/copy0.out"; diag_file "$tmp/copy1.out"
    fi
    is "TLS: the two nbdcopy connections went to loops 0 and 1" \
        "$(grep -oE 'connection [0-9]+ opened \(loop [0-9]+\)' "$tmp/tls.log" | tail -2 | sed 's/.*loop //; s/)//' | sort | tr '\n' ' ')" \
        "0 1 "
    stop_server
else
    for i in 1 2 3 4 5 6; do skip "psktool is not installed"; done
fi
finish
