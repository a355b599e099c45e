/* nbdserve rbd plugin: block status.
 *
 * base:allocation comes from rbd_diff_iterate2 against nothing, in
 * whole-object mode: which objects exist.  Without the image's
 * fast-diff feature librbd asks the OSDs that, one question per
 * object, and a client copying the image (nbdcopy asks about 128 MiB
 * at a time) issues no reads for a range until the answer is there.  So
 * what each walk finds is kept, and after each answer a walk of the
 * objects that follow runs on a thread of its own (the look-ahead): the
 * next question finds its answer known.
 *
 * - Data: a bit per object (known_data).  Only our own trim and zero
 *   make data a hole again, and they clear the bit first; a hole that
 *   another client made shows as data, which is always a correct answer.
 * - Holes: the answers of the last few walks (struct learned), used only
 *   while fresh (HOLE_FRESH_NS) and while no write went through this
 *   server since the walk began (write_epoch).  A write turns a hole
 *   into data, and data reported as a hole is data a copy leaves out.
 *   A write through another front end is seen once the knowledge is
 *   HOLE_FRESH_NS old: as with any answer, a client writing through one
 *   front end and asking another has to allow for such a delay.
 *
 * qemu:dirty-bitmap:SNAP is walked afresh for every question (from SNAP,
 * exact ranges): incremental backups rest on it.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nbdserve-plugin.h"
#include "rbd.h"

/* An answer looks at most this many objects (each may be one round trip
 * to an OSD); the client asks again for the rest. */
#define DIFF_MAX_OBJECTS 256
/* base:allocation walks at least this far, so that the reads that
 * follow a small question find their objects known. */
#define DIFF_MIN_OBJECTS 32
/* The look-ahead walks this many objects past an answer (two of
 * nbdcopy's 128 MiB pieces of 4 MiB objects: one for each of its
 * threads). */
#define AHEAD_OBJECTS 64
#define HOLE_FRESH_NS (2 * UINT64_C(1000000000))
#define LEARNED_SLOTS 8
#define LEARNED_WORDS (DIFF_MAX_OBJECTS / 64)

/* What one walk of base:allocation found for objects [first, first + n). */
struct learned {
  uint64_t first, n; /* n == 0: an empty slot */
  uint64_t epoch; /* write_epoch when the walk began */
  uint64_t when_ns; /* when it began */
  uint64_t hole[LEARNED_WORDS]; /* bit per object: held no data */
};

struct known_holes {
  pthread_mutex_t lock;
  struct learned slot[LEARNED_SLOTS];
  unsigned next; /* the slot the next walk fills */
};

/* Writes through this server, counted when each starts and when it is
 * done: learned holes are good only while it stays what it was when
 * their walk began. */
static uint64_t write_epoch;

void rbd_note_write(void)
{
  __atomic_add_fetch(&write_epoch, 1, __ATOMIC_SEQ_CST);
}

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000 + (uint64_t) ts.tv_nsec;
}

/* ---- What is known ---------------------------------------------------------- */

void rbd_status_open(struct image *img)
{
  rbd_image_info_t info;
  uint64_t unit = 0, count = 0;
  /* Only when each object holds one contiguous range of the image (no
   * fancy striping). */
  if (rbd_stat(img->rbd, &info, sizeof info) < 0 || rbd_get_stripe_unit(img->rbd, &unit) < 0 ||
      rbd_get_stripe_count(img->rbd, &count) < 0 || (count > 1 && unit != info.obj_size))
    return;
  uint64_t nobjects = (info.size + info.obj_size - 1) / info.obj_size;
  img->known_data = calloc((nobjects + 63) / 64 + 1, sizeof *img->known_data);
  img->holes = calloc(1, sizeof *img->holes);
  if (img->known_data == NULL || img->holes == NULL) {
    free(img->known_data);
    free(img->holes);
    img->known_data = NULL;
    img->holes = NULL;
    return;
  }
  pthread_mutex_init(&img->holes->lock, NULL);
  img->object_size = info.obj_size;
  img->nobjects = nobjects;
}

void rbd_status_close(struct image *img)
{
  if (img->holes)
    pthread_mutex_destroy(&img->holes->lock);
  free(img->holes);
  free(img->known_data);
  img->holes = NULL;
  img->known_data = NULL;
  img->object_size = img->nobjects = 0;
}

static bool known_data(const struct image *img, uint64_t obj)
{
  return obj < img->nobjects &&
         (__atomic_load_n(&img->known_data[obj / 64], __ATOMIC_RELAXED) >> (obj % 64)) & 1;
}

static void mark_data(struct image *img, uint64_t obj)
{
  if (obj < img->nobjects)
    __atomic_fetch_or(&img->known_data[obj / 64], UINT64_C(1) << (obj % 64), __ATOMIC_RELAXED);
}

