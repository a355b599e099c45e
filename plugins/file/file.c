/* nbdserve file plugin: serve a file or block device, or every file in
 * a directory as its own export.
 *
 * Holes are real: trim punches them, zero prefers the cheapest way the
 * kernel offers (zero range, punch hole, BLKZEROOUT) and extents come
 * from SEEK_DATA/SEEK_HOLE.  Methods the file system refuses are
 * remembered per connection so they are not retried on every request.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "nbdserve-plugin.h"

static char *file_path; /* file= */
static char *dir_path; /* dir= */
static bool direct_io; /* cache=none */
static int fadvise_mode = POSIX_FADV_NORMAL;

struct handle {
  int fd;
  bool is_block;
  bool readonly;
  bool no_zero_range, no_punch_hole, no_zeroout, no_seek;
  uint32_t sector; /* alignment needed by O_DIRECT */
};

static int file_config(const char *key, const char *value)
{
  if (strcmp(key, "file") == 0 || strcmp(key, "dir") == 0) {
    char **dest = key[0] == 'f' ? &file_path : &dir_path;
    free(*dest);
    *dest = realpath(value, NULL);
    if (*dest == NULL) {
      nbdserve_error("file: %s=%s: %m", key, value);
      return -1;
    }
    return 0;
  }
  if (strcmp(key, "cache") == 0) {
    if (strcmp(value, "none") == 0)
      direct_io = true;
    else if (strcmp(value, "default") == 0)
      direct_io = false;
    else {
      nbdserve_error("file: cache=%s: use cache=default or cache=none", value);
      return -1;
    }
    return 0;
  }
  if (strcmp(key, "fadvise") == 0) {
    if (strcmp(value, "normal") == 0)
      fadvise_mode = POSIX_FADV_NORMAL;
    else if (strcmp(value, "random") == 0)
      fadvise_mode = POSIX_FADV_RANDOM;
    else if (strcmp(value, "sequential") == 0)
      fadvise_mode = POSIX_FADV_SEQUENTIAL;
    else {
      nbdserve_error("file: fadvise=%s: use normal, random or sequential", value);
      return -1;
    }
    return 0;
  }
  nbdserve_error("file: unknown parameter '%s' (see nbdserve --help file)", key);
  return -1;
}

static int file_config_complete(void)
{
  if ((file_path == NULL) == (dir_path == NULL)) {
    nbdserve_error("file: give exactly one of file=PATH or dir=DIR");
    return -1;
  }
  struct stat st;
  const char *path = file_path ? file_path : dir_path;
  if (stat(path, &st) == -1) {
    nbdserve_error("file: %s: %m", path);
    return -1;
  }
  if (file_path && !S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    nbdserve_error("file: %s is not a regular file or a block device", file_path);
    return -1;
  }
  if (dir_path && !S_ISDIR(st.st_mode)) {
    nbdserve_error("file: %s is not a directory", dir_path);
    return -1;
  }
  return 0;
}

static void file_unload(void)
{
  free(file_path);
  free(dir_path);
}

/* Usable exports of dir=: regular files and block devices, no dot files. */
static bool exportable(const char *name)
{
  if (name[0] == '.' || strchr(name, '/'))
    return false;
  char *path;
  if (asprintf(&path, "%s/%s", dir_path, name) < 0)
    return false;
  struct stat st;
  bool ok = stat(path, &st) == 0 && (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode));
  free(path);
  return ok;
}

static int compare_names(const void *a, const void *b)
{
  return strcmp(*(char *const *) a, *(char *const *) b);
}

static int file_list_exports(int readonly, int is_tls, struct nbdserve_exports *exports)
{
  (void) readonly, (void) is_tls;
  if (!dir_path)
    return nbdserve_add_export(exports, "", NULL);
  DIR *d = opendir(dir_path);
  if (d == NULL) {
    nbdserve_error("file: %s: %m", dir_path);
    return -1;
  }
  char **names = NULL;
  size_t n = 0;
  struct dirent *e;
  int r = 0;
  while ((e = readdir(d)) != NULL) {
    if (!exportable(e->d_name))
      continue;
    char **p = realloc(names, (n + 1) * sizeof *p);
    if (p == NULL || (p[n] = strdup(e->d_name)) == NULL) {
      names = p ? p : names;
      r = -1;
      break;
    }
    names = p;
    n++;
  }
  closedir(d);
  qsort(names, n, sizeof *names, compare_names);
  for (size_t i = 0; i < n; i++) {
    if (r == 0)
      r = nbdserve_add_export(exports, names[i], NULL);
    free(names[i]);
  }
  free(names);
  return r;
}

