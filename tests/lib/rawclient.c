/* rawclient - a scriptable raw NBD client for the tests.
 *
 * It says on the wire exactly what it is told, including everything a
 * real client never sends (bad magics, lying lengths, requests after
 * NBD_CMD_DISC), and prints what comes back one line per item, so a shell
 * test can grep or compare the output.
 *
 *   rawclient [-t SECONDS] SOCKET [COMMAND]...
 *
 * Each COMMAND is one argument (or, with none given, one line of stdin;
 * '#' starts a comment).  Words are separated by blanks.  Commands:
 *
 *   greeting [CFLAGS]      read the server greeting, answer with client
 *                          flags (default 3: FIXED_NEWSTYLE|NO_ZEROES)
 *   hello                  greeting 3
 *   opt TYPE [DATA]        send an option (TYPE: name or number)
 *   opt-raw MAGIC TYPE LEN [DATA]   option header with any magic (a number
 *                          or IHAVEOPT) and any length
 *   reply                  read one option reply
 *   replies                read option replies up to the final one
 *   structured | extended  negotiate structured replies / extended headers
 *   list-meta Q... | set-meta Q...  meta context option, export "",
 *                          queries Q ("-" alone means no query)
 *   go [NAME] | info [NAME]  NBD_OPT_GO / NBD_OPT_INFO, no info requests
 *   go-bs [NAME]           NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE
 *   export-name [NAME]     NBD_OPT_EXPORT_NAME, then read size and flags
 *   req CMD [key=value]... send a request.  Keys: flags= (names joined by
 *                          '|' or a number), cookie=, off=, len=, magic=,
 *                          ext=0|1 (header style; default: negotiated),
 *                          data=DATA (payload; len defaults to its size)
 *   recv [N]               read N (default 1) complete replies
 *   send DATA              send raw bytes
 *   wait-eof               read until the server closes: prints EOF
 *   expect-eof             like wait-eof but fails at once if data comes
 *   data-check DATA        compare the last read's data with DATA
 *   data-save FILE         write the last read's data to FILE
 *   sleep MS | timeout SECONDS | close
 *
 * DATA is '+'-joined pieces: hex:0a0b  str:TEXT  name:TEXT (u32 length
 * then TEXT)  u8:N u16:N u32:N u64:N  fill:COUNT:BYTE  file:PATH
 *
 * Output lines:
 *   greeting newstyle flags=0x3 | greeting oldstyle size=N flags=0xF
 *   rep OPT TYPE len=N [details]          an option reply
 *   export size=N flags=0xF               after export-name
 *   chunk cookie=C type=T flags=F ...     one structured/extended chunk
 *   reply cookie=C error=E kind=K         a complete reply (E: OK or name)
 *   data ok | data differs at byte N | EOF | TIMEOUT
 * Exit status: 0 done (also after EOF), 1 usage or connect error,
 * 2 timeout or a reply the client cannot parse, 3 data-check mismatch
 * or expect-eof seeing data.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- Protocol constants (from the NBD specification) ------------------ */
#define NBDMAGIC 0x4e42444d41474943ULL
#define IHAVEOPT 0x49484156454F5054ULL
#define OLDSTYLE_MAGIC 0x0000420281861253ULL
#define REP_MAGIC 0x0003e889045565a9ULL
#define REQUEST_MAGIC 0x25609513u
#define EXT_REQUEST_MAGIC 0x21e41c71u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define EXT_REPLY_MAGIC 0x6e8a278cu

#define OPT_STRUCTURED_REPLY 8
#define OPT_EXTENDED_HEADERS 11
#define REP_ACK 1
#define REP_SERVER 2
#define REP_INFO 3
#define REP_META_CONTEXT 4
#define REP_ERROR_BIT 0x80000000u
#define CMD_READ 0
#define CMD_WRITE 1
#define REPLY_FLAG_DONE 1

/* Replies bigger than this are treated as garbage rather than read. */
#define MAX_REPLY_PAYLOAD (64u << 20)
#define MAX_PENDING 4096

struct name {
  const char *name;
  uint32_t value;
};

static const struct name option_names[] = {
  { "EXPORT_NAME", 1 }, { "ABORT", 2 }, { "LIST", 3 }, { "PEEK_EXPORT", 4 },
  { "STARTTLS", 5 }, { "INFO", 6 }, { "GO", 7 }, { "STRUCTURED_REPLY", 8 },
  { "LIST_META_CONTEXT", 9 }, { "SET_META_CONTEXT", 10 }, { "EXTENDED_HEADERS", 11 },
  { NULL, 0 }
};

