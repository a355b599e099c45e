/* nbdserve - the figures the control socket's status reports that no
 * loop owns: the uptime and how many connections have each export open.
 * (Requests and bytes are counted per loop, in struct loop, and summed
 * by loop.c.)
 *
 * Exports open and close once per connection, never per request, so
 * one mutex over a short list costs nothing that matters.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

const char *const request_kind_names[NR_KINDS] = {
  [KIND_READ] = "read", [KIND_WRITE] = "write", [KIND_FLUSH] = "flush",
  [KIND_TRIM] = "trim", [KIND_ZERO] = "zero", [KIND_CACHE] = "cache",
  [KIND_BLOCK_STATUS] = "block_status", [KIND_OTHER] = "other",
};

static uint64_t started_ns;

struct export_count {
  char *name;
  unsigned open;
  struct export_count *next;
};
static pthread_mutex_t exports_lock = PTHREAD_MUTEX_INITIALIZER;
static struct export_count *exports;

void stats_start(void)
{
  started_ns = now_ns();
}

double stats_uptime(void)
{
  return (double) (now_ns() - started_ns) / 1e9;
}

void stats_export_opened(const char *name)
{
  pthread_mutex_lock(&exports_lock);
  struct export_count *e;
  for (e = exports; e; e = e->next)
    if (strcmp(e->name, name) == 0)
      break;
  if (e == NULL && (e = calloc(1, sizeof *e)) != NULL) {
    e->name = strdup(name);
    if (e->name == NULL) {
      free(e);
      e = NULL;
    }
    else {
      e->next = exports;
      exports = e;
    }
  }
  if (e)
    e->open++;
  pthread_mutex_unlock(&exports_lock);
}

/* An entry goes when its count reaches 0: clients may name any number
 * of exports over time, the list holds only those open now. */
void stats_export_closed(const char *name)
{
  pthread_mutex_lock(&exports_lock);
  for (struct export_count **link = &exports; *link; link = &(*link)->next) {
    struct export_count *e = *link;
    if (strcmp(e->name, name) != 0)
      continue;
    if (--e->open == 0) {
      *link = e->next;
      free(e->name);
      free(e);
    }
    break;
  }
  pthread_mutex_unlock(&exports_lock);
}

void stats_exports_foreach(void (*fn)(const char *name, unsigned open, void *arg), void *arg)
{
  pthread_mutex_lock(&exports_lock);
  for (struct export_count *e = exports; e; e = e->next)
    fn(e->name, e->open, arg);
  pthread_mutex_unlock(&exports_lock);
}
