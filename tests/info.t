#!/bin/bash
# nbdinfo sees the right size, name and transmission flags.
. "$(dirname "$0")/lib/functions.sh"
plan 9

json() { nbdinfo --json "$1" | /usr/bin/python3 -c "
import json, sys
e = json.load(sys.stdin)['exports'][0]
print(' '.join('%s=%s' % (k, e.get(k)) for k in sys.argv[1:]))" "${@:2}"; }

start_server mem memory 1G
is "memory: size and name" "$(json "$uri" export-size export-name)" "export-size=1073741824 export-name="
is "memory: flags" "$(json "$uri" is_read_only can_flush can_fua can_trim can_zero can_fast_zero can_multi_conn can_cache can_df)" \
   "is_read_only=False can_flush=True can_fua=True can_trim=True can_zero=True can_fast_zero=True can_multi_conn=True can_cache=True can_df=True"
stop_server

truncate -s 100M "$tmp/disk.img"
start_server rw file "$tmp/disk.img"
is "file rw: flags" "$(json "$uri" export-size is_read_only can_flush can_fua can_trim can_zero can_multi_conn can_cache)" \
   "export-size=104857600 is_read_only=False can_flush=True can_fua=True can_trim=True can_zero=True can_multi_conn=True can_cache=True"
stop_server

start_server ro -r file "$tmp/disk.img"
is "file -r: flags" "$(json "$uri" is_read_only can_fua can_trim can_zero)" \
   "is_read_only=True can_fua=False can_trim=False can_zero=False"
stop_server

mkdir "$tmp/dir"
truncate -s 1M "$tmp/dir/alpha.img"; truncate -s 2M "$tmp/dir/beta.img"; mkdir "$tmp/dir/subdir"
start_server dir file dir="$tmp/dir"
is "dir=: nbdinfo --list lists the files" "$(nbdinfo --list --json "$uri" | /usr/bin/python3 -c "
import json, sys
print(' '.join('%s:%s' % (e['export-name'], e['export-size']) for e in json.load(sys.stdin)['exports']))")" \
   "alpha.img:1048576 beta.img:2097152"
is "dir=: open an export by name" "$(nbdinfo --size "nbd+unix:///beta.img?socket=$sock")" 2097152
if nbdinfo "nbd+unix:///nosuch?socket=$sock" > /dev/null 2>&1; then not_ok "dir=: unknown export refused"; else ok "dir=: unknown export refused"; fi
stop_server

start_server e -e myname memory 1M
is "-e: default export takes the name" "$(json "$uri" export-name)" "export-name=myname"
is "-e: listed" "$(nbdinfo --list --json "$uri" | /usr/bin/python3 -c "
import json, sys; print([e['export-name'] for e in json.load(sys.stdin)['exports']])")" "['myname']"
finish
