/* nbdserve cache filter: one block cache shared by every connection.
 *
 * The disk is cut into blocks of cache-block-size bytes; the cache holds
 * up to cache-max-size / cache-block-size of them in slots of one
 * mapping (anonymous memory, or an unlinked file under cache-dir=).
 *
 * Locks, from outermost to innermost:
 *   policy_lock   the eviction queues, the free list, the ghost list and
 *                 every slot's identity (which block of which disk);
 *   stripe locks  the hash chains, one lock for a share of the buckets;
 *   entry locks   one rwlock per slot: its data, valid and dirty bits.
 * A hit takes only its stripe lock (to find and pin the slot) and the
 * slot's rwlock for reading, so hits on different blocks run in
 * parallel and never touch the policy lock: the policy's bookkeeping for
 * a hit is one atomic counter on the slot.  A pinned slot is never
 * evicted, so its identity is stable while pinned.  A request holds at
 * most one slot lock at a time and none while it evicts, so slot locks
 * never deadlock; a slot lock may be held across a call down.
 *
 * Eviction is S3-FIFO (Yang et al., SOSP 2023): new blocks enter a small
 * probation FIFO; one that was hit while there moves to the main FIFO
 * when it reaches the end, the others leave and are remembered in a
 * ghost list (keys only); a block coming back while in the ghost list
 * goes straight to the main FIFO; the main FIFO is a CLOCK (a block hit
 * since it was last looked at goes round again).  A sequential scan
 * passes through probation without displacing the main FIFO.  One
 * change: small requests inside one block (4 KiB reads of a 64 KiB
 * block) hit it many times in a row, which would promote every block of
 * a scan; as in 2Q's "correlated reference period", a hit counts only
 * once some other blocks have entered since the block did.
 *
 * Waiting layers below (delay, throttle) return EINPROGRESS from a call
 * down; the request is then run again from the top.  Nothing here is
 * undone for that: what was done (a block read into the cache, a block
 * written back) is done again or found done.  The buffer of a block read
 * is its slot, which stays in the table while the request waits, so the
 * run that follows calls down with the same buffer (the throttle filter
 * recognises a request it has charged by its buffer).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nbdserve-filter.h"

/* ---- Configuration ------------------------------------------------------------ */

enum mode { WRITEBACK, WRITETHROUGH, UNSAFE };
static const char *const mode_names[] = { "writeback", "writethrough", "unsafe" };

#define MIN_BLOCK_SIZE 4096
#define MAX_BLOCK_SIZE (32 * 1024 * 1024)
#define DEFAULT_BLOCK_SIZE (64 * 1024)
#define DEFAULT_MAX_SIZE (256 * 1024 * 1024)
/* Slots are described by a table of this many entries at most (80 bytes
 * each): 16 Mi slots are a 1 TiB cache of 64 KiB blocks. */
#define MAX_SLOTS (16u << 20)

static enum mode mode;
static uint64_t block_size, max_size;
static unsigned block_shift;
static bool on_read;
static char *cache_dir;

static int cache_load(void)
{
  mode = WRITEBACK;
  block_size = DEFAULT_BLOCK_SIZE;
  max_size = DEFAULT_MAX_SIZE;
  on_read = true;
  cache_dir = NULL;
  return 0;
}

static int parse_mode(const char *value)
{
  for (int m = 0; m < 3; m++)
    if (strcmp(value, mode_names[m]) == 0) {
      mode = (enum mode) m;
      return 1;
    }
  nbdserve_error("cache-mode=%s: expected writeback, writethrough or unsafe", value);
  return -1;
}

static int parse_block_size(const char *value)
{
  int64_t size = nbdserve_parse_size(value);
  if (size == -1)
    return -1;
  if (size < MIN_BLOCK_SIZE || size > MAX_BLOCK_SIZE || (size & (size - 1)) != 0) {
    nbdserve_error("cache-block-size=%s: must be a power of two from 4K to 32M", value);
    return -1;
  }
  block_size = (uint64_t) size;
  return 1;
}

static int cache_config(const char *key, const char *value)
{
  if (strcmp(key, "cache-mode") == 0)
    return parse_mode(value);
  if (strcmp(key, "cache-block-size") == 0)
    return parse_block_size(value);
  if (strcmp(key, "cache-max-size") == 0) {
    int64_t size = nbdserve_parse_size(value);
    if (size == -1)
      return -1;
    max_size = (uint64_t) size;
    return 1;
  }
  if (strcmp(key, "cache-on-read") == 0) {
    int b = nbdserve_parse_bool(value);
    if (b == -1)
      return -1;
    on_read = b;
    return 1;
  }
  if (strcmp(key, "cache-dir") == 0) {
    free(cache_dir);
    cache_dir = strdup(value);
    if (cache_dir == NULL) {
      nbdserve_error("cache: strdup: %m");
      return -1;
    }
    return 1;
  }
  return 0;
}

static int cache_config_complete(void)
{
  if (max_size < block_size) {
    nbdserve_error("cache-max-size=%" PRIu64 " is smaller than one block "
                   "(cache-block-size=%" PRIu64 ")", max_size, block_size);
    return -1;
  }
  if (max_size / block_size > MAX_SLOTS) {
    nbdserve_error("cache-max-size=%" PRIu64 " holds more than %u blocks of %" PRIu64
                   " bytes: use a larger cache-block-size", max_size, MAX_SLOTS, block_size);
    return -1;
  }
  if (cache_dir) {
    struct stat st;
    if (stat(cache_dir, &st) == -1) {
      nbdserve_error("cache-dir=%s: %m", cache_dir);
      return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
      nbdserve_error("cache-dir=%s: not a directory", cache_dir);
      return -1;
    }
  }
  block_shift = (unsigned) __builtin_ctzll(block_size);
  return 0;
}

/* Reading and writing the cache's memory never waits, unless that memory
 * is a file, where a page fault may read the disk. */
static int cache_never_blocks(void)
{
  return cache_dir == NULL;
}

/* ---- Disks, slots and counters --------------------------------------------------- */

/* One per export name: connections to the same export share its blocks. */
struct disk {
  struct disk *next;
  char *name;
  uint32_t id;
  uint64_t dirty; /* dirty blocks; atomic */
};

enum queue { Q_NONE, Q_PROBATION, Q_MAIN };

