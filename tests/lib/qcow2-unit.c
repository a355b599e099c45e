/* Unit test of the qcow2 reading library (common/qcow2), calling it
 * directly.  Every image is built here byte by byte (header, L1 and L2
 * tables, data and compressed clusters, snapshot table, bitmap
 * directory), so each check knows exactly what the image holds and no
 * qemu is needed.  Alongside each image the builder keeps a model: the
 * bytes every guest offset must read as and the kind and depth block
 * status must report there; the checks compare the library with it.
 *
 *   qcow2-unit [DIR]    images go in a fresh directory under DIR
 *                       (default $TMPDIR or /tmp), removed at the end
 *                       unless QCOW2_UNIT_KEEP is set.
 *
 * Output is TAP; the exit status is 1 if any check failed.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include "qcow2/internal.h"

/* ---- TAP ------------------------------------------------------------------ */

static int tests_run, tests_failed;

static void diag(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void diag(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fputs("# ", stdout);
  vprintf(fmt, ap);
  fputc('\n', stdout);
  va_end(ap);
}

static bool ok(bool cond, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool ok(bool cond, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  tests_run++;
  if (!cond)
    tests_failed++;
  printf("%s %d - ", cond ? "ok" : "not ok", tests_run);
  vprintf(fmt, ap);
  fputc('\n', stdout);
  fflush(stdout);
  va_end(ap);
  return cond;
}

static void die(const char *what)
{
  printf("Bail out! %s: %s\n", what, strerror(errno));
  exit(2);
}

static void *xmalloc(size_t n)
{
  void *p = malloc(n ? n : 1);
  if (p == NULL)
    die("malloc");
  return p;
}

static void *xcalloc(size_t n)
{
  void *p = calloc(1, n ? n : 1);
  if (p == NULL)
    die("calloc");
  return p;
}

/* ---- Logger: the library's messages are kept so checks can read them ---- */

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char errors[16384], debugs[16384];
static size_t errors_len, debugs_len;

static void append(char *buf, size_t *len, const char *fmt, va_list ap)
{
  pthread_mutex_lock(&log_lock);
  if (*len + 2 < sizeof errors) {
    int n = vsnprintf(buf + *len, sizeof errors - *len - 1, fmt, ap);
    if (n > 0)
      *len += (size_t) n < sizeof errors - *len - 1 ? (size_t) n : sizeof errors - *len - 2;
    buf[(*len)++] = '\n';
    buf[*len] = 0;
  }
  pthread_mutex_unlock(&log_lock);
}

static void my_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void my_error(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  append(errors, &errors_len, fmt, ap);
  va_end(ap);
}

static void my_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void my_debug(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  append(debugs, &debugs_len, fmt, ap);
  va_end(ap);
}

static void clear_logs(void)
{
  errors_len = debugs_len = 0;
  errors[0] = debugs[0] = 0;
}

/* Shows the errors logged since the last clear_logs, as TAP comments. */
static void diag_errors(void)
{
  char *copy = strdup(errors), *save = NULL;
  for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
    diag("  logged: %s", line);
  free(copy);
}

/* ---- Files in the private directory --------------------------------------- */

static char work_dir[4096];
static char *made[128];
static size_t nmade;

/* A path in the work directory, remembered for the final cleanup. */
static const char *path_in_dir(const char *name)
{
  for (size_t i = 0; i < nmade; i++)
    if (strcmp(strrchr(made[i], '/') + 1, name) == 0)
      return made[i];
  char *p;
  if (asprintf(&p, "%s/%s", work_dir, name) < 0 || nmade == sizeof made / sizeof made[0])
    die("asprintf");
  made[nmade++] = p;
  return p;
}

static const char *save_file(const char *name, const void *data, uint64_t len)
{
  const char *path = path_in_dir(name);
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd == -1)
    die(path);
  const uint8_t *p = data;
  while (len > 0) {
    ssize_t w = write(fd, p, len);
    if (w <= 0)
      die(path);
    p += w;
    len -= (uint64_t) w;
  }
  close(fd);
  return path;
}

/* ---- Deterministic pseudo-random data -------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

static uint64_t main_seed = 0x243f6a8885a308d3ull;
static uint64_t rnd(void) { return rng_next(&main_seed); }
static uint64_t rnd_below(uint64_t n) { return rnd() % n; }

static void fill_random(uint8_t *p, size_t n)
{
  for (size_t i = 0; i < n; i++)
    p[i] = (uint8_t) (rnd() >> 24);
}

/* Data that deflate and zstd shrink well (few symbols): compressed
 * clusters must fit in the sectors a descriptor can count. */
static void fill_text(uint8_t *p, size_t n)
{
  for (size_t i = 0; i < n; i++)
    p[i] = (uint8_t) "qcow2 nbd"[rnd_below(9)];
}

/* ---- Big-endian writers ---------------------------------------------------- */

static void put16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

/* ---- Image builder and model ----------------------------------------------- */

#define ST(kind, depth) ((uint8_t) (((unsigned) (kind) << 4) | (depth)))
#define ST_KIND(s) ((enum qcow2_kind) ((s) >> 4))
#define ST_DEPTH(s) ((unsigned) ((s) & 15))

enum { IMG_EXTL2 = 1, IMG_ZSTD = 2, IMG_NOMODEL = 4 };

struct img {
  unsigned version, cb; /* cluster_bits */
  uint64_t cs, size;
  bool extl2, zstd;
  unsigned entry_bytes, l2_bits;
  uint8_t *f; /* the whole file */
  uint64_t len;
  uint64_t l1_off;
  uint32_t l1_size;
  uint32_t ext_pos; /* where the next header extension goes */
  uint8_t *want; /* model: what each guest byte reads as */
  uint8_t *st; /* model: ST(kind, depth) of each guest byte */
  uint64_t comp_pos, comp_end; /* packing area for compressed data */
  unsigned comp_crossings; /* compressed clusters whose data straddles host clusters */
};

/* n fresh zeroed clusters at the end of the file.  Moves m->f. */
static uint64_t img_alloc(struct img *m, uint64_t n)
{
  uint64_t at = m->len;
  m->f = realloc(m->f, at + n * m->cs);
  if (m->f == NULL)
    die("realloc");
  memset(m->f + at, 0, n * m->cs);
  m->len = at + n * m->cs;
  return at;
}

static void img_init(struct img *m, unsigned version, unsigned cb, uint64_t size, unsigned flags)
{
  memset(m, 0, sizeof *m);
  m->version = version;
  m->cb = cb;
  m->cs = 1ull << cb;
  m->size = size;
  m->extl2 = flags & IMG_EXTL2;
  m->zstd = flags & IMG_ZSTD;
  m->entry_bytes = m->extl2 ? 16 : 8;
  m->l2_bits = cb - (m->extl2 ? 4 : 3);
  img_alloc(m, 1);
  uint64_t per_l2 = m->cs << m->l2_bits;
  m->l1_size = (uint32_t) ((size + per_l2 - 1) / per_l2);
  m->l1_off = img_alloc(m, (m->l1_size * 8ull + m->cs - 1) / m->cs + (m->l1_size == 0));
  uint8_t *h = m->f;
  put32(h, QCOW2_MAGIC);
  put32(h + 4, version);
  put32(h + 20, cb);
  put64(h + 24, size);
  put32(h + 36, m->l1_size);
  put64(h + 40, m->l1_off);
  m->ext_pos = 72;
  if (version >= 3) {
    uint64_t incompat = (m->extl2 ? QCOW2_INCOMPAT_EXTL2 : 0) | (m->zstd ? QCOW2_INCOMPAT_COMPRESSION : 0);
    put64(h + 72, incompat);
    put32(h + 96, 4);
    m->ext_pos = m->zstd ? 112 : 104;
    put32(h + 100, m->ext_pos);
    if (m->zstd)
      h[104] = COMPRESSION_ZSTD;
  }
  if (!(flags & IMG_NOMODEL)) {
    m->want = xcalloc(size);
    m->st = xmalloc(size);
    memset(m->st, ST(QCOW2_ZERO, 0), size);
  }
}

static void img_free(struct img *m)
{
  free(m->f);
  free(m->want);
  free(m->st);
  memset(m, 0, sizeof *m);
}

static const char *img_save(const struct img *m, const char *name)
{
  return save_file(name, m->f, m->len);
}

static void img_ext(struct img *m, uint32_t type, const void *data, uint32_t len)
{
  if (m->ext_pos + 16 + len > m->cs / 2) {
    printf("Bail out! header extensions do not fit\n");
    exit(2);
  }
  put32(m->f + m->ext_pos, type);
  put32(m->f + m->ext_pos + 4, len);
  memcpy(m->f + m->ext_pos + 8, data, len);
  m->ext_pos += 8 + ((len + 7) & ~7u);
}

static void model(struct img *m, uint64_t off, uint64_t len, const uint8_t *data, enum qcow2_kind kind,
                  unsigned depth)
{
  if (m->want == NULL)
    return;
  if (data)
    memcpy(m->want + off, data, len);
  else
    memset(m->want + off, 0, len);
  memset(m->st + off, ST(kind, depth), len);
}

/* Names the backing file (in the second half of the header cluster)
 * and lays its contents under the model: bst NULL means a raw file
 * (data everywhere), else the backing image's own model, whose depths
 * move down one layer.  Past the backing file's end: zero, at depth 2. */
static void img_backing(struct img *m, const char *name, const char *format, const uint8_t *bwant,
                        const uint8_t *bst, uint64_t bsize)
{
  uint32_t at = (uint32_t) (m->cs / 2);
  memcpy(m->f + at, name, strlen(name));
  put64(m->f + 8, at);
  put32(m->f + 16, (uint32_t) strlen(name));
  if (format)
    img_ext(m, QCOW2_EXT_BACKING_FORMAT, format, (uint32_t) strlen(format));
  if (m->want == NULL || bwant == NULL)
    return;
  for (uint64_t i = 0; i < m->size; i++) {
    if (i < bsize) {
      m->want[i] = bwant[i];
      m->st[i] = bst == NULL ? ST(QCOW2_DATA, 2)
                 : ST_DEPTH(bst[i]) ? ST(ST_KIND(bst[i]), ST_DEPTH(bst[i]) + 1)
                                    : bst[i];
    } else {
      m->want[i] = 0;
      m->st[i] = ST(QCOW2_ZERO, 2);
    }
  }
}

/* File offset of the L2 entry of guest cluster gc, making its table. */
static uint64_t l2_entry_at(struct img *m, uint64_t gc)
{
  uint64_t l1_at = m->l1_off + (gc >> m->l2_bits) * 8;
  uint64_t table = get_be64(m->f + l1_at) & QCOW2_OFFSET_MASK;
  if (table == 0) {
    table = img_alloc(m, 1);
    put64(m->f + l1_at, table | QCOW2_L2_COPIED);
  }
  return table + (gc & ((1ull << m->l2_bits) - 1)) * m->entry_bytes;
}

static void set_entry(struct img *m, uint64_t gc, uint64_t descriptor, uint64_t bitmap)
{
  uint64_t at = l2_entry_at(m, gc);
  put64(m->f + at, descriptor);
  if (m->extl2)
    put64(m->f + at + 8, bitmap);
}

/* A guest cluster stored whole at host (already allocated). */
static void img_data(struct img *m, uint64_t gc, uint64_t host, const uint8_t *content)
{
  memcpy(m->f + host, content, m->cs);
  set_entry(m, gc, host | QCOW2_L2_COPIED, m->extl2 ? 0xffffffffull : 0);
  model(m, gc * m->cs, m->cs, content, QCOW2_DATA, 1);
}

/* A zero cluster; prealloc (0 for none) is a host cluster it keeps
 * reserved, filled with junk that must never be read. */
static void img_zero(struct img *m, uint64_t gc, uint64_t prealloc)
{
  if (prealloc)
    memset(m->f + prealloc, 0xa5, m->cs);
  if (m->extl2)
    set_entry(m, gc, prealloc ? prealloc | QCOW2_L2_COPIED : 0, 0xffffffffull << 32);
  else
    set_entry(m, gc, prealloc | QCOW2_L2_ZERO, 0);
  model(m, gc * m->cs, m->cs, NULL, QCOW2_ZERO, 1);
}

/* Extended L2: subclusters in alloc read from host (the cluster at host,
 * junk elsewhere), those in zero read as zeroes, the rest fall through. */
static void img_sub(struct img *m, uint64_t gc, uint64_t host, uint32_t alloc, uint32_t zero,
                    const uint8_t *content)
{
  uint64_t sub = m->cs / 32;
  if (host)
    memset(m->f + host, 0xee, m->cs);
  for (unsigned i = 0; i < 32; i++) {
    uint64_t g = gc * m->cs + i * sub;
    if (alloc & (1u << i)) {
      memcpy(m->f + host + i * sub, content + i * sub, sub);
      model(m, g, sub, content + i * sub, QCOW2_DATA, 1);
    } else if (zero & (1u << i))
      model(m, g, sub, NULL, QCOW2_ZERO, 1);
  }
  set_entry(m, gc, host ? host | QCOW2_L2_COPIED : 0, alloc | (uint64_t) zero << 32);
}

/* The image's compression of one cluster; two_frames splits zstd input
 * in two frames (the format allows several). */
static size_t compress_cluster(const struct img *m, const uint8_t *in, uint8_t *out, size_t cap, bool two_frames)
{
  if (m->zstd) {
    size_t half = two_frames ? m->cs / 2 : m->cs;
    size_t a = ZSTD_compress(out, cap, in, half, 3);
    if (ZSTD_isError(a))
      return 0;
    if (half == m->cs)
      return a;
    size_t b = ZSTD_compress(out + a, cap - a, in + half, m->cs - half, 3);
    return ZSTD_isError(b) ? 0 : a + b;
  }
  /* Raw deflate with a 4 KiB window, as qemu writes it. */
  z_stream z;
  memset(&z, 0, sizeof z);
  if (deflateInit2(&z, 9, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
    return 0;
  z.next_in = (Bytef *) in;
  z.avail_in = (uInt) m->cs;
  z.next_out = out;
  z.avail_out = (uInt) cap;
  int r = deflate(&z, Z_FINISH);
  size_t n = z.total_out;
  deflateEnd(&z);
  return r == Z_STREAM_END ? n : 0;
}

static uint64_t compressed_descriptor(const struct img *m, uint64_t at, size_t clen)
{
  uint64_t extra_sectors = ((at + clen - 1) >> 9) - (at >> 9);
  if (extra_sectors >= 1ull << (m->cb - 8)) {
    printf("Bail out! compressed data too long for the descriptor\n");
    exit(2);
  }
  return QCOW2_L2_COMPRESSED | extra_sectors << (62 - (m->cb - 8)) | at;
}

/* Compressed data of gc placed at byte `at` of the file (the caller
 * made room); the rest of the last sector stays zero. */
static void img_compressed_at(struct img *m, uint64_t gc, const uint8_t *content, uint64_t at, const uint8_t *cdata,
                              size_t clen)
{
  while (m->len < at + clen)
    img_alloc(m, 1);
  memcpy(m->f + at, cdata, clen);
  if (at / m->cs != (at + clen - 1) / m->cs)
    m->comp_crossings++;
  set_entry(m, gc, compressed_descriptor(m, at, clen), 0);
  model(m, gc * m->cs, m->cs, content, QCOW2_DATA, 1);
}

/* Compresses content into the image, packed after the previous
 * compressed cluster as qemu does (so data straddles host clusters). */
static void img_compressed(struct img *m, uint64_t gc, const uint8_t *content, bool two_frames)
{
  uint8_t *c = xmalloc(2 * m->cs);
  size_t clen = compress_cluster(m, content, c, 2 * m->cs, two_frames);
  if (clen == 0 || clen > m->cs) {
    printf("Bail out! test data does not compress\n");
    exit(2);
  }
  l2_entry_at(m, gc); /* its L2 table first, so it does not cut the packing area */
  uint64_t at = m->comp_pos;
  if (at && ((at + clen - 1) >> 9) - (at >> 9) >= 1ull << (m->cb - 8))
    at = (at + 511) & ~511ull; /* too many sectors from here: start on a sector */
  if (at == 0 || at + clen > m->comp_end) {
    if (at && m->comp_end == m->len) { /* the area is at the end: extend it */
      img_alloc(m, 1);
    } else {
      at = img_alloc(m, 1);
      /* Odd start, so offsets inside sectors are exercised too. */
      if (clen + 7 <= m->cs && ((at + 7 + clen - 1) >> 9) - ((at + 7) >> 9) < 1ull << (m->cb - 8))
        at += 7;
    }
    m->comp_end = m->len;
  }
  img_compressed_at(m, gc, content, at, c, clen);
  m->comp_pos = at + clen;
  free(c);
}

/* ---- Checks against the model ---------------------------------------------- */

static bool read_matches(struct qcow2_chain *c, const uint8_t *want, uint64_t off, uint64_t len, char *why,
                         size_t why_len)
{
  uint8_t *buf = xmalloc(len);
  memset(buf, 0x5a, len);
  int r = qcow2_read(c, buf, len, off);
  bool good = r == 0;
  if (!good)
    snprintf(why, why_len, "qcow2_read(%" PRIu64 " bytes at %" PRIu64 ") returned %d", len, off, r);
  for (uint64_t i = 0; good && i < len; i++)
    if (buf[i] != want[off + i]) {
      snprintf(why, why_len, "read of %" PRIu64 " bytes at %" PRIu64 ": byte at %" PRIu64 " is 0x%02x, expected 0x%02x",
               len, off, off + i, buf[i], want[off + i]);
      good = false;
    }
  free(buf);
  return good;
}

/* Whole-disk, per-cluster, boundary-straddling and random reads. */
static void check_reads(struct qcow2_chain *c, const struct img *m, const char *label)
{
  char why[256] = "";
  if (!ok(read_matches(c, m->want, 0, m->size, why, sizeof why), "%s: the whole disk reads back in one call", label))
    diag("%s", why);

  bool good = true;
  for (uint64_t b = 0; good && b < m->size; b += m->cs) {
    uint64_t n = m->size - b < m->cs ? m->size - b : m->cs;
    good = read_matches(c, m->want, b, n, why, sizeof why);
    /* 16 bytes around each boundary: every kind meets its neighbour. */
    if (good && b >= 8 && b + 8 <= m->size)
      good = read_matches(c, m->want, b - 8, 16, why, sizeof why);
  }
  if (!ok(good, "%s: each cluster, and across each cluster boundary", label))
    diag("%s", why);

  good = true;
  for (int i = 0; good && i < 400; i++) {
    uint64_t off = rnd_below(m->size);
    uint64_t max = m->size - off < 3 * m->cs ? m->size - off : 3 * m->cs;
    good = read_matches(c, m->want, off, 1 + rnd_below(max), why, sizeof why);
  }
  if (!ok(good, "%s: 400 reads that start and end mid-cluster", label))
    diag("%s", why);

  /* Small sequential pieces: several calls per cluster, so the thread's
   * held decompressed cluster is reused and then replaced. */
  good = true;
  uint64_t stop = m->size < 64 * m->cs ? m->size : 64 * m->cs;
  for (uint64_t off = 0; good && off < stop; off += 1000)
    good = read_matches(c, m->want, off, stop - off < 1000 ? stop - off : 1000, why, sizeof why);
  if (!ok(good, "%s: sequential 1000-byte reads", label))
    diag("%s", why);
}

/* The model's answer: the longest run from off with one kind and depth. */
static uint64_t model_run(const uint8_t *st, uint64_t size, uint64_t off, uint64_t max)
{
  uint64_t end = max < size - off ? off + max : size, e = off;
  while (e < end && st[e] == st[off])
    e++;
  return e - off;
}

static const char *kind_name(enum qcow2_kind k) { return k == QCOW2_DATA ? "data" : "zero"; }

static bool status_matches(struct qcow2_chain *c, const uint8_t *st, uint64_t size, uint64_t off, uint64_t max,
                           char *why, size_t why_len)
{
  struct qcow2_status s;
  int r = qcow2_block_status(c, off, max, &s);
  uint64_t len = model_run(st, size, off, max);
  if (r != 0) {
    snprintf(why, why_len, "block status at %" PRIu64 " returned %d", off, r);
    return false;
  }
  if (s.length != len || s.kind != ST_KIND(st[off]) || s.depth != ST_DEPTH(st[off])) {
    snprintf(why, why_len, "block status at %" PRIu64 " (max %" PRIu64 "): %" PRIu64 " bytes of %s at depth %u; "
             "expected %" PRIu64 " bytes of %s at depth %u", off, max, s.length, kind_name(s.kind), s.depth,
             len, kind_name(ST_KIND(st[off])), ST_DEPTH(st[off]));
    return false;
  }
  return true;
}

/* The library may cut a stretch short when finding its end would take
 * long (thousands of L2 entries); every image here is far below that,
 * so the longest stretch is what each call must return. */
static void check_status(struct qcow2_chain *c, const struct img *m, const char *label)
{
  char why[320] = "";
  bool good = true;
  unsigned extents = 0;
  for (uint64_t off = 0; good && off < m->size; extents++) {
    good = status_matches(c, m->st, m->size, off, m->size - off, why, sizeof why);
    off += model_run(m->st, m->size, off, m->size - off);
  }
  if (!ok(good, "%s: block status walks the disk in %u maximal extents", label, extents))
    diag("%s", why);
  good = true;
  for (int i = 0; good && i < 300; i++) {
    uint64_t off = rnd_below(m->size);
    uint64_t max = 1 + rnd_below(m->size - off < 8 * m->cs ? m->size - off : 8 * m->cs);
    good = status_matches(c, m->st, m->size, off, max, why, sizeof why);
  }
  if (!ok(good, "%s: block status from 300 unaligned offsets, bounded by max_length", label))
    diag("%s", why);
}

/* One explicit block status expectation, for the cases worth naming. */
static void expect_status(struct qcow2_chain *c, uint64_t off, uint64_t max, uint64_t len, enum qcow2_kind kind,
                          unsigned depth, const char *what)
{
  struct qcow2_status s = {0};
  int r = qcow2_block_status(c, off, max, &s);
  if (!ok(r == 0 && s.length == len && s.kind == kind && s.depth == depth, "%s", what))
    diag("got r=%d, %" PRIu64 " bytes of %s at depth %u; expected %" PRIu64 " bytes of %s at depth %u", r, s.length,
         kind_name(s.kind), s.depth, len, kind_name(kind), depth);
}

static void expect_good(struct qcow2_chain *c, const struct img *m, uint64_t off, uint64_t len, const char *what)
{
  char why[256] = "";
  if (!ok(read_matches(c, m->want, off, len, why, sizeof why), "%s", what))
    diag("%s", why);
}

/* What qcow2_for_each_file reports, by base name. */
struct file_list {
  unsigned n;
  char names[4][64];
};

static void note_file(int fd, const char *path, void *opaque)
{
  struct file_list *l = opaque;
  if (l->n < 4 && fd >= 0)
    snprintf(l->names[l->n], sizeof l->names[0], "%s", strrchr(path, '/') ? strrchr(path, '/') + 1 : path);
  l->n++;
}

static struct qcow2_chain *open_image(const char *path, const struct qcow2_options *o, const char *what)
{
  clear_logs();
  struct qcow2_chain *c = qcow2_open(path, o);
  if (!ok(c != NULL, "%s opens", what))
    diag_errors();
  return c;
}

/* ---- Internals: read_at and the cache on their own ------------------------- */

static void test_internals(void)
{
  uint8_t ten[10] = "0123456789", got[20];
  int fd = open(save_file("ten.bin", ten, 10), O_RDONLY);
  memset(got, 0xff, sizeof got);
  int r = read_at(fd, got, 20, 5);
  static const uint8_t want[20] = "56789";
  ok(r == 0 && memcmp(got, want, 20) == 0, "read_at: bytes past the end of the file read as zero");
  close(fd);

  /* Two files behind two layer ids through one tiny cache: every slice
   * read must come from the right file and offset, however often the
   * sets evict. */
  enum { FSIZE = 1 << 20 };
  uint8_t *a = xmalloc(FSIZE), *b = xmalloc(FSIZE);
  fill_random(a, FSIZE);
  fill_random(b, FSIZE);
  struct layer la, lb;
  memset(&la, 0, sizeof la);
  memset(&lb, 0, sizeof lb);
  la.fd = open(save_file("slices-a.bin", a, FSIZE), O_RDONLY);
  lb.fd = open(save_file("slices-b.bin", b, FSIZE), O_RDONLY);
  la.cache_id = 1;
  lb.cache_id = 2;
  la.file_size = lb.file_size = FSIZE;
  struct meta_cache mc;
  ok(cache_init(&mc, 65536, 512) == 0 && mc.slice_size == 512, "cache_init: a 64 KiB cache of 512-byte slices");
  bool good = true;
  for (int i = 0; good && i < 20000; i++) {
    bool first = rnd() & 1;
    /* Mostly a few hot slices, sometimes anywhere: hits and evictions. */
    uint64_t slice_no = (rnd() & 3) ? rnd_below(24) : rnd_below(FSIZE / 512);
    uint32_t within = (uint32_t) rnd_below(512), count = 1 + (uint32_t) rnd_below(512 - within);
    uint64_t off = slice_no * 512 + within;
    uint8_t buf[512];
    r = cache_read(&mc, first ? &la : &lb, buf, count, off);
    good = r == 0 && memcmp(buf, (first ? a : b) + off, count) == 0;
    if (!good)
      diag("cache_read(%s, %u bytes at %" PRIu64 ") = %d, or wrong bytes", first ? "a" : "b", count, off, r);
  }
  ok(good, "cache_read: 20000 reads from two layers through 128 slots return the right bytes");
  uint8_t buf[600];
  ok(cache_read(&mc, &la, buf, 600, 0) == -EINVAL && cache_read(&mc, &la, buf, 2, 511) == -EINVAL,
     "cache_read: a range crossing a slice boundary is refused");
  cache_free(&mc);
  close(la.fd);
  close(lb.fd);
  free(a);
  free(b);
}

/* ---- Minimal images --------------------------------------------------------- */

static void test_minimal(void)
{
  /* v2, 64 KiB clusters, one data cluster. */
  struct img m;
  img_init(&m, 2, 16, 1 << 20, 0);
  uint8_t *content = xmalloc(m.cs);
  fill_random(content, m.cs);
  img_data(&m, 3, img_alloc(&m, 1), content);
  const char *path = img_save(&m, "minimal-v2.qcow2");
  struct qcow2_chain *c = open_image(path, NULL, "minimal v2 image (options NULL)");
  if (c) {
    ok(qcow2_size(c) == 1 << 20 && qcow2_cluster_size(c) == 65536 && qcow2_depth(c) == 1,
       "v2: size 1 MiB, 64 KiB clusters, depth 1 (got %" PRIu64 ", %u, %u)", qcow2_size(c), qcow2_cluster_size(c),
       qcow2_depth(c));
    check_reads(c, &m, "v2");
    check_status(c, &m, "v2");
    expect_status(c, 0, 1 << 20, 3 * m.cs, QCOW2_ZERO, 0, "v2: unallocated clusters with no backing: zero, depth 0");
    uint8_t b[2];
    ok(qcow2_read(c, b, 2, (1 << 20) - 1) == -EINVAL && qcow2_read(c, b, 1, 1 << 20) == -EINVAL,
       "v2: a read past the end is -EINVAL");
    struct qcow2_status s;
    ok(qcow2_block_status(c, 1 << 20, 1, &s) == -EINVAL && qcow2_block_status(c, 0, 0, &s) == -EINVAL,
       "v2: block status at the end, or of length 0, is -EINVAL");
    ok(qcow2_bitmap_count(c) == 0, "v2: no bitmaps");
    qcow2_close(c);
  }
  free(content);
  img_free(&m);

  /* v3, the smallest clusters, a size that ends mid-cluster, and data
   * in that last partial cluster. */
  img_init(&m, 3, 9, 100000, 0);
  content = xmalloc(m.cs);
  fill_random(content, m.cs);
  uint64_t last = 100000 / 512, host = img_alloc(&m, 1);
  memcpy(m.f + host, content, m.cs);
  set_entry(&m, last, host | QCOW2_L2_COPIED, 0);
  model(&m, last * 512, 100000 - last * 512, content, QCOW2_DATA, 1);
  path = img_save(&m, "minimal-v3.qcow2");
  c = open_image(path, NULL, "minimal v3 image");
  if (c) {
    ok(qcow2_size(c) == 100000 && qcow2_cluster_size(c) == 512 && qcow2_depth(c) == 1,
       "v3: size 100000, 512-byte clusters, depth 1 (got %" PRIu64 ", %u, %u)", qcow2_size(c),
       qcow2_cluster_size(c), qcow2_depth(c));
    check_reads(c, &m, "v3 minimal");
    check_status(c, &m, "v3 minimal");
    expect_status(c, last * 512, 1 << 20, 100000 - last * 512, QCOW2_DATA, 1,
                  "v3 minimal: the partial last cluster is data up to the disk's end");
    qcow2_close(c);
  }
  free(content);
  img_free(&m);
}

/* ---- The main image: every kind of cluster over a raw backing file --------- */

static void test_main(void)
{
  struct img m;
  uint64_t cs = 4096;
  img_init(&m, 3, 12, 6 << 20, 0);
  /* A raw backing file ending mid-cluster 13. */
  uint64_t bsize = 13 * cs + 1000;
  uint8_t *backing = xmalloc(bsize);
  fill_random(backing, bsize);
  save_file("main-backing.raw", backing, bsize);
  img_backing(&m, "main-backing.raw", "raw", backing, NULL, bsize);

  uint8_t *content = xmalloc(cs);
  uint64_t h3 = img_alloc(&m, 1); /* before c0..c2's: c3 is not contiguous with c2 */
  uint64_t h0 = img_alloc(&m, 3);
  for (uint64_t gc = 0; gc < 3; gc++) {
    fill_random(content, cs);
    img_data(&m, gc, h0 + gc * cs, content);
  }
  fill_random(content, cs);
  img_data(&m, 3, h3, content);
  img_zero(&m, 4, 0);
  img_zero(&m, 5, img_alloc(&m, 1)); /* preallocated zero cluster */
  /* c6, c7 unallocated: the backing file shows through. */
  fill_text(content, cs);
  img_compressed(&m, 8, content, false);
  /* c9's compressed data starts at an odd byte and straddles a host
   * cluster boundary. */
  fill_text(content, cs);
  uint8_t cbuf[8192];
  size_t clen = compress_cluster(&m, content, cbuf, sizeof cbuf, false);
  uint64_t two = img_alloc(&m, 2), at = two + cs - clen / 2 - 3;
  img_compressed_at(&m, 9, content, at, cbuf, clen);
  bool straddles = at / cs != (at + clen - 1) / cs;
  fill_random(content, cs);
  img_data(&m, 10, img_alloc(&m, 1), content);
  /* A data cluster without the COPIED flag is still data. */
  fill_random(content, cs);
  uint64_t h20 = img_alloc(&m, 1);
  img_data(&m, 20, h20, content);
  set_entry(&m, 20, h20, 0);
  /* The last cluster of the first L2 table and the first of the second:
   * a read crosses from one table to the next. */
  fill_random(content, cs);
  img_data(&m, 511, img_alloc(&m, 1), content);
  fill_random(content, cs);
  img_data(&m, 512, img_alloc(&m, 1), content);
  /* The third L1 entry stays 0: a whole table unallocated. */
  const char *path = img_save(&m, "main.qcow2");

  ok(straddles, "main: the compressed data of cluster 9 crosses a host cluster boundary (%zu bytes at %" PRIu64 ")",
     clen, at);
  struct qcow2_options o = {0};
  struct qcow2_chain *c = open_image(path, &o, "main image (v3, deflate, raw backing)");
  if (c) {
    ok(qcow2_size(c) == 6 << 20 && qcow2_cluster_size(c) == 4096 && qcow2_depth(c) == 2,
       "main: size 6 MiB, 4 KiB clusters, depth 2");
    check_reads(c, &m, "main");
    check_status(c, &m, "main");
    expect_status(c, 0, 1 << 30, 4 * cs, QCOW2_DATA, 1,
                  "main: contiguous c0-c2 and non-contiguous c3 merge into one data extent");
    expect_status(c, 4 * cs, 1 << 30, 2 * cs, QCOW2_ZERO, 1, "main: zero clusters c4-c5 (one preallocated): zero, depth 1");
    expect_status(c, 6 * cs + 100, 1 << 30, 2 * cs - 100, QCOW2_DATA, 2, "main: unallocated c6-c7 over the raw file: data, depth 2");
    expect_status(c, 8 * cs, 1 << 30, 3 * cs, QCOW2_DATA, 1, "main: compressed c8-c9 merge with data c10");
    expect_status(c, 11 * cs, 1 << 30, 2 * cs + 1000, QCOW2_DATA, 2, "main: backing data up to its end, mid-cluster 13");
    expect_status(c, 13 * cs + 1000, 1 << 30, 7 * cs - 1000, QCOW2_ZERO, 2,
                  "main: past the backing file's end: zero at the backing's depth");
    expect_status(c, 513 * cs, 1 << 30, (6 << 20) - 513 * cs, QCOW2_ZERO, 2,
                  "main: the rest, through an unallocated L2 table, merges into one extent");
    uint8_t buf[16];
    int r = qcow2_read(c, buf, 16, 13 * cs + 992);
    static const uint8_t zeros[8];
    ok(r == 0 && memcmp(buf, backing + 13 * cs + 992, 8) == 0 && memcmp(buf + 8, zeros, 8) == 0,
       "main: a read across the backing file's end: its bytes, then zeroes");
    struct file_list files = {0};
    qcow2_for_each_file(c, note_file, &files);
    ok(files.n == 2 && strcmp(files.names[0], "main.qcow2") == 0 && strcmp(files.names[1], "main-backing.raw") == 0,
       "main: qcow2_for_each_file lists the image, then its backing file");
    qcow2_close(c);
  }

  /* The same image alone: unallocated is zero at depth 0. */
  o.no_backing = true;
  c = open_image(path, &o, "main image with no_backing");
  if (c) {
    ok(qcow2_depth(c) == 1, "no_backing: depth 1");
    uint8_t *buf = xmalloc(3 * cs);
    int r = qcow2_read(c, buf, 3 * cs, 5 * cs);
    bool zero = true;
    for (uint64_t i = 0; i < 3 * cs; i++)
      zero = zero && buf[i] == 0;
    ok(r == 0 && zero, "no_backing: c5-c7 (zero, unallocated) read as zeroes");
    expect_status(c, 6 * cs, 1 << 30, 2 * cs, QCOW2_ZERO, 0, "no_backing: unallocated c6-c7 are zero at depth 0");
    r = qcow2_read(c, buf, cs, 8 * cs);
    ok(r == 0 && memcmp(buf, m.want + 8 * cs, cs) == 0, "no_backing: compressed c8 still reads");
    free(buf);
    qcow2_close(c);
  }
  free(content);
  free(backing);
  img_free(&m);
}

/* ---- zstd over a deflate qcow2 over a raw file: a chain of three ---------- */

static void test_zstd_chain(void)
{
  /* Bottom: raw, 300 KiB. */
  uint64_t rsize = 300 << 10;
  uint8_t *raw = xmalloc(rsize);
  fill_random(raw, rsize);
  save_file("chain-base.raw", raw, rsize);

  /* Middle: v2, deflate, 4 KiB clusters, 512 KiB; its backing format is
   * probed (no extension). */
  struct img b;
  img_init(&b, 2, 12, 512 << 10, 0);
  img_backing(&b, "chain-base.raw", NULL, raw, NULL, rsize);
  uint8_t *content = xmalloc(65536);
  fill_random(content, b.cs);
  img_data(&b, 0, img_alloc(&b, 1), content);
  fill_text(content, b.cs);
  img_compressed(&b, 1, content, false);
  fill_random(content, b.cs);
  img_data(&b, 65, img_alloc(&b, 1), content); /* under the top's unallocated c4 */
  img_save(&b, "chain-mid.qcow2");

  /* Top: v3, zstd, 64 KiB clusters, 1 MiB. */
  struct img m;
  img_init(&m, 3, 16, 1 << 20, IMG_ZSTD);
  img_backing(&m, "chain-mid.qcow2", "qcow2", b.want, b.st, b.size);
  fill_text(content, m.cs);
  img_compressed(&m, 0, content, false);
  fill_text(content, m.cs);
  img_compressed(&m, 1, content, false); /* packed after c0 */
  fill_text(content, m.cs);
  img_compressed(&m, 2, content, true); /* two zstd frames, packed after c1: into the next host cluster */
  fill_random(content, m.cs);
  img_data(&m, 3, img_alloc(&m, 1), content);
  img_zero(&m, 5, 0);
  fill_text(content, m.cs);
  img_compressed(&m, 9, content, false);
  const char *path = img_save(&m, "chain-top.qcow2");
  ok(m.comp_crossings >= 1, "zstd: compressed data of %u cluster(s) crosses a host cluster boundary", m.comp_crossings);

  struct qcow2_chain *c = open_image(path, NULL, "zstd image over a deflate v2 image over a raw file");
  if (c) {
    ok(qcow2_depth(c) == 3 && qcow2_cluster_size(c) == 65536 && qcow2_size(c) == 1 << 20,
       "chain: depth 3, the top's 64 KiB clusters, 1 MiB");
    struct file_list files = {0};
    qcow2_for_each_file(c, note_file, &files);
    ok(files.n == 3 && strcmp(files.names[0], "chain-top.qcow2") == 0 &&
       strcmp(files.names[1], "chain-mid.qcow2") == 0 && strcmp(files.names[2], "chain-base.raw") == 0,
       "chain: qcow2_for_each_file goes top to bottom");
    check_reads(c, &m, "chain");
    check_status(c, &m, "chain");
    expect_status(c, 0, 1 << 30, 4 * m.cs, QCOW2_DATA, 1, "chain: zstd clusters c0-c2 and data c3: data, depth 1");
    expect_status(c, 4 * m.cs + 4096, 1 << 30, 4096, QCOW2_DATA, 2,
                  "chain: under the top's hole, the middle layer's data cluster: depth 2");
    expect_status(c, 4 * m.cs + 300 * 1024 - 256 * 1024, 1 << 30, 20 << 10, QCOW2_ZERO, 3,
                  "chain: past the raw file's end, inside the middle layer: zero at depth 3");
    expect_status(c, 8 * m.cs, 1 << 30, m.cs, QCOW2_ZERO, 2, "chain: past the middle layer's end: zero at depth 2");
    qcow2_close(c);
  }
  free(content);
  free(raw);
  img_free(&b);
  img_free(&m);
}

/* ---- Extended L2 entries ----------------------------------------------------- */

static void test_extended_l2(void)
{
  struct img m;
  img_init(&m, 3, 14, 256 << 10, IMG_EXTL2);
  uint64_t cs = m.cs, sub = cs / 32, bsize = 200 << 10;
  uint8_t *backing = xmalloc(bsize);
  fill_random(backing, bsize);
  save_file("extl2-backing.raw", backing, bsize);
  img_backing(&m, "extl2-backing.raw", "raw", backing, NULL, bsize);
  uint8_t *content = xmalloc(cs);
  uint64_t h = img_alloc(&m, 3);
  fill_random(content, cs);
  /* c0: subclusters 0-3 data, 4-7 zero, 8-15 data, 16-19 backing,
   * 20-23 zero, 24-31 backing. */
  img_sub(&m, 0, h, 0x0000ff0f, 0x00f000f0, content);
  /* c1: no host cluster; alternate zero and backing. */
  img_sub(&m, 1, 0, 0, 0x0f0f0f0f, content);
  /* c2: whole, at the host cluster after c0's (a run of data can go on). */
  fill_random(content, cs);
  img_sub(&m, 2, h + cs, 0xffffffff, 0, content);
  /* c3: first half backing, second half data, host not contiguous. */
  fill_random(content, cs);
  img_sub(&m, 3, h + 2 * cs, 0xffff0000, 0, content);
  /* c4: compressed; c5: all zero; c6: first and last subcluster only. */
  fill_text(content, cs);
  img_compressed(&m, 4, content, false);
  img_zero(&m, 5, 0);
  fill_random(content, cs);
  img_sub(&m, 6, img_alloc(&m, 1), 0x80000001, 0, content);
  const char *path = img_save(&m, "extl2.qcow2");

  struct qcow2_chain *c = open_image(path, NULL, "image with extended L2 entries");
  if (c) {
    ok(qcow2_cluster_size(c) == 16384, "extl2: 16 KiB clusters");
    check_reads(c, &m, "extl2");
    check_status(c, &m, "extl2");
    expect_status(c, 0, cs, 4 * sub, QCOW2_DATA, 1, "extl2: allocated subclusters 0-3: data, depth 1");
    expect_status(c, 4 * sub, cs, 4 * sub, QCOW2_ZERO, 1, "extl2: zero subclusters 4-7");
    expect_status(c, 16 * sub + 5, cs, 4 * sub - 5, QCOW2_DATA, 2, "extl2: unallocated subclusters 16-19: the backing's data");
    expect_status(c, 2 * cs, 1 << 20, cs, QCOW2_DATA, 1, "extl2: c2 ends where c3's unallocated half begins");
    expect_status(c, 3 * cs + cs / 2, 1 << 20, cs / 2 + cs, QCOW2_DATA, 1,
                  "extl2: c3's allocated half merges with compressed c4");
    qcow2_close(c);
  }
  free(content);
  free(backing);
  img_free(&m);
}

/* Two layers whose compressed clusters have the same descriptor (same
 * host offset and sector count, in different files): the thread's held
 * decompressed cluster must not be taken for the other layer's. */
static void test_same_descriptor(void)
{
  struct img b, m;
  uint64_t cs = 4096;
  uint8_t content[4096], cbuf[8192];
  img_init(&b, 3, 12, 64 << 10, 0);
  img_init(&m, 3, 12, 64 << 10, 0);
  /* Same allocations in both: header, L1, L2, then the compressed area. */
  l2_entry_at(&b, 0);
  l2_entry_at(&m, 0);
  uint64_t at = img_alloc(&b, 2) + 100;
  img_alloc(&m, 2);
  fill_text(content, cs);
  img_compressed_at(&b, 1, content, at, cbuf, compress_cluster(&b, content, cbuf, sizeof cbuf, false));
  img_backing(&m, "same-desc-base.qcow2", "qcow2", b.want, b.st, b.size);
  fill_text(content, cs);
  img_compressed_at(&m, 0, content, at, cbuf, compress_cluster(&m, content, cbuf, sizeof cbuf, false));
  /* The largest sector count in both: the descriptors are then equal. */
  uint64_t d = QCOW2_L2_COMPRESSED | 15ull << (62 - 4) | at;
  set_entry(&b, 1, d, 0);
  set_entry(&m, 0, d, 0);
  img_save(&b, "same-desc-base.qcow2");
  const char *path = img_save(&m, "same-desc.qcow2");
  struct qcow2_chain *c = open_image(path, NULL, "two layers with equal compressed descriptors");
  if (c) {
    expect_good(c, &m, 0, cs, "same descriptor: the top's compressed c0");
    expect_good(c, &m, cs, cs, "same descriptor: c1, the backing's compressed cluster, right after");
    expect_good(c, &m, 100, 2 * cs - 200, "same descriptor: both in one read");
    check_reads(c, &m, "same descriptor");
    qcow2_close(c);
  }
  img_free(&b);
  img_free(&m);
}

/* An 8 TiB disk with no L2 table at all: block status is bounded per
 * call, so walking it takes few calls, each of them zero at depth 0. */
static void test_huge_empty(void)
{
  struct img m;
  uint64_t size = 8ull << 40;
  img_init(&m, 3, 16, size, IMG_NOMODEL);
  const char *path = img_save(&m, "huge.qcow2");
  struct qcow2_chain *c = open_image(path, NULL, "an empty 8 TiB image");
  if (c == NULL)
    return;
  uint64_t off = 0;
  unsigned calls = 0;
  bool good = true;
  while (good && off < size && calls < 100000) {
    struct qcow2_status s;
    int r = qcow2_block_status(c, off, size - off, &s);
    good = r == 0 && s.kind == QCOW2_ZERO && s.depth == 0 && s.length > 0 && s.length <= size - off;
    if (!good)
      diag("at %" PRIu64 ": r=%d, %" PRIu64 " bytes of %s at depth %u", off, r, s.length, kind_name(s.kind), s.depth);
    off += s.length;
    calls++;
  }
  ok(good && off == size && calls < 10000, "huge: block status walks 8 TiB of nothing in %u calls", calls);
  uint8_t buf[512];
  memset(buf, 1, sizeof buf);
  ok(qcow2_read(c, buf, 512, size - 512) == 0 && buf[0] == 0 && buf[511] == 0, "huge: its last sector reads as zeroes");
  qcow2_close(c);
  img_free(&m);
}

/* ---- Corrupt metadata found while reading: -EIO for that read only -------- */

static bool logged(const char *needle) { return strstr(errors, needle) != NULL; }

static void expect_eio(struct qcow2_chain *c, uint64_t off, uint64_t len, const char *reason, const char *what)
{
  uint8_t *buf = xmalloc(len);
  clear_logs();
  int r = qcow2_read(c, buf, len, off);
  if (!ok(r == -EIO && logged(reason), "%s: -EIO, and the message says \"%s\"", what, reason)) {
    diag("qcow2_read returned %d", r);
    diag_errors();
  }
  free(buf);
}

static void test_corrupt(void)
{
  struct img m;
  uint64_t cs = 4096;
  img_init(&m, 3, 12, 4 << 20, 0);
  uint8_t *content = xmalloc(cs);
  for (uint64_t gc = 0; gc < 3; gc++) {
    fill_random(content, cs);
    img_data(&m, gc, img_alloc(&m, 1), content);
  }
  /* c1: its data offset is 512 bytes past a cluster boundary. */
  uint64_t d1 = get_be64(m.f + l2_entry_at(&m, 1));
  set_entry(&m, 1, d1 + 512, 0);
  /* c3: data far past the end of the file. */
  set_entry(&m, 3, (1ull << 40) | QCOW2_L2_COPIED, 0);
  /* c4: "compressed" junk; c5: a good compressed cluster. */
  uint64_t junk = img_alloc(&m, 1);
  fill_random(m.f + junk, cs);
  set_entry(&m, 4, compressed_descriptor(&m, junk + 100, 1500), 0);
  fill_text(content, cs);
  img_compressed(&m, 5, content, false);
  fill_random(content, cs);
  img_data(&m, 6, img_alloc(&m, 1), content);
  /* The second L1 entry: an L2 table offset that is not cluster aligned. */
  uint64_t t = img_alloc(&m, 1);
  put64(m.f + m.l1_off + 8, (t + 512) | QCOW2_L2_COPIED);
  const char *path = img_save(&m, "corrupt.qcow2");

  struct qcow2_chain *c = open_image(path, NULL, "image with corrupt L2 entries (checked only when read)");
  if (c == NULL)
    return;
  expect_good(c, &m, 0, cs, "corrupt: c0 reads");
  expect_eio(c, cs, cs, "data cluster offset is not cluster aligned", "corrupt: c1 (unaligned data offset)");
  expect_eio(c, cs + 100, 10, "not cluster aligned", "corrupt: 10 bytes inside c1");
  expect_eio(c, 0, 3 * cs, "not cluster aligned", "corrupt: c0-c2 (a read that includes c1)");
  expect_good(c, &m, 2 * cs, cs, "corrupt: c2 still reads after c1 failed");
  expect_good(c, &m, cs - 10, 10, "corrupt: the last bytes of c0, just before c1");
  expect_eio(c, 3 * cs, cs, "past the end of the file", "corrupt: c3 (data past the end of the file)");
  expect_eio(c, 4 * cs, cs, "does not decompress", "corrupt: c4 (junk compressed data)");
  expect_good(c, &m, 5 * cs, cs, "corrupt: compressed c5 reads after c4 failed");
  expect_eio(c, 4 * cs + 7, 1, "does not decompress", "corrupt: c4 again, after a good compressed cluster");
  expect_good(c, &m, 5 * cs + 123, 456, "corrupt: part of c5 again");
  expect_eio(c, 2 << 20, 512, "L2 table offset is not cluster aligned", "corrupt: a read through an unaligned L2 table");
  expect_good(c, &m, (2 << 20) - 100, 100, "corrupt: the bytes just before that L2 table's range");

  struct qcow2_status s;
  clear_logs();
  ok(qcow2_block_status(c, cs, cs, &s) == -EIO, "corrupt: block status of c1 is -EIO");
  ok(qcow2_block_status(c, 2 << 20, 4096, &s) == -EIO, "corrupt: block status through the unaligned L2 table is -EIO");
  expect_status(c, 2 * cs, cs, cs, QCOW2_DATA, 1, "corrupt: block status of c2 alone still works");
  /* A query that starts on good data and runs into a bad entry should
   * report the good part (the client then asks again at the bad one and
   * gets the error), as qemu does, rather than failing outright. */
  expect_status(c, 0, 3 * cs, cs, QCOW2_DATA, 1, "corrupt: block status from c0 stops before c1 instead of failing");
  expect_status(c, 5 * cs, 1 << 30, 2 * cs, QCOW2_DATA, 1,
                "corrupt: block status from c5 covers c5-c6 (the unaligned table is past them)");
  expect_good(c, &m, 0, cs, "corrupt: after all that, c0 still reads");
  qcow2_close(c);
  free(content);
  img_free(&m);
}

/* ---- Images refused at open --------------------------------------------------- */

struct refusal {
  const char *what;
  void (*patch)(uint8_t *f);
  const char *reason; /* expected in the error message */
};

static void bad_magic(uint8_t *f) { f[3] = 0; }
static void bad_version(uint8_t *f) { put32(f + 4, 4); }
static void unknown_incompat(uint8_t *f)
{
  put64(f + 72, 1ull << 5);
  /* Its name in the feature name table: the message should quote it. */
  put32(f + 104, QCOW2_EXT_FEATURE_NAMES);
  put32(f + 108, 48);
  f[112] = 0;
  f[113] = 5;
  memcpy(f + 114, "frobnication", 12);
}
static void encrypted_aes(uint8_t *f) { put32(f + 32, 1); }
static void encrypted_luks(uint8_t *f)
{
  put32(f + 32, 2);
  put32(f + 104, QCOW2_EXT_CRYPTO);
  put32(f + 108, 16);
}
static void marked_corrupt(uint8_t *f) { put64(f + 72, QCOW2_INCOMPAT_CORRUPT); }
static void cluster_bits_8(uint8_t *f) { put32(f + 20, 8); }
static void cluster_bits_22(uint8_t *f) { put32(f + 20, 22); }
static void l1_too_small(uint8_t *f) { put32(f + 36, 0); }
static void l1_unaligned(uint8_t *f) { put64(f + 40, get_be64(f + 40) + 8); }
static void l1_past_end(uint8_t *f) { put64(f + 40, 1ull << 30); }
static void l1_in_header(uint8_t *f) { put64(f + 40, 0); }
static void extl2_small_clusters(uint8_t *f) { put64(f + 72, QCOW2_INCOMPAT_EXTL2); }
static void compression_without_bit(uint8_t *f)
{
  put32(f + 100, 112);
  f[104] = 1;
}
static void unknown_compression(uint8_t *f)
{
  put64(f + 72, QCOW2_INCOMPAT_COMPRESSION);
  put32(f + 100, 112);
  f[104] = 2;
}
static void short_header_length(uint8_t *f) { put32(f + 100, 72); }
static void backing_vmdk(uint8_t *f)
{
  put64(f + 8, 2048);
  put32(f + 16, 4);
  memcpy(f + 2048, "x.raw", 4);
  put32(f + 104, QCOW2_EXT_BACKING_FORMAT);
  put32(f + 108, 4);
  memcpy(f + 112, "vmdk", 4);
}
static void backing_missing(uint8_t *f)
{
  put64(f + 8, 2048);
  put32(f + 16, 11);
  memcpy(f + 2048, "missing.raw", 11);
}
static void backing_name_out_of_bounds(uint8_t *f)
{
  put64(f + 8, 4090);
  put32(f + 16, 100);
}
static void backing_loop(uint8_t *f)
{
  put64(f + 8, 2048);
  put32(f + 16, 10);
  memcpy(f + 2048, "refuse.img", 10); /* every case is saved under this name */
}
static void refcount_order_7(uint8_t *f) { put32(f + 96, 7); }

static void test_refusals(void)
{
  static const struct refusal cases[] = {
    {"bad magic", bad_magic, "not a qcow2 image"},
    {"version 4", bad_version, "version 4 is not supported"},
    {"an unknown incompatible feature bit", unknown_incompat, "unknown incompatible feature (bit 5, \"frobnication\""},
    {"AES encryption", encrypted_aes, "encrypted (AES)"},
    {"LUKS encryption", encrypted_luks, "encrypted (LUKS)"},
    {"the corrupt bit", marked_corrupt, "marked corrupt"},
    {"cluster_bits 8", cluster_bits_8, "cluster_bits 8 is out of range"},
    {"cluster_bits 22", cluster_bits_22, "cluster_bits 22 is out of range"},
    {"an L1 table too small for the disk", l1_too_small, "L1 table has 0 entries; the virtual size needs 1"},
    {"an unaligned L1 table", l1_unaligned, "not cluster aligned"},
    {"an L1 table past the end of the file", l1_past_end, "lies past the end"},
    {"an L1 table in the header cluster", l1_in_header, "inside the header cluster"},
    {"extended L2 entries with 4 KiB clusters", extl2_small_clusters, "clusters of at least 16 KiB"},
    {"compression_type 1 without its feature bit", compression_without_bit, "feature bit is clear"},
    {"compression type 2", unknown_compression, "compression type 2 is not supported"},
    {"a v3 header_length of 72", short_header_length, "header_length 72 is out of range"},
    {"backing format vmdk", backing_vmdk, "format 'vmdk' is not supported"},
    {"a missing backing file", backing_missing, "missing.raw: No such file"},
    {"a backing name past the header cluster", backing_name_out_of_bounds, "out of bounds"},
    {"an image that is its own backing file", backing_loop, "backing chain loops"},
    {"refcount_order 7", refcount_order_7, "refcount_order 7"},
  };
  struct img m;
  img_init(&m, 3, 12, 64 << 10, IMG_NOMODEL);
  uint8_t content[4096];
  fill_random(content, sizeof content);
  img_data(&m, 0, img_alloc(&m, 1), content);
  uint8_t *copy = xmalloc(m.len);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    memcpy(copy, m.f, m.len);
    cases[i].patch(copy);
    const char *path = save_file("refuse.img", copy, m.len);
    clear_logs();
    struct qcow2_chain *c = qcow2_open(path, NULL);
    if (!ok(c == NULL && logged(cases[i].reason), "refused: %s, saying \"%s\"", cases[i].what, cases[i].reason))
      diag_errors();
    qcow2_close(c);
  }

  /* The unpatched image opens: the refusals are the patches' doing. */
  const char *path = save_file("refuse.img", m.f, m.len);
  struct qcow2_chain *c = open_image(path, NULL, "the unpatched base of the refusal cases");
  qcow2_close(c);

  /* The dirty bit is only a note: refcounts do not matter to a reader. */
  memcpy(copy, m.f, m.len);
  put64(copy + 72, QCOW2_INCOMPAT_DIRTY);
  path = save_file("dirty.qcow2", copy, m.len);
  c = open_image(path, NULL, "an image with the dirty bit");
  ok(strstr(debugs, "dirty bit") != NULL && errors_len == 0, "dirty bit: a debug message, no error");
  qcow2_close(c);

  /* Too short for a header. */
  path = save_file("tiny.qcow2", m.f, 40);
  clear_logs();
  c = qcow2_open(path, NULL);
  if (!ok(c == NULL && logged("too short"), "refused: a 40-byte file, saying \"too short\""))
    diag_errors();
  qcow2_close(c);
  clear_logs();
  c = qcow2_open(path_in_dir("does-not-exist.qcow2"), NULL);
  if (!ok(c == NULL && logged("No such file"), "refused: a missing image"))
    diag_errors();
  qcow2_close(c);

  /* A FIFO as the image, and as a backing file: refused, without
   * blocking in open (the wrapper's time limit catches a hang). */
  const char *fifo = path_in_dir("fifo");
  if (mkfifo(fifo, 0600) == 0) {
    clear_logs();
    c = qcow2_open(fifo, NULL);
    if (!ok(c == NULL && logged("not a regular file"), "refused: a FIFO as the image"))
      diag_errors();
    qcow2_close(c);
    memcpy(copy, m.f, m.len);
    put64(copy + 8, 2048);
    put32(copy + 16, 4);
    memcpy(copy + 2048, "fifo", 4);
    clear_logs();
    c = qcow2_open(save_file("fifo-backed.qcow2", copy, m.len), NULL);
    if (!ok(c == NULL && logged("not a regular file"), "refused: a FIFO as the backing file"))
      diag_errors();
    qcow2_close(c);
  } else
    diag("mkfifo: %s", strerror(errno));
  clear_logs();
  c = qcow2_open("/dev/null", NULL);
  if (!ok(c == NULL && logged("not a regular file"), "refused: a character device (/dev/null) as the image"))
    diag_errors();
  qcow2_close(c);

  /* A snapshot asked of an image that has none. */
  struct qcow2_options o = {.snapshot = "1"};
  clear_logs();
  c = qcow2_open(path_in_dir("refuse.img"), &o);
  if (!ok(c == NULL && logged("has no internal snapshots"), "refused: snapshot=1 of an image without snapshots"))
    diag_errors();
  qcow2_close(c);
  free(copy);
  img_free(&m);
}

/* ---- Persistent bitmaps ------------------------------------------------------- */

static bool bit_of(const uint8_t *bits, uint64_t n) { return (bits[n / 8] >> (n % 8)) & 1; }
static void set_bits(uint8_t *bits, uint64_t from, uint64_t to)
{
  for (uint64_t n = from; n < to; n++)
    bits[n / 8] |= (uint8_t) (1u << (n % 8));
}

/* The model's bitmap run from off: up to the first granule whose bit
 * differs, clipped to off + max and the disk's end. */
static void bitmap_expect(const uint8_t *bits, uint64_t nbits, unsigned g, uint64_t size, uint64_t off, uint64_t max,
                          uint64_t *len, bool *dirty)
{
  uint64_t end = max < size - off ? off + max : size, n = off >> g;
  *dirty = bit_of(bits, n);
  while (n < nbits && (n << g) < end && bit_of(bits, n) == *dirty)
    n++;
  *len = ((n << g) < end ? n << g : end) - off;
}

static void expect_bitmap(struct qcow2_chain *c, uint64_t off, uint64_t max, uint64_t len, bool dirty, const char *what)
{
  uint64_t got_len = 0;
  bool got_dirty = !dirty;
  int r = qcow2_bitmap_status(c, 0, off, max, &got_len, &got_dirty);
  if (!ok(r == 0 && got_len == len && got_dirty == dirty, "%s", what))
    diag("got r=%d, %" PRIu64 " bytes %s; expected %" PRIu64 " bytes %s", r, got_len, got_dirty ? "dirty" : "clean", len,
         dirty ? "dirty" : "clean");
}

static void test_bitmaps(void)
{
  /* 8 KiB clusters (two 4 KiB cache slices each), 512-byte granules: one
   * table entry covers 65536 granules (32 MiB); four entries, the last
   * granule partial. */
  enum { G = 9 };
  uint64_t size = (112ull << 20) + 1000, nbits = (size + 511) >> G, per_entry = 8192 * 8;
  struct img m;
  img_init(&m, 3, 13, size, IMG_NOMODEL);
  uint8_t *bits = xcalloc(4 * per_entry / 8);
  set_bits(bits, 100, 108);
  set_bits(bits, 200, 201);
  set_bits(bits, 1000, 2000);
  set_bits(bits, 32760, 32781); /* across the slice boundary inside entry 0's cluster */
  set_bits(bits, 65530, 65536); /* entry 0's tail, then entry 1: all ones */
  set_bits(bits, per_entry, 2 * per_entry);
  /* entry 2 all clear */
  set_bits(bits, 3 * per_entry + 5, 3 * per_entry + 10);
  for (uint64_t n = 200000; n < 200300; n++)
    if (rnd() & 1)
      set_bits(bits, n, n + 1);
  set_bits(bits, nbits - 2, nbits);

  uint64_t table = img_alloc(&m, 1);
  for (uint64_t e = 0; e < 4; e++) {
    uint64_t entry;
    if (e == 1)
      entry = 1; /* offset 0, bit 0: every bit set, no cluster */
    else if (e == 2)
      entry = 0; /* offset 0: every bit clear */
    else {
      entry = img_alloc(&m, 1);
      memcpy(m.f + entry, bits + e * per_entry / 8, 8192);
    }
    put64(m.f + table + e * 8, entry);
  }
  uint64_t dir = img_alloc(&m, 1);
  uint8_t *d = m.f + dir;
  put64(d, table); /* "good": auto, dirty tracking, 512-byte granules */
  put32(d + 8, 4);
  put32(d + 12, 2);
  d[16] = 1;
  d[17] = G;
  put16(d + 18, 4);
  memcpy(d + 24, "good", 4);
  d += 32;
  put64(d, 0); /* "busy": in use, so never looked at further */
  put32(d + 8, 1);
  put32(d + 12, 1);
  d[16] = 1;
  d[17] = 16;
  put16(d + 18, 4);
  memcpy(d + 24, "busy", 4);
  uint8_t ext[24] = {0};
  put32(ext, 2);
  put64(ext + 8, 64);
  put64(ext + 16, dir);
  img_ext(&m, QCOW2_EXT_BITMAPS, ext, sizeof ext);
  put64(m.f + 88, QCOW2_AUTOCLEAR_BITMAPS);
  const char *path = img_save(&m, "bitmaps.qcow2");

  struct qcow2_chain *c = open_image(path, NULL, "image with a bitmap directory");
  if (c == NULL)
    return;
  ok(qcow2_bitmap_count(c) == 2 && strcmp(qcow2_bitmap_name(c, 0), "good") == 0 &&
     strcmp(qcow2_bitmap_name(c, 1), "busy") == 0, "bitmaps: both listed, by name");
  if (!ok(qcow2_bitmap_problem(c, 0) == NULL && qcow2_bitmap_granularity(c, 0) == 512,
          "bitmaps: \"good\" is usable, 512-byte granularity"))
    diag("problem: %s", qcow2_bitmap_problem(c, 0));
  const char *p = qcow2_bitmap_problem(c, 1);
  ok(p && strstr(p, "in use"), "bitmaps: \"busy\" is not usable: %s", p ? p : "(null)");
  uint64_t len;
  bool dirty;
  ok(qcow2_bitmap_status(c, 1, 0, 512, &len, &dirty) == -EINVAL, "bitmaps: status of the in-use bitmap is -EINVAL");
  ok(qcow2_bitmap_status(c, 0, size, 512, &len, &dirty) == -EINVAL, "bitmaps: status at the disk's end is -EINVAL");

  expect_bitmap(c, 0, size, 100 * 512, false, "bitmaps: clean up to granule 100");
  expect_bitmap(c, 100 * 512, size, 8 * 512, true, "bitmaps: granules 100-107 dirty");
  expect_bitmap(c, 100 * 512 + 17, 1000, 1000, true, "bitmaps: mid-granule start, bounded by max_length");
  expect_bitmap(c, 108 * 512 - 1, size, 1, true, "bitmaps: the last byte of a dirty granule");
  expect_bitmap(c, 108 * 512, size, 92 * 512, false, "bitmaps: clean from the granule boundary after it");
  expect_bitmap(c, 200 * 512 + 511, size, 1, true, "bitmaps: the last byte of a lone dirty granule");
  expect_bitmap(c, 32760 * 512, size, 21 * 512, true, "bitmaps: a dirty run across a cache slice boundary");
  expect_bitmap(c, 65530 * 512, size, (2 * per_entry - 65530) * 512, true,
                "bitmaps: a data cluster's dirty tail merges with an all-ones entry");
  expect_bitmap(c, 2 * per_entry * 512 - 1, size, 1, true, "bitmaps: the last byte of the all-ones entry");
  expect_bitmap(c, 2 * per_entry * 512, size, (per_entry + 5) * 512, false,
                "bitmaps: an all-zero entry merges with the clean start of the next");
  expect_bitmap(c, (nbits - 2) * 512, size, size - (nbits - 2) * 512, true,
                "bitmaps: the dirty end stops at the disk's end, inside the last granule");
  expect_bitmap(c, size - 1, 1 << 20, 1, true, "bitmaps: the disk's last byte");

  char why[256] = "";
  bool good = true;
  unsigned steps = 0;
  for (uint64_t off = 0; good && off < size; steps++) {
    uint64_t want_len;
    bool want_dirty;
    bitmap_expect(bits, nbits, G, size, off, size - off, &want_len, &want_dirty);
    int r = qcow2_bitmap_status(c, 0, off, size - off, &len, &dirty);
    good = r == 0 && len == want_len && dirty == want_dirty;
    if (!good)
      snprintf(why, sizeof why, "at %" PRIu64 ": r=%d, %" PRIu64 " %s; expected %" PRIu64 " %s", off, r, len,
               dirty ? "dirty" : "clean", want_len, want_dirty ? "dirty" : "clean");
    off += want_len;
  }
  if (!ok(good, "bitmaps: walking the whole disk gives the model's %u runs", steps))
    diag("%s", why);
  good = true;
  for (int i = 0; good && i < 2000; i++) {
    /* Near the interesting places half the time. */
    static const uint64_t spots[] = {100, 200, 1000, 2000, 32768, 65530, 65536, 131072, 196608, 200000, 229376};
    uint64_t off = (rnd() & 1) ? spots[rnd_below(11)] * 512 + rnd_below(4096) - 2048 : rnd_below(size);
    if (off >= size)
      off = size - 1;
    uint64_t max = 1 + rnd_below(rnd() & 1 ? 8192 : size), want_len;
    bool want_dirty;
    bitmap_expect(bits, nbits, G, size, off, max, &want_len, &want_dirty);
    int r = qcow2_bitmap_status(c, 0, off, max, &len, &dirty);
    good = r == 0 && len == want_len && dirty == want_dirty;
    if (!good)
      snprintf(why, sizeof why, "at %" PRIu64 " max %" PRIu64 ": r=%d, %" PRIu64 " %s; expected %" PRIu64 " %s", off, max,
               r, len, dirty ? "dirty" : "clean", want_len, want_dirty ? "dirty" : "clean");
  }
  if (!ok(good, "bitmaps: 2000 random queries agree with the model"))
    diag("%s", why);
  qcow2_close(c);

  /* Without the autoclear bit the bitmaps are not trusted: none listed. */
  uint8_t *copy = xmalloc(m.len);
  memcpy(copy, m.f, m.len);
  put64(copy + 88, 0);
  c = open_image(save_file("bitmaps-stale.qcow2", copy, m.len), NULL, "bitmaps without the autoclear bit");
  ok(c && qcow2_bitmap_count(c) == 0, "bitmaps: none listed when the autoclear bit is clear");
  qcow2_close(c);
  free(copy);
  free(bits);
  img_free(&m);
}

/* ---- Internal snapshots -------------------------------------------------------- */

struct snap {
  const char *id, *name;
  uint64_t disk_size;
  uint32_t extra; /* 0, 16 or 24 bytes of extra data */
  uint32_t l1_size;
  uint64_t gcs[2]; /* guest clusters holding data (0: c0 only) */
  uint8_t *content[2];
};

static void test_snapshots(void)
{
  struct img m;
  uint64_t cs = 4096;
  img_init(&m, 3, 12, 64 << 10, 0);
  uint8_t *active = xmalloc(cs);
  fill_random(active, cs);
  img_data(&m, 0, img_alloc(&m, 1), active);
  struct snap snaps[] = {
    {"1", "before", 24 << 10, 16, 1, {0, 0}, {NULL, NULL}},
    {"2", "1", 128 << 10, 24, 1, {0, 24}, {NULL, NULL}}, /* larger than the active disk */
    {"3", "old", 0, 0, 1, {0, 0}, {NULL, NULL}}, /* no size recorded: the image's */
    {"4", "bad", 64 << 10, 16, 0, {0, 0}, {NULL, NULL}}, /* L1 too small for its size */
  };
  enum { NSNAPS = sizeof snaps / sizeof snaps[0] };
  uint64_t table = img_alloc(&m, 1), pos = table;
  for (unsigned i = 0; i < NSNAPS; i++) {
    struct snap *s = &snaps[i];
    uint64_t l1 = img_alloc(&m, 1), l2 = img_alloc(&m, 1);
    put64(m.f + l1, l2 | QCOW2_L2_COPIED);
    for (unsigned k = 0; k < 2; k++) {
      if (k == 1 && s->gcs[1] == 0)
        break;
      s->content[k] = xmalloc(cs);
      fill_random(s->content[k], cs);
      uint64_t h = img_alloc(&m, 1);
      memcpy(m.f + h, s->content[k], cs);
      put64(m.f + l2 + s->gcs[k] * 8, h | QCOW2_L2_COPIED);
    }
    uint8_t *e = m.f + pos;
    put64(e, l1);
    put32(e + 8, s->l1_size);
    put16(e + 12, (uint16_t) strlen(s->id));
    put16(e + 14, (uint16_t) strlen(s->name));
    put32(e + 36, s->extra);
    if (s->extra >= 16)
      put64(e + 40 + 8, s->disk_size);
    memcpy(e + 40 + s->extra, s->id, strlen(s->id));
    memcpy(e + 40 + s->extra + strlen(s->id), s->name, strlen(s->name));
    pos += (40 + s->extra + strlen(s->id) + strlen(s->name) + 7) & ~7ull;
  }
  put32(m.f + 60, NSNAPS);
  put64(m.f + 64, table);
  const char *path = img_save(&m, "snapshots.qcow2");

  /* want, by snapshot: its id/name to ask for, the one expected, its size. */
  static const struct { const char *want; unsigned index; uint64_t size; } picks[] = {
    {"1", 0, 24 << 10}, /* the id "1" wins over the snapshot named "1" */
    {"before", 0, 24 << 10},
    {"2", 1, 128 << 10},
    {"old", 2, 64 << 10},
  };
  uint8_t *buf = xmalloc(cs);
  for (size_t i = 0; i < sizeof picks / sizeof picks[0]; i++) {
    struct qcow2_options o = {.snapshot = picks[i].want};
    char what[96];
    snprintf(what, sizeof what, "snapshot=%s", picks[i].want);
    struct qcow2_chain *c = open_image(path, &o, what);
    if (c == NULL)
      continue;
    const struct snap *s = &snaps[picks[i].index];
    ok(qcow2_size(c) == picks[i].size, "snapshot=%s: snapshot %s, its size %" PRIu64 " (got %" PRIu64 ")",
       picks[i].want, s->id, picks[i].size, qcow2_size(c));
    int r = qcow2_read(c, buf, cs, 0);
    ok(r == 0 && memcmp(buf, s->content[0], cs) == 0, "snapshot=%s: cluster 0 holds the snapshot's data", picks[i].want);
    if (s->gcs[1]) {
      r = qcow2_read(c, buf, cs, s->gcs[1] * cs);
      ok(r == 0 && memcmp(buf, s->content[1], cs) == 0,
         "snapshot=%s: a cluster past the active disk's end holds the snapshot's data", picks[i].want);
      r = qcow2_read(c, buf, 1, picks[i].size - 1);
      ok(r == 0 && buf[0] == 0 && qcow2_read(c, buf, 1, picks[i].size) == -EINVAL,
         "snapshot=%s: the last byte reads, the next is out of range", picks[i].want);
    } else {
      ok(qcow2_read(c, buf, 1, picks[i].size) == -EINVAL, "snapshot=%s: a read at its end is -EINVAL", picks[i].want);
    }
    expect_status(c, 0, 1 << 30, cs, QCOW2_DATA, 1, "snapshot: cluster 0 is data");
    ok(qcow2_bitmap_count(c) == 0, "snapshot=%s: no bitmaps for a snapshot", picks[i].want);
    qcow2_close(c);
  }
  struct qcow2_chain *c = open_image(path, NULL, "snapshot image, active state");
  if (c) {
    ok(qcow2_size(c) == 64 << 10 && qcow2_read(c, buf, cs, 0) == 0 && memcmp(buf, active, cs) == 0,
       "active state: 64 KiB, its own cluster 0");
    qcow2_close(c);
  }
  struct qcow2_options o = {.snapshot = "nope"};
  clear_logs();
  c = qcow2_open(path, &o);
  if (!ok(c == NULL && logged("no snapshot has the id or name 'nope'") && logged("1 (before), 2 (1), 3 (old)"),
     "snapshot=nope: refused, listing the snapshots"))
    diag_errors();
  qcow2_close(c);
  o.snapshot = "bad";
  clear_logs();
  c = qcow2_open(path, &o);
  if (!ok(c == NULL && logged("snapshot's L1 table has 0 entries"), "snapshot=bad: its L1 table is too small for its size"))
    diag_errors();
  qcow2_close(c);
  for (unsigned i = 0; i < NSNAPS; i++) {
    free(snaps[i].content[0]);
    free(snaps[i].content[1]);
  }
  free(buf);
  free(active);
  img_free(&m);
}

/* ---- The metadata cache under pressure, and threads ----------------------------- */

struct worker {
  struct qcow2_chain *chain;
  const struct img *m;
  uint64_t start, len; /* the worker's own region */
  uint64_t seed;
  unsigned reads, bad_reads, statuses, bad_statuses;
  char why[256];
};

static void *worker_run(void *arg)
{
  struct worker *w = arg;
  const struct img *m = w->m;
  uint8_t *buf = xmalloc(8192);
  for (int i = 0; i < 3000; i++) {
    /* Mostly the own region; every fourth read anywhere, so threads
     * also meet in the same cache sets and L2 tables. */
    bool own = i % 4 != 0;
    uint64_t base = own ? w->start : 0, span = own ? w->len : m->size;
    uint64_t off = base + rng_next(&w->seed) % span;
    uint64_t room = base + span - off, len = 1 + rng_next(&w->seed) % (room < 8192 ? room : 8192);
    int r = qcow2_read(w->chain, buf, len, off);
    w->reads++;
    if (r != 0 || memcmp(buf, m->want + off, len) != 0) {
      if (w->bad_reads++ == 0)
        snprintf(w->why, sizeof w->why, "read of %" PRIu64 " bytes at %" PRIu64 ": r=%d or wrong bytes", len, off, r);
    }
    if (i % 3 == 0) {
      struct qcow2_status s;
      uint64_t max = 1 + rng_next(&w->seed) % (room < 65536 ? room : 65536);
      r = qcow2_block_status(w->chain, off, max, &s);
      uint64_t want = model_run(m->st, m->size, off, max);
      w->statuses++;
      if (r != 0 || s.length != want || s.kind != ST_KIND(m->st[off]) || s.depth != ST_DEPTH(m->st[off])) {
        if (w->bad_statuses++ == 0 && w->bad_reads == 0)
          snprintf(w->why, sizeof w->why, "block status at %" PRIu64 ": r=%d, %" PRIu64 " bytes", off, r, s.length);
      }
    }
  }
  free(buf);
  return NULL;
}

static void test_cache_and_threads(void)
{
  /* 512-byte clusters: 64 entries per L2 table, so an 8 MiB disk has 256
   * L2 tables (128 KiB of them) against a 64 KiB cache. */
  struct img m;
  uint64_t cs = 512;
  img_init(&m, 3, 9, 8 << 20, 0);
  uint64_t n = m.size / cs;
  uint64_t *order = xmalloc(n * sizeof *order);
  for (uint64_t i = 0; i < n; i++)
    order[i] = i;
  for (uint64_t i = n - 1; i > 0; i--) { /* shuffled: L2 tables and data interleave, hosts out of order */
    uint64_t j = rnd_below(i + 1), t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  uint8_t content[512];
  unsigned kinds[4] = {0};
  for (uint64_t i = 0; i < n; i++) {
    uint64_t gc = order[i], pick = rnd_below(10);
    if (pick < 6) {
      fill_random(content, cs);
      l2_entry_at(&m, gc); /* the table first, so data lands after it */
      img_data(&m, gc, img_alloc(&m, 1), content);
    } else if (pick < 8) {
      fill_text(content, cs);
      img_compressed(&m, gc, content, false);
    } else if (pick < 9)
      img_zero(&m, gc, 0);
    else
      l2_entry_at(&m, gc); /* unallocated, in an allocated table */
    kinds[pick < 6 ? 0 : pick < 8 ? 1 : pick < 9 ? 2 : 3]++;
  }
  free(order);
  const char *path = img_save(&m, "many-tables.qcow2");
  diag("many-tables: %u data, %u compressed (%u straddling host clusters), %u zero, %u unallocated clusters; "
       "%" PRIu64 "-byte file", kinds[0], kinds[1], m.comp_crossings, kinds[2], kinds[3], m.len);

  struct qcow2_options o = {.cache_bytes = 65536};
  struct qcow2_chain *c = open_image(path, &o, "8 MiB image with 256 L2 tables, cache_bytes = 65536");
  if (c == NULL)
    return;
  ok(c->cache.slice_size == 512 && (uint64_t) c->cache.nsets * 8 * c->cache.slice_size <= 65536,
     "cache: 512-byte slices, no more than 64 KiB in all (%u sets)", c->cache.nsets);
  check_reads(c, &m, "tiny cache");
  /* Backwards, a cluster at a time: every L2 table is fetched again
   * after the forward pass evicted it. */
  char why[256] = "";
  bool good = true;
  for (uint64_t gc = n; good && gc-- > 0;)
    good = read_matches(c, m.want, gc * cs, cs, why, sizeof why);
  if (!ok(good, "tiny cache: the disk read backwards, cluster by cluster"))
    diag("%s", why);
  check_status(c, &m, "tiny cache");

  struct worker w[4];
  pthread_t tids[4];
  bool started = true;
  for (int i = 0; i < 4; i++) {
    memset(&w[i], 0, sizeof w[i]);
    w[i].chain = c;
    w[i].m = &m;
    w[i].len = m.size / 4;
    w[i].start = (uint64_t) i * w[i].len;
    w[i].seed = 0x9e3779b97f4a7c15ull * (uint64_t) (i + 1);
    if (pthread_create(&tids[i], NULL, worker_run, &w[i]) != 0)
      started = false;
  }
  unsigned reads = 0, bad = 0, statuses = 0, bad_st = 0;
  for (int i = 0; i < 4; i++) {
    pthread_join(tids[i], NULL);
    reads += w[i].reads;
    bad += w[i].bad_reads;
    statuses += w[i].statuses;
    bad_st += w[i].bad_statuses;
    if (w[i].why[0])
      diag("thread %d: %s", i, w[i].why);
  }
  ok(started && reads == 12000 && bad == 0, "threads: 4 threads, %u concurrent reads, %u wrong", reads, bad);
  ok(started && bad_st == 0, "threads: %u concurrent block status calls, %u wrong", statuses, bad_st);
  expect_good(c, &m, 0, m.size, "threads: afterwards the whole disk still reads back");
  qcow2_close(c);
  img_free(&m);
}

/* ---- main ---------------------------------------------------------------------- */

int main(int argc, char **argv)
{
  const char *parent = argc > 1 ? argv[1] : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
  snprintf(work_dir, sizeof work_dir, "%s/qcow2-unit.XXXXXX", parent);
  if (mkdtemp(work_dir) == NULL)
    die(work_dir);
  qcow2_set_logger(my_error, my_debug);

  test_internals();
  test_minimal();
  test_main();
  test_zstd_chain();
  test_extended_l2();
  test_same_descriptor();
  test_huge_empty();
  test_corrupt();
  test_refusals();
  test_bitmaps();
  test_snapshots();
  test_cache_and_threads();

  printf("1..%d\n", tests_run);
  if (getenv("QCOW2_UNIT_KEEP"))
    diag("images kept in %s", work_dir);
  else {
    for (size_t i = 0; i < nmade; i++)
      unlink(made[i]);
    rmdir(work_dir);
  }
  for (size_t i = 0; i < nmade; i++)
    free(made[i]);
  return tests_failed ? 1 : 0;
}
