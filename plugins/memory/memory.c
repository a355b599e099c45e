/* nbdserve memory plugin: a sparse RAM disk.
 *
 * Storage is a three-level page table (a radix tree) of 64 KiB pages:
 *
 *   top[]  one slot per TiB          -> struct mid
 *   mid    4096 slots of 256 MiB     -> struct leaf
 *   leaf   4096 slots of 64 KiB      -> page (malloc'ed, 64 KiB)
 *
 * A page is allocated on the first write of non-zero data.  It is freed
 * again when trim or zero covers it, and when a write or a partial zero
 * leaves it all zero; a table whose last page goes is freed too.  So a
 * 1 TiB disk costs memory only for the pages that hold data.  Extents
 * come from walking the table and skip absent tables wholesale, so even
 * a huge mostly-empty disk maps instantly (extents are page-granular).
 *
 * Pages come from a small pool of our own rather than malloc: large
 * anonymous mappings ("arenas") cut into 64 KiB slots.  A freed slot is
 * handed back to the kernel with madvise(MADV_DONTNEED), so its memory
 * really returns to the system (malloc would keep it in the heap), and it
 * reads as zeroes when it is reused.
 *
 * Locking: one read-write lock guards the shape of the table.  Reads, and
 * writes into pages that already exist, take it shared: the protocol
 * leaves concurrent overlapping requests undefined, so copying data needs
 * no lock of its own.  Only allocating or freeing pages (and tables)
 * takes it exclusive.  No callback sleeps or does I/O, which is what
 * NBDSERVE_PLUGIN_NEVER_BLOCKS promises.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "nbdserve-plugin.h"

#define PAGE_BITS 16 /* 64 KiB pages */
#define LEAF_BITS 12 /* 4096 pages = 256 MiB per leaf table */
#define MID_BITS 12 /* 4096 leaves = 1 TiB per middle table */
#define PAGE_SIZE (UINT64_C(1) << PAGE_BITS)
#define LEAF_SPAN (PAGE_SIZE << LEAF_BITS)
#define MID_SPAN (LEAF_SPAN << MID_BITS)
#define LEAF_SLOTS (1u << LEAF_BITS)
#define MID_SLOTS (1u << MID_BITS)

struct leaf {
  char *pages[LEAF_SLOTS];
  unsigned used; /* pages allocated, so an empty leaf can be freed */
};

struct mid {
  struct leaf *leaves[MID_SLOTS];
  unsigned used; /* leaves allocated */
};

#define ARENA_PAGES 512 /* 32 MiB of address space per arena */
#define ARENA_SIZE (ARENA_PAGES * PAGE_SIZE)
#define ZERO_SPAN (PAGE_SIZE * 256) /* 16 MiB: most zero does per lock hold */

static int64_t disk_size = -1;
static struct mid **top; /* top_slots entries, one per TiB */
static size_t top_slots;
static pthread_rwlock_t lock;
static bool lock_ready;

/* ---- Indexing ------------------------------------------------------------ */

static inline size_t top_index(uint64_t offset)
{
  return (size_t) (offset / MID_SPAN);
}

static inline size_t mid_index(uint64_t offset)
{
  return (size_t) ((offset / LEAF_SPAN) & (MID_SLOTS - 1));
}

static inline size_t leaf_index(uint64_t offset)
{
  return (size_t) ((offset / PAGE_SIZE) & (LEAF_SLOTS - 1));
}

/* The first offset of the unit of SPAN bytes after the one holding OFFSET. */
static inline uint64_t next_boundary(uint64_t offset, uint64_t span)
{
  return (offset / span + 1) * span;
}

static inline uint64_t min_u64(uint64_t a, uint64_t b)
{
  return a < b ? a : b;
}

/* The leaf holding OFFSET, or NULL.  Caller holds the lock (any mode). */
static inline struct leaf *find_leaf(uint64_t offset)
{
  struct mid *mid = top[top_index(offset)];
  return mid ? mid->leaves[mid_index(offset)] : NULL;
}

/* The page holding OFFSET, or NULL.  Caller holds the lock (any mode). */
static inline char *find_page(uint64_t offset)
{
  struct leaf *leaf = find_leaf(offset);
  return leaf ? leaf->pages[leaf_index(offset)] : NULL;
}

