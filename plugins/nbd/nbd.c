/* nbdserve nbd plugin: a proxy to another NBD server, with libnbd.
 *
 * The plugin keeps a small pool of connections to the backend (links.c),
 * shared by all clients, and forwards every request as a libnbd
 * asynchronous command.  A data callback never waits for the backend:
 * it sends the command, and returns nbdserve_retry_when; the command's
 * completion (on the link's reader thread) wakes the request, and the
 * server runs it again, when the callback finds the finished command
 * ("op") and answers from it.  So the plugin never blocks, and runs on
 * the connection loops (NBDSERVE_PLUGIN_NEVER_BLOCKS).
 *
 * Finding the op again.  The server runs a request again from the top,
 * so a run may call the plugin more than once (a large read split in
 * pieces, the extents the server asks before a sparse read, one call per
 * meta context of a block status); each call that has no finished op
 * yet sends one and waits.  A call in a repeated run
 * (nbdserve_has_waited) looks for a finished op with the same command,
 * range, flags and buffer, preferring one not yet answered and then the
 * newest; a few answered ops are kept (ANSWERED_KEPT) so that the later
 * runs of a request of several calls find its earlier answers too.  If
 * an op is not found it is sent again, which is always correct, only
 * slower.  Reads and writes name their buffer, which belongs to one
 * request, so an op is never mistaken for another request's.
 *
 * Block status sends one command for all the backend's contexts and
 * keeps each context's extents, so that every context the client asked
 * for is answered from the same op.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nbd-internal.h"

#define ANSWERED_KEPT 16 /* answered ops kept per client connection */
#define PIECE_MAX (UINT64_C(1) << 31) /* largest trim/zero/cache/status to libnbd (32-bit lengths) */
#define DEFAULT_MAX_PAYLOAD (32u * 1024 * 1024)
#define CUT_SHORT_WAIT_MS 5000 /* then the link is cut, and as long again */

struct backend_config config = { .tls = -1, .connections = 1 };
struct backend_info info;

/* ---- Ops: one command (or a few pieces of one) to the backend ------------------ */

enum op_type { OP_READ, OP_WRITE, OP_FLUSH, OP_TRIM, OP_ZERO, OP_CACHE, OP_STATUS };

struct status_reply {
  int context; /* index in info.contexts */
  uint64_t offset;
  uint32_t *entries; /* (length, flags) pairs */
  size_t nentries; /* uint32_t's in entries */
};

struct op {
  struct op *next; /* the handle's list of unanswered ops */
  atomic_int refs; /* the handle's, and the commands' until all are freed */
  enum op_type type;
  uint64_t offset, count;
  uint32_t flags; /* the request's NBDSERVE_FLAG_* */
  void *buf; /* read and write */
  struct nbdserve_waiter *waiter;
  struct link *link; /* where the (last) piece went */
  atomic_int pending; /* commands not yet freed by libnbd, +1 while sending */
  atomic_int called; /* completion callbacks that ran */
  atomic_int sent; /* commands that went out */
  atomic_int error; /* the first error */
  atomic_bool done;
  struct status_reply *status; /* OP_STATUS: one per context in the reply */
  size_t nstatus;
};

/* One client connection. */
struct handle {
  pthread_mutex_t lock; /* ops, answered */
  struct op *ops; /* newest first */
  struct op *answered[ANSWERED_KEPT]; /* a ring, newest at answered_next - 1 */
  unsigned answered_next;
};

static void op_unref(struct op *op)
{
  if (atomic_fetch_sub(&op->refs, 1) != 1)
    return;
  for (size_t i = 0; i < op->nstatus; i++)
    free(op->status[i].entries);
  free(op->status);
  free(op);
}

/* A command of OP is over: when it is the last, the op is finished and
 * its request is woken.  Reader thread (or the sender's). */
static void op_piece_over(struct op *op)
{
  if (atomic_fetch_sub(&op->pending, 1) != 1)
    return;
  if (atomic_load(&op->error) == 0 && atomic_load(&op->called) < atomic_load(&op->sent))
    atomic_store(&op->error, EIO); /* dropped without an answer: the connection ended */
  struct nbdserve_waiter *w = op->waiter;
  atomic_store(&op->done, true);
  nbdserve_wake(w);
  op_unref(op);
}

