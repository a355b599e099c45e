#!/bin/bash
# 64 MiB of random data written with nbdcopy, read back with nbdcopy and
# with qemu-img convert, compared byte for byte, on the memory and the
# file plugin, on the connection thread and on worker threads.
. "$(dirname "$0")/lib/functions.sh"
requires nbdcopy qemu-img
plan 21

head -c 64M /dev/urandom > "$tmp/random"

for backend in $backends; do
    start_backend $backend
    check "$backend: nbdcopy writes 64 MiB" nbdcopy "$tmp/random" "$uri"
    rm -f "$tmp/back"
    check "$backend: nbdcopy reads it back" nbdcopy "$uri" "$tmp/back"
    check "$backend: nbdcopy copy compares equal" cmp "$tmp/random" "$tmp/back"
    rm -f "$tmp/back.raw"
    check "$backend: qemu-img convert reads it back" \
        qemu-img convert -f raw -O raw "$uri" "$tmp/back.raw"
    check "$backend: qemu-img copy compares equal" cmp "$tmp/random" "$tmp/back.raw"
    # Small requests and one connection: many requests in flight at once.
    rm -f "$tmp/back"
    nbdcopy --connections=1 --requests=64 --request-size=4096 "$uri" "$tmp/back"
    check "$backend: 4 KiB requests, 64 in flight, compare equal" cmp "$tmp/random" "$tmp/back"
    stop_server
    # The file plugin wrote through to the file itself.
    [ $backend = memory ] || check "$backend: the image file holds the data" cmp "$tmp/random" "$tmp/disk.img"
done

# Writing with many small unaligned requests through qemu-img (convert
# in) ends with the same bytes.
truncate -s 64M "$tmp/disk2.img"
start_server file2 file "$tmp/disk2.img"
qemu-img convert -n -f raw -O raw "$tmp/random" "$uri"
stop_server
check "file: qemu-img convert in, file compares equal" cmp "$tmp/random" "$tmp/disk2.img"
finish