/* ---- The page pool (caller holds the lock exclusive) ------------------------ */

static char **arenas; /* every arena mapped, to unmap at unload */
static size_t arena_count;
static size_t arena_used; /* slots of the newest arena handed out so far */
static char **free_slots; /* released slots, zeroed, ready for reuse */
static size_t free_count;

/* Map one more arena.  The free list grows first to hold every slot
 * that exists, so releasing a page never needs memory. */
static int add_arena(void)
{
  size_t slots = (arena_count + 1) * ARENA_PAGES;
  char **fl = realloc(free_slots, slots * sizeof *fl);
  if (fl == NULL)
    return -1;
  free_slots = fl;
  char **al = realloc(arenas, (arena_count + 1) * sizeof *al);
  if (al == NULL)
    return -1;
  arenas = al;
  void *arena = mmap(NULL, ARENA_SIZE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (arena == MAP_FAILED)
    return -1;
  /* Transparent huge pages would make one 64 KiB write cost 2 MiB. */
  madvise(arena, ARENA_SIZE, MADV_NOHUGEPAGE);
  arenas[arena_count++] = arena;
  arena_used = 0;
  return 0;
}

/* The slot is about to be written: ask for its memory in one call
 * rather than in sixteen page faults, which cost far more each (inside
 * a VM above all).  Kernels before 5.14 refuse; the faults then happen
 * as before. */
static char *populated(char *page)
{
#ifdef MADV_POPULATE_WRITE
  madvise(page, PAGE_SIZE, MADV_POPULATE_WRITE);
#endif
  return page;
}

/* A zeroed 64 KiB page, or NULL when out of memory. */
static char *page_alloc(void)
{
  if (free_count > 0)
    return populated(free_slots[--free_count]);
  if ((arena_count == 0 || arena_used == ARENA_PAGES) && add_arena() == -1)
    return NULL;
  return populated(arenas[arena_count - 1] + PAGE_SIZE * arena_used++);
}

/* Give the page's memory back to the kernel and keep its slot.  The
 * slot reads as zeroes from now on, as the next page_alloc needs. */
static void page_release(char *page)
{
  if (madvise(page, PAGE_SIZE, MADV_DONTNEED) == -1)
    memset(page, 0, PAGE_SIZE); /* cannot happen on anonymous memory */
  free_slots[free_count++] = page;
}

static void pool_destroy(void)
{
  for (size_t i = 0; i < arena_count; i++)
    munmap(arenas[i], ARENA_SIZE);
  free(arenas);
  free(free_slots);
  arenas = free_slots = NULL;
  arena_count = arena_used = free_count = 0;
}

/* ---- The table ---------------------------------------------------------------- */

/* The page holding OFFSET, made (zeroed, with any missing tables) if
 * absent; NULL when out of memory.  Caller holds the lock exclusive. */
static char *make_page(uint64_t offset)
{
  struct mid **midp = &top[top_index(offset)];
  if (*midp == NULL && (*midp = calloc(1, sizeof **midp)) == NULL)
    return NULL;
  struct leaf **leafp = &(*midp)->leaves[mid_index(offset)];
  if (*leafp == NULL) {
    if ((*leafp = calloc(1, sizeof **leafp)) == NULL)
      goto drop_empty_mid;
    (*midp)->used++;
  }
  char **pagep = &(*leafp)->pages[leaf_index(offset)];
  if (*pagep == NULL) {
    if ((*pagep = page_alloc()) == NULL)
      goto drop_empty_leaf;
    (*leafp)->used++;
  }
  return *pagep;

  /* Leave no empty tables behind after a failure. */
drop_empty_leaf:
  if ((*leafp)->used == 0) {
    free(*leafp);
    *leafp = NULL;
    (*midp)->used--;
  }
drop_empty_mid:
  if ((*midp)->used == 0) {
    free(*midp);
    *midp = NULL;
  }
  return NULL;
}

/* Free the page holding OFFSET (if any), and the tables it leaves empty.
 * Caller holds the lock exclusive. */
static void free_page(uint64_t offset)
{
  size_t t = top_index(offset), m = mid_index(offset), p = leaf_index(offset);
  struct mid *mid = top[t];
  struct leaf *leaf = mid ? mid->leaves[m] : NULL;
  if (leaf == NULL || leaf->pages[p] == NULL)
    return;
  page_release(leaf->pages[p]);
  leaf->pages[p] = NULL;
  if (--leaf->used > 0)
    return;
  free(leaf);
  mid->leaves[m] = NULL;
  if (--mid->used > 0)
    return;
  free(mid);
  top[t] = NULL;
}

static bool all_zero(const char *p, size_t n)
{
  /* Non-zero data usually fails on the first byte; zeroes compare
   * against themselves one byte later at memcmp speed. */
  return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* Free the page holding OFFSET if nothing but zeroes is left in it. */
static void free_page_if_zero(uint64_t offset)
{
  pthread_rwlock_wrlock(&lock);
  char *page = find_page(offset);
  if (page && all_zero(page, PAGE_SIZE))
    free_page(offset);
  pthread_rwlock_unlock(&lock);
}

/* Requests outside the disk are refused by the server core; this is a
 * second line of defence so a bug there cannot index past top[]. */
static bool out_of_range(uint64_t count, uint64_t offset)
{
  if (count > (uint64_t) disk_size || offset > (uint64_t) disk_size - count) {
    nbdserve_error("memory: request at %llu+%llu lies outside the %lld-byte disk",
                   (unsigned long long) offset, (unsigned long long) count,
                   (long long) disk_size);
    nbdserve_set_error(EINVAL);
    return true;
  }
  return false;
}

/* ---- Configuration --------------------------------------------------------- */

static int memory_load(void)
{
  /* Writers first: a stream of readers must not starve the page
   * allocations of a writer.  We never take the lock recursively. */
  pthread_rwlockattr_t attr;
  pthread_rwlockattr_init(&attr);
  pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  int err = pthread_rwlock_init(&lock, &attr);
  pthread_rwlockattr_destroy(&attr);
  if (err) {
    nbdserve_error("memory: cannot create a lock: %s", strerror(err));
    return -1;
  }
  lock_ready = true;
  return 0;
}

static int memory_config(const char *key, const char *value)
{
  if (strcmp(key, "size") == 0) {
    disk_size = nbdserve_parse_size(value);
    return disk_size == -1 ? -1 : 0;
  }
  nbdserve_error("memory: unknown parameter '%s' (the only one is size=SIZE)", key);
  return -1;
}

static int memory_config_complete(void)
{
  if (disk_size == -1) {
    nbdserve_error("memory: size=SIZE is required, e.g. 'nbdserve memory 1G'");
    return -1;
  }
  /* One pointer per TiB: 64 MiB of address space for the largest disk
   * (2^63-1 bytes), untouched and so free until written. */
  top_slots = (size_t) (((uint64_t) disk_size + MID_SPAN - 1) / MID_SPAN);
  top = calloc(top_slots ? top_slots : 1, sizeof *top);
  if (top == NULL) {
    nbdserve_error("memory: cannot allocate the page table: %m");
    return -1;
  }
  return 0;
}

static void memory_unload(void)
{
  for (size_t t = 0; top && t < top_slots; t++) {
    if (top[t] == NULL)
      continue;
    for (size_t m = 0; m < MID_SLOTS; m++) {
      struct leaf *leaf = top[t]->leaves[m];
      if (leaf == NULL)
        continue;
      free(leaf); /* its pages go with the pool */
    }
    free(top[t]);
  }
  free(top);
  top = NULL;
  pool_destroy();
  if (lock_ready)
    pthread_rwlock_destroy(&lock);
  lock_ready = false;
}

/* ---- Connections and capabilities ------------------------------------------ */

static void *memory_open(int readonly, const char *export_name)
{
  (void) readonly, (void) export_name;
  return &disk_size; /* one disk shared by all connections: no per-connection state */
}

static int64_t memory_get_size(void *handle)
{
  (void) handle;
  return disk_size;
}

static int return_one(void *handle)
{
  (void) handle;
  return 1;
}

static int memory_can_fua(void *handle)
{
  (void) handle;
  return NBDSERVE_FUA_NATIVE; /* RAM has nothing to persist: FUA is free */
}

static int memory_can_cache(void *handle)
{
  (void) handle;
  return NBDSERVE_CACHE_NATIVE; /* already in memory: cache is free */
}

/* ---- Data ---------------------------------------------------------------------- */

/* Bytes from OFFSET to the end of its page, at most COUNT. */
static inline uint32_t chunk_in_page(uint64_t offset, uint64_t count)
{
  return (uint32_t) min_u64(PAGE_SIZE - (offset & (PAGE_SIZE - 1)), count);
}

static int memory_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) handle, (void) flags;
  if (out_of_range(count, offset))
    return -1;
  char *out = buf;
  pthread_rwlock_rdlock(&lock);
  while (count > 0) {
    uint32_t n = chunk_in_page(offset, count);
    const char *page = find_page(offset);
    if (page)
      memcpy(out, page + (offset & (PAGE_SIZE - 1)), n);
    else
      memset(out, 0, n); /* never written: reads as zeroes */
    out += n;
    offset += n;
    count -= n;
  }
  pthread_rwlock_unlock(&lock);
  return 0;
}

