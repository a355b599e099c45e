/* nbdserve - who may connect: --allow and --deny.
 *
 * A rule is an address prefix (192.168.0.0/16, 2001:db8::/32, ::1) for
 * TCP clients, or uid:N / gid:N (numbers or names) for clients on a Unix
 * socket, whose credentials the kernel vouches for (SO_PEERCRED).  Each
 * client is judged by the rules of its kind only: refused if a --deny
 * rule matches; otherwise, if there are --allow rules of its kind, let in
 * only when one of them matches.  Clients are judged as soon as they are
 * accepted, before a single byte of NBD is exchanged.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "internal.h"

enum rule_kind { RULE_NET, RULE_UID, RULE_GID };

struct rule {
  bool allow;
  enum rule_kind kind;
  unsigned char addr[16]; /* IPv4 as an IPv4-mapped IPv6 address */
  unsigned prefix_bits; /* of the 128 */
  unsigned long id; /* uid or gid */
};

static struct rule *rules;
static size_t nr_rules;
static bool have_allow[3];

static void map_ipv4(unsigned char out[16], const struct in_addr *in)
{
  memset(out, 0, 10);
  out[10] = out[11] = 0xff;
  memcpy(out + 12, &in->s_addr, 4);
}

static bool parse_prefix(const char *text, struct rule *r)
{
  char host[INET6_ADDRSTRLEN + 1];
  const char *slash = strchr(text, '/');
  size_t hostlen = slash ? (size_t) (slash - text) : strlen(text);
  if (hostlen == 0 || hostlen >= sizeof host)
    return false;
  memcpy(host, text, hostlen);
  host[hostlen] = '\0';

  unsigned max_bits;
  struct in_addr a4;
  struct in6_addr a6;
  if (inet_pton(AF_INET, host, &a4) == 1) {
    map_ipv4(r->addr, &a4);
    max_bits = 32;
  }
  else if (inet_pton(AF_INET6, host, &a6) == 1) {
    memcpy(r->addr, &a6, 16);
    max_bits = 128;
  }
  else
    return false;

  unsigned long bits = max_bits;
  if (slash) {
    char *end;
    errno = 0;
    bits = strtoul(slash + 1, &end, 10);
    if (slash[1] == '\0' || *end != '\0' || errno || bits > max_bits)
      return false;
  }
  /* An IPv4 prefix covers the last 32 bits of the mapped address. */
  r->prefix_bits = (unsigned) bits + (max_bits == 32 ? 96 : 0);
  return true;
}

void acl_add(bool allow, const char *text)
{
  struct rule r = { .allow = allow };
  const char *option = allow ? "--allow" : "--deny";
  if (strncmp(text, "uid:", 4) == 0) {
    uid_t uid;
    gid_t unused;
    r.kind = RULE_UID;
    if (!find_user(text + 4, &uid, &unused))
      die("%s %s: no such user", option, text);
    r.id = uid;
  }
  else if (strncmp(text, "gid:", 4) == 0) {
    gid_t gid;
    r.kind = RULE_GID;
    if (!find_group(text + 4, &gid))
      die("%s %s: no such group", option, text);
    r.id = gid;
  }
  else {
    r.kind = RULE_NET;
    if (!parse_prefix(text, &r))
      die("%s %s: expected an address or prefix (10.0.0.0/8, ::1, 2001:db8::/32), "
          "uid:USER or gid:GROUP", option, text);
  }
  struct rule *grown = realloc(rules, (nr_rules + 1) * sizeof *grown);
  if (grown == NULL)
    die("out of memory");
  rules = grown;
  rules[nr_rules++] = r;
  if (allow)
    have_allow[r.kind] = true;
}

bool acl_active(void)
{
  return nr_rules > 0;
}

static bool prefix_matches(const struct rule *r, const unsigned char addr[16])
{
  unsigned full = r->prefix_bits / 8, rest = r->prefix_bits % 8;
  if (memcmp(r->addr, addr, full) != 0)
    return false;
  if (rest == 0)
    return true;
  unsigned char mask = (unsigned char) (0xff << (8 - rest));
  return (r->addr[full] & mask) == (addr[full] & mask);
}

/* Does RULE match the client?  Only rules of the client's kind do. */
static bool rule_matches(const struct rule *r, bool is_net, const unsigned char addr[16],
                         const struct ucred *cred)
{
  switch (r->kind) {
  case RULE_NET:
    return is_net && prefix_matches(r, addr);
  case RULE_UID:
    return !is_net && cred->uid == r->id;
  case RULE_GID:
    return !is_net && cred->gid == r->id;
  }
  return false;
}

/* Judge the client on FD; writes who it is into WHO for messages. */
bool acl_permits(int fd, char *who, size_t wholen)
{
  struct peer peer;
  unsigned char addr[16] = { 0 };
  struct ucred cred = { .pid = 0, .uid = (uid_t) -1, .gid = (gid_t) -1 };
  bool is_net;

  int r = peer_identify(fd, &peer);
  const struct sockaddr_storage *ss = &peer.addr;
  if (peer.addr_len == 0) {
    snprintf(who, wholen, "a client whose address is unknown (%s)", strerror(errno));
    return false;
  }
  if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *sin = (const struct sockaddr_in *) ss;
    map_ipv4(addr, &sin->sin_addr);
    is_net = true;
    char text[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &sin->sin_addr, text, sizeof text);
    snprintf(who, wholen, "%s", text);
  }
  else if (ss->ss_family == AF_INET6) {
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *) ss;
    memcpy(addr, &sin6->sin6_addr, 16);
    is_net = true;
    char text[INET6_ADDRSTRLEN];
    inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof text);
    snprintf(who, wholen, "%s", text);
  }
  else if (ss->ss_family == AF_UNIX) {
    if (r == -1) {
      snprintf(who, wholen, "a Unix-socket client without credentials (%s)", strerror(errno));
      return false;
    }
    cred = peer.cred;
    is_net = false;
    snprintf(who, wholen, "uid %u gid %u (pid %d)", (unsigned) cred.uid, (unsigned) cred.gid,
             (int) cred.pid);
  }
  else {
    snprintf(who, wholen, "a client of address family %d", ss->ss_family);
    return !have_allow[RULE_NET] && !have_allow[RULE_UID] && !have_allow[RULE_GID];
  }

  bool allowed_by_rule = false;
  for (size_t i = 0; i < nr_rules; i++) {
    if (!rule_matches(&rules[i], is_net, addr, &cred))
      continue;
    if (!rules[i].allow)
      return false; /* a deny always wins */
    allowed_by_rule = true;
  }
  if (allowed_by_rule)
    return true;
  /* No allow rule matched: fine only if none of the client's kind exist. */
  return is_net ? !have_allow[RULE_NET] : !have_allow[RULE_UID] && !have_allow[RULE_GID];
}

void acl_free(void)
{
  free(rules);
  rules = NULL;
  nr_rules = 0;
}
