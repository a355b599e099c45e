/* nbdserve - calling through the chain of filters down to the plugin.
 *
 * Each layer has a per-connection context (struct nbdserve_next).  A
 * call on a context runs the filter's callback when it has one (handing
 * it the context below), passes straight down when it has none, and at
 * the plugin applies the documented defaults and emulations.  Capability
 * answers are cached per context, so filters and the core may ask often.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define NOT_ASKED (-2)
#define EMULATION_CHUNK (1024 * 1024)

/* Failures always carry a non-zero errno: the one the callback chose
 * with nbdserve_set_error, else errno, else EIO. */
static int failed(void)
{
  int err = backend_error ? backend_error : errno;
  errno = err ? err : EIO;
  return -1;
}

#define PLUGIN_CALL(ctx, cb, ...)                 \
  (backend_error = 0, errno = 0,                  \
   (ctx)->layer->plugin.cb((ctx)->handle, ##__VA_ARGS__))

/* ---- Contexts ------------------------------------------------------------ */

static struct nbdserve_next *contexts_alloc(void)
{
  struct nbdserve_next *top = NULL, **link = &top;
  for (struct layer *l = top_layer; l; l = l->below) {
    struct nbdserve_next *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL)
      die("out of memory");
    ctx->layer = l;
    ctx->size = NOT_ASKED;
    ctx->can_write = ctx->can_flush = ctx->is_rotational = ctx->can_trim = NOT_ASKED;
    ctx->can_zero = ctx->can_fast_zero = ctx->can_fua = ctx->can_multi_conn = NOT_ASKED;
    ctx->can_cache = ctx->can_extents = NOT_ASKED;
    *link = ctx;
    link = &ctx->below;
  }
  return top;
}

static void contexts_release(struct nbdserve_next *top)
{
  while (top) {
    struct nbdserve_next *below = top->below;
    free(top);
    top = below;
  }
}

struct nbdserve_next *chain_global(void)
{
  static struct nbdserve_next *global;
  static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
  pthread_mutex_lock(&lock);
  if (global == NULL)
    global = contexts_alloc();
  pthread_mutex_unlock(&lock);
  return global;
}

void *nbdserve_next_open(struct nbdserve_next *ctx, int readonly, const char *export_name)
{
  if (ctx->is_open)
    return ctx->handle;
  struct layer *l = ctx->layer;
  void *handle;

  if (l->is_plugin) {
    backend_error = errno = 0;
    handle = l->plugin.open(readonly, export_name);
  }
  else {
    handle = NULL;
    if (l->filter.open) {
      backend_error = errno = 0;
      handle = l->filter.open(ctx->below, readonly, export_name);
      if (handle == NULL) {
        failed();
        return NULL;
      }
    }
    /* The filter did not open the layer below itself: do it for it. */
    if (!ctx->below->is_open && nbdserve_next_open(ctx->below, readonly, export_name) == NULL) {
      int err = errno;
      if (l->filter.open && l->filter.close)
        l->filter.close(handle);
      errno = err;
      return NULL;
    }
    if (!l->filter.open)
      handle = ctx; /* any non-NULL marker */
  }
  if (handle == NULL) {
    failed();
    return NULL;
  }
  ctx->handle = handle;
  ctx->is_open = true;
  return handle;
}

static void close_context(struct nbdserve_next *ctx)
{
  if (!ctx->is_open)
    return;
  struct layer *l = ctx->layer;
  if (l->is_plugin) {
    if (l->plugin.close)
      l->plugin.close(ctx->handle);
  }
  else if (l->filter.open && l->filter.close)
    l->filter.close(ctx->handle);
  ctx->is_open = false;
}

static void close_all(struct nbdserve_next *top)
{
  for (struct nbdserve_next *c = top; c; c = c->below)
    close_context(c);
}

struct nbdserve_next *chain_open(int readonly, const char *export_name)
{
  struct nbdserve_next *top = contexts_alloc();

  if (nbdserve_next_open(top, readonly, export_name) == NULL)
    goto fail;
  /* prepare runs bottom-up: each filter sees a ready layer below it. */
  struct nbdserve_next *stack[64];
  size_t n = 0;
  for (struct nbdserve_next *c = top; c && n < ARRAY_SIZE(stack); c = c->below)
    stack[n++] = c;
  while (n-- > 0) {
    struct nbdserve_next *c = stack[n];
    if (!c->layer->is_plugin && c->layer->filter.prepare) {
      void *h = c->layer->filter.open ? c->handle : NULL;
      backend_error = errno = 0;
      if (c->layer->filter.prepare(c->below, h, readonly) == -1) {
        failed();
        goto fail;
      }
    }
  }
  return top;

fail:;
  int err = errno;
  close_all(top);
  contexts_release(top);
  errno = err;
  return NULL;
}

void chain_close(struct nbdserve_next *top)
{
  for (struct nbdserve_next *c = top; c; c = c->below) {
    if (c->is_open && !c->layer->is_plugin && c->layer->filter.finalize) {
      void *h = c->layer->filter.open ? c->handle : NULL;
      if (c->layer->filter.finalize(c->below, h) == -1)
        nbdserve_error("filter %s: finalize failed", c->layer->name);
    }
  }
  close_all(top);
  contexts_release(top);
}

/* The handle a filter callback receives: NULL for filters without open. */
static void *filter_handle(const struct nbdserve_next *ctx)
{
  return ctx->layer->filter.open ? ctx->handle : NULL;
}

#define CALL_FILTER(ctx, cb, ...)                                        \
  (backend_error = 0, errno = 0,                                         \
   (ctx)->layer->filter.cb((ctx)->below, filter_handle(ctx), ##__VA_ARGS__))

/* ---- Exports and contexts ------------------------------------------------ */

int nbdserve_next_list_exports(struct nbdserve_next *ctx, int readonly, int is_tls,
                               struct nbdserve_exports *exports)
{
  struct layer *l = ctx->layer;
  if (!l->is_plugin) {
    if (!l->filter.list_exports)
      return nbdserve_next_list_exports(ctx->below, readonly, is_tls, exports);
    backend_error = errno = 0;
    return l->filter.list_exports(ctx->below, readonly, is_tls, exports) == -1 ? failed() : 0;
  }
  if (!l->plugin.list_exports)
    return nbdserve_add_export(exports, opt.export_name ? opt.export_name : "", NULL);
  backend_error = errno = 0;
  return l->plugin.list_exports(readonly, is_tls, exports) == -1 ? failed() : 0;
}

const char *nbdserve_next_default_export(struct nbdserve_next *ctx, int readonly, int is_tls)
{
  struct layer *l = ctx->layer;
  if (!l->is_plugin) {
    if (!l->filter.default_export)
      return nbdserve_next_default_export(ctx->below, readonly, is_tls);
    return l->filter.default_export(ctx->below, readonly, is_tls);
  }
  return l->plugin.default_export ? l->plugin.default_export(readonly, is_tls) : NULL;
}

int nbdserve_next_list_meta_contexts(struct nbdserve_next *ctx, const char *export_name,
                                     struct nbdserve_contexts *contexts)
{
  struct layer *l = ctx->layer;
  if (!l->is_plugin) {
    if (!l->filter.list_meta_contexts)
      return nbdserve_next_list_meta_contexts(ctx->below, export_name, contexts);
    backend_error = errno = 0;
    return l->filter.list_meta_contexts(ctx->below, export_name, contexts) == -1 ? failed() : 0;
  }
  if (!l->plugin.list_meta_contexts)
    return 0;
  backend_error = errno = 0;
  return l->plugin.list_meta_contexts(export_name, contexts) == -1 ? failed() : 0;
}

/* ---- Capabilities ---------------------------------------------------------- */

/* Answers are asked once and kept.  Requests of one connection may run
 * at once and ask together: each then gets the same answer from the
 * layer, and the cached value is read and written atomically so that
 * neither sees a torn one. */

int64_t nbdserve_next_get_size(struct nbdserve_next *ctx)
{
  int64_t cached = __atomic_load_n(&ctx->size, __ATOMIC_RELAXED);
  if (cached != NOT_ASKED)
    return cached;
  struct layer *l = ctx->layer;
  int64_t size;
  if (!l->is_plugin)
    size = l->filter.get_size ? CALL_FILTER(ctx, get_size) : nbdserve_next_get_size(ctx->below);
  else
    size = PLUGIN_CALL(ctx, get_size);
  if (size < 0)
    return failed();
  __atomic_store_n(&ctx->size, size, __ATOMIC_RELAXED);
  return size;
}

int nbdserve_next_block_size(struct nbdserve_next *ctx, uint32_t *minimum, uint32_t *preferred,
                             uint32_t *maximum)
{
  if (!ctx->have_block_size) {
    struct layer *l = ctx->layer;
    uint32_t mn = 1, pref = 4096, mx = 32 * 1024 * 1024;
    int r = 0;
    if (!l->is_plugin)
      r = l->filter.block_size ? CALL_FILTER(ctx, block_size, &mn, &pref, &mx)
                               : nbdserve_next_block_size(ctx->below, &mn, &pref, &mx);
    else if (l->plugin.block_size)
      r = PLUGIN_CALL(ctx, block_size, &mn, &pref, &mx);
    if (r == -1)
      return failed();
    ctx->bs_min = mn;
    ctx->bs_pref = pref;
    ctx->bs_max = mx;
    ctx->have_block_size = 1;
  }
  *minimum = ctx->bs_min;
  *preferred = ctx->bs_pref;
  *maximum = ctx->bs_max;
  return 0;
}

/* A capability: filter callback or pass down; at the plugin its
 * callback or DEFAULT_VALUE.  Cached in FIELD. */
#define CAPABILITY(name, field, default_value)                                    \
  int nbdserve_next_##name(struct nbdserve_next *ctx)                              \
  {                                                                                \
    int cached = __atomic_load_n(&ctx->field, __ATOMIC_RELAXED);                   \
    if (cached != NOT_ASKED)                                                       \
      return cached;                                                               \
    struct layer *l = ctx->layer;                                                  \
    int r;                                                                         \
    if (!l->is_plugin)                                                             \
      r = l->filter.name ? CALL_FILTER(ctx, name) : nbdserve_next_##name(ctx->below); \
    else                                                                           \
      r = l->plugin.name ? PLUGIN_CALL(ctx, name) : (default_value);               \
    if (r < 0)                                                                     \
      return failed();                                                             \
    __atomic_store_n(&ctx->field, r, __ATOMIC_RELAXED);                            \
    return r;                                                                      \
  }

CAPABILITY(can_write, can_write, l->plugin.pwrite != NULL)
CAPABILITY(can_flush, can_flush, l->plugin.flush != NULL)
CAPABILITY(is_rotational, is_rotational, 0)
CAPABILITY(can_trim, can_trim, l->plugin.trim != NULL)
CAPABILITY(can_zero, can_zero, 1)
CAPABILITY(can_fast_zero, can_fast_zero, l->plugin.zero != NULL)
CAPABILITY(can_fua, can_fua, l->plugin.flush ? NBDSERVE_FUA_EMULATE : NBDSERVE_FUA_NONE)
CAPABILITY(can_multi_conn, can_multi_conn, 0)
CAPABILITY(can_cache, can_cache, l->plugin.cache ? NBDSERVE_CACHE_NATIVE : NBDSERVE_CACHE_NONE)
CAPABILITY(can_extents, can_extents, l->plugin.extents != NULL)

/* ---- Data ---------------------------------------------------------------- */

/* At the plugin: FUA the plugin cannot do natively becomes a flush. */
static bool fua_by_flush(struct nbdserve_next *ctx, uint32_t *flags)
{
  if (!(*flags & NBDSERVE_FLAG_FUA))
    return false;
  if (nbdserve_next_can_fua(ctx) == NBDSERVE_FUA_NATIVE)
    return false;
  *flags &= ~NBDSERVE_FLAG_FUA;
  return true;
}

static int flush_after(struct nbdserve_next *ctx, int r, bool flush)
{
  if (r == -1)
    return failed();
  if (flush && nbdserve_next_flush(ctx, 0) == -1)
    return -1;
  return 0;
}

int nbdserve_next_pread(struct nbdserve_next *ctx, void *buf, uint32_t count, uint64_t offset,
                        uint32_t flags)
{
  struct layer *l = ctx->layer;
  int r;
  if (!l->is_plugin)
    r = l->filter.pread ? CALL_FILTER(ctx, pread, buf, count, offset, flags)
                        : nbdserve_next_pread(ctx->below, buf, count, offset, flags);
  else
    r = PLUGIN_CALL(ctx, pread, buf, count, offset, flags);
  return r == -1 ? failed() : 0;
}

int nbdserve_next_pwrite(struct nbdserve_next *ctx, const void *buf, uint32_t count,
                         uint64_t offset, uint32_t flags)
{
  struct layer *l = ctx->layer;
  if (!l->is_plugin) {
    int r = l->filter.pwrite ? CALL_FILTER(ctx, pwrite, buf, count, offset, flags)
                             : nbdserve_next_pwrite(ctx->below, buf, count, offset, flags);
    return r == -1 ? failed() : 0;
  }
  if (!l->plugin.pwrite) {
    errno = EROFS;
    return -1;
  }
  bool flush = fua_by_flush(ctx, &flags);
  return flush_after(ctx, PLUGIN_CALL(ctx, pwrite, buf, count, offset, flags), flush);
}

int nbdserve_next_flush(struct nbdserve_next *ctx, uint32_t flags)
{
  struct layer *l = ctx->layer;
  int r;
  if (!l->is_plugin)
    r = l->filter.flush ? CALL_FILTER(ctx, flush, flags) : nbdserve_next_flush(ctx->below, flags);
  else if (!l->plugin.flush)
    r = 0; /* nothing to make durable */
  else
    r = PLUGIN_CALL(ctx, flush, flags);
  return r == -1 ? failed() : 0;
}

int nbdserve_next_trim(struct nbdserve_next *ctx, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct layer *l = ctx->layer;
  if (!l->is_plugin) {
    int r = l->filter.trim ? CALL_FILTER(ctx, trim, count, offset, flags)
                           : nbdserve_next_trim(ctx->below, count, offset, flags);
    return r == -1 ? failed() : 0;
  }
  if (!l->plugin.trim)
    return 0; /* trim is advisory */
  bool flush = fua_by_flush(ctx, &flags);
  return flush_after(ctx, PLUGIN_CALL(ctx, trim, count, offset, flags), flush);
}

/* Zero by writing zeroes, a chunk at a time. */
static int zero_by_writing(struct nbdserve_next *ctx, uint64_t count, uint64_t offset)
{
  static const char zeroes[EMULATION_CHUNK];
  while (count > 0) {
    uint32_t n = (uint32_t) MIN(count, (uint64_t) EMULATION_CHUNK);
    if (PLUGIN_CALL(ctx, pwrite, zeroes, n, offset, 0) == -1)
      return failed();
    count -= n;
    offset += n;
  }
  return 0;
}

int nbdserve_next_zero(struct nbdserve_next *ctx, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct layer *l = ctx->layer;
  if (!l->is_plugin) {
    int r = l->filter.zero ? CALL_FILTER(ctx, zero, count, offset, flags)
                           : nbdserve_next_zero(ctx->below, count, offset, flags);
    return r == -1 ? failed() : 0;
  }
  bool flush = fua_by_flush(ctx, &flags);
  if (!l->plugin.zero) {
    if (flags & NBDSERVE_FLAG_FAST_ZERO) {
      errno = ENOTSUP; /* writing zeroes is not fast */
      return -1;
    }
    if (!l->plugin.pwrite) {
      errno = EROFS;
      return -1;
    }
    return flush_after(ctx, zero_by_writing(ctx, count, offset), flush);
  }
  int r = PLUGIN_CALL(ctx, zero, count, offset, flags);
  int err = backend_error ? backend_error : errno;
  if (r == -1 && !(flags & NBDSERVE_FLAG_FAST_ZERO) && (err == ENOTSUP || err == EOPNOTSUPP) &&
      l->plugin.pwrite)
    r = zero_by_writing(ctx, count, offset); /* no fast way: write zeroes */
  return flush_after(ctx, r, flush);
}

int nbdserve_next_cache(struct nbdserve_next *ctx, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct layer *l = ctx->layer;
  if (!l->is_plugin) {
    int r = l->filter.cache ? CALL_FILTER(ctx, cache, count, offset, flags)
                            : nbdserve_next_cache(ctx->below, count, offset, flags);
    return r == -1 ? failed() : 0;
  }
  int mode = nbdserve_next_can_cache(ctx);
  if (mode == NBDSERVE_CACHE_NATIVE && l->plugin.cache)
    return PLUGIN_CALL(ctx, cache, count, offset, flags) == -1 ? failed() : 0;
  if (mode != NBDSERVE_CACHE_EMULATE)
    return 0;
  /* Emulate: read the range and throw the data away. */
  char *buf = malloc(EMULATION_CHUNK);
  if (buf == NULL)
    return -1;
  int r = 0;
  while (count > 0 && r == 0) {
    uint32_t n = (uint32_t) MIN(count, (uint64_t) EMULATION_CHUNK);
    r = PLUGIN_CALL(ctx, pread, buf, n, offset, 0) == -1 ? failed() : 0;
    count -= n;
    offset += n;
  }
  free(buf);
  return r;
}

int nbdserve_next_extents(struct nbdserve_next *ctx, uint64_t count, uint64_t offset,
                          uint32_t flags, struct nbdserve_extents *extents)
{
  struct layer *l = ctx->layer;
  int r;
  if (!l->is_plugin)
    r = l->filter.extents ? CALL_FILTER(ctx, extents, count, offset, flags, extents)
                          : nbdserve_next_extents(ctx->below, count, offset, flags, extents);
  else if (!l->plugin.extents || nbdserve_next_can_extents(ctx) != 1)
    r = nbdserve_add_extent(extents, offset, count, 0); /* all data */
  else
    r = PLUGIN_CALL(ctx, extents, count, offset, flags, extents);
  return r == -1 ? failed() : 0;
}

int nbdserve_next_meta_extents(struct nbdserve_next *ctx, const char *context, uint64_t count,
                               uint64_t offset, uint32_t flags, struct nbdserve_extents *extents)
{
  struct layer *l = ctx->layer;
  int r;
  if (!l->is_plugin)
    r = l->filter.meta_extents
          ? CALL_FILTER(ctx, meta_extents, context, count, offset, flags, extents)
          : nbdserve_next_meta_extents(ctx->below, context, count, offset, flags, extents);
  else if (!l->plugin.meta_extents) {
    errno = EINVAL;
    nbdserve_error("no layer answers metadata context %s", context);
    return -1;
  }
  else
    r = PLUGIN_CALL(ctx, meta_extents, context, count, offset, flags, extents);
  return r == -1 ? failed() : 0;
}