/* Write N bytes (within one page) at OFFSET into a page that does not
 * exist yet.  The page is made and filled under the exclusive lock, so
 * no trim can free it in between. */
static int write_new_page(uint64_t offset, const char *data, uint32_t n)
{
  pthread_rwlock_wrlock(&lock);
  char *page = make_page(offset); /* another writer may have made it meanwhile */
  if (page)
    memcpy(page + (offset & (PAGE_SIZE - 1)), data, n);
  pthread_rwlock_unlock(&lock);
  if (page == NULL) {
    nbdserve_error("memory: out of memory allocating a page");
    nbdserve_set_error(ENOMEM);
    return -1;
  }
  return 0;
}

static int memory_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset,
                         uint32_t flags)
{
  (void) handle, (void) flags; /* FUA: nothing to persist */
  if (out_of_range(count, offset))
    return -1;
  const char *in = buf;
  while (count > 0) {
    uint32_t n = chunk_in_page(offset, count);
    bool zeroes = all_zero(in, n);

    /* Common case: the page exists; copy under the shared lock. */
    pthread_rwlock_rdlock(&lock);
    char *page = find_page(offset);
    if (page)
      memcpy(page + (offset & (PAGE_SIZE - 1)), in, n);
    pthread_rwlock_unlock(&lock);

    if (page && zeroes)
      free_page_if_zero(offset); /* writing zeroes gives memory back */
    else if (!page && !zeroes && write_new_page(offset, in, n) == -1)
      return -1;
    /* (!page && zeroes): an absent page already reads as zeroes. */
    in += n;
    offset += n;
    count -= n;
  }
  return 0;
}

