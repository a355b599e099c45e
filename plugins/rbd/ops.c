/* nbdserve rbd plugin: the data path.
 *
 * Every read, write, flush, trim and zero is one of librbd's
 * asynchronous calls.  The callback starts it, asks the server to run
 * the request again when it is over (nbdserve_retry_when) and returns:
 * no thread waits for the cluster.  librbd's completion callback, on one
 * of librbd's threads, records the result and wakes the request
 * (nbdserve_wake); in the run that follows the callback finds its
 * operation and answers from it.
 *
 * Finding it again.  The server re-runs the whole request, so a call
 * must recognise the operation it started in an earlier run.  A call is
 * named by its kind and its arguments; for reads and writes the buffer
 * too, which no other request in flight shares.  The server may split
 * one request into several calls (pieces of a large write, the data
 * segments of a sparse read), and after a wait it makes all of them
 * again, in order: so the answer of a read or write is kept after it is
 * given, for the calls before the one that waited.  Those kept answers
 * are forgotten when a new request's first run uses the same memory
 * (the old request is then over), and at most KEEP_ANSWERS are kept per
 * connection (the oldest is dropped: at worst a piece is read or
 * written once more).  Flush, trim and zero are never split, and their
 * answer is forgotten once given.
 *
 * A wait cut short (the client left, the server stops) while librbd
 * still works on the operation: the call waits for librbd here, since
 * librbd writes into the request's buffer until it is done.  That wait
 * is bounded by timeout= (without it, by Ceph's own retries).
 *
 * FUA: the write (or trim, zero) is done first, then a flush, each a
 * wait of its own, in one call.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nbdserve-plugin.h"
#include "rbd.h"

#define KEEP_ANSWERS 256

enum op_state {
  OP_RUNNING, /* librbd has it */
  OP_DONE, /* librbd finished it; nobody answered from it yet */
  OP_ANSWERED, /* a read or write whose answer is kept for a rerun */
};

struct op {
  struct op *next, *prev;
  struct handle *h;
  enum op_kind kind;
  const void *buf;
  uint64_t offset, count;
  uint32_t flags;
  enum op_state state;
  bool flushing; /* the flush after a FUA request is what runs now */
  int err; /* 0 or the errno librbd reported */
  struct nbdserve_waiter *waiter; /* woken by the completion; NULL: a thread waits */
};

static const char *const kind_name[] = {
  [OP_READ] = "read", [OP_WRITE] = "write", [OP_FLUSH] = "flush",
  [OP_TRIM] = "trim", [OP_ZERO] = "zero",
};

/* ---- The list of a connection's operations (under h->lock) ------------- */

static void link_op(struct handle *h, struct op *op)
{
  op->prev = NULL;
  op->next = h->ops;
  if (h->ops)
    h->ops->prev = op;
  h->ops = op;
}

static void unlink_op(struct handle *h, struct op *op)
{
  if (op->prev)
    op->prev->next = op->next;
  else
    h->ops = op->next;
  if (op->next)
    op->next->prev = op->prev;
  if (op->state == OP_ANSWERED)
    h->answered--;
}

static void forget_op(struct handle *h, struct op *op)
{
  unlink_op(h, op);
  free(op);
}

static bool same_call(const struct op *op, enum op_kind kind, const void *buf,
                      uint64_t offset, uint64_t count)
{
  return op->kind == kind && op->buf == buf && op->offset == offset && op->count == count;
}

/* The operation an earlier run of this call started.  Several identical
 * flushes (or trims, zeroes) may be in flight at once: any finished one
 * answers, as each waits only for its own to finish. */
static struct op *find_op(struct handle *h, enum op_kind kind, const void *buf,
                          uint64_t offset, uint64_t count)
{
  struct op *running = NULL;
  for (struct op *op = h->ops; op; op = op->next) {
    if (!same_call(op, kind, buf, offset, count))
      continue;
    if (op->state != OP_RUNNING)
      return op;
    running = op;
  }
  return running;
}

static bool overlaps(const struct op *op, const void *buf, uint64_t count)
{
  const char *a = op->buf, *b = buf;
  return op->buf && a < b + count && b < a + op->count;
}

/* A request's first run: kept answers in the memory it uses belong to
 * requests that are over. */
static void forget_answers_in(struct handle *h, const void *buf, uint64_t count)
{
  for (struct op *op = h->ops, *next; op; op = next) {
    next = op->next;
    if (op->state == OP_ANSWERED && overlaps(op, buf, count))
      forget_op(h, op);
  }
}

