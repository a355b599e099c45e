/* qcow2 overlay: opening (and creating) an overlay, its header, and a
 * clean close.
 *
 * The overlay is opened through the reading library (every check of
 * qcow2.c applies, and the base becomes the chain below it), then what
 * a writer needs on top is refused or loaded here: version 3 only, no
 * internal snapshots, no extended L2 entries, no external data file,
 * 16-bit refcounts.
 *
 * While a server runs, the header holds an extension of ours
 * (OVERLAY_EXT_OPEN) and the served bitmaps are marked in use, as qemu
 * expects of a writer.  A clean close clears both.  Finding both at open
 * means our server stopped uncleanly: since dirty bits always reach the
 * file before the data they describe, those bitmaps are supersets of
 * what changed and are kept (qemu would drop them).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "overlay-internal.h"

void put_be16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
void put_be32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
void put_be64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

int write_at(int fd, const void *buf, size_t count, uint64_t offset)
{
  const uint8_t *p = buf;
  while (count > 0) {
    ssize_t r = pwrite(fd, p, count, (off_t) offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    p += r;
    count -= (size_t) r;
    offset += (uint64_t) r;
  }
  return 0;
}

int sync_file(struct qcow2_overlay *ov)
{
  return fdatasync(ov->fd) == -1 ? -errno : 0;
}

/* ---- The header cluster ---------------------------------------------------- */

/* Calls fn for each extension of the header cluster; stops when fn
 * returns nonzero and returns that. */
typedef int extension_fn(uint32_t type, const uint8_t *data, uint32_t len, void *opaque);

static int for_each_extension(const uint8_t *cluster, uint64_t cluster_size, extension_fn *fn, void *opaque)
{
  uint32_t pos = get_be32(cluster + 100); /* header_length: version 3 */
  while (cluster_size - pos >= 8) {
    uint32_t type = get_be32(cluster + pos), len = get_be32(cluster + pos + 4);
    if (type == QCOW2_EXT_END || len > cluster_size - pos - 8)
      break; /* the reading library refused a truncated one already */
    int r = fn(type, cluster + pos + 8, len, opaque);
    if (r)
      return r;
    uint64_t next = (uint64_t) pos + 8 + (((uint64_t) len + 7) & ~7ull);
    if (next >= cluster_size)
      break;
    pos = (uint32_t) next;
  }
  return 0;
}

static uint8_t *read_header_cluster(struct qcow2_overlay *ov)
{
  uint8_t *cluster = malloc(ov->cluster_size);
  if (cluster && read_at(ov->fd, cluster, ov->cluster_size, 0) < 0) {
    free(cluster);
    return NULL;
  }
  return cluster;
}

static int is_type(uint32_t type, const uint8_t *data, uint32_t len, void *opaque)
{
  (void) data;
  (void) len;
  return type == *(uint32_t *) opaque;
}

bool has_extension(struct qcow2_overlay *ov, uint32_t type)
{
  uint8_t *cluster = read_header_cluster(ov);
  bool found = cluster && for_each_extension(cluster, ov->cluster_size, is_type, &type);
  free(cluster);
  return found;
}

struct rebuild {
  uint8_t *out;
  uint32_t pos, size;
  bool overflow;
};

static void append_extension(struct rebuild *b, uint32_t type, const void *data, uint32_t len)
{
  uint32_t padded = (len + 7) & ~7u;
  if ((uint64_t) b->pos + 8 + padded > b->size) {
    b->overflow = true;
    return;
  }
  put_be32(b->out + b->pos, type);
  put_be32(b->out + b->pos + 4, len);
  memcpy(b->out + b->pos + 8, data, len);
  b->pos += 8 + padded;
}

/* Extensions kept as they are: everything but the two we rewrite. */
static int keep_extension(uint32_t type, const uint8_t *data, uint32_t len, void *opaque)
{
  if (type != QCOW2_EXT_BITMAPS && type != OVERLAY_EXT_OPEN)
    append_extension(opaque, type, data, len);
  return 0;
}