static int command_done(void *user_data, int *error)
{
  struct op *op = user_data;
  if (*error) {
    int none = 0;
    atomic_compare_exchange_strong(&op->error, &none, *error);
  }
  atomic_fetch_add(&op->called, 1);
  return 1; /* retire the command */
}

static void command_freed(void *user_data)
{
  op_piece_over(user_data);
}

static nbd_completion_callback completion(struct op *op)
{
  return (nbd_completion_callback) { .callback = command_done, .user_data = op,
                                     .free = command_freed };
}

/* The extents of one context, copied: libnbd's array lives only during the call. */
static int status_chunk(void *user_data, const char *context, uint64_t offset,
                        uint32_t *entries, size_t nentries, int *error)
{
  struct op *op = user_data;
  int index = backend_context_index(context);
  if (*error || index < 0 || nentries < 2)
    return 0;
  struct status_reply *more = realloc(op->status, (op->nstatus + 1) * sizeof *more);
  uint32_t *copy = malloc(nentries * sizeof *copy);
  if (more)
    op->status = more;
  if (more == NULL || copy == NULL) {
    free(copy);
    int none = 0;
    atomic_compare_exchange_strong(&op->error, &none, ENOMEM);
    return 0;
  }
  memcpy(copy, entries, nentries * sizeof *copy);
  op->status[op->nstatus++] = (struct status_reply) { index, offset, copy, nentries & ~(size_t) 1 };
  return 0;
}

static uint32_t libnbd_flags(const struct op *op)
{
  uint32_t f = 0;
  if (op->flags & NBDSERVE_FLAG_FUA)
    f |= LIBNBD_CMD_FLAG_FUA;
  if (op->type == OP_ZERO && !(op->flags & NBDSERVE_FLAG_MAY_TRIM))
    f |= LIBNBD_CMD_FLAG_NO_HOLE;
  if (op->flags & NBDSERVE_FLAG_FAST_ZERO)
    f |= LIBNBD_CMD_FLAG_FAST_ZERO;
  if (op->flags & NBDSERVE_FLAG_REQ_ONE)
    f |= LIBNBD_CMD_FLAG_REQ_ONE;
  return f;
}

/* One command: OP's type over [offset, offset + count). */
struct piece {
  struct op *op;
  uint64_t offset, count;
};

static int64_t issue_piece(struct nbd_handle *h, void *arg)
{
  struct piece *p = arg;
  struct op *op = p->op;
  uint32_t f = libnbd_flags(op);
  switch (op->type) {
  case OP_READ:
    return nbd_aio_pread(h, op->buf, p->count, p->offset, completion(op), 0);
  case OP_WRITE:
    return nbd_aio_pwrite(h, op->buf, p->count, p->offset, completion(op), f);
  case OP_FLUSH:
    return nbd_aio_flush(h, completion(op), 0);
  case OP_TRIM:
    return nbd_aio_trim(h, p->count, p->offset, completion(op), f);
  case OP_ZERO:
    return nbd_aio_zero(h, p->count, p->offset, completion(op), f);
  case OP_CACHE:
    return nbd_aio_cache(h, p->count, p->offset, completion(op), 0);
  case OP_STATUS: {
    nbd_extent_callback chunk = { .callback = status_chunk, .user_data = op };
    return nbd_aio_block_status(h, p->count, p->offset, chunk, completion(op), f);
  }
  }
  errno = EINVAL;
  return -1;
}

/* Send OP's commands (trim, zero and cache larger than libnbd's 32-bit
 * lengths go in pieces; block status asks for the first piece only).
 * Returns 0 when at least one command went out (then the op finishes by
 * itself), or -1 with errno when none did (EAGAIN: reconnecting). */
