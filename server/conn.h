/* nbdserve - per-connection state shared by connection.c, conn.c,
 * handshake.c, transmission.c, replies.c and exec.c.
 *
 * Ownership: the connection's loop thread owns reading, the handshake
 * buffers and the connection's life; workers own the requests they run.
 * Three locks:
 *   send_lock  - the socket's write side and the queue of unsent replies;
 *   lock       - the free request slots and the in-flight count;
 *   kick_lock  - (the loop's) the list of connections the loop must look at.
 * Lock order: send_lock, then lock, then kick_lock.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_CONN_H
#define NBDSERVE_CONN_H

#include <ev.h>
#include <pthread.h>
#include <sys/uio.h>

#include "internal.h"
#include "protocol.h"
#include "wire.h"

/* Reply iovecs per request: header + data chunks of a sparse read. */
#define REPLY_MAX_IOV 34
#define REPLY_HDR_SPACE 1024
/* Requests one connection may have in flight before we stop reading. */
#define MAX_IN_FLIGHT 128
/* Unsent reply bytes at which we stop reading more requests. */
#define MAX_QUEUED_BYTES (16 * 1024 * 1024)
/* Reply bytes that inline requests gather before they are written. */
#define MAX_BATCH_BYTES (512 * 1024)
/* Data bytes of the requests in flight (what reads will return, what
 * writes brought) at which we stop taking new requests: 64 reads of
 * 32 MiB must not mean 2 GiB of buffers.  One request may go past it. */
#define MAX_IN_FLIGHT_BYTES (64 * 1024 * 1024)
/* Request buffers up to this size stay with their slot after use. */
#define KEEP_BUFFER_SIZE (1024 * 1024)
/* Larger ones stay too while the unused large buffers add up to no more
 * than this per connection, and this in the whole server; beyond, they
 * are freed.  A client streaming 4 MiB reads would otherwise have each
 * buffer mapped, faulted in page by page, zeroed by the kernel and
 * unmapped again (in the rbd plugin, over half of the server's CPU). */
#define MAX_KEPT_LARGE_BYTES (64 * 1024 * 1024)
#define MAX_KEPT_LARGE_BYTES_ALL (256 * 1024 * 1024)
#define INBUF_SIZE (64 * 1024)

struct conn;
struct loop;

struct request {
  struct job job; /* for the worker pool; must stay first */
  struct conn *conn;
  struct request *next; /* free list or send queue */

  /* The request as parsed. */
  uint16_t type, flags;
  uint64_t cookie, offset, count; /* count: effect length */
  uint32_t payload_len; /* bytes of payload that followed the header */
  uint32_t error; /* NBD error decided at parse time, or 0 */
  uint64_t weight; /* data bytes it holds while in flight (conn->in_flight_bytes) */

  char *buf; /* payload in, read data out */
  size_t buf_size;

  /* Waiting without a thread (wait.c). */
  uint32_t waited_layers; /* bit per layer that made it wait */
  bool wait_cut_short; /* the last wait ended early: the connection is closing */
  bool park_on_timer; /* what it waits for: a timer (or a waker) */
  uint64_t park_ns;
  struct nbdserve_waiter *parked_waiter; /* waiting for this waker (waiters_lock) */
  /* In conn->to_park and in conn->woken (conn->lock).  Two links: a
   * waker may come before the loop has taken the request off to_park,
   * and then it is on both lists at once. */
  struct request *next_park, *next_woken;
  /* In conn->waiting_list (loop thread), or in conn->waker_list
   * (conn->lock) when on_waker_list. */
  struct request *prev_waiting, *next_waiting;
  bool on_waker_list;
  ev_timer wait_timer;

  /* The reply, as iovecs into hdr[] and buf. */
  struct iovec iov[REPLY_MAX_IOV];
  int niov, iov_done;
  size_t reply_bytes;
  char hdr[REPLY_HDR_SPACE];
  size_t hdr_used;
};

/* Growable byte buffer for handshake replies. */
struct bytebuf {
  char *data;
  size_t len, cap, sent;
};

enum conn_state {
  CONN_GREETING, /* greeting queued, waiting for client flags */
  CONN_OPTIONS, /* reading option headers */
  CONN_OPTION_BUSY, /* an option is being processed by a worker */
  CONN_TLS_HANDSHAKE, /* after STARTTLS: the TLS handshake is running */
  CONN_TRANSMISSION,
  CONN_CLOSING, /* no more reading; close once idle */
};

/* Result of processing one option. */
enum option_result { OPTION_PENDING, OPTION_CONTINUE, OPTION_TRANSMIT, OPTION_CLOSE,
                     OPTION_STARTTLS };

struct selected_context {
  uint32_t id;
  char *name;
};

/* A connection's byte stream (stream.c). */
struct stream {
  ssize_t (*recv)(struct conn *conn, void *buf, size_t len);
  ssize_t (*writev)(struct conn *conn, const struct iovec *iov, int niov);
  bool loop_thread_only; /* only the connection's loop thread may use it (TLS) */
};
extern const struct stream plain_stream, tls_stream;

