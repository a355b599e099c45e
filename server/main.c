/* nbdserve - the command line.
 *
 * The options follow nbdkit's on purpose, so scripts and systemd units
 * written for it carry over: PLUGIN [key=value|value]..., --filter=NAME,
 * -U, -p, -i, -r, -f, -e, -t, --run...
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <ev.h>
#include <mbedtls/version.h>

#include "internal.h"

struct options opt = { .port = NULL };
int captive_exit_status;

enum {
  OPT_RUN = 256, OPT_FILTER, OPT_EXIT_WITH_PARENT, OPT_TLS, OPT_TLS_CERTIFICATES,
  OPT_TLS_PSK, OPT_TLS_VERIFY_PEER, OPT_DUMP_PLUGIN,
};

static const char short_options[] = "U:p:i:sfroe:t:P:vVh";
static const struct option long_options[] = {
  { "unix", required_argument, NULL, 'U' },
  { "port", required_argument, NULL, 'p' },
  { "ipaddr", required_argument, NULL, 'i' },
  { "single", no_argument, NULL, 's' },
  { "foreground", no_argument, NULL, 'f' },
  { "readonly", no_argument, NULL, 'r' },
  { "read-only", no_argument, NULL, 'r' },
  { "oldstyle", no_argument, NULL, 'o' },
  { "exportname", required_argument, NULL, 'e' },
  { "export-name", required_argument, NULL, 'e' },
  { "threads", required_argument, NULL, 't' },
  { "pidfile", required_argument, NULL, 'P' },
  { "verbose", no_argument, NULL, 'v' },
  { "version", no_argument, NULL, 'V' },
  { "help", no_argument, NULL, 'h' },
  { "run", required_argument, NULL, OPT_RUN },
  { "filter", required_argument, NULL, OPT_FILTER },
  { "exit-with-parent", no_argument, NULL, OPT_EXIT_WITH_PARENT },
  { "tls", required_argument, NULL, OPT_TLS },
  { "tls-certificates", required_argument, NULL, OPT_TLS_CERTIFICATES },
  { "tls-psk", required_argument, NULL, OPT_TLS_PSK },
  { "tls-verify-peer", no_argument, NULL, OPT_TLS_VERIFY_PEER },
  { "dump-plugin", no_argument, NULL, OPT_DUMP_PLUGIN },
  { NULL, 0, NULL, 0 },
};

static void usage(FILE *fp)
{
  fprintf(fp,
"Usage: nbdserve [OPTIONS] PLUGIN [key=value | value]...\n"
"Serve PLUGIN's data over the Network Block Device protocol.\n"
"\n"
"Listening (default: TCP port 10809 on all addresses):\n"
"  -U, --unix SOCKET        listen on a Unix socket ('-' = private temporary socket)\n"
"  -p, --port PORT          TCP port (default 10809)\n"
"  -i, --ipaddr ADDR        listen on this address only\n"
"  -s, --single             serve one connection on stdin/stdout, then exit\n"
"  (LISTEN_PID/LISTEN_FDS from systemd socket activation are honoured)\n"
"\n"
"Running:\n"
"  -f, --foreground         do not fork into the background\n"
"  -P, --pidfile FILE       write the server's PID to FILE\n"
"      --exit-with-parent   exit when the parent process exits\n"
"      --run CMD            captive mode: run CMD (with $uri, $unixsocket, $port,\n"
"                           $exportname set), exit when it exits, with its status\n"
"  -t, --threads N          worker threads (default: 2 x CPUs, at least 4)\n"
"  -v, --verbose            debug messages\n"
"\n"
"Exports:\n"
"  -r, --readonly           serve read-only\n"
"  -e, --exportname NAME    name of the default export (used in $uri)\n"
"  -o, --oldstyle           use the old-style handshake (obsolete clients only)\n"
"      --filter NAME        add a filter (repeatable; the first is outermost)\n"
"\n"
"TLS:\n"
"      --tls off|on|require  (TLS support is not built yet: only 'off')\n"
"      --tls-certificates DIR, --tls-psk FILE, --tls-verify-peer\n"
"\n"
"Information:\n"
"      --dump-plugin        describe PLUGIN (and filters) as key=value lines\n"
"  -V, --version            print the version\n"
"  -h, --help               this help; with PLUGIN, its parameters too\n"
"\n"
"Sizes take suffixes: 512, 64K, 1M, 1G, 1T, 1E, or 8s for 512-byte sectors.\n"
"Examples:\n"
"  nbdserve memory 1G\n"
"  nbdserve -U - memory 1G --run 'nbdinfo \"$uri\"'\n"
"  nbdserve -r file disk.img\n"
"  nbdserve --filter=delay memory 1G delay-read=10ms\n");
}

static unsigned default_threads(void)
{
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  unsigned n = cpus > 0 ? (unsigned) cpus * 2 : 4;
  return n < 4 ? 4 : n;
}

static void check_socket_activation(void)
{
  const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
  if (pid == NULL || fds == NULL)
    return;
  char *end;
  long p = strtol(pid, &end, 10);
  if (*end != '\0' || p != (long) getpid())
    return; /* meant for another process */
  long n = strtol(fds, &end, 10);
  if (*end != '\0' || n < 1 || n > 64)
    die("LISTEN_FDS=%s is not a usable number of sockets", fds);
  opt.socket_activation = true;
  opt.socket_activation_fds = (int) n;
}

