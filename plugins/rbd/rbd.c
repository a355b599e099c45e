/* nbdserve rbd plugin: serve a Ceph RBD image through librbd.
 *
 * This file: parameters, the connection to the cluster (made once, in
 * get_ready, after the server has forked: librados starts threads), the
 * image handles, capabilities, and the list of qemu:dirty-bitmap:SNAP
 * contexts (one per snapshot: what changed since it).  Block status is
 * in status.c, the data path in ops.c.
 *
 * The image is opened when the first client asks for it, not at
 * start-up, so that a server started before its image exists (or while
 * it is being restored) serves it as soon as it is there; every
 * connection then shares that one librbd handle (see struct image).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <rados/librados.h>
#include <rbd/features.h>

#include "nbdserve-plugin.h"
#include "rbd.h"

#define DEFAULT_CONF "/etc/ceph/ceph.conf"
static char *pool, *image_name, *namespace, *snapshot;
static char *conf, *client_id, *keyring;
static uint32_t timeout_s;
static char **bitmaps; /* bitmap=, in order */
static size_t nbitmaps;

static rados_t cluster;
static rados_ioctx_t ioctx;
static bool connected;

static pthread_mutex_t images_lock = PTHREAD_MUTEX_INITIALIZER;
static struct image *images[2]; /* [readonly] */

/* ---- Parameters ----------------------------------------------------------- */

static int set_string(char **where, const char *key, const char *value)
{
  if (*value == '\0') {
    nbdserve_error("rbd: %s= must not be empty", key);
    return -1;
  }
  free(*where);
  *where = strdup(value);
  if (*where == NULL) {
    nbdserve_error("rbd: out of memory");
    return -1;
  }
  return 0;
}

/* image=[POOL/[NAMESPACE/]]NAME[@SNAP], as the rbd command writes it. */
static int set_image_spec(const char *value)
{
  char *copy = strdup(value), *at, *slash;
  if (copy == NULL)
    return -1;
  int r = 0;
  if ((at = strchr(copy, '@')) != NULL) {
    *at = '\0';
    r |= set_string(&snapshot, "snapshot (after @)", at + 1);
  }
  char *name = copy;
  if ((slash = strchr(copy, '/')) != NULL) {
    *slash = '\0';
    r |= set_string(&pool, "pool (before /)", copy);
    name = slash + 1;
    if ((slash = strchr(name, '/')) != NULL) {
      *slash = '\0';
      r |= set_string(&namespace, "namespace", name);
      name = slash + 1;
    }
  }
  if (r == 0)
    r = set_string(&image_name, "image", name);
  free(copy);
  return r;
}

static int add_bitmap(const char *value)
{
  char **more = realloc(bitmaps, (nbitmaps + 1) * sizeof *more);
  if (more == NULL)
    return -1;
  bitmaps = more;
  bitmaps[nbitmaps] = NULL;
  if (set_string(&bitmaps[nbitmaps], "bitmap", value) == -1)
    return -1;
  nbitmaps++;
  return 0;
}

static int rbd_config(const char *key, const char *value)
{
  if (strcmp(key, "image") == 0)
    return set_image_spec(value);
  if (strcmp(key, "pool") == 0)
    return set_string(&pool, key, value);
  if (strcmp(key, "namespace") == 0)
    return set_string(&namespace, key, value);
  if (strcmp(key, "snapshot") == 0)
    return set_string(&snapshot, key, value);
  if (strcmp(key, "conf") == 0)
    return set_string(&conf, key, value);
  if (strcmp(key, "id") == 0)
    return set_string(&client_id, key, value);
  if (strcmp(key, "keyring") == 0)
    return set_string(&keyring, key, value);
  if (strcmp(key, "bitmap") == 0)
    return add_bitmap(value);
  if (strcmp(key, "timeout") == 0)
    return nbdserve_parse_uint32("rbd: timeout", value, &timeout_s);
  nbdserve_error("rbd: unknown parameter '%s' (see nbdserve --help rbd)", key);
  return -1;
}

