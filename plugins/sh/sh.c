/* nbdserve sh plugin: a plugin written as a script, or any program.
 *
 * Every callback runs the script once: `SCRIPT METHOD ARGS...`, with
 * pwrite's data on its stdin, pread's data and every text answer on
 * its stdout, and an error's errno name and message on its stderr.  The
 * exit status says how it went: 0 done, 1 failed, 2 "I have no such
 * method", 3 false.  This is the calling convention of nbdkit's sh
 * plugin, kept exactly (method names, argument order, defaults), so that
 * scripts written for nbdkit run unchanged.  sh.md documents it.
 *
 * Scripts hold no state between calls; the plugin makes a private
 * directory for them ($tmpdir in their environment) and removes it when
 * the server exits.  Every call blocks on a child process, so the
 * plugin never claims NEVER_BLOCKS: its requests run on worker threads.
 * call.c runs one program; this file knows the methods.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nbdserve-plugin.h"
#include "call.h"

#define TEXT_LIMIT (1024 * 1024) /* the most a text answer may print */
#define EXTENTS_LIMIT (16 * 1024 * 1024) /* extents may list many */
#define HANDLE_LIMIT 4096 /* a handle travels in every argv */
#define NUM_LEN 24 /* room for a 64-bit number in decimal */

/* Exit statuses with a meaning; every other one is an error. */
enum { STATUS_OK = 0, STATUS_ERROR = 1, STATUS_MISSING = 2, STATUS_FALSE = 3 };

/* What one method call came to. */
enum answer { ANSWER_OK, ANSWER_ERROR, ANSWER_MISSING, ANSWER_FALSE };

static char *script; /* absolute path of the script */
static char *script_given; /* as the user wrote it, for messages */
static char *tmpdir; /* $tmpdir of the scripts */
static pid_t tmpdir_owner; /* the process that removes it */
static char *tmpdir_var; /* "tmpdir=..." */
static char **script_env; /* the server's environment, and tmpdir= */
static char *script_magic_key; /* what the script's magic_config_key printed */
static int script_thread_model = NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS;

struct handle {
  char *name; /* what open printed: $2 of every later call */
  int can_flush; /* cached for can_fua's default; -1 until asked */
};

/* ---- Errors the script reports ------------------------------------------- */

static const struct {
  const char *name;
  int value;
} errno_names[] = {
#define E(x) { #x, x }
  E(EPERM), E(ENOENT), E(ESRCH), E(EINTR), E(EIO), E(ENXIO), E(E2BIG), E(ENOEXEC),
  E(EBADF), E(ECHILD), E(EAGAIN), E(EWOULDBLOCK), E(ENOMEM), E(EACCES), E(EFAULT),
  E(EBUSY), E(EEXIST), E(EXDEV), E(ENODEV), E(ENOTDIR), E(EISDIR), E(EINVAL), E(ENFILE),
  E(EMFILE), E(ENOTTY), E(ETXTBSY), E(EFBIG), E(ENOSPC), E(ESPIPE), E(EROFS), E(EMLINK),
  E(EPIPE), E(EDOM), E(ERANGE), E(EDEADLK), E(ENAMETOOLONG), E(ENOLCK), E(ENOSYS),
  E(ENOTEMPTY), E(ELOOP), E(ENODATA), E(ETIME), E(EOVERFLOW), E(ENOTSUP), E(EOPNOTSUPP),
  E(ESHUTDOWN), E(ECONNRESET), E(ECONNREFUSED), E(ECONNABORTED), E(ETIMEDOUT),
  E(EHOSTUNREACH), E(ENETUNREACH), E(ENOTCONN), E(EDQUOT), E(ECANCELED), E(ESTALE),
  E(EREMOTEIO), E(ENOMEDIUM), E(EILSEQ), E(EBADMSG), E(EPROTO), E(ENOBUFS),
#undef E
};

static int errno_by_name(const char *name, size_t len)
{
  for (size_t i = 0; i < sizeof errno_names / sizeof errno_names[0]; i++)
    if (strlen(errno_names[i].name) == len && memcmp(errno_names[i].name, name, len) == 0)
      return errno_names[i].value;
  return 0;
}

/* Newlines inside a message would break the log's one-line form. */
static void one_line(char *s)
{
  size_t len = strlen(s);
  while (len > 0 && isspace((unsigned char) s[len - 1]))
    s[--len] = '\0';
  for (char *p = s; *p; p++)
    if (*p == '\n' || *p == '\r')
      *p = ' ';
}

