#!/bin/bash
# The plugin and filter ABI from outside the tree: a plugin and a filter
# compiled here against include/ only, loaded by path; ABI checks refuse
# what the server cannot serve with a clear message.
. "$(dirname "$0")/lib/functions.sh"
requires cc nbdinfo nbdcopy
requires_python_nbd
plan 22

cat > "$tmp/abitest.c" <<'C'
/* A test plugin: reads give (offset & 0xff); writes fail with a chosen
 * errno or are discarded; open/get_size fail for chosen export names;
 * unload writes how many reads ever ran at once to a file. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "nbdserve-plugin.h"

#ifndef MODEL
#define MODEL NBDSERVE_THREAD_MODEL_PARALLEL
#endif
#ifdef OLD_STRUCT
/* As if compiled against an older, shorter struct. */
#define VERSION_FIELDS .struct_size = offsetof(struct nbdserve_plugin, cache), \
                       .api_version = NBDSERVE_API_VERSION
#elif defined(API_VERSION)
#define VERSION_FIELDS .struct_size = sizeof(struct nbdserve_plugin), .api_version = API_VERSION
#else
#define VERSION_FIELDS NBDSERVE_PLUGIN_INIT
#endif

static int64_t size = 1 << 20;
static const char *marker;
static int write_errno;
static int delay_ms;
static int in_flight, max_in_flight;

static int t_config(const char *key, const char *value)
{
  if (strcmp(key, "size") == 0) {
    size = nbdserve_parse_size(value);
    return size < 0 ? -1 : 0;
  }
  if (strcmp(key, "marker") == 0) { marker = strdup(value); return 0; }
  if (strcmp(key, "errno") == 0) { write_errno = atoi(value); return 0; }
  if (strcmp(key, "delay") == 0) { delay_ms = atoi(value); return 0; }
  nbdserve_error("abitest: unknown parameter '%s'", key);
  return -1;
}

static void t_unload(void)
{
  if (marker) {
    FILE *f = fopen(marker, "w");
    if (f) {
      fprintf(f, "unloaded max_in_flight=%d\n", max_in_flight);
      fclose(f);
    }
  }
}

static void *t_open(int readonly, const char *name)
{
  (void) readonly;
  if (strcmp(name, "bad-open") == 0) {
    nbdserve_error("abitest: refusing to open %s", name);
    return NULL;
  }
  return strdup(name);
}

static void t_close(void *h) { free(h); }

static int64_t t_get_size(void *h)
{
  if (strcmp(h, "bad-size") == 0) {
    errno = EIO;
    return -1;
  }
  return size;
}

__attribute__((unused)) static int t_pread(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) flags;
  int now = __atomic_add_fetch(&in_flight, 1, __ATOMIC_SEQ_CST);
  int old = __atomic_load_n(&max_in_flight, __ATOMIC_SEQ_CST);
  while (now > old && !__atomic_compare_exchange_n(&max_in_flight, &old, now, 0,
                                                   __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
    ;
  if (delay_ms)
    usleep(delay_ms * 1000);
  unsigned char *p = buf;
  for (uint32_t i = 0; i < count; i++)
    p[i] = (unsigned char) (offset + i);
  __atomic_sub_fetch(&in_flight, 1, __ATOMIC_SEQ_CST);
  return 0;
}

static int t_pwrite(void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) buf; (void) count; (void) offset; (void) flags;
  if (write_errno) {
    nbdserve_set_error(write_errno);
    return -1;
  }
  return 0;
}

static struct nbdserve_plugin plugin = {
  VERSION_FIELDS,
  .name = "abitest",
  .magic_config_key = "size",
  .thread_model = MODEL,
  .config = t_config,
  .unload = t_unload,
  .open = t_open,
  .close = t_close,
  .get_size = t_get_size,
#ifndef NO_PREAD
  .pread = t_pread,
#endif
  .pwrite = t_pwrite,
};
NBDSERVE_REGISTER_PLUGIN(plugin)
C

cat > "$tmp/upper.c" <<'C'
/* A test filter: reads come back with ASCII letters in upper case. */
#include <ctype.h>
#include "nbdserve-filter.h"

#ifdef API_VERSION
#define VERSION_FIELDS .struct_size = sizeof(struct nbdserve_filter), .api_version = API_VERSION
#else
#define VERSION_FIELDS NBDSERVE_FILTER_INIT
#endif

static int u_pread(struct nbdserve_next *next, void *handle, void *buf, uint32_t count,
                   uint64_t offset, uint32_t flags)
{
  (void) handle;
  if (nbdserve_next_pread(next, buf, count, offset, flags) == -1)
    return -1;
  unsigned char *p = buf;
  for (uint32_t i = 0; i < count; i++)
    p[i] = (unsigned char) toupper(p[i]);
  return 0;
}

static struct nbdserve_filter filter = {
  VERSION_FIELDS,
  .name = "upper",
  .pread = u_pread,
};
NBDSERVE_REGISTER_FILTER(filter)
C

