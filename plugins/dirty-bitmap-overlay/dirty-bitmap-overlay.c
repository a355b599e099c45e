/* nbdserve dirty-bitmap-overlay plugin: a writable qcow2 overlay over a
 * base that is never written, whose changes are recorded in persistent
 * dirty bitmaps served as qemu:dirty-bitmap:NAME, for incremental
 * backups.
 *
 * The overlay itself (allocation, refcounts, bitmaps, crash safety) is
 * the qcow2 overlay library in common/qcow2/overlay.h; this file maps
 * parameters and NBD calls onto it.  Every connection shares the one
 * overlay; requests run in parallel.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "extents-walk.h"
#include "nbdserve-plugin.h"
#include "overlay-plugin.h"

#define DEPTH_CONTEXT "qemu:allocation-depth"
#define BITMAP_PREFIX "qemu:dirty-bitmap:"
#define MAX_REQUEST (32u << 20)

static struct qcow2_overlay_options options;
static char *base_path;
char *overlay_path;
pthread_rwlock_t chain_lock = PTHREAD_RWLOCK_INITIALIZER;
struct qcow2_overlay *live;
static char **bitmaps, **clears;
static size_t nbitmaps, nclears;
static bool granularity_given;

/* A connection's handle: the live overlay, or a checkpoint's export. */
struct handle {
  struct checkpoint *checkpoint; /* NULL: live */
};

/* ---- Configuration -------------------------------------------------------- */

/* An absolute path for a file that may not exist yet (the server may
 * change directory before the overlay is opened). */
static char *absolute(const char *value)
{
  char *path = realpath(value, NULL);
  if (path || errno != ENOENT)
    return path;
  char *dir_copy = strdup(value), *base_copy = strdup(value), *out = NULL;
  char *dir = dir_copy ? realpath(dirname(dir_copy), NULL) : NULL;
  if (dir && base_copy && asprintf(&out, "%s/%s", dir, basename(base_copy)) < 0)
    out = NULL;
  else if (dir == NULL)
    errno = ENOENT;
  free(dir);
  free(dir_copy);
  free(base_copy);
  return out;
}

static int append_name(char ***list, size_t *n, const char *key, const char *value)
{
  if (value[0] == '\0' || strlen(value) > 1023) {
    nbdserve_error(NAME ": %s=%s: a bitmap name has 1 to 1023 bytes", key, value);
    return -1;
  }
  char **more = realloc(*list, (*n + 1) * sizeof *more);
  if (more == NULL || (more[*n] = strdup(value)) == NULL) {
    *list = more ? more : *list;
    nbdserve_error(NAME ": out of memory");
    return -1;
  }
  *list = more;
  ++*n;
  return 0;
}

static int parse_power_of_two(const char *key, const char *value, uint64_t min, uint64_t max, uint64_t *out)
{
  int64_t v = nbdserve_parse_size(value);
  if (v == -1)
    return -1;
  if ((uint64_t) v < min || (uint64_t) v > max || (v & (v - 1))) {
    nbdserve_error(NAME ": %s=%s: a power of two from %llu to %llu bytes", key, value,
                   (unsigned long long) min, (unsigned long long) max);
    return -1;
  }
  *out = (uint64_t) v;
  return 0;
}

static int file_param(char **dest, const char *key, const char *value)
{
  free(*dest);
  *dest = absolute(value);
  if (*dest == NULL) {
    nbdserve_error(NAME ": %s=%s: %m", key, value);
    return -1;
  }
  return 0;
}