/* Why exit status STATUS is odd, or "". */
static const char *status_note(int status, char *buf, size_t len)
{
  if (status == STATUS_ERROR || (status >= 8 && status <= 127))
    return "";
  snprintf(buf, len, " (exit status %d, which the sh protocol reserves or does not define; "
           "taken as an error: use 0 ok, 1 error, 2 not implemented, 3 false)", status);
  return buf;
}

#define MESSAGE_SHOWN 600 /* of a long stderr; the log's lines are short */

/* The script failed: stderr starts with an errno name (ENOSPC), then
 * the message; anything else is all message, and EIO.  A zero that
 * fails with ENOTSUP asks the server to write the zeroes instead: that
 * is not worth an error in the log. */
static void report_failure(const char *method, struct outcome *how)
{
  char *text = how->err;
  while (isspace((unsigned char) *text))
    text++;
  size_t word = 0;
  while (isupper((unsigned char) text[word]) || isdigit((unsigned char) text[word]))
    word++;
  int err = word > 0 && (text[word] == '\0' || isspace((unsigned char) text[word]))
              ? errno_by_name(text, word) : 0;
  if (err) {
    text += word;
    while (isspace((unsigned char) *text))
      text++;
  }
  one_line(text);
  size_t cut = how->err_dropped;
  if (strlen(text) > MESSAGE_SHOWN) {
    cut += strlen(text) - MESSAGE_SHOWN;
    text[MESSAGE_SHOWN] = '\0';
  }
  char note[200], dropped[80] = "";
  if (cut)
    snprintf(dropped, sizeof dropped, " [and %zu more bytes on stderr]", cut);
  void (*say)(const char *, ...) = err == ENOTSUP && strcmp(method, "zero") == 0
                                     ? nbdserve_debug : nbdserve_error;
  say("sh: %s %s: %s%s%s", script_given, method,
      *text ? text : err ? strerror(err) : "failed, saying nothing on stderr", dropped,
      status_note(how->status, note, sizeof note));
  nbdserve_set_error(err ? err : EIO);
}

/* Log, choose the client's errno, and return -1. */
static int fail_with(int err, const char *fmt, ...) NBDSERVE_PRINTF(2, 3);
static int fail_with(int err, const char *fmt, ...)
{
  va_list args;
  va_start(args, fmt);
  nbdserve_verror(fmt, args);
  va_end(args);
  nbdserve_set_error(err);
  return -1;
}

/* ---- Calling the script ------------------------------------------------------ */

#define MAX_ARGS 8

/* Run `SCRIPT METHOD ARGS...` (ARGS ends with NULL), INPUT on stdin,
 * stdout into OUT.  On ANSWER_ERROR the reason is logged and the errno
 * for the client set. */
static enum answer call(const char *method, const char *const *args, const void *input,
                        size_t input_len, struct sink *out)
{
  char *argv[MAX_ARGS + 3];
  size_t n = 0;
  argv[n++] = script;
  argv[n++] = (char *) method;
  for (; args && *args && n < MAX_ARGS + 2; args++)
    argv[n++] = (char *) *args;
  argv[n] = NULL;

  struct outcome how;
  char why[512];
  if (run_program(argv, script_env, input, input_len, out, &how, why, sizeof why) == -1) {
    fail_with(EIO, "sh: %s %s: %s", script_given, method, why);
    return ANSWER_ERROR;
  }
  if (how.status == -1) {
    fail_with(EIO, "sh: %s %s: killed by signal %d (%s)", script_given, method, how.signal,
              strsignal(how.signal));
    return ANSWER_ERROR;
  }
  if (how.status != STATUS_OK && how.status != STATUS_MISSING && how.status != STATUS_FALSE) {
    report_failure(method, &how);
    return ANSWER_ERROR;
  }
  if (out->overflow) {
    fail_with(EIO, "sh: %s %s: printed more than the %zu bytes %s on stdout", script_given,
              method, out->fixed ? out->size : out->limit, out->fixed ? "asked for" : "allowed");
    return ANSWER_ERROR;
  }
  if (how.err_len > 0) { /* stderr of a call that did not fail: only for -v */
    one_line(how.err);
    nbdserve_debug("sh: %s %s said on stderr: %s", script_given, method, how.err);
  }
  return how.status == STATUS_OK ? ANSWER_OK
         : how.status == STATUS_MISSING ? ANSWER_MISSING : ANSWER_FALSE;
}

