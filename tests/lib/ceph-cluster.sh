#!/bin/bash
# ceph-cluster.sh - a throw-away single-node Ceph cluster for the rbd tests
# and benchmarks: one ceph-mon, optionally one ceph-mgr, one ceph-osd on
# the memstore object store (its data lives in RAM) or bluestore, all on 127.0.0.1,
# all in one private directory, no systemd.
#
#   ceph-cluster.sh start DIR [POOL]   start it; DIR is created (must be empty)
#   ceph-cluster.sh stop DIR           stop exactly the daemons DIR records
#   ceph-cluster.sh stop-osd DIR [SIGNAL]   kill the OSD (default SIGKILL, a crash)
#   ceph-cluster.sh restart-osd DIR [POOL]  start it again, wait until POOL is usable
#
# Environment: OBJECTSTORE (memstore, the default, or bluestore on a file
# in DIR: memstore keeps nothing across an OSD restart, bluestore does),
# STORE_MB (the store's capacity, default 1024), WITH_MGR
# (default 0: RBD I/O, snapshots and diffs need no manager), CEPH_WAIT
# (seconds any one step may take, default 60).
# After "start", DIR/ceph.conf is the clients' configuration and
# DIR/keyring holds client.admin; DIR/DAEMON.pid records each daemon.
#
# A guard process (DIR/guard.pid) watches the process that called
# "start" (or $CEPH_OWNER_PID) and stops the cluster when it is gone, so
# no daemon survives a test that was killed before its cleanup ran.
#
# SPDX-License-Identifier: BSD-3-Clause
set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin:$PATH

WAIT=${CEPH_WAIT:-60}

die() { echo "ceph-cluster.sh: $*" >&2; exit 1; }

# A process that exists and is not a zombie (a dead daemon stays a zombie
# child of the shell that started it until reaped).
alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2> /dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# The pid in FILE, if it is still one of our daemons: its command line
# names our configuration (a pid reused by another process is left alone).
our_pid() {
    local pid
    pid=$(cat "$1" 2> /dev/null) || return 1
    alive "$pid" || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null | grep -qF -- "-c $dir/ceph.conf" || return 1
    echo "$pid"
}