static int ovl_config(const char *key, const char *value)
{
  uint64_t v;
  if (strcmp(key, "overlay") == 0)
    return file_param(&overlay_path, key, value);
  if (strcmp(key, "base") == 0)
    return file_param(&base_path, key, value);
  if (strcmp(key, "bitmap") == 0)
    return append_name(&bitmaps, &nbitmaps, key, value);
  if (strcmp(key, "clear") == 0)
    return append_name(&clears, &nclears, key, value);
  if (strcmp(key, "granularity") == 0) {
    if (parse_power_of_two(key, value, 512, 1ull << 31, &v) < 0)
      return -1;
    options.granularity = v;
    granularity_given = true;
    return 0;
  }
  if (strcmp(key, "cluster-size") == 0) {
    if (parse_power_of_two(key, value, 512, 2u << 20, &v) < 0)
      return -1;
    options.cluster_size = (uint32_t) v;
    return 0;
  }
  if (strcmp(key, "size") == 0) {
    int64_t size = nbdserve_parse_size(value);
    if (size == -1)
      return -1;
    if (size == 0) {
      nbdserve_error(NAME ": size=%s: the disk needs at least one byte", value);
      return -1;
    }
    options.size = (uint64_t) size;
    return 0;
  }
  if (strcmp(key, "l2-cache-size") == 0) {
    int64_t size = nbdserve_parse_size(value);
    if (size == -1)
      return -1;
    if (size < 65536) {
      nbdserve_error(NAME ": l2-cache-size=%s: at least 64K", value);
      return -1;
    }
    options.cache_bytes = (uint64_t) size;
    return 0;
  }
  nbdserve_error(NAME ": unknown parameter '%s' (the parameters are overlay, base, bitmap, clear, "
                 "granularity, cluster-size, size and l2-cache-size)", key);
  return -1;
}

/* After a checkpoint the bitmap recording is the newest checkpoint's, as
 * the overlay's header records it: it is served (first), whatever
 * bitmap= says, and a bitmap= whose epoch ended at a checkpoint (no
 * longer in the overlay) is not made anew. */
static int served_after_checkpoints(void)
{
  char *now = qcow2_overlay_peek_recording(overlay_path);
  if (now == NULL)
    return 0;
  struct qcow2_options no_backing = {.no_backing = true};
  struct qcow2_chain *probe = qcow2_open(overlay_path, &no_backing);
  if (probe == NULL) {
    free(now);
    return -1;
  }
  for (size_t i = 0; i < nbitmaps;) {
    bool present = false;
    for (size_t k = 0; k < qcow2_bitmap_count(probe); k++)
      present |= strcmp(qcow2_bitmap_name(probe, k), bitmaps[i]) == 0;
    if (present || strcmp(bitmaps[i], now) == 0) {
      i++;
      continue;
    }
    nbdserve_debug(NAME ": bitmap=%s ended at a checkpoint; bitmap %s records now", bitmaps[i], now);
    free(bitmaps[i]);
    memmove(bitmaps + i, bitmaps + i + 1, (nbitmaps - i - 1) * sizeof *bitmaps);
    nbitmaps--;
  }
  qcow2_close(probe);
  bool named = false;
  for (size_t i = 0; i < nbitmaps; i++)
    named |= strcmp(bitmaps[i], now) == 0;
  int r = named ? 0 : append_name(&bitmaps, &nbitmaps, "bitmap", now);
  for (size_t i = 0; r == 0 && i < nbitmaps; i++) /* the recording bitmap first */
    if (strcmp(bitmaps[i], now) == 0) {
      char *t = bitmaps[0];
      bitmaps[0] = bitmaps[i];
      bitmaps[i] = t;
    }
  free(now);
  options.bitmaps = (const char *const *) bitmaps;
  options.nbitmaps = nbitmaps;
  return r;
}

static int ovl_config_complete(void)
{
  if (overlay_path == NULL) {
    nbdserve_error(NAME ": give the overlay: overlay=PATH (or just PATH)");
    return -1;
  }
  struct stat st;
  bool exists = stat(overlay_path, &st) == 0;
  if (!exists && base_path == NULL && options.size == 0) {
    nbdserve_error(NAME ": %s does not exist: to create it give base=PATH, or size=SIZE for an "
                   "overlay without a base", overlay_path);
    return -1;
  }
  if (exists && options.size) {
    nbdserve_error(NAME ": size= is only for a new overlay without a base (%s exists)", overlay_path);
    return -1;
  }
  if (base_path && options.size) {
    nbdserve_error(NAME ": size= and base= exclude each other: an overlay has the size of its base");
    return -1;
  }
  options.path = overlay_path;
  options.base = base_path;
  options.bitmaps = (const char *const *) bitmaps;
  options.nbitmaps = nbitmaps;
  options.clear = (const char *const *) clears;
  options.nclear = nclears;
  if (!granularity_given)
    options.granularity = 0; /* new bitmaps get the default; existing ones keep theirs */
  qcow2_set_logger(nbdserve_error, nbdserve_debug);
  if (exists && served_after_checkpoints() < 0)
    return -1;
  live = qcow2_overlay_open(&options);
  if (live == NULL)
    return -1;
  if (qcow2_overlay_recovered(live))
    nbdserve_error(NAME ": %s was not closed cleanly; its bitmaps were kept as they are on disk "
                   "(they may show more granules dirty than changed, never fewer)", overlay_path);
  const char *first = nbitmaps ? bitmaps[0] : nclears ? clears[0] : NULL;
  if (first && (recording = strdup(first)) == NULL)
    return -1;
  if (checkpoints_open() < 0 || checkpoints_register_commands() < 0)
    return -1;
  return 0;
}

