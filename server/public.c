/* nbdserve - helper functions exported to plugins and filters.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <termios.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "conn.h"

__thread const struct conn_identity *current_identity;
__thread int backend_error; /* set by nbdserve_set_error, read by backend.c */

void nbdserve_set_error(int err)
{
  backend_error = err;
  errno = err;
}

/* ---- Numbers ------------------------------------------------------------- */

int64_t nbdserve_parse_size(const char *str)
{
  const char *p = str;
  while (isspace((unsigned char) *p))
    p++;
  if (!isdigit((unsigned char) *p)) {
    nbdserve_error("could not parse size '%s': expected a number with an optional "
                   "suffix (K, M, G, T, P, E, or s for 512-byte sectors)", str);
    return -1;
  }
  errno = 0;
  char *end;
  unsigned long long n = strtoull(p, &end, 10);
  if (errno == ERANGE || n > INT64_MAX) {
    nbdserve_error("size '%s' is too large", str);
    return -1;
  }
  unsigned shift = 0;
  switch (*end) {
  case '\0':
    break;
  case 'b': case 'B': shift = 0; end++; break;
  case 's': case 'S': shift = 9; end++; break;
  case 'k': case 'K': shift = 10; end++; break;
  case 'm': case 'M': shift = 20; end++; break;
  case 'g': case 'G': shift = 30; end++; break;
  case 't': case 'T': shift = 40; end++; break;
  case 'p': case 'P': shift = 50; end++; break;
  case 'e': case 'E': shift = 60; end++; break;
  default:
    nbdserve_error("could not parse size '%s': unknown suffix '%s'", str, end);
    return -1;
  }
  /* Accept "1G", "1GB", "1GiB" alike. */
  if (shift >= 10 && (strcasecmp(end, "b") == 0 || strcasecmp(end, "ib") == 0))
    end += strlen(end);
  if (*end != '\0') {
    nbdserve_error("could not parse size '%s': trailing characters '%s'", str, end);
    return -1;
  }
  if (shift && n > ((unsigned long long) INT64_MAX >> shift)) {
    nbdserve_error("size '%s' is too large (the limit is 2^63-1 bytes)", str);
    return -1;
  }
  return (int64_t) (n << shift);
}

int nbdserve_parse_bool(const char *str)
{
  static const char *const yes[] = { "1", "true", "yes", "on" };
  static const char *const no[] = { "0", "false", "no", "off" };
  for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
    if (strcasecmp(str, yes[i]) == 0)
      return 1;
    if (strcasecmp(str, no[i]) == 0)
      return 0;
  }
  nbdserve_error("could not parse '%s' as a boolean (use true/false, yes/no, on/off, 1/0)",
                 str);
  return -1;
}

int nbdserve_parse_uint64(const char *what, const char *str, uint64_t *ret)
{
  char *end;
  errno = 0;
  if (!isdigit((unsigned char) str[0])) {
    nbdserve_error("%s: '%s' is not a whole number", what, str);
    return -1;
  }
  unsigned long long n = strtoull(str, &end, 0);
  if (errno == ERANGE) {
    nbdserve_error("%s: '%s' is out of range", what, str);
    return -1;
  }
  if (*end != '\0') {
    nbdserve_error("%s: '%s' is not a whole number", what, str);
    return -1;
  }
  *ret = n;
  return 0;
}

int nbdserve_parse_uint32(const char *what, const char *str, uint32_t *ret)
{
  uint64_t n;
  if (nbdserve_parse_uint64(what, str, &n) == -1)
    return -1;
  if (n > UINT32_MAX) {
    nbdserve_error("%s: '%s' is out of range (at most %u)", what, str, UINT32_MAX);
    return -1;
  }
  *ret = (uint32_t) n;
  return 0;
}

/* ---- Passwords ------------------------------------------------------------ */

/* Read all of FD into a fresh string, without one trailing newline. */
static int read_all(int fd, char **ret)
{
  size_t len = 0, cap = 128;
  char *buf = malloc(cap);
  if (buf == NULL)
    return -1;
  for (;;) {
    if (len + 1 >= cap) {
      char *p = realloc(buf, cap *= 2);
      if (p == NULL) {
        free(buf);
        return -1;
      }
      buf = p;
    }
    ssize_t r = read(fd, buf + len, cap - len - 1);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0) {
      free(buf);
      return -1;
    }
    if (r == 0)
      break;
    len += (size_t) r;
  }
  if (len > 0 && buf[len - 1] == '\n')
    len--;
  buf[len] = '\0';
  *ret = buf;
  return 0;
}

