/* nbdserve - the handshake: greeting, option haggling, export opening.
 *
 * The connection's loop thread collects one whole option (header and
 * payload, which is bounded by MAX_OPTION_LENGTH) and hands it to a job
 * (a worker, or run at once when the chain never blocks), since most
 * options call into the plugin (list_exports, open, get_size...).  The
 * job appends its replies to conn->hs_out and reports back; the loop
 * writes them and reads the next option.  One option at a time, as the
 * protocol has it.  Nothing here touches the loop's watchers: the
 * results say what comes next, and connection.c does it.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdlib.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "conn.h"
#include "meta.h"

/* ---- Helpers for the option replies ------------------------------------ */

static void reply_header(struct conn *conn, uint32_t option, uint32_t reply, uint32_t length)
{
  struct bytebuf *b = &conn->hs_out;
  bytebuf_put_u64(b, NBD_REP_MAGIC);
  bytebuf_put_u32(b, option);
  bytebuf_put_u32(b, reply);
  bytebuf_put_u32(b, length);
}

static void reply_ack(struct conn *conn)
{
  reply_header(conn, conn->opt_type, NBD_REP_ACK, 0);
}

/* An error reply carrying a message for humans (the spec allows one). */
static void reply_error_msg(struct conn *conn, uint32_t reply, const char *fmt, ...)
  NBDSERVE_PRINTF(3, 4);
static void reply_error_msg(struct conn *conn, uint32_t reply, const char *fmt, ...)
{
  char msg[512];
  va_list args;
  va_start(args, fmt);
  int n = vsnprintf(msg, sizeof msg, fmt, args);
  va_end(args);
  if (n < 0)
    n = 0;
  if ((size_t) n >= sizeof msg)
    n = sizeof msg - 1;
  reply_header(conn, conn->opt_type, reply, (uint32_t) n);
  bytebuf_append(&conn->hs_out, msg, (size_t) n);
  nbdserve_debug("connection %u: option %u refused: %s", conn->id, conn->opt_type, msg);
}

/* Reading the option payload in order, with bounds checks. */
struct reader {
  const char *p;
  uint32_t left;
  bool bad;
};

static uint32_t read_u32(struct reader *r)
{
  if (r->left < 4) {
    r->bad = true;
    return 0;
  }
  uint32_t v = wire_get32(r->p);
  r->p += 4;
  r->left -= 4;
  return v;
}

static uint16_t read_u16(struct reader *r)
{
  if (r->left < 2) {
    r->bad = true;
    return 0;
  }
  uint16_t v = wire_get16(r->p);
  r->p += 2;
  r->left -= 2;
  return v;
}

/* A length-prefixed string as a fresh C string; NULL if malformed
 * (truncated, too long or containing NUL). */
static char *read_string(struct reader *r, uint32_t max)
{
  uint32_t len = read_u32(r);
  if (r->bad || len > r->left || len > max || memchr(r->p, '\0', len)) {
    r->bad = true;
    return NULL;
  }
  char *s = strndup(r->p, len);
  if (s == NULL)
    die("out of memory");
  r->p += len;
  r->left -= len;
  return s;
}

/* ---- Opening an export -------------------------------------------------- */

static char *resolve_export_name(const char *name)
{
  if (name[0] == '\0') {
    const char *def = nbdserve_next_default_export(chain_global(), opt.readonly, nbdserve_is_tls());
    if (def && def[0])
      return strdup(def);
    if (opt.export_name)
      return strdup(opt.export_name);
  }
  return strdup(name);
}

static uint16_t transmission_flags(struct conn *conn)
{
  struct nbdserve_next *top = conn->top;
  uint16_t f = NBD_FLAG_HAS_FLAGS;
  bool writable = !conn->readonly;

  if (!writable)
    f |= NBD_FLAG_READ_ONLY;
  if (nbdserve_next_can_flush(top) == 1)
    f |= NBD_FLAG_SEND_FLUSH;
  if (writable && conn->can_fua != NBDSERVE_FUA_NONE)
    f |= NBD_FLAG_SEND_FUA;
  if (nbdserve_next_is_rotational(top) == 1)
    f |= NBD_FLAG_ROTATIONAL;
  if (writable && nbdserve_next_can_trim(top) == 1)
    f |= NBD_FLAG_SEND_TRIM;
  if (writable && nbdserve_next_can_zero(top) == 1) {
    f |= NBD_FLAG_SEND_WRITE_ZEROES;
    if (nbdserve_next_can_fast_zero(top) == 1)
      f |= NBD_FLAG_SEND_FAST_ZERO;
  }
  if (conn->structured)
    f |= NBD_FLAG_SEND_DF;
  if (nbdserve_next_can_multi_conn(top) == 1)
    f |= NBD_FLAG_CAN_MULTI_CONN;
  if (conn->can_cache != NBDSERVE_CACHE_NONE)
    f |= NBD_FLAG_SEND_CACHE;
  if (conn->extended)
    f |= NBD_FLAG_BLOCK_STAT_PAYLOAD;
  return f;
}

