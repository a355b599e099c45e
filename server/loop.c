/* nbdserve - the event loop: listening, accepting, reading, signals.
 *
 * One libev loop thread owns every socket's read side and every
 * connection's life.  Other threads talk to it only through conn_kick(),
 * which puts a connection on a list and wakes the loop with an ev_async.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "conn.h"
#include "tls.h"

bool run_inline;
int thread_model;
pthread_mutex_t all_requests_lock = PTHREAD_MUTEX_INITIALIZER;

static struct ev_loop *loop;
static pthread_t loop_thread;
static ev_async kick_watcher, shutdown_watcher;
static ev_signal sigint_watcher, sigterm_watcher;
static ev_child captive_watcher;
static ev_io *listen_watchers;
static size_t nr_listeners;
static bool accepting_paused;
static bool out_of_fds; /* accept hit EMFILE/ENFILE: pause, retry later */
static ev_timer fd_retry_timer;
static volatile sig_atomic_t shutdown_requested;
static bool shutting_down;
static bool exit_when_idle; /* -s: stop when the one connection closes */
static int exit_status;

static struct conn *all_conns;
static unsigned nr_conns;

static pthread_mutex_t kick_lock = PTHREAD_MUTEX_INITIALIZER;
static struct conn *kick_head;

static void conn_service(struct conn *conn);
static void conn_update_accepting(void);

bool in_loop_thread(void)
{
  return pthread_equal(pthread_self(), loop_thread);
}

/* Caller holds conn->lock (see request_put for why). */
void conn_kick(struct conn *conn)
{
  pthread_mutex_lock(&kick_lock);
  bool wake = !conn->kicked;
  if (wake) {
    conn->kicked = true;
    conn->next_kick = kick_head;
    kick_head = conn;
  }
  pthread_mutex_unlock(&kick_lock);
  if (wake)
    ev_async_send(loop, &kick_watcher);
}

static void kick_cb(struct ev_loop *l, ev_async *w, int revents)
{
  (void) l, (void) w, (void) revents;
  pthread_mutex_lock(&kick_lock);
  struct conn *list = kick_head;
  kick_head = NULL;
  for (struct conn *c = list; c; c = c->next_kick)
    c->kicked = false;
  pthread_mutex_unlock(&kick_lock);

  while (list) {
    struct conn *next = list->next_kick;
    conn_service(list);
    list = next;
  }
}

/* While jobs are queued, look every JOB_WAIT_LIMIT_NS whether one has
 * waited too long behind a slow job (see workers.c). */
static ev_timer nudge_timer;

static void nudge_cb(struct ev_loop *l, ev_timer *w, int revents)
{
  (void) l, (void) revents;
  if (!workers_nudge())
    ev_timer_stop(loop, w);
}

void dispatch_job(struct job *job)
{
  if (run_inline) {
    job->run(job);
    return;
  }
  workers_submit(job);
  if (!ev_is_active(&nudge_timer))
    ev_timer_start(loop, &nudge_timer);
}

/* ---- Closing ----------------------------------------------------------- */

static void conn_unlink(struct conn *conn)
{
  if (conn->prev_conn)
    conn->prev_conn->next_conn = conn->next_conn;
  else
    all_conns = conn->next_conn;
  if (conn->next_conn)
    conn->next_conn->prev_conn = conn->prev_conn;
  nr_conns--;
}

static void conn_destroy(struct conn *conn)
{
  ev_io_stop(loop, &conn->rio);
  ev_io_stop(loop, &conn->wio);
  ev_timer_stop(loop, &conn->handshake_timer);
  pthread_mutex_lock(&kick_lock);
  if (conn->kicked) {
    struct conn **p = &kick_head;
    while (*p && *p != conn)
      p = &(*p)->next_kick;
    if (*p)
      *p = conn->next_kick;
    conn->kicked = false;
  }
  pthread_mutex_unlock(&kick_lock);
  nbdserve_debug("connection %u closed", conn->id);
  conn_unlink(conn);
  conn_free(conn);
  conn_update_accepting();
  if ((shutting_down || exit_when_idle) && nr_conns == 0)
    ev_break(loop, EVBREAK_ALL);
}

