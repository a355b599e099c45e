#!/bin/bash
# What well-behaved clients never send, sent by tests/lib/rawclient: every
# case gets the specification's answer or a clean disconnect, and the
# server goes on serving other clients.
. "$(dirname "$0")/lib/functions.sh"
. "$(dirname "$0")/lib/raw.sh"
plan 45

start_server raw memory 64M

# ---- Handshake ----------------------------------------------------------
raw greet hello 'opt ABORT' replies wait-eof
expect greet "greeting: fixed newstyle with NO_ZEROES" '^greeting newstyle flags=0x3$'
expect greet "ABORT: acknowledged (or closed), then closed" '^EOF$' '!^rep ABORT ERR'

raw cflags 'greeting 0x83' wait-eof
expect cflags "unknown client flags: disconnect" '^EOF$' '!^rep '

raw optmagic hello 'opt-raw 0x1122334455667788 LIST 0' wait-eof
expect optmagic "bad option magic: disconnect" '^EOF$'

raw unknown hello 'opt 99' reply 'opt 0x7fffffff str:junk' reply 'opt LIST' replies
expect unknown "unknown option: NBD_REP_ERR_UNSUP, negotiation goes on" \
    '^rep 99 ERR_UNSUP' '^rep 2147483647 ERR_UNSUP' '^rep LIST SERVER len=4 name=""' '^rep LIST ACK'

raw listdata hello 'opt LIST str:junk' reply 'opt LIST' replies
expect listdata "LIST with data: NBD_REP_ERR_INVALID" '^rep LIST ERR_INVALID' '^rep LIST ACK'

raw tls hello 'opt STARTTLS' reply 'opt STARTTLS str:x' reply 'opt LIST' replies
expect tls "STARTTLS without TLS configured: refused, negotiation goes on" \
    '^rep STARTTLS ERR_(POLICY|UNSUP)' '!^rep STARTTLS ACK' '^rep LIST ACK'

raw srdata hello 'opt STRUCTURED_REPLY str:x' reply 'opt EXTENDED_HEADERS u32:1' reply
expect srdata "STRUCTURED_REPLY / EXTENDED_HEADERS with data: NBD_REP_ERR_INVALID" \
    '^rep STRUCTURED_REPLY ERR_INVALID' '^rep EXTENDED_HEADERS ERR_INVALID'

raw gobad hello 'opt GO u32:9+str:ab' reply 'opt GO u32:0' reply 'opt GO name:+u16:5+u16:1' reply \
    'opt INFO name:+u16:0+u16:3+hex:00' reply go
expect gobad "malformed GO/INFO: NBD_REP_ERR_INVALID each time, then GO works" \
    '^rep GO ERR_INVALID' '^rep INFO ERR_INVALID' '^rep GO ACK'
[ "$(grep -c '^rep [A-Z]* ERR_INVALID' "$tmp/gobad.out")" -eq 4 ] && ok "... all four refused" \
    || { not_ok "... all four refused"; diag_file "$tmp/gobad.out"; }

raw info hello 'opt INFO name:+u16:3+u16:1+u16:2+u16:3' replies go
expect info "INFO answers export, name and block size, then GO still works" \
    '^rep INFO INFO len=12 export size=67108864 flags=0x' \
    '^rep INFO INFO len=14 block_size min=1 pref=4096 max=33554432' \
    '^rep INFO INFO .*name=""' '^rep INFO ACK' '^rep GO ACK'

raw infounk hello 'opt GO name:+u16:3+u16:99+u16:3+u16:0' replies 'req READ len=8 cookie=3' recv
expect infounk "GO with unknown and repeated info requests: ignored, GO succeeds" \
    '^rep GO INFO len=12 export' '^rep GO ACK' '^reply cookie=3 error=OK'

raw toobig hello 'opt-raw IHAVEOPT LIST 1048576' reply wait-eof
expect toobig "option of 1 MiB (data never sent): NBD_REP_ERR_TOO_BIG or disconnect, unread" \
    '^(rep LIST ERR_TOO_BIG|EOF)' '^EOF$' '!^rep LIST (ACK|SERVER)'

raw bigok hello 'opt LIST fill:60000:0x61' reply 'opt LIST' replies
expect bigok "option with 60000 bytes: read and refused, negotiation stays in step" \
    '^rep LIST ERR_INVALID' '^rep LIST ACK'

raw exportname hello 'export-name' 'req READ len=8 cookie=77' recv 'req DISC' wait-eof
expect exportname "EXPORT_NAME: size and flags, then simple replies" \
    '^export size=67108864 flags=0x' '^reply cookie=77 error=OK kind=simple'