static void close_export(struct conn *conn)
{
  if (conn->export_counted) {
    stats_export_closed(conn->export_name);
    conn->export_counted = false;
  }
  if (conn->top) {
    chain_close(conn->top);
    conn->top = NULL;
  }
  free(conn->export_name);
  conn->export_name = NULL;
  conn->identity.export_name = NULL;
}

/* Opens the export the client asked for through the chain and learns
 * its size and capabilities.  Returns 0, or on failure the errno, with
 * a description in MSG. */
static int open_export(struct conn *conn, const char *requested, char *msg, size_t msglen)
{
  int err = 0;
  close_export(conn);
  conn->export_name = resolve_export_name(requested);
  if (conn->export_name == NULL)
    die("out of memory");
  conn->identity.export_name = conn->export_name; /* the TLS fields are set at STARTTLS */

  conn->top = chain_open(opt.readonly, conn->export_name);
  if (conn->top == NULL) {
    err = errno;
    snprintf(msg, msglen, "cannot open export '%s': %s", conn->export_name, strerror(errno));
    goto fail;
  }
  conn->size = nbdserve_next_get_size(conn->top);
  if (conn->size < 0) {
    snprintf(msg, msglen, "cannot get the size of export '%s': %s", conn->export_name,
             strerror(errno));
    goto fail;
  }
  int w = nbdserve_next_can_write(conn->top);
  conn->readonly = opt.readonly || w != 1;
  conn->can_fua = nbdserve_next_can_fua(conn->top);
  if (conn->can_fua < 0)
    conn->can_fua = NBDSERVE_FUA_NONE;
  conn->can_cache = nbdserve_next_can_cache(conn->top);
  if (conn->can_cache < 0)
    conn->can_cache = NBDSERVE_CACHE_NONE;
  if (nbdserve_next_block_size(conn->top, &conn->bs_min, &conn->bs_pref, &conn->bs_max) == -1) {
    snprintf(msg, msglen, "cannot get the block size of export '%s': %s",
             conn->export_name, strerror(errno));
    goto fail;
  }
  if (conn->bs_max == 0 || conn->bs_max > MAX_REQUEST_SIZE)
    conn->bs_max = MAX_REQUEST_SIZE;
  if (conn->bs_min == 0)
    conn->bs_min = 1;
  if (conn->bs_pref < conn->bs_min)
    conn->bs_pref = conn->bs_min;
  /* Until the client shows it knows the limits (opt_info_go). */
  conn->payload_max = MAX(conn->bs_max, opt.max_payload);
  conn->eflags = transmission_flags(conn);
  stats_export_opened(conn->export_name);
  conn->export_counted = true;
  return 0;

fail:
  nbdserve_error("connection %u: %s", conn->id, msg);
  close_export(conn);
  return err ? err : EIO;
}

/* ---- The options --------------------------------------------------------- */

static enum option_result opt_export_name(struct conn *conn)
{
  char msg[256];
  if (conn->extended) {
    /* The client broke the protocol; there is no way to answer. */
    nbdserve_error("connection %u: EXPORT_NAME after EXTENDED_HEADERS", conn->id);
    return OPTION_CLOSE;
  }
  if (conn->opt_len > MAX_EXPORT_NAME || memchr(conn->opt_data, '\0', conn->opt_len))
    return OPTION_CLOSE;
  char *name = strndup(conn->opt_data, conn->opt_len);
  if (name == NULL)
    die("out of memory");
  int r = open_export(conn, name, msg, sizeof msg);
  /* Contexts were chosen for a name; another name means none. */
  if (conn->meta_export == NULL || strcmp(conn->meta_export, name) != 0)
    meta_clear(conn);
  free(name);
  if (r != 0)
    return OPTION_CLOSE; /* EXPORT_NAME has no error reply */

