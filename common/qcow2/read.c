/* qcow2 library: mapping guest offsets, reading data, block status.
 *
 * A read walks the layer's L2 entries and cuts the request into runs:
 * stored data at contiguous host offsets (one pread each), zeroes,
 * unallocated stretches (read from the backing layer, or zero), and
 * compressed clusters (decompressed whole, one at a time).  Every L2
 * entry is checked where it is used, so a bad one fails the request
 * that meets it and nothing else.
 *
 * Decompression needs buffers and zlib/zstd state; each thread keeps its
 * own, made on first use, so reads take no lock for them and allocate
 * nothing afterwards.  The thread also keeps the last cluster it
 * decompressed: small sequential reads of a compressed image then cost
 * one decompression per cluster, not one per request.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include "internal.h"

enum run_kind { RUN_DATA, RUN_ZERO, RUN_UNALLOCATED, RUN_COMPRESSED };

struct run {
  enum run_kind kind;
  uint64_t host; /* DATA: host offset of the run's first byte; COMPRESSED: the descriptor */
  uint64_t length;
};

/* L2 entries fetched per cache look-up. */
#define ENTRY_BATCH 64

/* ---- L2 entries ----------------------------------------------------------- */

/* A defect met while mapping is described here, and logged only if it
 * fails the call: a run that stops short before the bad entry succeeds,
 * and the call that then starts at the entry logs it once. */
static __thread char corruption[384];

static int corrupt(const struct layer *l, uint64_t guest, const char *what, uint64_t value)
{
  snprintf(corruption, sizeof corruption,
           "qcow2: %s: guest offset %" PRIu64 ": %s (0x%" PRIx64 "); the read fails with EIO",
           l->path, guest, what, value);
  return -EIO;
}

/* The call fails with R: log the defect that caused it, if any. */
static int failed(int r)
{
  if (corruption[0])
    q_error("%s", corruption);
  corruption[0] = '\0';
  return r;
}

/* The run stops before the defect; the next call meets it. */
static int stop_short(void)
{
  corruption[0] = '\0';
  return 0;
}

/* Fetches up to max L2 entries starting with guest cluster `cluster`,
 * never past the slice or the L2 table that holds the first.  Entries
 * are pairs (descriptor, subcluster bitmap); the bitmap is 0 without
 * extended L2 entries.  Returns how many, or -EIO. */
static int fetch_entries(struct qcow2_chain *chain, const struct layer *l, uint64_t cluster,
                         uint64_t entries[][2], unsigned max)
{
  uint64_t per_table = 1ull << l->l2_bits;
  uint64_t l1_index = cluster >> l->l2_bits, l2_index = cluster & (per_table - 1);
  unsigned n = (unsigned) (per_table - l2_index < max ? per_table - l2_index : max);
  uint64_t l1e = l1_index < l->l1_size ? l->l1[l1_index] : 0;
  uint64_t table = l1e & QCOW2_OFFSET_MASK;
  if (table == 0) {
    memset(entries, 0, (size_t) n * sizeof entries[0]);
    return (int) n;
  }
  uint64_t guest = cluster << l->cluster_bits;
  if (table % l->cluster_size)
    return corrupt(l, guest, "L2 table offset is not cluster aligned", table);
  if (overlaps_header(l, table))
    return corrupt(l, guest, "L2 table offset is inside the header cluster", table);
  if (table >= l->file_size || l->cluster_size > l->file_size - table)
    return corrupt(l, guest, "L2 table lies past the end of the file", table);

  uint64_t at = table + l2_index * l->l2_entry_bytes;
  uint32_t slice = chain->cache.slice_size;
  uint64_t room = (slice - (at & (slice - 1))) / l->l2_entry_bytes;
  if (room < n)
    n = (unsigned) room;
  uint8_t raw[ENTRY_BATCH * 16];
  int r = cache_read(&chain->cache, l, raw, n * l->l2_entry_bytes, at);
  if (r < 0)
    return r;
  for (unsigned i = 0; i < n; i++) {
    entries[i][0] = get_be64(raw + i * l->l2_entry_bytes);
    entries[i][1] = l->extended_l2 ? get_be64(raw + i * l->l2_entry_bytes + 8) : 0;
  }
  return (int) n;
}