static int send_op(struct op *op)
{
  bool pieces = op->type == OP_TRIM || op->type == OP_ZERO || op->type == OP_CACHE;
  uint64_t offset = op->offset, end = op->offset + op->count;
  int err = 0;
  do {
    uint64_t n = end - offset;
    if (op->type == OP_STATUS && n > PIECE_MAX)
      n = PIECE_MAX;
    if (pieces && n > PIECE_MAX)
      n = PIECE_MAX;
    struct piece p = { op, offset, n };
    struct link *used;
    atomic_fetch_add(&op->pending, 1);
    if (links_submit(issue_piece, &p, &used) == 0) {
      atomic_fetch_add(&op->sent, 1);
      op->link = used;
    }
    else {
      err = errno;
      if (used == NULL) /* libnbd never saw the closure, so never frees it */
        atomic_fetch_sub(&op->pending, 1);
      if (atomic_load(&op->sent) == 0)
        return errno = err, -1;
      int none = 0;
      atomic_compare_exchange_strong(&op->error, &none, err);
      break;
    }
    offset += n;
  } while (pieces && offset < end);
  return 0;
}

/* ---- Finding ops again ------------------------------------------------------------ */

static bool same_command(const struct op *op, const struct op *key)
{
  return op->type == key->type && op->offset == key->offset && op->count == key->count &&
         op->flags == key->flags && op->buf == key->buf;
}

/* A finished op for KEY, taken out of the list of unanswered ops (newest
 * first).  A block status op goes to the ring of answered ones, which
 * keeps it (and is searched too, newest first) for the other contexts of
 * its request: later runs of the request ask for them, and whatever
 * another request answered since with the same range is as fresh.
 * Other ops are the caller's, to answer from and release.  Only block
 * status ops are kept: a kept read, write or zero could be taken for a
 * later request that uses the same buffer and range, and answer it
 * without doing the work.  Handle lock held. */
static struct op *find_finished(struct handle *hd, const struct op *key)
{
  for (struct op **p = &hd->ops; *p; p = &(*p)->next) {
    struct op *op = *p;
    if (same_command(op, key) && atomic_load(&op->done)) {
      *p = op->next;
      if (op->type == OP_STATUS) {
        atomic_fetch_add(&op->refs, 1); /* the caller's, as for other ops */
        unsigned slot = hd->answered_next++ % ANSWERED_KEPT;
        if (hd->answered[slot])
          op_unref(hd->answered[slot]);
        hd->answered[slot] = op;
      }
      return op;
    }
  }
  if (key->type != OP_STATUS)
    return NULL;
  for (unsigned i = 1; i <= ANSWERED_KEPT; i++) {
    struct op *op = hd->answered[(hd->answered_next - i) % ANSWERED_KEPT];
    if (op && same_command(op, key)) {
      atomic_fetch_add(&op->refs, 1);
      return op;
    }
  }
  return NULL;
}

/* A client left while KEY's buffer may still be in a command in flight:
 * the buffer must not go back to the server before libnbd is done with
 * it.  Rare (a client that hangs up mid-request, or server shut-down),
 * so this waits, bounded: after CUT_SHORT_WAIT_MS the link is cut, which
 * makes libnbd fail its commands at once. */
static void wait_for_buffer(struct handle *hd, const struct op *key)
{
  struct timespec tick = { 0, 1000000 };
  for (unsigned ms = 0; ms < 2 * CUT_SHORT_WAIT_MS; ms++) {
    struct link *busy = NULL;
    pthread_mutex_lock(&hd->lock);
    for (struct op *op = hd->ops; op && busy == NULL; op = op->next)
      if (op->buf == key->buf && !atomic_load(&op->done))
        busy = op->link;
    pthread_mutex_unlock(&hd->lock);
    if (busy == NULL)
      return;
    if (ms == CUT_SHORT_WAIT_MS) {
      nbdserve_error("nbd: the backend has not answered in %d s; cutting its connection",
                     CUT_SHORT_WAIT_MS / 1000);
      links_force_down(busy);
    }
    nanosleep(&tick, NULL);
  }
}

static int backend_errno(int err)
{
  switch (err) {
  case ENOTCONN:
  case ECONNRESET:
  case EPIPE:
  case ETIMEDOUT:
    return EIO; /* the command was lost with the connection */
  default:
    return err;
  }
}

