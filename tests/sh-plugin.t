#!/bin/bash
# The sh plugin: both example scripts serve disks that nbdcopy copies in
# and out byte for byte (the pattern disk holds exactly its pattern); a
# script written the way nbdkit's sh plugin documents it runs unchanged
# (and, with nbdkit installed, gives the same bytes, map and
# capabilities there); the protocol's corners: errno names on stderr,
# exit codes 2 and 3, unknown exit codes, missing and non-executable
# scripts, garbage, short and long reads, a script killed by a signal,
# payloads far larger than a pipe both ways, a script leaving a process
# behind on its stdout, extents in nbdinfo --map, the thread model, the
# magic key, $tmpdir made and removed, inline scripts from stdin.
. "$(dirname "$0")/lib/functions.sh"
requires nbdinfo nbdcopy nbdsh cmp
requires_python_nbd
[ -n "${NBDSERVE_BINARY:-}" ] || [ -f "$top/plugins/sh/nbdserve-sh-plugin.so" ] ||
    skip_all "the sh plugin is not built"
plan 49

examples="$top/plugins/sh/examples"

# script NAME: the script on stdin becomes the executable $tmp/NAME.
script() { cat > "$tmp/$1"; chmod +x "$tmp/$1"; }

# errno_of URI PYTHON-CALL: the errno name the client gets, or "ok".
errno_of() {
    nbdsh -u "$1" -c "
import errno
try:
    $2
    print('ok')
except nbd.Error as e:
    print(errno.errorcode.get(e.errno, e.errno))"
}

# ---- The example scripts --------------------------------------------------
# The read-only pattern disk: byte N is N mod 256, for offsets that
# cross the script's 64 KiB period.
out=$(nbdserve -U - sh script="$examples/pattern.sh" 5M --run '
    nbdinfo --size "$uri"; nbdinfo "$uri" | grep -E "is_read_only|can_multi_conn"
    nbdcopy "$uri" '"$tmp/pattern.out" 2>&1)
is "pattern.sh: a 5M disk, read-only, multi-conn" "$(echo "$out" | tr -d '\t\n')" \
   "5242880is_read_only: truecan_multi_conn: true"
"$PYTHON" -c "
import sys
sys.stdout.buffer.write(bytes(i % 256 for i in range(256)) * (5 * 4096))" > "$tmp/pattern.want"
check "... nbdcopy reads exactly the pattern" cmp "$tmp/pattern.want" "$tmp/pattern.out"
got=$(nbdserve -U - sh "$examples/pattern.sh" size=1M --run 'nbdsh -u "$uri" -c "
print(h.pread(300, 65536 * 3 - 100) == bytes((65536 * 3 - 100 + i) % 256 for i in range(300)))"')
is "... size= as a parameter; a read across the period is right" "$got" "True"
out=$(nbdserve -U - sh "$examples/pattern.sh" --run 'nbdcopy "'"$tmp/pattern.out"'" "$uri"' 2>&1)
like "... writing is refused: the disk is read-only" "$out" "read.only|Operation not permitted"

# The writable file disk: a source with data and holes goes in with
# nbdcopy, comes out the same, and the backing file holds it.
head -c 3M /dev/urandom > "$tmp/src.img"
truncate -s 8M "$tmp/src.img"
dd if=/dev/urandom of="$tmp/src.img" bs=64K seek=100 count=5 conv=notrunc status=none
truncate -s 8M "$tmp/disk.img"
nbdserve -U - sh script="$examples/file.sh" "$tmp/disk.img" --run '
    nbdcopy "'"$tmp/src.img"'" "$uri" && nbdcopy "$uri" "'"$tmp/back.img"'"' \
    > "$tmp/file.log" 2>&1
check "file.sh: nbdcopy in, then out, gives the source back" cmp "$tmp/src.img" "$tmp/back.img"
check "... and the file holds it" cmp "$tmp/src.img" "$tmp/disk.img"
out=$(nbdserve -U - sh "$examples/file.sh" file="$tmp/disk.img" --run 'nbdsh -u "$uri" -c "
h.pwrite(b\"F\" * 4096, 262144, nbd.CMD_FLAG_FUA)
h.zero(65536, 0)
h.zero(4096, 131072, nbd.CMD_FLAG_NO_HOLE)
h.trim(65536, 1 << 20)
h.flush()
print(h.pread(4096, 262144) == b\"F\" * 4096, h.pread(65536, 0) == bytes(65536),
      h.pread(4096, 131072) == bytes(4096))"' 2>&1)
is "... FUA write, zero (with and without a hole), trim, flush" "$out" "True True True"

# ---- A script as nbdkit's documentation writes them -------------------------
# case "$1" in ... esac, a file in $tmpdir as the disk, exit 2 for the
# rest; extents as "offset length type" lines with size suffixes.
script nbdkit-style.sh <<'EOF'
#!/usr/bin/env bash
f=$tmpdir/disk
case "$1" in
  config)
    [ "$2" = fill ] || { echo "EINVAL unknown parameter $2" >&2; exit 1; }
    echo "$3" > "$tmpdir/fill" ;;
  config_complete)
    truncate -s 2M "$f"
    if [ -f "$tmpdir/fill" ]; then
      head -c 512K /dev/zero | tr '\0' "$(cat "$tmpdir/fill")" |
        dd of="$f" conv=notrunc status=none
    fi ;;
  open) echo "handle-$RANDOM" ;;
  get_size) stat -L -c '%s' "$f" || exit 1 ;;
  can_write|can_flush|can_trim|can_zero|can_extents) exit 0 ;;
  can_multi_conn) exit 3 ;;
  pread) dd iflag=skip_bytes,count_bytes skip=$4 count=$3 if="$f" status=none || exit 1 ;;
  pwrite) dd oflag=seek_bytes conv=notrunc seek=$4 of="$f" status=none || exit 1 ;;
  flush) sync "$f" ;;
  trim) ;;
  zero) echo "ENOTSUP write the zeroes yourself" >&2; exit 1 ;;
  extents)
    echo 0 512K
    echo 512K 1536K hole,zero ;;
  *) exit 2 ;;
