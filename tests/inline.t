#!/bin/bash
# Where requests run: on the connection's (loop) thread when the plugin
# and every filter never block, on worker threads otherwise.  The file
# plugin decides once configured: a file in RAM (tmpfs) never blocks, a
# file on a disk may.  --no-inline forces worker threads; a plugin's
# never_blocks callback overrides its flag; an older plugin without the
# callback keeps using the flag.
. "$(dirname "$0")/lib/functions.sh"
requires cc nbdinfo
plan 18

# serve NAME ARGS...: start a verbose server, make one request, stop it.
# (Not in a subshell: stop_server's sanitizer check must count here.)
serve() {
    start_server "$1" -v "${@:2}" || return 1
    nbdinfo --size "$uri" > /dev/null
    stop_server
}
# ran_on NAME: where the requests of server NAME ran, from its log.
ran_on() { sed -n 's/.*requests run \(on .*\)$/\1/p' "$tmp/$1.log"; }

fs_type() { stat -f -c %T "$1"; }
in_ram() { case $(fs_type "$1") in tmpfs|ramfs) return 0 ;; esac; return 1; }

serve memory memory 1M
is "memory: on the loop threads" "$(ran_on memory)" "on the loop threads"
serve noinline --no-inline memory 1M
is "--no-inline: on worker threads" "$(ran_on noinline)" \
    "on worker threads (--no-inline)"
contains "--no-inline: no busy polling" "$tmp/noinline.log" 'busy polling: off$'
serve delay --filter=delay memory 1M delay-block=on
is "a filter that may block (delay-block=on) puts the chain on workers" "$(ran_on delay)" "on worker threads"
serve delaywait --filter=delay memory 1M delay-read=1ms
is "a filter that waits without a thread (delay) keeps the chain inline" "$(ran_on delaywait)" "on the loop threads"

# A file in RAM.
if in_ram "$tmp"; then
    truncate -s 1M "$tmp/ram.img"
    serve ramfile file "$tmp/ram.img"
    is "file in RAM ($(fs_type "$tmp")): on the loop threads" "$(ran_on ramfile)" \
        "on the loop threads"
    contains "file in RAM: the plugin says why" "$tmp/ramfile.log" \
        "file: $tmp/ram.img is in RAM \($(fs_type "$tmp")\): requests need no worker threads"
    mkdir -p "$tmp/dir"; truncate -s 1M "$tmp/dir/a.img"
    serve ramdir file dir="$tmp/dir" -e a.img
    is "file dir= in RAM: on worker threads (a symlink may lead to a disk)" "$(ran_on ramdir)" "on worker threads"
else
    skip "$tmp is not in RAM"; skip "$tmp is not in RAM"; skip "$tmp is not in RAM"
fi

# A file on a disk: the first candidate directory not in RAM.
disk_dir=
for d in /var/tmp "$top" /tmp; do
    if [ -d "$d" ] && [ -w "$d" ] && ! in_ram "$d"; then disk_dir=$d; break; fi
done
if [ -n "$disk_dir" ]; then
    disk_img=$(mktemp "$disk_dir/nbdserve-inline.XXXXXX")
    truncate -s 1M "$disk_img"
    serve diskfile file "$disk_img"
    is "file on $(fs_type "$disk_dir") ($disk_dir): on worker threads" "$(ran_on diskfile)" "on worker threads"
else
    skip "no writable directory outside RAM"
fi

# refused NAME: a client of server NAME is refused promptly (not stuck).
refused() {
    timeout 10 /usr/bin/nbdinfo --size "$uri" > "$tmp/$1.client" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && [ $rc -ne 124 ]
}
# Served on the loop thread, the path is swapped for a symlink to a disk
# file, then for a FIFO (which blocks a read-only open without
# O_NONBLOCK): new clients are refused, the loop never waits.
if in_ram "$tmp" && [ -n "$disk_dir" ]; then
    truncate -s 1M "$tmp/moved.img"
    start_server moved -r file "$tmp/moved.img"
    rm "$tmp/moved.img"; ln -s "$disk_img" "$tmp/moved.img"
    check "the path now leads to a disk: the client is refused" refused moved-disk
    rm "$tmp/moved.img"; mkfifo "$tmp/moved.img"
    check "the path is now a FIFO: the client is refused at once" refused moved-fifo
    stop_server
    contains "the server says why" "$tmp/moved.log" \
        "file: $tmp/moved.img is no longer a regular file in RAM, as it was at start-up"
else
    for i in 1 2 3; do skip "needs $tmp in RAM and a directory outside it"; done
fi
[ -n "$disk_img" ] && rm -f "$disk_img"

out=$(nbdserve --dump-plugin file 2>&1)
like "--dump-plugin file: the plugin decides once configured" \
    "$(echo "$out" | grep -E '^(has_)?never_blocks=' | tr '\n' ' ')" '^never_blocks=config has_never_blocks=1 $'
like "--dump-plugin memory: never blocks" "$(nbdserve --dump-plugin memory 2>&1 | grep '^never_blocks=')" \
    '^never_blocks=1$'

# The callback overrides the flag, and is called once configured.
cat > "$tmp/decides.c" <<'C'
/* Declares NEVER_BLOCKS, but never_blocks() answers what inline= said.
 * (Both, to show which wins; a real plugin with the callback leaves the
 * flag unset, see plugin-api.md.) */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include "nbdserve-plugin.h"

#ifdef OLD_STRUCT
#define VERSION_FIELDS .struct_size = offsetof(struct nbdserve_plugin, never_blocks), \
                       .api_version = NBDSERVE_API_VERSION
#else
#define VERSION_FIELDS NBDSERVE_PLUGIN_INIT
#endif

static int run_inline = -1;
static int d_config(const char *key, const char *value)
{
  if (strcmp(key, "inline") != 0)
    return -1;
  run_inline = atoi(value);
  return 0;
}
static int d_never_blocks(void) { return run_inline; }
static void *d_open(int ro, const char *name) { (void) ro, (void) name; return &run_inline; }
static int64_t d_get_size(void *h) { (void) h; return 1 << 20; }
static int d_pread(void *h, void *buf, uint32_t n, uint64_t off, uint32_t f)
{
  (void) h, (void) off, (void) f;
  memset(buf, 0, n);
  return 0;
}
static struct nbdserve_plugin p = { VERSION_FIELDS, .name = "decides",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL, .flags = NBDSERVE_PLUGIN_NEVER_BLOCKS,
  .config = d_config, .never_blocks = d_never_blocks,
  .open = d_open, .get_size = d_get_size, .pread = d_pread };
NBDSERVE_REGISTER_PLUGIN(p)
C
build_plugin decides.so "$tmp/decides.c"
build_plugin old.so -DOLD_STRUCT "$tmp/decides.c"
serve cb0 "$tmp/decides.so" inline=0
is "never_blocks() = 0 overrides the flag: on worker threads" "$(ran_on cb0)" "on worker threads"
serve cb1 "$tmp/decides.so" inline=1
is "never_blocks() = 1: on the loop threads" "$(ran_on cb1)" \
    "on the loop threads"
serve cbneg "$tmp/decides.so" inline=-1
is "never_blocks() = -1 (an error) counts as 'may block'" "$(ran_on cbneg)" "on worker threads"
serve old "$tmp/old.so" inline=0
is "a plugin built before the callback: its flag decides" "$(ran_on old)" "on the loop threads"
finish