/* Stop reading from CONN; it closes as soon as nothing is in flight and
 * every reply has been written.  Only marks the connection: the service
 * step that ends every loop callback does the rest. */
void conn_close_when_idle(struct conn *conn)
{
  if (conn->state == CONN_CLOSING)
    return;
  ev_io_stop(loop, &conn->rio);
  ev_timer_stop(loop, &conn->handshake_timer);
  if (conn->partial) {
    request_put(conn->partial);
    conn->partial = NULL;
  }
  pthread_mutex_lock(&conn->lock);
  conn->state = CONN_CLOSING;
  pthread_mutex_unlock(&conn->lock);
}

/* ---- Reading ----------------------------------------------------------- */

static bool may_read(struct conn *conn)
{
  if (conn->state == CONN_CLOSING || conn->state == CONN_OPTION_BUSY)
    return false;
  if (conn->state != CONN_TRANSMISSION)
    return true;
  bool ok;
  pthread_mutex_lock(&conn->lock);
  ok = conn_has_room(conn);
  pthread_mutex_unlock(&conn->lock);
  pthread_mutex_lock(&conn->send_lock);
  ok = ok && conn->queued_bytes < MAX_QUEUED_BYTES;
  pthread_mutex_unlock(&conn->send_lock);
  return ok;
}

/* Handle whatever sits in inbuf; closes the connection on a protocol
 * violation. */
static void conn_consume(struct conn *conn)
{
  bool ok = true;
  if (conn->state == CONN_TRANSMISSION) {
    /* Requests run right here when the chain never blocks: gather their
     * replies and send them with one writev in conn_service.  Otherwise
     * the requests parsed from this read go to the workers together. */
    pthread_mutex_lock(&conn->send_lock);
    conn->batching = run_inline;
    pthread_mutex_unlock(&conn->send_lock);
    workers_hold();
    ok = transmission_input(conn);
    workers_release();
    pthread_mutex_lock(&conn->send_lock);
    conn->batching = false;
    pthread_mutex_unlock(&conn->send_lock);
  }
  else if (conn->state == CONN_GREETING || conn->state == CONN_OPTIONS)
    ok = handshake_input(conn);
  if (!ok)
    conn_close_when_idle(conn);
}

/* Pausing stops parsing, not reading: the socket goes on being drained
 * into inbuf until that is full (conn_read stops the watcher then).  A
 * client that sends all its requests before it reads any reply - one
 * small write each - would otherwise block in send() long before the
 * socket's byte limit, because the kernel counts every small write at
 * a kilobyte or more, and neither side would move again. */
static void set_read_paused(struct conn *conn, bool paused)
{
  pthread_mutex_lock(&conn->lock);
  conn->read_paused = paused;
  pthread_mutex_unlock(&conn->lock);
  if (!paused && !conn->input_ended)
    ev_io_start(loop, &conn->rio);
}

/* Backpressure: pause parsing while too much is in flight or queued,
 * resume when it drained.  A completion that races with pausing is
 * caught by the second look.  Returns true if it parsed more buffered
 * input (which may have produced replies to flush). */
static bool conn_update_reading(struct conn *conn)
{
  if (conn->state != CONN_TRANSMISSION)
    return false;
  if (!may_read(conn)) {
    if (conn->read_paused)
      return false;
    set_read_paused(conn, true);
    if (!may_read(conn))
      return false; /* a completion will kick us */
  }
  if (conn->read_paused)
    set_read_paused(conn, false);
  /* Whole requests left in the buffer when we last stopped parsing? */
  size_t before = conn->in_start;
  if (conn->partial == NULL && conn->in_end - conn->in_start > 0)
    conn_consume(conn);
  if (conn->input_ended && conn->state == CONN_TRANSMISSION &&
      transmission_input_exhausted(conn)) {
    nbdserve_debug("connection %u: client closed the connection", conn->id);
    conn_close_when_idle(conn);
  }
  return conn->in_start != before;
}

