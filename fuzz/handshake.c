/* Fuzz target: the whole client byte stream from the first byte, so the
 * greeting's client flags, option haggling and everything after.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include "common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  fuzz_setup_server();
  fuzz_serve(NULL, 0, data, size);
  return 0;
}
