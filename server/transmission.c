/* nbdserve - the transmission phase: parsing requests, checking them
 * against the specification, running them through the chain.
 *
 * The loop thread parses every request header a read() brought in and
 * checks it; a request that breaks a rule is answered at once without
 * reaching the plugin.  Good requests run on a worker (or inline when
 * the whole chain never blocks) and reply from there.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conn.h"
#include "loop.h"
#include "meta.h"

/* Reads at least this large are answered sparsely (holes as
 * OFFSET_HOLE chunks) when the backend reports holes.  Smaller reads
 * skip the extra extents call: it would cost more than it saves. */
#define SPARSE_READ_MIN (64 * 1024)

uint32_t errno_to_nbd(int err)
{
  switch (err) {
  case 0:
    return NBD_SUCCESS;
  case EPERM:
  case EROFS:
  case EACCES:
    return NBD_EPERM;
  case EIO:
    return NBD_EIO;
  case ENOMEM:
    return NBD_ENOMEM;
  case EINVAL:
    return NBD_EINVAL;
  case ENOSPC:
  case EDQUOT:
  case EFBIG:
    return NBD_ENOSPC;
  case EOVERFLOW:
    return NBD_EOVERFLOW;
  case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
  case EOPNOTSUPP:
#endif
    return NBD_ENOTSUP;
  case ESHUTDOWN:
    return NBD_ESHUTDOWN;
  default:
    return NBD_EIO;
  }
}

/* ---- Checking a request --------------------------------------------------- */

static bool in_bounds(const struct conn *conn, uint64_t offset, uint64_t count)
{
  uint64_t size = (uint64_t) conn->size;
  return count <= size && offset <= size - count;
}

/* The NBD error for REQ as parsed, or 0 if it may run. */
static uint32_t check_request(const struct conn *conn, const struct request *req)
{
  uint16_t f = req->flags;
  uint16_t known = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF |
                   NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;
  if (conn->extended)
    known |= NBD_CMD_FLAG_PAYLOAD_LEN;
  if (f & ~known)
    return NBD_EINVAL;
  if ((f & NBD_CMD_FLAG_FUA) && !(conn->eflags & NBD_FLAG_SEND_FUA))
    return NBD_EINVAL;

  /* Which flags each command accepts. */
  uint16_t allowed = 0;
  switch (req->type) {
  case NBD_CMD_READ:
    allowed = conn->structured ? NBD_CMD_FLAG_DF : 0;
    break;
  case NBD_CMD_WRITE:
    allowed = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_PAYLOAD_LEN;
    break;
  case NBD_CMD_TRIM:
    allowed = NBD_CMD_FLAG_FUA;
    break;
  case NBD_CMD_WRITE_ZEROES:
    allowed = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE;
    if (conn->eflags & NBD_FLAG_SEND_FAST_ZERO)
      allowed |= NBD_CMD_FLAG_FAST_ZERO;
    break;
  case NBD_CMD_BLOCK_STATUS:
    allowed = NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_PAYLOAD_LEN;
    break;
  case NBD_CMD_FLUSH:
  case NBD_CMD_CACHE:
  case NBD_CMD_DISC:
    break;
  default:
    return NBD_EINVAL;
  }
  if (f & ~allowed)
    return NBD_EINVAL;
  if (conn->extended && req->type == NBD_CMD_WRITE && !(f & NBD_CMD_FLAG_PAYLOAD_LEN))
    return NBD_EINVAL;

  switch (req->type) {
  case NBD_CMD_READ:
    if (req->count == 0 || req->count > conn->payload_max)
      return NBD_EINVAL;
    return in_bounds(conn, req->offset, req->count) ? 0 : NBD_EINVAL;

  case NBD_CMD_WRITE:
    if (conn->readonly)
      return NBD_EPERM;
    if (req->count == 0 || req->count > conn->payload_max)
      return NBD_EINVAL;
    return in_bounds(conn, req->offset, req->count) ? 0 : NBD_ENOSPC;

  case NBD_CMD_WRITE_ZEROES:
    if (conn->readonly)
      return NBD_EPERM;
    if (!(conn->eflags & NBD_FLAG_SEND_WRITE_ZEROES) || req->count == 0)
      return NBD_EINVAL;
    return in_bounds(conn, req->offset, req->count) ? 0 : NBD_ENOSPC;

  case NBD_CMD_TRIM:
    if (conn->readonly)
      return NBD_EPERM;
    if (!(conn->eflags & NBD_FLAG_SEND_TRIM) || req->count == 0)
      return NBD_EINVAL;
    return in_bounds(conn, req->offset, req->count) ? 0 : NBD_EINVAL;

  case NBD_CMD_FLUSH:
    return conn->eflags & NBD_FLAG_SEND_FLUSH ? 0 : NBD_EINVAL;

  case NBD_CMD_CACHE:
    if (!(conn->eflags & NBD_FLAG_SEND_CACHE) || req->count == 0)
      return NBD_EINVAL;
    return in_bounds(conn, req->offset, req->count) ? 0 : NBD_EINVAL;

  case NBD_CMD_BLOCK_STATUS:
    if (conn->ncontexts == 0 || req->count == 0)
      return NBD_EINVAL;
    if (f & NBD_CMD_FLAG_PAYLOAD_LEN)
      return 0; /* the effect length is in the payload: checked when run */
    return in_bounds(conn, req->offset, req->count) ? 0 : NBD_EINVAL;
  }
  return 0;
}

