/* qcow2 overlay: refcounts and the cluster allocator.
 *
 * The refcount table and every refcount block live in memory, the
 * blocks exactly as on disk, so that a change is written back by
 * copying bytes.  Only 16-bit refcounts (refcount_order 4, what qemu
 * creates) are supported.
 *
 * Refcounts run ahead of use: clusters are reserved in batches, their
 * refcount of 1 written and synced before any metadata may point at
 * them.  A crash therefore leaks at most the unused reservations (a leak
 * is harmless, and the next start reclaims it) and never leaves a
 * referenced cluster with a refcount of 0, whatever order the host wrote
 * its pages in.  Freed clusters return to a free list and are reused
 * before the file grows.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "overlay-internal.h"

#define RESERVE_FIRST 16
#define RESERVE_MAX 256

uint16_t refcount_of(struct qcow2_overlay *ov, uint64_t c)
{
  struct refcounts *rc = &ov->rc;
  uint64_t bi = c / rc->per_block;
  if (bi >= rc->table_entries || rc->blocks[bi] == NULL)
    return 0;
  return get_be16(rc->blocks[bi] + (c % rc->per_block) * 2);
}

static int push(uint64_t **list, size_t *n, size_t *cap, uint64_t value)
{
  if (*n == *cap) {
    size_t more = *cap ? *cap * 2 : 64;
    uint64_t *p = realloc(*list, more * sizeof *p);
    if (p == NULL)
      return -ENOMEM;
    *list = p;
    *cap = more;
  }
  (*list)[(*n)++] = value;
  return 0;
}

static int load_block(struct qcow2_overlay *ov, uint64_t bi)
{
  struct refcounts *rc = &ov->rc;
  uint64_t off = rc->table[bi] & QCOW2_OFFSET_MASK;
  if ((rc->table[bi] & ~QCOW2_OFFSET_MASK) || off % ov->cluster_size || off < ov->cluster_size ||
      off > ov->top->file_size - ov->cluster_size) {
    q_error("qcow2: %s: refcount table entry %" PRIu64 " (0x%" PRIx64 ") is invalid", ov->top->path, bi,
            rc->table[bi]);
    return -1;
  }
  rc->blocks[bi] = malloc(ov->cluster_size);
  if (rc->blocks[bi] == NULL) {
    q_error("qcow2: out of memory");
    return -1;
  }
  return read_table(ov->top, rc->blocks[bi], ov->cluster_size, off, "refcount block") < 0 ? -1 : 0;
}

int refcounts_load(struct qcow2_overlay *ov)
{
  struct layer *l = ov->top;
  struct refcounts *rc = &ov->rc;
  rc->batch = RESERVE_FIRST;
  rc->per_block = ov->cluster_size / 2;
  if (l->refcount_order != 4) {
    q_error("qcow2: %s: only 16-bit refcounts can be written (refcount_order 4; this image has %u): "
            "convert it with qemu-img amend -o refcount_bits=16", l->path, l->refcount_order);
    return -1;
  }
  uint64_t bytes = (uint64_t) l->refcount_table_clusters * ov->cluster_size;
  if (l->refcount_table_clusters == 0 || bytes > QCOW2_MAX_TABLE_BYTES ||
      l->refcount_table_offset % ov->cluster_size || overlaps_header(l, l->refcount_table_offset)) {
    q_error("qcow2: %s: the refcount table (%u clusters at offset %" PRIu64 ") is malformed", l->path,
            l->refcount_table_clusters, l->refcount_table_offset);
    return -1;
  }
  rc->table_entries = bytes / 8;
  rc->table = malloc(bytes);
  rc->blocks = calloc(rc->table_entries, sizeof *rc->blocks);
  if (rc->table == NULL || rc->blocks == NULL) {
    q_error("qcow2: out of memory");
    return -1;
  }
  if (read_table(l, rc->table, bytes, l->refcount_table_offset, "refcount table") < 0)
    return -1;
  for (uint64_t i = 0; i < rc->table_entries; i++)
    if ((rc->table[i] = be64toh(rc->table[i])) != 0 && load_block(ov, i) < 0)
      return -1;

  /* Everything up to the end of the file, or to the last counted
   * cluster, is taken or free; the file grows past both. */
  rc->end = (l->file_size + ov->cluster_size - 1) >> ov->cluster_bits;
  for (uint64_t bi = 0; bi < rc->table_entries; bi++)
    for (uint64_t k = 0; rc->blocks[bi] && k < rc->per_block; k++)
      if (get_be16(rc->blocks[bi] + k * 2) && bi * rc->per_block + k >= rc->end)
        rc->end = bi * rc->per_block + k + 1;
  uint64_t limit = rc->table_entries * rc->per_block;
  for (uint64_t c = rc->end; c-- > 1;) /* popped lowest first */
    if (c < limit && refcount_of(ov, c) == 0 && push(&rc->free, &rc->nfree, &rc->free_cap, c) < 0) {
      q_error("qcow2: out of memory");
      return -1;
    }
  return 0;
}

