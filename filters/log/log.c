/* nbdserve log filter: one line per request, connection and disconnection.
 *
 * The filter must not slow down or block the chain it watches: a chain
 * over the memory plugin runs on its connection's loop thread, and a
 * write(2) to a log file on a slow disk (or a pipe nobody reads) would
 * stall every connection of that loop.  So requests never write: they
 * format their line on the stack and copy it into a bounded in-memory
 * ring under a mutex held only for the copy.  A writer thread started in
 * get_ready drains the ring to the file.  When the ring is full the line
 * is dropped and counted; the count goes into the log as "dropped N
 * lines" as soon as there is room again, and at exit, so a reader always
 * knows how many lines are missing.  unload stops the writer only once
 * the ring is empty: every line queued is in the file when the server
 * exits.
 *
 * The line format is documented in log.md; users grep it, so it changes
 * only with that file and tests/log.t.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nbdserve-filter.h"

#define DEFAULT_QUEUE (4u << 20)
#define MIN_QUEUE (64u << 10)
#define MAX_QUEUE (1u << 30)
/* Longest export name, as escaped in lines: longer ones are cut (and
 * end with "...") so that every line fits in LINE_MAX_LEN. */
#define EXPORT_MAX_LEN 1024
#define LINE_MAX_LEN 2048

/* ---- Parameters ---- */
static char *logfile; /* NULL: stderr */
static bool logappend = true;
static uint64_t queue_size = DEFAULT_QUEUE;
static int log_fd = -1;
static bool own_fd; /* we opened log_fd, and close it at unload */

/* ---- The queue: a byte ring of whole lines ----
 * Producers append at head; the writer alone consumes from tail.  The
 * bytes in [tail, head) belong to the writer, which writes them to the
 * file without the lock: producers only ever touch the free space. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static char *ring;
static uint64_t head, tail; /* running byte counts; position = count % queue_size */
static uint64_t dropped; /* lines dropped since the last "dropped" line */
static bool writer_idle; /* waiting on WAKE: a producer must signal */
static bool stopping;
static bool writer_started;
static pthread_t writer;

static int log_load(void)
{
  logfile = NULL;
  logappend = true;
  queue_size = DEFAULT_QUEUE;
  log_fd = -1;
  own_fd = false;
  return 0;
}

static int log_config(const char *key, const char *value)
{
  if (strcmp(key, "logfile") == 0) {
    free(logfile);
    logfile = strdup(value);
    if (logfile == NULL) {
      nbdserve_error("log: out of memory");
      return -1;
    }
    return 1;
  }
  if (strcmp(key, "logappend") == 0) {
    int b = nbdserve_parse_bool(value);
    if (b == -1)
      return -1;
    logappend = b;
    return 1;
  }
  if (strcmp(key, "logqueue") == 0) {
    int64_t size = nbdserve_parse_size(value);
    if (size == -1)
      return -1;
    if ((uint64_t) size < MIN_QUEUE || (uint64_t) size > MAX_QUEUE) {
      nbdserve_error("log: logqueue=%s: must be between 64K and 1G", value);
      return -1;
    }
    queue_size = (uint64_t) size;
    return 1;
  }
  return 0;
}

/* The file is opened here rather than in get_ready: a bad path then
 * stops the server before it listens, and a relative path means the
 * directory the server was started in (a daemon changes to / before
 * get_ready). */
static int log_config_complete(void)
{
  if (logfile == NULL) {
    log_fd = STDERR_FILENO;
    own_fd = false;
  }
  else {
    int oflags = O_WRONLY | O_CREAT | O_CLOEXEC | (logappend ? O_APPEND : O_TRUNC);
    log_fd = open(logfile, oflags, 0644);
    if (log_fd == -1) {
      nbdserve_error("log: logfile=%s: %s", logfile, strerror(errno));
      return -1;
    }
    own_fd = true;
  }
  ring = malloc(queue_size);
  if (ring == NULL) {
    nbdserve_error("log: cannot allocate a %llu-byte queue", (unsigned long long) queue_size);
    return -1;
  }
  return 0;
}

/* Write all of BUF; on an error (disk full...) say so once and carry on
 * discarding, since the requests must go on whatever happens to the log. */
static void write_all(const char *buf, size_t len)
{
  static bool failed;
  while (len > 0) {
    ssize_t n = write(log_fd, buf, len);
    if (n == -1 && errno == EINTR)
      continue;
    if (n <= 0) {
      if (!failed)
        nbdserve_error("log: writing the log: %s (lines are lost)",
                       n == -1 ? strerror(errno) : "short write");
      failed = true;
      return;
    }
    buf += n, len -= (size_t) n;
  }
}

