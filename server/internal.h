/* nbdserve - interfaces between the files of the server core.
 *
 * Plugins and filters never see this header; their contract is include/.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_INTERNAL_H
#define NBDSERVE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#include "nbdserve-filter.h"
#include "nbdserve-plugin.h"

#define PROGRAM_NAME "nbdserve"
#ifndef PACKAGE_VERSION
#define PACKAGE_VERSION "0.1.0"
#endif

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* ---- main.c: the command line ------------------------------------------ */

enum tls_mode { TLS_OFF = 0, TLS_ON, TLS_REQUIRE };

struct options {
  const char *unix_socket; /* -U PATH; NULL if none */
  bool unix_private; /* -U -: a private socket in a temp dir (path in unix_socket) */
  const char *port; /* -p PORT (default "10809") */
  const char *ipaddr; /* -i ADDR; NULL = all addresses */
  bool socket_activation; /* LISTEN_PID/LISTEN_FDS were set for us */
  int socket_activation_fds; /* how many (starting at fd 3) */
  bool single; /* -s: serve one connection on stdin/stdout */
  bool foreground; /* -f */
  bool readonly; /* -r */
  bool oldstyle; /* -o */
  bool verbose; /* -v */
  bool exit_with_parent;
  const char *pidfile; /* -P */
  const char *run; /* --run CMD */
  const char *export_name; /* -e NAME: name shown in $uri and used with -o */
  unsigned threads; /* -t N: worker threads */
  unsigned loops; /* --loops N: connection loops (threads) */
  uint32_t max_payload; /* --max-payload SIZE: for clients that negotiated no block size */
  double handshake_timeout; /* --handshake-timeout SECONDS; 0 = no limit */
  unsigned max_connections; /* --max-connections N; 0 = no limit */
  unsigned busy_poll_us; /* --busy-poll US; 0 = never spin */
  bool no_inline; /* --no-inline: worker threads even for a chain that never blocks */
  enum tls_mode tls;
  const char *tls_certificates;
  const char *tls_psk;
  bool tls_verify_peer;
  bool tls_strict_keys; /* --tls-strict-keys: key files open to others are fatal */
  const char *user, *group; /* -u, -g: run as them once the sockets are bound */
  const char *control; /* --control PATH: the control socket; NULL if none */
};
extern struct options opt;
/* For the parent left waiting in daemonize: the SIGINT and SIGTERM
 * actions the process started with, unblocked. */
extern void restore_inherited_signals(void);

/* ---- log.c --------------------------------------------------------------- */
/* nbdserve_error / nbdserve_debug (public) do the work; after daemonizing,
 * messages go to syslog. */
extern void log_to_syslog(void);
/* Fatal error during start-up: message and exit(EXIT_FAILURE). */
extern void die(const char *fmt, ...) NBDSERVE_PRINTF(1, 2) __attribute__((noreturn));

/* ---- peer.c: who is at the other end of a socket ------------------------- */
struct peer {
  struct sockaddr_storage addr;
  socklen_t addr_len; /* 0: not a socket (-s), or getpeername failed */
  bool have_cred; /* a Unix socket whose SO_PEERCRED was read */
  struct ucred cred;
};
/* 0, or -1 with errno: getpeername failed (addr_len 0), or a Unix
 * socket's credentials could not be read (have_cred false). */
extern int peer_identify(int fd, struct peer *p);

/* ---- acl.c: --allow and --deny -------------------------------------------- */
extern void acl_add(bool allow, const char *rule); /* dies on a bad rule */
extern bool acl_active(void);
/* Whether the client on FD may connect; WHO receives a description. */
extern bool acl_permits(int fd, char *who, size_t wholen);
extern void acl_free(void);

/* ---- privileges.c: -u and -g ------------------------------------------------ */
extern void drop_privileges(void);
/* A user or group given as a name or a number (also for --allow uid:/gid:). */
extern bool find_user(const char *text, uid_t *uid, gid_t *primary_gid);
extern bool find_group(const char *text, gid_t *gid);

/* ---- sockets.c: listening sockets --------------------------------------- */
/* Bind every listening socket the options ask for (TCP on each address
 * of -i/-p, IPv4 and IPv6; or the Unix socket; or the socket-activation
 * fds).  Dies with a clear message on failure.  Non-blocking fds. */