/* ---- Running a request ------------------------------------------------------ */

static uint32_t backend_flags(const struct request *req)
{
  uint32_t f = 0;
  if (req->flags & NBD_CMD_FLAG_FUA)
    f |= NBDSERVE_FLAG_FUA;
  if (req->type == NBD_CMD_WRITE_ZEROES && !(req->flags & NBD_CMD_FLAG_NO_HOLE))
    f |= NBDSERVE_FLAG_MAY_TRIM;
  if (req->flags & NBD_CMD_FLAG_FAST_ZERO)
    f |= NBDSERVE_FLAG_FAST_ZERO;
  if (req->flags & NBD_CMD_FLAG_REQ_ONE)
    f |= NBDSERVE_FLAG_REQ_ONE;
  return f;
}

/* A client that selected base:allocation asks where the holes are and
 * skips them itself (nbdcopy, qemu-img): looking again for every read
 * would only cost, and on some file systems (tmpfs) finding the end of
 * data takes time in proportion to the file's size. */
static bool client_tracks_allocation(const struct conn *conn)
{
  for (size_t i = 0; i < conn->ncontexts; i++)
    if (strcmp(conn->contexts[i].name, NBDSERVE_CONTEXT_BASE_ALLOCATION) == 0)
      return true;
  return false;
}

/* Split a read into data and hole segments from the backend's extents.
 * Returns the number of segments, 0 meaning "read it all as data". */
static size_t plan_sparse_read(struct request *req, struct read_segment *segs)
{
  struct conn *conn = req->conn;
  if (!conn->structured || (req->flags & NBD_CMD_FLAG_DF) || req->count < SPARSE_READ_MIN ||
      __atomic_load_n(&conn->sparse_plan_waits, __ATOMIC_RELAXED) ||
      client_tracks_allocation(conn) ||
      nbdserve_next_can_extents(conn->top) != 1)
    return 0;

  struct nbdserve_extents *e = nbdserve_extents_new(req->offset, req->count, 0);
  if (e == NULL)
    return 0;
  size_t nsegs = 0;
  bool any_hole = false;
  uint64_t end = req->offset + req->count, pos = req->offset;
  uint32_t waited_before = req->waited_layers;
  int r = nbdserve_next_extents(conn->top, req->count, req->offset, 0, e);
  if (r == -1 && errno == EINPROGRESS) {
    /* The plan is an optimisation: a chain whose extents wait (a proxy
     * asking its backend) would pay a round trip per read for it, and
     * the read below may have to wait too.  Read it all as data. */
    wait_withdraw(req, waited_before);
    __atomic_store_n(&conn->sparse_plan_waits, true, __ATOMIC_RELAXED);
  }
  if (r == 0) {
    size_t n = nbdserve_extents_count(e);
    for (size_t i = 0; i < n && pos < end; i++) {
      uint64_t off, len, flags;
      nbdserve_extents_get(e, i, &off, &len, &flags);
      if (off + len <= pos)
        continue;
      uint64_t seg_end = MIN(off + len, end);
      bool hole = flags & NBDSERVE_EXTENT_ZERO;
      if (nsegs > 0 && segs[nsegs - 1].hole == hole)
        segs[nsegs - 1].length = seg_end - segs[nsegs - 1].offset;
      else if (nsegs == MAX_READ_SEGMENTS)
        break;
      else
        segs[nsegs++] = (struct read_segment){ pos, seg_end - pos, hole };
      any_hole |= hole;
      pos = seg_end;
    }
  }
  nbdserve_extents_free(e);
  if (!any_hole)
    return 0;
  /* Whatever the extents did not describe is read as data. */
  if (pos < end) {
    if (nsegs > 0 && !segs[nsegs - 1].hole)
      segs[nsegs - 1].length = end - segs[nsegs - 1].offset;
    else if (nsegs < MAX_READ_SEGMENTS)
      segs[nsegs++] = (struct read_segment){ pos, end - pos, false };
    else {
      segs[nsegs - 1].hole = false; /* the last hole is read as data */
      segs[nsegs - 1].length = end - segs[nsegs - 1].offset;
    }
  }
  return nsegs;
}

