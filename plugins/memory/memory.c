/* nbdserve memory plugin: a sparse RAM disk.
 *
 * Storage is a three-level page table of 64 KiB pages, allocated on the
 * first write of non-zero data and freed again by trim and zero, so a
 * 1 TiB disk costs memory only for what was written.  Extents come from
 * walking the table, skipping whole empty subtrees, so even a huge
 * mostly-empty disk maps instantly.
 *
 * Locking: a read-write lock guards the table's shape.  Reads and writes
 * of pages that exist take it shared (the protocol leaves concurrent
 * overlapping requests undefined, so data copies need no lock of their
 * own); allocating or freeing pages takes it exclusive.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "nbdserve-plugin.h"

#define PAGE_BITS 16 /* 64 KiB pages */
#define LEAF_BITS 12 /* 4096 pages = 256 MiB per leaf table */
#define MID_BITS 12 /* 4096 leaves = 1 TiB per middle table */
#define PAGE_SIZE (UINT64_C(1) << PAGE_BITS)
#define LEAF_SPAN (PAGE_SIZE << LEAF_BITS)
#define MID_SPAN (LEAF_SPAN << MID_BITS)

struct leaf {
  char *pages[1u << LEAF_BITS];
  unsigned used; /* allocated pages, to free empty leaves */
};
struct mid {
  struct leaf *leaves[1u << MID_BITS];
  unsigned used;
};

static int64_t disk_size = -1;
static struct mid **top; /* one slot per TiB */
static size_t top_slots;
static pthread_rwlock_t lock = PTHREAD_RWLOCK_INITIALIZER;

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
    if (!top[t])
      continue;
    for (size_t m = 0; m < (1u << MID_BITS); m++) {
      struct leaf *leaf = top[t]->leaves[m];
      if (!leaf)
        continue;
      for (size_t p = 0; p < (1u << LEAF_BITS); p++)
        free(leaf->pages[p]);
      free(leaf);
    }
    free(top[t]);
  }
  free(top);
  top = NULL;
}

static void *memory_open(int readonly, const char *export_name)
{
  (void) readonly, (void) export_name;
  return &disk_size; /* no per-connection state */
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
  return NBDSERVE_FUA_NATIVE; /* RAM has nothing to persist */
}

static int memory_can_cache(void *handle)
{
  (void) handle;
  return NBDSERVE_CACHE_NATIVE; /* already in memory */
}

/* The slot of the page holding OFFSET, or NULL when its leaf is absent.
 * With CREATE, missing tables are made (exclusive lock held). */
static char **page_slot(uint64_t offset, bool create)
{
  size_t t = (size_t) (offset / MID_SPAN);
  size_t m = (size_t) ((offset / LEAF_SPAN) & ((1u << MID_BITS) - 1));
  size_t p = (size_t) ((offset / PAGE_SIZE) & ((1u << LEAF_BITS) - 1));
  if (!top[t]) {
    if (!create || !(top[t] = calloc(1, sizeof *top[t])))
      return NULL;
  }
  struct leaf **leafp = &top[t]->leaves[m];
  if (!*leafp) {
    if (!create || !(*leafp = calloc(1, sizeof **leafp)))
      return NULL;
    top[t]->used++;
  }
  return &(*leafp)->pages[p];
}

static char *find_page(uint64_t offset)
{
  char **slot = page_slot(offset, false);
  return slot ? *slot : NULL;
}

static int memory_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) handle, (void) flags;
  char *out = buf;
  pthread_rwlock_rdlock(&lock);
  while (count > 0) {
    uint64_t in_page = offset & (PAGE_SIZE - 1);
    uint32_t n = (uint32_t) (PAGE_SIZE - in_page < count ? PAGE_SIZE - in_page : count);
    char *page = find_page(offset);
    if (page)
      memcpy(out, page + in_page, n);
    else
      memset(out, 0, n);
    out += n;
    offset += n;
    count -= n;
  }
  pthread_rwlock_unlock(&lock);
  return 0;
}

static bool all_zero(const char *p, size_t n)
{
  return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* Allocate the page at OFFSET if needed and copy DATA into it, all under
 * the exclusive lock so a concurrent trim cannot free it in between. */
static int write_new_page(uint64_t offset, const char *data, uint32_t n)
{
  int r = 0;
  pthread_rwlock_wrlock(&lock);
  char **slot = page_slot(offset, true);
  if (slot && !*slot) {
    *slot = calloc(1, PAGE_SIZE);
    if (*slot) {
      size_t t = (size_t) (offset / MID_SPAN);
      size_t m = (size_t) ((offset / LEAF_SPAN) & ((1u << MID_BITS) - 1));
      top[t]->leaves[m]->used++;
    }
  }
  if (slot && *slot)
    memcpy(*slot + (offset & (PAGE_SIZE - 1)), data, n);
  else
    r = -1;
  pthread_rwlock_unlock(&lock);
  return r;
}

static int memory_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset,
                         uint32_t flags)
{
  (void) handle, (void) flags;
  const char *in = buf;
  while (count > 0) {
    uint64_t in_page = offset & (PAGE_SIZE - 1);
    uint32_t n = (uint32_t) (PAGE_SIZE - in_page < count ? PAGE_SIZE - in_page : count);
    pthread_rwlock_rdlock(&lock);
    char *page = find_page(offset);
    if (page)
      memcpy(page + in_page, in, n);
    pthread_rwlock_unlock(&lock);
    if (!page && !all_zero(in, n) && write_new_page(offset, in, n) == -1) {
      nbdserve_set_error(ENOMEM); /* zeroes need no page; data does */
      return -1;
    }
    in += n;
    offset += n;
    count -= n;
  }
  return 0;
}

