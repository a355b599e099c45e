/* qcow2 library: opening an image and its backing chain.
 *
 * Everything the reads rely on is checked here, once: the header and
 * its extensions, the L1 table's place and size, the backing name, the
 * snapshot table and the bitmap directory.  What a read meets later (L2
 * tables, data clusters) is checked where it is used, in read.c.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <linux/magic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include "internal.h"

/* Images, backing files and data files are opened without blocking (a
 * name in a hostile image may lead to a FIFO) and must turn out to be
 * regular files or block devices. */
static int open_regular(const char *path, uint64_t *size, bool writable)
{
  int fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK);
  if (fd == -1)
    return -1;
  struct stat st;
  if (fstat(fd, &st) == 0 && !S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    close(fd);
    errno = EINVAL;
    return -2;
  }
  off_t end = lseek(fd, 0, SEEK_END);
  if (end == -1) {
    int err = errno;
    close(fd);
    errno = err;
    return -1;
  }
  *size = (uint64_t) end;
  return fd;
}

static int open_file(struct layer *l)
{
  l->fd = open_regular(l->path, &l->file_size, l->writable);
  if (l->fd == -2) {
    l->fd = -1;
    q_error("qcow2: %s is not a regular file or a block device", l->path);
    return -1;
  }
  if (l->fd == -1) {
    q_error("qcow2: %s: %s", l->path, strerror(errno));
    return -1;
  }
  return 0;
}

/* A backing or data file name relative to the image's directory. */
static char *resolve_beside(const char *image, const char *name)
{
  char *out;
  if (name[0] == '/')
    return strdup(name);
  char *copy = strdup(image);
  if (copy == NULL)
    return NULL;
  if (asprintf(&out, "%s/%s", dirname(copy), name) < 0)
    out = NULL;
  free(copy);
  return out;
}

/* ---- Header -------------------------------------------------------------- */

/* The fields of the header that the rest of the library needs. */
struct header {
  uint32_t version;
  uint64_t backing_offset;
  uint32_t backing_len;
  uint32_t cluster_bits;
  uint64_t size;
  uint32_t crypt_method;
  uint32_t l1_size;
  uint64_t l1_offset;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  uint64_t incompatible, autoclear;
  uint32_t refcount_order;
  uint32_t header_length;
  uint8_t compression_type;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
};

/* Header extensions found (pointers into the first cluster). */
struct extensions {
  const uint8_t *backing_format, *feature_names, *bitmaps, *data_file;
  uint32_t backing_format_len, feature_names_len, bitmaps_len, data_file_len;
  bool crypto;
};

/* Name of a feature bit from the image's own feature name table. */
static void feature_name(const struct extensions *ext, unsigned type, unsigned bit, char *out, size_t len)
{
  snprintf(out, len, "bit %u", bit);
  for (uint32_t i = 0; ext->feature_names && i + 48 <= ext->feature_names_len; i += 48) {
    const uint8_t *e = ext->feature_names + i;
    if (e[0] == type && e[1] == bit) {
      snprintf(out, len, "bit %u, \"%.46s\"", bit, (const char *) e + 2);
      return;
    }
  }
}

static void parse_header_fields(const uint8_t *b, struct header *h)
{
  h->version = get_be32(b + 4);
  h->backing_offset = get_be64(b + 8);
  h->backing_len = get_be32(b + 16);
  h->cluster_bits = get_be32(b + 20);
  h->size = get_be64(b + 24);
  h->crypt_method = get_be32(b + 32);
  h->l1_size = get_be32(b + 36);
  h->l1_offset = get_be64(b + 40);
  h->refcount_table_offset = get_be64(b + 48);
  h->refcount_table_clusters = get_be32(b + 56);
  h->nb_snapshots = get_be32(b + 60);
  h->snapshots_offset = get_be64(b + 64);
  h->incompatible = h->autoclear = 0;
  h->refcount_order = 4;
  h->header_length = 72;
  h->compression_type = 0;
  if (h->version >= 3) {
    h->incompatible = get_be64(b + 72);
    h->autoclear = get_be64(b + 88);
    h->refcount_order = get_be32(b + 96);
    h->header_length = get_be32(b + 100);
  }
}

