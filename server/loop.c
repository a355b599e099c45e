/* nbdserve - the loops and the life of the process.
 *
 * serve() starts N connection loops, each a libev loop in its own thread
 * (--loops; default, the CPUs this process may use), and runs the main
 * loop on the calling thread: signals, the listening sockets (accept.c),
 * the --run child, and shutdown.  The main loop hands each accepted
 * connection to the least-loaded connection loop: connections live long
 * and unevenly, so counting the open ones balances better than taking
 * turns, which would pile new clients onto a loop whose earlier clients
 * happen to stay.
 *
 * Shutdown (a signal, the --run child's exit, nbdserve_shutdown): the
 * main loop stops accepting and tells every connection loop to stop; a
 * stopping loop lets its connections finish what is in flight, flush
 * their replies and close, gives clients SHUTDOWN_GRACE seconds to take
 * them, and ends when its last connection is gone.  The main loop ends
 * when every connection loop has.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "conn.h"
#include "loop.h"

__thread struct loop *current_loop;

/* Seconds a stopping server waits for clients to take their replies. */
#define SHUTDOWN_GRACE 10.0

static struct loop *loops;
static unsigned nr_loops;
static unsigned loops_running; /* atomic */

static struct ev_loop *main_ev;
static ev_async shutdown_watcher, loop_ended_watcher;
static ev_signal sigint_watcher, sigterm_watcher;
static ev_child captive_watcher;
static bool shutting_down;
static int exit_status;

/* ---- A connection loop ----------------------------------------------------- */

static void kick_cb(struct ev_loop *l, ev_async *w, int revents)
{
  (void) l, (void) revents;
  struct loop *loop = w->data;
  /* Once unkicked, a connection may be kicked again (its next_kick
   * rewritten) while we walk: walk a list of our own. */
  pthread_mutex_lock(&loop->kick_lock);
  struct conn *list = loop->kick_head;
  loop->kick_head = NULL;
  for (struct conn *c = list; c; c = c->next_kick) {
    c->kicked = false;
    c->next_service = c->next_kick;
  }
  pthread_mutex_unlock(&loop->kick_lock);

  while (list) {
    struct conn *next = list->next_service;
    conn_service(list);
    list = next;
  }
}

/* While jobs are queued, look every JOB_WAIT_LIMIT_NS whether one has
 * waited too long behind a slow job (see workers.c). */
static void nudge_cb(struct ev_loop *l, ev_timer *w, int revents)
{
  (void) revents;
  if (!workers_nudge())
    ev_timer_stop(l, w);
}

static void grace_cb(struct ev_loop *l, ev_timer *w, int revents)
{
  (void) l, (void) revents;
  connections_drop_unsent(w->data, SHUTDOWN_GRACE);
}

static void loop_begin_stop(struct loop *loop)
{
  if (loop->stopping)
    return;
  loop->stopping = true;
  connections_close_all(loop);
  if (loop->nconns == 0) {
    ev_break(loop->ev, EVBREAK_ALL);
    return;
  }
  ev_timer_start(loop->ev, &loop->grace_timer);
}

/* New connections from the main loop, or the order to stop. */
static void inbox_cb(struct ev_loop *l, ev_async *w, int revents)
{
  (void) l, (void) revents;
  struct loop *loop = w->data;
  pthread_mutex_lock(&loop->inbox_lock);
  struct handoff *list = loop->inbox;
  loop->inbox = NULL;
  bool stop = loop->stop_requested;
  pthread_mutex_unlock(&loop->inbox_lock);
  while (list) {
    struct handoff *next = list->next;
    conn_start(loop, list->rfd, list->wfd);
    free(list);
    list = next;
  }
  if (stop)
    loop_begin_stop(loop);
}