/* A call whose stdout, if any, is text up to LIMIT bytes: *TEXT gets it
 * (malloc'ed, NUL-terminated; free it) when the answer is OK. */
static enum answer call_text(const char *method, const char *const *args, size_t limit,
                             char **text)
{
  struct sink out = { .limit = limit };
  enum answer a = call(method, args, NULL, 0, &out);
  if (a == ANSWER_OK && strlen(out.buf) != out.len) {
    fail_with(EIO, "sh: %s %s: printed a NUL byte, where text was expected", script_given,
              method);
    a = ANSWER_ERROR;
  }
  if (a == ANSWER_OK)
    *text = out.buf;
  else
    free(out.buf);
  return a;
}

/* A call whose stdout is ignored. */
static enum answer call_quiet(const char *method, const char *const *args)
{
  char *text = NULL;
  enum answer a = call_text(method, args, TEXT_LIMIT, &text);
  free(text);
  return a;
}

/* Leading and trailing white space off, in place. */
static char *trim(char *s)
{
  while (isspace((unsigned char) *s))
    s++;
  size_t len = strlen(s);
  while (len > 0 && isspace((unsigned char) s[len - 1]))
    s[--len] = '\0';
  return s;
}

static int unexpected(const char *method, enum answer a)
{
  if (a == ANSWER_MISSING)
    fail_with(EIO, "sh: %s has no %s method (it exited with status 2), and it is needed here",
              script_given, method);
  else if (a == ANSWER_FALSE)
    fail_with(EIO, "sh: %s %s: exited with status 3 (false), which this method does not allow",
              script_given, method);
  return -1;
}

/* ---- The scripts' directory and environment --------------------------- */

static int remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
  (void) st, (void) type, (void) ftw;
  if (remove(path) == -1 && errno != ENOENT)
    nbdserve_error("sh: cannot remove %s: %m", path);
  return 0;
}

static void remove_tmpdir(void)
{
  if (tmpdir && getpid() == tmpdir_owner)
    nftw(tmpdir, remove_entry, 16, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
  free(tmpdir);
  tmpdir = NULL;
}

static int make_tmpdir(void)
{
  const char *base = getenv("TMPDIR");
  if (base == NULL || *base == '\0')
    base = "/tmp";
  if (asprintf(&tmpdir, "%s/nbdserve-sh-XXXXXX", base) == -1) {
    tmpdir = NULL;
    return -1;
  }
  if (mkdtemp(tmpdir) == NULL) {
    nbdserve_error("sh: cannot make the scripts' directory %s: %m", tmpdir);
    free(tmpdir);
    tmpdir = NULL;
    return -1;
  }
  /* Start-up may fail after this (another layer's configuration) and
   * the server then exits without unload: the directory goes anyway.
   * Only its owner removes it, never a forked child that exits. */
  tmpdir_owner = getpid();
  atexit(remove_tmpdir);
  return 0;
}

/* The environment the scripts get: the server's, with tmpdir set. */
static int make_env(void)
{
  size_t n = 0;
  while (environ[n])
    n++;
  if (asprintf(&tmpdir_var, "tmpdir=%s", tmpdir) == -1) {
    tmpdir_var = NULL;
    return -1;
  }
  script_env = calloc(n + 2, sizeof *script_env);
  if (script_env == NULL)
    return -1;
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    if (strncmp(environ[i], "tmpdir=", 7) == 0)
      continue;
    if ((script_env[k++] = strdup(environ[i])) == NULL)
      return -1;
  }
  script_env[k] = tmpdir_var;
  return 0;
}

static void free_env(void)
{
  for (char **e = script_env; e && *e; e++)
    if (*e != tmpdir_var)
      free(*e);
  free(script_env);
  free(tmpdir_var);
  script_env = NULL;
  tmpdir_var = NULL;
}

/* ---- Finding the script -------------------------------------------------- */

/* "-": the script is what stdin holds, saved as a file of its own. */
static char *save_inline_script(void)
{
  char *path;
  if (asprintf(&path, "%s/inline-script", tmpdir) == -1)
    return NULL;
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0700);
  char buf[65536];
  ssize_t r = 0;
  while (fd >= 0 && (r = read(STDIN_FILENO, buf, sizeof buf)) != 0) {
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1 || write(fd, buf, (size_t) r) != r)
      break;
  }
  if (fd == -1 || r != 0 || close(fd) == -1) {
    nbdserve_error("sh: cannot save the script read from stdin in %s: %m", path);
    free(path);
    return NULL;
  }
  return path;
}

