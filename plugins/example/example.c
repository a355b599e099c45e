/* nbdserve example plugin: the smallest useful plugin, explained.
 *
 * An NBD server offers "exports": disks a client can read and write by
 * byte offset.  A plugin decides what the bytes are.  This one serves a
 * disk of size= bytes (default 1M) held in RAM.  Each 512-byte sector
 * starts out with its own number written in it ("sector 42"), so
 *
 *   nbdserve -U - example --run 'nbdcopy "$uri" - | hexdump -C | head'
 *
 * shows at a glance which part of the disk you are looking at.  Clients
 * may overwrite it; everything is forgotten when the server exits.
 *
 * Build it out of tree exactly like this:
 *   cc -shared -fPIC $(pkg-config --cflags nbdserve) example.c -o example.so
 *   nbdserve ./example.so size=4M
 *
 * The tutorial of docs/plugin-api.md builds a plugin of the same shape
 * out of tree, then describes every callback.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The one header a plugin needs: the callback struct and the helpers
 * (nbdserve_parse_size, nbdserve_error, ...). */
#include "nbdserve-plugin.h"

#define SECTOR 512

static int64_t size = 1024 * 1024; /* the disk size, set by size= */
static char *disk; /* the disk contents, made in config_complete */

/* config: called once for every key=value on the command line, before
 * anything is served.  The struct below names "size" as the magic key,
 * so `nbdserve example 4M` means `nbdserve example size=4M`. */
static int example_config(const char *key, const char *value)
{
  if (strcmp(key, "size") != 0) {
    nbdserve_error("example: unknown parameter '%s' (the only one is size=SIZE)", key);
    return -1; /* the server stops and shows our message */
  }
  size = nbdserve_parse_size(value); /* "4M", "1G", "8s"...; logs its own error */
  return size == -1 ? -1 : 0;
}

/* config_complete: every parameter is in.  Check them and set up; a
 * failure here stops the server before it listens. */
static int example_config_complete(void)
{
  if (size > 1024 * 1024 * 1024) {
    nbdserve_error("example: size=%lld is too big for the example (at most 1G); "
                   "the memory plugin serves large RAM disks", (long long) size);
    return -1;
  }
  disk = calloc(1, size > 0 ? (size_t) size : 1);
  if (disk == NULL) {
    nbdserve_error("example: cannot allocate %lld bytes", (long long) size);
    return -1;
  }
  /* The pattern: "sector N\n" at the start of sector N, zeroes after. */
  for (int64_t sector = 0; sector * SECTOR < size; sector++) {
    char label[32];
    int len = snprintf(label, sizeof label, "sector %lld\n", (long long) sector);
    int64_t room = size - sector * SECTOR; /* the last sector may be short */
    memcpy(disk + sector * SECTOR, label, (size_t) (len < room ? len : room));
  }
  return 0;
}

/* unload: the server is exiting.  Free what config_complete made. */
static void example_unload(void)
{
  free(disk);
}

/* open: a client connected and chose this export.  Whatever pointer we
 * return is handed back to every callback for this connection (the
 * "handle").  All clients share one disk here, so the disk itself will
 * do; returning NULL would turn the client away. */
static void *example_open(int readonly, const char *export_name)
{
  (void) readonly, (void) export_name; /* one export, same for all */
  return disk;
}

/* get_size: the export's size in bytes, asked once per connection. */
static int64_t example_get_size(void *handle)
{
  (void) handle;
  return size;
}

/* pread: fill BUF with COUNT bytes of the disk at OFFSET.  The server has
 * already checked that the range lies inside the disk.  FLAGS carries
 * nothing a read needs to act on. */
static int example_pread(void *handle, void *buf, uint32_t count, uint64_t offset,
                         uint32_t flags)
{
  (void) flags;
  memcpy(buf, (char *) handle + offset, count);
  return 0; /* on failure: return -1 with errno set, e.g. EIO */
}

/* pwrite: store COUNT bytes from BUF at OFFSET.  Having pwrite makes the
 * export writable (can_write defaults to "pwrite exists"; `nbdserve -r`
 * still serves it read-only).  FLAGS may hold NBDSERVE_FLAG_FUA ("make
 * it durable before replying"), but only if FUA was advertised: without
 * a flush callback it is not, and RAM has nothing to make durable. */
static int example_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset,
                          uint32_t flags)
{
  (void) flags;
  memcpy((char *) handle + offset, buf, count);
  return 0;
}

/* Everything the server needs to know, in one struct.  Callbacks left
 * out get the defaults documented in nbdserve-plugin.h: here, writing
 * zeroes is emulated with pwrite, and there is no trim, flush, cache or
 * extents (every byte is reported as data). */
static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT, /* ABI version and struct size: always first */
  .name = "example",
  .longname = "a small RAM disk with a pattern (the smallest plugin, to read)",
  .version = "0.1.0",
  .description = "Serves size= bytes of RAM, each 512-byte sector labelled with its "
                 "number.  Read docs/plugin-api.md alongside its source.",
  .config_help = "size=SIZE       disk size (default 1M, at most 1G)",
  .magic_config_key = "size",
  /* Each request is one memcpy into memory nobody frees while serving,
   * so requests may run in parallel.  Two requests touching the same
   * bytes at once are undefined in NBD anyway.  Unsure?  Choose
   * NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS and need no locks. */
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .config = example_config,
  .config_complete = example_config_complete,
  .unload = example_unload,
  .open = example_open,
  .get_size = example_get_size,
  .pread = example_pread,
  .pwrite = example_pwrite,
};

/* Exports the function the server looks up after dlopen. */
NBDSERVE_REGISTER_PLUGIN(plugin)
