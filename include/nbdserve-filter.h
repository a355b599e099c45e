/* nbdserve - the filter ABI.
 *
 * A filter sits between the server core and the plugin (or the next
 * filter).  Each callback receives NEXT, the rest of the chain below the
 * filter for this connection, and calls down through the
 * nbdserve_next_* functions as often as it likes.  A callback left NULL
 * passes the call straight down.
 *
 * Chains are given outermost first: `--filter=a --filter=b plugin` sends
 * every request through a, then b, then the plugin.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_FILTER_H
#define NBDSERVE_FILTER_H

#include "nbdserve-common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The layer below a filter on one connection (or, outside a connection,
 * for list_exports and list_meta_contexts). */
struct nbdserve_next;

/* nbdserve_filter.thread_model left unset (0): PARALLEL, the filter
 * default, since most filters keep no state a second request could
 * disturb.  It is 0, the value of NBDSERVE_THREAD_MODEL_SERIALIZE_CONNECTIONS,
 * because every filter built so far that sets nothing has 0 there and
 * means PARALLEL; so a filter cannot ask for SERIALIZE_CONNECTIONS, and
 * one that needs the strictest model it can have uses
 * SERIALIZE_ALL_REQUESTS. */
#define NBDSERVE_FILTER_THREAD_MODEL_DEFAULT 0

/* Bits of nbdserve_filter.flags: as NBDSERVE_PLUGIN_NEVER_BLOCKS. */
#define NBDSERVE_FILTER_NEVER_BLOCKS (1u << 0)

struct nbdserve_filter {
  uint32_t struct_size; /* set by NBDSERVE_FILTER_INIT */
  uint32_t api_version;

  const char *name;
  const char *longname;
  const char *version;
  const char *description;
  const char *config_help;
  /* The most parallel thread model this filter can stand; the server
   * uses the most restrictive model of the whole chain.  Left unset it
   * is NBDSERVE_FILTER_THREAD_MODEL_DEFAULT: PARALLEL, the filter
   * default (a plugin's unset value is the strictest model instead). */
  int thread_model;
  uint32_t flags;

  /* ---- Life cycle ---- */
  int (*load)(void);
  void (*unload)(void);
  /* Each key=value goes to the outermost filter first.  Return 1 if the
   * filter consumed it, 0 to pass it down the chain, -1 on error. */
  int (*config)(const char *key, const char *value);
  int (*config_complete)(void); /* called innermost (plugin) first */
  int (*get_ready)(void);

  /* ---- Exports and contexts ---- */
  int (*list_exports)(struct nbdserve_next *next, int readonly, int is_tls,
                      struct nbdserve_exports *exports);
  const char *(*default_export)(struct nbdserve_next *next, int readonly, int is_tls);
  int (*list_meta_contexts)(struct nbdserve_next *next, const char *export_name,
                            struct nbdserve_contexts *contexts);

  /* ---- Connections ----
   * open may call nbdserve_next_open to open the layer below with other
   * arguments (e.g. forcing read-only); if it does not, the server opens
   * the layer below with the same arguments once open has returned, so
   * open itself must not call down other than through nbdserve_next_open.  The
   * returned handle is passed back to every other callback; return NULL
   * on error.  A filter with no per-connection state may leave open NULL. */
  void *(*open)(struct nbdserve_next *next, int readonly, const char *export_name);
  /* Called after the whole chain is open: a place to ask the layer below
   * about its size and capabilities. */
  int (*prepare)(struct nbdserve_next *next, void *handle, int readonly);
  /* Called before the layer below is closed. */
  int (*finalize)(struct nbdserve_next *next, void *handle);
  void (*close)(void *handle);

  /* ---- Capabilities ---- */
  int64_t (*get_size)(struct nbdserve_next *next, void *handle);
  int (*block_size)(struct nbdserve_next *next, void *handle,
                    uint32_t *minimum, uint32_t *preferred, uint32_t *maximum);
  int (*can_write)(struct nbdserve_next *next, void *handle);
  int (*can_flush)(struct nbdserve_next *next, void *handle);
  int (*is_rotational)(struct nbdserve_next *next, void *handle);
  int (*can_trim)(struct nbdserve_next *next, void *handle);
  int (*can_zero)(struct nbdserve_next *next, void *handle);
  int (*can_fast_zero)(struct nbdserve_next *next, void *handle);
  int (*can_fua)(struct nbdserve_next *next, void *handle);
  int (*can_multi_conn)(struct nbdserve_next *next, void *handle);
  int (*can_cache)(struct nbdserve_next *next, void *handle);
  int (*can_extents)(struct nbdserve_next *next, void *handle);

  /* ---- Data ---- */
  int (*pread)(struct nbdserve_next *next, void *handle,
               void *buf, uint32_t count, uint64_t offset, uint32_t flags);
  int (*pwrite)(struct nbdserve_next *next, void *handle,
                const void *buf, uint32_t count, uint64_t offset, uint32_t flags);
  int (*flush)(struct nbdserve_next *next, void *handle, uint32_t flags);
  int (*trim)(struct nbdserve_next *next, void *handle,
              uint64_t count, uint64_t offset, uint32_t flags);
  int (*zero)(struct nbdserve_next *next, void *handle,
              uint64_t count, uint64_t offset, uint32_t flags);
  int (*cache)(struct nbdserve_next *next, void *handle,
               uint64_t count, uint64_t offset, uint32_t flags);
  int (*extents)(struct nbdserve_next *next, void *handle,
                 uint64_t count, uint64_t offset, uint32_t flags,
                 struct nbdserve_extents *extents);
  int (*meta_extents)(struct nbdserve_next *next, void *handle, const char *context,
                      uint64_t count, uint64_t offset, uint32_t flags,
                      struct nbdserve_extents *extents);