  bytebuf_put_u64(&conn->hs_out, (uint64_t) conn->size);
  bytebuf_put_u16(&conn->hs_out, conn->eflags);
  if (!conn->no_zeroes) {
    static const char zeroes[124];
    bytebuf_append(&conn->hs_out, zeroes, sizeof zeroes);
  }
  return OPTION_TRANSMIT;
}

static enum option_result opt_list(struct conn *conn)
{
  if (conn->opt_len != 0) {
    reply_error_msg(conn, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
    return OPTION_CONTINUE;
  }
  struct nbdserve_exports *exports = nbdserve_exports_new();
  if (nbdserve_next_list_exports(chain_global(), opt.readonly, nbdserve_is_tls(), exports) == -1) {
    reply_error_msg(conn, NBD_REP_ERR_PLATFORM, "cannot list exports: %s", strerror(errno));
    nbdserve_exports_free(exports);
    return OPTION_CONTINUE;
  }
  for (size_t i = 0; i < nbdserve_exports_count(exports); i++) {
    const char *name = nbdserve_exports_name(exports, i);
    const char *desc = nbdserve_exports_description(exports, i);
    size_t nlen = strlen(name), dlen = desc ? strlen(desc) : 0;
    reply_header(conn, NBD_OPT_LIST, NBD_REP_SERVER, (uint32_t) (4 + nlen + dlen));
    bytebuf_put_u32(&conn->hs_out, (uint32_t) nlen);
    bytebuf_append(&conn->hs_out, name, nlen);
    bytebuf_append(&conn->hs_out, desc, dlen);
  }
  nbdserve_exports_free(exports);
  reply_ack(conn);
  return OPTION_CONTINUE;
}

static void reply_info(struct conn *conn, uint16_t type, const void *data, size_t len)
{
  reply_header(conn, conn->opt_type, NBD_REP_INFO, (uint32_t) (2 + len));
  bytebuf_put_u16(&conn->hs_out, type);
  bytebuf_append(&conn->hs_out, data, len);
}

static enum option_result opt_info_go(struct conn *conn)
{
  bool go = conn->opt_type == NBD_OPT_GO;
  struct reader r = { conn->opt_data, conn->opt_len, false };
  char *name = read_string(&r, MAX_EXPORT_NAME);
  uint16_t nreq = read_u16(&r);
  bool want_name = false, want_desc = false, want_block_size = false;

  if (!r.bad && r.left != 2u * nreq)
    r.bad = true;
  for (uint16_t i = 0; !r.bad && i < nreq; i++) {
    uint16_t info = read_u16(&r);
    want_name |= info == NBD_INFO_NAME;
    want_desc |= info == NBD_INFO_DESCRIPTION;
    want_block_size |= info == NBD_INFO_BLOCK_SIZE;
  }
  if (r.bad) {
    free(name);
    reply_error_msg(conn, NBD_REP_ERR_INVALID, "malformed %s request",
                    go ? "NBD_OPT_GO" : "NBD_OPT_INFO");
    return OPTION_CONTINUE;
  }

  char msg[256];
  int err = open_export(conn, name, msg, sizeof msg);
  if (err) {
    /* A plugin or filter saying "not you" is a policy refusal. */
    reply_error_msg(conn, err == EPERM || err == EACCES ? NBD_REP_ERR_POLICY
                                                         : NBD_REP_ERR_UNKNOWN, "%s", msg);
    free(name);
    return OPTION_CONTINUE;
  }

  struct {
    uint64_t size;
    uint16_t flags;
  } __attribute__((packed)) info_export = { htobe64((uint64_t) conn->size), htobe16(conn->eflags) };
  reply_info(conn, NBD_INFO_EXPORT, &info_export, sizeof info_export);
  if (want_name)
    reply_info(conn, NBD_INFO_NAME, conn->export_name, strlen(conn->export_name));
  if (want_desc) {
    char *desc = nbdserve_export_description(conn->export_name);
    if (desc)
      reply_info(conn, NBD_INFO_DESCRIPTION, desc, strlen(desc));
    free(desc);
  }
  uint32_t bs[3] = { htobe32(conn->bs_min), htobe32(conn->bs_pref), htobe32(conn->bs_max) };
  reply_info(conn, NBD_INFO_BLOCK_SIZE, bs, sizeof bs);
  reply_ack(conn);
  /* A client that asked for the block sizes is held to them; one that
   * did not may not know them, and gets up to --max-payload, split for
   * the chain (transmission.c). */
  if (want_block_size)
    conn->payload_max = conn->bs_max;

