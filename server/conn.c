/* nbdserve - connection state, request slots and the reply send path.
 *
 * A finished request sends its reply straight from the thread that ran
 * it when the socket's queue is empty (one writev, no hand-off).  When
 * the socket is full, the request itself - headers and data buffer - is
 * queued as it is, without copying, and the loop thread writes it out
 * when the socket drains.  The slot returns to the free list only after
 * its last byte left.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"
#include "loop.h"
#include "tls.h"

static unsigned next_conn_id;

struct conn *conn_new(int rfd, int wfd)
{
  struct conn *conn = calloc(1, sizeof *conn);
  if (conn == NULL)
    return NULL;
  conn->inbuf = malloc(INBUF_SIZE);
  if (conn->inbuf == NULL) {
    free(conn);
    return NULL;
  }
  conn->id = __atomic_add_fetch(&next_conn_id, 1, __ATOMIC_RELAXED);
  conn->rfd = rfd;
  conn->wfd = wfd;
  conn->stream = &plain_stream;
  conn->identity.conn = conn;
  conn->identity.conn_id = conn->id;
  identity_gather_peer(&conn->identity, rfd);
  pthread_mutex_init(&conn->lock, NULL);
  pthread_mutex_init(&conn->send_lock, NULL);
  pthread_mutex_init(&conn->request_lock, NULL);
  return conn;
}

static void request_free(struct request *req)
{
  free(req->buf);
  free(req);
}

/* Request slots that closed connections left behind, buffers and all,
 * for the next connections to take.  Clients that connect for each job
 * (nbdcopy, qemu-img) would otherwise fault in and zero fresh buffers
 * every time: 64 reads of 256 KiB is 16 MiB of page faults per
 * connection.  Bounded, so that a burst of clients does not pin memory
 * for good. */
#define MAX_SPARE_BYTES (64 * 1024 * 1024)
static pthread_mutex_t spare_lock = PTHREAD_MUTEX_INITIALIZER;
static struct request *spare_requests;
static size_t spare_bytes;

static void request_retire(struct request *req)
{
  size_t bytes = sizeof *req + req->buf_size;
  pthread_mutex_lock(&spare_lock);
  bool keep = spare_bytes + bytes <= MAX_SPARE_BYTES;
  if (keep) {
    req->next = spare_requests;
    spare_requests = req;
    spare_bytes += bytes;
  }
  pthread_mutex_unlock(&spare_lock);
  if (!keep)
    request_free(req);
}

static struct request *request_new(void)
{
  pthread_mutex_lock(&spare_lock);
  struct request *req = spare_requests;
  if (req) {
    spare_requests = req->next;
    spare_bytes -= sizeof *req + req->buf_size;
  }
  pthread_mutex_unlock(&spare_lock);
  return req ? req : calloc(1, sizeof *req);
}

/* Unused large buffers of all connections (each conn->kept_large_bytes
 * is a part of it). */
static size_t kept_large_all;

/* REQ's buffer, if it is large (over KEEP_BUFFER_SIZE). */
static size_t large_part(const struct request *req)
{
  return req->buf_size > KEEP_BUFFER_SIZE ? req->buf_size : 0;
}

/* conn->lock held: REQ goes back to the free list; may its buffer,
 * LARGE bytes, stay with it? */
static bool keep_large(struct conn *conn, size_t large)
{
  if (conn->kept_large_bytes + large > MAX_KEPT_LARGE_BYTES)
    return false;
  if (__atomic_add_fetch(&kept_large_all, large, __ATOMIC_RELAXED) > MAX_KEPT_LARGE_BYTES_ALL) {
    __atomic_sub_fetch(&kept_large_all, large, __ATOMIC_RELAXED);
    return false;
  }
  conn->kept_large_bytes += large;
  return true;
}

/* conn->lock held (or the connection is being freed): a kept large
 * buffer is in use again, or is freed. */
static void unkeep_large(struct conn *conn, size_t large)
{
  if (large == 0)
    return;
  conn->kept_large_bytes -= large;
  __atomic_sub_fetch(&kept_large_all, large, __ATOMIC_RELAXED);
}

void conn_free(struct conn *conn)
{
  struct request *req, *next;
  for (req = conn->free_requests; req; req = next) {
    next = req->next;
    /* Large buffers are for the connection that streams large
     * requests; once it is gone, the memory goes back. */
    size_t large = large_part(req);
    if (large) {
      unkeep_large(conn, large);
      free(req->buf);
      req->buf = NULL;
      req->buf_size = 0;
    }
    request_retire(req);
  }
  for (req = conn->send_head; req; req = next) { /* only after a write error */
    next = req->next;
    request_free(req);
  }
  for (size_t i = 0; i < conn->ncontexts; i++)
    free(conn->contexts[i].name);
  free(conn->contexts);
  free(conn->meta_export);
  free(conn->export_name);
  free(conn->opt_data);
  free(conn->hs_out.data);
  free(conn->inbuf);
  /* Last, after the chain's close: what callbacks were promised lives
   * as long as the connection. */
  connection_strings_free(conn);
  if (conn->tls) {
    if (!conn->write_failed)
      tls_close_notify(conn->tls);
    tls_session_free(conn->tls);
  }
  if (conn->rfd >= 0)
    close(conn->rfd);
  if (conn->wfd >= 0 && conn->wfd != conn->rfd)
    close(conn->wfd);
  /* A request's reply goes out before its worker lets go of the request
   * lock (exec_end), so the last one may still be on its way out. */
  pthread_mutex_lock(&conn->request_lock);
  pthread_mutex_unlock(&conn->request_lock);
  pthread_mutex_destroy(&conn->lock);
  pthread_mutex_destroy(&conn->send_lock);
  pthread_mutex_destroy(&conn->request_lock);
  free(conn);
}

