/* nbdserve - the control socket (--control=PATH), served on the main loop.
 *
 * A line protocol (docs/control.md): each request is one line,
 * "COMMAND [key=value | word]...", split on spaces and tabs, no quoting;
 * the answer is zero or more "key=value" lines and a final "ok" or
 * "error: MESSAGE".  Requests on one connection are answered in order.
 *
 * Only the server's own user (or root) may talk to it: the socket file
 * is mode 0600, and each client's uid is checked with SO_PEERCRED, which
 * still holds if somebody widens the file's mode or passes the fd on.
 *
 * Everything here runs on the main loop and must never block it: the
 * built-in commands only read counters; a plugin's or filter's command
 * (commands.c) runs on a worker, the client's reading pauses until its
 * answer comes back through done_watcher, and only then is the next
 * request read.  A client is limited in what it can make us hold: a
 * line of CONTROL_LINE_MAX bytes, CONTROL_OUT_MAX bytes of answers it
 * has not read (beyond, it is dropped), CONTROL_CLIENTS_MAX clients.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <ev.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"

#define CONTROL_LINE_MAX 4096 /* bytes of a request, newline excluded */
#define CONTROL_CLIENTS_MAX 64
#define CONTROL_OUT_MAX (1024 * 1024) /* unread answer bytes per client */
#define CONTROL_ARGS_MAX 64 /* key=value arguments of one request */

struct client {
  int fd;
  ev_io rio, wio;
  char in[CONTROL_LINE_MAX + 1]; /* a whole line and its newline fit */
  size_t in_len;
  char *out;
  size_t out_len, out_sent, out_cap;
  bool busy; /* its command runs on a worker: read no further */
  bool last_answer; /* close once the output is flushed */
  bool closed; /* fd closed while busy: freed when the job comes back */
  struct client *prev, *next;
};

/* A plugin's or filter's command on its way through a worker. */
struct pending {
  struct job job; /* must stay first */
  struct client *client;
  const struct command *cmd;
  int argc;
  char *line; /* the request; keys and values point into it */
  const char *keys[CONTROL_ARGS_MAX], *values[CONTROL_ARGS_MAX];
  struct nbdserve_reply reply;
  struct pending *next_done;
};

static struct ev_loop *main_ev;
static ev_io listen_watcher;
static int listen_fd = -1;
static struct client *clients;
static unsigned nr_clients;
static ev_async done_watcher;
static pthread_mutex_t done_lock = PTHREAD_MUTEX_INITIALIZER;
static struct pending *done_head;

/* ---- Output ---------------------------------------------------------------- */

static void client_close(struct client *c)
{
  if (c->fd < 0)
    return;
  ev_io_stop(main_ev, &c->rio);
  ev_io_stop(main_ev, &c->wio);
  close(c->fd);
  c->fd = -1;
  if (c->prev)
    c->prev->next = c->next;
  else
    clients = c->next;
  if (c->next)
    c->next->prev = c->prev;
  nr_clients--;
  free(c->out);
  c->out = NULL;
  if (c->busy)
    c->closed = true; /* the worker's answer still points here */
  else
    free(c);
}

/* Write what we can without blocking; false when the client was closed. */
static bool client_flush(struct client *c)
{
  while (c->out_sent < c->out_len) {
    ssize_t n = send(c->fd, c->out + c->out_sent, c->out_len - c->out_sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      ev_io_start(main_ev, &c->wio);
      return true;
    }
    if (n <= 0) {
      client_close(c); /* gone: nobody is left to read the answer */
      return false;
    }
    c->out_sent += (size_t) n;
  }
  c->out_sent = c->out_len = 0;
  ev_io_stop(main_ev, &c->wio);
  if (c->last_answer) {
    client_close(c);
    return false;
  }
  return true;
}

/* Queue bytes for the client; a client that lets more than
 * CONTROL_OUT_MAX pile up unread is dropped.  False if it was. */
static bool client_put(struct client *c, const char *s, size_t n)
{
  size_t unsent = c->out_len - c->out_sent;
  if (unsent + n > CONTROL_OUT_MAX) {
    nbdserve_debug("control: a client left %zu bytes of answers unread; dropping it", unsent);
    client_close(c);
    return false;
  }
  if (c->out_sent > 0) {
    memmove(c->out, c->out + c->out_sent, unsent);
    c->out_len = unsent;
    c->out_sent = 0;
  }
  if (c->out_len + n > c->out_cap) {
    size_t cap = c->out_cap ? c->out_cap : 1024;
    while (cap < c->out_len + n)
      cap *= 2;
    char *grown = realloc(c->out, cap);
    if (grown == NULL) {
      client_close(c);
      return false;
    }
    c->out = grown;
    c->out_cap = cap;
  }
  memcpy(c->out + c->out_len, s, n);
  c->out_len += n;
  return true;
}

