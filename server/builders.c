/* nbdserve - the lists plugins fill: exports, metadata contexts, extents.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* A growable array of strings. */
struct strings {
  char **items;
  size_t n, cap;
};

static int strings_add(struct strings *s, const char *str)
{
  if (s->n == s->cap) {
    size_t cap = s->cap ? 2 * s->cap : 8;
    char **p = realloc(s->items, cap * sizeof *p);
    if (p == NULL)
      return -1;
    s->items = p;
    s->cap = cap;
  }
  char *copy = str ? strdup(str) : NULL;
  if (str && copy == NULL)
    return -1;
  s->items[s->n++] = copy;
  return 0;
}

static void strings_clear(struct strings *s)
{
  for (size_t i = 0; i < s->n; i++)
    free(s->items[i]);
  free(s->items);
}

/* ---- Exports ---------------------------------------------------------------- */

struct nbdserve_exports {
  struct strings names, descriptions;
};

struct nbdserve_exports *nbdserve_exports_new(void)
{
  struct nbdserve_exports *e = calloc(1, sizeof *e);
  if (e == NULL)
    die("out of memory");
  return e;
}

void nbdserve_exports_free(struct nbdserve_exports *e)
{
  if (e == NULL)
    return;
  strings_clear(&e->names);
  strings_clear(&e->descriptions);
  free(e);
}

size_t nbdserve_exports_count(const struct nbdserve_exports *e)
{
  return e->names.n;
}

const char *nbdserve_exports_name(const struct nbdserve_exports *e, size_t i)
{
  return e->names.items[i];
}

const char *nbdserve_exports_description(const struct nbdserve_exports *e, size_t i)
{
  return e->descriptions.items[i];
}

int nbdserve_add_export(struct nbdserve_exports *e, const char *name, const char *description)
{
  if (name == NULL || strlen(name) > 4096) {
    nbdserve_error("export names are at most 4096 bytes");
    errno = EINVAL;
    return -1;
  }
  if (e->names.n >= 10000) {
    nbdserve_error("too many exports (the limit is 10000)");
    errno = ENOSPC;
    return -1;
  }
  if (strings_add(&e->names, name) == -1 || strings_add(&e->descriptions, description) == -1) {
    errno = ENOMEM;
    return -1;
  }
  return 0;
}

/* ---- Metadata contexts --------------------------------------------------------- */

struct nbdserve_contexts {
  struct strings names;
};

struct nbdserve_contexts *contexts_new(void)
{
  struct nbdserve_contexts *c = calloc(1, sizeof *c);
  if (c == NULL)
    die("out of memory");
  return c;
}

void contexts_free(struct nbdserve_contexts *c)
{
  if (c == NULL)
    return;
  strings_clear(&c->names);
  free(c);
}

size_t contexts_count(const struct nbdserve_contexts *c)
{
  return c->names.n;
}

const char *contexts_name(const struct nbdserve_contexts *c, size_t i)
{
  return c->names.items[i];
}

int nbdserve_add_context(struct nbdserve_contexts *c, const char *name)
{
  /* "namespace:leaf", at most 4096 bytes, as the protocol requires. */
  if (name == NULL || strchr(name, ':') == NULL || strlen(name) > 4096) {
    nbdserve_error("invalid metadata context name '%s'", name ? name : "(null)");
    errno = EINVAL;
    return -1;
  }
  for (size_t i = 0; i < c->names.n; i++)
    if (strcmp(c->names.items[i], name) == 0)
      return 0;
  if (strings_add(&c->names, name) == -1) {
    errno = ENOMEM;
    return -1;
  }
  return 0;
}

/* ---- Extents -------------------------------------------------------------------- */

struct extent {
  uint64_t offset, length, flags;
};

struct nbdserve_extents {
  uint64_t start, end; /* the range asked about */
  uint32_t flags; /* NBDSERVE_FLAG_REQ_ONE */
  uint64_t next; /* where the next extent must start */
  bool full; /* nothing more is needed */
  struct extent *items;
  size_t n, cap;
  struct extent inline_items[8]; /* most answers are short */
};

struct nbdserve_extents *nbdserve_extents_new(uint64_t offset, uint64_t count, uint32_t flags)
{
  struct nbdserve_extents *e = malloc(sizeof *e);
  if (e == NULL)
    return NULL;
  e->start = offset;
  e->end = count > UINT64_MAX - offset ? UINT64_MAX : offset + count;
  e->flags = flags;
  e->next = offset;
  e->full = false;
  e->items = e->inline_items;
  e->n = 0;
  e->cap = ARRAY_SIZE(e->inline_items);
  return e;
}

void nbdserve_extents_free(struct nbdserve_extents *e)
{
  if (e == NULL)
    return;
  if (e->items != e->inline_items)
    free(e->items);
  free(e);
}

size_t nbdserve_extents_count(const struct nbdserve_extents *e)
{
  return e->n;
}

void nbdserve_extents_get(const struct nbdserve_extents *e, size_t i, uint64_t *offset,
                          uint64_t *length, uint64_t *flags)
{
  *offset = e->items[i].offset;
  *length = e->items[i].length;
  *flags = e->items[i].flags;
}

uint64_t nbdserve_extents_end(const struct nbdserve_extents *e)
{
  return e->next;
}

static int extents_grow(struct nbdserve_extents *e)
{
  size_t cap = e->cap * 2;
  struct extent *p;
  if (e->items == e->inline_items) {
    p = malloc(cap * sizeof *p);
    if (p)
      memcpy(p, e->items, e->n * sizeof *p);
  }
  else
    p = realloc(e->items, cap * sizeof *p);
  if (p == NULL) {
    errno = ENOMEM;
    return -1;
  }
  e->items = p;
  e->cap = cap;
  return 0;
}

int nbdserve_add_extent(struct nbdserve_extents *e, uint64_t offset, uint64_t length,
                        uint64_t flags)
{
  if (length == 0 || e->full)
    return 0;
  if (offset != e->next && !(e->n == 0 && offset < e->start)) {
    nbdserve_error("extent at %llu is out of order: the next extent must start at %llu",
                   (unsigned long long) offset, (unsigned long long) e->next);
    errno = EINVAL;
    return -1;
  }
  if (offset < e->start) { /* clip the part before the request */
    if (offset + length <= e->start)
      return 0;
    length -= e->start - offset;
    offset = e->start;
  }
  if ((e->flags & NBDSERVE_FLAG_REQ_ONE) && e->n == 1 && e->items[0].flags != flags) {
    e->full = true; /* one extent is all the request wants */
    return 0;
  }
  e->next = offset + length;

  if (e->n > 0 && e->items[e->n - 1].flags == flags)
    e->items[e->n - 1].length += length;
  else {
    if (e->n == e->cap && extents_grow(e) == -1)
      return -1;
    e->items[e->n++] = (struct extent){ offset, length, flags };
  }
  if (e->flags & NBDSERVE_FLAG_REQ_ONE) {
    /* The single extent is never longer than asked. */
    struct extent *x = &e->items[0];
    if (x->offset + x->length > e->end)
      x->length = e->end - x->offset;
  }
  if (e->next >= e->end || e->n >= EXTENTS_MAX)
    e->full = true;
  return 0;
}
