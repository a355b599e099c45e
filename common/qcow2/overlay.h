/* qcow2 overlay library: a writable qcow2 v3 image over a read-only
 * base, with persistent dirty bitmaps that record every change.
 *
 * The overlay is an ordinary qcow2 image whose backing file is the base
 * (raw or qcow2, read through the reading library in qcow2.h), so that
 * qemu-img can inspect, check and commit it.  Guest writes allocate
 * clusters in the overlay; zeroes and trims change L2 entries only;
 * reads merge the overlay over the base cluster by cluster.
 *
 * Every call below except open and close is thread-safe and may run in
 * parallel with the others: requests on different clusters only meet on
 * the allocator's lock, and reads never wait for an allocation elsewhere.
 *
 * Durability (the overlay's page, dirty-bitmap-overlay.md, explains the
 * order of writes on disk):
 * - what was acknowledged before a FLUSH (qcow2_overlay_flush) returned,
 *   or by a FUA call, survives a crash of the process or of the host;
 * - dirty bits are on disk before the data they describe, so that after a
 *   crash a bitmap is a superset of what changed in its epoch;
 * - refcounts never fall below the clusters in use (a crash may leak
 *   clusters, as in qemu; a clean close leaks none).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_QCOW2_OVERLAY_H
#define NBDSERVE_QCOW2_OVERLAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qcow2.h"

#define QCOW2_OVERLAY_DEFAULT_GRANULARITY (64u << 10)

struct qcow2_overlay;

struct qcow2_overlay_options {
  const char *path; /* the overlay; created if it does not exist */
  const char *base; /* the base, or NULL for an overlay without one */
  /* Only when the overlay is created: */
  uint64_t size; /* without a base */
  uint32_t cluster_size; /* 0: the granularity */
  /* Bitmaps to serve (created when absent); those in `clear` start empty. */
  const char *const *bitmaps;
  size_t nbitmaps;
  const char *const *clear;
  size_t nclear;
  uint64_t granularity; /* of new bitmaps; 0: 64K.  Checked against existing ones if nonzero */
  uint64_t cache_bytes; /* metadata cache for the base; 0: default */
};

/* Opens the overlay (creating it first if needed), recovers it after an
 * unclean stop, and prepares the bitmaps.  NULL after logging why. */
struct qcow2_overlay *qcow2_overlay_open(const struct qcow2_overlay_options *options);
/* A clean stop: everything flushed, bitmaps marked consistent.  Returns
 * 0 or -errno (the overlay is freed either way). */
int qcow2_overlay_close(struct qcow2_overlay *ov);

uint64_t qcow2_overlay_size(const struct qcow2_overlay *ov);
uint32_t qcow2_overlay_cluster_size(const struct qcow2_overlay *ov);
/* Calls fn for the overlay's file and every file of its base, as
 * qcow2_for_each_file does. */
void qcow2_overlay_for_each_file(const struct qcow2_overlay *ov,
                                 void (*fn)(int fd, const char *path, void *opaque), void *opaque);
/* True when the file was found in use by a process that stopped
 * uncleanly (its bitmaps were recovered as supersets). */
bool qcow2_overlay_recovered(const struct qcow2_overlay *ov);

/* Data calls: the range must lie inside the disk.  0 or -errno. */
int qcow2_overlay_read(struct qcow2_overlay *ov, void *buf, uint64_t count, uint64_t offset);
int qcow2_overlay_write(struct qcow2_overlay *ov, const void *buf, uint64_t count, uint64_t offset,
                        bool fua);
int qcow2_overlay_zero(struct qcow2_overlay *ov, uint64_t count, uint64_t offset, bool may_trim, bool fua);
int qcow2_overlay_trim(struct qcow2_overlay *ov, uint64_t count, uint64_t offset, bool fua);
int qcow2_overlay_flush(struct qcow2_overlay *ov);
/* Merged allocation: depth 1 for the overlay, 2 and more for the base. */
int qcow2_overlay_block_status(struct qcow2_overlay *ov, uint64_t offset, uint64_t max_length,
                               struct qcow2_status *status);

/* The bitmaps served, in the order given at open. */
size_t qcow2_overlay_bitmap_count(const struct qcow2_overlay *ov);
const char *qcow2_overlay_bitmap_name(const struct qcow2_overlay *ov, size_t index);
uint64_t qcow2_overlay_bitmap_granularity(const struct qcow2_overlay *ov, size_t index);
int qcow2_overlay_bitmap_status(struct qcow2_overlay *ov, size_t index, uint64_t offset,
                                uint64_t max_length, uint64_t *length, bool *dirty);

#endif /* NBDSERVE_QCOW2_OVERLAY_H */
