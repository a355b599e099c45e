/* nbdserve nbd plugin - the connections ("links") to the backend server.
 *
 * Every link is one libnbd handle and one reader thread of its own.
 * Commands are sent by whichever thread serves the client's request (a
 * connection loop, usually): libnbd writes them to the non-blocking
 * socket at once and returns.  The reader polls the socket and lets
 * libnbd take the replies in; libnbd then calls the completion
 * callbacks of nbd.c on the reader thread, and those wake the waiting
 * requests.  So no thread waits for the backend except the readers, one
 * per link whatever the number of clients.
 *
 * A link whose backend goes away is either given up for good (no retry
 * policy) or reconnected by its reader, one attempt a second within the
 * policy; requests that find no link up meanwhile wait for the outcome
 * (links_park).  Connecting is libnbd's asynchronous connect driven by
 * nbd_poll under a deadline, so that a backend that accepts but never
 * answers cannot hold the reader (or the start-up) for ever.
 *
 * Locking: link->lock guards state, h and the parked waiters.  A sender
 * holds it around its libnbd call, so the reader cannot close the handle
 * under it; the reader itself uses h without the lock, since only it
 * ever replaces h.  libnbd serialises calls on one handle itself.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "nbd-internal.h"

#define CONNECT_TIMEOUT_MS 10000 /* one connection attempt, handshake included */
#define RETRY_INTERVAL_MS 1000

enum link_state { LINK_UP, LINK_RECONNECTING, LINK_GONE };

struct link {
  unsigned index;
  pthread_mutex_t lock;
  struct nbd_handle *h; /* NULL while not up */
  enum link_state state;
  struct nbdserve_waiter **parked; /* requests waiting for the reconnection */
  size_t nparked, parked_cap;
  int wake_fd; /* eventfd: something for the reader to look at */
  pthread_t reader;
  bool reader_started;
};

static struct link links[MAX_LINKS];
static unsigned nlinks;
static atomic_uint next_link;
static atomic_bool stopping;

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}

static bool retry_policy(void)
{
  return config.retry_attempts > 0 || config.retry_ns > 0;
}

static void poke(struct link *l)
{
  uint64_t one = 1;
  if (write(l->wake_fd, &one, sizeof one) == -1) {
    /* The counter is full only if the reader is far behind: it wakes anyway. */
  }
}

static void drain(int fd)
{
  uint64_t n;
  if (read(fd, &n, sizeof n) == -1) {
    /* EAGAIN: nothing was pending */
  }
}

int backend_context_index(const char *name)
{
  for (size_t i = 0; i < info.ncontexts; i++)
    if (strcmp(info.contexts[i], name) == 0)
      return (int) i;
  return -1;
}

/* ---- Connecting --------------------------------------------------------------- */

struct option_reply {
  bool done;
  int error;
};

static int option_done(void *user_data, int *error)
{
  struct option_reply *r = user_data;
  r->done = true;
  r->error = *error;
  return 1;
}

static int context_listed(void *user_data, const char *name)
{
  (void) user_data;
  if (info.ncontexts == MAX_BACKEND_CONTEXTS) {
    nbdserve_debug("nbd: the backend offers more than %d meta contexts; '%s' is left out",
                   MAX_BACKEND_CONTEXTS, name);
    return 0;
  }
  for (size_t i = 0; i < info.ncontexts; i++)
    if (strcmp(info.contexts[i], name) == 0)
      return 0;
  char *copy = strdup(name);
  if (copy)
    info.contexts[info.ncontexts++] = copy;
  return 0;
}

enum phase { PHASE_NEGOTIATING, PHASE_READY, PHASE_OPTION };

static bool phase_reached(struct nbd_handle *h, enum phase phase, const struct option_reply *r)
{
  switch (phase) {
  case PHASE_NEGOTIATING:
    return nbd_aio_is_negotiating(h) == 1 || nbd_aio_is_ready(h) == 1;
  case PHASE_READY:
    return nbd_aio_is_ready(h) == 1;
  case PHASE_OPTION:
    return r->done;
  }
  return false;
}

/* Drive the handshake until PHASE, the connection's death or DEADLINE.
 * 0, or -1 with *why set. */