raw zeroes 'greeting 1' 'export-name' 'req WRITE data=str:nz cookie=5' recv 'req READ len=2 cookie=6' recv 'data-check str:nz'
expect zeroes "client without NO_ZEROES: EXPORT_NAME reply padded, then in step" \
    '^export size=67108864' '^reply cookie=5 error=OK' '^data ok$'

{ echo hello; for i in $(seq 300); do echo "opt 99"; echo reply; done; echo go; } > "$tmp/flood.cmds"
rawclient -t 5 "$sock" < "$tmp/flood.cmds" > "$tmp/flood.out" 2>&1
expect flood "300 options in one handshake: answered, or cut off cleanly" '^rep 99 ERR_UNSUP' '(^EOF$|^rep GO ACK)'

still_serving "the server still serves after the handshake cases"

# ---- Transmission ---------------------------------------------------------
raw cmds hello structured go \
    'req 99 cookie=5' recv \
    'req READ len=512 flags=0x80 cookie=6' recv \
    'req WRITE flags=FAST_ZERO data=str:xyz cookie=7' recv \
    'req BLOCK_STATUS len=512 cookie=8' recv \
    'req READ off=0 len=16 cookie=9' recv
expect cmds "unknown command: EINVAL, cookie echoed" '^reply cookie=5 error=EINVAL'
expect cmds "unknown command flag: EINVAL" '^reply cookie=6 error=EINVAL'
expect cmds "flag not valid for the command (FAST_ZERO on WRITE): EINVAL" '^reply cookie=7 error=EINVAL'
expect cmds "BLOCK_STATUS with no context selected: EINVAL" '^reply cookie=8 error=EINVAL'
expect cmds "the connection stays in step" '^reply cookie=9 error=OK'

raw range hello structured go \
    'req WRITE off=64M data=str:past cookie=1' recv \
    'req WRITE off=67108862 data=str:abcd cookie=2' recv \
    'req READ off=67108862 len=4 cookie=3' recv \
    'req TRIM off=64M len=1 cookie=4' recv \
    'req WRITE_ZEROES off=0 len=128M cookie=5' recv \
    'req READ off=67108860 len=4 cookie=6' recv 'data-check hex:00000000'
expect range "write past the end: ENOSPC, its payload consumed" \
    '^reply cookie=1 error=ENOSPC' '^reply cookie=2 error=ENOSPC'
expect range "read/trim past the end: EINVAL, write zeroes past the end: ENOSPC" \
    '^reply cookie=3 error=EINVAL' '^reply cookie=4 error=EINVAL' '^reply cookie=5 error=ENOSPC'
expect range "... and still in step" '^reply cookie=6 error=OK' '^data ok$'

raw cookies hello structured go \
    'req WRITE off=512 cookie=0xfedcba9876543210 data=fill:512:0x33' recv \
    'req READ off=512 len=512 cookie=0' recv 'data-check fill:512:0x33' \
    'req FLUSH cookie=1' recv 'req CACHE len=1M cookie=2' recv \
    'req WRITE_ZEROES off=512 len=256 flags=FUA|NO_HOLE cookie=3' recv \
    'req TRIM off=1M len=1M flags=FUA cookie=4' recv \
    'req READ off=512 len=512 cookie=5' recv 'data-check fill:256:0+fill:256:0x33'
expect cookies "cookies echoed exactly (2^64-ish and 0)" \
    '^reply cookie=18364758544493064720 error=OK' '^reply cookie=0 error=OK'
expect cookies "FLUSH, CACHE, WRITE_ZEROES, TRIM with flags succeed and data is right" \
    '^reply cookie=1 error=OK' '^reply cookie=2 error=OK' '^reply cookie=3 error=OK' \
    '^reply cookie=4 error=OK' '!^data differs'

# 200 requests written before reading any reply.
{ echo hello; echo structured; echo go
  for i in $(seq 1 100); do echo "req WRITE off=$((i * 4096)) data=fill:4096:$((i % 256)) cookie=$i"; done
  for i in $(seq 101 200); do echo "req READ off=$(((i - 100) * 4096)) len=4096 cookie=$i"; done
  echo "recv 200"
  echo "req READ off=$((77 * 4096)) len=4096 cookie=1000"; echo recv; echo "data-check fill:4096:77"
} > "$tmp/pipeline.cmds"
rawclient -t 10 "$sock" < "$tmp/pipeline.cmds" > "$tmp/pipeline.out" 2>&1
is "200 pipelined requests: 200 good replies, every cookie once" \
   "$(grep '^reply cookie=' "$tmp/pipeline.out" | grep -c 'error=OK') $(grep -o '^reply cookie=[0-9]*' "$tmp/pipeline.out" | sort -u | wc -l)" \
   "201 201"