extern void open_listeners(int **fds, size_t *nfds);
/* Unlink it (and the private dir) at exit; async-signal-safe. */
extern void remove_unix_socket(void);
/* --control PATH: bind it (mode 0600) and listen; returns the
 * non-blocking fd.  remove_unix_socket unlinks it too. */
extern int open_control_socket(void);


/* ---- captive.c: --run, pidfile, daemonizing, --exit-with-parent --------- */
/* URI clients should use, e.g. "nbd+unix:///?socket=/tmp/x/sock" or
 * "nbd://localhost:10809/". malloc'ed string. */
extern char *listen_uri(void);
/* Start opt.run with $uri, $unixsocket, $port, $exportname set; returns its pid. */
extern pid_t captive_start(void);
extern void daemonize(void); /* unless -f; also handles -P */
extern void note_parent(void); /* first thing in main, for follow_parent */
extern void follow_parent(void); /* --exit-with-parent, once privileges are dropped */
extern void write_pidfile(void);

/* ---- plugins.c: loading the chain of layers ----------------------------- */

/* One filter or the plugin, shared by all connections. */
struct layer {
  struct layer *below; /* NULL for the plugin */
  bool is_plugin;
  const char *name; /* short name */
  char *filename; /* path of the .so */
  void *dl; /* dlopen handle */
  struct nbdserve_plugin plugin; /* copied and zero-extended when is_plugin */
  struct nbdserve_filter filter; /* likewise when !is_plugin */
  unsigned index; /* 0 = outermost */
};
extern struct layer *top_layer; /* outermost filter, or the plugin */

/* Find NAME ("memory", "./x.so", "/abs/path.so") and load it. */
extern void load_chain(const char *plugin, const char *const *filters, size_t nfilters);
extern void unload_chain(void);
/* Route key=value down the chain (filters first, then the plugin).
 * A bare VALUE (key == NULL) goes to the plugin's magic key. */
extern int chain_config(const char *key, const char *value);
extern int chain_config_complete(void);
extern int chain_get_ready(void);
extern int chain_thread_model(void); /* the most restrictive of all layers */
extern bool chain_never_blocks(void); /* every layer declares NEVER_BLOCKS */
extern void chain_dump(FILE *fp); /* --dump-plugin */
extern void chain_help(FILE *fp); /* plugin and filter help for --help */
/* Finding plugins and filters by short name: the build tree next to the
 * running binary (LAYER_BUILD_DIR/plugins/NAME/nbdserve-NAME-plugin.so)
 * first, then the installed directory (PLUGINDIR, FILTERDIR). */
extern bool layer_short_name_valid(const char *name); /* [a-z0-9_-]+ */
extern char *layer_build_dir(void); /* the binary's directory; NULL if unknown */
extern const char *layer_installed_dir(bool is_plugin);
extern char *layer_build_path(const char *build_dir, const char *name, bool is_plugin);
extern char *layer_installed_path(const char *name, bool is_plugin);
/* What a plugin or filter says about itself, for --list-plugins. */
struct layer_summary {
  char *name, *longname, *version; /* malloc'ed; longname, version may be NULL */
};
#define LAYER_WHY_MAX 512
/* Load the object at PATH, check and read its registration, unload it;
 * its load callback is not called.  False with the reason in WHY
 * (LAYER_WHY_MAX bytes) if the server would refuse to load it. */
extern bool layer_summarize(const char *path, bool is_plugin, struct layer_summary *summary,
                            char *why);
extern void layer_summary_free(struct layer_summary *summary);

/* ---- catalog.c: --list-plugins and --list-filters -------------------------- */
/* One line per plugin (or filter) a short name finds, sorted: NAME,
 * VERSION, LONGNAME (and the path with -v).  Objects that cannot be
 * loaded get a warning on stderr. */
extern void list_layers(FILE *fp, bool is_plugin);
/* Short name of the layer whose load, config, config_complete or
 * get_ready callback runs now (main thread), NULL outside them: the
 * layer a command registered then belongs to. */
extern const char *chain_calling_layer(void);

/* ---- backend.c: calling through the chain -------------------------------- */

