/* nbdserve - TLS on mbedtls: credentials at start-up, and one
 * non-blocking session per connection that negotiated NBD_OPT_STARTTLS.
 *
 * Credentials are either X.509 (a directory holding ca-cert.pem,
 * server-cert.pem, server-key.pem and optionally ca-crl.pem) or
 * pre-shared keys (a psktool file of identity:hexkey lines).  One
 * mbedtls_ssl_config is shared by every session; it is read-only once
 * set up.  Sessions do their I/O through our own BIO callbacks on the
 * connection's non-blocking socket and report "would block" upwards, so
 * the loop thread never waits on a slow or hostile peer.
 *
 * Key material is never logged: errors in a PSK file name the line,
 * never its contents.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/pk.h>
#include <mbedtls/platform_util.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crl.h>
#include <mbedtls/x509_crt.h>

#include "internal.h"
#include "tls.h"

#define MAX_IDENTITY 256
#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)
#define KEY_LIMIT STRINGIFY(MBEDTLS_PSK_MAX_LEN)

struct psk {
  char *identity;
  unsigned char key[MBEDTLS_PSK_MAX_LEN];
  size_t key_len;
};

static mbedtls_ssl_config config;
static mbedtls_x509_crt ca_chain, server_chain;
static mbedtls_x509_crl crl;
static mbedtls_pk_context server_key;
static struct psk *psks;
static size_t nr_psks;

struct tls_session {
  mbedtls_ssl_context ssl; /* first: the PSK callback gets only this */
  int rfd, wfd;
  unsigned conn_id;
  bool established, closed, want_write;
  /* A record mbedtls could not finish sending: the next write must ask
   * for the same length again. */
  size_t unfinished_len;
  bool unfinished_staged;
  char identity[MAX_IDENTITY];
  unsigned char stage[TLS_RECORD_SIZE]; /* small replies gathered into one record */
  /* Read-ahead: mbedtls asks for a record's header, then its body; one
   * read(2) of many records saves most of those system calls. */
  unsigned char inbuf[4 * TLS_RECORD_SIZE];
  size_t in_start, in_end;
};

static const char *tls_strerror(int err)
{
  static char buf[160];
  mbedtls_strerror(err, buf, sizeof buf);
  return buf;
}

/* ---- Credentials ------------------------------------------------------- */

/* Secrets readable by others are a mistake worth stopping for under
 * --tls-strict-keys, and worth a warning otherwise. */
static void check_key_permissions(const char *path)
{
  struct stat st;
  if (stat(path, &st) == -1)
    die("%s: %s", path, strerror(errno));
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) == 0)
    return;
  if (opt.tls_strict_keys)
    die("%s: the key is readable by group or others (mode %03o); "
        "run 'chmod 600 %s' (refused under --tls-strict-keys)",
        path, (unsigned) (st.st_mode & 0777), path);
  nbdserve_error("warning: %s: the key is readable by group or others (mode %03o); "
                 "run 'chmod 600 %s'", path, (unsigned) (st.st_mode & 0777), path);
}

static char *dir_file(const char *dir, const char *name)
{
  char *path;
  if (asprintf(&path, "%s/%s", dir, name) == -1)
    die("out of memory");
  return path;
}

static void load_certificates(const char *dir)
{
  char *cert = dir_file(dir, "server-cert.pem");
  char *key = dir_file(dir, "server-key.pem");
  char *ca = dir_file(dir, "ca-cert.pem");
  char *crl_file = dir_file(dir, "ca-crl.pem");
  bool have_ca = false, have_crl = false;
  int r;

  if ((r = mbedtls_x509_crt_parse_file(&server_chain, cert)) != 0)
    die("--tls-certificates: %s: %s", cert, r == MBEDTLS_ERR_PK_FILE_IO_ERROR
                                               ? "cannot read the file" : tls_strerror(r));
  check_key_permissions(key);
  if ((r = mbedtls_pk_parse_keyfile(&server_key, key, NULL)) != 0)
    die("--tls-certificates: %s: %s", key, r == MBEDTLS_ERR_PK_FILE_IO_ERROR
                                              ? "cannot read the file" : tls_strerror(r));
  if ((r = mbedtls_ssl_conf_own_cert(&config, &server_chain, &server_key)) != 0)
    die("--tls-certificates: %s and %s do not go together: %s", cert, key, tls_strerror(r));

  if (access(ca, F_OK) == 0) {
    if ((r = mbedtls_x509_crt_parse_file(&ca_chain, ca)) != 0)
      die("--tls-certificates: %s: %s", ca, tls_strerror(r));
    have_ca = true;
  }
  if (access(crl_file, F_OK) == 0) {
    if ((r = mbedtls_x509_crl_parse_file(&crl, crl_file)) != 0)
      die("--tls-certificates: %s: %s", crl_file, tls_strerror(r));
    have_crl = true;
  }
  if (opt.tls_verify_peer && !have_ca)
    die("--tls-verify-peer: %s is missing: client certificates are checked against it", ca);
  if (have_ca)
    mbedtls_ssl_conf_ca_chain(&config, &ca_chain, have_crl ? &crl : NULL);
  mbedtls_ssl_conf_authmode(&config, opt.tls_verify_peer ? MBEDTLS_SSL_VERIFY_REQUIRED
                                                         : MBEDTLS_SSL_VERIFY_NONE);
  free(cert), free(key), free(ca), free(crl_file);
}