int write_header(struct qcow2_overlay *ov, uint64_t dir_offset, uint64_t dir_size, uint32_t count, bool open)
{
  uint8_t *old = read_header_cluster(ov);
  uint8_t *out = calloc(1, ov->cluster_size);
  int r = -ENOMEM;
  if (old == NULL || out == NULL)
    goto done;
  uint32_t header_length = get_be32(old + 100);
  uint64_t backing_offset = get_be64(old + 8);
  uint32_t backing_len = get_be32(old + 16);
  memcpy(out, old, header_length);
  struct rebuild b = {.out = out, .pos = header_length, .size = (uint32_t) ov->cluster_size};
  for_each_extension(old, ov->cluster_size, keep_extension, &b);
  if (count > 0) {
    uint8_t ext[24] = {0};
    put_be32(ext, count);
    put_be64(ext + 8, dir_size);
    put_be64(ext + 16, dir_offset);
    append_extension(&b, QCOW2_EXT_BITMAPS, ext, sizeof ext);
  }
  if (open) {
    uint8_t ext[8] = {0};
    put_be32(ext, 1); /* dirty bits are written before data */
    append_extension(&b, OVERLAY_EXT_OPEN, ext, sizeof ext);
  }
  uint8_t end[8] = {0};
  if (b.pos + 8 <= b.size)
    memcpy(out + b.pos, end, 8);
  b.pos += 8;
  if (backing_offset) {
    if (b.overflow || (uint64_t) b.pos + backing_len > b.size) {
      b.overflow = true;
    } else {
      memcpy(out + b.pos, old + backing_offset, backing_len);
      put_be64(out + 8, b.pos);
    }
  }
  if (b.overflow) {
    q_error("qcow2: %s: the header extensions and the backing file name no longer fit in the "
            "first cluster", ov->top->path);
    r = -ENOSPC;
    goto done;
  }
  uint64_t autoclear = get_be64(old + 88);
  autoclear = count ? autoclear | QCOW2_AUTOCLEAR_BITMAPS : autoclear & ~QCOW2_AUTOCLEAR_BITMAPS;
  put_be64(out + 88, autoclear);
  r = write_at(ov->fd, out, ov->cluster_size, 0);
done:
  free(old);
  free(out);
  return r;
}

/* ---- Opening ------------------------------------------------------------------ */

static int check_writable(const struct layer *l)
{
  const char *why = NULL;
  if (l->version < 3)
    why = "it is a version 2 image (make it version 3 with qemu-img amend -o compat=1.1)";
  else if (l->nb_snapshots)
    why = "it holds internal snapshots";
  else if (l->extended_l2)
    why = "it uses extended L2 entries";
  else if (l->data_path)
    why = "it keeps its data in an external data file";
  else if (l->incompatible & QCOW2_INCOMPAT_DIRTY)
    why = "its refcounts are not up to date (lazy refcounts): repair it with qemu-img check -r all";
  if (why)
    q_error("qcow2: %s cannot be used as a writable overlay: %s", l->path, why);
  return why ? -1 : 0;
}