/* Identity of the connection a callback runs for (public.c exposes it). */
struct conn;
struct conn_identity {
  const char *export_name;
  int is_tls;
  const char *tls_identity;
  /* Fixed when the connection is created (conn_new, on its loop thread
   * in conn_start): the peer does not change, so callbacks read these
   * without a system call or a lock. */
  struct conn *conn; /* for nbdserve_disconnect and per-connection strings */
  unsigned conn_id; /* conn->id, the number of the -v log */
  struct peer peer;
  char peer_name[96]; /* nbdserve_peer_name */
};
/* public.c: fill in the peer fields of ID from socket FD. */
extern void identity_gather_peer(struct conn_identity *id, int fd);
/* public.c: per-connection strings (nbdserve_strdup_connection). */
extern void connection_strings_free(struct conn *conn);
extern void global_strings_free(void); /* after the last unload callback */
/* Set by the core on the calling thread before calling into the chain. */
extern __thread const struct conn_identity *current_identity;
/* The errno a callback chose with nbdserve_set_error (0 = none). */
extern __thread int backend_error;

/* Per-connection context of one layer: this is struct nbdserve_next. */
struct nbdserve_next {
  struct layer *layer;
  struct nbdserve_next *below; /* context of the layer below, NULL for plugin */
  void *handle;
  bool is_open;
  /* Cached capability answers, -2 = not asked yet. */
  int64_t size;
  int can_write, can_flush, is_rotational, can_trim, can_zero, can_fast_zero;
  int can_fua, can_multi_conn, can_cache, can_extents;
  int have_block_size;
  uint32_t bs_min, bs_pref, bs_max;
};

/* The chain with no connection, for list_exports, default_export and
 * list_meta_contexts. */
extern struct nbdserve_next *chain_global(void);
/* Allocate the contexts of every layer and open them top to bottom
 * (calling filter prepare callbacks afterwards).  NULL on failure with
 * errno set and the reason logged. */
extern struct nbdserve_next *chain_open(int readonly, const char *export_name);
/* finalize + close every layer and free the contexts. */
extern void chain_close(struct nbdserve_next *top);

/* Every nbdserve_next_* function is the backend call on that context; on
 * failure it returns -1 with errno set to a non-zero value (EIO if the
 * callback gave none).  Emulations live here, at the plugin layer:
 * FUA by flush, zero by pwrite of zeroes, cache by pread. */

/* Builders (public names from include/, plus these for the core). */

extern struct nbdserve_contexts *contexts_new(void);
extern void contexts_free(struct nbdserve_contexts *);
extern size_t contexts_count(const struct nbdserve_contexts *);
extern const char *contexts_name(const struct nbdserve_contexts *, size_t i);

/* nbdserve_extents_new(offset, count, flags) takes NBDSERVE_FLAG_REQ_ONE;
 * the list holds at most EXTENTS_MAX descriptors. */
#define EXTENTS_MAX (1u << 20)

static inline uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000 + (uint64_t) ts.tv_nsec;
}

/* ---- workers.c: the thread pool ------------------------------------------- */
struct job {
  void (*run)(struct job *job);
  struct job *next;
  uint64_t queued_at; /* ns, CLOCK_MONOTONIC */
};
/* How long a queued job may wait behind busy workers before one more
 * worker is woken for it (see workers_nudge). */
#define JOB_WAIT_LIMIT_NS 1000000
extern void workers_start(unsigned nthreads);
extern void workers_submit(struct job *job);
/* Loop thread: between these, submitted jobs are held back, then queued
 * together (one lock, the wake-ups decided for the whole batch). */
extern void workers_hold(void);
extern void workers_release(void);
/* Wake a worker for a job that has waited JOB_WAIT_LIMIT_NS; returns
 * true while jobs are still queued (call again later). */
extern bool workers_nudge(void);
extern void workers_stop(void); /* finish queued jobs, join */
extern unsigned workers_count(void); /* threads started (0 when requests run inline) */

/* ---- cpulimit.c: how much CPU this process may use ---------------------- */
extern unsigned affinity_cpus(void); /* CPUs sched_getaffinity allows */
/* The tightest cgroup CPU quota over us, in CPUs (1.5: 150 ms per
 * 100 ms); 0 when none is set or none can be read. */
extern double cgroup_cpu_quota(void);
/* The CPUs this process may keep busy: its affinity, capped by the
 * cgroup quota (rounded up), at least 1. */
extern unsigned usable_cpus(void);

/* ---- busypoll.c: spinning the loop thread under heavy load -------------- */
#define BUSY_POLL_DEFAULT_US 100
#define BUSY_POLL_MAX_US 1000
struct ev_loop;
/* Spin while the loop's idle time between inputs is under IDLE_LIMIT_US;
 * 0 turns busy polling off. */
