#!/bin/bash
# Payloads larger than the plugin's maximum block size.  A client that
# negotiated no block size (NBD_OPT_EXPORT_NAME, or GO without asking for
# NBD_INFO_BLOCK_SIZE) may read and write up to --max-payload (default
# 64M) in one request; the server splits it for the plugin into pieces of
# the plugin's maximum.  A client that asked for the block sizes is held
# to the maximum it was told.  Driven by tests/lib/rawclient.
. "$(dirname "$0")/lib/functions.sh"
. "$(dirname "$0")/lib/raw.sh"
requires cc cmp
plan 30

for i in 1 2 3; do head -c 40M /dev/urandom > "$tmp/w$i"; done

# pipeline NAME SETUP...: after SETUP, three 40 MiB writes at 0, 40M and
# 80M sent back to back, their replies read, then three 40 MiB reads sent
# back to back, each reply's data saved as it comes ($tmp/NAME.rK is the
# K-th reply).  The output is $tmp/NAME.out.
pipeline() {
    local name=$1; shift
    rm -f "$tmp/$name".r*
    raw "$name" hello "$@" \
        "req WRITE off=0 data=file:$tmp/w1 cookie=1" \
        "req WRITE off=40M data=file:$tmp/w2 cookie=2" \
        "req WRITE off=80M data=file:$tmp/w3 cookie=3" 'recv 3' \
        'req READ off=0 len=40M cookie=4' 'req READ off=40M len=40M cookie=5' \
        'req READ off=80M len=40M cookie=6' \
        recv "data-save $tmp/$name.r1" recv "data-save $tmp/$name.r2" \
        recv "data-save $tmp/$name.r3" 'req DISC' wait-eof
}

# pipeline_ok NAME DESCRIPTION: all six replies OK, and each read's data
# (replies may come in any order: the cookie says which region it was)
# equals what was written there.
pipeline_ok() {
    local name=$1 k=0 cookie bad=
    local n_ok
    n_ok=$(grep -cE '^reply cookie=[1-6] error=OK ' "$tmp/$name.out")
    for cookie in $(grep -oE '^reply cookie=[456] ' "$tmp/$name.out" | grep -oE '[456]'); do
        k=$((k + 1))
        cmp -s "$tmp/$name.r$k" "$tmp/w$((cookie - 3))" || bad="$bad cookie$cookie"
    done
    if [ "$n_ok" -eq 6 ] && [ $k -eq 3 ] && [ -z "$bad" ]; then ok "$2"
    else not_ok "$2"; diag "$n_ok replies OK, $k reads, data differs for:${bad:- none}"; diag_file "$tmp/$name.out"; fi
    rm -f "$tmp/$name".r*
}

start_server big -v memory 128M

pipeline oldneg export-name
pipeline_ok oldneg "EXPORT_NAME (simple replies): 3 x 40 MiB writes then 3 x 40 MiB reads in flight, bytes equal"
pipeline go go
pipeline_ok go "GO without block sizes, simple replies: the same, bytes equal"
pipeline gosr structured go
pipeline_ok gosr "GO without block sizes, structured replies: the same, bytes equal"
expect gosr "... the 40 MiB reads came as structured replies" '^reply cookie=4 error=OK kind=structured'

# Exactly 64 MiB (the default --max-payload) is still one request.
head -c 64M /dev/urandom > "$tmp/w64"
raw max64 hello export-name "req WRITE off=1M data=file:$tmp/w64 cookie=7" recv \
    'req READ off=1M len=64M cookie=8' recv "data-save $tmp/max64.r"
expect max64 "a 64 MiB write and read (the default cap) are answered OK" \
    '^reply cookie=7 error=OK' '^reply cookie=8 error=OK'
check "... and the 64 MiB read back equals the write" cmp "$tmp/w64" "$tmp/max64.r"
rm -f "$tmp/max64.r"

