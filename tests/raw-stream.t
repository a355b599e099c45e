#!/bin/bash
# The request stream in awkward shapes: headers and payloads split across
# writes, many requests in one write, a client that does not read its
# replies for a while, many clients at once.
. "$(dirname "$0")/lib/functions.sh"
. "$(dirname "$0")/lib/raw.sh"
plan 10

start_server stream memory 256M

# A request header (magic 25609513, flags 0, WRITE, cookie 7, offset 0,
# length 8) sent in three pieces, then its payload in two.
raw split hello structured go \
    'send hex:2560951300' 'sleep 50' 'send hex:0000010000000000000007' 'sleep 50' \
    'send hex:0000000000000000' 'sleep 50' 'send hex:00000008' 'sleep 50' \
    'send str:abcd' 'sleep 50' 'send str:efgh' 'req READ len=8 cookie=8' \
    'recv 2' 'data-check str:abcdefgh'
expect split "a request split across five writes is served" \
    '^reply cookie=7 error=OK' '^reply cookie=8 error=OK' '^data ok$'

# 50 requests in a single write.
batch=
for i in $(seq 1 50); do
    batch="$batch$(printf '25609513%04x%04x%016x%016x%08x' 0 0 $((100 + i)) $((i * 512)) 512)"
done
raw batch hello structured go "send hex:$batch" 'recv 50'
is "50 requests in one write: 50 replies" "$(grep -c '^reply cookie=1[0-9][0-9] error=OK' "$tmp/batch.out")" 50

# A client that sends 128 reads of 1M and only then starts reading: the
# server must wait for it, not drop or mix up replies.  In the second
# form the reads come in two bursts: the server has paused for the
# first burst's replies when the second arrives, one small write per
# request.  The kernel counts each small write at a kilobyte or more,
# so unless the server goes on draining the socket while it is paused,
# the client blocks in send() before it reaches its first read, and
# neither side moves again.
slow_reader() {  # NAME FIRST_BURST
    { echo hello; echo structured; echo go
      echo "req WRITE off=$((100 << 20)) data=fill:1M:0x42 cookie=1"; echo recv
      for i in $(seq 1 128); do
          echo "req READ off=$((100 << 20)) len=1M cookie=$((1000 + i))"
          [ "$i" = "$2" ] && echo "sleep 300"
      done
      echo "sleep 1000"
      echo "recv 127"; echo "recv"; echo "data-check fill:1M:0x42"
    } > "$tmp/$1.cmds"
    rawclient -t 20 "$sock" < "$tmp/$1.cmds" > "$tmp/$1.out" 2>&1
    local got
    got="$(grep -c '^reply cookie=1[0-9][0-9][0-9] error=OK' "$tmp/$1.out") $(grep -c '^data ok' "$tmp/$1.out")"
    [ "$got" = "128 1" ] || diag_file "$tmp/$1.out" 5
    echo "$got"
}
is "128 MiB of replies to a reader that waited: all there, in one piece" \
    "$(slow_reader slow 128)" "128 1"
is "... and when its requests came in two bursts" "$(slow_reader slowburst 40)" "128 1"

# A client that sends 200 reads of 1 MiB, shuts down its sending side
# and only then reads: every reply comes, although the server had to
# stop parsing after 64 MiB and saw the end of the input before it
# parsed the rest.
"$PYTHON" - "$sock" "$top/tests/lib" > "$tmp/halfclose.out" 2>&1 <<'PY'
import socket, struct, sys
sys.path.insert(0, sys.argv[2])
from nbdtest import raw_go, raw_request, recv_exactly
s = raw_go(sys.argv[1])
s.settimeout(20)
s.sendall(b"".join(raw_request(0, 0, 1 << 20, cookie=i) for i in range(1, 201)))
s.shutdown(socket.SHUT_WR)
got = []
try:
    for _ in range(200):
        magic, error, cookie = struct.unpack(">IIQ", recv_exactly(s, 16))
        assert magic == 0x67446698 and error == 0, (magic, error)
        recv_exactly(s, 1 << 20)
        got.append(cookie)
except Exception as e:
    print("after %d replies: %r" % (len(got), e))
print("replies %d, cookies %s" % (len(got), "ok" if sorted(got) == list(range(1, 201)) else "wrong"))
print("then EOF" if s.recv(1) == b"" else "then more data")
PY
is "half-closed client: 200 replies of 1 MiB, then the server closes" \
    "$(tail -2 "$tmp/halfclose.out" | tr '\n' ' ')" "replies 200, cookies ok then EOF "

# The same, but the client disconnects without reading anything.
{ echo hello; echo structured; echo go
  for i in $(seq 1 64); do echo "req READ off=0 len=1M cookie=$i"; done
  echo close
} | rawclient -t 10 "$sock" > /dev/null 2>&1
still_serving "a client that leaves with 64 MiB of replies unread does not hurt the server"

# 100 clients at once, each writing its own block and reading it back.
clients=()
for i in $(seq 1 100); do
    rawclient -t 20 "$sock" hello structured go \
        "req WRITE off=$((i * 65536)) data=fill:65536:$i cookie=1" recv \
        "req READ off=$((i * 65536)) len=65536 cookie=2" recv "data-check fill:65536:$i" \
        > "$tmp/many.$i.out" 2>&1 &
    clients+=($!)
done
wait "${clients[@]}"
is "100 concurrent clients: each reads back its own data" "$(cat "$tmp"/many.*.out | grep -c '^data ok$')" 100

# 100 idle connections held open while another client works.
"$PYTHON" - "$sock" > "$tmp/idle.out" 2>&1 <<'PY' &
import socket, sys, time
conns = []
for _ in range(100):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); conns.append(s)
print("holding", flush=True)
time.sleep(5)
PY
holder=$!
for _ in $(seq 100); do grep -q holding "$tmp/idle.out" && break; sleep 0.05; done
t0=$(date +%s%N)
still_serving "100 idle connections do not block another client"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
if [ $ms -lt 3000 ]; then ok "... and it is served promptly (${ms} ms)"; else not_ok "... served promptly (${ms} ms)"; fi
kill $holder 2> /dev/null; wait $holder 2> /dev/null
stop_server
is "SIGTERM afterwards: clean exit" "$stopped_rc" 0
finish
