/* nbdserve example plugin: the smallest useful plugin, explained.
 *
 * It serves a disk of size= bytes (default 1M) held in RAM.  Every
 * 512-byte sector starts filled with a recognisable pattern: the
 * sector number as text, so `nbdcopy "$uri" - | hexdump -C | head`
 * shows where you are.  Writes change the RAM copy; nothing is kept
 * after the server exits.
 *
 * Build it out of tree exactly like this:
 *   cc -shared -fPIC $(pkg-config --cflags nbdserve) example.c -o example.so
 *   nbdserve ./example.so size=4M
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The one header a plugin needs: the callback struct and the helpers
 * (nbdserve_parse_size, nbdserve_error, ...). */
#include "nbdserve-plugin.h"

static int64_t size = 1024 * 1024; /* the disk size, set by size= */
static char *disk; /* the disk contents, made in config_complete */

/* config: called once per key=value on the command line.  Because the
 * struct below names "size" as its magic key, `nbdserve example 4M` is
 * the same as `nbdserve example size=4M`. */
static int example_config(const char *key, const char *value)
{
  if (strcmp(key, "size") != 0) {
    nbdserve_error("example: unknown parameter '%s'", key);
    return -1; /* the server stops with our message */
  }
  size = nbdserve_parse_size(value); /* logs its own error */
  return size == -1 ? -1 : 0;
}

/* config_complete: every parameter is in; check them and get ready.
 * Nothing is served yet, so this is the place for slow set-up. */
static int example_config_complete(void)
{
  if (size > 1024 * 1024 * 1024) {
    nbdserve_error("example: keep it small (at most 1G); try the memory plugin");
    return -1;
  }
  disk = malloc((size_t) size);
  if (disk == NULL) {
    nbdserve_error("example: cannot allocate %lld bytes", (long long) size);
    return -1;
  }
  /* The pattern: "sector N" at the start of each 512-byte sector. */
  memset(disk, 0, (size_t) size);
  for (int64_t s = 0; s * 512 < size; s++)
    snprintf(disk + s * 512, (size_t) (size - s * 512 < 32 ? size - s * 512 : 32),
             "sector %lld\n", (long long) s);
  return 0;
}

static void example_unload(void)
{
  free(disk);
}

/* open: a client connected.  The pointer we return is handed back to
 * every other callback for this connection.  We keep no per-connection
 * state, so any non-NULL pointer does; NULL would refuse the client. */
static void *example_open(int readonly, const char *export_name)
{
  (void) readonly, (void) export_name;
  return disk;
}

/* get_size: the export's size in bytes, asked once per connection. */
static int64_t example_get_size(void *handle)
{
  (void) handle;
  return size;
}

/* pread: fill BUF with COUNT bytes at OFFSET.  The server has already
 * checked that the range lies inside the disk. */
static int example_pread(void *handle, void *buf, uint32_t count, uint64_t offset,
                         uint32_t flags)
{
  (void) flags;
  memcpy(buf, (char *) handle + offset, count);
  return 0;
}

/* pwrite: having it makes the export writable (can_write defaults to
 * "pwrite exists").  FLAGS may carry NBDSERVE_FLAG_FUA: RAM needs no
 * flush, and without a flush callback the server advertises no FUA. */
static int example_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset,
                          uint32_t flags)
{
  (void) flags;
  memcpy((char *) handle + offset, buf, count);
  return 0;
}

/* Everything the server needs to know, in one struct.  Callbacks left
 * out get the defaults documented in nbdserve-plugin.h: here, writes of
 * zeroes are emulated with pwrite, and there is no trim, flush or
 * extents support. */
static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT, /* ABI version and struct size: always first */
  .name = "example",
  .longname = "a small RAM disk with a pattern (the tutorial plugin)",
  .version = "0.1.0",
  .config_help = "size=SIZE       disk size (default 1M, at most 1G)",
  .magic_config_key = "size",
  /* One lock-free memcpy per request: parallel is safe.  A plugin that
   * is unsure should pick NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS. */
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .config = example_config,
  .config_complete = example_config_complete,
  .unload = example_unload,
  .open = example_open,
  .get_size = example_get_size,
  .pread = example_pread,
  .pwrite = example_pwrite,
};

/* Exports the symbol the server looks for after dlopen. */
NBDSERVE_REGISTER_PLUGIN(plugin)
