/* qcow2 library internals: the parsed layers of a chain, the metadata
 * cache and the helpers the library's files share.  Not for plugins:
 * they see only qcow2.h.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_QCOW2_INTERNAL_H
#define NBDSERVE_QCOW2_INTERNAL_H

#include <endian.h>
#include <inttypes.h>
#include <pthread.h>
#include <string.h>

#include "qcow2.h"

#define QCOW2_MAGIC 0x514649fbu /* "QFI\xfb" */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21 /* 2 MiB */
#define QCOW2_MAX_L1_BYTES (32u << 20)
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_TABLE_BYTES (64u << 20) /* snapshot table, bitmap directory */
#define QCOW2_MAX_BITMAPS 65535
#define QCOW2_MAX_NAME 1023 /* backing file, bitmap names */

/* Header feature bits. */
#define QCOW2_INCOMPAT_DIRTY (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ull << 4)
#define QCOW2_INCOMPAT_KNOWN 0x1full
#define QCOW2_AUTOCLEAR_BITMAPS (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << 1)

/* Header extension types. */
#define QCOW2_EXT_END 0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_NAMES 0x6803f857u
#define QCOW2_EXT_BITMAPS 0x23852875u
#define QCOW2_EXT_CRYPTO 0x0537be77u
#define QCOW2_EXT_DATA_FILE 0x44415441u

/* L1 and L2 entries. */
#define QCOW2_OFFSET_MASK 0x00fffffffffffe00ull /* bits 9-55 */
#define QCOW2_L2_COMPRESSED (1ull << 62)
#define QCOW2_L2_COPIED (1ull << 63)
#define QCOW2_L2_ZERO 1ull
#define QCOW2_SUBCLUSTERS 32

enum compression { COMPRESSION_DEFLATE = 0, COMPRESSION_ZSTD = 1 };

struct bitmap {
  char *name;
  const char *problem; /* NULL if usable */
  unsigned granularity_bits;
  uint64_t *table; /* bitmap_table_size entries, host order */
  uint32_t table_size;
  /* As found in the directory: what a writer keeps or rewrites. */
  uint64_t table_offset;
  uint32_t flags;
  uint8_t *entry; /* the whole directory entry, padded to 8 bytes */
  uint32_t entry_len;
};

#define BITMAP_IN_USE (1u << 0)
#define BITMAP_AUTO (1u << 1)
#define BITMAP_EXTRA_DATA_COMPATIBLE (1u << 2)
#define BITMAP_TYPE_DIRTY_TRACKING 1
#define BITMAP_ENTRY_FIXED 24 /* bytes of a directory entry before its extra data and name */

/* One layer of the chain: a qcow2 image or a raw file. */
struct layer {
  char *path;
  unsigned depth; /* 1 for the top */
  int fd; /* the image (or the raw file) */
  uint64_t file_size;
  uint64_t size; /* virtual size */
  bool is_qcow2;

  /* qcow2 only. */
  int data_fd; /* where guest clusters live: fd, or the external data file */
  uint64_t data_file_size;
  char *data_path; /* external data file, or NULL */
  unsigned cluster_bits;
  uint64_t cluster_size;
  bool extended_l2;
  unsigned l2_entry_bytes; /* 8, or 16 with extended L2 entries */
  unsigned l2_bits; /* log2 of entries per L2 table */
  uint64_t *l1; /* host order */
  uint32_t l1_size;
  enum compression compression;
  unsigned cache_id; /* distinguishes this layer's slices in the cache */

  struct bitmap *bitmaps; /* top layer only */
  size_t nbitmaps;

  /* The top layer's header fields a writer needs (overlay.c). */
  bool writable; /* opened read-write: in-use bitmaps are the writer's to judge */
  uint32_t version;
  uint64_t l1_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
  uint32_t refcount_order;
  uint32_t nb_snapshots;
  uint64_t incompatible, autoclear;
  uint64_t bitmap_dir_offset, bitmap_dir_size;

  struct layer *backing; /* NULL at the bottom */
};

/* The shared metadata cache: fixed-size slices of a file, set-associative,
 * a lock per set, so that concurrent readers rarely meet. */
struct meta_cache {
  uint32_t slice_size;
  uint32_t nsets; /* power of two */
  struct cache_set *sets;
  uint8_t *data; /* nsets * CACHE_WAYS slices */
};

struct qcow2_chain {
  uint64_t id; /* unique per open: names the chain in per-thread state */
  struct layer *top;
  unsigned depth;
  struct meta_cache cache;
  uint64_t max_cluster_size; /* of any compressed-capable layer: sizes the per-thread buffers */
};

/* ---- logging (file.c) ---- */
extern qcow2_log_fn qcow2_error_fn, qcow2_debug_fn;
#define q_error(...) qcow2_error_fn(__VA_ARGS__)
#define q_debug(...) qcow2_debug_fn(__VA_ARGS__)

/* ---- big-endian fields ---- */
static inline uint16_t get_be16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t get_be32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t get_be64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

/* ---- file access, the L1 table (file.c) ---- */
/* Reads exactly count bytes at offset; bytes past the end of the file
 * read as zero.  0, or -errno. */
int read_at(int fd, void *buf, size_t count, uint64_t offset);
/* Reads a table that must lie wholly inside the file; -EIO if it does not. */
int read_table(const struct layer *l, void *buf, uint64_t count, uint64_t offset, const char *what);

/* ---- metadata cache (cache.c) ---- */
int cache_init(struct meta_cache *cache, uint64_t bytes, uint32_t slice_size);
void cache_free(struct meta_cache *cache);
/* Copies count bytes at offset of the layer's image file (a range that
 * does not cross a slice boundary) through the cache. */
int cache_read(struct meta_cache *cache, const struct layer *l, void *buf, uint32_t count, uint64_t offset);

/* ---- header checks (file.c) ---- */
bool overlaps_header(const struct layer *l, uint64_t offset);
/* Loads an L1 table (the active one or a snapshot's) covering size bytes. */
int load_l1(struct layer *l, uint32_t l1_size, uint64_t l1_offset, uint64_t size, const char *what);

/* ---- bitmaps (bitmap.c) ---- */
int bitmaps_load(struct layer *l, const uint8_t *ext, uint32_t ext_len, uint64_t autoclear);
void bitmaps_free(struct layer *l);

/* ---- reading one layer and what lies below it (read.c) ---- */
int layer_read(struct qcow2_chain *chain, const struct layer *l, uint8_t *buf, uint64_t count,
               uint64_t offset);
int layer_status(struct qcow2_chain *chain, const struct layer *l, uint64_t offset, uint64_t max,
                 struct qcow2_status *st);

/* ---- snapshots (snapshot.c) ---- */
int snapshot_select(struct layer *l, uint32_t nb_snapshots, uint64_t snapshots_offset, const char *want);

#endif /* NBDSERVE_QCOW2_INTERNAL_H */