static void loop_init(struct loop *loop, unsigned index, struct ev_loop *ev)
{
  loop->index = index;
  loop->ev = ev;
  pthread_mutex_init(&loop->kick_lock, NULL);
  pthread_mutex_init(&loop->inbox_lock, NULL);
  ev_async_init(&loop->kick_watcher, kick_cb);
  loop->kick_watcher.data = loop;
  ev_async_start(ev, &loop->kick_watcher);
  ev_async_init(&loop->inbox_watcher, inbox_cb);
  loop->inbox_watcher.data = loop;
  ev_async_start(ev, &loop->inbox_watcher);
  ev_timer_init(&loop->nudge_timer, nudge_cb, JOB_WAIT_LIMIT_NS / 1e9, JOB_WAIT_LIMIT_NS / 1e9);
  ev_timer_init(&loop->grace_timer, grace_cb, SHUTDOWN_GRACE, 0.);
  loop->grace_timer.data = loop;
}

/* Busy polling takes a whole CPU while it lasts: beyond the first loop
 * (which busypoll.c itself keeps off on one CPU or under a quota of
 * less than two), one polling loop per CPU left over. */
static unsigned busy_poll_for(const struct loop *loop)
{
  if (!run_inline)
    return 0; /* workers finish requests on other threads and wake the loop */
  if (loop->index > 0 && loop->index + 1 >= usable_cpus()) {
    if (opt.busy_poll_us)
      nbdserve_debug("busy polling: off on loop %u, no CPU to spare for it", loop->index);
    return 0;
  }
  return opt.busy_poll_us;
}

static void *loop_main(void *arg)
{
  struct loop *loop = arg;
  current_loop = loop;
  busy_poll_setup(loop->ev, busy_poll_for(loop));
  ev_run(loop->ev, 0);
  busy_poll_report();
  __atomic_sub_fetch(&loops_running, 1, __ATOMIC_RELAXED);
  ev_async_send(main_ev, &loop_ended_watcher);
  return NULL;
}

static void start_loops(unsigned n)
{
  /* aligned_alloc: each loop's counters start a cache line of their own. */
  loops = aligned_alloc(_Alignof(struct loop), n * sizeof *loops);
  if (loops == NULL)
    die("out of memory");
  memset(loops, 0, n * sizeof *loops);
  /* The loop threads leave the asynchronous signals (SIGINT, SIGTERM,
   * SIGCHLD...) to the main thread; faults stay unblocked, so that a
   * crash in a loop thread is still reported as one. */
  sigset_t async, old;
  sigfillset(&async);
  static const int faults[] = { SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS };
  for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++)
    sigdelset(&async, faults[i]);
  pthread_sigmask(SIG_BLOCK, &async, &old);
  for (unsigned i = 0; i < n; i++) {
    struct ev_loop *ev = ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
    if (ev == NULL)
      die("cannot create event loop %u (libev)", i);
    loop_init(&loops[i], i, ev);
    loops[i].has_thread = true;
    __atomic_add_fetch(&loops_running, 1, __ATOMIC_RELAXED);
    int err = pthread_create(&loops[i].thread, NULL, loop_main, &loops[i]);
    if (err != 0)
      die("cannot start the thread of loop %u: %s", i, strerror(err));
    /* Named here, before anyone can connect, so that top -H and
     * /proc/PID/task/TID/comm show the loops from the start. */
    char name[16];
    snprintf(name, sizeof name, "loop-%u", i);
    pthread_setname_np(loops[i].thread, name);
    nr_loops++;
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  nbdserve_debug("%u connection loop%s", n, n == 1 ? "" : "s");
}

unsigned loops_count(void)
{
  return nr_loops;
}

void loops_sum_counters(struct counters *sum)
{
  memset(sum, 0, sizeof *sum);
  for (unsigned i = 0; i < nr_loops; i++) {
    const struct counters *c = &loops[i].counters;
    for (int k = 0; k < NR_KINDS; k++)
      sum->requests[k] += __atomic_load_n(&c->requests[k], __ATOMIC_RELAXED);
    sum->bytes_read += __atomic_load_n(&c->bytes_read, __ATOMIC_RELAXED);
    sum->bytes_written += __atomic_load_n(&c->bytes_written, __ATOMIC_RELAXED);
  }
}

