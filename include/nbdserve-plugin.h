/* nbdserve - the plugin ABI.
 *
 * A plugin is a shared object that defines one struct nbdserve_plugin
 * and registers it with NBDSERVE_REGISTER_PLUGIN.  Only open, get_size
 * and pread are required; every other callback may be left NULL and the
 * server picks the safe default documented beside it.
 *
 * Every callback that can fail returns -1 (or NULL for open) and sets
 * errno or calls nbdserve_set_error.  Capability callbacks (can_*)
 * return 1/0, or -1 on error.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_PLUGIN_H
#define NBDSERVE_PLUGIN_H

#include "nbdserve-common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bits of nbdserve_plugin.flags. */
/* Every data callback returns quickly without sleeping (no disk or network
 * I/O, no waiting on locks held for long): the server may run such
 * requests directly on the connection's I/O thread instead of handing
 * them to a worker, which saves a thread wake-up per request. */
#define NBDSERVE_PLUGIN_NEVER_BLOCKS (1u << 0)

/* nbdserve_plugin.thread_model left unset (0): SERIALIZE_CONNECTIONS,
 * the plugin default, safe for code that knows nothing of threads.  The
 * filter default differs (NBDSERVE_FILTER_THREAD_MODEL_DEFAULT). */
#define NBDSERVE_PLUGIN_THREAD_MODEL_DEFAULT NBDSERVE_THREAD_MODEL_SERIALIZE_CONNECTIONS

struct nbdserve_plugin {
  /* Set by NBDSERVE_PLUGIN_INIT; lets the server load plugins compiled
   * against an older, shorter struct.  Never set by hand. */
  uint32_t struct_size;
  uint32_t api_version;

  const char *name; /* short name, [a-z0-9_-], required */
  const char *longname; /* one line, optional */
  const char *version; /* optional */
  const char *description; /* a paragraph for --help, optional */
  const char *config_help; /* "key=value  explanation" lines for --help */
  /* A bare parameter on the command line (no '=') is taken as this key,
   * e.g. "file" for `nbdserve file disk.img`. */
  const char *magic_config_key;
  /* NBDSERVE_THREAD_MODEL_*; left unset it is
   * NBDSERVE_PLUGIN_THREAD_MODEL_DEFAULT, SERIALIZE_CONNECTIONS. */
  int thread_model;
  uint32_t flags; /* NBDSERVE_PLUGIN_* */

  /* ---- Life cycle (called on the main thread, before serving) ---- */
  int (*load)(void);
  void (*unload)(void);
  int (*config)(const char *key, const char *value);
  int (*config_complete)(void);
  int (*get_ready)(void); /* after forking into the background */

  /* ---- Exports (handshake) ---- */
  /* Add every export name with nbdserve_add_export.  Default: the single
   * export "" (the default export). */
  int (*list_exports)(int readonly, int is_tls, struct nbdserve_exports *exports);
  /* Canonical name of the default export "", or NULL to keep "". */
  const char *(*default_export)(int readonly, int is_tls);
  /* Metadata contexts besides base:allocation that this plugin answers
   * for EXPORT_NAME (e.g. "qemu:dirty-bitmap:b1").  Default: none. */
  int (*list_meta_contexts)(const char *export_name, struct nbdserve_contexts *contexts);

  /* ---- Connections ---- */
  void *(*open)(int readonly, const char *export_name); /* required */
  void (*close)(void *handle);

  /* ---- Capabilities (asked once per connection, after open) ---- */
  int64_t (*get_size)(void *handle); /* required */
  /* Block size constraints; default 1 / 4096 / 32 MiB. */
  int (*block_size)(void *handle, uint32_t *minimum, uint32_t *preferred, uint32_t *maximum);
  int (*can_write)(void *handle); /* default: pwrite != NULL */
  int (*can_flush)(void *handle); /* default: flush != NULL */
  int (*is_rotational)(void *handle); /* default: 0 */
  int (*can_trim)(void *handle); /* default: trim != NULL */
  int (*can_zero)(void *handle); /* default: 1 (emulated with pwrite if zero is NULL) */
  int (*can_fast_zero)(void *handle); /* default: 1 if zero != NULL */
  int (*can_fua)(void *handle); /* NBDSERVE_FUA_*; default EMULATE if flush, else NONE */
  int (*can_multi_conn)(void *handle); /* default: 0 */
  int (*can_cache)(void *handle); /* NBDSERVE_CACHE_*; default: NATIVE if cache, else NONE */
  int (*can_extents)(void *handle); /* default: extents != NULL */

  /* ---- Data ---- */
  int (*pread)(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags); /* required */
  int (*pwrite)(void *handle, const void *buf, uint32_t count, uint64_t offset, uint32_t flags);
  int (*flush)(void *handle, uint32_t flags);
  int (*trim)(void *handle, uint64_t count, uint64_t offset, uint32_t flags);
  int (*zero)(void *handle, uint64_t count, uint64_t offset, uint32_t flags);
  int (*cache)(void *handle, uint64_t count, uint64_t offset, uint32_t flags);
  /* base:allocation: describe [offset, offset+count) with nbdserve_add_extent
   * using NBDSERVE_EXTENT_HOLE / NBDSERVE_EXTENT_ZERO. */
  int (*extents)(void *handle, uint64_t count, uint64_t offset, uint32_t flags,
                 struct nbdserve_extents *extents);
  /* Any context named by list_meta_contexts; flags are the context's own. */
  int (*meta_extents)(void *handle, const char *context, uint64_t count, uint64_t offset,
                      uint32_t flags, struct nbdserve_extents *extents);

  /* ---- Life cycle, continued ---- */
  /* Whether, with the configuration given, no callback can block: the
   * promise of NBDSERVE_PLUGIN_NEVER_BLOCKS, for a plugin that only knows
   * after config_complete (e.g. a file that turns out to live in RAM).
   * Called at most once, after get_ready, when the filters never block
   * either and --no-inline is not given; returns 1 or 0.  When set, it
   * decides instead of the flag (leave the flag unset then: an older
   * server knows only the flag). */
  int (*never_blocks)(void);

  /* --dump-plugin: prints the plugin's own key=value lines on stdout
   * after the server's.  When parameters follow the plugin name on the
   * command line, config has seen them (config_complete has not run). */
  void (*dump_plugin)(void);

  /* The thread model, for a plugin that learns it only once configured
   * (the sh plugin asks its script).  Called once, right after
   * config_complete; returns an NBDSERVE_THREAD_MODEL_*, which replaces
   * thread_model from then on, or -1 (after logging why) to stop the
   * server.  thread_model still says what --dump-plugin and --help
   * show, before configuration. */
  int (*configured_thread_model)(void);

  /* New fields are appended here only. */
};

/* Fills the version fields; use it as the first initializer:
 *   static struct nbdserve_plugin plugin = { NBDSERVE_PLUGIN_INIT, .name = ... };
 */
#define NBDSERVE_PLUGIN_INIT \
  .struct_size = sizeof(struct nbdserve_plugin), .api_version = NBDSERVE_API_VERSION

/* The symbol the server looks up after dlopen. */
#define NBDSERVE_REGISTER_PLUGIN(plugin)                                        \
  NBDSERVE_EXPORT const struct nbdserve_plugin *nbdserve_plugin_init(void);     \
  NBDSERVE_EXPORT const struct nbdserve_plugin *nbdserve_plugin_init(void)      \
  {                                                                             \
    return &(plugin);                                                           \
  }

#ifdef __cplusplus
}
#endif

#endif /* NBDSERVE_PLUGIN_H */