esac
exit 0
EOF
caps='is_read_only|can_flush|can_trim|can_zero|can_fua|can_multi_conn|can_cache|export-size'
run_style() { # SERVER...: map, capabilities, the disk after writing to it
    "$@" -U - "$tmp/nbdkit-style.sh" fill=x --run '
        nbdinfo --map "$uri"; nbdinfo "$uri" | grep -E "'"$caps"'"
        nbdsh -u "$uri" -c "h.pwrite(b\"w\" * 70000, 100000); h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)" &&
        nbdcopy "$uri" "'"$tmp/style-$1.out"'"'
}
out=$(run_style nbdserve sh 2> "$tmp/style.log")
is "nbdkit-style script: map and capabilities" "$(echo "$out" | tr -s ' \t' ' ')" \
" 0 524288 0 data
 524288 1572864 3 hole,zero
 export-size: 2097152 (2M)
 is_read_only: false
 can_cache: false
 can_flush: true
 can_fua: true
 can_multi_conn: false
 can_trim: true
 can_zero: true"
"$PYTHON" -c "
import sys
d = bytearray(b'x' * 524288 + bytes(2097152 - 524288))
d[0:4096] = bytes(4096)
d[100000:170000] = b'w' * 70000
sys.stdout.buffer.write(d)" > "$tmp/style.want"
check "... the disk after a write and a zero (emulated after ENOTSUP)" \
    cmp "$tmp/style.want" "$tmp/style-nbdserve.out"
