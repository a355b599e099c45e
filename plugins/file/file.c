/* nbdserve file plugin: serve a file or block device, or every file in
 * a directory as its own export.
 *
 * Holes are real: trim punches them, zero prefers the cheapest way the
 * kernel offers (zero range, punch hole, BLKZEROOUT) and extents come
 * from SEEK_DATA/SEEK_HOLE.  Methods the kernel refuses are remembered
 * per connection so they are not retried on every request.
 *
 * cache=none opens the file with O_DIRECT.  O_DIRECT needs the offset,
 * length and buffer aligned; requests that are not (aligned to 4 KiB,
 * the page size, so that direct and cached I/O never share a page) go
 * through a second, ordinary descriptor instead of failing.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "nbdserve-plugin.h"

#define DIRECT_ALIGN 4096 /* alignment of requests sent down the O_DIRECT path */

static char *file_path; /* file= */
static bool served_inline; /* file_never_blocks said yes: see check_still_in_ram */
static char *dir_path; /* dir= */
static bool want_direct; /* cache=none */
static int fadvise_mode = POSIX_FADV_NORMAL;

/* Methods the kernel refused for this handle's file.  Written and read by
 * concurrent requests, hence the atomic accesses (relaxed: a stale false
 * only costs one more refused syscall). */
enum method { NO_ZERO_RANGE, NO_PUNCH_HOLE, NO_ALLOCATE, NO_ZEROOUT, NO_DISCARD, NO_SEEK, METHODS };

struct handle {
  int fd; /* O_DIRECT with cache=none */
  int cached_fd; /* with cache=none, an ordinary descriptor for unaligned requests; else fd */
  bool is_block;
  bool readonly;
  bool direct; /* fd has O_DIRECT */
  bool fast_zeroout; /* block device with hardware WRITE_ZEROES */
  uint32_t sector; /* logical block size */
  bool refused[METHODS];
};

static bool is_refused(struct handle *h, enum method m)
{
  return __atomic_load_n(&h->refused[m], __ATOMIC_RELAXED);
}

static void set_refused(struct handle *h, enum method m)
{
  __atomic_store_n(&h->refused[m], true, __ATOMIC_RELAXED);
}

/* Errors that mean "this kernel or file system cannot do that". */
static bool unsupported(int err)
{
  return err == EOPNOTSUPP || err == ENOTSUP || err == ENOSYS || err == ENOTTY;
}

/* ---- Configuration -------------------------------------------------------- */

