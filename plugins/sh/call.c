/* nbdserve sh plugin: running one program to its end, with data both
 * ways.
 *
 * The program is started directly (no shell in between), but not as
 * our child.  libev's default loop reaps every child of the process
 * with waitpid(-1) when SIGCHLD comes, and would take a script's exit
 * status from under us.  So each call makes a watcher first: a copy of
 * the calling thread (raw clone, exit signal 0, never exec'ing, which
 * keeps it invisible to waitpid(-1)) that starts the program as its own
 * child, waits for it, and writes how it ended into a pipe.  That pipe
 * turning readable is also how we know the program has ended, even when
 * a process it left in the background still holds its stdout.
 *
 * One poll loop feeds stdin, drains stdout and stderr and watches that
 * pipe, so that no payload size can deadlock the two sides (each
 * waiting for the other to read a full pipe).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "call.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1u << 2)
#endif

#define GROWN_FIRST 256 /* first size of a growing sink */
#define READ_CHUNK 65536 /* scratch for bytes we read only to drop */

/* The watcher and the program before its exec run only this, and only
 * raw system calls: they are copies of one thread of a process whose
 * other threads may have held locks (malloc's, a sanitizer's) at the
 * moment of the copy, so nothing here may take one, and the sanitizers
 * must not instrument it. */
#define RAW_CHILD __attribute__((no_sanitize_address, no_sanitize_thread, no_sanitize_undefined))

/* What the watcher writes when the program has ended. */
struct ending {
  int started; /* 1: STATUS is the wait status; 0: the program could not be started */
  int status; /* or the errno of that */
};

#define CLOSED_IN_WATCHER 9

struct child {
  char *const *argv;
  char *const *sh_argv; /* /bin/sh PROGRAM ARGS..., for a file the kernel will not run */
  char *const *envp;
  int fds[3]; /* become the program's 0, 1, 2; each is 3 or more */
  int report; /* an exec failure writes its errno here */
  int ending; /* the watcher writes a struct ending here */
  int close_in_watcher[CLOSED_IN_WATCHER]; /* every pipe end but ENDING; -1: none */
};

RAW_CHILD static void program_exec(const struct child *c)
{
  /* All zero is SIG_DFL without flags or mask in every layout of the
   * kernel's struct sigaction.  Handlers would be reset by exec anyway;
   * this is for the signals the server ignores (SIGPIPE), which exec
   * keeps ignored.  Then every signal is unblocked: the worker threads
   * block them, and exec keeps the mask too. */
  static const char default_action[64];
  for (long sig = 1; sig < 65; sig++)
    if (sig != SIGKILL && sig != SIGSTOP)
      syscall(SYS_rt_sigaction, sig, default_action, NULL, 8);
  uint64_t none = 0;
  syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, 8);
  for (long fd = 0; fd < 3; fd++)
    if (syscall(SYS_dup3, c->fds[fd], fd, 0) == -1)
      goto failed;
  /* Descriptors some library opened without O_CLOEXEC must not reach
   * the script (best effort: Linux 5.11). */
  syscall(SYS_close_range, 3, ~0u, CLOSE_RANGE_CLOEXEC);
  syscall(SYS_execve, c->argv[0], c->argv, c->envp);
  if (errno == ENOEXEC) /* a text file without "#!": what execvp does */
    syscall(SYS_execve, c->sh_argv[0], c->sh_argv, c->envp);
failed:;
  int err = errno;
  syscall(SYS_write, c->report, &err, sizeof err);
  syscall(SYS_exit_group, 127);
}

/* The watcher: start the program, let go of every descriptor but the
 * one it reports on (so that the pipes see their ends when the program
 * closes them), wait, report.  Signals stay blocked here, as the
 * thread that made it blocked them all. */
