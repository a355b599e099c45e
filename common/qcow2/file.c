/* qcow2 library: reading the image files.  Bounded reads (what lies
 * past the end of a file reads as zero, or is refused for tables), the
 * L1 table load shared by the active state and snapshots, and the
 * library's logger.  Every other file of the library builds on these.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* ---- Logging ------------------------------------------------------------- */

static void log_to_stderr(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_to_stderr(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
}

static void log_nothing(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_nothing(const char *fmt, ...)
{
  (void) fmt;
}

qcow2_log_fn qcow2_error_fn = log_to_stderr;
qcow2_log_fn qcow2_debug_fn = log_nothing;

void qcow2_set_logger(qcow2_log_fn error, qcow2_log_fn debug)
{
  qcow2_error_fn = error ? error : log_to_stderr;
  qcow2_debug_fn = debug ? debug : log_nothing;
}

/* ---- File access --------------------------------------------------------- */

int read_at(int fd, void *buf, size_t count, uint64_t offset)
{
  uint8_t *p = buf;
  while (count > 0) {
    ssize_t r = pread(fd, p, count, (off_t) offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    if (r == 0) { /* end of file: the rest reads as zero */
      memset(p, 0, count);
      return 0;
    }
    p += r;
    count -= (size_t) r;
    offset += (uint64_t) r;
  }
  return 0;
}

int read_table(const struct layer *l, void *buf, uint64_t count, uint64_t offset, const char *what)
{
  if (offset > l->file_size || count > l->file_size - offset) {
    q_error("qcow2: %s: the %s (%" PRIu64 " bytes at offset %" PRIu64 ") lies past the end "
            "of the file (%" PRIu64 " bytes)", l->path, what, count, offset, l->file_size);
    return -EIO;
  }
  int r = read_at(l->fd, buf, count, offset);
  if (r < 0)
    q_error("qcow2: %s: reading the %s: %s", l->path, what, strerror(-r));
  return r;
}

bool past_end(const struct layer *l, uint64_t offset, uint64_t count)
{
  uint64_t size = __atomic_load_n(&l->file_size, __ATOMIC_RELAXED);
  if (offset < size && count <= size - offset)
    return false;
  /* A layer can grow under a reader: a checkpoint's layer receiving the
   * data of an older one being released.  Look again. */
  struct stat st;
  if (fstat(l->fd, &st) == -1 || (uint64_t) st.st_size <= size)
    return true;
  size = (uint64_t) st.st_size;
  __atomic_store_n(&((struct layer *) l)->file_size, size, __ATOMIC_RELAXED);
  return offset >= size || count > size - offset;
}

bool overlaps_header(const struct layer *l, uint64_t offset)
{
  return offset < l->cluster_size;
}

/* ---- The L1 table ------------------------------------------------------ */

int load_l1(struct layer *l, uint32_t l1_size, uint64_t l1_offset, uint64_t size, const char *what)
{
  uint64_t per_l2 = l->cluster_size << l->l2_bits; /* bytes one L2 table maps */
  uint64_t needed = size / per_l2 + (size % per_l2 != 0);
  if ((uint64_t) l1_size * 8 > QCOW2_MAX_L1_BYTES) {
    q_error("qcow2: %s: the %s has %u entries, more than the %u MiB limit", l->path, what, l1_size,
            QCOW2_MAX_L1_BYTES >> 20);
    return -1;
  }
  if (l1_size < needed) {
    q_error("qcow2: %s: the %s has %u entries; the virtual size needs %" PRIu64, l->path, what,
            l1_size, needed);
    return -1;
  }
  if (l1_size > 0 && (l1_offset % l->cluster_size != 0 || overlaps_header(l, l1_offset))) {
    q_error("qcow2: %s: the %s's offset %" PRIu64 " is %s", l->path, what, l1_offset,
            l1_offset % l->cluster_size ? "not cluster aligned" : "inside the header cluster");
    return -1;
  }
  free(l->l1);
  l->l1 = malloc(((size_t) needed ? (size_t) needed : 1) * 8);
  if (l->l1 == NULL) {
    q_error("qcow2: out of memory");
    return -1;
  }
  if (read_table(l, l->l1, needed * 8, l1_offset, what) < 0)
    return -1;
  for (uint64_t i = 0; i < needed; i++)
    l->l1[i] = be64toh(l->l1[i]);
  l->l1_size = (uint32_t) needed; /* entries past the virtual size are never used */
  l->size = size;
  return 0;
}
