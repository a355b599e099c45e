/* nbdserve - filling a BLOCK_STATUS reply one stretch at a time, for
 * plugins whose format answers "what is at this offset, and for how
 * long" (qcow2-readonly, dirty-bitmap-overlay).
 *
 * The walk stops when the range is covered, when the builder wants no
 * more, or after EXTENTS_WALK_MAX_STRETCHES lookups: the protocol lets
 * a reply cover less than was asked and the client asks again from where
 * it ends, so a huge disk costs many short requests, never one long one.
 * Header-only: each .so gets its own copy.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_EXTENTS_WALK_H
#define NBDSERVE_EXTENTS_WALK_H

#include <errno.h>
#include <stdint.h>

#include "nbdserve-common.h"

#define EXTENTS_WALK_MAX_STRETCHES 64

/* The stretch of SOURCE's CONTEXT that starts at OFFSET, at most MAX
 * bytes long: its length (at least 1) and flags.  Returns 0, or a
 * negative errno. */
typedef int extents_stretch_fn(void *source, const char *context, uint64_t offset, uint64_t max,
                               uint64_t *length, uint64_t *flags);

/* Describes [offset, offset+count) of SOURCE's CONTEXT into EXTENTS
 * through NEXT.  Returns 0, or a negative errno (NEXT's, or the
 * builder's). */
static inline int extents_walk(struct nbdserve_extents *extents, void *source, const char *context,
                               uint64_t offset, uint64_t count, extents_stretch_fn *next)
{
  uint64_t end = offset + count, pos = offset;
  for (int i = 0; i < EXTENTS_WALK_MAX_STRETCHES && pos < end; i++) {
    uint64_t length, flags;
    int r = next(source, context, pos, end - pos, &length, &flags);
    if (r < 0)
      return r;
    if (nbdserve_add_extent(extents, pos, length, flags) == -1)
      return -(errno ? errno : EINVAL);
    uint64_t reached = nbdserve_extents_end(extents);
    if (reached <= pos)
      break; /* the builder is full */
    pos = reached;
  }
  return 0;
}

#endif