void rbd_forget_data(struct image *img, uint64_t offset, uint64_t count)
{
  if (img->object_size == 0 || count == 0)
    return;
  for (uint64_t obj = offset / img->object_size;
       obj <= (offset + count - 1) / img->object_size && obj < img->nobjects; obj++)
    __atomic_fetch_and(&img->known_data[obj / 64], ~(UINT64_C(1) << (obj % 64)),
                       __ATOMIC_RELAXED);
}

/* holes->lock held.  Did the newest walk still good for OBJ find it a hole? */
static bool known_hole(const struct image *img, uint64_t obj, uint64_t now, uint64_t epoch)
{
  const struct learned *best = NULL;
  for (unsigned i = 0; i < LEARNED_SLOTS; i++) {
    const struct learned *l = &img->holes->slot[i];
    if (l->n && obj >= l->first && obj - l->first < l->n && l->epoch == epoch &&
        now - l->when_ns < HOLE_FRESH_NS && (best == NULL || l->when_ns > best->when_ns))
      best = l;
  }
  if (best == NULL)
    return false;
  uint64_t i = obj - best->first;
  return (best->hole[i / 64] >> (i % 64)) & 1;
}

enum known { UNKNOWN, DATA, HOLE };

static enum known known_state(const struct image *img, uint64_t obj, uint64_t now,
                              uint64_t epoch, bool holes_usable)
{
  if (known_data(img, obj))
    return DATA;
  if (holes_usable && known_hole(img, obj, now, epoch))
    return HOLE;
  return UNKNOWN;
}

/* Holes learned on a read-only handle do not see what the same
 * server's writable handle holds in its cache. */
static bool holes_usable(const struct image *img)
{
  return img->holes && !(img->readonly && rbd_writable_image_open());
}

/* Answer [offset, offset + count) from what is known, if all of it (up
 * to DIFF_MAX_OBJECTS objects) is, reaching on over known objects. */
static bool answer_from_known(struct image *img, uint64_t offset, uint64_t count,
                              struct nbdserve_extents *extents)
{
  uint64_t os = img->object_size;
  if (os == 0)
    return false;
  uint64_t first = offset / os, last = (offset + count - 1) / os;
  if (last - first >= DIFF_MAX_OBJECTS)
    last = first + DIFF_MAX_OBJECTS - 1;
  uint64_t now = now_ns(), epoch = __atomic_load_n(&write_epoch, __ATOMIC_SEQ_CST);
  bool usable = holes_usable(img);
  enum known state[DIFF_MAX_OBJECTS];
  uint64_t n = 0;

  if (usable)
    pthread_mutex_lock(&img->holes->lock);
  for (uint64_t obj = first; obj < img->nobjects && n < DIFF_MAX_OBJECTS; obj++, n++) {
    state[n] = known_state(img, obj, now, epoch, usable);
    if (state[n] == UNKNOWN)
      break;
  }
  if (usable)
    pthread_mutex_unlock(&img->holes->lock);
  if (first + n <= last)
    return false;

  for (uint64_t i = 0; i < n;) {
    uint64_t run = 1;
    while (i + run < n && state[i + run] == state[i])
      run++;
    uint64_t flags = state[i] == HOLE ? NBDSERVE_EXTENT_HOLE | NBDSERVE_EXTENT_ZERO : 0;
    if (nbdserve_add_extent(extents, (first + i) * os, run * os, flags) == -1)
      return false;
    i += run;
  }
  return true;
}

/* ---- Walks ---------------------------------------------------------------------- */

struct diff_walk {
  struct nbdserve_extents *extents; /* NULL: a look-ahead, which only learns */
  struct image *img;
  bool bitmap; /* qemu:dirty-bitmap: every changed range is dirty */
  uint64_t pos, end;
  struct learned learned; /* base:allocation: what the walk finds */
  int err;
};

/* Objects [first, first + n) wholly inside [offset, end) (the last
 * object of the image counts wholly when END is the end of the image),
 * all holes until the walk finds data in them. */
static void learn_begin(struct diff_walk *w, uint64_t offset, uint64_t end)
{
  struct image *img = w->img;
  uint64_t os = img->object_size;
  w->learned.n = 0;
  if (w->bitmap || os == 0)
    return;
  uint64_t size = 0;
  rbd_get_size(img->rbd, &size);
  uint64_t first = (offset + os - 1) / os, stop = end / os;
  if (end >= size)
    stop = img->nobjects;
  if (stop <= first)
    return;
  w->learned.first = first;
  w->learned.n = stop - first > DIFF_MAX_OBJECTS ? DIFF_MAX_OBJECTS : stop - first;
  w->learned.epoch = __atomic_load_n(&write_epoch, __ATOMIC_SEQ_CST);
  w->learned.when_ns = now_ns();
  memset(w->learned.hole, 0xff, sizeof w->learned.hole);
}