struct entry {
  pthread_rwlock_t lock; /* data, valid, dirty */
  struct entry *hnext; /* hash chain (stripe lock), or free list (policy lock) */
  struct entry *qprev, *qnext; /* FIFO (policy lock) */
  struct disk *disk; /* identity: changed under policy lock and stripe lock */
  uint64_t block;
  uint64_t stamp; /* insertions before this one: the correlated reference period */
  uint32_t pins; /* atomic; raised under the stripe lock or the policy lock */
  uint8_t freq; /* atomic; hits counted for the policy, at most 3 */
  uint8_t queue; /* enum queue (policy lock) */
  bool valid;
  bool dirty; /* atomic (flush and extents read it without the lock) */
  unsigned char *data;
};

struct fifo {
  struct entry head; /* sentinel: head.qnext is the newest, head.qprev the oldest */
  uint64_t len;
};

#define NR_STRIPES 256
struct stripe {
  pthread_mutex_t lock;
  char pad[64 - sizeof(pthread_mutex_t) % 64];
};

struct ghost {
  uint32_t disk_id; /* 0: unused */
  uint32_t chain; /* next in the bucket, index + 1 (0: none) */
  uint64_t block;
};

static pthread_mutex_t disks_lock = PTHREAD_MUTEX_INITIALIZER;
static struct disk *disks;
static uint32_t nr_disks;

static uint64_t nr_slots;
static unsigned char *arena;
static size_t arena_size;
static struct entry *entries;
static struct entry **buckets;
static uint64_t bucket_mask;
static struct stripe stripes[NR_STRIPES];

static pthread_mutex_t policy_lock = PTHREAD_MUTEX_INITIALIZER;
static struct fifo probation, mainq;
static struct entry *free_list;
static uint64_t probation_target, correlated_period;
static uint64_t insertions; /* written under policy_lock, read atomically on hits */
static struct ghost *ghosts;
static uint32_t *ghost_buckets; /* index + 1 of the first ghost, 0: empty */
static uint64_t nr_ghosts, ghost_mask, ghost_next;

/* Counters: each thread bumps its own (no shared cache line on the hit
 * path); a report adds them up.  A thread's block lives until unload. */
struct counters {
  struct counters *next;
  uint64_t hits, misses, evictions, uncached, written_back_bytes, written_back_blocks;
};
static pthread_mutex_t counters_lock = PTHREAD_MUTEX_INITIALIZER;
static struct counters *all_counters;
static __thread struct counters *my_counters;
static bool ready;

static struct counters *counters(void)
{
  static struct counters spare; /* should malloc fail: shared, approximate */
  if (my_counters)
    return my_counters;
  struct counters *c = calloc(1, sizeof *c);
  if (c == NULL)
    return &spare;
  pthread_mutex_lock(&counters_lock);
  c->next = all_counters;
  all_counters = c;
  pthread_mutex_unlock(&counters_lock);
  my_counters = c;
  return c;
}

/* Only the owning thread writes its counters; readers use atomic loads. */
#define COUNT(field, n)                                                         \
  do {                                                                          \
    struct counters *c_ = counters();                                           \
    __atomic_store_n(&c_->field, __atomic_load_n(&c_->field, __ATOMIC_RELAXED) + (n), \
                     __ATOMIC_RELAXED);                                         \
  } while (0)