static const struct name reply_names[] = {
  { "ACK", 1 }, { "SERVER", 2 }, { "INFO", 3 }, { "META_CONTEXT", 4 },
  { "ERR_UNSUP", REP_ERROR_BIT | 1 }, { "ERR_POLICY", REP_ERROR_BIT | 2 },
  { "ERR_INVALID", REP_ERROR_BIT | 3 }, { "ERR_PLATFORM", REP_ERROR_BIT | 4 },
  { "ERR_TLS_REQD", REP_ERROR_BIT | 5 }, { "ERR_UNKNOWN", REP_ERROR_BIT | 6 },
  { "ERR_SHUTDOWN", REP_ERROR_BIT | 7 }, { "ERR_BLOCK_SIZE_REQD", REP_ERROR_BIT | 8 },
  { "ERR_TOO_BIG", REP_ERROR_BIT | 9 }, { "ERR_EXT_HEADER_REQD", REP_ERROR_BIT | 10 },
  { NULL, 0 }
};

static const struct name command_names[] = {
  { "READ", 0 }, { "WRITE", 1 }, { "DISC", 2 }, { "FLUSH", 3 }, { "TRIM", 4 },
  { "CACHE", 5 }, { "WRITE_ZEROES", 6 }, { "BLOCK_STATUS", 7 }, { NULL, 0 }
};

static const struct name flag_names[] = {
  { "FUA", 1 }, { "NO_HOLE", 2 }, { "DF", 4 }, { "REQ_ONE", 8 },
  { "FAST_ZERO", 16 }, { "PAYLOAD_LEN", 32 }, { NULL, 0 }
};

static const struct name chunk_names[] = {
  { "NONE", 0 }, { "OFFSET_DATA", 1 }, { "OFFSET_HOLE", 2 }, { "BLOCK_STATUS", 5 },
  { "BLOCK_STATUS_EXT", 6 }, { "ERROR", 0x8001 }, { "ERROR_OFFSET", 0x8002 },
  { NULL, 0 }
};

static const struct name error_names[] = {
  { "OK", 0 }, { "EPERM", 1 }, { "EIO", 5 }, { "ENOMEM", 12 }, { "EINVAL", 22 },
  { "ENOSPC", 28 }, { "EOVERFLOW", 75 }, { "ENOTSUP", 95 }, { "ESHUTDOWN", 108 },
  { NULL, 0 }
};

/* ---- State of the one connection -------------------------------------- */
static int sock = -1;
static int timeout_ms = 5000;
static uint32_t client_flags = 3;
static uint32_t last_option; /* to notice the ACK that switches modes */
static bool extended_mode; /* extended headers negotiated */
static int exit_status;
static bool send_failed; /* the server closed while we were sending */

/* Requests sent and not yet answered: a simple reply to a read carries
 * data whose length only the request knows. */
struct pending {
  uint64_t cookie;
  uint16_t type;
  uint64_t offset;
  uint64_t length;
};
static struct pending pending[MAX_PENDING];
static size_t n_pending;

/* Data of the last read request answered, for data-check / data-save. */
static unsigned char *last_data;
static size_t last_data_len;

/* A growable byte buffer. */
struct bytes {
  unsigned char *ptr;
  size_t len, cap;
};

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "rawclient: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  exit(1);
}

static void bytes_append(struct bytes *b, const void *data, size_t len)
{
  if (b->len + len > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + len)
      cap *= 2;
    b->ptr = realloc(b->ptr, cap);
    if (!b->ptr)
      die("out of memory");
    b->cap = cap;
  }
  if (len)
    memcpy(b->ptr + b->len, data, len);
  b->len += len;
}

static void put_be(struct bytes *b, uint64_t v, int size)
{
  unsigned char buf[8];
  for (int i = 0; i < size; i++)
    buf[i] = (unsigned char) (v >> (8 * (size - 1 - i)));
  bytes_append(b, buf, (size_t) size);
}

static uint64_t get_be(const unsigned char *p, int size)
{
  uint64_t v = 0;
  for (int i = 0; i < size; i++)
    v = (v << 8) | p[i];
  return v;
}

/* ---- Names and numbers ------------------------------------------------ */
static uint64_t parse_number(const char *s)
{
  char *end;
  errno = 0;
  uint64_t v = strtoull(s, &end, 0);
  if (errno || end == s)
    die("not a number: '%s'", s);
  /* Size suffixes keep test scripts readable: 64K, 32M, 1G, 1T. */
  switch (*end) {
  case 'K': v <<= 10; end++; break;
  case 'M': v <<= 20; end++; break;
  case 'G': v <<= 30; end++; break;
  case 'T': v <<= 40; end++; break;
  default: break;
  }
  if (*end)
    die("not a number: '%s'", s);
  return v;
}

static uint32_t lookup(const struct name *names, const char *s)
{
  for (const struct name *n = names; n->name; n++)
    if (strcasecmp(n->name, s) == 0)
      return n->value;
  return (uint32_t) parse_number(s);
}

