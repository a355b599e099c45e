/* nbdserve qcow2-readonly plugin: serve a qcow2 image, read-only, with
 * its backing chain, persistent bitmaps and allocation depth.
 *
 * The image is parsed once, at start-up, by the qcow2 library in
 * common/qcow2; every connection reads the same chain through its shared
 * metadata cache, in parallel.  Contexts offered besides base:allocation:
 * qemu:allocation-depth, and qemu:dirty-bitmap:NAME for each usable
 * persistent bitmap (or those named by bitmap=).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "extents-walk.h"
#include "nbdserve-plugin.h"
#include "qcow2/qcow2.h"

#define DEPTH_CONTEXT "qemu:allocation-depth"
#define BITMAP_PREFIX "qemu:dirty-bitmap:"
#define MAX_REQUEST (32u << 20)

static char *image_path; /* file= */
static struct qcow2_options options;
static char *snapshot, *data_file;
static char **wanted_bitmaps; /* bitmap=, repeatable */
static size_t nwanted;

static struct qcow2_chain *chain;
/* The bitmaps served: indexes into the chain's directory, and their
 * context names. */
static size_t *served;
static char **served_names;
static size_t nserved;

/* ---- Configuration -------------------------------------------------------- */

static int set_string(char **dest, const char *value)
{
  free(*dest);
  *dest = strdup(value);
  return *dest ? 0 : -1;
}

static int q2_config(const char *key, const char *value)
{
  if (strcmp(key, "file") == 0) {
    free(image_path);
    image_path = realpath(value, NULL); /* absolute: the server may change directory */
    if (image_path == NULL) {
      nbdserve_error("qcow2-readonly: file=%s: %m", value);
      return -1;
    }
    return 0;
  }
  if (strcmp(key, "backing") == 0) {
    int b = nbdserve_parse_bool(value);
    if (b == -1)
      return -1;
    options.no_backing = !b;
    return 0;
  }
  if (strcmp(key, "snapshot") == 0)
    return set_string(&snapshot, value);
  if (strcmp(key, "data-file") == 0) {
    free(data_file);
    data_file = realpath(value, NULL);
    if (data_file == NULL) {
      nbdserve_error("qcow2-readonly: data-file=%s: %m", value);
      return -1;
    }
    return 0;
  }
  if (strcmp(key, "bitmap") == 0) {
    char **more = realloc(wanted_bitmaps, (nwanted + 1) * sizeof *more);
    if (more == NULL || (more[nwanted] = strdup(value)) == NULL) {
      wanted_bitmaps = more ? more : wanted_bitmaps;
      nbdserve_error("qcow2-readonly: out of memory");
      return -1;
    }
    wanted_bitmaps = more;
    nwanted++;
    return 0;
  }
  if (strcmp(key, "l2-cache-size") == 0) {
    int64_t size = nbdserve_parse_size(value);
    if (size == -1)
      return -1;
    if (size < 65536) {
      nbdserve_error("qcow2-readonly: l2-cache-size=%s: at least 64K", value);
      return -1;
    }
    options.cache_bytes = (uint64_t) size;
    return 0;
  }
  nbdserve_error("qcow2-readonly: unknown parameter '%s' (the parameters are file, backing, "
                 "snapshot, data-file, bitmap and l2-cache-size)", key);
  return -1;
}

static bool is_wanted(const char *name)
{
  if (nwanted == 0)
    return true;
  for (size_t i = 0; i < nwanted; i++)
    if (strcmp(wanted_bitmaps[i], name) == 0)
      return true;
  return false;
}

/* Picks the bitmaps to serve; a bitmap= that names no usable bitmap
 * refuses to start, since a backup run against a missing bitmap would
 * otherwise fail only later, at the client. */