/* Reads or writes [offset, offset+count) in calls no larger than the
 * chain's maximum block size: a client that negotiated no block size may
 * send up to --max-payload in one request. */
static int data_in_pieces(struct request *req, char *buf, uint64_t count, uint64_t offset,
                          uint32_t flags)
{
  struct conn *conn = req->conn;
  while (count > 0) {
    uint32_t n = (uint32_t) MIN(count, (uint64_t) conn->bs_max);
    int r = req->type == NBD_CMD_WRITE ? nbdserve_next_pwrite(conn->top, buf, n, offset, flags)
                                       : nbdserve_next_pread(conn->top, buf, n, offset, flags);
    if (r == -1)
      return -1;
    buf += n;
    offset += n;
    count -= n;
  }
  return 0;
}

static int do_read(struct request *req)
{
  struct read_segment segs[MAX_READ_SEGMENTS];

  if (request_reserve(req, req->count) == -1) {
    errno = ENOMEM;
    return -1;
  }
  size_t nsegs = plan_sparse_read(req, segs);
  if (nsegs == 0) {
    if (data_in_pieces(req, req->buf, req->count, req->offset, 0) == -1)
      return -1;
  }
  else {
    for (size_t i = 0; i < nsegs; i++) {
      if (segs[i].hole)
        continue;
      if (data_in_pieces(req, req->buf + (segs[i].offset - req->offset), segs[i].length,
                         segs[i].offset, 0) == -1)
        return -1;
    }
  }
  reply_read(req, segs, nsegs);
  return 0;
}

/* Contexts a BLOCK_STATUS asks for: all selected ones, or (payload
 * form) those listed in the payload.  Returns the count, or -1 for an
 * invalid payload. */
static int block_status_contexts(struct request *req, uint32_t *ids)
{
  struct conn *conn = req->conn;
  if (!(req->flags & NBD_CMD_FLAG_PAYLOAD_LEN)) {
    for (size_t i = 0; i < conn->ncontexts; i++)
      ids[i] = conn->contexts[i].id;
    return (int) conn->ncontexts;
  }
  /* 64-bit effect length, then context ids. */
  if (req->payload_len < 12 || (req->payload_len - 8) % 4 != 0)
    return -1;
  req->count = wire_get64(req->buf);
  size_t n = (req->payload_len - 8) / 4;
  if (n > conn->ncontexts || req->count == 0 || !in_bounds(conn, req->offset, req->count))
    return -1;
  for (size_t i = 0; i < n; i++) {
    ids[i] = wire_get32(req->buf + 8 + 4 * i);
    if (meta_context_name(conn, ids[i]) == NULL)
      return -1;
    for (size_t j = 0; j < i; j++)
      if (ids[j] == ids[i])
        return -1; /* duplicates are refused, as the spec asks */
  }
  return (int) n;
}

static int do_block_status(struct request *req)
{
  struct conn *conn = req->conn;
  uint32_t ids[MAX_CONTEXTS_PER_CONN];
  struct nbdserve_extents *lists[MAX_CONTEXTS_PER_CONN];
  int n = block_status_contexts(req, ids), done = 0, r = 0;

  if (n <= 0) {
    errno = EINVAL;
    return -1;
  }
  uint32_t flags = backend_flags(req);
  /* The effect length is a hint: never look past the end or 2^32-1 in
   * compact mode. */
  uint64_t count = req->count;
  for (; done < n; done++) {
    const char *name = meta_context_name(conn, ids[done]);
    lists[done] = nbdserve_extents_new(req->offset, count, flags);
    if (lists[done] == NULL) {
      errno = ENOMEM;
      r = -1;
      break;
    }
    if (strcmp(name, NBDSERVE_CONTEXT_BASE_ALLOCATION) == 0) {
      if (nbdserve_next_can_extents(conn->top) == 1)
        r = nbdserve_next_extents(conn->top, count, req->offset, flags, lists[done]);
      else
        r = nbdserve_add_extent(lists[done], req->offset, count, 0);
    }
    else
      r = nbdserve_next_meta_extents(conn->top, name, count, req->offset, flags, lists[done]);
    if (r == 0 && nbdserve_extents_count(lists[done]) == 0) {
      nbdserve_error("extents for %s returned nothing", name);
      errno = EIO;
      r = -1;
    }
    if (r == -1) {
      done++;
      break;
    }
  }
  int saved = errno;
  if (r == 0)
    reply_block_status(req, lists, ids, (size_t) n);
  for (int i = 0; i < done; i++)
    if (lists[i])
      nbdserve_extents_free(lists[i]);
  errno = saved;
  return r;
}

