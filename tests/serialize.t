#!/bin/bash
# NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS means one plugin call at a
# time in the whole server, whatever the call (open, the capability
# queries, reads, writes, close) and whichever handshake brought the
# connection in.  A test plugin notices any two of its calls overlapping;
# many clients at once, over oldstyle (-o, whose opening once ran without
# the lock) and newstyle, on several loops and 8 workers, must never make
# it notice, and the data must verify.  A PARALLEL build of the same
# plugin shows that the detector does notice overlaps.
. "$(dirname "$0")/lib/functions.sh"
requires cc
requires_python_nbd
plan 15

cat > "$tmp/serial.c" <<'C'
/* A RAM disk whose every call marks itself inside, sleeps 2 ms and then
 * fails if another call was inside meanwhile: data calls with EIO, the
 * others with an error line.  unload writes the counts to marker=FILE. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "nbdserve-plugin.h"

#ifndef MODEL
#define MODEL NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS
#endif
#define SIZE (16 << 20)

static unsigned char *disk;
static const char *marker;
static int inside;          /* calls inside right now */
static unsigned calls, overlaps;

/* enter/leave bracket every call; leave says whether another call came
 * in while this one was inside (or one was already there). */
static int enter(void)
{
  __atomic_add_fetch(&calls, 1, __ATOMIC_SEQ_CST);
  return __atomic_add_fetch(&inside, 1, __ATOMIC_SEQ_CST);
}

static int leave(int entered_with, const char *what)
{
  usleep(2000);
  int now = __atomic_load_n(&inside, __ATOMIC_SEQ_CST);
  __atomic_sub_fetch(&inside, 1, __ATOMIC_SEQ_CST);
  if (entered_with == 1 && now == 1)
    return 0;
  __atomic_add_fetch(&overlaps, 1, __ATOMIC_SEQ_CST);
  nbdserve_error("serial: OVERLAP in %s (%d calls inside)", what,
                 entered_with > now ? entered_with : now);
  return -1;
}

static int s_config(const char *key, const char *value)
{
  if (strcmp(key, "marker") == 0) {
    marker = strdup(value);
    return 0;
  }
  nbdserve_error("serial: unknown parameter '%s'", key);
  return -1;
}

static int s_config_complete(void)
{
  disk = calloc(1, SIZE);
  return disk ? 0 : -1;
}

static void s_unload(void)
{
  FILE *f = marker ? fopen(marker, "w") : NULL;
  if (f) {
    fprintf(f, "calls=%u overlaps=%u\n", calls, overlaps);
    fclose(f);
  }
  free(disk);
}

static int handle;

static void *s_open(int readonly, const char *name)
{
  (void) readonly, (void) name;
  int e = enter();
  return leave(e, "open") == 0 ? &handle : NULL;
}

static void s_close(void *h)
{
  (void) h;
  int e = enter();
  leave(e, "close");
}

static int64_t s_get_size(void *h)
{
  (void) h;
  int e = enter();
  if (leave(e, "get_size") == -1) {
    errno = EIO;
    return -1;
  }
  return SIZE;
}

static int s_pread(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h, (void) flags;
  int e = enter();
  memcpy(buf, disk + offset, count);
  if (leave(e, "pread") == -1) {
    errno = EIO;
    return -1;
  }
  return 0;
}

static int s_pwrite(void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h, (void) flags;
  int e = enter();
  memcpy(disk + offset, buf, count);
  if (leave(e, "pwrite") == -1) {
    errno = EIO;
    return -1;
  }
  return 0;
}

/* No NEVER_BLOCKS flag: it sleeps, so calls go to the worker threads,
 * which would run them side by side but for the thread model's lock. */
static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "serial",
  .thread_model = MODEL,
  .config = s_config,
  .config_complete = s_config_complete,
  .unload = s_unload,
  .open = s_open,
  .close = s_close,
  .get_size = s_get_size,
  .pread = s_pread,
  .pwrite = s_pwrite,
};
NBDSERVE_REGISTER_PLUGIN(plugin)
C

build_plugin serial.so "$tmp/serial.c"
check "the SERIALIZE_ALL_REQUESTS test plugin builds" test -f "$tmp/serial.so"
build_plugin parallel.so -DMODEL=NBDSERVE_THREAD_MODEL_PARALLEL "$tmp/serial.c"
check "its PARALLEL copy builds" test -f "$tmp/parallel.so"