void refcounts_free(struct refcounts *rc)
{
  for (uint64_t i = 0; rc->blocks && i < rc->table_entries; i++)
    free(rc->blocks[i]);
  free(rc->blocks);
  free(rc->table);
  free(rc->free);
  free(rc->reserved);
  pthread_mutex_destroy(&rc->lock);
}

/* ---- Changing counts (rc->lock held) --------------------------------------- */

/* Blocks changed in memory since they were last written. */
struct touched {
  uint64_t bi[8];
  unsigned n;
};

static int write_block(struct qcow2_overlay *ov, uint64_t bi)
{
  return write_at(ov->fd, ov->rc.blocks[bi], ov->cluster_size, ov->rc.table[bi] & QCOW2_OFFSET_MASK);
}

static int touch(struct qcow2_overlay *ov, struct touched *t, uint64_t bi)
{
  for (unsigned i = 0; i < t->n; i++)
    if (t->bi[i] == bi)
      return 0;
  if (t->n == sizeof t->bi / sizeof t->bi[0]) { /* full: write what is there */
    for (unsigned i = 0; i < t->n; i++) {
      int r = write_block(ov, t->bi[i]);
      if (r < 0)
        return r;
    }
    t->n = 0;
  }
  t->bi[t->n++] = bi;
  return 0;
}

static int write_touched(struct qcow2_overlay *ov, struct touched *t)
{
  for (unsigned i = 0; i < t->n; i++) {
    int r = write_block(ov, t->bi[i]);
    if (r < 0)
      return r;
  }
  t->n = 0;
  return 0;
}

static void set_count(struct qcow2_overlay *ov, uint64_t c, uint16_t value)
{
  struct refcounts *rc = &ov->rc;
  put_be16(rc->blocks[c / rc->per_block] + (c % rc->per_block) * 2, value);
}

static int table_full(struct qcow2_overlay *ov)
{
  if (!ov->rc.full_reported)
    q_error("qcow2: %s: the refcount table is full (it counts %" PRIu64 " bytes of image); "
            "growing it is not supported: give the overlay larger clusters", ov->top->path,
            ov->rc.table_entries * ov->rc.per_block * ov->cluster_size);
  ov->rc.full_reported = true;
  return -ENOSPC;
}

/* Makes sure the block counting range bi exists.  A new block is put at
 * the end of the file; a block placed in its own range counts itself. */
static int ensure_block(struct qcow2_overlay *ov, uint64_t bi, struct touched *t)
{
  struct refcounts *rc = &ov->rc;
  while (rc->blocks[bi] == NULL) {
    uint64_t at = rc->end, at_bi = at / rc->per_block;
    if (at_bi >= rc->table_entries)
      return table_full(ov);
    uint8_t *block = calloc(1, ov->cluster_size);
    if (block == NULL)
      return -ENOMEM;
    uint64_t target = rc->blocks[at_bi] == NULL ? at_bi : bi;
    rc->blocks[target] = block;
    rc->table[target] = at << ov->cluster_bits;
    set_count(ov, at, 1); /* in the new block itself, or in at's existing one */
    rc->end++;
    int r = write_block(ov, target);
    if (r == 0 && target != at_bi)
      r = touch(ov, t, at_bi);
    if (r == 0 && target != at_bi)
      r = write_touched(ov, t); /* at's count before the table points at the block */
    uint8_t entry[8];
    put_be64(entry, rc->table[target]);
    if (r == 0)
      r = write_at(ov->fd, entry, 8, ov->top->refcount_table_offset + target * 8);
    if (r < 0)
      return r;
  }
  return 0;
}

