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

static bool parse_number(const char *text, unsigned long *n)
{
  char *end;
  errno = 0;
  *n = strtoul(text, &end, 10);
  return *text && !*end && !errno && text[0] != '-';
}

/* A user as a name or a number.  PRIMARY_GID is the user's group, or -1
 * for a number with no account behind it. */
bool find_user(const char *text, uid_t *uid, gid_t *primary_gid)
{
  struct passwd *pw = getpwnam(text);
  unsigned long n;
  if (pw == NULL) {
    if (!parse_number(text, &n))
      return false;
    pw = getpwuid((uid_t) n);
    if (pw == NULL) {
      *uid = (uid_t) n;
      *primary_gid = (gid_t) -1;
      return true;
    }
  }
  *uid = pw->pw_uid;
  *primary_gid = pw->pw_gid;
  return true;
}

/* A group as a name or a number. */
bool find_group(const char *text, gid_t *gid)
{
  struct group *gr = getgrnam(text);
  unsigned long n;
  if (gr) {
    *gid = gr->gr_gid;
    return true;
  }
  if (!parse_number(text, &n))
    return false;
  *gid = (gid_t) n;
  return true;
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
  if (opt.user && !find_user(opt.user, &uid, &gid))
    die("-u %s: no such user", opt.user);
  if (opt.group && !find_group(opt.group, &gid))
    die("-g %s: no such group", opt.group);
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
