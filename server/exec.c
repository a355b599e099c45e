/* nbdserve - running chain calls: where, and under which lock.
 *
 * dispatch_job decides where a job runs: on the calling loop's thread
 * when the whole chain never blocks, else on the worker pool (with the
 * loop's nudge timer watching for jobs stuck behind a slow one).
 *
 * exec_begin/exec_end are the one place that takes the lock the chain's
 * thread model asks for and sets the connection's identity on the
 * calling thread, for every kind of call: handshake options (open and
 * the capability queries included), oldstyle opening, requests, close.
 *   SERIALIZE_CONNECTIONS, SERIALIZE_ALL_REQUESTS: one lock for the
 *     whole server around every call (the first model also accepts one
 *     connection at a time, see accept.c);
 *   SERIALIZE_REQUESTS: a request holds its connection's lock; the
 *     connection's other calls need none, since its options and its
 *     close never overlap its requests;
 *   PARALLEL: no lock.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include "conn.h"
#include "loop.h"

bool run_inline;
int thread_model;
static bool workers_running;
static pthread_mutex_t all_requests_lock = PTHREAD_MUTEX_INITIALIZER;

void exec_setup(void)
{
  thread_model = chain_thread_model();
  run_inline = !opt.no_inline && chain_never_blocks();
  if (!run_inline) {
    workers_start(opt.threads);
    workers_running = true;
  }
  else if (opt.control && commands_count() > 0) {
    /* A plugin's control command may block, and must never run on a
     * loop: one worker, asleep until a command comes, serves them.  The
     * requests still run inline (dispatch_job looks at run_inline). */
    workers_start(1);
    workers_running = true;
  }
  nbdserve_debug("thread model %d, requests run %s", thread_model,
                 run_inline ? "on the loop threads"
                 : opt.no_inline ? "on worker threads (--no-inline)" : "on worker threads");
}

void exec_finish(void)
{
  if (workers_running)
    workers_stop();
  workers_running = false;
}

void dispatch_job(struct job *job)
{
  if (run_inline) {
    job->run(job);
    return;
  }
  workers_submit(job);
  struct loop *loop = current_loop;
  if (loop && !ev_is_active(&loop->nudge_timer))
    ev_timer_start(loop->ev, &loop->nudge_timer);
}

pthread_mutex_t *exec_begin(struct conn *conn, enum call_kind kind)
{
  pthread_mutex_t *lock = NULL;
  if (thread_model <= NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS)
    lock = &all_requests_lock;
  else if (thread_model == NBDSERVE_THREAD_MODEL_SERIALIZE_REQUESTS && kind == CALL_REQUEST)
    lock = &conn->request_lock;
  if (lock)
    pthread_mutex_lock(lock);
  current_identity = &conn->identity;
  return lock;
}

void exec_end(pthread_mutex_t *lock)
{
  current_identity = NULL;
  if (lock)
    pthread_mutex_unlock(lock);
}

void exec_close(struct conn *conn)
{
  if (conn->top == NULL)
    return;
  if (conn->export_counted) {
    stats_export_closed(conn->export_name);
    conn->export_counted = false;
  }
  pthread_mutex_t *lock = exec_begin(conn, CALL_CONNECTION);
  chain_close(conn->top);
  conn->top = NULL;
  exec_end(lock);
}
