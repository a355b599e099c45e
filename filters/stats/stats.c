/* nbdserve stats filter: count requests, bytes, errors and latencies.
 *
 * Each open export (handle) carries its own counters, bumped with
 * relaxed atomics: requests of one connection may run in parallel, but
 * nothing orders the counters against each other, so the cheapest
 * atomic add is enough and no lock is taken on the request path.  When
 * a handle closes, its counters are folded into the server totals under
 * a mutex (open and close are rare); a printout adds the live handles to
 * those totals.  The handle itself is kept on a short list of recently
 * closed connections so that the exit printout can still show it.
 *
 * Printing happens at exit (unload), on SIGUSR1 and on the control
 * command stats.show.  The signal handler only writes a byte to a pipe;
 * a thread of ours reads it and prints, because stdio and malloc are not
 * async-signal-safe.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nbdserve-filter.h"

enum kind { READ, WRITE, ZERO, TRIM, FLUSH, CACHE, EXTENTS, NR_KINDS };

static const char *const kind_names[NR_KINDS] = {
  "read", "write", "zero", "trim", "flush", "cache", "extents",
};

/* Bucket 0 holds the value 0; bucket b >= 1 holds [2^(b-1), 2^b). */
#define NR_BUCKETS 65

struct kstats {
  uint64_t requests, bytes, errors, time_ns;
  uint64_t size[NR_BUCKETS];
  uint64_t latency_us[NR_BUCKETS];
};

struct handle {
  struct handle *prev, *next; /* on the live list or the closed list */
  unsigned conn_id;
  bool closed;
  char peer[128];
  struct kstats k[NR_KINDS];
};

/* Parameters. */
static char *statsfile;
static bool append;
static uint64_t keep_closed = 16;

/* Everything below "lock" is guarded by it. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct handle live = { .prev = &live, .next = &live };
static struct handle closed_list = { .prev = &closed_list, .next = &closed_list };
static uint64_t nr_closed_kept;
static uint64_t opens, closes;
static struct kstats closed_totals[NR_KINDS];

/* Output: one write per printout, so blocks from the signal thread and
 * from unload never interleave. */
static pthread_mutex_t print_lock = PTHREAD_MUTEX_INITIALIZER;
static int out_fd = -1;
static bool ready;
static struct timespec started;

static int sig_pipe[2] = { -1, -1 };
static pthread_t printer;
static bool printer_running;

static int stats_load(void)
{
  statsfile = NULL;
  append = false;
  keep_closed = 16;
  ready = false;
  return 0;
}

static int stats_config(const char *key, const char *value)
{
  if (strcmp(key, "statsfile") == 0) {
    free(statsfile);
    statsfile = strdup(value);
    if (statsfile == NULL) {
      nbdserve_error("strdup: %m");
      return -1;
    }
    return 1;
  }
  if (strcmp(key, "stats-append") == 0) {
    int b = nbdserve_parse_bool(value);
    if (b == -1)
      return -1;
    append = b;
    return 1;
  }
  if (strcmp(key, "stats-keep") == 0)
    return nbdserve_parse_uint64(key, value, &keep_closed) == 0 ? 1 : -1;
  return 0;
}

/* The file is opened before the server becomes a daemon (which may
 * change directory) and drops privileges, so that a relative path and
 * a file only the starting user may write both work; the descriptor
 * survives the fork. */
static int stats_config_complete(void)
{
  if (statsfile == NULL) {
    out_fd = STDERR_FILENO;
    return 0;
  }
  out_fd = open(statsfile, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (append ? 0 : O_TRUNC),
                0644);
  if (out_fd == -1) {
    nbdserve_error("statsfile=%s: %m", statsfile);
    return -1;
  }
  return 0;
}

