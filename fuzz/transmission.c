/* Fuzz target: requests and payloads.  The harness negotiates for the
 * client; the first input byte chooses how, so every reply format is
 * covered: simple replies, structured replies, extended headers, or
 * structured replies with base:allocation selected.  The rest of the
 * input is the request stream.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <string.h>

#include "common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define OPT(type, len) 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, (type), 0, 0, 0, (len)
#define FLAGS 0, 0, 0, 3 /* fixed newstyle, no zeroes */
#define GO OPT(7, 6), 0, 0, 0, 0, 0, 0 /* export "", no info requests */

static const uint8_t plain[] = { FLAGS, GO };
static const uint8_t structured[] = { FLAGS, OPT(8, 0), GO };
static const uint8_t extended[] = { FLAGS, OPT(11, 0), GO };
static const uint8_t with_meta[] = {
  FLAGS, OPT(8, 0),
  OPT(10, 27), 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15,
  'b', 'a', 's', 'e', ':', 'a', 'l', 'l', 'o', 'c', 'a', 't', 'i', 'o', 'n',
  GO,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static const struct {
    const uint8_t *bytes;
    size_t len;
  } prefixes[] = {
    { plain, sizeof plain },
    { structured, sizeof structured },
    { extended, sizeof extended },
    { with_meta, sizeof with_meta },
  };
  if (size < 1)
    return 0;
  fuzz_setup_server();
  unsigned which = data[0] % 4;
  fuzz_serve(prefixes[which].bytes, prefixes[which].len, data + 1, size - 1);
  return 0;
}
