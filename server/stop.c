/* nbdserve - asking the server to stop.
 *
 * Anything may ask (a signal handler, --exit-with-parent, a plugin
 * through nbdserve_shutdown, any thread): request_shutdown records the
 * request and calls the waker the main loop registered, which only
 * sends an ev_async, so it is async-signal-safe.  Kept apart from
 * loop.c so that what asks does not depend on what carries it out.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <signal.h>

#include "internal.h"

static volatile sig_atomic_t requested;
static void (*volatile waker)(void);

void request_shutdown(void)
{
  requested = 1;
  void (*wake)(void) = waker;
  if (wake)
    wake();
}

bool shutdown_requested(void)
{
  return requested;
}

void shutdown_set_waker(void (*wake)(void))
{
  waker = wake;
}
