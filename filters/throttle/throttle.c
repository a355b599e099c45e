/* nbdserve throttle filter: bandwidth and IOPS limits.
 *
 * Each limit is a token bucket kept in virtual time: a bucket remembers
 * TAT, the moment by which everything charged to it so far is paid for
 * at its rate.  A request adds its cost to TAT and waits until then
 * (less the bucket's depth, the burst).  So requests sharing a bucket
 * are paid for in the order they arrived, whatever connection they come
 * from, and no lock is held and no thread sleeps while they wait: the
 * wait is nbdserve_retry_after, and the filter never blocks.
 *
 * A large request is charged in pieces (about 10 ms of the slowest
 * bucket it meets, at least 64 KiB): it reserves one piece, waits for
 * it, comes back and reserves the next, so small requests arriving
 * meanwhile get their turns between its pieces instead of queueing
 * behind the whole of it.  How far a waiting request has paid is kept
 * per connection (see "Admission" below).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <math.h> /* isinf */
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nbdserve-filter.h"

/* The limits a user sets; 0 is no limit.  Bytes or requests per second. */
enum limit { L_RATE, L_READ, L_WRITE, L_IOPS, L_CONN_RATE, L_CONN_IOPS, NR_LIMITS };
static const char *const limit_names[NR_LIMITS] = {
  "rate", "read-rate", "write-rate", "iops", "connection-rate", "connection-iops",
};
static bool limit_is_iops(enum limit l)
{
  return l == L_IOPS || l == L_CONN_IOPS;
}

/* The bucket's depth: seconds of its rate, or bytes (then the IOPS
 * buckets keep the default depth in seconds). */
struct burst {
  bool in_bytes;
  double seconds, bytes;
};
#define DEFAULT_BURST_SECONDS 0.1
/* A piece of a large request: this long at the rate, and at least this big. */
#define PIECE_SECONDS 0.01
#define PIECE_MIN (64 * 1024)

struct bucket {
  double rate; /* units per second; 0: no limit */
  bool iops;
  int64_t tat; /* ns, CLOCK_MONOTONIC */
};

/* One lock for every bucket and the connection list: it is held for a
 * few arithmetic operations per request, never across a call down. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static double limits[NR_LIMITS];
static struct burst burst = { .seconds = DEFAULT_BURST_SECONDS };
static struct bucket global[L_IOPS + 1] = { [L_IOPS] = { .iops = true } }; /* L_RATE .. L_IOPS */
static uint64_t stat_waits, stat_bytes, stat_requests, stat_wait_ns;

/* A large request part-way through its pieces. */
struct record {
  struct record *next;
  int kind;
  uint64_t base; /* buf - offset: the same for every call of the request */
  uint64_t call_offset; /* the call that waited: its I/O is paid */
  uint64_t paid_end; /* ... and its bytes before this offset, as are all calls before it */
};

struct handle {
  struct handle *prev, *next;
  struct bucket rate, iops;
  struct record *records;
};
static struct handle *connections;
static unsigned nr_connections;

static char *rate_file;
static pthread_t file_thread;
static bool file_thread_running, file_thread_stop;
static pthread_cond_t file_cond = PTHREAD_COND_INITIALIZER;

static int64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- Buckets (lock held) --------------------------------------------- */

static int64_t burst_ns(const struct bucket *b)
{
  if (burst.in_bytes && !b->iops)
    return (int64_t) (burst.bytes / b->rate * 1e9);
  return (int64_t) ((burst.in_bytes ? DEFAULT_BURST_SECONDS : burst.seconds) * 1e9);
}

/* Charge COST units; returns how long until the bucket has paid for it. */
static int64_t charge(struct bucket *b, double cost, int64_t now)
{
  if (b->rate <= 0)
    return 0;
  /* An idle bucket fills up to its depth and no further. */
  int64_t floor = now - burst_ns(b);
  if (b->tat < floor)
    b->tat = floor;
  b->tat += (int64_t) (cost / b->rate * 1e9);
  return b->tat > now ? b->tat - now : 0;
}

