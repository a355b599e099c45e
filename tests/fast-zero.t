#!/bin/bash
# The fast-zero filter: the write-zeroes and FAST_ZERO capabilities a
# client sees in every mode; fast-zero=slow refuses FAST_ZERO at once
# without reaching the plugin, and qemu-img convert onto it still copies
# exactly; zero=emulate writes zeroes (in bounded pieces) over a plugin
# with no zero callback, blocking at that; zero=notrim never passes
# MAY_TRIM; bad values and combinations are refused at start.
. "$(dirname "$0")/lib/functions.sh"
requires cc nbdsh qemu-img
requires_python_nbd
requires_filter fast-zero
requires_filter delay
plan 30

# A test plugin: a RAM disk of 8 MiB that logs each pwrite and zero as
# "KIND COUNT OFFSET FLAGS" to log=PATH.  With -DWITH_ZERO it has a zero
# callback; without, the server can only emulate zero by writing.  It
# does not promise never to block, so the chain runs on worker threads.
cat > "$tmp/zlog.c" <<'C'
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "nbdserve-plugin.h"

#define SIZE (8 << 20)
static char *disk;
static int logfd = -1;

static int zl_config(const char *key, const char *value)
{
  if (strcmp(key, "log") != 0)
    return 0;
  logfd = open(value, O_WRONLY | O_CREAT | O_APPEND, 0644);
  return logfd >= 0 ? 1 : -1;
}
static int zl_get_ready(void)
{
  disk = calloc(1, SIZE);
  return disk ? 0 : -1;
}
static void note(const char *kind, uint64_t count, uint64_t offset, uint32_t flags)
{
  char line[96];
  int n = snprintf(line, sizeof line, "%s %llu %llu %u\n", kind, (unsigned long long) count,
                   (unsigned long long) offset, flags);
  if (logfd >= 0 && write(logfd, line, (size_t) n) != n)
    abort();
}
static void *zl_open(int readonly, const char *name) { (void) readonly, (void) name; return disk; }
static int64_t zl_get_size(void *h) { (void) h; return SIZE; }
static int zl_pread(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h, (void) flags;
  memcpy(buf, disk + offset, count);
  return 0;
}
static int zl_pwrite(void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h;
  note("pwrite", count, offset, flags);
  memcpy(disk + offset, buf, count);
  return 0;
}
#ifdef WITH_ZERO
static int zl_zero(void *h, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) h;
  note("zero", count, offset, flags);
  memset(disk + offset, 0, count);
  return 0;
}
#endif
static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "zlog",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .config = zl_config,
  .get_ready = zl_get_ready,
  .open = zl_open,
  .get_size = zl_get_size,
  .pread = zl_pread,
  .pwrite = zl_pwrite,
#ifdef WITH_ZERO
  .zero = zl_zero,
#endif
};
NBDSERVE_REGISTER_PLUGIN(plugin)
C
build_plugin zlog.so "$tmp/zlog.c"
build_plugin zlog-zero.so -DWITH_ZERO "$tmp/zlog.c"

caps() { nbdsh -u "$uri" -c 'print(h.can_zero(), h.can_fast_zero())' 2>&1; }

# ---- what a client sees, mode by mode, over the memory plugin ----
while read -r want args; do
    start_server caps --filter=fast-zero memory 16M $args
    is "memory ${args:-(no parameters)}: can_zero, can_fast_zero = $want" "$(caps)" "${want/,/ }"
    stop_server
done <<'MODES'
True,True
False,False zero=none
False,False zero=none fast-zero=none
True,False zero=emulate
True,True zero=notrim
True,True fast-zero=slow
True,True fast-zero=ignore
True,False fast-zero=none
True,True fast-zero=fast
True,True zero=emulate fast-zero=slow
True,False zero=notrim fast-zero=none
MODES

# Over a plugin without zero, FAST_ZERO is not advertised unless forced.
start_server nozero --filter=fast-zero "$tmp/zlog.so"
is "no zero callback, default: no FAST_ZERO" "$(caps)" "True False"
stop_server
start_server nozero-fast --filter=fast-zero "$tmp/zlog.so" fast-zero=slow
is "no zero callback, fast-zero=slow: FAST_ZERO advertised" "$(caps)" "True True"
stop_server

# ---- fast-zero=slow: ENOTSUP at once, never reaching the (slow) layer below ----
start_server slow --filter=fast-zero --filter=delay memory 16M fast-zero=slow delay-zero=1
out=$(python - "$uri" <<'PY'
import errno, nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
start = time.monotonic()
try:
    h.zero(1 << 20, 0, nbd.CMD_FLAG_FAST_ZERO)
    err = "no error"
except nbd.Error as e:
    err = errno.errorcode.get(e.errnum, str(e.errnum))
took = time.monotonic() - start
h.pwrite(b"\xff" * 4096, 0)
start = time.monotonic()
h.zero(4096, 0)                      # without the flag: zeroed, through the delay
slow = time.monotonic() - start
print(err,
      "fast" if took < 0.5 else "slow %.3f" % took,
      "delayed" if slow >= 0.9 else "undelayed %.3f" % slow,
      h.pread(4096, 0) == bytes(4096))
PY
)
is "fast-zero=slow: FAST_ZERO fails with ENOTSUP in under 0.5 s; a plain zero goes down" \
   "$out" "ENOTSUP fast delayed True"
stop_server

