/* qcow2 overlay: persistent dirty bitmaps, written while the overlay is
 * written.
 *
 * Each served bitmap is held whole in memory; the file holds the same
 * bits in qcow2's format (a bitmap table of data clusters, a cluster of
 * all-clear bits left unallocated).  A request's bits are set, and the
 * bytes that changed written to the file, before its data is: after a
 * crash at any moment a bitmap holds at least every granule written in
 * its epoch.  Only the first write to a granule in an epoch costs a
 * file write; later ones find their bits set and take no lock.
 *
 * Bitmaps of the file that are not served are kept as they are (their
 * directory entries copied byte for byte); they do not record these
 * writes.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "overlay-internal.h"

static bool bit_is_set(const struct dirty_bitmap *b, uint64_t g)
{
  return (__atomic_load_n(&b->bits[g / 8], __ATOMIC_RELAXED) >> (g % 8)) & 1;
}

/* ---- Loading, creating, clearing ------------------------------------------ */

static uint64_t bits_per_cluster(const struct qcow2_overlay *ov)
{
  return ov->cluster_size * 8;
}

static int shape(struct qcow2_overlay *ov, struct dirty_bitmap *b, unsigned granularity_bits)
{
  b->granularity_bits = granularity_bits;
  uint64_t g = 1ull << granularity_bits;
  b->granules = ov->size / g + (ov->size % g != 0);
  uint64_t entries = b->granules / bits_per_cluster(ov) + (b->granules % bits_per_cluster(ov) != 0);
  b->table_size = (uint32_t) entries;
  b->bits = calloc(entries ? entries : 1, ov->cluster_size);
  b->table = calloc(entries ? entries : 1, sizeof *b->table);
  pthread_mutex_init(&b->lock, NULL);
  return b->bits && b->table ? 0 : -ENOMEM;
}

static int write_table(struct qcow2_overlay *ov, const struct dirty_bitmap *b)
{
  size_t bytes = (size_t) b->table_clusters * ov->cluster_size;
  uint8_t *out = calloc(1, bytes ? bytes : 1);
  if (out == NULL)
    return -ENOMEM;
  for (uint32_t i = 0; i < b->table_size; i++)
    put_be64(out + (size_t) i * 8, b->table[i]);
  int r = write_at(ov->fd, out, bytes, b->table_offset);
  free(out);
  return r;
}

static int create_bitmap(struct qcow2_overlay *ov, struct dirty_bitmap *b, unsigned granularity_bits)
{
  int r = shape(ov, b, granularity_bits);
  if (r < 0)
    return r;
  uint64_t bytes = (uint64_t) b->table_size * 8;
  b->table_clusters = (uint32_t) ((bytes + ov->cluster_size - 1) >> ov->cluster_bits);
  if (b->table_clusters == 0)
    b->table_clusters = 1;
  b->table_offset = alloc_contiguous(ov, b->table_clusters, &r);
  if (b->table_offset == 0)
    return r ? r : -ENOSPC;
  q_debug("qcow2: %s: new bitmap '%s', granularity %llu", ov->top->path, b->name,
          1ull << granularity_bits);
  return write_table(ov, b);
}

static int load_bitmap(struct qcow2_overlay *ov, struct dirty_bitmap *b, const struct bitmap *found, bool clear)
{
  int r = shape(ov, b, found->granularity_bits);
  if (r < 0)
    return r;
  if (found->table_size != b->table_size)
    return -EIO; /* cannot happen: the reading library checked the size */
  b->table_offset = found->table_offset;
  uint64_t bytes = (uint64_t) b->table_size * 8;
  b->table_clusters = (uint32_t) ((bytes + ov->cluster_size - 1) >> ov->cluster_bits);
  bool changed = false;
  for (uint32_t i = 0; i < b->table_size; i++) {
    uint64_t e = found->table[i], data = e & QCOW2_OFFSET_MASK;
    uint8_t *bits = b->bits + (size_t) i * ov->cluster_size;
    if (clear) {
      if (data)
        defer_free(ov, data); /* freed by the flush that follows the table's rewrite */
      changed |= e != 0;
      e = 0;
    } else if (data)
      r = read_at(ov->fd, bits, ov->cluster_size, data);
    else if (e & 1)
      memset(bits, 0xff, ov->cluster_size);
    if (r < 0)
      return r;
    b->table[i] = e;
  }
  if (clear)
    q_debug("qcow2: %s: bitmap '%s' starts a new epoch, empty", ov->top->path, b->name);
  return changed ? write_table(ov, b) : 0;
}

