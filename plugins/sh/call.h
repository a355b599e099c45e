/* nbdserve sh plugin: running one program to its end, with data both
 * ways.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_SH_CALL_H
#define NBDSERVE_SH_CALL_H

#include <stdbool.h>
#include <stddef.h>

/* Where the program's stdout goes: a buffer of the caller's (FIXED,
 * pread's data) or one that grows up to LIMIT bytes (text answers).  A
 * program that prints more than fits is killed, and OVERFLOW says so. */
struct sink {
  char *buf; /* a grown buffer is malloc'ed and NUL-terminated; the caller frees it */
  size_t len; /* bytes received */
  size_t size; /* room in buf */
  size_t limit; /* growing: the most bytes accepted */
  bool fixed;
  bool overflow;
};

/* The start of stderr that is kept; the rest is read and dropped. */
#define STDERR_KEPT 4096

/* How the program ended. */
struct outcome {
  int status; /* exit status 0-255, or -1 when a signal killed it */
  int signal; /* that signal */
  char err[STDERR_KEPT + 1]; /* the start of its stderr, NUL-terminated */
  size_t err_len; /* bytes kept in err */
  size_t err_dropped; /* bytes of stderr beyond those */
};

/* Run ARGV[0] (a path, no search) with ARGV and ENVP, directly, with no
 * shell in between: INPUT_LEN bytes of INPUT on its stdin (NULL:
 * /dev/null), its stdout into OUT, its stderr into HOW.  A file that is
 * not a binary and has no "#!" line runs under /bin/sh, as execvp would.
 * Returns 0 once the program has ended and HOW says how; -1 with errno
 * set and a message in WHY when it could not be started at all. */
int run_program(char *const argv[], char *const envp[], const void *input, size_t input_len,
                struct sink *out, struct outcome *how, char *why, size_t whylen);

#endif /* NBDSERVE_SH_CALL_H */