static int answer_status(const struct op *op, const char *context, struct nbdserve_extents *e)
{
  int index = backend_context_index(context);
  for (size_t i = 0; i < op->nstatus; i++) {
    const struct status_reply *s = &op->status[i];
    if (s->context != index)
      continue;
    uint64_t offset = s->offset;
    for (size_t j = 0; j + 1 < s->nentries; j += 2) {
      if (s->entries[j] == 0)
        continue;
      if (nbdserve_add_extent(e, offset, s->entries[j], s->entries[j + 1]) == -1)
        return -1;
      offset += s->entries[j];
    }
    return 0;
  }
  nbdserve_debug("nbd: the backend's block status reply has no extents for %s", context);
  nbdserve_set_error(EIO);
  return -1;
}

/* Answer from a finished op. */
static int answer(const struct op *op, const char *context, struct nbdserve_extents *e)
{
  int err = atomic_load(&op->error);
  /* A backend that advertised zero but cannot do this one: an error, not
   * ENOTSUP, which would make the server write the zeroes itself in
   * 1 MiB writes, each a round trip of its own here. */
  if (err == ENOTSUP && op->type == OP_ZERO && !(op->flags & NBDSERVE_FLAG_FAST_ZERO))
    err = EIO;
  if (err) {
    nbdserve_set_error(backend_errno(err));
    return -1;
  }
  if (op->type == OP_STATUS)
    return answer_status(op, context, e);
  return 0;
}

/* Every data callback: answer KEY from its finished op, or send it and wait. */
static int forward(struct handle *hd, const struct op *key, const char *context,
                   struct nbdserve_extents *extents)
{
  if (nbdserve_has_waited(NULL) || nbdserve_wait_cut_short()) {
    if (nbdserve_wait_cut_short() && key->buf)
      wait_for_buffer(hd, key);
    pthread_mutex_lock(&hd->lock);
    struct op *op = find_finished(hd, key);
    pthread_mutex_unlock(&hd->lock);
    if (op) {
      int r = answer(op, context, extents);
      int err = errno;
      op_unref(op);
      errno = err;
      return r;
    }
    if (nbdserve_wait_cut_short()) {
      nbdserve_set_error(ESHUTDOWN);
      return -1;
    }
  }

  struct op *op = calloc(1, sizeof *op);
  if (op == NULL) {
    nbdserve_set_error(ENOMEM);
    return -1;
  }
  *op = *key;
  atomic_init(&op->refs, 2); /* the handle's list, and the commands' */
  atomic_init(&op->pending, 1); /* while sending */
  if (nbdserve_retry_when(NULL, &op->waiter) == -1 && errno != EINPROGRESS) {
    free(op);
    return -1;
  }
  pthread_mutex_lock(&hd->lock);
  op->next = hd->ops;
  hd->ops = op;
  pthread_mutex_unlock(&hd->lock);

  if (send_op(op) == 0) {
    op_piece_over(op); /* the sender's share; the last command wakes us */
    errno = EINPROGRESS;
    return -1;
  }
  /* Nothing went out: take the op back, and wait for a reconnection or fail. */
  int err = errno;
  struct nbdserve_waiter *w = op->waiter;
  pthread_mutex_lock(&hd->lock);
  for (struct op **p = &hd->ops; *p; p = &(*p)->next)
    if (*p == op) {
      *p = op->next;
      break;
    }
  pthread_mutex_unlock(&hd->lock);
  free(op);
  if (err == EAGAIN) {
    links_park(w);
    errno = EINPROGRESS;
    return -1;
  }
  nbdserve_wake(w);
  nbdserve_set_error(err == ESHUTDOWN ? ESHUTDOWN : backend_errno(err));
  return -1;
}

/* ---- Configuration ------------------------------------------------------------------ */

static int set_once(const char **slot, const char *key, const char *value)
{
  if (*slot) {
    nbdserve_error("nbd: %s= is given twice", key);
    return -1;
  }
  *slot = value;
  return 0;
}