static int file_config(const char *key, const char *value)
{
  if (strcmp(key, "file") == 0 || strcmp(key, "dir") == 0) {
    char **dest = strcmp(key, "file") == 0 ? &file_path : &dir_path;
    free(*dest);
    /* Absolute, so the path still works after the server daemonizes. */
    *dest = realpath(value, NULL);
    if (*dest == NULL) {
      nbdserve_error("file: %s=%s: %m", key, value);
      return -1;
    }
    return 0;
  }
  if (strcmp(key, "cache") == 0) {
    if (strcmp(value, "none") == 0)
      want_direct = true;
    else if (strcmp(value, "default") == 0)
      want_direct = false;
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
  nbdserve_error("file: unknown parameter '%s' (the parameters are file, dir, cache and "
                 "fadvise)", key);
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

static const char *ram_fs_name(const struct statfs *fs)
{
  return fs->f_type == TMPFS_MAGIC ? "tmpfs" : fs->f_type == RAMFS_MAGIC ? "ramfs" : NULL;
}

/* A regular file on tmpfs or ramfs lives in RAM: reading and writing it
 * is a memory copy, like the memory plugin's, and flush has nothing to
 * wait for.  Its requests may then run on the connection's thread (see
 * NBDSERVE_PLUGIN_NEVER_BLOCKS), saving a thread hand-off per request.
 * Only file= is judged: with dir=, a symlink may lead to any disk. */
static int file_never_blocks(void)
{
  struct stat st;
  struct statfs fs;
  if (file_path == NULL || stat(file_path, &st) == -1 || !S_ISREG(st.st_mode) ||
      statfs(file_path, &fs) == -1)
    return 0;
  const char *ram_fs = ram_fs_name(&fs);
  if (ram_fs)
    nbdserve_debug("file: %s is in RAM (%s): requests need no worker threads", file_path, ram_fs);
  served_inline = ram_fs != NULL;
  return served_inline;
}

/* With requests on the connection thread, each open must find what
 * file_never_blocks judged: a regular file in RAM.  Someone may have put
 * a disk file, or a FIFO, at the path since.  (The caller opened it
 * with O_NONBLOCK, so a FIFO cannot hold up the open.) */
static bool check_still_in_ram(int fd, const char *path)
{
  struct stat st;
  struct statfs fs;
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && fstatfs(fd, &fs) == 0 && ram_fs_name(&fs))
    return true;
  nbdserve_error("file: %s is no longer a regular file in RAM, as it was at start-up; "
                 "restart the server to serve it", path);
  return false;
}

static void file_unload(void)
{
  free(file_path);
  free(dir_path);
}

/* ---- Exports (dir=) ---------------------------------------------------------- */

/* Exports of dir=: regular files and block devices directly in DIR (a
 * symlink counts as what it points to), no dot files, no paths. */
static bool exportable(const char *name)
{
  if (name[0] == '\0' || name[0] == '.' || strchr(name, '/'))
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

/* The exportable names in dir=, sorted; *count set.  NULL on error. */
static char **list_directory(size_t *count)
{
  DIR *d = opendir(dir_path);
  if (d == NULL) {
    nbdserve_error("file: %s: %m", dir_path);
    return NULL;
  }
  char **names = malloc(sizeof *names);
  size_t n = 0;
  struct dirent *e;
  while (names && (e = readdir(d)) != NULL) {
    if (!exportable(e->d_name))
      continue;
    char **more = realloc(names, (n + 2) * sizeof *more);
    char *copy = more ? strdup(e->d_name) : NULL;
    if (copy == NULL) {
      if (more)
        names = more;
      while (n > 0)
        free(names[--n]);
      free(names);
      names = NULL;
      break;
    }
    names = more;
    names[n++] = copy;
  }
  closedir(d);
  if (names == NULL) {
    nbdserve_error("file: out of memory listing %s", dir_path);
    errno = ENOMEM;
    return NULL;
  }
  qsort(names, n, sizeof *names, compare_names);
  *count = n;
  return names;
}

static int file_list_exports(int readonly, int is_tls, struct nbdserve_exports *exports)
{
  (void) readonly, (void) is_tls;
  if (dir_path == NULL)
    return nbdserve_add_export(exports, "", NULL);
  size_t n;
  char **names = list_directory(&n);
  if (names == NULL)
    return -1;
  int r = 0;
  for (size_t i = 0; i < n; i++) {
    if (r == 0)
      r = nbdserve_add_export(exports, names[i], NULL);
    free(names[i]);
  }
  free(names);
  return r;
}

/* ---- Connections ---------------------------------------------------------------- */

/* Open the sysfs queue attribute ATTR of the disk holding DEV, or NULL.
 * A partition has no queue of its own: it is the parent disk's. */
static FILE *open_queue_attr(dev_t dev, const char *attr)
{
  char path[160];
  snprintf(path, sizeof path, "/sys/dev/block/%u:%u/queue/%s", major(dev), minor(dev), attr);
  FILE *fp = fopen(path, "r");
  if (fp == NULL) {
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/../queue/%s", major(dev), minor(dev),
             attr);
    fp = fopen(path, "r");
  }
  return fp;
}

/* Whether the block device DEV does WRITE_ZEROES in hardware (then
 * BLKZEROOUT is fast; otherwise the kernel writes zero pages itself). */
static bool device_zeroes_fast(dev_t dev)
{
  FILE *fp = open_queue_attr(dev, "write_zeroes_max_bytes");
  if (fp == NULL)
    return false;
  unsigned long long max_bytes = 0;
  bool fast = fscanf(fp, "%llu", &max_bytes) == 1 && max_bytes > 0;
  fclose(fp);
  return fast;
}

/* Open PATH for the handle: read-write unless READONLY or the file may
 * not be written; O_DIRECT when cache=none and the file system allows. */
static int open_file(struct handle *h, const char *path, bool readonly)
{
  int flags = O_CLOEXEC | (want_direct ? O_DIRECT : 0) | (served_inline ? O_NONBLOCK : 0);
  h->readonly = readonly;
  for (;;) {
    int fd = open(path, (h->readonly ? O_RDONLY : O_RDWR) | flags);
    if (fd >= 0) {
      h->fd = fd;
      h->direct = flags & O_DIRECT;
      return 0;
    }
    if (!h->readonly && (errno == EACCES || errno == EROFS || errno == EPERM))
      h->readonly = true; /* serve what we may: read-only */
    else if ((flags & O_DIRECT) && errno == EINVAL) {
      static bool warned;
      if (!__atomic_exchange_n(&warned, true, __ATOMIC_RELAXED))
        nbdserve_error("file: %s: this file system does not support O_DIRECT "
                       "(cache=none); using the page cache instead", path);
      flags &= ~O_DIRECT;
    }
    else {
      nbdserve_error("file: %s: %m", path);
      return -1;
    }
  }
}

static void *file_open(int readonly, const char *export_name)
{
  char *path;
  if (dir_path) {
    if (!exportable(export_name)) {
      if (export_name[0] == '\0')
        nbdserve_error("file: dir=%s has no default export: ask for a file by name "
                       "(nbdinfo --list shows them)", dir_path);
      else
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
  if (h == NULL || open_file(h, path, readonly) == -1)
    goto fail;
  h->cached_fd = h->fd;
  if (h->direct) {
    h->cached_fd = open(path, (h->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC |
                        (served_inline ? O_NONBLOCK : 0));
    if (h->cached_fd == -1) {
      nbdserve_error("file: %s: %m", path);
      close(h->fd);
      goto fail;
    }
  }
  if (served_inline && (!check_still_in_ram(h->fd, path) ||
                        (h->cached_fd != h->fd && !check_still_in_ram(h->cached_fd, path)))) {
    nbdserve_set_error(EIO);
    goto fail_close;
  }

  struct stat st;
  if (fstat(h->fd, &st) == -1) {
    nbdserve_error("file: %s: %m", path);
    goto fail_close;
  }
  h->is_block = S_ISBLK(st.st_mode);
  h->sector = 512;
  if (h->is_block) {
    int logical;
    if (ioctl(h->fd, BLKSSZGET, &logical) == 0 && logical > 0)
      h->sector = (uint32_t) logical;
    h->fast_zeroout = device_zeroes_fast(st.st_rdev);
  }
  if (fadvise_mode != POSIX_FADV_NORMAL)
    posix_fadvise(h->cached_fd, 0, 0, fadvise_mode); /* a hint: failure is harmless */
  free(path);
  return h;

fail_close:
  if (h->cached_fd != h->fd)
    close(h->cached_fd);
  close(h->fd);
fail:
  free(h);
  free(path);
  return NULL;
}

static void file_close(void *handle)
{
  struct handle *h = handle;
  if (h->cached_fd != h->fd)
    close(h->cached_fd);
  close(h->fd);
  free(h);
}

/* ---- Capabilities ------------------------------------------------------------------ */

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
  /* With O_DIRECT, ask clients for whole sectors: smaller requests work
   * (through the page cache) but are slow.  A file whose size is not a
   * multiple of the sector keeps 1, or its tail could not be read. */
  int64_t size = file_get_size(handle);
  *minimum = h->direct && size >= 0 && size % h->sector == 0 ? h->sector : 1;
  *preferred = h->sector > 4096 ? h->sector : 4096;
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

/* Best effort: 1 if sysfs says the disk beneath spins. */
static int file_is_rotational(void *handle)
{
  struct handle *h = handle;
  struct stat st;
  if (fstat(h->fd, &st) == -1)
    return 0;
  dev_t dev = h->is_block ? st.st_rdev : st.st_dev;
  FILE *fp = open_queue_attr(dev, "rotational");
  if (fp == NULL)
    return 0;
  int c = fgetc(fp);
  fclose(fp);
  return c == '1';
}

/* ---- Reading and writing ----------------------------------------------------------- */

/* The descriptor for an I/O of COUNT bytes at OFFSET from/to BUF: the
 * O_DIRECT one only when everything is aligned for it. */
static int fd_for(const struct handle *h, const void *buf, uint64_t count, uint64_t offset)
{
  if (h->direct && ((offset | count | (uintptr_t) buf) & (DIRECT_ALIGN - 1)) == 0)
    return h->fd;
  return h->cached_fd;
}

static int file_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  int fd = fd_for(h, buf, count, offset);
  char *p = buf;
  (void) flags;
  while (count > 0) {
    ssize_t r = pread(fd, p, count, (off_t) offset);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1)
      return -1;
    if (r == 0) {
      /* The file shrank under us: zeroes would be a lie. */
      nbdserve_error("file: read past the end of the file at offset %llu",
                     (unsigned long long) offset);
      nbdserve_set_error(EIO);
      return -1;
    }
    p += r;
    count -= (uint32_t) r;
    offset += (uint64_t) r;
  }
  return 0;
}

/* FUA: make what was just written durable before replying. */
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
  int fd = fd_for(h, buf, count, offset);
  const char *p = buf;
  while (count > 0) {
    ssize_t r = pwrite(fd, p, count, (off_t) offset);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1)
      return -1;
    if (r == 0) { /* no progress and no error: do not spin */
      nbdserve_set_error(ENOSPC);
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

/* fallocate with MODE, remembering METHOD as refused if unsupported.
 * Returns 0 done, 1 unsupported (now or before), -1 a real error. */
static int try_fallocate(struct handle *h, enum method method, int mode, uint64_t count,
                         uint64_t offset)
{
  if (is_refused(h, method))
    return 1;
  if (fallocate(h->fd, mode, (off_t) offset, (off_t) count) == 0)
    return 0;
  if (!unsupported(errno))
    return -1;
  set_refused(h, method);
  return 1;
}

/* ioctl REQUEST on the range (block devices), likewise. */
static int try_range_ioctl(struct handle *h, enum method method, unsigned long request,
                           uint64_t count, uint64_t offset)
{
  if (is_refused(h, method))
    return 1;
  uint64_t range[2] = { offset, count };
  if (ioctl(h->fd, request, range) == 0)
    return 0;
  if (!unsupported(errno))
    return -1;
  set_refused(h, method);
  return 1;
}

/* Trim is advisory: when the file system cannot punch holes, doing
 * nothing is a correct answer. */
static int file_trim(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  int r;
  if (h->is_block) {
    /* Discard only whole logical blocks of the range. */
    uint64_t start = (offset + h->sector - 1) / h->sector * h->sector;
    uint64_t end = (offset + count) / h->sector * h->sector;
    r = end > start ? try_range_ioctl(h, NO_DISCARD, BLKDISCARD, end - start, start) : 0;
  }
  else
    r = try_fallocate(h, NO_PUNCH_HOLE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, count,
                      offset);
  if (r == -1)
    return -1;
  return sync_if_fua(h, flags);
}

/* Zero a range of a regular file.  0 done, 1 no fast way, -1 error. */
static int zero_regular_file(struct handle *h, uint64_t count, uint64_t offset, uint32_t flags)
{
  int r = try_fallocate(h, NO_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, count,
                        offset);
  if (r != 1)
    return r;
  /* A punched hole reads back as zeroes (Linux guarantees it). */
  r = try_fallocate(h, NO_PUNCH_HOLE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, count, offset);
  if (r != 0 || (flags & NBDSERVE_FLAG_MAY_TRIM))
    return r;
  /* The client asked for no hole (NO_HOLE): provision the range again.
   * Failing that (say ENOSPC) is reported; a file system that cannot
   * allocate ahead at all cannot honour NO_HOLE anyway. */
  return try_fallocate(h, NO_ALLOCATE, FALLOC_FL_KEEP_SIZE, count, offset) == -1 ? -1 : 0;
}

/* Zero a range of a block device.  0 done, 1 no fast way, -1 error. */
static int zero_block_device(struct handle *h, uint64_t count, uint64_t offset, uint32_t flags)
{
  if ((offset | count) & (h->sector - 1))
    return 1; /* the ioctls take whole logical blocks only */
  int r;
  if (flags & NBDSERVE_FLAG_MAY_TRIM) {
    /* On a block device this zeroes by unmapping, and fails rather than
     * falling back to writing zeroes. */
    r = try_fallocate(h, NO_PUNCH_HOLE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, count,
                      offset);
    if (r != 1)
      return r;
  }
  /* BLKZEROOUT writes zero pages itself when the device cannot zero. */
  if ((flags & NBDSERVE_FLAG_FAST_ZERO) && !h->fast_zeroout)
    return 1;
  return try_range_ioctl(h, NO_ZEROOUT, BLKZEROOUT, count, offset);
}

static int file_zero(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  int r = h->is_block ? zero_block_device(h, count, offset, flags)
                      : zero_regular_file(h, count, offset, flags);
  if (r == -1)
    return -1;
  if (r == 1) {
    /* No fast way.  The server then writes zeroes through pwrite, or
     * fails the request when the client asked for FAST_ZERO. */
    nbdserve_set_error(ENOTSUP);
    return -1;
  }
  return sync_if_fua(h, flags);
}

static int file_cache(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  (void) flags;
  int err = posix_fadvise(h->cached_fd, (off_t) offset, (off_t) count, POSIX_FADV_WILLNEED);
  if (err) {
    nbdserve_set_error(err);
    return -1;
  }
  return 0;
}

/* ---- Extents -------------------------------------------------------------------------- */

static int file_can_extents(void *handle)
{
  /* Block devices have no SEEK_DATA: the server reports all data. */
  return !((struct handle *) handle)->is_block;
}

/* A file with as many blocks as bytes has no holes to find.  Looking
 * anyway is not free: on tmpfs, SEEK_HOLE in a file without holes walks
 * every page to the end of the file, on every call.  (Blocks of file
 * system metadata may hide a small hole here; the hole is then reported
 * as data, which is always a correct answer.) */
static bool fully_allocated(int fd)
{
  struct stat st;
  return fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
         (uint64_t) st.st_blocks * 512 >= (uint64_t) st.st_size;
}

static int file_extents(void *handle, uint64_t count, uint64_t offset, uint32_t flags,
                        struct nbdserve_extents *extents)
{
  struct handle *h = handle;
  uint64_t end = offset + count;
  (void) flags; /* REQ_ONE: the builder stops after one extent */

  if (is_refused(h, NO_SEEK) || fully_allocated(h->fd))
    return nbdserve_add_extent(extents, offset, count, 0);

  while (offset < end) {
    uint64_t stop;
    uint64_t type = 0;
    off_t data = lseek(h->fd, (off_t) offset, SEEK_DATA);
    if (data == -1 && errno != ENXIO) {
      set_refused(h, NO_SEEK); /* no hole support here: all data */
      return nbdserve_add_extent(extents, offset, end - offset, 0);
    }
    if (data == -1 || (uint64_t) data > offset) {
      /* A hole up to the next data, or to the end when ENXIO says
       * there is no more data. */
      stop = data == -1 || (uint64_t) data > end ? end : (uint64_t) data;
      type = NBDSERVE_EXTENT_HOLE | NBDSERVE_EXTENT_ZERO;
    }
    else {
      off_t hole = lseek(h->fd, (off_t) offset, SEEK_HOLE);
      stop = hole == -1 || (uint64_t) hole > end || (uint64_t) hole <= offset ? end
                                                                             : (uint64_t) hole;
    }
    if (nbdserve_add_extent(extents, offset, stop - offset, type) == -1)
      return -1;
    if (nbdserve_extents_end(extents) < stop)
      break; /* the list is full */
    offset = stop;
  }
  return 0;
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "file",
  .longname = "serve a file, block device or directory of files",
  .version = "0.1.0",
  .description = "Serves file=PATH (a regular file or block device), or every file in "
                 "dir=DIR as an export of its own name.  Trim punches holes, zero uses "
                 "the fastest way the kernel offers, extents show the file's holes.",
  .config_help = "file=PATH       file or block device to serve (the magic key)\n"
                 "dir=DIR         serve every file in DIR as an export of its name\n"
                 "cache=none      use O_DIRECT, bypassing the page cache (default: "
                 "cache=default)\n"
                 "fadvise=normal|random|sequential   access pattern hint to the kernel",
  .magic_config_key = "file",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .config = file_config,
  .config_complete = file_config_complete,
  .never_blocks = file_never_blocks,
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