static int choose_bitmaps(void)
{
  size_t n = qcow2_bitmap_count(chain);
  for (size_t w = 0; w < nwanted; w++) {
    size_t i = 0;
    while (i < n && strcmp(qcow2_bitmap_name(chain, i), wanted_bitmaps[w]) != 0)
      i++;
    if (i == n) {
      nbdserve_error("qcow2-readonly: bitmap=%s: %s", wanted_bitmaps[w],
                     snapshot ? "bitmaps are not served with snapshot= (they describe the "
                                "active image)" : "the image has no bitmap of that name");
      return -1;
    }
    if (qcow2_bitmap_problem(chain, i)) {
      nbdserve_error("qcow2-readonly: bitmap=%s cannot be served: %s", wanted_bitmaps[w],
                     qcow2_bitmap_problem(chain, i));
      return -1;
    }
  }
  served = calloc(n ? n : 1, sizeof *served);
  served_names = calloc(n ? n : 1, sizeof *served_names);
  if (served == NULL || served_names == NULL)
    return -1;
  for (size_t i = 0; i < n; i++) {
    const char *name = qcow2_bitmap_name(chain, i);
    if (qcow2_bitmap_problem(chain, i) || !is_wanted(name))
      continue;
    if (asprintf(&served_names[nserved], BITMAP_PREFIX "%s", name) < 0)
      return -1;
    served[nserved++] = i;
    nbdserve_debug("qcow2-readonly: serving bitmap '%s' (granularity %llu) as %s", name,
                   (unsigned long long) qcow2_bitmap_granularity(chain, i), served_names[nserved - 1]);
  }
  return 0;
}

static int q2_config_complete(void)
{
  if (image_path == NULL) {
    nbdserve_error("qcow2-readonly: give the image: file=PATH (or just PATH)");
    return -1;
  }
  options.snapshot = snapshot;
  options.data_file = data_file;
  qcow2_set_logger(nbdserve_error, nbdserve_debug);
  chain = qcow2_open(image_path, &options);
  if (chain == NULL)
    return -1;
  if (choose_bitmaps() < 0) {
    nbdserve_error("qcow2-readonly: cannot serve the bitmaps");
    return -1;
  }
  return 0;
}

/* Every file of the chain on tmpfs or ramfs: a read is memory copies and
 * decompression, and may run on the connection's thread. */
static int q2_never_blocks(void)
{
  const char *disk = qcow2_first_file_not_in_ram(chain);
  if (disk)
    nbdserve_debug("qcow2-readonly: %s is not in RAM: requests run on worker threads", disk);
  else
    nbdserve_debug("qcow2-readonly: every file of the chain is in RAM: requests need no worker threads");
  return disk == NULL;
}

static void q2_unload(void)
{
  qcow2_close(chain);
  for (size_t i = 0; i < nserved; i++)
    free(served_names[i]);
  free(served_names);
  free(served);
  for (size_t i = 0; i < nwanted; i++)
    free(wanted_bitmaps[i]);
  free(wanted_bitmaps);
  free(image_path);
  free(snapshot);
  free(data_file);
}

/* ---- Exports and contexts --------------------------------------------------- */

static int q2_list_meta_contexts(const char *export_name, struct nbdserve_contexts *contexts)
{
  (void) export_name;
  if (nbdserve_add_context(contexts, DEPTH_CONTEXT) == -1)
    return -1;
  for (size_t i = 0; i < nserved; i++)
    if (nbdserve_add_context(contexts, served_names[i]) == -1)
      return -1;
  return 0;
}

/* ---- Connections ------------------------------------------------------------- */

static void *q2_open(int readonly, const char *export_name)
{
  (void) readonly;
  (void) export_name;
  return chain; /* one shared, read-only chain */
}

static int64_t q2_get_size(void *handle)
{
  return (int64_t) qcow2_size(handle);
}

static int q2_block_size(void *handle, uint32_t *minimum, uint32_t *preferred, uint32_t *maximum)
{
  uint32_t cluster = qcow2_cluster_size(handle);
  *minimum = 1;
  *preferred = cluster < 4096 ? 4096 : cluster;
  *maximum = MAX_REQUEST;
  return 0;
}

static int return_zero(void *handle)
{
  (void) handle;
  return 0;
}

static int return_one(void *handle)
{
  (void) handle;
  return 1;
}