RAW_CHILD static void watcher(const struct child *c)
{
  struct ending e = { .started = 0 };
  long pid = syscall(SYS_clone, (unsigned long) SIGCHLD, NULL, NULL, NULL, NULL);
  if (pid == 0)
    program_exec(c);
  if (pid == -1)
    e.status = errno;
  for (int i = 0; i < CLOSED_IN_WATCHER; i++)
    if (c->close_in_watcher[i] >= 0)
      syscall(SYS_close, c->close_in_watcher[i]);
  /* The server's other descriptors (sockets...), best effort: Linux 5.9. */
  if (c->ending > 3)
    syscall(SYS_close_range, 3, c->ending - 1, 0);
  syscall(SYS_close_range, c->ending + 1, ~0u, 0);
  if (pid > 0) {
    int status = 0;
    while (syscall(SYS_wait4, pid, &status, 0, NULL) == -1 && errno == EINTR)
      ;
    e.started = 1;
    e.status = status;
  }
  syscall(SYS_write, c->ending, &e, sizeof e);
  syscall(SYS_exit_group, 0);
}

/* A copy of this thread that runs the watcher: its pid, or -1 with
 * errno. */
RAW_CHILD static pid_t start_watcher(const struct child *c)
{
  /* No handler of the server's may ever run in the copies (a Ctrl-C
   * reaches the whole process group). */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  /* The flags' low byte is the exit signal: 0, so that only a wait with
   * __WALL sees it. */
  long pid = syscall(SYS_clone, 0ul, NULL, NULL, NULL, NULL);
  if (pid == 0)
    watcher(c);
  int err = errno;
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  errno = err;
  return pid;
}

static void close_fd(int *fd)
{
  if (*fd >= 0)
    close(*fd);
  *fd = -1;
}

/* The child's ends must not be 0, 1 or 2 (dup3 onto those would clobber
 * one another): a server started with a standard stream closed gets
 * such numbers from pipe2. */
static int above_stdio(int *fd)
{
  if (*fd > 2)
    return 0;
  int moved = fcntl(*fd, F_DUPFD_CLOEXEC, 3);
  if (moved == -1)
    return -1;
  close(*fd);
  *fd = moved;
  return 0;
}

