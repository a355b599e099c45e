#!/bin/bash
# Symbol hygiene: the server exports to the objects it loads only the
# nbdserve_* API (server/nbdserve.dynlist), so a plugin may name its own
# globals as it likes, even after the server's internals (opt, die,
# top_layer, ...), and still use its own.
. "$(dirname "$0")/lib/functions.sh"
requires cc nm readelf nbdsh
plan 8

# Besides nbdserve_*, the only dynamic symbols the binary may define are
# copies of shared-library variables it uses (stdout, optarg, and in a
# sanitizer build __asan_option_detect_stack_use_after_return): the
# linker places them in the executable, a "copy relocation", and the
# library itself then binds to that copy, so they must be exported;
# readelf lists them as R_*_COPY.  And _IO_stdin_used, which some
# toolchains export for libc to tell the stdio ABI of the program.
if [ -n "${NBDSERVE_BINARY:-}" ]; then
    skip "NBDSERVE_BINARY is another server"
else
    nm -D --defined-only "$NBDSERVE" > "$tmp/nm.out" 2>&1
    readelf -rW "$NBDSERVE" | awk '$3 ~ /_COPY$/ {print $5}' > "$tmp/copies"
    others=$(awk '{print $NF}' "$tmp/nm.out" | grep -Ev '^(nbdserve_[a-z0-9_]+|_IO_stdin_used)$' |
             grep -vxF -f "$tmp/copies")
    if [ -s "$tmp/nm.out" ] && [ -z "$others" ]; then
        ok "nm -D: the server exports only nbdserve_* ($(grep -c ' nbdserve_' "$tmp/nm.out") symbols)"
    else
        not_ok "nm -D: the server exports only nbdserve_*"; diag "also exported: $(echo $others)"
    fi
fi

cat > "$tmp/clash.c" <<'C'
/* A memory disk whose globals are named after the server's internals.
 * Were they to bind to the server's, load's writes would clobber the
 * server's options and chain, the server's writes (to top_layer once
 * the plugin is loaded, to current_identity on every request) would
 * change them under the plugin, calling die would end the server, and
 * a plain current_identity against the server's thread-local one would
 * not even load. */
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include "nbdserve-plugin.h"

#define SIZE (1 << 20)
#define MAGIC 0x5ca1ab1e

/* Same names as globals of the server, other types. */
struct { unsigned magic; char junk[4096]; } opt;
unsigned char *top_layer; /* the disk */
const char *current_identity;
int thread_model;
int run_inline;
int backend_error;
void die(const char *fmt, ...);
int serve(void);

static int died;

/* The server's die never returns; this one counts and returns. */
void die(const char *fmt, ...)
{
  (void) fmt;
  died++;
}

int serve(void) { return MAGIC; }

static int c_load(void)
{
  memset(&opt, 0xff, sizeof opt);
  opt.magic = MAGIC;
  top_layer = calloc(1, SIZE);
  current_identity = "the plugin's own";
  thread_model = run_inline = backend_error = -MAGIC;
  return top_layer ? 0 : -1;
}

/* After the server has parsed its options, built the chain and put
 * the plugin at its top: the plugin's globals are still its own. */
static int c_get_ready(void)
{
  die("this must come back");
  if (died != 1 || opt.magic != MAGIC || (unsigned char) opt.junk[100] != 0xff ||
      top_layer == NULL || top_layer[0] != 0 || strcmp(current_identity, "the plugin's own") != 0 ||
      thread_model != -MAGIC || run_inline != -MAGIC || backend_error != -MAGIC ||
      serve() != MAGIC) {
    nbdserve_error("clash: a global of the plugin is not its own");
    return -1;
  }
  return 0;
}

static void *c_open(int readonly, const char *name)
{
  (void) readonly; (void) name;
  return top_layer;
}

static int64_t c_get_size(void *h) { (void) h; return SIZE; }

/* Every request: what the server writes for itself (the connection's
 * identity, its errors) has not reached the plugin's globals. */
static int still_own(void)
{
  if (strcmp(current_identity, "the plugin's own") != 0 || backend_error != -MAGIC) {
    nbdserve_error("clash: the server wrote to a global of the plugin");
    nbdserve_set_error(EIO);
    return -1;
  }
  return 0;
}

static int c_pread(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  if (still_own() == -1)
    return -1;
  memcpy(buf, (unsigned char *) h + offset, count);
  return 0;
}

static int c_pwrite(void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  if (still_own() == -1)
    return -1;
  memcpy((unsigned char *) h + offset, buf, count);
  return 0;
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "clash",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .load = c_load,
  .get_ready = c_get_ready,
  .open = c_open,
  .get_size = c_get_size,
  .pread = c_pread,
  .pwrite = c_pwrite,
};
NBDSERVE_REGISTER_PLUGIN(plugin)
C

check "a plugin with globals named opt, die, top_layer, current_identity... compiles" \
    build_plugin clash.so "$tmp/clash.c"
nm -D --defined-only "$tmp/clash.so" > "$tmp/clash.nm"
contains "... and defines them itself" "$tmp/clash.nm" ' T die$'
cd "$tmp" || exit 1
if start_server clash ./clash.so; then ok "it loads, and its globals stay its own up to get_ready"
else not_ok "it loads, and its globals stay its own up to get_ready"; fi
head -c 1M /dev/urandom > "$tmp/data"
out=$(DATA="$tmp/data" nbdsh -u "$uri" -c '
import os
data = open(os.environ["DATA"], "rb").read()
h.pwrite(data, 0)
back = h.pread(len(data), 0)
print("same" if back == data else "differ")
' 2>&1)
is "1 MiB written and read back is the same" "$out" same
out=$(nbdsh -u "$uri" -c 'print(h.pread(16, 4096).hex())' 2>&1)
is "a second connection reads the first one's data" "$out" "$(od -An -tx1 -j4096 -N16 "$tmp/data" | tr -d ' \n')"
stop_server
is "the server exits cleanly" "$stopped_rc" 0
if grep -q "clash:" "$tmp/clash.log"; then not_ok "the plugin never saw its globals changed"; diag_file "$tmp/clash.log"
else ok "the plugin never saw its globals changed"; fi
finish