static void free_names(char **list, size_t n)
{
  for (size_t i = 0; i < n; i++)
    free(list[i]);
  free(list);
}

static void ovl_unload(void)
{
  checkpoints_close();
  if (live && qcow2_overlay_close(live) < 0)
    nbdserve_error(NAME ": %s was not closed cleanly; the next start recovers it", overlay_path);
  free_names(bitmaps, nbitmaps);
  free_names(clears, nclears);
  free(overlay_path);
  free(base_path);
}

/* The overlay and every file of its base in RAM: a request is memory
 * copies and short locks (a flush's fdatasync returns at once there), so
 * it may run on the connection's own thread. */
static int ovl_never_blocks(void)
{
  const char *disk = qcow2_overlay_first_file_not_in_ram(live);
  if (disk)
    nbdserve_debug(NAME ": %s is not in RAM: requests run on worker threads", disk);
  else
    nbdserve_debug(NAME ": the overlay and its base are in RAM: requests need no worker threads");
  return disk == NULL;
}

/* --dump-plugin overlay=PATH: what the file holds, read without opening
 * it for writing. */
static void ovl_dump_plugin(void)
{
  printf("max_request=%u\n", MAX_REQUEST);
  if (overlay_path == NULL)
    return;
  qcow2_set_logger(nbdserve_error, nbdserve_debug);
  struct qcow2_options o = {.no_backing = true};
  struct qcow2_chain *chain = qcow2_open(overlay_path, &o);
  if (chain == NULL)
    return;
  printf("overlay=%s\noverlay_size=%llu\noverlay_cluster_size=%u\noverlay_bitmaps=%zu\n", overlay_path,
         (unsigned long long) qcow2_size(chain), qcow2_cluster_size(chain), qcow2_bitmap_count(chain));
  for (size_t i = 0; i < qcow2_bitmap_count(chain); i++) {
    const char *problem = qcow2_bitmap_problem(chain, i);
    printf("overlay_bitmap=%s granularity=%llu%s%s\n", qcow2_bitmap_name(chain, i),
           (unsigned long long) qcow2_bitmap_granularity(chain, i), problem ? " note=" : "",
           problem ? problem : "");
  }
  qcow2_close(chain);
}

/* ---- Exports, contexts and connections ---------------------------------------- */

static void list_checkpoint(const struct checkpoint *ck, void *opaque)
{
  char *name, *description;
  if (asprintf(&name, "@%s", ck->name) < 0)
    return;
  if (asprintf(&description, "checkpoint %s, read-only", ck->name) >= 0) {
    nbdserve_add_export(opaque, name, description);
    free(description);
  }
  free(name);
}

static int ovl_list_exports(int readonly, int is_tls, struct nbdserve_exports *exports)
{
  (void) readonly;
  (void) is_tls;
  if (nbdserve_add_export(exports, "", "the live disk") == -1)
    return -1;
  checkpoints_each(list_checkpoint, exports);
  return 0;
}

/* The contexts of an export: allocation depth, and its bitmaps (the live
 * ones, or the one that ended at a checkpoint). */