static void join_loops(void)
{
  for (unsigned i = 0; i < nr_loops; i++) {
    pthread_join(loops[i].thread, NULL);
    ev_loop_destroy(loops[i].ev);
    pthread_mutex_destroy(&loops[i].kick_lock);
    pthread_mutex_destroy(&loops[i].inbox_lock);
  }
  free(loops);
  loops = NULL;
  nr_loops = 0;
}

/* Main loop: give a new connection to the loop with the fewest. */
static void hand_over(int rfd, int wfd)
{
  struct loop *best = &loops[0];
  for (unsigned i = 1; i < nr_loops; i++)
    if (__atomic_load_n(&loops[i].load, __ATOMIC_RELAXED) <
        __atomic_load_n(&best->load, __ATOMIC_RELAXED))
      best = &loops[i];
  struct handoff *h = malloc(sizeof *h);
  if (h == NULL) {
    nbdserve_error("out of memory for a new connection");
    close(rfd);
    if (wfd != rfd)
      close(wfd);
    connection_closed();
    return;
  }
  h->rfd = rfd;
  h->wfd = wfd;
  __atomic_add_fetch(&best->load, 1, __ATOMIC_RELAXED);
  h->next = NULL;
  pthread_mutex_lock(&best->inbox_lock);
  struct handoff **tail = &best->inbox; /* in accept order; the inbox is short */
  while (*tail)
    tail = &(*tail)->next;
  *tail = h;
  pthread_mutex_unlock(&best->inbox_lock);
  ev_async_send(best->ev, &best->inbox_watcher);
}

static void adopt_accepted(int fd)
{
  hand_over(fd, fd);
}

/* ---- Shutdown and signals --------------------------------------------- */

static void wake_main_loop(void)
{
  ev_async_send(main_ev, &shutdown_watcher);
}

static void begin_shutdown(void)
{
  if (shutting_down)
    return;
  shutting_down = true;
  nbdserve_debug("shutting down: finishing requests in flight");
  accept_stop();
  for (unsigned i = 0; i < nr_loops; i++) {
    pthread_mutex_lock(&loops[i].inbox_lock);
    loops[i].stop_requested = true;
    pthread_mutex_unlock(&loops[i].inbox_lock);
    ev_async_send(loops[i].ev, &loops[i].inbox_watcher);
  }
}

static void shutdown_cb(struct ev_loop *l, ev_async *w, int revents)
{
  (void) l, (void) w, (void) revents;
  begin_shutdown();
}

static void loop_ended_cb(struct ev_loop *l, ev_async *w, int revents)
{
  (void) w, (void) revents;
  if (__atomic_load_n(&loops_running, __ATOMIC_RELAXED) == 0)
    ev_break(l, EVBREAK_ALL);
}

static void signal_cb(struct ev_loop *l, ev_signal *w, int revents)
{
  (void) l, (void) revents;
  nbdserve_debug("signal %d received", w->signum);
  begin_shutdown();
}

static void captive_cb(struct ev_loop *l, ev_child *w, int revents)
{
  (void) revents;
  ev_child_stop(l, w);
  if (WIFEXITED(w->rstatus))
    exit_status = WEXITSTATUS(w->rstatus);
  else if (WIFSIGNALED(w->rstatus)) {
    nbdserve_error("--run command killed by signal %d", WTERMSIG(w->rstatus));
    exit_status = 128 + WTERMSIG(w->rstatus);
  }
  else
    exit_status = EXIT_FAILURE;
  begin_shutdown();
}

/* ---- Entry ------------------------------------------------------------- */