/* "2024-05-01T12:34:56.123456Z": UTC, so that lines from servers in
 * different time zones sort and compare as they are. */
static size_t format_time(char *buf, size_t size)
{
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  int n = snprintf(buf, size, "%04d-%02d-%02dT%02d:%02d:%02d.%06ldZ", tm.tm_year + 1900,
                   tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                   ts.tv_nsec / 1000);
  return n < 0 ? 0 : (size_t) n;
}

/* Copy LEN bytes into the ring at byte count POS.  Lock held. */
static void ring_put(uint64_t pos, const char *buf, size_t len)
{
  size_t at = (size_t) (pos % queue_size);
  size_t first = len < queue_size - at ? len : (size_t) (queue_size - at);
  memcpy(ring + at, buf, first);
  memcpy(ring, buf + first, len - first);
}

/* Queue one whole line (ending in '\n').  Never waits for the file. */
static void enqueue(const char *line, size_t len)
{
  char note[96];
  size_t note_len = 0;

  pthread_mutex_lock(&lock);
  if (dropped > 0) {
    /* The drop report goes first, so that it sits where the gap is. */
    char when[40];
    format_time(when, sizeof when);
    note_len = (size_t) snprintf(note, sizeof note, "%s dropped %llu lines\n", when,
                                 (unsigned long long) dropped);
  }
  uint64_t free_space = queue_size - (head - tail);
  if (note_len + len > free_space)
    dropped++;
  else {
    if (note_len > 0) {
      ring_put(head, note, note_len);
      head += note_len;
      dropped = 0;
    }
    ring_put(head, line, len);
    head += len;
    /* Signal only a writer that sleeps: while it is busy it comes back
     * for more by itself, so a burst costs one wake-up, not one per line. */
    if (writer_idle) {
      writer_idle = false;
      pthread_cond_signal(&wake);
    }
  }
  pthread_mutex_unlock(&lock);
}

static void *writer_main(void *arg)
{
  (void) arg;
  pthread_mutex_lock(&lock);
  for (;;) {
    while (head == tail && !stopping) {
      writer_idle = true;
      pthread_cond_wait(&wake, &lock);
    }
    if (head == tail && stopping)
      break;
    uint64_t from = tail, to = head;
    pthread_mutex_unlock(&lock);

    /* [from, to) is ours: write it without the lock, in at most two
     * pieces when it wraps around the end of the ring. */
    size_t at = (size_t) (from % queue_size);
    size_t len = (size_t) (to - from);
    size_t first = len < queue_size - at ? len : (size_t) (queue_size - at);
    write_all(ring + at, first);
    write_all(ring, len - first);

    pthread_mutex_lock(&lock);
    tail = to;
  }
  /* Lines dropped after the last one that fitted: reported at the end. */
  if (dropped > 0) {
    char note[96], when[40];
    format_time(when, sizeof when);
    int n = snprintf(note, sizeof note, "%s dropped %llu lines\n", when,
                     (unsigned long long) dropped);
    dropped = 0;
    write_all(note, (size_t) n);
  }
  pthread_mutex_unlock(&lock);
  return NULL;
}

