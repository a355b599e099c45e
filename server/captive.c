/* nbdserve - how the server process lives: captive mode (--run),
 * becoming a daemon, the pidfile, and --exit-with-parent.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

#define DEFAULT_PORT "10809"
#define FIRST_ACTIVATION_FD 3

/* ---- The URI clients should use ------------------------------------------ */

/* Percent-encode everything but the characters RFC 3986 lets stand in a
 * path (IN_QUERY false) or a query value (IN_QUERY true). */
static void uri_escape(FILE *fp, const char *s, bool in_query)
{
  for (; *s; s++) {
    unsigned char c = (unsigned char) *s;
    bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 strchr("-._~/", c) != NULL || (!in_query && c == ':');
    if (plain)
      fputc(c, fp);
    else
      fprintf(fp, "%%%02X", c);
  }
}

/* A service name given to -p ("nbd") as the number a URI needs. */
static const char *numeric_port(const char *port, char *buf, size_t size)
{
  if (strspn(port, "0123456789") == strlen(port))
    return port;
  struct servent *s = getservbyname(port, "tcp");
  if (s == NULL)
    return port;
  snprintf(buf, size, "%d", ntohs((uint16_t) s->s_port));
  return buf;
}

static void print_tcp_uri(FILE *fp, const char *host, const char *port)
{
  char buf[16];
  bool ipv6 = strchr(host, ':') != NULL;
  fputs("nbd://", fp);
  if (ipv6) {
    fputc('[', fp);
    uri_escape(fp, host, false); /* a zone "%eth0" becomes "%25eth0" */
    fputc(']', fp);
  }
  else {
    fputs(host, fp);
  }
  fprintf(fp, ":%s/", numeric_port(port, buf, sizeof buf));
}

static void print_unix_uri(FILE *fp, const char *path, const char *export)
{
  fputs("nbd+unix:///", fp);
  uri_escape(fp, export, false);
  fputs("?socket=", fp);
  uri_escape(fp, path, true);
}

/* With socket activation we did not choose the address: ask the first
 * socket where it listens.  Returns false if it cannot say. */