/* What one (sub)cluster holds: sets *kind and, for data, *host (the
 * host offset of the unit's start).  unit is the subcluster index with
 * extended L2 entries, else 0. */
static int classify(const struct layer *l, uint64_t guest, const uint64_t entry[2], unsigned unit,
                    enum run_kind *kind, uint64_t *host)
{
  uint64_t d = entry[0], bitmap = entry[1];
  bool external = l->data_fd != l->fd;
  if (d & QCOW2_L2_COMPRESSED) {
    if (external)
      return corrupt(l, guest, "compressed cluster in an image with an external data file", d);
    *kind = RUN_COMPRESSED;
    *host = d;
    return 0;
  }
  uint64_t offset = d & QCOW2_OFFSET_MASK;
  bool allocated = offset != 0 || (external && (d & QCOW2_L2_COPIED));
  if (!l->extended_l2) {
    if (d & QCOW2_L2_ZERO)
      *kind = RUN_ZERO;
    else
      *kind = allocated ? RUN_DATA : RUN_UNALLOCATED;
  } else {
    uint32_t alloc = (uint32_t) bitmap, zero = (uint32_t) (bitmap >> 32);
    if (!allocated && alloc)
      return corrupt(l, guest, "subclusters allocated in an unallocated cluster", bitmap);
    if (alloc & zero)
      return corrupt(l, guest, "subclusters both allocated and zero", bitmap);
    if (zero & (1u << unit))
      *kind = RUN_ZERO;
    else
      *kind = (alloc & (1u << unit)) ? RUN_DATA : RUN_UNALLOCATED;
  }
  if (*kind != RUN_DATA)
    return 0;
  if (offset % l->cluster_size)
    return corrupt(l, guest, "data cluster offset is not cluster aligned", offset);
  if (!external && overlaps_header(l, offset))
    return corrupt(l, guest, "data cluster offset is inside the header cluster", offset);
  if (!external && offset >= l->file_size)
    return corrupt(l, guest, "data cluster lies past the end of the file", offset);
  *host = offset + ((uint64_t) unit << (l->cluster_bits - 5));
  return 0;
}

/* L2 entries one map_run looks at, at most: the run it returns may be
 * shorter than the stretch of that kind, so that the time one request
 * takes stays bounded whatever the disk size (an 8 TiB disk of zero
 * clusters would otherwise be walked whole). */
#define RUN_MAX_ENTRIES 1024

/* A run from guest offset `offset` (inside the layer, at most max bytes)
 * of one kind: for data, at contiguous host offsets, unless any_host
 * (block status does not care where data is stored, and counts
 * compressed clusters as data).  The longest such run, unless it spans
 * more than RUN_MAX_ENTRIES L2 entries. */
