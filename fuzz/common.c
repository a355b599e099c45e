/* nbdserve fuzzing harnesses: a server core in the harness's process,
 * fed one client byte stream per input over a socketpair.
 *
 * The memory plugin never blocks, so requests run on the harness's own
 * thread: each input is replayed deterministically.  Two helper threads
 * play the client: one writes the input, one reads and discards the
 * replies (a client that never reads would stall the server on
 * backpressure, which is a different test).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"
#include "common.h"

/* main.c is not linked into the harnesses: these are its globals, and
 * the one function of it that another file calls (the harnesses never
 * daemonize). */
struct options opt;
int captive_exit_status;
void restore_inherited_signals(void) {}

void fuzz_setup_server(void)
{
  static bool ready;
  if (ready)
    return;
  ready = true;

  /* The harness and its own build of the plugin live in fuzz/build/. */
  char exe[PATH_MAX], plugin[PATH_MAX + 64];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n < 0)
    die("fuzz: cannot find myself: %s", strerror(errno));
  exe[n] = '\0';
  snprintf(plugin, sizeof plugin, "%s/nbdserve-memory-plugin.so", dirname(exe));

  opt.threads = 2;
  opt.handshake_timeout = 10;
  load_chain(plugin, NULL, 0);
  if (chain_config("size", "1M") == -1 || chain_config_complete() == -1 ||
      chain_get_ready() == -1)
    die("fuzz: cannot configure the memory plugin");
}

struct client {
  int fd;
  const uint8_t *prefix, *data;
  size_t prefix_len, size;
};

static void write_all(int fd, const uint8_t *p, size_t len)
{
  while (len > 0) {
    ssize_t r = write(fd, p, len);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return; /* the server closed: the rest is of no interest */
    }
    p += r;
    len -= (size_t) r;
  }
}

static void *client_writer(void *arg)
{
  struct client *c = arg;
  write_all(c->fd, c->prefix, c->prefix_len);
  write_all(c->fd, c->data, c->size);
  shutdown(c->fd, SHUT_WR);
  return NULL;
}

static void *client_reader(void *arg)
{
  struct client *c = arg;
  char buf[65536];
  while (read(c->fd, buf, sizeof buf) > 0)
    ;
  return NULL;
}

void fuzz_serve(const uint8_t *prefix, size_t prefix_len, const uint8_t *data, size_t size)
{
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1)
    die("fuzz: socketpair: %s", strerror(errno));
  struct client c = { sv[1], prefix, data, prefix_len, size };
  pthread_t writer, reader;
  if (pthread_create(&writer, NULL, client_writer, &c) != 0 ||
      pthread_create(&reader, NULL, client_reader, &c) != 0)
    die("fuzz: cannot start the client threads");
  serve_one_connection(sv[0], sv[0]); /* closes sv[0] when done */
  pthread_join(writer, NULL);
  shutdown(sv[1], SHUT_RDWR);
  pthread_join(reader, NULL);
  close(sv[1]);
}