static int rbd_config_complete(void)
{
  if (image_name == NULL) {
    nbdserve_error("rbd: which image? give image=POOL/IMAGE (or pool= and image=)");
    return -1;
  }
  if (pool == NULL) {
    nbdserve_error("rbd: image=%s names no pool: give image=POOL/%s or pool=POOL",
                   image_name, image_name);
    return -1;
  }
  if (timeout_s > 24 * 3600) {
    nbdserve_error("rbd: timeout=%" PRIu32 " is more than a day; give seconds", timeout_s);
    return -1;
  }
  return 0;
}

/* ---- The cluster ---------------------------------------------------------- */

static int set_option(const char *option, const char *value)
{
  int r = rados_conf_set(cluster, option, value);
  if (r < 0)
    nbdserve_error("rbd: cannot set Ceph option %s=%s: %s", option, value, strerror(-r));
  return r;
}

static int set_timeouts(void)
{
  if (timeout_s == 0)
    return 0;
  char s[16];
  snprintf(s, sizeof s, "%" PRIu32, timeout_s);
  /* Operations on OSDs and monitors fail with ETIMEDOUT after this long
   * instead of being retried until the cluster answers; connecting, too. */
  if (set_option("rados_osd_op_timeout", s) < 0 || set_option("rados_mon_op_timeout", s) < 0 ||
      set_option("client_mount_timeout", s) < 0)
    return -1;
  return 0;
}

static void explain_connect_failure(int err)
{
  const char *id = client_id ? client_id : "admin";
  const char *hint = "";
  if (err == EACCES || err == EPERM)
    hint = " (is the key of this client id in the keyring, and does the cluster know it?)";
  else if (err == ETIMEDOUT)
    hint = " (no monitor answered: check the monitor addresses in the configuration)";
  nbdserve_error("rbd: cannot connect to the Ceph cluster of %s as client.%s: %s%s",
                 conf ? conf : DEFAULT_CONF, id, strerror(err), hint);
}

static int connect_cluster(void)
{
  int r = rados_create(&cluster, client_id ? client_id : "admin");
  if (r < 0) {
    nbdserve_error("rbd: rados_create: %s", strerror(-r));
    return -1;
  }
  const char *path = conf ? conf : DEFAULT_CONF;
  r = rados_conf_read_file(cluster, path);
  if (r < 0) {
    nbdserve_error("rbd: cannot read the Ceph configuration %s: %s%s", path, strerror(-r),
                   conf ? "" : " (give conf=FILE)");
    goto fail;
  }
  if ((keyring && set_option("keyring", keyring) < 0) || set_timeouts() < 0)
    goto fail;
  r = rados_connect(cluster);
  if (r < 0) {
    explain_connect_failure(-r);
    goto fail;
  }
  connected = true;
  r = rados_ioctx_create(cluster, pool, &ioctx);
  if (r < 0) {
    nbdserve_error("rbd: pool %s: %s", pool,
                   r == -ENOENT ? "no such pool in this cluster" : strerror(-r));
    goto fail;
  }
  if (namespace)
    rados_ioctx_set_namespace(ioctx, namespace);
  return 0;
fail:
  rados_shutdown(cluster);
  connected = false;
  return -1;
}

static int rbd_get_ready(void)
{
  return connect_cluster();
}

static void image_close(struct image *img)
{
  if (img == NULL)
    return;
  int r = rbd_close(img->rbd);
  if (r < 0)
    nbdserve_error("rbd: closing the image: %s", strerror(-r));
  rbd_status_close(img);
  free(img);
}

static void rbd_unload(void)
{
  rbd_status_stop();
  for (int i = 0; i < 2; i++)
    image_close(images[i]);
  if (connected) {
    rados_ioctx_destroy(ioctx);
    rados_shutdown(cluster);
  }
  free(pool), free(image_name), free(namespace), free(snapshot);
  free(conf), free(client_id), free(keyring);
  for (size_t i = 0; i < nbitmaps; i++)
    free(bitmaps[i]);
  free(bitmaps);
}

/* ---- The image ------------------------------------------------------------ */

const char *rbd_image_label(void)
{
  static __thread char label[512];
  snprintf(label, sizeof label, "%s/%s%s%s%s%s", pool, namespace ? namespace : "",
           namespace ? "/" : "", image_name, snapshot ? "@" : "", snapshot ? snapshot : "");
  return label;
}