static void conn_read(struct conn *conn)
{
  if (conn->partial) {
    transmission_read_payload(conn);
    if (conn->partial || conn->state == CONN_CLOSING)
      return; /* still waiting for payload */
  }
  else {
    /* Compact the buffer, then read as much as fits. */
    if (conn->in_start > 0) {
      memmove(conn->inbuf, conn->inbuf + conn->in_start, conn->in_end - conn->in_start);
      conn->in_end -= conn->in_start;
      conn->in_start = 0;
    }
    if (conn->in_end == INBUF_SIZE) {
      /* Full of requests not parsed yet.  While paused, nothing will
       * parse them until a completion resumes us: stop watching. */
      if (conn->read_paused)
        ev_io_stop(loop, &conn->rio);
      return;
    }
    ssize_t r = conn_recv(conn, conn->inbuf + conn->in_end, INBUF_SIZE - conn->in_end);
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
        return;
      nbdserve_debug("connection %u: read: %s", conn->id, strerror(errno));
      conn_close_when_idle(conn);
      return;
    }
    if (r == 0) {
      if (conn->state == CONN_TRANSMISSION && !transmission_input_exhausted(conn)) {
        /* A client that shut down its sending side still waits for the
         * replies to what it sent: serve the requests still in inbuf
         * (we paused, or parsed one batch only), and close after that
         * (conn_update_reading). */
        conn->input_ended = true;
        ev_io_stop(loop, &conn->rio);
        return;
      }
      nbdserve_debug("connection %u: client closed the connection", conn->id);
      conn_close_when_idle(conn);
      return;
    }
    conn->in_end += (size_t) r;
  }
  if (!conn->read_paused)
    conn_consume(conn);
}

/* Flush handshake output; true when all of it is out. */
static bool flush_handshake_output(struct conn *conn)
{
  struct bytebuf *b = &conn->hs_out;
  while (b->sent < b->len) {
    struct iovec iov = { b->data + b->sent, b->len - b->sent };
    ssize_t r = conn_writev(conn, &iov, 1);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        conn->write_failed = true;
      return false;
    }
    b->sent += (size_t) r;
  }
  b->len = b->sent = 0;
  return true;
}

static bool option_job_finished(struct conn *conn)
{
  pthread_mutex_lock(&conn->lock);
  bool finished = conn->opt_result != OPTION_PENDING;
  pthread_mutex_unlock(&conn->lock);
  return finished;
}

/* Write what is pending; true if output is still waiting for the socket. */
static bool conn_write_pending(struct conn *conn)
{
  bool pending = false;

  /* hs_out belongs to the option worker while one runs. */
  pthread_mutex_lock(&conn->lock);
  bool job_owns_output = conn->opt_running;
  pthread_mutex_unlock(&conn->lock);
  if (!job_owns_output && !flush_handshake_output(conn))
    pending = true;
  if (!conn_flush(conn))
    conn->write_failed = true;
  pthread_mutex_lock(&conn->send_lock);
  pending = pending || conn->send_head != NULL;
  pthread_mutex_unlock(&conn->send_lock);
  return pending && !conn->write_failed;
}

/* The loop's look at a connection after anything happened to it: flush
 * output, finish a handshake step, apply backpressure, or close.  Every
 * loop callback for a connection ends here, and this is the only place
 * a connection is destroyed, so nothing runs on a freed connection. */
static void conn_service(struct conn *conn)
{
  if (conn->state == CONN_OPTION_BUSY && option_job_finished(conn)) {
    /* The option's replies go out before anything else happens. */
    if (flush_handshake_output(conn))
      handshake_option_finished(conn);
    else if (conn->write_failed)
      conn_close_when_idle(conn);
  }

  bool pending;
  int rounds = 0;
  do {
    pending = conn_write_pending(conn);
    if (conn->write_failed)
      conn_close_when_idle(conn);
  } while (conn_update_reading(conn) && ++rounds < 64);
  if (rounds == 64) {
    /* Plenty parsed in one go: let other connections have a turn and
     * come back to this one. */
    pending = conn_write_pending(conn);
    pthread_mutex_lock(&conn->lock);
    conn_kick(conn);
    pthread_mutex_unlock(&conn->lock);
  }

  if (conn->tls && tls_wants_write(conn->tls) && !conn->write_failed)
    pending = true; /* the TLS handshake, or a record half sent */
  if (pending)
    ev_io_start(loop, &conn->wio);
  else
    ev_io_stop(loop, &conn->wio);

  if (conn->state == CONN_CLOSING && !pending && conn_is_idle(conn)) {
    conn_destroy(conn);
    return;
  }
  /* Input TLS already decrypted will not make the socket readable: come
   * back for it on the next loop iteration, if reading is on. */
  if (conn->tls && conn->state != CONN_TLS_HANDSHAKE && ev_is_active(&conn->rio) &&
      tls_pending(conn->tls) > 0)
    ev_feed_event(loop, &conn->rio, EV_READ);
}