static const struct bitmap *find_bitmap(const struct qcow2_overlay *ov, const char *name)
{
  for (size_t i = 0; i < ov->top->nbitmaps; i++)
    if (strcmp(ov->top->bitmaps[i].name, name) == 0)
      return &ov->top->bitmaps[i];
  return NULL;
}

static bool listed(const char *const *names, size_t n, const char *name)
{
  for (size_t i = 0; i < n; i++)
    if (strcmp(names[i], name) == 0)
      return true;
  return false;
}

static int check_existing(struct qcow2_overlay *ov, const struct bitmap *found, bool clear, uint64_t granularity)
{
  const char *path = ov->top->path;
  if (found->problem) {
    q_error("qcow2: %s: bitmap '%s' cannot be used: %s", path, found->name, found->problem);
    return -1;
  }
  if ((found->flags & BITMAP_IN_USE) && !ov->recovered && !clear) {
    q_error("qcow2: %s: bitmap '%s' is marked in use by a program that did not close the image "
            "(not by this server): its bits cannot be trusted; clear=%s starts it anew", path,
            found->name, found->name);
    return -1;
  }
  if (granularity && (1ull << found->granularity_bits) != granularity) {
    q_error("qcow2: %s: bitmap '%s' has a granularity of %llu bytes, not granularity=%llu", path,
            found->name, 1ull << found->granularity_bits, (unsigned long long) granularity);
    return -1;
  }
  return 0;
}

static int add_bitmap(struct qcow2_overlay *ov, const struct qcow2_overlay_options *o, const char *name)
{
  struct dirty_bitmap *b = &ov->bitmaps[ov->nbitmaps++];
  b->name = strdup(name);
  if (b->name == NULL)
    return -ENOMEM;
  bool clear = listed(o->clear, o->nclear, name);
  const struct bitmap *found = find_bitmap(ov, name);
  if (found) {
    if (check_existing(ov, found, clear, o->granularity) < 0)
      return -EINVAL;
    if ((found->flags & BITMAP_IN_USE) && !clear)
      q_debug("qcow2: %s: bitmap '%s' is recovered after an unclean stop (a superset of what "
              "changed)", ov->top->path, name);
    return load_bitmap(ov, b, found, clear);
  }
  uint64_t g = o->granularity ? o->granularity : QCOW2_OVERLAY_DEFAULT_GRANULARITY;
  return create_bitmap(ov, b, (unsigned) __builtin_ctzll(g));
}

int bitmaps_prepare(struct qcow2_overlay *ov, const struct qcow2_overlay_options *o)
{
  ov->bitmaps = calloc(o->nbitmaps + o->nclear + 1, sizeof *ov->bitmaps);
  if (ov->bitmaps == NULL)
    return -1;
  /* The bitmaps named, then those only cleared (clear= serves it too). */
  for (size_t i = 0; i < o->nbitmaps + o->nclear; i++) {
    const char *name = i < o->nbitmaps ? o->bitmaps[i] : o->clear[i - o->nbitmaps];
    bool seen = false;
    for (size_t j = 0; j < ov->nbitmaps; j++)
      seen |= strcmp(ov->bitmaps[j].name, name) == 0;
    if (seen)
      continue;
    int r = add_bitmap(ov, o, name);
    if (r == -EINVAL)
      return -1;
    if (r < 0) {
      q_error("qcow2: %s: preparing bitmap '%s': %s", ov->top->path, name, strerror(-r));
      return -1;
    }
  }
  return 0;
}

void bitmaps_release(struct qcow2_overlay *ov)
{
  for (size_t i = 0; ov->bitmaps && i < ov->nbitmaps; i++) {
    free(ov->bitmaps[i].name);
    free(ov->bitmaps[i].bits);
    free(ov->bitmaps[i].table);
    pthread_mutex_destroy(&ov->bitmaps[i].lock);
  }
  free(ov->bitmaps);
  ov->bitmaps = NULL;
}

/* ---- The directory -------------------------------------------------------------- */

static bool is_served(const struct qcow2_overlay *ov, const char *name)
{
  for (size_t i = 0; i < ov->nbitmaps; i++)
    if (strcmp(ov->bitmaps[i].name, name) == 0)
      return true;
  return false;
}

