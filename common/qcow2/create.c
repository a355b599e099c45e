/* qcow2 overlay: creating a new, empty overlay image.
 *
 * The image is qcow2 version 3 with 16-bit refcounts: the header cluster
 * (with the backing file's name and format), the refcount table, the
 * refcount blocks that count the metadata itself, and the L1 table,
 * in that order.  The virtual size is rounded up to whole 512-byte
 * sectors, as qemu requires (and as it sizes a raw base).  The refcount table is made large enough for twice the
 * virtual size, so that the overlay never needs to grow it.  The file is
 * written under a temporary name and renamed into place, so that a
 * crash during creation leaves no half-made overlay.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "overlay-internal.h"

#define HEADER_LENGTH 112

struct base_info {
  char *path; /* absolute, as stored in the overlay */
  const char *format;
  uint64_t size;
};

static int probe_base(const char *base, struct base_info *info)
{
  info->path = realpath(base, NULL);
  if (info->path == NULL) {
    q_error("qcow2: base %s: %s", base, strerror(errno));
    return -1;
  }
  int fd = open(info->path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  uint8_t magic[4] = {0};
  if (fd == -1 || read_at(fd, magic, 4, 0) < 0) {
    q_error("qcow2: base %s: %s", base, strerror(errno));
    if (fd != -1)
      close(fd);
    return -1;
  }
  off_t end = lseek(fd, 0, SEEK_END);
  close(fd);
  if (get_be32(magic) == QCOW2_MAGIC) {
    struct qcow2_chain *chain = qcow2_open(info->path, NULL);
    if (chain == NULL)
      return -1;
    info->format = "qcow2";
    info->size = qcow2_size(chain);
    qcow2_close(chain);
  } else {
    info->format = "raw";
    info->size = end > 0 ? (uint64_t) end : 0;
  }
  return 0;
}

struct layout {
  unsigned cluster_bits;
  uint64_t cluster_size, l1_entries, l1_clusters, rt_clusters, blocks, total;
};

static uint64_t div_up(uint64_t a, uint64_t b)
{
  return a / b + (a % b != 0);
}

static void plan(uint64_t size, unsigned cluster_bits, struct layout *p)
{
  p->cluster_bits = cluster_bits;
  p->cluster_size = 1ull << cluster_bits;
  uint64_t per_l2 = p->cluster_size * (p->cluster_size / 8);
  p->l1_entries = div_up(size, per_l2);
  p->l1_clusters = div_up(p->l1_entries * 8, p->cluster_size);
  if (p->l1_clusters == 0)
    p->l1_clusters = 1;
  uint64_t per_block = p->cluster_size / 2;
  /* Room for every guest cluster twice over, its L2 tables and bitmaps. */
  uint64_t host_max = 2 * size + p->l1_entries * p->cluster_size + size / 64 + (256ull << cluster_bits);
  p->rt_clusters = div_up(div_up(host_max, per_block * p->cluster_size) * 8, p->cluster_size);
  uint64_t meta = 1 + p->rt_clusters + p->l1_clusters;
  p->blocks = 1;
  while (meta + p->blocks > p->blocks * per_block)
    p->blocks++;
  p->total = meta + p->blocks;
}

static void fill_header(uint8_t *h, const struct layout *p, uint64_t size, const struct base_info *base)
{
  put_be32(h, QCOW2_MAGIC);
  put_be32(h + 4, 3);
  put_be32(h + 20, p->cluster_bits);
  put_be64(h + 24, size);
  put_be32(h + 36, (uint32_t) p->l1_entries);
  put_be64(h + 40, (1 + p->rt_clusters + p->blocks) << p->cluster_bits); /* L1 */
  put_be64(h + 48, 1ull << p->cluster_bits); /* refcount table */
  put_be32(h + 56, (uint32_t) p->rt_clusters);
  put_be32(h + 96, 4); /* refcount_order: 16 bits */
  put_be32(h + 100, HEADER_LENGTH);
  uint32_t pos = HEADER_LENGTH;
  if (base->path) {
    uint32_t len = (uint32_t) strlen(base->format);
    put_be32(h + pos, QCOW2_EXT_BACKING_FORMAT);
    put_be32(h + pos + 4, len);
    memcpy(h + pos + 8, base->format, len);
    pos += 8 + ((len + 7) & ~7u);
  }
  pos += 8; /* the end extension: zeroes */
  if (base->path) {
    uint32_t len = (uint32_t) strlen(base->path);
    memcpy(h + pos, base->path, len);
    put_be64(h + 8, pos);
    put_be32(h + 16, len);
  }
}

static int write_image(int fd, const struct layout *p, uint64_t size, const struct base_info *base)
{
  uint64_t cs = p->cluster_size;
  uint8_t *buf = calloc(1, cs);
  if (buf == NULL)
    return -ENOMEM;
  fill_header(buf, p, size, base);
  int r = write_at(fd, buf, cs, 0);
  /* The refcount table: the blocks follow it. */
  for (uint64_t i = 0; r == 0 && i < p->rt_clusters; i++) {
    memset(buf, 0, cs);
    for (uint64_t k = 0; k < cs / 8; k++) {
      uint64_t block = i * (cs / 8) + k;
      if (block < p->blocks)
        put_be64(buf + k * 8, (1 + p->rt_clusters + block) << p->cluster_bits);
    }
    r = write_at(fd, buf, cs, (1 + i) << p->cluster_bits);
  }
  /* The blocks: every metadata cluster counted once. */
  uint64_t per_block = cs / 2;
  for (uint64_t b = 0; r == 0 && b < p->blocks; b++) {
    memset(buf, 0, cs);
    for (uint64_t k = 0; k < per_block && b * per_block + k < p->total; k++)
      put_be16(buf + k * 2, 1);
    r = write_at(fd, buf, cs, (1 + p->rt_clusters + b) << p->cluster_bits);
  }
  free(buf);
  if (r == 0 && ftruncate(fd, (off_t) (p->total << p->cluster_bits)) == -1) /* the L1 table: zeroes */
    r = -errno;
  if (r == 0 && fsync(fd) == -1)
    r = -errno;
  return r;
}

static void sync_directory(const char *path)
{
  char *copy = strdup(path);
  int fd = copy ? open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
  if (fd != -1) {
    fsync(fd);
    close(fd);
  }
  free(copy);
}

int overlay_create(const struct qcow2_overlay_options *o)
{
  struct base_info base = {0};
  uint64_t size = o->size;
  if (o->base && o->base_format) { /* known: the base need not exist yet (a checkpoint's layer) */
    base.path = strdup(o->base);
    base.format = o->base_format;
    base.size = o->size;
    if (base.path == NULL)
      return -1;
  } else if (o->base && probe_base(o->base, &base) < 0)
    return -1;
  if (o->base)
    size = base.size;
  size = (size + 511) & ~511ull; /* qcow2 sizes are whole sectors; qemu sees a raw base so too */
  uint64_t cs = o->cluster_size ? o->cluster_size
                                : o->granularity ? o->granularity : QCOW2_OVERLAY_DEFAULT_GRANULARITY;
  int ret = -1;
  if (cs < (1u << QCOW2_MIN_CLUSTER_BITS) || cs > (1u << QCOW2_MAX_CLUSTER_BITS) || (cs & (cs - 1))) {
    q_error("qcow2: cluster size %llu: a power of two from 512 bytes to 2 MiB", (unsigned long long) cs);
    goto out;
  }
  if (!o->base && size == 0) {
    q_error("qcow2: a new overlay without a base needs its size (size=)");
    goto out;
  }
  struct layout p;
  plan(size, (unsigned) __builtin_ctzll(cs), &p);
  if (base.path && HEADER_LENGTH + 16 + 8 + 8 + strlen(base.path) + 64 > cs) {
    q_error("qcow2: the base's name is too long for a header cluster of %llu bytes",
            (unsigned long long) cs);
    goto out;
  }
  char *tmp;
  if (asprintf(&tmp, "%s.XXXXXX", o->path) < 0)
    goto out;
  int fd = mkostemp(tmp, O_CLOEXEC);
  if (fd == -1) {
    q_error("qcow2: creating %s: %s", o->path, strerror(errno));
    free(tmp);
    goto out;
  }
  int r = write_image(fd, &p, size, &base);
  if (r == 0 && fchmod(fd, 0644) == -1)
    r = -errno;
  close(fd);
  if (r == 0 && rename(tmp, o->path) == -1)
    r = -errno;
  if (r < 0) {
    q_error("qcow2: creating %s: %s", o->path, strerror(-r));
    unlink(tmp);
  } else {
    sync_directory(o->path);
    q_debug("qcow2: created %s: %llu bytes, %llu-byte clusters%s%s", o->path, (unsigned long long) size,
            (unsigned long long) cs, base.path ? ", over " : "", base.path ? base.path : "");
    ret = 0;
  }
  free(tmp);
out:
  free(base.path);
  return ret;
}