static void keep_answer(struct handle *h, struct op *op)
{
  op->state = OP_ANSWERED;
  h->answered++;
  if (h->answered <= KEEP_ANSWERS)
    return;
  struct op *oldest = NULL;
  for (struct op *o = h->ops; o; o = o->next)
    if (o->state == OP_ANSWERED)
      oldest = o;
  if (oldest)
    forget_op(h, oldest);
}

/* ---- librbd's side ------------------------------------------------------ */

/* On a librbd thread. */
static void op_finished(rbd_completion_t c, void *arg)
{
  struct op *op = arg;
  struct handle *h = op->h;
  ssize_t r = rbd_aio_get_return_value(c);
  rbd_aio_release(c);
  if (op->kind == OP_WRITE && !op->flushing)
    rbd_note_write(); /* before the answer: see write_epoch in status.c */

  pthread_mutex_lock(&h->lock);
  op->err = r < 0 ? (int) -r : 0;
  op->state = OP_DONE;
  struct nbdserve_waiter *w = op->waiter;
  op->waiter = NULL;
  h->running--;
  pthread_cond_broadcast(&h->changed);
  pthread_mutex_unlock(&h->lock);
  /* Not under the lock, and touching neither op nor h: once the lock is
   * dropped, a rerun (or close) may free both. */
  if (w)
    nbdserve_wake(w);
}

/* Hand OP (its flushing phase, or its own kind) to librbd.  Returns 0 or
 * a negative errno; on failure op_finished will not be called. */
static int start_in_librbd(struct op *op)
{
  rbd_completion_t c;
  int r = rbd_aio_create_completion(op, op_finished, &c);
  if (r < 0)
    return r;
  rbd_image_t image = op->h->img->rbd;
  if (op->flushing)
    r = rbd_aio_flush(image, c);
  else {
    switch (op->kind) {
    case OP_READ:
      r = rbd_aio_read(image, op->offset, op->count, (char *) op->buf, c);
      break;
    case OP_WRITE:
      rbd_note_write();
      r = rbd_aio_write(image, op->offset, op->count, op->buf, c);
      break;
    case OP_FLUSH:
      r = rbd_aio_flush(image, c);
      break;
    case OP_TRIM:
      r = rbd_aio_discard(image, op->offset, op->count, c);
      break;
    case OP_ZERO:
      /* Without MAY_TRIM the client wants the range to stay allocated:
       * thick provisioning writes the zeroes out on the OSDs. */
      r = rbd_aio_write_zeroes(image, op->offset, op->count, c,
                               op->flags & NBDSERVE_FLAG_MAY_TRIM
                                 ? 0 : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION, 0);
      break;
    }
  }
  if (r < 0)
    rbd_aio_release(c);
  return r < 0 ? r : 0;
}

/* Hand OP to librbd, to wake W (NULL: a thread waits for it).  False
 * when librbd refused it: OP is then done, with the error. */
static bool launch(struct handle *h, struct op *op, struct nbdserve_waiter *w)
{
  pthread_mutex_lock(&h->lock);
  op->state = OP_RUNNING;
  op->waiter = w;
  h->running++;
  pthread_mutex_unlock(&h->lock);
  int r = start_in_librbd(op);
  if (r == 0)
    return true;
  pthread_mutex_lock(&h->lock);
  op->state = OP_DONE;
  op->err = -r;
  op->waiter = NULL;
  h->running--;
  pthread_mutex_unlock(&h->lock);
  return false;
}

/* Start OP and ask the server to come back when it is over.  Returns
 * what the callback returns: -1 with errno EINPROGRESS, or -2 when this
 * call cannot wait (the caller then runs it here). */
static int start_and_wait(struct handle *h, struct op *op)
{
  struct nbdserve_waiter *w;
  if (nbdserve_retry_when(NULL, &w) == -1 && errno != EINPROGRESS)
    return -2;
  /* Refused: nothing will complete, so wake the request here; its rerun
   * answers with the error. */
  if (!launch(h, op, w))
    nbdserve_wake(w);
  errno = EINPROGRESS;
  return -1;
}

static void wait_until_done(struct handle *h, struct op *op)
{
  pthread_mutex_lock(&h->lock);
  while (op->state == OP_RUNNING)
    pthread_cond_wait(&h->changed, &h->lock);
  pthread_mutex_unlock(&h->lock);
}

/* Start OP and wait for it on this thread: for calls made outside a
 * request (a filter's own thread), and for a cut-short FUA flush. */