/* retry=N (attempts) or a duration: 30s, 500ms, 2m, 1h. */
static int parse_retry(const char *value)
{
  char *end;
  errno = 0;
  double n = strtod(value, &end);
  if (errno || end == value || n < 0) {
    nbdserve_error("nbd: retry=%s: expected a number of attempts (5) or a duration "
                   "(30s, 500ms, 2m, 1h)", value);
    return -1;
  }
  if (*end == '\0') {
    if (n != (double) (unsigned) n || n > 1000000) {
      nbdserve_error("nbd: retry=%s: the number of attempts is a whole number up to 1000000",
                     value);
      return -1;
    }
    config.retry_attempts = (unsigned) n;
    config.retry_ns = 0;
    return 0;
  }
  double unit = strcmp(end, "ms") == 0 ? 1e6
                : strcmp(end, "s") == 0 ? 1e9
                : strcmp(end, "m") == 0 ? 60e9
                : strcmp(end, "h") == 0 ? 3600e9
                : 0;
  if (unit == 0 || n * unit > 1e18) {
    nbdserve_error("nbd: retry=%s: expected a number of attempts (5) or a duration "
                   "(30s, 500ms, 2m, 1h)", value);
    return -1;
  }
  config.retry_ns = (uint64_t) (n * unit);
  config.retry_attempts = 0;
  return 0;
}

static int parse_tls(const char *value)
{
  if (strcmp(value, "off") == 0)
    config.tls = LIBNBD_TLS_DISABLE;
  else if (strcmp(value, "on") == 0)
    config.tls = LIBNBD_TLS_ALLOW;
  else if (strcmp(value, "require") == 0)
    config.tls = LIBNBD_TLS_REQUIRE;
  else {
    nbdserve_error("nbd: tls=%s: expected off, on or require", value);
    return -1;
  }
  return 0;
}

static int proxy_config(const char *key, const char *value)
{
  if (strcmp(key, "uri") == 0)
    return set_once(&config.uri, key, value);
  if (strcmp(key, "socket") == 0)
    return set_once(&config.socket, key, value);
  if (strcmp(key, "hostname") == 0)
    return set_once(&config.hostname, key, value);
  if (strcmp(key, "port") == 0)
    return set_once(&config.port, key, value);
  if (strcmp(key, "export") == 0)
    return set_once(&config.export, key, value);
  if (strcmp(key, "tls") == 0)
    return parse_tls(value);
  if (strcmp(key, "tls-certificates") == 0)
    return set_once(&config.tls_certificates, key, value);
  if (strcmp(key, "tls-psk") == 0)
    return set_once(&config.tls_psk, key, value);
  if (strcmp(key, "tls-username") == 0)
    return set_once(&config.tls_username, key, value);
  if (strcmp(key, "retry") == 0)
    return parse_retry(value);
  if (strcmp(key, "connections") == 0) {
    uint32_t n;
    if (nbdserve_parse_uint32("connections", value, &n) == -1)
      return -1;
    if (n < 1 || n > MAX_LINKS) {
      nbdserve_error("nbd: connections=%s: between 1 and %d", value, MAX_LINKS);
      return -1;
    }
    config.connections = n;
    return 0;
  }
  nbdserve_error("nbd: unknown parameter '%s' (see nbdserve --help nbd)", key);
  return -1;
}

static bool uri_scheme_ok(const char *uri)
{
  static const char *const schemes[] = { "nbd://", "nbds://", "nbd+unix://", "nbds+unix://" };
  for (size_t i = 0; i < sizeof schemes / sizeof schemes[0]; i++)
    if (strncmp(uri, schemes[i], strlen(schemes[i])) == 0)
      return true;
  return false;
}

static int proxy_config_complete(void)
{
  int where = !!config.uri + !!config.socket + !!config.hostname;
  if (where != 1) {
    nbdserve_error("nbd: say where the backend is with exactly one of uri=, socket= or "
                   "hostname= (%s)", where ? "more than one was given" : "none was given");
    return -1;
  }
  if (config.uri && !uri_scheme_ok(config.uri)) {
    nbdserve_error("nbd: uri=%s: expected nbd://, nbds://, nbd+unix:// or nbds+unix://",
                   config.uri);
    return -1;
  }
  if (config.port && !config.hostname) {
    nbdserve_error("nbd: port= goes with hostname=");
    return -1;
  }
  if (config.export && config.uri) {
    nbdserve_error("nbd: export= goes with socket= or hostname=; in uri= the export is the "
                   "path (nbd://HOST/EXPORT)");
    return -1;
  }
  if (config.tls_certificates && config.tls_psk) {
    nbdserve_error("nbd: tls-certificates= and tls-psk= exclude each other");
    return -1;
  }
  if (config.tls == LIBNBD_TLS_DISABLE &&
      (config.tls_certificates || config.tls_psk || config.tls_username)) {
    nbdserve_error("nbd: tls=off with tls-certificates=, tls-psk= or tls-username=");
    return -1;
  }
  if (config.tls == -1 && (config.tls_certificates || config.tls_psk))
    config.tls = LIBNBD_TLS_REQUIRE; /* credentials given: they are meant to be used */
  return 0;
}

