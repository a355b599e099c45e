#!/bin/bash
# Metadata contexts: LIST_META_CONTEXT queries (empty, "base:", "qemu:"),
# SET_META_CONTEXT selection and the ids used by BLOCK_STATUS.
. "$(dirname "$0")/lib/functions.sh"
. "$(dirname "$0")/lib/raw.sh"
plan 13

start_server meta memory 16M

raw early hello 'list-meta -' 'set-meta base:allocation' 'opt LIST' replies
expect early "LIST/SET_META_CONTEXT before structured replies: NBD_REP_ERR_INVALID" \
    '^rep LIST_META_CONTEXT ERR_INVALID' '^rep SET_META_CONTEXT ERR_INVALID' '^rep LIST ACK'

raw list hello structured 'list-meta -'
expect list "empty query lists every context: base:allocation" \
    '^rep LIST_META_CONTEXT META_CONTEXT len=19 id=0 name="base:allocation"' '^rep LIST_META_CONTEXT ACK'
is "... exactly one context" "$(grep -c 'META_CONTEXT META_CONTEXT' "$tmp/list.out")" 1

raw base hello structured 'list-meta base:' 'list-meta base:allocation'
is "query \"base:\" and \"base:allocation\" each give base:allocation" \
   "$(grep -c 'META_CONTEXT len=19 id=0 name="base:allocation"' "$tmp/base.out") $(grep -c 'ACK' "$tmp/base.out")" "2 3"

raw qemu hello structured 'list-meta qemu:' 'list-meta qemu:dirty-bitmap:' 'list-meta nosuch:thing' 'list-meta base:nosuch'
expect qemu "\"qemu:\", \"qemu:dirty-bitmap:\", unknown names: nothing declared, just ACK" \
    '!META_CONTEXT META_CONTEXT' '^rep LIST_META_CONTEXT ACK'
is "... four ACKs" "$(grep -c '^rep LIST_META_CONTEXT ACK' "$tmp/qemu.out")" 4

raw set hello structured 'set-meta base: nosuch:thing base:allocation' go \
    'req WRITE off=0 data=fill:4096:1 cookie=1' recv 'req BLOCK_STATUS len=16M cookie=2' recv
id=$(sed -n 's/^rep SET_META_CONTEXT META_CONTEXT len=19 id=\([0-9]*\) name="base:allocation"$/\1/p' "$tmp/set.out")
is "SET_META_CONTEXT selects only the exact name" "$(grep -c '^rep SET_META_CONTEXT META_CONTEXT' "$tmp/set.out")" 1
expect set "BLOCK_STATUS answers with the id SET_META_CONTEXT gave" \
    "^chunk cookie=2 type=BLOCK_STATUS .* ctx=${id:-none} extents=65536:0,16711680:3$"

raw reset hello structured 'set-meta base:allocation' 'set-meta nosuch:x' go 'req BLOCK_STATUS len=1M cookie=1' recv
expect reset "a second SET_META_CONTEXT replaces the first: no context, BLOCK_STATUS is EINVAL" \
    '^reply cookie=1 error=EINVAL'

raw malformed hello structured 'opt SET_META_CONTEXT u32:0+u32:5+name:base:allocation' reply \
    'opt LIST_META_CONTEXT u32:100+str:x' reply 'opt SET_META_CONTEXT u32:0+u32:1+u32:1000+str:base:' reply \
    'list-meta -'
is "malformed meta context options: NBD_REP_ERR_INVALID, three times" \
   "$(grep -c 'META_CONTEXT ERR_INVALID' "$tmp/malformed.out")" 3
expect malformed "... and the negotiation goes on" '^rep LIST_META_CONTEXT ACK'

raw export hello structured 'opt SET_META_CONTEXT name:nosuch-export+u32:1+name:base:allocation' replies \
    'opt LIST_META_CONTEXT name:+u32:1+name:base:allocation' replies
expect export "LIST_META_CONTEXT for the default export works after a query for another" \
    '^rep LIST_META_CONTEXT META_CONTEXT .*name="base:allocation"'

# The same seen by libnbd.
is "libnbd: base:allocation is negotiated, others are not" "$(nbdsh -c '
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:b1")
h.connect_uri("'"$uri"'")
print(h.can_meta_context("base:allocation"), h.can_meta_context("qemu:dirty-bitmap:b1"))')" "True False"
finish