/* A new rate.  What is owed (or the credit an idle bucket has) keeps its
 * size in units, so the new rate applies from now on, also to requests
 * that queue behind those already waiting. */
static void set_rate(struct bucket *b, double rate, int64_t now)
{
  if (rate > 0 && b->rate > 0)
    b->tat = now + (int64_t) ((double) (b->tat - now) * b->rate / rate);
  b->rate = rate;
  if (rate > 0 && b->tat == 0) /* newly limited: starts full */
    b->tat = now - burst_ns(b);
  else if (rate > 0 && b->tat < now - burst_ns(b))
    b->tat = now - burst_ns(b);
  if (rate <= 0)
    b->tat = 0;
}

static void apply_limits(const double *want)
{
  int64_t now = now_ns();
  for (int l = 0; l < NR_LIMITS; l++)
    limits[l] = want[l];
  for (int l = L_RATE; l <= L_IOPS; l++)
    set_rate(&global[l], limits[l], now);
  for (struct handle *h = connections; h; h = h->next) {
    set_rate(&h->rate, limits[L_CONN_RATE], now);
    set_rate(&h->iops, limits[L_CONN_IOPS], now);
  }
}

/* ---- Parsing ------------------------------------------------------------- */

/* "20M", "1.5G", "500", "0" or "off" (no limit): K, M, G, T are powers of
 * 1024.  Our own parser, so that a bad value from the control socket is
 * answered, not logged.  Returns 0, or -1 with a message in ERR. */
static int parse_number(const char *str, bool suffixes, double *out, char *err, size_t errlen)
{
  if (strcmp(str, "off") == 0 || strcmp(str, "none") == 0) {
    *out = 0;
    return 0;
  }
  char *end;
  errno = 0;
  double v = strtod(str, &end);
  if (errno || end == str || !(v >= 0) || isinf(v))
    goto bad;
  if (suffixes && *end) {
    const char *units = "KMGTP";
    const char *u = strchr(units, *end);
    if (u == NULL)
      goto bad;
    for (const char *x = units; x <= u; x++)
      v *= 1024;
    end++;
  }
  if (*end || v > 1e18)
    goto bad;
  *out = v;
  return 0;
bad:
  snprintf(err, errlen, "%s: expected %s", str,
           suffixes ? "a rate in bytes per second such as 20M, or 0 (no limit)"
                    : "a number of requests per second, or 0 (no limit)");
  return -1;
}

static int parse_burst(const char *str, struct burst *b, char *err, size_t errlen)
{
  size_t len = strlen(str);
  if (len > 1 && (str[len - 1] == 's')) {
    double scale = 1;
    char num[64];
    size_t n = len - 1;
    if (len > 2 && str[len - 2] == 'm')
      scale = 1e-3, n--;
    if (n >= sizeof num)
      goto bad;
    memcpy(num, str, n);
    num[n] = '\0';
    char *end;
    errno = 0;
    double v = strtod(num, &end);
    if (errno || end == num || *end || !(v > 0) || v > 3600)
      goto bad;
    *b = (struct burst){ .seconds = v * scale };
    return 0;
  }
  double bytes;
  if (parse_number(str, true, &bytes, err, errlen) == -1 || bytes < 1)
    goto bad;
  *b = (struct burst){ .in_bytes = true, .bytes = bytes, .seconds = DEFAULT_BURST_SECONDS };
  return 0;
bad:
  snprintf(err, errlen, "burst=%s: expected a size in bytes (256K) or a time (0.5s, 100ms)", str);
  return -1;
}

/* One KEY=VALUE into WANT (limits) or *B (burst): 1 if it is ours, 0 if
 * not, -1 on a bad value. */
