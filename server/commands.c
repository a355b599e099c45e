/* nbdserve - the control commands plugins and filters register, and the
 * answers they build (the public nbdserve_register_command and
 * nbdserve_reply_* functions).
 *
 * Registration happens only while a layer's set-up callback runs on the
 * main thread (plugins.c says which layer that is), before any thread
 * could read the table; from then on the table never changes, so the
 * main loop and the workers read it without a lock.
 *
 * Commands run on worker threads (control.c submits them), one at a
 * time: a plugin's command then needs no lock against itself, only
 * against its own data callbacks.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define COMMAND_NAME_MAX 64
#define COMMAND_HELP_MAX 200

struct command {
  char *full_name; /* "LAYER.NAME" */
  char *help;
  nbdserve_command_fn fn;
};

static struct command *commands;
static size_t nr_commands;
static pthread_mutex_t invoke_lock = PTHREAD_MUTEX_INITIALIZER;

/* Names and keys go on the wire unquoted: keep them plain words.  Dots
 * are for keys only (a command's name gets its one dot from the core). */
static bool valid_word(const char *s, bool dots)
{
  size_t n = strlen(s);
  if (n == 0 || n > COMMAND_NAME_MAX)
    return false;
  for (const char *p = s; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_' || *p == '-' ||
          (dots && *p == '.')))
      return false;
  return true;
}

int nbdserve_register_command(const char *name, const char *help, nbdserve_command_fn fn)
{
  const char *layer = chain_calling_layer();
  if (layer == NULL) {
    nbdserve_error("nbdserve_register_command: only load, config, config_complete and "
                   "get_ready may register commands");
    errno = EPERM;
    return -1;
  }
  if (name == NULL || !valid_word(name, false) || fn == NULL || help == NULL ||
      strlen(help) > COMMAND_HELP_MAX || strpbrk(help, "\r\n") != NULL) {
    nbdserve_error("%s: nbdserve_register_command: the name must be 1 to %d of "
                   "[a-z0-9_-] and the help one line of at most %d bytes",
                   layer, COMMAND_NAME_MAX, COMMAND_HELP_MAX);
    errno = EINVAL;
    return -1;
  }
  char *full;
  if (asprintf(&full, "%s.%s", layer, name) < 0) {
    errno = ENOMEM;
    return -1;
  }
  if (command_find(full)) {
    nbdserve_error("%s: command %s is registered already", layer, full);
    free(full);
    errno = EEXIST;
    return -1;
  }
  struct command *grown = realloc(commands, (nr_commands + 1) * sizeof *grown);
  char *help_copy = strdup(help);
  if (grown == NULL || help_copy == NULL) {
    if (grown)
      commands = grown;
    free(full);
    free(help_copy);
    errno = ENOMEM;
    return -1;
  }
  commands = grown;
  commands[nr_commands++] = (struct command) { .full_name = full, .help = help_copy, .fn = fn };
  nbdserve_debug("control command %s registered", full);
  return 0;
}

size_t commands_count(void)
{
  return nr_commands;
}

const struct command *command_at(size_t i)
{
  return i < nr_commands ? &commands[i] : NULL;
}

const struct command *command_find(const char *full_name)
{
  for (size_t i = 0; i < nr_commands; i++)
    if (strcmp(commands[i].full_name, full_name) == 0)
      return &commands[i];
  return NULL;
}

const char *command_full_name(const struct command *cmd)
{
  return cmd->full_name;
}

const char *command_help(const struct command *cmd)
{
  return cmd->help;
}

void commands_free(void)
{
  for (size_t i = 0; i < nr_commands; i++) {
    free(commands[i].full_name);
    free(commands[i].help);
  }
  free(commands);
  commands = NULL;
  nr_commands = 0;
}

/* ---- Answers --------------------------------------------------------------- */

static int reply_append(struct nbdserve_reply *reply, const char *s, size_t n)
{
  if (reply->overflowed || reply->len + n > REPLY_MAX_BYTES) {
    reply->overflowed = true;
    return -1;
  }
  if (reply->len + n > reply->cap) {
    size_t cap = reply->cap ? reply->cap : 256;
    while (cap < reply->len + n)
      cap *= 2;
    char *grown = realloc(reply->text, cap);
    if (grown == NULL) {
      reply->overflowed = true;
      return -1;
    }
    reply->text = grown;
    reply->cap = cap;
  }
  memcpy(reply->text + reply->len, s, n);
  reply->len += n;
  return 0;
}

/* Values stay on their line: the protocol is one answer per line. */
static void one_line(char *s)
{
  for (; *s; s++)
    if (*s == '\n' || *s == '\r')
      *s = ' ';
}

int reply_add_line(struct nbdserve_reply *reply, const char *key, const char *value)
{
  char *v = strdup(value);
  if (v == NULL) {
    reply->overflowed = true;
    return -1;
  }
  one_line(v);
  int r = 0;
  if (reply_append(reply, key, strlen(key)) == -1 || reply_append(reply, "=", 1) == -1 ||
      reply_append(reply, v, strlen(v)) == -1 || reply_append(reply, "\n", 1) == -1)
    r = -1;
  free(v);
  return r;
}

int nbdserve_reply_add(struct nbdserve_reply *reply, const char *key, const char *fmt, ...)
{
  if (key == NULL || !valid_word(key, true) || fmt == NULL) {
    errno = EINVAL;
    return -1;
  }
  va_list args;
  va_start(args, fmt);
  char *value;
  int n = vasprintf(&value, fmt, args);
  va_end(args);
  if (n < 0) {
    reply->overflowed = true;
    errno = E2BIG;
    return -1;
  }
  int r = reply_add_line(reply, key, value);
  free(value);
  if (r == -1)
    errno = E2BIG;
  return r;
}

void nbdserve_reply_error(struct nbdserve_reply *reply, const char *fmt, ...)
{
  va_list args;
  va_start(args, fmt);
  char *msg;
  if (vasprintf(&msg, fmt, args) < 0)
    msg = NULL;
  va_end(args);
  if (msg == NULL)
    return;
  one_line(msg);
  free(reply->error);
  reply->error = msg;
}

void reply_free(struct nbdserve_reply *reply)
{
  free(reply->text);
  free(reply->error);
  memset(reply, 0, sizeof *reply);
}

void command_invoke(const struct command *cmd, int argc, const char *const *keys,
                    const char *const *values, struct nbdserve_reply *reply)
{
  pthread_mutex_lock(&invoke_lock);
  backend_error = 0;
  int r = cmd->fn(argc, keys, values, reply);
  pthread_mutex_unlock(&invoke_lock);
  if (reply->overflowed) {
    free(reply->error);
    reply->error = NULL;
    reply->error_text = "reply too long";
  }
  reply->failed = r != 0 || reply->overflowed;
  if (reply->failed && reply->error_text == NULL)
    reply->error_text = reply->error ? reply->error : "command failed";
}
