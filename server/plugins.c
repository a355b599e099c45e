/* nbdserve - finding, loading and checking plugins and filters, and
 * routing the configuration down the chain.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#ifndef PLUGINDIR
#define PLUGINDIR "/usr/local/lib/nbdserve/plugins"
#endif
#ifndef FILTERDIR
#define FILTERDIR "/usr/local/lib/nbdserve/filters"
#endif

struct layer *top_layer;
static struct layer *plugin_layer;
/* The layer whose set-up callback runs now (see chain_calling_layer).
 * Main thread only: those callbacks all run there, before serving. */
static struct layer *calling;

const char *chain_calling_layer(void)
{
  return calling ? calling->name : NULL;
}

static bool is_path(const char *name)
{
  size_t len = strlen(name);
  return strchr(name, '/') != NULL || (len > 3 && strcmp(name + len - 3, ".so") == 0);
}

bool layer_short_name_valid(const char *name)
{
  if (name == NULL || name[0] == '\0')
    return false;
  for (const char *p = name; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_' || *p == '-'))
      return false;
  return true;
}

static const char *kind_name(bool is_plugin)
{
  return is_plugin ? "plugin" : "filter";
}

char *layer_build_dir(void)
{
  char path[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", path, sizeof path - 1);
  if (n <= 0)
    return NULL;
  path[n] = '\0';
  char *slash = strrchr(path, '/');
  if (slash)
    *slash = '\0';
  return strdup(path);
}

const char *layer_installed_dir(bool is_plugin)
{
  return is_plugin ? PLUGINDIR : FILTERDIR;
}

char *layer_build_path(const char *build_dir, const char *name, bool is_plugin)
{
  char *path;
  const char *kind = kind_name(is_plugin);
  if (asprintf(&path, "%s/%ss/%s/nbdserve-%s-%s.so", build_dir, kind, name, name, kind) < 0)
    die("out of memory");
  return path;
}

char *layer_installed_path(const char *name, bool is_plugin)
{
  char *path;
  if (asprintf(&path, "%s/nbdserve-%s-%s.so", layer_installed_dir(is_plugin), name,
               kind_name(is_plugin)) < 0)
    die("out of memory");
  return path;
}

/* Where the .so for NAME lives: a path as given, the build tree next to
 * the binary, or the installed directory (the order --list-plugins
 * follows too). */
static char *find_object(const char *name, bool is_plugin)
{
  if (is_path(name))
    return strdup(name);
  if (!layer_short_name_valid(name))
    die("%s name '%s' is not valid (use a short name such as 'memory' or a path to a .so)",
        kind_name(is_plugin), name);
  char *dir = layer_build_dir();
  if (dir) {
    char *path = layer_build_path(dir, name, is_plugin);
    free(dir);
    if (access(path, R_OK) == 0)
      return path;
    free(path);
  }
  return layer_installed_path(name, is_plugin);
}

/* Say why a file cannot be used, into WHY (LAYER_WHY_MAX bytes): the
 * server dies with it, --list-plugins warns with it. */
static bool NBDSERVE_PRINTF(2, 3) refuse(char *why, const char *fmt, ...)
{
  va_list args;
  va_start(args, fmt);
  vsnprintf(why, LAYER_WHY_MAX, fmt, args);
  va_end(args);
  return false;
}

/* The largest struct_size believed: the structs grow by a few pointers
 * a release, so anything near this is a stray value, not a struct. */
#define MAX_STRUCT_SIZE 65536

/* Copy a registered struct of SIZE bytes (as compiled) into DEST of
 * OUR_SIZE bytes.  An older, shorter struct is zero-extended: every
 * field it lacks reads as "not set", the default.  A newer, longer one
 * is accepted only when its fields past OUR_SIZE are all zero, i.e.
 * unset: a field this server does not know, set, asks for behaviour the
 * server would silently not give, so such a plugin is refused. */
static bool copy_struct(void *dest, size_t our_size, const void *src, uint32_t size,
                        size_t min_size, const char *what, const char *path, char *why)
{
  if (size < min_size)
    return refuse(why, "%s %s: its struct is %u bytes, too small to be an nbdserve %s "
                  "(was it built against these headers?)", what, path, size, what);
  if (size > MAX_STRUCT_SIZE)
    return refuse(why, "%s %s: its struct claims %u bytes, more than any nbdserve %s can "
                  "be (is struct_size set by NBDSERVE_%s_INIT?)", what, path, size, what,
                  strcmp(what, "plugin") == 0 ? "PLUGIN" : "FILTER");
  if (size > our_size) {
    const unsigned char *tail = (const unsigned char *) src + our_size;
    for (size_t i = 0; i < size - our_size; i++)
      if (tail[i] != 0)
        return refuse(why, "%s %s: its struct is %u bytes, built against newer headers "
                      "than this server's %zu-byte struct, and sets a field this server "
                      "does not know (byte %zu is not zero): upgrade the server, or leave "
                      "that field unset", what, path, size, our_size, our_size + i);
  }
  memset(dest, 0, our_size);
  memcpy(dest, src, MIN((size_t) size, our_size));
  return true;
}

/* The server speaks version NBDSERVE_API_VERSION only; say which side is
 * behind, since the fix differs (upgrade the server, or rebuild). */
static bool api_version_ok(uint32_t version, const char *what, const char *path, char *why)
{
  if (version == NBDSERVE_API_VERSION)
    return true;
  if (version > NBDSERVE_API_VERSION)
    return refuse(why, "%s %s was built for ABI version %u, newer than this server, which "
                  "speaks version %d: upgrade the server", what, path, version,
                  NBDSERVE_API_VERSION);
  return refuse(why, "%s %s was built for ABI version %u, this server speaks version %d "
                "(is api_version set by NBDSERVE_%s_INIT?)", what, path, version,
                NBDSERVE_API_VERSION, strcmp(what, "plugin") == 0 ? "PLUGIN" : "FILTER");
}

/* The thread model a filter stands: its own unset value,
 * NBDSERVE_FILTER_THREAD_MODEL_DEFAULT (0, as every filter compiled so
 * far leaves it), is PARALLEL, while for plugins 0 is the strictest
 * model. */
static int filter_thread_model(const struct nbdserve_filter *f)
{
  return f->thread_model == NBDSERVE_FILTER_THREAD_MODEL_DEFAULT
    ? NBDSERVE_THREAD_MODEL_PARALLEL : f->thread_model;
}

/* Code anybody may replace must not run inside the server: refuse a
 * plugin or filter that others may write to, or whose directory they may
 * write to (and so swap the file).  Missing files are dlopen's to report. */
static bool not_world_writable(const char *kind, const char *filename, char *why)
{
  char *real = realpath(filename, NULL);
  if (real == NULL)
    return true;
  bool fine = true;
  struct stat st;
  char *dir = strdup(real);
  if (dir == NULL)
    die("out of memory");
  char *slash = strrchr(dir, '/');
  if (slash == dir)
    dir[1] = '\0'; /* the root directory */
  else if (slash)
    *slash = '\0';
  if (stat(real, &st) == 0 && (st.st_mode & S_IWOTH))
    fine = refuse(why, "refusing to load %s %s: anybody may write to it (chmod o-w)",
                  kind, real);
  else if (stat(dir, &st) == 0 && (st.st_mode & S_IWOTH))
    fine = refuse(why, "refusing to load %s %s: anybody may write to its directory %s",
                  kind, real, dir);
  free(dir);
  free(real);
  return fine;
}

/* The registration of the object L->dl, checked and copied into L, without
 * calling anything in it but its registration function. */
static bool read_registration(struct layer *l, char *why)
{
  const char *kind = kind_name(l->is_plugin);
  const char *symbol = l->is_plugin ? "nbdserve_plugin_init" : "nbdserve_filter_init";
  void *init = dlsym(l->dl, symbol);
  if (init == NULL)
    return refuse(why, "%s is not an nbdserve %s: it has no %s symbol (use "
                  "NBDSERVE_REGISTER_%s)", l->filename, kind, symbol,
                  l->is_plugin ? "PLUGIN" : "FILTER");

  if (l->is_plugin) {
    const struct nbdserve_plugin *p = ((const struct nbdserve_plugin *(*) (void)) init)();
    if (p == NULL)
      return refuse(why, "plugin %s: registration returned nothing", l->filename);
    if (!api_version_ok(p->api_version, kind, l->filename, why) ||
        !copy_struct(&l->plugin, sizeof l->plugin, p, p->struct_size,
                     offsetof(struct nbdserve_plugin, load), kind, l->filename, why))
      return false;
    if (!layer_short_name_valid(l->plugin.name))
      return refuse(why, "plugin %s: missing or invalid name", l->filename);
    if (!l->plugin.open || !l->plugin.get_size || !l->plugin.pread)
      return refuse(why, "plugin %s: open, get_size and pread are required", l->plugin.name);
    if (l->plugin.thread_model < NBDSERVE_THREAD_MODEL_SERIALIZE_CONNECTIONS ||
        l->plugin.thread_model > NBDSERVE_THREAD_MODEL_PARALLEL)
      return refuse(why, "plugin %s: unknown thread model %d", l->plugin.name,
                    l->plugin.thread_model);
    l->name = l->plugin.name;
  }
  else {
    const struct nbdserve_filter *f = ((const struct nbdserve_filter *(*) (void)) init)();
    if (f == NULL)
      return refuse(why, "filter %s: registration returned nothing", l->filename);
    if (!api_version_ok(f->api_version, kind, l->filename, why) ||
        !copy_struct(&l->filter, sizeof l->filter, f, f->struct_size,
                     offsetof(struct nbdserve_filter, load), kind, l->filename, why))
      return false;
    if (!layer_short_name_valid(l->filter.name))
      return refuse(why, "filter %s: missing or invalid name", l->filename);
    if (l->filter.thread_model < 0 || l->filter.thread_model > NBDSERVE_THREAD_MODEL_PARALLEL)
      return refuse(why, "filter %s: unknown thread model %d", l->filter.name,
                    l->filter.thread_model);
    l->name = l->filter.name;
  }
  return true;
}

static struct layer *load_layer(const char *name, bool is_plugin)
{
  const char *kind = kind_name(is_plugin);
  char why[LAYER_WHY_MAX];
  struct layer *l = calloc(1, sizeof *l);
  if (l == NULL)
    die("out of memory");
  l->is_plugin = is_plugin;
  l->filename = find_object(name, is_plugin);
  if (!not_world_writable(kind, l->filename, why))
    die("%s", why);
  l->dl = dlopen(l->filename, RTLD_NOW | RTLD_LOCAL);
  if (l->dl == NULL) {
    if (!is_path(name) && access(l->filename, F_OK) != 0)
      die("there is no %s called '%s' (looked for %s)", kind, name, l->filename);
    die("cannot load %s %s: %s", kind, l->filename, dlerror());
  }
  if (!read_registration(l, why))
    die("%s", why);

  int (*load)(void) = is_plugin ? l->plugin.load : l->filter.load;
  calling = l;
  if (load && load() == -1)
    die("%s %s: load failed", kind, l->name);
  calling = NULL;
  return l;
}

static char *strdup_or_null(const char *s)
{
  char *copy = s ? strdup(s) : NULL;
  if (s && copy == NULL)
    die("out of memory");
  return copy;
}

bool layer_summarize(const char *path, bool is_plugin, struct layer_summary *summary,
                     char *why)
{
  struct layer l = { .is_plugin = is_plugin, .filename = (char *) path };
  if (!not_world_writable(kind_name(is_plugin), path, why))
    return false;
  l.dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (l.dl == NULL)
    return refuse(why, "cannot load %s %s: %s", kind_name(is_plugin), path, dlerror());
  bool fine = read_registration(&l, why);
  if (fine) {
    /* The strings live in the object: copy them before it goes. */
    summary->name = strdup_or_null(l.name);
    summary->longname = strdup_or_null(is_plugin ? l.plugin.longname : l.filter.longname);
    summary->version = strdup_or_null(is_plugin ? l.plugin.version : l.filter.version);
  }
  dlclose(l.dl);
  return fine;
}

void layer_summary_free(struct layer_summary *summary)
{
  free(summary->name);
  free(summary->longname);
  free(summary->version);
}

void load_chain(const char *plugin, const char *const *filters, size_t nfilters)
{
  struct layer **link = &top_layer;
  for (size_t i = 0; i < nfilters; i++) {
    struct layer *l = load_layer(filters[i], false);
    l->index = (unsigned) i;
    *link = l;
    link = &l->below;
  }
  plugin_layer = load_layer(plugin, true);
  plugin_layer->index = (unsigned) nfilters;
  *link = plugin_layer;
}

void unload_chain(void)
{
  struct layer *l = top_layer;
  while (l) {
    struct layer *below = l->below;
    if (l->is_plugin && l->plugin.unload)
      l->plugin.unload();
    else if (!l->is_plugin && l->filter.unload)
      l->filter.unload();
    /* Not dlclose'd: threads of the plugin's libraries may still run
     * destructors, and the process is about to exit anyway. */
    free(l->filename);
    free(l);
    l = below;
  }
  top_layer = plugin_layer = NULL;
  /* Strings kept for callbacks outside any connection live until every
   * unload callback has returned. */
  global_strings_free();
}

int chain_config(const char *key, const char *value)
{
  struct nbdserve_plugin *p = &plugin_layer->plugin;
  if (key == NULL) {
    if (p->magic_config_key == NULL) {
      nbdserve_error("plugin %s takes no bare parameters: use key=value ('%s')", p->name, value);
      return -1;
    }
    key = p->magic_config_key;
  }
  for (struct layer *l = top_layer; l && !l->is_plugin; l = l->below) {
    if (!l->filter.config)
      continue;
    calling = l;
    int r = l->filter.config(key, value);
    calling = NULL;
    if (r == -1) {
      nbdserve_error("filter %s: could not use parameter %s=%s", l->name, key, value);
      return -1;
    }
    if (r == 1)
      return 0;
  }
  if (p->config == NULL) {
    nbdserve_error("plugin %s takes no parameters (got %s=%s)", p->name, key, value);
    return -1;
  }
  calling = plugin_layer;
  int r = p->config(key, value);
  calling = NULL;
  if (r == -1) {
    nbdserve_error("plugin %s: could not use parameter %s=%s", p->name, key, value);
    return -1;
  }
  return 0;
}

/* Plugin first, then filters from the innermost out. */
static int call_up(bool complete)
{
  struct layer *stack[256];
  size_t n = 0;
  for (struct layer *l = top_layer; l && n < ARRAY_SIZE(stack); l = l->below)
    stack[n++] = l;
  while (n-- > 0) {
    struct layer *l = stack[n];
    int (*fn)(void);
    if (l->is_plugin)
      fn = complete ? l->plugin.config_complete : l->plugin.get_ready;
    else
      fn = complete ? l->filter.config_complete : l->filter.get_ready;
    calling = l;
    int r = fn ? fn() : 0;
    calling = NULL;
    if (r == -1) {
      nbdserve_error("%s %s: %s failed", l->is_plugin ? "plugin" : "filter", l->name,
                     complete ? "configuration" : "get_ready");
      return -1;
    }
  }
  return 0;
}

/* A plugin that knows its thread model only once configured says it
 * now, before anything reads the model (exec_setup, accept). */
static int settle_plugin_thread_model(void)
{
  struct nbdserve_plugin *p = &plugin_layer->plugin;
  if (p->configured_thread_model == NULL)
    return 0;
  calling = plugin_layer;
  int model = p->configured_thread_model();
  calling = NULL;
  if (model == -1) {
    nbdserve_error("plugin %s: configured_thread_model failed", p->name);
    return -1;
  }
  if (model < NBDSERVE_THREAD_MODEL_SERIALIZE_CONNECTIONS || model > NBDSERVE_THREAD_MODEL_PARALLEL) {
    nbdserve_error("plugin %s: configured_thread_model returned unknown thread model %d",
                   p->name, model);
    return -1;
  }
  p->thread_model = model;
  return 0;
}

int chain_config_complete(void)
{
  if (call_up(true) == -1)
    return -1;
  return settle_plugin_thread_model();
}

int chain_get_ready(void)
{
  return call_up(false);
}

int chain_thread_model(void)
{
  int model = plugin_layer->plugin.thread_model;
  for (struct layer *l = top_layer; l && !l->is_plugin; l = l->below) {
    model = MIN(model, filter_thread_model(&l->filter));
  }
  return model;
}

/* Whether the plugin, as configured, keeps the NEVER_BLOCKS promise. */
static bool plugin_never_blocks(const struct nbdserve_plugin *p)
{
  if (p->never_blocks)
    return p->never_blocks() == 1;
  return p->flags & NBDSERVE_PLUGIN_NEVER_BLOCKS;
}

bool chain_never_blocks(void)
{
  /* Filters first: the plugin's callback is asked only when its answer
   * matters (it may log what it decided). */
  for (struct layer *l = top_layer; l && !l->is_plugin; l = l->below) {
    const struct nbdserve_filter *f = &l->filter;
    if (f->never_blocks ? f->never_blocks() != 1 : !(f->flags & NBDSERVE_FILTER_NEVER_BLOCKS))
      return false;
  }
  return plugin_never_blocks(&plugin_layer->plugin);
}

static const char *thread_model_name(int model)
{
  switch (model) {
  case NBDSERVE_THREAD_MODEL_SERIALIZE_CONNECTIONS:
    return "serialize_connections";
  case NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS:
    return "serialize_all_requests";
  case NBDSERVE_THREAD_MODEL_SERIALIZE_REQUESTS:
    return "serialize_requests";
  default:
    return "parallel";
  }
}

#define HAS(fp, prefix, s, field) fprintf(fp, "%shas_" #field "=%d\n", prefix, (s)->field != NULL)

static void dump_plugin(FILE *fp, const struct layer *l)
{
  const struct nbdserve_plugin *p = &l->plugin;
  fprintf(fp, "path=%s\nname=%s\n", l->filename, p->name);
  if (p->version)
    fprintf(fp, "version=%s\n", p->version);
  fprintf(fp, "api_version=%u\nstruct_size=%u\n", p->api_version, p->struct_size);
  fprintf(fp, "thread_model=%s\n", thread_model_name(p->thread_model));
  /* A plugin with the callback decides only once it is configured. */
  fprintf(fp, "never_blocks=%s\n", p->never_blocks ? "config"
          : (p->flags & NBDSERVE_PLUGIN_NEVER_BLOCKS) ? "1" : "0");
  if (p->magic_config_key)
    fprintf(fp, "magic_config_key=%s\n", p->magic_config_key);
  const char *pre = "";
  HAS(fp, pre, p, load); HAS(fp, pre, p, unload); HAS(fp, pre, p, config);
  HAS(fp, pre, p, config_complete); HAS(fp, pre, p, get_ready); HAS(fp, pre, p, list_exports);
  HAS(fp, pre, p, default_export); HAS(fp, pre, p, list_meta_contexts); HAS(fp, pre, p, open);
  HAS(fp, pre, p, close); HAS(fp, pre, p, get_size); HAS(fp, pre, p, block_size);
  HAS(fp, pre, p, can_write); HAS(fp, pre, p, can_flush); HAS(fp, pre, p, is_rotational);
  HAS(fp, pre, p, can_trim); HAS(fp, pre, p, can_zero); HAS(fp, pre, p, can_fast_zero);
  HAS(fp, pre, p, can_fua); HAS(fp, pre, p, can_multi_conn); HAS(fp, pre, p, can_cache);
  HAS(fp, pre, p, can_extents); HAS(fp, pre, p, pread); HAS(fp, pre, p, pwrite);
  HAS(fp, pre, p, flush); HAS(fp, pre, p, trim); HAS(fp, pre, p, zero); HAS(fp, pre, p, cache);
  HAS(fp, pre, p, extents); HAS(fp, pre, p, meta_extents); HAS(fp, pre, p, never_blocks);
  HAS(fp, pre, p, configured_thread_model);
  if (p->dump_plugin) {
    fflush(fp);
    p->dump_plugin();
    fflush(stdout);
  }
}

static void dump_filter(FILE *fp, const struct layer *l)
{
  const struct nbdserve_filter *f = &l->filter;
  char pre[128];
  snprintf(pre, sizeof pre, "filter_%s_", f->name);
  fprintf(fp, "%spath=%s\n%sname=%s\n", pre, l->filename, pre, f->name);
  if (f->version)
    fprintf(fp, "%sversion=%s\n", pre, f->version);
  fprintf(fp, "%sapi_version=%u\n", pre, f->api_version);
  fprintf(fp, "%sthread_model=%s\n", pre,
          thread_model_name(filter_thread_model(f)));
  HAS(fp, pre, f, config); HAS(fp, pre, f, open); HAS(fp, pre, f, prepare);
  HAS(fp, pre, f, pread); HAS(fp, pre, f, pwrite); HAS(fp, pre, f, flush); HAS(fp, pre, f, trim);
  HAS(fp, pre, f, zero); HAS(fp, pre, f, cache); HAS(fp, pre, f, extents);
  HAS(fp, pre, f, meta_extents); HAS(fp, pre, f, list_meta_contexts);
}

void chain_dump(FILE *fp)
{
  dump_plugin(fp, plugin_layer);
  for (struct layer *l = top_layer; l && !l->is_plugin; l = l->below)
    dump_filter(fp, l);
  fprintf(fp, "chain_thread_model=%s\n", thread_model_name(chain_thread_model()));
}

static void help_one(FILE *fp, const char *kind, const char *name, const char *longname,
                     const char *description, const char *config_help)
{
  fprintf(fp, "\n%s %s", kind, name);
  if (longname)
    fprintf(fp, " - %s", longname);
  fprintf(fp, "\n");
  if (description)
    fprintf(fp, "%s\n", description);
  if (config_help)
    fprintf(fp, "\nParameters:\n%s\n", config_help);
}

void chain_help(FILE *fp)
{
  const struct nbdserve_plugin *p = &plugin_layer->plugin;
  help_one(fp, "Plugin", p->name, p->longname, p->description, p->config_help);
  for (struct layer *l = top_layer; l && !l->is_plugin; l = l->below)
    help_one(fp, "Filter", l->filter.name, l->filter.longname, l->filter.description,
             l->filter.config_help);
}
