/* nbdserve - public definitions shared by plugins and filters.
 *
 * This header, nbdserve-plugin.h and nbdserve-filter.h are the whole
 * contract between the server and the shared objects it loads.  Nothing
 * else in the source tree is visible to a plugin or filter.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_COMMON_H
#define NBDSERVE_COMMON_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the plugin/filter ABI.  Bumped only when an existing field
 * changes meaning; appending fields to the structs does not bump it,
 * because every struct also carries its own size.
 */
#define NBDSERVE_API_VERSION 1

#if defined(__GNUC__)
#define NBDSERVE_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#define NBDSERVE_EXPORT __attribute__((visibility("default")))
#else
#define NBDSERVE_PRINTF(fmt, args)
#define NBDSERVE_EXPORT
#endif

/* Thread models, from most to least restrictive.  The server enforces
 * the model the plugin declares (and the most restrictive model of any
 * filter in the chain), so a callback never needs a lock for what its
 * model already promises.
 */
#define NBDSERVE_THREAD_MODEL_SERIALIZE_CONNECTIONS 0 /* one connection at a time */
#define NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS 1 /* one request at a time, server-wide */
#define NBDSERVE_THREAD_MODEL_SERIALIZE_REQUESTS 2 /* one request at a time per connection */
#define NBDSERVE_THREAD_MODEL_PARALLEL 3 /* anything, concurrently */

/* Flags passed to the data callbacks. */
#define NBDSERVE_FLAG_FUA (1u << 0) /* pwrite, zero, trim: persist before returning */
#define NBDSERVE_FLAG_MAY_TRIM (1u << 1) /* zero: a hole may be punched */
#define NBDSERVE_FLAG_REQ_ONE (1u << 2) /* extents: one extent is enough */
#define NBDSERVE_FLAG_FAST_ZERO (1u << 3) /* zero: fail with ENOTSUP unless fast */

/* Answers of can_fua and can_cache. */
#define NBDSERVE_FUA_NONE 0
#define NBDSERVE_FUA_EMULATE 1 /* the server calls flush after the write */
#define NBDSERVE_FUA_NATIVE 2 /* the plugin honours NBDSERVE_FLAG_FUA */

#define NBDSERVE_CACHE_NONE 0
#define NBDSERVE_CACHE_EMULATE 1 /* the server reads and discards the data */
#define NBDSERVE_CACHE_NATIVE 2 /* the plugin implements cache */

/* Extent flags of the base:allocation context. */
#define NBDSERVE_EXTENT_HOLE (1u << 0) /* not allocated */
#define NBDSERVE_EXTENT_ZERO (1u << 1) /* reads as zeroes */

/* Name of the context every backend answers through its extents callback. */
#define NBDSERVE_CONTEXT_BASE_ALLOCATION "base:allocation"

/* ---- Logging and errors ---------------------------------------------- */

/* Log an error message (to stderr, or syslog when daemonized). */
extern void nbdserve_error(const char *fmt, ...) NBDSERVE_PRINTF(1, 2);
extern void nbdserve_verror(const char *fmt, va_list args);

/* Debug message, shown only with -v / --verbose. */
extern void nbdserve_debug(const char *fmt, ...) NBDSERVE_PRINTF(1, 2);
extern void nbdserve_vdebug(const char *fmt, va_list args);

/* Choose the errno a failing callback reports.  A callback that returns
 * -1 without calling this reports the thread's errno instead.  Values
 * outside the NBD error set become EINVAL (or EIO) on the wire.
 */
extern void nbdserve_set_error(int err);

/* ---- Parsing helpers for config callbacks ----------------------------- */

/* "512", "64K", "1M", "1G", "1T", "1P", "1E" (powers of 1024) and "8s"
 * (512-byte sectors).  Returns the size, or -1 after logging an error.
 */
extern int64_t nbdserve_parse_size(const char *str);

/* 1/0, true/false, yes/no, on/off (any case).  Returns 1 or 0, or -1
 * after logging an error.
 */
extern int nbdserve_parse_bool(const char *str);