static void run_here(struct handle *h, struct op *op)
{
  launch(h, op, NULL);
  wait_until_done(h, op);
}

/* ---- Answering ----------------------------------------------------------- */

static int answer(struct op *op)
{
  if (op->err == 0) {
    rbd_report_success();
    return 0;
  }
  int e = rbd_report_error(op->flushing ? "flush after a FUA request" : kind_name[op->kind],
                           op->count, op->offset, op->err);
  nbdserve_set_error(e);
  errno = e;
  return -1;
}

/* OP is done: the answer, or the next phase (the flush of FUA). */
static int finish(struct handle *h, struct op *op)
{
  if (op->err == 0 && (op->flags & NBDSERVE_FLAG_FUA) && !op->flushing) {
    op->flushing = true;
    if (!nbdserve_wait_cut_short()) {
      int r = start_and_wait(h, op);
      if (r != -2)
        return r;
    }
    run_here(h, op);
  }
  int r = answer(op);
  int saved = errno;
  pthread_mutex_lock(&h->lock);
  if (op->kind == OP_READ || op->kind == OP_WRITE)
    keep_answer(h, op);
  else
    forget_op(h, op);
  pthread_mutex_unlock(&h->lock);
  errno = saved;
  return r;
}

/* A call found the operation an earlier run started. */
static int resume(struct handle *h, struct op *op)
{
  if (op->state == OP_ANSWERED)
    return answer(op);
  if (op->state == OP_RUNNING) /* the wait was cut short */
    wait_until_done(h, op);
  return finish(h, op);
}

/* The one path of every data call. */
static int perform(struct handle *h, enum op_kind kind, const void *buf, uint64_t count,
                   uint64_t offset, uint32_t flags)
{
  bool rerun = nbdserve_has_waited(NULL);
  pthread_mutex_lock(&h->lock);
  struct op *op = NULL;
  if (rerun)
    op = find_op(h, kind, buf, offset, count);
  else if (buf)
    forget_answers_in(h, buf, count);
  pthread_mutex_unlock(&h->lock);
  if (op)
    return resume(h, op);

  if (nbdserve_wait_cut_short()) {
    /* Never started, and nothing may wait now. */
    nbdserve_set_error(ESHUTDOWN);
    errno = ESHUTDOWN;
    return -1;
  }
  op = calloc(1, sizeof *op);
  if (op == NULL) {
    nbdserve_set_error(ENOMEM);
    return -1;
  }
  *op = (struct op){ .h = h, .kind = kind, .buf = buf, .offset = offset, .count = count,
                     .flags = flags, .state = OP_DONE };
  pthread_mutex_lock(&h->lock);
  link_op(h, op);
  pthread_mutex_unlock(&h->lock);
  int r = start_and_wait(h, op);
  if (r != -2)
    return r;
  run_here(h, op);
  return finish(h, op);
}

int rbd_ops_pread(struct handle *h, void *buf, uint32_t count, uint64_t offset)
{
  return perform(h, OP_READ, buf, count, offset, 0);
}

int rbd_ops_pwrite(struct handle *h, const void *buf, uint32_t count, uint64_t offset,
                   uint32_t flags)
{
  return perform(h, OP_WRITE, buf, count, offset, flags & NBDSERVE_FLAG_FUA);
}

int rbd_ops_flush(struct handle *h)
{
  return perform(h, OP_FLUSH, NULL, 0, 0, 0);
}

int rbd_ops_trim(struct handle *h, uint64_t count, uint64_t offset, uint32_t flags)
{
  rbd_forget_data(h->img, offset, count);
  return perform(h, OP_TRIM, NULL, count, offset, flags & NBDSERVE_FLAG_FUA);
}

int rbd_ops_zero(struct handle *h, uint64_t count, uint64_t offset, uint32_t flags)
{
  if (flags & NBDSERVE_FLAG_MAY_TRIM)
    rbd_forget_data(h->img, offset, count);
  return perform(h, OP_ZERO, NULL, count, offset,
                 flags & (NBDSERVE_FLAG_FUA | NBDSERVE_FLAG_MAY_TRIM));
}

void rbd_ops_drain(struct handle *h)
{
  pthread_mutex_lock(&h->lock);
  while (h->running > 0)
    pthread_cond_wait(&h->changed, &h->lock);
  while (h->ops)
    forget_op(h, h->ops);
  pthread_mutex_unlock(&h->lock);
}
