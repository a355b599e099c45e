/* nbdserve delay filter: add latency to requests.
 *
 * Useful to see how a client behaves against a slow disk, and to hold
 * requests in flight in tests.  Each kind of request has its own delay,
 * fixed ("200ms") or drawn uniformly from a range ("10ms-50ms").  The
 * delay holds no thread: the request waits on its connection loop's
 * timer (nbdserve_retry_after) and then runs again, and this time goes
 * on.  So the filter never blocks, a delay over the memory plugin stays
 * on the inline path, and 10,000 delayed requests take no worker.  Only
 * delay-open and delay-close sleep (opening and closing are no requests
 * that can wait): with either set the chain runs on worker threads,
 * where closes run anyway, so a slow close never holds up a loop.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nbdserve-filter.h"
#include "fastrandom.h"

enum kind { READ, WRITE, ZERO, TRIM, FLUSH, EXTENTS, CACHE, OPEN, CLOSE, NR_KINDS };

static const char *const kind_names[NR_KINDS] = {
  "read", "write", "zero", "trim", "flush", "extents", "cache", "open", "close",
};

/* A delay in nanoseconds, uniform in [min, max]; min == max when fixed. */
struct delay {
  int set;
  uint64_t min, max;
};

static struct delay delays[NR_KINDS];
/* delay-block=on: sleep in the thread instead of waiting without one,
 * to stand for a backend that blocks (a slow disk) in tests of the
 * worker pool. */
static bool block;

static int delay_load(void)
{
  memset(delays, 0, sizeof delays);
  block = false;
  return 0;
}

/* One duration: a decimal number of seconds, or with a unit s, ms, us
 * or ns ("1.5", "200ms", "250us").  Returns nanoseconds, or -1. */
static int64_t parse_duration(const char *str, const char **end_out)
{
  char *end;
  errno = 0;
  double value = strtod(str, &end);
  if (errno || end == str || !(value >= 0))
    return -1;
  double scale = 1e9;
  if (strncmp(end, "ms", 2) == 0)
    scale = 1e6, end += 2;
  else if (strncmp(end, "us", 2) == 0)
    scale = 1e3, end += 2;
  else if (strncmp(end, "ns", 2) == 0)
    scale = 1, end += 2;
  else if (*end == 's')
    end++;
  double ns = value * scale;
  if (ns > 3600e9) /* an hour: anything longer is surely a typo */
    return -1;
  *end_out = end;
  return (int64_t) ns;
}

/* "DURATION" or "MIN-MAX". */
static int parse_delay(const char *key, const char *value, struct delay *d)
{
  const char *end;
  int64_t min = parse_duration(value, &end), max = min;
  if (min >= 0 && *end == '-')
    max = parse_duration(end + 1, &end);
  if (min < 0 || max < 0 || *end != '\0' || max < min) {
    nbdserve_error("%s=%s: expected a duration such as 1.5, 200ms or 250us, "
                   "or a range MIN-MAX such as 10ms-50ms (at most 1 hour)", key, value);
    return -1;
  }
  *d = (struct delay){ .set = 1, .min = (uint64_t) min, .max = (uint64_t) max };
  return 0;
}

static int delay_config(const char *key, const char *value)
{
  /* rdelay and wdelay: the short names users of other servers know. */
  if (strcmp(key, "rdelay") == 0)
    return parse_delay(key, value, &delays[READ]) == 0 ? 1 : -1;
  if (strcmp(key, "wdelay") == 0)
    return parse_delay(key, value, &delays[WRITE]) == 0 ? 1 : -1;
  if (strcmp(key, "delay-block") == 0) {
    int b = nbdserve_parse_bool(value);
    if (b == -1)
      return -1;
    block = b;
    return 1;
  }
  if (strncmp(key, "delay-", 6) != 0)
    return 0;
  for (int k = 0; k < NR_KINDS; k++)
    if (strcmp(key + 6, kind_names[k]) == 0)
      return parse_delay(key, value, &delays[k]) == 0 ? 1 : -1;
  return 0; /* not ours: the plugin may know it, or refuses it */
}

/* Zero and trim change data as writes do: unless told otherwise, they
 * are as slow as writes. */
static int delay_config_complete(void)
{
  if (!delays[ZERO].set)
    delays[ZERO] = delays[WRITE];
  if (!delays[TRIM].set)
    delays[TRIM] = delays[WRITE];
  return 0;
}

static uint64_t draw(const struct delay *d)
{
  return d->min + fastrandom_below(d->max - d->min + 1);
}

/* Opening and closing sleep (see the top of the file). */
static void sleep_for(enum kind k)
{
  const struct delay *d = &delays[k];
  if (!d->set)
    return;
  uint64_t ns = draw(d);
  struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000), .tv_nsec = (long)(ns % 1000000000) };
  while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
    ;
}