static int drive(struct nbd_handle *h, enum phase phase, const struct option_reply *r,
                 uint64_t deadline, const char **why)
{
  while (!phase_reached(h, phase, r)) {
    if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1) {
      *why = nbd_get_error();
      return -1;
    }
    uint64_t t = now_ns();
    if (t >= deadline) {
      *why = "no answer from the backend within 10 seconds";
      return -1;
    }
    if (nbd_poll(h, (int) ((deadline - t) / 1000000 + 1)) == -1) {
      *why = nbd_get_error();
      return -1;
    }
  }
  return 0;
}

static int configure_handle(struct nbd_handle *h, unsigned index)
{
  char name[32];
  snprintf(name, sizeof name, "nbd-link-%u", index);
  if (nbd_set_handle_name(h, name) == -1 || nbd_set_opt_mode(h, true) == -1 ||
      nbd_set_pread_initialize(h, false) == -1 || nbd_set_uri_allow_local_file(h, true) == -1)
    return -1;
  if (config.tls != -1 && nbd_set_tls(h, config.tls) == -1)
    return -1;
  if (config.tls_certificates && nbd_set_tls_certificates(h, config.tls_certificates) == -1)
    return -1;
  if (config.tls_psk && nbd_set_tls_psk_file(h, config.tls_psk) == -1)
    return -1;
  if (config.tls_username && nbd_set_tls_username(h, config.tls_username) == -1)
    return -1;
  if (!config.uri && nbd_set_export_name(h, config.export ? config.export : "") == -1)
    return -1;
  return 0;
}

static int start_connect(struct nbd_handle *h)
{
  if (config.uri)
    return nbd_aio_connect_uri(h, config.uri);
  if (config.socket)
    return nbd_aio_connect_unix(h, config.socket);
  return nbd_aio_connect_tcp(h, config.hostname, config.port ? config.port : "10809");
}

/* The export's size and capabilities, from the first connection. */
static void learn_export(struct nbd_handle *h)
{
  info.size = nbd_get_size(h);
  info.read_only = nbd_is_read_only(h) == 1;
  info.can_flush = nbd_can_flush(h) == 1;
  info.can_fua = nbd_can_fua(h) == 1;
  info.can_trim = nbd_can_trim(h) == 1;
  info.can_zero = nbd_can_zero(h) == 1;
  info.can_fast_zero = nbd_can_fast_zero(h) == 1;
  info.can_cache = nbd_can_cache(h) == 1;
  info.can_multi_conn = nbd_can_multi_conn(h) == 1;
  info.is_rotational = nbd_is_rotational(h) == 1;
  int64_t min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
  int64_t pref = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
  int64_t max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
  info.block_min = min > 0 ? (uint32_t) min : 0;
  info.block_preferred = pref > 0 ? (uint32_t) pref : 0;
  info.block_max = max > 0 ? (uint32_t) max : 0;
  /* Keep only the contexts the server agreed to. */
  size_t kept = 0;
  for (size_t i = 0; i < info.ncontexts; i++) {
    if (nbd_can_meta_context(h, info.contexts[i]) == 1)
      info.contexts[kept++] = info.contexts[i];
    else
      free(info.contexts[i]);
  }
  info.ncontexts = kept;
}

/* One connection attempt.  DISCOVER (the very first connection) lists the
 * backend's meta contexts and learns the export; later connections ask
 * for the same contexts and must find the same size.  The handle, or
 * NULL with *why (a message) set. */
