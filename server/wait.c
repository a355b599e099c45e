/* nbdserve - requests that wait without a thread.
 *
 * A data callback that must wait (a delay, a rate limit, an answer that
 * another thread will bring) returns nbdserve_retry_after(self, ns) or
 * nbdserve_retry_when(self, &waiter): -1 with errno EINPROGRESS, which
 * every layer above passes up unchanged.  The core then parks the
 * request: no reply, no thread, no lock; it keeps only its slot (and its
 * payload).  When the wait ends - the connection loop's timer fires, or
 * some thread calls nbdserve_wake - the request runs again through the
 * whole chain, and the layer that waited sees nbdserve_has_waited(self)
 * and goes on.  10,000 waiting requests cost their slots and nothing
 * else.
 *
 * A wait is cut short when its connection stops reading (the client
 * left, or the server is shutting down): the request runs again at once,
 * with nbdserve_wait_cut_short() true, and is answered as usual (or its
 * reply dropped if the client is gone), so shutdown is prompt and no
 * acknowledged write is lost.
 *
 * Who touches what: parking and retries happen on the connection's loop
 * thread, except for a request that waits for a waker while requests
 * run on workers: its worker parks it on the connection's waker_list and
 * its waker hands it straight back to the workers, which saves two
 * thread wake-ups per wait (the loop's, twice) for a plugin whose every
 * request waits, such as rbd.  The callback that asked ran on a worker
 * or that loop; a waker
 * may be any thread, and may come long after the request was answered
 * and its connection closed (a wait cut short).  So a waiter's state,
 * and whether it still points at its request, change under one lock of
 * their own, waiters_lock (then conn->lock, in that order): a waker
 * touches the request only while the waiter is parked, and a parked
 * request keeps its connection alive.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdlib.h>

#include "conn.h"
#include "loop.h"

/* What the callback now running asked for (its thread's only). */
static __thread struct {
  struct request *req; /* the request this thread runs, or NULL */
  enum { ASK_NONE, ASK_TIMER, ASK_WAKER } ask;
  uint64_t ns;
  struct nbdserve_waiter *waiter; /* ASK_WAKER: the one handed out */
} running;

enum waiter_state { WAITER_ARMED, WAITER_PARKED, WAITER_WOKEN, WAITER_DONE };

static pthread_mutex_t waiters_lock = PTHREAD_MUTEX_INITIALIZER;

struct nbdserve_waiter {
  struct request *req;
  enum waiter_state state; /* under waiters_lock */
  int refs; /* the core's and the waker's; under waiters_lock */
};

static unsigned layer_bit(struct nbdserve_next *self)
{
  /* A filter passes its next (the layer below it): its own index is one
   * less.  The plugin passes NULL. */
  unsigned index = self ? self->layer->index - 1 : 31;
  return 1u << (index & 31);
}

int nbdserve_retry_after(struct nbdserve_next *self, uint64_t ns)
{
  struct request *req = running.req;
  if (req == NULL) {
    nbdserve_error("nbdserve_retry_after: only a data callback of a request may wait");
    errno = EINVAL;
    return -1;
  }
  req->waited_layers |= layer_bit(self);
  running.ask = ASK_TIMER;
  running.ns = ns;
  errno = EINPROGRESS;
  return -1;
}

int nbdserve_retry_when(struct nbdserve_next *self, struct nbdserve_waiter **waiter)
{
  struct request *req = running.req;
  struct nbdserve_waiter *w = req ? malloc(sizeof *w) : NULL;
  if (w == NULL) {
    if (req == NULL)
      nbdserve_error("nbdserve_retry_when: only a data callback of a request may wait");
    errno = req ? ENOMEM : EINVAL;
    return -1;
  }
  *w = (struct nbdserve_waiter) {.req = req, .state = WAITER_ARMED, .refs = 2};
  running.waiter = w;
  req->waited_layers |= layer_bit(self);
  running.ask = ASK_WAKER;
  *waiter = w;
  errno = EINPROGRESS;
  return -1;
}

int nbdserve_has_waited(struct nbdserve_next *self)
{
  struct request *req = running.req;
  return req && (req->waited_layers & layer_bit(self)) != 0;
}

int nbdserve_wait_cut_short(void)
{
  struct request *req = running.req;
  return req && req->wait_cut_short;
}