static int map_run(struct qcow2_chain *chain, const struct layer *l, uint64_t offset, uint64_t max,
                   bool any_host, struct run *run)
{
  unsigned unit_bits = l->extended_l2 ? l->cluster_bits - 5 : l->cluster_bits;
  uint64_t end = offset + max;
  uint64_t pos = offset;
  bool started = false;
  unsigned examined = 0;
  uint64_t entries[ENTRY_BATCH][2];

  while (pos < end && examined < RUN_MAX_ENTRIES) {
    uint64_t cluster = pos >> l->cluster_bits;
    uint64_t l1_index = cluster >> l->l2_bits;
    if (l1_index >= l->l1_size || (l->l1[l1_index] & QCOW2_OFFSET_MASK) == 0) {
      /* No L2 table: all it would map is unallocated, in one step. */
      if (started && run->kind != RUN_UNALLOCATED)
        return 0;
      if (!started)
        *run = (struct run) {.kind = RUN_UNALLOCATED, .host = 0, .length = 0};
      started = true;
      uint64_t table_end = (l1_index + 1) << (l->l2_bits + l->cluster_bits);
      uint64_t stop = table_end < end ? table_end : end;
      run->length += stop - pos;
      pos = stop;
      examined += ENTRY_BATCH;
      continue;
    }
    int n = fetch_entries(chain, l, cluster, entries, ENTRY_BATCH);
    if (n < 0)
      return started ? stop_short() : n; /* the run so far stands */
    examined += (unsigned) n;
    for (int i = 0; i < n && pos < end; i++) {
      uint64_t cluster_end = (cluster + (uint64_t) i + 1) << l->cluster_bits;
      while (pos < cluster_end && pos < end) {
        unsigned unit = l->extended_l2 ? (unsigned) ((pos >> unit_bits) & 31) : 0;
        enum run_kind kind;
        uint64_t host = 0;
        int r = classify(l, pos, entries[i], unit, &kind, &host);
        if (r < 0)
          return started ? stop_short() : r;
        uint64_t unit_start = pos & ~((1ull << unit_bits) - 1);
        uint64_t unit_end = unit_start + (1ull << unit_bits);
        if (kind == RUN_COMPRESSED)
          unit_end = cluster_end;
        if (kind == RUN_DATA)
          host += pos - unit_start;
        if (any_host && kind == RUN_COMPRESSED)
          kind = RUN_DATA;
        if (!started) {
          *run = (struct run) {.kind = kind, .host = host, .length = 0};
          started = true;
        } else if (kind != run->kind || (kind == RUN_COMPRESSED) ||
                   (kind == RUN_DATA && !any_host && host != run->host + run->length)) {
          return 0;
        }
        uint64_t stop = unit_end < end ? unit_end : end;
        run->length += stop - pos;
        pos = stop;
        if (kind == RUN_COMPRESSED)
          return 0; /* one compressed cluster per run */
      }
    }
  }
  return 0;
}

/* ---- Decompression -------------------------------------------------------- */

struct thread_buffers {
  uint8_t *in, *out; /* compressed input, one decompressed cluster */
  size_t in_size, out_size;
  z_stream zlib;
  bool zlib_ready;
  ZSTD_DCtx *zstd;
  /* The cluster now in out. */
  uint64_t held_chain; /* qcow2_chain.id, 0 for none */
  unsigned held_depth;
  uint64_t held_descriptor;
};

static pthread_key_t buffers_key;
static pthread_once_t buffers_once = PTHREAD_ONCE_INIT;
static __thread struct thread_buffers *thread_buffers;

static void free_buffers(void *p)
{
  struct thread_buffers *t = p;
  if (t->zlib_ready)
    inflateEnd(&t->zlib);
  ZSTD_freeDCtx(t->zstd);
  free(t->in);
  free(t->out);
  free(t);
}

static void make_key(void)
{
  pthread_key_create(&buffers_key, free_buffers);
}

static struct thread_buffers *get_buffers(uint64_t cluster_size)
{
  struct thread_buffers *t = thread_buffers;
  if (t == NULL) {
    pthread_once(&buffers_once, make_key);
    t = calloc(1, sizeof *t);
    if (t == NULL)
      return NULL;
    thread_buffers = t;
    pthread_setspecific(buffers_key, t);
  }
  /* Compressed data may span up to twice a cluster (its sector count
   * has cluster_bits - 8 bits). */
  if (t->out_size < cluster_size) {
    uint8_t *in = malloc(2 * cluster_size), *out = malloc(cluster_size);
    if (in == NULL || out == NULL) {
      free(in);
      free(out);
      return NULL;
    }
    free(t->in);
    free(t->out);
    t->in = in;
    t->out = out;
    t->in_size = 2 * cluster_size;
    t->out_size = cluster_size;
    t->held_chain = 0;
  }
  return t;
}

/* Deflate without a zlib header.  Success means a whole cluster came
 * out; the input may go on past the end of the stream (the descriptor
 * counts whole sectors). */