static inline void add(uint64_t *p, uint64_t v)
{
  __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

static inline uint64_t get(const uint64_t *p)
{
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline unsigned bucket(uint64_t v)
{
  return v == 0 ? 0 : 64 - (unsigned) __builtin_clzll(v);
}

static inline uint64_t bucket_low(unsigned b)
{
  return b == 0 ? 0 : UINT64_C(1) << (b - 1);
}

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000 + (uint64_t) ts.tv_nsec;
}

/* Called after the layer below answered.  A request that a layer below
 * parks (EINPROGRESS) is run again from the top later: it is counted
 * then, once, and its latency is that of the last run only. */
static int account(struct handle *h, enum kind k, uint64_t count, uint64_t start, int r)
{
  if (r == -1 && errno == EINPROGRESS)
    return r;
  int saved = errno;
  struct kstats *s = &h->k[k];
  uint64_t ns = now_ns() - start;
  add(&s->requests, 1);
  add(&s->bytes, count);
  add(&s->time_ns, ns);
  if (k != FLUSH)
    add(&s->size[bucket(count)], 1);
  add(&s->latency_us[bucket(ns / 1000)], 1);
  if (r == -1)
    add(&s->errors, 1);
  errno = saved;
  return r;
}

static void list_insert(struct handle *head, struct handle *h)
{
  h->next = head;
  h->prev = head->prev;
  head->prev->next = h;
  head->prev = h;
}

static void list_remove(struct handle *h)
{
  h->prev->next = h->next;
  h->next->prev = h->prev;
}

static void *stats_open(struct nbdserve_next *next, int readonly, const char *export_name)
{
  (void) next, (void) readonly, (void) export_name;
  struct handle *h = calloc(1, sizeof *h);
  if (h == NULL)
    return NULL;
  h->conn_id = nbdserve_connection_id();
  const char *peer = nbdserve_peer_name();
  snprintf(h->peer, sizeof h->peer, "%s", peer ? peer : "unknown");
  pthread_mutex_lock(&lock);
  list_insert(&live, h);
  opens++;
  pthread_mutex_unlock(&lock);
  return h;
}

static void fold(struct kstats *dst, const struct kstats *src)
{
  dst->requests += get(&src->requests);
  dst->bytes += get(&src->bytes);
  dst->errors += get(&src->errors);
  dst->time_ns += get(&src->time_ns);
  for (unsigned b = 0; b < NR_BUCKETS; b++) {
    dst->size[b] += get(&src->size[b]);
    dst->latency_us[b] += get(&src->latency_us[b]);
  }
}

static uint64_t total_requests(const struct handle *h)
{
  uint64_t n = 0;
  for (int k = 0; k < NR_KINDS; k++)
    n += get(&h->k[k].requests);
  return n;
}

static void stats_close(void *handle)
{
  struct handle *h = handle;
  pthread_mutex_lock(&lock);
  list_remove(h);
  closes++;
  for (int k = 0; k < NR_KINDS; k++)
    fold(&closed_totals[k], &h->k[k]);
  /* An export opened only to describe it (NBD_OPT_INFO) did nothing
   * worth a line of its own. */
  if (keep_closed > 0 && total_requests(h) > 0) {
    h->closed = true;
    list_insert(&closed_list, h);
    h = NULL;
    if (++nr_closed_kept > keep_closed) {
      h = closed_list.next;
      list_remove(h);
      nr_closed_kept--;
    }
  }
  pthread_mutex_unlock(&lock);
  free(h);
}

/* ---- Printing ---- */

/* A copy taken under the lock, formatted without it. */
struct snapshot {
  uint64_t opens, closes;
  struct kstats server[NR_KINDS];
  size_t nconns;
  struct handle *conns; /* closed ones first, oldest first, then live ones */
};

static int take_snapshot(struct snapshot *s, bool with_conns)
{
  memset(s, 0, sizeof *s);
  pthread_mutex_lock(&lock);
  s->opens = opens;
  s->closes = closes;
  memcpy(s->server, closed_totals, sizeof s->server);
  size_t n = 0;
  for (struct handle *h = live.next; h != &live; h = h->next) {
    for (int k = 0; k < NR_KINDS; k++)
      fold(&s->server[k], &h->k[k]);
    n++;
  }
  if (with_conns) {
    n += nr_closed_kept;
    s->conns = n ? malloc(n * sizeof *s->conns) : NULL;
    if (n && s->conns == NULL) {
      pthread_mutex_unlock(&lock);
      return -1;
    }
    for (struct handle *h = closed_list.next; h != &closed_list; h = h->next)
      memcpy(&s->conns[s->nconns++], h, sizeof *h);
    for (struct handle *h = live.next; h != &live; h = h->next) {
      struct handle *c = &s->conns[s->nconns++];
      c->conn_id = h->conn_id;
      c->closed = false;
      memcpy(c->peer, h->peer, sizeof c->peer);
      memset(c->k, 0, sizeof c->k);
      for (int k = 0; k < NR_KINDS; k++)
        fold(&c->k[k], &h->k[k]);
    }
  }
  pthread_mutex_unlock(&lock);
  return 0;
}

/* Where the key=value lines go: a control reply, or a memory stream. */
struct sink {
  struct nbdserve_reply *reply;
  FILE *fp;
  int err;
};

static void emit(struct sink *sk, const char *key, const char *fmt, ...)
  NBDSERVE_PRINTF(3, 4);
static void emit(struct sink *sk, const char *key, const char *fmt, ...)
{
  char value[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(value, sizeof value, fmt, ap);
  va_end(ap);
  if (sk->err)
    return;
  if (sk->reply) {
    if (nbdserve_reply_add(sk->reply, key, "%s", value) == -1)
      sk->err = errno;
  }
  else
    fprintf(sk->fp, "%s=%s\n", key, value);
}

static void emit_kind(struct sink *sk, const char *prefix, enum kind k, const struct kstats *s)
{
  char key[96];
  const char *name = kind_names[k];
#define KEY(...) (snprintf(key, sizeof key, __VA_ARGS__), key)
  emit(sk, KEY("%s.%s.requests", prefix, name), "%" PRIu64, s->requests);
  emit(sk, KEY("%s.%s.bytes", prefix, name), "%" PRIu64, s->bytes);
  emit(sk, KEY("%s.%s.errors", prefix, name), "%" PRIu64, s->errors);
  emit(sk, KEY("%s.%s.time_ns", prefix, name), "%" PRIu64, s->time_ns);
  for (unsigned b = 0; b < NR_BUCKETS; b++)
    if (s->size[b])
      emit(sk, KEY("%s.%s.size.%" PRIu64, prefix, name, bucket_low(b)), "%" PRIu64, s->size[b]);
  for (unsigned b = 0; b < NR_BUCKETS; b++)
    if (s->latency_us[b])
      emit(sk, KEY("%s.%s.latency_us.%" PRIu64, prefix, name, bucket_low(b)), "%" PRIu64,
           s->latency_us[b]);
#undef KEY
}

static void emit_all(struct sink *sk, const char *reason, const struct snapshot *s)
{
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  double elapsed = (double) (now.tv_sec - started.tv_sec) +
                   (double) (now.tv_nsec - started.tv_nsec) / 1e9;
  emit(sk, "stats", "%s", reason);
  emit(sk, "elapsed", "%.3f", elapsed);
  emit(sk, "server.opens", "%" PRIu64, s->opens);
  emit(sk, "server.open", "%" PRIu64, s->opens - s->closes);
  for (int k = 0; k < NR_KINDS; k++)
    emit_kind(sk, "server", k, &s->server[k]);
  for (size_t i = 0; i < s->nconns; i++) {
    const struct handle *c = &s->conns[i];
    char prefix[32], key[64];
    snprintf(prefix, sizeof prefix, "conn.%u", c->conn_id);
    snprintf(key, sizeof key, "%s.peer", prefix);
    emit(sk, key, "%s", c->peer);
    snprintf(key, sizeof key, "%s.state", prefix);
    emit(sk, key, "%s", c->closed ? "closed" : "open");
    for (int k = 0; k < NR_KINDS; k++)
      if (c->k[k].requests)
        emit_kind(sk, prefix, k, &c->k[k]);
  }
}

/* Print to the statsfile (or stderr).  Never from the signal handler. */
static void print_stats(const char *reason)
{
  struct snapshot s;
  if (take_snapshot(&s, true) == -1) {
    nbdserve_error("stats: out of memory");
    return;
  }
  char *buf = NULL;
  size_t len = 0;
  FILE *fp = open_memstream(&buf, &len);
  if (fp == NULL) {
    free(s.conns);
    nbdserve_error("stats: open_memstream: %m");
    return;
  }
  struct sink sk = { .fp = fp };
  emit_all(&sk, reason, &s);
  fputc('\n', fp); /* a blank line ends each printout */
  free(s.conns);
  if (fclose(fp) != 0) {
    free(buf);
    nbdserve_error("stats: %m");
    return;
  }
  pthread_mutex_lock(&print_lock);
  for (size_t done = 0; done < len;) {
    ssize_t w = write(out_fd, buf + done, len - done);
    if (w == -1 && errno == EINTR)
      continue;
    if (w <= 0) {
      nbdserve_error("stats: writing %s: %m", statsfile ? statsfile : "stderr");
      break;
    }
    done += (size_t) w;
  }
  pthread_mutex_unlock(&print_lock);
  free(buf);
}

static int show(int argc, const char *const *keys, const char *const *values,
                struct nbdserve_reply *reply)
{
  (void) values;
  bool with_conns = true;
  for (int i = 0; i < argc; i++) {
    if (strcmp(keys[i], "server") == 0)
      with_conns = false;
    else {
      nbdserve_reply_error(reply, "unknown argument %s (stats.show takes only 'server')",
                           keys[i]);
      return -1;
    }
  }
  struct snapshot s;
  if (take_snapshot(&s, with_conns) == -1) {
    nbdserve_reply_error(reply, "out of memory");
    return -1;
  }
  struct sink sk = { .reply = reply };
  emit_all(&sk, "show", &s);
  free(s.conns);
  if (sk.err) {
    nbdserve_reply_error(reply, sk.err == E2BIG ? "reply too long: try 'stats.show server'"
                                                : "could not add a line to the reply");
    return -1;
  }
  return 0;
}

/* Async-signal-safe: one write, errno kept.  A full pipe already holds a
 * request to print, so a lost byte loses nothing. */
static void on_usr1(int sig)
{
  (void) sig;
  int saved = errno;
  char c = 's';
  ssize_t r = write(sig_pipe[1], &c, 1);
  (void) r;
  errno = saved;
}

static void *printer_thread(void *arg)
{
  (void) arg;
  for (;;) {
    char buf[64];
    ssize_t n = read(sig_pipe[0], buf, sizeof buf);
    if (n == -1 && errno == EINTR)
      continue;
    if (n <= 0)
      return NULL;
    /* Several signals in one read print once: they asked for the same. */
    if (memchr(buf, 'q', (size_t) n))
      return NULL;
    print_stats("signal");
  }
}

static int stats_get_ready(void)
{
  clock_gettime(CLOCK_MONOTONIC, &started);
  if (nbdserve_register_command("show", "print the request statistics ('server': totals only)",
                                show) == -1) {
    nbdserve_error("stats: registering stats.show: %m");
    return -1;
  }
  if (pipe2(sig_pipe, O_CLOEXEC) == -1) {
    nbdserve_error("stats: pipe: %m");
    return -1;
  }
  /* The handler must never block: a burst of signals fills the pipe. */
  fcntl(sig_pipe[1], F_SETFL, O_NONBLOCK);
  int err = pthread_create(&printer, NULL, printer_thread, NULL);
  if (err) {
    nbdserve_error("stats: pthread_create: %s", strerror(err));
    return -1;
  }
  printer_running = true;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr1;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGUSR1, &sa, NULL) == -1) {
    nbdserve_error("stats: sigaction: %m");
    return -1;
  }
  ready = true;
  return 0;
}

