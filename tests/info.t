#!/bin/bash
# nbdinfo sees the right size, export name, block sizes and transmission
# flags for the memory plugin and for the file plugin read-write and -r.
. "$(dirname "$0")/lib/functions.sh"
requires nbdinfo
plan 11

# fields URI KEY...: "key=value ..." from nbdinfo --json for the first export.
fields() {
    nbdinfo --json "$1" | "$PYTHON" -c '
import json, sys
e = json.load(sys.stdin)["exports"][0]
print(" ".join("%s=%s" % (k, e.get(k)) for k in sys.argv[1:]))' "${@:2}"
}

start_server mem memory 1G
is "memory: size and name" "$(fields "$uri" export-size export-name)" \
   "export-size=1073741824 export-name="
is "memory: every capability advertised" \
   "$(fields "$uri" is_read_only can_flush can_fua can_trim can_zero can_fast_zero can_multi_conn can_cache can_df is_rotational)" \
   "is_read_only=False can_flush=True can_fua=True can_trim=True can_zero=True can_fast_zero=True can_multi_conn=True can_cache=True can_df=True is_rotational=False"
is "memory: block sizes 1 / 4096 / 32M" \
   "$(fields "$uri" block_size_minimum block_size_preferred block_size_maximum)" \
   "block_size_minimum=1 block_size_preferred=4096 block_size_maximum=33554432"
is "memory: base:allocation offered" "$(fields "$uri" contexts)" "contexts=['base:allocation']"
stop_server

start_server memsuffix memory size=3M
is "memory size=3M (explicit key)" "$(nbdinfo --size "$uri")" 3145728
stop_server

truncate -s 100M "$tmp/disk.img"
start_server rw file "$tmp/disk.img"
is "file rw: size and flags" \
   "$(fields "$uri" export-size is_read_only can_flush can_fua can_trim can_zero can_fast_zero can_multi_conn can_cache can_df)" \
   "export-size=104857600 is_read_only=False can_flush=True can_fua=True can_trim=True can_zero=True can_fast_zero=True can_multi_conn=True can_cache=True can_df=True"
stop_server

start_server fileparam file file="$tmp/disk.img"
is "file file=PATH (explicit key)" "$(nbdinfo --size "$uri")" 104857600
stop_server

start_server ro -r file "$tmp/disk.img"
is "file -r: read-only, no write-side flags" \
   "$(fields "$uri" is_read_only can_fua can_trim can_zero can_fast_zero can_cache can_multi_conn)" \
   "is_read_only=True can_fua=False can_trim=False can_zero=False can_fast_zero=False can_cache=True can_multi_conn=True"
stop_server

start_server memro -r memory 1M
is "memory -r: read-only, no write-side flags" \
   "$(fields "$uri" is_read_only can_fua can_trim can_zero can_fast_zero)" \
   "is_read_only=True can_fua=False can_trim=False can_zero=False can_fast_zero=False"
stop_server
start_server example example 4M
is "example: size and the flags it declares" \
   "$(fields "$uri" export-size is_read_only can_zero can_trim can_flush can_fast_zero can_multi_conn)" \
   "export-size=4194304 is_read_only=False can_zero=True can_trim=False can_flush=False can_fast_zero=False can_multi_conn=False"
is "example: each sector names itself" \
   "$(nbdsh -u "$uri" -c 'print(h.pread(16, 42 * 512).decode().strip(chr(0) + chr(10)), h.pread(16, 8191 * 512).decode().strip(chr(0) + chr(10)))')" \
   "sector 42 sector 8191"
stop_server
finish