/* The final line of an answer, then as much output as goes now. */
static bool client_finish(struct client *c, const char *error)
{
  bool alive;
  if (error) {
    char line[512];
    int n = snprintf(line, sizeof line, "error: %s\n", error);
    if (n < 0 || (size_t) n >= sizeof line) {
      line[sizeof line - 2] = '\n';
      n = sizeof line - 1;
    }
    alive = client_put(c, line, (size_t) n);
  }
  else
    alive = client_put(c, "ok\n", 3);
  return alive && client_flush(c);
}

static bool client_put_reply(struct client *c, const struct nbdserve_reply *r)
{
  return r->len == 0 || client_put(c, r->text, r->len);
}

/* ---- Built-in commands ------------------------------------------------------ */

struct builtin {
  const char *name;
  const char *help;
  /* Fill REPLY; NULL for ok, else the error message. */
  const char *(*run)(int argc, const char *const *keys, const char *const *values,
                     struct nbdserve_reply *reply);
};

static const char *add_number(struct nbdserve_reply *r, const char *key, uint64_t n)
{
  char v[32];
  snprintf(v, sizeof v, "%llu", (unsigned long long) n);
  return reply_add_line(r, key, v) == 0 ? NULL : "reply too long";
}

static const struct builtin builtins[];

static const char *builtin_help(int argc, const char *const *keys, const char *const *values,
                                struct nbdserve_reply *r);

static void add_export(const char *name, unsigned open, void *arg)
{
  char v[CONTROL_LINE_MAX + 32];
  snprintf(v, sizeof v, "%u %s", open, name);
  reply_add_line(arg, "export_open", v);
}

static const char *builtin_status(int argc, const char *const *keys, const char *const *values,
                                  struct nbdserve_reply *r)
{
  (void) keys, (void) values;
  if (argc > 0)
    return "status takes no arguments";
  char v[64];
  reply_add_line(r, "version", PACKAGE_VERSION);
  snprintf(v, sizeof v, "%.3f", stats_uptime());
  reply_add_line(r, "uptime", v);
  reply_add_line(r, "verbose", __atomic_load_n(&opt.verbose, __ATOMIC_RELAXED) ? "on" : "off");
  add_number(r, "loops", loops_count());
  add_number(r, "workers", workers_count());
  add_number(r, "requests_inline", run_inline);
  add_number(r, "connections", connections_open());
  stats_exports_foreach(add_export, r);
  struct counters sum;
  loops_sum_counters(&sum);
  add_number(r, "bytes_read", sum.bytes_read);
  add_number(r, "bytes_written", sum.bytes_written);
  for (int k = 0; k < NR_KINDS; k++) {
    char key[64];
    snprintf(key, sizeof key, "requests_%s", request_kind_names[k]);
    add_number(r, key, sum.requests[k]);
  }
  add_number(r, "control_clients", nr_clients);
  return r->overflowed ? "reply too long" : NULL;
}

static const char *builtin_set_verbose(int argc, const char *const *keys,
                                       const char *const *values, struct nbdserve_reply *r)
{
  (void) r;
  if (argc != 1 || values[0][0] != '\0')
    return "usage: set-verbose on|off";
  bool on;
  if (strcmp(keys[0], "on") == 0)
    on = true;
  else if (strcmp(keys[0], "off") == 0)
    on = false;
  else
    return "usage: set-verbose on|off";
  __atomic_store_n(&opt.verbose, on, __ATOMIC_RELAXED);
  nbdserve_debug("control: debug messages on");
  return NULL;
}

/* Handled in handle_line: the answer must be out before we stop. */
static const char *builtin_shutdown(int argc, const char *const *keys,
                                    const char *const *values, struct nbdserve_reply *r)
{
  (void) keys, (void) values, (void) r;
  return argc > 0 ? "shutdown takes no arguments" : NULL;
}

static const struct builtin builtins[] = {
  { "help", "list every command with its description", builtin_help },
  { "status", "version, uptime, loops, workers, connections, exports open, bytes and "
              "requests served", builtin_status },
  { "set-verbose", "set-verbose on|off: turn debug messages on or off", builtin_set_verbose },
  { "shutdown", "stop the server gracefully, as SIGTERM does (answers ok first)",
    builtin_shutdown },
};

