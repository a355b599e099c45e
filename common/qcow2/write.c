/* qcow2 overlay: the data path.
 *
 * The L1 table and the L2 tables in use live in memory, authoritative;
 * the file gets them at each flush.  A request works cluster by cluster:
 * a stripe lock (guest cluster index hashed over OVERLAY_STRIPES) is
 * taken shared to read or to write into an allocated cluster, and
 * exclusive only to change the cluster's L2 entry.  So allocation never
 * holds up requests on other clusters, and a cluster is never freed
 * under a request still using it.
 *
 * Order on disk, which makes a crash at any moment safe:
 *  1. dirty bits of a request (dirty.c), before anything else;
 *  2. a new cluster's refcount, synced (refcount.c), then its data;
 *  3. at a flush: sync (the data of 2. is durable), then the L2 tables
 *     changed since the last flush, then — after another sync when new
 *     tables appeared — their L1 entries, then sync;
 *  4. only then the refcounts of clusters no longer referenced drop to 0.
 * An L2 entry therefore never reaches the disk before the data it points
 * to, and a refcount never drops while the disk still references it.
 * Writes acknowledged without a flush may be lost in a crash (the disk
 * then reads as before them), never half applied to other data.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "overlay-internal.h"

#define STATUS_CLUSTERS 4096 /* clusters one block status call looks at */

enum kind { KIND_UNALLOCATED, KIND_ZERO, KIND_DATA, KIND_COMPRESSED, KIND_BAD };

static enum kind classify(const struct qcow2_overlay *ov, uint64_t entry, uint64_t *host)
{
  *host = entry & QCOW2_OFFSET_MASK;
  if (entry & QCOW2_L2_COMPRESSED)
    return KIND_COMPRESSED;
  if (entry & ~(QCOW2_OFFSET_MASK | QCOW2_L2_COPIED | QCOW2_L2_ZERO))
    return KIND_BAD;
  if (*host && (*host % ov->cluster_size || *host < ov->cluster_size))
    return KIND_BAD;
  if (entry & QCOW2_L2_ZERO)
    return KIND_ZERO; /* with a host offset: a zero cluster that keeps its allocation */
  return *host ? KIND_DATA : KIND_UNALLOCATED;
}

static void report_bad(const struct qcow2_overlay *ov, uint64_t guest, uint64_t entry)
{
  q_error("qcow2: %s: the L2 entry of guest offset %" PRIu64 " (0x%016" PRIx64 ") is invalid",
          ov->top->path, guest, entry);
}

/* ---- Tables in memory ---------------------------------------------------- */

int l2_init(struct qcow2_overlay *ov)
{
  size_t n = ov->top->l1_size ? ov->top->l1_size : 1;
  ov->l2 = calloc(n, sizeof *ov->l2);
  ov->l2_dirty = calloc(n, sizeof *ov->l2_dirty);
  ov->l1_dirty = calloc(n, sizeof *ov->l1_dirty);
  if (ov->l2 == NULL || ov->l2_dirty == NULL || ov->l1_dirty == NULL) {
    q_error("qcow2: out of memory");
    return -1;
  }
  return 0;
}

void l2_free(struct qcow2_overlay *ov)
{
  for (uint32_t i = 0; ov->l2 && i < ov->top->l1_size; i++)
    free(ov->l2[i]);
  free(ov->l2);
  free(ov->l2_dirty);
  free(ov->l1_dirty);
}

static uint64_t *load_table(struct qcow2_overlay *ov, uint32_t l1i, uint64_t entry, int *err)
{
  uint64_t off = entry & QCOW2_OFFSET_MASK;
  if ((entry & ~(QCOW2_OFFSET_MASK | QCOW2_L2_COPIED)) || off % ov->cluster_size || off < ov->cluster_size) {
    q_error("qcow2: %s: L1 entry %u (0x%016" PRIx64 ") is invalid", ov->top->path, l1i, entry);
    *err = -EIO;
    return NULL;
  }
  uint64_t *t = malloc(ov->cluster_size);
  if (t == NULL) {
    *err = -ENOMEM;
    return NULL;
  }
  if ((*err = read_at(ov->fd, t, ov->cluster_size, off)) < 0) {
    free(t);
    return NULL;
  }
  for (uint64_t i = 0; i < ov->l2_entries; i++)
    t[i] = be64toh(t[i]);
  return t;
}