static void *file_open(int readonly, const char *export_name)
{
  char *path;
  if (dir_path) {
    if (export_name[0] == '\0' || !exportable(export_name)) {
      nbdserve_error("file: no export '%s' in %s", export_name, dir_path);
      nbdserve_set_error(ENOENT);
      return NULL;
    }
    if (asprintf(&path, "%s/%s", dir_path, export_name) < 0)
      return NULL;
  }
  else if ((path = strdup(file_path)) == NULL)
    return NULL;

  struct handle *h = calloc(1, sizeof *h);
  if (h == NULL) {
    free(path);
    return NULL;
  }
  int flags = O_CLOEXEC | (direct_io ? O_DIRECT : 0);
  h->readonly = readonly;
  h->fd = readonly ? -1 : open(path, O_RDWR | flags);
  if (h->fd == -1 && !readonly && (errno == EACCES || errno == EROFS || errno == EPERM))
    h->readonly = true; /* serve what we may: read-only */
  if (h->fd == -1)
    h->fd = open(path, O_RDONLY | flags);
  if (h->fd == -1) {
    nbdserve_error("file: %s: %m", path);
    free(path);
    free(h);
    return NULL;
  }
  struct stat st;
  fstat(h->fd, &st);
  h->is_block = S_ISBLK(st.st_mode);
  h->sector = 512;
  if (h->is_block) {
    int logical;
    if (ioctl(h->fd, BLKSSZGET, &logical) == 0 && logical > 0)
      h->sector = (uint32_t) logical;
  }
  if (fadvise_mode != POSIX_FADV_NORMAL)
    posix_fadvise(h->fd, 0, 0, fadvise_mode);
  free(path);
  return h;
}

static void file_close(void *handle)
{
  struct handle *h = handle;
  close(h->fd);
  free(h);
}

static int64_t file_get_size(void *handle)
{
  struct handle *h = handle;
  if (h->is_block) {
    uint64_t size;
    if (ioctl(h->fd, BLKGETSIZE64, &size) == -1)
      return -1;
    return (int64_t) size;
  }
  struct stat st;
  if (fstat(h->fd, &st) == -1)
    return -1;
  return st.st_size;
}

static int file_block_size(void *handle, uint32_t *minimum, uint32_t *preferred,
                           uint32_t *maximum)
{
  struct handle *h = handle;
  *minimum = direct_io ? h->sector : 1;
  *preferred = 4096;
  *maximum = 32 * 1024 * 1024;
  return 0;
}

static int file_can_write(void *handle)
{
  return !((struct handle *) handle)->readonly;
}

static int return_one(void *handle)
{
  (void) handle;
  return 1;
}

static int file_can_fua(void *handle)
{
  (void) handle;
  return NBDSERVE_FUA_NATIVE;
}

static int file_can_cache(void *handle)
{
  (void) handle;
  return NBDSERVE_CACHE_NATIVE;
}

static int file_is_rotational(void *handle)
{
  struct handle *h = handle;
  struct stat st;
  if (fstat(h->fd, &st) == -1)
    return 0;
  dev_t dev = h->is_block ? st.st_rdev : st.st_dev;
  char path[128];
  snprintf(path, sizeof path, "/sys/dev/block/%u:%u/queue/rotational", major(dev), minor(dev));
  FILE *fp = fopen(path, "r");
  if (fp == NULL)
    return 0;
  int c = fgetc(fp);
  fclose(fp);
  return c == '1';
}

static int file_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  char *p = buf;
  (void) flags;
  while (count > 0) {
    ssize_t r = pread(h->fd, p, count, (off_t) offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0) {
      /* The file shrank under us: its old size is a lie now. */
      nbdserve_error("file: read past the end of the file at %llu", (unsigned long long) offset);
      nbdserve_set_error(EIO);
      return -1;
    }
    p += r;
    count -= (uint32_t) r;
    offset += (uint64_t) r;
  }
  return 0;
}

static int sync_if_fua(struct handle *h, uint32_t flags)
{
  if ((flags & NBDSERVE_FLAG_FUA) && fdatasync(h->fd) == -1)
    return -1;
  return 0;
}

static int file_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset,
                       uint32_t flags)
{
  struct handle *h = handle;
  const char *p = buf;
  while (count > 0) {
    ssize_t r = pwrite(h->fd, p, count, (off_t) offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    p += r;
    count -= (uint32_t) r;
    offset += (uint64_t) r;
  }
  return sync_if_fua(h, flags);
}

static int file_flush(void *handle, uint32_t flags)
{
  (void) flags;
  return fdatasync(((struct handle *) handle)->fd);
}

static bool unsupported(int err)
{
  return err == EOPNOTSUPP || err == ENOTSUP || err == ENOSYS || err == ENOTTY;
}

static int file_trim(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  if (h->is_block) {
    uint64_t range[2] = { offset, count };
    if (!h->no_zeroout && ioctl(h->fd, BLKDISCARD, range) == -1 && unsupported(errno))
      h->no_zeroout = true;
  }
  else if (!h->no_punch_hole &&
           fallocate(h->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t) offset,
                     (off_t) count) == -1) {
    if (!unsupported(errno))
      return -1;
    h->no_punch_hole = true; /* trim is advisory: ignoring it is correct */
  }
  return sync_if_fua(h, flags);
}

