/* nbdserve - the command line and the start-up sequence.
 *
 *   nbdserve [OPTIONS] PLUGIN [key=value | value]...
 *
 * The options follow nbdkit's on purpose, so that scripts, systemd units
 * and habits written for it carry over: --filter=NAME, -U, -p, -i, -r,
 * -f, -e, -t, --run, --exit-with-parent, -P, --tls...
 *
 * Start-up order matters: the plugin is configured before any socket is
 * opened (so a bad parameter leaves nothing behind), the sockets are
 * listening before we fork into the background (so a client may connect
 * as soon as the parent exits), and the plugin's get_ready runs in the
 * final process, after the fork, as the plugin ABI promises.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <ev.h>
#include <mbedtls/version.h>

#include "internal.h"
#include "protocol.h"
#include "tls.h"

struct options opt;

/* Long options with no short form. */
enum {
  OPT_RUN = 256,
  OPT_FILTER,
  OPT_EXIT_WITH_PARENT,
  OPT_TLS,
  OPT_TLS_CERTIFICATES,
  OPT_TLS_PSK,
  OPT_TLS_VERIFY_PEER,
  OPT_DUMP_PLUGIN,
  OPT_HANDSHAKE_TIMEOUT,
  OPT_BUSY_POLL,
  OPT_MAX_CONNECTIONS,
  OPT_TLS_STRICT_KEYS,
  OPT_ALLOW,
  OPT_DENY,
  OPT_NO_INLINE,
  OPT_LOOPS,
  OPT_MAX_PAYLOAD,
  OPT_CONTROL,
  OPT_LIST_PLUGINS,
  OPT_LIST_FILTERS,
};

/* The leading ':' makes getopt report a missing argument as ':' and stay
 * quiet, so that every error message below has our own wording. */
static const char short_options[] = ":U:p:i:sfroe:t:P:u:g:vVh";
static const struct option long_options[] = {
  { "unix", required_argument, NULL, 'U' },
  { "port", required_argument, NULL, 'p' },
  { "ipaddr", required_argument, NULL, 'i' },
  { "single", no_argument, NULL, 's' },
  { "foreground", no_argument, NULL, 'f' },
  { "no-fork", no_argument, NULL, 'f' },
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
  { "list-plugins", no_argument, NULL, OPT_LIST_PLUGINS },
  { "list-filters", no_argument, NULL, OPT_LIST_FILTERS },
  { "handshake-timeout", required_argument, NULL, OPT_HANDSHAKE_TIMEOUT },
  { "max-connections", required_argument, NULL, OPT_MAX_CONNECTIONS },
  { "busy-poll", required_argument, NULL, OPT_BUSY_POLL },
  { "no-inline", no_argument, NULL, OPT_NO_INLINE },
  { "loops", required_argument, NULL, OPT_LOOPS },
  { "max-payload", required_argument, NULL, OPT_MAX_PAYLOAD },
  { "tls-strict-keys", no_argument, NULL, OPT_TLS_STRICT_KEYS },
  { "user", required_argument, NULL, 'u' },
  { "group", required_argument, NULL, 'g' },
  { "allow", required_argument, NULL, OPT_ALLOW },
  { "deny", required_argument, NULL, OPT_DENY },
  { "control", required_argument, NULL, OPT_CONTROL },
  { NULL, 0, NULL, 0 },
};

#define MAX_THREADS 1024
#define MAX_LOOPS 1024
#define MAX_EXPORT_NAME 4096 /* the protocol's limit on names */

/* What the command line asked for besides struct options. */
struct command {
  const char *plugin; /* NULL if none was named */
  const char **filters; /* --filter, outermost first */
  size_t nfilters;
  char **params; /* what followed the plugin name */
  size_t nparams;
  bool help, version, dump_plugin, list_plugins, list_filters;
};

