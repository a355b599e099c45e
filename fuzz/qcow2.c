/* Fuzz target: the qcow2 library (common/qcow2) opening a hostile image
 * and reading it.  The input is the image file.  Whatever it holds, open
 * must refuse it or succeed, and then reads, block status and bitmap
 * status must each succeed or fail cleanly: no crash, no hang, no
 * unbounded allocation, no leak.
 *
 * Besides the sanitizers, two cheap checks catch wrong answers:
 *  - a range read whole and read in odd-sized pieces gives the same bytes;
 *  - a stretch that block status calls zero reads as zeroes.
 *
 * Files.  The image lives in a memfd, reached through a symlink in a
 * private directory made once per process, because the library resolves
 * backing and data file names beside the image: a name can then only
 * reach what that directory holds.
 *  - Backing files: a name with a '/' (absolute, or "../x") would escape,
 *    so an image whose name (inside the file: one that is not, the
 *    library refuses before using it) holds one is opened with
 *    no_backing.  Names without one find
 *    "backing", a second memfd holding the input again with its own
 *    backing name and external data file bit cleared (so the chain stops
 *    there and never opens anything by a name read from the input), or
 *    "image" (the top itself: the loop check), or nothing.
 *  - External data file: the image's own name is never used (it could be
 *    anything, a FIFO whose open blocks, a device); the harness passes
 *    data_file itself, by the parity of the input's length: even, the
 *    image itself (guest data is then read through the data file path),
 *    odd, a name that does not exist (the refusal path).
 *  - Snapshots: when the header counts any, the image is opened a second
 *    time serving snapshot "1" (qemu-img's first id).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../common/qcow2/qcow2.h"
#include "qcow2-files.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Longest single read: a huge virtual size must not make an input slow. */
#define MAX_READ (1u << 20)
/* Small, so that eviction and refills happen on every input. */
#define CACHE_BYTES (64u << 10)
/* Block status and bitmap status calls per pass. */
#define STATUS_STEPS 16
/* Longest block status asked: the whole disk.  The library bounds the
 * work of one call itself (a huge sparse disk once took seconds here). */
#define STATUS_MAX UINT64_MAX
/* How much of a zero stretch the zero check reads. */
#define ZERO_CHECK (64u << 10)

static char image_path[4200], backing_path[4200], absent_path[4200];
static int image_fd = -1, backing_fd = -1;
static uint8_t *buf_whole, *buf_pieces, *copy;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  (void) argc;
  (void) argv;
  qfuzz_make_dir("nbdserve-fuzz-qcow2");
  image_fd = qfuzz_file("image", image_path, sizeof image_path);
  backing_fd = qfuzz_file("backing", backing_path, sizeof backing_path);
  qfuzz_absent("absent", absent_path, sizeof absent_path);
  qfuzz_quiet_logger();
  /* Kept for the whole run (never freed, so never reported as leaks). */
  buf_whole = malloc(MAX_READ);
  buf_pieces = malloc(MAX_READ);
  if (buf_whole == NULL || buf_pieces == NULL)
    qfuzz_die("malloc");
  return 0;
}

static uint64_t be(const uint8_t *p, unsigned bytes)
{
  uint64_t v = 0;
  for (unsigned i = 0; i < bytes; i++)
    v = v << 8 | p[i];
  return v;
}

static uint64_t min64(uint64_t a, uint64_t b)
{
  return a < b ? a : b;
}

static bool all_zero(const uint8_t *p, uint64_t n)
{
  for (uint64_t i = 0; i < n; i++)
    if (p[i])
      return false;
  return true;
}

/* Reads [offset, offset+count) (clamped) whole, then in pieces whose
 * odd size crosses sector and cluster boundaries at shifting places;
 * when both succeed they must agree. */
static void check_read(struct qcow2_chain *c, uint64_t offset, uint64_t count)
{
  uint64_t size = qcow2_size(c);
  if (offset >= size)
    return;
  count = min64(min64(count, size - offset), MAX_READ);
  if (count == 0 || qcow2_read(c, buf_whole, count, offset) < 0)
    return;
  uint64_t piece = 1000 + (offset & 0xfff);
  for (uint64_t done = 0; done < count; done += piece)
    if (qcow2_read(c, buf_pieces + done, min64(piece, count - done), offset + done) < 0)
      return;
  if (memcmp(buf_whole, buf_pieces, count) != 0) {
    fprintf(stderr, "qcow2 fuzz: reading %" PRIu64 " bytes at %" PRIu64 " whole and in pieces "
            "gives different bytes\n", count, offset);
    abort();
  }
}

/* Walks block status from offset; stretches reported zero must read as
 * zeroes (the part of them a read can cover). */