static int prompt_password(char **ret)
{
  int fd = open("/dev/tty", O_RDWR | O_CLOEXEC);
  if (fd == -1) {
    nbdserve_error("password=-: cannot open the terminal: %m");
    return -1;
  }
  struct termios saved, quiet;
  bool have_tty = tcgetattr(fd, &saved) == 0;
  if (have_tty) {
    quiet = saved;
    quiet.c_lflag &= ~(tcflag_t) ECHO;
    tcsetattr(fd, TCSAFLUSH, &quiet);
  }
  static const char prompt[] = "password: ";
  ssize_t ignored = write(fd, prompt, sizeof prompt - 1);
  (void) ignored;
  char line[1024];
  size_t len = 0;
  char c;
  while (len < sizeof line - 1 && read(fd, &c, 1) == 1 && c != '\n')
    line[len++] = c;
  line[len] = '\0';
  if (have_tty)
    tcsetattr(fd, TCSAFLUSH, &saved);
  ignored = write(fd, "\n", 1);
  close(fd);
  *ret = strdup(line);
  explicit_bzero(line, sizeof line);
  return *ret ? 0 : -1;
}

int nbdserve_read_password(const char *value, char **password)
{
  *password = NULL;
  if (strcmp(value, "-") == 0)
    return prompt_password(password);
  if (value[0] == '-' && isdigit((unsigned char) value[1])) {
    uint32_t fd;
    if (nbdserve_parse_uint32("password file descriptor", value + 1, &fd) == -1)
      return -1;
    if (read_all((int) fd, password) == -1) {
      nbdserve_error("cannot read the password from file descriptor %u: %m", fd);
      return -1;
    }
    close((int) fd);
    return 0;
  }
  if (value[0] == '+') {
    int fd = open(value + 1, O_RDONLY | O_CLOEXEC);
    if (fd == -1 || read_all(fd, password) == -1) {
      nbdserve_error("cannot read the password from %s: %m", value + 1);
      if (fd != -1)
        close(fd);
      return -1;
    }
    close(fd);
    return 0;
  }
  *password = strdup(value);
  return *password ? 0 : -1;
}

/* ---- Connection information ------------------------------------------------- */

const char *nbdserve_export_name(void)
{
  return current_identity ? current_identity->export_name : NULL;
}

int nbdserve_is_tls(void)
{
  return current_identity ? current_identity->is_tls : 0;
}

const char *nbdserve_peer_tls_identity(void)
{
  return current_identity ? current_identity->tls_identity : NULL;
}

/* ---- Connection details ---------------------------------------------------- */

/* Once per connection, on its loop thread: who is at the other end.  A
 * descriptor that is not a socket (-s on a pipe) leaves it all unknown. */
void identity_gather_peer(struct conn_identity *id, int fd)
{
  struct peer *p = &id->peer;
  snprintf(id->peer_name, sizeof id->peer_name, "unknown");
  peer_identify(fd, p);
  if (p->addr_len == 0)
    return;
  char text[INET6_ADDRSTRLEN];
  switch (p->addr.ss_family) {
  case AF_INET: {
    const struct sockaddr_in *sin = (const struct sockaddr_in *) &p->addr;
    inet_ntop(AF_INET, &sin->sin_addr, text, sizeof text);
    snprintf(id->peer_name, sizeof id->peer_name, "%s:%u", text, ntohs(sin->sin_port));
    break;
  }
  case AF_INET6: {
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *) &p->addr;
    inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof text);
    snprintf(id->peer_name, sizeof id->peer_name, "[%s]:%u", text, ntohs(sin6->sin6_port));
    break;
  }
  case AF_UNIX:
    if (!p->have_cred)
      snprintf(id->peer_name, sizeof id->peer_name, "unix");
    else
      snprintf(id->peer_name, sizeof id->peer_name, "unix:uid=%u,gid=%u,pid=%d",
               (unsigned) p->cred.uid, (unsigned) p->cred.gid, (int) p->cred.pid);
    break;
  default:
    snprintf(id->peer_name, sizeof id->peer_name, "family %d", p->addr.ss_family);
    break;
  }
}