static void learn_data(struct diff_walk *w, uint64_t offset, uint64_t end)
{
  struct learned *l = &w->learned;
  uint64_t os = w->img->object_size;
  if (l->n == 0 || end <= offset)
    return;
  for (uint64_t obj = offset / os; obj <= (end - 1) / os; obj++)
    if (obj >= l->first && obj - l->first < l->n)
      l->hole[(obj - l->first) / 64] &= ~(UINT64_C(1) << ((obj - l->first) % 64));
}

static void learn_commit(struct diff_walk *w)
{
  struct known_holes *kh = w->img->holes;
  if (w->learned.n == 0 || kh == NULL)
    return;
  pthread_mutex_lock(&kh->lock);
  kh->slot[kh->next] = w->learned;
  kh->next = (kh->next + 1) % LEARNED_SLOTS;
  pthread_mutex_unlock(&kh->lock);
}

/* Each range librbd reports; the gaps between them are unallocated (or
 * unchanged).  Ranges come in ascending order for each object and the
 * objects in order; one that overlaps what was added is clipped. */
static int diff_range(uint64_t offset, size_t length, int exists, void *arg)
{
  struct diff_walk *w = arg;
  uint64_t end = offset + length;
  struct image *img = w->img;
  if (!w->bitmap && exists) {
    learn_data(w, offset, end);
    if (img->object_size && offset % img->object_size == 0 && length >= img->object_size)
      for (uint64_t o = offset; o + img->object_size <= end; o += img->object_size)
        mark_data(img, o / img->object_size);
  }
  if (end <= w->pos || w->err)
    return 0;
  if (offset < w->pos)
    offset = w->pos;
  uint64_t gap = w->bitmap ? 0 : NBDSERVE_EXTENT_HOLE | NBDSERVE_EXTENT_ZERO;
  uint64_t here = w->bitmap ? 1 : exists ? 0 : NBDSERVE_EXTENT_HOLE | NBDSERVE_EXTENT_ZERO;
  if (w->extents &&
      ((offset > w->pos && nbdserve_add_extent(w->extents, w->pos, offset - w->pos, gap) == -1) ||
       nbdserve_add_extent(w->extents, offset, end - offset, here) == -1)) {
    w->err = errno;
    return -1;
  }
  w->pos = end;
  return 0;
}

/* Walk [offset, end): into EXTENTS, or (EXTENTS NULL) only to learn. */
static int walk_diff(struct image *img, const char *from_snap, uint64_t offset, uint64_t end,
                     struct nbdserve_extents *extents)
{
  struct diff_walk w = { .extents = extents, .img = img, .bitmap = from_snap != NULL,
                         .pos = offset, .end = end };
  learn_begin(&w, offset, end);
  int r = rbd_diff_iterate2(img->rbd, from_snap, offset, end - offset, 1, 0, diff_range, &w);
  if (w.err) {
    errno = w.err;
    return -1;
  }
  if (r < 0) {
    if (extents == NULL) {
      nbdserve_debug("rbd: looking ahead at %" PRIu64 ": %s", offset, strerror(-r));
      return -1;
    }
    int e = r == -ENOENT && from_snap ? EINVAL : -r;
    if (r == -ENOENT && from_snap)
      nbdserve_error("rbd: snapshot %s of %s no longer exists", from_snap, rbd_image_label());
    else
      e = rbd_report_error(from_snap ? "dirty bitmap" : "block status", end - offset, offset,
                           -r);
    nbdserve_set_error(e);
    return -1;
  }
  learn_commit(&w);
  uint64_t rest = w.bitmap ? 0 : NBDSERVE_EXTENT_HOLE | NBDSERVE_EXTENT_ZERO;
  if (extents && w.pos < end && nbdserve_add_extent(extents, w.pos, end - w.pos, rest) == -1)
    return -1;
  return 0;
}

/* How far one answer looks: to the end of the request, at most
 * DIFF_MAX_OBJECTS objects; base:allocation a little further. */
static uint64_t walk_end(struct image *img, uint64_t offset, uint64_t count, bool ahead)
{
  uint64_t size = 0, obj = img->object_size ? img->object_size : 4 << 20;
  rbd_get_size(img->rbd, &size);
  uint64_t end = offset + count;
  if (ahead && end - offset < DIFF_MIN_OBJECTS * obj)
    end = offset + DIFF_MIN_OBJECTS * obj;
  if (end - offset > DIFF_MAX_OBJECTS * obj)
    end = offset + DIFF_MAX_OBJECTS * obj;
  return end < size ? end : size > offset ? size : offset + count;
}

/* ---- The look-ahead thread ---------------------------------------------------- */