static int same_file(const char *a, int fd)
{
  struct stat sa, sb;
  return stat(a, &sa) == 0 && fstat(fd, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static int check_base(struct qcow2_overlay *ov, const char *base)
{
  struct layer *below = ov->top->backing;
  if (base == NULL)
    return 0;
  if (below == NULL) {
    q_error("qcow2: %s has no backing file, but base=%s was given", ov->top->path, base);
    return -1;
  }
  if (!same_file(base, below->fd)) {
    q_error("qcow2: %s is an overlay of %s, not of base=%s", ov->top->path, below->path, base);
    return -1;
  }
  return 0;
}

static void init_locks(struct qcow2_overlay *ov)
{
  for (unsigned i = 0; i < OVERLAY_STRIPES; i++)
    pthread_rwlock_init(&ov->stripes[i], NULL);
  pthread_rwlock_init(&ov->meta, NULL);
  pthread_mutex_init(&ov->l2_load_lock, NULL);
  pthread_mutex_init(&ov->flush_lock, NULL);
  pthread_mutex_init(&ov->rc.lock, NULL);
}

static void free_overlay(struct qcow2_overlay *ov)
{
  bitmaps_release(ov);
  l2_free(ov);
  refcounts_free(&ov->rc);
  for (unsigned i = 0; i < OVERLAY_STRIPES; i++)
    pthread_rwlock_destroy(&ov->stripes[i]);
  pthread_rwlock_destroy(&ov->meta);
  pthread_mutex_destroy(&ov->l2_load_lock);
  pthread_mutex_destroy(&ov->flush_lock);
  free(ov->pending_free);
  qcow2_close(ov->chain);
  free(ov);
}

struct qcow2_overlay *qcow2_overlay_open(const struct qcow2_overlay_options *o)
{
  struct stat st;
  if (stat(o->path, &st) == -1) {
    if (errno != ENOENT) {
      q_error("qcow2: %s: %s", o->path, strerror(errno));
      return NULL;
    }
    if (overlay_create(o) < 0)
      return NULL;
  }
  struct qcow2_options options = {.writable = true, .cache_bytes = o->cache_bytes};
  struct qcow2_chain *chain = qcow2_open(o->path, &options);
  if (chain == NULL)
    return NULL;
  struct qcow2_overlay *ov = calloc(1, sizeof *ov);
  if (ov == NULL) {
    qcow2_close(chain);
    q_error("qcow2: out of memory");
    return NULL;
  }
  ov->chain = chain;
  ov->top = chain->top;
  ov->fd = ov->top->fd;
  ov->size = ov->top->size;
  ov->cluster_bits = ov->top->cluster_bits;
  ov->cluster_size = ov->top->cluster_size;
  ov->l2_bits = ov->top->l2_bits;
  ov->l2_entries = 1ull << ov->l2_bits;
  ov->dir_offset = ov->top->bitmap_dir_offset;
  ov->dir_size = ov->top->bitmap_dir_size;
  ov->dir_count = (uint32_t) ov->top->nbitmaps;
  init_locks(ov);
  if (flock(ov->fd, LOCK_EX | LOCK_NB) == -1) {
    q_error("qcow2: %s is in use by another server (%s)", o->path, strerror(errno));
    goto fail;
  }
  int flags = fcntl(ov->fd, F_GETFL); /* opened without blocking for the checks; writes may block */
  if (flags != -1)
    fcntl(ov->fd, F_SETFL, flags & ~O_NONBLOCK);
  if (check_writable(ov->top) < 0 || check_base(ov, o->base) < 0)
    goto fail;
  ov->recovered = has_extension(ov, OVERLAY_EXT_OPEN);
  if (ov->recovered)
    q_debug("qcow2: %s was not closed cleanly: its bitmaps are recovered as they are on disk", o->path);
  if (refcounts_load(ov) < 0 || (ov->recovered && refcounts_reclaim_leaks(ov) < 0) ||
      l2_init(ov) < 0 || bitmaps_prepare(ov, o) < 0 ||
      bitmaps_write_directory(ov, true) < 0 || qcow2_overlay_flush(ov) < 0)
    goto fail;
  return ov;
fail:
  free_overlay(ov);
  return NULL;
}

int qcow2_overlay_close(struct qcow2_overlay *ov)
{
  if (ov == NULL)
    return 0;
  int r = qcow2_overlay_flush(ov);
  if (r == 0)
    r = refcounts_return_reserved(ov);
  if (r == 0)
    r = bitmaps_write_directory(ov, false);
  if (r == 0)
    r = sync_file(ov);
  if (r < 0)
    q_error("qcow2: %s: closing the overlay: %s", ov->top->path, strerror(-r));
  free_overlay(ov);
  return r;
}

uint64_t qcow2_overlay_size(const struct qcow2_overlay *ov)
{
  return ov->size;
}

uint32_t qcow2_overlay_cluster_size(const struct qcow2_overlay *ov)
{
  return (uint32_t) ov->cluster_size;
}

bool qcow2_overlay_recovered(const struct qcow2_overlay *ov)
{
  return ov->recovered;
}

void qcow2_overlay_for_each_file(const struct qcow2_overlay *ov,
                                 void (*fn)(int fd, const char *path, void *opaque), void *opaque)
{
  qcow2_for_each_file(ov->chain, fn, opaque);
}