static int parse_setting(const char *key, const char *value, double *want, struct burst *b,
                         char *err, size_t errlen)
{
  if (strcmp(key, "burst") == 0)
    return parse_burst(value, b, err, errlen) == 0 ? 1 : -1;
  for (int l = 0; l < NR_LIMITS; l++)
    if (strcmp(key, limit_names[l]) == 0) {
      char sub[160];
      if (parse_number(value, !limit_is_iops(l), &want[l], sub, sizeof sub) == 0)
        return 1;
      snprintf(err, errlen, "%s=%s", key, sub);
      return -1;
    }
  return 0;
}

/* ---- Life cycle ------------------------------------------------------------ */

static int throttle_config(const char *key, const char *value)
{
  char err[256];
  if (strcmp(key, "rate-file") == 0) {
    free(rate_file);
    rate_file = NULL;
    /* The server may become a daemon and change to /: keep the file's
     * whole path. */
    if (value[0] == '/')
      rate_file = strdup(value);
    else {
      char *cwd = getcwd(NULL, 0);
      if (cwd && asprintf(&rate_file, "%s/%s", cwd, value) == -1)
        rate_file = NULL;
      free(cwd);
    }
    if (rate_file == NULL) {
      nbdserve_error("rate-file: %m");
      return -1;
    }
    return 1;
  }
  int r = parse_setting(key, value, limits, &burst, err, sizeof err);
  if (r == -1)
    nbdserve_error("%s", err);
  return r;
}

/* The rate file: "KEY=VALUE" lines (the keys of throttle.set), or just a
 * number, the rate.  Blank lines and lines starting with # are skipped.
 * Applied only as a whole and only when valid. */
static int parse_file(char *text, double *want, struct burst *b, char *err, size_t errlen)
{
  char *save = NULL;
  for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    while (*line == ' ' || *line == '\t')
      line++;
    size_t n = strlen(line);
    while (n && (line[n - 1] == ' ' || line[n - 1] == '\t' || line[n - 1] == '\r'))
      line[--n] = '\0';
    if (n == 0 || line[0] == '#')
      continue;
    char *eq = strchr(line, '=');
    if (eq == NULL) {
      if (parse_number(line, true, &want[L_RATE], err, errlen) == -1)
        return -1;
      continue;
    }
    *eq = '\0';
    int r = parse_setting(line, eq + 1, want, b, err, errlen);
    if (r == 0)
      snprintf(err, errlen, "unknown key %s", line);
    if (r != 1)
      return -1;
  }
  return 0;
}

static char *last_file_text;

/* Read the rate file and apply it if it changed since the last time. */
static void read_rate_file(void)
{
  FILE *fp = fopen(rate_file, "r");
  if (fp == NULL)
    return; /* missing (being replaced, or not made yet): keep the rates */
  char text[4096];
  size_t n = fread(text, 1, sizeof text - 1, fp);
  fclose(fp);
  text[n] = '\0';
  if (last_file_text && strcmp(last_file_text, text) == 0)
    return;
  free(last_file_text);
  last_file_text = strdup(text);

  char err[256];
  double want[NR_LIMITS];
  pthread_mutex_lock(&lock);
  memcpy(want, limits, sizeof want);
  struct burst b = burst;
  pthread_mutex_unlock(&lock);
  if (parse_file(text, want, &b, err, sizeof err) == -1) {
    nbdserve_error("throttle: %s: %s (rates unchanged)", rate_file, err);
    return;
  }
  pthread_mutex_lock(&lock);
  burst = b;
  apply_limits(want);
  pthread_mutex_unlock(&lock);
  nbdserve_debug("throttle: applied %s", rate_file);
}

static void *file_watcher(void *unused)
{
  (void) unused;
  pthread_mutex_lock(&lock);
  while (!file_thread_stop) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 1;
    pthread_cond_timedwait(&file_cond, &lock, &ts);
    if (file_thread_stop)
      break;
    /* Not under the lock: reading a file may take its time. */
    pthread_mutex_unlock(&lock);
    read_rate_file();
    pthread_mutex_lock(&lock);
  }
  pthread_mutex_unlock(&lock);
  return NULL;
}

