/* nbdserve - TLS sessions on mbedtls (tls.c).
 *
 * A session wraps one connection's socket after NBD_OPT_STARTTLS.  It is
 * driven without blocking from the loop thread only: mbedtls contexts are
 * not thread-safe, so workers never touch a TLS connection's socket (they
 * queue their replies for the loop to write).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_TLS_H
#define NBDSERVE_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

/* The most plaintext one TLS record carries. */
#define TLS_RECORD_SIZE 16384

struct tls_session;

/* Start-up, before the first connection: load the certificates or the
 * keys named by opt.tls_*; exits with a message when they are unusable. */
extern void tls_setup(void);
extern void tls_cleanup(void);

extern struct tls_session *tls_session_new(int rfd, int wfd, unsigned conn_id);
extern void tls_session_free(struct tls_session *s);

enum tls_step { TLS_DONE, TLS_WANT_READ, TLS_WANT_WRITE, TLS_FAILED };
/* Advance the handshake as far as the socket allows. */
extern enum tls_step tls_handshake(struct tls_session *s);

/* read(2)/writev(2) alike: -1 with errno EAGAIN when the socket is not
 * ready, 0 from tls_recv when the peer closed.  tls_writev writes at
 * most one record; after EAGAIN it must be called again with the same
 * bytes at the front of IOV. */
extern ssize_t tls_recv(struct tls_session *s, void *buf, size_t len);
extern ssize_t tls_writev(struct tls_session *s, const struct iovec *iov, int niov);

/* Decrypted bytes waiting inside the session: the socket will not wake
 * the loop for them. */
extern size_t tls_pending(struct tls_session *s);
extern bool tls_wants_write(const struct tls_session *s);
/* The peer: certificate subject DN or PSK identity; "" if none. */
extern const char *tls_peer_identity(const struct tls_session *s);
/* The orderly end: close_notify before the socket closes. */
extern void tls_close_notify(struct tls_session *s);

#endif /* NBDSERVE_TLS_H */
