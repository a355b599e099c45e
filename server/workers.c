/* nbdserve - the worker pool that runs backend calls, which may block.
 *
 * A plain FIFO of jobs under one mutex.  Submitting wakes one sleeping
 * worker only when there is one: a busy pool takes new jobs without any
 * futex traffic.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_cond = PTHREAD_COND_INITIALIZER;
static struct job *queue_head, *queue_tail;
static unsigned sleeping;
static bool stopping;
static pthread_t *threads;
static unsigned nr_threads;

static void *worker_main(void *arg)
{
  (void) arg;
  pthread_mutex_lock(&queue_lock);
  for (;;) {
    while (queue_head == NULL && !stopping) {
      sleeping++;
      pthread_cond_wait(&queue_cond, &queue_lock);
      sleeping--;
    }
    struct job *job = queue_head;
    if (job == NULL)
      break; /* stopping and drained */
    queue_head = job->next;
    if (queue_head == NULL)
      queue_tail = NULL;
    pthread_mutex_unlock(&queue_lock);
    job->run(job);
    pthread_mutex_lock(&queue_lock);
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
  for (unsigned i = 0; i < nthreads; i++) {
    int err = pthread_create(&threads[i], NULL, worker_main, NULL);
    if (err != 0)
      die("cannot start worker thread: %s", strerror(err));
    nr_threads++;
  }
}

void workers_submit(struct job *job)
{
  job->next = NULL;
  pthread_mutex_lock(&queue_lock);
  if (queue_tail)
    queue_tail->next = job;
  else
    queue_head = job;
  queue_tail = job;
  bool wake = sleeping > 0;
  pthread_mutex_unlock(&queue_lock);
  if (wake)
    pthread_cond_signal(&queue_cond);
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