static void show_limits(struct nbdserve_reply *reply)
{
  pthread_mutex_lock(&lock);
  for (int l = 0; l < NR_LIMITS; l++)
    nbdserve_reply_add(reply, limit_names[l], "%.0f", limits[l]);
  if (burst.in_bytes)
    nbdserve_reply_add(reply, "burst", "%.0f", burst.bytes);
  else
    nbdserve_reply_add(reply, "burst", "%gs", burst.seconds);
  nbdserve_reply_add(reply, "connections", "%u", nr_connections);
  nbdserve_reply_add(reply, "requests", "%llu", (unsigned long long) stat_requests);
  nbdserve_reply_add(reply, "bytes", "%llu", (unsigned long long) stat_bytes);
  nbdserve_reply_add(reply, "waits", "%llu", (unsigned long long) stat_waits);
  nbdserve_reply_add(reply, "wait_seconds", "%.3f", (double) stat_wait_ns / 1e9);
  if (rate_file)
    nbdserve_reply_add(reply, "rate-file", "%s", rate_file);
  pthread_mutex_unlock(&lock);
}

static int cmd_show(int argc, const char *const *keys, const char *const *values,
                    struct nbdserve_reply *reply)
{
  (void) keys, (void) values;
  if (argc) {
    nbdserve_reply_error(reply, "throttle.show takes no arguments");
    return -1;
  }
  show_limits(reply);
  return 0;
}

/* All the arguments are checked before any applies. */
static int cmd_set(int argc, const char *const *keys, const char *const *values,
                   struct nbdserve_reply *reply)
{
  char err[256];
  double want[NR_LIMITS];
  pthread_mutex_lock(&lock);
  memcpy(want, limits, sizeof want);
  struct burst b = burst;
  pthread_mutex_unlock(&lock);
  if (argc == 0) {
    nbdserve_reply_error(reply, "throttle.set: give KEY=VALUE, KEY one of rate, read-rate, "
                         "write-rate, iops, connection-rate, connection-iops, burst");
    return -1;
  }
  for (int i = 0; i < argc; i++) {
    int r = parse_setting(keys[i], values[i], want, &b, err, sizeof err);
    if (r == 0)
      snprintf(err, sizeof err, "unknown key %s", keys[i]);
    if (r != 1) {
      nbdserve_reply_error(reply, "%s", err);
      return -1;
    }
  }
  pthread_mutex_lock(&lock);
  burst = b;
  apply_limits(want);
  pthread_mutex_unlock(&lock);
  show_limits(reply);
  return 0;
}

static int throttle_get_ready(void)
{
  if (nbdserve_register_command("set", "change limits: rate=20M iops=500 connection-rate=... "
                                "(0 = no limit)", cmd_set) == -1 ||
      nbdserve_register_command("show", "the limits in force, and what was throttled",
                                cmd_show) == -1) {
    nbdserve_error("throttle: registering control commands: %m");
    return -1;
  }
  pthread_mutex_lock(&lock);
  double want[NR_LIMITS];
  memcpy(want, limits, sizeof want);
  apply_limits(want);
  pthread_mutex_unlock(&lock);
  if (rate_file) {
    read_rate_file(); /* before the first client */
    int e = pthread_create(&file_thread, NULL, file_watcher, NULL);
    if (e) {
      errno = e;
      nbdserve_error("throttle: starting the rate-file thread: %m");
      return -1;
    }
    file_thread_running = true;
  }
  return 0;
}

static void throttle_unload(void)
{
  if (file_thread_running) {
    pthread_mutex_lock(&lock);
    file_thread_stop = true;
    pthread_cond_signal(&file_cond);
    pthread_mutex_unlock(&lock);
    pthread_join(file_thread, NULL);
  }
  free(rate_file);
  free(last_file_text);
}