static void usage(FILE *fp)
{
  fputs(
"Usage: nbdserve [OPTIONS] PLUGIN [key=value | value]...\n"
"Serve the disk PLUGIN provides over the Network Block Device protocol.\n"
"\n"
"Where to listen (default: TCP port 10809 on every address):\n"
"  -U, --unix SOCKET         listen on a Unix socket; '-U -' makes a private\n"
"                            one in a temporary directory (use with --run)\n"
"  -p, --port PORT           listen on this TCP port (default 10809)\n"
"  -i, --ipaddr ADDR         listen on this address only (default: all)\n"
"  -s, --single              serve one client on stdin/stdout, then exit\n"
"  Sockets passed by systemd (LISTEN_PID, LISTEN_FDS) are used when present.\n"
"\n"
"How to run:\n"
"  -f, --foreground          stay in the foreground (default: become a daemon)\n"
"      --run CMD             captive mode: run the shell command CMD with $uri,\n"
"                            $nbd, $unixsocket, $port and $exportname set; stop\n"
"                            when it exits and exit with its status (implies -f)\n"
"      --exit-with-parent    stop when the parent process exits (implies -f)\n"
"  -P, --pidfile FILE        write the server's PID to FILE once it is ready\n"
"  -t, --threads N           worker threads (default: 2 per usable CPU, at least 4)\n"
"      --loops N             connection loops, one thread each (default: the\n"
"                            CPUs this process may use)\n"
"      --max-payload SIZE    largest read or write a client that negotiated no\n"
"                            block size may send (default 64M)\n"
"      --no-inline           run requests on worker threads even when the\n"
"                            plugin and filters never block\n"
"      --max-connections N   serve at most N clients at once; more are refused\n"
"                            (default 0: no limit)\n"
"      --handshake-timeout S close a client that has not finished the\n"
"                            handshake after S seconds (default 10, 0: never)\n"
"      --busy-poll US        under load, poll instead of sleeping while\n"
"                            requests arrive less than US microseconds apart\n"
"                            (default 100, 0: never; see docs/nbdserve.md)\n"
"  -u, --user USER           run as USER once the sockets are bound\n"
"  -g, --group GROUP         run as GROUP (default: USER's group)\n"
"\n"
"Who may connect (repeatable; a --deny that matches always wins):\n"
"      --allow RULE          let in only clients matching an --allow RULE\n"
"      --deny RULE           refuse clients matching RULE\n"
"                            RULE: an address or prefix (192.168.0.0/16, ::1)\n"
"                            for TCP; uid:USER or gid:GROUP for Unix sockets\n"
"  -v, --verbose             print debug messages\n"
"      --control PATH        answer commands (status, shutdown...) on the Unix\n"
"                            socket PATH, for nbdserve-ctl; see docs/control.md\n"
"\n"
"What to serve:\n"
"      --filter NAME         put filter NAME in front of the plugin (repeatable;\n"
"                            the first one named is the outermost)\n"
"  -r, --readonly            serve read-only: clients cannot write\n"
"  -e, --exportname NAME     name of the default export (shown in $uri)\n"
"  -o, --oldstyle            old-style handshake, for very old clients only\n"
"\n"
"TLS (see docs/tls.md):\n"
"      --tls off|on|require  refuse (default), offer or require TLS\n"
"      --tls-certificates DIR  X.509: DIR holds server-cert.pem, server-key.pem,\n"
"                            and ca-cert.pem (ca-crl.pem) to check clients\n"
"      --tls-psk FILE        pre-shared keys, identity:hexkey lines (psktool)\n"
"      --tls-verify-peer     require clients to present a certificate signed\n"
"                            by ca-cert.pem\n"
"      --tls-strict-keys     refuse key files readable by group or others\n"
"                            (default: a warning)\n"
"\n"
"Information:\n"
"      --dump-plugin         describe PLUGIN (and filters) as key=value lines\n"
"      --list-plugins        list the plugins a short name finds: name, version,\n"
"                            description (with -v, the file), sorted\n"
"      --list-filters        the same for filters\n"
"  -V, --version             print the version of nbdserve and its libraries\n"
"  -h, --help                print this help; with PLUGIN, its parameters too\n"
"\n"
"Plugin parameters are key=value; a first parameter without '=' goes to the\n"
"plugin's main key ('memory 1G' is 'memory size=1G').  Sizes take suffixes:\n"
"512, 64K, 1M, 1G, 1T, 1E, or 8s for 512-byte sectors.\n"
"\n"
"Examples:\n"
"  nbdserve memory 1G\n"
"  nbdserve -U - memory 1G --run 'nbdinfo \"$uri\"'\n"
"  nbdserve -r -f -p 10900 file disk.img\n",
      fp);
}