/* An absolute path (the server changes directory when it goes into the
 * background) of a regular file we may execute. */
static char *find_script(const char *value)
{
  if (strcmp(value, "-") == 0)
    return save_inline_script();
  char *path = realpath(value, NULL);
  struct stat st;
  if (path == NULL || stat(path, &st) == -1) {
    nbdserve_error("sh: script %s: %m", value);
    free(path);
    return NULL;
  }
  if (!S_ISREG(st.st_mode)) {
    nbdserve_error("sh: script %s is not a regular file", value);
    free(path);
    return NULL;
  }
  if (access(path, X_OK) == -1) {
    nbdserve_error("sh: script %s is not executable (chmod +x %s): %m", value, value);
    free(path);
    return NULL;
  }
  return path;
}

/* The first parameter: the script.  Its load and magic_config_key
 * methods run now, as the first things it is asked. */
static int setup_script(const char *value)
{
  if ((script_given = strdup(value)) == NULL) {
    nbdserve_error("sh: out of memory");
    return -1;
  }
  if (make_tmpdir() == -1)
    return -1; /* said why */
  if (make_env() == -1) {
    nbdserve_error("sh: out of memory");
    return -1;
  }
  if ((script = find_script(value)) == NULL)
    return -1;
  nbdserve_debug("sh: script %s, its directory %s", script, tmpdir);

  enum answer a = call_quiet("load", NULL);
  if (a == ANSWER_ERROR || a == ANSWER_FALSE)
    return a == ANSWER_FALSE ? unexpected("load", a) : -1;

  char *key = NULL;
  a = call_text("magic_config_key", NULL, TEXT_LIMIT, &key);
  if (a == ANSWER_OK && *trim(key)) {
    script_magic_key = strdup(trim(key));
    free(key);
    return script_magic_key ? 0 : -1;
  }
  free(key);
  return a == ANSWER_ERROR ? -1 : a == ANSWER_FALSE ? unexpected("magic_config_key", a) : 0;
}

/* ---- Life cycle --------------------------------------------------------- */

static int sh_config(const char *key, const char *value)
{
  if (script == NULL) {
    if (strcmp(key, "script") == 0)
      return setup_script(value);
    nbdserve_error("sh: the script comes first: nbdserve sh ./script.sh [key=value...] "
                   "(got %s=%s before it)", key, value);
    return -1;
  }
  /* A bare parameter after script= is ours (our magic key) by the
   * server's rule: it belongs to the script's magic key. */
  if (strcmp(key, "script") == 0) {
    if (script_magic_key == NULL) {
      nbdserve_error("sh: %s: the script is given already, and it prints no "
                     "magic_config_key to take a parameter without key= ('%s')",
                     script_given, value);
      return -1;
    }
    key = script_magic_key;
  }
  const char *args[] = { key, value, NULL };
  enum answer a = call_quiet("config", args);
  if (a == ANSWER_MISSING) {
    nbdserve_error("sh: %s takes no parameters (it has no config method), got %s=%s",
                   script_given, key, value);
    return -1;
  }
  return a == ANSWER_OK ? 0 : a == ANSWER_FALSE ? unexpected("config", a) : -1;
}

static const char *const thread_model_names[] = {
  [NBDSERVE_THREAD_MODEL_SERIALIZE_CONNECTIONS] = "serialize_connections",
  [NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS] = "serialize_all_requests",
  [NBDSERVE_THREAD_MODEL_SERIALIZE_REQUESTS] = "serialize_requests",
  [NBDSERVE_THREAD_MODEL_PARALLEL] = "parallel",
};

static int ask_thread_model(void)
{
  char *text = NULL;
  enum answer a = call_text("thread_model", NULL, TEXT_LIMIT, &text);
  if (a == ANSWER_OK) {
    char *name = trim(text);
    size_t i = 0;
    while (i < 4 && strcmp(name, thread_model_names[i]) != 0)
      i++;
    if (i < 4)
      script_thread_model = (int) i;
    else /* as nbdkit: what it does not understand is ignored */
      nbdserve_error("sh: %s thread_model: ignoring '%s' (use serialize_connections, "
                     "serialize_all_requests, serialize_requests or parallel); the thread "
                     "model stays %s", script_given, name, thread_model_names[script_thread_model]);
  }
  free(text);
  if (a == ANSWER_FALSE)
    return unexpected("thread_model", a);
  return a == ANSWER_ERROR ? -1 : 0;
}