  /* Contexts selected for another export do not carry over. */
  if (go && (conn->meta_export == NULL || strcmp(conn->meta_export, name) != 0))
    meta_clear(conn);
  free(name);
  if (!go) {
    close_export(conn);
    return OPTION_CONTINUE;
  }
  return OPTION_TRANSMIT;
}

static enum option_result opt_flag_only(struct conn *conn, bool *flag, const char *what)
{
  if (conn->opt_len != 0) {
    reply_error_msg(conn, NBD_REP_ERR_INVALID, "%s takes no data", what);
    return OPTION_CONTINUE;
  }
  *flag = true;
  reply_ack(conn);
  return OPTION_CONTINUE;
}

static enum option_result opt_meta_context(struct conn *conn)
{
  bool set = conn->opt_type == NBD_OPT_SET_META_CONTEXT;
  const char *what = set ? "NBD_OPT_SET_META_CONTEXT" : "NBD_OPT_LIST_META_CONTEXT";

  if (set)
    meta_clear(conn); /* replaced even when this one fails */
  if (!conn->structured) {
    reply_error_msg(conn, NBD_REP_ERR_INVALID, "%s needs structured replies first", what);
    return OPTION_CONTINUE;
  }
  struct reader r = { conn->opt_data, conn->opt_len, false };
  char *export = read_string(&r, MAX_EXPORT_NAME);
  uint32_t nqueries = read_u32(&r);
  char **queries = NULL;
  if (!r.bad && nqueries > r.left / 4)
    r.bad = true; /* each query needs at least its length */
  if (!r.bad) {
    queries = calloc(nqueries ? nqueries : 1, sizeof *queries);
    if (queries == NULL)
      die("out of memory");
  }
  for (uint32_t i = 0; !r.bad && i < nqueries; i++)
    queries[i] = read_string(&r, MAX_OPTION_LENGTH);
  if (!r.bad && r.left != 0)
    r.bad = true;

