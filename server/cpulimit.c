/* nbdserve - how much CPU this process may use.
 *
 * Two things limit it: the CPUs the scheduler may run us on (taskset,
 * a cpuset), and a cgroup CPU quota (a container's --cpus, systemd's
 * CPUQuota=), which lets us use any CPU but only for so much time per
 * period.  The quota is invisible to sched_getaffinity: a container
 * limited to one CPU on a 64-CPU host still sees 64.  Busy polling must
 * know, as a polling thread that eats the whole quota gets the process
 * throttled, every thread of it, for the rest of each period.
 *
 * The quota is read from cgroup v2 (cpu.max) or v1 (cpu.cfs_quota_us
 * and cpu.cfs_period_us), in our own cgroup and every ancestor up to the
 * mount's root, as any of them may hold the tightest limit.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Where mountinfo and cgroup are read from (tests/lib/cpulimit-probe.c
 * points it at made-up trees). */
#ifndef PROC_SELF
#define PROC_SELF "/proc/self"
#endif

static FILE *open_proc_self(const char *name)
{
  char path[512];
  if (snprintf(path, sizeof path, "%s/%s", PROC_SELF, name) >= (int) sizeof path)
    return NULL;
  return fopen(path, "r");
}

/* The cgroup mount of one hierarchy, and our cgroup's path in it; an
 * empty string is one not found. */
struct cgroup_place {
  char mount_point[256];
  char mount_root[256];
  char path[512];
};

static bool has_item(const char *list, const char *item)
{
  size_t n = strlen(item);
  for (const char *p = list; p; p = strchr(p, ',')) {
    if (*p == ',')
      p++;
    if (strncmp(p, item, n) == 0 && (p[n] == ',' || p[n] == '\0'))
      return true;
  }
  return false;
}

/* From /proc/self/mountinfo: "id parent dev ROOT MOUNTPOINT opts ... -
 * FSTYPE source SUPEROPTS".  V1 looks for the hierarchy with the cpu
 * controller, else for the cgroup2 mount. */
static void find_mount(struct cgroup_place *v1, struct cgroup_place *v2)
{
  FILE *f = open_proc_self("mountinfo");
  if (f == NULL)
    return;
  char line[1024];
  while (fgets(line, sizeof line, f)) {
    char root[256], point[256], fstype[64], superopts[256];
    const char *dash = strstr(line, " - ");
    if (dash == NULL ||
        sscanf(line, "%*s %*s %*s %255s %255s", root, point) != 2 ||
        sscanf(dash, " - %63s %*s %255s", fstype, superopts) != 2)
      continue;
    struct cgroup_place *place = NULL;
    if (strcmp(fstype, "cgroup2") == 0)
      place = v2;
    else if (strcmp(fstype, "cgroup") == 0 && has_item(superopts, "cpu"))
      place = v1;
    if (place && place->mount_point[0] == '\0') {
      snprintf(place->mount_root, sizeof place->mount_root, "%s", root);
      snprintf(place->mount_point, sizeof place->mount_point, "%s", point);
    }
  }
  fclose(f);
}

/* From /proc/self/cgroup: "0::PATH" for v2, "N:CONTROLLERS:PATH" for v1. */
static void find_path(struct cgroup_place *v1, struct cgroup_place *v2)
{
  FILE *f = open_proc_self("cgroup");
  if (f == NULL)
    return;
  char line[1024];
  while (fgets(line, sizeof line, f)) {
    line[strcspn(line, "\n")] = '\0';
    char *controllers = strchr(line, ':');
    char *path = controllers ? strchr(controllers + 1, ':') : NULL;
    if (path == NULL)
      continue;
    *controllers++ = '\0';
    *path++ = '\0';
    struct cgroup_place *place = NULL;
    if (strcmp(line, "0") == 0 && *controllers == '\0')
      place = v2;
    else if (has_item(controllers, "cpu"))
      place = v1;
    if (place && place->path[0] == '\0')
      snprintf(place->path, sizeof place->path, "%s", path);
  }
  fclose(f);
}

/* Reads the first N whitespace-separated words of DIR/FILE. */
static bool read_words(const char *dir, const char *file, char (*words)[32], int n)
{
  char name[1024];
  if (snprintf(name, sizeof name, "%s/%s", dir, file) >= (int) sizeof name)
    return false;
  FILE *f = fopen(name, "r");
  if (f == NULL)
    return false;
  int got = 0;
  while (got < n && fscanf(f, "%31s", words[got]) == 1)
    got++;
  fclose(f);
  return got == n;
}

/* The quota set on the cgroup directory DIR, in CPUs; 0 for none. */
static double quota_of(const char *dir, bool v2)
{
  char words[2][32]; /* quota, period */
  bool ok = v2 ? read_words(dir, "cpu.max", words, 2)
               : read_words(dir, "cpu.cfs_quota_us", &words[0], 1) &&
                   read_words(dir, "cpu.cfs_period_us", &words[1], 1);
  if (!ok || strcmp(words[0], "max") == 0)
    return 0;
  double quota = strtod(words[0], NULL), period = strtod(words[1], NULL);
  return quota > 0 && period > 0 ? quota / period : 0; /* v1 says -1 for none */
}

/* The tightest quota from our cgroup up to the mount's root; 0: none. */
static double quota_in(const struct cgroup_place *place, bool v2)
{
  if (place->mount_point[0] == '\0' || place->path[0] == '\0')
    return 0;
  /* Our path is relative to the hierarchy's root; the mount may show
   * only a subtree of it (in a container, usually our own cgroup). */
  const char *rel = place->path;
  size_t root_len = strlen(place->mount_root);
  if (strcmp(place->mount_root, "/") != 0) {
    if (strncmp(rel, place->mount_root, root_len) != 0 ||
        (rel[root_len] != '/' && rel[root_len] != '\0'))
      return 0;
    rel += root_len;
  }
  char dir[1024];
  snprintf(dir, sizeof dir, "%s%s", place->mount_point, rel);
  size_t floor_len = strlen(place->mount_point);
  double tightest = 0;
  for (;;) {
    double q = quota_of(dir, v2);
    if (q > 0 && (tightest == 0 || q < tightest))
      tightest = q;
    char *slash = strrchr(dir, '/');
    if (slash == NULL || (size_t) (slash - dir) < floor_len)
      break;
    *slash = '\0';
  }
  return tightest;
}

double cgroup_cpu_quota(void)
{
  struct cgroup_place v1 = { 0 }, v2 = { 0 };
  find_mount(&v1, &v2);
  find_path(&v1, &v2);
  double a = quota_in(&v1, false), b = quota_in(&v2, true);
  if (a > 0 && b > 0)
    return MIN(a, b);
  return a > 0 ? a : b;
}

unsigned affinity_cpus(void)
{
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof cpus, &cpus) != 0)
    return 1;
  return (unsigned) CPU_COUNT(&cpus);
}

unsigned usable_cpus(void)
{
  unsigned cpus = affinity_cpus();
  double quota = cgroup_cpu_quota();
  if (quota > 0 && quota < cpus) {
    unsigned whole = (unsigned) quota;
    cpus = whole < quota ? whole + 1 : whole;
  }
  return cpus ? cpus : 1;
}