if command -v nbdkit > /dev/null && nbdkit sh --version > /dev/null 2>&1; then
    nbdkit_sh() { timeout -k 5 "$CLIENT_TIMEOUT" nbdkit "$@"; }
    out_kit=$(run_style nbdkit_sh sh 2> "$tmp/style-kit.log")
    is "... nbdkit's sh plugin serves the same script with the same map and capabilities" \
       "$(echo "$out_kit" | tr -s ' \t' ' ' | grep -v can_df)" "$(echo "$out" | tr -s ' \t' ' ')"
    check "... and the same bytes" cmp "$tmp/style-nbdserve.out" "$tmp/style-nbdkit_sh.out"
else
    skip "nbdkit's sh plugin is not installed"
    skip "nbdkit's sh plugin is not installed"
fi

# ---- Errors ------------------------------------------------------------------
script errors.sh <<'EOF'
#!/bin/sh
case "$1" in
  get_size) echo 1M ;;
  can_write|can_zero) exit 0 ;;
  pwrite)
    cat > /dev/null
    case $4 in
      0) echo "ENOSPC no room" >&2; exit 1 ;;
      512) echo "the disk is on fire" >&2; exit 1 ;;
      1024) echo "EPERM with status 5" >&2; exit 5 ;;
      1536) exit 200 ;;
      2048) exit 3 ;;
      2560) exit 2 ;;
      3072) kill -9 $$ ;;
      3584) echo ENOSPC >&2; exit 1 ;;
      4096) head -c 200000 /dev/zero | tr '\0' E >&2; exit 1 ;;
    esac ;;
  pread)
    case $4 in
      0) head -c $(($3 - 1)) /dev/zero ;;
      512) head -c $(($3 + 1)) /dev/zero ;;
      1024) yes ;;
      *) head -c $3 /dev/zero ;;
    esac ;;
  *) exit 2 ;;
esac
EOF
start_server errors sh "$tmp/errors.sh"
is "exit 1 with 'ENOSPC no room' on stderr: the client gets ENOSPC" \
   "$(errno_of "$uri" 'h.pwrite(b"x" * 512, 0)')" ENOSPC
contains "... and the log has the message, with the method" "$tmp/errors.log" \
   "sh: $tmp/errors.sh pwrite: no room$"
is "exit 1 with a bare errno name: that errno" "$(errno_of "$uri" 'h.pwrite(b"x" * 512, 3584)')" ENOSPC
is "exit 1 with a message and no errno name: EIO" \
   "$(errno_of "$uri" 'h.pwrite(b"x" * 512, 512)')" EIO
contains "... the message is logged whole" "$tmp/errors.log" "pwrite: the disk is on fire$"
is "exit 5 (reserved): still the errno the script names" \
   "$(errno_of "$uri" 'h.pwrite(b"x" * 512, 1024)')" EPERM
contains "... and the log says the status is not defined" "$tmp/errors.log" \
   "pwrite: with status 5 \\(exit status 5, which the sh protocol reserves or does not define"
is "exit 200: EIO" "$(errno_of "$uri" 'h.pwrite(b"x" * 512, 1536)')" EIO
contains "... said so" "$tmp/errors.log" "failed, saying nothing on stderr \\(exit status 200"
is "exit 3 (false) from pwrite: EIO" "$(errno_of "$uri" 'h.pwrite(b"x" * 512, 2048)')" EIO
contains "... said so" "$tmp/errors.log" "pwrite: exited with status 3 \\(false\\), which this method does not allow"
is "exit 2 from pwrite although can_write said yes: EIO" \
   "$(errno_of "$uri" 'h.pwrite(b"x" * 512, 2560)')" EIO