static int sh_config_complete(void)
{
  if (script == NULL) {
    nbdserve_error("sh: which script? nbdserve sh ./script.sh [key=value...]");
    return -1;
  }
  enum answer a = call_quiet("config_complete", NULL);
  if (a == ANSWER_ERROR || a == ANSWER_FALSE)
    return a == ANSWER_FALSE ? unexpected("config_complete", a) : -1;
  return ask_thread_model();
}

static int sh_configured_thread_model(void)
{
  return script_thread_model;
}

/* Our get_ready runs after the server went into the background, which
 * is when nbdkit runs both get_ready and after_fork. */
static int sh_get_ready(void)
{
  tmpdir_owner = getpid(); /* the process that serves, and exits last */
  static const char *const methods[] = { "get_ready", "after_fork" };
  for (size_t i = 0; i < 2; i++) {
    enum answer a = call_quiet(methods[i], NULL);
    if (a == ANSWER_ERROR || a == ANSWER_FALSE)
      return a == ANSWER_FALSE ? unexpected(methods[i], a) : -1;
  }
  return 0;
}

static void sh_unload(void)
{
  if (script)
    call_quiet("unload", NULL); /* what it says is logged; nothing else to do */
  remove_tmpdir();
  free_env();
  free(script);
  free(script_given);
  free(script_magic_key);
  script = script_given = script_magic_key = NULL;
}

static void sh_dump_plugin(void)
{
  printf("max_known_status=%d\n", STATUS_FALSE);
  fflush(stdout);
  if (script == NULL)
    return;
  char *text = NULL;
  if (call_text("dump_plugin", NULL, TEXT_LIMIT, &text) == ANSWER_OK)
    fputs(text, stdout);
  free(text);
}

/* ---- Connections ---------------------------------------------------------- */

static const char *truth(int b)
{
  return b ? "true" : "false";
}

static void *sh_open(int readonly, const char *export_name)
{
  const char *args[] = { truth(readonly), export_name, truth(nbdserve_is_tls()), NULL };
  char *text = NULL;
  enum answer a = call_text("open", args, HANDLE_LIMIT, &text);
  if (a == ANSWER_MISSING)
    text = strdup(""); /* no open method: the handle is "" */
  else if (a != ANSWER_OK) {
    free(text);
    if (a == ANSWER_FALSE)
      unexpected("open", a);
    return NULL;
  }
  struct handle *h = calloc(1, sizeof *h);
  if (text == NULL || h == NULL) {
    free(text);
    free(h);
    fail_with(ENOMEM, "sh: out of memory");
    return NULL;
  }
  size_t len = strlen(text);
  if (len > 0 && text[len - 1] == '\n') /* one newline off, as nbdkit does */
    text[len - 1] = '\0';
  h->name = text;
  h->can_flush = -1;
  return h;
}

static void sh_close(void *handle)
{
  struct handle *h = handle;
  const char *args[] = { h->name, NULL };
  call_quiet("close", args); /* an error is logged; the connection is over anyway */
  free(h->name);
  free(h);
}

/* ---- Capabilities --------------------------------------------------------- */

/* A size the script printed, or -1 (logged). */
static int64_t printed_size(const char *method, const char *text)
{
  int64_t size = nbdserve_parse_size(text);
  if (size == -1)
    fail_with(EIO, "sh: %s %s: printed '%s', which is not a size", script_given, method, text);
  return size;
}

static int64_t sh_get_size(void *handle)
{
  struct handle *h = handle;
  const char *args[] = { h->name, NULL };
  char *text = NULL;
  enum answer a = call_text("get_size", args, TEXT_LIMIT, &text);
  int64_t size = a == ANSWER_OK ? printed_size("get_size", trim(text)) : unexpected("get_size", a);
  free(text);
  return size;
}

static bool power_of_two(int64_t n)
{
  return n > 0 && (n & (n - 1)) == 0;
}