# A client that owns 1 MiB at ID MiB: three connections one after the
# other (each an open and a close), each writing 16 pieces of 64 KiB with
# a pattern naming client, connection and piece, then reading them back
# (several in flight) and comparing.  Prints "client ID err=N bad=M" (N: failed
# connections and requests, M: pieces read back wrong) and the errors.
cat > "$tmp/client.py" <<'PY'
import nbd, sys
uri, ident = sys.argv[1], int(sys.argv[2])
piece, pieces = 64 << 10, 16
base = ident << 20
err = bad = 0
for c in range(3):
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
    except nbd.Error as e:
        print("connect failed: %s" % e)
        err += 1
        continue
    want = {}
    for k in range(pieces):
        data = (b"%02d:%02d:%04d:ser|\n" % (ident, c, k)) * (piece // 16)
        want[k] = data
        try:
            h.pwrite(data, base + k * piece)
        except nbd.Error as e:
            print("pwrite: %s" % e)
            err += 1
    bufs = {k: nbd.Buffer(piece) for k in range(pieces)}
    cookies = {h.aio_pread(bufs[k], base + k * piece): k for k in range(pieces)}
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie, k in cookies.items():
        try:
            h.aio_command_completed(cookie)
            if bufs[k].to_bytearray() != want[k]:
                bad += 1
        except nbd.Error as e:
            print("pread: %s" % e)
            err += 1
    try:
        h.shutdown()
    except nbd.Error:
        pass
print("client %d err=%d bad=%d" % (ident, err, bad))
PY

# clients NAME URI: 8 clients in parallel; $tmp/NAME.out holds their
# output, sorted.
clients() {
    local name=$1 u=$2 i pids=()
    for i in $(seq 0 7); do
        python "$tmp/client.py" "$u" $i > "$tmp/$name.c$i" 2>&1 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i"; done
    cat "$tmp/$name".c* | sort > "$tmp/$name.out"
}
all_clean="$(for i in $(seq 0 7); do echo "client $i err=0 bad=0"; done)"

# ---- SERIALIZE_ALL_REQUESTS, oldstyle and newstyle at the same time ---------
start_server old -o -t 8 --loops=2 "$tmp/serial.so" marker="$tmp/old.marker"
old_pid=$server_pid old_uri=$uri
start_server new -t 8 --loops=2 "$tmp/serial.so" marker="$tmp/new.marker"
new_pid=$server_pid new_uri=$uri
is "the -o server speaks oldstyle" \
    "$(nbdsh -u "$old_uri" -c 'print(h.get_protocol())' 2>&1)" "oldstyle"
clients old "$old_uri" & oldc=$!
clients new "$new_uri" & newc=$!
wait $oldc; wait $newc
is "oldstyle: 8 clients, no error, every piece read back as written" "$(cat "$tmp/old.out")" "$all_clean"
is "newstyle: 8 clients, no error, every piece read back as written" "$(cat "$tmp/new.out")" "$all_clean"
stop_server "$old_pid"; old_rc=$stopped_rc
stop_server "$new_pid"; new_rc=$stopped_rc
is "oldstyle: no overlap logged" "$(grep -c OVERLAP "$tmp/old.log")" 0
is "newstyle: no overlap logged" "$(grep -c OVERLAP "$tmp/new.log")" 0
# 1 probe + 8 clients x 3 connections, each an open, a get_size and a
# close, and 32 data calls: at least 24 x 35 calls were counted.
like "oldstyle: the plugin counted its calls, none overlapping" \
    "$(cat "$tmp/old.marker" 2> /dev/null)" '^calls=([89][0-9]{2}|[1-9][0-9]{3,}) overlaps=0$'
like "newstyle: the plugin counted its calls, none overlapping" \
    "$(cat "$tmp/new.marker" 2> /dev/null)" '^calls=([89][0-9]{2}|[1-9][0-9]{3,}) overlaps=0$'
# Without -v the log holds only errors: it must be empty.
is "oldstyle: exit status 0, nothing in the log" "$old_rc $(wc -l < "$tmp/old.log")" "0 0"
is "newstyle: exit status 0, nothing in the log" "$new_rc $(wc -l < "$tmp/new.log")" "0 0"

# ---- The detector works: the PARALLEL copy does see overlaps -----------------
start_server par -o -t 8 --loops=2 "$tmp/parallel.so" marker="$tmp/par.marker"
par_old=$server_pid par_old_uri=$uri
start_server parnew -t 8 --loops=2 "$tmp/parallel.so" marker="$tmp/parnew.marker"
clients par "$par_old_uri" & p1=$!
clients parnew "$uri" & p2=$!
wait $p1; wait $p2
stop_server "$par_old"
stop_server
like "PARALLEL, oldstyle: overlaps are detected" "$(cat "$tmp/par.marker" 2> /dev/null)" \
    '^calls=[0-9]+ overlaps=[1-9][0-9]*$'
like "PARALLEL, newstyle: overlaps are detected" "$(cat "$tmp/parnew.marker" 2> /dev/null)" \
    '^calls=[0-9]+ overlaps=[1-9][0-9]*$'
contains "PARALLEL: the overlaps are logged" "$tmp/parnew.log" 'serial: OVERLAP in (pread|pwrite|open|close|get_size)'
like "PARALLEL: and clients see the errors" "$(grep -ho 'err=[1-9][0-9]*' "$tmp/parnew.out" "$tmp/par.out" | wc -l)" '^[1-9][0-9]*$'
diag "plugin counts (new, old, PARALLEL old, PARALLEL new): $(cat "$tmp"/{new,old,par,parnew}.marker 2> /dev/null | tr "\n" " ")"
finish
