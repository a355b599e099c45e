/* nbdserve-ctl - send one request to an nbdserve control socket.
 *
 *   nbdserve-ctl PATH COMMAND [key=value | word]...
 *
 * Prints the answer's key=value lines on stdout, without the final
 * line; exits 0 when the server answered "ok", 1 when it answered
 * "error: MESSAGE" (MESSAGE goes to stderr), 2 for a usage error or
 * when the server cannot be reached or hangs up before answering.
 * The protocol is in docs/control.md.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define LINE_MAX_BYTES 4096 /* the server's limit on a request */

static void usage(void)
{
  fprintf(stderr, "usage: nbdserve-ctl PATH COMMAND [key=value]...\n"
                  "  PATH is the server's --control socket; try COMMAND help.\n");
  exit(2);
}

static int write_all(int fd, const char *s, size_t n)
{
  while (n > 0) {
    ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      return -1;
    s += w;
    n -= (size_t) w;
  }
  return 0;
}

int main(int argc, char **argv)
{
  if (argc < 3 || strcmp(argv[1], "--help") == 0)
    usage();
  /* The request is the words joined by spaces: a word holding a space
   * or a line break would be split differently by the server. */
  char request[LINE_MAX_BYTES + 2];
  size_t len = 0;
  for (int i = 2; i < argc; i++) {
    size_t n = strlen(argv[i]);
    if (n == 0 || strpbrk(argv[i], " \t\r\n")) {
      fprintf(stderr, "nbdserve-ctl: '%s': arguments are single words (no spaces)\n", argv[i]);
      return 2;
    }
    if (len + n + 1 > LINE_MAX_BYTES) {
      fprintf(stderr, "nbdserve-ctl: the request is over %d bytes\n", LINE_MAX_BYTES);
      return 2;
    }
    if (len > 0)
      request[len++] = ' ';
    memcpy(request + len, argv[i], n);
    len += n;
  }
  request[len++] = '\n';

  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  if (strlen(argv[1]) >= sizeof addr.sun_path) {
    fprintf(stderr, "nbdserve-ctl: %s: the path is too long for a Unix socket\n", argv[1]);
    return 2;
  }
  strcpy(addr.sun_path, argv[1]);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *) &addr, sizeof addr) == -1) {
    fprintf(stderr, "nbdserve-ctl: cannot connect to %s: %s\n", argv[1], strerror(errno));
    return 2;
  }
  /* A server that refuses us (another uid, too many clients) answers
   * with one line and closes, perhaps before our request is sent: the
   * answer is still there to read, so a failed send is reported only
   * when no answer comes. */
  int send_errno = write_all(fd, request, len) == -1 ? errno : 0;
  /* Nothing more from us: the server closes once it has answered. */
  shutdown(fd, SHUT_WR);

  FILE *in = fdopen(fd, "r");
  if (in == NULL) {
    perror("nbdserve-ctl");
    return 2;
  }
  char *line = NULL;
  size_t cap = 0;
  ssize_t n;
  int rc = -1; /* no final line yet */
  while (rc == -1 && (n = getline(&line, &cap, in)) > 0) {
    if (line[n - 1] != '\n')
      break; /* cut short: the server went away */
    line[n - 1] = '\0';
    if (strcmp(line, "ok") == 0)
      rc = 0;
    else if (strncmp(line, "error: ", 7) == 0) {
      fflush(stdout);
      fprintf(stderr, "nbdserve-ctl: %s\n", line + 7);
      rc = 1;
    }
    else
      puts(line);
  }
  if (fflush(stdout) != 0 && rc == 0)
    rc = 2;
  if (rc == -1) {
    if (send_errno)
      fprintf(stderr, "nbdserve-ctl: cannot send the request: %s\n", strerror(send_errno));
    else
      fprintf(stderr, "nbdserve-ctl: the server closed the connection before answering\n");
    rc = 2;
  }
  free(line);
  fclose(in);
  return rc;
}