static struct nbd_handle *connect_once(unsigned index, bool discover, char **why)
{
  const char *reason = NULL;
  struct option_reply list = { 0 }, go = { 0 };
  uint64_t deadline = now_ns() + (uint64_t) CONNECT_TIMEOUT_MS * 1000000;
  struct nbd_handle *h = nbd_create();
  if (h == NULL || configure_handle(h, index) == -1 || start_connect(h) == -1)
    goto failed;
  if (drive(h, PHASE_NEGOTIATING, NULL, deadline, &reason) == -1)
    goto failed;
  if (nbd_aio_is_negotiating(h) == 1) {
    if (discover) {
      nbd_context_callback cb = { .callback = context_listed };
      nbd_completion_callback done = { .callback = option_done, .user_data = &list };
      if (nbd_aio_opt_list_meta_context(h, cb, done) == -1 ||
          drive(h, PHASE_OPTION, &list, deadline, &reason) == -1)
        goto failed;
      /* A server that cannot list still answers base:allocation perhaps. */
      if (list.error != 0 || info.ncontexts == 0)
        context_listed(NULL, LIBNBD_CONTEXT_BASE_ALLOCATION);
    }
    for (size_t i = 0; i < info.ncontexts; i++)
      if (nbd_add_meta_context(h, info.contexts[i]) == -1)
        goto failed;
    nbd_completion_callback done = { .callback = option_done, .user_data = &go };
    if (nbd_aio_opt_go(h, done) == -1 || drive(h, PHASE_OPTION, &go, deadline, &reason) == -1)
      goto failed;
    if (go.error != 0) {
      reason = nbd_get_error();
      if (reason == NULL || *reason == '\0')
        reason = strerror(go.error);
      goto failed;
    }
  }
  if (drive(h, PHASE_READY, NULL, deadline, &reason) == -1)
    goto failed;
  if (discover)
    learn_export(h);
  else if (nbd_get_size(h) != info.size) {
    if (asprintf(why, "the backend's export is now %lld bytes, not %lld: refusing a different disk",
                 (long long) nbd_get_size(h), (long long) info.size) == -1)
      *why = NULL;
    nbd_close(h);
    return NULL;
  }
  return h;

failed:
  if (reason == NULL)
    reason = h ? nbd_get_error() : strerror(errno);
  if (asprintf(why, "%s", reason && *reason ? reason : "connection failed") == -1)
    *why = NULL;
  nbd_close(h);
  return NULL;
}

/* Sleep MS milliseconds unless the link is poked to stop.  */
static void pause_between_attempts(struct link *l, int ms)
{
  struct pollfd p = { .fd = l->wake_fd, .events = POLLIN };
  if (poll(&p, 1, ms) == 1)
    drain(l->wake_fd);
}

/* Attempts by the retry policy (one, without a policy).  The handle, or
 * NULL after logging why the last attempt failed. */
static struct nbd_handle *connect_by_policy(struct link *l, bool discover)
{
  uint64_t start = now_ns();
  for (unsigned attempt = 1;; attempt++) {
    char *why = NULL;
    struct nbd_handle *h = connect_once(l->index, discover, &why);
    if (h) {
      if (attempt > 1)
        nbdserve_error("nbd: connection %u to the backend is back (attempt %u)", l->index,
                       attempt);
      return h;
    }
    bool more = !atomic_load(&stopping) &&
                (config.retry_attempts ? attempt < config.retry_attempts
                                       : now_ns() - start + RETRY_INTERVAL_MS * 1000000ull <=
                                           config.retry_ns);
    nbdserve_error("nbd: connection %u to the backend: %s%s", l->index,
                   why ? why : "connection failed",
                   more ? "; trying again in a second" : "");
    free(why);
    if (!more)
      return NULL;
    pause_between_attempts(l, RETRY_INTERVAL_MS);
    if (atomic_load(&stopping))
      return NULL;
  }
}

/* ---- The reader ---------------------------------------------------------------- */

/* Take the replies in until the connection dies or the plugin stops. */
static void serve_link(struct link *l)
{
  struct nbd_handle *h = l->h;
  while (!atomic_load(&stopping)) {
    if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1)
      return;
    pthread_mutex_lock(&l->lock);
    bool up = l->state == LINK_UP;
    pthread_mutex_unlock(&l->lock);
    if (!up)
      return; /* a sender found the connection dead */
    int fd = nbd_aio_get_fd(h);
    if (fd == -1)
      return;
    unsigned dir = nbd_aio_get_direction(h);
    struct pollfd p[2] = {
      { .fd = fd, .events = (short) ((dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
                                     (dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0)) },
      { .fd = l->wake_fd, .events = POLLIN },
    };
    if (poll(p, 2, -1) == -1) {
      if (errno == EINTR)
        continue;
      nbdserve_error("nbd: poll: %m");
      return;
    }
    if (p[1].revents & POLLIN)
      drain(l->wake_fd);
    if (p[0].revents & (POLLIN | POLLHUP | POLLERR))
      nbd_aio_notify_read(h);
    if (p[0].revents & POLLOUT)
      nbd_aio_notify_write(h);
  }
}

