/* nbdserve - logging: errors always, debug messages with -v.
 *
 * Each message leaves in one write(2) so that lines from different
 * threads never interleave.  After daemonizing, messages go to syslog.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include "internal.h"

static bool use_syslog;

void log_to_syslog(void)
{
  openlog(PROGRAM_NAME, LOG_PID, LOG_DAEMON);
  use_syslog = true;
}

static void emit(int priority, const char *prefix, const char *fmt, va_list args)
{
  int saved_errno = errno;
  char line[1024];

  if (use_syslog) {
    vsnprintf(line, sizeof line, fmt, args);
    syslog(priority, "%s", line);
    errno = saved_errno;
    return;
  }
  int n = snprintf(line, sizeof line, PROGRAM_NAME ": %s", prefix);
  if (n < 0)
    n = 0;
  int m = vsnprintf(line + n, sizeof line - (size_t) n, fmt, args);
  size_t len = (size_t) n + (m > 0 ? (size_t) m : 0);
  if (len > sizeof line - 2)
    len = sizeof line - 2; /* truncated: keep room for the newline */
  line[len++] = '\n';
  ssize_t ignored = write(STDERR_FILENO, line, len);
  (void) ignored;
  errno = saved_errno;
}

void nbdserve_verror(const char *fmt, va_list args)
{
  emit(LOG_ERR, "", fmt, args);
}

void nbdserve_error(const char *fmt, ...)
{
  va_list args;
  va_start(args, fmt);
  nbdserve_verror(fmt, args);
  va_end(args);
}

void nbdserve_vdebug(const char *fmt, va_list args)
{
  if (__atomic_load_n(&opt.verbose, __ATOMIC_RELAXED)) /* set-verbose may change it */
    emit(LOG_DEBUG, "debug: ", fmt, args);
}

void nbdserve_debug(const char *fmt, ...)
{
  if (!__atomic_load_n(&opt.verbose, __ATOMIC_RELAXED))
    return;
  va_list args;
  va_start(args, fmt);
  nbdserve_vdebug(fmt, args);
  va_end(args);
}

void die(const char *fmt, ...)
{
  va_list args;
  va_start(args, fmt);
  nbdserve_verror(fmt, args);
  va_end(args);
  exit(EXIT_FAILURE);
}