static int ovl_list_meta_contexts(const char *export_name, struct nbdserve_contexts *contexts)
{
  if (nbdserve_add_context(contexts, DEPTH_CONTEXT) == -1)
    return -1;
  struct checkpoint *ck = export_name[0] == '@' ? checkpoint_get(export_name) : NULL;
  if (export_name[0] == '@' && ck == NULL)
    return 0;
  int r = 0;
  pthread_rwlock_rdlock(&chain_lock);
  struct qcow2_overlay *ov = ck ? ck->ov : live;
  for (size_t i = 0; r == 0 && i < qcow2_overlay_bitmap_count(ov); i++) {
    char *name;
    if (asprintf(&name, BITMAP_PREFIX "%s", qcow2_overlay_bitmap_name(ov, i)) < 0)
      r = -1;
    else {
      r = nbdserve_add_context(contexts, name);
      free(name);
    }
  }
  pthread_rwlock_unlock(&chain_lock);
  if (ck)
    checkpoint_put(ck);
  return r;
}

static void *ovl_open(int readonly, const char *export_name)
{
  (void) readonly;
  struct handle *h = calloc(1, sizeof *h);
  if (h == NULL)
    return NULL;
  if (export_name[0] == '\0')
    return h;
  if ((h->checkpoint = checkpoint_get(export_name)) == NULL) {
    nbdserve_error(NAME ": no export '%s' (the live disk is \"\", checkpoints are \"@NAME\")", export_name);
    free(h);
    nbdserve_set_error(ENOENT);
    return NULL;
  }
  return h;
}

static void ovl_close(void *handle)
{
  struct handle *h = handle;
  if (h->checkpoint)
    checkpoint_put(h->checkpoint);
  free(h);
}

/* The overlay a call works on, with chain_lock held shared until done(). */
static struct qcow2_overlay *use(void *handle)
{
  struct handle *h = handle;
  pthread_rwlock_rdlock(&chain_lock);
  return h->checkpoint ? h->checkpoint->ov : live;
}

static void done(void)
{
  pthread_rwlock_unlock(&chain_lock);
}

static int64_t ovl_get_size(void *handle)
{
  int64_t size = (int64_t) qcow2_overlay_size(use(handle));
  done();
  return size;
}

static int ovl_block_size(void *handle, uint32_t *minimum, uint32_t *preferred, uint32_t *maximum)
{
  uint32_t cluster = qcow2_overlay_cluster_size(use(handle));
  done();
  *minimum = 1;
  *preferred = cluster < 4096 ? 4096 : cluster;
  *maximum = MAX_REQUEST;
  return 0;
}

static int return_one(void *handle)
{
  (void) handle;
  return 1;
}

/* Checkpoints are read-only exports. */
static int is_live(void *handle)
{
  return ((struct handle *) handle)->checkpoint == NULL;
}

static int ovl_can_fua(void *handle)
{
  return is_live(handle) ? NBDSERVE_FUA_NATIVE : NBDSERVE_FUA_NONE;
}

/* ---- Data --------------------------------------------------------------------------- */

static int result(int r)
{
  done();
  if (r < 0) {
    nbdserve_set_error(-r);
    return -1;
  }
  return 0;
}

static int ovl_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  struct qcow2_overlay *ov = use(handle);
  return result(qcow2_overlay_read(ov, buf, count, offset));
}

static int ovl_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct qcow2_overlay *ov = use(handle);
  return result(qcow2_overlay_write(ov, buf, count, offset, flags & NBDSERVE_FLAG_FUA));
}

static int ovl_zero(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct qcow2_overlay *ov = use(handle);
  /* Whole clusters are zeroed by changing their L2 entries; a part of
   * one needs its data written, which is not fast. */
  uint64_t cluster = qcow2_overlay_cluster_size(ov), end = offset + count;
  if ((flags & NBDSERVE_FLAG_FAST_ZERO) &&
      (offset % cluster || (end % cluster && end != qcow2_overlay_size(ov))))
    return result(-ENOTSUP);
  return result(qcow2_overlay_zero(ov, count, offset, flags & NBDSERVE_FLAG_MAY_TRIM,
                                   flags & NBDSERVE_FLAG_FUA));
}

static int ovl_trim(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct qcow2_overlay *ov = use(handle);
  return result(qcow2_overlay_trim(ov, count, offset, flags & NBDSERVE_FLAG_FUA));
}

static int ovl_flush(void *handle, uint32_t flags)
{
  (void) flags;
  struct qcow2_overlay *ov = use(handle);
  return result(qcow2_overlay_flush(ov));
}

/* ---- Extents ---------------------------------------------------------------------- */