/* Zero [offset, offset+count): whole pages are freed, parts cleared. */
static int memory_zero(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) handle, (void) flags;
  pthread_rwlock_wrlock(&lock);
  while (count > 0) {
    uint64_t in_page = offset & (PAGE_SIZE - 1);
    uint64_t n = PAGE_SIZE - in_page < count ? PAGE_SIZE - in_page : count;
    char **slot = page_slot(offset, false);
    if (slot == NULL) {
      /* No leaf here: skip to the next leaf boundary. */
      uint64_t skip = LEAF_SPAN - (offset & (LEAF_SPAN - 1));
      n = skip < count ? skip : count;
    }
    else if (*slot) {
      if (n == PAGE_SIZE) {
        free(*slot);
        *slot = NULL;
        size_t t = (size_t) (offset / MID_SPAN);
        size_t m = (size_t) ((offset / LEAF_SPAN) & ((1u << MID_BITS) - 1));
        struct leaf *leaf = top[t]->leaves[m];
        if (--leaf->used == 0) {
          free(leaf);
          top[t]->leaves[m] = NULL;
          if (--top[t]->used == 0) {
            free(top[t]);
            top[t] = NULL;
          }
        }
      }
      else
        memset(*slot + in_page, 0, n);
    }
    offset += n;
    count -= n;
  }
  pthread_rwlock_unlock(&lock);
  return 0;
}

static int memory_trim(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  return memory_zero(handle, count, offset, flags); /* holes read as zero */
}

static int memory_flush(void *handle, uint32_t flags)
{
  (void) handle, (void) flags;
  return 0;
}

static int memory_cache(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) handle, (void) count, (void) offset, (void) flags;
  return 0;
}

/* Next allocated page at or after OFFSET, below END; END if none. */
static uint64_t next_allocated(uint64_t offset, uint64_t end)
{
  while (offset < end) {
    size_t t = (size_t) (offset / MID_SPAN);
    if (!top[t]) {
      offset = (offset / MID_SPAN + 1) * MID_SPAN;
      continue;
    }
    size_t m = (size_t) ((offset / LEAF_SPAN) & ((1u << MID_BITS) - 1));
    struct leaf *leaf = top[t]->leaves[m];
    if (!leaf) {
      offset = (offset / LEAF_SPAN + 1) * LEAF_SPAN;
      continue;
    }
    size_t p = (size_t) ((offset / PAGE_SIZE) & ((1u << LEAF_BITS) - 1));
    if (leaf->pages[p])
      return offset;
    offset = (offset / PAGE_SIZE + 1) * PAGE_SIZE;
  }
  return end;
}

/* Next unallocated page at or after OFFSET, below END; END if none. */
static uint64_t next_hole(uint64_t offset, uint64_t end)
{
  while (offset < end && find_page(offset))
    offset = (offset / PAGE_SIZE + 1) * PAGE_SIZE;
  return offset < end ? offset : end;
}

static int memory_extents(void *handle, uint64_t count, uint64_t offset, uint32_t flags,
                          struct nbdserve_extents *extents)
{
  (void) handle, (void) flags;
  uint64_t end = offset + count;
  /* Looking further than the request's last page would be wasted. */
  uint64_t disk_end = (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
  if (disk_end > (uint64_t) disk_size || disk_end < end)
    disk_end = (uint64_t) disk_size;
  /* Describe whole pages; the server clips to the request. */
  uint64_t pos = offset & ~(PAGE_SIZE - 1);
  int r = 0;

  pthread_rwlock_rdlock(&lock);
  while (pos < end && r == 0) {
    uint64_t data = next_allocated(pos, disk_end);
    if (data > pos) {
      r = nbdserve_add_extent(extents, pos, data - pos, NBDSERVE_EXTENT_HOLE | NBDSERVE_EXTENT_ZERO);
      pos = data;
      continue;
    }
    uint64_t hole = next_hole(pos, disk_end);
    r = nbdserve_add_extent(extents, pos, hole - pos, 0);
    pos = hole;
  }
  pthread_rwlock_unlock(&lock);
  return r;
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "memory",
  .longname = "sparse RAM disk",
  .version = "0.1.0",
  .description = "A RAM disk of the given size; only written data uses memory.",
  .config_help = "size=SIZE       (required) size of the disk, e.g. 1G, 1T",
  .magic_config_key = "size",
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .flags = NBDSERVE_PLUGIN_NEVER_BLOCKS,
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