/* Name of VALUE, or its number in a static buffer. */
static const char *name_of(const struct name *names, uint32_t value)
{
  static char buf[4][24];
  static int which;
  for (const struct name *n = names; n->name; n++)
    if (n->value == value)
      return n->name;
  which = (which + 1) % 4;
  snprintf(buf[which], sizeof buf[which], "%" PRIu32, value);
  return buf[which];
}

static uint32_t parse_flags(const char *s)
{
  uint32_t flags = 0;
  char *copy = strdup(s), *save = NULL;
  for (char *tok = strtok_r(copy, "|", &save); tok; tok = strtok_r(NULL, "|", &save))
    flags |= lookup(flag_names, tok);
  free(copy);
  return flags;
}

/* ---- DATA specifications ---------------------------------------------- */
static void parse_hex(struct bytes *b, const char *hex)
{
  size_t n = strlen(hex);
  if (n % 2)
    die("odd number of hex digits: '%s'", hex);
  for (size_t i = 0; i < n; i += 2) {
    char pair[3] = { hex[i], hex[i + 1], 0 };
    char *end;
    unsigned long v = strtoul(pair, &end, 16);
    if (*end)
      die("bad hex: '%s'", hex);
    unsigned char c = (unsigned char) v;
    bytes_append(b, &c, 1);
  }
}

static void append_file(struct bytes *b, const char *path)
{
  FILE *f = fopen(path, "rb");
  if (!f)
    die("%s: %s", path, strerror(errno));
  unsigned char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0)
    bytes_append(b, buf, n);
  fclose(f);
}

static void parse_piece(struct bytes *b, const char *piece)
{
  const char *colon = strchr(piece, ':');
  if (!colon)
    die("bad data piece '%s' (want kind:value)", piece);
  size_t kind_len = (size_t) (colon - piece);
  const char *arg = colon + 1;
#define KIND(k) (kind_len == strlen(k) && strncmp(piece, k, kind_len) == 0)
  if (KIND("hex"))
    parse_hex(b, arg);
  else if (KIND("str"))
    bytes_append(b, arg, strlen(arg));
  else if (KIND("name")) {
    put_be(b, strlen(arg), 4);
    bytes_append(b, arg, strlen(arg));
  }
  else if (KIND("u8"))
    put_be(b, parse_number(arg), 1);
  else if (KIND("u16"))
    put_be(b, parse_number(arg), 2);
  else if (KIND("u32"))
    put_be(b, parse_number(arg), 4);
  else if (KIND("u64"))
    put_be(b, parse_number(arg), 8);
  else if (KIND("fill")) {
    const char *sep = strchr(arg, ':');
    if (!sep)
      die("fill wants fill:COUNT:BYTE");
    char *count_str = strndup(arg, (size_t) (sep - arg));
    uint64_t count = parse_number(count_str);
    unsigned char byte = (unsigned char) parse_number(sep + 1);
    free(count_str);
    for (uint64_t i = 0; i < count; i++)
      bytes_append(b, &byte, 1);
  }
  else if (KIND("file"))
    append_file(b, arg);
  else
    die("unknown data piece '%s'", piece);
#undef KIND
}

/* Pieces are joined with '+'; a name: or str: piece runs to the next '+'. */
static struct bytes parse_data(const char *spec)
{
  struct bytes b = { 0 };
  char *copy = strdup(spec), *save = NULL;
  for (char *tok = strtok_r(copy, "+", &save); tok; tok = strtok_r(NULL, "+", &save))
    parse_piece(&b, tok);
  free(copy);
  return b;
}

/* ---- Socket I/O with timeouts ----------------------------------------- */
static void saw_eof(void) __attribute__((noreturn));
static void saw_eof(void)
{
  printf("EOF\n");
  exit(exit_status);
}

static void timed_out(void) __attribute__((noreturn));
static void timed_out(void)
{
  printf("TIMEOUT\n");
  exit(2);
}

/* Wait until the socket is readable; false on timeout. */
static bool wait_readable(int ms)
{
  struct pollfd pfd = { .fd = sock, .events = POLLIN };
  int r;
  do
    r = poll(&pfd, 1, ms);
  while (r < 0 && errno == EINTR);
  if (r < 0)
    die("poll: %s", strerror(errno));
  return r > 0;
}

static void read_exact(void *buf, size_t len)
{
  unsigned char *p = buf;
  while (len > 0) {
    if (!wait_readable(timeout_ms))
      timed_out();
    ssize_t r = recv(sock, p, len, 0);
    if (r == 0 || (r < 0 && (errno == ECONNRESET || errno == EPIPE)))
      saw_eof();
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN)
        continue;
      die("recv: %s", strerror(errno));
    }
    p += r;
    len -= (size_t) r;
  }
}

