/* nbdserve - adaptive busy polling of the loop thread.
 *
 * When requests run on the loop thread (a backend that never blocks),
 * a busy client sends the next request soon after it reads a reply: a
 * few microseconds when it keeps many in flight, a few tens when it
 * waits for each reply.  If the loop thread went to sleep in epoll_wait
 * in between, that send pays for waking it, and so do we.  The scheduler
 * round trip costs about as much as serving a 4K read from memory, on
 * both CPUs; in a VM, where a CPU with nothing to run is handed back to
 * the host, waking it again costs tens of microseconds more, which more
 * than doubles the latency of a read from memory.
 *
 * So the loop learns how long it usually sits idle between two inputs
 * (the smoothed gap between reads, less the smoothed time it spends on
 * each).  While that is shorter than the limit (--busy-poll, 100 us by
 * default), it polls without blocking after each input, for twice that
 * idle time: an ev_idle watcher makes libev poll with a zero timeout.
 * Input that arrives in the window is taken without a wake-up; if none
 * does, the loop sleeps as usual.  Spinning stops within a couple of
 * idle times of the last input, and never starts at a light load, where
 * the idle time is long.
 *
 * Each connection loop polls on its own, with its own state (thread-local
 * below); loop.c decides which loops may poll at all.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <ev.h>

#include "internal.h"

/* A gap longer than this counts as this much: one pause after a burst
 * must not keep the average high for long. */
#define GAP_SAMPLE_CAP_NS 1000000
/* Likewise, one long callback (a large request, or the thread was
 * preempted) says nothing about how soon the next input comes. */
#define WORK_SAMPLE_CAP_NS 100000
#define SPIN_MIN_NS 2000

static __thread struct ev_loop *poll_loop;
static __thread ev_idle spin_watcher;
static __thread uint64_t idle_limit_ns; /* spin while the idle time is shorter; 0: never */
static __thread uint64_t last_begin_ns;
static __thread uint64_t gap_ns = GAP_SAMPLE_CAP_NS; /* between inputs, smoothed */
static __thread uint64_t work_ns; /* handling one input, smoothed */
static __thread uint64_t spin_until_ns;
static __thread uint64_t spin_started_ns;

/* For the debug report at exit. */
static __thread struct {
  uint64_t inputs;
  uint64_t caught; /* inputs that arrived while spinning */
  uint64_t slept; /* windows that ran out: the loop went to sleep */
  uint64_t spin_ns; /* time with the watcher active */
} stats;

static void spin_stop(uint64_t now)
{
  ev_idle_stop(poll_loop, &spin_watcher);
  stats.spin_ns += now - spin_started_ns;
}

/* Called once per loop iteration that found nothing to do. */
static void spin_cb(struct ev_loop *l, ev_idle *w, int revents)
{
  (void) l, (void) w, (void) revents;
  uint64_t now = now_ns();
  if (now >= spin_until_ns) {
    spin_stop(now);
    stats.slept++;
  }
}

/* Spinning takes a whole CPU: on the only CPU we may run on, it would
 * starve the client; under a quota of less than two CPUs, it would use
 * up the quota and get the whole process throttled. */
static bool have_spare_cpu(void)
{
  if (affinity_cpus() < 2) {
    nbdserve_debug("busy polling: off, this process may use one CPU only");
    return false;
  }
  double quota = cgroup_cpu_quota();
  if (quota > 0 && quota < 2) {
    nbdserve_debug("busy polling: off, the cgroup's CPU quota is %.2f CPUs", quota);
    return false;
  }
  return true;
}

void busy_poll_setup(struct ev_loop *loop, unsigned idle_limit_us)
{
  poll_loop = loop;
  idle_limit_ns = (uint64_t) idle_limit_us * 1000;
  if (idle_limit_ns > 0 && !have_spare_cpu())
    idle_limit_ns = 0;
  ev_idle_init(&spin_watcher, spin_cb);
}

uint64_t busy_poll_work_begins(void)
{
  if (idle_limit_ns == 0)
    return 0;
  uint64_t now = now_ns();
  uint64_t gap = MIN(now - last_begin_ns, GAP_SAMPLE_CAP_NS);
  last_begin_ns = now;
  /* Smoothed over about eight inputs. */
  gap_ns = gap_ns - gap_ns / 8 + gap / 8;
  stats.inputs++;
  if (ev_is_active(&spin_watcher))
    stats.caught++;
  return now;
}

void busy_poll_work_ends(uint64_t began)
{
  if (idle_limit_ns == 0)
    return;
  uint64_t now = now_ns();
  uint64_t work = MIN(now - began, WORK_SAMPLE_CAP_NS);
  work_ns = work_ns - work_ns / 8 + work / 8;

  /* How long the loop will likely sit idle before the next input. */
  uint64_t idle = gap_ns > work_ns ? gap_ns - work_ns : 0;
  bool spinning = ev_is_active(&spin_watcher);
  if (idle < idle_limit_ns) {
    spin_until_ns = now + 2 * idle + SPIN_MIN_NS;
    if (!spinning) {
      spin_started_ns = now;
      ev_idle_start(poll_loop, &spin_watcher);
    }
  }
  else if (spinning)
    spin_stop(now);
}

void busy_poll_report(void)
{
  if (idle_limit_ns == 0) {
    nbdserve_debug("busy polling: off");
    return;
  }
  if (ev_is_active(&spin_watcher))
    spin_stop(now_ns());
  nbdserve_debug("busy polling: %llu inputs, %llu of them caught while polling; "
                 "%llu polling windows ran out; %.1f ms spent polling",
                 (unsigned long long) stats.inputs, (unsigned long long) stats.caught,
                 (unsigned long long) stats.slept, stats.spin_ns / 1e6);
}
