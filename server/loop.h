/* nbdserve - the event loops: what a connection's loop holds.
 *
 * The server runs N connection loops (--loops), each a libev loop in a
 * thread of its own, plus the main loop (signals, listening sockets, the
 * --run child).  A connection belongs to one loop from accept to close:
 * its reads, parsing, TLS records, inline requests and reply writes all
 * happen on that loop's thread, so no two threads ever drive one
 * connection's I/O.  Other threads reach a loop only through its kick
 * list (conn_kick) and its inbox of new connections.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_LOOP_H
#define NBDSERVE_LOOP_H

#include <ev.h>
#include <pthread.h>
#include <stdbool.h>

struct conn;

/* A connection accepted by the main loop, on its way to its loop. */
struct handoff {
  int rfd, wfd;
  struct handoff *next;
};

struct loop {
  unsigned index; /* 0 .. N-1 */
  struct ev_loop *ev;
  pthread_t thread;
  bool has_thread; /* false: runs on the thread that called serve_one_connection */
  unsigned load; /* connections given to this loop and not yet closed (atomic) */
  /* Requests and bytes: the loop thread adds, anyone reads (counter_add).
   * Aligned so that the loops' counters never share a cache line. */
  struct counters counters __attribute__((aligned(64)));

  /* Connections other threads want looked at (conn_kick). */
  pthread_mutex_t kick_lock;
  struct conn *kick_head;
  ev_async kick_watcher;

  /* New connections from the main loop, and the order to stop. */
  pthread_mutex_t inbox_lock;
  struct handoff *inbox;
  bool stop_requested; /* under inbox_lock */
  ev_async inbox_watcher;

  /* Loop thread only from here. */
  struct conn *conns; /* every connection of this loop */
  unsigned nconns;
  bool stopping; /* shutting down: break once nconns is 0 */
  bool exit_when_empty; /* serve_one_connection: break when the connection closes */
  ev_timer nudge_timer; /* while jobs wait for workers (see workers_nudge) */
  ev_timer grace_timer; /* shutdown: how long clients have to take their replies */
};

/* The loop whose thread this is, NULL on other threads. */
extern __thread struct loop *current_loop;

#endif /* NBDSERVE_LOOP_H */