/* Wake every request parked on L (whatever the outcome: they look again). */
static void release_parked(struct link *l, enum link_state state, struct nbd_handle *h)
{
  pthread_mutex_lock(&l->lock);
  l->state = state;
  l->h = h;
  struct nbdserve_waiter **parked = l->parked;
  size_t n = l->nparked;
  l->parked = NULL;
  l->nparked = l->parked_cap = 0;
  pthread_mutex_unlock(&l->lock);
  for (size_t i = 0; i < n; i++)
    nbdserve_wake(parked[i]);
  free(parked);
}

/* The connection died: drop the handle (libnbd has failed every command
 * that was in flight on it), and reconnect if the policy says so. */
static void lose_link(struct link *l)
{
  pthread_mutex_lock(&l->lock);
  struct nbd_handle *old = l->h;
  l->h = NULL;
  l->state = retry_policy() && !atomic_load(&stopping) ? LINK_RECONNECTING : LINK_GONE;
  bool reconnect = l->state == LINK_RECONNECTING;
  pthread_mutex_unlock(&l->lock);
  if (old) {
    nbdserve_error("nbd: connection %u to the backend lost%s", l->index,
                   reconnect ? "; reconnecting" : "; requests fail from now on");
    nbd_close(old);
  }
  if (!reconnect) {
    release_parked(l, LINK_GONE, NULL);
    return;
  }
  struct nbd_handle *h = connect_by_policy(l, false);
  if (h == NULL && !atomic_load(&stopping))
    nbdserve_error("nbd: connection %u: giving up; requests fail until a new client "
                   "connects and a new round of attempts succeeds", l->index);
  release_parked(l, h ? LINK_UP : LINK_GONE, h);
}

static void *reader(void *arg)
{
  struct link *l = arg;
  while (!atomic_load(&stopping)) {
    pthread_mutex_lock(&l->lock);
    enum link_state state = l->state;
    struct nbd_handle *h = l->h;
    pthread_mutex_unlock(&l->lock);
    if (h) {
      serve_link(l);
      if (!atomic_load(&stopping))
        lose_link(l);
    }
    else if (state == LINK_RECONNECTING) /* revived by a new client */
      lose_link(l);
    else
      pause_between_attempts(l, -1); /* gone: wait for links_revive or the end */
  }
  return NULL;
}

/* ---- Sending ------------------------------------------------------------------- */

int links_submit(issue_fn issue, void *arg, struct link **used)
{
  unsigned start = nlinks > 1 ? atomic_fetch_add_explicit(&next_link, 1, memory_order_relaxed) : 0;
  bool reconnecting = false;
  *used = NULL;
  for (unsigned i = 0; i < nlinks; i++) {
    struct link *l = &links[(start + i) % nlinks];
    pthread_mutex_lock(&l->lock);
    if (l->state == LINK_UP) {
      *used = l;
      int64_t r = issue(l->h, arg);
      int err = r == -1 ? nbd_get_errno() : 0;
      bool dead = r == -1 && nbd_aio_is_dead(l->h) == 1;
      bool wants_write = r != -1 && (nbd_aio_get_direction(l->h) & LIBNBD_AIO_DIRECTION_WRITE);
      if (dead) /* the reader reconnects (or gives up) as soon as it looks */
        l->state = retry_policy() ? LINK_RECONNECTING : LINK_GONE;
      pthread_mutex_unlock(&l->lock);
      if (dead || wants_write)
        poke(l);
      if (r == -1) {
        errno = dead ? EIO : err ? err : EIO;
        return -1;
      }
      return 0;
    }
    reconnecting |= l->state == LINK_RECONNECTING;
    pthread_mutex_unlock(&l->lock);
  }
  errno = reconnecting ? EAGAIN : ESHUTDOWN;
  return -1;
}