static int check_block_size(const int64_t v[3])
{
  if (!power_of_two(v[0]) || v[0] > 65536)
    return fail_with(EIO, "sh: %s block_size: minimum %" PRId64 " is not a power of two "
                     "from 1 to 64K", script_given, v[0]);
  if (!power_of_two(v[1]) || v[1] < 512 || v[1] < v[0] || v[1] > UINT32_MAX)
    return fail_with(EIO, "sh: %s block_size: preferred %" PRId64 " is not a power of two, "
                     "at least 512 and the minimum", script_given, v[1]);
  if (v[2] < v[1] || v[2] > UINT32_MAX)
    return fail_with(EIO, "sh: %s block_size: maximum %" PRId64 " is below the preferred "
                     "size or above 4G", script_given, v[2]);
  return 0;
}

static int sh_block_size(void *handle, uint32_t *minimum, uint32_t *preferred, uint32_t *maximum)
{
  struct handle *h = handle;
  const char *args[] = { h->name, NULL };
  char *text = NULL;
  enum answer a = call_text("block_size", args, TEXT_LIMIT, &text);
  if (a != ANSWER_OK) {
    free(text);
    return a == ANSWER_MISSING ? 0 /* the server's defaults stand */ : unexpected("block_size", a);
  }
  int64_t v[3];
  int n = 0, r = 0;
  char *save = NULL;
  for (char *word = strtok_r(text, " \t\r\n", &save); word && r == 0;
       word = strtok_r(NULL, " \t\r\n", &save)) {
    if (n == 3)
      n++; /* one too many */
    else if ((v[n++] = printed_size("block_size", word)) == -1)
      r = -1;
  }
  if (r == 0 && n != 3)
    r = fail_with(EIO, "sh: %s block_size: print three sizes: minimum, preferred, maximum",
                  script_given);
  if (r == 0)
    r = check_block_size(v);
  free(text);
  if (r == 0) {
    *minimum = (uint32_t) v[0];
    *preferred = (uint32_t) v[1];
    *maximum = (uint32_t) v[2];
  }
  return r;
}

/* A yes/no method: exit 0 yes, 3 no; no such method is no. */
static int boolean_method(struct handle *h, const char *method)
{
  const char *args[] = { h->name, NULL };
  enum answer a = call_quiet(method, args);
  return a == ANSWER_OK ? 1 : a == ANSWER_ERROR ? -1 : 0;
}

static int sh_can_write(void *h) { return boolean_method(h, "can_write"); }
static int sh_is_rotational(void *h) { return boolean_method(h, "is_rotational"); }
static int sh_can_trim(void *h) { return boolean_method(h, "can_trim"); }
static int sh_can_zero(void *h) { return boolean_method(h, "can_zero"); }
static int sh_can_fast_zero(void *h) { return boolean_method(h, "can_fast_zero"); }
static int sh_can_multi_conn(void *h) { return boolean_method(h, "can_multi_conn"); }
static int sh_can_extents(void *h) { return boolean_method(h, "can_extents"); }

static int sh_can_flush(void *handle)
{
  struct handle *h = handle;
  if (h->can_flush == -1) /* the handshake asks one capability at a time */
    h->can_flush = boolean_method(h, "can_flush");
  return h->can_flush;
}

/* can_fua and can_cache print none, emulate or native.  MISSING_IS is
 * the answer when the method is missing. */
static int mode_method(struct handle *h, const char *method, int missing_is)
{
  const char *args[] = { h->name, NULL };
  char *text = NULL;
  enum answer a = call_text(method, args, TEXT_LIMIT, &text);
  int r;
  if (a == ANSWER_MISSING)
    r = missing_is;
  else if (a != ANSWER_OK)
    r = unexpected(method, a);
  else {
    const char *word = trim(text);
    r = strcmp(word, "none") == 0 ? 0 : strcmp(word, "emulate") == 0 ? 1
        : strcmp(word, "native") == 0 ? 2 : -1;
    if (r == -1)
      fail_with(EIO, "sh: %s %s: printed '%s'; expected none, emulate or native",
                script_given, method, word);
  }
  free(text);
  return r;
}

static int sh_can_fua(void *handle)
{
  /* No can_fua: emulated with flush where there is one, as nbdkit does. */
  int flush = sh_can_flush(handle);
  if (flush == -1)
    return -1;
  return mode_method(handle, "can_fua", flush ? NBDSERVE_FUA_EMULATE : NBDSERVE_FUA_NONE);
}

static int sh_can_cache(void *handle)
{
  return mode_method(handle, "can_cache", NBDSERVE_CACHE_NONE);
}

/* ---- Data ------------------------------------------------------------------- */

