#!/bin/bash
# --list-plugins and --list-filters: every built plugin and filter, one
# line each with its version and description, sorted and without
# duplicates; listing never runs a plugin's load callback; an object on
# the search path that cannot be loaded gets a warning line, and the
# list and the exit status are as before.
. "$(dirname "$0")/lib/functions.sh"
plan 18

# check_list KIND OUTPUT: every built KIND is on its own line of OUTPUT
# as "NAME  VERSION  DESCRIPTION"; prints what is missing.
check_list() {
    local kind=$1 out=$2 so name missing=
    for so in "$top/${kind}s"/*/nbdserve-*-"$kind".so; do
        [ -f "$so" ] || continue
        name=$(basename "$so" .so); name=${name#nbdserve-}; name=${name%-"$kind"}
        echo "$out" | grep -qE "^$name +[^ ]+ +[^ -][^ ]* ?" || missing="$missing $name"
    done
    echo "$missing"
}

for kind in plugin filter; do
    out=$(nbdserve --list-${kind}s 2> "$tmp/err"); rc=$?
    is "--list-${kind}s: exit 0, nothing on stderr" "$rc $(cat "$tmp/err")" "0 "
    is "... every built $kind with its version and description" "$(check_list $kind "$out")" ""
    names=$(echo "$out" | awk '{ print $1 }')
    is "... sorted by name, each once" "$names" "$(echo "$names" | LC_ALL=C sort -u)"
done
out=$(nbdserve --list-plugins)
like "the memory plugin's line" "$(echo "$out" | grep '^memory ')" '^memory +[0-9.]+ +sparse RAM disk$'
out=$(nbdserve --list-filters -v)
like "-v adds the file the short name loads" "$(echo "$out" | grep '^delay ')" \
     "^delay +[^ ]+ +.* \\($top/filters/delay/nbdserve-delay-filter.so\\)$"
out=$(nbdserve --list-plugins --list-filters)
like "both lists at once, each under its heading" "$(echo "$out" | grep -c -e '^plugins:$' -e '^filters:$' -e '^memory ' -e '^delay ')" '^4$'
out=$(nbdserve --list-plugins memory 2>&1); rc=$?
like "--list-plugins with a plugin name is refused" "$rc $out" "^1 .*take no plugin name \\(got 'memory'\\)"

# A build tree of our own: a copy of the binary, the memory plugin, a
# plugin whose load callback leaves a mark, and three objects the server
# would refuse: not a shared object at all, a shared object that is no
# plugin, and a plugin anybody may write to.
tree="$tmp/tree"
mkdir -p "$tree/plugins"/{marker,broken,stranger,open}
cp "$NBDSERVE" "$tree/nbdserve"
ln -s "$top/plugins/memory" "$tree/plugins/memory"
cat > "$tmp/marker.c" <<EOF
#include <stdio.h>
#include "nbdserve-plugin.h"
static int marker_load(void)
{
  FILE *fp = fopen("$tmp/loaded", "w");
  return fp && fclose(fp) == 0 ? 0 : -1;
}
static void *marker_open(int readonly, const char *name) { (void) readonly, (void) name; return "x"; }
static int64_t marker_get_size(void *h) { (void) h; return 512; }
static int marker_pread(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h, (void) buf, (void) count, (void) offset, (void) flags;
  return 0;
}
static struct nbdserve_plugin plugin = {
  NBDSERVE_PLUGIN_INIT, .name = "marker", .version = "7.1", .longname = "leaves a mark when loaded",
  .load = marker_load, .open = marker_open, .get_size = marker_get_size, .pread = marker_pread,
};
NBDSERVE_REGISTER_PLUGIN(plugin)
EOF
check "a plugin whose load callback writes a file builds" \
      build_plugin marker.so "$tmp/marker.c"
cp "$tmp/marker.so" "$tree/plugins/marker/nbdserve-marker-plugin.so"
echo "not an ELF file" > "$tree/plugins/broken/nbdserve-broken-plugin.so"
echo 'int stranger(void) { return 1; }' > "$tmp/stranger.c"
build_plugin stranger.so "$tmp/stranger.c" &&
    cp "$tmp/stranger.so" "$tree/plugins/stranger/nbdserve-stranger-plugin.so"
cp "$tmp/marker.so" "$tree/plugins/open/nbdserve-open-plugin.so"
chmod o+w "$tree/plugins/open/nbdserve-open-plugin.so"

"$tree/nbdserve" --list-plugins > "$tmp/out" 2> "$tmp/err"; rc=$?
is "objects that cannot be loaded: still exit 0, the good ones listed" \
   "$rc $(awk '{ print $1 }' "$tmp/out" | tr '\n' ' ')" "0 marker memory "
contains "... a warning for what is not an ELF file" "$tmp/err" \
         "^nbdserve: warning: not listing 'broken': cannot load plugin $tree/plugins/broken/nbdserve-broken-plugin.so: "
contains "... a warning for a shared object that is no plugin" "$tmp/err" \
         "^nbdserve: warning: not listing 'stranger': .* is not an nbdserve plugin: it has no nbdserve_plugin_init symbol"
contains "... a warning for a plugin anybody may write to (not loaded)" "$tmp/err" \
         "^nbdserve: warning: not listing 'open': refusing to load plugin .*: anybody may write to it"
is "listing does not run the load callback" "$(ls "$tmp/loaded" 2>&1 | grep -c 'No such file')" 1
"$tree/nbdserve" --dump-plugin marker > /dev/null 2>&1
check "... (which --dump-plugin does run, so the mark is a real test)" test -f "$tmp/loaded"

# The copy has no filters next to it; the installed directory (this
# tree's make install was never run there) may hold none either.
"$tree/nbdserve" --list-filters > "$tmp/out" 2> "$tmp/err"; rc=$?
if [ -s "$tmp/out" ]; then
    is "--list-filters from a tree without filters: the installed ones" "$rc" 0
else
    like "--list-filters finding none: exit 0 and says where it looked" "$rc $(cat "$tmp/err")" \
         "^0 nbdserve: warning: no filters found \\(looked in $tree/filters and /.*\\)$"
fi
finish
