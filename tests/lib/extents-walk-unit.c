/* Unit test of common/extents-walk.h, calling extents_walk directly.
 *
 * A made-up source of stretches (a table of lengths and flags, or an
 * endless run of 1-byte stretches) and a small stand-in for the server's
 * extents builder: it keeps what it is given, in order, and can be told
 * to be full after N extents or to refuse the next one.
 *
 * Output is TAP; the exit status is 1 if any check failed.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "extents-walk.h"

static int tests_run, tests_failed;

static void ok(bool cond, const char *name)
{
  tests_run++;
  if (!cond)
    tests_failed++;
  printf("%sok %d - %s\n", cond ? "" : "not ", tests_run, name);
}

/* ---- The builder's stand-in ------------------------------------------------ */

struct nbdserve_extents {
  uint64_t start, next;
  unsigned n, full_after; /* full once n reaches full_after (0: never) */
  bool refuse; /* the next add fails with EINVAL */
  uint64_t offset[256], length[256], flags[256];
};

int nbdserve_add_extent(struct nbdserve_extents *e, uint64_t offset, uint64_t length,
                        uint64_t flags)
{
  if (e->refuse) {
    errno = EINVAL;
    return -1;
  }
  if ((e->full_after && e->n >= e->full_after) || e->n == 256)
    return 0; /* full: accepted and ignored, as the server's does */
  if (offset != e->next) {
    errno = EINVAL;
    return -1;
  }
  e->offset[e->n] = offset;
  e->length[e->n] = length;
  e->flags[e->n] = flags;
  e->n++;
  e->next = offset + length;
  return 0;
}

uint64_t nbdserve_extents_end(const struct nbdserve_extents *e)
{
  return e->next;
}

static void builder_init(struct nbdserve_extents *e, uint64_t start)
{
  memset(e, 0, sizeof *e);
  e->start = e->next = start;
}

/* ---- Sources of stretches ---------------------------------------------------- */

/* Stretches of a fixed table from offset 0; past the table, an error. */
struct table {
  unsigned n;
  uint64_t length[8], flags[8];
  unsigned calls;
  const char *context_seen;
};

static int table_stretch(void *source, const char *context, uint64_t offset, uint64_t max,
                         uint64_t *length, uint64_t *flags)
{
  struct table *t = source;
  t->calls++;
  t->context_seen = context;
  uint64_t pos = 0;
  for (unsigned i = 0; i < t->n; i++) {
    if (offset < pos + t->length[i]) {
      uint64_t left = pos + t->length[i] - offset;
      *length = left < max ? left : max;
      *flags = t->flags[i];
      return 0;
    }
    pos += t->length[i];
  }
  return -EIO;
}

/* Endless 1-byte stretches with alternating flags, so none merge. */
static int tiny_stretch(void *source, const char *context, uint64_t offset, uint64_t max,
                        uint64_t *length, uint64_t *flags)
{
  (void) context;
  (void) max;
  (*(unsigned *) source)++;
  *length = 1;
  *flags = offset & 1;
  return 0;
}

int main(void)
{
  struct nbdserve_extents e;
  struct table t = { 3, { 4096, 8192, 4096 }, { 0, 3, 1 }, 0, NULL };

  builder_init(&e, 0);
  int r = extents_walk(&e, &t, "base:allocation", 0, 16384, table_stretch);
  ok(r == 0 && e.n == 3, "a range of three stretches gives three extents");
  ok(e.offset[1] == 4096 && e.length[1] == 8192 && e.flags[1] == 3 && e.length[2] == 4096,
     "each extent has its stretch's place, length and flags");
  ok(t.context_seen && strcmp(t.context_seen, "base:allocation") == 0,
     "the context reaches the stretch function");

  builder_init(&e, 6000);
  t.calls = 0;
  r = extents_walk(&e, &t, "x", 6000, 4000, table_stretch);
  ok(r == 0 && e.n == 1 && e.offset[0] == 6000 && e.length[0] == 4000 && t.calls == 1,
     "a range inside one stretch is one extent, clipped to the range");

  builder_init(&e, 0);
  r = extents_walk(&e, &t, "x", 0, 20000, table_stretch);
  ok(r == -EIO && e.n == 3, "a stretch function's error is returned, after what it described");

  builder_init(&e, 0);
  e.refuse = true;
  r = extents_walk(&e, &t, "x", 0, 16384, table_stretch);
  ok(r == -EINVAL, "a builder that refuses an extent gives its errno");

  unsigned calls = 0;
  builder_init(&e, 0);
  r = extents_walk(&e, &calls, "x", 0, 1000000, tiny_stretch);
  ok(r == 0 && calls == EXTENTS_WALK_MAX_STRETCHES && e.n == EXTENTS_WALK_MAX_STRETCHES,
     "a long range of tiny stretches stops after the lookup cap");

  calls = 0;
  builder_init(&e, 0);
  e.full_after = 5;
  r = extents_walk(&e, &calls, "x", 0, 1000000, tiny_stretch);
  ok(r == 0 && calls == 6 && e.n == 5, "the walk stops as soon as the builder is full");

  calls = 0;
  builder_init(&e, 0);
  r = extents_walk(&e, &calls, "x", 0, 0, tiny_stretch);
  ok(r == 0 && calls == 0 && e.n == 0, "an empty range looks nothing up");

  printf("1..%d\n", tests_run);
  return tests_failed ? 1 : 0;
}