static const char *builtin_help(int argc, const char *const *keys, const char *const *values,
                                struct nbdserve_reply *r)
{
  (void) keys, (void) values;
  if (argc > 0)
    return "help takes no arguments";
  for (size_t i = 0; i < ARRAY_SIZE(builtins); i++)
    reply_add_line(r, builtins[i].name, builtins[i].help);
  for (size_t i = 0; i < commands_count(); i++) {
    const struct command *cmd = command_at(i);
    reply_add_line(r, command_full_name(cmd), command_help(cmd));
  }
  return r->overflowed ? "reply too long" : NULL;
}

/* ---- Plugin and filter commands, through a worker -------------------------- */

static void pending_run(struct job *job)
{
  struct pending *p = (struct pending *) job;
  command_invoke(p->cmd, p->argc, p->keys, p->values, &p->reply);
  pthread_mutex_lock(&done_lock);
  p->next_done = done_head;
  done_head = p;
  pthread_mutex_unlock(&done_lock);
  ev_async_send(main_ev, &done_watcher);
}

static void pending_free(struct pending *p)
{
  reply_free(&p->reply);
  free(p->line);
  free(p);
}

static void process_input(struct client *c);

static void pending_answer(struct pending *p)
{
  struct client *c = p->client;
  c->busy = false;
  if (c->closed)
    free(c);
  else if (client_put_reply(c, &p->reply) &&
           client_finish(c, p->reply.failed ? p->reply.error_text : NULL))
    process_input(c); /* the requests that waited behind this one */
  pending_free(p);
}

/* Every answer the workers have finished, newest first. */
static struct pending *take_done(void)
{
  pthread_mutex_lock(&done_lock);
  struct pending *list = done_head;
  done_head = NULL;
  pthread_mutex_unlock(&done_lock);
  return list;
}

static void done_cb(struct ev_loop *l, ev_async *w, int revents)
{
  (void) l, (void) w, (void) revents;
  struct pending *list = take_done();
  /* Pushed newest first; each client has one at a time, so the order
   * between them does not matter. */
  while (list) {
    struct pending *next = list->next_done;
    pending_answer(list);
    list = next;
  }
}

/* ---- Requests ---------------------------------------------------------------- */

/* One request line (no newline, NUL-terminated, no NUL inside).
 * False when the client was closed. */
static bool handle_line(struct client *c, char *line)
{
  char *copy = strdup(line);
  if (copy == NULL)
    return client_finish(c, "out of memory");
  const char *keys[CONTROL_ARGS_MAX], *values[CONTROL_ARGS_MAX];
  int argc = 0;
  char *save = NULL;
  char *name = strtok_r(copy, " \t", &save);
  if (name == NULL) {
    free(copy);
    return client_finish(c, "empty request (try help)");
  }
  for (char *tok; (tok = strtok_r(NULL, " \t", &save)) != NULL;) {
    if (argc == CONTROL_ARGS_MAX) {
      free(copy);
      return client_finish(c, "too many arguments");
    }
    char *eq = strchr(tok, '=');
    if (eq == tok) {
      free(copy);
      return client_finish(c, "an argument has an empty key");
    }
    if (eq)
      *eq = '\0';
    keys[argc] = tok;
    values[argc] = eq ? eq + 1 : "";
    argc++;
  }

  for (size_t i = 0; i < ARRAY_SIZE(builtins); i++) {
    if (strcmp(name, builtins[i].name) != 0)
      continue;
    struct nbdserve_reply reply = { 0 };
    const char *error = builtins[i].run(argc, keys, values, &reply);
    bool alive = (error || client_put_reply(c, &reply)) && client_finish(c, error);
    reply_free(&reply);
    if (builtins[i].run == builtin_shutdown && error == NULL) {
      nbdserve_debug("control: shutdown requested");
      request_shutdown();
    }
    free(copy);
    return alive;
  }

  const struct command *cmd = command_find(name);
  if (cmd == NULL) {
    char msg[128];
    snprintf(msg, sizeof msg, "unknown command '%.64s' (try help)", name);
    free(copy);
    return client_finish(c, msg);
  }
  struct pending *p = calloc(1, sizeof *p);
  if (p == NULL) {
    free(copy);
    return client_finish(c, "out of memory");
  }
  p->job.run = pending_run;
  p->client = c;
  p->cmd = cmd;
  p->argc = argc;
  p->line = copy;
  memcpy(p->keys, keys, (size_t) argc * sizeof *keys);
  memcpy(p->values, values, (size_t) argc * sizeof *values);
  c->busy = true;
  ev_io_stop(main_ev, &c->rio); /* answers in order: read on when this one is out */
  workers_submit(&p->job);
  return true;
}