static int inflate_cluster(struct thread_buffers *t, size_t in_len, size_t out_len)
{
  if (!t->zlib_ready) {
    memset(&t->zlib, 0, sizeof t->zlib);
    if (inflateInit2(&t->zlib, -15) != Z_OK)
      return -ENOMEM;
    t->zlib_ready = true;
  } else if (inflateReset(&t->zlib) != Z_OK)
    return -EIO;
  t->zlib.next_in = t->in;
  t->zlib.avail_in = (uInt) in_len;
  t->zlib.next_out = t->out;
  t->zlib.avail_out = (uInt) out_len;
  int r = inflate(&t->zlib, Z_FINISH);
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) && t->zlib.avail_out == 0)
    return 0;
  return -EIO;
}

/* One or more zstd frames that together fill exactly a cluster. */
static int unzstd_cluster(struct thread_buffers *t, size_t in_len, size_t out_len)
{
  if (t->zstd == NULL) {
    t->zstd = ZSTD_createDCtx();
    if (t->zstd == NULL)
      return -ENOMEM;
    /* A cluster is at most 2 MiB: a frame asking for a larger window is
     * hostile, and must not make us allocate it. */
    ZSTD_DCtx_setParameter(t->zstd, ZSTD_d_windowLogMax, 23);
  }
  ZSTD_DCtx_reset(t->zstd, ZSTD_reset_session_only);
  ZSTD_inBuffer in = {t->in, in_len, 0};
  ZSTD_outBuffer out = {t->out, out_len, 0};
  while (out.pos < out.size) {
    size_t before_in = in.pos, before_out = out.pos;
    size_t r = ZSTD_decompressStream(t->zstd, &out, &in);
    if (ZSTD_isError(r))
      return -EIO;
    if (in.pos == before_in && out.pos == before_out)
      return -EIO; /* input ended before the cluster did */
  }
  return 0;
}

/* Makes the compressed cluster `descriptor` of layer l the one in the
 * thread's out buffer. */
static int load_compressed(struct qcow2_chain *chain, const struct layer *l, uint64_t guest,
                           uint64_t descriptor, struct thread_buffers **held)
{
  struct thread_buffers *t = get_buffers(chain->max_cluster_size);
  if (t == NULL)
    return -ENOMEM;
  *held = t;
  if (t->held_chain == chain->id && t->held_depth == l->depth && t->held_descriptor == descriptor)
    return 0;
  t->held_chain = 0;

  unsigned shift = 62 - (l->cluster_bits - 8);
  uint64_t host = descriptor & ((1ull << shift) - 1);
  uint64_t sectors = ((descriptor >> shift) & ((1ull << (l->cluster_bits - 8)) - 1)) + 1;
  uint64_t length = sectors * 512 - (host & 511);
  if (overlaps_header(l, host))
    return corrupt(l, guest, "compressed data offset is inside the header cluster", host);
  if (host >= l->file_size)
    return corrupt(l, guest, "compressed data lies past the end of the file", host);
  int r = read_at(l->fd, t->in, length, host);
  if (r < 0)
    return r;
  r = l->compression == COMPRESSION_ZSTD ? unzstd_cluster(t, length, l->cluster_size)
                                         : inflate_cluster(t, length, l->cluster_size);
  if (r == -EIO)
    return corrupt(l, guest, "compressed cluster does not decompress to a whole cluster", descriptor);
  if (r < 0)
    return r;
  t->held_chain = chain->id;
  t->held_depth = l->depth;
  t->held_descriptor = descriptor;
  return 0;
}

/* ---- Reading -------------------------------------------------------------- */

int layer_read(struct qcow2_chain *chain, const struct layer *l, uint8_t *buf, uint64_t count,
               uint64_t offset)
{
  if (offset >= l->size) { /* past a shorter backing file: zeroes */
    memset(buf, 0, count);
    return 0;
  }
  if (count > l->size - offset) {
    memset(buf + (l->size - offset), 0, count - (l->size - offset));
    count = l->size - offset;
  }
  if (!l->is_qcow2)
    return read_at(l->fd, buf, count, offset);

  while (count > 0) {
    struct run run;
    int r = map_run(chain, l, offset, count, false, &run);
    if (r < 0)
      return failed(r);
    switch (run.kind) {
    case RUN_DATA:
      r = read_at(l->data_fd, buf, run.length, run.host);
      break;
    case RUN_ZERO:
      memset(buf, 0, run.length);
      break;
    case RUN_UNALLOCATED:
      if (l->backing)
        r = layer_read(chain, l->backing, buf, run.length, offset);
      else
        memset(buf, 0, run.length);
      break;
    case RUN_COMPRESSED: {
      struct thread_buffers *t;
      r = load_compressed(chain, l, offset, run.host, &t);
      if (r == 0)
        memcpy(buf, t->out + (offset & (l->cluster_size - 1)), run.length);
      break;
    }
    }
    if (r < 0)
      return failed(r);
    buf += run.length;
    offset += run.length;
    count -= run.length;
  }
  return 0;
}

