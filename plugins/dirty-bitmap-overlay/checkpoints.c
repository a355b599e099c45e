/* dirty-bitmap-overlay plugin: live checkpoints.
 *
 * A checkpoint NAME freezes the overlay file as it is and renames it
 * OVERLAY@NAME; a new, empty overlay whose backing file is that layer
 * takes its name and the writes.  So the frozen export "@NAME" reads the
 * old layer, unchanged, while the live export goes on; the bitmap that
 * was recording ends its epoch there (served on "@NAME"), and a new
 * bitmap NAME records every write after it.  Every file is an ordinary
 * qcow2 image and the chain is the qcow2 backing chain, so a restart
 * finds the checkpoints again by following it.
 *
 * The switch: a new overlay is made beside it (OVERLAY.new, backed by
 * OVERLAY@NAME); then with every data call held out (chain_lock
 * exclusive) the overlay is flushed and frozen, hard-linked as
 * OVERLAY@NAME, the new overlay opened with its bitmaps (the others'
 * bits carried over, the recording bitmap named in its header), and
 * renamed over OVERLAY.  A crash at any point leaves either the old
 * overlay in place (the link and the new file are removed at the next
 * start) or the complete new one with the checkpoint below it.
 *
 * Releasing copies what the checkpoint's layer holds into the layer
 * above it (the next checkpoint's, or the live overlay) where that one
 * holds nothing, beside the writers — what any export reads does not
 * change — then points the layer above past it in every chain, and
 * deletes the file.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "nbdserve-plugin.h"
#include "overlay-plugin.h"

#define MAX_NAME 64

/* Oldest first.  The list and the connection counts change under
 * list_lock; commands run one at a time (the server's rule). */
static struct checkpoint **list;
static size_t count;
static pthread_mutex_t list_lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}

static char *checkpoint_path(const char *name)
{
  char *path;
  return asprintf(&path, "%s@%s", overlay_path, name) < 0 ? NULL : path;
}

/* The name of a checkpoint file of this overlay, or NULL. */
static const char *name_of(const char *path)
{
  size_t n = strlen(overlay_path);
  return strncmp(path, overlay_path, n) == 0 && path[n] == '@' && path[n + 1] ? path + n + 1 : NULL;
}

static void sync_dir(void)
{
  char *copy = strdup(overlay_path);
  int fd = copy ? open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
  if (fd != -1) {
    fsync(fd);
    close(fd);
  }
  free(copy);
}

char *recording;

static int merge_released(void);

static int append(struct checkpoint *ck)
{
  struct checkpoint **more = realloc(list, (count + 1) * sizeof *more);
  if (more == NULL)
    return -1;
  list = more;
  list[count++] = ck;
  return 0;
}

static void free_checkpoint(struct checkpoint *ck)
{
  if (ck->ov)
    qcow2_overlay_close(ck->ov);
  free(ck->name);
  free(ck->path);
  free(ck);
}

static bool in_list(const char *name)
{
  for (size_t i = 0; i < count; i++)
    if (strcmp(list[i]->name, name) == 0)
      return true;
  return false;
}

/* Files OVERLAY@NAME not in the chain (a checkpoint cut short, or one
 * released whose file was not yet deleted) and OVERLAY.new (a new
 * overlay not yet renamed) go. */
static void remove_stale(void)
{
  char *copy = strdup(overlay_path), *base_copy = strdup(overlay_path);
  const char *dir = copy ? dirname(copy) : NULL; /* dirname changes copy: once only */
  DIR *d = dir ? opendir(dir) : NULL;
  const char *base = base_copy ? basename(base_copy) : "";
  size_t n = strlen(base);
  for (struct dirent *e; d && (e = readdir(d));) {
    bool ck = strncmp(e->d_name, base, n) == 0 && e->d_name[n] == '@' && e->d_name[n + 1];
    bool fresh = strncmp(e->d_name, base, n) == 0 && strcmp(e->d_name + n, ".new") == 0;
    if ((ck && !in_list(e->d_name + n + 1)) || fresh) {
      char *path;
      if (asprintf(&path, "%s/%s", dir, e->d_name) >= 0) {
        nbdserve_debug(NAME ": removing %s, left by a checkpoint or release cut short", path);
        unlink(path);
        free(path);
      }
    }
  }
  if (d)
    closedir(d);
  free(copy);
  free(base_copy);
}