static int parse_extensions(const struct layer *l, const uint8_t *cluster, uint32_t start, uint32_t end,
                            struct extensions *ext)
{
  memset(ext, 0, sizeof *ext);
  uint32_t pos = start;
  while (end - pos >= 8) {
    uint32_t type = get_be32(cluster + pos), len = get_be32(cluster + pos + 4);
    if (type == QCOW2_EXT_END)
      break;
    if (len > end - pos - 8) {
      q_error("qcow2: %s: header extension 0x%08x (%u bytes) runs past the first cluster",
              l->path, type, len);
      return -1;
    }
    const uint8_t *data = cluster + pos + 8;
    switch (type) {
    case QCOW2_EXT_BACKING_FORMAT: ext->backing_format = data; ext->backing_format_len = len; break;
    case QCOW2_EXT_FEATURE_NAMES: ext->feature_names = data; ext->feature_names_len = len; break;
    case QCOW2_EXT_BITMAPS: ext->bitmaps = data; ext->bitmaps_len = len; break;
    case QCOW2_EXT_DATA_FILE: ext->data_file = data; ext->data_file_len = len; break;
    case QCOW2_EXT_CRYPTO: ext->crypto = true; break;
    default: break; /* unknown extensions are skipped, as the format allows */
    }
    uint64_t next = (uint64_t) pos + 8 + (((uint64_t) len + 7) & ~7ull);
    if (next >= end)
      break;
    pos = (uint32_t) next;
  }
  return 0;
}

/* The header checks that refuse an image outright. */
static int check_header(const struct layer *l, const struct header *h, const struct extensions *ext)
{
  uint64_t unknown = h->incompatible & ~QCOW2_INCOMPAT_KNOWN;
  if (unknown) {
    char name[80];
    feature_name(ext, 0, (unsigned) __builtin_ctzll(unknown), name, sizeof name);
    q_error("qcow2: %s: the image uses an unknown incompatible feature (%s; all unknown bits: "
            "0x%" PRIx64 "): it cannot be read safely", l->path, name, unknown);
    return -1;
  }
  if (h->crypt_method != 0 || ext->crypto) {
    q_error("qcow2: %s: the image is encrypted (%s), which is not supported", l->path,
            h->crypt_method == 1 ? "AES" : h->crypt_method == 2 ? "LUKS" : "unknown method");
    return -1;
  }
  if (h->incompatible & QCOW2_INCOMPAT_CORRUPT) {
    q_error("qcow2: %s: the image is marked corrupt; repair it first (qemu-img check -r all)", l->path);
    return -1;
  }
  if (h->incompatible & QCOW2_INCOMPAT_DIRTY)
    q_debug("qcow2: %s: the dirty bit is set (refcounts may be stale); read-only access does not "
            "need them", l->path);
  if (h->refcount_order > 6) {
    q_error("qcow2: %s: refcount_order %u is out of range (at most 6)", l->path, h->refcount_order);
    return -1;
  }
  bool zstd_bit = h->incompatible & QCOW2_INCOMPAT_COMPRESSION;
  if (zstd_bit && h->compression_type != COMPRESSION_ZSTD) {
    q_error("qcow2: %s: compression type %u is not supported (0 deflate and 1 zstd are)", l->path,
            h->compression_type);
    return -1;
  }
  if (!zstd_bit && h->compression_type != 0) {
    q_error("qcow2: %s: compression_type is %u but the compression type feature bit is clear",
            l->path, h->compression_type);
    return -1;
  }
  if ((h->incompatible & QCOW2_INCOMPAT_EXTL2) && h->cluster_bits < 14) {
    q_error("qcow2: %s: extended L2 entries need clusters of at least 16 KiB (cluster_bits %u)",
            l->path, h->cluster_bits);
    return -1;
  }
  if (h->size > (uint64_t) INT64_MAX) {
    q_error("qcow2: %s: virtual size %" PRIu64 " is too large", l->path, h->size);
    return -1;
  }
  return 0;
}

/* ---- Layers -------------------------------------------------------------- */

struct build {
  const struct qcow2_options *options;
  dev_t devs[QCOW2_MAX_CHAIN_DEPTH];
  ino_t inos[QCOW2_MAX_CHAIN_DEPTH];
};

static struct layer *open_layer(struct build *b, char *path, unsigned depth, int format);