/* waiters_lock held. */
static void waiter_release(struct nbdserve_waiter *w)
{
  if (--w->refs == 0)
    free(w);
}

/* A connection's lists of waiting requests (waiting_list, waker_list),
 * linked through prev_waiting and next_waiting. */
static void waiting_add(struct request **list, struct request *req)
{
  req->prev_waiting = NULL;
  req->next_waiting = *list;
  if (*list)
    (*list)->prev_waiting = req;
  *list = req;
}

static void waiting_remove(struct request **list, struct request *req)
{
  if (req->prev_waiting)
    req->prev_waiting->next_waiting = req->next_waiting;
  else
    *list = req->next_waiting;
  if (req->next_waiting)
    req->next_waiting->prev_waiting = req->prev_waiting;
  req->prev_waiting = req->next_waiting = NULL;
}

/* waiters_lock held: REQ's wait is cut short; its waker, if it comes,
 * finds the waiter done. */
static void forget_parked_waiter(struct request *req)
{
  if (req->parked_waiter) {
    req->parked_waiter->state = WAITER_DONE;
    waiter_release(req->parked_waiter);
    req->parked_waiter = NULL;
  }
}

/* waiters_lock held; W is REQ's waiter, asked for by its worker, and
 * requests run on workers.  Park REQ for its waker without the loop, or
 * hand it back to the workers at once (woken already, or its connection
 * cuts waits short). */
static void park_for_waker(struct request *req, struct nbdserve_waiter *w)
{
  struct conn *conn = req->conn;
  bool run_now = w->state == WAITER_WOKEN;
  if (!run_now) {
    pthread_mutex_lock(&conn->lock);
    run_now = conn->waits_cut;
    req->wait_cut_short = run_now;
    if (!run_now) {
      w->state = WAITER_PARKED;
      req->parked_waiter = w;
      waiting_add(&conn->waker_list, req);
      req->on_waker_list = true;
    }
    pthread_mutex_unlock(&conn->lock);
  }
  if (run_now) {
    w->state = WAITER_DONE;
    waiter_release(w);
  }
  pthread_mutex_unlock(&waiters_lock);
  if (run_now)
    workers_submit(&req->job);
}

/* Any thread, once per waiter. */
void nbdserve_wake(struct nbdserve_waiter *w)
{
  pthread_mutex_lock(&waiters_lock);
  enum waiter_state was = w->state;
  int releases = 1; /* the waker's reference */
  struct request *to_workers = NULL;
  if (was == WAITER_PARKED) {
    /* Parked: the core no longer needs the waiter; retry from the
     * workers or the loop, wherever it was parked. */
    struct request *req = w->req;
    struct conn *conn = req->conn;
    pthread_mutex_lock(&conn->lock);
    req->parked_waiter = NULL;
    if (req->on_waker_list) {
      waiting_remove(&conn->waker_list, req);
      req->on_waker_list = false;
      to_workers = req;
    }
    else {
      req->next_woken = conn->woken;
      conn->woken = req;
      conn_kick(conn);
    }
    pthread_mutex_unlock(&conn->lock);
    releases = 2;
  }
  if (was == WAITER_ARMED || was == WAITER_PARKED)
    w->state = WAITER_WOKEN; /* ARMED: the callback has not even returned yet */
  w->refs -= releases;
  if (w->refs == 0)
    free(w);
  pthread_mutex_unlock(&waiters_lock);
  /* Off every list: nobody else hands it on. */
  if (to_workers)
    workers_submit(&to_workers->job);
}

/* ---- The core's side ----------------------------------------------------------- */

void wait_begin_request(struct request *req)
{
  running.req = req;
  running.ask = ASK_NONE;
}

/* Any thread: the one running REQ. */
void wait_withdraw(struct request *req, uint32_t waited_before)
{
  struct nbdserve_waiter *w = running.waiter;
  running.ask = ASK_NONE;
  running.waiter = NULL;
  req->waited_layers = waited_before;
  if (w) {
    pthread_mutex_lock(&waiters_lock);
    w->state = WAITER_DONE; /* its waker finds it done */
    waiter_release(w);
    pthread_mutex_unlock(&waiters_lock);
  }
}

/* Finishing a callback that asked to wait.  Returns true if the request
 * is parked (the caller must not reply).  Any thread. */