expect pipeline "... and the data written in the pipeline reads back" '^data ok$'

raw simple hello go 'req READ off=4096 len=6 cookie=3' recv 'req READ off=64M len=6 cookie=4' recv \
    'req READ off=4096 len=6 cookie=5' recv
expect simple "without structured replies: simple replies, errors too, data in step" \
    '^reply cookie=3 error=OK kind=simple' '^reply cookie=4 error=EINVAL kind=simple' \
    '^reply cookie=5 error=OK kind=simple' '!kind=structured'

# A client that negotiated no block size may send up to --max-payload
# (64M by default, split for the plugin); one that asked for the block
# sizes is held to the advertised maximum (32M).
raw bigread hello structured go 'req READ len=65M cookie=3' recv 'req READ len=8 cookie=4' recv
expect bigread "read over the 64M --max-payload limit: EINVAL/EOVERFLOW or disconnect" \
    '^(reply cookie=3 error=(EINVAL|EOVERFLOW)|EOF)' '!^reply cookie=3 error=OK'
raw bsread hello structured go-bs 'req READ len=33M cookie=3' recv 'req READ len=32M cookie=4' recv
expect bsread "after GO with NBD_INFO_BLOCK_SIZE: a read over the advertised 32M is EINVAL, 32M is served" \
    '^chunk cookie=3 type=ERROR .* error=EINVAL' '^chunk cookie=4 type=OFFSET_DATA'

raw bigwrite hello structured go 'req WRITE off=0 len=65M cookie=3' wait-eof
expect bigwrite "write payload over the 64M limit (no payload sent): disconnect" '^EOF$' '!^reply cookie=3'

raw bigwrite2 hello structured go 'req WRITE off=0 len=0xffffffff cookie=3' wait-eof
expect bigwrite2 "write of 4G-1: disconnect" '^EOF$'

still_serving "the server still serves after the transmission cases"

raw extmagic hello structured go 'req READ len=512 ext=1' wait-eof
expect extmagic "extended request without negotiating it: disconnect" '^EOF$' '!^reply'

raw garbage hello structured go 'req WRITE data=str:before cookie=1' recv 'send hex:deadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef' wait-eof
expect garbage "garbage mid-stream: disconnect (after answering what came before)" \
    '^reply cookie=1 error=OK' '^EOF$'

raw halfheader hello structured go 'send hex:25609513000000' close
still_serving "a client that dies mid-header does not hurt the server"

raw disc hello structured go 'req WRITE off=8192 data=str:last cookie=1' 'req DISC cookie=2' \
    'req READ len=512 cookie=3' 'req READ len=512 cookie=4' recv wait-eof
expect disc "DISC: requests before it answered, none after, then closed" \
    '^reply cookie=1 error=OK' '!^reply cookie=[34]' '^EOF$'
raw afterdisc hello go 'req READ off=8192 len=4 cookie=1' recv 'data-check str:last'
expect afterdisc "the write before DISC was kept" '^data ok$'

raw disconly hello structured go 'req DISC' expect-eof
expect disconly "DISC alone: closed without a reply" '^EOF$'

# Many clients that vanish at random points of the handshake.
for i in $(seq 20); do
    case $((i % 4)) in
        0) rawclient -t 2 "$sock" close ;;
        1) rawclient -t 2 "$sock" hello close ;;
        2) rawclient -t 2 "$sock" hello 'send hex:49484156454f50540000' close ;;
        3) rawclient -t 2 "$sock" hello go 'req READ len=1M' close ;;
    esac > /dev/null 2>&1
done
still_serving "20 clients vanishing mid-handshake or mid-request: the server still serves"
stop_server
is "the server exits cleanly on SIGTERM afterwards" "$stopped_rc" 0

# ---- Oldstyle (-o) -----------------------------------------------------------
start_server old -o memory 1M
raw oldstyle 'greeting' 'req WRITE data=str:old cookie=1' recv 'req READ len=3 cookie=2' recv 'data-check str:old'
expect oldstyle "-o: oldstyle greeting with size and flags, then transmission" \
    '^greeting oldstyle size=1048576 flags=0x' '^reply cookie=1 error=OK kind=simple' '^data ok$'
stop_server
finish
