#!/bin/bash
# ABI stability: a plugin and a filter built against the frozen version 1
# headers (tests/abi-v1/) load and serve; include/ keeps every version 1
# field where version 1 put it; objects whose structs are shorter (built
# against older headers) or longer (newer headers, new fields unset) than
# the server's still load; newer API versions and set unknown fields are
# refused with a message that says why.  (tests/plugin-abi.t covers a
# plugin built against include/ and its shorter struct.)
. "$(dirname "$0")/lib/functions.sh"
requires cc nbdsh
plan 17
v1="$top/tests/abi-v1"

# build_v1 OUT CC-ARGS...: as build_plugin, against the frozen headers.
build_v1() {
    local out=$1; shift
    cc -std=gnu11 -Wall -Wextra -Werror -fPIC -shared -I"$v1" "$@" -o "$tmp/$out" \
        > "$tmp/cc.log" 2>&1 || { diag_file "$tmp/cc.log"; return 1; }
}

# ---- include/ against the frozen copy -----------------------------------
# The layout of every version 1 field and the value of every version 1
# constant, printed by one program built against each set of headers.
# This list is version 1's and, like the headers, never changes.
cat > "$tmp/layout.c" <<'C'
#include <stdio.h>
#include "nbdserve-plugin.h"
#include "nbdserve-filter.h"
#define F(s, f) printf(#s "." #f " %zu %zu\n", offsetof(struct s, f), sizeof(((struct s *) 0)->f));
#define K(k) printf(#k " %lld\n", (long long) (k));
int main(void)
{
  F(nbdserve_plugin, struct_size) F(nbdserve_plugin, api_version) F(nbdserve_plugin, name)
  F(nbdserve_plugin, longname) F(nbdserve_plugin, version) F(nbdserve_plugin, description)
  F(nbdserve_plugin, config_help) F(nbdserve_plugin, magic_config_key)
  F(nbdserve_plugin, thread_model) F(nbdserve_plugin, flags) F(nbdserve_plugin, load)
  F(nbdserve_plugin, unload) F(nbdserve_plugin, config) F(nbdserve_plugin, config_complete)
  F(nbdserve_plugin, get_ready) F(nbdserve_plugin, list_exports)
  F(nbdserve_plugin, default_export) F(nbdserve_plugin, list_meta_contexts)
  F(nbdserve_plugin, open) F(nbdserve_plugin, close) F(nbdserve_plugin, get_size)
  F(nbdserve_plugin, block_size) F(nbdserve_plugin, can_write) F(nbdserve_plugin, can_flush)
  F(nbdserve_plugin, is_rotational) F(nbdserve_plugin, can_trim) F(nbdserve_plugin, can_zero)
  F(nbdserve_plugin, can_fast_zero) F(nbdserve_plugin, can_fua)
  F(nbdserve_plugin, can_multi_conn) F(nbdserve_plugin, can_cache)
  F(nbdserve_plugin, can_extents) F(nbdserve_plugin, pread) F(nbdserve_plugin, pwrite)
  F(nbdserve_plugin, flush) F(nbdserve_plugin, trim) F(nbdserve_plugin, zero)
  F(nbdserve_plugin, cache) F(nbdserve_plugin, extents) F(nbdserve_plugin, meta_extents)
  F(nbdserve_plugin, never_blocks)
  F(nbdserve_filter, struct_size) F(nbdserve_filter, api_version) F(nbdserve_filter, name)
  F(nbdserve_filter, longname) F(nbdserve_filter, version) F(nbdserve_filter, description)
  F(nbdserve_filter, config_help) F(nbdserve_filter, thread_model) F(nbdserve_filter, flags)
  F(nbdserve_filter, load) F(nbdserve_filter, unload) F(nbdserve_filter, config)
  F(nbdserve_filter, config_complete) F(nbdserve_filter, get_ready)
  F(nbdserve_filter, list_exports) F(nbdserve_filter, default_export)
  F(nbdserve_filter, list_meta_contexts) F(nbdserve_filter, open) F(nbdserve_filter, prepare)
  F(nbdserve_filter, finalize) F(nbdserve_filter, close) F(nbdserve_filter, get_size)
  F(nbdserve_filter, block_size) F(nbdserve_filter, can_write) F(nbdserve_filter, can_flush)
  F(nbdserve_filter, is_rotational) F(nbdserve_filter, can_trim) F(nbdserve_filter, can_zero)
  F(nbdserve_filter, can_fast_zero) F(nbdserve_filter, can_fua)
  F(nbdserve_filter, can_multi_conn) F(nbdserve_filter, can_cache)
  F(nbdserve_filter, can_extents) F(nbdserve_filter, pread) F(nbdserve_filter, pwrite)
  F(nbdserve_filter, flush) F(nbdserve_filter, trim) F(nbdserve_filter, zero)
  F(nbdserve_filter, cache) F(nbdserve_filter, extents) F(nbdserve_filter, meta_extents)
  K(NBDSERVE_API_VERSION) K(NBDSERVE_THREAD_MODEL_SERIALIZE_CONNECTIONS)
  K(NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS) K(NBDSERVE_THREAD_MODEL_SERIALIZE_REQUESTS)
  K(NBDSERVE_THREAD_MODEL_PARALLEL) K(NBDSERVE_FLAG_FUA) K(NBDSERVE_FLAG_MAY_TRIM)
  K(NBDSERVE_FLAG_REQ_ONE) K(NBDSERVE_FLAG_FAST_ZERO) K(NBDSERVE_FUA_NONE)
  K(NBDSERVE_FUA_EMULATE) K(NBDSERVE_FUA_NATIVE) K(NBDSERVE_CACHE_NONE)
  K(NBDSERVE_CACHE_EMULATE) K(NBDSERVE_CACHE_NATIVE) K(NBDSERVE_EXTENT_HOLE)
  K(NBDSERVE_EXTENT_ZERO) K(NBDSERVE_PLUGIN_NEVER_BLOCKS) K(NBDSERVE_FILTER_NEVER_BLOCKS)
  printf("base context %s\n", NBDSERVE_CONTEXT_BASE_ALLOCATION);
  /* Only growth: the struct of the day holds at least version 1's. */
  fprintf(stderr, "%zu %zu\n", sizeof(struct nbdserve_plugin), sizeof(struct nbdserve_filter));
  return 0;
}
C
if cc -std=gnu11 -I"$v1" "$tmp/layout.c" -o "$tmp/layout-v1" 2> "$tmp/cc.log" &&
   cc -std=gnu11 -I"$top/include" "$tmp/layout.c" -o "$tmp/layout-now" 2>> "$tmp/cc.log"; then
    "$tmp/layout-v1" > "$tmp/layout-v1.out" 2> "$tmp/size-v1"
    "$tmp/layout-now" > "$tmp/layout-now.out" 2> "$tmp/size-now"
    if cmp -s "$tmp/layout-v1.out" "$tmp/layout-now.out"; then
        ok "include/ lays out every version 1 field and constant as version 1 did"
    else
        not_ok "include/ lays out every version 1 field and constant as version 1 did"
        diff "$tmp/layout-v1.out" "$tmp/layout-now.out" | diag_file /dev/stdin
    fi
    read -r p1 f1 < "$tmp/size-v1"; read -r pn fn < "$tmp/size-now"
    if [ "$pn" -ge "$p1" ] && [ "$fn" -ge "$f1" ]; then
        ok "the structs only grew (plugin $p1 -> $pn bytes, filter $f1 -> $fn)"
    else not_ok "the structs only grew (plugin $p1 -> $pn bytes, filter $f1 -> $fn)"; fi