static int file_zero(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  if (h->is_block) {
    uint64_t range[2] = { offset, count };
    if (!h->no_zeroout) {
      if (ioctl(h->fd, BLKZEROOUT, range) == 0)
        return sync_if_fua(h, flags);
      if (!unsupported(errno))
        return -1;
      h->no_zeroout = true;
    }
  }
  else {
    if (!h->no_zero_range) {
      if (fallocate(h->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t) offset,
                    (off_t) count) == 0)
        return sync_if_fua(h, flags);
      if (!unsupported(errno))
        return -1;
      h->no_zero_range = true;
    }
    if ((flags & NBDSERVE_FLAG_MAY_TRIM) && !h->no_punch_hole) {
      /* A punched hole reads back as zeroes on Linux. */
      if (fallocate(h->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t) offset,
                    (off_t) count) == 0)
        return sync_if_fua(h, flags);
      if (!unsupported(errno))
        return -1;
      h->no_punch_hole = true;
    }
  }
  /* No fast way: the server writes zeroes instead, unless FAST_ZERO. */
  nbdserve_set_error(ENOTSUP);
  return -1;
}

static int file_cache(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  (void) flags;
  int err = posix_fadvise(h->fd, (off_t) offset, (off_t) count, POSIX_FADV_WILLNEED);
  if (err) {
    nbdserve_set_error(err);
    return -1;
  }
  return 0;
}

static int file_can_extents(void *handle)
{
  return !((struct handle *) handle)->is_block;
}

static int file_extents(void *handle, uint64_t count, uint64_t offset, uint32_t flags,
                        struct nbdserve_extents *extents)
{
  struct handle *h = handle;
  uint64_t end = offset + count;
  bool req_one = flags & NBDSERVE_FLAG_REQ_ONE;

  while (offset < end) {
    off_t data = h->no_seek ? (off_t) offset : lseek(h->fd, (off_t) offset, SEEK_DATA);
    if (data == -1 && errno == ENXIO)
      data = (off_t) end; /* only a hole is left up to EOF */
    else if (data == -1) {
      h->no_seek = true; /* no hole support: all data */
      return nbdserve_add_extent(extents, offset, end - offset, 0);
    }
    if ((uint64_t) data > offset) {
      uint64_t hole_end = (uint64_t) data < end ? (uint64_t) data : end;
      if (nbdserve_add_extent(extents, offset, hole_end - offset,
                              NBDSERVE_EXTENT_HOLE | NBDSERVE_EXTENT_ZERO) == -1)
        return -1;
      offset = hole_end;
      if (req_one)
        break;
      continue;
    }
    off_t hole = lseek(h->fd, (off_t) offset, SEEK_HOLE);
    if (hole == -1)
      hole = (off_t) end;
    uint64_t data_end = (uint64_t) hole < end ? (uint64_t) hole : end;
    if (data_end <= offset)
      data_end = end;
    if (nbdserve_add_extent(extents, offset, data_end - offset, 0) == -1)
      return -1;
    offset = data_end;
    if (req_one)
      break;
  }
  return 0;
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "file",
  .longname = "serve a file, block device or directory of files",
  .version = "0.1.0",
  .description = "Serves file=PATH (a regular file or block device), or every file in "
                 "dir=DIR as an export of its own name.",
  .config_help = "file=PATH       file or block device to serve\n"
                 "dir=DIR         serve every file in DIR as an export\n"
                 "cache=none      use O_DIRECT (default: cache=default)\n"
                 "fadvise=normal|random|sequential   access pattern hint",
  .magic_config_key = "file",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .config = file_config,
  .config_complete = file_config_complete,
  .unload = file_unload,
  .list_exports = file_list_exports,
  .open = file_open,
  .close = file_close,
  .get_size = file_get_size,
  .block_size = file_block_size,
  .can_write = file_can_write,
  .can_flush = return_one,
  .is_rotational = file_is_rotational,
  .can_trim = return_one,
  .can_zero = return_one,
  .can_fast_zero = return_one,
  .can_fua = file_can_fua,
  .can_multi_conn = return_one,
  .can_cache = file_can_cache,
  .can_extents = file_can_extents,
  .pread = file_pread,
  .pwrite = file_pwrite,
  .flush = file_flush,
  .trim = file_trim,
  .zero = file_zero,
  .cache = file_cache,
  .extents = file_extents,
};

NBDSERVE_REGISTER_PLUGIN(plugin)
