/* qcow2 reading library, shared by the plugins that serve qcow2 images.
 *
 * qcow2_open parses an image and its whole backing chain once; the
 * returned chain is then read by any number of threads at the same time
 * (every call below except open and close is thread-safe).  Metadata
 * (L2 tables, bitmap data) goes through one bounded cache shared by all
 * the layers of the chain; nothing else is cached, and no read allocates
 * memory once its thread has its decompression buffers.
 *
 * Every offset and size read from a file is checked before use.  A
 * defect found at open refuses the image with a message naming it; a
 * defect found later (a bad L2 entry, a corrupt compressed cluster)
 * fails only the call that met it, with -EIO.
 *
 * Messages go through the functions given to qcow2_set_logger (the
 * plugin passes nbdserve_error / nbdserve_debug; unit tests their own).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_QCOW2_H
#define NBDSERVE_QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Deepest backing chain accepted, counting the top image. */
#define QCOW2_MAX_CHAIN_DEPTH 32
/* Default size of the shared metadata cache. */
#define QCOW2_DEFAULT_CACHE_BYTES (32u << 20)

struct qcow2_chain;

struct qcow2_options {
  bool no_backing; /* serve the top layer alone (unallocated reads as zero) */
  const char *snapshot; /* internal snapshot id or name, or NULL for the active state */
  const char *data_file; /* external data file, overriding the image's own name */
  uint64_t cache_bytes; /* 0: QCOW2_DEFAULT_CACHE_BYTES */
  bool writable; /* open the top image read-write (for overlay.h; the reads above stay the same) */
};

typedef void (*qcow2_log_fn)(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void qcow2_set_logger(qcow2_log_fn error, qcow2_log_fn debug);

/* Returns NULL after logging why the image cannot be served. */
struct qcow2_chain *qcow2_open(const char *path, const struct qcow2_options *options);
void qcow2_close(struct qcow2_chain *chain);

uint64_t qcow2_size(const struct qcow2_chain *chain); /* virtual size, in bytes */
uint32_t qcow2_cluster_size(const struct qcow2_chain *chain); /* of the top layer */
unsigned qcow2_depth(const struct qcow2_chain *chain); /* layers in the chain, >= 1 */
/* Calls fn once for each file the chain reads (images, raw layers,
 * external data files), top first. */
void qcow2_for_each_file(const struct qcow2_chain *chain, void (*fn)(int fd, const char *path, void *opaque),
                         void *opaque);

/* The first file of the chain that is not on tmpfs or ramfs, or NULL
 * when every one is (a read then never waits for a disk). */
const char *qcow2_first_file_not_in_ram(const struct qcow2_chain *chain);

/* Reads [offset, offset+count) of the virtual disk, which must lie
 * inside it.  0, or -errno (-EIO for a corrupt image). */
int qcow2_read(struct qcow2_chain *chain, void *buf, uint64_t count, uint64_t offset);

/* What backs a stretch of the virtual disk. */
enum qcow2_kind {
  QCOW2_DATA, /* stored data */
  QCOW2_ZERO, /* reads as zeroes: a zero cluster, a hole, unallocated everywhere, past a short layer */
};
struct qcow2_status {
  uint64_t length; /* > 0 */
  enum qcow2_kind kind;
  /* Layer the stretch comes from: 1 the top image, 2 its backing file,
   * ...; 0 when no layer allocates it.  Past the end of a backing file
   * shorter than the layer above, that backing file's depth. */
  unsigned depth;
};
/* A stretch starting at offset, at most max_length bytes and inside the
 * disk, whose kind and depth do not change: the longest one, unless
 * finding its end would take long (the next call goes on from there).
 * 0 or -errno. */
int qcow2_block_status(struct qcow2_chain *chain, uint64_t offset, uint64_t max_length,
                       struct qcow2_status *status);

/* Persistent bitmaps of the top image (none when a snapshot is served).
 * Every bitmap of the directory is listed; qcow2_bitmap_problem says why
 * one cannot be used (in use, inconsistent, unknown type...), or NULL. */
size_t qcow2_bitmap_count(const struct qcow2_chain *chain);
const char *qcow2_bitmap_name(const struct qcow2_chain *chain, size_t index);
const char *qcow2_bitmap_problem(const struct qcow2_chain *chain, size_t index);
uint64_t qcow2_bitmap_granularity(const struct qcow2_chain *chain, size_t index);
/* The longest stretch from offset (at most max_length, inside the disk)
 * whose bits are all set (*dirty = true) or all clear.  Only for a
 * usable bitmap.  0 or -errno. */
int qcow2_bitmap_status(struct qcow2_chain *chain, size_t index, uint64_t offset, uint64_t max_length,
                        uint64_t *length, bool *dirty);

#endif /* NBDSERVE_QCOW2_H */
