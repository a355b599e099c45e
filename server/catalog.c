/* nbdserve - --list-plugins and --list-filters: every plugin or filter
 * a short name finds, with the version and one-line description it
 * registers.
 *
 * The places searched, and their order, are those of a short name on
 * the command line (plugins.c): the build tree next to the binary, then
 * the installed directory.  A name found in both is listed once, from
 * the place that wins when the name is given.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

struct found {
  char *name; /* the short name that loads it */
  char *path;
  size_t order; /* places searched earlier win */
  struct layer_summary summary;
  bool readable; /* its registration was read */
};

struct catalog {
  struct found *items;
  size_t n, allocated;
};

static void catalog_add(struct catalog *c, const char *name, char *path)
{
  if (c->n == c->allocated) {
    size_t more = c->allocated ? 2 * c->allocated : 16;
    struct found *items = realloc(c->items, more * sizeof *items);
    if (items == NULL)
      die("out of memory");
    c->items = items;
    c->allocated = more;
  }
  struct found *f = &c->items[c->n];
  *f = (struct found) { .name = strdup(name), .path = path, .order = c->n };
  if (f->name == NULL)
    die("out of memory");
  c->n++;
}

/* DIR/plugins/NAME/nbdserve-NAME-plugin.so for every folder NAME that
 * holds one: a build tree, when the binary runs from one. */
static void scan_build_tree(struct catalog *c, bool is_plugin)
{
  char *build_dir = layer_build_dir();
  char *folders = NULL;
  if (build_dir == NULL ||
      asprintf(&folders, "%s/%s", build_dir, is_plugin ? "plugins" : "filters") < 0) {
    free(build_dir);
    return;
  }
  DIR *dir = opendir(folders);
  for (struct dirent *e; dir && (e = readdir(dir)) != NULL;) {
    if (!layer_short_name_valid(e->d_name)) /* also skips . and .. */
      continue;
    char *path = layer_build_path(build_dir, e->d_name, is_plugin);
    if (access(path, R_OK) == 0) /* as a short name on the command line needs */
      catalog_add(c, e->d_name, path);
    else
      free(path);
  }
  if (dir)
    closedir(dir);
  free(folders);
  free(build_dir);
}

/* PLUGINDIR/nbdserve-NAME-plugin.so (FILTERDIR/...-filter.so). */
static void scan_installed(struct catalog *c, bool is_plugin)
{
  const char *suffix = is_plugin ? "-plugin.so" : "-filter.so";
  const char *prefix = "nbdserve-";
  DIR *dir = opendir(layer_installed_dir(is_plugin));
  for (struct dirent *e; dir && (e = readdir(dir)) != NULL;) {
    size_t len = strlen(e->d_name), pre = strlen(prefix), suf = strlen(suffix);
    if (len <= pre + suf || strncmp(e->d_name, prefix, pre) != 0 ||
        strcmp(e->d_name + len - suf, suffix) != 0)
      continue;
    char *name = strndup(e->d_name + pre, len - pre - suf);
    if (name == NULL)
      die("out of memory");
    if (layer_short_name_valid(name))
      catalog_add(c, name, layer_installed_path(name, is_plugin));
    free(name);
  }
  if (dir)
    closedir(dir);
}

static int by_name_then_order(const void *a, const void *b)
{
  const struct found *x = a, *y = b;
  int cmp = strcmp(x->name, y->name);
  if (cmp != 0)
    return cmp;
  return x->order < y->order ? -1 : x->order > y->order;
}

/* Sort by name; of equal names keep the first place searched, and drop
 * the others (freed, their name set to NULL). */
static void sort_and_drop_hidden(struct catalog *c)
{
  if (c->n > 1) /* qsort wants an array, and there may be none */
    qsort(c->items, c->n, sizeof *c->items, by_name_then_order);
  const struct found *winner = NULL;
  for (size_t i = 0; i < c->n; i++) {
    struct found *f = &c->items[i];
    if (winner && strcmp(winner->name, f->name) == 0) {
      nbdserve_debug("%s is hidden by %s, which '%s' loads", f->path, winner->path, f->name);
      free(f->name);
      free(f->path);
      f->name = f->path = NULL;
      continue;
    }
    winner = f;
  }
}

static int width_of(const char *s)
{
  return s ? (int) strlen(s) : 1; /* "-" stands for a missing field */
}

static void print_catalog(FILE *fp, const struct catalog *c)
{
  int name_width = 0, version_width = 0;
  for (size_t i = 0; i < c->n; i++) {
    const struct found *f = &c->items[i];
    if (!f->readable)
      continue;
    name_width = MAX(name_width, width_of(f->name));
    version_width = MAX(version_width, width_of(f->summary.version));
  }
  for (size_t i = 0; i < c->n; i++) {
    const struct found *f = &c->items[i];
    if (!f->readable)
      continue;
    const char *version = f->summary.version ? f->summary.version : "-";
    const char *longname = f->summary.longname ? f->summary.longname : "-";
    fprintf(fp, "%-*s  %-*s  %s", name_width, f->name, version_width, version, longname);
    if (opt.verbose)
      fprintf(fp, "  (%s)", f->path);
    fputc('\n', fp);
  }
}

void list_layers(FILE *fp, bool is_plugin)
{
  const char *kind = is_plugin ? "plugin" : "filter";
  struct catalog c = { 0 };
  scan_build_tree(&c, is_plugin);
  scan_installed(&c, is_plugin);
  sort_and_drop_hidden(&c);

  size_t listed = 0;
  for (size_t i = 0; i < c.n; i++) {
    struct found *f = &c.items[i];
    char why[LAYER_WHY_MAX];
    if (f->name == NULL)
      continue;
    f->readable = layer_summarize(f->path, is_plugin, &f->summary, why);
    if (f->readable)
      listed++;
    else
      nbdserve_error("warning: not listing '%s': %s", f->name, why);
  }
  print_catalog(fp, &c);
  if (listed == 0) {
    char *build_dir = layer_build_dir();
    nbdserve_error("warning: no %ss found (looked in %s/%ss and %s)", kind,
                   build_dir ? build_dir : "(unknown)", kind, layer_installed_dir(is_plugin));
    free(build_dir);
  }

  for (size_t i = 0; i < c.n; i++) {
    if (c.items[i].readable)
      layer_summary_free(&c.items[i].summary);
    free(c.items[i].name);
    free(c.items[i].path);
  }
  free(c.items);
}
