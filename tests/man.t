#!/bin/bash
# The manual pages: `make install DESTDIR=...` installs one for the
# server, the control client, the two APIs and every built plugin and
# filter; each renders with `man -l` and shows its NAME section as
# "name - description", which is also what whatis/apropos read from it
# (lexgrog).  scripts/md2man refuses a markdown page without a proper
# title.
. "$(dirname "$0")/lib/functions.sh"
requires man lexgrog lowdown
export MANPAGER=cat PAGER=cat MANWIDTH=80

dest="$tmp/dest"
if ! make_install "$dest"; then
    plan 1; not_ok "make install DESTDIR=$dest"; finish
fi
mandir="$dest/usr/local/share/man"
pages=("$mandir"/man1/*.1 "$mandir"/man3/*.3)
plan $((${#pages[@]} + 10))
ok "make install DESTDIR=... (${#pages[@]} manual pages)"

# Each page: man renders it, its NAME section is "NAME - description",
# and lexgrog (man-db's whatis parser) reads the same.
for page in "${pages[@]}"; do
    file=$(basename "$page"); name=${file%.*}
    man -l "$page" > "$tmp/page.txt" 2> "$tmp/page.err"; rc=$?
    # The NAME section's text on one line (man may wrap and justify it).
    name_line=$(awk 'on && !NF { exit } on { printf "%s ", $0 } $0 == "NAME" { on = 1 }' \
                "$tmp/page.txt" | tr -s ' ')
    whatis=$(lexgrog "$page" 2>&1)
    if [ $rc -eq 0 ] && [[ $name_line =~ ^\ $name\ -\ [^\ ] ]] &&
       [[ $whatis == *"\"$name - "* ]] && ! grep -qi 'error' "$tmp/page.err"; then
        ok "$file: renders, NAME is '${name_line# }'"
    else
        not_ok "$file: renders with its NAME section (man exit $rc)"
        diag "NAME line: '$name_line'"; diag "lexgrog: $whatis"
        diag_file "$tmp/page.err"; diag_file "$tmp/page.txt" 10
    fi
done

missing=
for want in man1/nbdserve.1 man1/nbdserve-ctl.1 man3/nbdserve-plugin.3 man3/nbdserve-filter.3; do
    [ -f "$mandir/$want" ] || missing="$missing $want"
done
is "the server's, nbdserve-ctl's and the two API pages are installed" "$missing" ""

# Every plugin and filter the build made has its page.
missing= built=0
for so in "$top"/plugins/*/nbdserve-*-plugin.so "$top"/filters/*/nbdserve-*-filter.so; do
    [ -f "$so" ] || continue
    built=$((built + 1))
    name=$(basename "$so" .so)
    [ -f "$mandir/man1/$name.1" ] || missing="$missing $name(1)"
done
is "every built plugin and filter ($built) has its page" "$missing" ""
like "... and they are at least the ones in the tree today" "$built" '^([1-9][0-9]|[89])$'

# `man nbdserve` finds the page once the man directory is on the path.
is "man -M MANDIR -w nbdserve finds the installed page" \
   "$(man -M "$mandir" -w nbdserve 2>&1)" "$mandir/man1/nbdserve.1"
out=$(man -M "$mandir" 3 nbdserve-plugin 2>&1)
like "man 3 nbdserve-plugin shows the tutorial and the reference" \
     "$(echo "$out" | grep -cE '^(NAME|DESCRIPTION|[0-9]+\. [A-Z]|.*CALLBACK REFERENCE)')" '^([4-9]|[1-9][0-9]+)$'

# A plugin page: a synopsis, then the sections of the markdown page in
# capitals, code (--run) keeping its case.
man -l "$mandir/man1/nbdserve-memory-plugin.1" > "$tmp/memory.txt" 2>&1
is "the memory plugin's page: NAME, SYNOPSIS, DESCRIPTION, PARAMETERS in order" \
   "$(grep -E '^(NAME|SYNOPSIS|DESCRIPTION|PARAMETERS)$' "$tmp/memory.txt" | tr '\n' ' ')" \
   "NAME SYNOPSIS DESCRIPTION PARAMETERS "
man -l "$mandir/man1/nbdserve.1" > "$tmp/nbdserve.txt" 2>&1
contains "nbdserve(1): section names in capitals, code keeps its case" "$tmp/nbdserve.txt" \
         '^CAPTIVE MODE \(--run\)$'

# Bad pages are refused with a message saying what the title must be.
printf '# Some title\n\nText.\n' > "$tmp/untitled.md"
"$top/scripts/md2man" nbdserve-untitled-plugin 1 0 "$tmp/untitled.md" > "$tmp/out.1" 2> "$tmp/err"
like "md2man: a title without 'name — description' is refused" "$? $(cat "$tmp/err")" \
     "^1 md2man: .*untitled.md: the first line must be '# nbdserve-untitled-plugin — one-line description'"
printf '# nbdserve-other-plugin — a page for another name\n' > "$tmp/other.md"
"$top/scripts/md2man" nbdserve-mine-plugin 1 0 "$tmp/other.md" > "$tmp/out.1" 2> "$tmp/err"
like "md2man: a title naming another page is refused" "$? $(cat "$tmp/err")" \
     "^1 md2man: .*names 'nbdserve-other-plugin', but the page is nbdserve-mine-plugin\(1\)"
finish