/* ---- TLS handshake -------------------------------------------------------- */

/* Called by handshake.c once the STARTTLS acknowledgement is out: from
 * here every byte of the connection goes through TLS. */
void conn_start_tls(struct conn *conn)
{
  if (conn->in_end != conn->in_start) {
    nbdserve_error("connection %u: data sent after STARTTLS before its reply; closing",
                   conn->id);
    conn_close_when_idle(conn);
    return;
  }
  conn->tls = tls_session_new(conn->rfd, conn->wfd, conn->id);
  if (conn->tls == NULL) {
    conn_close_when_idle(conn);
    return;
  }
  conn->state = CONN_TLS_HANDSHAKE;
  ev_io_start(loop, &conn->rio);
}

static void conn_tls_handshake(struct conn *conn)
{
  switch (tls_handshake(conn->tls)) {
  case TLS_DONE:
    conn->identity.is_tls = 1;
    conn->identity.tls_identity = tls_peer_identity(conn->tls);
    conn->state = CONN_OPTIONS;
    conn_consume(conn);
    break;
  case TLS_WANT_READ:
  case TLS_WANT_WRITE:
    break; /* conn_service watches the socket for what it needs */
  case TLS_FAILED:
    /* Too late for anything but closing: the client was promised TLS. */
    conn->write_failed = true;
    conn_close_when_idle(conn);
    break;
  }
}

static void read_cb(struct ev_loop *l, ev_io *w, int revents)
{
  (void) l, (void) revents;
  struct conn *conn = w->data;
  uint64_t began = busy_poll_work_begins();
  if (conn->state == CONN_TLS_HANDSHAKE)
    conn_tls_handshake(conn);
  else
    conn_read(conn);
  conn_service(conn);
  busy_poll_work_ends(began);
}

static void write_cb(struct ev_loop *l, ev_io *w, int revents)
{
  (void) l, (void) revents;
  struct conn *conn = w->data;
  if (conn->state == CONN_TLS_HANDSHAKE)
    conn_tls_handshake(conn);
  conn_service(conn);
}

/* Called by handshake.c (from conn_service) when an option finished. */
void conn_resume_after_option(struct conn *conn)
{
  ev_io_start(loop, &conn->rio);
  conn_consume(conn);
}

void conn_pause_for_option(struct conn *conn)
{
  ev_io_stop(loop, &conn->rio);
}

static void handshake_timeout_cb(struct ev_loop *l, ev_timer *w, int revents)
{
  (void) l, (void) revents;
  struct conn *conn = w->data;
  if (conn->state == CONN_TRANSMISSION || conn->state == CONN_CLOSING)
    return;
  nbdserve_error("connection %u: handshake not finished in time, closing", conn->id);
  conn_close_when_idle(conn);
  conn_service(conn);
}

static void conn_start(int rfd, int wfd)
{
  struct conn *conn = conn_new(rfd, wfd);
  if (conn == NULL) {
    nbdserve_error("out of memory for a new connection");
    close(rfd);
    if (wfd != rfd)
      close(wfd);
    return;
  }
  conn->next_conn = all_conns;
  if (all_conns)
    all_conns->prev_conn = conn;
  all_conns = conn;
  nr_conns++;
  ev_io_init(&conn->rio, read_cb, rfd, EV_READ);
  ev_io_init(&conn->wio, write_cb, wfd, EV_WRITE);
  conn->rio.data = conn->wio.data = conn;
  ev_timer_init(&conn->handshake_timer, handshake_timeout_cb, opt.handshake_timeout, 0.);
  conn->handshake_timer.data = conn;
  if (opt.handshake_timeout > 0)
    ev_timer_start(loop, &conn->handshake_timer);
  nbdserve_debug("connection %u opened", conn->id);
  if (!opt.oldstyle)
    ev_io_start(loop, &conn->rio); /* oldstyle reads only after the export is open */
  handshake_start(conn);
  conn_service(conn);
  conn_update_accepting();
}