static int explain_open_failure(int err, bool readonly)
{
  switch (err) {
  case ENOENT:
    nbdserve_error("rbd: image %s does not exist%s", rbd_image_label(),
                   snapshot ? " (or has no such snapshot)" : "");
    break;
  case EACCES:
  case EPERM:
    nbdserve_error("rbd: client.%s may not open image %s %s: %s",
                   client_id ? client_id : "admin", rbd_image_label(),
                   readonly ? "read-only" : "for writing (try -r)", strerror(err));
    break;
  default:
    nbdserve_error("rbd: cannot open image %s: %s", rbd_image_label(), strerror(err));
  }
  return rbd_report_error("open", 0, 0, err);
}

static struct image *image_open(bool readonly)
{
  struct image *img = calloc(1, sizeof *img);
  if (img == NULL) {
    nbdserve_set_error(ENOMEM);
    return NULL;
  }
  /* A snapshot is always read-only. */
  img->readonly = readonly || snapshot;
  int r = img->readonly ? rbd_open_read_only(ioctx, image_name, &img->rbd, snapshot)
                        : rbd_open(ioctx, image_name, &img->rbd, NULL);
  if (r < 0) {
    nbdserve_set_error(explain_open_failure(-r, img->readonly));
    free(img);
    return NULL;
  }
  rbd_get_features(img->rbd, &img->features);
  /* No flush here: librbd keeps its cache writethrough until the
   * client's first flush (rbd_cache_writethrough_until_flush), which is
   * what protects a client that never flushes.  It is also faster here:
   * an early flush let writes complete from the cache, and the OSD then
   * spent more CPU per byte on what the cache sent it. */
  rbd_linked_image_spec_t parent;
  rbd_snap_spec_t parent_snap;
  r = rbd_get_parent(img->rbd, &parent, &parent_snap);
  img->has_parent = r != -ENOENT;
  if (r == 0) {
    rbd_linked_image_spec_cleanup(&parent);
    rbd_snap_spec_cleanup(&parent_snap);
  }
  rbd_status_open(img);
  nbdserve_debug("rbd: opened %s%s, features 0x%" PRIx64 "%s", rbd_image_label(),
                 img->readonly ? " read-only" : "", img->features,
                 img->has_parent ? ", a clone" : "");
  return img;
}

/* Without images_lock, which image_get holds while librbd opens an
 * image (round trips to the cluster): block status must not wait for
 * that. */
bool rbd_writable_image_open(void)
{
  return __atomic_load_n(&images[0], __ATOMIC_ACQUIRE) != NULL;
}

/* The shared handle of this kind, opened by the first client. */
static struct image *image_get(bool readonly)
{
  readonly = readonly || snapshot;
  pthread_mutex_lock(&images_lock);
  if (images[readonly] == NULL)
    __atomic_store_n(&images[readonly], image_open(readonly), __ATOMIC_RELEASE);
  struct image *img = images[readonly];
  pthread_mutex_unlock(&images_lock);
  return img;
}

/* ---- Connections ------------------------------------------------------------ */

static void *rbd_open_connection(int readonly, const char *export_name)
{
  (void) export_name;
  struct image *img = image_get(readonly);
  if (img == NULL)
    return NULL;
  struct handle *h = calloc(1, sizeof *h);
  if (h == NULL) {
    nbdserve_set_error(ENOMEM);
    return NULL;
  }
  h->img = img;
  h->readonly = readonly || img->readonly;
  pthread_mutex_init(&h->lock, NULL);
  pthread_cond_init(&h->changed, NULL);
  return h;
}

static void rbd_close_connection(void *handle)
{
  struct handle *h = handle;
  rbd_ops_drain(h);
  pthread_mutex_destroy(&h->lock);
  pthread_cond_destroy(&h->changed);
  free(h);
}

static int64_t rbd_get_export_size(void *handle)
{
  struct handle *h = handle;
  uint64_t size;
  int r = rbd_get_size(h->img->rbd, &size);
  if (r < 0) {
    nbdserve_error("rbd: size of %s: %s", rbd_image_label(), strerror(-r));
    nbdserve_set_error(EIO);
    return -1;
  }
  return (int64_t) size;
}

