/* Prints the cgroup CPU quota server/cpulimit.c finds when it reads
 * DIR/mountinfo and DIR/cgroup instead of /proc/self's: the tests build
 * made-up cgroup trees for the layouts this machine does not have.
 *
 *   cpulimit-probe DIR      prints the quota in CPUs, 0 for none
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <stdio.h>

static const char *proc_self_dir;
#define PROC_SELF proc_self_dir
#include "../../server/cpulimit.c"

int main(int argc, char **argv)
{
  if (argc != 2) {
    fprintf(stderr, "usage: cpulimit-probe DIR\n");
    return 2;
  }
  proc_self_dir = argv[1];
  printf("%.2f\n", cgroup_cpu_quota());
  return 0;
}
