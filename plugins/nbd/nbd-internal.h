/* nbdserve nbd plugin - what nbd.c (the plugin's callbacks) and links.c
 * (the connections to the backend server) share.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBD_INTERNAL_H
#define NBD_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include <libnbd.h>

#include "nbdserve-plugin.h"

#define MAX_LINKS 16 /* connections= at most */
#define MAX_BACKEND_CONTEXTS 64 /* meta contexts taken from the backend */

/* Where the backend is and how to talk to it: the plugin's parameters. */
struct backend_config {
  const char *uri; /* nbd://, nbds://, nbd+unix://, nbds+unix:// */
  const char *socket, *hostname, *port, *export;
  int tls; /* LIBNBD_TLS_*, or -1 when tls= was not given */
  const char *tls_certificates, *tls_psk, *tls_username;
  unsigned connections;
  /* Reconnection: attempts one second apart, either retry_attempts of
   * them or as many as fit in retry_ns.  Both 0: never reconnect. */
  unsigned retry_attempts;
  uint64_t retry_ns;
};

/* What the backend told us about its export when we first connected. */
struct backend_info {
  int64_t size;
  bool read_only, can_flush, can_fua, can_trim, can_zero, can_fast_zero;
  bool can_cache, can_multi_conn, is_rotational;
  uint32_t block_min, block_preferred, block_max; /* 0: not advertised */
  size_t ncontexts; /* the backend's meta contexts, base:allocation included */
  char *contexts[MAX_BACKEND_CONTEXTS];
};

extern struct backend_config config;
extern struct backend_info info;

/* links.c: connecting and keeping the connections to the backend.
 *
 * links_start: connect every link (retrying by the policy), learn the
 * backend's export into `info`, start one reader thread per link.  Main
 * thread, from get_ready.  0, or -1 after logging why.
 * links_stop: stop the readers and close the connections (unload). */
extern int links_start(void);
extern void links_stop(void);

/* The link a command went out on, for links_force_down. */
struct link;

/* Send one command to the backend: ISSUE is called with the handle of a
 * link that is up, under that link's lock, and returns what the libnbd
 * aio call returned (a cookie, or -1).  *used names the link ISSUE was
 * called for, NULL if it was not called.  Returns 0 when the command went
 * out, or -1 with errno:
 *   EAGAIN: no link is up but one is reconnecting: wait with links_park;
 *   ESHUTDOWN: the backend is gone and no reconnection is under way;
 *   anything else: the aio call failed. */
typedef int64_t (*issue_fn)(struct nbd_handle *h, void *arg);
extern int links_submit(issue_fn issue, void *arg, struct link **used);

/* Let W be woken when a reconnection ends (well or not).  If none is
 * under way any longer, W is woken at once. */
extern void links_park(struct nbdserve_waiter *w);

/* A client connected while the backend is gone: with a retry policy,
 * start another round of reconnection attempts (returns at once). */
extern void links_revive(void);

/* Cut a link's connection (shutdown of its socket), so that libnbd
 * fails every command in flight on it: the last resort when a client
 * left and a command still holds its buffer. */
extern void links_force_down(struct link *link);

/* Index of context NAME in info.contexts, or -1. */
extern int backend_context_index(const char *name);

#endif /* NBD_INTERNAL_H */
