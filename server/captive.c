/* nbdserve - running in the background or in captive mode (--run), the
 * pidfile and --exit-with-parent.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* Percent-encode what may not stand in a URI path or query. */
static void uri_escape(FILE *fp, const char *s, bool query)
{
  for (; *s; s++) {
    unsigned char c = (unsigned char) *s;
    bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 strchr("-._~/", c) || (!query && c == ':');
    if (plain)
      fputc(c, fp);
    else
      fprintf(fp, "%%%02X", c);
  }
}

char *listen_uri(void)
{
  char *uri = NULL;
  size_t len = 0;
  FILE *fp = open_memstream(&uri, &len);
  if (fp == NULL)
    die("out of memory");
  const char *export = opt.export_name ? opt.export_name : "";
  if (opt.unix_socket) {
    fputs("nbd+unix:///", fp);
    uri_escape(fp, export, false);
    fputs("?socket=", fp);
    uri_escape(fp, opt.unix_socket, true);
  }
  else {
    const char *host = opt.ipaddr ? opt.ipaddr : "localhost";
    bool v6 = strchr(host, ':') != NULL;
    fprintf(fp, "nbd://%s%s%s:%s/", v6 ? "[" : "", host, v6 ? "]" : "",
            opt.port ? opt.port : "10809");
    uri_escape(fp, export, false);
  }
  fclose(fp);
  return uri;
}

pid_t captive_start(void)
{
  char *uri = listen_uri();
  pid_t pid = fork();
  if (pid == -1)
    die("--run: fork: %s", strerror(errno));
  if (pid == 0) {
    setenv("uri", uri, 1);
    setenv("nbd", uri, 1);
    if (opt.unix_socket)
      setenv("unixsocket", opt.unix_socket, 1);
    else
      setenv("port", opt.port ? opt.port : "10809", 1);
    setenv("exportname", opt.export_name ? opt.export_name : "", 1);
    signal(SIGPIPE, SIG_DFL);
    execl("/bin/sh", "sh", "-c", opt.run, (char *) NULL);
    perror("nbdserve: --run: /bin/sh");
    _exit(127);
  }
  free(uri);
  return pid;
}

static void exit_with_parent(void)
{
  pid_t parent = getppid();
  if (prctl(PR_SET_PDEATHSIG, SIGTERM) == -1)
    die("--exit-with-parent: %s", strerror(errno));
  if (getppid() != parent || parent == 1)
    raise(SIGTERM); /* the parent is already gone */
}

void daemonize(void)
{
  if (opt.exit_with_parent && (opt.foreground || opt.run || opt.single))
    exit_with_parent();
  if (opt.foreground || opt.run || opt.single)
    return;
  if (opt.exit_with_parent)
    die("--exit-with-parent needs -f (a daemon has no parent to follow)");

  pid_t pid = fork();
  if (pid == -1)
    die("fork: %s", strerror(errno));
  if (pid > 0)
    _exit(EXIT_SUCCESS); /* the sockets are listening already */
  setsid();
  pid = fork();
  if (pid == -1)
    die("fork: %s", strerror(errno));
  if (pid > 0)
    _exit(EXIT_SUCCESS);
  if (chdir("/") == -1)
    die("chdir /: %s", strerror(errno));
  int fd = open("/dev/null", O_RDWR);
  if (fd >= 0) {
    log_to_syslog();
    dup2(fd, STDIN_FILENO);
    dup2(fd, STDOUT_FILENO);
    dup2(fd, STDERR_FILENO);
    if (fd > STDERR_FILENO)
      close(fd);
  }
}

void write_pidfile(void)
{
  if (opt.pidfile == NULL)
    return;
  char *tmp;
  if (asprintf(&tmp, "%s.XXXXXX", opt.pidfile) < 0)
    die("out of memory");
  int fd = mkstemp(tmp);
  if (fd == -1)
    die("cannot write pidfile %s: %s", opt.pidfile, strerror(errno));
  dprintf(fd, "%d\n", (int) getpid());
  fchmod(fd, 0644);
  close(fd);
  if (rename(tmp, opt.pidfile) == -1)
    die("cannot write pidfile %s: %s", opt.pidfile, strerror(errno));
  free(tmp);
}