static uint64_t *new_table(struct qcow2_overlay *ov, uint32_t l1i, int *err)
{
  uint64_t host = alloc_cluster(ov, err);
  if (host == 0)
    return NULL;
  uint64_t *t = calloc(1, ov->cluster_size);
  if (t == NULL) {
    defer_free(ov, host);
    *err = -ENOMEM;
    return NULL;
  }
  pthread_rwlock_rdlock(&ov->meta);
  __atomic_store_n(&ov->top->l1[l1i], host | QCOW2_L2_COPIED, __ATOMIC_RELAXED);
  __atomic_store_n(&ov->l1_dirty[l1i], true, __ATOMIC_RELAXED);
  __atomic_store_n(&ov->l2_dirty[l1i], true, __ATOMIC_RELAXED);
  pthread_rwlock_unlock(&ov->meta);
  return t;
}

/* The L2 table of an L1 entry, loaded on first use; NULL (with *err 0)
 * when there is none and `create` is false. */
static uint64_t *l2_table(struct qcow2_overlay *ov, uint32_t l1i, bool create, int *err)
{
  *err = 0;
  uint64_t *t = __atomic_load_n(&ov->l2[l1i], __ATOMIC_ACQUIRE);
  if (t)
    return t;
  pthread_mutex_lock(&ov->l2_load_lock);
  t = ov->l2[l1i];
  if (t == NULL) {
    uint64_t entry = __atomic_load_n(&ov->top->l1[l1i], __ATOMIC_RELAXED);
    if (entry & QCOW2_OFFSET_MASK)
      t = load_table(ov, l1i, entry, err);
    else if (create)
      t = new_table(ov, l1i, err);
    if (t)
      __atomic_store_n(&ov->l2[l1i], t, __ATOMIC_RELEASE);
  }
  pthread_mutex_unlock(&ov->l2_load_lock);
  return t;
}

static int get_entry(struct qcow2_overlay *ov, uint64_t cluster, uint64_t *entry)
{
  int err;
  uint64_t *t = l2_table(ov, (uint32_t) (cluster >> ov->l2_bits), false, &err);
  *entry = t ? __atomic_load_n(&t[cluster & (ov->l2_entries - 1)], __ATOMIC_RELAXED) : 0;
  return err;
}

/* With the cluster's stripe held exclusively. */
static int set_entry(struct qcow2_overlay *ov, uint64_t cluster, uint64_t entry)
{
  int err;
  uint32_t l1i = (uint32_t) (cluster >> ov->l2_bits);
  uint64_t *t = l2_table(ov, l1i, true, &err);
  if (t == NULL)
    return err;
  pthread_rwlock_rdlock(&ov->meta);
  __atomic_store_n(&t[cluster & (ov->l2_entries - 1)], entry, __ATOMIC_RELAXED);
  __atomic_store_n(&ov->l2_dirty[l1i], true, __ATOMIC_RELAXED);
  pthread_rwlock_unlock(&ov->meta);
  return 0;
}

int defer_free(struct qcow2_overlay *ov, uint64_t host)
{
  pthread_mutex_lock(&ov->rc.lock);
  int r = 0;
  if (ov->npending == ov->pending_cap) {
    size_t more = ov->pending_cap ? ov->pending_cap * 2 : 64;
    uint64_t *p = realloc(ov->pending_free, more * sizeof *p);
    if (p == NULL)
      r = -ENOMEM; /* the cluster leaks: harmless */
    else {
      ov->pending_free = p;
      ov->pending_cap = more;
    }
  }
  if (r == 0)
    ov->pending_free[ov->npending++] = host;
  pthread_mutex_unlock(&ov->rc.lock);
  return 0;
}

