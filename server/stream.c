/* nbdserve - a connection's byte stream: plain, or through TLS.
 *
 * Every read and write of a connection goes through conn->stream, a
 * table of two functions.  A connection starts plain; STARTTLS swaps
 * the table once the TLS session exists, so the rest of the server has
 * one path for both and never asks which it is on.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <sys/uio.h>
#include <unistd.h>

#include "conn.h"
#include "tls.h"

static ssize_t plain_recv(struct conn *conn, void *buf, size_t len)
{
  return read(conn->rfd, buf, len);
}

static ssize_t plain_writev(struct conn *conn, const struct iovec *iov, int niov)
{
  return writev(conn->wfd, iov, niov);
}

static ssize_t tls_stream_recv(struct conn *conn, void *buf, size_t len)
{
  return tls_recv(conn->tls, buf, len);
}

static ssize_t tls_stream_writev(struct conn *conn, const struct iovec *iov, int niov)
{
  return tls_writev(conn->tls, iov, niov);
}

const struct stream plain_stream = { plain_recv, plain_writev, false };
const struct stream tls_stream = { tls_stream_recv, tls_stream_writev, true };