enum { FORMAT_PROBE, FORMAT_RAW, FORMAT_QCOW2 };

static int open_data_file(struct layer *l, const struct extensions *ext, const struct qcow2_options *o,
                          bool top)
{
  char *name = NULL;
  if (top && o->data_file)
    name = strdup(o->data_file);
  else if (ext->data_file && ext->data_file_len > 0 && ext->data_file_len <= QCOW2_MAX_NAME &&
           memchr(ext->data_file, 0, ext->data_file_len) == NULL)
    name = strndup((const char *) ext->data_file, ext->data_file_len);
  else {
    q_error("qcow2: %s: the image keeps its data in an external data file but %s", l->path,
            ext->data_file ? "the file's name is invalid" : "names none (give data-file=PATH)");
    return -1;
  }
  if (name == NULL || (l->data_path = resolve_beside(l->path, name)) == NULL) {
    free(name);
    q_error("qcow2: out of memory");
    return -1;
  }
  free(name);
  l->data_fd = open_regular(l->data_path, &l->data_file_size, false);
  if (l->data_fd < 0) {
    q_error("qcow2: %s: external data file %s: %s", l->path, l->data_path,
            l->data_fd == -2 ? "not a regular file or a block device" : strerror(errno));
    l->data_fd = -1;
    return -1;
  }
  q_debug("qcow2: %s: guest data lives in %s", l->path, l->data_path);
  return 0;
}

static int open_backing(struct build *b, struct layer *l, const uint8_t *cluster, const struct header *h,
                        const struct extensions *ext)
{
  if (h->backing_offset == 0 || b->options->no_backing)
    return 0;
  if (h->backing_len == 0 || h->backing_len > QCOW2_MAX_NAME || h->backing_offset > l->cluster_size ||
      h->backing_len > l->cluster_size - h->backing_offset ||
      h->backing_offset + h->backing_len > l->file_size) {
    q_error("qcow2: %s: the backing file name (%u bytes at offset %" PRIu64 ") is out of bounds",
            l->path, h->backing_len, h->backing_offset);
    return -1;
  }
  const char *name = (const char *) cluster + h->backing_offset;
  if (memchr(name, 0, h->backing_len)) {
    q_error("qcow2: %s: the backing file name holds a NUL byte", l->path);
    return -1;
  }
  int format = FORMAT_PROBE;
  if (ext->backing_format) {
    if (ext->backing_format_len == 3 && memcmp(ext->backing_format, "raw", 3) == 0)
      format = FORMAT_RAW;
    else if (ext->backing_format_len == 5 && memcmp(ext->backing_format, "qcow2", 5) == 0)
      format = FORMAT_QCOW2;
    else {
      q_error("qcow2: %s: backing file format '%.*s' is not supported (raw and qcow2 are)", l->path,
              (int) (ext->backing_format_len > 64 ? 64 : ext->backing_format_len),
              (const char *) ext->backing_format);
      return -1;
    }
  }
  char *short_name = strndup(name, h->backing_len);
  char *path = short_name ? resolve_beside(l->path, short_name) : NULL;
  free(short_name);
  if (path == NULL) {
    q_error("qcow2: out of memory");
    return -1;
  }
  if (l->depth >= QCOW2_MAX_CHAIN_DEPTH) {
    q_error("qcow2: %s: the backing chain is deeper than %d images", path, QCOW2_MAX_CHAIN_DEPTH);
    free(path);
    return -1;
  }
  l->backing = open_layer(b, path, l->depth + 1, format);
  return l->backing ? 0 : -1;
}