static pthread_rwlock_t *stripe(struct qcow2_overlay *ov, uint64_t cluster)
{
  return &ov->stripes[cluster % OVERLAY_STRIPES];
}

/* ---- Reading ---------------------------------------------------------------- */

static int read_base(struct qcow2_overlay *ov, uint8_t *buf, uint64_t count, uint64_t offset)
{
  if (ov->top->backing == NULL) {
    memset(buf, 0, count);
    return 0;
  }
  return layer_read(ov->chain, ov->top->backing, buf, count, offset);
}

static int read_piece(struct qcow2_overlay *ov, uint8_t *buf, uint64_t n, uint64_t offset)
{
  uint64_t cluster = offset >> ov->cluster_bits, in = offset & (ov->cluster_size - 1);
  pthread_rwlock_t *lock = stripe(ov, cluster);
  pthread_rwlock_rdlock(lock);
  uint64_t entry, host;
  int r = get_entry(ov, cluster, &entry);
  if (r == 0) {
    switch (classify(ov, entry, &host)) {
    case KIND_DATA: r = read_at(ov->fd, buf, n, host + in); break;
    case KIND_ZERO: memset(buf, 0, n); break;
    case KIND_UNALLOCATED: r = read_base(ov, buf, n, offset); break;
    case KIND_COMPRESSED: r = layer_read(ov->chain, ov->top, buf, n, offset); break; /* never rewritten */
    case KIND_BAD: report_bad(ov, offset, entry); r = -EIO; break;
    }
  }
  pthread_rwlock_unlock(lock);
  return r;
}

/* Splits [offset, offset+count) at cluster boundaries. */
#define FOR_EACH_PIECE(ov, offset, count, n)                                                  \
  for (uint64_t n, pos_ = 0; pos_ < (count) &&                                                \
       (n = (ov)->cluster_size - (((offset) + pos_) & ((ov)->cluster_size - 1)),               \
        n = n < (count) - pos_ ? n : (count) - pos_, 1); pos_ += n)

int qcow2_overlay_read(struct qcow2_overlay *ov, void *buf, uint64_t count, uint64_t offset)
{
  if (offset > ov->size || count > ov->size - offset)
    return -EINVAL;
  FOR_EACH_PIECE(ov, offset, count, n) {
    int r = read_piece(ov, (uint8_t *) buf + pos_, n, offset + pos_);
    if (r < 0)
      return r;
  }
  return 0;
}

/* ---- Writing ------------------------------------------------------------------- */

static const uint8_t zero_block[65536];

static int write_zeroes_at(int fd, uint64_t count, uint64_t offset)
{
  while (count > 0) {
    size_t n = count < sizeof zero_block ? (size_t) count : sizeof zero_block;
    int r = write_at(fd, zero_block, n, offset);
    if (r < 0)
      return r;
    count -= n;
    offset += n;
  }
  return 0;
}

static int refuse_kind(struct qcow2_overlay *ov, enum kind kind, uint64_t offset, uint64_t entry)
{
  if (kind == KIND_COMPRESSED) {
    q_error("qcow2: %s: guest offset %" PRIu64 " lies in a compressed cluster, which cannot be "
            "rewritten", ov->top->path, offset);
    return -ENOTSUP;
  }
  report_bad(ov, offset, entry);
  return -EIO;
}

/* Bytes of the cluster that lie inside the disk (the last one may be short). */
static uint64_t valid_bytes(const struct qcow2_overlay *ov, uint64_t cluster)
{
  uint64_t start = cluster << ov->cluster_bits;
  return ov->size - start < ov->cluster_size ? ov->size - start : ov->cluster_size;
}

