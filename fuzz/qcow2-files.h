/* nbdserve fuzzing harnesses of the qcow2 library: the files an input
 * becomes, and quiet logging.
 *
 * Each input is written into a memfd reached through a symlink in a
 * private directory made once per process: the library resolves backing
 * and data file names beside the image, so a name read from the input
 * can only reach what that directory holds.  The directory and its
 * links are removed at exit.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_FUZZ_QCOW2_FILES_H
#define NBDSERVE_FUZZ_QCOW2_FILES_H

#include <stddef.h>
#include <stdint.h>

/* perror(WHAT) and exit: the harness itself failed, not the library. */
void qfuzz_die(const char *what) __attribute__((noreturn));

/* The library's messages are formatted (so a bad format argument still
 * reaches the sanitizers) and dropped, or shown on stderr when
 * QCOW2_FUZZ_LOG is set, for reproducing a crash. */
void qfuzz_quiet_logger(void);

/* Makes the private directory, named after PREFIX, under $TMPDIR. */
void qfuzz_make_dir(const char *prefix);

/* A memfd named NAME, linked as NAME in the private directory, whose path
 * goes to PATH (of PATH_SIZE bytes).  Returns the descriptor. */
int qfuzz_file(const char *name, char *path, size_t path_size);

/* The path NAME would have in the private directory, which holds no such
 * file (for the harness to pass a name that does not exist). */
void qfuzz_absent(const char *name, char *path, size_t path_size);

/* Makes FD's content DATA. */
void qfuzz_fill(int fd, const uint8_t *data, size_t size);

#endif
