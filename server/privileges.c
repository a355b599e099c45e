/* nbdserve - -u USER and -g GROUP: give up root once the sockets are
 * bound (a port below 1024 needs root, serving a disk should not).
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <grp.h>
#include <libgen.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* A user or group as a name or a number; dies when there is none. */
static void lookup_user(const char *text, uid_t *uid, gid_t *primary_gid)
{
  struct passwd *pw = getpwnam(text);
  if (pw == NULL) {
    char *end;
    errno = 0;
    unsigned long n = strtoul(text, &end, 10);
    if (!*text || *end || errno || text[0] == '-')
      die("-u %s: no such user", text);
    pw = getpwuid((uid_t) n);
    if (pw == NULL) { /* a bare number is fine: the group must then be given */
      *uid = (uid_t) n;
      *primary_gid = (gid_t) -1;
      return;
    }
  }
  *uid = pw->pw_uid;
  *primary_gid = pw->pw_gid;
}

static gid_t lookup_group(const char *text)
{
  struct group *gr = getgrnam(text);
  if (gr)
    return gr->gr_gid;
  char *end;
  errno = 0;
  unsigned long n = strtoul(text, &end, 10);
  if (!*text || *end || errno || text[0] == '-')
    die("-g %s: no such group", text);
  return (gid_t) n;
}

/* The server must still be able to remove its Unix socket at exit. */
static void hand_over_socket(uid_t uid, gid_t gid)
{
  if (opt.unix_socket == NULL)
    return;
  if (chown(opt.unix_socket, uid, gid) == -1)
    die("-u/-g: cannot give %s to the new user: %s", opt.unix_socket, strerror(errno));
  if (opt.unix_private) {
    char *copy = strdup(opt.unix_socket);
    if (copy == NULL || chown(dirname(copy), uid, gid) == -1)
      die("-u/-g: cannot give the private socket's directory to the new user");
    free(copy);
  }
}

void drop_privileges(void)
{
  if (opt.user == NULL && opt.group == NULL)
    return;
  uid_t uid = getuid();
  gid_t gid = (gid_t) -1;
  if (opt.user)
    lookup_user(opt.user, &uid, &gid);
  if (opt.group)
    gid = lookup_group(opt.group);
  if (gid == (gid_t) -1)
    gid = getgid();
  if (geteuid() != 0)
    die("-u/-g: only root can change to another user or group");

  hand_over_socket(uid, gid);
  /* Supplementary groups first (root's would otherwise stay), then the
   * group, then the user: afterwards there is no way back. */
  if (setgroups(1, &gid) == -1 || setgid(gid) == -1 || setuid(uid) == -1)
    die("-u/-g: cannot change to uid %u gid %u: %s", (unsigned) uid, (unsigned) gid,
        strerror(errno));
  if (uid != 0 && setuid(0) == 0)
    die("-u/-g: root privileges could be regained; refusing to go on");
  nbdserve_debug("running as uid %u gid %u", (unsigned) uid, (unsigned) gid);
}