static void write_all(const void *buf, size_t len)
{
  if (send_failed)
    return;
  const unsigned char *p = buf;
  while (len > 0) {
    struct pollfd pfd = { .fd = sock, .events = POLLOUT };
    int r = poll(&pfd, 1, timeout_ms);
    if (r == 0)
      timed_out();
    ssize_t w = send(sock, p, len, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR || errno == EAGAIN)
        continue;
      /* The server closed.  What it sent before closing may still be
       * waiting in our receive queue: stop sending, keep reading. */
      if (errno == EPIPE || errno == ECONNRESET) {
        send_failed = true;
        return;
      }
      die("send: %s", strerror(errno));
    }
    p += w;
    len -= (size_t) w;
  }
}

/* Read until the server closes.  With strict, any data is a failure. */
static void wait_for_eof(bool strict)
{
  unsigned char buf[65536];
  size_t discarded = 0;
  for (;;) {
    if (!wait_readable(timeout_ms))
      timed_out();
    ssize_t r = recv(sock, buf, sizeof buf, 0);
    if (r == 0 || (r < 0 && (errno == ECONNRESET || errno == EPIPE))) {
      if (discarded)
        printf("discarded %zu\n", discarded);
      saw_eof();
    }
    if (r < 0) {
      if (errno == EINTR)
        continue;
      die("recv: %s", strerror(errno));
    }
    if (strict) {
      printf("unexpected data (%zd bytes, first 0x%02x)\n", r, buf[0]);
      exit(3);
    }
    discarded += (size_t) r;
  }
}

/* Print a server string with anything unprintable escaped. */
static void print_quoted(const unsigned char *s, size_t len)
{
  putchar('"');
  for (size_t i = 0; i < len; i++) {
    if (s[i] >= 0x20 && s[i] < 0x7f && s[i] != '"' && s[i] != '\\')
      putchar(s[i]);
    else
      printf("\\x%02x", s[i]);
  }
  putchar('"');
}

static void print_hex(const unsigned char *p, size_t len)
{
  for (size_t i = 0; i < len; i++)
    printf("%02x", p[i]);
}

/* ---- Handshake -------------------------------------------------------- */
static void cmd_greeting(uint32_t flags)
{
  unsigned char buf[18];
  read_exact(buf, 16);
  if (get_be(buf, 8) != NBDMAGIC) {
    printf("bad greeting magic 0x%016" PRIx64 "\n", get_be(buf, 8));
    exit(2);
  }
  uint64_t style = get_be(buf + 8, 8);
  if (style == OLDSTYLE_MAGIC) {
    unsigned char rest[12 + 124];
    read_exact(rest, sizeof rest);
    printf("greeting oldstyle size=%" PRIu64 " flags=0x%" PRIx64 "\n",
           get_be(rest, 8), get_be(rest + 8, 4));
    return;
  }
  if (style != IHAVEOPT) {
    printf("bad greeting magic 0x%016" PRIx64 "\n", style);
    exit(2);
  }
  read_exact(buf + 16, 2);
  printf("greeting newstyle flags=0x%" PRIx64 "\n", get_be(buf + 16, 2));
  struct bytes b = { 0 };
  put_be(&b, flags, 4);
  write_all(b.ptr, b.len);
  free(b.ptr);
  client_flags = flags;
}

static void send_option(uint64_t magic, uint32_t option, uint32_t length,
                        const struct bytes *data)
{
  struct bytes b = { 0 };
  put_be(&b, magic, 8);
  put_be(&b, option, 4);
  put_be(&b, length, 4);
  if (data)
    bytes_append(&b, data->ptr, data->len);
  write_all(b.ptr, b.len);
  free(b.ptr);
  last_option = option;
}

static void print_info(const unsigned char *p, uint32_t len)
{
  if (len < 2) {
    printf(" short-info");
    return;
  }
  uint16_t type = (uint16_t) get_be(p, 2);
  if (type == 0 && len == 12)
    printf(" export size=%" PRIu64 " flags=0x%" PRIx64, get_be(p + 2, 8), get_be(p + 10, 2));
  else if ((type == 1 || type == 2)) {
    printf(type == 1 ? " name=" : " description=");
    print_quoted(p + 2, len - 2);
  }
  else if (type == 3 && len == 14)
    printf(" block_size min=%" PRIu64 " pref=%" PRIu64 " max=%" PRIu64,
           get_be(p + 2, 4), get_be(p + 6, 4), get_be(p + 10, 4));
  else {
    printf(" info-type=%u hex=", type);
    print_hex(p + 2, len - 2);
  }
}

