#!/bin/bash
# The worker pool.  It wakes as few threads as a fast backend needs, but
# a slow request must never hold up the requests queued behind it, and a
# slow backend must get every worker.  The delay filter with delay-block=on
# stands for a backend that blocks (it sleeps in the worker).
. "$(dirname "$0")/lib/functions.sh"
. "$(dirname "$0")/lib/raw.sh"
requires_filter delay
plan 4

# After 200 fast reads (the pool learns that jobs are quick and stops
# waking helpers for them), a flush that takes 3 s, then reads on the
# same connection: the reads are answered while the flush still runs.
# One read behind the flush is what the pool would not wake a worker
# for by itself; five is checked too.
start_server slowflush -t 4 --filter=delay memory 64M delay-flush=3 delay-block=on
{ echo hello; echo structured; echo go
  for i in $(seq 1 200); do echo "req READ off=0 len=512 cookie=$((1000 + i))"; done
  echo "recv 200"
  echo "req FLUSH cookie=1"; echo "req READ off=4096 len=4096 cookie=2"; echo "recv 2"
  echo "req FLUSH cookie=3"
  for i in $(seq 4 8); do echo "req READ off=$((i * 4096)) len=4096 cookie=$i"; done
  echo "recv 6"
} | rawclient -t 10 "$sock" > "$tmp/slowflush.out" 2>&1
replies=$(grep -o '^reply cookie=[0-9] error=OK' "$tmp/slowflush.out" | sed 's/.*cookie=\([0-9]*\).*/\1/' | tr '\n' ' ')
# Reads run in parallel and may come back in any order among themselves.
order=$(echo "$replies" | sed 's/[245678]/r/g')
is "all 8 requests answered, the reads before the slow flushes" "$order" "r 1 r r r r r 3 "
[ "$order" = "r 1 r r r r r 3 " ] || diag_file "$tmp/slowflush.out" 30
stop_server

# A backend where every read takes 1 s: 4 reads on 4 workers take
# about one second, not four.
start_server slowreads -t 4 --filter=delay memory 64M delay-read=1 delay-block=on
start=$(date +%s%N)
{ echo hello; echo structured; echo go
  for i in 1 2 3 4; do echo "req READ off=$((i * 4096)) len=4096 cookie=$i"; done
  echo "recv 4"
} | rawclient -t 10 "$sock" > "$tmp/slowreads.out" 2>&1
ms=$(( ($(date +%s%N) - start) / 1000000 ))
is "4 slow reads answered" "$(grep -c '^reply cookie=[1-4] error=OK' "$tmp/slowreads.out")" 4
if [ "$ms" -lt 2500 ]; then ok "... in parallel (${ms} ms for 4 reads of 1 s)"
else not_ok "... in parallel (${ms} ms for 4 reads of 1 s)"; fi
stop_server

# A single worker (-t 1) still serves a slow and a fast request, in turn.
start_server oneworker -t 1 --filter=delay memory 64M delay-flush=0.5 delay-block=on
{ echo hello; echo structured; echo go
  echo "req FLUSH cookie=1"; echo "req READ off=0 len=4096 cookie=2"; echo "recv 2"
} | rawclient -t 10 "$sock" > "$tmp/oneworker.out" 2>&1
is "-t 1: both requests answered, in turn" \
    "$(grep -o '^reply cookie=[0-9]*' "$tmp/oneworker.out" | tr '\n' ' ')" \
    "reply cookie=1 reply cookie=2 "
stop_server
finish
