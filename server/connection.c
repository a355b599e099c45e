/* nbdserve - a connection's I/O state machine, on its loop's thread.
 *
 * Everything a connection does on the I/O side happens here, on the
 * thread of the loop that owns it: reading and parsing input (handing
 * handshake bytes to handshake.c and requests to transmission.c),
 * driving the TLS handshake, writing queued output, backpressure, and
 * closing.  Workers and other loops reach a connection only through
 * conn_kick, which puts it on its loop's kick list; the loop then calls
 * conn_service.  conn_service ends every callback and is the only place
 * a connection is destroyed, so nothing ever runs on a freed connection.
 *
 * Closing a connection whose chain may block runs the chain's close on
 * a worker, so that a slow close never holds up the loop's other
 * connections; the connection is freed when the worker is done.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"
#include "loop.h"
#include "tls.h"

static void after_option(struct conn *conn);
static void conn_start_tls(struct conn *conn);
static bool option_job_finished(struct conn *conn);

/* ---- Closing ----------------------------------------------------------- */

static void conn_unlink(struct conn *conn)
{
  struct loop *loop = conn->loop;
  if (conn->prev_conn)
    conn->prev_conn->next_conn = conn->next_conn;
  else
    loop->conns = conn->next_conn;
  if (conn->next_conn)
    conn->next_conn->prev_conn = conn->prev_conn;
  loop->nconns--;
}

static void stop_watching(struct conn *conn)
{
  struct loop *loop = conn->loop;
  ev_io_stop(loop->ev, &conn->rio);
  ev_io_stop(loop->ev, &conn->wio);
  ev_timer_stop(loop->ev, &conn->handshake_timer);
}

static void chain_close_job(struct job *job)
{
  struct conn *conn = (struct conn *) ((char *) job - offsetof(struct conn, close_job));
  exec_close(conn);
  pthread_mutex_lock(&conn->lock);
  conn->close_running = false;
  conn_kick(conn); /* back to the loop, which frees it */
  pthread_mutex_unlock(&conn->lock);
}

static void conn_destroy(struct conn *conn)
{
  struct loop *loop = conn->loop;
  stop_watching(conn);
  if (conn->top && !run_inline) {
    pthread_mutex_lock(&conn->lock);
    conn->close_running = true;
    pthread_mutex_unlock(&conn->lock);
    conn->close_job.run = chain_close_job;
    dispatch_job(&conn->close_job);
    return;
  }
  exec_close(conn); /* a chain that never blocks, or none opened */

  pthread_mutex_lock(&loop->kick_lock);
  if (conn->kicked) {
    struct conn **p = &loop->kick_head;
    while (*p && *p != conn)
      p = &(*p)->next_kick;
    if (*p)
      *p = conn->next_kick;
    conn->kicked = false;
  }
  pthread_mutex_unlock(&loop->kick_lock);
  nbdserve_debug("connection %u closed", conn->id);
  conn_unlink(conn);
  conn_free(conn);
  __atomic_sub_fetch(&loop->load, 1, __ATOMIC_RELAXED);
  connection_closed();
  if ((loop->stopping || loop->exit_when_empty) && loop->nconns == 0)
    ev_break(loop->ev, EVBREAK_ALL);
}

/* Stop reading from CONN; it closes as soon as nothing is in flight and
 * every reply has been written.  Only marks the connection: the service
 * step that ends every loop callback does the rest. */
void conn_close_when_idle(struct conn *conn)
{
  if (conn->state == CONN_CLOSING)
    return;
  ev_io_stop(conn->loop->ev, &conn->rio);
  ev_timer_stop(conn->loop->ev, &conn->handshake_timer);
  if (conn->partial) {
    request_put(conn->partial);
    conn->partial = NULL;
  }
  pthread_mutex_lock(&conn->lock);
  conn->state = CONN_CLOSING;
  pthread_mutex_unlock(&conn->lock);
}

static int disconnect_wanted(struct conn *conn)
{
  pthread_mutex_lock(&conn->lock);
  int want = conn->disconnect_wanted;
  pthread_mutex_unlock(&conn->lock);
  return want;
}

/* Carry out what nbdserve_disconnect asked for.  Not while an option's
 * job still runs: closing lets the connection be freed as soon as no
 * request is in flight, and the job would run on freed memory; its end
 * kicks us again. */
