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
  uint64_t size; /* without a base, or with base_format */
  const char *base_format; /* "raw" or "qcow2": the base is not looked at (it may not exist yet),
                            * `base` is stored as given, `size` is the size */
  uint32_t cluster_size; /* 0: the granularity */
  /* Bitmaps to serve (created when absent); those in `clear` start empty. */
  const char *const *bitmaps;
  size_t nbitmaps;
  const char *const *clear;
  size_t nclear;
  uint64_t granularity; /* of new bitmaps; 0: 64K.  Checked against existing ones if nonzero */
  const uint64_t *granularities; /* or NULL: per bitmap of `bitmaps`, for new ones (0: granularity) */
  uint64_t cache_bytes; /* metadata cache for the base; 0: default */
  /* Open a checkpoint's frozen layer (made by qcow2_overlay_freeze): its
   * data stays as it is, the bitmap that ended there is served (the
   * bitmap fields above are ignored). */
  bool frozen;
};

/* Opens the overlay (creating it first if needed), recovers it after an
 * unclean stop, and prepares the bitmaps.  NULL after logging why. */
struct qcow2_overlay *qcow2_overlay_open(const struct qcow2_overlay_options *options);
/* A clean stop: everything flushed, bitmaps marked consistent.  Returns
 * 0 or -errno (the overlay is freed either way). */
int qcow2_overlay_close(struct qcow2_overlay *ov);

uint64_t qcow2_overlay_size(const struct qcow2_overlay *ov);
uint32_t qcow2_overlay_cluster_size(const struct qcow2_overlay *ov);
/* The first file of the overlay and its base not in RAM, or NULL
 * (qcow2_first_file_not_in_ram). */
const char *qcow2_overlay_first_file_not_in_ram(const struct qcow2_overlay *ov);
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

/* ---- Checkpoints (checkpoint.c) -------------------------------------------
 *
 * A checkpoint freezes the overlay as it is: the file becomes a read-only
 * layer (its bitmaps consistent, the bitmap whose epoch ended there and
 * the time recorded in its header), and a new, empty overlay whose
 * backing file is that layer takes the writes.  Releasing a checkpoint
 * copies what its layer holds into the layer above where that one holds
 * nothing (the data seen through the chain does not change), then points
 * the layer above past it.  The caller keeps every other call out while
 * freeze, thaw and drop_backing run (they change the chain). */

/* Only creates the image (as open would when it is missing). 0 or -1. */
int qcow2_overlay_create(const struct qcow2_overlay_options *options);
/* Flushes, then freezes: no more writes (EROFS), the file closed cleanly
 * with `bitmap` and `time` recorded; `new_path` is the file's name from
 * now on (for messages).  0 or -errno. */
int qcow2_overlay_freeze(struct qcow2_overlay *ov, const char *bitmap, uint64_t time, const char *new_path);
/* The file was renamed (for messages).  0 or -ENOMEM. */
int qcow2_overlay_set_path(struct qcow2_overlay *ov, const char *path);
/* Undoes a freeze (a checkpoint that failed half way).  0 or -errno. */
int qcow2_overlay_thaw(struct qcow2_overlay *ov);
/* The checkpoint recorded in a frozen layer: 0, or -ENOENT for none. */
int qcow2_overlay_checkpoint_info(const struct qcow2_overlay *ov, const char **bitmap, uint64_t *time);
/* The bitmap recording the writes of an overlay that has had
 * checkpoints, as its header says (NULL: none said; malloc'd), read
 * from the file at path without opening it as an overlay. */
char *qcow2_overlay_peek_recording(const char *path);
/* Records it in the header.  0 or -errno. */
int qcow2_overlay_set_recording(struct qcow2_overlay *ov, const char *name);
/* Records in a frozen layer that its checkpoint is released: the layer
 * waits to be absorbed by the one above, even across a restart. */
int qcow2_overlay_mark_released(struct qcow2_overlay *ov);
bool qcow2_overlay_checkpoint_released(const struct qcow2_overlay *ov);
/* The file below the overlay, when it is a qcow2 image (a checkpoint's
 * layer, or a qcow2 base), else NULL. */
const char *qcow2_overlay_backing_qcow2(const struct qcow2_overlay *ov);
/* Bytes the overlay's file takes on disk. */
uint64_t qcow2_overlay_file_bytes(const struct qcow2_overlay *ov);
/* Copies into the overlay what its backing layer (a qcow2 image) holds
 * where the overlay holds nothing, then writes the header naming the
 * layer below that one as the backing file.  Runs beside data calls.
 * 0 or -errno. */
int qcow2_overlay_absorb_backing(struct qcow2_overlay *ov);
/* After absorb: the chain skips the absorbed layer, which is closed. */
void qcow2_overlay_drop_backing(struct qcow2_overlay *ov);
/* In ov's chain, the layer `gone` below the layer `above` (by path)
 * leaves the chain, after `above` absorbed it (qcow2_overlay_absorb_backing
 * on the overlay of `above`): `above`'s tables are read again.  The caller
 * keeps every other call out.  0 or -errno. */
int qcow2_overlay_forget_below(struct qcow2_overlay *ov, const char *above, const char *gone);
/* Sets in bitmap dst_index every bit set in src's src_index (same
 * granularity), on disk too.  0 or -errno (-EINVAL: granularities differ). */
int qcow2_overlay_bitmap_seed(struct qcow2_overlay *dst, size_t dst_index, const struct qcow2_overlay *src,
                              size_t src_index);

#endif /* NBDSERVE_QCOW2_OVERLAY_H */
