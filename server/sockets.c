/* nbdserve - opening the listening sockets: a Unix socket (-U), TCP on
 * every address of -i/-p, or the sockets systemd passed us (socket
 * activation).
 *
 * Every fd handed to the loop is non-blocking and close-on-exec, so the
 * --run command and plugin helpers never inherit a listener.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

#define DEFAULT_PORT "10809"
#define FIRST_ACTIVATION_FD 3 /* SD_LISTEN_FDS_START */

static char *private_dir; /* the temporary directory of -U -, to rmdir */
static char *socket_path; /* absolute path of the socket we bound */
static char *control_path; /* absolute path of the --control socket */
static volatile sig_atomic_t socket_removed, private_dir_removed, control_removed; /* see remove_unix_socket */

static void add_fd(int **fds, size_t *n, int fd)
{
  int *grown = realloc(*fds, (*n + 1) * sizeof *grown);
  if (grown == NULL)
    die("out of memory");
  grown[(*n)++] = fd;
  *fds = grown;
}

/* ---- Unix socket ---------------------------------------------------------- */

/* -U -: a fresh directory only we can enter, holding "socket". */
static char *make_private_socket_path(void)
{
  const char *tmpdir = getenv("TMPDIR");
  if (tmpdir == NULL || tmpdir[0] == '\0')
    tmpdir = "/tmp";
  if (asprintf(&private_dir, "%s/nbdserve.XXXXXX", tmpdir) < 0)
    die("out of memory");
  if (mkdtemp(private_dir) == NULL)
    die("cannot create a private directory in %s for -U -: %s", tmpdir, strerror(errno));
  char *path;
  if (asprintf(&path, "%s/socket", private_dir) < 0)
    die("out of memory");
  return path;
}

/* We chdir("/") when we become a daemon; unlinking at exit needs the
 * absolute name. */
static char *absolute(const char *path)
{
  char *abs;
  if (path[0] == '/') {
    abs = strdup(path);
  }
  else {
    char *cwd = getcwd(NULL, 0);
    if (cwd == NULL)
      die("cannot find the current directory: %s", strerror(errno));
    if (asprintf(&abs, "%s/%s", cwd, path) < 0)
      abs = NULL;
    free(cwd);
  }
  if (abs == NULL)
    die("out of memory");
  return abs;
}

/* An old socket file is replaced only when it is a socket nobody
 * answers on: never a regular file, never a running server's socket. */
static void remove_stale_socket(const char *path, const struct sockaddr_un *addr)
{
  struct stat st;
  if (lstat(path, &st) == -1)
    return; /* nothing there: the usual case */
  if (!S_ISSOCK(st.st_mode))
    die("cannot listen on %s: it exists and is not a socket", path);

  int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (probe >= 0) {
    int live = connect(probe, (const struct sockaddr *) addr, sizeof *addr) == 0;
    close(probe);
    if (live)
      die("cannot listen on %s: another server is listening there", path);
  }
  if (unlink(path) == -1 && errno != ENOENT)
    die("cannot remove the stale socket %s: %s", path, strerror(errno));
}

/* Bind GIVEN and listen; returns the non-blocking fd and, in *ABS, the
 * absolute name to unlink at exit.  OWNER_ONLY: the file is created with
 * mode 0600 (the umask is narrowed around bind: we are single-threaded
 * here, and the file never exists with a wider mode). */
