/* nbdserve - a small, fast random generator for plugins and filters that
 * need randomness of the statistical kind (error rates, delays), never
 * of the secret kind.
 *
 * Each thread has its own state, seeded from the kernel on first use, so
 * workers never contend on it.  Header-only: each .so gets its own copy.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_FASTRANDOM_H
#define NBDSERVE_FASTRANDOM_H

#include <stdint.h>
#include <sys/random.h>
#include <unistd.h>

/* 64 random bits (xorshift64). */
static inline uint64_t fastrandom_next(void)
{
  static __thread uint64_t state;
  if (state == 0) {
    if (getrandom(&state, sizeof state, 0) != sizeof state)
      state = (uint64_t) (uintptr_t) &state ^ (uint64_t) getpid();
    state |= 1; /* never 0: xorshift would stay there */
  }
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return state;
}

/* Uniform in [0, 1). */
static inline double fastrandom_unit(void)
{
  return (double) (fastrandom_next() >> 11) / (double) (UINT64_C(1) << 53);
}

/* Uniform in [0, bound) (0 when bound is 0); the tiny modulo bias is of
 * no consequence for delays. */
static inline uint64_t fastrandom_below(uint64_t bound)
{
  return bound ? fastrandom_next() % bound : 0;
}

#endif /* NBDSERVE_FASTRANDOM_H */