int checkpoints_open(void)
{
  struct checkpoint **found = NULL;
  size_t nfound = 0;
  struct qcow2_overlay *above = live;
  const char *below;
  while ((below = qcow2_overlay_backing_qcow2(above)) && name_of(below)) {
    struct checkpoint *ck = calloc(1, sizeof *ck);
    struct checkpoint **more = realloc(found, (nfound + 1) * sizeof *more);
    if (ck == NULL || more == NULL)
      return -1;
    found = more;
    found[nfound++] = ck;
    ck->name = strdup(name_of(below));
    ck->path = strdup(below);
    struct qcow2_overlay_options o = {.path = ck->path, .frozen = true};
    if (ck->name == NULL || ck->path == NULL || (ck->ov = qcow2_overlay_open(&o)) == NULL) {
      nbdserve_error(NAME ": cannot open checkpoint %s", below);
      return -1;
    }
    ck->released = qcow2_overlay_checkpoint_released(ck->ov);
    above = ck->ov;
  }
  for (size_t i = nfound; i-- > 0;)
    if (append(found[i]) < 0)
      return -1;
  free(found);
  for (size_t i = 0; i < count; i++)
    nbdserve_debug(NAME ": checkpoint '%s' served as export @%s", list[i]->name, list[i]->name);
  remove_stale();
  return merge_released() < 0 ? -1 : 0; /* releases a crash interrupted */
}

void checkpoints_close(void)
{
  free(recording);
  recording = NULL;
  for (size_t i = 0; i < count; i++)
    free_checkpoint(list[i]);
  free(list);
  list = NULL;
  count = 0;
}

/* ---- Connections to "@NAME" ------------------------------------------------- */

struct checkpoint *checkpoint_get(const char *export_name)
{
  struct checkpoint *found = NULL;
  pthread_mutex_lock(&list_lock);
  for (size_t i = 0; export_name[0] == '@' && i < count; i++)
    if (!list[i]->released && strcmp(list[i]->name, export_name + 1) == 0) {
      found = list[i];
      found->connections++;
    }
  pthread_mutex_unlock(&list_lock);
  return found;
}

void checkpoint_put(struct checkpoint *ck)
{
  pthread_mutex_lock(&list_lock);
  bool last = --ck->connections == 0 && ck->merged;
  pthread_mutex_unlock(&list_lock);
  if (last)
    free_checkpoint(ck); /* merged: its layer is gone from every chain */
}

void checkpoints_each(void (*fn)(const struct checkpoint *ck, void *opaque), void *opaque)
{
  pthread_mutex_lock(&list_lock);
  for (size_t i = 0; i < count; i++)
    if (!list[i]->released)
      fn(list[i], opaque);
  pthread_mutex_unlock(&list_lock);
}

/* ---- dirty-bitmap-overlay.checkpoint name=NEW ---------------------------- */

static const char *arg(int argc, const char *const *keys, const char *const *values, const char *key)
{
  for (int i = 0; i < argc; i++)
    if (strcmp(keys[i], key) == 0)
      return values[i];
  return NULL;
}

static bool valid_name(const char *name)
{
  size_t n = strlen(name);
  if (n == 0 || n > MAX_NAME || name[0] == '.')
    return false;
  for (size_t i = 0; i < n; i++)
    if (!(name[i] >= 'a' && name[i] <= 'z') && !(name[i] >= 'A' && name[i] <= 'Z') &&
        !(name[i] >= '0' && name[i] <= '9') && name[i] != '-' && name[i] != '_' && name[i] != '.')
      return false;
  return true;
}

static ssize_t bitmap_index(const struct qcow2_overlay *ov, const char *name)
{
  for (size_t i = 0; i < qcow2_overlay_bitmap_count(ov); i++)
    if (strcmp(qcow2_overlay_bitmap_name(ov, i), name) == 0)
      return (ssize_t) i;
  return -1;
}

/* The new overlay: recording NEW (with the ended bitmap's granularity)
 * and carrying on every other bitmap served, with its bits. */