static void print_version(void)
{
  char mbedtls[32];
  mbedtls_version_get_string(mbedtls);
  printf("%s %s\n", PROGRAM_NAME, PACKAGE_VERSION);
  printf("libev %d.%d\n", ev_version_major(), ev_version_minor());
  printf("mbedtls %s\n", mbedtls);
}

/* Counted like the loops: affinity and the cgroup's CPU quota, not the
 * machine's CPUs, which a container may be far from owning. */
static unsigned default_threads(void)
{
  unsigned cpus = usable_cpus();
  unsigned n = cpus < MAX_THREADS / 2 ? 2 * cpus : MAX_THREADS;
  return n < 4 ? 4 : n;
}

/* Whether ARG is all a decimal number from MIN to MAX; it goes to *N. */
static bool whole_number_in(const char *arg, long min, long max, long *n)
{
  char *end;
  errno = 0;
  *n = strtol(arg, &end, 10);
  return errno == 0 && end != arg && *end == '\0' && *n >= min && *n <= max;
}

static unsigned parse_threads(const char *arg)
{
  long n;
  if (!whole_number_in(arg, 1, MAX_THREADS, &n))
    die("-t: '%s' is not a thread count between 1 and %d", arg, MAX_THREADS);
  return (unsigned) n;
}

/* Seconds, fractions allowed; 0 turns the limit off. */
static double parse_handshake_timeout(const char *arg)
{
  char *end;
  errno = 0;
  double seconds = strtod(arg, &end);
  if (errno != 0 || end == arg || *end != '\0' || !(seconds >= 0 && seconds <= 86400))
    die("--handshake-timeout: '%s' is not a number of seconds from 0 (no limit) to 86400",
        arg);
  return seconds;
}

static unsigned parse_loops(const char *arg)
{
  long n;
  if (!whole_number_in(arg, 1, MAX_LOOPS, &n))
    die("--loops: '%s' is not a number of loops between 1 and %d", arg, MAX_LOOPS);
  return (unsigned) n;
}

/* --max-payload: 1 MiB at least (less would refuse what ordinary
 * clients send), MAX_PAYLOAD_LIMIT at most (one request's buffer). */
static uint32_t parse_max_payload(const char *arg)
{
  int64_t n = nbdserve_parse_size(arg);
  if (n == -1)
    die("--max-payload: '%s' is not a size (such as 64M)", arg);
  if (n < (1 << 20) || n > MAX_PAYLOAD_LIMIT)
    die("--max-payload: '%s' is out of range (1M to %dM)", arg, MAX_PAYLOAD_LIMIT >> 20);
  return (uint32_t) n;
}

static unsigned parse_max_connections(const char *arg)
{
  long n;
  if (!whole_number_in(arg, 0, 1000000, &n))
    die("--max-connections: '%s' is not a number from 0 (no limit) to 1000000", arg);
  return (unsigned) n;
}

static unsigned parse_busy_poll(const char *arg)
{
  long n;
  if (!whole_number_in(arg, 0, BUSY_POLL_MAX_US, &n))
    die("--busy-poll: '%s' is not a number of microseconds from 0 (never) to %d", arg,
        BUSY_POLL_MAX_US);
  return (unsigned) n;
}