static int listen_unix(const char *given, bool owner_only, char **abs)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  if (strlen(given) >= sizeof addr.sun_path)
    die("cannot listen on %s: a Unix socket path is at most %zu bytes", given,
        sizeof addr.sun_path - 1);
  memcpy(addr.sun_path, given, strlen(given) + 1);

  remove_stale_socket(given, &addr);

  /* Clients wait for the file to appear and connect at once: between
   * bind() and listen() they would be refused.  So the socket is bound
   * under a temporary name beside the real one, and renamed into place
   * once it listens.  (A name too long for that is bound directly.) */
  struct sockaddr_un bound = addr;
  char *temp = NULL;
  if (asprintf(&temp, "%s.%ld~", given, (long) getpid()) < 0)
    die("out of memory");
  bool use_temp = strlen(temp) < sizeof bound.sun_path;
  if (use_temp) {
    memcpy(bound.sun_path, temp, strlen(temp) + 1);
    unlink(temp); /* left by a server that died with our pid */
  }

  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd == -1)
    die("cannot create a Unix socket: %s", strerror(errno));
  /* Otherwise the file's mode comes from the umask, as for any file we create. */
  mode_t old_umask = owner_only ? umask(077) : 0;
  int r = bind(fd, (const struct sockaddr *) &bound, sizeof bound);
  int err = errno;
  if (owner_only)
    umask(old_umask);
  if (r == -1)
    die("cannot bind %s: %s", bound.sun_path, strerror(err));
  if (listen(fd, SOMAXCONN) == -1)
    die("cannot listen on %s: %s", bound.sun_path, strerror(errno));
  /* The umask left 0700; nobody needs to execute a socket. */
  if (owner_only && chmod(bound.sun_path, 0600) == -1)
    die("cannot chmod %s: %s", bound.sun_path, strerror(errno));
  if (use_temp && rename(temp, given) == -1) {
    err = errno;
    unlink(temp);
    die("cannot rename %s to %s: %s", temp, given, strerror(err));
  }
  free(temp);
  *abs = absolute(given);
  return fd;
}

static void open_unix(int **fds, size_t *n)
{
  /* bind() uses the name as given, which may be shorter than the
   * absolute one; the absolute one is what we remember. */
  char *given = opt.unix_private ? make_private_socket_path() : strdup(opt.unix_socket);
  if (given == NULL)
    die("out of memory");
  int fd = listen_unix(given, false, &socket_path);
  free(given);
  opt.unix_socket = socket_path; /* what $unixsocket and $uri show */
  add_fd(fds, n, fd);
}

/* The control socket lets its clients stop the server: only the owner
 * may open it (and control.c checks the peer's uid besides). */
int open_control_socket(void)
{
  return listen_unix(opt.control, true, &control_path);
}

/* ---- TCP ------------------------------------------------------------------ */