static int rbd_block_size(void *handle, uint32_t *minimum, uint32_t *preferred,
                          uint32_t *maximum)
{
  (void) handle;
  *minimum = 1;
  /* Below 4 KiB the OSD's store reads and rewrites around a write.  The
   * object size would be a worse answer: clients (nbdcopy) then move
   * 4 MiB per request, which made the OSD spend 2-6x the CPU on each
   * byte written and reads stall while a whole object crossed three
   * copies at once. */
  *preferred = 4096;
  *maximum = 32 << 20;
  return 0;
}

static int rbd_can_write(void *handle)
{
  return !((struct handle *) handle)->readonly;
}

static int rbd_can_flush(void *handle)
{
  (void) handle;
  return 1;
}

static int rbd_can_fua(void *handle)
{
  (void) handle;
  return NBDSERVE_FUA_NATIVE;
}

static int rbd_can_fast_zero(void *handle)
{
  (void) handle;
  return 1;
}

/* See "Several connections" in rbd.md. */
static int rbd_can_multi_conn(void *handle)
{
  struct handle *h = handle;
  return h->readonly || !(h->img->features & RBD_FEATURE_EXCLUSIVE_LOCK);
}

/* ---- Data --------------------------------------------------------------------- */

static int rbd_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  return rbd_ops_pread(handle, buf, count, offset);
}

static int rbd_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset,
                      uint32_t flags)
{
  return rbd_ops_pwrite(handle, buf, count, offset, flags);
}

static int rbd_flush_request(void *handle, uint32_t flags)
{
  (void) flags;
  return rbd_ops_flush(handle);
}

static int rbd_trim(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  return rbd_ops_trim(handle, count, offset, flags);
}

/* write_zeroes is a request to the OSDs that sends no data: fast, unless
 * the image is a clone (zeroing over the parent's data copies the
 * objects up first) or the client wants the range to stay allocated
 * (then the OSDs write the zeroes out). */
static int rbd_zero(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  if ((flags & NBDSERVE_FLAG_FAST_ZERO) &&
      (h->img->has_parent || !(flags & NBDSERVE_FLAG_MAY_TRIM))) {
    nbdserve_set_error(ENOTSUP);
    return -1;
  }
  return rbd_ops_zero(h, count, offset, flags);
}

static bool wanted_bitmap(const char *snap)
{
  if (nbitmaps == 0)
    return true;
  for (size_t i = 0; i < nbitmaps; i++)
    if (strcmp(bitmaps[i], snap) == 0)
      return true;
  return false;
}

/* A handle to list snapshots with: one already open, else a read-only
 * one (which a key without write caps may open too). */
static struct image *image_for_listing(void)
{
  pthread_mutex_lock(&images_lock);
  struct image *img = images[0] ? images[0] : images[1];
  pthread_mutex_unlock(&images_lock);
  return img ? img : image_get(true);
}

/* One context per snapshot, as the cluster knows them now. */
static int rbd_list_meta_contexts(const char *export_name, struct nbdserve_contexts *contexts)
{
  (void) export_name;
  struct image *img = image_for_listing();
  if (img == NULL)
    return 0; /* the open that follows says why */
  int max = 64, r;
  rbd_snap_info_t *snaps = NULL;
  for (;;) {
    rbd_snap_info_t *more = realloc(snaps, (size_t) max * sizeof *snaps);
    if (more == NULL) {
      free(snaps);
      nbdserve_set_error(ENOMEM);
      return -1;
    }
    snaps = more;
    r = rbd_snap_list(img->rbd, snaps, &max);
    if (r != -ERANGE)
      break;
  }
  if (r < 0) {
    free(snaps);
    nbdserve_error("rbd: listing the snapshots of %s: %s", rbd_image_label(), strerror(-r));
    return 0;
  }
  int ret = 0;
  for (int i = 0; i < r && ret == 0; i++) {
    if (!wanted_bitmap(snaps[i].name))
      continue;
    size_t n = strlen(RBD_BITMAP_PREFIX) + strlen(snaps[i].name) + 1;
    char *name = malloc(n);
    if (name == NULL) {
      ret = -1;
      break;
    }
    snprintf(name, n, "%s%s", RBD_BITMAP_PREFIX, snaps[i].name);
    ret = nbdserve_add_context(contexts, name);
    free(name);
  }
  rbd_snap_list_end(snaps);
  free(snaps);
  return ret;
}

