/* nbdserve fuzzing harnesses: what they share.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_FUZZ_COMMON_H
#define NBDSERVE_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* Load and configure the memory plugin (1 MiB) the first time. */
void fuzz_setup_server(void);

/* Serve one connection whose client sends PREFIX then DATA and then
 * closes its sending side; everything the server answers is read and
 * thrown away.  Returns once the server has closed the connection. */
void fuzz_serve(const uint8_t *prefix, size_t prefix_len, const uint8_t *data, size_t size);

#endif