/* Reads and prints one option reply; returns its type. */
static uint32_t read_option_reply(void)
{
  unsigned char hdr[20];
  read_exact(hdr, sizeof hdr);
  if (get_be(hdr, 8) != REP_MAGIC) {
    printf("bad option reply magic 0x%016" PRIx64 "\n", get_be(hdr, 8));
    exit(2);
  }
  uint32_t option = (uint32_t) get_be(hdr + 8, 4);
  uint32_t type = (uint32_t) get_be(hdr + 12, 4);
  uint32_t len = (uint32_t) get_be(hdr + 16, 4);
  if (len > MAX_REPLY_PAYLOAD) {
    printf("option reply too long (%" PRIu32 ")\n", len);
    exit(2);
  }
  unsigned char *p = malloc(len ? len : 1);
  if (!p)
    die("out of memory");
  read_exact(p, len);
  printf("rep %s %s len=%" PRIu32, name_of(option_names, option),
         name_of(reply_names, type), len);
  if (type == REP_SERVER && len >= 4 && get_be(p, 4) <= len - 4) {
    uint32_t nlen = (uint32_t) get_be(p, 4);
    printf(" name=");
    print_quoted(p + 4, nlen);
    if (len - 4 - nlen) {
      printf(" description=");
      print_quoted(p + 4 + nlen, len - 4 - nlen);
    }
  }
  else if (type == REP_INFO)
    print_info(p, len);
  else if (type == REP_META_CONTEXT && len >= 4) {
    printf(" id=%" PRIu64 " name=", get_be(p, 4));
    print_quoted(p + 4, len - 4);
  }
  else if ((type & REP_ERROR_BIT) && len > 0) {
    printf(" message=");
    print_quoted(p, len);
  }
  else if (len > 0) {
    printf(" hex=");
    print_hex(p, len < 64 ? len : 64);
  }
  printf("\n");
  free(p);
  if (type == REP_ACK && option == last_option && option == OPT_EXTENDED_HEADERS)
    extended_mode = true;
  return type;
}

static bool is_final_reply(uint32_t type)
{
  return type == REP_ACK || (type & REP_ERROR_BIT);
}

static uint32_t read_replies(void)
{
  uint32_t type;
  do
    type = read_option_reply();
  while (!is_final_reply(type));
  return type;
}

/* GO or INFO with NAME and no information requests, or with just
 * NBD_INFO_BLOCK_SIZE (a client that promises to honour the limits). */
static void cmd_go(uint32_t option, const char *name, bool want_block_size)
{
  struct bytes b = { 0 };
  put_be(&b, strlen(name), 4);
  bytes_append(&b, name, strlen(name));
  put_be(&b, want_block_size ? 1 : 0, 2);
  if (want_block_size)
    put_be(&b, 3, 2); /* NBD_INFO_BLOCK_SIZE */
  send_option(IHAVEOPT, option, (uint32_t) b.len, &b);
  free(b.ptr);
  read_replies();
}

static void cmd_meta(uint32_t option, int nq, char **queries)
{
  struct bytes b = { 0 };
  put_be(&b, 0, 4); /* export "" */
  bool none = nq == 1 && strcmp(queries[0], "-") == 0;
  put_be(&b, none ? 0 : (uint64_t) nq, 4);
  for (int i = 0; !none && i < nq; i++) {
    put_be(&b, strlen(queries[i]), 4);
    bytes_append(&b, queries[i], strlen(queries[i]));
  }
  send_option(IHAVEOPT, option, (uint32_t) b.len, &b);
  free(b.ptr);
  read_replies();
}

static void cmd_simple_option(uint32_t option)
{
  send_option(IHAVEOPT, option, 0, NULL);
  read_replies();
}

static void cmd_export_name(const char *name)
{
  struct bytes b = { 0 };
  bytes_append(&b, name, strlen(name));
  send_option(IHAVEOPT, 1, (uint32_t) b.len, &b);
  free(b.ptr);
  unsigned char buf[10 + 124];
  size_t len = (client_flags & 2) ? 10 : sizeof buf;
  read_exact(buf, len);
  printf("export size=%" PRIu64 " flags=0x%" PRIx64 "\n", get_be(buf, 8), get_be(buf + 8, 2));
}

/* ---- Transmission ----------------------------------------------------- */
static void remember_request(uint64_t cookie, uint16_t type, uint64_t offset, uint64_t length)
{
  if (n_pending == MAX_PENDING)
    die("too many requests in flight");
  pending[n_pending++] = (struct pending) { cookie, type, offset, length };
}

static bool find_request(uint64_t cookie, struct pending *out)
{
  for (size_t i = 0; i < n_pending; i++)
    if (pending[i].cookie == cookie) {
      *out = pending[i];
      return true;
    }
  return false;
}

static void forget_request(uint64_t cookie)
{
  for (size_t i = 0; i < n_pending; i++)
    if (pending[i].cookie == cookie) {
      pending[i] = pending[--n_pending];
      return;
    }
}