/* Zero [offset, offset+count), a range inside one leaf's span.  Whole
 * pages are freed, partial ones cleared (and freed if that leaves them
 * all zero).  Caller holds the lock exclusive. */
static void zero_within_leaf(uint64_t count, uint64_t offset)
{
  while (count > 0 && find_leaf(offset)) { /* the leaf goes with its last page */
    uint32_t n = chunk_in_page(offset, count);
    char *page = find_page(offset);
    if (page && n == PAGE_SIZE)
      free_page(offset);
    else if (page) {
      memset(page + (offset & (PAGE_SIZE - 1)), 0, n);
      if (all_zero(page, PAGE_SIZE))
        free_page(offset);
    }
    offset += n;
    count -= n;
  }
}

/* Zero (and trim: a freed page reads as zeroes) [offset, offset+count).
 * Always fast, so FAST_ZERO is honoured trivially; MAY_TRIM and FUA
 * change nothing. */
static int memory_zero(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) handle, (void) flags;
  if (out_of_range(count, offset))
    return -1;
  while (count > 0) {
    /* Absent tables are skipped whole.  Elsewhere at most ZERO_SPAN is
     * done per lock hold (each freed page costs a madvise), so a huge
     * zero never keeps readers waiting long. */
    pthread_rwlock_wrlock(&lock);
    uint64_t span = ZERO_SPAN;
    if (top[top_index(offset)] == NULL)
      span = MID_SPAN;
    else if (find_leaf(offset) == NULL)
      span = LEAF_SPAN;
    uint64_t n = min_u64(next_boundary(offset, span) - offset, count);
    if (span == ZERO_SPAN)
      zero_within_leaf(n, offset);
    pthread_rwlock_unlock(&lock);
    offset += n;
    count -= n;
  }
  return 0;
}

