#!/bin/bash
# qemu's NBD client: qemu-io pattern writes and reads, qemu-img info,
# qemu-img compare, on the memory and the file plugin (the latter on the
# connection thread and on worker threads).
. "$(dirname "$0")/lib/functions.sh"
requires qemu-img qemu-io
plan 20

for backend in $backends; do
    start_backend $backend
    check "$backend: qemu-img info sees 64 MiB" \
        sh -c "/usr/bin/qemu-img info '$uri' | grep -q 'virtual size: 64 MiB (67108864 bytes)'"
    check "$backend: qemu-io pattern write, read back" qemu-io -f raw \
        -c "write -P 0x5a 1M 3M" -c "read -P 0x5a 1M 3M" -c "read -P 0 0 1M" -c "read -P 0 4M 1M" "$uri"
    check "$backend: qemu-io unaligned write, read back" qemu-io -f raw \
        -c "write -P 0xa1 12345 6789" -c "read -P 0xa1 12345 6789" \
        -c "read -P 0 12000 345" -c "read -P 0 19134 1000" "$uri"
    check "$backend: qemu-io write zeroes, discard" qemu-io -f raw \
        -c "write -P 0x11 60M 1M" -c "write -z 60M 64k" -c "read -P 0 60M 64k" -c "read -P 0x11 61504k 960k" \
        -c "discard 62M 1M" -c "read -P 0 62M 1M" "$uri"
    check "$backend: qemu-io sees earlier writes on a new connection" qemu-io -f raw \
        -c "read -P 0x5a 1M 3M" -c "read -P 0xa1 12345 6789" "$uri"
    # The same bytes locally, compared with qemu-img compare over NBD.
    rm -f "$tmp/expect.img"; truncate -s 64M "$tmp/expect.img"
    /usr/bin/qemu-io -f raw -c "write -P 0x5a 1M 3M" -c "write -P 0xa1 12345 6789" \
        -c "write -P 0x11 60M 1M" -c "write -z 60M 64k" -c "write -z 62M 1M" "$tmp/expect.img" > /dev/null
    check "$backend: qemu-img compare with a local copy" qemu-img compare -f raw -F raw "$tmp/expect.img" "$uri"
    stop_server
done

# A different pattern must make compare fail: the comparison is real.
start_server differ memory 64M
/usr/bin/qemu-io -f raw -c "write -P 0x5b 1M 3M" "$uri" > /dev/null
check_fails "qemu-img compare notices a difference" qemu-img compare -f raw -F raw "$tmp/expect.img" "$uri"
stop_server

start_server ro -r memory 1M
check_fails "-r: qemu-io write fails" qemu-io -f raw -c "write -P 1 0 512" "$uri"
stop_server
finish