static size_t entry_bytes(size_t name_len)
{
  return (BITMAP_ENTRY_FIXED + name_len + 7) & ~(size_t) 7;
}

/* The whole directory: the bitmaps kept as they were, then ours. */
static uint8_t *build_directory(struct qcow2_overlay *ov, bool running, uint64_t *size, uint32_t *count)
{
  size_t bytes = 0;
  *count = 0;
  for (size_t i = 0; i < ov->top->nbitmaps; i++)
    if (!is_served(ov, ov->top->bitmaps[i].name)) {
      bytes += ov->top->bitmaps[i].entry_len;
      ++*count;
    }
  for (size_t i = 0; i < ov->nbitmaps; i++)
    bytes += entry_bytes(strlen(ov->bitmaps[i].name));
  *count += (uint32_t) ov->nbitmaps;
  size_t padded = (bytes + ov->cluster_size - 1) & ~(size_t) (ov->cluster_size - 1);
  uint8_t *dir = calloc(1, padded ? padded : 1), *p = dir; /* whole clusters, zero padded */
  if (dir == NULL)
    return NULL;
  for (size_t i = 0; i < ov->top->nbitmaps; i++)
    if (!is_served(ov, ov->top->bitmaps[i].name)) {
      memcpy(p, ov->top->bitmaps[i].entry, ov->top->bitmaps[i].entry_len);
      /* In use only because our last run crashed while serving it: its
       * bits are a superset, as for the bitmaps served now. */
      if (ov->recovered)
        put_be32(p + 12, get_be32(p + 12) & ~BITMAP_IN_USE);
      p += ov->top->bitmaps[i].entry_len;
    }
  for (size_t i = 0; i < ov->nbitmaps; i++) {
    const struct dirty_bitmap *b = &ov->bitmaps[i];
    size_t len = strlen(b->name);
    put_be64(p, b->table_offset);
    put_be32(p + 8, b->table_size);
    put_be32(p + 12, BITMAP_AUTO | (running ? BITMAP_IN_USE : 0));
    p[16] = BITMAP_TYPE_DIRTY_TRACKING;
    p[17] = (uint8_t) b->granularity_bits;
    put_be16(p + 18, (uint16_t) len);
    put_be32(p + 20, 0);
    memcpy(p + BITMAP_ENTRY_FIXED, b->name, len);
    p += entry_bytes(len);
  }
  *size = bytes;
  return dir;
}

static void free_directory_clusters(struct qcow2_overlay *ov, uint64_t offset, uint64_t size)
{
  for (uint64_t at = 0; offset && at < size; at += ov->cluster_size)
    defer_free(ov, offset + at);
}

int bitmaps_write_directory(struct qcow2_overlay *ov, bool running)
{
  uint64_t size;
  uint32_t count;
  uint8_t *dir = build_directory(ov, running, &size, &count);
  if (dir == NULL)
    return -ENOMEM;
  int r = 0;
  uint64_t offset = ov->dir_offset;
  if (count == 0)
    offset = 0;
  else if (size != ov->dir_size || offset == 0) { /* a new place, then the header, then the old one goes */
    uint64_t clusters = (size + ov->cluster_size - 1) >> ov->cluster_bits;
    offset = alloc_contiguous(ov, clusters, &r);
    if (offset)
      r = write_at(ov->fd, dir, clusters << ov->cluster_bits, offset);
    if (r == 0)
      r = sync_file(ov);
  } else /* the same entries with other flags: in place */
    r = write_at(ov->fd, dir, size, offset);
  free(dir);
  if (r == 0)
    r = write_header(ov, offset, size, count, running);
  if (r == 0 && offset != ov->dir_offset) {
    free_directory_clusters(ov, ov->dir_offset, ov->dir_size);
    ov->dir_offset = offset;
    ov->dir_size = count ? size : 0;
  }
  ov->dir_count = count;
  return r;
}

/* ---- Marking -------------------------------------------------------------------- */

static bool all_set(const struct dirty_bitmap *b, uint64_t first, uint64_t last)
{
  for (uint64_t g = first; g <= last;) {
    if (g % 8 == 0 && last - g >= 7) {
      if (__atomic_load_n(&b->bits[g / 8], __ATOMIC_RELAXED) != 0xff)
        return false;
      g += 8;
      continue;
    }
    if (!bit_is_set(b, g))
      return false;
    g++;
  }
  return true;
}

