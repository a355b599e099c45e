/* qcow2 library: persistent dirty bitmaps of the top image.
 *
 * The directory is read at open.  A directory that is malformed (sizes
 * or offsets out of bounds) refuses the image, as it would in qemu; a
 * single bitmap that cannot be trusted (in use, of an unknown type, with
 * a table that does not fit the disk) stays listed with the reason, and
 * is simply not exposed.  Bitmap tables are kept in memory; the bitmap
 * data clusters are read through the metadata cache.
 *
 * Bit order: bit n of the bitmap is bit n % 8 (least significant first)
 * of byte n / 8 of the bitmap data, and covers the guest bytes
 * [n * granularity, (n + 1) * granularity).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

#define ENTRY_FIXED BITMAP_ENTRY_FIXED

void bitmaps_free(struct layer *l)
{
  for (size_t i = 0; i < l->nbitmaps; i++) {
    free(l->bitmaps[i].name);
    free(l->bitmaps[i].table);
    free(l->bitmaps[i].entry);
  }
  free(l->bitmaps);
  l->bitmaps = NULL;
  l->nbitmaps = 0;
}

/* Loads and checks the bitmap table of a bitmap that is otherwise usable;
 * on a defect sets b->problem. */
static int load_table(struct layer *l, struct bitmap *b, uint64_t offset, uint32_t size)
{
  uint64_t granules = (l->size >> b->granularity_bits) + ((l->size & ((1ull << b->granularity_bits) - 1)) != 0);
  uint64_t bits_per_cluster = l->cluster_size * 8;
  uint64_t expected = granules / bits_per_cluster + (granules % bits_per_cluster != 0);
  if (size != expected) {
    b->problem = "its table size does not match the disk size and granularity";
    return 0;
  }
  if (offset % l->cluster_size || (size > 0 && overlaps_header(l, offset)) ||
      offset > l->file_size || (uint64_t) size * 8 > l->file_size - offset) {
    b->problem = "its table lies outside the image or is misaligned";
    return 0;
  }
  b->table = malloc(size ? (size_t) size * 8 : 1);
  if (b->table == NULL) {
    q_error("qcow2: out of memory");
    return -1;
  }
  int r = read_at(l->fd, b->table, (size_t) size * 8, offset);
  if (r < 0) {
    q_error("qcow2: %s: reading bitmap '%s': %s", l->path, b->name, strerror(-r));
    return -1;
  }
  for (uint32_t i = 0; i < size; i++) {
    uint64_t e = b->table[i] = be64toh(b->table[i]);
    uint64_t data = e & QCOW2_OFFSET_MASK;
    bool reserved = (e & ~QCOW2_OFFSET_MASK & ~1ull) || (data && (e & 1));
    if (reserved || (data && (data % l->cluster_size || overlaps_header(l, data) ||
                              data >= l->file_size || l->cluster_size > l->file_size - data))) {
      b->problem = "an entry of its table is invalid";
      free(b->table);
      b->table = NULL;
      return 0;
    }
  }
  b->table_size = size;
  return 0;
}

/* Why a directory entry's bitmap cannot be used, or NULL.  A writer
 * (the overlay) decides itself what an in-use bitmap means. */
static const char *entry_problem(const struct layer *l, uint32_t flags, uint8_t type,
                                 uint8_t granularity_bits, uint32_t extra)
{
  if ((flags & BITMAP_IN_USE) && !l->writable)
    return "it is marked in use (it was not saved cleanly and may be inconsistent)";
  if (flags & ~(BITMAP_IN_USE | BITMAP_AUTO | BITMAP_EXTRA_DATA_COMPATIBLE))
    return "it has unknown flags";
  if (type != BITMAP_TYPE_DIRTY_TRACKING)
    return "it is not a dirty-tracking bitmap";
  if (granularity_bits < 9 || granularity_bits > 31)
    return "its granularity is out of range (512 bytes to 2 GiB)";
  if (extra && !(flags & BITMAP_EXTRA_DATA_COMPATIBLE))
    return "it carries extra data of an unknown kind";
  return NULL;
}