/* Loop thread: the status figures (see struct counters).  Bytes are
 * those of requests that passed the checks. */
static void count_request(struct conn *conn, const struct request *req)
{
  struct counters *c = &conn->loop->counters;
  enum request_kind kind;
  switch (req->type) {
  case NBD_CMD_READ: kind = KIND_READ; break;
  case NBD_CMD_WRITE: kind = KIND_WRITE; break;
  case NBD_CMD_FLUSH: kind = KIND_FLUSH; break;
  case NBD_CMD_TRIM: kind = KIND_TRIM; break;
  case NBD_CMD_WRITE_ZEROES: kind = KIND_ZERO; break;
  case NBD_CMD_CACHE: kind = KIND_CACHE; break;
  case NBD_CMD_BLOCK_STATUS: kind = KIND_BLOCK_STATUS; break;
  default: kind = KIND_OTHER; break;
  }
  counter_add(&c->requests[kind], 1);
  if (req->error == 0 && kind == KIND_READ)
    counter_add(&c->bytes_read, req->count);
  else if (req->error == 0 && kind == KIND_WRITE)
    counter_add(&c->bytes_written, req->count);
}

/* Returns 0 when the reply was sent, -1 with errno to send an error. */
static int run_request(struct request *req)
{
  struct nbdserve_next *top = req->conn->top;
  uint32_t flags = backend_flags(req);
  int r;

  switch (req->type) {
  case NBD_CMD_READ:
    return do_read(req);
  case NBD_CMD_BLOCK_STATUS:
    return do_block_status(req);
  case NBD_CMD_WRITE:
    r = data_in_pieces(req, req->buf, req->count, req->offset, flags);
    break;
  case NBD_CMD_FLUSH:
    r = nbdserve_next_flush(top, 0);
    break;
  case NBD_CMD_TRIM:
    r = nbdserve_next_trim(top, req->count, req->offset, flags);
    break;
  case NBD_CMD_CACHE:
    r = nbdserve_next_cache(top, req->count, req->offset, 0);
    break;
  case NBD_CMD_WRITE_ZEROES:
    r = nbdserve_next_zero(top, req->count, req->offset, flags);
    break;
  default:
    errno = EINVAL;
    return -1;
  }
  if (r == 0)
    reply_none(req);
  return r;
}

static void execute_request(struct job *job)
{
  struct request *req = (struct request *) job;
  struct conn *conn = req->conn;
  pthread_mutex_t *lock = exec_begin(conn, CALL_REQUEST);
  wait_begin_request(req);
  int r = run_request(req);
  int err = errno;
  exec_end(lock);
  if (wait_end_request(req, r == -1 && err == EINPROGRESS))
    return; /* parked: it runs again when its wait ends */

  if (r == -1) {
    uint32_t nbd_err = errno_to_nbd(err);
    /* FAST_ZERO failures are expected: don't fill the log with them. */
    if (!(req->type == NBD_CMD_WRITE_ZEROES && err == ENOTSUP))
      nbdserve_debug("connection %u: command %u at %llu+%llu failed: %s", conn->id,
                     req->type, (unsigned long long) req->offset,
                     (unsigned long long) req->count, strerror(err));
    reply_error(req, nbd_err);
  }
}

static void submit(struct conn *conn, struct request *req)
{
  (void) conn;
  if (req->error) {
    reply_error(req, req->error); /* never reaches the plugin */
    return;
  }
  req->job.run = execute_request;
  dispatch_job(&req->job);
}

/* ---- Parsing --------------------------------------------------------------- */

static size_t available(const struct conn *conn)
{
  return conn->in_end - conn->in_start;
}

/* Take payload bytes already in inbuf; true when the payload is whole. */
static bool take_payload(struct conn *conn, struct request *req, size_t *got)
{
  size_t n = MIN(available(conn), (size_t) req->payload_len - *got);
  memcpy(req->buf + *got, conn->inbuf + conn->in_start, n);
  conn->in_start += n;
  *got += n;
  return *got == req->payload_len;
}