else
    not_ok "layout program builds"; diag_file "$tmp/cc.log"; skip "layout program"
fi

# ---- A version 1 plugin and filter ----------------------------------------
cat > "$tmp/v1plugin.c" <<'C'
/* A version 1 memory disk whose fresh content is (offset & 0xff).
 * CUT: the struct is as if built against older headers that ended
 * before the field CUT.  GROWN: as if built against newer headers with
 * more fields (all unset, unless TAIL sets one). */
#include <stdlib.h>
#include <string.h>
#include "nbdserve-plugin.h"

#define SIZE (1 << 20)
static unsigned char *disk;

static int v_load(void)
{
  disk = malloc(SIZE);
  if (disk == NULL)
    return -1;
  for (size_t i = 0; i < SIZE; i++)
    disk[i] = (unsigned char) i;
  return 0;
}
static void *v_open(int readonly, const char *name) { (void) readonly; (void) name; return disk; }
static int64_t v_get_size(void *h) { (void) h; return SIZE; }
static int v_pread(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  memcpy(buf, (unsigned char *) h + offset, count);
  return 0;
}
static int v_pwrite(void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  memcpy((unsigned char *) h + offset, buf, count);
  return 0;
}

#define FIELDS                                                          \
  .name = "v1", .load = v_load, .open = v_open, .get_size = v_get_size, \
  .pread = v_pread, .pwrite = v_pwrite
#ifndef API_VERSION
#define API_VERSION NBDSERVE_API_VERSION
#endif

