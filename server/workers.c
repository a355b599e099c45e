/* nbdserve - the worker pool that runs backend calls, which may block.
 *
 * A FIFO of jobs under one mutex.  Waking a sleeping thread costs
 * several microseconds (more inside a VM), as much as a whole request
 * to a fast backend such as a file in the page cache.  So the pool
 * wakes a helper only when the work waiting is worth it: when nobody is
 * awake to take the job, or when the jobs waiting per awake worker,
 * times the time a job has been taking lately, come to more than
 * WAKE_WORTH_NS.  A fast backend is then served by one thread taking
 * job after job with no hand-off; a slow one (a disk) gets every worker.
 *
 * A job that is slow for once (a flush) must not hold up the fast jobs
 * queued behind it: the loop thread calls workers_nudge() while jobs are
 * queued, and a job that has waited JOB_WAIT_LIMIT_NS gets a worker of
 * its own.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Waiting work worth waking a thread for. */
#define WAKE_WORTH_NS 40000

static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_cond = PTHREAD_COND_INITIALIZER;
static struct job *queue_head, *queue_tail;
static unsigned queued; /* jobs in the queue */
static unsigned sleeping; /* workers waiting on queue_cond */
static unsigned signalled; /* of those, signalled and not yet running */
static uint64_t job_ns = WAKE_WORTH_NS; /* recent time per job, smoothed */
static bool stopping;
static pthread_t *threads;
static unsigned nr_threads;

/* Smoothed over about eight jobs, but a long job counts at once: the
 * pool must spread out as soon as the backend starts blocking. */
static void note_job_time(uint64_t ns)
{
  job_ns = ns > job_ns ? ns : job_ns - job_ns / 8 + ns / 8;
}

/* queue_lock held: is a sleeping worker there to be woken, and not
 * already on its way? */
static bool can_wake(void)
{
  return sleeping > signalled;
}

/* queue_lock held: wake one more worker for what is queued? */
static bool helper_worth_waking(void)
{
  if (queued == 0 || !can_wake())
    return false;
  unsigned awake = nr_threads - sleeping + signalled;
  if (awake == 0)
    return true;
  return (uint64_t) queued * job_ns / awake > WAKE_WORTH_NS;
}

static void *worker_main(void *arg)
{
  (void) arg;
  pthread_mutex_lock(&queue_lock);
  for (;;) {
    while (queue_head == NULL && !stopping) {
      sleeping++;
      pthread_cond_wait(&queue_cond, &queue_lock);
      sleeping--;
      if (signalled > 0)
        signalled--;
    }
    struct job *job = queue_head;
    if (job == NULL)
      break; /* stopping and drained */
    queue_head = job->next;
    if (queue_head == NULL)
      queue_tail = NULL;
    queued--;
    pthread_mutex_unlock(&queue_lock);
    uint64_t start = now_ns();
    job->run(job);
    uint64_t took = now_ns() - start;
    pthread_mutex_lock(&queue_lock);
    note_job_time(took);
  }
  pthread_mutex_unlock(&queue_lock);
  return NULL;
}

void workers_start(unsigned nthreads)
{
  if (nthreads == 0)
    nthreads = 1;
  threads = calloc(nthreads, sizeof *threads);
  if (threads == NULL)
    die("cannot allocate worker threads: %s", strerror(errno));
  pthread_mutex_lock(&queue_lock);
  for (unsigned i = 0; i < nthreads; i++) {
    int err = pthread_create(&threads[i], NULL, worker_main, NULL);
    if (err != 0)
      die("cannot start worker thread: %s", strerror(err));
    pthread_setname_np(threads[i], "worker");
    nr_threads++;
  }
  pthread_mutex_unlock(&queue_lock);
}

/* Jobs the loop thread parsed from one read, held back so that they
 * enter the queue under one lock and the wake-ups are decided for the
 * whole batch (see workers_hold).  Each loop thread holds its own. */
static __thread struct job *held_head, *held_tail;
static __thread unsigned nr_held;
static __thread bool holding;

void workers_hold(void)
{
  holding = true;
}

void workers_release(void)
{
  holding = false;
  if (held_head == NULL)
    return;
  pthread_mutex_lock(&queue_lock);
  if (queue_tail)
    queue_tail->next = held_head;
  else
    queue_head = held_head;
  queue_tail = held_tail;
  queued += nr_held;
  unsigned wake = 0;
  while (helper_worth_waking()) {
    signalled++;
    wake++;
  }
  pthread_mutex_unlock(&queue_lock);
  held_head = held_tail = NULL;
  nr_held = 0;
  while (wake-- > 0)
    pthread_cond_signal(&queue_cond);
}

void workers_submit(struct job *job)
{
  job->next = NULL;
  job->queued_at = now_ns();
  if (holding) {
    if (held_tail)
      held_tail->next = job;
    else
      held_head = job;
    held_tail = job;
    nr_held++;
    return;
  }
  workers_hold();
  workers_submit(job);
  workers_release();
}

bool workers_nudge(void)
{
  pthread_mutex_lock(&queue_lock);
  bool wake = queue_head && can_wake() && now_ns() - queue_head->queued_at >= JOB_WAIT_LIMIT_NS;
  if (wake)
    signalled++;
  bool more = queue_head != NULL;
  pthread_mutex_unlock(&queue_lock);
  if (wake) {
    pthread_cond_signal(&queue_cond);
    nbdserve_debug("a job waited over %d µs behind busy workers: waking another",
                   JOB_WAIT_LIMIT_NS / 1000);
  }
  return more;
}

void workers_stop(void)
{
  pthread_mutex_lock(&queue_lock);
  stopping = true;
  pthread_cond_broadcast(&queue_cond);
  pthread_mutex_unlock(&queue_lock);
  for (unsigned i = 0; i < nr_threads; i++)
    pthread_join(threads[i], NULL);
  free(threads);
  threads = NULL;
  nr_threads = 0;
}

unsigned workers_count(void)
{
  return __atomic_load_n(&nr_threads, __ATOMIC_RELAXED);
}