static void *throttle_open(struct nbdserve_next *next, int readonly, const char *export_name)
{
  (void) next, (void) readonly, (void) export_name;
  struct handle *h = calloc(1, sizeof *h);
  if (h == NULL) {
    nbdserve_set_error(ENOMEM);
    return NULL;
  }
  h->iops.iops = true;
  int64_t now = now_ns();
  pthread_mutex_lock(&lock);
  set_rate(&h->rate, limits[L_CONN_RATE], now);
  set_rate(&h->iops, limits[L_CONN_IOPS], now);
  h->next = connections;
  if (connections)
    connections->prev = h;
  connections = h;
  nr_connections++;
  pthread_mutex_unlock(&lock);
  return h;
}

static void throttle_close(void *handle)
{
  struct handle *h = handle;
  pthread_mutex_lock(&lock);
  if (h->prev)
    h->prev->next = h->next;
  else
    connections = h->next;
  if (h->next)
    h->next->prev = h->prev;
  nr_connections--;
  pthread_mutex_unlock(&lock);
  /* Records left by requests that never came back (a layer above gave up
   * on them). */
  while (h->records) {
    struct record *r = h->records;
    h->records = r->next;
    free(r);
  }
  free(h);
}

/* ---- Admission --------------------------------------------------------------- */

/* What a request has paid is remembered by request, not by call: the
 * server may split one request into several calls (larger than the
 * block size below, or a read around holes), and after a wait it runs
 * every call of the request again, in the same order.  The calls of one
 * request share BUF - OFFSET (each reads or writes its part of the
 * request's buffer), which no other request in flight has; a record
 * holds which call waited and how far it has paid: calls before it go
 * on again without paying, it pays what it still owes, and calls after
 * it are charged as new.  A record exists only while the request waits
 * (here or below) and is gone once the rerun has passed that call.
 * nbdserve_has_waited alone would not do: it is one flag for the
 * request, set whichever of its calls waited. */

enum kind { K_READ, K_WRITE, K_CACHE, K_ZERO, K_TRIM, K_FLUSH };

struct run {
  enum kind kind;
  uint64_t base, offset, end;
};

/* The byte buckets a kind of request pays, in BS (NULL for none). */
static void byte_buckets(struct handle *h, enum kind k, struct bucket **bs)
{
  bs[0] = bs[1] = bs[2] = NULL;
  if (k == K_READ || k == K_CACHE || k == K_WRITE) {
    bs[0] = &global[L_RATE];
    bs[1] = k == K_WRITE ? &global[L_WRITE] : &global[L_READ];
    bs[2] = &h->rate;
  }
}

static struct record **find_record(struct handle *h, enum kind k, uint64_t base)
{
  for (struct record **p = &h->records; *p; p = &(*p)->next)
    if ((*p)->kind == (int) k && (*p)->base == base)
      return p;
  return NULL;
}

static void drop_record(struct record **pr)
{
  struct record *r = *pr;
  *pr = r->next;
  free(r);
}

/* Remember that the request has paid up to END; false without memory
 * (the request then pays again when it comes back, which only costs it
 * time). */
static bool keep_record(struct handle *h, struct record **pr, enum kind k, uint64_t base,
                        uint64_t offset, uint64_t end)
{
  if (pr == NULL) {
    struct record *r = malloc(sizeof *r);
    if (r == NULL)
      return false;
    *r = (struct record){ .next = h->records, .kind = (int) k, .base = base,
                          .call_offset = offset, .paid_end = offset };
    h->records = r;
    pr = &h->records;
  }
  if ((*pr)->call_offset != offset)
    (*pr)->call_offset = offset, (*pr)->paid_end = offset;
  if ((*pr)->paid_end < end)
    (*pr)->paid_end = end;
  return true;
}