extern void busy_poll_setup(struct ev_loop *loop, unsigned idle_limit_us);
/* Around the handling of each input: returns the time to pass back. */
extern uint64_t busy_poll_work_begins(void);
extern void busy_poll_work_ends(uint64_t began);
extern void busy_poll_report(void); /* debug: what it did */

/* ---- stats.c: what the control socket's status reports ------------------ */
/* Requests by kind, as the loops parse them. */
enum request_kind { KIND_READ, KIND_WRITE, KIND_FLUSH, KIND_TRIM, KIND_ZERO, KIND_CACHE,
                    KIND_BLOCK_STATUS, KIND_OTHER, NR_KINDS };
extern const char *const request_kind_names[NR_KINDS];
/* One loop's counters.  Only the loop's own thread adds to them, so an
 * add is a relaxed load and store (no locked instruction, no shared
 * cache line on the request path); readers on other threads take
 * relaxed loads and may see a figure a request behind. */
struct counters {
  uint64_t requests[NR_KINDS];
  uint64_t bytes_read, bytes_written; /* data of READ and WRITE requests accepted */
};
static inline void counter_add(uint64_t *c, uint64_t n)
{
  __atomic_store_n(c, __atomic_load_n(c, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}
extern void stats_start(void); /* the clock of uptime starts */
extern double stats_uptime(void); /* seconds since stats_start */
/* An export opened / closed by a connection (any thread; not on the
 * request path, so a mutex is fine). */
extern void stats_export_opened(const char *name);
extern void stats_export_closed(const char *name);
/* Calls FN for each export open now, under the table's lock. */
extern void stats_exports_foreach(void (*fn)(const char *name, unsigned open, void *arg),
                                  void *arg);

/* ---- commands.c: the commands plugins and filters register ------------- */
/* The answer a command builds with nbdserve_reply_add: "key=value\n"
 * lines, and the message of nbdserve_reply_error. */
#define REPLY_MAX_BYTES (256 * 1024)
struct nbdserve_reply {
  char *text;
  size_t len, cap;
  char *error; /* malloc'ed; NULL unless nbdserve_reply_error was called */
  bool overflowed; /* more than REPLY_MAX_BYTES: the answer is an error */
  bool failed; /* set by command_invoke; error_text is then the message */
  const char *error_text; /* error, or a constant */
};
struct command; /* a registered command */
extern size_t commands_count(void);
extern const struct command *command_at(size_t i);
extern const struct command *command_find(const char *full_name);
extern const char *command_full_name(const struct command *cmd); /* "LAYER.NAME" */
extern const char *command_help(const struct command *cmd);
/* Worker thread: run CMD (one command at a time, server-wide); the
 * reply holds its lines and whether it failed, with error_text. */
extern void command_invoke(const struct command *cmd, int argc, const char *const *keys,
                           const char *const *values, struct nbdserve_reply *reply);
extern void reply_free(struct nbdserve_reply *reply);
/* Append a "key=value\n" line (value made one line: \n and \r become
 * spaces); the built-in commands use it too.  -1 if the reply is full. */
extern int reply_add_line(struct nbdserve_reply *reply, const char *key, const char *value);
extern void commands_free(void);

/* ---- control.c: the control socket (main loop) --------------------------- */
extern void control_start(struct ev_loop *main_ev, int listen_fd);
extern void control_finish(void); /* after the workers stopped: close everything */

/* ---- loop.c: the loops and the process's life ------------------------------ */
/* Runs the main loop; returns the exit status.  CONTROL_FD: the
 * --control socket, or -1. */
extern int serve(const int *listen_fds, size_t nfds, int control_fd);
extern unsigned loops_count(void);
extern void loops_sum_counters(struct counters *sum); /* any thread */
extern void serve_one_connection(int rfd, int wfd); /* fuzzing: one connection, in this thread */

/* ---- stop.c: asking the server to stop ------------------------------------ */
extern void request_shutdown(void); /* async-signal-safe and thread-safe */
extern bool shutdown_requested(void);
/* The main loop's waker, called by request_shutdown (async-signal-safe). */
extern void shutdown_set_waker(void (*wake)(void));

/* Map an errno to the NBD error set. */
extern uint32_t errno_to_nbd(int err);

#endif /* NBDSERVE_INTERNAL_H */