static void cmd_req(int argc, char **argv)
{
  uint16_t type = (uint16_t) lookup(command_names, argv[0]);
  uint64_t flags = 0, cookie = 1, offset = 0, length = 0;
  uint64_t magic = 0;
  bool have_len = false, have_magic = false, ext = extended_mode;
  struct bytes data = { 0 };
  bool have_data = false;

  for (int i = 1; i < argc; i++) {
    char *eq = strchr(argv[i], '=');
    if (!eq)
      die("req: '%s' is not key=value", argv[i]);
    *eq = 0;
    const char *key = argv[i], *val = eq + 1;
    if (strcmp(key, "flags") == 0)
      flags = parse_flags(val);
    else if (strcmp(key, "cookie") == 0)
      cookie = parse_number(val);
    else if (strcmp(key, "off") == 0)
      offset = parse_number(val);
    else if (strcmp(key, "len") == 0)
      length = parse_number(val), have_len = true;
    else if (strcmp(key, "magic") == 0)
      magic = parse_number(val), have_magic = true;
    else if (strcmp(key, "ext") == 0)
      ext = parse_number(val) != 0;
    else if (strcmp(key, "data") == 0)
      data = parse_data(val), have_data = true;
    else
      die("req: unknown key '%s'", key);
  }
  if (!have_len)
    length = data.len;
  if (!have_magic)
    magic = ext ? EXT_REQUEST_MAGIC : REQUEST_MAGIC;

  struct bytes b = { 0 };
  put_be(&b, magic, 4);
  put_be(&b, flags, 2);
  put_be(&b, type, 2);
  put_be(&b, cookie, 8);
  put_be(&b, offset, 8);
  put_be(&b, length, ext ? 8 : 4);
  if (have_data)
    bytes_append(&b, data.ptr, data.len);
  remember_request(cookie, type, offset, length);
  write_all(b.ptr, b.len);
  free(b.ptr);
  free(data.ptr);
}

/* The read buffer for a request about to be answered. */
static void start_read_data(const struct pending *req)
{
  free(last_data);
  last_data = NULL;
  last_data_len = 0;
  if (req->type != CMD_READ || req->length > MAX_REPLY_PAYLOAD)
    return;
  last_data_len = (size_t) req->length;
  last_data = calloc(1, last_data_len ? last_data_len : 1);
  if (!last_data)
    die("out of memory");
}

/* Copy a data chunk into the read buffer if it lies inside the request. */
static void place_data(const struct pending *req, uint64_t offset,
                       const unsigned char *p, uint64_t len)
{
  if (!last_data || offset < req->offset || offset - req->offset > last_data_len ||
      len > last_data_len - (offset - req->offset)) {
    printf("chunk outside the request (offset %" PRIu64 ", length %" PRIu64 ")\n", offset, len);
    return;
  }
  memcpy(last_data + (offset - req->offset), p, len);
}

static void print_block_status(const unsigned char *p, uint64_t len, bool ext)
{
  if (len < 4) {
    printf(" short");
    return;
  }
  printf(" ctx=%" PRIu64, get_be(p, 4));
  size_t pos = 4, size = ext ? 16 : 8;
  if (ext) {
    if (len < 8) {
      printf(" short");
      return;
    }
    printf(" count=%" PRIu64, get_be(p + 4, 4));
    pos = 8;
  }
  printf(" extents=");
  const char *sep = "";
  for (; pos + size <= len; pos += size) {
    if (ext)
      printf("%s%" PRIu64 ":%" PRIu64, sep, get_be(p + pos, 8), get_be(p + pos + 8, 8));
    else
      printf("%s%" PRIu64 ":%" PRIu64, sep, get_be(p + pos, 4), get_be(p + pos + 4, 4));
    sep = ",";
  }
  if (pos != len)
    printf(" trailing=%" PRIu64, len - pos);
}

/* Print one chunk; returns the error it carries (0 if none). */
static uint32_t handle_chunk(const struct pending *req, bool known, uint16_t type,
                             const unsigned char *p, uint64_t len)
{
  uint32_t error = 0;
  switch (type) {
  case 1: /* OFFSET_DATA */
    if (len < 8) {
      printf(" short");
      break;
    }
    printf(" offset=%" PRIu64 " length=%" PRIu64, get_be(p, 8), len - 8);
    if (known)
      place_data(req, get_be(p, 8), p + 8, len - 8);
    break;
  case 2: /* OFFSET_HOLE: the buffer is already zero there */
    if (len != 12) {
      printf(" bad-length");
      break;
    }
    printf(" offset=%" PRIu64 " hole=%" PRIu64, get_be(p, 8), get_be(p + 8, 4));
    break;
  case 5:
  case 6:
    print_block_status(p, len, type == 6);
    break;
  case 0x8001:
  case 0x8002:
    if (len < 6) {
      printf(" short");
      error = 5;
      break;
    }
    error = (uint32_t) get_be(p, 4);
    printf(" error=%s", name_of(error_names, error));
    uint64_t mlen = get_be(p + 4, 2);
    if (6 + mlen <= len) {
      printf(" message=");
      print_quoted(p + 6, mlen);
      if (type == 0x8002 && 6 + mlen + 8 <= len)
        printf(" offset=%" PRIu64, get_be(p + 6 + mlen, 8));
    }
    break;
  default:
    if (len) {
      printf(" hex=");
      print_hex(p, len < 64 ? len : 64);
    }
    break;
  }
  return error;
}