static int allocation_stretch(void *source, const char *context, uint64_t offset, uint64_t max,
                              uint64_t *length, uint64_t *flags)
{
  struct qcow2_overlay *ov = source;
  struct qcow2_status st;
  int r = qcow2_overlay_block_status(ov, offset, max, &st);
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
  struct qcow2_overlay *ov = source;
  const char *name = context + strlen(BITMAP_PREFIX);
  for (size_t i = 0; i < qcow2_overlay_bitmap_count(ov); i++)
    if (strcmp(qcow2_overlay_bitmap_name(ov, i), name) == 0) {
      bool dirty;
      int r = qcow2_overlay_bitmap_status(ov, i, offset, max, length, &dirty);
      *flags = dirty; /* bit 0: dirty */
      return r;
    }
  return -EINVAL; /* a context of the export before a checkpoint switched it */
}

static int describe(void *handle, const char *context, uint64_t count, uint64_t offset,
                    struct nbdserve_extents *extents, extents_stretch_fn *next)
{
  return result(extents_walk(extents, use(handle), context, offset, count, next));
}

static int ovl_extents(void *handle, uint64_t count, uint64_t offset, uint32_t flags,
                       struct nbdserve_extents *extents)
{
  (void) flags;
  return describe(handle, NBDSERVE_CONTEXT_BASE_ALLOCATION, count, offset, extents, allocation_stretch);
}

static int ovl_meta_extents(void *handle, const char *context, uint64_t count, uint64_t offset,
                            uint32_t flags, struct nbdserve_extents *extents)
{
  (void) flags;
  return describe(handle, context, count, offset, extents,
                  strcmp(context, DEPTH_CONTEXT) == 0 ? allocation_stretch : bitmap_stretch);
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = NAME,
  .longname = "a writable qcow2 overlay whose changes are served as dirty bitmaps",
  .version = "0.1.0",
  .description = "Serves base=PATH (raw or qcow2, never written) through the writable qcow2 v3 "
                 "overlay overlay=PATH, created when missing.  Every write, zero and trim is "
                 "recorded in the persistent bitmaps named by bitmap=, each offered as the "
                 "context qemu:dirty-bitmap:NAME for incremental backups; qemu:allocation-depth "
                 "is 1 for the overlay and 2 or more for the base.  qemu-img can check, inspect "
                 "and commit the overlay.  With --control, the commands "
                 "dirty-bitmap-overlay.checkpoint name=NEW, .checkpoints and .release name=NEW "
                 "freeze an instant as the read-only export @NEW while writers go on.",
  .config_help = "overlay=PATH       the qcow2 overlay (the magic key); created if missing\n"
                 "base=PATH          the base (raw or qcow2); needed to create an overlay over one\n"
                 "bitmap=NAME        a bitmap to record and serve, created if absent (repeatable)\n"
                 "clear=NAME         start bitmap NAME empty: a new backup epoch (repeatable; serves it)\n"
                 "granularity=SIZE   of new bitmaps (default 64K); checked against existing ones\n"
                 "cluster-size=SIZE  of a new overlay (default: the granularity)\n"
                 "size=SIZE          of a new overlay without a base\n"
                 "l2-cache-size=SIZE metadata cache for a qcow2 base (default 32M)",
  .magic_config_key = "overlay",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .config = ovl_config,
  .config_complete = ovl_config_complete,
  .unload = ovl_unload,
  .never_blocks = ovl_never_blocks,
  .dump_plugin = ovl_dump_plugin,
  .list_exports = ovl_list_exports,
  .list_meta_contexts = ovl_list_meta_contexts,
  .open = ovl_open,
  .close = ovl_close,
  .get_size = ovl_get_size,
  .block_size = ovl_block_size,
  .can_write = is_live,
  .can_flush = return_one,
  .can_trim = is_live,
  .can_zero = is_live,
  .can_fua = ovl_can_fua,
  .can_multi_conn = return_one,
  .can_extents = return_one,
  .pread = ovl_pread,
  .pwrite = ovl_pwrite,
  .flush = ovl_flush,
  .trim = ovl_trim,
  .zero = ovl_zero,
  .extents = ovl_extents,
  .meta_extents = ovl_meta_extents,
};

NBDSERVE_REGISTER_PLUGIN(plugin)
