#!/bin/bash
# The command line: --version, --help, --dump-plugin, and bad command
# lines, each refused with a clear message and exit status 1, never a
# crash, a hang or a server left running.
. "$(dirname "$0")/lib/functions.sh"
plan 34

out=$(nbdserve --version 2>&1); rc=$?
like "--version: name and version, exit 0" "$rc $out" '^0 nbdserve [0-9]+\.[0-9]+'
out=$(nbdserve --help 2>&1); rc=$?
like "--help: usage with the main options, exit 0" "$rc $(echo "$out" | grep -c -e '--run' -e '-U' -e '--filter')" '^0 [3-9]'
# Every option --help shows has its entry in docs/nbdserve.md (a line
# that starts with the option's name in backquotes).
undocumented=
for o in $(echo "$out" | grep -oE '^ +(-[a-zA-Z], )?--[a-z-]+' | grep -oE -- '--[a-z-]+'); do
    grep -qE "^\`(.*\`)?$o( |=|\`)" "$top/docs/nbdserve.md" || undocumented="$undocumented $o"
done
is "--help: every option is documented in docs/nbdserve.md" "$undocumented" ""
# Every number --help gives as a default is the one docs/nbdserve.md
# gives in that option's entry ("default 100", "Default: 10809").
mismatched=
while read -r o n; do
    entry=$(awk -v o="$o" '/^`/ { inside = ($0 ~ ("`" o "[ `]")) } inside' "$top/docs/nbdserve.md")
    echo "$entry" | grep -qiE "default:? $n\b" || mismatched="$mismatched $o=$n"
done < <(echo "$out" | awk '
    match($0, /^ +(-[a-zA-Z], )?--[a-z-]+/) { s = substr($0, RSTART, RLENGTH); sub(/.*--/, "--", s); opt = s }
    match($0, /\(default [0-9]+/) { print opt, substr($0, RSTART + 9, RLENGTH - 9) }')
like "--help: numeric defaults are found" "$(echo "$out" | grep -c '(default [0-9]')" '^[3-9]$'
is "--help: each numeric default is the one docs/nbdserve.md gives" "$mismatched" ""
out=$(nbdserve --help memory 2>&1); rc=$?
like "--help PLUGIN: the plugin's parameters" "$rc $(echo "$out" | grep -c '^size=')" '^0 1$'
out=$(nbdserve --dump-plugin memory 2>&1); rc=$?
like "--dump-plugin memory: key=value lines" "$rc $(echo "$out" | grep -E '^(name=memory|api_version=1|thread_model=)' | wc -l)" '^0 3$'

# bad DESCRIPTION REGEX ARGS...: exit status 1 and a message matching REGEX.
bad() {
    local desc=$1 want=$2 rc; shift 2
    nbdserve "$@" > "$tmp/bad.out" 2>&1 < /dev/null; rc=$?
    if [ $rc -eq 1 ] && grep -Eq -- "$want" "$tmp/bad.out"; then ok "bad: $desc"
    else not_ok "bad: $desc (exit $rc)"; diag "expected a message matching: $want"; diag_file "$tmp/bad.out"; fi
}
bad "no plugin" "no plugin"
bad "unknown plugin" "no plugin called 'nosuch'" -U - nosuch
bad "plugin path that does not exist" "nosuch\.so" -U - ./nosuch.so
bad "unknown option" "unknown option '--nosuch'" --nosuch memory 1M
bad "option without its value" "'-U' needs a value" memory 1M -U
bad "--run without its value" "'--run' needs a value" -U - memory 1M --run
bad "bad size suffix" "could not parse size '1Q'" -U - memory 1Q
bad "negative size" "could not parse size '-5'" -U - memory size=-5
bad "missing required parameter" "size=SIZE is required" -U - memory
bad "unknown plugin parameter" "unknown parameter 'foo'" -U - memory 1M foo=bar
bad "two bare parameters" "must be key=value" -U - memory 1M 2M
bad "empty key" "empty key" -U - memory =1M
bad "file: nothing to serve" "file=PATH or dir=DIR" -U - file
bad "file: both file= and dir=" "file=PATH or dir=DIR" -U - file dir="$tmp" file=/etc/passwd
bad "file: missing file" "No such file" -U - file "$tmp/nosuch.img"
bad "unknown filter" "no filter called 'nosuch'" -U - --filter=nosuch memory 1M
bad "-U with -p" "cannot be combined" -U - -p 1234 memory 1M
bad "-t 0" "not a thread count" -t 0 -U - memory 1M
bad "-t 99999999999" "not a thread count" -t 99999999999 -U - memory 1M
bad "port out of range" "not a port number" -p 99999 memory 1M
bad "bad listen address" "cannot listen on 999.1.1.1" -i 999.1.1.1 -p 10999 memory 1M
bad "socket in a missing directory" "cannot bind" -U "$tmp/nosuch/sock" memory 1M
bad "export name over 4096 bytes" "at most 4096 bytes" -e "$(head -c 5000 /dev/zero | tr '\0' a)" -U - memory 1M --run true
bad "TLS required without certificates" "tls" --tls=require -U - memory 1M

# A port somebody else holds.
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PYTHON" -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); print("ready", flush=True); time.sleep(30)' "$port" > "$tmp/holder.out" &
holder=$!
for _ in $(seq 100); do grep -q ready "$tmp/holder.out" && break; sleep 0.05; done
bad "port already in use" "(in use|cannot listen)" -f -i 127.0.0.1 -p "$port" memory 1M
kill "$holder"; wait "$holder" 2> /dev/null

# A socket path that exists as a regular file is not clobbered.
echo precious > "$tmp/file-not-socket"
nbdserve -f -U "$tmp/file-not-socket" memory 1M > "$tmp/clobber.out" 2>&1 &
pid=$!
sleep 0.5
if kill -0 $pid 2> /dev/null; then stop_pid $pid; fi
wait $pid 2> /dev/null
is "-U on an existing regular file: refused, the file kept" "$(cat "$tmp/file-not-socket")" precious

# The socket file appears only once the server listens: a client that
# connects the moment it sees the file is never refused.  20 starts,
# each probed as fast as Python can look.
"$PYTHON" - "$NBDSERVE" "$tmp" > "$tmp/appear.out" 2>&1 <<'PY'
import os, socket, subprocess, sys
binary, tmp = sys.argv[1:3]
refused = 0
for i in range(20):
    path = os.path.join(tmp, "appear%d.sock" % i)
    p = subprocess.Popen([binary, "-f", "-U", path, "memory", "1M"], stderr=subprocess.DEVNULL)
    while not os.path.exists(path) and p.poll() is None:
        pass
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        refused += 1
    s.close()
    p.terminate()
    p.wait()
print("refused %d" % refused)
PY
is "-U: a client connecting as soon as the socket file exists is accepted (20 starts)" \
    "$(cat "$tmp/appear.out")" "refused 0"
finish