static int parse_directory(struct layer *l, const uint8_t *dir, uint64_t dir_size, uint32_t count)
{
  l->bitmaps = calloc(count, sizeof *l->bitmaps);
  if (l->bitmaps == NULL) {
    q_error("qcow2: out of memory");
    return -1;
  }
  uint64_t pos = 0;
  for (uint32_t i = 0; i < count; i++) {
    if (dir_size - pos < ENTRY_FIXED) {
      q_error("qcow2: %s: bitmap directory entry %u runs past the directory", l->path, i);
      return -1;
    }
    const uint8_t *e = dir + pos;
    uint64_t table_offset = get_be64(e);
    uint32_t table_size = get_be32(e + 8), flags = get_be32(e + 12), extra = get_be32(e + 20);
    uint8_t type = e[16], granularity_bits = e[17];
    uint16_t name_len = get_be16(e + 18);
    uint64_t entry_len = (ENTRY_FIXED + (uint64_t) extra + name_len + 7) & ~7ull;
    if (name_len == 0 || name_len > QCOW2_MAX_NAME || entry_len > dir_size - pos) {
      q_error("qcow2: %s: bitmap directory entry %u is malformed (name of %u bytes, %u bytes of "
              "extra data)", l->path, i, name_len, extra);
      return -1;
    }
    struct bitmap *b = &l->bitmaps[l->nbitmaps++];
    b->name = strndup((const char *) e + ENTRY_FIXED + extra, name_len);
    if (b->name == NULL) {
      q_error("qcow2: out of memory");
      return -1;
    }
    b->granularity_bits = granularity_bits;
    b->table_offset = table_offset;
    b->flags = flags;
    b->entry_len = (uint32_t) entry_len;
    b->entry = malloc(entry_len);
    if (b->entry == NULL) {
      q_error("qcow2: out of memory");
      return -1;
    }
    memset(b->entry, 0, entry_len);
    memcpy(b->entry, e, ENTRY_FIXED + (uint64_t) extra + name_len);
    b->problem = entry_problem(l, flags, type, granularity_bits, extra);
    if (strlen(b->name) != name_len)
      b->problem = "its name holds a NUL byte";
    for (size_t j = 0; b->problem == NULL && j + 1 < l->nbitmaps; j++)
      if (strcmp(l->bitmaps[j].name, b->name) == 0)
        b->problem = "another bitmap has the same name";
    if (b->problem == NULL && load_table(l, b, table_offset, table_size) < 0)
      return -1;
    if (b->problem)
      q_debug("qcow2: %s: bitmap '%s' is not exposed: %s", l->path, b->name, b->problem);
    pos += entry_len;
  }
  return 0;
}

int bitmaps_load(struct layer *l, const uint8_t *ext, uint32_t ext_len, uint64_t autoclear)
{
  if (ext == NULL) {
    if (autoclear & QCOW2_AUTOCLEAR_BITMAPS)
      q_debug("qcow2: %s: the bitmaps bit is set but there is no bitmaps extension", l->path);
    return 0;
  }
  if (!(autoclear & QCOW2_AUTOCLEAR_BITMAPS)) {
    q_debug("qcow2: %s: no bitmap is exposed: the bitmaps extension is not marked consistent "
            "(a program unaware of bitmaps wrote to the image)", l->path);
    return 0;
  }
  if (ext_len < 24) {
    q_error("qcow2: %s: the bitmaps extension is %u bytes, too short", l->path, ext_len);
    return -1;
  }
  uint32_t count = get_be32(ext);
  uint64_t dir_size = get_be64(ext + 8), dir_offset = get_be64(ext + 16);
  if (count == 0 || count > QCOW2_MAX_BITMAPS || dir_size > QCOW2_MAX_TABLE_BYTES ||
      dir_size < (uint64_t) count * ENTRY_FIXED || dir_offset % l->cluster_size ||
      overlaps_header(l, dir_offset)) {
    q_error("qcow2: %s: the bitmap directory is malformed (%u bitmaps, %" PRIu64 " bytes at "
            "offset %" PRIu64 ")", l->path, count, dir_size, dir_offset);
    return -1;
  }
  l->bitmap_dir_offset = dir_offset;
  l->bitmap_dir_size = dir_size;
  uint8_t *dir = malloc(dir_size);
  if (dir == NULL) {
    q_error("qcow2: out of memory");
    return -1;
  }
  int r = read_table(l, dir, dir_size, dir_offset, "bitmap directory");
  if (r == 0)
    r = parse_directory(l, dir, dir_size, count);
  free(dir);
  return r;
}