bool wait_end_request(struct request *req, bool asked)
{
  int ask = running.ask;
  struct nbdserve_waiter *w = running.waiter;
  running.req = NULL;
  running.ask = ASK_NONE;
  running.waiter = NULL;
  if (ask == ASK_NONE)
    return false;

  pthread_mutex_lock(&waiters_lock);
  if (!asked) {
    /* A layer above swallowed the wait and answered: nothing to park,
     * and the request, answered, may already serve another client: it
     * is not touched.  A waker may still come; it finds the waiter done. */
    if (w) {
      w->state = WAITER_DONE;
      waiter_release(w);
    }
    pthread_mutex_unlock(&waiters_lock);
    return false;
  }
  struct conn *conn = req->conn;
  if (ask == ASK_WAKER && w && !run_inline) {
    park_for_waker(req, w); /* unlocks waiters_lock */
    return true;
  }
  req->park_ns = ask == ASK_TIMER ? running.ns : 0;
  req->park_on_timer = ask == ASK_TIMER;
  if (w) {
    if (w->state == WAITER_WOKEN) { /* woken before it was parked */
      w->state = WAITER_DONE;
      waiter_release(w);
      req->park_on_timer = true; /* a retry at once, from the loop */
    } else {
      w->state = WAITER_PARKED;
      req->parked_waiter = w;
    }
  }
  /* Every parked request passes through its loop, which alone keeps the
   * list of waiting requests. */
  pthread_mutex_lock(&conn->lock);
  req->next_park = conn->to_park;
  conn->to_park = req;
  conn_kick(conn);
  pthread_mutex_unlock(&conn->lock);
  pthread_mutex_unlock(&waiters_lock);
  return true;
}

/* Loop thread: run a parked request again. */
static void retry(struct request *req)
{
  waiting_remove(&req->conn->waiting_list, req);
  dispatch_job(&req->job);
}

static void wait_timer_cb(struct ev_loop *l, ev_timer *w, int revents)
{
  (void) l, (void) revents;
  retry(w->data);
}

/* Loop thread, the connection closing: the requests on its waker_list
 * run again now, and none parks there from now on. */
static void cut_waker_waits(struct conn *conn)
{
  pthread_mutex_lock(&waiters_lock);
  pthread_mutex_lock(&conn->lock);
  conn->waits_cut = true;
  struct request *cut = conn->waker_list;
  conn->waker_list = NULL;
  pthread_mutex_unlock(&conn->lock);
  for (struct request *r = cut; r; r = r->next_waiting) {
    r->on_waker_list = false;
    forget_parked_waiter(r);
    r->wait_cut_short = true;
  }
  pthread_mutex_unlock(&waiters_lock);
  for (struct request *r = cut, *next; r; r = next) {
    next = r->next_waiting;
    r->prev_waiting = r->next_waiting = NULL;
    dispatch_job(&r->job);
  }
}

/* Loop thread, from conn_service: park what asked to wait (arming the
 * timers), retry the woken requests; on a closing connection, cut every
 * wait short. */
void wait_service(struct conn *conn)
{
  pthread_mutex_lock(&conn->lock);
  struct request *park = conn->to_park, *woken = conn->woken;
  conn->to_park = conn->woken = NULL;
  bool for_wakers = conn->waker_list != NULL;
  pthread_mutex_unlock(&conn->lock);
  if (park == NULL && woken == NULL && conn->waiting_list == NULL &&
      (!for_wakers || conn->state != CONN_CLOSING))
    return;

  for (struct request *r = park, *next; r; r = next) {
    next = r->next_park;
    waiting_add(&conn->waiting_list, r);
    if (r->park_on_timer) {
      ev_timer_init(&r->wait_timer, wait_timer_cb, r->park_ns / 1e9, 0.);
      r->wait_timer.data = r;
      ev_timer_start(conn->loop->ev, &r->wait_timer);
    }
  }
  for (struct request *r = woken, *next; r; r = next) {
    next = r->next_woken;
    retry(r);
  }
  if (conn->state != CONN_CLOSING)
    return;
  /* The client left or the server stops: nobody waits any longer. */
  while (conn->waiting_list) {
    struct request *r = conn->waiting_list;
    ev_timer_stop(conn->loop->ev, &r->wait_timer);
    pthread_mutex_lock(&waiters_lock);
    forget_parked_waiter(r);
    pthread_mutex_unlock(&waiters_lock);
    r->wait_cut_short = true;
    retry(r);
  }
  cut_waker_waits(conn);
}