contains "... said so" "$tmp/errors.log" "has no pwrite method \\(it exited with status 2\\)"
is "a script killed by a signal: EIO" "$(errno_of "$uri" 'h.pwrite(b"x" * 512, 3072)')" EIO
contains "... said so" "$tmp/errors.log" "pwrite: killed by signal 9"
is "200 KB on stderr: EIO, the message bounded" "$(errno_of "$uri" 'h.pwrite(b"x" * 512, 4096)')" EIO
contains "... with the rest counted, not kept" "$tmp/errors.log" "pwrite: E{600} \\[and 199400 more bytes on stderr\\]$"
is "a short read: EIO" "$(errno_of "$uri" 'h.pread(512, 0)')" EIO
contains "... said so" "$tmp/errors.log" "pread: printed 511 bytes, but 512 were asked for \\(at offset 0\\)"
is "a read one byte too long: EIO" "$(errno_of "$uri" 'h.pread(512, 512)')" EIO
is "a read that never ends ('yes'): EIO, and no hang" "$(errno_of "$uri" 'h.pread(512, 1024)')" EIO
contains "... said so" "$tmp/errors.log" "pread: printed more than the 512 bytes asked for on stdout"
is "no zero method: the server writes zeroes instead" "$(errno_of "$uri" 'h.zero(4096, 8192)')" ok
is "the server still serves after all that" "$(errno_of "$uri" 'h.pread(512, 8192)')" ok
stop_server

out=$(nbdserve -U - sh "$tmp/no-such.sh" --run true 2>&1)
like "a missing script: a clear error" "$out" "sh: script $tmp/no-such.sh: No such file or directory"
script not-exec.sh < /dev/null
chmod -x "$tmp/not-exec.sh"
out=$(nbdserve -U - sh "$tmp/not-exec.sh" --run true 2>&1)
like "a script that is not executable: a clear error" "$out" \
     "sh: script $tmp/not-exec.sh is not executable \\(chmod \\+x $tmp/not-exec.sh\\)"
out=$(nbdserve -U - sh "$tmp" --run true 2>&1)
like "a directory: a clear error" "$out" "sh: script $tmp is not a regular file"
script garbage.sh <<'EOF'
#!/bin/sh
case "$1" in
  get_size) echo "lots of bytes" ;;
  pread) ;;
  *) exit 2 ;;
esac
EOF
out=$(nbdserve -U - sh "$tmp/garbage.sh" --run 'nbdinfo --size "$uri"' 2>&1)
like "get_size printing garbage: the client is refused, the log says why" "$out" \
     "sh: $tmp/garbage.sh get_size: printed 'lots of bytes', which is not a size"
script no-config.sh <<'EOF'
#!/bin/sh
case "$1" in get_size) echo 1M ;; pread) head -c $3 /dev/zero ;; *) exit 2 ;; esac
EOF
out=$(nbdserve -U - sh "$tmp/no-config.sh" colour=blue --run true 2>&1)
like "a parameter for a script without config: refused" "$out" \
     "sh: $tmp/no-config.sh takes no parameters \\(it has no config method\\), got colour=blue"
out=$(nbdserve -U - sh script="$tmp/no-config.sh" 1M --run true 2>&1)
like "a bare parameter for a script without magic_config_key: refused" "$out" \
     "prints no magic_config_key to take a parameter without key= \\('1M'\\)"

# ---- Payloads much larger than a pipe, both ways ------------------------------
# 32 MiB in one request: the script reads all of stdin before writing
# anything back, so only a server that writes and reads at once gets
# through; a pwrite that never reads stdin must not hang either.
script big.sh <<'EOF'
#!/bin/sh
f=$tmpdir/disk
case "$1" in
  config_complete) truncate -s 64M "$f" ;;
  get_size) echo 64M ;;
  can_write) exit 0 ;;
  block_size) echo 1 4K 32M ;;
  pread) dd if="$f" skip=$4 count=$3 iflag=skip_bytes,count_bytes bs=1M status=none ;;
  pwrite)
    if [ "$4" = 0 ]; then
      # All of stdin, then a long answer on stderr before exiting.
      dd of="$f" seek=$4 oflag=seek_bytes conv=notrunc iflag=fullblock bs=1M status=none
      head -c 1M /dev/zero | tr '\0' . >&2
    fi ;;   # any other offset: exit 0 without reading stdin
  *) exit 2 ;;