  if (r.bad)
    reply_error_msg(conn, NBD_REP_ERR_INVALID, "malformed %s request", what);
  else {
    char *resolved = resolve_export_name(export);
    if (resolved == NULL)
      die("out of memory");
    meta_answer(conn, set, resolved, export, (const char *const *) queries, nqueries);
    free(resolved);
  }
  for (uint32_t i = 0; queries && i < nqueries; i++)
    free(queries[i]);
  free(queries);
  free(export);
  return OPTION_CONTINUE;
}

static enum option_result opt_starttls(struct conn *conn)
{
  if (opt.tls == TLS_OFF) {
    reply_error_msg(conn, NBD_REP_ERR_POLICY, "TLS is not enabled on this server");
    return OPTION_CONTINUE;
  }
  if (conn->identity.is_tls) {
    reply_error_msg(conn, NBD_REP_ERR_INVALID, "TLS is already running");
    return OPTION_CONTINUE;
  }
  if (conn->opt_len != 0) {
    reply_error_msg(conn, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
    return OPTION_CONTINUE;
  }
  /* What was negotiated in plaintext does not carry over into TLS. */
  conn->structured = conn->extended = false;
  meta_clear(conn);
  reply_ack(conn);
  return OPTION_STARTTLS;
}

/* --tls=require: before TLS, nothing but STARTTLS and ABORT is served,
 * so no export name or data is seen in plaintext. */
static bool refused_before_tls(struct conn *conn)
{
  if (opt.tls != TLS_REQUIRE || conn->identity.is_tls)
    return false;
  switch (conn->opt_type) {
  case NBD_OPT_STARTTLS:
  case NBD_OPT_ABORT:
    return false;
  case NBD_OPT_EXPORT_NAME: /* cannot be answered with an error */
    nbdserve_error("connection %u: NBD_OPT_EXPORT_NAME without TLS under --tls=require; "
                   "closing", conn->id);
    return true;
  default:
    reply_error_msg(conn, NBD_REP_ERR_TLS_REQD, "this server requires TLS (NBD_OPT_STARTTLS)");
    return true;
  }
}

/* Runs on a worker (or inline): process conn->opt_type / opt_data. */
static enum option_result process_option(struct conn *conn)
{
  nbdserve_debug("connection %u: option %u, %u bytes", conn->id, conn->opt_type, conn->opt_len);
  if (refused_before_tls(conn))
    return conn->opt_type == NBD_OPT_EXPORT_NAME ? OPTION_CLOSE : OPTION_CONTINUE;
  switch (conn->opt_type) {
  case NBD_OPT_EXPORT_NAME:
    return opt_export_name(conn);
  case NBD_OPT_ABORT:
    reply_ack(conn);
    return OPTION_CLOSE;
  case NBD_OPT_LIST:
    return opt_list(conn);
  case NBD_OPT_STARTTLS:
    return opt_starttls(conn);
  case NBD_OPT_INFO:
  case NBD_OPT_GO:
    return opt_info_go(conn);
  case NBD_OPT_STRUCTURED_REPLY:
    if (conn->extended) { /* replies cannot go back to the compact form */
      reply_error_msg(conn, NBD_REP_ERR_EXT_HEADER_REQD, "extended headers are already in use");
      return OPTION_CONTINUE;
    }
    return opt_flag_only(conn, &conn->structured, "NBD_OPT_STRUCTURED_REPLY");
  case NBD_OPT_EXTENDED_HEADERS: {
    enum option_result res = opt_flag_only(conn, &conn->extended, "NBD_OPT_EXTENDED_HEADERS");
    if (conn->extended)
      conn->structured = true;
    return res;
  }
  case NBD_OPT_LIST_META_CONTEXT:
  case NBD_OPT_SET_META_CONTEXT:
    return opt_meta_context(conn);
  default:
    reply_error_msg(conn, NBD_REP_ERR_UNSUP, "option %u is not supported", conn->opt_type);
    return OPTION_CONTINUE;
  }
}

static void option_job_run(struct job *job)
{
  struct conn *conn = (struct conn *) ((char *) job - offsetof(struct conn, option_job));
  pthread_mutex_t *lock = exec_begin(conn, CALL_CONNECTION);
  enum option_result result = process_option(conn);
  exec_end(lock);

  pthread_mutex_lock(&conn->lock);
  conn->opt_result = result;
  conn->opt_running = false;
  conn->in_flight--; /* the connection may be freed once we unlock */
  conn_kick(conn);
  pthread_mutex_unlock(&conn->lock);
}

/* ---- Oldstyle: export opened at once, no options ------------------------ */

static void oldstyle_job_run(struct job *job)
{
  struct conn *conn = (struct conn *) ((char *) job - offsetof(struct conn, option_job));
  char msg[256];
  enum option_result result = OPTION_CLOSE;

  pthread_mutex_t *lock = exec_begin(conn, CALL_CONNECTION);
  if (open_export(conn, "", msg, sizeof msg) == 0) {
    static const char zeroes[124];
    struct bytebuf *b = &conn->hs_out;
    bytebuf_put_u64(b, NBD_MAGIC);
    bytebuf_put_u64(b, NBD_OLD_VERSION);
    bytebuf_put_u64(b, (uint64_t) conn->size);
    bytebuf_put_u32(b, conn->eflags); /* global flags (none) + export flags */
    bytebuf_append(b, zeroes, sizeof zeroes);
    result = OPTION_TRANSMIT;
  }
  exec_end(lock);
  pthread_mutex_lock(&conn->lock);
  conn->opt_result = result;
  conn->opt_running = false;
  conn->in_flight--; /* the connection may be freed once we unlock */
  conn_kick(conn);
  pthread_mutex_unlock(&conn->lock);
}

static void start_option_job(struct conn *conn, void (*run)(struct job *))
{
  conn->state = CONN_OPTION_BUSY;
  pthread_mutex_lock(&conn->lock);
  conn->opt_result = OPTION_PENDING;
  conn->opt_running = true;
  conn->in_flight++; /* keeps the connection alive while the job runs */
  pthread_mutex_unlock(&conn->lock);
  conn->option_job.run = run; /* the loop stops reading while state is CONN_OPTION_BUSY */
  dispatch_job(&conn->option_job);
}

/* ---- Loop side ------------------------------------------------------------ */

void handshake_start(struct conn *conn)
{
  if (opt.oldstyle) {
    start_option_job(conn, oldstyle_job_run);
    return;
  }
  bytebuf_put_u64(&conn->hs_out, NBD_MAGIC);
  bytebuf_put_u64(&conn->hs_out, NBD_NEW_VERSION);
  bytebuf_put_u16(&conn->hs_out, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  conn->state = CONN_GREETING;
}

static size_t available(struct conn *conn)
{
  return conn->in_end - conn->in_start;
}

static uint32_t take_u32(struct conn *conn)
{
  uint32_t v = wire_get32(conn->inbuf + conn->in_start);
  conn->in_start += 4;
  return v;
}

static uint64_t take_u64(struct conn *conn)
{
  uint64_t v = wire_get64(conn->inbuf + conn->in_start);
  conn->in_start += 8;
  return v;
}

bool handshake_input(struct conn *conn)
{
  if (conn->state == CONN_GREETING) {
    if (available(conn) < 4)
      return true;
    uint32_t cflags = take_u32(conn);
    if (cflags & ~(uint32_t) (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
      nbdserve_error("connection %u: unknown client flags 0x%x", conn->id, cflags);
      return false;
    }
    conn->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;
    conn->state = CONN_OPTIONS;
  }

  while (conn->state == CONN_OPTIONS) {
    if (!conn->opt_header_seen) {
      if (available(conn) < sizeof(struct nbd_option_header))
        return true;
      uint64_t magic = take_u64(conn);
      conn->opt_type = take_u32(conn);
      conn->opt_len = take_u32(conn);
      if (magic != NBD_NEW_VERSION) {
        nbdserve_error("connection %u: bad option magic 0x%016llx", conn->id,
                       (unsigned long long) magic);
        return false;
      }
      if (++conn->options_seen > MAX_OPTIONS) {
        nbdserve_error("connection %u: more than %d options, giving up", conn->id,
                       MAX_OPTIONS);
        return false;
      }
      if (conn->opt_len > MAX_OPTION_LENGTH) {
        /* Refuse without reading (possibly gigabytes of) the data. */
        if (conn->opt_type != NBD_OPT_EXPORT_NAME)
          reply_error_msg(conn, NBD_REP_ERR_TOO_BIG, "option of %u bytes is too long",
                          conn->opt_len);
        nbdserve_error("connection %u: option %u of %u bytes is too long, closing",
                       conn->id, conn->opt_type, conn->opt_len);
        return false;
      }
      free(conn->opt_data);
      conn->opt_data = malloc(conn->opt_len ? conn->opt_len : 1);
      if (conn->opt_data == NULL)
        die("out of memory");
      conn->opt_got = 0;
      conn->opt_header_seen = true;
    }
    size_t n = MIN(available(conn), (size_t) (conn->opt_len - conn->opt_got));
    memcpy(conn->opt_data + conn->opt_got, conn->inbuf + conn->in_start, n);
    conn->in_start += n;
    conn->opt_got += (uint32_t) n;
    if (conn->opt_got < conn->opt_len)
      return true;
    conn->opt_header_seen = false;
    start_option_job(conn, option_job_run);
  }
  return true;
}

/* The option job is done and its replies are out: what the loop does
 * next follows from the result, which this returns (OPTION_CONTINUE:
 * read the next option; OPTION_TRANSMIT: transmission begins;
 * OPTION_STARTTLS: the TLS handshake begins; OPTION_CLOSE). */
enum option_result handshake_option_finished(struct conn *conn)
{
  enum option_result result = conn->opt_result;
  conn->opt_result = OPTION_PENDING;

  switch (result) {
  case OPTION_PENDING:
  case OPTION_CLOSE:
  case OPTION_STARTTLS:
    break;
  case OPTION_CONTINUE:
    conn->state = CONN_OPTIONS;
    break;
  case OPTION_TRANSMIT:
    nbdserve_debug("connection %u: export '%s', size %lld, flags 0x%x%s%s", conn->id,
                   conn->export_name, (long long) conn->size, conn->eflags,
                   conn->structured ? ", structured replies" : "",
                   conn->extended ? ", extended headers" : "");
    conn->state = CONN_TRANSMISSION;
    break;
  }
  return result;
}