static struct qcow2_overlay *open_next(struct qcow2_overlay *old, const char *path, const char *new_name,
                                       const char *ended)
{
  size_t n = qcow2_overlay_bitmap_count(old), k = 0;
  const char **names = calloc(n + 1, sizeof *names);
  uint64_t *grains = calloc(n + 1, sizeof *grains);
  struct qcow2_overlay *ov = NULL;
  if (names == NULL || grains == NULL)
    goto out;
  names[k] = new_name;
  grains[k++] = qcow2_overlay_bitmap_granularity(old, (size_t) bitmap_index(old, ended));
  for (size_t i = 0; i < n; i++)
    if (strcmp(qcow2_overlay_bitmap_name(old, i), ended) != 0) {
      names[k] = qcow2_overlay_bitmap_name(old, i);
      grains[k++] = qcow2_overlay_bitmap_granularity(old, i);
    }
  struct qcow2_overlay_options o = {.path = path, .bitmaps = names, .nbitmaps = k,
                                    .granularities = grains};
  ov = qcow2_overlay_open(&o);
  for (size_t i = 1; ov && i < k; i++)
    if (qcow2_overlay_bitmap_seed(ov, i, old, (size_t) bitmap_index(old, names[i])) < 0) {
      nbdserve_error(NAME ": carrying bitmap '%s' over to the new overlay failed", names[i]);
      qcow2_overlay_close(ov);
      ov = NULL;
    }
out:
  free(names);
  free(grains);
  return ov;
}

/* The new overlay, made before the writes are held: empty, its backing
 * file the checkpoint's layer-to-be, by name. */
static char *make_next(struct checkpoint *ck, struct nbdserve_reply *reply)
{
  char *fresh;
  if (asprintf(&fresh, "%s.new", overlay_path) < 0)
    return NULL;
  unlink(fresh);
  pthread_rwlock_rdlock(&chain_lock);
  struct qcow2_overlay_options o = {.path = fresh, .base = ck->path, .base_format = "qcow2",
                                    .size = qcow2_overlay_size(live),
                                    .cluster_size = qcow2_overlay_cluster_size(live)};
  int r = qcow2_overlay_create(&o);
  /* Most of what the checkpoint's flush must sync, synced now. */
  if (r == 0)
    qcow2_overlay_flush(live);
  pthread_rwlock_unlock(&chain_lock);
  if (r < 0) {
    nbdserve_reply_error(reply, "creating the new overlay failed");
    free(fresh);
    return NULL;
  }
  return fresh;
}

/* With every data call held out: the switch described at the top. */
static int switch_layers(struct checkpoint *ck, const char *ended, const char *fresh,
                         struct nbdserve_reply *reply)
{
  struct qcow2_overlay *old = live, *next = NULL;
  int r = qcow2_overlay_freeze(old, ended, (uint64_t) time(NULL), ck->path);
  if (r < 0) {
    nbdserve_reply_error(reply, "flushing the overlay failed: %s", strerror(-r));
    return -1;
  }
  const char *step = "linking the checkpoint";
  if (link(overlay_path, ck->path) == -1)
    goto thaw;
  /* The new overlay is complete — bitmaps, their bits, the recording
   * bitmap named — before it takes the overlay's name. */
  step = "opening the new overlay";
  next = open_next(old, fresh, ck->name, ended);
  if (next == NULL || qcow2_overlay_set_recording(next, ck->name) < 0)
    goto unlink;
  step = "renaming the new overlay";
  if (rename(fresh, overlay_path) == -1)
    goto unlink;
  sync_dir();
  qcow2_overlay_set_path(next, overlay_path);
  ck->ov = old;
  live = next;
  return 0;
unlink:
  if (next)
    qcow2_overlay_close(next);
  unlink(ck->path);
thaw:
  qcow2_overlay_thaw(old);
  nbdserve_reply_error(reply, "%s failed: %m", step);
  return -1;
}

