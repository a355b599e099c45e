/* nbdserve - NBD protocol constants and wire structures.
 *
 * Every value here is from the NBD protocol specification (doc/proto.md
 * of the NetworkBlockDevice project, with the extended-header extension).
 * All multi-byte fields travel big-endian.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */
#ifndef NBDSERVE_PROTOCOL_H
#define NBDSERVE_PROTOCOL_H

#include <stdint.h>

/* ---- Handshake -------------------------------------------------------- */
#define NBD_MAGIC 0x4e42444d41474943ULL /* "NBDMAGIC" */
#define NBD_OLD_VERSION 0x0000420281861253ULL
#define NBD_NEW_VERSION 0x49484156454F5054ULL /* "IHAVEOPT" */
#define NBD_REP_MAGIC 0x0003e889045565a9ULL

/* Handshake flags (server) and client flags. */
#define NBD_FLAG_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_NO_ZEROES (1u << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE NBD_FLAG_FIXED_NEWSTYLE
#define NBD_FLAG_C_NO_ZEROES NBD_FLAG_NO_ZEROES

/* Options. */
#define NBD_OPT_EXPORT_NAME 1
#define NBD_OPT_ABORT 2
#define NBD_OPT_LIST 3
#define NBD_OPT_PEEK_EXPORT 4
#define NBD_OPT_STARTTLS 5
#define NBD_OPT_INFO 6
#define NBD_OPT_GO 7
#define NBD_OPT_STRUCTURED_REPLY 8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT 10
#define NBD_OPT_EXTENDED_HEADERS 11

/* Option replies. */
#define NBD_REP_ACK 1
#define NBD_REP_SERVER 2
#define NBD_REP_INFO 3
#define NBD_REP_META_CONTEXT 4
#define NBD_REP_FLAG_ERROR (1u << 31)
#define NBD_REP_ERR_UNSUP (NBD_REP_FLAG_ERROR | 1)
#define NBD_REP_ERR_POLICY (NBD_REP_FLAG_ERROR | 2)
#define NBD_REP_ERR_INVALID (NBD_REP_FLAG_ERROR | 3)
#define NBD_REP_ERR_PLATFORM (NBD_REP_FLAG_ERROR | 4)
#define NBD_REP_ERR_TLS_REQD (NBD_REP_FLAG_ERROR | 5)
#define NBD_REP_ERR_UNKNOWN (NBD_REP_FLAG_ERROR | 6)
#define NBD_REP_ERR_SHUTDOWN (NBD_REP_FLAG_ERROR | 7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD (NBD_REP_FLAG_ERROR | 8)
#define NBD_REP_ERR_TOO_BIG (NBD_REP_FLAG_ERROR | 9)
#define NBD_REP_ERR_EXT_HEADER_REQD (NBD_REP_FLAG_ERROR | 10)

/* NBD_REP_INFO types. */
#define NBD_INFO_EXPORT 0
#define NBD_INFO_NAME 1
#define NBD_INFO_DESCRIPTION 2
#define NBD_INFO_BLOCK_SIZE 3

/* Transmission flags. */
#define NBD_FLAG_HAS_FLAGS (1u << 0)
#define NBD_FLAG_READ_ONLY (1u << 1)
#define NBD_FLAG_SEND_FLUSH (1u << 2)
#define NBD_FLAG_SEND_FUA (1u << 3)
#define NBD_FLAG_ROTATIONAL (1u << 4)
#define NBD_FLAG_SEND_TRIM (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBD_FLAG_SEND_DF (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN (1u << 8)
#define NBD_FLAG_SEND_RESIZE (1u << 9)
#define NBD_FLAG_SEND_CACHE (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO (1u << 11)
#define NBD_FLAG_BLOCK_STAT_PAYLOAD (1u << 12)

/* ---- Transmission ----------------------------------------------------- */
#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_EXTENDED_REQUEST_MAGIC 0x21e41c71u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu
#define NBD_EXTENDED_REPLY_MAGIC 0x6e8a278cu

/* Commands. */
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_TRIM 4
#define NBD_CMD_CACHE 5
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_BLOCK_STATUS 7

/* Command flags. */
#define NBD_CMD_FLAG_FUA (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE (1u << 1)
#define NBD_CMD_FLAG_DF (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)
#define NBD_CMD_FLAG_PAYLOAD_LEN (1u << 5)

/* Structured reply flags and types. */
#define NBD_REPLY_FLAG_DONE (1u << 0)
#define NBD_REPLY_TYPE_NONE 0
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REPLY_TYPE_OFFSET_HOLE 2
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_BLOCK_STATUS_EXT 6
#define NBD_REPLY_TYPE_ERROR ((1u << 15) | 1)
#define NBD_REPLY_TYPE_ERROR_OFFSET ((1u << 15) | 2)

/* Errors. */
#define NBD_SUCCESS 0
#define NBD_EPERM 1
#define NBD_EIO 5
#define NBD_ENOMEM 12
#define NBD_EINVAL 22
#define NBD_ENOSPC 28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP 95
#define NBD_ESHUTDOWN 108

/* Context id of base:allocation flags. */
#define NBD_STATE_HOLE (1u << 0)
#define NBD_STATE_ZERO (1u << 1)
#define NBD_STATE_DIRTY (1u << 0) /* qemu:dirty-bitmap:NAME */

/* Wire layouts (packed, big-endian on the wire). */
struct nbd_option_header {
  uint64_t magic; /* NBD_NEW_VERSION */
  uint32_t option;
  uint32_t length;
} __attribute__((packed));

struct nbd_option_reply {
  uint64_t magic; /* NBD_REP_MAGIC */
  uint32_t option;
  uint32_t reply;
  uint32_t length;
} __attribute__((packed));

struct nbd_request {
  uint32_t magic;
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;
  uint64_t offset;
  uint32_t length;
} __attribute__((packed));

struct nbd_extended_request {
  uint32_t magic;
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;
  uint64_t offset;
  uint64_t length;
} __attribute__((packed));

struct nbd_simple_reply {
  uint32_t magic;
  uint32_t error;
  uint64_t cookie;
} __attribute__((packed));

struct nbd_structured_reply {
  uint32_t magic;
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;
  uint32_t length;
} __attribute__((packed));

struct nbd_extended_reply {
  uint32_t magic;
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;
  uint64_t offset;
  uint64_t length;
} __attribute__((packed));

/* Limits of this server. */
#define MAX_OPTION_LENGTH (64 * 1024) /* longer options are refused unread */
#define MAX_OPTIONS 16384 /* options per handshake (nbdinfo --list sends one per export) */
#define MAX_REQUEST_SIZE (32 * 1024 * 1024) /* the largest maximum block size advertised */
/* --max-payload: what clients that negotiated no block size (EXPORT_NAME,
 * or GO without NBD_INFO_BLOCK_SIZE) may send in one READ or WRITE. */
#define MAX_PAYLOAD_DEFAULT (64 * 1024 * 1024)
#define MAX_PAYLOAD_LIMIT (256 * 1024 * 1024)
#define MAX_EXPORT_NAME 4096
#define MAX_CONTEXTS_PER_CONN 256

#endif /* NBDSERVE_PROTOCOL_H */
