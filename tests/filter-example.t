#!/bin/bash
# The worked example of docs/filter-api.md ("Waiting without a thread"),
# compiled as it stands in the manual and run: writes wait for the
# filter's clock without holding a thread, and the data arrives.
. "$(dirname "$0")/lib/functions.sh"
requires nbdsh
plan 4

# The block between the marker and the closing fence.
awk '/<!-- example: metronome.c -->/ { grab = 1; next }
     grab && /^```c/ { inside = 1; next }
     inside && /^```/ { exit }
     inside' "$top/docs/filter-api.md" > "$tmp/metronome.c"
check "the manual's example compiles against include/ alone" build_plugin metronome.so "$tmp/metronome.c"

start_server metro -v -t 1 --no-inline --filter="$tmp/metronome.so" memory 16M tick=300
# 16 writes in flight on one worker: if each wait held the worker they
# would take 16 ticks; waiting without a thread, they take about one.
cat > "$tmp/writes.py" <<'PY'
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
start = time.monotonic()
for i in range(16):
    h.aio_pwrite(bytes([i + 1]) * 4096, i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
took = time.monotonic() - start
ok = all(h.pread(4096, i * 4096) == bytes([i + 1]) * 4096 for i in range(16))
print("took=%.2f data=%s" % (took, "ok" if ok else "bad"))
PY
out=$(timeout "$CLIENT_TIMEOUT" "$PYTHON" "$tmp/writes.py" "$uri" 2>&1)
like "16 writes wait for the tick and their data arrives" "$out" 'data=ok'
took=$(echo "$out" | sed -n 's/.*took=\([0-9.]*\).*/\1/p')
if awk -v t="${took:-99}" 'BEGIN { exit !(t >= 0.05 && t < 1.2) }'; then
    ok "... all within about one tick on one worker (${took} s; 16 ticks would be 4.8 s)"
else
    not_ok "... all within about one tick on one worker (${took:-none} s)"; diag "$out"
fi
stop_server
is "the server stops cleanly" "$stopped_rc" 0
finish
