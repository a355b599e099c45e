/* nbdserve error filter: make requests fail on purpose.
 *
 * Each kind of request (pread, pwrite, zero, trim, flush, extents, cache)
 * has its own rule: which errno to fail with, how often (a probability
 * between 0 and 1), and an optional trigger file so that errors happen
 * only while that file exists.  error=, error-rate= and error-file= set
 * the rule of every kind at once; error-KIND*= set one kind and win over
 * the general ones whatever their order on the command line.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "nbdserve-filter.h"
#include "fastrandom.h"

enum kind { PREAD, PWRITE, ZERO, TRIM, FLUSH, EXTENTS, CACHE, NR_KINDS };

static const char *const kind_names[NR_KINDS] = {
  "pread", "pwrite", "zero", "trim", "flush", "extents", "cache",
};

/* One optional setting: general (error=) or kind-specific (error-pread=). */
struct rule {
  int err;          /* 0: not set */
  double rate;      /* < 0: not set */
  const char *file; /* NULL: not set; owned by the command line */
};

static struct rule general = { .err = 0, .rate = -1, .file = NULL };
static struct rule rules[NR_KINDS];

static const struct {
  const char *name;
  int err;
} errno_names[] = {
  { "EPERM", EPERM },   { "EIO", EIO },         { "ENOMEM", ENOMEM },
  { "EINVAL", EINVAL }, { "ENOSPC", ENOSPC },   { "EOVERFLOW", EOVERFLOW },
  { "ENOTSUP", ENOTSUP }, { "ESHUTDOWN", ESHUTDOWN },
};

static int error_load(void)
{
  for (int k = 0; k < NR_KINDS; k++)
    rules[k] = (struct rule){ .err = 0, .rate = -1, .file = NULL };
  return 0;
}

static int parse_errno(const char *key, const char *value, int *err)
{
  for (size_t i = 0; i < sizeof errno_names / sizeof errno_names[0]; i++)
    if (strcasecmp(value, errno_names[i].name) == 0) {
      *err = errno_names[i].err;
      return 0;
    }
  nbdserve_error("%s=%s: not an error this filter can inject "
                 "(EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN)",
                 key, value);
  return -1;
}

/* A probability: 0.25, 1, or a percentage such as 25%. */
static int parse_rate(const char *key, const char *value, double *rate)
{
  char *end;
  errno = 0;
  double r = strtod(value, &end);
  if (errno == 0 && end != value && *end == '%' && end[1] == '\0')
    r /= 100, end++;
  if (errno || end == value || *end != '\0' || !(r >= 0 && r <= 1)) {
    nbdserve_error("%s=%s: expected a probability from 0 to 1, or a percentage", key, value);
    return -1;
  }
  *rate = r;
  return 0;
}

/* Apply KEY's SUFFIX ("", "-rate" or "-file") to RULE. */
static int set_rule(struct rule *rule, const char *key, const char *suffix, const char *value)
{
  if (*suffix == '\0')
    return parse_errno(key, value, &rule->err);
  if (strcmp(suffix, "-rate") == 0)
    return parse_rate(key, value, &rule->rate);
  if (strcmp(suffix, "-file") == 0) {
    if (*value == '\0') {
      nbdserve_error("%s: the trigger file name is empty", key);
      return -1;
    }
    rule->file = value;
    return 0;
  }
  return 1; /* not a suffix of ours */
}

static int error_config(const char *key, const char *value)
{
  if (strncmp(key, "error", 5) != 0)
    return 0;
  const char *rest = key + 5;

  int r = set_rule(&general, key, rest, value);
  if (r <= 0)
    return r < 0 ? -1 : 1;
  if (*rest == '-') {
    for (int k = 0; k < NR_KINDS; k++) {
      size_t n = strlen(kind_names[k]);
      if (strncmp(rest + 1, kind_names[k], n) == 0) {
        r = set_rule(&rules[k], key, rest + 1 + n, value);
        if (r <= 0)
          return r < 0 ? -1 : 1;
      }
    }
  }
  return 0; /* error-something we do not know: let the plugin refuse it */
}