/* "fua,may_trim,fast": the flags a method gets as its last argument. */
static const char *flag_words(uint32_t flags, char *buf, size_t len)
{
  snprintf(buf, len, "%s%s%s%s%s",
           flags & NBDSERVE_FLAG_FUA ? "fua" : "",
           (flags & NBDSERVE_FLAG_FUA) && (flags & (NBDSERVE_FLAG_MAY_TRIM | NBDSERVE_FLAG_FAST_ZERO)) ? "," : "",
           flags & NBDSERVE_FLAG_MAY_TRIM ? "may_trim" : "",
           (flags & NBDSERVE_FLAG_MAY_TRIM) && (flags & NBDSERVE_FLAG_FAST_ZERO) ? "," : "",
           flags & NBDSERVE_FLAG_FAST_ZERO ? "fast" : "");
  return buf;
}

static int data_result(const char *method, enum answer a)
{
  return a == ANSWER_OK ? 0 : unexpected(method, a);
}

static int sh_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  char c[NUM_LEN], o[NUM_LEN];
  (void) flags;
  snprintf(c, sizeof c, "%" PRIu32, count);
  snprintf(o, sizeof o, "%" PRIu64, offset);
  const char *args[] = { h->name, c, o, NULL };
  struct sink out = { .buf = buf, .size = count, .fixed = true };
  enum answer a = call("pread", args, NULL, 0, &out);
  if (a == ANSWER_OK && out.len != count)
    return fail_with(EIO, "sh: %s pread: printed %zu bytes, but %" PRIu32 " were asked for "
                     "(at offset %" PRIu64 ")", script_given, out.len, count, offset);
  return data_result("pread", a);
}

static int sh_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset,
                     uint32_t flags)
{
  struct handle *h = handle;
  char c[NUM_LEN], o[NUM_LEN], f[32];
  snprintf(c, sizeof c, "%" PRIu32, count);
  snprintf(o, sizeof o, "%" PRIu64, offset);
  const char *args[] = { h->name, c, o, flag_words(flags, f, sizeof f), NULL };
  struct sink out = { .limit = TEXT_LIMIT };
  enum answer a = call("pwrite", args, buf, count, &out);
  free(out.buf);
  return data_result("pwrite", a);
}

static int sh_flush(void *handle, uint32_t flags)
{
  struct handle *h = handle;
  (void) flags;
  const char *args[] = { h->name, NULL };
  return data_result("flush", call_quiet("flush", args));
}

/* trim, zero and cache: a range, and for the first two the flags. */
static enum answer range_method(const char *method, struct handle *h, uint64_t count,
                                uint64_t offset, const char *flags)
{
  char c[NUM_LEN], o[NUM_LEN];
  snprintf(c, sizeof c, "%" PRIu64, count);
  snprintf(o, sizeof o, "%" PRIu64, offset);
  const char *args[] = { h->name, c, o, flags, NULL };
  return call_quiet(method, args);
}

static int sh_trim(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  char f[32];
  return data_result("trim", range_method("trim", handle, count, offset,
                                          flag_words(flags, f, sizeof f)));
}

static int sh_zero(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  char f[32];
  enum answer a = range_method("zero", handle, count, offset, flag_words(flags, f, sizeof f));
  if (a == ANSWER_MISSING) {
    /* No zero method: the server writes the zeroes with pwrite (or,
     * for a fast zero, tells the client it would not be fast). */
    nbdserve_set_error(ENOTSUP);
    return -1;
  }
  return data_result("zero", a);
}

static int sh_cache(void *handle, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  return data_result("cache", range_method("cache", handle, count, offset, NULL));
}

/* An extent's type: a number, or words "hole" and "zero" joined by
 * commas; none is 0 (data). */