struct conn {
  unsigned id;
  struct loop *loop; /* the loop that owns it, from accept to close */
  int rfd, wfd; /* same socket, except for -s (stdin/stdout) */
  const struct stream *stream; /* plain_stream; tls_stream after STARTTLS */
  struct tls_session *tls; /* after STARTTLS; its I/O is the loop thread's only */
  struct conn *prev_conn, *next_conn; /* the loop's connections */
  ev_io rio, wio;
  ev_timer handshake_timer;
  enum conn_state state;
  bool read_paused; /* parsing stopped for backpressure */
  bool input_ended; /* the client closed its side while requests waited in inbuf */

  /* Input (loop thread only). */
  /* Separate and not zeroed, so that the pages an idle connection never
   * reads into cost no memory (1,000 idle clients: a few MB, not 64). */
  char *inbuf; /* INBUF_SIZE bytes */
  size_t in_start, in_end;
  struct request *partial; /* write whose payload is still arriving */
  size_t partial_got;

  /* Handshake (loop thread, or the worker processing an option). */
  bool no_zeroes, structured, extended;
  /* The chain's extents waited when a read asked them first: reads are
   * no longer planned sparse on this connection (a round trip each).
   * Requests of any thread read and set it: relaxed atomics. */
  bool sparse_plan_waits;
  unsigned options_seen;
  bool opt_header_seen; /* opt_type/opt_len valid, payload arriving */
  uint32_t opt_type, opt_len; /* option being received / processed */
  char *opt_data; /* its payload (heap, <= MAX_OPTION_LENGTH) */
  uint32_t opt_got;
  enum option_result opt_result; /* set by the worker, under lock */
  bool opt_running; /* a worker owns hs_out (under lock) */
  struct job option_job;
  struct job close_job; /* the chain's close, on a worker */
  bool close_running; /* under lock: close_job has not finished */
  /* Requests waiting without a thread (wait.c): asked to park and woken
   * (under lock), parked (loop thread). */
  struct request *to_park, *woken;
  struct request *waiting_list;
  /* With worker threads, requests waiting for a waker stay off the
   * loop: parked here by their worker and handed back to the workers by
   * their waker (under lock).  waits_cut: the loop has cut this
   * connection's waits short; none may start waiting now (under lock). */
  struct request *waker_list;
  bool waits_cut;
  struct bytebuf hs_out;
  char *meta_export; /* export the selected contexts were chosen for */
  struct selected_context *contexts;
  size_t ncontexts;

  /* Transmission. */
  struct nbdserve_next *top;
  char *export_name;
  bool export_counted; /* in stats.c's open count of export_name */
  struct conn_identity identity;
  int64_t size;
  uint16_t eflags;
  uint32_t bs_min, bs_pref, bs_max; /* the chain's, as advertised */
  /* Largest READ or WRITE taken: bs_max for a client that negotiated
   * block sizes, else --max-payload if that is larger. */
  uint32_t payload_max;
  bool readonly;
  int can_fua, can_cache;
  pthread_mutex_t request_lock; /* SERIALIZE_REQUESTS */

  /* Request slots and replies. */
  pthread_mutex_t lock;
  struct request *free_requests;
  unsigned in_flight; /* parsed, not yet fully replied */
  uint64_t in_flight_bytes; /* sum of their weights */
  size_t kept_large_bytes; /* free slots' buffers over KEEP_BUFFER_SIZE */
  pthread_mutex_t send_lock;
  struct request *send_head, *send_tail; /* unsent replies, in order */
  size_t queued_bytes;
  bool write_failed;
  bool batching; /* inline mode: replies wait for one writev at the end */
  bool kicked; /* on the kick list (kick_lock) */
  struct conn *next_kick; /* kick list (kick_lock) */
  struct conn *next_service; /* the kick list being served (loop thread) */

  /* nbdserve_disconnect: what a callback asked for (under lock), and
   * what the loop thread has done about it (loop thread only). */
  int disconnect_wanted, disconnect_done; /* DISCONNECT_* */
  /* nbdserve_strdup_connection's copies (under lock), freed with the
   * connection. */
  struct conn_string *strings;
};
#define DISCONNECT_NONE 0
#define DISCONNECT_GRACEFUL 1
#define DISCONNECT_FORCE 2

/* conn->lock held: may the connection take one more request, as far as
 * the requests and data already in flight go? */
static inline bool conn_has_room(const struct conn *conn)
{
  return conn->in_flight < MAX_IN_FLIGHT && conn->in_flight_bytes < MAX_IN_FLIGHT_BYTES;
}

