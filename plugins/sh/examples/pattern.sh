#!/bin/sh
# A read-only disk whose byte at offset N is N modulo 256, for the
# nbdserve sh plugin (and nbdkit's: the calling convention is the same).
#
#   nbdserve sh script=pattern.sh 16M        # the size; default 1M
#   nbdserve sh ./pattern.sh size=16M
#
# Every method is one run of this script: $1 is the method, $2 the
# handle, then the method's arguments.  $tmpdir is a directory of our
# own that lives as long as the server.
#
# SPDX-License-Identifier: BSD-3-Clause

period=$tmpdir/period   # 64 KiB of the pattern: 0, 1, ..., 255, 0, 1, ...

case "$1" in
    magic_config_key)
        echo size ;;
    config)
        if [ "$2" != size ]; then
            echo "EINVAL unknown parameter $2 (the only one is size=SIZE)" >&2
            exit 1
        fi
        echo "$3" > "$tmpdir/size" ;;
    config_complete)
        [ -f "$tmpdir/size" ] || echo 1M > "$tmpdir/size"
        # The 256 bytes, as printf octal escapes (no fork per byte)...
        i=0 escapes=
        while [ $i -lt 256 ]; do
            escapes="$escapes\\$((i / 64))$((i / 8 % 8))$((i % 8))"
            i=$((i + 1))
        done
        printf "$escapes" > "$period"
        # ... doubled eight times: 256 bytes * 2^8 = 64 KiB.
        for i in 1 2 3 4 5 6 7 8; do
            cat "$period" "$period" > "$period.new" && mv "$period.new" "$period"
        done ;;
    thread_model)
        echo parallel ;;   # every call only reads $tmpdir
    get_size)
        cat "$tmpdir/size" ;;   # 16M and the like are understood
    can_multi_conn)
        exit 0 ;;   # read-only: every connection sees the same bytes
    pread)
        # $3 bytes from offset $4: the period from where the offset falls
        # in it, then whole periods, cut at $3 bytes.  64 KiB is a
        # multiple of 256, so every period starts with byte 0.
        count=$3 offset=$4
        { tail -c +$((offset % 65536 + 1)) "$period"
          while cat "$period"; do :; done   # ends when head has enough
        } 2> /dev/null | head -c "$count" ;;
    *)
        # Anything else (can_write included) is not implemented: the
        # disk is read-only, and everything not said is "no".
        exit 2 ;;
esac