static uint64_t load64(const uint64_t *p)
{
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static bool is_dirty(const struct entry *e)
{
  return __atomic_load_n(&e->dirty, __ATOMIC_ACQUIRE);
}

/* Entry lock held for writing. */
static void set_dirty(struct entry *e, bool dirty)
{
  if (e->dirty == dirty)
    return;
  __atomic_store_n(&e->dirty, dirty, __ATOMIC_RELEASE);
  __atomic_add_fetch(&e->disk->dirty, dirty ? 1 : (uint64_t) -1, __ATOMIC_RELAXED);
}

static void unpin(struct entry *e)
{
  __atomic_sub_fetch(&e->pins, 1, __ATOMIC_RELEASE);
}

static uint64_t bucket_of(const struct disk *d, uint64_t block)
{
  uint64_t key = block * UINT64_C(0x9E3779B97F4A7C15) ^ ((uint64_t) d->id << 48);
  return (key ^ (key >> 29)) & bucket_mask;
}

static pthread_mutex_t *stripe_of(uint64_t bucket)
{
  return &stripes[bucket % NR_STRIPES].lock;
}

/* ---- The FIFOs and the ghost list (policy lock held) ------------------------------- */

static void fifo_init(struct fifo *q)
{
  q->head.qnext = q->head.qprev = &q->head;
  q->len = 0;
}

static void fifo_push_newest(struct fifo *q, struct entry *e, enum queue which)
{
  e->qnext = q->head.qnext;
  e->qprev = &q->head;
  q->head.qnext->qprev = e;
  q->head.qnext = e;
  e->queue = (uint8_t) which;
  q->len++;
}

static void fifo_push_oldest(struct fifo *q, struct entry *e, enum queue which)
{
  e->qprev = q->head.qprev;
  e->qnext = &q->head;
  q->head.qprev->qnext = e;
  q->head.qprev = e;
  e->queue = (uint8_t) which;
  q->len++;
}

static struct entry *fifo_pop_oldest(struct fifo *q)
{
  struct entry *e = q->head.qprev;
  if (e == &q->head)
    return NULL;
  e->qprev->qnext = &q->head;
  q->head.qprev = e->qprev;
  e->queue = Q_NONE;
  q->len--;
  return e;
}

static uint64_t ghost_bucket(uint32_t disk_id, uint64_t block)
{
  uint64_t key = block * UINT64_C(0xC2B2AE3D27D4EB4F) ^ disk_id;
  return (key ^ (key >> 31)) & ghost_mask;
}

static void ghost_unlink(uint64_t index)
{
  struct ghost *g = &ghosts[index];
  uint32_t *link = &ghost_buckets[ghost_bucket(g->disk_id, g->block)];
  while (*link != index + 1)
    link = &ghosts[*link - 1].chain;
  *link = g->chain;
  g->disk_id = 0;
}

/* Remember a block leaving probation; the oldest memory goes. */
static void ghost_add(uint32_t disk_id, uint64_t block)
{
  uint64_t index = ghost_next;
  ghost_next = (ghost_next + 1) % nr_ghosts;
  if (ghosts[index].disk_id)
    ghost_unlink(index);
  struct ghost *g = &ghosts[index];
  uint32_t *head = &ghost_buckets[ghost_bucket(disk_id, block)];
  *g = (struct ghost){ .disk_id = disk_id, .block = block, .chain = *head };
  *head = (uint32_t) index + 1;
}

/* True if the block was remembered (and is forgotten now). */
static bool ghost_take(uint32_t disk_id, uint64_t block)
{
  for (uint32_t i = ghost_buckets[ghost_bucket(disk_id, block)]; i; i = ghosts[i - 1].chain)
    if (ghosts[i - 1].disk_id == disk_id && ghosts[i - 1].block == block) {
      ghost_unlink(i - 1);
      return true;
    }
  return false;
}

/* ---- Finding and evicting slots ---------------------------------------------------- */

/* Stripe lock held. */
static struct entry *chain_find(uint64_t bucket, const struct disk *d, uint64_t block)
{
  for (struct entry *e = buckets[bucket]; e; e = e->hnext)
    if (e->disk == d && e->block == block)
      return e;
  return NULL;
}

/* The slot holding BLOCK, pinned, or NULL. */
static struct entry *entry_find(struct disk *d, uint64_t block)
{
  uint64_t bucket = bucket_of(d, block);
  pthread_mutex_t *lock = stripe_of(bucket);
  pthread_mutex_lock(lock);
  struct entry *e = chain_find(bucket, d, block);
  if (e)
    __atomic_add_fetch(&e->pins, 1, __ATOMIC_RELAXED);
  pthread_mutex_unlock(lock);
  return e;
}

/* A hit, for the policy: counted unless it follows the block's arrival
 * too closely (see the top of the file). */
static void note_hit(struct entry *e)
{
  uint64_t now = __atomic_load_n(&insertions, __ATOMIC_RELAXED);
  if (now - e->stamp < correlated_period)
    return;
  uint8_t f = __atomic_load_n(&e->freq, __ATOMIC_RELAXED);
  if (f < 3)
    __atomic_store_n(&e->freq, (uint8_t) (f + 1), __ATOMIC_RELAXED);
}

struct handle {
  struct disk *disk;
  uint64_t size;
  bool readonly;
  bool can_flush; /* the layer below */
  int can_fua;
};

/* Policy lock held.  Unhook E from the hash table if nobody holds it;
 * its stripe lock is taken here. */
static bool unhook_if_idle(struct entry *e)
{
  uint64_t bucket = bucket_of(e->disk, e->block);
  pthread_mutex_t *lock = stripe_of(bucket);
  pthread_mutex_lock(lock);
  bool idle = __atomic_load_n(&e->pins, __ATOMIC_ACQUIRE) == 0 && !is_dirty(e);
  if (idle) {
    struct entry **link = &buckets[bucket];
    while (*link != e)
      link = &(*link)->hnext;
    *link = e->hnext;
  }
  pthread_mutex_unlock(lock);
  return idle;
}

/* Policy lock held.  Pin E unless it is held already. */
static bool pin_if_idle(struct entry *e)
{
  uint64_t bucket = bucket_of(e->disk, e->block);
  pthread_mutex_t *lock = stripe_of(bucket);
  pthread_mutex_lock(lock);
  bool idle = __atomic_load_n(&e->pins, __ATOMIC_ACQUIRE) == 0;
  if (idle)
    __atomic_add_fetch(&e->pins, 1, __ATOMIC_RELAXED);
  pthread_mutex_unlock(lock);
  return idle;
}

/* Policy lock held.  A free slot, out of every list; or NULL and, in
 * *WRITEBACK, a dirty block of H's disk, pinned, that must be written
 * back before it can go (it is the next to be looked at); or NULL alone
 * when every slot is in use or dirty and not H's to write. */
static struct entry *take_slot(const struct handle *h, struct entry **writeback)
{
  *writeback = NULL;
  if (free_list) {
    struct entry *e = free_list;
    free_list = e->hnext;
    return e;
  }
  /* Each block is looked at a few times at most (its count falls by one
   * each time round the main FIFO). */
  for (uint64_t budget = 5 * nr_slots + 2; budget > 0; budget--) {
    bool from_probation = probation.len > probation_target || mainq.len == 0;
    struct fifo *q = from_probation ? &probation : &mainq;
    enum queue which = from_probation ? Q_PROBATION : Q_MAIN;
    struct entry *e = fifo_pop_oldest(q);
    if (e == NULL)
      return NULL;
    uint8_t f = __atomic_load_n(&e->freq, __ATOMIC_RELAXED);
    if (f > 0) {
      __atomic_store_n(&e->freq, (uint8_t) (from_probation ? 0 : f - 1), __ATOMIC_RELAXED);
      fifo_push_newest(&mainq, e, Q_MAIN);
      continue;
    }
    if (unhook_if_idle(e)) {
      if (from_probation)
        ghost_add(e->disk->id, e->block);
      e->disk = NULL;
      COUNT(evictions, 1);
      return e;
    }
    if (is_dirty(e) && e->disk == h->disk && !h->readonly && pin_if_idle(e)) {
      fifo_push_oldest(q, e, which);
      *writeback = e;
      return NULL;
    }
    /* In use, or dirty data of another export: it stays. */
    fifo_push_newest(q, e, which);
  }
  return NULL;
}

/* Bytes of BLOCK inside the disk. */
static uint32_t block_length(const struct handle *h, uint64_t block)
{
  uint64_t start = block << block_shift;
  uint64_t left = h->size - start;
  return (uint32_t) (left < block_size ? left : block_size);
}

/* E pinned.  Write its data to the layer below if it is dirty. */
static int write_back(struct nbdserve_next *next, const struct handle *h, struct entry *e)
{
  int r = 0;
  pthread_rwlock_wrlock(&e->lock);
  if (e->dirty) {
    uint32_t len = block_length(h, e->block);
    r = nbdserve_next_pwrite(next, e->data, len, e->block << block_shift, 0);
    if (r == 0) {
      set_dirty(e, false);
      COUNT(written_back_bytes, len);
      COUNT(written_back_blocks, 1);
    }
  }
  int err = errno;
  pthread_rwlock_unlock(&e->lock);
  errno = err;
  return r;
}

/* The slot for BLOCK, pinned: found, or taken (then not valid).  NULL
 * with *ERR 0 when no slot can be had (the caller goes around the
 * cache), or with *ERR set when writing back a dirty block failed. */
static struct entry *entry_get(struct nbdserve_next *next, struct handle *h, uint64_t block,
                               int *err)
{
  struct disk *d = h->disk;
  *err = 0;
  struct entry *e = entry_find(d, block);
  if (e)
    return e;
  uint64_t bucket = bucket_of(d, block);
  pthread_mutex_t *lock = stripe_of(bucket);
  pthread_mutex_lock(&policy_lock);
  for (;;) {
    /* Every insertion holds the policy lock: look again under it. */
    pthread_mutex_lock(lock);
    e = chain_find(bucket, d, block);
    if (e)
      __atomic_add_fetch(&e->pins, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(lock);
    if (e)
      break;
    struct entry *dirty;
    e = take_slot(h, &dirty);
    if (e) {
      e->disk = d;
      e->block = block;
      e->valid = false;
      e->dirty = false;
      e->freq = 0;
      e->pins = 1;
      e->stamp = insertions + 1; /* the count once this block is in */
      __atomic_store_n(&insertions, e->stamp, __ATOMIC_RELAXED);
      if (ghost_take(d->id, block))
        fifo_push_newest(&mainq, e, Q_MAIN);
      else
        fifo_push_newest(&probation, e, Q_PROBATION);
      pthread_mutex_lock(lock);
      e->hnext = buckets[bucket];
      buckets[bucket] = e;
      pthread_mutex_unlock(lock);
      break;
    }
    if (dirty == NULL)
      break; /* nothing to evict */
    pthread_mutex_unlock(&policy_lock);
    int r = write_back(next, h, dirty);
    int saved = errno;
    unpin(dirty);
    if (r == -1) {
      if (saved != EINPROGRESS)
        nbdserve_error("cache: writing back block %" PRIu64 " to make room: %s", dirty->block,
                       strerror(saved));
      *err = saved;
      return NULL;
    }
    pthread_mutex_lock(&policy_lock);
  }
  pthread_mutex_unlock(&policy_lock);
  if (e == NULL)
    COUNT(uncached, 1);
  return e;
}

/* E write-locked and not valid: read its block from the layer below. */
static int fill(struct nbdserve_next *next, const struct handle *h, struct entry *e)
{
  uint32_t len = block_length(h, e->block);
  if (nbdserve_next_pread(next, e->data, len, e->block << block_shift, 0) == -1)
    return -1;
  if (len < block_size)
    memset(e->data + len, 0, block_size - len);
  e->valid = true;
  COUNT(misses, 1);
  return 0;
}

static int unlock_failed(struct entry *e)
{
  int err = errno;
  pthread_rwlock_unlock(&e->lock);
  unpin(e);
  errno = err;
  return -1;
}

/* ---- Pinned lists of cached blocks -------------------------------------------------- */

struct pinned {
  struct entry **e;
  size_t n;
};

static int by_block(const void *a, const void *b)
{
  const struct entry *x = *(struct entry *const *) a, *y = *(struct entry *const *) b;
  return x->block < y->block ? -1 : x->block > y->block;
}

/* The cached blocks of D from FIRST to LAST (DIRTY_ONLY: the dirty ones
 * only), pinned, in block order: looked up one by one, or, when the
 * range holds more blocks than the cache, found by walking the slots. */
static int collect(struct disk *d, uint64_t first, uint64_t last, bool dirty_only,
                   struct pinned *out)
{
  out->n = 0;
  out->e = NULL;
  uint64_t count = last - first + 1;
  size_t cap = (size_t) (count < nr_slots ? count : nr_slots);
  out->e = malloc(cap * sizeof *out->e);
  if (out->e == NULL) {
    errno = ENOMEM;
    return -1;
  }
  if (count <= nr_slots) {
    for (uint64_t b = first; b <= last; b++) {
      struct entry *e = entry_find(d, b);
      if (e && dirty_only && !is_dirty(e)) {
        unpin(e);
        e = NULL;
      }
      if (e)
        out->e[out->n++] = e;
    }
    return 0;
  }
  pthread_mutex_lock(&policy_lock);
  for (uint64_t i = 0; i < nr_slots; i++) {
    struct entry *e = &entries[i];
    if (e->disk != d || e->block < first || e->block > last || (dirty_only && !is_dirty(e)))
      continue;
    __atomic_add_fetch(&e->pins, 1, __ATOMIC_RELAXED);
    out->e[out->n++] = e;
  }
  pthread_mutex_unlock(&policy_lock);
  qsort(out->e, out->n, sizeof *out->e, by_block);
  return 0;
}

static void release(struct pinned *p, size_t from)
{
  for (size_t i = from; i < p->n; i++)
    unpin(p->e[i]);
  free(p->e);
  p->e = NULL;
  p->n = 0;
}

/* Write back the dirty blocks of H's disk from FIRST to LAST. */
static int write_back_range(struct nbdserve_next *next, const struct handle *h, uint64_t first,
                            uint64_t last)
{
  if (load64(&h->disk->dirty) == 0)
    return 0;
  struct pinned p;
  if (collect(h->disk, first, last, true, &p) == -1)
    return -1;
  for (size_t i = 0; i < p.n; i++) {
    if (write_back(next, h, p.e[i]) == -1) {
      int err = errno;
      if (err != EINPROGRESS)
        nbdserve_error("cache: writing back block %" PRIu64 ": %s", p.e[i]->block,
                       strerror(err));
      release(&p, i);
      errno = err;
      return -1;
    }
    unpin(p.e[i]);
  }
  release(&p, p.n);
  return 0;
}

static uint64_t last_block(const struct handle *h)
{
  return h->size ? (h->size - 1) >> block_shift : 0;
}

/* Make what the plugin holds durable (FLUSH, FUA), unless unsafe. */
static int flush_below(struct nbdserve_next *next, const struct handle *h)
{
  if (mode == UNSAFE)
    return 0;
  if (h->can_flush)
    return nbdserve_next_flush(next, 0);
  return 0;
}

/* ---- Connections -------------------------------------------------------------------- */

static struct disk *disk_for(const char *name)
{
  pthread_mutex_lock(&disks_lock);
  struct disk *d;
  for (d = disks; d; d = d->next)
    if (strcmp(d->name, name) == 0)
      break;
  if (d == NULL && (d = calloc(1, sizeof *d)) != NULL) {
    d->name = strdup(name);
    if (d->name == NULL) {
      free(d);
      d = NULL;
    }
    else {
      d->id = ++nr_disks;
      d->next = disks;
      disks = d;
    }
  }
  pthread_mutex_unlock(&disks_lock);
  if (d == NULL)
    errno = ENOMEM;
  return d;
}

static void *cache_open(struct nbdserve_next *next, int readonly, const char *export_name)
{
  (void) next;
  struct handle *h = calloc(1, sizeof *h);
  if (h == NULL)
    return NULL;
  h->readonly = readonly;
  h->disk = disk_for(export_name ? export_name : "");
  if (h->disk == NULL) {
    free(h);
    return NULL;
  }
  return h;
}

static int cache_prepare(struct nbdserve_next *next, void *handle, int readonly)
{
  struct handle *h = handle;
  int64_t size = nbdserve_next_get_size(next);
  if (size == -1)
    return -1;
  h->size = (uint64_t) size;
  uint32_t minimum, preferred, maximum;
  if (nbdserve_next_block_size(next, &minimum, &preferred, &maximum) == -1)
    return -1;
  if (maximum < block_size || (minimum && block_size % minimum != 0)) {
    nbdserve_error("cache: cache-block-size=%" PRIu64 " does not fit the layer below, "
                   "which takes requests of %" PRIu32 " to %" PRIu32 " bytes",
                   block_size, minimum, maximum);
    errno = EINVAL;
    return -1;
  }
  if (!readonly && nbdserve_next_can_write(next) != 1)
    h->readonly = true;
  int flush = nbdserve_next_can_flush(next);
  int fua = nbdserve_next_can_fua(next);
  if (flush == -1 || fua == -1)
    return -1;
  h->can_flush = flush;
  h->can_fua = fua;
  return 0;
}

/* Blocks written and never flushed go down before the connection does
 * (a client that wants them durable flushes first; this is so that a
 * clean disconnect loses nothing). */
static int cache_finalize(struct nbdserve_next *next, void *handle)
{
  struct handle *h = handle;
  if (mode == WRITETHROUGH || h->readonly || load64(&h->disk->dirty) == 0)
    return 0;
  if (write_back_range(next, h, 0, last_block(h)) == -1 || flush_below(next, h) == -1) {
    nbdserve_error("cache: writing back the dirty blocks of export '%s' at disconnect "
                   "failed: %m (they stay in the cache)", h->disk->name);
    return -1;
  }
  return 0;
}

static void cache_close(void *handle)
{
  free(handle);
}

/* ---- Capabilities ------------------------------------------------------------------- */

static int cache_block_size(struct nbdserve_next *next, void *handle, uint32_t *minimum,
                            uint32_t *preferred, uint32_t *maximum)
{
  (void) handle;
  if (nbdserve_next_block_size(next, minimum, preferred, maximum) == -1)
    return -1;
  /* Whole blocks are what the cache handles best. */
  if (*preferred < block_size && block_size <= *maximum)
    *preferred = (uint32_t) block_size;
  return 0;
}

static int cache_can_flush(struct nbdserve_next *next, void *handle)
{
  (void) handle;
  /* FLUSH is how a client gets dirty blocks written back. */
  return mode == WRITETHROUGH ? nbdserve_next_can_flush(next) : 1;
}

static int cache_can_fua(struct nbdserve_next *next, void *handle)
{
  (void) handle;
  /* Writeback: FUA writes the request's blocks back (and flushes the
   * layer below if it can), as FLUSH does for all of them. */
  return mode == WRITETHROUGH ? nbdserve_next_can_fua(next) : NBDSERVE_FUA_NATIVE;
}

static int cache_can_cache(struct nbdserve_next *next, void *handle)
{
  (void) next, (void) handle;
  return NBDSERVE_CACHE_NATIVE;
}

/* ---- Reading ------------------------------------------------------------------------- */

/* Copy [OFFSET, OFFSET+COUNT) of a valid slot out.  Entry lock held. */
static void copy_out(const struct entry *e, void *buf, uint64_t in_block, uint32_t count)
{
  memcpy(buf, e->data + in_block, count);
}

/* One piece of a read within one block: from the cache, filling it on a
 * miss.  0 done, 1 not cached (read it directly), -1 error. */
static int read_piece(struct nbdserve_next *next, struct handle *h, uint64_t block, void *buf,
                      uint64_t in_block, uint32_t count, bool fill_on_miss)
{
  int err;
  struct entry *e = fill_on_miss ? entry_get(next, h, block, &err) : entry_find(h->disk, block);
  if (e == NULL) {
    if (fill_on_miss && err) {
      errno = err;
      return -1;
    }
    return 1;
  }
  pthread_rwlock_rdlock(&e->lock);
  if (e->valid) {
    copy_out(e, buf, in_block, count);
    pthread_rwlock_unlock(&e->lock);
    note_hit(e);
    unpin(e);
    COUNT(hits, 1);
    return 0;
  }
  pthread_rwlock_unlock(&e->lock);
  if (!fill_on_miss) {
    unpin(e);
    return 1;
  }
  pthread_rwlock_wrlock(&e->lock);
  if (!e->valid && fill(next, h, e) == -1)
    return unlock_failed(e);
  copy_out(e, buf, in_block, count);
  pthread_rwlock_unlock(&e->lock);
  unpin(e);
  return 0;
}

static int cache_pread(struct nbdserve_next *next, void *handle, void *buf, uint32_t count,
                       uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  unsigned char *out = buf;
  uint64_t end = offset + count;
  /* Pieces not in the cache are read directly, adjacent ones together. */
  uint64_t direct_start = offset, direct_end = offset;
  for (uint64_t pos = offset; pos < end;) {
    uint64_t block = pos >> block_shift;
    uint64_t in_block = pos - (block << block_shift);
    uint64_t n = block_size - in_block < end - pos ? block_size - in_block : end - pos;
    int r = read_piece(next, h, block, out + (pos - offset), in_block, (uint32_t) n, on_read);
    if (r == -1)
      return -1;
    if (r == 1) {
      if (direct_end != pos)
        direct_start = pos;
      direct_end = pos + n;
    }
    bool run_ends = r == 0 || pos + n == end;
    if (run_ends && direct_end > direct_start) {
      if (nbdserve_next_pread(next, out + (direct_start - offset),
                              (uint32_t) (direct_end - direct_start), direct_start, flags) == -1)
        return -1;
      direct_start = direct_end;
    }
    pos += n;
  }
  return 0;
}

/* NBD_CMD_CACHE: read the range into the cache. */
static int cache_cache(struct nbdserve_next *next, void *handle, uint64_t count,
                       uint64_t offset, uint32_t flags)
{
  (void) flags;
  struct handle *h = handle;
  if (count == 0)
    return 0;
  for (uint64_t b = offset >> block_shift; b <= (offset + count - 1) >> block_shift; b++) {
    int err;
    struct entry *e = entry_get(next, h, b, &err);
    if (e == NULL) {
      if (err) {
        errno = err;
        return -1;
      }
      return 0; /* no room: cache is advisory */
    }
    pthread_rwlock_wrlock(&e->lock);
    if (!e->valid && fill(next, h, e) == -1)
      return unlock_failed(e);
    pthread_rwlock_unlock(&e->lock);
    unpin(e);
  }
  return 0;
}

/* ---- Writing through ------------------------------------------------------------------ */

enum op { OP_WRITE, OP_ZERO, OP_TRIM };

/* What OP does to the part [lo, hi) of a block held in E (write-locked).
 * A clean block takes a write or a zero as the layer below did; after a
 * trim it no longer knows what the layer below reads, and is dropped. A
 * dirty block is the newer copy: it takes the change (trim as zero). */
static void apply(struct entry *e, enum op op, const unsigned char *src, uint64_t lo, uint64_t hi)
{
  if (!e->valid)
    return;
  if (op == OP_TRIM && !e->dirty) {
    e->valid = false;
    return;
  }
  if (op == OP_WRITE)
    memcpy(e->data + lo, src, hi - lo);
  else
    memset(e->data + lo, 0, hi - lo);
}

/* Apply OP on [OFFSET, OFFSET+COUNT) to the cached blocks (DIRTY_ONLY:
 * the dirty ones). */
static int apply_cached(struct handle *h, enum op op, const void *buf, uint64_t count,
                        uint64_t offset, bool dirty_only)
{
  struct pinned p;
  uint64_t end = offset + count;
  if (collect(h->disk, offset >> block_shift, (end - 1) >> block_shift, dirty_only, &p) == -1)
    return -1;
  for (size_t i = 0; i < p.n; i++) {
    struct entry *e = p.e[i];
    uint64_t start = e->block << block_shift;
    uint64_t lo = offset > start ? offset - start : 0;
    uint64_t hi = end - start < block_size ? end - start : block_size;
    pthread_rwlock_wrlock(&e->lock);
    if (!dirty_only || e->dirty)
      apply(e, op, op == OP_WRITE ? (const unsigned char *) buf + (start + lo - offset) : NULL,
            lo, hi);
    pthread_rwlock_unlock(&e->lock);
  }
  release(&p, 0);
  return 0;
}

/* OP on the range goes down now, and the cache follows.  Dirty blocks
 * take the change first: one written back meanwhile (to make room, or by
 * a flush) must not put older data over what went down. */
static int through(struct nbdserve_next *next, struct handle *h, enum op op, const void *buf,
                   uint64_t count, uint64_t offset, uint32_t flags)
{
  if (count == 0)
    return 0;
  bool flush_after = false;
  if ((flags & NBDSERVE_FLAG_FUA) && (mode == UNSAFE || h->can_fua == NBDSERVE_FUA_NONE)) {
    flags &= ~NBDSERVE_FLAG_FUA;
    flush_after = mode != UNSAFE; /* FUA the layer below cannot do: a flush after */
  }
  if (load64(&h->disk->dirty) && apply_cached(h, op, buf, count, offset, true) == -1)
    return -1;
  int r;
  if (op == OP_WRITE)
    r = nbdserve_next_pwrite(next, buf, (uint32_t) count, offset, flags);
  else if (op == OP_ZERO)
    r = nbdserve_next_zero(next, count, offset, flags);
  else
    r = nbdserve_next_trim(next, count, offset, flags);
  if (r == -1)
    return -1;
  if (apply_cached(h, op, buf, count, offset, false) == -1)
    return -1;
  return flush_after ? flush_below(next, h) : 0;
}

/* True if a dirty block of the range is in the cache. */
static bool has_dirty(struct handle *h, uint64_t count, uint64_t offset)
{
  if (load64(&h->disk->dirty) == 0 || count == 0)
    return false;
  struct pinned p;
  if (collect(h->disk, offset >> block_shift, (offset + count - 1) >> block_shift, true, &p) == -1)
    return true;
  bool any = p.n > 0;
  release(&p, 0);
  return any;
}

/* ---- Writing into the cache (writeback, unsafe) ------------------------------------------ */

/* One piece of a write within one block.  0 done, 1 no slot (write it
 * through), -1 error. */
static int write_piece(struct nbdserve_next *next, struct handle *h, uint64_t block,
                       const unsigned char *src, uint64_t in_block, uint32_t count)
{
  int err;
  struct entry *e = entry_get(next, h, block, &err);
  if (e == NULL) {
    if (err) {
      errno = err;
      return -1;
    }
    return 1;
  }
  pthread_rwlock_wrlock(&e->lock);
  /* A part of a block: the rest comes from the layer below first. */
  if (!e->valid && count < block_length(h, block) && fill(next, h, e) == -1)
    return unlock_failed(e);
  memcpy(e->data + in_block, src, count);
  e->valid = true;
  set_dirty(e, true);
  pthread_rwlock_unlock(&e->lock);
  unpin(e);
  return 0;
}

static int cache_pwrite(struct nbdserve_next *next, void *handle, const void *buf,
                        uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  if (mode == WRITETHROUGH)
    return through(next, h, OP_WRITE, buf, count, offset, flags);
  const unsigned char *src = buf;
  uint64_t end = offset + count;
  for (uint64_t pos = offset; pos < end;) {
    uint64_t block = pos >> block_shift;
    uint64_t in_block = pos - (block << block_shift);
    uint64_t n = block_size - in_block < end - pos ? block_size - in_block : end - pos;
    int r = write_piece(next, h, block, src + (pos - offset), in_block, (uint32_t) n);
    if (r == -1)
      return -1;
    if (r == 1 && through(next, h, OP_WRITE, src + (pos - offset), n, pos,
                          flags & ~NBDSERVE_FLAG_FUA) == -1)
      return -1;
    pos += n;
  }
  if ((flags & NBDSERVE_FLAG_FUA) && mode == WRITEBACK && count > 0) {
    if (write_back_range(next, h, offset >> block_shift, (end - 1) >> block_shift) == -1)
      return -1;
    return flush_below(next, h);
  }
  return 0;
}

static int cache_zero(struct nbdserve_next *next, void *handle, uint64_t count,
                      uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  /* Zeroing must not first apply a change it could then fail to carry
   * out: with dirty blocks in the way it is not fast. */
  if ((flags & NBDSERVE_FLAG_FAST_ZERO) && has_dirty(h, count, offset)) {
    nbdserve_set_error(ENOTSUP);
    return -1;
  }
  return through(next, h, OP_ZERO, NULL, count, offset, flags);
}

static int cache_trim(struct nbdserve_next *next, void *handle, uint64_t count,
                      uint64_t offset, uint32_t flags)
{
  return through(next, handle, OP_TRIM, NULL, count, offset, flags);
}

static int cache_flush(struct nbdserve_next *next, void *handle, uint32_t flags)
{
  (void) flags;
  struct handle *h = handle;
  if (mode == UNSAFE)
    return 0;
  if (mode == WRITEBACK && write_back_range(next, h, 0, last_block(h)) == -1)
    return -1;
  return flush_below(next, h);
}

/* ---- Extents -------------------------------------------------------------------------- */

/* Asking for the extents of a range no longer than this that is all in
 * the cache gets "data" without asking the layer below. */
#define KNOWN_RANGE_BLOCKS 64

/* True if every block of the range is in the cache, with its data. */
static bool all_cached(struct handle *h, uint64_t count, uint64_t offset)
{
  uint64_t first = offset >> block_shift, last = (offset + count - 1) >> block_shift;
  if (count == 0 || last - first >= KNOWN_RANGE_BLOCKS)
    return false;
  for (uint64_t b = first; b <= last; b++) {
    struct entry *e = entry_find(h->disk, b);
    if (e == NULL)
      return false;
    pthread_rwlock_rdlock(&e->lock);
    bool valid = e->valid;
    pthread_rwlock_unlock(&e->lock);
    unpin(e);
    if (!valid)
      return false;
  }
  return true;
}

/* Dirty blocks are data, whatever the layer below says about them: the
 * server does not read what is reported as zeroes.  A short range the
 * cache holds whole is data too: the server asks before each large read,
 * and a hit should not wait for the layer below to answer (data is
 * always a correct answer; it only costs the client the chance to skip
 * reading zeroes, which here are in memory). */
static int cache_extents(struct nbdserve_next *next, void *handle, uint64_t count,
                         uint64_t offset, uint32_t flags, struct nbdserve_extents *extents)
{
  struct handle *h = handle;
  if (all_cached(h, count, offset))
    return nbdserve_add_extent(extents, offset, count, 0);
  if (!has_dirty(h, count, offset))
    return nbdserve_next_extents(next, count, offset, flags, extents);
  struct pinned dirty;
  if (collect(h->disk, offset >> block_shift, (offset + count - 1) >> block_shift, true,
              &dirty) == -1)
    return -1;
  struct nbdserve_extents *below = nbdserve_extents_new(offset, count, flags);
  int r = below ? nbdserve_next_extents(next, count, offset, flags, below) : -1;
  size_t d = 0;
  for (size_t i = 0; r == 0 && i < nbdserve_extents_count(below); i++) {
    uint64_t start, length, type;
    nbdserve_extents_get(below, i, &start, &length, &type);
    uint64_t end = start + length;
    while (r == 0 && start < end) {
      while (d < dirty.n && ((dirty.e[d]->block + 1) << block_shift) <= start)
        d++;
      uint64_t piece_end = end, piece_type = type;
      if (d < dirty.n) {
        uint64_t dstart = dirty.e[d]->block << block_shift;
        uint64_t dend = dstart + block_size;
        if (dstart <= start) {
          piece_type = 0;
          piece_end = dend < end ? dend : end;
        }
        else if (dstart < end)
          piece_end = dstart;
      }
      r = nbdserve_add_extent(extents, start, piece_end - start, piece_type);
      start = piece_end;
    }
  }
  int err = errno;
  release(&dirty, 0);
  if (below)
    nbdserve_extents_free(below);
  errno = err;
  return r;
}

/* ---- Counters ------------------------------------------------------------------------- */

struct totals {
  uint64_t hits, misses, evictions, uncached, written_back_bytes, written_back_blocks;
  uint64_t dirty, cached;
};

static void sum_up(struct totals *t)
{
  memset(t, 0, sizeof *t);
  pthread_mutex_lock(&counters_lock);
  for (struct counters *c = all_counters; c; c = c->next) {
    t->hits += load64(&c->hits);
    t->misses += load64(&c->misses);
    t->evictions += load64(&c->evictions);
    t->uncached += load64(&c->uncached);
    t->written_back_bytes += load64(&c->written_back_bytes);
    t->written_back_blocks += load64(&c->written_back_blocks);
  }
  pthread_mutex_unlock(&counters_lock);
  pthread_mutex_lock(&disks_lock);
  for (struct disk *d = disks; d; d = d->next)
    t->dirty += load64(&d->dirty);
  pthread_mutex_unlock(&disks_lock);
  pthread_mutex_lock(&policy_lock);
  t->cached = probation.len + mainq.len;
  pthread_mutex_unlock(&policy_lock);
}

static int stats_command(int argc, const char *const *keys, const char *const *values,
                         struct nbdserve_reply *reply)
{
  (void) values;
  if (argc > 0) {
    nbdserve_reply_error(reply, "cache.stats takes no arguments (got %s)", keys[0]);
    return -1;
  }
  struct totals t;
  sum_up(&t);
  int r = 0;
  r |= nbdserve_reply_add(reply, "mode", "%s", mode_names[mode]);
  r |= nbdserve_reply_add(reply, "block_size", "%" PRIu64, block_size);
  r |= nbdserve_reply_add(reply, "max_blocks", "%" PRIu64, nr_slots);
  r |= nbdserve_reply_add(reply, "cached_blocks", "%" PRIu64, t.cached);
  r |= nbdserve_reply_add(reply, "hits", "%" PRIu64, t.hits);
  r |= nbdserve_reply_add(reply, "misses", "%" PRIu64, t.misses);
  r |= nbdserve_reply_add(reply, "evictions", "%" PRIu64, t.evictions);
  r |= nbdserve_reply_add(reply, "uncached", "%" PRIu64, t.uncached);
  r |= nbdserve_reply_add(reply, "dirty_blocks", "%" PRIu64, t.dirty);
  r |= nbdserve_reply_add(reply, "written_back_blocks", "%" PRIu64, t.written_back_blocks);
  r |= nbdserve_reply_add(reply, "written_back_bytes", "%" PRIu64, t.written_back_bytes);
  if (r) {
    nbdserve_reply_error(reply, "could not add a line to the reply");
    return -1;
  }
  return 0;
}

/* ---- Start and end ---------------------------------------------------------------------- */

static int map_arena(void)
{
  arena_size = (size_t) (nr_slots * block_size);
  int fd = -1, flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
  if (cache_dir) {
    size_t len = strlen(cache_dir) + 32;
    char *path = malloc(len);
    if (path == NULL)
      return -1;
    snprintf(path, len, "%s/nbdserve-cache.XXXXXX", cache_dir);
    fd = mkostemp(path, O_CLOEXEC);
    if (fd == -1) {
      nbdserve_error("cache-dir=%s: creating the cache file: %m", cache_dir);
      free(path);
      return -1;
    }
    unlink(path); /* it lives as long as the server, and no longer */
    free(path);
    if (ftruncate(fd, (off_t) arena_size) == -1) {
      nbdserve_error("cache-dir=%s: sizing the cache file to %zu bytes: %m", cache_dir,
                     arena_size);
      close(fd);
      return -1;
    }
    flags = MAP_SHARED;
  }
  arena = mmap(NULL, arena_size, PROT_READ | PROT_WRITE, flags, fd, 0);
  int err = errno;
  if (fd != -1)
    close(fd);
  if (arena == MAP_FAILED) {
    arena = NULL;
    nbdserve_error("cache: mapping %zu bytes for the cache: %s", arena_size, strerror(err));
    return -1;
  }
  return 0;
}

static uint64_t power_of_two_above(uint64_t n)
{
  uint64_t p = 64;
  while (p < n)
    p <<= 1;
  return p;
}

static int cache_get_ready(void)
{
  nr_slots = max_size / block_size;
  if (map_arena() == -1)
    return -1;
  uint64_t nbuckets = power_of_two_above(2 * nr_slots);
  bucket_mask = nbuckets - 1;
  nr_ghosts = nr_slots;
  uint64_t nghost_buckets = power_of_two_above(2 * nr_ghosts);
  ghost_mask = nghost_buckets - 1;
  entries = calloc(nr_slots, sizeof *entries);
  buckets = calloc(nbuckets, sizeof *buckets);
  ghosts = calloc(nr_ghosts, sizeof *ghosts);
  ghost_buckets = calloc(nghost_buckets, sizeof *ghost_buckets);
  if (!entries || !buckets || !ghosts || !ghost_buckets) {
    nbdserve_error("cache: out of memory for the tables of %" PRIu64 " blocks", nr_slots);
    return -1;
  }
  for (int i = 0; i < NR_STRIPES; i++)
    pthread_mutex_init(&stripes[i].lock, NULL);
  fifo_init(&probation);
  fifo_init(&mainq);
  free_list = NULL;
  for (uint64_t i = nr_slots; i-- > 0;) {
    struct entry *e = &entries[i];
    pthread_rwlock_init(&e->lock, NULL);
    e->data = arena + i * block_size;
    e->hnext = free_list;
    free_list = e;
  }
  /* A tenth of the cache for probation, as S3-FIFO has it. */
  probation_target = nr_slots / 10 ? nr_slots / 10 : 1;
  correlated_period = probation_target / 2 ? probation_target / 2 : 1;
  if (nbdserve_register_command("stats", "cache hits, misses, evictions, dirty blocks, "
                                "bytes written back", stats_command) == -1) {
    nbdserve_error("cache: registering cache.stats: %m");
    return -1;
  }
  ready = true;
  return 0;
}

static void cache_unload(void)
{
  if (ready) {
    struct totals t;
    sum_up(&t);
    nbdserve_debug("cache: hits=%" PRIu64 " misses=%" PRIu64 " evictions=%" PRIu64
                   " uncached=%" PRIu64 " dirty_blocks=%" PRIu64
                   " written_back_bytes=%" PRIu64, t.hits, t.misses, t.evictions, t.uncached,
                   t.dirty, t.written_back_bytes);
    if (t.dirty)
      nbdserve_error("cache: %" PRIu64 " dirty blocks were never written back (no FLUSH, "
                     "and writing them back at disconnect failed): their data is lost",
                     t.dirty);
  }
  ready = false;
  if (entries)
    for (uint64_t i = 0; i < nr_slots; i++)
      pthread_rwlock_destroy(&entries[i].lock);
  free(entries);
  free(buckets);
  free(ghosts);
  free(ghost_buckets);
  entries = NULL;
  buckets = NULL;
  ghosts = NULL;
  ghost_buckets = NULL;
  if (arena)
    munmap(arena, arena_size);
  arena = NULL;
  while (disks) {
    struct disk *d = disks;
    disks = d->next;
    free(d->name);
    free(d);
  }
  while (all_counters) {
    struct counters *c = all_counters;
    all_counters = c->next;
    free(c);
  }
  free(cache_dir);
  cache_dir = NULL;
}

#define CACHE_CONFIG_HELP                                                                \
  "cache-mode=MODE        writeback (default): writes stay in the cache until FLUSH,\n"  \
  "                       FUA or eviction; writethrough: every write goes down first;\n" \
  "                       unsafe: as writeback, but FLUSH and FUA do nothing\n"          \
  "cache-block-size=SIZE  a power of two from 4K to 32M (default 64K)\n"                 \
  "cache-max-size=SIZE    how much data the cache holds (default 256M)\n"               \
  "cache-on-read=BOOL     keep the blocks that reads bring in (default true)\n"          \
  "cache-dir=DIR          keep the cache in an unlinked file under DIR instead of\n"     \
  "                       memory\n"                                                     \
  "The counters answer the control command cache.stats, and are logged at exit\n"       \
  "with -v."

static struct nbdserve_filter filter = {
  NBDSERVE_FILTER_INIT,
  .name = "cache",
  .longname = "nbdserve cache filter",
  .version = "1.0",
  .description = "A block cache in memory or in a local file, shared by every connection,\n"
                 "in writeback, writethrough or unsafe mode.",
  .config_help = CACHE_CONFIG_HELP,
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .load = cache_load,
  .unload = cache_unload,
  .config = cache_config,
  .config_complete = cache_config_complete,
  .get_ready = cache_get_ready,
  .never_blocks = cache_never_blocks,
  .open = cache_open,
  .prepare = cache_prepare,
  .finalize = cache_finalize,
  .close = cache_close,
  .block_size = cache_block_size,
  .can_flush = cache_can_flush,
  .can_fua = cache_can_fua,
  .can_cache = cache_can_cache,
  .pread = cache_pread,
  .pwrite = cache_pwrite,
  .zero = cache_zero,
  .trim = cache_trim,
  .flush = cache_flush,
  .cache = cache_cache,
  .extents = cache_extents,
};

NBDSERVE_REGISTER_FILTER(filter)