# A client that asked for the block sizes was told 32 MiB and is held to
# it: a 40 MiB read is EINVAL, and so is a 40 MiB write, whose payload is
# read (the stream stays in step) but not written.
raw bs hello go-bs 'req READ off=0 len=40M cookie=1' recv 'req READ off=0 len=32M cookie=2' recv \
    'req WRITE off=0 data=fill:40M:0x41 cookie=3' recv 'req READ off=0 len=4096 cookie=4' recv \
    "data-save $tmp/bs.r"
expect bs "GO with NBD_INFO_BLOCK_SIZE: the advertised maximum is 32 MiB" \
    '^rep GO INFO len=14 block_size min=1 pref=4096 max=33554432$'
expect bs "... a 40 MiB read is EINVAL, a 32 MiB read is OK" \
    '^reply cookie=1 error=EINVAL kind=simple$' '^reply cookie=2 error=OK kind=simple$'
expect bs "... a 40 MiB write is EINVAL, and the next request is answered" \
    '^reply cookie=3 error=EINVAL kind=simple$' '^reply cookie=4 error=OK kind=simple$'
check "... and the refused write changed nothing (0..4K still holds w1)" \
    cmp "$tmp/bs.r" <(head -c 4096 "$tmp/w1")
still_serving "the server still serves after all that"
stop_server

# ---- --max-payload ------------------------------------------------------
start_server cap -v --max-payload=48M memory 128M
head -c 48M /dev/urandom > "$tmp/w48"
raw at48 hello export-name "req WRITE off=0 data=file:$tmp/w48 cookie=1" recv \
    'req READ off=0 len=48M cookie=2' recv "data-save $tmp/at48.r" \
    'req READ off=0 len=50M cookie=3' recv 'req READ off=0 len=4096 cookie=4' recv
expect at48 "--max-payload=48M: a 48 MiB write and read are OK" \
    '^reply cookie=1 error=OK' '^reply cookie=2 error=OK'
check "... and the bytes are equal" cmp "$tmp/w48" "$tmp/at48.r"
expect at48 "... a 50 MiB read is EINVAL, and the connection goes on" \
    '^reply cookie=3 error=EINVAL' '^reply cookie=4 error=OK'
# The header says 50 MiB follow; none are sent.  A server that tried to
# read the payload would wait for it and the client would time out.
raw over hello export-name 'timeout 3' 'req WRITE off=0 len=50M cookie=5' wait-eof
expect over "a 50 MiB write header: disconnected without the payload being read" \
    '^EOF$' '!^reply' '!TIMEOUT'
contains "... and the log says why" "$tmp/cap.log" \
    'request payload of 52428800 bytes is over the limit of 50331648, disconnecting'
still_serving "... and other clients are still served"
stop_server

for bad in 1K 1023K 1G 257M x; do
    out=$(nbdserve -f -U "$tmp/bad.sock" --max-payload=$bad memory 1M 2>&1 < /dev/null); rc=$?
    like "--max-payload=$bad: refused at start, naming the value" "$rc $out" "^1 nbdserve: .*'$bad'"
done
start_server lo --max-payload=1M memory 1M; lo_pid=$server_pid
start_server hi --max-payload=256M memory 1M
is "--max-payload=1M and =256M (the bounds) are accepted" \
    "$(nbdinfo --size "nbd+unix:///?socket=$tmp/lo.sock") $(nbdinfo --size "$uri")" "1048576 1048576"
stop_server; stop_server "$lo_pid"