static int proxy_get_ready(void)
{
  return links_start();
}

static void proxy_unload(void)
{
  links_stop();
}

/* ---- Connections and capabilities -------------------------------------------------- */

static int proxy_list_meta_contexts(const char *export_name, struct nbdserve_contexts *contexts)
{
  (void) export_name; /* one backend export, whatever the client asked for */
  for (size_t i = 0; i < info.ncontexts; i++)
    if (strcmp(info.contexts[i], NBDSERVE_CONTEXT_BASE_ALLOCATION) != 0 &&
        nbdserve_add_context(contexts, info.contexts[i]) == -1)
      return -1;
  return 0;
}

static void *proxy_open(int readonly, const char *export_name)
{
  (void) readonly, (void) export_name;
  struct handle *hd = calloc(1, sizeof *hd);
  if (hd == NULL) {
    nbdserve_set_error(ENOMEM);
    return NULL;
  }
  pthread_mutex_init(&hd->lock, NULL);
  links_revive(); /* a no-op unless the backend was given up */
  return hd;
}

static void proxy_close(void *handle)
{
  struct handle *hd = handle;
  /* Ops still in flight (a client that left mid-request) are freed by
   * their last command. */
  for (struct op *op = hd->ops, *next; op; op = next) {
    next = op->next;
    op_unref(op);
  }
  for (unsigned i = 0; i < ANSWERED_KEPT; i++)
    if (hd->answered[i])
      op_unref(hd->answered[i]);
  pthread_mutex_destroy(&hd->lock);
  free(hd);
}

static int64_t proxy_get_size(void *handle)
{
  (void) handle;
  return info.size;
}

static int proxy_block_size(void *handle, uint32_t *minimum, uint32_t *preferred,
                          uint32_t *maximum)
{
  (void) handle;
  *minimum = info.block_min ? info.block_min : 1;
  *preferred = info.block_preferred ? info.block_preferred
                                    : (*minimum > 4096 ? *minimum : 4096);
  *maximum = info.block_max ? info.block_max : DEFAULT_MAX_PAYLOAD;
  return 0;
}

#define CAPABILITY(name, expr)    \
  static int name(void *handle)   \
  {                               \
    (void) handle;                \
    return (expr);                \
  }
CAPABILITY(proxy_can_write, !info.read_only)
CAPABILITY(proxy_can_flush, info.can_flush)
CAPABILITY(proxy_is_rotational, info.is_rotational)
CAPABILITY(proxy_can_trim, info.can_trim)
CAPABILITY(proxy_can_zero, info.can_zero)
CAPABILITY(proxy_can_fast_zero, info.can_fast_zero)
CAPABILITY(proxy_can_fua, info.can_fua ? NBDSERVE_FUA_NATIVE : NBDSERVE_FUA_NONE)
CAPABILITY(proxy_can_multi_conn, info.can_multi_conn)
CAPABILITY(proxy_can_cache, info.can_cache ? NBDSERVE_CACHE_NATIVE : NBDSERVE_CACHE_NONE)
CAPABILITY(proxy_can_extents, backend_context_index(NBDSERVE_CONTEXT_BASE_ALLOCATION) >= 0)

/* ---- Data ------------------------------------------------------------------------------- */

static int proxy_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct op key = { .type = OP_READ, .offset = offset, .count = count, .flags = flags,
                    .buf = buf };
  return forward(handle, &key, NULL, NULL);
}

static int proxy_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset,
                      uint32_t flags)
{
  struct op key = { .type = OP_WRITE, .offset = offset, .count = count, .flags = flags,
                    .buf = (void *) buf };
  return forward(handle, &key, NULL, NULL);
}

static int proxy_flush(void *handle, uint32_t flags)
{
  struct op key = { .type = OP_FLUSH, .flags = flags };
  return forward(handle, &key, NULL, NULL);
}

