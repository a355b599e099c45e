/* nbdserve rbd plugin: what its two halves share.
 *
 * rbd.c: parameters, the cluster connection, the image handles,
 * capabilities.  status.c: block status.  ops.c: the data path,
 * librbd's asynchronous calls finished through the server's waiting
 * mechanism.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_RBD_H
#define NBDSERVE_RBD_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <rbd/librbd.h>

struct nbdserve_extents;

/* One librbd handle on the image, shared by every connection that opened
 * it the same way (read-write, or read-only): one cache, one flush, one
 * exclusive lock for the whole process. */
struct image {
  rbd_image_t rbd;
  bool readonly;
  uint64_t features;
  bool has_parent; /* a clone: zeroing may have to copy up from the parent */
  /* Block status (status.c): */
  uint64_t object_size; /* 0 when striping makes objects not contiguous */
  uint64_t nobjects; /* objects covered by known_data */
  uint64_t *known_data; /* bit per object: held data when last asked (atomic) */
  struct known_holes *holes; /* what recent walks found empty */
};

#define RBD_BITMAP_PREFIX "qemu:dirty-bitmap:"

struct op;

/* One connection. */
struct handle {
  struct image *img;
  bool readonly;
  pthread_mutex_t lock;
  pthread_cond_t changed; /* an operation finished */
  struct op *ops; /* started and not yet forgotten, newest first */
  unsigned running; /* operations librbd has not finished */
  unsigned answered; /* kept answers of reads and writes */
};

enum op_kind { OP_READ, OP_WRITE, OP_FLUSH, OP_TRIM, OP_ZERO };

int rbd_ops_pread(struct handle *h, void *buf, uint32_t count, uint64_t offset);
int rbd_ops_pwrite(struct handle *h, const void *buf, uint32_t count, uint64_t offset,
                   uint32_t flags);
int rbd_ops_flush(struct handle *h);
int rbd_ops_trim(struct handle *h, uint64_t count, uint64_t offset, uint32_t flags);
int rbd_ops_zero(struct handle *h, uint64_t count, uint64_t offset, uint32_t flags);
/* Wait for every operation of H still in librbd's hands, then forget
 * them all (close). */
void rbd_ops_drain(struct handle *h);

/* An errno from Ceph as an errno of the NBD set, logging (once for a
 * run of the same failure) what failed and why.  WHAT names the
 * operation ("read", "write"...). */
int rbd_report_error(const char *what, uint64_t count, uint64_t offset, int err);
/* A request succeeded: after failures, say once that they stopped. */
void rbd_report_success(void);

/* The image as messages name it: POOL/[NAMESPACE/]IMAGE[@SNAP]. */
const char *rbd_image_label(void);
/* Is a writable handle on the image open in this server? */
bool rbd_writable_image_open(void);

/* status.c: block status. */
void rbd_status_open(struct image *img); /* learn the layout; nothing known yet */
void rbd_status_close(struct image *img);
void rbd_status_stop(void); /* the look-ahead thread, before the images close */
/* The range no longer holds data for sure (trim, zero). */
void rbd_forget_data(struct image *img, uint64_t offset, uint64_t count);
/* A write that may turn a hole into data starts, or is done. */
void rbd_note_write(void);
int rbd_extents(void *handle, uint64_t count, uint64_t offset, uint32_t flags,
                struct nbdserve_extents *extents);
int rbd_meta_extents(void *handle, const char *context, uint64_t count, uint64_t offset,
                     uint32_t flags, struct nbdserve_extents *extents);

#endif /* NBDSERVE_RBD_H */