/* Inline requests put their replies in one batch for one writev.  Past
 * a few hundred KiB the socket could not take more at once anyway, and
 * running further reads would only fill more buffers that have gone
 * cold in the cache by the time they are written. */
static bool batch_is_full(struct conn *conn)
{
  if (!conn->batching)
    return false;
  pthread_mutex_lock(&conn->send_lock);
  bool full = conn->queued_bytes >= MAX_BATCH_BYTES;
  pthread_mutex_unlock(&conn->send_lock);
  return full;
}

static size_t request_header_size(const struct conn *conn)
{
  return conn->extended ? sizeof(struct nbd_extended_request) : sizeof(struct nbd_request);
}

bool transmission_input(struct conn *conn)
{
  size_t hsize = request_header_size(conn);

  while (conn->state == CONN_TRANSMISSION && conn->partial == NULL) {
    if (available(conn) < hsize)
      return true;
    const char *p = conn->inbuf + conn->in_start;
    uint32_t magic = wire_get32(p);
    uint32_t want = conn->extended ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC;
    if (magic != want) {
      nbdserve_error("connection %u: bad request magic 0x%08x%s, disconnecting", conn->id,
                     magic,
                     magic == NBD_EXTENDED_REQUEST_MAGIC ? " (extended headers not negotiated)"
                     : magic == NBD_REQUEST_MAGIC ? " (extended headers were negotiated)"
                                                  : "");
      return false;
    }
    if (batch_is_full(conn))
      return true; /* the loop writes, then comes back for the rest */
    struct request *req = request_get(conn);
    if (req == NULL)
      return true; /* too many in flight: the loop pauses reading */
    req->flags = wire_get16(p + 4);
    req->type = wire_get16(p + 6);
    req->cookie = wire_get64(p + 8);
    req->offset = wire_get64(p + 16);
    req->count = conn->extended ? wire_get64(p + 24) : wire_get32(p + 24);
    conn->in_start += hsize;

    uint64_t payload = 0;
    if (conn->extended)
      payload = (req->flags & NBD_CMD_FLAG_PAYLOAD_LEN) ? req->count : 0;
    else if (req->type == NBD_CMD_WRITE)
      payload = req->count;
    /* A refused read holds no buffer (its reply is a header); a refused
     * write's payload is still read, into the request's buffer, to keep
     * the stream in step.  Only payloads over the cap are not read. */
    uint64_t cap = MAX(conn->bs_max, opt.max_payload);
    uint64_t weight = req->type == NBD_CMD_READ ? req->count : payload;
    if (weight <= cap)
      request_set_weight(req, weight);

    if (req->type == NBD_CMD_DISC) {
      nbdserve_debug("connection %u: client sent NBD_CMD_DISC", conn->id);
      request_put(req);
      return false; /* in-flight requests finish, then we close */
    }
    if (payload > cap) {
      nbdserve_error("connection %u: request payload of %llu bytes is over the limit of "
                     "%llu, disconnecting", conn->id, (unsigned long long) payload,
                     (unsigned long long) cap);
      request_put(req);
      return false;
    }
    req->error = check_request(conn, req);
    count_request(conn, req);
    req->payload_len = (uint32_t) payload;
    if (payload > 0) {
      if (request_reserve(req, payload) == -1) {
        nbdserve_error("connection %u: out of memory for a request payload", conn->id);
        request_put(req);
        return false;
      }
      size_t got = 0;
      if (!take_payload(conn, req, &got)) {
        conn->partial = req;
        conn->partial_got = got;
        return true;
      }
    }
    submit(conn, req);
  }
  return true;
}

bool transmission_input_exhausted(const struct conn *conn)
{
  return conn->partial != NULL || available(conn) < request_header_size(conn);
}

/* Reads more of the partial request's payload straight into its buffer;
 * submits the request once it is whole.  False when the connection must
 * close (a read error, or the client left in mid-payload). */
bool transmission_read_payload(struct conn *conn)
{
  struct request *req = conn->partial;
  size_t need = req->payload_len - conn->partial_got;
  ssize_t r = conn_recv(conn, req->buf + conn->partial_got, need);

  if (r < 0) {
    if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
      return true;
    nbdserve_debug("connection %u: read: %s", conn->id, strerror(errno));
    return false;
  }
  if (r == 0) {
    nbdserve_debug("connection %u: client went away in the middle of a payload", conn->id);
    return false;
  }
  conn->partial_got += (size_t) r;
  if (conn->partial_got == req->payload_len) {
    conn->partial = NULL;
    submit(conn, req);
  }
  return true;
}