static enum tls_mode parse_tls(const char *arg)
{
  if (strcmp(arg, "off") == 0)
    return TLS_OFF;
  if (strcmp(arg, "on") == 0)
    return TLS_ON;
  if (strcmp(arg, "require") == 0)
    return TLS_REQUIRE;
  die("--tls: '%s' is not one of off, on, require", arg);
}

/* A port number, or a service name from /etc/services ("nbd") that
 * getaddrinfo will look up.  Port 0 ("any free port") is refused: the
 * URI we give to --run and to users must name the real port. */
static const char *check_port(const char *arg)
{
  if (arg[0] == '\0')
    die("-p: the port is empty");
  if (strspn(arg, "0123456789") == strlen(arg)) {
    errno = 0;
    long n = strtol(arg, NULL, 10);
    if (errno != 0 || n < 1 || n > 65535)
      die("-p: '%s' is not a port number between 1 and 65535", arg);
  }
  return arg;
}

/* The working directory changes to / when we become a daemon, so a
 * relative pidfile name is made absolute while it still means what the
 * user meant. */
static const char *absolute_path(const char *path)
{
  if (path[0] == '/')
    return path;
  char *cwd = getcwd(NULL, 0);
  if (cwd == NULL)
    die("cannot find the current directory: %s", strerror(errno));
  char *abs;
  if (asprintf(&abs, "%s/%s", cwd, path) < 0)
    die("out of memory");
  free(cwd);
  return abs; /* kept for the life of the process */
}

/* systemd's socket activation: LISTEN_PID names us and LISTEN_FDS says
 * how many listening sockets start at fd 3.  Variables meant for another
 * process (a wrapper that exec'd us without updating them) are ignored. */
static void detect_socket_activation(void)
{
  const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
  if (pid == NULL || fds == NULL)
    return;
  char *end;
  errno = 0;
  long p = strtol(pid, &end, 10);
  if (errno != 0 || end == pid || *end != '\0' || p != (long) getpid())
    return;
  errno = 0;
  long n = strtol(fds, &end, 10);
  if (errno != 0 || end == fds || *end != '\0' || n < 1 || n > 1024)
    die("socket activation: LISTEN_FDS='%s' is not a number of sockets", fds);
  opt.socket_activation = true;
  opt.socket_activation_fds = (int) n;
}

