/* nbdserve - metadata context negotiation.
 *
 * Contexts are general: base:allocation is always offered, and every
 * other name comes from the chain's list_meta_contexts (a plugin or a
 * filter may declare "qemu:dirty-bitmap:b1" and the like).  The core
 * does the matching, so every plugin gets the same query rules:
 *   - an exact name selects (or lists) that context;
 *   - a query ending in ':' ("base:", "qemu:", "qemu:dirty-bitmap:")
 *     lists every context it is a prefix of, for LIST only (the
 *     specification has SET ignore such namespace-only queries);
 *   - LIST with no query lists everything; SET with none selects nothing;
 *   - queries matching nothing are ignored.
 * A context's id is its position in the export's list, so ids are stable
 * for the connection.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "meta.h"

void meta_clear(struct conn *conn)
{
  for (size_t i = 0; i < conn->ncontexts; i++)
    free(conn->contexts[i].name);
  free(conn->contexts);
  conn->contexts = NULL;
  conn->ncontexts = 0;
  free(conn->meta_export);
  conn->meta_export = NULL;
}

const char *meta_context_name(const struct conn *conn, uint32_t id)
{
  for (size_t i = 0; i < conn->ncontexts; i++)
    if (conn->contexts[i].id == id)
      return conn->contexts[i].name;
  return NULL;
}

static bool is_prefix_query(const char *query)
{
  size_t len = strlen(query);
  return len > 0 && query[len - 1] == ':';
}

static bool query_matches(const char *query, const char *context, bool set)
{
  if (is_prefix_query(query))
    return !set && strncmp(context, query, strlen(query)) == 0;
  return strcmp(query, context) == 0;
}

static void reply_context(struct conn *conn, uint32_t id, const char *name)
{
  size_t len = strlen(name);
  bytebuf_put_u64(&conn->hs_out, NBD_REP_MAGIC);
  bytebuf_put_u32(&conn->hs_out, conn->opt_type);
  bytebuf_put_u32(&conn->hs_out, NBD_REP_META_CONTEXT);
  bytebuf_put_u32(&conn->hs_out, (uint32_t) (4 + len));
  bytebuf_put_u32(&conn->hs_out, id);
  bytebuf_append(&conn->hs_out, name, len);
}

static void reply_status(struct conn *conn, uint32_t reply, const char *msg)
{
  size_t len = msg ? strlen(msg) : 0;
  bytebuf_put_u64(&conn->hs_out, NBD_REP_MAGIC);
  bytebuf_put_u32(&conn->hs_out, conn->opt_type);
  bytebuf_put_u32(&conn->hs_out, reply);
  bytebuf_put_u32(&conn->hs_out, (uint32_t) len);
  if (len)
    bytebuf_append(&conn->hs_out, msg, len);
}

void meta_answer(struct conn *conn, bool set, const char *export, const char *requested,
                 const char *const *queries, uint32_t nqueries)
{
  struct nbdserve_contexts *offered = contexts_new();
  nbdserve_add_context(offered, NBDSERVE_CONTEXT_BASE_ALLOCATION);
  if (nbdserve_next_list_meta_contexts(chain_global(), export, offered) == -1) {
    contexts_free(offered);
    reply_status(conn, NBD_REP_ERR_PLATFORM, "cannot list the metadata contexts");
    return;
  }

  size_t n = contexts_count(offered);
  bool *chosen = calloc(n ? n : 1, sizeof *chosen);
  size_t nchosen = 0;
  if (chosen == NULL)
    die("out of memory");
  for (size_t i = 0; i < n; i++) {
    const char *name = contexts_name(offered, i);
    bool match = !set && nqueries == 0;
    for (uint32_t q = 0; !match && q < nqueries; q++)
      match = query_matches(queries[q], name, set);
    chosen[i] = match;
    nchosen += match;
  }

  if (set && nchosen > MAX_CONTEXTS_PER_CONN) {
    reply_status(conn, NBD_REP_ERR_TOO_BIG, "too many metadata contexts selected");
    goto out;
  }
  if (set) {
    conn->contexts = calloc(nchosen ? nchosen : 1, sizeof *conn->contexts);
    conn->meta_export = strdup(requested);
    if (conn->contexts == NULL || conn->meta_export == NULL)
      die("out of memory");
  }
  for (size_t i = 0; i < n; i++) {
    if (!chosen[i])
      continue;
    const char *name = contexts_name(offered, i);
    uint32_t id = set ? (uint32_t) i + 1 : 0; /* LIST ids are reserved: zero */
    reply_context(conn, id, name);
    if (set) {
      struct selected_context *c = &conn->contexts[conn->ncontexts++];
      c->id = id;
      c->name = strdup(name);
      if (c->name == NULL)
        die("out of memory");
    }
  }
  reply_status(conn, NBD_REP_ACK, NULL);

out:
  free(chosen);
  contexts_free(offered);
}
