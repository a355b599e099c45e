#!/bin/bash
# 64 MiB of random data through nbdcopy and qemu-img, compared byte for byte.
. "$(dirname "$0")/lib/functions.sh"
plan 12

head -c 64M /dev/urandom > "$tmp/random"
truncate -s 64M "$tmp/disk.img"

for backend in memory file; do
    if [ $backend = memory ]; then start_server $backend memory 64M; else start_server $backend file "$tmp/disk.img"; fi
    check "$backend: nbdcopy in" nbdcopy "$tmp/random" "$uri"
    rm -f "$tmp/back"
    nbdcopy "$uri" "$tmp/back"
    check "$backend: nbdcopy out compares equal" cmp "$tmp/random" "$tmp/back"
    rm -f "$tmp/back.raw"
    qemu-img convert -f raw -O raw "$uri" "$tmp/back.raw"
    check "$backend: qemu-img convert out compares equal" cmp "$tmp/random" "$tmp/back.raw"
    check "$backend: qemu-io pattern write/read" qemu-io -f raw \
        -c "write -P 0x5a 1M 3M" -c "read -P 0x5a 1M 3M" -c "read -P 0 0 0" "$uri"
    check "$backend: qemu-io verifies unchanged data" qemu-io -f raw -c "write -P 0x11 60M 64k" \
        -c "read -P 0x11 60M 64k" -c "write -z 61M 1M" -c "read -P 0 61M 1M" "$uri"
    check "$backend: qemu-img info" sh -c "qemu-img info '$uri' | grep -q 'virtual size: 64 MiB'"
    stop_server
done
finish