#ifdef GROWN
#ifndef TAIL
#define TAIL 0
#endif
static struct grown {
  struct nbdserve_plugin plugin;
  void *future[4]; /* fields a newer header might add */
} grown = {
  { .struct_size = sizeof(struct grown), .api_version = API_VERSION, FIELDS },
  { 0, 0, (void *) TAIL, 0 },
};
NBDSERVE_REGISTER_PLUGIN(grown.plugin)
#else
static struct nbdserve_plugin plugin = {
#ifdef CUT
  .struct_size = offsetof(struct nbdserve_plugin, CUT),
#else
  .struct_size = sizeof(struct nbdserve_plugin),
#endif
  .api_version = API_VERSION,
#ifdef THREAD_MODEL
  .thread_model = THREAD_MODEL,
#endif
  FIELDS,
};
NBDSERVE_REGISTER_PLUGIN(plugin)
#endif
C

cat > "$tmp/v1filter.c" <<'C'
/* A version 1 filter: data passes xor 0x5a both ways, so the client
 * reads back what it wrote and a fresh disk reads (offset & 0xff) ^ 0x5a.
 * CUT, GROWN, TAIL, API_VERSION as for the plugin. */
#include <stdlib.h>
#include "nbdserve-filter.h"

static void flip(unsigned char *p, uint32_t n) { for (uint32_t i = 0; i < n; i++) p[i] ^= 0x5a; }

static int x_pread(struct nbdserve_next *next, void *handle, void *buf, uint32_t count,
                   uint64_t offset, uint32_t flags)
{
  (void) handle;
  if (nbdserve_next_pread(next, buf, count, offset, flags) == -1)
    return -1;
  flip(buf, count);
  return 0;
}
static int x_pwrite(struct nbdserve_next *next, void *handle, const void *buf, uint32_t count,
                    uint64_t offset, uint32_t flags)
{
  (void) handle;
  unsigned char *copy = malloc(count ? count : 1);
  if (copy == NULL)
    return -1;
  for (uint32_t i = 0; i < count; i++)
    copy[i] = ((const unsigned char *) buf)[i];
  flip(copy, count);
  int r = nbdserve_next_pwrite(next, copy, count, offset, flags);
  free(copy);
  return r;
}

#define FIELDS .name = "xor", .pread = x_pread, .pwrite = x_pwrite
#ifndef API_VERSION
#define API_VERSION NBDSERVE_API_VERSION
#endif

#ifdef GROWN
#ifndef TAIL
#define TAIL 0
#endif
static struct grown {
  struct nbdserve_filter filter;
  void *future[4];
} grown = {
  { .struct_size = sizeof(struct grown), .api_version = API_VERSION, FIELDS },
  { 0, 0, 0, (void *) TAIL },
};
NBDSERVE_REGISTER_FILTER(grown.filter)
#else
static struct nbdserve_filter filter = {
#ifdef CUT
  .struct_size = offsetof(struct nbdserve_filter, CUT),
#else
  .struct_size = sizeof(struct nbdserve_filter),
#endif
  .api_version = API_VERSION,
#ifdef THREAD_MODEL
  .thread_model = THREAD_MODEL,
#endif
  FIELDS,
};
NBDSERVE_REGISTER_FILTER(filter)
#endif
C

check "a plugin builds against the frozen version 1 headers" build_v1 v1plugin.so "$tmp/v1plugin.c"
check "a filter builds against the frozen version 1 headers" build_v1 v1filter.so "$tmp/v1filter.c"
# Shorter structs, as from headers older than version 1's final form:
# the plugin without never_blocks (the last field added), the filter
# ending after its data callbacks' first half.
build_v1 v1plugin-short.so -DCUT=never_blocks "$tmp/v1plugin.c"
build_v1 v1filter-short.so -DCUT=flush "$tmp/v1filter.c"
build_v1 v1plugin-grown.so -DGROWN "$tmp/v1plugin.c"
build_v1 v1filter-grown.so -DGROWN "$tmp/v1filter.c"
build_v1 v1plugin-grown-set.so -DGROWN -DTAIL=1 "$tmp/v1plugin.c"
build_v1 v1filter-grown-set.so -DGROWN -DTAIL=1 "$tmp/v1filter.c"
build_v1 v2plugin.so -DAPI_VERSION=2 "$tmp/v1plugin.c"
build_v1 v2filter.so -DAPI_VERSION=2 "$tmp/v1filter.c"
build_v1 v1filter-serial.so -DTHREAD_MODEL=NBDSERVE_THREAD_MODEL_SERIALIZE_REQUESTS "$tmp/v1filter.c"
# The named default, from the headers of the day: the same object code.
build_plugin named-default.so -DTHREAD_MODEL=NBDSERVE_FILTER_THREAD_MODEL_DEFAULT "$tmp/v1filter.c"
cd "$tmp" || exit 1

