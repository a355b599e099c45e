/* qcow2 library: the metadata cache shared by every layer and thread.
 *
 * L2 tables and bitmap data are read in slices (4 KiB, or a cluster when
 * clusters are smaller), so a 2 MiB L2 table costs only the slices that
 * requests touch.  The cache is set-associative: a slice can live in one
 * of CACHE_WAYS places of the set its key hashes to, and each set has its
 * own lock, held only to compare keys and copy bytes.  A layer read here
 * is never written, except a checkpoint's layer absorbing a released one
 * (overlay), after which its slices are forgotten; eviction is least
 * recently used within the set.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdlib.h>

#include "internal.h"

#define CACHE_WAYS 8

struct cache_set {
  pthread_mutex_t lock;
  uint64_t clock; /* advances on every hit or fill, for LRU */
  struct {
    uint64_t offset;
    uint64_t last_used; /* 0: empty */
    unsigned id;
  } way[CACHE_WAYS];
};

int cache_init(struct meta_cache *cache, uint64_t bytes, uint32_t slice_size)
{
  uint64_t slots = bytes / slice_size;
  uint32_t nsets = 1;
  while ((uint64_t) nsets * 2 * CACHE_WAYS <= slots && nsets < (1u << 24))
    nsets *= 2;
  cache->slice_size = slice_size;
  cache->nsets = nsets;
  cache->sets = calloc(nsets, sizeof *cache->sets);
  cache->data = malloc((size_t) nsets * CACHE_WAYS * slice_size);
  if (cache->sets == NULL || cache->data == NULL) {
    cache_free(cache);
    return -1;
  }
  for (uint32_t i = 0; i < nsets; i++)
    pthread_mutex_init(&cache->sets[i].lock, NULL);
  return 0;
}

void cache_free(struct meta_cache *cache)
{
  if (cache->sets)
    for (uint32_t i = 0; i < cache->nsets; i++)
      pthread_mutex_destroy(&cache->sets[i].lock);
  free(cache->sets);
  free(cache->data);
  cache->sets = NULL;
  cache->data = NULL;
}

void cache_forget(struct meta_cache *cache, unsigned id)
{
  for (uint32_t s = 0; s < cache->nsets; s++) {
    pthread_mutex_lock(&cache->sets[s].lock);
    for (unsigned w = 0; w < CACHE_WAYS; w++)
      if (cache->sets[s].way[w].id == id)
        cache->sets[s].way[w].last_used = 0;
    pthread_mutex_unlock(&cache->sets[s].lock);
  }
}

static uint32_t set_of(const struct meta_cache *cache, unsigned id, uint64_t slice_index)
{
  uint64_t h = (slice_index ^ ((uint64_t) id << 40)) * 0x9e3779b97f4a7c15ull;
  return (uint32_t) (h >> 32) & (cache->nsets - 1);
}

static uint8_t *slot(const struct meta_cache *cache, uint32_t set, unsigned way)
{
  return cache->data + ((size_t) set * CACHE_WAYS + way) * cache->slice_size;
}

int cache_read(struct meta_cache *cache, const struct layer *l, void *buf, uint32_t count, uint64_t offset)
{
  uint32_t slice = cache->slice_size;
  uint64_t start = offset & ~(uint64_t) (slice - 1);
  uint32_t within = (uint32_t) (offset - start);
  if (count > slice - within)
    return -EINVAL; /* callers never cross a slice */
  uint32_t s = set_of(cache, l->cache_id, start / slice);
  struct cache_set *set = &cache->sets[s];

  pthread_mutex_lock(&set->lock);
  for (unsigned w = 0; w < CACHE_WAYS; w++)
    if (set->way[w].last_used && set->way[w].id == l->cache_id && set->way[w].offset == start) {
      set->way[w].last_used = ++set->clock;
      memcpy(buf, slot(cache, s, w) + within, count);
      pthread_mutex_unlock(&set->lock);
      return 0;
    }
  pthread_mutex_unlock(&set->lock);

  /* Miss: read outside the lock (another thread may fill the same
   * slice meanwhile; the second fill is merely redundant). */
  uint8_t fresh[4096];
  int r = read_at(l->fd, fresh, slice, start);
  if (r < 0)
    return r;
  memcpy(buf, fresh + within, count);

  pthread_mutex_lock(&set->lock);
  unsigned victim = 0;
  for (unsigned w = 0; w < CACHE_WAYS; w++) {
    if (set->way[w].last_used && set->way[w].id == l->cache_id && set->way[w].offset == start) {
      victim = w; /* filled meanwhile: refresh that copy */
      break;
    }
    if (set->way[w].last_used < set->way[victim].last_used)
      victim = w;
  }
  memcpy(slot(cache, s, victim), fresh, slice);
  set->way[victim].offset = start;
  set->way[victim].id = l->cache_id;
  set->way[victim].last_used = ++set->clock;
  pthread_mutex_unlock(&set->lock);
  return 0;
}