static void set_nonblocking(int fd)
{
  int flags = fcntl(fd, F_GETFL);
  if (flags != -1)
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* ---- The exchange ----------------------------------------------------------- */

enum drained { MORE_LATER, AT_END, TOO_MUCH };

static bool grow(struct sink *s)
{
  if (s->fixed || s->size >= s->limit)
    return false;
  size_t size = s->size ? s->size * 2 : GROWN_FIRST;
  if (size > s->limit)
    size = s->limit;
  char *buf = realloc(s->buf, size + 1); /* + 1: the NUL */
  if (buf == NULL)
    return false;
  s->buf = buf;
  s->size = size;
  return true;
}

/* Read what FD has into S until it would block. */
static enum drained drain_into_sink(int fd, struct sink *s)
{
  char scratch[1];
  for (;;) {
    ssize_t r;
    if (s->len == s->size && !grow(s)) {
      r = read(fd, scratch, sizeof scratch); /* full: is there more? */
      if (r > 0)
        return TOO_MUCH;
    }
    else
      r = read(fd, s->buf + s->len, s->size - s->len);
    if (r > 0)
      s->len += (size_t) r;
    else if (r == 0)
      return AT_END;
    else if (errno == EAGAIN)
      return MORE_LATER;
    else if (errno != EINTR)
      return AT_END;
  }
}

/* Read what FD has into HOW's stderr until it would block; beyond what
 * is kept, count and drop. */
static enum drained drain_stderr(int fd, struct outcome *how)
{
  char scratch[READ_CHUNK];
  for (;;) {
    size_t room = STDERR_KEPT - how->err_len;
    ssize_t r = room ? read(fd, how->err + how->err_len, room) : read(fd, scratch, sizeof scratch);
    if (r > 0 && room)
      how->err_len += (size_t) r;
    else if (r > 0)
      how->err_dropped += (size_t) r;
    else if (r == 0)
      return AT_END;
    else if (errno == EAGAIN)
      return MORE_LATER;
    else if (errno != EINTR)
      return AT_END;
  }
}

/* Write what stdin takes now; false once it is all written or the
 * program stopped reading (the server ignores SIGPIPE while serving,
 * which is when there is input, so that is EPIPE, not a signal). */
static bool feed(int fd, const char **input, size_t *left)
{
  while (*left > 0) {
    ssize_t w = write(fd, *input, *left);
    if (w > 0) {
      *input += w;
      *left -= (size_t) w;
    }
    else if (w == -1 && errno == EAGAIN)
      return true;
    else if (w == -1 && errno != EINTR)
      return false;
  }
  return false;
}

struct streams {
  int in, out, err, ending; /* our ends; -1 once closed */
  const char *input;
  size_t input_left;
};

/* Feed, drain and watch until the watcher says the program has ended
 * (or it has closed stdout and stderr).  A program that prints more
 * than OUT takes loses its stdout: its next write fails (EPIPE, or
 * SIGPIPE, which kills it). */
static void exchange(struct streams *s, struct sink *out, struct outcome *how)
{
  bool ended = false;
  while ((s->out >= 0 || s->err >= 0) && !ended) {
    struct pollfd p[4];
    int n = 0, in_at = -1, out_at = -1, err_at = -1;
    if (s->in >= 0)
      in_at = n, p[n++] = (struct pollfd){ .fd = s->in, .events = POLLOUT };
    if (s->out >= 0)
      out_at = n, p[n++] = (struct pollfd){ .fd = s->out, .events = POLLIN };
    if (s->err >= 0)
      err_at = n, p[n++] = (struct pollfd){ .fd = s->err, .events = POLLIN };
    int end_at = n;
    p[n++] = (struct pollfd){ .fd = s->ending, .events = POLLIN };
    if (poll(p, (nfds_t) n, -1) == -1) {
      if (errno == EINTR)
        continue;
      break; /* cannot watch: the caller closes the pipes and waits */
    }
    if (in_at >= 0 && p[in_at].revents && !feed(s->in, &s->input, &s->input_left))
      close_fd(&s->in); /* end of input, or nobody reads it any more */
    if (out_at >= 0 && p[out_at].revents) {
      enum drained d = drain_into_sink(s->out, out);
      if (d == TOO_MUCH)
        out->overflow = true;
      if (d != MORE_LATER)
        close_fd(&s->out);
    }
    if (err_at >= 0 && p[err_at].revents && drain_stderr(s->err, how) == AT_END)
      close_fd(&s->err);
    ended = p[end_at].revents != 0;
  }
  /* What it wrote before it ended is still in the pipes. */
  if (s->out >= 0 && drain_into_sink(s->out, out) == TOO_MUCH)
    out->overflow = true;
  if (s->err >= 0)
    drain_stderr(s->err, how);
}

/* ---- Starting and finishing --------------------------------------------- */

/* argv with "/bin/sh" in front, for a script without "#!". */
static char **shell_argv(char *const argv[])
{
  size_t n = 0;
  while (argv[n])
    n++;
  char **sh = malloc((n + 2) * sizeof *sh);
  if (sh == NULL)
    return NULL;
  sh[0] = (char *) "/bin/sh";
  memcpy(sh + 1, argv, (n + 1) * sizeof *sh);
  return sh;
}

/* Both ends of a pipe, close-on-exec; the child's end moved above 2. */
static int make_pipe(int ends[2], int child_end)
{
  if (pipe2(ends, O_CLOEXEC) == -1)
    return -1;
  return above_stdio(&ends[child_end]);
}

static void record_end(int status, struct outcome *how)
{
  if (WIFEXITED(status)) {
    how->status = WEXITSTATUS(status);
    how->signal = 0;
  }
  else {
    how->status = -1;
    how->signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  }
}

/* A whole read of LEN bytes, or false (end of file, error). */
static bool read_all(int fd, void *buf, size_t len)
{
  ssize_t r;
  do
    r = read(fd, buf, len);
  while (r == -1 && errno == EINTR);
  return r == (ssize_t) len;
}

/* 0 when the exec succeeded (the report pipe closed with it, or the
 * watcher closed it because there was no program); else the errno
 * the program wrote. */
static int exec_error(int fd)
{
  int err;
  return read_all(fd, &err, sizeof err) ? err : 0;
}

/* The watcher's end; it exits right after writing its report. */
static void reap_watcher(pid_t pid)
{
  int status;
  while (waitpid(pid, &status, __WALL) == -1 && errno == EINTR)
    ;
}

/* Every descriptor of one call; -1 where none. */
struct pipes {
  int in[2], out[2], err[2], report[2], ending[2];
};

static void close_pipes(struct pipes *p)
{
  int *fds = (int *) p;
  for (size_t i = 0; i < sizeof *p / sizeof(int); i++)
    close_fd(&fds[i]);
}

static int open_pipes(struct pipes *p, bool with_input)
{
  memset(p, -1, sizeof *p);
  if (with_input ? make_pipe(p->in, 0) == -1
                 : (p->in[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)) == -1 ||
                   above_stdio(&p->in[0]) == -1)
    return -1;
  if (make_pipe(p->out, 1) == -1 || make_pipe(p->err, 1) == -1 ||
      pipe2(p->report, O_CLOEXEC) == -1 || pipe2(p->ending, O_CLOEXEC) == -1)
    return -1;
  return 0;
}

int run_program(char *const argv[], char *const envp[], const void *input, size_t input_len,
                struct sink *out, struct outcome *how, char *why, size_t whylen)
{
  struct pipes p;
  memset(&p, -1, sizeof p);
  int result = -1, err = 0;
  how->status = -1;
  how->signal = 0;
  how->err_len = how->err_dropped = 0;
  how->err[0] = '\0';
  out->len = 0;
  out->overflow = false;

  char **sh_argv = shell_argv(argv);
  if (sh_argv == NULL || (!out->fixed && out->buf == NULL && !grow(out)) ||
      open_pipes(&p, input != NULL) == -1) {
    err = errno ? errno : ENOMEM;
    snprintf(why, whylen, "cannot run %s: %s", argv[0], strerror(err));
    goto out;
  }
  struct child c = {
    .argv = argv, .sh_argv = sh_argv, .envp = envp,
    .fds = { p.in[0], p.out[1], p.err[1] }, .report = p.report[1], .ending = p.ending[1],
    .close_in_watcher = { p.in[0], p.in[1], p.out[0], p.out[1], p.err[0], p.err[1],
                          p.report[0], p.report[1], p.ending[0] },
  };
  pid_t watcher_pid = start_watcher(&c);
  err = errno;
  close_fd(&p.in[0]);
  close_fd(&p.out[1]);
  close_fd(&p.err[1]);
  close_fd(&p.report[1]);
  close_fd(&p.ending[1]);
  if (watcher_pid == -1) {
    snprintf(why, whylen, "cannot start %s: clone: %s", argv[0], strerror(err));
    goto out;
  }

  err = exec_error(p.report[0]);
  struct ending e = { 0, 0 };
  if (err == 0) {
    struct streams s = { .in = p.in[1], .out = p.out[0], .err = p.err[0],
                         .ending = p.ending[0], .input = input, .input_left = input_len };
    p.in[1] = p.out[0] = p.err[0] = -1; /* s owns them now */
    if (s.in >= 0)
      set_nonblocking(s.in);
    set_nonblocking(s.out);
    set_nonblocking(s.err);
    exchange(&s, out, how);
    close_fd(&s.in);
    close_fd(&s.out);
    close_fd(&s.err);
    how->err[how->err_len] = '\0';
    if (!out->fixed)
      out->buf[out->len] = '\0';
  }
  bool reported = read_all(p.ending[0], &e, sizeof e);
  reap_watcher(watcher_pid);
  if (err)
    snprintf(why, whylen, "cannot run %s: %s", argv[0], strerror(err));
  else if (!reported) {
    err = EIO;
    snprintf(why, whylen, "lost track of %s: the process watching it died", argv[0]);
  }
  else if (!e.started) {
    err = e.status;
    snprintf(why, whylen, "cannot start %s: clone: %s", argv[0], strerror(err));
  }
  else {
    record_end(e.status, how);
    result = 0;
  }

out:
  close_pipes(&p);
  free(sh_argv);
  errno = err;
  return result;
}
