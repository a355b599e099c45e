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

struct keep {
  struct rebuild *b;
  bool rebased;
};

/* Extensions kept as they are: everything but those we rewrite. */
static int keep_extension(uint32_t type, const uint8_t *data, uint32_t len, void *opaque)
{
  struct keep *k = opaque;
  if (type != QCOW2_EXT_BITMAPS && type != OVERLAY_EXT_OPEN && type != OVERLAY_EXT_CHECKPOINT &&
      type != OVERLAY_EXT_RECORDING &&
      !(k->rebased && type == QCOW2_EXT_BACKING_FORMAT))
    append_extension(k->b, type, data, len);
  return 0;
}

static void append_checkpoint(struct rebuild *b, const struct qcow2_overlay *ov)
{
  size_t len = strlen(ov->checkpoint_bitmap);
  uint8_t ext[12 + QCOW2_MAX_NAME];
  put_be64(ext, ov->checkpoint_time);
  put_be32(ext + 8, ov->checkpoint_released ? CHECKPOINT_RELEASED : 0);
  memcpy(ext + 12, ov->checkpoint_bitmap, len);
  append_extension(b, OVERLAY_EXT_CHECKPOINT, ext, (uint32_t) (12 + len));
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
  struct keep keep = {.b = &b, .rebased = ov->rebased};
  for_each_extension(old, ov->cluster_size, keep_extension, &keep);
  if (ov->rebased && ov->new_backing)
    append_extension(&b, QCOW2_EXT_BACKING_FORMAT, ov->new_backing_format,
                     (uint32_t) strlen(ov->new_backing_format));
  if (ov->checkpoint_bitmap)
    append_checkpoint(&b, ov);
  if (ov->recording)
    append_extension(&b, OVERLAY_EXT_RECORDING, ov->recording, (uint32_t) strlen(ov->recording));
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
  const uint8_t *backing = old + backing_offset;
  if (ov->rebased) { /* a checkpoint released below: the layer below it now */
    backing = (const uint8_t *) ov->new_backing;
    backing_len = ov->new_backing ? (uint32_t) strlen(ov->new_backing) : 0;
    backing_offset = ov->new_backing ? 1 : 0;
    put_be64(out + 8, 0);
    put_be32(out + 16, backing_len);
  }
  if (backing_offset) {
    if (b.overflow || (uint64_t) b.pos + backing_len > b.size) {
      b.overflow = true;
    } else {
      memcpy(out + b.pos, backing, backing_len);
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

/* The checkpoint extension, if the header has one. */
struct found_checkpoint {
  struct qcow2_overlay *ov;
  int r;
};

/* The name an OVERLAY_EXT_RECORDING holds, malloc'd, or NULL. */
static char *recording_name(const uint8_t *data, uint32_t len)
{
  if (len == 0 || len > QCOW2_MAX_NAME || memchr(data, 0, len))
    return NULL;
  return strndup((const char *) data, len);
}

static int take_checkpoint(uint32_t type, const uint8_t *data, uint32_t len, void *opaque)
{
  struct found_checkpoint *f = opaque;
  if (type == OVERLAY_EXT_RECORDING) {
    free(f->ov->recording);
    f->ov->recording = recording_name(data, len);
    return 0;
  }
  if (type != OVERLAY_EXT_CHECKPOINT)
    return 0;
  if (len < 13 || len - 12 > QCOW2_MAX_NAME || memchr(data + 12, 0, len - 12)) {
    q_error("qcow2: %s: its checkpoint extension is malformed", f->ov->top->path);
    f->r = -1;
    return 1;
  }
  f->ov->checkpoint_time = get_be64(data);
  f->ov->checkpoint_released = get_be32(data + 8) & CHECKPOINT_RELEASED;
  f->ov->checkpoint_bitmap = strndup((const char *) data + 12, len - 12);
  f->r = f->ov->checkpoint_bitmap ? 0 : -1;
  return 0;
}

static int peek_recording(uint32_t type, const uint8_t *data, uint32_t len, void *opaque)
{
  if (type == OVERLAY_EXT_RECORDING)
    *(char **) opaque = recording_name(data, len);
  return type == OVERLAY_EXT_RECORDING;
}

char *qcow2_overlay_peek_recording(const char *path)
{
  uint8_t head[112];
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  char *name = NULL;
  if (fd != -1 && read_at(fd, head, sizeof head, 0) == 0 && get_be32(head) == QCOW2_MAGIC &&
      get_be32(head + 4) >= 3) {
    uint32_t bits = get_be32(head + 20);
    uint64_t size = bits >= QCOW2_MIN_CLUSTER_BITS && bits <= QCOW2_MAX_CLUSTER_BITS ? 1ull << bits : 0;
    uint8_t *cluster = size ? malloc(size) : NULL;
    if (cluster && read_at(fd, cluster, size, 0) == 0 && get_be32(cluster + 100) <= size)
      for_each_extension(cluster, size, peek_recording, &name);
    free(cluster);
  }
  if (fd != -1)
    close(fd);
  return name;
}

int qcow2_overlay_set_recording(struct qcow2_overlay *ov, const char *name)
{
  char *copy = strdup(name);
  if (copy == NULL)
    return -ENOMEM;
  free(ov->recording);
  ov->recording = copy;
  int r = write_header(ov, ov->dir_offset, ov->dir_size, ov->dir_count, !ov->frozen);
  return r < 0 ? r : sync_file(ov);
}

static int read_checkpoint(struct qcow2_overlay *ov)
{
  uint8_t *cluster = read_header_cluster(ov);
  if (cluster == NULL)
    return -1;
  struct found_checkpoint f = {.ov = ov, .r = 0};
  for_each_extension(cluster, ov->cluster_size, take_checkpoint, &f);
  free(cluster);
  return f.r;
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
  /* The base is below the overlay, maybe under checkpoints' layers. */
  for (const struct layer *l = below; l; l = l->backing)
    if (same_file(base, l->fd))
      return 0;
  q_error("qcow2: %s is an overlay of %s, not of base=%s", ov->top->path, below->path, base);
  return -1;
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
  free(ov->checkpoint_bitmap);
  free(ov->recording);
  free(ov->new_backing);
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
  if (read_checkpoint(ov) < 0)
    goto fail;
  if (!o->frozen && ov->checkpoint_bitmap) { /* a checkpoint cut short before it switched files */
    q_debug("qcow2: %s: a checkpoint was interrupted; the overlay goes on as it was", o->path);
    free(ov->checkpoint_bitmap);
    ov->checkpoint_bitmap = NULL;
  }
  struct qcow2_overlay_options frozen = *o;
  const char *ended[1] = {ov->checkpoint_bitmap};
  if (o->frozen) { /* serve the bitmap that ended there, change nothing */
    if (ov->checkpoint_bitmap == NULL) {
      q_error("qcow2: %s is not a checkpoint's layer", o->path);
      goto fail;
    }
    frozen.bitmaps = ended;
    frozen.nbitmaps = 1;
    frozen.nclear = 0;
    frozen.granularity = 0;
    ov->frozen = true;
  }
  if (refcounts_load(ov) < 0 || refcounts_verify(ov, ov->recovered) < 0 || l2_init(ov) < 0 ||
      bitmaps_prepare(ov, &frozen) < 0)
    goto fail;
  if (!o->frozen && (bitmaps_write_directory(ov, true) < 0 || qcow2_overlay_flush(ov) < 0))
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

const char *qcow2_overlay_first_file_not_in_ram(const struct qcow2_overlay *ov)
{
  return qcow2_first_file_not_in_ram(ov->chain);
}