static pthread_mutex_t ahead_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ahead_wanted = PTHREAD_COND_INITIALIZER;
static pthread_cond_t ahead_done = PTHREAD_COND_INITIALIZER;
static pthread_t ahead_thread;
static bool ahead_started, ahead_stopping;
/* The walk wanted next (only the latest: a client that moved on does
 * not need the older one), and the one under way. */
static struct {
  bool pending;
  struct image *img;
  uint64_t offset, end;
} ahead, ahead_now;

static void *look_ahead(void *arg)
{
  (void) arg;
  pthread_mutex_lock(&ahead_lock);
  for (;;) {
    while (!ahead.pending && !ahead_stopping)
      pthread_cond_wait(&ahead_wanted, &ahead_lock);
    if (ahead_stopping)
      break;
    ahead_now = ahead;
    ahead.pending = false;
    pthread_mutex_unlock(&ahead_lock);
    walk_diff(ahead_now.img, NULL, ahead_now.offset, ahead_now.end, NULL);
    pthread_mutex_lock(&ahead_lock);
    ahead_now.pending = false;
    pthread_cond_broadcast(&ahead_done);
  }
  pthread_mutex_unlock(&ahead_lock);
  return NULL;
}

/* An answer reached END: have the objects after it learned, unless they
 * are known already. */
static void look_ahead_from(struct image *img, uint64_t end)
{
  uint64_t os = img->object_size;
  if (os == 0 || !holes_usable(img))
    return;
  uint64_t first = (end + os - 1) / os, stop = first + AHEAD_OBJECTS;
  uint64_t now = now_ns(), epoch = __atomic_load_n(&write_epoch, __ATOMIC_SEQ_CST);
  pthread_mutex_lock(&img->holes->lock);
  while (first < stop && first < img->nobjects &&
         known_state(img, first, now, epoch, true) != UNKNOWN)
    first++;
  pthread_mutex_unlock(&img->holes->lock);
  if (first >= stop || first >= img->nobjects)
    return;
  uint64_t size = img->nobjects * os; /* at most the image's size rounded up */
  uint64_t last_end = (first + AHEAD_OBJECTS) * os;
  pthread_mutex_lock(&ahead_lock);
  if (!ahead_started && !ahead_stopping)
    ahead_started = pthread_create(&ahead_thread, NULL, look_ahead, NULL) == 0;
  if (ahead_started) {
    ahead.pending = true;
    ahead.img = img;
    ahead.offset = first * os;
    ahead.end = last_end < size ? last_end : size;
    pthread_cond_signal(&ahead_wanted);
  }
  pthread_mutex_unlock(&ahead_lock);
}

/* A question the look-ahead is walking for now: wait for it rather than
 * ask the OSDs the same again.  True if there was one. */
static bool wait_for_look_ahead(struct image *img, uint64_t offset)
{
  bool waited = false;
  pthread_mutex_lock(&ahead_lock);
  while (ahead_now.pending && ahead_now.img == img && offset >= ahead_now.offset &&
         offset < ahead_now.end) {
    pthread_cond_wait(&ahead_done, &ahead_lock);
    waited = true;
  }
  pthread_mutex_unlock(&ahead_lock);
  return waited;
}

void rbd_status_stop(void)
{
  pthread_mutex_lock(&ahead_lock);
  ahead_stopping = true;
  bool join = ahead_started;
  pthread_cond_signal(&ahead_wanted);
  pthread_mutex_unlock(&ahead_lock);
  if (join)
    pthread_join(ahead_thread, NULL);
}

/* ---- The callbacks ---------------------------------------------------------------- */

int rbd_extents(void *handle, uint64_t count, uint64_t offset, uint32_t flags,
                struct nbdserve_extents *extents)
{
  (void) flags;
  struct image *img = ((struct handle *) handle)->img;
  bool known = answer_from_known(img, offset, count, extents) ||
               (wait_for_look_ahead(img, offset) && answer_from_known(img, offset, count, extents));
  if (!known && walk_diff(img, NULL, offset, walk_end(img, offset, count, true), extents) == -1)
    return -1;
  look_ahead_from(img, nbdserve_extents_end(extents));
  return 0;
}

int rbd_meta_extents(void *handle, const char *context, uint64_t count, uint64_t offset,
                     uint32_t flags, struct nbdserve_extents *extents)
{
  (void) flags;
  struct image *img = ((struct handle *) handle)->img;
  if (strncmp(context, RBD_BITMAP_PREFIX, strlen(RBD_BITMAP_PREFIX)) != 0) {
    nbdserve_set_error(EINVAL);
    return -1;
  }
  const char *snap = context + strlen(RBD_BITMAP_PREFIX);
  return walk_diff(img, snap, offset, walk_end(img, offset, count, false), extents);
}