unsigned nbdserve_connection_id(void)
{
  return current_identity ? current_identity->conn_id : 0;
}

int nbdserve_peer_address(struct sockaddr_storage *addr, socklen_t *len)
{
  if (current_identity == NULL || current_identity->peer.addr_len == 0) {
    errno = ENOTCONN;
    return -1;
  }
  if (addr)
    memcpy(addr, &current_identity->peer.addr, sizeof *addr);
  if (len)
    *len = current_identity->peer.addr_len;
  return 0;
}

const char *nbdserve_peer_name(void)
{
  return current_identity ? current_identity->peer_name : NULL;
}

int nbdserve_peer_credentials(uid_t *uid, gid_t *gid, pid_t *pid)
{
  if (current_identity == NULL) {
    errno = ENOTCONN;
    return -1;
  }
  if (!current_identity->peer.have_cred) {
    errno = ENOTSUP;
    return -1;
  }
  if (uid)
    *uid = current_identity->peer.cred.uid;
  if (gid)
    *gid = current_identity->peer.cred.gid;
  if (pid)
    *pid = current_identity->peer.cred.pid;
  return 0;
}

/* The one lookup of a description: NBD_INFO_DESCRIPTION in handshake.c
 * answers with this too, so a plugin sees what clients see. */
char *nbdserve_export_description(const char *export)
{
  char *found = NULL;
  int err = ENOENT;
  struct nbdserve_exports *exports = nbdserve_exports_new();
  if (nbdserve_next_list_exports(chain_global(), opt.readonly, nbdserve_is_tls(), exports) == 0) {
    for (size_t i = 0; i < nbdserve_exports_count(exports); i++) {
      const char *desc = nbdserve_exports_description(exports, i);
      if (desc && strcmp(nbdserve_exports_name(exports, i), export) == 0) {
        found = strdup(desc);
        err = found ? 0 : ENOMEM;
        break;
      }
    }
  }
  else
    err = errno ? errno : EIO;
  nbdserve_exports_free(exports);
  errno = err;
  return found;
}

/* Strings handed out by nbdserve_strdup_connection: a list per
 * connection (under conn->lock, since parallel requests may add to it),
 * and one for callbacks outside any connection. */
struct conn_string {
  struct conn_string *next;
  char s[];
};
static pthread_mutex_t global_strings_lock = PTHREAD_MUTEX_INITIALIZER;
static struct conn_string *global_strings;

static void strings_free(struct conn_string *p)
{
  while (p) {
    struct conn_string *next = p->next;
    free(p);
    p = next;
  }
}

const char *nbdserve_strdup_connection(const char *s)
{
  size_t len = strlen(s);
  struct conn_string *p = malloc(sizeof *p + len + 1);
  if (p == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  memcpy(p->s, s, len + 1);
  struct conn *conn = current_identity ? current_identity->conn : NULL;
  pthread_mutex_t *lock = conn ? &conn->lock : &global_strings_lock;
  struct conn_string **list = conn ? &conn->strings : &global_strings;
  pthread_mutex_lock(lock);
  p->next = *list;
  *list = p;
  pthread_mutex_unlock(lock);
  return p->s;
}

void connection_strings_free(struct conn *conn)
{
  strings_free(conn->strings);
  conn->strings = NULL;
}

void global_strings_free(void)
{
  pthread_mutex_lock(&global_strings_lock);
  struct conn_string *p = global_strings;
  global_strings = NULL;
  pthread_mutex_unlock(&global_strings_lock);
  strings_free(p);
}

/* Any callback thread: only records the wish and kicks the loop, which
 * owns the connection's life and acts in conn_service (connection.c). */
int nbdserve_disconnect(int force)
{
  struct conn *conn = current_identity ? current_identity->conn : NULL;
  if (conn == NULL) {
    errno = ENOTCONN;
    return -1;
  }
  int want = force ? DISCONNECT_FORCE : DISCONNECT_GRACEFUL;
  pthread_mutex_lock(&conn->lock);
  if (want > conn->disconnect_wanted)
    conn->disconnect_wanted = want;
  conn_kick(conn);
  pthread_mutex_unlock(&conn->lock);
  return 0;
}

void nbdserve_shutdown(void)
{
  request_shutdown();
}