/* Answer each whole line buffered, unless a command is running. */
static void process_input(struct client *c)
{
  while (!c->busy && !c->last_answer) {
    char *nl = memchr(c->in, '\n', c->in_len);
    if (nl == NULL) {
      if (c->in_len == sizeof c->in) {
        c->last_answer = true; /* the rest of the line cannot be told from a new one */
        client_finish(c, "line too long");
      }
      else if (c->fd >= 0 && !ev_is_active(&c->rio))
        ev_io_start(main_ev, &c->rio);
      return;
    }
    size_t len = (size_t) (nl - c->in), end = len;
    if (end > 0 && c->in[end - 1] == '\r')
      end--; /* for clients that end lines with CRLF */
    c->in[end] = '\0';
    bool alive = memchr(c->in, '\0', end) ? client_finish(c, "NUL byte in the request")
                                          : handle_line(c, c->in);
    if (!alive)
      return;
    c->in_len -= len + 1;
    memmove(c->in, nl + 1, c->in_len);
  }
}

static void read_cb(struct ev_loop *l, ev_io *w, int revents)
{
  (void) l, (void) revents;
  struct client *c = w->data;
  ssize_t n = recv(c->fd, c->in + c->in_len, sizeof c->in - c->in_len, 0);
  if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
    return;
  if (n <= 0) {
    /* The client is done sending (or gone): a line it left unfinished
     * is dropped; what is queued for it is still written. */
    ev_io_stop(main_ev, &c->rio);
    c->in_len = 0;
    c->last_answer = true;
    if (!c->busy)
      client_flush(c);
    return;
  }
  c->in_len += (size_t) n;
  process_input(c);
}

static void write_cb(struct ev_loop *l, ev_io *w, int revents)
{
  (void) l, (void) revents;
  client_flush(w->data);
}

/* ---- Accepting -------------------------------------------------------------- */

/* A one-line answer to a client we will not serve; it cannot block us
 * (a fresh socket's buffer takes a line) and it may fail unread. */
static void refuse(int fd, const char *line)
{
  ssize_t r = send(fd, line, strlen(line), MSG_NOSIGNAL | MSG_DONTWAIT);
  (void) r;
  close(fd);
}

static void accept_cb(struct ev_loop *l, ev_io *w, int revents)
{
  (void) l, (void) revents;
  for (int i = 0; i < 64; i++) {
    int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
        nbdserve_error("control: accept: %s", strerror(errno));
      return; /* EMFILE too: the client waits in the backlog for a free fd */
    }
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == -1 || len != sizeof cred) {
      refuse(fd, "error: cannot identify you\n");
      continue;
    }
    if (cred.uid != geteuid() && cred.uid != 0) {
      nbdserve_debug("control: refusing uid %u (pid %d)", (unsigned) cred.uid, (int) cred.pid);
      refuse(fd, "error: permission denied\n");
      continue;
    }
    if (nr_clients >= CONTROL_CLIENTS_MAX) {
      refuse(fd, "error: too many control clients, try again later\n");
      continue;
    }
    struct client *c = calloc(1, sizeof *c);
    if (c == NULL) {
      refuse(fd, "error: out of memory\n");
      continue;
    }
    c->fd = fd;
    ev_io_init(&c->rio, read_cb, fd, EV_READ);
    c->rio.data = c;
    ev_io_init(&c->wio, write_cb, fd, EV_WRITE);
    c->wio.data = c;
    ev_io_start(main_ev, &c->rio);
    c->next = clients;
    if (clients)
      clients->prev = c;
    clients = c;
    nr_clients++;
  }
}

void control_start(struct ev_loop *ev, int fd)
{
  main_ev = ev;
  listen_fd = fd;
  ev_async_init(&done_watcher, done_cb);
  ev_async_start(main_ev, &done_watcher);
  ev_io_init(&listen_watcher, accept_cb, fd, EV_READ);
  ev_io_start(main_ev, &listen_watcher);
  nbdserve_debug("control socket: %s, %zu plugin or filter command%s", opt.control,
                 commands_count(), commands_count() == 1 ? "" : "s");
}

/* The workers have stopped: every command's answer is in the done list. */
void control_finish(void)
{
  if (main_ev == NULL)
    return;
  ev_io_stop(main_ev, &listen_watcher);
  close(listen_fd);
  listen_fd = -1;
  struct pending *list = take_done();
  while (list) {
    struct pending *next = list->next_done;
    list->client->busy = false;
    if (list->client->closed)
      free(list->client);
    pending_free(list);
    list = next;
  }
  while (clients) {
    clients->busy = false;
    client_close(clients);
  }
  ev_async_stop(main_ev, &done_watcher);
  main_ev = NULL;
}
