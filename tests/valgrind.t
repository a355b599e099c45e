#!/bin/bash
# A representative run under valgrind: memory and file plugins, the error
# and delay filters, TLS with PSK, pipelined I/O, then an orderly SIGTERM.
# Valgrind must report no memory errors and no leaks (definite or
# indirect); what libraries keep until exit ("still reachable") is fine.
. "$(dirname "$0")/lib/functions.sh"
requires valgrind
if ldd "$NBDSERVE" | grep -qE 'libasan|libtsan'; then skip_all "the sanitizer build cannot run under valgrind"; fi
plan 8

VALGRIND=(valgrind -q --leak-check=full --show-leak-kinds=definite,indirect
          --errors-for-leak-kinds=definite,indirect --error-exitcode=99 --num-callers=30)

# vg_server NAME ARGS...: nbdserve under valgrind on $tmp/NAME.sock.
vg_server() {
    local name=$1; shift
    sock="$tmp/$name.sock"
    uri="nbd+unix:///?socket=$sock"
    "${VALGRIND[@]}" --log-file="$tmp/$name.vg" "$NBDSERVE" -f -U "$sock" "$@" 2> "$tmp/$name.log" &
    server_pid=$!
    server_pids+=("$server_pid")
    wait_for_socket "$sock" "$server_pid" 600
}

# vg_clean NAME: the server stopped with status 0 and valgrind said nothing.
vg_clean() {
    local name=$1
    stop_server
    if [ "$stopped_rc" = 0 ] && [ ! -s "$tmp/$name.vg" ]; then
        ok "$name: valgrind reports no errors and no leaks"
    else
        not_ok "$name: exit status $stopped_rc, valgrind said:"
        diag_file "$tmp/$name.vg" 60
    fi
}

head -c 8M /dev/urandom > "$tmp/data"

vg_server mem --filter=error --filter=delay memory 64M error-file="$tmp/trigger" \
    error-rate=1 delay-read=1ms
nbdcopy "$tmp/data" "$uri" && nbdcopy "$uri" "$tmp/back" && cmp -s -n 8388608 "$tmp/data" "$tmp/back"
check "memory + filters: 8 MiB round trip" test $? -eq 0
touch "$tmp/trigger"
out=$(nbdsh -u "$uri" -c 'h.pread(512, 0)' 2>&1)
like "memory + filters: the error filter fails a read" "$out" "Input/output error|EIO"
rm "$tmp/trigger"
"$PYTHON" - "$uri" <<'PY' > "$tmp/aio.out" 2>&1
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
bufs = [nbd.Buffer(65536) for _ in range(64)]
for i, b in enumerate(bufs):
    h.aio_pread(b, i * 65536)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.block_status(1 << 20, 0, lambda *a: 0)
h.shutdown()
print("done")
PY
contains "memory + filters: 64 pipelined reads and block status" "$tmp/aio.out" "^done$"
vg_clean mem

mkdir "$tmp/dir"
cp "$tmp/data" "$tmp/dir/disk"
psktool -u alice -p "$tmp/keys.psk" > /dev/null 2>&1 && chmod 600 "$tmp/keys.psk"
vg_server tls --tls=require --tls-psk="$tmp/keys.psk" file dir="$tmp/dir"
tls_uri="nbds+unix://alice@/disk?socket=$sock&tls-psk-file=$tmp/keys.psk"
nbdcopy "$tls_uri" "$tmp/back2" && cmp -s "$tmp/data" "$tmp/back2"
check "file + TLS-PSK: 8 MiB read back equal" test $? -eq 0
nbdinfo "nbd+unix:///disk?socket=$sock" > /dev/null 2>&1
check "file + TLS-PSK: a plaintext client is refused" test $? -ne 0
listed=$(nbdinfo --list "nbds+unix://alice@/?socket=$sock&tls-psk-file=$tmp/keys.psk" 2>&1 | grep -c 'export="disk"')
is "file + TLS-PSK: nbdinfo --list" "$listed" 1
vg_clean tls
finish
