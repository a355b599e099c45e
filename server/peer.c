/* nbdserve - who is at the other end of a client socket.
 *
 * One reading of a peer, for the access rules (acl.c, at accept) and for
 * the connection details plugins ask about (public.c): its address, and
 * for a Unix socket the credentials the kernel vouches for
 * (SO_PEERCRED).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <string.h>

#include "internal.h"

int peer_identify(int fd, struct peer *p)
{
  memset(p, 0, sizeof *p);
  socklen_t len = sizeof p->addr;
  if (fd < 0 || getpeername(fd, (struct sockaddr *) &p->addr, &len) == -1) {
    if (fd < 0)
      errno = EBADF;
    return -1;
  }
  p->addr_len = len;
  if (p->addr.ss_family != AF_UNIX)
    return 0;
  socklen_t clen = sizeof p->cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &p->cred, &clen) == -1)
    return -1;
  p->have_cred = true;
  return 0;
}