# ---- A plugin whose maximum block size is 1 MiB ---------------------------
cat > "$tmp/tiny.c" <<'C'
/* A 128 MiB RAM disk that takes at most 1 MiB per call: a larger call is
 * EINVAL.  unload writes the number of calls and the largest seen to
 * marker=FILE. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "nbdserve-plugin.h"

#define SIZE (128 << 20)
#define MAX (1 << 20)
static unsigned char *disk;
static const char *marker;
static unsigned preads, pwrites, largest;

static int t_config(const char *key, const char *value)
{
  if (strcmp(key, "marker") != 0)
    return -1;
  marker = strdup(value);
  return 0;
}

static int t_config_complete(void)
{
  disk = calloc(1, SIZE);
  return disk ? 0 : -1;
}

static void t_unload(void)
{
  FILE *f = marker ? fopen(marker, "w") : NULL;
  if (f) {
    fprintf(f, "preads=%u pwrites=%u largest=%u\n", preads, pwrites, largest);
    fclose(f);
  }
  free(disk);
}

static int handle;
static void *t_open(int readonly, const char *name) { (void) readonly, (void) name; return &handle; }
static int64_t t_get_size(void *h) { (void) h; return SIZE; }

static int t_block_size(void *h, uint32_t *minimum, uint32_t *preferred, uint32_t *maximum)
{
  (void) h;
  *minimum = 1;
  *preferred = 4096;
  *maximum = MAX;
  return 0;
}

/* Counts the call; false if it is over the maximum. */
static int fits(uint32_t count, unsigned *counter)
{
  __atomic_add_fetch(counter, 1, __ATOMIC_SEQ_CST);
  unsigned old = __atomic_load_n(&largest, __ATOMIC_SEQ_CST);
  while (count > old && !__atomic_compare_exchange_n(&largest, &old, count, 0,
                                                     __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
    ;
  if (count <= MAX)
    return 1;
  nbdserve_error("tiny: call of %u bytes is over %u", count, MAX);
  errno = EINVAL;
  return 0;
}

static int t_pread(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h, (void) flags;
  if (!fits(count, &preads))
    return -1;
  memcpy(buf, disk + offset, count);
  return 0;
}

static int t_pwrite(void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h, (void) flags;
  if (!fits(count, &pwrites))
    return -1;
  memcpy(disk + offset, buf, count);
  return 0;
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "tiny",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .config = t_config,
  .config_complete = t_config_complete,
  .unload = t_unload,
  .open = t_open,
  .get_size = t_get_size,
  .block_size = t_block_size,
  .pread = t_pread,
  .pwrite = t_pwrite,
};
NBDSERVE_REGISTER_PLUGIN(plugin)
C
build_plugin tiny.so "$tmp/tiny.c"
check "the 1 MiB-maximum test plugin builds" test -f "$tmp/tiny.so"

start_server tiny "$tmp/tiny.so" marker="$tmp/tiny.marker"
pipeline tinyp export-name
pipeline_ok tinyp "max block 1 MiB: 3 x 40 MiB writes and reads after EXPORT_NAME, bytes equal"
# An odd length at an odd offset: 3 MiB + 5 bytes at 1000 is 4 pieces.
head -c $(( (3 << 20) + 5 )) /dev/urandom > "$tmp/odd"
raw odd hello structured go "req WRITE off=1000 data=file:$tmp/odd cookie=1" recv \
    "req READ off=1000 len=$(( (3 << 20) + 5 )) cookie=2" recv "data-save $tmp/odd.r"
expect odd "an unaligned 3 MiB + 5 write and read: OK" '^reply cookie=1 error=OK' '^reply cookie=2 error=OK'
check "... bytes equal" cmp "$tmp/odd" "$tmp/odd.r"
raw tinybs hello go-bs 'req READ off=0 len=2M cookie=3' recv
expect tinybs "GO with block sizes: max 1 MiB advertised, a 2 MiB read is EINVAL" \
    '^rep GO INFO len=14 block_size min=1 pref=4096 max=1048576$' '^reply cookie=3 error=EINVAL'
stop_server
# 3 x 40 pieces each way, plus 4 pieces of the odd request each way; the
# refused 2 MiB read never reached the plugin.
is "the plugin got only pieces of at most 1 MiB, as many as expected" \
    "$(cat "$tmp/tiny.marker" 2> /dev/null)" "preads=124 pwrites=124 largest=1048576"
is "... and logged no oversized call" "$(grep -c 'tiny:' "$tmp/tiny.log")" 0
finish
