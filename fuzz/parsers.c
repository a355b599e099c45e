/* Fuzz target: the value parsers behind the command line and plugin
 * parameters (sizes, booleans, numbers).  Each must accept or refuse
 * any string without crashing, and what it accepts must be in range.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <stdlib.h>
#include <string.h>

#include "nbdserve-common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  char *s = malloc(size + 1);
  if (s == NULL)
    return 0;
  memcpy(s, data, size);
  s[size] = '\0';

  int64_t n = nbdserve_parse_size(s);
  if (n < -1)
    abort(); /* -1 is the only failure value */
  int b = nbdserve_parse_bool(s);
  if (b < -1 || b > 1)
    abort();
  uint32_t u32;
  uint64_t u64;
  (void) nbdserve_parse_uint32("fuzz", s, &u32);
  (void) nbdserve_parse_uint64("fuzz", s, &u64);
  free(s);
  return 0;
}