/* A request waits once, before it goes down: true if it must wait now,
 * with what to return in *ret.  Not again once it has waited, nor when
 * the wait was cut short (the client left, or the server stops). */
static bool waits(struct nbdserve_next *next, enum kind k, int *ret)
{
  const struct delay *d = &delays[k];
  if (block) {
    sleep_for(k);
    return false;
  }
  if (!d->set || nbdserve_has_waited(next) || nbdserve_wait_cut_short())
    return false;
  *ret = nbdserve_retry_after(next, draw(d));
  return true;
}

static int delay_never_blocks(void)
{
  return !block && !delays[OPEN].set && !delays[CLOSE].set;
}

static void *delay_open(struct nbdserve_next *next, int readonly, const char *export_name)
{
  (void) next, (void) readonly, (void) export_name;
  sleep_for(OPEN);
  return &delays; /* any non-NULL handle: the filter keeps no per-connection state */
}

static void delay_close(void *handle)
{
  (void) handle;
  sleep_for(CLOSE);
}

static int delay_pread(struct nbdserve_next *next, void *handle, void *buf, uint32_t count,
                       uint64_t offset, uint32_t flags)
{
  (void) handle;
  int r;
  if (waits(next, READ, &r))
    return r;
  return nbdserve_next_pread(next, buf, count, offset, flags);
}

static int delay_pwrite(struct nbdserve_next *next, void *handle, const void *buf,
                        uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) handle;
  int r;
  if (waits(next, WRITE, &r))
    return r;
  return nbdserve_next_pwrite(next, buf, count, offset, flags);
}

static int delay_zero(struct nbdserve_next *next, void *handle, uint64_t count,
                      uint64_t offset, uint32_t flags)
{
  (void) handle;
  int r;
  if (waits(next, ZERO, &r))
    return r;
  return nbdserve_next_zero(next, count, offset, flags);
}

static int delay_trim(struct nbdserve_next *next, void *handle, uint64_t count,
                      uint64_t offset, uint32_t flags)
{
  (void) handle;
  int r;
  if (waits(next, TRIM, &r))
    return r;
  return nbdserve_next_trim(next, count, offset, flags);
}

static int delay_flush(struct nbdserve_next *next, void *handle, uint32_t flags)
{
  (void) handle;
  int r;
  if (waits(next, FLUSH, &r))
    return r;
  return nbdserve_next_flush(next, flags);
}

static int delay_extents(struct nbdserve_next *next, void *handle, uint64_t count,
                         uint64_t offset, uint32_t flags, struct nbdserve_extents *extents)
{
  (void) handle;
  int r;
  if (waits(next, EXTENTS, &r))
    return r;
  return nbdserve_next_extents(next, count, offset, flags, extents);
}

static int delay_cache(struct nbdserve_next *next, void *handle, uint64_t count,
                       uint64_t offset, uint32_t flags)
{
  (void) handle;
  int r;
  if (waits(next, CACHE, &r))
    return r;
  return nbdserve_next_cache(next, count, offset, flags);
}

#define DELAY_CONFIG_HELP                                                              \
  "delay-read=DELAY       delay reads (alias: rdelay)\n"                              \
  "delay-write=DELAY      delay writes (alias: wdelay); also zero and trim unless\n"  \
  "                       they have their own delay\n"                                \
  "delay-zero=DELAY, delay-trim=DELAY, delay-flush=DELAY, delay-extents=DELAY,\n"     \
  "delay-cache=DELAY      delay that kind of request\n"                               \
  "delay-open=DELAY, delay-close=DELAY\n"                                             \
  "                       delay opening or closing a connection's export\n"           \
  "DELAY is seconds (1.5) or has a unit (200ms, 250us), or is a range MIN-MAX\n"      \
  "(10ms-50ms) to draw each delay from at random.\n"                                \
  "delay-block=on         sleep in the worker thread instead of waiting without one\n" \
  "                       (to stand for a backend that blocks, such as a slow disk)"

static struct nbdserve_filter filter = {
  NBDSERVE_FILTER_INIT,
  .name = "delay",
  .longname = "add latency to requests",
  .version = "1.0",
  .description = "Add a fixed or random latency to each kind of request",
  .config_help = DELAY_CONFIG_HELP,
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .load = delay_load,
  .config = delay_config,
  .config_complete = delay_config_complete,
  .open = delay_open,
  .close = delay_close,
  .pread = delay_pread,
  .pwrite = delay_pwrite,
  .zero = delay_zero,
  .trim = delay_trim,
  .flush = delay_flush,
  .extents = delay_extents,
  .cache = delay_cache,
  .never_blocks = delay_never_blocks,
};

NBDSERVE_REGISTER_FILTER(filter)
