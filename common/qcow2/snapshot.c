/* qcow2 library: choosing an internal snapshot to serve.
 *
 * The snapshot table is read entry by entry, each bounded before it is
 * used.  A snapshot is found by its id first and then by its name, as
 * qemu-img does, so "1" means the snapshot whose id is 1 even when
 * another is named "1".  Serving it means reading through its L1 table
 * at its own virtual size; the active L1 table is never loaded.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

#define SNAPSHOT_FIXED 40 /* bytes of an entry before its extra data */
#define SNAPSHOT_MAX_EXTRA 1024

struct snapshot {
  uint64_t l1_offset;
  uint32_t l1_size;
  uint64_t disk_size; /* 0: not recorded (the image's size applies) */
  char *id, *name;
};

static void free_snapshots(struct snapshot *s, uint32_t n)
{
  for (uint32_t i = 0; i < n; i++) {
    free(s[i].id);
    free(s[i].name);
  }
  free(s);
}

static int read_snapshots(struct layer *l, uint32_t count, uint64_t offset, struct snapshot *out)
{
  uint64_t pos = offset, total = 0;
  uint8_t fixed[SNAPSHOT_FIXED];
  uint8_t *var = malloc(SNAPSHOT_MAX_EXTRA + 2 * 65535);
  if (var == NULL) {
    q_error("qcow2: out of memory");
    return -1;
  }
  int ret = -1;
  for (uint32_t i = 0; i < count; i++) {
    if (read_table(l, fixed, SNAPSHOT_FIXED, pos, "snapshot table") < 0)
      goto out;
    uint16_t id_len = get_be16(fixed + 12), name_len = get_be16(fixed + 14);
    uint32_t extra = get_be32(fixed + 36);
    if (extra > SNAPSHOT_MAX_EXTRA) {
      q_error("qcow2: %s: snapshot %u has %u bytes of extra data (at most %d)", l->path, i, extra,
              SNAPSHOT_MAX_EXTRA);
      goto out;
    }
    uint64_t var_len = (uint64_t) extra + id_len + name_len;
    if (read_table(l, var, var_len, pos + SNAPSHOT_FIXED, "snapshot table") < 0)
      goto out;
    out[i].l1_offset = get_be64(fixed);
    out[i].l1_size = get_be32(fixed + 8);
    out[i].disk_size = extra >= 16 ? get_be64(var + 8) : 0;
    out[i].id = strndup((const char *) var + extra, id_len);
    out[i].name = strndup((const char *) var + extra + id_len, name_len);
    if (out[i].id == NULL || out[i].name == NULL) {
      q_error("qcow2: out of memory");
      goto out;
    }
    uint64_t entry_len = (SNAPSHOT_FIXED + var_len + 7) & ~7ull;
    total += entry_len;
    pos += entry_len;
    if (total > QCOW2_MAX_TABLE_BYTES) {
      q_error("qcow2: %s: the snapshot table is larger than %u MiB", l->path, QCOW2_MAX_TABLE_BYTES >> 20);
      goto out;
    }
  }
  ret = 0;
out:
  free(var);
  return ret;
}

int snapshot_select(struct layer *l, uint32_t count, uint64_t offset, const char *want)
{
  if (count == 0) {
    q_error("qcow2: %s has no internal snapshots (snapshot=%s)", l->path, want);
    return -1;
  }
  if (count > QCOW2_MAX_SNAPSHOTS || offset % l->cluster_size || overlaps_header(l, offset)) {
    q_error("qcow2: %s: the snapshot table (%u entries at offset %" PRIu64 ") is malformed", l->path,
            count, offset);
    return -1;
  }
  struct snapshot *all = calloc(count, sizeof *all);
  if (all == NULL) {
    q_error("qcow2: out of memory");
    return -1;
  }
  int ret = -1;
  if (read_snapshots(l, count, offset, all) < 0)
    goto out;
  const struct snapshot *found = NULL;
  for (uint32_t i = 0; !found && i < count; i++)
    if (strcmp(all[i].id, want) == 0)
      found = &all[i];
  for (uint32_t i = 0; !found && i < count; i++)
    if (strcmp(all[i].name, want) == 0)
      found = &all[i];
  if (found == NULL) {
    char list[512] = "";
    size_t used = 0;
    for (uint32_t i = 0; i < count && used < sizeof list - 1; i++) {
      int n = snprintf(list + used, sizeof list - used, "%s%s (%s)", i ? ", " : "", all[i].id, all[i].name);
      used = n < 0 ? used : used + (size_t) n;
    }
    q_error("qcow2: %s: no snapshot has the id or name '%s'; the image has: %s", l->path, want, list);
    goto out;
  }
  uint64_t size = found->disk_size ? found->disk_size : l->size;
  if (size > (uint64_t) INT64_MAX) {
    q_error("qcow2: %s: snapshot '%s' has an invalid size %" PRIu64, l->path, want, size);
    goto out;
  }
  q_debug("qcow2: %s: serving snapshot %s (%s), %" PRIu64 " bytes", l->path, found->id, found->name, size);
  ret = load_l1(l, found->l1_size, found->l1_offset, size, "snapshot's L1 table");
out:
  free_snapshots(all, count);
  return ret;
}