/* Caller holds conn->lock (see request_put for why). */
void conn_kick(struct conn *conn)
{
  struct loop *loop = conn->loop;
  pthread_mutex_lock(&loop->kick_lock);
  bool wake = !conn->kicked;
  if (wake) {
    conn->kicked = true;
    conn->next_kick = loop->kick_head;
    loop->kick_head = conn;
  }
  pthread_mutex_unlock(&loop->kick_lock);
  if (wake)
    ev_async_send(loop->ev, &loop->kick_watcher);
}

void request_set_weight(struct request *req, uint64_t bytes)
{
  struct conn *conn = req->conn;
  pthread_mutex_lock(&conn->lock);
  conn->in_flight_bytes += bytes - req->weight;
  req->weight = bytes;
  pthread_mutex_unlock(&conn->lock);
}

/* Loop thread: a slot for a new request, or NULL when too much is in
 * flight (the caller then stops reading). */
struct request *request_get(struct conn *conn)
{
  struct request *req;

  pthread_mutex_lock(&conn->lock);
  if (!conn_has_room(conn)) {
    pthread_mutex_unlock(&conn->lock);
    return NULL;
  }
  req = conn->free_requests;
  if (req) {
    conn->free_requests = req->next;
    unkeep_large(conn, large_part(req));
  }
  conn->in_flight++;
  pthread_mutex_unlock(&conn->lock);

  if (req == NULL) {
    req = request_new();
    if (req == NULL) {
      pthread_mutex_lock(&conn->lock);
      conn->in_flight--;
      pthread_mutex_unlock(&conn->lock);
      return NULL;
    }
  }
  req->conn = conn;
  req->next = NULL;
  req->error = 0;
  req->waited_layers = 0;
  req->wait_cut_short = false;
  req->parked_waiter = NULL;
  req->weight = 0;
  req->payload_len = 0;
  req->niov = req->iov_done = 0;
  req->hdr_used = 0;
  req->reply_bytes = 0;
  return req;
}

/* Any thread: the request is over (reply sent, or dropped).  The kick
 * happens under conn->lock so that the loop, which frees a connection
 * only after seeing in_flight == 0 under that lock, never frees it while
 * we still touch it. */
void request_put(struct request *req)
{
  struct conn *conn = req->conn;
  char *drop = NULL;

  pthread_mutex_lock(&conn->lock);
  size_t large = large_part(req);
  if (large && !keep_large(conn, large)) {
    drop = req->buf;
    req->buf = NULL;
    req->buf_size = 0;
  }
  req->next = conn->free_requests;
  conn->free_requests = req;
  conn->in_flight--;
  conn->in_flight_bytes -= req->weight;
  /* The loop needs to hear about it if it paused reading, or if it is
   * waiting for the connection to go idle. */
  if (conn->read_paused || conn->state == CONN_CLOSING)
    conn_kick(conn);
  pthread_mutex_unlock(&conn->lock);
  free(drop); /* not under the lock: unmapping a large buffer takes a while */
}

int request_reserve(struct request *req, size_t size)
{
  if (size <= req->buf_size)
    return 0;
  /* Round up so a few sizes do not cause a realloc each. */
  size_t want = (size + 4095) & ~(size_t) 4095;
  /* Page-aligned, so plugins may hand the buffer to O_DIRECT I/O. */
  char *p = aligned_alloc(4096, want);
  if (p == NULL)
    return -1;
  free(req->buf);
  req->buf = p;
  req->buf_size = want;
  return 0;
}

/* Consume N written bytes from the front of REQ's reply; returns what
 * is left of N once REQ is complete. */
static size_t advance_reply(struct request *req, size_t n)
{
  while (n > 0 && req->iov_done < req->niov) {
    struct iovec *v = &req->iov[req->iov_done];
    if (n >= v->iov_len) {
      n -= v->iov_len;
      req->iov_done++;
    }
    else {
      v->iov_base = (char *) v->iov_base + n;
      v->iov_len -= n;
      n = 0;
    }
  }
  return n;
}

/* Write as much of REQ's reply as the socket takes now.  Returns 1 when
 * all went, 0 when the socket is full, -1 on error.  send_lock held. */