/* ---- Errors --------------------------------------------------------------------- */

/* The failure last logged (0: none since the last success).  Clients
 * retry, and a cluster that went away fails every request: one message
 * for a run of them, one when requests succeed again. */
static int last_logged;

int rbd_report_error(const char *what, uint64_t count, uint64_t offset, int err)
{
  int before = __atomic_exchange_n(&last_logged, err, __ATOMIC_RELAXED);
  if (before != err) {
    const char *why = "";
    if (err == ETIMEDOUT)
      why = " (the cluster did not answer within timeout=)";
    else if (err == ESHUTDOWN || err == EBADF)
      why = " (this client was blocklisted by the cluster)";
    nbdserve_error("rbd: %s of %" PRIu64 " bytes at %" PRIu64 " on %s failed: %s%s; "
                   "further failures like it are not logged", what, count, offset,
                   rbd_image_label(), strerror(err), why);
  }
  else
    nbdserve_debug("rbd: %s at %" PRIu64 ": %s", what, offset, strerror(err));
  switch (err) {
  case EROFS:
  case EACCES:
  case EPERM:
    return EPERM;
  case ENOSPC:
  case EDQUOT:
    return ENOSPC;
  case EINVAL:
  case ENOMEM:
  case ENOENT:
    return err == ENOENT ? ENOENT : err;
  default:
    return EIO; /* ETIMEDOUT, a blocklisted client, anything else */
  }
}

void rbd_report_success(void)
{
  if (__atomic_load_n(&last_logged, __ATOMIC_RELAXED) != 0 &&
      __atomic_exchange_n(&last_logged, 0, __ATOMIC_RELAXED) != 0)
    nbdserve_error("rbd: requests on %s succeed again", rbd_image_label());
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "rbd",
  .longname = "serve a Ceph RBD image (librbd), with snapshot differences as dirty bitmaps",
  .version = "1.0.0",
  .description = "Serves one RBD image of a Ceph cluster. Every connection of the server "
                 "shares one librbd handle; reads and writes are librbd's asynchronous "
                 "calls, and wait without holding a thread. Each snapshot of the image is "
                 "offered as the context qemu:dirty-bitmap:SNAP: what changed since it.",
  .config_help =
    "image=[POOL/[NAMESPACE/]]IMAGE[@SNAP]  the image (the magic key)\n"
    "pool=POOL        its pool (when image= names none)\n"
    "namespace=NS     its RADOS namespace (default: none)\n"
    "snapshot=SNAP    serve this snapshot, read-only\n"
    "conf=FILE        Ceph configuration (default /etc/ceph/ceph.conf)\n"
    "id=ID            client id: client.ID (default admin)\n"
    "keyring=FILE     keyring with that client's key (default: from conf)\n"
    "timeout=SECONDS  fail Ceph operations that take longer (default 0: retry forever)\n"
    "bitmap=SNAP      offer qemu:dirty-bitmap:SNAP only for these snapshots (repeatable)",
  .magic_config_key = "image",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .config = rbd_config,
  .config_complete = rbd_config_complete,
  .get_ready = rbd_get_ready,
  .unload = rbd_unload,
  .list_meta_contexts = rbd_list_meta_contexts,
  .open = rbd_open_connection,
  .close = rbd_close_connection,
  .get_size = rbd_get_export_size,
  .block_size = rbd_block_size,
  .can_write = rbd_can_write,
  .can_flush = rbd_can_flush,
  .can_fua = rbd_can_fua,
  .can_fast_zero = rbd_can_fast_zero,
  .can_multi_conn = rbd_can_multi_conn,
  .pread = rbd_pread,
  .pwrite = rbd_pwrite,
  .flush = rbd_flush_request,
  .trim = rbd_trim,
  .zero = rbd_zero,
  .extents = rbd_extents,
  .meta_extents = rbd_meta_extents,
};

NBDSERVE_REGISTER_PLUGIN(plugin)
