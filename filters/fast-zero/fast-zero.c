/* nbdserve fast-zero filter: control over WRITE_ZEROES and FAST_ZERO.
 *
 * A copying client such as qemu-img convert first tries to zero the
 * whole destination with FAST_ZERO, and falls back to writing every
 * block when the server says it cannot zero fast.  What it chooses
 * depends on what the server advertises and on how quickly a refused
 * FAST_ZERO comes back, so a backend whose zeroing is really a write
 * (or that must not punch holes) wants to say so: this filter changes
 * the advertisement and the handling of zero requests to match.
 *
 * The filter keeps no state beyond its two settings and never waits or
 * sleeps itself, so it never blocks; anything slow happens in the layer
 * below, which the server accounts for separately.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "nbdserve-filter.h"

enum zero_mode { ZERO_PLUGIN, ZERO_NONE, ZERO_EMULATE, ZERO_NOTRIM };
enum fast_mode { FAST_PLUGIN, FAST_SLOW, FAST_IGNORE, FAST_NONE, FAST_FAST };

static const char *const zero_names[] = { "plugin", "none", "emulate", "notrim", NULL };
static const char *const fast_names[] = { "plugin", "slow", "ignore", "none", "fast", NULL };

static enum zero_mode zero_mode;
static enum fast_mode fast_mode;

/* The largest write used to emulate a zero: bounded so that a zero of a
 * whole disk costs neither a large buffer nor one huge request below. */
#define EMULATE_CHUNK (1024 * 1024)
static const char zeroes[EMULATE_CHUNK];

static int fz_load(void)
{
  zero_mode = ZERO_PLUGIN;
  fast_mode = FAST_PLUGIN;
  return 0;
}

static int lookup(const char *key, const char *value, const char *const *names)
{
  for (int i = 0; names[i]; i++)
    if (strcmp(value, names[i]) == 0)
      return i;
  char list[128] = "";
  for (int i = 0; names[i]; i++) {
    if (i)
      strcat(list, ", ");
    strcat(list, names[i]);
  }
  nbdserve_error("%s=%s: expected one of %s", key, value, list);
  return -1;
}

static int fz_config(const char *key, const char *value)
{
  int i;
  if (strcmp(key, "zero") == 0) {
    if ((i = lookup(key, value, zero_names)) < 0)
      return -1;
    zero_mode = (enum zero_mode) i;
    return 1;
  }
  if (strcmp(key, "fast-zero") == 0) {
    if ((i = lookup(key, value, fast_names)) < 0)
      return -1;
    fast_mode = (enum fast_mode) i;
    return 1;
  }
  return 0; /* not ours: the plugin may know it */
}

/* Combinations that cannot be kept true are refused before the server
 * listens, rather than silently meaning something else. */
static int fz_config_complete(void)
{
  if (zero_mode == ZERO_NONE && fast_mode != FAST_PLUGIN && fast_mode != FAST_NONE) {
    nbdserve_error("zero=none with fast-zero=%s: without write-zeroes there is no "
                   "FAST_ZERO flag to control (use fast-zero=plugin or none)",
                   fast_names[fast_mode]);
    return -1;
  }
  /* fast-zero=ignore over emulation is allowed: it is the mode that
   * openly breaks the promise (to see what a client makes of it). */
  if (zero_mode == ZERO_EMULATE && fast_mode == FAST_FAST) {
    nbdserve_error("zero=emulate with fast-zero=fast: emulated zeroes are writes and "
                   "never fast (use fast-zero=slow, none, plugin or ignore)");
    return -1;
  }
  return 0;
}

static int fz_can_zero(struct nbdserve_next *next, void *handle)
{
  (void) handle;
  switch (zero_mode) {
  case ZERO_NONE:
    return 0;
  case ZERO_EMULATE:
    /* Writing needs a writable layer below; the server only asks
     * can_zero of writable exports anyway. */
    return nbdserve_next_can_write(next);
  default:
    return nbdserve_next_can_zero(next);
  }
}

static int fz_can_fast_zero(struct nbdserve_next *next, void *handle)
{
  (void) handle;
  switch (fast_mode) {
  case FAST_NONE:
    return 0;
  case FAST_SLOW:
  case FAST_IGNORE:
  case FAST_FAST:
    return 1;
  default:
    /* Emulated zeroes are plain writes: not fast, whatever the layer
     * below would say about its own zero. */
    if (zero_mode == ZERO_EMULATE || zero_mode == ZERO_NONE)
      return 0;
    return nbdserve_next_can_fast_zero(next);
  }
}