static int cmd_checkpoint(int argc, const char *const *keys, const char *const *values,
                          struct nbdserve_reply *reply)
{
  const char *name = arg(argc, keys, values, "name");
  if (name == NULL || !valid_name(name)) {
    nbdserve_reply_error(reply, "give name=NAME: 1 to %d of [A-Za-z0-9._-], not starting with '.'",
                         MAX_NAME);
    return -1;
  }
  const char *ended = recording;
  if (ended == NULL) {
    nbdserve_reply_error(reply, "no bitmap records writes (start the server with bitmap=NAME)");
    return -1;
  }
  pthread_rwlock_rdlock(&chain_lock);
  bool clash = in_list(name) || bitmap_index(live, name) >= 0;
  pthread_rwlock_unlock(&chain_lock);
  struct checkpoint *ck = calloc(1, sizeof *ck);
  struct stat st;
  if (ck == NULL || (ck->name = strdup(name)) == NULL || (ck->path = checkpoint_path(name)) == NULL) {
    nbdserve_reply_error(reply, "out of memory");
    goto fail;
  }
  if (clash || lstat(ck->path, &st) == 0) {
    nbdserve_reply_error(reply, "'%s' names a checkpoint or a bitmap already", name);
    goto fail;
  }
  char *ended_copy = strdup(ended);
  char *fresh = ended_copy ? make_next(ck, reply) : NULL;
  uint64_t start = now_ns();
  pthread_rwlock_wrlock(&chain_lock);
  int r = fresh ? switch_layers(ck, ended_copy, fresh, reply) : -1;
  pthread_rwlock_unlock(&chain_lock);
  uint64_t held = now_ns() - start;
  if (fresh && r < 0)
    unlink(fresh);
  free(fresh);
  if (r < 0) {
    free(ended_copy);
    goto fail;
  }
  pthread_mutex_lock(&list_lock);
  r = append(ck);
  pthread_mutex_unlock(&list_lock);
  if (r < 0) { /* cannot happen but by lack of memory: the checkpoint is on disk, found at restart */
    nbdserve_reply_error(reply, "out of memory");
    free(ended_copy);
    return -1;
  }
  char *now_recording = strdup(name);
  if (now_recording) {
    free(recording);
    recording = now_recording;
  }
  nbdserve_debug(NAME ": checkpoint '%s' taken; bitmap '%s' ended there; writes held %.3f ms",
                 name, ended_copy, held / 1e6);
  nbdserve_reply_add(reply, "checkpoint", "%s", name);
  nbdserve_reply_add(reply, "export", "@%s", name);
  nbdserve_reply_add(reply, "ended-bitmap", "%s", ended_copy);
  nbdserve_reply_add(reply, "recording-bitmap", "%s", name);
  nbdserve_reply_add(reply, "writes-held-us", "%llu", (unsigned long long) (held / 1000));
  free(ended_copy);
  return 0;
fail:
  if (ck) {
    free(ck->name);
    free(ck->path);
    free(ck);
  }
  return -1;
}

/* ---- dirty-bitmap-overlay.checkpoints ----------------------------------------- */

static void describe(const struct checkpoint *ck, void *opaque)
{
  struct nbdserve_reply *reply = opaque;
  const char *bitmap = "";
  uint64_t when = 0;
  qcow2_overlay_checkpoint_info(ck->ov, &bitmap, &when);
  nbdserve_reply_add(reply, "checkpoint", "%s time=%llu bitmap=%s preserved=%llu connections=%u", ck->name,
                     (unsigned long long) when, bitmap,
                     (unsigned long long) qcow2_overlay_file_bytes(ck->ov), ck->connections);
}

static int cmd_checkpoints(int argc, const char *const *keys, const char *const *values,
                           struct nbdserve_reply *reply)
{
  (void) argc;
  (void) keys;
  (void) values;
  checkpoints_each(describe, reply);
  nbdserve_reply_add(reply, "recording-bitmap", "%s", recording ? recording : "");
  return 0;
}

/* ---- dirty-bitmap-overlay.release name=NAME -------------------------------------- */

/* Merges every released checkpoint's layer into the layer above it (the
 * next checkpoint's, or the live overlay), beside the writers, newest
 * first; takes it out of every chain and deletes its file.  Returns the
 * layers merged, or -errno. */