static bool print_activation_uri(FILE *fp, const char *export)
{
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  if (getsockname(FIRST_ACTIVATION_FD, (struct sockaddr *) &ss, &len) == -1)
    return false;
  if (ss.ss_family == AF_UNIX) {
    const struct sockaddr_un *sun = (const struct sockaddr_un *) &ss;
    if (sun->sun_path[0] == '\0')
      return false; /* abstract socket: no path to name */
    char path[sizeof sun->sun_path + 1] = "";
    memcpy(path, sun->sun_path, MIN(sizeof sun->sun_path, len - offsetof(struct sockaddr_un, sun_path)));
    print_unix_uri(fp, path, export);
    return true;
  }
  char host[NI_MAXHOST], port[NI_MAXSERV];
  if (getnameinfo((struct sockaddr *) &ss, len, host, sizeof host, port, sizeof port,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return false;
  /* A wildcard address is reachable as localhost. */
  bool wildcard = strcmp(host, "0.0.0.0") == 0 || strcmp(host, "::") == 0;
  print_tcp_uri(fp, wildcard ? "localhost" : host, port);
  uri_escape(fp, export, false);
  return true;
}

char *listen_uri(void)
{
  char *uri = NULL;
  size_t len = 0;
  FILE *fp = open_memstream(&uri, &len);
  if (fp == NULL)
    die("out of memory");
  const char *export = opt.export_name ? opt.export_name : "";

  if (opt.socket_activation && print_activation_uri(fp, export))
    ; /* done */
  else if (opt.unix_socket)
    print_unix_uri(fp, opt.unix_socket, export);
  else {
    print_tcp_uri(fp, opt.ipaddr ? opt.ipaddr : "localhost",
                  opt.port ? opt.port : DEFAULT_PORT);
    uri_escape(fp, export, false);
  }
  if (fclose(fp) != 0 || uri == NULL)
    die("out of memory");
  return uri;
}

/* ---- Captive mode ------------------------------------------------------------ */

pid_t captive_start(void)
{
  char *uri = listen_uri();
  fflush(NULL); /* nothing buffered gets written twice */
  pid_t pid = fork();
  if (pid == -1)
    die("--run: cannot start the command: fork: %s", strerror(errno));
  if (pid > 0) {
    nbdserve_debug("--run: started pid %d with uri=%s", (int) pid, uri);
    free(uri);
    return pid;
  }

  /* The child: a shell sees the server exactly as a user would. */
  setenv("uri", uri, 1);
  setenv("nbd", uri, 1); /* older name for the same thing */
  if (opt.unix_socket && !opt.socket_activation) {
    setenv("unixsocket", opt.unix_socket, 1);
    unsetenv("port");
  }
  else if (!opt.socket_activation) {
    char buf[16];
    setenv("port", numeric_port(opt.port ? opt.port : DEFAULT_PORT, buf, sizeof buf), 1);
    unsetenv("unixsocket");
  }
  setenv("exportname", opt.export_name ? opt.export_name : "", 1);

  /* The server ignores SIGPIPE and the loop may have blocked signals in
   * this thread; the command should start with neither. */
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  signal(SIGPIPE, SIG_DFL);
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);

  execl("/bin/sh", "sh", "-c", opt.run, (char *) NULL);
  nbdserve_error("--run: cannot execute /bin/sh: %s", strerror(errno));
  _exit(127);
}

/* ---- --exit-with-parent ---------------------------------------------------- */

static pid_t original_parent;

void note_parent(void)
{
  original_parent = getppid();
}

/* Armed after the privileges are dropped: the kernel forgets the death
 * signal when the process's user or group changes.  The parent may have
 * died before that (the server starts slowly, the parent left once the
 * socket appeared): then no signal will ever come, and we must notice by
 * ourselves.  Our parent is then whoever adopted us, init or a
 * subreaper, so compare with the parent we started with.  A parent that
 * left even before main ran leaves us with init as the parent we
 * started with: that counts as gone too. */
void follow_parent(void)
{
  if (!opt.exit_with_parent)
    return;
  if (prctl(PR_SET_PDEATHSIG, SIGTERM) == -1)
    die("--exit-with-parent: prctl: %s", strerror(errno));
  if (getppid() != original_parent || original_parent == 1) {
    nbdserve_debug("--exit-with-parent: the parent has already exited");
    request_shutdown();
  }
}

/* ---- Becoming a daemon ------------------------------------------------------ */

/* In the daemon, the write end of a pipe whose read end the original
 * parent (still attached to the user's terminal) waits on.  One byte
 * means "serving"; end-of-file without it means start-up failed. */
static int ready_fd = -1;

static void __attribute__((noreturn)) wait_until_ready(int fd)
{
  char byte;
  ssize_t r;
  do
    r = read(fd, &byte, 1);
  while (r == -1 && errno == EINTR);
  /* On failure the daemon has already printed why on our stderr. */
  _exit(r == 1 ? EXIT_SUCCESS : EXIT_FAILURE);
}

static void redirect(int target, int flags)
{
  int fd = open("/dev/null", flags);
  if (fd == -1)
    die("cannot open /dev/null: %s", strerror(errno));
  if (fd != target) {
    dup2(fd, target);
    close(fd);
  }
}

void daemonize(void)
{
  if (opt.foreground || opt.run || opt.single)
    return;

  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC) == -1)
    die("cannot become a daemon: pipe: %s", strerror(errno));
  fflush(NULL);
  pid_t pid = fork();
  if (pid == -1)
    die("cannot become a daemon: fork: %s", strerror(errno));
  if (pid > 0) {
    close(pipefd[1]);
    /* The socket is the daemon's now: a signal here must not remove it. */
    restore_inherited_signals();
    wait_until_ready(pipefd[0]);
  }

  /* A new session, then fork again so that we are not its leader and
   * can never acquire a controlling terminal. */
  close(pipefd[0]);
  if (setsid() == -1)
    die("cannot become a daemon: setsid: %s", strerror(errno));
  pid = fork();
  if (pid == -1)
    die("cannot become a daemon: fork: %s", strerror(errno));
  if (pid > 0)
    _exit(EXIT_SUCCESS);

  ready_fd = pipefd[1];
  if (chdir("/") == -1)
    die("cannot become a daemon: chdir /: %s", strerror(errno));
  redirect(STDIN_FILENO, O_RDONLY);
  redirect(STDOUT_FILENO, O_WRONLY);
  /* stderr stays on the terminal until we are ready (see tell_parent_ready),
   * so that a plugin's get_ready error reaches the user. */
}

/* From now on the daemon talks to syslog only, and the parent may go. */
static void tell_parent_ready(void)
{
  if (ready_fd == -1)
    return;
  log_to_syslog();
  redirect(STDERR_FILENO, O_WRONLY);
  /* If the parent was killed while it waited, this write fails with
   * EPIPE; that must not kill the daemon (the server ignores SIGPIPE
   * from now on anyway). */
  signal(SIGPIPE, SIG_IGN);
  char byte = 1;
  ssize_t r;
  do
    r = write(ready_fd, &byte, 1);
  while (r == -1 && errno == EINTR);
  close(ready_fd);
  ready_fd = -1;
}

/* ---- The pidfile ---------------------------------------------------------------- */

/* Called when the server is ready to serve.  The file appears complete
 * or not at all (written beside it, then renamed), so whoever waits for
 * it never reads a half-written number.  It also releases the parent
 * waiting in daemonize. */
void write_pidfile(void)
{
  if (opt.pidfile) {
    char *tmp;
    if (asprintf(&tmp, "%s.XXXXXX", opt.pidfile) < 0)
      die("out of memory");
    int fd = mkstemp(tmp);
    if (fd == -1)
      die("cannot write the pidfile %s: %s", opt.pidfile, strerror(errno));
    char line[32];
    int len = snprintf(line, sizeof line, "%d\n", (int) getpid());
    bool ok = write(fd, line, (size_t) len) == len && fchmod(fd, 0644) == 0;
    int saved = errno;
    if (close(fd) == -1 && ok) {
      ok = false;
      saved = errno;
    }
    if (ok && rename(tmp, opt.pidfile) == -1) {
      ok = false;
      saved = errno;
    }
    if (!ok) {
      unlink(tmp);
      die("cannot write the pidfile %s: %s", opt.pidfile, strerror(saved));
    }
    free(tmp);
  }
  tell_parent_ready();
}
