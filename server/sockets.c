/* nbdserve - opening the listening sockets: TCP, Unix, or the ones
 * systemd passed us (socket activation).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

#define DEFAULT_PORT "10809"

static char *private_dir; /* for -U - */
static char *socket_path; /* the Unix socket we created */

static void add_fd(int **fds, size_t *n, int fd)
{
  int *p = realloc(*fds, (*n + 1) * sizeof *p);
  if (p == NULL)
    die("out of memory");
  p[(*n)++] = fd;
  *fds = p;
}

static void set_nonblock_cloexec(int fd)
{
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
}

static void open_unix(int **fds, size_t *n)
{
  if (opt.unix_private) {
    const char *tmp = getenv("TMPDIR");
    if (asprintf(&private_dir, "%s/nbdserve.XXXXXX", tmp && *tmp ? tmp : "/tmp") < 0)
      die("out of memory");
    if (mkdtemp(private_dir) == NULL)
      die("cannot create a private directory for the socket: %s", strerror(errno));
    if (asprintf(&socket_path, "%s/socket", private_dir) < 0)
      die("out of memory");
    opt.unix_socket = socket_path;
  }
  else {
    socket_path = strdup(opt.unix_socket);
    if (socket_path == NULL)
      die("out of memory");
  }

  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  if (strlen(socket_path) >= sizeof addr.sun_path)
    die("Unix socket path is too long (at most %zu bytes): %s", sizeof addr.sun_path - 1,
        socket_path);
  strcpy(addr.sun_path, socket_path);

  /* A stale socket from an earlier run is replaced; anything else is not. */
  struct stat st;
  if (lstat(socket_path, &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      die("%s exists and is not a socket: refusing to replace it", socket_path);
    unlink(socket_path);
  }

  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd == -1)
    die("socket: %s", strerror(errno));
  if (bind(fd, (struct sockaddr *) &addr, sizeof addr) == -1)
    die("cannot bind %s: %s", socket_path, strerror(errno));
  if (listen(fd, SOMAXCONN) == -1)
    die("cannot listen on %s: %s", socket_path, strerror(errno));
  add_fd(fds, n, fd);
}

static void open_tcp(int **fds, size_t *n)
{
  const char *port = opt.port ? opt.port : DEFAULT_PORT;
  struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_PASSIVE | AI_ADDRCONFIG };
  struct addrinfo *list;
  int err = getaddrinfo(opt.ipaddr, port, &hints, &list);
  if (err != 0)
    die("cannot resolve %s port %s: %s", opt.ipaddr ? opt.ipaddr : "(any address)", port,
        gai_strerror(err));

  size_t before = *n;
  int last_errno = 0;
  for (struct addrinfo *a = list; a; a = a->ai_next) {
    int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd == -1) {
      if (errno == EAFNOSUPPORT)
        continue; /* e.g. IPv6 disabled */
      die("socket: %s", strerror(errno));
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (a->ai_family == AF_INET6)
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, a->ai_addr, a->ai_addrlen) == -1 || listen(fd, SOMAXCONN) == -1) {
      char host[NI_MAXHOST] = "?";
      getnameinfo(a->ai_addr, a->ai_addrlen, host, sizeof host, NULL, 0, NI_NUMERICHOST);
      last_errno = errno;
      if (errno == EADDRNOTAVAIL && a->ai_family == AF_INET6 && opt.ipaddr == NULL) {
        close(fd);
        continue;
      }
      die("cannot bind %s%s%s:%s: %s", a->ai_family == AF_INET6 ? "[" : "", host,
          a->ai_family == AF_INET6 ? "]" : "", port, strerror(errno));
    }
    add_fd(fds, n, fd);
  }
  freeaddrinfo(list);
  if (*n == before)
    die("could not listen on any address for port %s: %s", port,
        last_errno ? strerror(last_errno) : "no usable address");
}

void open_listeners(int **fds, size_t *nfds)
{
  *fds = NULL;
  *nfds = 0;
  if (opt.socket_activation) {
    for (int i = 0; i < opt.socket_activation_fds; i++) {
      set_nonblock_cloexec(3 + i);
      add_fd(fds, nfds, 3 + i);
    }
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    return;
  }
  if (opt.unix_socket)
    open_unix(fds, nfds);
  else
    open_tcp(fds, nfds);
}

void remove_unix_socket(void)
{
  if (socket_path) {
    unlink(socket_path);
    free(socket_path);
    socket_path = NULL;
  }
  if (private_dir) {
    rmdir(private_dir);
    free(private_dir);
    private_dir = NULL;
  }
}