static void check_status(struct qcow2_chain *c, uint64_t offset, uint64_t max)
{
  uint64_t size = qcow2_size(c);
  for (int i = 0; i < STATUS_STEPS && offset < size; i++) {
    struct qcow2_status st;
    uint64_t asked = min64(max, size - offset);
    if (qcow2_block_status(c, offset, asked, &st) < 0)
      return;
    if (st.length == 0 || st.length > asked || (st.kind != QCOW2_DATA && st.kind != QCOW2_ZERO) ||
        st.depth > qcow2_depth(c)) {
      fprintf(stderr, "qcow2 fuzz: block status at %" PRIu64 " returned length %" PRIu64 ", kind %d, "
              "depth %u\n", offset, st.length, (int) st.kind, st.depth);
      abort();
    }
    uint64_t n = min64(st.length, ZERO_CHECK);
    if (st.kind == QCOW2_ZERO && qcow2_read(c, buf_whole, n, offset) == 0 && !all_zero(buf_whole, n)) {
      fprintf(stderr, "qcow2 fuzz: block status calls %" PRIu64 " bytes at %" PRIu64 " zero, but "
              "they do not read as zeroes\n", st.length, offset);
      abort();
    }
    if (st.length == asked)
      return;
    max -= st.length;
    offset += st.length;
  }
}

static void check_bitmaps(struct qcow2_chain *c)
{
  uint64_t size = qcow2_size(c);
  for (size_t i = 0; i < qcow2_bitmap_count(c); i++) {
    if (qcow2_bitmap_name(c, i) == NULL || qcow2_bitmap_problem(c, i) || size == 0)
      continue;
    (void) qcow2_bitmap_granularity(c, i);
    uint64_t offset = 0;
    for (int step = 0; step < STATUS_STEPS && offset < size; step++) {
      uint64_t length;
      bool dirty;
      if (qcow2_bitmap_status(c, i, offset, size - offset, &length, &dirty) < 0)
        break;
      if (length == 0 || length > size - offset) {
        fprintf(stderr, "qcow2 fuzz: bitmap %zu status at %" PRIu64 " returned length %" PRIu64 "\n",
                i, offset, length);
        abort();
      }
      offset += length;
    }
    /* And from an unaligned offset in the middle. */
    uint64_t length;
    bool dirty;
    (void) qcow2_bitmap_status(c, i, size / 2 | 1, size - (size / 2 | 1), &length, &dirty);
  }
}

static void exercise(struct qcow2_chain *c)
{
  uint64_t size = qcow2_size(c), cluster = qcow2_cluster_size(c);
  /* The start, a stretch around the middle crossing a cluster boundary
   * at an unaligned offset, and the end. */
  check_read(c, 0, 256 << 10);
  uint64_t middle = size / 2 & ~(cluster - 1);
  check_read(c, middle > 1000 ? middle - 1000 : 0, cluster + 2001);
  check_read(c, size > (64 << 10) ? size - (64 << 10) : 0, 64 << 10);
  check_read(c, size ? size - 1 : 0, 1);
  /* Out of range: refused, never read. */
  char byte;
  if (qcow2_read(c, &byte, 1, size) == 0 || (size && qcow2_read(c, &byte, 2, size - 1) == 0)) {
    fprintf(stderr, "qcow2 fuzz: a read past the end of the disk succeeded\n");
    abort();
  }

  /* Block status: from the start, from the middle, then a short
   * unaligned range. */
  check_status(c, 0, STATUS_MAX);
  check_status(c, middle, STATUS_MAX);
  check_status(c, size / 3 | 1, 3 * cluster);

  check_bitmaps(c);
}

static void count_file(int fd, const char *path, void *opaque)
{
  (void) fd;
  (void) path;
  ++*(unsigned *) opaque;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  qfuzz_fill(image_fd, data, size);

  struct qcow2_options options = {
    .cache_bytes = CACHE_BYTES,
    .data_file = size % 2 ? absent_path : image_path,
    .no_backing = true,
  };

  /* The header fields that decide what the library opens by name: the
   * backing name (bytes 8-19) and, for version 3, the external data file
   * bit (incompatible features, bytes 72-79, bit 2). */
  if (size >= 72) {
    uint64_t name_offset = be(data + 8, 8), name_len = be(data + 16, 4);
    bool inside = name_offset <= size && name_len <= size - name_offset;
    if (name_offset != 0 && !(inside && memchr(data + name_offset, '/', name_len))) {
      options.no_backing = false;
      copy = realloc(copy, size);
      if (copy == NULL)
        qfuzz_die("realloc");
      memcpy(copy, data, size);
      memset(copy + 8, 0, 12); /* no backing file */
      if (size >= 80 && be(copy + 4, 4) == 3)
        copy[79] &= (uint8_t) ~4u; /* guest data inside the file */
      qfuzz_fill(backing_fd, copy, size);
    }
  }

  struct qcow2_chain *c = qcow2_open(image_path, &options);
  if (c) {
    unsigned files = 0;
    exercise(c);
    qcow2_for_each_file(c, count_file, &files);
    if (files < qcow2_depth(c))
      abort();
    qcow2_close(c);
  }

  if (size >= 64 && be(data + 60, 4) != 0) {
    options.snapshot = "1";
    c = qcow2_open(image_path, &options);
    if (c) {
      exercise(c);
      qcow2_close(c);
    }
  }
  return 0;
}