/* Fill each kind's unset fields from the general rule. */
static int error_config_complete(void)
{
  for (int k = 0; k < NR_KINDS; k++) {
    struct rule *r = &rules[k];
    if (r->err == 0)
      r->err = general.err ? general.err : EIO;
    if (r->rate < 0)
      r->rate = general.rate >= 0 ? general.rate : 0;
    if (r->file == NULL)
      r->file = general.file;
    if (r->rate > 0)
      nbdserve_debug("error: %s fails with errno %d at rate %g%s%s", kind_names[k],
                     r->err, r->rate, r->file ? " while this file exists: " : "",
                     r->file ? r->file : "");
  }
  return 0;
}

/* Returns true (with the error set) if this request must fail. */
static bool inject(enum kind k)
{
  const struct rule *r = &rules[k];
  if (r->rate <= 0)
    return false;
  if (r->file && access(r->file, F_OK) != 0)
    return false;
  if (r->rate < 1 && fastrandom_unit() >= r->rate)
    return false;
  nbdserve_debug("error: injecting errno %d into %s", r->err, kind_names[k]);
  nbdserve_set_error(r->err);
  errno = r->err;
  return true;
}

static int error_pread(struct nbdserve_next *next, void *handle, void *buf, uint32_t count,
                       uint64_t offset, uint32_t flags)
{
  (void) handle;
  return inject(PREAD) ? -1 : nbdserve_next_pread(next, buf, count, offset, flags);
}

static int error_pwrite(struct nbdserve_next *next, void *handle, const void *buf,
                        uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) handle;
  return inject(PWRITE) ? -1 : nbdserve_next_pwrite(next, buf, count, offset, flags);
}

static int error_zero(struct nbdserve_next *next, void *handle, uint64_t count,
                      uint64_t offset, uint32_t flags)
{
  (void) handle;
  return inject(ZERO) ? -1 : nbdserve_next_zero(next, count, offset, flags);
}

static int error_trim(struct nbdserve_next *next, void *handle, uint64_t count,
                      uint64_t offset, uint32_t flags)
{
  (void) handle;
  return inject(TRIM) ? -1 : nbdserve_next_trim(next, count, offset, flags);
}

static int error_flush(struct nbdserve_next *next, void *handle, uint32_t flags)
{
  (void) handle;
  return inject(FLUSH) ? -1 : nbdserve_next_flush(next, flags);
}

static int error_extents(struct nbdserve_next *next, void *handle, uint64_t count,
                         uint64_t offset, uint32_t flags, struct nbdserve_extents *extents)
{
  (void) handle;
  return inject(EXTENTS) ? -1 : nbdserve_next_extents(next, count, offset, flags, extents);
}

static int error_cache(struct nbdserve_next *next, void *handle, uint64_t count,
                       uint64_t offset, uint32_t flags)
{
  (void) handle;
  return inject(CACHE) ? -1 : nbdserve_next_cache(next, count, offset, flags);
}

#define ERROR_CONFIG_HELP                                                              \
  "error=ERRNO            errno to inject: EIO (default), EPERM, ENOMEM, EINVAL,\n"   \
  "                       ENOSPC, EOVERFLOW, ENOTSUP or ESHUTDOWN\n"                  \
  "error-rate=P           probability of failing a request, 0..1 or N% (default 0)\n" \
  "error-file=PATH        inject errors only while PATH exists\n"                     \
  "error-KIND=ERRNO, error-KIND-rate=P, error-KIND-file=PATH\n"                       \
  "                       the same for one KIND of request only: pread, pwrite,\n"    \
  "                       zero, trim, flush, extents or cache"

static struct nbdserve_filter filter = {
  NBDSERVE_FILTER_INIT,
  .name = "error",
  .longname = "make requests fail on purpose",
  .version = "1.0",
  .description = "Fail chosen requests with a chosen errno, at a rate or on a trigger file",
  .config_help = ERROR_CONFIG_HELP,
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  /* access() is a system call, but a cheap one that never waits on I/O
   * for long: the filter does not make a non-blocking chain blocking. */
  .flags = NBDSERVE_FILTER_NEVER_BLOCKS,
  .load = error_load,
  .config = error_config,
  .config_complete = error_config_complete,
  .pread = error_pread,
  .pwrite = error_pwrite,
  .zero = error_zero,
  .trim = error_trim,
  .flush = error_flush,
  .extents = error_extents,
  .cache = error_cache,
};

NBDSERVE_REGISTER_FILTER(filter)