static int write_reply(struct conn *conn, struct request *req)
{
  while (req->iov_done < req->niov) {
    int n = req->niov - req->iov_done;
    ssize_t r = conn_writev(conn, &req->iov[req->iov_done], n > IOV_MAX ? IOV_MAX : n);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        return 0;
      return -1;
    }
    advance_reply(req, (size_t) r);
    while (req->iov_done < req->niov && req->iov[req->iov_done].iov_len == 0)
      req->iov_done++;
  }
  return 1;
}

static size_t unsent_bytes(const struct request *req)
{
  size_t total = 0;
  for (int i = req->iov_done; i < req->niov; i++)
    total += req->iov[i].iov_len;
  return total;
}

void conn_send_reply(struct request *req)
{
  struct conn *conn = req->conn;
  bool done = false, kick = false;

  pthread_mutex_lock(&conn->send_lock);
  if (conn->write_failed) {
    done = true;
  }
  else if (conn->send_head == NULL && !conn->batching && !conn->stream->loop_thread_only) {
    /* Straight to the socket from this thread; a TLS session belongs to
     * the loop thread, so its replies always take the queue. */
    int r = write_reply(conn, req);
    if (r != 0)
      done = true;
    if (r < 0) {
      conn->write_failed = true;
      kick = true;
    }
  }
  if (!done) {
    /* Queue it whole; the loop writes it when the socket drains. */
    req->next = NULL;
    if (conn->send_tail)
      conn->send_tail->next = req;
    else
      conn->send_head = req;
    conn->send_tail = req;
    conn->queued_bytes += unsent_bytes(req);
    kick = !conn->batching; /* a batching loop flushes by itself */
  }
  /* Kick before letting go of send_lock: once it is released the loop
   * may write the queued reply, put the request and free the connection
   * (if it is closing) before this thread could take conn->lock. */
  if (kick) {
    pthread_mutex_lock(&conn->lock);
    conn_kick(conn);
    pthread_mutex_unlock(&conn->lock);
  }
  pthread_mutex_unlock(&conn->send_lock);
  if (done)
    request_put(req);
}

#define MAX_WRITEV_GATHER (1024 * 1024)

/* Loop thread: write queued replies, many per writev.  Returns false on
 * a write error. */
bool conn_flush(struct conn *conn)
{
  struct request *finished = NULL, **finished_tail = &finished;
  struct iovec iov[IOV_MAX];
  bool ok = true;

  pthread_mutex_lock(&conn->send_lock);
  while (conn->send_head && !conn->write_failed) {
    /* TLS writes a record at a time, and a socket takes a few hundred
     * KiB at most: gathering more is wasted work, repeated on every
     * call while a long queue drains. */
    size_t cap = conn->tls ? TLS_RECORD_SIZE : MAX_WRITEV_GATHER, gathered = 0;
    int niov = 0;
    for (struct request *req = conn->send_head; req && niov < IOV_MAX && gathered < cap;
         req = req->next)
      for (int i = req->iov_done; i < req->niov && niov < IOV_MAX && gathered < cap; i++) {
        iov[niov++] = req->iov[i];
        gathered += req->iov[i].iov_len;
      }
    ssize_t r = conn_writev(conn, iov, niov);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        conn->write_failed = true;
      break;
    }
    size_t left = (size_t) r;
    conn->queued_bytes -= MIN(conn->queued_bytes, left);
    while (conn->send_head) {
      struct request *req = conn->send_head;
      left = advance_reply(req, left);
      if (req->iov_done < req->niov)
        break;
      conn->send_head = req->next;
      if (conn->send_head == NULL)
        conn->send_tail = NULL;
      req->next = NULL;
      *finished_tail = req;
      finished_tail = &req->next;
    }
  }
  if (conn->write_failed) {
    /* The client is gone: drop what is queued. */
    ok = false;
    *finished_tail = conn->send_head;
    conn->send_head = conn->send_tail = NULL;
    conn->queued_bytes = 0;
  }
  pthread_mutex_unlock(&conn->send_lock);

  while (finished) {
    struct request *next = finished->next;
    request_put(finished);
    finished = next;
  }
  return ok;
}

bool conn_is_idle(struct conn *conn)
{
  pthread_mutex_lock(&conn->lock);
  bool idle = conn->in_flight == 0;
  pthread_mutex_unlock(&conn->lock);
  return idle;
}

/* ---- Byte buffers for handshake replies -------------------------------- */

void bytebuf_append(struct bytebuf *b, const void *data, size_t len)
{
  if (b->len + len > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + len)
      cap *= 2;
    char *p = realloc(b->data, cap);
    if (p == NULL)
      die("out of memory");
    b->data = p;
    b->cap = cap;
  }
  if (len)
    memcpy(b->data + b->len, data, len);
  b->len += len;
}

void bytebuf_put_u16(struct bytebuf *b, uint16_t v)
{
  char field[2];
  wire_put16(field, v);
  bytebuf_append(b, field, sizeof field);
}

void bytebuf_put_u32(struct bytebuf *b, uint32_t v)
{
  char field[4];
  wire_put32(field, v);
  bytebuf_append(b, field, sizeof field);
}

void bytebuf_put_u64(struct bytebuf *b, uint64_t v)
{
  char field[8];
  wire_put64(field, v);
  bytebuf_append(b, field, sizeof field);
}
