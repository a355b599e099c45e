/* nbdserve fuzzing harnesses of the qcow2 library: see qcow2-files.h.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../common/qcow2/qcow2.h"
#include "qcow2-files.h"

#define MAX_FILES 4

static char dir[4096];
static char links[MAX_FILES][4200];
static int nlinks;
static bool verbose;

void qfuzz_die(const char *what)
{
  perror(what);
  exit(1);
}

static void log_discard(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_discard(const char *fmt, ...)
{
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (verbose)
    fprintf(stderr, "%s\n", msg);
}

void qfuzz_quiet_logger(void)
{
  verbose = getenv("QCOW2_FUZZ_LOG") != NULL;
  qcow2_set_logger(log_discard, log_discard);
}

static void remove_dir(void)
{
  for (int i = 0; i < nlinks; i++)
    unlink(links[i]);
  rmdir(dir);
}

void qfuzz_make_dir(const char *prefix)
{
  const char *tmp = getenv("TMPDIR");
  snprintf(dir, sizeof dir, "%s/%s.XXXXXX", tmp && *tmp ? tmp : "/tmp", prefix);
  if (mkdtemp(dir) == NULL)
    qfuzz_die("mkdtemp");
  atexit(remove_dir);
}

void qfuzz_absent(const char *name, char *path, size_t path_size)
{
  snprintf(path, path_size, "%s/%s", dir, name);
}

int qfuzz_file(const char *name, char *path, size_t path_size)
{
  if (nlinks == MAX_FILES) {
    fprintf(stderr, "qfuzz_file: more than %d files\n", MAX_FILES);
    exit(1);
  }
  int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd == -1)
    qfuzz_die("memfd_create");
  char target[64];
  snprintf(target, sizeof target, "/proc/self/fd/%d", fd);
  snprintf(links[nlinks], sizeof links[nlinks], "%s/%s", dir, name);
  if (symlink(target, links[nlinks]) == -1)
    qfuzz_die(links[nlinks]);
  snprintf(path, path_size, "%s", links[nlinks]);
  nlinks++;
  return fd;
}

void qfuzz_fill(int fd, const uint8_t *data, size_t size)
{
  if (ftruncate(fd, 0) == -1)
    qfuzz_die("ftruncate");
  size_t done = 0;
  while (done < size) {
    ssize_t n = pwrite(fd, data + done, size - done, (off_t) done);
    if (n <= 0)
      qfuzz_die("pwrite");
    done += (size_t) n;
  }
}