  /* ---- Life cycle, continued ---- */
  /* As the plugin's never_blocks: whether, configured as it is, no
   * callback of this filter can block (it then decides instead of
   * NBDSERVE_FILTER_NEVER_BLOCKS).  A filter that waits only through
   * nbdserve_retry_after / nbdserve_retry_when never blocks. */
  int (*never_blocks)(void);

  /* New fields are appended here only. */
};

#define NBDSERVE_FILTER_INIT \
  .struct_size = sizeof(struct nbdserve_filter), .api_version = NBDSERVE_API_VERSION

#define NBDSERVE_REGISTER_FILTER(filter)                                        \
  NBDSERVE_EXPORT const struct nbdserve_filter *nbdserve_filter_init(void);     \
  NBDSERVE_EXPORT const struct nbdserve_filter *nbdserve_filter_init(void)      \
  {                                                                             \
    return &(filter);                                                           \
  }

/* ---- Calling the layer below ----
 * Same arguments and results as the plugin callbacks of the same name.
 * The capability answers are computed once per connection and cached,
 * so calling them often is cheap. */
extern void *nbdserve_next_open(struct nbdserve_next *next, int readonly, const char *export_name);
extern int nbdserve_next_list_exports(struct nbdserve_next *next, int readonly, int is_tls,
                                      struct nbdserve_exports *exports);
extern const char *nbdserve_next_default_export(struct nbdserve_next *next, int readonly, int is_tls);
extern int nbdserve_next_list_meta_contexts(struct nbdserve_next *next, const char *export_name,
                                            struct nbdserve_contexts *contexts);
extern int64_t nbdserve_next_get_size(struct nbdserve_next *next);
extern int nbdserve_next_block_size(struct nbdserve_next *next, uint32_t *minimum,
                                    uint32_t *preferred, uint32_t *maximum);
extern int nbdserve_next_can_write(struct nbdserve_next *next);
extern int nbdserve_next_can_flush(struct nbdserve_next *next);
extern int nbdserve_next_is_rotational(struct nbdserve_next *next);
extern int nbdserve_next_can_trim(struct nbdserve_next *next);
extern int nbdserve_next_can_zero(struct nbdserve_next *next);
extern int nbdserve_next_can_fast_zero(struct nbdserve_next *next);
extern int nbdserve_next_can_fua(struct nbdserve_next *next);
extern int nbdserve_next_can_multi_conn(struct nbdserve_next *next);
extern int nbdserve_next_can_cache(struct nbdserve_next *next);
extern int nbdserve_next_can_extents(struct nbdserve_next *next);
extern int nbdserve_next_pread(struct nbdserve_next *next, void *buf, uint32_t count,
                               uint64_t offset, uint32_t flags);
extern int nbdserve_next_pwrite(struct nbdserve_next *next, const void *buf, uint32_t count,
                                uint64_t offset, uint32_t flags);
extern int nbdserve_next_flush(struct nbdserve_next *next, uint32_t flags);
extern int nbdserve_next_trim(struct nbdserve_next *next, uint64_t count, uint64_t offset,
                              uint32_t flags);
extern int nbdserve_next_zero(struct nbdserve_next *next, uint64_t count, uint64_t offset,
                              uint32_t flags);
extern int nbdserve_next_cache(struct nbdserve_next *next, uint64_t count, uint64_t offset,
                               uint32_t flags);
extern int nbdserve_next_extents(struct nbdserve_next *next, uint64_t count, uint64_t offset,
                                 uint32_t flags, struct nbdserve_extents *extents);
extern int nbdserve_next_meta_extents(struct nbdserve_next *next, const char *context,
                                      uint64_t count, uint64_t offset, uint32_t flags,
                                      struct nbdserve_extents *extents);

/* A fresh extents list for [offset, offset+count) that a filter fills by
 * calling down, then reads back; free it with nbdserve_extents_free. */
extern struct nbdserve_extents *nbdserve_extents_new(uint64_t offset, uint64_t count,
                                                     uint32_t flags);
extern void nbdserve_extents_free(struct nbdserve_extents *extents);
extern size_t nbdserve_extents_count(const struct nbdserve_extents *extents);
extern void nbdserve_extents_get(const struct nbdserve_extents *extents, size_t i,
                                 uint64_t *offset, uint64_t *length, uint64_t *flags);

/* An export list a filter fills by calling nbdserve_next_list_exports,
 * then reads back (e.g. to pass on only some of the exports).  Out of
 * memory stops the server, as everywhere in it: never NULL. */
extern struct nbdserve_exports *nbdserve_exports_new(void);
extern void nbdserve_exports_free(struct nbdserve_exports *exports);
extern size_t nbdserve_exports_count(const struct nbdserve_exports *exports);
extern const char *nbdserve_exports_name(const struct nbdserve_exports *exports, size_t i);
/* NULL when the export has no description. */
extern const char *nbdserve_exports_description(const struct nbdserve_exports *exports,
                                                size_t i);

#ifdef __cplusplus
}
#endif

#endif /* NBDSERVE_FILTER_H */
