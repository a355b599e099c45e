#!/bin/bash
# Extended headers (NBD_OPT_EXTENDED_HEADERS): 64-bit requests and replies,
# PAYLOAD_LEN writes, BLOCK_STATUS_EXT, and the mistakes around them.
. "$(dirname "$0")/lib/functions.sh"
. "$(dirname "$0")/lib/raw.sh"
plan 19

start_server ext memory 1T

raw nego hello extended 'set-meta base:allocation' go
expect nego "EXTENDED_HEADERS acknowledged, GO advertises BLOCK_STAT_PAYLOAD" \
    '^rep EXTENDED_HEADERS ACK' '^rep SET_META_CONTEXT META_CONTEXT .*name="base:allocation"' \
    '^rep GO INFO len=12 export size=1099511627776 flags=0x1[0-9a-f]{3}$'

raw rw hello extended 'set-meta base:allocation' go \
    'req WRITE off=65536 flags=PAYLOAD_LEN data=file:'"$top/tests/lib/rawclient.c"' cookie=1' recv \
    'req READ off=65536 len='"$(stat -c %s "$top/tests/lib/rawclient.c")"' cookie=2' recv \
    'data-check file:'"$top/tests/lib/rawclient.c" \
    'req WRITE off=1099511562240 flags=PAYLOAD_LEN|FUA data=fill:65536:0x5c cookie=3' recv \
    'req READ off=1099511562240 len=65536 cookie=4' recv 'data-check fill:65536:0x5c'
expect rw "write with PAYLOAD_LEN, read back: same bytes, extended replies" \
    '^reply cookie=1 error=OK kind=extended' '^reply cookie=2 error=OK kind=extended' \
    '^reply cookie=3 error=OK kind=extended' '^reply cookie=4 error=OK kind=extended' \
    '!^data differs' '^data ok$'
expect rw "no simple replies once extended headers are on; reply offsets echo the request" \
    '!kind=simple' '!HDR-OFFSET-MISMATCH' '!kind=structured'

raw bs hello extended 'set-meta base:allocation' go \
    'req BLOCK_STATUS off=0 len=1M cookie=1' recv \
    'req BLOCK_STATUS off=0 len=8G cookie=2' recv \
    'req BLOCK_STATUS off=0 len=8G flags=REQ_ONE cookie=3' recv
expect bs "BLOCK_STATUS: a BLOCK_STATUS_EXT chunk with 64-bit extents" \
    '^chunk cookie=1 type=BLOCK_STATUS_EXT .* ctx=1 count=3 extents=65536:3,65536:0,917504:3$'
expect bs "BLOCK_STATUS with a 64-bit effect length (8G) answers beyond 4G" \
    '^chunk cookie=2 type=BLOCK_STATUS_EXT .* extents=65536:3,65536:0,8589803520:3$'
expect bs "REQ_ONE: exactly one extent" \
    '^chunk cookie=3 type=BLOCK_STATUS_EXT .* count=1 extents=65536:3$'

# The payload form: effect length and the context ids wanted.
raw bspay hello extended 'set-meta base:allocation' go \
    'req BLOCK_STATUS off=0 len=12 flags=PAYLOAD_LEN data=u64:1M+u32:1 cookie=1' recv \
    'req BLOCK_STATUS off=0 len=12 flags=PAYLOAD_LEN data=u64:1M+u32:99 cookie=2' recv \
    'req READ off=65536 len=16 cookie=3' recv
expect bspay "BLOCK_STATUS with a payload naming context 1" \
    '^chunk cookie=1 type=BLOCK_STATUS_EXT .* ctx=1 count=3 extents=65536:3,65536:0,917504:3$'
expect bspay "... an unknown context id: EINVAL, payload consumed, in step" \
    '^reply cookie=2 error=EINVAL kind=extended' '^reply cookie=3 error=OK kind=extended'

raw big hello extended go \
    'req TRIM off=4G len=8G cookie=1' recv \
    'req WRITE_ZEROES off=4G len=8G flags=FAST_ZERO cookie=2' recv \
    'req CACHE off=0 len=8G cookie=3' recv \
    'req READ off=8G len=64K cookie=4' recv
expect big "TRIM, WRITE_ZEROES, CACHE with 64-bit lengths: OK" \
    '^reply cookie=1 error=OK' '^reply cookie=2 error=OK' '^reply cookie=3 error=OK'
expect big "a read of a hole: an OFFSET_HOLE chunk" \
    '^chunk cookie=4 type=OFFSET_HOLE .*offset=8589934592 hole=65536'

raw nopl hello extended go 'req WRITE off=0 len=4 cookie=1' recv \
    'req READ off=0 len=1 flags=PAYLOAD_LEN data=str:x cookie=2' recv \
    'req READ off=65536 len=4 cookie=3' recv
expect nopl "WRITE without PAYLOAD_LEN: EINVAL (no payload read)" '^reply cookie=1 error=EINVAL kind=extended'
expect nopl "READ with an unexpected payload: EINVAL, payload consumed, in step" \
    '^reply cookie=2 error=EINVAL' '^reply cookie=3 error=OK'

raw errs hello extended go 'req READ off=1T len=512 cookie=1' recv 'req WRITE off=1T flags=PAYLOAD_LEN data=str:x cookie=2' recv
expect errs "errors come as extended error chunks" \
    '^chunk cookie=1 type=ERROR .* error=EINVAL' '^reply cookie=1 error=EINVAL kind=extended' \
    '^reply cookie=2 error=ENOSPC kind=extended'

# Two compact headers make more than one extended header's worth.
raw compact hello extended go 'req READ len=512 ext=0 cookie=1' 'req READ len=512 ext=0 cookie=2' wait-eof
expect compact "compact request after negotiating extended headers: disconnect" '^EOF$' '!^reply cookie=1 error=OK'

raw overpl hello extended go 'req WRITE off=0 len=65M flags=PAYLOAD_LEN cookie=1' wait-eof
expect overpl "PAYLOAD_LEN over the 64M --max-payload limit: disconnect" '^EOF$'

raw sr hello structured extended go 'req READ off=65536 len=8 cookie=1' recv
expect sr "structured replies first, then extended headers: extended wins" \
    '^rep EXTENDED_HEADERS ACK' '^reply cookie=1 error=OK kind=extended'

raw down hello extended structured go 'req READ off=65536 len=8 cookie=1' recv
expect down "STRUCTURED_REPLY after EXTENDED_HEADERS: NBD_REP_ERR_EXT_HEADER_REQD (no downgrade)" \
    '^rep STRUCTURED_REPLY ERR_EXT_HEADER_REQD'
expect down "... and replies stay extended" '^reply cookie=1 error=OK kind=extended'

still_serving "the server still serves after all that"
finish