static void parse_options(int argc, char **argv, struct command *cmd)
{
  int c;
  opterr = 0;
  while ((c = getopt_long(argc, argv, short_options, long_options, NULL)) != -1) {
    switch (c) {
    case 'U':
      if (optarg[0] == '\0')
        die("-U: the socket path is empty");
      opt.unix_private = strcmp(optarg, "-") == 0;
      opt.unix_socket = optarg;
      break;
    case 'p': opt.port = check_port(optarg); break;
    case 'i':
      if (optarg[0] == '\0')
        die("-i: the address is empty");
      opt.ipaddr = optarg;
      break;
    case 's': opt.single = true; break;
    case 'f': opt.foreground = true; break;
    case 'r': opt.readonly = true; break;
    case 'o': opt.oldstyle = true; break;
    case 'e':
      if (strlen(optarg) > MAX_EXPORT_NAME)
        die("-e: export names are at most %d bytes", MAX_EXPORT_NAME);
      opt.export_name = optarg;
      break;
    case 't': opt.threads = parse_threads(optarg); break;
    case 'P':
      if (optarg[0] == '\0')
        die("-P: the pidfile name is empty");
      opt.pidfile = absolute_path(optarg);
      break;
    case 'v': opt.verbose = true; break;
    case 'V': cmd->version = true; break;
    case 'h': cmd->help = true; break;
    case OPT_RUN:
      if (optarg[0] == '\0')
        die("--run: the command is empty");
      opt.run = optarg;
      break;
    case OPT_FILTER: {
      const char **grown = realloc(cmd->filters, (cmd->nfilters + 1) * sizeof *grown);
      if (grown == NULL)
        die("out of memory");
      cmd->filters = grown;
      cmd->filters[cmd->nfilters++] = optarg;
      break;
    }
    case OPT_EXIT_WITH_PARENT: opt.exit_with_parent = true; break;
    case OPT_TLS: opt.tls = parse_tls(optarg); break;
    case OPT_TLS_CERTIFICATES: opt.tls_certificates = optarg; break;
    case OPT_TLS_PSK: opt.tls_psk = optarg; break;
    case OPT_TLS_VERIFY_PEER: opt.tls_verify_peer = true; break;
    case OPT_TLS_STRICT_KEYS: opt.tls_strict_keys = true; break;
    case 'u': opt.user = optarg; break;
    case 'g': opt.group = optarg; break;
    case OPT_ALLOW: acl_add(true, optarg); break;
    case OPT_DENY: acl_add(false, optarg); break;
    case OPT_DUMP_PLUGIN: cmd->dump_plugin = true; break;
    case OPT_LIST_PLUGINS: cmd->list_plugins = true; break;
    case OPT_LIST_FILTERS: cmd->list_filters = true; break;
    case OPT_HANDSHAKE_TIMEOUT: opt.handshake_timeout = parse_handshake_timeout(optarg); break;
    case OPT_BUSY_POLL: opt.busy_poll_us = parse_busy_poll(optarg); break;
    case OPT_LOOPS: opt.loops = parse_loops(optarg); break;
    case OPT_MAX_PAYLOAD: opt.max_payload = parse_max_payload(optarg); break;
    case OPT_NO_INLINE: opt.no_inline = true; break;
    case OPT_CONTROL:
      if (optarg[0] == '\0')
        die("--control: the socket path is empty");
      opt.control = optarg;
      break;
    case OPT_MAX_CONNECTIONS: opt.max_connections = parse_max_connections(optarg); break;
    case ':':
      die("option '%s' needs a value; try 'nbdserve --help'", argv[optind - 1]);
    default:
      if (optopt != 0)
        die("unknown option '-%c'; try 'nbdserve --help'", optopt);
      die("unknown option '%s'; try 'nbdserve --help'", argv[optind - 1]);
    }
  }

  /* getopt has moved every option in front, so what remains is the
   * plugin name and its parameters. */
  if (optind < argc)
    cmd->plugin = argv[optind++];
  cmd->params = &argv[optind];
  cmd->nparams = (size_t) (argc - optind);
}

/* Combinations that cannot work, each refused with its own reason. */
static void check_options(const struct command *cmd)
{
  if (cmd->plugin == NULL)
    die("no plugin given: try 'nbdserve memory 1G' or 'nbdserve --help'");

  if (opt.socket_activation && (opt.unix_socket || opt.port || opt.ipaddr || opt.single))
    die("socket activation (LISTEN_FDS is set) cannot be combined with -U, -p, -i or -s");
  if (opt.single && (opt.unix_socket || opt.port || opt.ipaddr))
    die("-s (serve stdin/stdout) cannot be combined with -U, -p or -i");
  if (opt.single && opt.run)
    die("-s (serve stdin/stdout) cannot be combined with --run");
  if (opt.unix_socket && (opt.port || opt.ipaddr))
    die("-U (Unix socket) cannot be combined with -p or -i (TCP)");
  if (opt.oldstyle && opt.tls != TLS_OFF)
    die("-o (old-style handshake) cannot be combined with TLS");

  if (opt.tls_certificates && opt.tls_psk)
    die("--tls-certificates and --tls-psk cannot be used together");
  if (opt.tls == TLS_OFF && (opt.tls_certificates || opt.tls_psk || opt.tls_verify_peer ||
                             opt.tls_strict_keys))
    die("--tls-certificates, --tls-psk, --tls-verify-peer and --tls-strict-keys need "
        "--tls=on or --tls=require");
  if (opt.tls != TLS_OFF && !opt.tls_certificates && !opt.tls_psk)
    die("--tls=%s needs --tls-certificates DIR or --tls-psk FILE",
        opt.tls == TLS_ON ? "on" : "require");
  if (opt.tls_verify_peer && !opt.tls_certificates)
    die("--tls-verify-peer checks client certificates: it needs --tls-certificates DIR");
}