/* 0: go on down.  -1: return -1 (a wait, errno EINPROGRESS). */
static int admit(struct nbdserve_next *next, struct handle *h, enum kind k, const void *buf,
                 uint64_t offset, uint64_t count, struct run *run)
{
  bool has_bytes = k == K_READ || k == K_WRITE || k == K_CACHE;
  uint64_t base = (uint64_t) (uintptr_t) buf - offset, end = offset + count;
  *run = (struct run){ .kind = k, .base = base, .offset = offset, .end = end };
  /* The run after a wait cut short (here or below) must not wait
   * again: it goes on, whatever it still owes. */
  bool cut_short = nbdserve_wait_cut_short();

  pthread_mutex_lock(&lock);
  struct record **pr = find_record(h, k, base);
  uint64_t pos = offset;
  bool io_paid = false;
  if (pr && offset < (*pr)->call_offset) {
    /* A call before the one that waited: paid in an earlier run. */
    pthread_mutex_unlock(&lock);
    return 0;
  }
  if (pr && offset == (*pr)->call_offset) {
    /* The call that waited: its I/O is paid, and its bytes up to
     * paid_end. */
    io_paid = true;
    if ((*pr)->paid_end > pos)
      pos = (*pr)->paid_end;
    if (pos >= end || !has_bytes || cut_short) {
      drop_record(pr);
      pthread_mutex_unlock(&lock);
      return 0;
    }
  }
  else if (pr) {
    /* Beyond the call that waited: new to this filter.  The record was
     * left by a run that stopped early. */
    drop_record(pr);
    pr = NULL;
  }
  if (cut_short) {
    pthread_mutex_unlock(&lock);
    return 0;
  }

  struct bucket *bs[3];
  byte_buckets(h, k, bs);
  int64_t now = now_ns();
  int64_t wait = 0, w;
  if (!io_paid) {
    /* One I/O per call, paid with its first piece. */
    stat_requests++;
    w = charge(&global[L_IOPS], 1, now);
    wait = w > wait ? w : wait;
    w = charge(&h->iops, 1, now);
    wait = w > wait ? w : wait;
  }
  if (!has_bytes)
    pos = end;
  double slowest = 0;
  for (int i = 0; i < 3; i++)
    if (bs[i] && bs[i]->rate > 0 && (slowest == 0 || bs[i]->rate < slowest))
      slowest = bs[i]->rate;
  uint64_t piece = slowest > 0 ? (uint64_t) (slowest * PIECE_SECONDS) : end - pos;
  if (piece < PIECE_MIN)
    piece = PIECE_MIN;
  /* Pieces while the buckets have them to spare, then wait for one. */
  while (pos < end && wait == 0) {
    uint64_t p = end - pos < piece ? end - pos : piece;
    for (int i = 0; i < 3; i++) {
      w = charge(bs[i], (double) p, now);
      wait = w > wait ? w : wait;
    }
    pos += p;
    stat_bytes += p;
  }

  if (wait > 0) {
    if (!keep_record(h, pr, k, base, offset, pos) && pos < end) {
      /* Nothing to remember the pieces by: pay the rest now, at once. */
      for (int i = 0; i < 3; i++) {
        w = charge(bs[i], (double) (end - pos), now);
        wait = w > wait ? w : wait;
      }
      stat_bytes += end - pos;
    }
    stat_waits++;
    stat_wait_ns += (uint64_t) wait;
    pthread_mutex_unlock(&lock);
    return nbdserve_retry_after(next, (uint64_t) wait);
  }
  if (pr)
    drop_record(pr);
  pthread_mutex_unlock(&lock);
  return 0;
}

/* After the call down.  A layer below waits (EINPROGRESS): the request
 * comes back, and must find this call, and those before it, paid.  An
 * error: the request is over. */
static int done(struct handle *h, const struct run *run, int r)
{
  if (r == -1) {
    int err = errno;
    pthread_mutex_lock(&lock);
    struct record **pr = find_record(h, run->kind, run->base);
    if (err == EINPROGRESS)
      keep_record(h, pr, run->kind, run->base, run->offset, run->end);
    else if (pr)
      drop_record(pr);
    pthread_mutex_unlock(&lock);
    errno = err;
  }
  return r;
}