static void stats_unload(void)
{
  if (ready) {
    /* Ignore (not default: that would kill us) a late SIGUSR1 before
     * the pipe goes away under the handler. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
  }
  if (printer_running) {
    char c = 'q';
    while (write(sig_pipe[1], &c, 1) == -1 && errno == EINTR)
      ;
    pthread_join(printer, NULL);
    printer_running = false;
  }
  if (ready)
    print_stats("exit");
  ready = false;
  for (int i = 0; i < 2; i++)
    if (sig_pipe[i] != -1) {
      close(sig_pipe[i]);
      sig_pipe[i] = -1;
    }
  if (out_fd != -1 && out_fd != STDERR_FILENO)
    close(out_fd);
  out_fd = -1;
  while (closed_list.next != &closed_list) {
    struct handle *h = closed_list.next;
    list_remove(h);
    free(h);
  }
  nr_closed_kept = 0;
  free(statsfile);
  statsfile = NULL;
}

#define COUNTED(kind, count, call)                                       \
  do {                                                                 \
    uint64_t start_ = now_ns();                                        \
    int r_ = (call);                                                   \
    return account(handle, kind, count, start_, r_);                   \
  } while (0)

static int stats_pread(struct nbdserve_next *next, void *handle, void *buf, uint32_t count,
                       uint64_t offset, uint32_t flags)
{
  COUNTED(READ, count, nbdserve_next_pread(next, buf, count, offset, flags));
}

static int stats_pwrite(struct nbdserve_next *next, void *handle, const void *buf,
                        uint32_t count, uint64_t offset, uint32_t flags)
{
  COUNTED(WRITE, count, nbdserve_next_pwrite(next, buf, count, offset, flags));
}

static int stats_zero(struct nbdserve_next *next, void *handle, uint64_t count,
                      uint64_t offset, uint32_t flags)
{
  COUNTED(ZERO, count, nbdserve_next_zero(next, count, offset, flags));
}

static int stats_trim(struct nbdserve_next *next, void *handle, uint64_t count,
                      uint64_t offset, uint32_t flags)
{
  COUNTED(TRIM, count, nbdserve_next_trim(next, count, offset, flags));
}

static int stats_flush(struct nbdserve_next *next, void *handle, uint32_t flags)
{
  COUNTED(FLUSH, 0, nbdserve_next_flush(next, flags));
}

static int stats_cache(struct nbdserve_next *next, void *handle, uint64_t count,
                       uint64_t offset, uint32_t flags)
{
  COUNTED(CACHE, count, nbdserve_next_cache(next, count, offset, flags));
}

static int stats_extents(struct nbdserve_next *next, void *handle, uint64_t count,
                         uint64_t offset, uint32_t flags, struct nbdserve_extents *extents)
{
  COUNTED(EXTENTS, count, nbdserve_next_extents(next, count, offset, flags, extents));
}

static int stats_meta_extents(struct nbdserve_next *next, void *handle, const char *context,
                              uint64_t count, uint64_t offset, uint32_t flags,
                              struct nbdserve_extents *extents)
{
  COUNTED(EXTENTS, count,
    nbdserve_next_meta_extents(next, context, count, offset, flags, extents));
}

#define STATS_CONFIG_HELP                                                           \
  "statsfile=PATH         write the statistics to PATH (default: stderr)\n"        \
  "stats-append=BOOL      append to PATH instead of truncating it at start-up\n"   \
  "                       (default: false)\n"                                      \
  "stats-keep=N           keep per-connection lines of the last N closed\n"        \
  "                       connections (default: 16)\n"                             \
  "The statistics are printed at exit and on SIGUSR1, and answer the control\n"   \
  "command stats.show."

static struct nbdserve_filter filter = {
  NBDSERVE_FILTER_INIT,
  .name = "stats",
  .longname = "count requests, bytes, errors and latencies",
  .version = "1.0",
  .description = "Count requests, bytes and errors per kind of request, with histograms\n"
                 "of request sizes and latencies, per connection and for the server.",
  .config_help = STATS_CONFIG_HELP,
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .flags = NBDSERVE_FILTER_NEVER_BLOCKS,
  .load = stats_load,
  .unload = stats_unload,
  .config = stats_config,
  .config_complete = stats_config_complete,
  .get_ready = stats_get_ready,
  .open = stats_open,
  .close = stats_close,
  .pread = stats_pread,
  .pwrite = stats_pwrite,
  .zero = stats_zero,
  .trim = stats_trim,
  .flush = stats_flush,
  .cache = stats_cache,
  .extents = stats_extents,
  .meta_extents = stats_meta_extents,
};

NBDSERVE_REGISTER_FILTER(filter)