static void set_bits(struct dirty_bitmap *b, uint64_t first, uint64_t last)
{
  for (uint64_t g = first; g <= last; g++)
    __atomic_fetch_or(&b->bits[g / 8], (uint8_t) (1u << (g % 8)), __ATOMIC_RELAXED);
}

/* Writes the bytes holding granules [first, last], all in table entry k. */
static int write_bits(struct qcow2_overlay *ov, struct dirty_bitmap *b, uint64_t k, uint64_t first, uint64_t last)
{
  uint8_t *cluster_bits = b->bits + k * ov->cluster_size;
  if (b->table[k] == 1)
    return 0; /* all set on disk already */
  if (b->table[k] == 0) {
    int r;
    uint64_t host = alloc_cluster(ov, &r);
    if (host == 0)
      return r ? r : -ENOSPC;
    if ((r = write_at(ov->fd, cluster_bits, ov->cluster_size, host)) < 0) {
      defer_free(ov, host);
      return r;
    }
    uint8_t be[8];
    put_be64(be, host);
    if ((r = write_at(ov->fd, be, 8, b->table_offset + k * 8)) < 0) {
      defer_free(ov, host);
      return r;
    }
    b->table[k] = host;
    return 0;
  }
  uint64_t from = first / 8 - k * ov->cluster_size, to = last / 8 - k * ov->cluster_size;
  return write_at(ov->fd, cluster_bits + from, to - from + 1, b->table[k] + from);
}

static int mark_one(struct qcow2_overlay *ov, struct dirty_bitmap *b, uint64_t first, uint64_t last)
{
  if (all_set(b, first, last))
    return 0;
  int r = 0;
  pthread_mutex_lock(&b->lock);
  set_bits(b, first, last);
  uint64_t per = bits_per_cluster(ov);
  for (uint64_t k = first / per; r == 0 && k <= last / per; k++) {
    uint64_t lo = first > k * per ? first : k * per;
    uint64_t hi = last < (k + 1) * per - 1 ? last : (k + 1) * per - 1;
    r = write_bits(ov, b, k, lo, hi);
  }
  pthread_mutex_unlock(&b->lock);
  return r;
}

int bitmaps_mark(struct qcow2_overlay *ov, uint64_t offset, uint64_t count)
{
  if (count == 0)
    return 0;
  for (size_t i = 0; i < ov->nbitmaps; i++) {
    struct dirty_bitmap *b = &ov->bitmaps[i];
    int r = mark_one(ov, b, offset >> b->granularity_bits, (offset + count - 1) >> b->granularity_bits);
    if (r < 0) {
      q_error("qcow2: %s: recording the write in bitmap '%s': %s", ov->top->path, b->name, strerror(-r));
      return r;
    }
  }
  return 0;
}

/* ---- Queries -------------------------------------------------------------------- */

size_t qcow2_overlay_bitmap_count(const struct qcow2_overlay *ov)
{
  return ov->nbitmaps;
}

const char *qcow2_overlay_bitmap_name(const struct qcow2_overlay *ov, size_t index)
{
  return ov->bitmaps[index].name;
}

uint64_t qcow2_overlay_bitmap_granularity(const struct qcow2_overlay *ov, size_t index)
{
  return 1ull << ov->bitmaps[index].granularity_bits;
}

int qcow2_overlay_bitmap_status(struct qcow2_overlay *ov, size_t index, uint64_t offset, uint64_t max_length,
                                uint64_t *length, bool *dirty)
{
  const struct dirty_bitmap *b = &ov->bitmaps[index];
  if (offset >= ov->size || max_length == 0)
    return -EINVAL;
  uint64_t end = max_length < ov->size - offset ? offset + max_length : ov->size;
  uint64_t g = offset >> b->granularity_bits, last = (end - 1) >> b->granularity_bits;
  bool value = bit_is_set(b, g);
  uint8_t all = value ? 0xff : 0;
  uint64_t stop = g + 1;
  while (stop <= last) {
    if (stop % 8 == 0 && last - stop >= 7 && __atomic_load_n(&b->bits[stop / 8], __ATOMIC_RELAXED) == all) {
      stop += 8;
      continue;
    }
    if (bit_is_set(b, stop) != value)
      break;
    stop++;
  }
  uint64_t stop_byte = stop << b->granularity_bits;
  *length = (stop_byte < end ? stop_byte : end) - offset;
  *dirty = value;
  return 0;
}