void links_park(struct nbdserve_waiter *w)
{
  for (unsigned i = 0; i < nlinks; i++) {
    struct link *l = &links[i];
    pthread_mutex_lock(&l->lock);
    if (l->state == LINK_RECONNECTING) {
      if (l->nparked == l->parked_cap) {
        size_t cap = l->parked_cap * 2 + 16;
        struct nbdserve_waiter **more = realloc(l->parked, cap * sizeof *more);
        if (more == NULL) {
          pthread_mutex_unlock(&l->lock);
          break;
        }
        l->parked = more;
        l->parked_cap = cap;
      }
      l->parked[l->nparked++] = w;
      pthread_mutex_unlock(&l->lock);
      return;
    }
    pthread_mutex_unlock(&l->lock);
  }
  nbdserve_wake(w); /* nothing to wait for (any more): look again now */
}

void links_revive(void)
{
  if (!retry_policy())
    return;
  for (unsigned i = 0; i < nlinks; i++) {
    struct link *l = &links[i];
    pthread_mutex_lock(&l->lock);
    bool gone = l->state == LINK_GONE;
    if (gone)
      l->state = LINK_RECONNECTING;
    pthread_mutex_unlock(&l->lock);
    if (gone)
      poke(l);
  }
}

void links_force_down(struct link *l)
{
  pthread_mutex_lock(&l->lock);
  if (l->h && nbd_aio_get_fd(l->h) >= 0)
    shutdown(nbd_aio_get_fd(l->h), SHUT_RDWR);
  pthread_mutex_unlock(&l->lock);
}

/* ---- Start and stop ------------------------------------------------------------- */

static int link_init(struct link *l, unsigned index)
{
  l->index = index;
  l->state = LINK_GONE;
  pthread_mutex_init(&l->lock, NULL);
  l->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (l->wake_fd == -1) {
    nbdserve_error("nbd: eventfd: %m");
    return -1;
  }
  return 0;
}

int links_start(void)
{
  nlinks = config.connections;
  for (unsigned i = 0; i < nlinks; i++)
    if (link_init(&links[i], i) == -1)
      return -1;
  struct nbd_handle *first = connect_by_policy(&links[0], true);
  if (first == NULL)
    return -1;
  links[0].h = first;
  links[0].state = LINK_UP;
  if (nlinks > 1 && !info.can_multi_conn) {
    nbdserve_debug("nbd: the backend does not advertise multi-conn: using one connection, "
                   "not %u", nlinks);
    for (unsigned i = 1; i < nlinks; i++)
      close(links[i].wake_fd);
    nlinks = 1;
  }
  for (unsigned i = 1; i < nlinks; i++) {
    links[i].h = connect_by_policy(&links[i], false);
    if (links[i].h == NULL)
      return -1;
    links[i].state = LINK_UP;
  }
  nbdserve_debug("nbd: %u connection%s to the backend", nlinks, nlinks == 1 ? "" : "s");
  for (unsigned i = 0; i < nlinks; i++) {
    int err = pthread_create(&links[i].reader, NULL, reader, &links[i]);
    if (err) {
      nbdserve_error("nbd: cannot start a reader thread: %s", strerror(err));
      return -1;
    }
    links[i].reader_started = true;
  }
  return 0;
}

void links_stop(void)
{
  atomic_store(&stopping, true);
  for (unsigned i = 0; i < nlinks; i++) {
    struct link *l = &links[i];
    if (l->reader_started) {
      poke(l);
      pthread_join(l->reader, NULL);
    }
    pthread_mutex_lock(&l->lock);
    struct nbd_handle *h = l->h;
    pthread_mutex_unlock(&l->lock);
    release_parked(l, LINK_GONE, NULL);
    nbd_close(h); /* fails what is still in flight: its requests are long answered */
  }
  for (unsigned i = 0; i < nlinks; i++) {
    struct link *l = &links[i];
    close(l->wake_fd);
    pthread_mutex_destroy(&l->lock);
  }
  for (size_t i = 0; i < info.ncontexts; i++)
    free(info.contexts[i]);
  info.ncontexts = 0;
}
