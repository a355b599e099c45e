#!/bin/bash
# Export names: dir= serves each file as an export, nbdinfo --list lists
# them, -e names the default export, unknown names are refused.
. "$(dirname "$0")/lib/functions.sh"
. "$(dirname "$0")/lib/raw.sh"
requires nbdinfo
plan 16

list() {
    nbdinfo --list --json "$1" | "$PYTHON" -c '
import json, sys
print(" ".join("%s:%s" % (e["export-name"], e.get("export-size")) for e in json.load(sys.stdin)["exports"]))'
}

mkdir "$tmp/dir" "$tmp/dir/subdir"
truncate -s 1M "$tmp/dir/alpha.img"
truncate -s 2M "$tmp/dir/beta.img"
printf 'beta data' | dd of="$tmp/dir/beta.img" conv=notrunc status=none

start_server dir file dir="$tmp/dir"
l=$(list "$uri")
like "dir=: nbdinfo --list lists the files" "$l" "^alpha.img:1048576 beta.img:2097152( |$)"
case " $l " in
    *" subdir:"*) not_ok "dir=: subdirectories are not exports ($l)";;
    *) ok "dir=: subdirectories are not exports";;
esac
is "dir=: open an export by name" "$(nbdinfo --size "$(uri_of beta.img)")" 2097152
nbdcopy "$(uri_of beta.img)" "$tmp/beta.copy"
check "dir=: the export's contents are the file's" cmp "$tmp/dir/beta.img" "$tmp/beta.copy"
check_fails "dir=: unknown export refused" nbdinfo "$(uri_of nosuch.img)"
check_fails "dir=: path escapes refused" nbdinfo "$(uri_of ../dir/alpha.img)"

long=$(head -c 5000 /dev/zero | tr '\0' x)
raw unknown hello 'go nosuch.img' 'info nosuch.img' 'opt GO name:subdir+u16:0' replies \
    "opt GO name:$long+u16:0" replies 'opt LIST' replies 'go beta.img'
expect unknown "GO/INFO for an unknown export: NBD_REP_ERR_UNKNOWN, negotiation goes on" \
    '^rep GO ERR_UNKNOWN' '^rep INFO ERR_UNKNOWN' '^rep GO INFO len=12 export size=2097152'
is "... a directory and a 5000-byte name are refused too" \
   "$(grep -c '^rep GO ERR_' "$tmp/unknown.out")" 3
expect unknown "LIST over the raw protocol names both exports" \
    '^rep LIST SERVER .*name="alpha.img"' '^rep LIST SERVER .*name="beta.img"'
raw exname hello 'export-name nosuch.img' wait-eof
expect exname "EXPORT_NAME for an unknown export: the server closes" '^EOF$' '!^export size'
raw exname2 hello 'export-name alpha.img' 'req READ len=4 cookie=1' recv
expect exname2 "EXPORT_NAME for a known export: size, then transmission" \
    '^export size=1048576 ' '^reply cookie=1 error=OK kind=simple'
stop_server

# nbdinfo --list asks INFO for every export on one connection: a big
# directory must not run into a per-connection option limit.
mkdir "$tmp/many"
for i in $(seq 300); do : > "$tmp/many/f$i.img"; done
start_server many file dir="$tmp/many"
is "dir= with 300 files: nbdinfo --list lists all 300" \
   "$(nbdinfo --list --json "$uri" 2> "$tmp/many.err" | grep -c '"export-name"')" 300
stop_server

start_server e -e myname memory 1M
is "-e: the default export has the name" "$(nbdinfo --json "$uri" | "$PYTHON" -c '
import json, sys; print(json.load(sys.stdin)["exports"][0]["export-name"])')" "myname"
is "-e: listed under that name" "$(list "$uri")" "myname:1048576"
is "-e: reachable by name" "$(nbdinfo --size "$(uri_of myname)")" 1048576
stop_server

start_server plain memory 1M
is "no -e: one export, the default \"\"" "$(list "$uri")" ":1048576"
stop_server
finish
