/* nbdserve - encoding replies: simple, structured and extended.
 *
 * Every reply is a list of iovecs: headers are written into the
 * request's hdr[] space, read data is referenced where the plugin put
 * it, and the whole reply leaves in one writev (conn_send_reply).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <string.h>

#include "conn.h"

/* Reserve LEN bytes of header space and reference them in the iovecs,
 * merging with the previous iovec when it ends right there. */
static char *hdr_space(struct request *req, size_t len)
{
  char *p = req->hdr + req->hdr_used;
  req->hdr_used += len;
  if (req->niov > 0) {
    struct iovec *last = &req->iov[req->niov - 1];
    if ((char *) last->iov_base + last->iov_len == p) {
      last->iov_len += len;
      return p;
    }
  }
  req->iov[req->niov].iov_base = p;
  req->iov[req->niov].iov_len = len;
  req->niov++;
  return p;
}

static void add_data(struct request *req, const void *data, size_t len)
{
  if (len == 0)
    return;
  req->iov[req->niov].iov_base = (void *) data;
  req->iov[req->niov].iov_len = len;
  req->niov++;
}

static void put_be16(char **p, uint16_t v)
{
  wire_put16(*p, v);
  *p += 2;
}

static void put_be32(char **p, uint32_t v)
{
  wire_put32(*p, v);
  *p += 4;
}

static void put_be64(char **p, uint64_t v)
{
  wire_put64(*p, v);
  *p += 8;
}

static size_t chunk_header_size(const struct request *req)
{
  return req->conn->extended ? sizeof(struct nbd_extended_reply)
                             : sizeof(struct nbd_structured_reply);
}

/* Write a chunk header (structured or extended) at P; returns the end. */
static char *put_chunk_header(const struct request *req, char *p, uint16_t flags,
                              uint16_t type, uint64_t length)
{
  bool ext = req->conn->extended;
  put_be32(&p, ext ? NBD_EXTENDED_REPLY_MAGIC : NBD_STRUCTURED_REPLY_MAGIC);
  put_be16(&p, flags);
  put_be16(&p, type);
  put_be64(&p, req->cookie);
  if (ext) {
    put_be64(&p, req->offset);
    put_be64(&p, length);
  }
  else
    put_be32(&p, (uint32_t) length);
  return p;
}

/* Chunk header in the header space, followed by EXTRA bytes for the
 * payload's fixed part; returns where those go. */
static char *chunk(struct request *req, uint16_t flags, uint16_t type, uint64_t length,
                   size_t extra)
{
  char *p = hdr_space(req, chunk_header_size(req) + extra);
  return put_chunk_header(req, p, flags, type, length);
}

void reply_simple(struct request *req, uint32_t error)
{
  char *p = hdr_space(req, sizeof(struct nbd_simple_reply));
  put_be32(&p, NBD_SIMPLE_REPLY_MAGIC);
  put_be32(&p, error);
  put_be64(&p, req->cookie);
}

void reply_error(struct request *req, uint32_t error)
{
  req->niov = req->iov_done = 0;
  req->hdr_used = 0;
  if (!req->conn->structured) {
    reply_simple(req, error);
    conn_send_reply(req);
    return;
  }
  char *p = chunk(req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6, 6);
  put_be32(&p, error);
  put_be16(&p, 0); /* no message */
  conn_send_reply(req);
}

void reply_none(struct request *req)
{
  /* Simple replies stay valid with structured replies when there is no
   * payload; only extended headers forbid them. */
  if (req->conn->extended)
    chunk(req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0, 0);
  else
    reply_simple(req, 0);
  conn_send_reply(req);
}

void reply_read(struct request *req, const struct read_segment *segs, size_t nsegs)
{
  if (!req->conn->structured) {
    reply_simple(req, 0);
    add_data(req, req->buf, req->count);
    conn_send_reply(req);
    return;
  }
  struct read_segment whole = { req->offset, req->count, false };
  if (nsegs == 0) {
    segs = &whole;
    nsegs = 1;
  }
  for (size_t i = 0; i < nsegs; i++) {
    uint16_t flags = i == nsegs - 1 ? NBD_REPLY_FLAG_DONE : 0;
    const struct read_segment *s = &segs[i];
    if (s->hole) {
      char *p = chunk(req, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12, 12);
      put_be64(&p, s->offset);
      put_be32(&p, (uint32_t) s->length);
    }
    else {
      char *p = chunk(req, flags, NBD_REPLY_TYPE_OFFSET_DATA, 8 + s->length, 8);
      put_be64(&p, s->offset);
      add_data(req, req->buf + (s->offset - req->offset), s->length);
    }
  }
  conn_send_reply(req);
}

/* Descriptors of one context at P, clipped to the request: under
 * REQ_ONE exactly one, never past the end of what was asked (which keeps
 * compact 32-bit lengths in range too).  Returns how many. */
static uint32_t encode_extents(const struct request *req, char *p,
                               const struct nbdserve_extents *e)
{
  bool ext = req->conn->extended;
  uint64_t end = req->offset + req->count;
  size_t n = nbdserve_extents_count(e);
  uint32_t used = 0;

  for (size_t i = 0; i < n; i++) {
    uint64_t off, len, flags;
    nbdserve_extents_get(e, i, &off, &len, &flags);
    if (off >= end)
      break;
    if (off + len > end)
      len = end - off;
    if (ext) {
      put_be64(&p, len);
      put_be64(&p, flags);
    }
    else {
      put_be32(&p, (uint32_t) len);
      put_be32(&p, (uint32_t) flags);
    }
    used++;
    if (req->flags & NBD_CMD_FLAG_REQ_ONE)
      break;
  }
  return used;
}

/* One status chunk per context, all built in req->buf and sent as one
 * iovec (a request may select hundreds of contexts). */
void reply_block_status(struct request *req, struct nbdserve_extents **lists,
                        const uint32_t *ids, size_t n)
{
  bool ext = req->conn->extended;
  size_t desc_size = ext ? 16 : 8, fixed = ext ? 8 : 4;
  size_t hsize = chunk_header_size(req), total = 0;

  for (size_t i = 0; i < n; i++)
    total += hsize + fixed + desc_size * nbdserve_extents_count(lists[i]);
  if (request_reserve(req, total) == -1) {
    reply_error(req, NBD_ENOMEM);
    return;
  }
  char *p = req->buf;
  for (size_t i = 0; i < n; i++) {
    char *header = p;
    char *payload = header + hsize;
    uint32_t used = encode_extents(req, payload + fixed, lists[i]);
    size_t len = fixed + desc_size * used;
    put_chunk_header(req, header, i == n - 1 ? NBD_REPLY_FLAG_DONE : 0,
                     ext ? NBD_REPLY_TYPE_BLOCK_STATUS_EXT : NBD_REPLY_TYPE_BLOCK_STATUS, len);
    char *q = payload;
    put_be32(&q, ids[i]);
    if (ext)
      put_be32(&q, used);
    p = payload + len;
  }
  add_data(req, req->buf, (size_t) (p - req->buf));
  conn_send_reply(req);
}