size_t qcow2_bitmap_count(const struct qcow2_chain *chain)
{
  return chain->top->nbitmaps;
}

const char *qcow2_bitmap_name(const struct qcow2_chain *chain, size_t index)
{
  return chain->top->bitmaps[index].name;
}

const char *qcow2_bitmap_problem(const struct qcow2_chain *chain, size_t index)
{
  return chain->top->bitmaps[index].problem;
}

uint64_t qcow2_bitmap_granularity(const struct qcow2_chain *chain, size_t index)
{
  return 1ull << chain->top->bitmaps[index].granularity_bits;
}

/* Counts the bits equal to `value` from bit `first` of a slice of bitmap
 * data (bytes [0, len)), stopping at the first that differs. */
static uint64_t equal_bits(const uint8_t *bytes, uint64_t len, uint64_t first, bool value)
{
  uint8_t all = value ? 0xff : 0x00;
  uint64_t bit = first;
  while (bit < len * 8) {
    if (bit % 8 == 0 && bytes[bit / 8] == all) {
      bit += 8;
      continue;
    }
    if (((bytes[bit / 8] >> (bit % 8)) & 1) != value)
      break;
    bit++;
  }
  return bit - first;
}

int qcow2_bitmap_status(struct qcow2_chain *chain, size_t index, uint64_t offset, uint64_t max_length,
                        uint64_t *length, bool *dirty)
{
  const struct layer *l = chain->top;
  const struct bitmap *b = &l->bitmaps[index];
  if (b->problem || offset >= l->size || max_length == 0)
    return -EINVAL;
  uint64_t end = max_length < l->size - offset ? offset + max_length : l->size;
  uint64_t bits_per_cluster = l->cluster_size * 8;
  uint32_t slice = chain->cache.slice_size;
  uint64_t bit = offset >> b->granularity_bits;
  uint64_t end_bit = ((end - 1) >> b->granularity_bits) + 1;
  bool value = false, started = false;

  while (bit < end_bit) {
    uint64_t entry_index = bit / bits_per_cluster;
    if (entry_index >= b->table_size)
      return -EIO; /* cannot happen: load_table checked the size */
    uint64_t entry = b->table[entry_index], data = entry & QCOW2_OFFSET_MASK;
    uint64_t in_cluster = bit % bits_per_cluster, run;
    if (data == 0) { /* the whole cluster of bits is one value */
      bool v = entry & 1;
      if (started && v != value)
        break;
      value = v;
      run = bits_per_cluster - in_cluster;
    } else {
      uint64_t byte = in_cluster / 8;
      uint64_t slice_start = byte & ~(uint64_t) (slice - 1);
      uint8_t bytes[4096];
      int r = cache_read(&chain->cache, l, bytes, slice, data + slice_start);
      if (r < 0)
        return r;
      uint64_t first = in_cluster - slice_start * 8;
      bool v = (bytes[first / 8] >> (first % 8)) & 1;
      if (started && v != value)
        break;
      value = v;
      run = equal_bits(bytes, slice, first, v);
      if (run < (uint64_t) slice * 8 - first) { /* the value changes inside this slice */
        bit += run;
        started = true;
        break;
      }
    }
    started = true;
    bit += run;
  }
  uint64_t stop = bit << b->granularity_bits;
  if (stop > end || stop < offset) /* stop < offset: the shift wrapped */
    stop = end;
  *length = stop - offset;
  *dirty = value;
  return 0;
}