/* A new cluster for a piece that has none: the old contents (zeroes or
 * the base's) with the piece applied, then the L2 entry.  `data` NULL
 * writes zeroes.  With the stripe held exclusively. */
static int allocate_piece(struct qcow2_overlay *ov, const uint8_t *data, uint64_t n, uint64_t offset,
                          enum kind kind, uint64_t host)
{
  uint64_t cluster = offset >> ov->cluster_bits, in = offset & (ov->cluster_size - 1);
  uint64_t valid = valid_bytes(ov, cluster);
  const uint8_t *src = data;
  uint8_t *buf = NULL;
  int r = 0;
  if (!(in == 0 && n == ov->cluster_size && data)) {
    buf = malloc(ov->cluster_size);
    if (buf == NULL)
      return -ENOMEM;
    memset(buf + valid, 0, ov->cluster_size - valid);
    if (in == 0 && n >= valid)
      ; /* the piece covers all of it */
    else if (kind == KIND_ZERO)
      memset(buf, 0, valid);
    else
      r = read_base(ov, buf, valid, cluster << ov->cluster_bits);
    if (data)
      memcpy(buf + in, data, n);
    else
      memset(buf + in, 0, n);
    src = buf;
  }
  bool reused = host != 0; /* a zero cluster that kept its allocation */
  if (r == 0 && !reused && (host = alloc_cluster(ov, &r)) == 0 && r == 0)
    r = -ENOSPC;
  if (r == 0)
    r = write_at(ov->fd, src, ov->cluster_size, host);
  if (r == 0)
    r = set_entry(ov, cluster, host | QCOW2_L2_COPIED);
  if (r < 0 && host && !reused)
    defer_free(ov, host);
  free(buf);
  return r;
}

static int write_piece(struct qcow2_overlay *ov, const uint8_t *data, uint64_t n, uint64_t offset)
{
  uint64_t cluster = offset >> ov->cluster_bits, in = offset & (ov->cluster_size - 1);
  pthread_rwlock_t *lock = stripe(ov, cluster);
  uint64_t entry, host;
  for (int exclusive = 0; exclusive < 2; exclusive++) {
    if (exclusive)
      pthread_rwlock_wrlock(lock);
    else
      pthread_rwlock_rdlock(lock);
    int r = get_entry(ov, cluster, &entry);
    enum kind kind = classify(ov, entry, &host);
    if (r == 0 && kind == KIND_DATA && (entry & QCOW2_L2_COPIED)) /* the common case */
      r = data ? write_at(ov->fd, data, n, host + in) : write_zeroes_at(ov->fd, n, host + in);
    else if (r == 0 && (kind == KIND_COMPRESSED || kind == KIND_BAD || kind == KIND_DATA))
      r = refuse_kind(ov, kind == KIND_DATA ? KIND_BAD : kind, offset, entry); /* DATA without COPIED: shared */
    else if (r == 0 && !exclusive) {
      pthread_rwlock_unlock(lock);
      continue; /* a new allocation: again, exclusively */
    } else if (r == 0)
      r = allocate_piece(ov, data, n, offset, kind,
                         kind == KIND_ZERO && (entry & QCOW2_L2_COPIED) ? host : 0);
    pthread_rwlock_unlock(lock);
    return r;
  }
  return -EIO; /* not reached */
}

/* What every change (write, zero, trim) does first: refuse it on a
 * frozen layer or outside the disk, then mark its granules dirty. */
static int begin_change(struct qcow2_overlay *ov, uint64_t count, uint64_t offset)
{
  if (ov->frozen)
    return -EROFS;
  if (offset > ov->size || count > ov->size - offset)
    return -EINVAL;
  return bitmaps_mark(ov, offset, count);
}