static int proxy_trim(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct op key = { .type = OP_TRIM, .offset = offset, .count = count, .flags = flags };
  return forward(handle, &key, NULL, NULL);
}

static int proxy_zero(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct op key = { .type = OP_ZERO, .offset = offset, .count = count, .flags = flags };
  return forward(handle, &key, NULL, NULL);
}

static int proxy_cache(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct op key = { .type = OP_CACHE, .offset = offset, .count = count, .flags = flags };
  return forward(handle, &key, NULL, NULL);
}

static int proxy_meta_extents(void *handle, const char *context, uint64_t count, uint64_t offset,
                            uint32_t flags, struct nbdserve_extents *extents)
{
  if (backend_context_index(context) < 0) {
    nbdserve_set_error(EINVAL);
    return -1;
  }
  struct op key = { .type = OP_STATUS, .offset = offset, .count = count,
                    .flags = flags & NBDSERVE_FLAG_REQ_ONE };
  return forward(handle, &key, context, extents);
}

static int proxy_extents(void *handle, uint64_t count, uint64_t offset, uint32_t flags,
                       struct nbdserve_extents *extents)
{
  return proxy_meta_extents(handle, NBDSERVE_CONTEXT_BASE_ALLOCATION, count, offset, flags,
                          extents);
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "nbd",
  .longname = "a proxy to another NBD server (with libnbd)",
  .version = "0.1.0",
  .description =
    "Serves the export of another NBD server (qemu-nbd, nbdkit, nbdserve, a remote "
    "machine), so that nbdserve's filters can stand in front of it.  Every capability "
    "and every meta context of the backend passes through (base:allocation, "
    "qemu:dirty-bitmap:*, qemu:allocation-depth); requests are pipelined over a few "
    "connections shared by all clients.",
  .config_help =
    "uri=URI               nbd://HOST[:PORT]/EXPORT, nbds://..., nbd+unix:///EXPORT?socket=PATH,\n"
    "                      nbds+unix://... (the magic key)\n"
    "socket=PATH           a Unix socket (instead of uri=)\n"
    "hostname=HOST         a TCP host (instead of uri=), with port=PORT (default 10809)\n"
    "export=NAME           the export, with socket= or hostname= (default \"\")\n"
    "tls=off|on|require    TLS to the backend (default: as the URI says, else off;\n"
    "                      require when tls-certificates= or tls-psk= is given)\n"
    "tls-certificates=DIR  X.509 files: ca-cert.pem, client-cert.pem, client-key.pem\n"
    "tls-psk=FILE          pre-shared keys file (psktool format)\n"
    "tls-username=NAME     the TLS user name (PSK identity); default: the login name\n"
    "connections=N         connections to the backend, 1 to 16, when it allows\n"
    "                      multi-conn (default 1)\n"
    "retry=N|DURATION      when the backend goes away, reconnect once a second N times\n"
    "                      or for DURATION (30s, 2m); default 0: never",
  .magic_config_key = "uri",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .flags = NBDSERVE_PLUGIN_NEVER_BLOCKS,
  .config = proxy_config,
  .config_complete = proxy_config_complete,
  .get_ready = proxy_get_ready,
  .unload = proxy_unload,
  .list_meta_contexts = proxy_list_meta_contexts,
  .open = proxy_open,
  .close = proxy_close,
  .get_size = proxy_get_size,
  .block_size = proxy_block_size,
  .can_write = proxy_can_write,
  .can_flush = proxy_can_flush,
  .is_rotational = proxy_is_rotational,
  .can_trim = proxy_can_trim,
  .can_zero = proxy_can_zero,
  .can_fast_zero = proxy_can_fast_zero,
  .can_fua = proxy_can_fua,
  .can_multi_conn = proxy_can_multi_conn,
  .can_cache = proxy_can_cache,
  .can_extents = proxy_can_extents,
  .pread = proxy_pread,
  .pwrite = proxy_pwrite,
  .flush = proxy_flush,
  .trim = proxy_trim,
  .zero = proxy_zero,
  .cache = proxy_cache,
  .extents = proxy_extents,
  .meta_extents = proxy_meta_extents,
};

NBDSERVE_REGISTER_PLUGIN(plugin)