static int open_qcow2(struct build *b, struct layer *l, bool top)
{
  const struct qcow2_options *o = b->options;
  uint8_t head[112] = {0};
  if (l->file_size < 72) {
    q_error("qcow2: %s: %" PRIu64 " bytes is too short for a qcow2 header", l->path, l->file_size);
    return -1;
  }
  if (read_at(l->fd, head, sizeof head, 0) < 0) {
    q_error("qcow2: %s: %s", l->path, strerror(errno));
    return -1;
  }
  struct header h;
  parse_header_fields(head, &h);
  if (h.version != 2 && h.version != 3) {
    q_error("qcow2: %s: qcow2 version %u is not supported (2 and 3 are)", l->path, h.version);
    return -1;
  }
  if (h.cluster_bits < QCOW2_MIN_CLUSTER_BITS || h.cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
    q_error("qcow2: %s: cluster_bits %u is out of range (%d to %d)", l->path, h.cluster_bits,
            QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
    return -1;
  }
  l->cluster_bits = h.cluster_bits;
  l->cluster_size = 1ull << h.cluster_bits;
  if (h.version == 3 && (h.header_length < 104 || h.header_length > l->cluster_size)) {
    q_error("qcow2: %s: header_length %u is out of range (104 to the cluster size)", l->path,
            h.header_length);
    return -1;
  }
  if (h.header_length > 104)
    h.compression_type = head[104];

  uint8_t *cluster = malloc(l->cluster_size);
  if (cluster == NULL) {
    q_error("qcow2: out of memory");
    return -1;
  }
  int ret = -1;
  struct extensions ext;
  if (read_at(l->fd, cluster, l->cluster_size, 0) < 0 ||
      parse_extensions(l, cluster, h.header_length, (uint32_t) l->cluster_size, &ext) < 0 ||
      check_header(l, &h, &ext) < 0)
    goto out;

  l->size = h.size;
  l->version = h.version;
  l->l1_offset = h.l1_offset;
  l->refcount_table_offset = h.refcount_table_offset;
  l->refcount_table_clusters = h.refcount_table_clusters;
  l->refcount_order = h.refcount_order;
  l->nb_snapshots = h.nb_snapshots;
  l->incompatible = h.incompatible;
  l->autoclear = h.autoclear;
  l->extended_l2 = h.incompatible & QCOW2_INCOMPAT_EXTL2;
  l->l2_entry_bytes = l->extended_l2 ? 16 : 8;
  l->l2_bits = h.cluster_bits - (l->extended_l2 ? 4 : 3);
  l->compression = h.compression_type == 1 ? COMPRESSION_ZSTD : COMPRESSION_DEFLATE;
  l->data_fd = l->fd;
  l->data_file_size = l->file_size;
  if ((h.incompatible & QCOW2_INCOMPAT_DATA_FILE) && open_data_file(l, &ext, o, top) < 0)
    goto out;

  if (top && o->snapshot) {
    if (snapshot_select(l, h.nb_snapshots, h.snapshots_offset, o->snapshot) < 0)
      goto out;
  } else if (load_l1(l, h.l1_size, h.l1_offset, h.size, "L1 table") < 0)
    goto out;

  if (top && !o->snapshot && bitmaps_load(l, ext.bitmaps, ext.bitmaps_len, h.autoclear) < 0)
    goto out;
  if (open_backing(b, l, cluster, &h, &ext) < 0)
    goto out;
  q_debug("qcow2: %s: version %u, %" PRIu64 " bytes, %" PRIu64 "-byte clusters%s%s%s", l->path,
          h.version, l->size, l->cluster_size, l->extended_l2 ? ", extended L2 entries" : "",
          l->compression == COMPRESSION_ZSTD ? ", zstd" : "", l->backing ? ", with a backing file" : "");
  ret = 0;
out:
  free(cluster);
  return ret;
}

void free_layer(struct layer *l)
{
  while (l) {
    struct layer *next = l->backing;
    if (l->data_fd >= 0 && l->data_fd != l->fd)
      close(l->data_fd);
    if (l->fd >= 0)
      close(l->fd);
    bitmaps_free(l);
    free(l->l1);
    free(l->data_path);
    free(l->path);
    free(l);
    l = next;
  }
}

/* Takes ownership of path. */
static struct layer *open_layer(struct build *b, char *path, unsigned depth, int format)
{
  struct layer *l = calloc(1, sizeof *l);
  if (l == NULL) {
    free(path);
    q_error("qcow2: out of memory");
    return NULL;
  }
  l->path = path;
  l->depth = depth;
  l->writable = depth == 1 && b->options->writable;
  l->cache_id = depth;
  l->fd = l->data_fd = -1;
  if (open_file(l) < 0)
    goto fail;

  struct stat st;
  if (fstat(l->fd, &st) == 0) {
    for (unsigned i = 0; i + 1 < depth; i++)
      if (b->devs[i] == st.st_dev && b->inos[i] == st.st_ino) {
        q_error("qcow2: %s: the backing chain loops (this file is already layer %u)", path, i + 1);
        goto fail;
      }
    b->devs[depth - 1] = st.st_dev;
    b->inos[depth - 1] = st.st_ino;
  }

  if (format == FORMAT_PROBE) {
    uint8_t magic[4] = {0};
    if (read_at(l->fd, magic, 4, 0) < 0)
      goto fail;
    format = get_be32(magic) == QCOW2_MAGIC ? FORMAT_QCOW2 : FORMAT_RAW;
    if (depth == 1 && format != FORMAT_QCOW2) {
      q_error("qcow2: %s is not a qcow2 image (no \"QFI\\xfb\" magic)", path);
      goto fail;
    }
  }
  if (format == FORMAT_RAW) {
    l->is_qcow2 = false;
    l->size = l->file_size;
    return l;
  }
  l->is_qcow2 = true;
  uint8_t magic[4] = {0};
  if (read_at(l->fd, magic, 4, 0) < 0 || get_be32(magic) != QCOW2_MAGIC) {
    q_error("qcow2: %s is not a qcow2 image (no \"QFI\\xfb\" magic)", path);
    goto fail;
  }
  if (open_qcow2(b, l, depth == 1) == 0)
    return l;
fail:
  free_layer(l);
  return NULL;
}

/* ---- The chain ----------------------------------------------------------- */

struct qcow2_chain *qcow2_open(const char *path, const struct qcow2_options *options)
{
  struct qcow2_options defaults = {0};
  struct build b = {.options = options ? options : &defaults};
  struct qcow2_chain *chain = calloc(1, sizeof *chain);
  char *copy = strdup(path);
  if (chain == NULL || copy == NULL) {
    free(chain);
    free(copy);
    q_error("qcow2: out of memory");
    return NULL;
  }
  static uint64_t next_id;
  chain->id = __atomic_add_fetch(&next_id, 1, __ATOMIC_RELAXED);
  chain->top = open_layer(&b, copy, 1, FORMAT_PROBE);
  if (chain->top == NULL) {
    free(chain);
    return NULL;
  }
  uint32_t slice = 4096;
  for (struct layer *l = chain->top; l; l = l->backing) {
    chain->depth = l->depth;
    if (l->is_qcow2 && l->cluster_size > chain->max_cluster_size)
      chain->max_cluster_size = l->cluster_size;
    if (l->is_qcow2 && l->cluster_size < slice)
      slice = (uint32_t) l->cluster_size;
  }
  uint64_t bytes = b.options->cache_bytes ? b.options->cache_bytes : QCOW2_DEFAULT_CACHE_BYTES;
  if (cache_init(&chain->cache, bytes, slice) < 0) {
    q_error("qcow2: out of memory for a %" PRIu64 "-byte metadata cache", bytes);
    qcow2_close(chain);
    return NULL;
  }
  return chain;
}

void qcow2_close(struct qcow2_chain *chain)
{
  if (chain == NULL)
    return;
  free_layer(chain->top);
  cache_free(&chain->cache);
  free(chain);
}

uint64_t qcow2_size(const struct qcow2_chain *chain)
{
  return chain->top->size;
}

uint32_t qcow2_cluster_size(const struct qcow2_chain *chain)
{
  return (uint32_t) chain->top->cluster_size;
}

unsigned qcow2_depth(const struct qcow2_chain *chain)
{
  return chain->depth;
}

static bool in_ram(int fd)
{
  struct statfs fs;
  return fstatfs(fd, &fs) == 0 && (fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC);
}

const char *qcow2_first_file_not_in_ram(const struct qcow2_chain *chain)
{
  for (const struct layer *l = chain->top; l; l = l->backing) {
    if (!in_ram(l->fd))
      return l->path;
    if (l->data_path && !in_ram(l->data_fd))
      return l->data_path;
  }
  return NULL;
}

void qcow2_for_each_file(const struct qcow2_chain *chain, void (*fn)(int fd, const char *path, void *opaque),
                         void *opaque)
{
  for (const struct layer *l = chain->top; l; l = l->backing) {
    fn(l->fd, l->path, opaque);
    if (l->data_path)
      fn(l->data_fd, l->data_path, opaque);
  }
}
