/* dirty-bitmap-overlay plugin: what its two files share.  The main file
 * maps NBD calls onto the overlay; checkpoints.c keeps the live
 * checkpoints and their control commands.
 *
 * The live overlay changes at a checkpoint: every data call holds
 * `chain_lock` shared while it uses `live` (or a checkpoint's overlay),
 * a checkpoint or a release holds it exclusively for the moment it
 * switches layers.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_DIRTY_BITMAP_OVERLAY_PLUGIN_H
#define NBDSERVE_DIRTY_BITMAP_OVERLAY_PLUGIN_H

#include <pthread.h>
#include <stdbool.h>

#include "qcow2/overlay.h"

#define NAME "dirty-bitmap-overlay"

extern pthread_rwlock_t chain_lock;
extern struct qcow2_overlay *live;
extern char *overlay_path;

/* A checkpoint: its frozen layer, served read-only as export "@NAME". */
struct checkpoint {
  char *name;
  char *path; /* OVERLAY@NAME */
  struct qcow2_overlay *ov;
  unsigned connections; /* open on its export */
  bool released; /* no longer listed; its layer waits to be merged into the one above */
  bool merged; /* its layer is out of the chain: closed with its last connection */
};

/* The checkpoint layers below the overlay at start-up (oldest first),
 * opened frozen; stale files of interrupted checkpoints are removed.
 * 0 or -1 (logged). */
int checkpoints_open(void);
void checkpoints_close(void);
int checkpoints_register_commands(void);
/* Export "@NAME": the checkpoint with a connection more, or NULL. */
struct checkpoint *checkpoint_get(const char *export_name);
void checkpoint_put(struct checkpoint *ck);
/* Calls fn for each checkpoint still listed. */
void checkpoints_each(void (*fn)(const struct checkpoint *ck, void *opaque), void *opaque);
/* The bitmap that records now, which a checkpoint ends: the newest
 * checkpoint's (as the overlay's header records it), else the first
 * bitmap=; NULL when none is served.  Changed only by a checkpoint. */
extern char *recording;

#endif