/* conn.c */
extern struct conn *conn_new(int rfd, int wfd);
extern void conn_free(struct conn *conn);
extern struct request *request_get(struct conn *conn);
extern void request_put(struct request *req); /* reply sent or dropped */
/* Account the data bytes REQ holds while in flight (backpressure). */
extern void request_set_weight(struct request *req, uint64_t bytes);
extern int request_reserve(struct request *req, size_t size); /* grow buf */
extern void conn_send_reply(struct request *req); /* iovecs ready: send or queue */
/* Any thread, conn->lock held: ask the connection's loop to look at it
 * (the one way workers reach a loop). */
extern void conn_kick(struct conn *conn);
extern bool conn_flush(struct conn *conn); /* loop: write queued; false on error */
/* The connection's byte stream, plain or through TLS. */
static inline ssize_t conn_recv(struct conn *conn, void *buf, size_t len)
{
  return conn->stream->recv(conn, buf, len);
}
static inline ssize_t conn_writev(struct conn *conn, const struct iovec *iov, int niov)
{
  return conn->stream->writev(conn, iov, niov);
}
extern bool conn_is_idle(struct conn *conn); /* nothing in flight or queued */
extern void bytebuf_append(struct bytebuf *b, const void *data, size_t len);
extern void bytebuf_put_u16(struct bytebuf *b, uint16_t v);
extern void bytebuf_put_u32(struct bytebuf *b, uint32_t v);
extern void bytebuf_put_u64(struct bytebuf *b, uint64_t v);

/* connection.c: the I/O state machine (the connection's loop thread) */
extern void conn_start(struct loop *loop, int rfd, int wfd);
extern void conn_service(struct conn *conn);
extern void conn_close_when_idle(struct conn *conn);
extern void connections_close_all(struct loop *loop); /* shutdown */
extern void connections_drop_unsent(struct loop *loop, double grace);

/* accept.c: listening sockets and the count of open connections (main loop) */
extern void accept_start(struct ev_loop *ev, const int *fds, size_t nfds, void (*adopt)(int fd),
                         void (*all_closed)(void));
extern void accept_stop(void);
extern void accept_finish(void);
extern void connection_opened(void);
extern void connection_closed(void); /* any thread */
extern unsigned connections_open(void); /* any thread */

/* exec.c: where chain calls run, and the thread model's locks */
enum call_kind { CALL_CONNECTION, /* options, open, close */ CALL_REQUEST };
extern bool run_inline; /* chain never blocks: requests run on the loop threads */
extern int thread_model;
extern void exec_setup(void);
extern void exec_finish(void);
extern void dispatch_job(struct job *job); /* worker, or inline for never-blocking chains */
extern pthread_mutex_t *exec_begin(struct conn *conn, enum call_kind kind);
extern void exec_end(pthread_mutex_t *lock);
extern void exec_close(struct conn *conn); /* the chain's close, if it is open */

/* handshake.c */
/* Queue the greeting (oldstyle: start opening the export, state
 * CONN_OPTION_BUSY).  The handshake never touches the loop's watchers:
 * connection.c stops reading while the state is CONN_OPTION_BUSY. */
extern void handshake_start(struct conn *conn);
/* Loop thread: consume handshake bytes from inbuf.  Returns false when
 * the connection must close. */
extern bool handshake_input(struct conn *conn);
extern enum option_result handshake_option_finished(struct conn *conn); /* loop, after the job */

/* transmission.c */
/* Loop thread: parse and dispatch every whole request in inbuf (and
 * payloads).  Returns false when the connection must stop reading. */
extern bool transmission_input(struct conn *conn);
extern bool transmission_read_payload(struct conn *conn); /* read straight into partial; false: close */
/* No whole request is left in inbuf (or a payload is cut short). */
extern bool transmission_input_exhausted(const struct conn *conn);

/* wait.c: requests that wait without a thread */
extern void wait_begin_request(struct request *req); /* before the chain runs it */
/* After: true if the request asked to wait and is parked (no reply);
 * asked says whether the chain's answer was the wait (-1, EINPROGRESS). */
extern bool wait_end_request(struct request *req, bool asked);
extern void wait_service(struct conn *conn); /* loop thread, from conn_service */
/* Take back a wait that a call inside the request asked for and whose
 * answer the caller does without (the extents before a sparse read):
 * the request no longer waits, and its waited layers are those of
 * WAITED_BEFORE again.  A later nbdserve_wake of it is a no-op. */
extern void wait_withdraw(struct request *req, uint32_t waited_before);

/* replies.c */
extern void reply_simple(struct request *req, uint32_t error);
extern void reply_error(struct request *req, uint32_t error); /* simple or ERROR chunk */
extern void reply_none(struct request *req); /* success with no payload */
/* A read is answered as consecutive segments of data (in req->buf at
 * the same relative offset) and holes. */
struct read_segment {
  uint64_t offset, length;
  bool hole;
};
#define MAX_READ_SEGMENTS 16
extern void reply_read(struct request *req, const struct read_segment *segs, size_t nsegs);
extern void reply_block_status(struct request *req, struct nbdserve_extents **lists,
                               const uint32_t *ids, size_t n);

#endif /* NBDSERVE_CONN_H */