/* For the fuzzing harnesses: serve one connection on RFD/WFD (made
 * non-blocking here) in the calling thread, and return once it closed.
 * The first call sets up one loop on this thread; the chain must be
 * configured. */
void serve_one_connection(int rfd, int wfd)
{
  static struct loop only;
  if (only.ev == NULL) {
    signal(SIGPIPE, SIG_IGN);
    exec_setup();
    loop_init(&only, 0, ev_default_loop(EVFLAG_AUTO | EVFLAG_NOSIGMASK));
    if (only.ev == NULL)
      die("cannot initialise the event loop (libev)");
    current_loop = &only;
    busy_poll_setup(only.ev, 0);
    only.exit_when_empty = true;
  }
  fcntl(rfd, F_SETFL, fcntl(rfd, F_GETFL) | O_NONBLOCK);
  if (wfd != rfd)
    fcntl(wfd, F_SETFL, fcntl(wfd, F_GETFL) | O_NONBLOCK);
  connection_opened();
  __atomic_add_fetch(&only.load, 1, __ATOMIC_RELAXED);
  conn_start(&only, rfd, wfd);
  if (only.nconns > 0)
    ev_run(only.ev, 0);
}

/* -s: the one connection is stdin/stdout; the server stops after it. */
static void serve_stdio(void)
{
  int rfd = dup(STDIN_FILENO), wfd = dup(STDOUT_FILENO);
  if (rfd < 0 || wfd < 0)
    die("-s: cannot use stdin/stdout: %s", strerror(errno));
  fcntl(rfd, F_SETFL, fcntl(rfd, F_GETFL) | O_NONBLOCK);
  fcntl(wfd, F_SETFL, fcntl(wfd, F_GETFL) | O_NONBLOCK);
  /* stdout must not receive anything else from now on. */
  int devnull = open("/dev/null", O_WRONLY);
  if (devnull >= 0) {
    dup2(devnull, STDOUT_FILENO);
    close(devnull);
  }
  connection_opened();
  hand_over(rfd, wfd);
}

int serve(const int *listen_fds, size_t nfds, int control_fd)
{
  signal(SIGPIPE, SIG_IGN);
  stats_start();
  main_ev = ev_default_loop(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
  if (main_ev == NULL)
    die("cannot initialise the event loop (libev)");
  exec_setup();
  ev_async_init(&shutdown_watcher, shutdown_cb);
  ev_async_start(main_ev, &shutdown_watcher);
  shutdown_set_waker(wake_main_loop);
  ev_async_init(&loop_ended_watcher, loop_ended_cb);
  ev_async_start(main_ev, &loop_ended_watcher);
  start_loops(opt.single ? 1 : opt.loops);

  ev_signal_init(&sigint_watcher, signal_cb, SIGINT);
  ev_signal_start(main_ev, &sigint_watcher);
  ev_signal_init(&sigterm_watcher, signal_cb, SIGTERM);
  ev_signal_start(main_ev, &sigterm_watcher);
  accept_start(main_ev, listen_fds, nfds, adopt_accepted, opt.single ? begin_shutdown : NULL);
  if (opt.single)
    serve_stdio();
  if (control_fd >= 0)
    control_start(main_ev, control_fd);

  if (opt.run) {
    pid_t pid = captive_start();
    ev_child_init(&captive_watcher, captive_cb, pid, 0);
    ev_child_start(main_ev, &captive_watcher);
  }

  /* Told to stop before the loop ran (--exit-with-parent whose parent
   * already left, a signal during start-up): stop from inside the loop,
   * since ev_run forgets an ev_break made before it started. */
  if (shutdown_requested())
    ev_async_send(main_ev, &shutdown_watcher);
  ev_run(main_ev, 0);

  join_loops();
  exec_finish();
  control_finish(); /* after the workers: no command is left running */
  accept_finish();
  for (size_t i = 0; i < nfds; i++)
    close(listen_fds[i]);
  return exit_status;
}
