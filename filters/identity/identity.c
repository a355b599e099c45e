/* nbdserve identity filter: which TLS client may open which export.
 *
 * Rules are allow=EXPORT:IDENTITY pairs of shell patterns; a connection
 * may open an export when some rule matches both the export's name and
 * the client's TLS identity (its certificate's subject DN under X.509,
 * its user name under PSK).  Everything else is refused with EPERM, and
 * the export list a client sees holds only the exports it may open, so
 * names do not leak either.  Connections without TLS have no identity
 * and match no rule.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <fnmatch.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "nbdserve-filter.h"

struct rule {
  char *export_glob, *identity_glob;
};

static struct rule *rules;
static size_t nr_rules;

static void identity_unload(void)
{
  for (size_t i = 0; i < nr_rules; i++)
    free(rules[i].export_glob); /* identity_glob shares the allocation */
  free(rules);
  rules = NULL;
  nr_rules = 0;
}

static int identity_config(const char *key, const char *value)
{
  if (strcmp(key, "allow") != 0)
    return 0;
  const char *colon = strchr(value, ':');
  if (colon == NULL || colon == value || colon[1] == '\0') {
    nbdserve_error("allow=%s: expected EXPORT:IDENTITY, two shell patterns "
                   "(e.g. allow='backup-*:CN=backup*' or allow='*:alice')", value);
    return -1;
  }
  struct rule *grown = realloc(rules, (nr_rules + 1) * sizeof *grown);
  char *copy = strdup(value);
  if (grown == NULL || copy == NULL) {
    free(copy);
    if (grown)
      rules = grown;
    nbdserve_error("out of memory");
    return -1;
  }
  rules = grown;
  copy[colon - value] = '\0';
  rules[nr_rules++] = (struct rule){ copy, copy + (colon - value) + 1 };
  return 1;
}

static int identity_config_complete(void)
{
  if (nr_rules == 0) {
    nbdserve_error("the identity filter needs at least one allow=EXPORT:IDENTITY rule");
    return -1;
  }
  return 0;
}

/* DN patterns are matched whole, so a '*' also spans "O=x, CN=y". */
static bool may_open(const char *export, const char *identity)
{
  if (identity == NULL || identity[0] == '\0')
    return false;
  for (size_t i = 0; i < nr_rules; i++)
    if (fnmatch(rules[i].export_glob, export, 0) == 0 &&
        fnmatch(rules[i].identity_glob, identity, 0) == 0)
      return true;
  return false;
}

static void *identity_open(struct nbdserve_next *next, int readonly, const char *export_name)
{
  const char *who = nbdserve_peer_tls_identity();
  if (!may_open(export_name, who)) {
    nbdserve_error("identity: %s may not open export '%s'",
                   who && *who ? who : "a client without TLS identity", export_name);
    nbdserve_set_error(EPERM);
    return NULL;
  }
  return nbdserve_next_open(next, readonly, export_name) ? &rules : NULL;
}

static int identity_list_exports(struct nbdserve_next *next, int readonly, int is_tls,
                                 struct nbdserve_exports *exports)
{
  struct nbdserve_exports *all = nbdserve_exports_new();
  if (all == NULL)
    return -1;
  int r = nbdserve_next_list_exports(next, readonly, is_tls, all);
  const char *who = nbdserve_peer_tls_identity();
  for (size_t i = 0; r == 0 && i < nbdserve_exports_count(all); i++) {
    const char *name = nbdserve_exports_name(all, i);
    if (may_open(name, who))
      r = nbdserve_add_export(exports, name, nbdserve_exports_description(all, i));
  }
  nbdserve_exports_free(all);
  return r;
}

#define IDENTITY_CONFIG_HELP                                                          \
  "allow=EXPORT:IDENTITY  let TLS clients whose identity matches the shell pattern\n" \
  "                       IDENTITY open the exports matching EXPORT (repeatable;\n"  \
  "                       IDENTITY is the certificate's subject DN, e.g.\n"          \
  "                       'O=Example, CN=backup', or the PSK user name)"

static struct nbdserve_filter filter = {
  NBDSERVE_FILTER_INIT,
  .name = "identity",
  .longname = "exports per TLS identity",
  .version = "1.0",
  .description = "Let TLS clients open only the exports their identity is allowed",
  .config_help = IDENTITY_CONFIG_HELP,
  .thread_model = NBDSERVE_THREAD_MODEL_PARALLEL,
  .flags = NBDSERVE_FILTER_NEVER_BLOCKS,
  .unload = identity_unload,
  .config = identity_config,
  .config_complete = identity_config_complete,
  .list_exports = identity_list_exports,
  .open = identity_open,
};

NBDSERVE_REGISTER_FILTER(filter)
