/* nbdserve - big-endian fields on the wire, the one set of helpers.
 *
 * The protocol is big-endian throughout; buffers need not be aligned,
 * hence memcpy.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_WIRE_H
#define NBDSERVE_WIRE_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t wire_get16(const void *p)
{
  uint16_t v;
  memcpy(&v, p, 2);
  return be16toh(v);
}

static inline uint32_t wire_get32(const void *p)
{
  uint32_t v;
  memcpy(&v, p, 4);
  return be32toh(v);
}

static inline uint64_t wire_get64(const void *p)
{
  uint64_t v;
  memcpy(&v, p, 8);
  return be64toh(v);
}

static inline void wire_put16(void *p, uint16_t v)
{
  v = htobe16(v);
  memcpy(p, &v, 2);
}

static inline void wire_put32(void *p, uint32_t v)
{
  v = htobe32(v);
  memcpy(p, &v, 4);
}

static inline void wire_put64(void *p, uint64_t v)
{
  v = htobe64(v);
  memcpy(p, &v, 8);
}

#endif /* NBDSERVE_WIRE_H */