/* "127.0.0.1:10809" or "[::1]:10809", for messages. */
static void describe_address(const struct addrinfo *a, char *buf, size_t size)
{
  char host[NI_MAXHOST], port[NI_MAXSERV];
  if (getnameinfo(a->ai_addr, a->ai_addrlen, host, sizeof host, port, sizeof port,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    snprintf(buf, size, "(unprintable address)");
    return;
  }
  if (a->ai_family == AF_INET6)
    snprintf(buf, size, "[%s]:%s", host, port);
  else
    snprintf(buf, size, "%s:%s", host, port);
}

/* Errors that mean "this machine has no IPv6", not "you asked for
 * something wrong": worth skipping while another address works. */
static bool ipv6_unavailable(const struct addrinfo *a, int err)
{
  return a->ai_family == AF_INET6 &&
         (err == EAFNOSUPPORT || err == EADDRNOTAVAIL || err == EPROTONOSUPPORT);
}

/* getaddrinfo may list one address twice (e.g. /etc/hosts naming
 * localhost on two lines); the second bind then fails harmlessly. */
static bool listed_earlier(const struct addrinfo *list, const struct addrinfo *a)
{
  for (const struct addrinfo *b = list; b != a; b = b->ai_next)
    if (b->ai_addrlen == a->ai_addrlen && memcmp(b->ai_addr, a->ai_addr, a->ai_addrlen) == 0)
      return true;
  return false;
}

/* Returns the listening fd, or -1 with errno set. */
static int listen_on(const struct addrinfo *a)
{
  int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
  if (fd == -1)
    return -1;
  int one = 1;
  /* Restarting the server must not wait for old connections in TIME_WAIT. */
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  /* "::" and "0.0.0.0" are bound separately; without V6ONLY the second
   * bind would fail with EADDRINUSE on most systems. */
  if (a->ai_family == AF_INET6)
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  if (bind(fd, a->ai_addr, a->ai_addrlen) == -1 || listen(fd, SOMAXCONN) == -1) {
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
  }
  return fd;
}

static void open_tcp(int **fds, size_t *n)
{
  const char *port = opt.port ? opt.port : DEFAULT_PORT;
  struct addrinfo hints = {
    .ai_family = AF_UNSPEC,
    .ai_socktype = SOCK_STREAM,
    .ai_flags = AI_PASSIVE,
  };
  struct addrinfo *list;
  int err = getaddrinfo(opt.ipaddr, port, &hints, &list);
  if (err != 0) {
    if (opt.ipaddr)
      die("cannot listen on %s port %s: %s", opt.ipaddr, port,
          err == EAI_SYSTEM ? strerror(errno) : gai_strerror(err));
    die("cannot listen on port %s: %s", port,
        err == EAI_SYSTEM ? strerror(errno) : gai_strerror(err));
  }

  size_t bound_before = *n;
  char skipped[NI_MAXHOST + NI_MAXSERV + 8] = "";
  int skipped_errno = 0;
  for (struct addrinfo *a = list; a != NULL; a = a->ai_next) {
    char where[NI_MAXHOST + NI_MAXSERV + 8];
    describe_address(a, where, sizeof where);
    if (listed_earlier(list, a))
      continue;
    int fd = listen_on(a);
    if (fd >= 0) {
      nbdserve_debug("listening on %s", where);
      add_fd(fds, n, fd);
      continue;
    }
    if (ipv6_unavailable(a, errno) && list->ai_next != NULL) {
      nbdserve_debug("skipping %s: %s", where, strerror(errno));
      snprintf(skipped, sizeof skipped, "%s", where);
      skipped_errno = errno;
      continue;
    }
    die("cannot bind %s: %s", where, strerror(errno));
  }
  freeaddrinfo(list);

  if (*n == bound_before)
    die("cannot bind %s: %s", skipped[0] ? skipped : port,
        skipped_errno ? strerror(skipped_errno) : "no usable address");
}

/* ---- Socket activation ---------------------------------------------------- */

static void adopt_activation_fds(int **fds, size_t *n)
{
  for (int i = 0; i < opt.socket_activation_fds; i++) {
    int fd = FIRST_ACTIVATION_FD + i;
    struct stat st;
    if (fstat(fd, &st) == -1 || !S_ISSOCK(st.st_mode))
      die("socket activation: fd %d (of LISTEN_FDS=%d) is not a socket", fd,
          opt.socket_activation_fds);
    int flags = fcntl(fd, F_GETFL);
    if (flags == -1 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) == -1 ||
        fcntl(fd, F_SETFD, FD_CLOEXEC) == -1)
      die("socket activation: fd %d: %s", fd, strerror(errno));
    add_fd(fds, n, fd);
  }
  /* They were for us only; the --run command must not think otherwise. */
  unsetenv("LISTEN_PID");
  unsetenv("LISTEN_FDS");
  unsetenv("LISTEN_FDNAMES");
}

/* ---- Entry points ----------------------------------------------------------- */

void open_listeners(int **fds, size_t *nfds)
{
  *fds = NULL;
  *nfds = 0;
  if (opt.socket_activation)
    adopt_activation_fds(fds, nfds);
  else if (opt.unix_socket)
    open_unix(fds, nfds);
  else
    open_tcp(fds, nfds);
}

/* Only unlink and rmdir: a signal handler calls this too.  The strings
 * stay allocated (opt.unix_socket points to socket_path). */
void remove_unix_socket(void)
{
  if (socket_path && !socket_removed) {
    unlink(socket_path);
    socket_removed = true;
  }
  if (control_path && !control_removed) {
    unlink(control_path);
    control_removed = true;
  }
  if (private_dir && !private_dir_removed) {
    rmdir(private_dir);
    private_dir_removed = true;
  }
}