int qcow2_overlay_write(struct qcow2_overlay *ov, const void *buf, uint64_t count, uint64_t offset, bool fua)
{
  int r = begin_change(ov, count, offset);
  if (r < 0)
    return r;
  FOR_EACH_PIECE(ov, offset, count, n) {
    if ((r = write_piece(ov, (const uint8_t *) buf + pos_, n, offset + pos_)) < 0)
      return r;
  }
  return fua ? qcow2_overlay_flush(ov) : 0;
}

/* ---- Zeroes and trims ------------------------------------------------------------ */

/* Whether the cluster holds zeroes without looking at its bytes. */
static bool reads_as_zero(struct qcow2_overlay *ov, enum kind kind, uint64_t cluster)
{
  if (kind == KIND_ZERO)
    return true;
  if (kind != KIND_UNALLOCATED)
    return false;
  if (ov->top->backing == NULL)
    return true;
  uint64_t valid = valid_bytes(ov, cluster);
  struct qcow2_status st;
  return layer_status(ov->chain, ov->top->backing, cluster << ov->cluster_bits, valid, &st) == 0 &&
         st.kind == QCOW2_ZERO && st.length >= valid;
}

/* Changes a whole cluster's entry to `entry`; what it pointed to is freed
 * at the next flush.  With the stripe held exclusively. */
static int replace_entry(struct qcow2_overlay *ov, uint64_t cluster, uint64_t old, uint64_t entry)
{
  if (old == entry)
    return 0;
  int r = set_entry(ov, cluster, entry);
  uint64_t host = old & QCOW2_OFFSET_MASK;
  if (r == 0 && host && (entry & QCOW2_OFFSET_MASK) != host)
    defer_free(ov, host); /* after the new entry, so a flush never frees what the disk still uses */
  return r;
}

static int zero_piece(struct qcow2_overlay *ov, uint64_t n, uint64_t offset, bool may_trim)
{
  uint64_t cluster = offset >> ov->cluster_bits, in = offset & (ov->cluster_size - 1);
  pthread_rwlock_t *lock = stripe(ov, cluster);
  uint64_t entry, host;
  bool whole = in == 0 && n >= valid_bytes(ov, cluster);
  if (!whole) {
    pthread_rwlock_rdlock(lock);
    int r = get_entry(ov, cluster, &entry);
    bool zero = r == 0 && reads_as_zero(ov, classify(ov, entry, &host), cluster);
    pthread_rwlock_unlock(lock);
    return r < 0 ? r : zero ? 0 : write_piece(ov, NULL, n, offset);
  }
  pthread_rwlock_wrlock(lock);
  int r = get_entry(ov, cluster, &entry);
  enum kind kind = classify(ov, entry, &host);
  if (r == 0) {
    switch (kind) {
    case KIND_UNALLOCATED:
      if (ov->top->backing)
        r = replace_entry(ov, cluster, entry, QCOW2_L2_ZERO);
      break; /* without a base, unallocated reads as zero already */
    case KIND_ZERO:
      if (host == 0)
        break; /* a zero cluster without allocation: nothing to change */
      /* fall through */
    case KIND_DATA:
      if (may_trim || !(entry & QCOW2_L2_COPIED))
        r = replace_entry(ov, cluster, entry, ov->top->backing ? QCOW2_L2_ZERO : 0);
      else /* keep the allocation: a later write needs none */
        r = replace_entry(ov, cluster, entry, host | QCOW2_L2_COPIED | QCOW2_L2_ZERO);
      break;
    default:
      r = refuse_kind(ov, kind, offset, entry);
    }
  }
  pthread_rwlock_unlock(lock);
  return r;
}