/* Takes one cluster for use: the lowest free one, or the end of the file. */
static int take_cluster(struct qcow2_overlay *ov, struct touched *t, uint64_t *c)
{
  struct refcounts *rc = &ov->rc;
  int r = 0;
  if (rc->nfree) {
    *c = rc->free[--rc->nfree];
    r = ensure_block(ov, *c / rc->per_block, t);
  } else {
    for (;;) { /* a new block takes the end itself: look again */
      *c = rc->end;
      if (*c / rc->per_block >= rc->table_entries)
        return table_full(ov);
      if (rc->blocks[*c / rc->per_block])
        break;
      if ((r = ensure_block(ov, *c / rc->per_block, t)) < 0)
        return r;
    }
    rc->end++;
  }
  if (r < 0)
    return r;
  set_count(ov, *c, 1);
  return touch(ov, t, *c / rc->per_block);
}

static int reserve(struct qcow2_overlay *ov, unsigned n)
{
  struct refcounts *rc = &ov->rc;
  struct touched t = {.n = 0};
  for (unsigned i = 0; i < n; i++) {
    uint64_t c;
    int r = take_cluster(ov, &t, &c);
    if (r < 0) {
      if (i > 0 && r == -ENOSPC)
        break; /* what was reserved still serves */
      write_touched(ov, &t);
      return r;
    }
    if ((r = push(&rc->reserved, &rc->nreserved, &rc->reserved_cap, c)) < 0)
      return r;
  }
  int r = write_touched(ov, &t);
  return r < 0 ? r : sync_file(ov);
}

uint64_t alloc_cluster(struct qcow2_overlay *ov, int *err)
{
  struct refcounts *rc = &ov->rc;
  pthread_mutex_lock(&rc->lock);
  *err = 0;
  if (rc->nreserved == 0) {
    *err = reserve(ov, rc->batch);
    if (rc->batch < RESERVE_MAX)
      rc->batch *= 2;
  }
  uint64_t host = 0;
  if (*err == 0 && rc->nreserved > 0)
    host = rc->reserved[--rc->nreserved] << ov->cluster_bits;
  else if (*err == 0)
    *err = -ENOSPC;
  pthread_mutex_unlock(&rc->lock);
  return host;
}

uint64_t alloc_contiguous(struct qcow2_overlay *ov, uint64_t n, int *err)
{
  struct refcounts *rc = &ov->rc;
  struct touched t = {.n = 0};
  pthread_mutex_lock(&rc->lock);
  uint64_t start;
  *err = 0;
  for (;;) { /* every block the run needs exists before the run starts */
    start = rc->end;
    uint64_t missing = UINT64_MAX;
    for (uint64_t bi = start / rc->per_block; bi <= (start + n - 1) / rc->per_block; bi++) {
      if (bi >= rc->table_entries) {
        *err = table_full(ov);
        goto out;
      }
      if (rc->blocks[bi] == NULL) {
        missing = bi;
        break;
      }
    }
    if (missing == UINT64_MAX)
      break;
    if ((*err = ensure_block(ov, missing, &t)) < 0)
      goto out;
  }
  for (uint64_t c = start; c < start + n && *err == 0; c++) {
    set_count(ov, c, 1);
    *err = touch(ov, &t, c / rc->per_block);
  }
  rc->end = start + n;
  if (*err == 0)
    *err = write_touched(ov, &t);
  if (*err == 0)
    *err = sync_file(ov);
out:
  pthread_mutex_unlock(&rc->lock);
  return *err ? 0 : start << ov->cluster_bits;
}

int release_cluster(struct qcow2_overlay *ov, uint64_t host)
{
  struct refcounts *rc = &ov->rc;
  uint64_t c = host >> ov->cluster_bits, bi = c / rc->per_block;
  pthread_mutex_lock(&rc->lock);
  int r = 0;
  uint16_t count = refcount_of(ov, c);
  if (count == 0) {
    q_error("qcow2: %s: cluster at %" PRIu64 " freed twice", ov->top->path, host);
    r = -EIO;
  } else {
    set_count(ov, c, count - 1);
    uint64_t off = (rc->table[bi] & QCOW2_OFFSET_MASK) + (c % rc->per_block) * 2;
    r = write_at(ov->fd, rc->blocks[bi] + (c % rc->per_block) * 2, 2, off);
    if (r == 0 && count == 1)
      r = push(&rc->free, &rc->nfree, &rc->free_cap, c);
  }
  pthread_mutex_unlock(&rc->lock);
  return r;
}

