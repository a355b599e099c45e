#!/bin/sh
# A writable disk stored in a file, for the nbdserve sh plugin (and
# nbdkit's: the calling convention is the same).
#
#   truncate -s 1G disk.img
#   nbdserve sh script=file.sh disk.img
#   nbdserve sh ./file.sh file=disk.img
#
# Reads and writes are dd; trim and zero are fallocate (util-linux);
# flush and FUA are fsync.  Each call stands alone, so they may all run
# at once (thread_model parallel), and every connection sees the same
# file (can_multi_conn).
#
# SPDX-License-Identifier: BSD-3-Clause

f=$tmpdir/file   # a symlink to the file, made by config

case "$1" in
    magic_config_key)
        echo file ;;
    config)
        if [ "$2" != file ]; then
            echo "EINVAL unknown parameter $2 (the only one is file=PATH)" >&2
            exit 1
        fi
        # Absolute: the server changes directory when it daemonizes.
        ln -sf "$(realpath "$3")" "$f" ;;
    config_complete)
        if [ ! -f "$f" ]; then
            echo "EINVAL file=PATH is needed, naming an existing file" >&2
            exit 1
        fi ;;
    thread_model)
        echo parallel ;;
    get_size)
        stat -L -c %s "$f" ;;
    can_write|can_flush|can_trim|can_zero|can_multi_conn)
        exit 0 ;;
    can_fua)
        echo native ;;   # pwrite gets "fua" and makes that write durable
    pread)
        dd if="$f" skip="$4" count="$3" iflag=skip_bytes,count_bytes bs=1M status=none ;;
    pwrite)
        # The data is on stdin; fua: fdatasync before we answer.
        sync=
        case ",$5," in *,fua,*) sync=conv=fdatasync ;; esac
        dd of="$f" seek="$4" oflag=seek_bytes conv=notrunc iflag=fullblock bs=1M \
           status=none $sync ;;
    flush)
        sync "$f" ;;
    trim)
        # Advisory: a file system that cannot punch holes just keeps the data.
        fallocate --punch-hole --offset "$4" --length "$3" "$f" 2> /dev/null || : ;;
    zero)
        # may_trim: a hole is allowed, and reads back as zeroes.  Else
        # zero in place if the file system can; if not, ENOTSUP makes the
        # server write the zeroes with pwrite (or, for a "fast" zero, tells
        # the client that zeroing would not be fast).
        case ",$5," in
            *,may_trim,*) how=--punch-hole ;;
            *) how=--zero-range ;;
        esac
        if ! fallocate $how --offset "$4" --length "$3" "$f" 2> /dev/null; then
            echo "ENOTSUP cannot zero with fallocate $how here" >&2
            exit 1
        fi
        case ",$5," in *,fua,*) sync "$f" ;; esac ;;
    *)
        exit 2 ;;
esac