static int trim_piece(struct qcow2_overlay *ov, uint64_t n, uint64_t offset)
{
  uint64_t cluster = offset >> ov->cluster_bits, in = offset & (ov->cluster_size - 1);
  if (!(in == 0 && n >= valid_bytes(ov, cluster)))
    return 0; /* a trim is advisory: parts of clusters keep their data */
  pthread_rwlock_t *lock = stripe(ov, cluster);
  pthread_rwlock_wrlock(lock);
  uint64_t entry, host;
  int r = get_entry(ov, cluster, &entry);
  enum kind kind = classify(ov, entry, &host);
  if (r == 0 && kind != KIND_COMPRESSED && kind != KIND_BAD) {
    /* Reads as zero afterwards; unallocated where the base is zero anyway. */
    bool base_zero = reads_as_zero(ov, KIND_UNALLOCATED, cluster);
    r = replace_entry(ov, cluster, entry, base_zero ? 0 : QCOW2_L2_ZERO);
  } else if (r == 0 && kind == KIND_BAD)
    r = refuse_kind(ov, kind, offset, entry);
  pthread_rwlock_unlock(lock);
  return r;
}

/* Clusters unreferenced by zeroes and trims are freed only by a flush;
 * a client that never flushes would make the file grow without end, so
 * past this many waiting (or a quarter of the disk), the overlay
 * flushes itself. */
#define PENDING_FREE_LIMIT 1024

static int flush_if_many_pending(struct qcow2_overlay *ov, bool fua)
{
  pthread_mutex_lock(&ov->rc.lock);
  bool many = ov->npending >= PENDING_FREE_LIMIT || ov->npending * ov->cluster_size >= ov->size / 4;
  pthread_mutex_unlock(&ov->rc.lock);
  return fua || many ? qcow2_overlay_flush(ov) : 0;
}

int qcow2_overlay_zero(struct qcow2_overlay *ov, uint64_t count, uint64_t offset, bool may_trim, bool fua)
{
  int r = begin_change(ov, count, offset);
  if (r < 0)
    return r;
  FOR_EACH_PIECE(ov, offset, count, n) {
    if ((r = zero_piece(ov, n, offset + pos_, may_trim)) < 0)
      return r;
  }
  return flush_if_many_pending(ov, fua);
}

int qcow2_overlay_trim(struct qcow2_overlay *ov, uint64_t count, uint64_t offset, bool fua)
{
  int r = begin_change(ov, count, offset);
  if (r < 0)
    return r;
  FOR_EACH_PIECE(ov, offset, count, n) {
    if ((r = trim_piece(ov, n, offset + pos_)) < 0)
      return r;
  }
  return flush_if_many_pending(ov, fua);
}

/* ---- Flush ---------------------------------------------------------------------- */

struct flush_set {
  uint32_t *tables; /* L1 indexes of the L2 tables copied */
  uint64_t **copies; /* big-endian */
  size_t ntables;
  uint32_t *l1s; /* L1 entries changed */
  size_t nl1;
  uint64_t *frees;
  size_t nfrees;
};

static void free_set(struct flush_set *s)
{
  for (size_t i = 0; i < s->ntables; i++)
    free(s->copies[i]);
  free(s->tables);
  free(s->copies);
  free(s->l1s);
  free(s->frees);
}

/* Under meta held exclusively: what this flush writes, and the clusters
 * it may free once that is on disk. */
static int collect(struct qcow2_overlay *ov, struct flush_set *s)
{
  uint32_t n = ov->top->l1_size;
  s->tables = malloc((n ? n : 1) * sizeof *s->tables);
  s->copies = malloc((n ? n : 1) * sizeof *s->copies);
  s->l1s = malloc((n ? n : 1) * sizeof *s->l1s);
  if (s->tables == NULL || s->copies == NULL || s->l1s == NULL)
    return -ENOMEM;
  for (uint32_t i = 0; i < n; i++) {
    if (ov->l2_dirty[i]) {
      uint64_t *copy = malloc(ov->cluster_size);
      if (copy == NULL)
        return -ENOMEM;
      for (uint64_t k = 0; k < ov->l2_entries; k++)
        copy[k] = htobe64(ov->l2[i][k]);
      s->tables[s->ntables] = i;
      s->copies[s->ntables++] = copy;
      ov->l2_dirty[i] = false;
    }
    if (ov->l1_dirty[i]) {
      s->l1s[s->nl1++] = i;
      ov->l1_dirty[i] = false;
    }
  }
  pthread_mutex_lock(&ov->rc.lock);
  s->frees = ov->pending_free;
  s->nfrees = ov->npending;
  ov->pending_free = NULL;
  ov->npending = ov->pending_cap = 0;
  pthread_mutex_unlock(&ov->rc.lock);
  return 0;
}