static int merge_one(size_t i)
{
  struct checkpoint *ck = list[i];
  struct checkpoint *next = i + 1 < count ? list[i + 1] : NULL;
  struct qcow2_overlay *above = next ? next->ov : live;
  pthread_rwlock_rdlock(&chain_lock);
  int r = qcow2_overlay_absorb_backing(above);
  pthread_rwlock_unlock(&chain_lock);
  if (r < 0) {
    nbdserve_error(NAME ": merging checkpoint '%s' into the layer above failed: %s", ck->name, strerror(-r));
    return r;
  }
  pthread_rwlock_wrlock(&chain_lock);
  qcow2_overlay_drop_backing(above);
  /* The chains above that read the layer through the one that absorbed it. */
  for (size_t j = i + 2; next && r == 0 && j < count; j++)
    r = qcow2_overlay_forget_below(list[j]->ov, next->path, ck->path);
  if (next && r == 0)
    r = qcow2_overlay_forget_below(live, next->path, ck->path);
  pthread_rwlock_unlock(&chain_lock);
  if (r < 0) {
    nbdserve_error(NAME ": re-reading the layers above checkpoint '%s' failed: %s", ck->name, strerror(-r));
    return r;
  }
  unlink(ck->path);
  sync_dir();
  nbdserve_debug(NAME ": checkpoint '%s' merged into %s, its file deleted", ck->name,
                 next ? next->path : overlay_path);
  pthread_mutex_lock(&list_lock);
  memmove(list + i, list + i + 1, (count - i - 1) * sizeof *list);
  count--;
  ck->merged = true;
  bool unused = ck->connections == 0;
  pthread_mutex_unlock(&list_lock);
  if (unused)
    free_checkpoint(ck);
  return 0;
}

static int merge_released(void)
{
  int merged = 0;
  for (;;) {
    pthread_mutex_lock(&list_lock);
    size_t i = count;
    while (i > 0 && !list[i - 1]->released)
      i--;
    pthread_mutex_unlock(&list_lock);
    if (i == 0)
      return merged;
    int r = merge_one(i - 1);
    if (r < 0)
      return r;
    merged++;
  }
}

static int cmd_release(int argc, const char *const *keys, const char *const *values,
                       struct nbdserve_reply *reply)
{
  const char *name = arg(argc, keys, values, "name");
  pthread_mutex_lock(&list_lock);
  struct checkpoint *ck = NULL;
  for (size_t i = 0; name && i < count; i++)
    if (!list[i]->released && strcmp(list[i]->name, name) == 0)
      ck = list[i];
  unsigned connections = ck ? ck->connections : 0;
  pthread_mutex_unlock(&list_lock);
  if (ck == NULL) {
    nbdserve_reply_error(reply, "no checkpoint named '%s'", name ? name : "");
    return -1;
  }
  int r = qcow2_overlay_mark_released(ck->ov); /* a restart finds it released too */
  if (r < 0) {
    nbdserve_reply_error(reply, "recording the release failed: %s", strerror(-r));
    return -1;
  }
  pthread_mutex_lock(&list_lock);
  ck->released = true; /* no new connection from now on */
  pthread_mutex_unlock(&list_lock);
  nbdserve_reply_add(reply, "released", "%s", name);
  nbdserve_reply_add(reply, "connections", "%u", connections);
  r = merge_released();
  if (r < 0) {
    nbdserve_reply_error(reply, "merging the checkpoint's layer failed: %s (the next start tries again)",
                         strerror(-r));
    return -1;
  }
  nbdserve_reply_add(reply, "layers-merged", "%d", r);
  return 0;
}

int checkpoints_register_commands(void)
{
  if (nbdserve_register_command("checkpoint", "name=NEW: freeze this instant as export @NEW, end the "
                                "recording bitmap's epoch there and record into bitmap NEW",
                                cmd_checkpoint) < 0 ||
      nbdserve_register_command("checkpoints", "list the checkpoints (name, time, ended bitmap, "
                                "bytes preserved)", cmd_checkpoints) < 0 ||
      nbdserve_register_command("release", "name=NAME: end checkpoint NAME's export and give its "
                                "preserved data back", cmd_release) < 0)
    return -1;
  return 0;
}
