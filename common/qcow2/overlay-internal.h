/* qcow2 overlay internals: the writable state of an overlay and the
 * helpers its files share (overlay.c: open, header and close; refcount.c:
 * the cluster allocator; write.c: the data path; dirty.c: bitmaps;
 * create.c: a new image).
 *
 * Locks, outermost first: flush_lock (one flush at a time) > a stripe
 * (the guest clusters hashed to it) > meta (the in-memory L1/L2 tables
 * against a flush copying them) > a bitmap's lock > refcounts.lock.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_QCOW2_OVERLAY_INTERNAL_H
#define NBDSERVE_QCOW2_OVERLAY_INTERNAL_H

#include <pthread.h>

#include "internal.h"
#include "overlay.h"

#define OVERLAY_STRIPES 1024
/* Our own header extension, present while a server has the image open:
 * in-use bitmaps found with it were written by us, dirty bits ahead of
 * data, and may be trusted as supersets after a crash. */
#define OVERLAY_EXT_OPEN 0x6e626476u /* "nbdv" */
#define REFCOUNT_MAX 0xffffu

struct refcounts {
  pthread_mutex_t lock;
  uint64_t *table; /* host order */
  uint64_t table_entries;
  uint8_t **blocks; /* per table entry: the block as on disk (16-bit big-endian counts), or NULL */
  uint64_t per_block; /* clusters one block counts */
  uint64_t end; /* first cluster index past everything allocated */
  uint64_t *free; /* refcount 0 on disk, reusable */
  size_t nfree, free_cap;
  uint64_t *reserved; /* refcount 1 on disk and synced, not yet in use */
  size_t nreserved, reserved_cap;
  unsigned batch; /* clusters reserved at once, grows to RESERVE_MAX */
  bool full_reported;
};

struct dirty_bitmap {
  char *name;
  unsigned granularity_bits;
  uint64_t granules;
  uint8_t *bits; /* bit n is bit n % 8 of byte n / 8, as on disk */
  uint64_t *table; /* entries, host order: 0 all clear, 1 all set, or a data cluster */
  uint32_t table_size;
  uint64_t table_offset;
  uint32_t table_clusters;
  uint32_t flags; /* as written in the directory while we run */
  pthread_mutex_t lock;
};

struct qcow2_overlay {
  struct qcow2_chain *chain; /* top: the overlay, opened read-write; below it the base */
  struct layer *top;
  int fd;
  uint64_t size, cluster_size;
  unsigned cluster_bits, l2_bits;
  uint64_t l2_entries;
  bool recovered;

  pthread_rwlock_t stripes[OVERLAY_STRIPES];

  /* L1 (top->l1, host order) and the L2 tables in memory. */
  pthread_rwlock_t meta;
  pthread_mutex_t l2_load_lock;
  uint64_t **l2; /* per L1 entry; published with release stores */
  bool *l2_dirty; /* table changed since the last flush */
  bool *l1_dirty;
  uint64_t *pending_free; /* clusters unreferenced since the last flush */
  size_t npending, pending_cap;
  pthread_mutex_t flush_lock;

  struct refcounts rc;

  struct dirty_bitmap *bitmaps; /* the ones served */
  size_t nbitmaps;
  /* The bitmap directory as last written (every bitmap of the file). */
  uint64_t dir_offset, dir_size;
  uint32_t dir_count;
};

/* ---- file writes (overlay.c) ---- */
int write_at(int fd, const void *buf, size_t count, uint64_t offset);
int sync_file(struct qcow2_overlay *ov);
void put_be16(uint8_t *p, uint16_t v);
void put_be32(uint8_t *p, uint32_t v);
void put_be64(uint8_t *p, uint64_t v);
/* Rewrites the header cluster: bitmaps extension from the directory at
 * (offset, size, count), our "open" extension when `open`. */
int write_header(struct qcow2_overlay *ov, uint64_t dir_offset, uint64_t dir_size, uint32_t count,
                 bool open);
/* Whether the header cluster holds an extension of this type. */
bool has_extension(struct qcow2_overlay *ov, uint32_t type);

/* ---- refcounts and allocation (refcount.c) ---- */
int refcounts_load(struct qcow2_overlay *ov);
void refcounts_free(struct refcounts *rc);
/* A cluster whose refcount of 1 is already on disk: the caller points
 * metadata at it.  Host offset, or 0 with errno-style *err. */
uint64_t alloc_cluster(struct qcow2_overlay *ov, int *err);
/* n contiguous clusters (tables), refcounts written and synced. */
uint64_t alloc_contiguous(struct qcow2_overlay *ov, uint64_t n, int *err);
/* Refcount to 0 (the metadata that used the cluster is on disk already). */
int release_cluster(struct qcow2_overlay *ov, uint64_t host);
/* At a clean close: reserved clusters nobody used go back to 0. */
int refcounts_return_reserved(struct qcow2_overlay *ov);
uint16_t refcount_of(struct qcow2_overlay *ov, uint64_t cluster_index);
/* After an unclean stop: clusters counted but referenced by nothing
 * (the crash's leaks) are freed.  Done before anything is allocated. */
int refcounts_reclaim_leaks(struct qcow2_overlay *ov);

/* ---- the data path (write.c) ---- */
int l2_init(struct qcow2_overlay *ov);
void l2_free(struct qcow2_overlay *ov);
/* Forgets a cluster after its last reference is gone: freed at the next flush. */
int defer_free(struct qcow2_overlay *ov, uint64_t host);

/* ---- bitmaps (dirty.c) ---- */
int bitmaps_prepare(struct qcow2_overlay *ov, const struct qcow2_overlay_options *o);
/* Writes the directory (bitmaps in use while `running`) and the header. */
int bitmaps_write_directory(struct qcow2_overlay *ov, bool running);
/* Marks [offset, offset+count) dirty in every bitmap, on disk first. */
int bitmaps_mark(struct qcow2_overlay *ov, uint64_t offset, uint64_t count);
void bitmaps_release(struct qcow2_overlay *ov);

/* ---- a new image (create.c) ---- */
int overlay_create(const struct qcow2_overlay_options *o);

#endif /* NBDSERVE_QCOW2_OVERLAY_INTERNAL_H */
