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
#include <sys/socket.h>
#include <sys/types.h>

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

/* ---- Connection details ------------------------------------------------
 *
 * What the server learnt about the connection when it was accepted; read
 * without a system call.  "Inside a connection" means any callback the
 * server calls on behalf of one client: the handshake's (list_exports,
 * default_export, list_meta_contexts, open and the capability queries),
 * every request, and close.  Elsewhere (load, config, get_ready, unload,
 * threads the plugin made itself) there is no connection, and these
 * report so.
 */

/* The connection's number, as in the -v log ("connection N opened"):
 * 1 for the first client, counting up.  0 outside a connection. */
extern unsigned nbdserve_connection_id(void);

/* The peer's address as getpeername gave it when the client connected
 * (AF_INET or AF_INET6 for TCP, AF_UNIX for a Unix socket), copied to
 * *ADDR with its length in *LEN (either may be NULL).  -1 with errno
 * ENOTCONN outside a connection or when the connection is not a socket
 * (-s, stdin/stdout). */
extern int nbdserve_peer_address(struct sockaddr_storage *addr, socklen_t *len);

/* The peer for messages: "127.0.0.1:PORT", "[::1]:PORT",
 * "unix:uid=U,gid=G,pid=P", or "unknown" when the connection is not a
 * socket.  Lives as long as the connection.  NULL outside a connection. */
extern const char *nbdserve_peer_name(void);

/* The credentials of the process that connected to a Unix socket
 * (SO_PEERCRED, as they were when it connected); any pointer may be
 * NULL.  -1 with errno ENOTSUP when the connection is not a Unix socket
 * (TCP, a pipe), ENOTCONN outside a connection. */
extern int nbdserve_peer_credentials(uid_t *uid, gid_t *gid, pid_t *pid);

/* The description list_exports gives for EXPORT, asked of the whole
 * chain as a client would see it (the answer NBD_INFO_DESCRIPTION
 * carries).  malloc'ed: the caller frees it.  NULL with errno ENOENT
 * when the export is not listed or has no description, or with the
 * errno of list_exports when that failed.  It calls list_exports: never
 * call it from list_exports itself. */
extern char *nbdserve_export_description(const char *export);

/* A copy of S that the server frees, for callbacks that must return a
 * string they do not keep (default_export, for one).  Inside a
 * connection the copy lives until the connection is gone: after its
 * close callbacks have returned.  Outside a connection it lives until
 * every unload callback has returned.  NULL with errno ENOMEM. */
extern const char *nbdserve_strdup_connection(const char *s);

/* Ask the server to end this connection.  FORCE 0: read no more
 * requests, finish those already received and send their replies, then
 * close.  FORCE 1: close the socket now; requests still running finish
 * but their replies are dropped.  During the handshake the option being
 * processed finishes first (its reply is sent unless FORCE).  Safe from
 * any callback of the connection, on any thread; it returns at once,
 * and the connection's loop does the closing.  0, or -1 with errno
 * ENOTCONN outside a connection. */
extern int nbdserve_disconnect(int force);

/* Ask the server to shut down gracefully (as on SIGTERM). */
extern void nbdserve_shutdown(void);

/* ---- Control socket commands ------------------------------------------
 *
 * A plugin or filter may offer commands on the server's control socket
 * (nbdserve --control=PATH, see docs/control.md).  The server names a
 * command "LAYER.NAME", LAYER being the registering plugin's or filter's
 * short name, so two layers never clash.
 *
 * When: nbdserve_register_command may be called only from load, config,
 * config_complete or get_ready (the server's main thread, before it
 * serves); anywhere else it fails with EPERM.  NAME is 1 to 64 of
 * [a-z0-9_-]; HELP is one line of text (at most 200 bytes).  Both are
 * copied.  Returns 0, or -1 with errno EINVAL (bad name or help),
 * EEXIST (this layer registered NAME already), EPERM, or ENOMEM.
 *
 * The callback receives the request's key=value arguments in order
 * (ARGC of them; KEYS[i] and VALUES[i], valid only during the call; a
 * bare word has the value ""), answers with nbdserve_reply_add, and
 * returns 0 for "ok" or -1 for an error, whose message it gives with
 * nbdserve_reply_error ("command failed" otherwise).
 *
 * Threads: the callback runs on a worker thread, never on an event
 * loop, so it may block (briefly: the control client waits for it).
 * The server runs one command callback at a time, but a callback runs
 * concurrently with the data callbacks of any connection, whatever the
 * thread model: state it shares with them needs the plugin's own lock.
 * The callback runs with no connection: nbdserve_export_name and the
 * other connection functions return NULL/0 inside it.
 */
struct nbdserve_reply;
typedef int (*nbdserve_command_fn)(int argc, const char *const *keys,
                                   const char *const *values,
                                   struct nbdserve_reply *reply);
extern int nbdserve_register_command(const char *name, const char *help,
                                     nbdserve_command_fn fn);
/* Add one "KEY=VALUE" line to the answer.  KEY as a command name (1 to
 * 64 of [a-z0-9_.-]); a newline in the value becomes a space.  The
 * answer holds at most 256 KiB; beyond, the command fails with "reply
 * too long".  Returns 0, or -1 (errno EINVAL for a bad key, E2BIG when
 * the answer is full).  Only inside the callback, on REPLY. */
extern int nbdserve_reply_add(struct nbdserve_reply *reply, const char *key,
                              const char *fmt, ...) NBDSERVE_PRINTF(3, 4);
/* The message of the "error: MESSAGE" line if the callback returns -1
 * (one line; the last call wins). */
extern void nbdserve_reply_error(struct nbdserve_reply *reply, const char *fmt, ...)
  NBDSERVE_PRINTF(2, 3);

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
