# Helpers for the tests that drive tests/lib/rawclient (source after
# functions.sh).
# SPDX-License-Identifier: BSD-3-Clause

[ -x "$RAWCLIENT" ] || skip_all "tests/lib/rawclient is not built (run make)"

# raw NAME COMMAND...: one connection to $sock running COMMANDs; the output
# goes to $tmp/NAME.out, the exit status to $raw_rc.
raw() {
    local name=$1; shift
    rawclient -t 5 "$sock" "$@" > "$tmp/$name.out" 2>&1
    raw_rc=$?
}

# expect NAME DESCRIPTION REGEX...: ok if every REGEX matches some line of
# NAME's output (an extended regex; '!REGEX' must match no line).
expect() {
    local name=$1 desc=$2 re failed=; shift 2
    for re in "$@"; do
        case $re in
            !*) grep -Eq -- "${re#!}" "$tmp/$name.out" && failed="$failed [matched $re]";;
            *) grep -Eq -- "$re" "$tmp/$name.out" || failed="$failed [no $re]";;
        esac
    done
    if [ -z "$failed" ]; then ok "$desc"
    else not_ok "$desc"; diag "$failed"; diag_file "$tmp/$name.out" 40; fi
}

# still_serving DESCRIPTION: the server process lives and a new client
# can write and read back.
still_serving() {
    raw alive hello go 'req WRITE off=4096 data=str:alive! cookie=1' recv \
        'req READ off=4096 len=6 cookie=2' recv 'data-check str:alive!' 'req DISC' wait-eof
    if kill -0 "$server_pid" 2> /dev/null && grep -q '^data ok$' "$tmp/alive.out"; then
        ok "$1"
    else
        not_ok "$1"; diag_file "$tmp/alive.out"; diag_file "$tmp/raw.log"
    fi
}