# qemu-img convert onto a fast-zero=slow export copies exactly.
"$PYTHON" - "$tmp/src.img" <<'PY'
import sys
with open(sys.argv[1], "wb") as f:
    f.truncate(8 << 20)
    for off in (0, 3 << 20, (8 << 20) - 65536):
        f.seek(off); f.write(bytes((i * 7 + off) & 0xff or 1 for i in range(65536)))
PY
start_server convert --filter=fast-zero "$tmp/zlog-zero.so" fast-zero=slow log="$tmp/convert.log"
# Dirty the destination first, so zero regions must really be zeroed.
nbdsh -u "$uri" -c 'h.pwrite(b"\xaa" * (8 << 20), 0)'
check "qemu-img convert -n onto fast-zero=slow succeeds" \
    timeout -k 5 "$CLIENT_TIMEOUT" qemu-img convert -n -f raw -O raw "$tmp/src.img" "$uri"
nbdsh -u "$uri" -c 'import sys; sys.stdout.buffer.write(h.pread(8 << 20, 0))' > "$tmp/dst.img"
check "the copy is identical to the source" cmp "$tmp/src.img" "$tmp/dst.img"
# FAST_ZERO is bit 3 (8): it never reached the plugin.
is "no FAST_ZERO request reached the plugin" \
   "$(awk '$1 == "zero" && int($4 / 8) % 2 == 1' "$tmp/convert.log" | wc -l)" 0
stop_server

# ---- zero=emulate over a plugin without zero (and that may block) ----
rm -f "$tmp/emu.log"
start_server emulate --filter=fast-zero "$tmp/zlog.so" zero=emulate log="$tmp/emu.log"
out=$(python - "$uri" "$tmp/emu.log" <<'PY'
import nbd, os, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\x5a" * (8 << 20), 0)
os.truncate(sys.argv[2], 0)          # count the zeroes' writes only
h.zero(5 << 20, 1 << 20 | 512)
h.zero(100, 7 << 20)
data = h.pread(8 << 20, 0)
want = bytearray(b"\x5a" * (8 << 20))
want[(1 << 20) + 512:(6 << 20) + 512] = bytes(5 << 20)
want[7 << 20:(7 << 20) + 100] = bytes(100)
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    fz = "accepted"
except nbd.Error:
    fz = "refused"
print(data == bytes(want), fz)
PY
)
is "zero=emulate: zeroed ranges read back as zero, the rest intact; FAST_ZERO not accepted" \
   "$out" "True refused"
is "zero=emulate: only writes reach the plugin" "$(grep -c '^zero' "$tmp/emu.log")" 0
is "zero=emulate: no piece larger than 1 MiB" \
   "$(awk '$1 == "pwrite" && $2 > 1048576' "$tmp/emu.log" | wc -l)" 0
is "zero=emulate: a 5 MiB and a 100-byte zero take 5 + 1 writes" \
   "$(grep -c '^pwrite' "$tmp/emu.log")" 6
stop_server

# The same over the delay filter, which waits without a thread: each
# piece that waits comes back and the zero still completes.
start_server emulate-delay --filter=fast-zero --filter=delay memory 16M zero=emulate delay-write=10ms
is "zero=emulate over delay-write: a 3 MiB zero completes and reads back" \
   "$(nbdsh -u "$uri" -c 'h.pwrite(b"x" * (4 << 20), 0); h.zero(3 << 20, 0); print(h.pread(4 << 20, 0) == bytes(3 << 20) + b"x" * (1 << 20))' 2>&1)" True
stop_server

# ---- zero=notrim: MAY_TRIM (bit 1, 2) never reaches the plugin ----
rm -f "$tmp/notrim.log" "$tmp/trim.log"
for mode in notrim plugin; do
    start_server "$mode" --filter=fast-zero "$tmp/zlog-zero.so" zero=$mode log="$tmp/$mode.log"
    nbdsh -u "$uri" -c 'h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE); h.zero(65536, 65536)' \
        > /dev/null 2>&1
    stop_server
done
is "zero=notrim: two zeroes reach the plugin, neither with MAY_TRIM" \
   "$(awk '$1 == "zero" { n++; if (int($4 / 2) % 2) t++ } END { print n + 0, t + 0 }' "$tmp/notrim.log")" "2 0"
is "zero=plugin (control): the zero without NO_HOLE carries MAY_TRIM" \
   "$(awk '$1 == "zero" { n++; if (int($4 / 2) % 2) t++ } END { print n + 0, t + 0 }' "$tmp/plugin.log")" "2 1"

# ---- bad values and combinations ----
refused() {
    nbdserve -f -U "$tmp/bad.sock" --filter=fast-zero memory 1M "$@" > "$tmp/bad.out" 2>&1 < /dev/null
    local rc=$?
    if [ $rc -ne 0 ] && [ $rc -lt 124 ] && grep -q "$1" "$tmp/bad.out"; then
        ok "refused at start: $*"
    else
        not_ok "refused at start: $* (exit $rc)"; diag_file "$tmp/bad.out"
    fi
}
refused zero=bogus
refused fast-zero=quick
refused zero=none fast-zero=fast
refused zero=none fast-zero=slow
refused zero=emulate fast-zero=fast
like "--help --filter=fast-zero lists both parameters" \
     "$(nbdserve --help --filter=fast-zero memory 2>&1 | grep -E '^(zero|fast-zero)=' | tr '\n' ' ')" \
     '^zero=plugin\|none\|emulate\|notrim fast-zero=plugin\|slow\|ignore\|none\|fast'
finish