/* Zeroes by writing them, in pieces no larger than the layer below
 * accepts and aligned to its minimum block, so the write size limit
 * holds for any zero size.  A piece that waits (EINPROGRESS) returns at
 * once: the request runs again from the top, and rewriting zeroes that
 * are already there is harmless. */
static int emulate(struct nbdserve_next *next, uint64_t count, uint64_t offset, uint32_t flags)
{
  uint32_t minimum, preferred, maximum;
  if (nbdserve_next_block_size(next, &minimum, &preferred, &maximum) == -1)
    return -1;
  uint64_t chunk = EMULATE_CHUNK;
  if (maximum > 0 && maximum < chunk)
    chunk = maximum;
  if (minimum > 1 && chunk >= minimum)
    chunk -= chunk % minimum;
  /* FUA covers only the request it is on, so every piece carries it;
   * MAY_TRIM and FAST_ZERO mean nothing to a write. */
  uint32_t fua = flags & NBDSERVE_FLAG_FUA;
  while (count > 0) {
    uint32_t n = (uint32_t) (count < chunk ? count : chunk);
    if (nbdserve_next_pwrite(next, zeroes, n, offset, fua) == -1)
      return -1;
    count -= n;
    offset += n;
  }
  return 0;
}

static int fz_zero(struct nbdserve_next *next, void *handle, uint64_t count, uint64_t offset,
                   uint32_t flags)
{
  (void) handle;
  if (flags & NBDSERVE_FLAG_FAST_ZERO) {
    switch (fast_mode) {
    case FAST_SLOW:
      /* The point of this mode: the client learns at once, without the
       * layer below seeing the request, that zeroing is no faster than
       * writing. */
      nbdserve_set_error(ENOTSUP);
      return -1;
    case FAST_IGNORE:
    case FAST_FAST:
      flags &= ~NBDSERVE_FLAG_FAST_ZERO;
      break;
    default:
      /* Only reaches here when the flag was advertised by the layer
       * below (FAST_PLUGIN over plugin or notrim): it decides. */
      if (zero_mode == ZERO_EMULATE) {
        nbdserve_set_error(ENOTSUP);
        return -1;
      }
      break;
    }
  }
  switch (zero_mode) {
  case ZERO_EMULATE:
    return emulate(next, count, offset, flags);
  case ZERO_NOTRIM:
    flags &= ~NBDSERVE_FLAG_MAY_TRIM;
    break;
  case ZERO_NONE:
    /* Not advertised, so the server does not let a client send one. */
    nbdserve_set_error(EINVAL);
    return -1;
  default:
    break;
  }
  return nbdserve_next_zero(next, count, offset, flags);
}

#define FZ_CONFIG_HELP                                                                \
  "zero=plugin|none|emulate|notrim\n"                                                 \
  "                       plugin: pass write-zeroes through (default); none: do not\n" \
  "                       advertise it; emulate: write buffers of zeroes instead;\n"  \
  "                       notrim: pass through but never let the plugin punch holes\n" \
  "fast-zero=plugin|slow|ignore|none|fast\n"                                          \
  "                       plugin: as the layer below (default); slow: advertise it\n" \
  "                       and fail every FAST_ZERO request at once with ENOTSUP;\n"   \
  "                       ignore: advertise it and zero normally, even slowly;\n"     \
  "                       none: do not advertise it; fast: advertise it and promise\n" \
  "                       the plugin's zero is cheap\n"                              \
  "zero=none allows only fast-zero=plugin|none; zero=emulate refuses\n"          \
  "fast-zero=fast."

static struct nbdserve_filter filter = {
  NBDSERVE_FILTER_INIT,
  .name = "fast-zero",
  .longname = "control write-zeroes and FAST_ZERO",
  .version = "1.0",
  .description = "Control write-zeroes and the FAST_ZERO flag a client sees",
  .config_help = FZ_CONFIG_HELP,
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .flags = NBDSERVE_FILTER_NEVER_BLOCKS,
  .load = fz_load,
  .config = fz_config,
  .config_complete = fz_config_complete,
  .can_zero = fz_can_zero,
  .can_fast_zero = fz_can_fast_zero,
  .zero = fz_zero,
};

NBDSERVE_REGISTER_FILTER(filter)
