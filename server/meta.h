/* nbdserve - metadata contexts: which ones an export offers, which ones a
 * connection selected.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_META_H
#define NBDSERVE_META_H

#include "conn.h"

/* Forget the contexts the connection selected. */
extern void meta_clear(struct conn *conn);

/* Answer NBD_OPT_LIST_META_CONTEXT (set = false) or SET_META_CONTEXT for
 * EXPORT (resolved name; REQUESTED is the name as the client sent it)
 * and QUERIES, appending the replies to conn->hs_out. */
extern void meta_answer(struct conn *conn, bool set, const char *export, const char *requested,
                        const char *const *queries, uint32_t nqueries);

/* Name of the selected context ID, or NULL. */
extern const char *meta_context_name(const struct conn *conn, uint32_t id);

#endif /* NBDSERVE_META_H */