static int throttle_pread(struct nbdserve_next *next, void *handle, void *buf, uint32_t count,
                          uint64_t offset, uint32_t flags)
{
  struct run run;
  if (admit(next, handle, K_READ, buf, offset, count, &run) == -1)
    return -1;
  return done(handle, &run, nbdserve_next_pread(next, buf, count, offset, flags));
}

static int throttle_pwrite(struct nbdserve_next *next, void *handle, const void *buf,
                           uint32_t count, uint64_t offset, uint32_t flags)
{
  struct run run;
  if (admit(next, handle, K_WRITE, buf, offset, count, &run) == -1)
    return -1;
  return done(handle, &run, nbdserve_next_pwrite(next, buf, count, offset, flags));
}

static int throttle_cache(struct nbdserve_next *next, void *handle, uint64_t count,
                          uint64_t offset, uint32_t flags)
{
  struct run run;
  if (admit(next, handle, K_CACHE, NULL, offset, count, &run) == -1)
    return -1;
  return done(handle, &run, nbdserve_next_cache(next, count, offset, flags));
}

static int throttle_zero(struct nbdserve_next *next, void *handle, uint64_t count,
                         uint64_t offset, uint32_t flags)
{
  struct run run;
  if (admit(next, handle, K_ZERO, NULL, offset, count, &run) == -1)
    return -1;
  return done(handle, &run, nbdserve_next_zero(next, count, offset, flags));
}

static int throttle_trim(struct nbdserve_next *next, void *handle, uint64_t count,
                         uint64_t offset, uint32_t flags)
{
  struct run run;
  if (admit(next, handle, K_TRIM, NULL, offset, count, &run) == -1)
    return -1;
  return done(handle, &run, nbdserve_next_trim(next, count, offset, flags));
}

static int throttle_flush(struct nbdserve_next *next, void *handle, uint32_t flags)
{
  struct run run;
  if (admit(next, handle, K_FLUSH, NULL, 0, 0, &run) == -1)
    return -1;
  return done(handle, &run, nbdserve_next_flush(next, flags));
}

#define THROTTLE_CONFIG_HELP                                                            \
  "rate=RATE              bytes per second for the whole server (reads and writes)\n"  \
  "read-rate=RATE, write-rate=RATE\n"                                                  \
  "                       bytes per second for the whole server, one direction\n"      \
  "connection-rate=RATE   bytes per second for each connection\n"                      \
  "iops=N                 requests per second for the whole server\n"                  \
  "connection-iops=N      requests per second for each connection\n"                   \
  "burst=SIZE|TIME        bucket depth: bytes (256K) or seconds of the rate (0.5s,\n"   \
  "                       100ms); default 0.1s\n"                                      \
  "rate-file=PATH         re-read once a second: KEY=VALUE lines as above, or a\n"     \
  "                       number (the rate)\n"                                         \
  "RATE is bytes with an optional K, M, G, T suffix (powers of 1024), e.g. 20M;\n"     \
  "0 or off is no limit.  Reads, writes and cache cost their bytes (cache as a\n"      \
  "read); every request but block status costs one I/O.  Live changes:\n"              \
  "nbdserve-ctl CTL throttle.set rate=10M ..., throttle.show"

static struct nbdserve_filter filter = {
  NBDSERVE_FILTER_INIT,
  .name = "throttle",
  .longname = "bandwidth and IOPS limits",
  .version = "1.0",
  .description = "Limit bandwidth and requests per second, server-wide and per connection",
  .config_help = THROTTLE_CONFIG_HELP,
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .flags = NBDSERVE_FILTER_NEVER_BLOCKS,
  .config = throttle_config,
  .get_ready = throttle_get_ready,
  .unload = throttle_unload,
  .open = throttle_open,
  .close = throttle_close,
  .pread = throttle_pread,
  .pwrite = throttle_pwrite,
  .cache = throttle_cache,
  .zero = throttle_zero,
  .trim = throttle_trim,
  .flush = throttle_flush,
};

NBDSERVE_REGISTER_FILTER(filter)