# stop_daemons PIDFILE...: SIGTERM, up to 10 s, then SIGKILL.
stop_daemons() {
    local f pid pids=() n
    for f in "$@"; do
        [ -e "$f" ] || continue
        pid=$(our_pid "$f") && kill -TERM "$pid" 2> /dev/null && pids+=("$pid")
        rm -f "$f"
    done
    for ((n = 0; n < 100; n++)); do
        local left=()
        for pid in "${pids[@]}"; do alive "$pid" && left+=("$pid"); done
        [ ${#left[@]} -eq 0 ] && return 0
        pids=("${left[@]}")
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2> /dev/null; done
    for ((n = 0; n < 100; n++)); do
        local left=()
        for pid in "${pids[@]}"; do alive "$pid" && left+=("$pid"); done
        [ ${#left[@]} -eq 0 ] && return 0
        sleep 0.05
    done
}

cmd_stop() {
    [ -d "$dir" ] || return 0
    local guard
    guard=$(cat "$dir/guard.pid" 2> /dev/null) && [ "$guard" != "${BASHPID:-$$}" ] &&
        kill "$guard" 2> /dev/null
    rm -f "$dir/guard.pid"
    shopt -s nullglob
    # The OSD and the manager first: stopped after the monitor, an OSD
    # waits seconds for the monitor to acknowledge its going down.
    local others=() f
    for f in "$dir"/*.pid; do case $f in */mon.*) ;; *) others+=("$f") ;; esac; done
    stop_daemons "${others[@]}"
    stop_daemons "$dir"/mon.*.pid
}

ceph_cmd() { timeout -k 2 "$WAIT" ceph -c "$dir/ceph.conf" --connect-timeout "$WAIT" "$@"; }

write_conf() {
    local port=$1 fsid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat > "$dir/ceph.conf" << EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = $dir/keyring
run dir = $dir
log file = $dir/\$name.log
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1

[client]
log file = $dir/client.log

[mon]
admin socket = $dir/\$name.asok
mon data = $dir/mon.\$id
mon initial members = a
mon cluster log file = $dir/cluster.log
# proposals are batched for 1 s by default: every command would take 1 s
paxos propose interval = 0.05
paxos min wait = 0.01
# without a manager the monitor warns after this grace (default 120 s)
mon mgr mkfs grace = 31536000
# a killed OSD is marked down when it does not answer for this long
osd heartbeat grace = 4

[mgr]
admin socket = $dir/\$name.asok
mgr data = $dir/mgr.\$id

[osd]
admin socket = $dir/\$name.asok
osd data = $dir/osd.\$id
keyring = $dir/osd.\$id/keyring
osd objectstore = ${OBJECTSTORE:-memstore}
memstore device bytes = $((${STORE_MB:-1024} * 1024 * 1024))
bluestore block path = $dir/osd.\$id/block.img
bluestore block create = true
bluestore block size = $((${STORE_MB:-1024} * 1024 * 1024))
bluestore cache autotune = false
bluestore cache size = 67108864
osd memory target = 536870912
bdev enable discard = false
osd op num shards = 2
osd op num threads per shard = 1
osd heartbeat interval = 1
EOF
}

start_osd() {
    ceph-osd -c "$dir/ceph.conf" -i 0 -f > "$dir/osd.0.out" 2>&1 &
    echo $! > "$dir/osd.0.pid"
}

# Wait until the OSD is up (and "in") as the monitor sees it.
wait_osd_up() {
    local deadline=$((SECONDS + WAIT)) up
    while :; do
        up=$(ceph_cmd osd stat -f json 2> /dev/null |
             python3 -c 'import json,sys; print(json.load(sys.stdin)["num_up_osds"])' 2> /dev/null)
        [ "$up" = 1 ] && return 0
        our_pid "$dir/osd.0.pid" > /dev/null || die "the OSD died; see $dir/osd.0.out"
        [ $SECONDS -lt $deadline ] || die "the OSD is not up after ${WAIT} s"
        sleep 0.2
    done
}

# The guard: once OWNER is gone, stop the cluster.
start_guard() {
    local owner=$1 self
    self=$(readlink -f "$0")
    setsid bash -c '
        while kill -0 '"$owner"' 2> /dev/null; do sleep 1; done
        exec "$0" stop "$1"' "$self" "$dir" < /dev/null > /dev/null 2>&1 &
    echo $! > "$dir/guard.pid"
}

cmd_start() {
    local pool=${1:-rbd} owner=${CEPH_OWNER_PID:-$PPID}
    for p in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd; do
        command -v "$p" > /dev/null || die "$p is not installed"
    done
    mkdir -p "$dir" && dir=$(cd "$dir" && pwd) || die "cannot make $dir"
    [ -z "$(ls -A "$dir")" ] || die "$dir is not empty"
    trap 'rc=$?; [ $rc -eq 0 ] || { echo "ceph-cluster.sh: start failed, logs in $dir" >&2; cmd_stop; }' EXIT
    start_guard "$owner"

    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    write_conf "$port"
    local kr=(ceph-authtool "$dir/keyring")
    "${kr[@]}" --create-keyring --gen-key -n mon. --cap mon 'allow *' > /dev/null &&
    "${kr[@]}" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
        --cap mgr 'allow *' > /dev/null &&
    "${kr[@]}" --gen-key -n mgr.x --cap mon 'allow profile mgr' --cap osd 'allow *' > /dev/null ||
        die "ceph-authtool failed"

    monmaptool -c "$dir/ceph.conf" --create --clobber --fsid "$(awk '/^fsid/ {print $3}' "$dir/ceph.conf")" \
        --enable-all-features --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" > /dev/null ||
        die "monmaptool failed"
    mkdir -p "$dir/mon.a" "$dir/crash" "$dir/osd.0"
    ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring" \
        > "$dir/mon.mkfs.out" 2>&1 || die "ceph-mon --mkfs failed: $(tail -3 "$dir/mon.mkfs.out")"
    ceph-mon -c "$dir/ceph.conf" -i a -f > "$dir/mon.a.out" 2>&1 &
    echo $! > "$dir/mon.a.pid"
    if [ "${WITH_MGR:-0}" = 1 ]; then
        mkdir -p "$dir/mgr.x"
        ceph-mgr -c "$dir/ceph.conf" -i x -f > "$dir/mgr.x.out" 2>&1 &
        echo $! > "$dir/mgr.x.pid"
    fi

    local uuid key id
    uuid=$(cat /proc/sys/kernel/random/uuid)
    key=$(ceph-authtool --gen-print-key)
    printf '{"cephx_secret": "%s"}\n' "$key" > "$dir/osd.0/new.json"
    id=$(ceph_cmd osd new "$uuid" 0 -i "$dir/osd.0/new.json") || die "ceph osd new failed"
    [ "$id" = 0 ] || die "unexpected OSD id '$id'"
    ceph-authtool --create-keyring "$dir/osd.0/keyring" -n osd.0 --add-key "$key" > /dev/null
    ceph-osd -c "$dir/ceph.conf" -i 0 --mkfs --osd-uuid "$uuid" > "$dir/osd.mkfs.out" 2>&1 ||
        die "ceph-osd --mkfs failed: $(tail -3 "$dir/osd.mkfs.out")"
    start_osd
    wait_osd_up
    # 8 placement groups, created once the OSD is up (a size-1 PG that
    # moved to an OSD coming up later could stall its I/O).
    ceph_cmd osd pool create "$pool" 8 8 > /dev/null 2>&1 || die "cannot create pool $pool"
    timeout -k 2 "$WAIT" rbd -c "$dir/ceph.conf" pool init "$pool" || die "rbd pool init failed"
    trap - EXIT
    echo "CEPH_DIR=$dir"
    echo "CEPH_CONF=$dir/ceph.conf"
}

cmd_stop_osd() {
    local pid deadline=$((SECONDS + WAIT)) sig=${1:-KILL}
    pid=$(our_pid "$dir/osd.0.pid") || die "no OSD runs"
    kill -"$sig" "$pid"
    while alive "$pid"; do
        [ $SECONDS -lt $deadline ] || { kill -KILL "$pid"; die "the OSD ignored SIG$sig"; }
        sleep 0.05
    done
    rm -f "$dir/osd.0.pid"
}

cmd_restart_osd() {
    local pool=${1:-rbd}
    our_pid "$dir/osd.0.pid" > /dev/null && die "the OSD runs already"
    start_osd
    wait_osd_up
    # Listing the pool asks every placement group: it returns once all
    # are active again (without a manager, "ceph pg stat" cannot say).
    timeout -k 2 "$WAIT" rados -c "$dir/ceph.conf" -p "$pool" ls > /dev/null ||
        die "pool $pool is not usable ${WAIT} s after the OSD came back"
}

[ $# -ge 2 ] || die "usage: ceph-cluster.sh start|stop|stop-osd|restart-osd DIR [POOL]"
action=$1 dir=$2
shift 2
case $action in
    start) cmd_start "$@" ;;
    stop) dir=$(cd "$dir" 2> /dev/null && pwd) || exit 0; cmd_stop ;;
    stop-osd) dir=$(cd "$dir" && pwd) || exit 1; cmd_stop_osd "$@" ;;
    restart-osd) dir=$(cd "$dir" && pwd) || exit 1; cmd_restart_osd "$@" ;;
    *) die "unknown action '$action'" ;;
esac
