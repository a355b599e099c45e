/* nbdserve rbd plugin: what its two halves share.
 *
 * rbd.c: parameters, the cluster connection, the image handles,
 * capabilities, block status.  ops.c: the data path, librbd's
 * asynchronous calls finished through the server's waiting mechanism.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_RBD_H
#define NBDSERVE_RBD_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <rbd/librbd.h>

/* One librbd handle on the image, shared by every connection that opened
 * it the same way (read-write, or read-only): one cache, one flush, one
 * exclusive lock for the whole process. */
struct image {
  rbd_image_t rbd;
  bool readonly;
  uint64_t features;
  bool has_parent; /* a clone: zeroing may have to copy up from the parent */
  uint64_t object_size; /* 0 when striping makes objects not contiguous */
  uint64_t nobjects; /* objects covered by known_data */
  uint64_t *known_data; /* bit per object: held data when last asked (atomic) */
};

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

/* Objects [first, last] no longer known to hold data (trim, zero). */
void rbd_forget_data(struct image *img, uint64_t offset, uint64_t count);

#endif /* NBDSERVE_RBD_H */