/* ---- Accepting --------------------------------------------------------- */

static void conn_update_accepting(void)
{
  bool pause = shutting_down || out_of_fds ||
               (thread_model == NBDSERVE_THREAD_MODEL_SERIALIZE_CONNECTIONS && nr_conns > 0);
  if (pause == accepting_paused)
    return;
  accepting_paused = pause;
  for (size_t i = 0; i < nr_listeners; i++) {
    if (pause)
      ev_io_stop(loop, &listen_watchers[i]);
    else
      ev_io_start(loop, &listen_watchers[i]);
  }
}

static void fd_retry_cb(struct ev_loop *l, ev_timer *w, int revents)
{
  (void) l, (void) w, (void) revents;
  out_of_fds = false;
  conn_update_accepting();
}

/* With no file descriptor left, the listener stays readable and accept
 * would fail in a busy loop: stop listening for a moment instead, while
 * the connections we have go on being served. */
static void pause_for_fds(void)
{
  nbdserve_error("accept: %s; not accepting for 100 ms", strerror(errno));
  out_of_fds = true;
  conn_update_accepting();
  ev_timer_init(&fd_retry_timer, fd_retry_cb, 0.1, 0.);
  ev_timer_start(loop, &fd_retry_timer);
}

/* Over --max-connections or not allowed: the client is accepted only to
 * be closed at once, so that it sees the refusal straight away instead of
 * waiting in the listen queue.  A message at most once a second, so that
 * a flood cannot flood the log too. */
static void refuse_connection(int fd, const char *why)
{
  static ev_tstamp last_message;
  ev_tstamp now = ev_now(loop);
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
    if (opt.max_connections && nr_conns >= opt.max_connections) {
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
    conn_start(fd, fd);
  }
}

/* ---- Shutdown and signals --------------------------------------------- */

void request_shutdown(void)
{
  shutdown_requested = 1;
  if (loop)
    ev_async_send(loop, &shutdown_watcher);
}

/* Seconds a stopping server waits for clients to take their replies. */
#define SHUTDOWN_GRACE 10.0
static ev_timer shutdown_timer;

/* The grace period is over: clients that still have not read their
 * replies lose them.  Requests still running finish first (their
 * connections close when idle), so no acknowledged write is at stake:
 * only replies nobody was reading. */
static void shutdown_timeout_cb(struct ev_loop *l, ev_timer *w, int revents)
{
  (void) l, (void) w, (void) revents;
  struct conn *c = all_conns, *next;
  for (; c; c = next) {
    next = c->next_conn;
    nbdserve_error("connection %u: replies not taken %g s after the server was told to "
                   "stop; dropping them", c->id, SHUTDOWN_GRACE);
    pthread_mutex_lock(&c->send_lock);
    c->write_failed = true;
    pthread_mutex_unlock(&c->send_lock);
    conn_service(c);
  }
}

static void begin_shutdown(void)
{
  if (shutting_down)
    return;
  shutting_down = true;
  nbdserve_debug("shutting down: finishing requests in flight");
  conn_update_accepting();
  /* Every connection stops reading and closes once its replies are out. */
  struct conn *c = all_conns, *next;
  for (; c; c = next) {
    next = c->next_conn;
    conn_close_when_idle(c);
    conn_service(c);
  }
  if (nr_conns == 0) {
    ev_break(loop, EVBREAK_ALL);
    return;
  }
  ev_timer_init(&shutdown_timer, shutdown_timeout_cb, SHUTDOWN_GRACE, 0.);
  ev_timer_start(loop, &shutdown_timer);
}

static void shutdown_cb(struct ev_loop *l, ev_async *w, int revents)
{
  (void) l, (void) w, (void) revents;
  begin_shutdown();
}

static void signal_cb(struct ev_loop *l, ev_signal *w, int revents)
{
  (void) l, (void) revents;
  nbdserve_debug("signal %d received", w->signum);
  begin_shutdown();
}