static int extent_type(const char *word, uint64_t *type)
{
  *type = 0;
  if (word == NULL)
    return 0;
  if (isdigit((unsigned char) *word)) {
    char *end;
    errno = 0;
    *type = strtoull(word, &end, 0);
    return errno || *end ? -1 : 0;
  }
  char copy[64];
  if (strlen(word) >= sizeof copy)
    return -1;
  strcpy(copy, word);
  char *save = NULL;
  for (char *w = strtok_r(copy, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
    if (strcmp(w, "hole") == 0)
      *type |= NBDSERVE_EXTENT_HOLE;
    else if (strcmp(w, "zero") == 0)
      *type |= NBDSERVE_EXTENT_ZERO;
    else
      return -1;
  }
  return 0;
}

/* One line "offset length [type]" into the list. */
static int add_extent_line(char *line, struct nbdserve_extents *extents)
{
  char *save = NULL;
  char *words[4] = { NULL };
  int n = 0;
  for (char *w = strtok_r(line, " \t\r", &save); w && n < 4; w = strtok_r(NULL, " \t\r", &save))
    words[n++] = w;
  if (n == 0)
    return 0; /* a blank line */
  uint64_t type;
  if (n < 2 || n > 3 || extent_type(words[2], &type) == -1) {
    fail_with(EIO, "sh: %s extents: cannot read the line '%s%s%s%s%s': expected "
              "'offset length [type]', type a number or hole,zero", script_given,
              words[0], n > 1 ? " " : "", n > 1 ? words[1] : "", n > 2 ? " " : "",
              n > 2 ? words[2] : "");
    return -1;
  }
  int64_t off = printed_size("extents", words[0]);
  int64_t len = off == -1 ? -1 : printed_size("extents", words[1]);
  if (len == -1)
    return -1;
  if (nbdserve_add_extent(extents, (uint64_t) off, (uint64_t) len, type) == -1) {
    fail_with(EIO, "sh: %s extents: the extents must follow each other in order, without "
              "gaps", script_given);
    return -1;
  }
  return 0;
}

static int sh_extents(void *handle, uint64_t count, uint64_t offset, uint32_t flags,
                      struct nbdserve_extents *extents)
{
  struct handle *h = handle;
  char c[NUM_LEN], o[NUM_LEN];
  snprintf(c, sizeof c, "%" PRIu64, count);
  snprintf(o, sizeof o, "%" PRIu64, offset);
  const char *args[] = { h->name, c, o, flags & NBDSERVE_FLAG_REQ_ONE ? "req_one" : "", NULL };
  char *text = NULL;
  enum answer a = call_text("extents", args, EXTENTS_LIMIT, &text);
  int r = a == ANSWER_OK ? 0 : unexpected("extents", a);
  char *save = NULL;
  for (char *line = a == ANSWER_OK ? strtok_r(text, "\n", &save) : NULL; line && r == 0;
       line = strtok_r(NULL, "\n", &save))
    r = add_extent_line(line, extents);
  if (r == 0 && nbdserve_extents_end(extents) == offset)
    r = fail_with(EIO, "sh: %s extents: printed no extent covering offset %" PRIu64,
                  script_given, offset);
  free(text);
  return r;
}

static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT,
  .name = "sh",
  .longname = "a plugin written as a script (nbdkit's sh plugin convention)",
  .version = "0.1.0",
  .description = "Runs SCRIPT once per callback: SCRIPT METHOD ARGS..., data on stdin and "
                 "stdout, errors as 'ERRNO message' on stderr, exit status 0 ok, 1 error, "
                 "2 not implemented, 3 false.  Scripts written for nbdkit's sh plugin run "
                 "unchanged.  The scripts get a private directory in $tmpdir.",
  .config_help = "script=PATH     the script or program (the magic key: nbdserve sh ./disk.sh);\n"
                 "                '-' reads the script from stdin\n"
                 "key=value       every other parameter goes to the script: SCRIPT config "
                 "key value",
  .magic_config_key = "script",
  /* Until the script's thread_model method says otherwise. */
  .thread_model = NBDSERVE_THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
  .config = sh_config,
  .config_complete = sh_config_complete,
  .configured_thread_model = sh_configured_thread_model,
  .get_ready = sh_get_ready,
  .unload = sh_unload,
  .dump_plugin = sh_dump_plugin,
  .open = sh_open,
  .close = sh_close,
  .get_size = sh_get_size,
  .block_size = sh_block_size,
  .can_write = sh_can_write,
  .can_flush = sh_can_flush,
  .is_rotational = sh_is_rotational,
  .can_trim = sh_can_trim,
  .can_zero = sh_can_zero,
  .can_fast_zero = sh_can_fast_zero,
  .can_fua = sh_can_fua,
  .can_multi_conn = sh_can_multi_conn,
  .can_cache = sh_can_cache,
  .can_extents = sh_can_extents,
  .pread = sh_pread,
  .pwrite = sh_pwrite,
  .flush = sh_flush,
  .trim = sh_trim,
  .zero = sh_zero,
  .cache = sh_cache,
  .extents = sh_extents,
};

NBDSERVE_REGISTER_PLUGIN(plugin)