static int log_get_ready(void)
{
  /* The writer takes no signals: they are the server's business, and
   * its main thread handles them. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  int err = pthread_create(&writer, NULL, writer_main, NULL);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (err) {
    nbdserve_error("log: cannot start the writer thread: %s", strerror(err));
    return -1;
  }
  writer_started = true;
  return 0;
}

static void log_unload(void)
{
  if (writer_started) {
    pthread_mutex_lock(&lock);
    stopping = true;
    pthread_cond_signal(&wake);
    pthread_mutex_unlock(&lock);
    pthread_join(writer, NULL);
    writer_started = false;
  }
  if (own_fd && log_fd >= 0)
    close(log_fd);
  log_fd = -1;
  free(ring);
  ring = NULL;
  free(logfile);
  logfile = NULL;
}

/* ---- Per connection ---- */
struct log_handle {
  unsigned id;
  const char *peer; /* the server's copy: lives as long as the connection */
  size_t export_len;
  char export[EXPORT_MAX_LEN + 8]; /* escaped, with its quotes */
};

/* The export between double quotes, with '"', '\\', spaces and bytes
 * outside printable ASCII as \xHH, so that a line splits into fields on
 * spaces whatever the client sent. */
static void escape_export(struct log_handle *h, const char *name)
{
  char *p = h->export;
  const char *end = h->export + EXPORT_MAX_LEN;
  *p++ = '"';
  for (; *name; name++) {
    unsigned char c = (unsigned char) *name;
    if (p + 4 > end) {
      memcpy(p, "...", 3);
      p += 3;
      break;
    }
    if (c <= ' ' || c >= 0x7f || c == '"' || c == '\\')
      p += sprintf(p, "\\x%02x", c);
    else
      *p++ = (char) c;
  }
  *p++ = '"';
  *p = '\0';
  h->export_len = (size_t) (p - h->export);
}

/* "TIME conn=ID export="NAME" " into BUF; returns its length. */
static size_t line_start(char *buf, size_t size, const struct log_handle *h)
{
  size_t n = format_time(buf, size);
  n += (size_t) snprintf(buf + n, size - n, " conn=%u export=", h->id);
  memcpy(buf + n, h->export, h->export_len);
  n += h->export_len;
  buf[n++] = ' ';
  return n;
}

static void log_event(const struct log_handle *h, const char *what)
{
  char buf[LINE_MAX_LEN];
  size_t n = line_start(buf, sizeof buf, h);
  n += (size_t) snprintf(buf + n, sizeof buf - n, "%s peer=%s\n", what,
                         h->peer ? h->peer : "unknown");
  enqueue(buf, n);
}

static void *log_open(struct nbdserve_next *next, int readonly, const char *export_name)
{
  (void) next, (void) readonly;
  struct log_handle *h = malloc(sizeof *h);
  if (h == NULL)
    return NULL;
  h->id = nbdserve_connection_id();
  h->peer = nbdserve_peer_name();
  escape_export(h, export_name ? export_name : "");
  log_event(h, "Connect");
  return h;
}

static void log_close(void *handle)
{
  struct log_handle *h = handle;
  log_event(h, "Disconnect");
  free(h);
}

/* ---- Requests ---- */
static const char *errno_name(int err)
{
  switch (err) {
  case EPERM: return "EPERM";
  case EIO: return "EIO";
  case ENOMEM: return "ENOMEM";
  case EINVAL: return "EINVAL";
  case ENOSPC: return "ENOSPC";
  case EOVERFLOW: return "EOVERFLOW";
  case ENOTSUP: return "ENOTSUP";
  case ESHUTDOWN: return "ESHUTDOWN";
  case EROFS: return "EROFS";
  case EFBIG: return "EFBIG";
  case EBADF: return "EBADF";
  case ENOENT: return "ENOENT";
  case EACCES: return "EACCES";
  case EAGAIN: return "EAGAIN";
  case EINTR: return "EINTR";
  case ETIMEDOUT: return "ETIMEDOUT";
  case ECONNRESET: return "ECONNRESET";
  case EPIPE: return "EPIPE";
  case ERANGE: return "ERANGE";
  case ENXIO: return "ENXIO";
  case EDQUOT: return "EDQUOT";
  default: return NULL;
  }
}

static uint64_t now_us(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
}

struct request {
  char time[40]; /* when the request reached the filter */
  uint64_t start;
};

static void request_begin(struct request *r)
{
  format_time(r->time, sizeof r->time);
  r->start = now_us();
}

/* One request line.  R is the result of the call down, with errno; a
 * request that waits in a layer below (EINPROGRESS) runs again later and
 * is logged then, once. */
static void request_end(const struct log_handle *h, const struct request *r, int ret,
                        int err, const char *cmd, uint64_t offset, uint64_t length,
                        uint32_t flags, const char *context)
{
  if (ret == -1 && err == EINPROGRESS)
    return;
  uint64_t latency = now_us() - r->start;

  char buf[LINE_MAX_LEN];
  size_t n = strlen(r->time);
  memcpy(buf, r->time, n);
  n += (size_t) snprintf(buf + n, sizeof buf - n, " conn=%u export=", h->id);
  memcpy(buf + n, h->export, h->export_len);
  n += h->export_len;

  char fl[64] = "";
  static const char *const names[] = { "FUA", "MAY_TRIM", "REQ_ONE", "FAST_ZERO" };
  for (unsigned i = 0; i < 4; i++)
    if (flags & (1u << i)) {
      strcat(fl, fl[0] ? "," : "");
      strcat(fl, names[i]);
    }
  if (flags & ~0xfu)
    snprintf(fl + strlen(fl), sizeof fl - strlen(fl), "%s0x%x", fl[0] ? "," : "",
             flags & ~0xfu);

  char res[24];
  const char *result = "OK";
  if (ret == -1) {
    result = errno_name(err);
    if (result == NULL) {
      snprintf(res, sizeof res, "ERRNO%d", err);
      result = res;
    }
  }

  n += (size_t) snprintf(buf + n, sizeof buf - n,
                         " %s offset=%llu length=%llu flags=%s result=%s latency=%lluus",
                         cmd, (unsigned long long) offset, (unsigned long long) length,
                         fl[0] ? fl : "-", result, (unsigned long long) latency);
  if (context && n < sizeof buf - 1) {
    /* Context names are chosen by the plugin, not the client: printable. */
    n += (size_t) snprintf(buf + n, sizeof buf - n, " context=%.200s", context);
  }
  if (n > sizeof buf - 1)
    n = sizeof buf - 1;
  buf[n++] = '\n';
  enqueue(buf, n);
  errno = err; /* the layer above reads errno after a -1 */
}

#define LOGGED(cmd, offset, length, flags, context, call)                       \
  do {                                                                          \
    struct request r_;                                                          \
    request_begin(&r_);                                                         \
    int ret_ = (call);                                                          \
    request_end(handle, &r_, ret_, ret_ == -1 ? errno : 0, cmd, offset, length, \
                flags, context);                                                \
    return ret_;                                                                \
  } while (0)

static int log_pread(struct nbdserve_next *next, void *handle, void *buf, uint32_t count,
                     uint64_t offset, uint32_t flags)
{
  LOGGED("Read", offset, count, flags, NULL, nbdserve_next_pread(next, buf, count, offset, flags));
}

static int log_pwrite(struct nbdserve_next *next, void *handle, const void *buf,
                      uint32_t count, uint64_t offset, uint32_t flags)
{
  LOGGED("Write", offset, count, flags, NULL,
         nbdserve_next_pwrite(next, buf, count, offset, flags));
}

static int log_flush(struct nbdserve_next *next, void *handle, uint32_t flags)
{
  LOGGED("Flush", 0, 0, flags, NULL, nbdserve_next_flush(next, flags));
}

static int log_trim(struct nbdserve_next *next, void *handle, uint64_t count,
                    uint64_t offset, uint32_t flags)
{
  LOGGED("Trim", offset, count, flags, NULL, nbdserve_next_trim(next, count, offset, flags));
}

static int log_zero(struct nbdserve_next *next, void *handle, uint64_t count,
                    uint64_t offset, uint32_t flags)
{
  LOGGED("Zero", offset, count, flags, NULL, nbdserve_next_zero(next, count, offset, flags));
}

static int log_cache(struct nbdserve_next *next, void *handle, uint64_t count,
                     uint64_t offset, uint32_t flags)
{
  LOGGED("Cache", offset, count, flags, NULL, nbdserve_next_cache(next, count, offset, flags));
}

static int log_extents(struct nbdserve_next *next, void *handle, uint64_t count,
                       uint64_t offset, uint32_t flags, struct nbdserve_extents *extents)
{
  LOGGED("Extents", offset, count, flags, NULL,
         nbdserve_next_extents(next, count, offset, flags, extents));
}

static int log_meta_extents(struct nbdserve_next *next, void *handle, const char *context,
                            uint64_t count, uint64_t offset, uint32_t flags,
                            struct nbdserve_extents *extents)
{
  LOGGED("Extents", offset, count, flags, context,
         nbdserve_next_meta_extents(next, context, count, offset, flags, extents));
}

#define LOG_CONFIG_HELP                                                               \
  "logfile=PATH           write the log to PATH (default: stderr)\n"                 \
  "logappend=true|false   append to an existing PATH, or truncate it (default true)\n" \
  "logqueue=SIZE          lines queued in memory before lines are dropped\n"         \
  "                       (default 4M, 64K to 1G)"

static struct nbdserve_filter filter = {
  NBDSERVE_FILTER_INIT,
  .name = "log",
  .longname = "log every request",
  .version = "1.0",
  .description = "Log every request, connection and disconnection, one line each",
  .config_help = LOG_CONFIG_HELP,
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  /* Requests only copy their line into memory; the file is written by
   * the filter's own thread. */
  .flags = NBDSERVE_FILTER_NEVER_BLOCKS,
  .load = log_load,
  .unload = log_unload,
  .config = log_config,
  .config_complete = log_config_complete,
  .get_ready = log_get_ready,
  .open = log_open,
  .close = log_close,
  .pread = log_pread,
  .pwrite = log_pwrite,
  .flush = log_flush,
  .trim = log_trim,
  .zero = log_zero,
  .cache = log_cache,
  .extents = log_extents,
  .meta_extents = log_meta_extents,
};

NBDSERVE_REGISTER_FILTER(filter)