static int hex_digit(int c)
{
  if (c >= '0' && c <= '9')
    return c - '0';
  c = tolower(c);
  return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* One "identity:hexkey" line into P; returns an error text or NULL. */
static const char *parse_psk_line(char *line, struct psk *p)
{
  char *colon = strrchr(line, ':');
  if (colon == NULL)
    return "expected identity:hexkey";
  *colon = '\0';
  const char *hex = colon + 1;
  size_t hexlen = strlen(hex);
  if (line[0] == '\0')
    return "the identity is empty";
  if (strlen(line) >= MAX_IDENTITY)
    return "the identity is too long";
  if (hexlen == 0 || hexlen % 2 != 0)
    return "the key is not an even number of hex digits";
  if (hexlen / 2 > MBEDTLS_PSK_MAX_LEN)
    return "the key is longer than the " KEY_LIMIT " bytes TLS allows here";
  for (size_t i = 0; i < hexlen; i += 2) {
    int hi = hex_digit(hex[i]), lo = hex_digit(hex[i + 1]);
    if (hi < 0 || lo < 0)
      return "the key is not hexadecimal";
    p->key[i / 2] = (unsigned char) (hi << 4 | lo);
  }
  p->key_len = hexlen / 2;
  p->identity = strdup(line);
  if (p->identity == NULL)
    die("out of memory");
  return NULL;
}

static void load_psk_file(const char *path)
{
  check_key_permissions(path);
  FILE *fp = fopen(path, "r");
  if (fp == NULL)
    die("--tls-psk: %s: %s", path, strerror(errno));
  char *line = NULL;
  size_t cap = 0;
  ssize_t len;
  unsigned lineno = 0;
  while ((len = getline(&line, &cap, fp)) != -1) {
    lineno++;
    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
      line[--len] = '\0';
    if (len == 0 || line[0] == '#')
      continue;
    struct psk p;
    const char *err = parse_psk_line(line, &p);
    mbedtls_platform_zeroize(line, (size_t) len);
    if (err)
      die("--tls-psk: %s, line %u: %s", path, lineno, err);
    for (size_t i = 0; i < nr_psks; i++)
      if (strcmp(psks[i].identity, p.identity) == 0)
        die("--tls-psk: %s, line %u: identity '%s' appears twice", path, lineno, p.identity);
    struct psk *grown = realloc(psks, (nr_psks + 1) * sizeof *grown);
    if (grown == NULL)
      die("out of memory");
    psks = grown;
    psks[nr_psks++] = p;
    mbedtls_platform_zeroize(&p, sizeof p);
  }
  if (line)
    mbedtls_platform_zeroize(line, cap);
  free(line);
  fclose(fp);
  if (nr_psks == 0)
    die("--tls-psk: %s holds no keys (expected identity:hexkey lines, as psktool writes)", path);
}

/* A printable, bounded copy of what a client sent, for messages. */
static void printable(char *out, size_t outlen, const unsigned char *in, size_t inlen)
{
  size_t o = 0;
  for (size_t i = 0; i < inlen && o + 5 < outlen; i++)
    o += (size_t) snprintf(out + o, outlen - o, isprint(in[i]) && in[i] != '\\' ? "%c" : "\\x%02x",
                           in[i]);
  out[o] = '\0';
}

static int psk_callback(void *unused, mbedtls_ssl_context *ssl, const unsigned char *id,
                        size_t id_len)
{
  (void) unused;
  struct tls_session *s = (struct tls_session *) ssl;
  for (size_t i = 0; i < nr_psks; i++) {
    if (strlen(psks[i].identity) == id_len && memcmp(psks[i].identity, id, id_len) == 0) {
      snprintf(s->identity, sizeof s->identity, "%s", psks[i].identity);
      return mbedtls_ssl_set_hs_psk(ssl, psks[i].key, psks[i].key_len);
    }
  }
  char shown[128];
  printable(shown, sizeof shown, id, id_len);
  nbdserve_error("connection %u: TLS: unknown PSK identity '%s'", s->conn_id, shown);
  return -1;
}

/* mbedtls is built without its threading layer, so a random generator
 * must never be shared between threads: each connection loop's thread
 * seeds its own on first use (the shared configuration calls
 * random_bytes, which picks the caller's). */
struct thread_rng {
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
};
static pthread_key_t rng_key;
static __thread struct thread_rng *rng;

static void rng_free(void *p)
{
  struct thread_rng *r = p;
  mbedtls_ctr_drbg_free(&r->drbg);
  mbedtls_entropy_free(&r->entropy);
  free(r);
}

static struct thread_rng *thread_rng(void)
{
  if (rng)
    return rng;
  struct thread_rng *r = calloc(1, sizeof *r);
  if (r == NULL)
    return NULL;
  mbedtls_entropy_init(&r->entropy);
  mbedtls_ctr_drbg_init(&r->drbg);
  static const unsigned char personal[] = "nbdserve";
  int err = mbedtls_ctr_drbg_seed(&r->drbg, mbedtls_entropy_func, &r->entropy, personal,
                                  sizeof personal - 1);
  if (err != 0) {
    nbdserve_error("TLS: seeding the random generator: %s", tls_strerror(err));
    rng_free(r);
    return NULL;
  }
  pthread_setspecific(rng_key, r);
  rng = r;
  return r;
}

static int random_bytes(void *unused, unsigned char *out, size_t len)
{
  (void) unused;
  struct thread_rng *r = thread_rng();
  if (r == NULL)
    return MBEDTLS_ERR_CTR_DRBG_ENTROPY_SOURCE_FAILED;
  return mbedtls_ctr_drbg_random(&r->drbg, out, len);
}

void tls_setup(void)
{
  mbedtls_ssl_config_init(&config);
  mbedtls_x509_crt_init(&ca_chain);
  mbedtls_x509_crt_init(&server_chain);
  mbedtls_x509_crl_init(&crl);
  mbedtls_pk_init(&server_key);

  if (pthread_key_create(&rng_key, rng_free) != 0 || thread_rng() == NULL)
    die("TLS: cannot set up a random generator");
  int r = mbedtls_ssl_config_defaults(&config, MBEDTLS_SSL_IS_SERVER, MBEDTLS_SSL_TRANSPORT_STREAM,
                                  MBEDTLS_SSL_PRESET_DEFAULT);
  if (r != 0)
    die("TLS: %s", tls_strerror(r));
  mbedtls_ssl_conf_rng(&config, random_bytes, NULL);
  /* TLS 1.2 at least: older versions have known weaknesses. */
  mbedtls_ssl_conf_min_version(&config, MBEDTLS_SSL_MAJOR_VERSION_3,
                               MBEDTLS_SSL_MINOR_VERSION_3);
  mbedtls_ssl_conf_renegotiation(&config, MBEDTLS_SSL_RENEGOTIATION_DISABLED);

  if (opt.tls_certificates)
    load_certificates(opt.tls_certificates);
  else {
    load_psk_file(opt.tls_psk);
    mbedtls_ssl_conf_psk_cb(&config, psk_callback, NULL);
  }
}

void tls_cleanup(void)
{
  for (size_t i = 0; i < nr_psks; i++) {
    mbedtls_platform_zeroize(psks[i].key, sizeof psks[i].key);
    free(psks[i].identity);
  }
  free(psks);
  psks = NULL;
  nr_psks = 0;
  mbedtls_pk_free(&server_key);
  mbedtls_x509_crl_free(&crl);
  mbedtls_x509_crt_free(&server_chain);
  mbedtls_x509_crt_free(&ca_chain);
  mbedtls_ssl_config_free(&config);
  if (rng) {
    pthread_setspecific(rng_key, NULL);
    rng_free(rng);
    rng = NULL;
  }
}

/* ---- The socket under a session ---------------------------------------- */

static int bio_send(void *ctx, const unsigned char *buf, size_t len)
{
  struct tls_session *s = ctx;
  ssize_t r = write(s->wfd, buf, len);
  if (r >= 0)
    return (int) r;
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
    return MBEDTLS_ERR_SSL_WANT_WRITE;
  return MBEDTLS_ERR_NET_SEND_FAILED;
}

static int bio_recv(void *ctx, unsigned char *buf, size_t len)
{
  struct tls_session *s = ctx;
  if (s->in_start == s->in_end) {
    ssize_t r = read(s->rfd, s->inbuf, sizeof s->inbuf);
    if (r == 0)
      return 0; /* the peer closed; mbedtls reports it */
    if (r < 0)
      return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR
               ? MBEDTLS_ERR_SSL_WANT_READ : MBEDTLS_ERR_NET_RECV_FAILED;
    s->in_start = 0;
    s->in_end = (size_t) r;
  }
  size_t n = MIN(len, s->in_end - s->in_start);
  memcpy(buf, s->inbuf + s->in_start, n);
  s->in_start += n;
  return (int) n;
}

/* ---- Sessions ---------------------------------------------------------- */

struct tls_session *tls_session_new(int rfd, int wfd, unsigned conn_id)
{
  struct tls_session *s = calloc(1, sizeof *s);
  if (s == NULL)
    return NULL;
  s->rfd = rfd;
  s->wfd = wfd;
  s->conn_id = conn_id;
  mbedtls_ssl_init(&s->ssl);
  int r = mbedtls_ssl_setup(&s->ssl, &config);
  if (r != 0) {
    nbdserve_error("connection %u: TLS: %s", conn_id, tls_strerror(r));
    mbedtls_ssl_free(&s->ssl);
    free(s);
    return NULL;
  }
  mbedtls_ssl_set_bio(&s->ssl, s, bio_send, bio_recv, NULL);
  return s;
}

void tls_session_free(struct tls_session *s)
{
  if (s == NULL)
    return;
  mbedtls_ssl_free(&s->ssl);
  mbedtls_platform_zeroize(s, sizeof *s);
  free(s);
}

/* After the handshake: who the peer is, for plugins and the log. */
static void record_peer(struct tls_session *s)
{
  const mbedtls_x509_crt *peer = mbedtls_ssl_get_peer_cert(&s->ssl);
  if (peer && mbedtls_x509_dn_gets(s->identity, sizeof s->identity, &peer->subject) < 0)
    s->identity[0] = '\0';
  nbdserve_debug("connection %u: TLS up, %s, %s%s%s", s->conn_id,
                 mbedtls_ssl_get_version(&s->ssl), mbedtls_ssl_get_ciphersuite(&s->ssl),
                 s->identity[0] ? ", peer " : "", s->identity);
}

static void report_failure(struct tls_session *s, int r)
{
  uint32_t flags = mbedtls_ssl_get_verify_result(&s->ssl);
  if (r == MBEDTLS_ERR_X509_CERT_VERIFY_FAILED && flags != 0 && flags != (uint32_t) -1) {
    char why[256];
    mbedtls_x509_crt_verify_info(why, sizeof why, "", flags);
    why[strcspn(why, "\n")] = '\0';
    nbdserve_error("connection %u: TLS: the client's certificate is not trusted: %s",
                   s->conn_id, why);
  }
  else if (r == MBEDTLS_ERR_SSL_CONN_EOF || r == MBEDTLS_ERR_NET_RECV_FAILED ||
           r == MBEDTLS_ERR_NET_SEND_FAILED)
    nbdserve_error("connection %u: TLS: the client left during the handshake", s->conn_id);
  else if (r == MBEDTLS_ERR_SSL_BAD_HS_FINISHED && nr_psks > 0)
    nbdserve_error("connection %u: TLS handshake failed: %s (the client's key for "
                   "identity '%s' is wrong?)", s->conn_id, tls_strerror(r), s->identity);
  else
    nbdserve_error("connection %u: TLS handshake failed: %s", s->conn_id, tls_strerror(r));
}

enum tls_step tls_handshake(struct tls_session *s)
{
  int r = mbedtls_ssl_handshake(&s->ssl);
  s->want_write = r == MBEDTLS_ERR_SSL_WANT_WRITE;
  if (r == 0) {
    s->established = true;
    record_peer(s);
    return TLS_DONE;
  }
  if (r == MBEDTLS_ERR_SSL_WANT_READ)
    return TLS_WANT_READ;
  if (r == MBEDTLS_ERR_SSL_WANT_WRITE)
    return TLS_WANT_WRITE;
  report_failure(s, r);
  return TLS_FAILED;
}

/* One record's worth at most. */
static int read_record(struct tls_session *s, void *buf, size_t len)
{
  int r = mbedtls_ssl_read(&s->ssl, buf, len);
  s->want_write = r == MBEDTLS_ERR_SSL_WANT_WRITE;
  return r;
}

ssize_t tls_recv(struct tls_session *s, void *buf, size_t len)
{
  int r = read_record(s, buf, len);
  if (r > 0) {
    /* Go on while whole records are at hand: fewer trips round the loop. */
    size_t got = (size_t) r;
    while (got < len && s->in_start < s->in_end) {
      r = read_record(s, (char *) buf + got, len - got);
      if (r <= 0)
        break; /* anything unusual is reported by the next call */
      got += (size_t) r;
    }
    return (ssize_t) got;
  }
  if (r == 0 || r == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY || r == MBEDTLS_ERR_SSL_CONN_EOF) {
    s->closed = true;
    return 0;
  }
  if (r == MBEDTLS_ERR_SSL_WANT_READ || r == MBEDTLS_ERR_SSL_WANT_WRITE) {
    errno = EAGAIN;
    return -1;
  }
  nbdserve_debug("connection %u: TLS read: %s", s->conn_id, tls_strerror(r));
  errno = ECONNRESET;
  return -1;
}

ssize_t tls_writev(struct tls_session *s, const struct iovec *iov, int niov)
{
  const unsigned char *data;
  size_t len;

  if (s->unfinished_len) {
    /* mbedtls holds the encrypted record: it wants the same call again. */
    data = s->unfinished_staged ? s->stage : iov[0].iov_base;
    len = s->unfinished_len;
  }
  else if (niov == 1 || iov[0].iov_len >= TLS_RECORD_SIZE) {
    data = iov[0].iov_base; /* big enough to fill a record by itself */
    len = MIN(iov[0].iov_len, (size_t) TLS_RECORD_SIZE);
    s->unfinished_staged = false;
  }
  else {
    /* Gather small pieces (reply headers, small reads) into one record. */
    len = 0;
    for (int i = 0; i < niov && len < TLS_RECORD_SIZE; i++) {
      size_t n = MIN(iov[i].iov_len, TLS_RECORD_SIZE - len);
      memcpy(s->stage + len, iov[i].iov_base, n);
      len += n;
    }
    data = s->stage;
    s->unfinished_staged = true;
  }
  if (len == 0)
    return 0;

  int r = mbedtls_ssl_write(&s->ssl, data, len);
  s->want_write = r == MBEDTLS_ERR_SSL_WANT_WRITE;
  if (r >= 0) {
    s->unfinished_len = 0;
    return r;
  }
  if (r == MBEDTLS_ERR_SSL_WANT_WRITE || r == MBEDTLS_ERR_SSL_WANT_READ) {
    s->unfinished_len = len;
    errno = EAGAIN;
    return -1;
  }
  nbdserve_debug("connection %u: TLS write: %s", s->conn_id, tls_strerror(r));
  errno = EPIPE;
  return -1;
}

size_t tls_pending(struct tls_session *s)
{
  return mbedtls_ssl_get_bytes_avail(&s->ssl) + (s->in_end - s->in_start);
}

bool tls_wants_write(const struct tls_session *s)
{
  return s->want_write;
}

const char *tls_peer_identity(const struct tls_session *s)
{
  return s->identity;
}

/* Best effort: a peer that does not read gets no second chance. */
void tls_close_notify(struct tls_session *s)
{
  if (s->established && !s->closed && s->unfinished_len == 0)
    (void) mbedtls_ssl_close_notify(&s->ssl);
  s->closed = true;
}
