/* nbdserve - accepting connections, on the main loop.
 *
 * The listening sockets live on the main loop.  accept_cb takes a batch
 * of waiting clients, refuses those over --max-connections or outside
 * --allow/--deny, and hands each of the others to a connection loop
 * through the function given to accept_start.  The count of open
 * connections is the process's, kept here: connection loops report each
 * close with connection_closed(), which wakes the main loop to resume
 * accepting (a plugin that serializes connections takes one at a time)
 * and to tell whoever asked when the last connection is gone.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"

static struct ev_loop *main_ev;
static ev_io *listen_watchers;
static size_t nr_listeners;
static bool accepting_paused;
static bool stopped;
static bool out_of_fds; /* accept hit EMFILE/ENFILE: pause, retry later */
static ev_timer fd_retry_timer;
static ev_async closed_watcher;
static void (*adopt_fn)(int fd);
static void (*all_closed_fn)(void);

static unsigned open_conns; /* atomic: accepted and not yet closed */

void connection_opened(void)
{
  __atomic_add_fetch(&open_conns, 1, __ATOMIC_RELAXED);
}

unsigned connections_open(void)
{
  return __atomic_load_n(&open_conns, __ATOMIC_RELAXED);
}

/* Any thread. */
void connection_closed(void)
{
  __atomic_sub_fetch(&open_conns, 1, __ATOMIC_RELAXED);
  if (main_ev)
    ev_async_send(main_ev, &closed_watcher);
}

static void update_accepting(void)
{
  unsigned open = __atomic_load_n(&open_conns, __ATOMIC_RELAXED);
  bool pause = stopped || out_of_fds ||
               (thread_model == NBDSERVE_THREAD_MODEL_SERIALIZE_CONNECTIONS && open > 0);
  if (pause == accepting_paused)
    return;
  accepting_paused = pause;
  for (size_t i = 0; i < nr_listeners; i++) {
    if (pause)
      ev_io_stop(main_ev, &listen_watchers[i]);
    else
      ev_io_start(main_ev, &listen_watchers[i]);
  }
}

static void closed_cb(struct ev_loop *l, ev_async *w, int revents)
{
  (void) l, (void) w, (void) revents;
  update_accepting();
  if (all_closed_fn && __atomic_load_n(&open_conns, __ATOMIC_RELAXED) == 0)
    all_closed_fn();
}

static void fd_retry_cb(struct ev_loop *l, ev_timer *w, int revents)
{
  (void) l, (void) w, (void) revents;
  out_of_fds = false;
  update_accepting();
}

/* With no file descriptor left, the listener stays readable and accept
 * would fail in a busy loop: stop listening for a moment instead, while
 * the connections we have go on being served. */
static void pause_for_fds(void)
{
  nbdserve_error("accept: %s; not accepting for 100 ms", strerror(errno));
  out_of_fds = true;
  update_accepting();
  ev_timer_init(&fd_retry_timer, fd_retry_cb, 0.1, 0.);
  ev_timer_start(main_ev, &fd_retry_timer);
}

/* Over --max-connections or not allowed: the client is accepted only to
 * be closed at once, so that it sees the refusal straight away instead of
 * waiting in the listen queue.  A message at most once a second, so that
 * a flood cannot flood the log too. */
static void refuse_connection(int fd, const char *why)
{
  static ev_tstamp last_message;
  ev_tstamp now = ev_now(main_ev);
  if (now - last_message >= 1.0) {
    nbdserve_error("refusing a connection: %s", why);
    last_message = now;
  }
  close(fd);
}

static void accept_cb(struct ev_loop *l, ev_io *w, int revents)
{
  (void) l, (void) revents;
  /* Accept a batch: under load several clients are usually waiting. */
  for (int i = 0; i < 64 && !accepting_paused; i++) {
    int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE)
        pause_for_fds();
      else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
               errno != ECONNABORTED)
        nbdserve_error("accept: %s", strerror(errno));
      return;
    }
    if (opt.max_connections &&
        __atomic_load_n(&open_conns, __ATOMIC_RELAXED) >= opt.max_connections) {
      refuse_connection(fd, "already serving the --max-connections limit");
      continue;
    }
    char who[128];
    if (acl_active() && !acl_permits(fd, who, sizeof who)) {
      char why[192];
      snprintf(why, sizeof why, "%s is not allowed by --allow/--deny", who);
      refuse_connection(fd, why);
      continue;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* fails on Unix: fine */
    connection_opened();
    adopt_fn(fd);
    update_accepting();
  }
}

void accept_start(struct ev_loop *ev, const int *fds, size_t nfds, void (*adopt)(int fd),
                  void (*all_closed)(void))
{
  main_ev = ev;
  adopt_fn = adopt;
  all_closed_fn = all_closed;
  ev_async_init(&closed_watcher, closed_cb);
  ev_async_start(main_ev, &closed_watcher);
  nr_listeners = nfds;
  listen_watchers = calloc(nfds ? nfds : 1, sizeof *listen_watchers);
  if (listen_watchers == NULL)
    die("out of memory");
  for (size_t i = 0; i < nfds; i++) {
    ev_io_init(&listen_watchers[i], accept_cb, fds[i], EV_READ);
    ev_io_start(main_ev, &listen_watchers[i]);
  }
}

/* Shutdown: accept nobody from now on. */
void accept_stop(void)
{
  stopped = true;
  update_accepting();
}

void accept_finish(void)
{
  free(listen_watchers);
  listen_watchers = NULL;
  nr_listeners = 0;
}