/* Whole numbers with range checks; 0 on success, -1 after logging. */
extern int nbdserve_parse_uint32(const char *what, const char *str, uint32_t *ret);
extern int nbdserve_parse_uint64(const char *what, const char *str, uint64_t *ret);

/* Password parameter: "-" prompts on the terminal, "-FD" reads file
 * descriptor FD, "+FILE" reads FILE, anything else is the password
 * itself.  *password is malloc'ed; the caller frees it.
 */
extern int nbdserve_read_password(const char *value, char **password);

/* ---- Connection information (valid inside connection callbacks) ------- */

extern const char *nbdserve_export_name(void); /* export the client chose */
extern int nbdserve_is_tls(void); /* 1 if the connection runs TLS */
/* Peer identity: X.509 distinguished name or PSK identity, NULL if none. */
extern const char *nbdserve_peer_tls_identity(void);

/* Ask the server to shut down gracefully (as on SIGTERM). */
extern void nbdserve_shutdown(void);

/* ---- Waiting without a thread (data callbacks) ------------------------
 *
 * A data callback (pread, pwrite, zero, trim, flush, cache, extents)
 * that must wait - a delay, a rate limit, an answer another thread will
 * bring - does not sleep: it returns what one of these returns, and the
 * server runs the whole request again, through every layer, when the
 * wait is over.  Meanwhile the request holds no thread and no lock.
 *   return nbdserve_retry_after(self, ns);   after ns nanoseconds
 *   return nbdserve_retry_when(self, &w);    when a thread calls nbdserve_wake(w)
 * self is the calling filter's `next` (NULL in a plugin): it names the
 * layer that waits, for nbdserve_has_waited.  Both return -1 with errno
 * EINPROGRESS; a layer above that sees that from nbdserve_next_* must
 * return -1 too, with errno unchanged, and undo nothing.  On the next
 * run nbdserve_has_waited(self) is 1 for the layers that waited, which
 * then go on (or wait again).  A wait ends early when the client leaves
 * or the server stops: nbdserve_wait_cut_short() is 1 in the run that
 * follows, which must then not wait again.  nbdserve_wake must be called
 * exactly once for every nbdserve_retry_when, from any thread, even
 * after the wait was cut short (it is then a no-op).
 */
struct nbdserve_next;
struct nbdserve_waiter;
extern int nbdserve_retry_after(struct nbdserve_next *self, uint64_t ns);
extern int nbdserve_retry_when(struct nbdserve_next *self, struct nbdserve_waiter **waiter);
extern void nbdserve_wake(struct nbdserve_waiter *waiter);
extern int nbdserve_has_waited(struct nbdserve_next *self);
extern int nbdserve_wait_cut_short(void);

/* ---- Extents builder ---------------------------------------------------
 *
 * The server hands the extents callback a list that covers the range
 * starting at the request offset.  Add extents in ascending order with
 * no gaps between them (the first may start before the request offset:
 * it is clipped).  Adjacent extents with equal flags are merged.  Once
 * the list holds all the request needs (one extent under REQ_ONE, the
 * end of the requested range reached, or the cap on descriptors), more
 * extents are accepted and ignored, so a callback may simply stop when
 * it likes after covering at least one byte.
 * Returns 0, or -1 with errno EINVAL when an extent is out of order.
 */
struct nbdserve_extents;
extern int nbdserve_add_extent(struct nbdserve_extents *extents,
                               uint64_t offset, uint64_t length, uint64_t flags);
/* Offset just past the last extent added so far (the request offset if
 * none): where the next extent must start. */
extern uint64_t nbdserve_extents_end(const struct nbdserve_extents *extents);

/* ---- Export list builder (list_exports) ------------------------------- */
struct nbdserve_exports;
extern int nbdserve_add_export(struct nbdserve_exports *exports,
                               const char *name, const char *description);

/* ---- Metadata context list builder (list_meta_contexts) ---------------- */
struct nbdserve_contexts;
extern int nbdserve_add_context(struct nbdserve_contexts *contexts, const char *name);

#ifdef __cplusplus
}
#endif

#endif /* NBDSERVE_COMMON_H */