/* Reads one complete reply (one simple reply, or chunks up to DONE). */
static void read_one_reply(void)
{
  for (;;) {
    unsigned char m[4];
    read_exact(m, 4);
    uint32_t magic = (uint32_t) get_be(m, 4);
    struct pending req = { 0 };
    bool known;

    if (magic == SIMPLE_REPLY_MAGIC) {
      unsigned char h[12];
      read_exact(h, 12);
      uint32_t error = (uint32_t) get_be(h, 4);
      uint64_t cookie = get_be(h + 4, 8);
      known = find_request(cookie, &req);
      start_read_data(&req);
      if (known && error == 0 && req.type == CMD_READ && last_data)
        read_exact(last_data, last_data_len);
      printf("reply cookie=%" PRIu64 " error=%s kind=simple%s\n", cookie,
             name_of(error_names, error), known ? "" : " unknown-cookie");
      forget_request(cookie);
      return;
    }
    if (magic != STRUCTURED_REPLY_MAGIC && magic != EXT_REPLY_MAGIC) {
      printf("bad reply magic 0x%08" PRIx32 "\n", magic);
      exit(2);
    }

    bool ext = magic == EXT_REPLY_MAGIC;
    unsigned char h[28];
    read_exact(h, ext ? 28 : 16);
    uint16_t flags = (uint16_t) get_be(h, 2);
    uint16_t type = (uint16_t) get_be(h + 2, 2);
    uint64_t cookie = get_be(h + 4, 8);
    uint64_t len = ext ? get_be(h + 20, 8) : get_be(h + 12, 4);
    if (len > MAX_REPLY_PAYLOAD) {
      printf("chunk too long (%" PRIu64 ")\n", len);
      exit(2);
    }
    unsigned char *p = malloc(len ? len : 1);
    if (!p)
      die("out of memory");
    read_exact(p, len);

    known = find_request(cookie, &req);
    /* First chunk of a reply: a fresh read buffer. */
    static uint64_t reply_in_progress = UINT64_MAX;
    static uint32_t reply_error;
    static unsigned chunks;
    if (reply_in_progress != cookie) {
      reply_in_progress = cookie;
      reply_error = 0;
      chunks = 0;
      start_read_data(&req);
    }
    chunks++;
    printf("chunk cookie=%" PRIu64 " type=%s flags=0x%x len=%" PRIu64, cookie,
           name_of(chunk_names, type), flags, len);
    if (ext) {
      /* The extended header echoes the request's offset. */
      printf(" hdr-offset=%" PRIu64, get_be(h + 12, 8));
      if (known && get_be(h + 12, 8) != req.offset)
        printf(" HDR-OFFSET-MISMATCH");
    }
    uint32_t err = handle_chunk(&req, known, type, p, len);
    if (err && !reply_error)
      reply_error = err;
    printf("\n");
    free(p);
    if (flags & REPLY_FLAG_DONE) {
      printf("reply cookie=%" PRIu64 " error=%s kind=%s chunks=%u%s\n", cookie,
             name_of(error_names, reply_error), ext ? "extended" : "structured", chunks,
             known ? "" : " unknown-cookie");
      forget_request(cookie);
      reply_in_progress = UINT64_MAX;
      return;
    }
  }
}

static void cmd_data_check(const char *spec)
{
  struct bytes want = parse_data(spec);
  size_t n = want.len < last_data_len ? want.len : last_data_len;
  size_t i = 0;
  while (i < n && want.ptr[i] == last_data[i])
    i++;
  if (i == n && want.len == last_data_len)
    printf("data ok\n");
  else {
    printf("data differs at byte %zu (have %zu bytes, want %zu)\n", i, last_data_len, want.len);
    exit_status = 3;
  }
  free(want.ptr);
}

static void cmd_data_save(const char *path)
{
  FILE *f = fopen(path, "wb");
  if (!f || (last_data_len && fwrite(last_data, 1, last_data_len, f) != last_data_len) ||
      fclose(f) != 0)
    die("%s: %s", path, strerror(errno));
}

/* ---- The command interpreter ------------------------------------------ */
#define MAX_WORDS 256