/* After a failed flush, what it took is dirty again. */
static void restore(struct qcow2_overlay *ov, struct flush_set *s)
{
  pthread_rwlock_wrlock(&ov->meta);
  for (size_t i = 0; i < s->ntables; i++)
    ov->l2_dirty[s->tables[i]] = true;
  for (size_t i = 0; i < s->nl1; i++)
    ov->l1_dirty[s->l1s[i]] = true;
  pthread_rwlock_unlock(&ov->meta);
  for (size_t i = 0; i < s->nfrees; i++)
    defer_free(ov, s->frees[i]);
}

static int write_set(struct qcow2_overlay *ov, struct flush_set *s)
{
  int r = sync_file(ov);
  for (size_t i = 0; r == 0 && i < s->ntables; i++)
    r = write_at(ov->fd, s->copies[i], ov->cluster_size, ov->top->l1[s->tables[i]] & QCOW2_OFFSET_MASK);
  if (r == 0 && s->nl1)
    r = sync_file(ov); /* new tables are on disk before L1 points at them */
  for (size_t i = 0; r == 0 && i < s->nl1; i++) {
    uint8_t be[8];
    put_be64(be, ov->top->l1[s->l1s[i]]);
    r = write_at(ov->fd, be, 8, ov->top->l1_offset + (uint64_t) s->l1s[i] * 8);
  }
  if (r == 0 && (s->ntables || s->nl1))
    r = sync_file(ov);
  return r;
}

int qcow2_overlay_flush(struct qcow2_overlay *ov)
{
  struct flush_set s = {0};
  pthread_mutex_lock(&ov->flush_lock);
  pthread_rwlock_wrlock(&ov->meta);
  int r = collect(ov, &s);
  pthread_rwlock_unlock(&ov->meta);
  if (r == 0)
    r = write_set(ov, &s);
  size_t freed = 0;
  while (r == 0 && freed < s.nfrees)
    r = release_cluster(ov, s.frees[freed++]);
  if (r < 0) {
    s.nfrees -= freed;
    memmove(s.frees, s.frees + freed, s.nfrees * sizeof *s.frees);
    restore(ov, &s);
    q_error("qcow2: %s: flush failed: %s", ov->top->path, strerror(-r));
  }
  pthread_mutex_unlock(&ov->flush_lock);
  free_set(&s);
  return r;
}

/* ---- Block status ---------------------------------------------------------------- */

int qcow2_overlay_block_status(struct qcow2_overlay *ov, uint64_t offset, uint64_t max_length,
                               struct qcow2_status *st)
{
  if (offset >= ov->size || max_length == 0)
    return -EINVAL;
  uint64_t end = max_length < ov->size - offset ? offset + max_length : ov->size;
  uint64_t cluster = offset >> ov->cluster_bits, entry, host;
  int r = get_entry(ov, cluster, &entry);
  if (r < 0)
    return r;
  enum kind first = classify(ov, entry, &host);
  if (first == KIND_BAD) {
    report_bad(ov, offset, entry);
    return -EIO;
  }
  if (first == KIND_COMPRESSED)
    first = KIND_DATA;
  uint64_t stop = (cluster + 1) << ov->cluster_bits;
  for (unsigned i = 1; i < STATUS_CLUSTERS && stop < end; i++, stop += ov->cluster_size) {
    if (get_entry(ov, stop >> ov->cluster_bits, &entry) < 0)
      break;
    enum kind k = classify(ov, entry, &host);
    if ((k == KIND_COMPRESSED ? KIND_DATA : k) != first)
      break;
  }
  uint64_t length = (stop < end ? stop : end) - offset;
  if (first == KIND_UNALLOCATED) {
    if (ov->top->backing)
      return layer_status(ov->chain, ov->top->backing, offset, length, st);
    *st = (struct qcow2_status) {.length = length, .kind = QCOW2_ZERO, .depth = 0};
    return 0;
  }
  *st = (struct qcow2_status) {
    .length = length, .kind = first == KIND_ZERO ? QCOW2_ZERO : QCOW2_DATA, .depth = 1};
  return 0;
}