# serves NAME DESCRIPTION XOR ARGS...: start a server, check that a fresh
# disk reads its pattern (xor 0x5a with the filter in the chain), that
# 256 KiB written read back the same, and stop it.
serves() {
    local name=$1 desc=$2 xor=$3; shift 3
    if ! start_server "$name" "$@"; then not_ok "$desc"; return; fi
    local out
    out=$(DATA="$tmp/data" XOR=$xor nbdsh -u "$uri" -c '
import os
x = int(os.environ["XOR"])
fresh = h.pread(65536, 65536)
want = bytes((i & 0xff) ^ x for i in range(65536, 131072))
data = open(os.environ["DATA"], "rb").read()
h.pwrite(data, 4096)
back = h.pread(len(data), 4096)
print("fresh", "ok" if fresh == want else "wrong", "roundtrip", "ok" if back == data else "wrong")
' 2>&1)
    stop_server
    is "$desc" "$out" "fresh ok roundtrip ok"
}
head -c 256K /dev/urandom > "$tmp/data"
serves v1 "the version 1 plugin serves (its data, bytes written read back)" 0 ./v1plugin.so
serves v1f "... behind the version 1 filter, which does its work" 90 --filter=./v1filter.so ./v1plugin.so
serves short "shorter structs (older headers): plugin and filter still serve" 90 \
    --filter=./v1filter-short.so ./v1plugin-short.so
serves grown "longer structs, new fields unset (newer headers): accepted and served" 90 \
    --filter=./v1filter-grown.so ./v1plugin-grown.so

# refused DESCRIPTION REGEX ARGS...: the server refuses to start, saying so.
refused() {
    local desc=$1 want=$2 rc; shift 2
    nbdserve -U - "$@" --run true > "$tmp/refused.out" 2>&1; rc=$?
    if [ $rc -eq 1 ] && grep -Eq -- "$want" "$tmp/refused.out"; then ok "$desc"
    else not_ok "$desc (exit $rc)"; diag_file "$tmp/refused.out"; fi
}
refused "a plugin of API version 2: refused, naming versions 2 and 1" \
    "plugin ./v2plugin.so was built for ABI version 2, newer than this server, which speaks version 1" \
    ./v2plugin.so
refused "a filter of API version 2: refused, naming versions 2 and 1" \
    "filter ./v2filter.so was built for ABI version 2, newer than this server, which speaks version 1" \
    --filter=./v2filter.so ./v1plugin.so
refused "a longer plugin struct with a new field set: refused, naming both sizes" \
    "plugin ./v1plugin-grown-set.so: its struct is $((p1 + 32)) bytes, built against newer headers than this server's $pn-byte struct, and sets a field this server does not know \(byte $((p1 + 16)) is not zero\)" \
    ./v1plugin-grown-set.so
refused "a longer filter struct with a new field set: refused, naming both sizes" \
    "filter ./v1filter-grown-set.so: its struct is $((f1 + 32)) bytes, built against newer headers than this server's $fn-byte struct" \
    --filter=./v1filter-grown-set.so ./v1plugin.so

# ---- Thread-model defaults ---------------------------------------------------
dump() { nbdserve --dump-plugin "$@" 2>&1 | grep -E '^(filter_[a-z0-9_-]+_|chain_)?thread_model=' | tr '\n' ' '; }
is "an unset plugin thread model is SERIALIZE_CONNECTIONS" "$(dump ./v1plugin.so)" \
   "thread_model=serialize_connections chain_thread_model=serialize_connections "
build_v1 v1plugin-parallel.so -DTHREAD_MODEL=NBDSERVE_THREAD_MODEL_PARALLEL "$tmp/v1plugin.c"
is "an unset filter thread model is PARALLEL" "$(dump --filter=./v1filter.so ./v1plugin-parallel.so)" \
   "thread_model=parallel filter_xor_thread_model=parallel chain_thread_model=parallel "
is "NBDSERVE_FILTER_THREAD_MODEL_DEFAULT reads as PARALLEL too" \
   "$(dump --filter=./named-default.so ./v1plugin-parallel.so)" \
   "thread_model=parallel filter_xor_thread_model=parallel chain_thread_model=parallel "
is "... and a filter's own model still limits the chain" \
   "$(dump --filter=./v1filter-serial.so ./v1plugin-parallel.so)" \
   "thread_model=parallel filter_xor_thread_model=serialize_requests chain_thread_model=serialize_requests "
# What a version 1 filter that sets nothing has in thread_model is 0:
# the named default must stay that value, or such filters would change
# meaning.
printf '#include "nbdserve-filter.h"\n_Static_assert(NBDSERVE_FILTER_THREAD_MODEL_DEFAULT == 0, "v1");\n' \
    > "$tmp/default.c"
check "NBDSERVE_FILTER_THREAD_MODEL_DEFAULT is 0, what version 1 filters leave unset" \
    cc -std=gnu11 -fsyntax-only -I"$top/include" "$tmp/default.c"
finish