int refcounts_return_reserved(struct qcow2_overlay *ov)
{
  int r = 0;
  while (ov->rc.nreserved > 0 && r == 0)
    r = release_cluster(ov, ov->rc.reserved[--ov->rc.nreserved] << ov->cluster_bits);
  return r;
}

/* ---- Reclaiming leaks after a crash ----------------------------------------- */

struct marks {
  uint8_t *used; /* a bit per cluster below rc->end */
  uint64_t n;
  bool unsure; /* something is referenced in a way not followed here */
};

static void mark_range(struct marks *m, uint64_t offset, uint64_t bytes, uint64_t cluster_size)
{
  for (uint64_t at = offset & ~(cluster_size - 1); at < offset + bytes; at += cluster_size) {
    uint64_t c = at / cluster_size;
    if (c < m->n)
      m->used[c / 8] |= (uint8_t) (1u << (c % 8));
    else
      m->unsure = true;
  }
}

/* Marks every cluster the image's metadata references. */
static int mark_used(struct qcow2_overlay *ov, struct marks *m)
{
  struct layer *l = ov->top;
  uint64_t cs = ov->cluster_size;
  mark_range(m, 0, cs, cs);
  mark_range(m, l->refcount_table_offset, (uint64_t) l->refcount_table_clusters * cs, cs);
  for (uint64_t bi = 0; bi < ov->rc.table_entries; bi++)
    if (ov->rc.table[bi])
      mark_range(m, ov->rc.table[bi] & QCOW2_OFFSET_MASK, cs, cs);
  mark_range(m, l->l1_offset, (uint64_t) l->l1_size * 8, cs);
  uint64_t *t = malloc(cs);
  if (t == NULL)
    return -ENOMEM;
  for (uint32_t i = 0; i < l->l1_size && !m->unsure; i++) {
    uint64_t table = l->l1[i] & QCOW2_OFFSET_MASK;
    if (table == 0)
      continue;
    mark_range(m, table, cs, cs);
    int r = read_at(ov->fd, t, cs, table);
    if (r < 0) {
      free(t);
      return r;
    }
    for (uint64_t k = 0; k < ov->l2_entries; k++) {
      uint64_t e = be64toh(t[k]);
      if (e & QCOW2_L2_COMPRESSED)
        m->unsure = true; /* compressed data shares clusters: leave the counts alone */
      else if (e & QCOW2_OFFSET_MASK)
        mark_range(m, e & QCOW2_OFFSET_MASK, cs, cs);
    }
  }
  free(t);
  mark_range(m, l->bitmap_dir_offset, l->bitmap_dir_size, cs);
  for (size_t i = 0; i < l->nbitmaps; i++) {
    const struct bitmap *b = &l->bitmaps[i];
    if (b->table == NULL && b->table_size != 0) {
      m->unsure = true; /* a bitmap whose table was not loaded */
      continue;
    }
    mark_range(m, b->table_offset, (uint64_t) b->table_size * 8, cs);
    for (uint32_t k = 0; k < b->table_size; k++)
      if (b->table[k] & QCOW2_OFFSET_MASK)
        mark_range(m, b->table[k] & QCOW2_OFFSET_MASK, cs, cs);
  }
  return 0;
}

int refcounts_reclaim_leaks(struct qcow2_overlay *ov)
{
  struct marks m = {.n = ov->rc.end};
  m.used = calloc(m.n / 8 + 1, 1);
  if (m.used == NULL)
    return -ENOMEM;
  int r = mark_used(ov, &m);
  uint64_t leaked = 0;
  for (uint64_t c = 1; r == 0 && !m.unsure && c < m.n; c++)
    if (!(m.used[c / 8] & (1u << (c % 8))) && refcount_of(ov, c) == 1) {
      r = release_cluster(ov, c << ov->cluster_bits);
      leaked++;
    }
  free(m.used);
  if (m.unsure)
    q_debug("qcow2: %s: leaked clusters are left for qemu-img check -r leaks (the image holds "
            "compressed clusters or bitmaps this server does not follow)", ov->top->path);
  else if (r == 0 && leaked)
    q_debug("qcow2: %s: %" PRIu64 " clusters leaked by the unclean stop are free again",
            ov->top->path, leaked);
  return r;
}