/* ---- Absorbing a released checkpoint's layer -------------------------------- */

/* One cluster the overlay does not hold: what the layer below shows
 * there becomes the overlay's own (a zero cluster, or data). */
static int absorb_cluster(struct qcow2_overlay *ov, struct layer *below, uint64_t cluster, uint8_t *buf)
{
  pthread_rwlock_t *lock = stripe(ov, cluster);
  pthread_rwlock_wrlock(lock);
  uint64_t entry, host, start = cluster << ov->cluster_bits, valid = valid_bytes(ov, cluster);
  int r = get_entry(ov, cluster, &entry);
  if (r == 0 && classify(ov, entry, &host) == KIND_UNALLOCATED) { /* a write may have come first */
    struct qcow2_status st;
    r = layer_status(ov->chain, below, start, valid, &st);
    if (r == 0 && st.kind == QCOW2_ZERO && st.length >= valid)
      r = set_entry(ov, cluster, QCOW2_L2_ZERO);
    else if (r == 0 && (r = layer_read(ov->chain, below, buf, valid, start)) == 0) {
      memset(buf + valid, 0, ov->cluster_size - valid);
      if ((host = alloc_cluster(ov, &r)) == 0 && r == 0)
        r = -ENOSPC;
      if (r == 0 && (r = write_at(ov->fd, buf, ov->cluster_size, host)) == 0)
        r = set_entry(ov, cluster, host | QCOW2_L2_COPIED);
      if (r < 0 && host)
        defer_free(ov, host);
    }
  }
  pthread_rwlock_unlock(lock);
  return r;
}

/* The header names the layer below the absorbed one. */
static int rebase(struct qcow2_overlay *ov, const struct layer *below)
{
  const struct layer *next = below->backing;
  char *name = next ? strdup(next->path) : NULL;
  if (next && name == NULL)
    return -ENOMEM;
  free(ov->new_backing);
  ov->new_backing = name;
  ov->new_backing_format = next && next->is_qcow2 ? "qcow2" : "raw";
  ov->rebased = true;
  int r = write_header(ov, ov->dir_offset, ov->dir_size, ov->dir_count, !ov->frozen);
  return r < 0 ? r : sync_file(ov);
}

int qcow2_overlay_absorb_backing(struct qcow2_overlay *ov)
{
  struct layer *below = ov->top->backing;
  if (below == NULL || !below->is_qcow2)
    return -EINVAL;
  uint8_t *buf = malloc(ov->cluster_size);
  if (buf == NULL)
    return -ENOMEM;
  int r = 0;
  for (uint64_t pos = 0; r == 0 && pos < ov->size;) {
    struct qcow2_status st;
    if ((r = layer_status(ov->chain, below, pos, ov->size - pos, &st)) < 0)
      break;
    if (st.depth == below->depth) /* what the layer itself holds */
      for (uint64_t c = pos >> ov->cluster_bits; r == 0 && c <= (pos + st.length - 1) >> ov->cluster_bits; c++)
        r = absorb_cluster(ov, below, c, buf);
    pos += st.length;
  }
  free(buf);
  if (r == 0)
    r = qcow2_overlay_flush(ov);
  if (r == 0 && ov->frozen)
    r = refcounts_return_reserved(ov);
  if (r == 0)
    r = rebase(ov, below);
  return r;
}