static void conn_handle_disconnect(struct conn *conn)
{
  int want = disconnect_wanted(conn);
  if (want <= conn->disconnect_done)
    return;
  if (conn->state == CONN_OPTION_BUSY && !option_job_finished(conn))
    return;
  conn->disconnect_done = want;
  nbdserve_debug("connection %u: disconnect asked by the plugin or a filter%s", conn->id,
                 want == DISCONNECT_FORCE ? " (forced)" : "");
  if (want == DISCONNECT_FORCE) {
    /* Unsent and future replies are dropped, and the client sees the
     * end now even while requests still run; the descriptors stay open
     * (and their numbers taken) until the connection is freed. */
    pthread_mutex_lock(&conn->send_lock);
    conn->write_failed = true;
    pthread_mutex_unlock(&conn->send_lock);
    shutdown(conn->rfd, SHUT_RDWR);
    if (conn->wfd != conn->rfd)
      shutdown(conn->wfd, SHUT_RDWR);
  }
  conn_close_when_idle(conn);
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
  else if (conn->state == CONN_GREETING || conn->state == CONN_OPTIONS) {
    ok = handshake_input(conn);
    if (ok && conn->state == CONN_OPTION_BUSY)
      ev_io_stop(conn->loop->ev, &conn->rio); /* one option at a time */
  }
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
    ev_io_start(conn->loop->ev, &conn->rio);
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
    if (!transmission_read_payload(conn)) {
      conn_close_when_idle(conn);
      return;
    }
    if (conn->partial)
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
        ev_io_stop(conn->loop->ev, &conn->rio);
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
        ev_io_stop(conn->loop->ev, &conn->rio);
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

static bool closing_on_worker(struct conn *conn)
{
  pthread_mutex_lock(&conn->lock);
  bool running = conn->close_running;
  pthread_mutex_unlock(&conn->lock);
  return running;
}

/* The loop's look at a connection after anything happened to it: flush
 * output, finish a handshake step, apply backpressure, or close. */
void conn_service(struct conn *conn)
{
  if (closing_on_worker(conn))
    return; /* its chain is closing; the worker kicks us when done */
  wait_service(conn);
  if (conn->state == CONN_OPTION_BUSY && option_job_finished(conn)) {
    /* The option's replies go out before anything else happens. */
    /* After a disconnect request the handshake goes no further: the
     * next option might start another job before we close. */
    if (flush_handshake_output(conn)) {
      if (disconnect_wanted(conn) == DISCONNECT_NONE)
        after_option(conn);
    }
    else if (conn->write_failed)
      conn_close_when_idle(conn);
  }
  conn_handle_disconnect(conn);

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
    ev_io_start(conn->loop->ev, &conn->wio);
  else
    ev_io_stop(conn->loop->ev, &conn->wio);

  if (conn->state == CONN_CLOSING && !pending && conn_is_idle(conn)) {
    conn_destroy(conn);
    return;
  }
  /* Input TLS already decrypted will not make the socket readable: come
   * back for it on the next loop iteration, if reading is on. */
  if (conn->tls && conn->state != CONN_TLS_HANDSHAKE && ev_is_active(&conn->rio) &&
      tls_pending(conn->tls) > 0)
    ev_feed_event(conn->loop->ev, &conn->rio, EV_READ);
}

/* ---- TLS handshake -------------------------------------------------------- */

/* Once the STARTTLS acknowledgement is out: from here every byte of the
 * connection goes through TLS. */
static void conn_start_tls(struct conn *conn)
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
  conn->stream = &tls_stream;
  conn->state = CONN_TLS_HANDSHAKE;
  ev_io_start(conn->loop->ev, &conn->rio);
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

/* ---- The handshake's steps -------------------------------------------------- */

/* Called by conn_service once an option's job is done and its replies
 * are out: carry out what the handshake decided. */
static void after_option(struct conn *conn)
{
  switch (handshake_option_finished(conn)) {
  case OPTION_PENDING:
    return;
  case OPTION_CLOSE:
    conn_close_when_idle(conn);
    return;
  case OPTION_STARTTLS:
    conn_start_tls(conn); /* the acknowledgement went out in the clear */
    return;
  case OPTION_TRANSMIT:
    ev_timer_stop(conn->loop->ev, &conn->handshake_timer);
    break; /* and read the requests */
  case OPTION_CONTINUE:
    break; /* and read the next option */
  }
  ev_io_start(conn->loop->ev, &conn->rio);
  conn_consume(conn);
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

/* ---- Opening ------------------------------------------------------------------ */

/* Loop thread: serve the connection on RFD/WFD (already counted by
 * connection_opened) from now on. */
void conn_start(struct loop *loop, int rfd, int wfd)
{
  struct conn *conn = conn_new(rfd, wfd);
  if (conn == NULL) {
    nbdserve_error("out of memory for a new connection");
    close(rfd);
    if (wfd != rfd)
      close(wfd);
    __atomic_sub_fetch(&loop->load, 1, __ATOMIC_RELAXED);
    connection_closed();
    return;
  }
  conn->loop = loop;
  conn->next_conn = loop->conns;
  if (loop->conns)
    loop->conns->prev_conn = conn;
  loop->conns = conn;
  loop->nconns++;
  ev_io_init(&conn->rio, read_cb, rfd, EV_READ);
  ev_io_init(&conn->wio, write_cb, wfd, EV_WRITE);
  conn->rio.data = conn->wio.data = conn;
  ev_timer_init(&conn->handshake_timer, handshake_timeout_cb, opt.handshake_timeout, 0.);
  conn->handshake_timer.data = conn;
  if (opt.handshake_timeout > 0)
    ev_timer_start(loop->ev, &conn->handshake_timer);
  nbdserve_debug("connection %u opened (loop %u)", conn->id, loop->index);
  if (!opt.oldstyle)
    ev_io_start(loop->ev, &conn->rio); /* oldstyle reads only after the export is open */
  handshake_start(conn);
  conn_service(conn);
}

/* ---- The whole loop's connections ------------------------------------------------ */

/* Shutdown: every connection stops reading and closes once its replies
 * are out. */
void connections_close_all(struct loop *loop)
{
  struct conn *c = loop->conns, *next;
  for (; c; c = next) {
    next = c->next_conn;
    conn_close_when_idle(c);
    conn_service(c);
  }
}

/* The grace period is over: clients that still have not read their
 * replies lose them.  Requests still running finish first (their
 * connections close when idle), so no acknowledged write is at stake:
 * only replies nobody was reading. */
void connections_drop_unsent(struct loop *loop, double grace)
{
  struct conn *c = loop->conns, *next;
  for (; c; c = next) {
    next = c->next_conn;
    nbdserve_error("connection %u: replies not taken %g s after the server was told to "
                   "stop; dropping them", c->id, grace);
    pthread_mutex_lock(&c->send_lock);
    c->write_failed = true;
    pthread_mutex_unlock(&c->send_lock);
    conn_service(c);
  }
}