static void check_options(size_t nfilters, const char *plugin)
{
  if (plugin == NULL)
    die("no plugin given: try 'nbdserve memory 1G' or 'nbdserve --help'");
  (void) nfilters;
  if (opt.socket_activation && (opt.unix_socket || opt.port || opt.ipaddr || opt.single))
    die("socket activation (LISTEN_FDS) cannot be combined with -U, -p, -i or -s");
  if (opt.single && (opt.unix_socket || opt.port || opt.ipaddr || opt.run))
    die("-s (serve stdin/stdout) cannot be combined with -U, -p, -i or --run");
  if (opt.unix_socket && (opt.port || opt.ipaddr))
    die("-U (Unix socket) cannot be combined with -p or -i");
  if (opt.tls != TLS_OFF)
    die("--tls=%s: TLS support is not built yet; only --tls=off is accepted",
        opt.tls == TLS_ON ? "on" : "require");
  if (opt.tls_certificates || opt.tls_psk || opt.tls_verify_peer)
    die("--tls-certificates, --tls-psk and --tls-verify-peer need TLS, which is not built yet");
}

static void print_version(void)
{
  printf("nbdserve %s\n", PACKAGE_VERSION);
  printf("libev %d.%d\n", ev_version_major(), ev_version_minor());
  char mbed[32];
  mbedtls_version_get_string(mbed);
  printf("mbedtls %s\n", mbed);
}

int main(int argc, char **argv)
{
  const char **filters = NULL;
  size_t nfilters = 0;
  bool dump = false, help = false;
  int c;

  while ((c = getopt_long(argc, argv, short_options, long_options, NULL)) != -1) {
    switch (c) {
    case 'U':
      if (strcmp(optarg, "-") == 0)
        opt.unix_private = true;
      opt.unix_socket = optarg;
      break;
    case 'p': opt.port = optarg; break;
    case 'i': opt.ipaddr = optarg; break;
    case 's': opt.single = true; break;
    case 'f': opt.foreground = true; break;
    case 'r': opt.readonly = true; break;
    case 'o': opt.oldstyle = true; break;
    case 'e':
      if (strlen(optarg) > 4096)
        die("-e: export names are at most 4096 bytes");
      opt.export_name = optarg;
      break;
    case 't': {
      char *end;
      errno = 0;
      long n = strtol(optarg, &end, 10);
      if (errno || *end || n < 1 || n > 1024)
        die("-t: '%s' is not a thread count between 1 and 1024", optarg);
      opt.threads = (unsigned) n;
      break;
    }
    case 'P': opt.pidfile = optarg; break;
    case 'v': opt.verbose = true; break;
    case 'V': print_version(); return EXIT_SUCCESS;
    case 'h': help = true; break;
    case OPT_RUN: opt.run = optarg; opt.foreground = true; break;
    case OPT_FILTER:
      filters = realloc(filters, (nfilters + 1) * sizeof *filters);
      if (filters == NULL)
        die("out of memory");
      filters[nfilters++] = optarg;
      break;
    case OPT_EXIT_WITH_PARENT: opt.exit_with_parent = true; break;
    case OPT_TLS:
      if (strcmp(optarg, "off") == 0) opt.tls = TLS_OFF;
      else if (strcmp(optarg, "on") == 0) opt.tls = TLS_ON;
      else if (strcmp(optarg, "require") == 0) opt.tls = TLS_REQUIRE;
      else die("--tls: '%s' is not one of off, on, require", optarg);
      break;
    case OPT_TLS_CERTIFICATES: opt.tls_certificates = optarg; break;
    case OPT_TLS_PSK: opt.tls_psk = optarg; break;
    case OPT_TLS_VERIFY_PEER: opt.tls_verify_peer = true; break;
    case OPT_DUMP_PLUGIN: dump = true; break;
    default:
      fprintf(stderr, "Try 'nbdserve --help' for more information.\n");
      return EXIT_FAILURE;
    }
  }

  const char *plugin = optind < argc ? argv[optind++] : NULL;
  if (help) {
    usage(stdout);
    if (plugin) {
      load_chain(plugin, filters, nfilters);
      chain_help(stdout);
    }
    return EXIT_SUCCESS;
  }
  if (dump) {
    if (plugin == NULL)
      die("--dump-plugin needs a plugin name");
    load_chain(plugin, filters, nfilters);
    chain_dump(stdout);
    return EXIT_SUCCESS;
  }

  check_socket_activation();
  check_options(nfilters, plugin);
  if (opt.threads == 0)
    opt.threads = default_threads();

  load_chain(plugin, filters, nfilters);
  /* The first bare word is the magic key; every later one must be key=value. */
  bool bare_allowed = true;
  for (; optind < argc; optind++) {
    char *arg = argv[optind];
    char *eq = strchr(arg, '=');
    int r;
    if (eq == NULL) {
      if (!bare_allowed)
        die("parameter '%s' needs the form key=value", arg);
      bare_allowed = false;
      r = chain_config(NULL, arg);
    }
    else {
      if (eq == arg)
        die("parameter '%s' has an empty key", arg);
      *eq = '\0';
      r = chain_config(arg, eq + 1);
      *eq = '=';
    }
    if (r == -1)
      exit(EXIT_FAILURE);
  }
  if (chain_config_complete() == -1)
    exit(EXIT_FAILURE);

  int *fds = NULL;
  size_t nfds = 0;
  if (!opt.single)
    open_listeners(&fds, &nfds);
  daemonize();
  write_pidfile();
  if (chain_get_ready() == -1) {
    remove_unix_socket();
    exit(EXIT_FAILURE);
  }

  int status = serve(fds, nfds);
  unload_chain();
  remove_unix_socket();
  if (opt.pidfile)
    unlink(opt.pidfile);
  free(fds);
  free(filters);
  return opt.run ? captive_exit_status : status;
}