esac
EOF
got=$(nbdserve -U - sh "$tmp/big.sh" --run 'nbdsh -u "$uri" -c "
import os
data = os.urandom(32 << 20)
h.pwrite(data, 0)
h.pwrite(data, 32 << 20)
print(h.pread(32 << 20, 0) == data)"' 2> "$tmp/big.log")
is "32 MiB written and read back in single requests; a pwrite that ignores stdin is fine" \
   "$got" "True"

# ---- A process left behind holding stdout ---------------------------------------
script leaves.sh <<'EOF'
#!/bin/sh
case "$1" in
  get_size) echo 1M ;;
  pread)
    head -c $3 /dev/zero
    sleep 600 &           # inherits stdout and keeps it open
    echo $! > "$tmpdir/../leftover.pid" ;;
  *) exit 2 ;;
esac
EOF
got=$(nbdserve -U - sh "$tmp/leaves.sh" --run 'nbdsh -u "$uri" -c "print(h.pread(512, 0) == bytes(512))"' 2>&1)
is "a script that leaves a process holding its stdout: the read completes" "$got" "True"
[ -f "$tmp/leftover.pid" ] && kill "$(cat "$tmp/leftover.pid")" 2> /dev/null

# ---- Extents, thread model, $tmpdir, the magic key, inline scripts ----------
script map.sh <<'EOF'
#!/bin/sh
case "$1" in
  get_size) echo 4M ;;
  can_extents) exit 0 ;;
  thread_model) echo "$THREAD_MODEL" ;;
  config_complete) echo "$tmpdir" > "$tmpdir/../tmpdir.path"; touch "$tmpdir/state" ;;
  pread) head -c $3 /dev/zero ;;
  extents)
    # Units of 1M, the type as a number and as words; whatever lies
    # before the requested offset is skipped by the server.
    echo 0 1M 0
    echo 1M 1M 3
    echo 2M 512K zero
    echo 2621440 1572864 hole,zero ;;
  *) exit 2 ;;
esac
EOF
out=$(THREAD_MODEL=parallel nbdserve -v -U - sh "$tmp/map.sh" --run '
    nbdinfo --map "$uri"; test -f "$(cat '"$tmp/tmpdir.path"')/state" && echo tmpdir-there' 2> "$tmp/map.log")
is "extents from a script appear in nbdinfo --map" "$(echo "$out" | tr -s ' ' ' ')" \
" 0 1048576 0 data
 1048576 1048576 3 hole,zero
 2097152 524288 2 zero
 2621440 1572864 3 hole,zero
tmpdir-there"
contains "the script's thread_model (parallel) is the server's" "$tmp/map.log" "thread model 3,"
dir=$(cat "$tmp/tmpdir.path")
like "\$tmpdir is in \$TMPDIR and gone after the server exits" \
     "$dir $( [ -e "$dir" ] && echo still-there || echo gone)" "^$tmp/nbdserve-sh-.* gone$"
THREAD_MODEL=threads-please nbdserve -v -U - sh "$tmp/map.sh" --run true 2> "$tmp/map2.log"
contains "an unknown thread model is ignored with a message" "$tmp/map2.log" \
    "thread_model: ignoring 'threads-please'.*the thread model stays serialize_all_requests"
contains "... and the default, serialize_all_requests, stands" "$tmp/map2.log" "thread model 1,"

out=$(nbdserve -U - sh - --run 'nbdinfo --size "$uri"; nbdsh -u "$uri" -c "print(bytes(h.pread(4, 100)))"' 2>&1 <<'EOF'
case "$1" in
  get_size) echo 8K ;;
  pread) head -c $3 /dev/zero | tr '\0' Q ;;
  *) exit 2 ;;
esac
EOF
)
is "an inline script from stdin, without #!, runs under /bin/sh" "$out" "8192
b'QQQQ'"

finish
