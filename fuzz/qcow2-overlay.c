/* Fuzz target: the qcow2 overlay library (common/qcow2/overlay.h)
 * opening a hostile image as a writable overlay, writing to it, and
 * opening it again.  The input is the overlay file.  Whatever it holds,
 * open must refuse it or succeed; then writes, zeroes, trims, flushes,
 * reads and status calls each succeed or fail cleanly — no crash, no
 * hang, no unbounded allocation, no leak — and close must not crash.
 *
 * The oracle beside the sanitizers: what a successful write wrote reads
 * back, before and after a reopen; a successful zero reads as zeroes.
 *
 * The image lives in a memfd reached through a symlink in a private
 * directory; its backing file name is removed from the header before
 * open (the overlay then has no base), so that a name in the input can
 * never reach another file.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../common/qcow2/overlay.h"
#include "qcow2-files.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define IO_BYTES 70000 /* more than a 64K cluster: a write covers one whole and parts of others */

static char image_path[4200];
static int image_fd = -1;
static uint8_t *pattern, *back;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  (void) argc;
  (void) argv;
  qfuzz_make_dir("nbdserve-fuzz-overlay");
  image_fd = qfuzz_file("overlay", image_path, sizeof image_path);
  qfuzz_quiet_logger();
  pattern = malloc(IO_BYTES);
  back = malloc(IO_BYTES);
  if (pattern == NULL || back == NULL)
    qfuzz_die("malloc");
  for (size_t i = 0; i < IO_BYTES; i++)
    pattern[i] = (uint8_t) (i * 7 + 1);
  return 0;
}

/* The input, with its backing file name cleared (see the top). */
static void fill(const uint8_t *data, size_t size)
{
  qfuzz_fill(image_fd, data, size);
  static const uint8_t no_backing[12];
  if (size >= 20 && pwrite(image_fd, no_backing, sizeof no_backing, 8) != sizeof no_backing)
    qfuzz_die("pwrite");
}

static void fail(const char *what, uint64_t offset)
{
  fprintf(stderr, "qcow2 overlay fuzz: %s at %llu\n", what, (unsigned long long) offset);
  abort();
}

static uint64_t clamp(uint64_t size, uint64_t offset, uint64_t count)
{
  return offset >= size ? 0 : count < size - offset ? count : size - offset;
}

static const char *const bitmap_names[] = {"b1", "b2"};
static const char *const clear_names[] = {"b2"};

static struct qcow2_overlay *open_overlay(void)
{
  struct qcow2_overlay_options o = {
    .path = image_path, .bitmaps = bitmap_names, .nbitmaps = 2, .clear = clear_names, .nclear = 1,
    .cache_bytes = 64 << 10};
  return qcow2_overlay_open(&o);
}

/* A write then a read-back at offset; returns whether the write took. */
static bool write_and_check(struct qcow2_overlay *ov, uint64_t offset)
{
  uint64_t n = clamp(qcow2_overlay_size(ov), offset, IO_BYTES);
  if (n == 0 || qcow2_overlay_write(ov, pattern, n, offset, false) < 0)
    return false;
  if (qcow2_overlay_read(ov, back, n, offset) == 0 && memcmp(back, pattern, n) != 0)
    fail("a write does not read back", offset);
  return true;
}

static void zero_and_check(struct qcow2_overlay *ov, uint64_t offset, bool may_trim)
{
  uint64_t n = clamp(qcow2_overlay_size(ov), offset, IO_BYTES);
  if (n == 0 || qcow2_overlay_zero(ov, n, offset, may_trim, false) < 0)
    return;
  if (qcow2_overlay_read(ov, back, n, offset) == 0)
    for (uint64_t i = 0; i < n; i++)
      if (back[i])
        fail("a zeroed range does not read as zero", offset + i);
}

static void walk_status(struct qcow2_overlay *ov)
{
  uint64_t size = qcow2_overlay_size(ov), offset = 0;
  for (int i = 0; i < 16 && offset < size; i++) {
    struct qcow2_status st;
    if (qcow2_overlay_block_status(ov, offset, size - offset, &st) < 0 || st.length == 0)
      return;
    offset += st.length;
  }
  for (size_t b = 0; b < qcow2_overlay_bitmap_count(ov); b++) {
    uint64_t length;
    bool dirty;
    if (size && qcow2_overlay_bitmap_status(ov, b, 0, size, &length, &dirty) == 0 && length == 0)
      fail("bitmap status of length 0", 0);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  fill(data, size);
  struct qcow2_overlay *ov = open_overlay();
  if (ov == NULL)
    return 0;
  uint64_t disk = qcow2_overlay_size(ov), cluster = qcow2_overlay_cluster_size(ov);
  uint64_t where[3] = {0, disk / 2 + 3, disk > cluster ? disk - cluster - 1 : 0};
  bool written = write_and_check(ov, where[0]);
  write_and_check(ov, where[1]);
  zero_and_check(ov, where[1], true);
  zero_and_check(ov, where[2], false);
  qcow2_overlay_trim(ov, clamp(disk, cluster, 3 * cluster), cluster, false);
  qcow2_overlay_flush(ov);
  walk_status(ov);
  qcow2_overlay_close(ov);
  /* What the first write wrote survives a clean close. */
  ov = open_overlay();
  if (ov == NULL)
    return 0;
  /* The part of the first write no later call touched: the trim starts
   * at the second cluster, the others at where[1] and where[2]. */
  uint64_t untouched = clamp(qcow2_overlay_size(ov), 0, IO_BYTES);
  if (cluster < untouched)
    untouched = cluster;
  if (where[1] < untouched)
    untouched = where[1];
  if (where[2] < untouched)
    untouched = where[2];
  if (written && untouched && qcow2_overlay_size(ov) == disk &&
      qcow2_overlay_read(ov, back, untouched, 0) == 0 && memcmp(back, pattern, untouched) != 0)
    fail("a write is lost across a clean close", 0);
  walk_status(ov);
  qcow2_overlay_close(ov);
  return 0;
}
