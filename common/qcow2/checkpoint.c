/* qcow2 overlay: checkpoints.  Freezing an overlay into a checkpoint's
 * layer, undoing that, reading what a frozen layer records, and the
 * bookkeeping of a chain that loses a layer when a checkpoint is
 * released (the copying itself is in write.c, beside the data path).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "overlay-internal.h"

int qcow2_overlay_create(const struct qcow2_overlay_options *options)
{
  return overlay_create(options);
}

int qcow2_overlay_freeze(struct qcow2_overlay *ov, const char *bitmap, uint64_t time, const char *new_path)
{
  char *name = strdup(bitmap), *path = strdup(new_path);
  if (name == NULL || path == NULL) {
    free(name);
    free(path);
    return -ENOMEM;
  }
  int r = qcow2_overlay_flush(ov);
  if (r == 0)
    r = refcounts_return_reserved(ov);
  if (r < 0) {
    free(name);
    free(path);
    return r;
  }
  free(ov->checkpoint_bitmap);
  ov->checkpoint_bitmap = name;
  ov->checkpoint_time = time;
  /* Bitmaps consistent, no "open" mark, the checkpoint recorded. */
  r = bitmaps_write_directory(ov, false);
  if (r == 0)
    r = sync_file(ov);
  if (r < 0) {
    free(path);
    free(ov->checkpoint_bitmap);
    ov->checkpoint_bitmap = NULL;
    return r;
  }
  free(ov->top->path);
  ov->top->path = path;
  ov->frozen = true;
  return 0;
}

int qcow2_overlay_set_path(struct qcow2_overlay *ov, const char *path)
{
  char *copy = strdup(path);
  if (copy == NULL)
    return -ENOMEM;
  free(ov->top->path);
  ov->top->path = copy;
  return 0;
}

int qcow2_overlay_thaw(struct qcow2_overlay *ov)
{
  free(ov->checkpoint_bitmap);
  ov->checkpoint_bitmap = NULL;
  ov->frozen = false;
  int r = bitmaps_write_directory(ov, true);
  return r < 0 ? r : sync_file(ov);
}

int qcow2_overlay_mark_released(struct qcow2_overlay *ov)
{
  if (ov->checkpoint_bitmap == NULL)
    return -EINVAL;
  ov->checkpoint_released = true;
  int r = write_header(ov, ov->dir_offset, ov->dir_size, ov->dir_count, false);
  return r < 0 ? r : sync_file(ov);
}

bool qcow2_overlay_checkpoint_released(const struct qcow2_overlay *ov)
{
  return ov->checkpoint_released;
}

int qcow2_overlay_checkpoint_info(const struct qcow2_overlay *ov, const char **bitmap, uint64_t *time)
{
  if (ov->checkpoint_bitmap == NULL)
    return -ENOENT;
  *bitmap = ov->checkpoint_bitmap;
  *time = ov->checkpoint_time;
  return 0;
}

const char *qcow2_overlay_backing_qcow2(const struct qcow2_overlay *ov)
{
  const struct layer *below = ov->top->backing;
  return below && below->is_qcow2 ? below->path : NULL;
}

uint64_t qcow2_overlay_file_bytes(const struct qcow2_overlay *ov)
{
  struct stat st;
  return fstat(ov->fd, &st) == 0 ? (uint64_t) st.st_blocks * 512 : 0;
}

int qcow2_overlay_forget_below(struct qcow2_overlay *ov, const char *above, const char *gone)
{
  for (struct layer *l = ov->top; l && l->backing; l = l->backing) {
    if (strcmp(l->path, above) != 0 || strcmp(l->backing->path, gone) != 0)
      continue;
    /* The layer above absorbed the gone one: its L1 table and cached
     * slices are read again, then the gone layer leaves the chain. */
    int r = load_l1(l, l->l1_size, l->l1_offset, l->size, "L1 table");
    if (r < 0)
      return -EIO;
    cache_forget(&ov->chain->cache, l->cache_id);
    struct layer *g = l->backing;
    l->backing = g->backing;
    g->backing = NULL;
    free_layer(g);
    unsigned depth = 0;
    for (struct layer *k = ov->top; k; k = k->backing)
      k->depth = ++depth;
    ov->chain->depth = depth;
    return 0;
  }
  return 0;
}

void qcow2_overlay_drop_backing(struct qcow2_overlay *ov)
{
  struct layer *gone = ov->top->backing;
  if (gone == NULL)
    return;
  ov->top->backing = gone->backing;
  gone->backing = NULL;
  free_layer(gone); /* the caller keeps every other call out: nobody reads it now */
  unsigned depth = 1;
  for (struct layer *l = ov->top->backing; l; l = l->backing)
    l->depth = ++depth;
  ov->chain->depth = depth;
}