static int memory_trim(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  return memory_zero(handle, count, offset, flags);
}

static int memory_flush(void *handle, uint32_t flags)
{
  (void) handle, (void) flags;
  return 0; /* nothing is ever more durable than it is now */
}

static int memory_cache(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) handle, (void) count, (void) offset, (void) flags;
  return 0;
}

/* ---- Extents -------------------------------------------------------------------- */

/* First allocated page at or after OFFSET, below END; END if none.
 * Absent middle tables and leaves are skipped in one step. */
static uint64_t next_allocated(uint64_t offset, uint64_t end)
{
  while (offset < end) {
    struct mid *mid = top[top_index(offset)];
    if (mid == NULL) {
      offset = next_boundary(offset, MID_SPAN);
      continue;
    }
    struct leaf *leaf = mid->leaves[mid_index(offset)];
    if (leaf == NULL) {
      offset = next_boundary(offset, LEAF_SPAN);
      continue;
    }
    if (leaf->pages[leaf_index(offset)])
      return offset;
    offset = next_boundary(offset, PAGE_SIZE);
  }
  return end;
}

/* First unallocated page at or after OFFSET, below END; END if none. */
static uint64_t next_unallocated(uint64_t offset, uint64_t end)
{
  while (offset < end && find_page(offset))
    offset = next_boundary(offset, PAGE_SIZE);
  return min_u64(offset, end);
}

static int memory_extents(void *handle, uint64_t count, uint64_t offset, uint32_t flags,
                          struct nbdserve_extents *extents)
{
  (void) handle, (void) flags; /* REQ_ONE: the builder stops after one */
  /* Block status lengths are hints: clip rather than fail. */
  if (offset < (uint64_t) disk_size && count > (uint64_t) disk_size - offset)
    count = (uint64_t) disk_size - offset;
  if (out_of_range(count, offset))
    return -1;
  uint64_t end = offset + count;
  /* Whole pages are described (the builder clips them to the request),
   * but never past the disk's end. */
  uint64_t limit = min_u64(end + (PAGE_SIZE - 1), (uint64_t) disk_size) & ~(PAGE_SIZE - 1);
  if (limit < end)
    limit = (uint64_t) disk_size; /* a partial last page */
  uint64_t pos = offset & ~(PAGE_SIZE - 1);
  int r = 0;

  pthread_rwlock_rdlock(&lock);
  while (pos < end && r == 0) {
    uint64_t stop = next_allocated(pos, limit);
    uint64_t type = NBDSERVE_EXTENT_HOLE | NBDSERVE_EXTENT_ZERO;
    if (stop == pos) { /* data */
      stop = next_unallocated(pos, limit);
      type = 0;
    }
    r = nbdserve_add_extent(extents, pos, stop - pos, type);
    /* A full list stops growing: then we are done. */
    if (r == 0 && nbdserve_extents_end(extents) < stop)
      break;
    pos = stop;
  }
  pthread_rwlock_unlock(&lock);
  return r;
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "memory",
  .longname = "sparse RAM disk",
  .version = "0.1.0",
  .description = "A RAM disk of the given size, shared by all clients.  Only pages "
                 "(64 KiB) holding non-zero data use memory; trim and zero give it back.  "
                 "The contents are lost when the server exits.",
  .config_help = "size=SIZE       (required) size of the disk, e.g. 1G, 1T",
  .magic_config_key = "size",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .flags = NBDSERVE_PLUGIN_NEVER_BLOCKS,
  .load = memory_load,
  .config = memory_config,
  .config_complete = memory_config_complete,
  .unload = memory_unload,
  .open = memory_open,
  .get_size = memory_get_size,
  .can_write = return_one,
  .can_flush = return_one,
  .can_trim = return_one,
  .can_zero = return_one,
  .can_fast_zero = return_one,
  .can_fua = memory_can_fua,
  .can_multi_conn = return_one,
  .can_cache = memory_can_cache,
  .can_extents = return_one,
  .pread = memory_pread,
  .pwrite = memory_pwrite,
  .flush = memory_flush,
  .trim = memory_trim,
  .zero = memory_zero,
  .cache = memory_cache,
  .extents = memory_extents,
};

NBDSERVE_REGISTER_PLUGIN(plugin)