check "the plugin compiles against include/ alone" build_plugin abitest.so "$tmp/abitest.c"
build_plugin serial.so -DMODEL=NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS "$tmp/abitest.c"
build_plugin badver.so -DAPI_VERSION=99 "$tmp/abitest.c"
build_plugin nopread.so -DNO_PREAD "$tmp/abitest.c"
build_plugin old.so -DOLD_STRUCT "$tmp/abitest.c"
build_plugin upper.so "$tmp/upper.c"
build_plugin badfilter.so -DAPI_VERSION=99 "$tmp/upper.c"
echo 'int not_a_plugin(void) { return 0; }' > "$tmp/plain.c"
build_plugin plain.so "$tmp/plain.c"

cd "$tmp" || exit 1
start_server abi -t 8 ./abitest.so 5M marker="$tmp/marker" delay=20
is "loaded as ./abitest.so, the bare parameter is its magic key" "$(nbdinfo --size "$uri")" 5242880
"$PYTHON" -c 'import sys; sys.stdout.buffer.write(bytes(i & 0xff for i in range(5 << 20)))' > "$tmp/pattern"
nbdcopy "$uri" "$tmp/read"
check "reads carry the plugin's data" cmp "$tmp/pattern" "$tmp/read"
is "16 concurrent aio reads complete" "$(python - "$uri" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
bufs = [nbd.Buffer(4096) for _ in range(16)]
for i, b in enumerate(bufs):
    h.aio_pread(b, i * 4096)
while h.aio_in_flight():
    h.poll(-1)
print("done")
PY
)" done
errs=$(python - "$uri" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"x", 0)
    print("no error")
except nbd.Error as e:
    print(e.errno)
PY
)
is "writes succeed when the plugin says so" "$errs" "no error"
check_fails "open failing for one export: that client is refused" nbdinfo "$(uri_of bad-open)"
check_fails "get_size failing: that client is refused" nbdinfo "$(uri_of bad-size)"
is "... and the server serves the others" "$(nbdinfo --size "$uri")" 5242880
is "--dump-plugin ./abitest.so" "$(nbdserve --dump-plugin ./abitest.so 2>&1 | grep -E '^(name|thread_model)=' | tr '\n' ' ')" \
   "name=abitest thread_model=parallel "
stop_server
is "unload runs at exit (and saw parallel reads)" "$(sed 's/max_in_flight=\([2-9]\|[1-9][0-9]\)$/max_in_flight=many/' "$tmp/marker" 2> /dev/null)" \
   "unloaded max_in_flight=many"

# errno from the plugin, as the client sees it.
for pair in 28:ENOSPC 1:EPERM 5:EIO 12:ENOMEM 9:EINVAL/EIO; do
    start_server err-${pair%%:*} ./abitest.so 1M errno=${pair%%:*}
    got=$(python - "$uri" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"x", 0)
    print("no error")
except nbd.Error as e:
    print(e.errno)
PY
)
    case "/${pair#*:}/" in
        */"$got"/*) ok "plugin error ${pair%%:*} reaches the client as $got";;
        *) not_ok "plugin error ${pair%%:*} reaches the client as ${pair#*:} (got '$got')";;
    esac
    stop_server
done

# The server enforces a serializing thread model for the plugin.
start_server serial -t 8 ./serial.so 1M marker="$tmp/serial-marker" delay=10
python - "$uri" <<'PY'
import nbd, sys
hs = [nbd.NBD() for _ in range(2)]
for h in hs:
    h.connect_uri(sys.argv[1])
for h in hs:
    for i in range(8):
        h.aio_pread(nbd.Buffer(512), i * 512)
for h in hs:
    while h.aio_in_flight():
        h.poll(-1)
PY
stop_server
is "SERIALIZE_ALL_REQUESTS: never two reads at once (2 connections, 16 reads)" \
   "$(cat "$tmp/serial-marker" 2> /dev/null)" "unloaded max_in_flight=1"

start_server old ./old.so 2M
is "a plugin built against an older, shorter struct still loads" "$(nbdinfo --size "$uri")" 2097152
stop_server

# plainly bad plugins
refused() {
    local desc=$1 want=$2 rc; shift 2
    nbdserve -U - "$@" --run true > "$tmp/refused.out" 2>&1; rc=$?
    if [ $rc -eq 1 ] && grep -Eq -- "$want" "$tmp/refused.out"; then ok "$desc"
    else not_ok "$desc (exit $rc)"; diag_file "$tmp/refused.out"; fi
}
refused "wrong api_version: refused, naming both versions" "ABI version 99.*version 1" ./badver.so
refused "no pread: refused" "pread" ./nopread.so
refused "a .so without the registration symbol: refused" "nbdserve_plugin_init" ./plain.so

# An out-of-tree filter in front of an in-tree plugin.
start_server upper --filter=./upper.so memory 1M
is "an out-of-tree filter sits in the chain" "$(nbdsh -u "$uri" -c '
h.pwrite(b"hello, world", 0)
print(h.pread(12, 0).decode())')" "HELLO, WORLD"
stop_server
refused "a filter with the wrong api_version: refused" "ABI version 99" --filter=./badfilter.so memory 1M
finish