/* Hand every parameter after the plugin name to the chain.  The first
 * one without '=' is the plugin's magic key; a second one is an error,
 * since it could only be a typo. */
static void configure_chain(const struct command *cmd, bool complete)
{
  bool bare_seen = false;
  for (size_t i = 0; i < cmd->nparams; i++) {
    char *param = cmd->params[i];
    char *equals = strchr(param, '=');
    int r;
    if (equals == NULL) {
      if (bare_seen)
        die("parameter '%s' must be key=value (only the first parameter may "
                    "omit 'key=')", param);
      bare_seen = true;
      r = chain_config(NULL, param);
    }
    else {
      if (equals == param)
        die("parameter '%s' has an empty key: write key=value", param);
      *equals = '\0'; /* split in place, briefly */
      r = chain_config(param, equals + 1);
      *equals = '=';
    }
    if (r == -1)
      exit(EXIT_FAILURE); /* the layer said why */
  }
  if (complete && chain_config_complete() == -1)
    exit(EXIT_FAILURE);
}

/* With '-U -' and no --run, nobody else can know where the socket is. */
static void announce_private_socket(void)
{
  char *uri = listen_uri();
  if (opt.unix_private && !opt.run)
    fprintf(stderr, "%s: listening on %s\n", PROGRAM_NAME, uri);
  else
    nbdserve_debug("listening on %s", uri);
  free(uri);
}

/* Cleanup for every way out of the serving process, including die():
 * no socket file or pidfile is left behind.  Children forked to run
 * other programs, and the parents left behind by daemonize(), never
 * run it (they _exit or exec). */
static pid_t server_pid;
static volatile sig_atomic_t pidfile_written;

static void cleanup_at_exit(void)
{
  if (getpid() != server_pid)
    return;
  remove_unix_socket();
  if (pidfile_written) {
    unlink(opt.pidfile);
    pidfile_written = false;
  }
}

/* Until the loop takes SIGINT and SIGTERM over, they end the process
 * as they always would (SA_RESETHAND restores the default action), but
 * without leaving the socket file behind for the next start to find. */
static sigset_t early_signals;
static struct sigaction inherited_sigint, inherited_sigterm;

static void die_by_signal(int sig)
{
  cleanup_at_exit(); /* only unlink and rmdir: safe in a handler */
  raise(sig);
}

static void clean_up_on_early_signals(void)
{
  sigemptyset(&early_signals);
  sigaddset(&early_signals, SIGINT);
  sigaddset(&early_signals, SIGTERM);
  struct sigaction sa = { .sa_handler = die_by_signal, .sa_flags = SA_RESETHAND };
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &inherited_sigint);
  sigaction(SIGTERM, &sa, &inherited_sigterm);
}

/* The signals wait while what the handler relies on is out of step:
 * a socket bound but not yet recorded, server_pid across daemonize's
 * forks, a pidfile renamed into place but not yet flagged. */
static void hold_early_signals(bool hold)
{
  sigprocmask(hold ? SIG_BLOCK : SIG_UNBLOCK, &early_signals, NULL);
}

void restore_inherited_signals(void)
{
  sigaction(SIGINT, &inherited_sigint, NULL);
  sigaction(SIGTERM, &inherited_sigterm, NULL);
  hold_early_signals(false);
}