int qcow2_read(struct qcow2_chain *chain, void *buf, uint64_t count, uint64_t offset)
{
  if (offset > chain->top->size || count > chain->top->size - offset)
    return -EINVAL;
  return layer_read(chain, chain->top, buf, count, offset);
}

/* ---- Block status ---------------------------------------------------------- */

static int raw_status(const struct layer *l, uint64_t offset, uint64_t max, struct qcow2_status *st)
{
  st->depth = l->depth;
  st->kind = QCOW2_DATA;
  st->length = max;
  off_t data = lseek(l->fd, (off_t) offset, SEEK_DATA);
  if (data == -1) {
    if (errno == ENXIO) /* a hole up to the end of the file */
      st->kind = QCOW2_ZERO;
    return 0; /* other errors: no hole information, all data */
  }
  if ((uint64_t) data > offset) {
    st->kind = QCOW2_ZERO;
    if ((uint64_t) data - offset < max)
      st->length = (uint64_t) data - offset;
    return 0;
  }
  off_t hole = lseek(l->fd, (off_t) offset, SEEK_HOLE);
  if (hole != -1 && (uint64_t) hole > offset && (uint64_t) hole - offset < max)
    st->length = (uint64_t) hole - offset;
  return 0;
}

int layer_status(struct qcow2_chain *chain, const struct layer *l, uint64_t offset, uint64_t max,
                 struct qcow2_status *st)
{
  if (offset >= l->size) { /* past a shorter layer: zero, allocated there */
    *st = (struct qcow2_status) {.length = max, .kind = QCOW2_ZERO, .depth = l->depth};
    return 0;
  }
  if (max > l->size - offset)
    max = l->size - offset;
  if (!l->is_qcow2)
    return raw_status(l, offset, max, st);
  struct run run;
  int r = map_run(chain, l, offset, max, true, &run);
  if (r < 0)
    return r;
  if (run.kind == RUN_UNALLOCATED) {
    if (l->backing)
      return layer_status(chain, l->backing, offset, run.length, st);
    *st = (struct qcow2_status) {.length = run.length, .kind = QCOW2_ZERO, .depth = 0};
    return 0;
  }
  *st = (struct qcow2_status) {
    .length = run.length, .kind = run.kind == RUN_ZERO ? QCOW2_ZERO : QCOW2_DATA, .depth = l->depth};
  return 0;
}

/* Consecutive runs of the same kind and depth, merged: bounded, so that
 * one call never walks a whole huge disk. */
#define STATUS_MERGES 16

int qcow2_block_status(struct qcow2_chain *chain, uint64_t offset, uint64_t max_length,
                       struct qcow2_status *status)
{
  uint64_t size = chain->top->size;
  if (offset >= size || max_length == 0)
    return -EINVAL;
  if (max_length > size - offset)
    max_length = size - offset;
  int r = layer_status(chain, chain->top, offset, max_length, status);
  if (r < 0)
    return failed(r);
  for (int i = 0; i < STATUS_MERGES && status->length < max_length; i++) {
    struct qcow2_status next;
    r = layer_status(chain, chain->top, offset + status->length, max_length - status->length, &next);
    if (r < 0)
      return stop_short(); /* what was found stands; the next call meets the defect */
    if (next.kind != status->kind || next.depth != status->depth)
      break;
    status->length += next.length;
  }
  return 0;
}