static void captive_cb(struct ev_loop *l, ev_child *w, int revents)
{
  (void) l, (void) revents;
  ev_child_stop(loop, w);
  if (WIFEXITED(w->rstatus))
    exit_status = WEXITSTATUS(w->rstatus);
  else if (WIFSIGNALED(w->rstatus)) {
    nbdserve_error("--run command killed by signal %d", WTERMSIG(w->rstatus));
    exit_status = 128 + WTERMSIG(w->rstatus);
  }
  else
    exit_status = EXIT_FAILURE;
  captive_exit_status = exit_status;
  begin_shutdown();
}

/* ---- Entry ------------------------------------------------------------- */

/* What every way of serving needs: the loop, the workers, the watchers
 * that other threads and signals use to reach the loop. */
static void loop_setup(void)
{
  signal(SIGPIPE, SIG_IGN);
  loop = ev_default_loop(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
  if (loop == NULL)
    die("cannot initialise the event loop (libev)");
  loop_thread = pthread_self();

  thread_model = chain_thread_model();
  run_inline = !opt.no_inline && chain_never_blocks();
  if (!run_inline)
    workers_start(opt.threads);
  /* Workers finish requests on other threads and wake the loop with
   * ev_async; spinning would take a CPU from them. */
  busy_poll_setup(loop, run_inline ? opt.busy_poll_us : 0);
  nbdserve_debug("thread model %d, requests run %s", thread_model,
                 run_inline ? "on the loop thread"
                 : opt.no_inline ? "on worker threads (--no-inline)" : "on worker threads");

  ev_timer_init(&nudge_timer, nudge_cb, JOB_WAIT_LIMIT_NS / 1e9, JOB_WAIT_LIMIT_NS / 1e9);
  ev_async_init(&kick_watcher, kick_cb);
  ev_async_start(loop, &kick_watcher);
  ev_async_init(&shutdown_watcher, shutdown_cb);
  ev_async_start(loop, &shutdown_watcher);
}

/* For the fuzzing harnesses: serve one connection on RFD/WFD (made
 * non-blocking here) in the calling thread, and return once it closed.
 * The first call sets the loop up; the chain must be configured. */
void serve_one_connection(int rfd, int wfd)
{
  static bool ready;
  if (!ready) {
    loop_setup();
    ready = true;
  }
  fcntl(rfd, F_SETFL, fcntl(rfd, F_GETFL) | O_NONBLOCK);
  if (wfd != rfd)
    fcntl(wfd, F_SETFL, fcntl(wfd, F_GETFL) | O_NONBLOCK);
  exit_when_idle = true;
  conn_start(rfd, wfd);
  if (nr_conns > 0)
    ev_run(loop, 0);
}

int serve(const int *listen_fds, size_t nfds)
{
  loop_setup();
  ev_signal_init(&sigint_watcher, signal_cb, SIGINT);
  ev_signal_start(loop, &sigint_watcher);
  ev_signal_init(&sigterm_watcher, signal_cb, SIGTERM);
  ev_signal_start(loop, &sigterm_watcher);

  nr_listeners = nfds;
  listen_watchers = calloc(nfds ? nfds : 1, sizeof *listen_watchers);
  if (listen_watchers == NULL)
    die("out of memory");
  for (size_t i = 0; i < nfds; i++) {
    ev_io_init(&listen_watchers[i], accept_cb, listen_fds[i], EV_READ);
    ev_io_start(loop, &listen_watchers[i]);
  }

  if (opt.single) {
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
    conn_start(rfd, wfd);
    exit_when_idle = true;
  }

  if (opt.run) {
    pid_t pid = captive_start();
    ev_child_init(&captive_watcher, captive_cb, pid, 0);
    ev_child_start(loop, &captive_watcher);
  }

  /* Told to stop before the loop ran (--exit-with-parent whose parent
   * already left, a signal during start-up): stop from inside the loop,
   * since ev_run forgets an ev_break made before it started. */
  if (shutdown_requested)
    ev_async_send(loop, &shutdown_watcher);
  ev_run(loop, 0);

  if (!run_inline)
    workers_stop();
  busy_poll_report();
  for (size_t i = 0; i < nfds; i++)
    close(listen_fds[i]);
  free(listen_watchers);
  return exit_status;
}