/* --list-plugins, --list-filters: with both, each list under a heading. */
static void list_installed(const struct command *cmd)
{
  if (cmd->plugin)
    die("--list-plugins and --list-filters list what is installed: they take no plugin "
        "name (got '%s')", cmd->plugin);
  bool both = cmd->list_plugins && cmd->list_filters;
  if (cmd->list_plugins) {
    if (both)
      printf("plugins:\n");
    fflush(stdout); /* the warnings go to stderr directly */
    list_layers(stdout, true);
  }
  if (cmd->list_filters) {
    if (both)
      printf("\nfilters:\n");
    fflush(stdout);
    list_layers(stdout, false);
  }
  free(cmd->filters);
}

int main(int argc, char **argv)
{
  struct command cmd = { 0 };

  note_parent();
  opt.handshake_timeout = 10; /* seconds, unless --handshake-timeout says otherwise */
  opt.busy_poll_us = BUSY_POLL_DEFAULT_US;
  opt.max_payload = MAX_PAYLOAD_DEFAULT;
  parse_options(argc, argv, &cmd);

  if (cmd.version) {
    print_version();
    return EXIT_SUCCESS;
  }
  if (cmd.help) {
    usage(stdout);
    if (cmd.plugin) {
      fflush(stdout);
      load_chain(cmd.plugin, cmd.filters, cmd.nfilters);
      chain_help(stdout);
      unload_chain();
    }
    free(cmd.filters); /* a leak report would end LeakSanitizer builds before stdout is flushed */
    return EXIT_SUCCESS;
  }
  if (cmd.list_plugins || cmd.list_filters) {
    list_installed(&cmd);
    return EXIT_SUCCESS;
  }
  if (cmd.dump_plugin) {
    if (cmd.plugin == NULL)
      die("--dump-plugin needs a plugin name, e.g. 'nbdserve --dump-plugin memory'");
    load_chain(cmd.plugin, cmd.filters, cmd.nfilters);
    configure_chain(&cmd, false); /* what the plugin's own dump may describe */
    chain_dump(stdout);
    unload_chain();
    free(cmd.filters);
    return EXIT_SUCCESS;
  }

  detect_socket_activation();
  check_options(&cmd);
  /* Modes with somebody waiting on us must not fork away from them. */
  if (opt.run || opt.exit_with_parent || opt.socket_activation)
    opt.foreground = true;
  if (opt.threads == 0)
    opt.threads = default_threads();
  if (opt.loops == 0)
    opt.loops = usable_cpus();

  load_chain(cmd.plugin, cmd.filters, cmd.nfilters);
  configure_chain(&cmd, true);
  if (opt.tls != TLS_OFF)
    tls_setup(); /* bad certificates or keys stop us before we listen */

  server_pid = getpid();
  atexit(cleanup_at_exit);
  clean_up_on_early_signals();
  hold_early_signals(true);

  /* Bound with the others, before privileges go, like -U; and first, so
   * that whoever waits for the -U socket to appear finds the control
   * socket there too. */
  int control_fd = opt.control ? open_control_socket() : -1;
  int *listen_fds = NULL;
  size_t nfds = 0;
  if (!opt.single) {
    open_listeners(&listen_fds, &nfds);
    announce_private_socket();
  }

  daemonize();
  server_pid = getpid();
  hold_early_signals(false);
  drop_privileges();
  follow_parent();

  if (chain_get_ready() == -1)
    exit(EXIT_FAILURE);
  /* The pidfile says "ready": only now.  (It also releases the parent
   * waiting in daemonize.) */
  hold_early_signals(true);
  write_pidfile();
  pidfile_written = opt.pidfile != NULL;
  hold_early_signals(false);

  int status = serve(listen_fds, nfds, control_fd);

  unload_chain();
  commands_free();
  if (opt.tls != TLS_OFF)
    tls_cleanup();
  acl_free();
  remove_unix_socket();
  free(listen_fds);
  free(cmd.filters);
  exit(status);
}