/* ---- Data ---------------------------------------------------------------------- */

static int q2_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  int r = qcow2_read(handle, buf, count, offset);
  if (r < 0) {
    nbdserve_set_error(-r);
    return -1;
  }
  return 0;
}

static int describe(void *handle, const char *context, uint64_t count, uint64_t offset,
                    struct nbdserve_extents *extents, extents_stretch_fn *next)
{
  int r = extents_walk(extents, handle, context, offset, count, next);
  if (r < 0) {
    nbdserve_set_error(-r);
    return -1;
  }
  return 0;
}

static int allocation_stretch(void *source, const char *context, uint64_t offset, uint64_t max,
                              uint64_t *length, uint64_t *flags)
{
  struct qcow2_chain *c = source;
  struct qcow2_status st;
  int r = qcow2_block_status(c, offset, max, &st);
  if (r < 0)
    return r;
  *length = st.length;
  if (strcmp(context, DEPTH_CONTEXT) == 0)
    *flags = st.depth;
  else
    *flags = st.kind == QCOW2_ZERO ? NBDSERVE_EXTENT_HOLE | NBDSERVE_EXTENT_ZERO : 0;
  return 0;
}

static int bitmap_stretch(void *source, const char *context, uint64_t offset, uint64_t max,
                          uint64_t *length, uint64_t *flags)
{
  struct qcow2_chain *c = source;
  for (size_t i = 0; i < nserved; i++)
    if (strcmp(served_names[i], context) == 0) {
      bool dirty;
      int r = qcow2_bitmap_status(c, served[i], offset, max, length, &dirty);
      *flags = dirty; /* bit 0: dirty */
      return r;
    }
  return -EINVAL;
}

static int q2_extents(void *handle, uint64_t count, uint64_t offset, uint32_t flags,
                      struct nbdserve_extents *extents)
{
  (void) flags;
  return describe(handle, NBDSERVE_CONTEXT_BASE_ALLOCATION, count, offset, extents, allocation_stretch);
}

static int q2_meta_extents(void *handle, const char *context, uint64_t count, uint64_t offset,
                           uint32_t flags, struct nbdserve_extents *extents)
{
  (void) flags;
  extents_stretch_fn *fn = strcmp(context, DEPTH_CONTEXT) == 0 ? allocation_stretch : bitmap_stretch;
  return describe(handle, context, count, offset, extents, fn);
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "qcow2-readonly",
  .longname = "serve a qcow2 image read-only, with its backing chain and bitmaps",
  .version = "0.1.0",
  .description = "Serves the qcow2 image file=PATH read-only, byte for byte as qemu reads it: "
                 "versions 2 and 3, compressed (deflate, zstd) and extended-L2 clusters, "
                 "external data files, raw or qcow2 backing chains, internal snapshots.  "
                 "Offers the contexts qemu:allocation-depth and qemu:dirty-bitmap:NAME for "
                 "each consistent persistent bitmap.",
  .config_help = "file=PATH          the qcow2 image (the magic key)\n"
                 "backing=on|off     follow the backing chain (default on); off serves the top "
                 "image alone\n"
                 "snapshot=ID|NAME   serve this internal snapshot instead of the active image\n"
                 "data-file=PATH     external data file, instead of the name in the image\n"
                 "bitmap=NAME        serve only these bitmaps (repeatable; default: every usable one)\n"
                 "l2-cache-size=SIZE metadata cache shared by all connections (default 32M)",
  .magic_config_key = "file",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .config = q2_config,
  .config_complete = q2_config_complete,
  .never_blocks = q2_never_blocks,
  .unload = q2_unload,
  .list_meta_contexts = q2_list_meta_contexts,
  .open = q2_open,
  .get_size = q2_get_size,
  .block_size = q2_block_size,
  .can_write = return_zero,
  .can_multi_conn = return_one,
  .can_extents = return_one,
  .pread = q2_pread,
  .extents = q2_extents,
  .meta_extents = q2_meta_extents,
};

NBDSERVE_REGISTER_PLUGIN(plugin)