static void run_command(char *line)
{
  char *words[MAX_WORDS];
  int n = 0;
  char *save = NULL;
  char *hash = strchr(line, '#');
  if (hash && (hash == line || hash[-1] == ' ' || hash[-1] == '\t'))
    *hash = 0;
  for (char *w = strtok_r(line, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save)) {
    if (n == MAX_WORDS)
      die("too many words");
    words[n++] = w;
  }
  if (n == 0)
    return;
  const char *cmd = words[0];
#define IS(name) (strcmp(cmd, name) == 0)
#define NEED(k) do { if (n < (k) + 1) die("%s needs %d argument(s)", cmd, k); } while (0)

  if (IS("greeting"))
    cmd_greeting(n > 1 ? (uint32_t) parse_number(words[1]) : 3);
  else if (IS("hello"))
    cmd_greeting(3);
  else if (IS("opt")) {
    NEED(1);
    struct bytes d = n > 2 ? parse_data(words[2]) : (struct bytes) { 0 };
    send_option(IHAVEOPT, lookup(option_names, words[1]), (uint32_t) d.len, &d);
    free(d.ptr);
  }
  else if (IS("opt-raw")) {
    NEED(3);
    struct bytes d = n > 4 ? parse_data(words[4]) : (struct bytes) { 0 };
    uint64_t magic = strcasecmp(words[1], "IHAVEOPT") == 0 ? IHAVEOPT : parse_number(words[1]);
    send_option(magic, lookup(option_names, words[2]),
                (uint32_t) parse_number(words[3]), &d);
    free(d.ptr);
  }
  else if (IS("reply"))
    read_option_reply();
  else if (IS("replies"))
    read_replies();
  else if (IS("structured"))
    cmd_simple_option(OPT_STRUCTURED_REPLY);
  else if (IS("extended"))
    cmd_simple_option(OPT_EXTENDED_HEADERS);
  else if (IS("list-meta") || IS("set-meta")) {
    NEED(1);
    cmd_meta(IS("list-meta") ? 9 : 10, n - 1, words + 1);
  }
  else if (IS("go") || IS("info") || IS("go-bs"))
    cmd_go(IS("info") ? 6 : 7, n > 1 ? words[1] : "", IS("go-bs"));
  else if (IS("export-name"))
    cmd_export_name(n > 1 ? words[1] : "");
  else if (IS("req")) {
    NEED(1);
    cmd_req(n - 1, words + 1);
  }
  else if (IS("recv")) {
    uint64_t count = n > 1 ? parse_number(words[1]) : 1;
    for (uint64_t i = 0; i < count; i++)
      read_one_reply();
  }
  else if (IS("send")) {
    NEED(1);
    struct bytes d = parse_data(words[1]);
    write_all(d.ptr, d.len);
    free(d.ptr);
  }
  else if (IS("wait-eof"))
    wait_for_eof(false);
  else if (IS("expect-eof"))
    wait_for_eof(true);
  else if (IS("data-check")) {
    NEED(1);
    cmd_data_check(words[1]);
  }
  else if (IS("data-save")) {
    NEED(1);
    cmd_data_save(words[1]);
  }
  else if (IS("sleep")) {
    NEED(1);
    uint64_t ms = parse_number(words[1]);
    struct timespec ts = { (time_t) (ms / 1000), (long) (ms % 1000) * 1000000 };
    nanosleep(&ts, NULL);
  }
  else if (IS("timeout")) {
    NEED(1);
    timeout_ms = (int) (parse_number(words[1]) * 1000);
  }
  else if (IS("close")) {
    if (send_failed)
      printf("EOF\n");
    close(sock);
    printf("closed\n");
    exit(exit_status);
  }
  else
    die("unknown command '%s'", cmd);
#undef IS
#undef NEED
  fflush(stdout);
}

static void connect_to(const char *path)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  if (strlen(path) >= sizeof addr.sun_path)
    die("socket path too long: %s", path);
  strcpy(addr.sun_path, path);
  sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sock < 0)
    die("socket: %s", strerror(errno));
  if (connect(sock, (struct sockaddr *) &addr, sizeof addr) < 0)
    die("connect %s: %s", path, strerror(errno));
}

int main(int argc, char **argv)
{
  int first = 1;
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc > 2 && strcmp(argv[1], "-t") == 0) {
    timeout_ms = (int) (parse_number(argv[2]) * 1000);
    first = 3;
  }
  if (argc <= first) {
    fprintf(stderr, "usage: rawclient [-t SECONDS] SOCKET [COMMAND]...\n");
    return 1;
  }
  connect_to(argv[first]);

  if (argc > first + 1) {
    for (int i = first + 1; i < argc; i++) {
      char *copy = strdup(argv[i]);
      run_command(copy);
      free(copy);
    }
  }
  else {
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, stdin) > 0)
      run_command(line);
    free(line);
  }
  if (send_failed)
    printf("EOF\n");
  close(sock);
  return exit_status;
}
