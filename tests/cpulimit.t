#!/bin/bash
# How server/cpulimit.c finds a cgroup CPU quota (busy polling stays off
# under one of less than two CPUs): made-up /proc/self/{mountinfo,cgroup}
# and cgroup trees for cgroup v2, v1 with cpu alone or joined with
# cpuacct, a container's mount of its own subtree, limits set on an
# ancestor, and files that are missing or hold nonsense.
. "$(dirname "$0")/lib/functions.sh"
plan 12

probe="$top/tests/lib/cpulimit-probe"
n=0
# layout MOUNTINFO_LINES CGROUP_LINES: a fresh fake /proc/self in $dir,
# with $fs for the cgroup mounts; files are added by the caller.
layout() {
    n=$((n + 1)); dir="$tmp/case$n"; fs="$dir/fs"
    mkdir -p "$dir" "$fs"
    printf "$1" "$fs" "$fs" > "$dir/mountinfo"
    printf "$2" > "$dir/cgroup"
}
put() { mkdir -p "$(dirname "$1")"; echo "$2" > "$1"; }
quota() { "$probe" "$dir"; }

layout '30 20 0:26 / %s/cg2 rw - cgroup2 cgroup2 rw\n' '0::/a/b\n'
put "$fs/cg2/a/b/cpu.max" "max 100000"
put "$fs/cg2/a/cpu.max" "150000 100000"
is "v2: a limit on the parent applies to the child" "$(quota)" "1.50"

put "$fs/cg2/a/b/cpu.max" "50000 100000"
is "v2: the tightest limit on the way up wins" "$(quota)" "0.50"

layout '30 20 0:26 / %s/cg2 rw - cgroup2 cgroup2 rw\n' '0::/a\n'
put "$fs/cg2/a/cpu.max" "max 100000"
is "v2: no limit" "$(quota)" "0.00"

layout '40 30 0:30 /docker/abc %s/cg2 rw - cgroup2 cgroup2 rw\n' '0::/docker/abc\n'
put "$fs/cg2/cpu.max" "200000 100000"
put "$fs/cpu.max" "10000 100000"   # above the mount: never read
is "v2: a container's mount of its own cgroup" "$(quota)" "2.00"

layout '40 30 0:30 /docker/abc %s/cg2 rw - cgroup2 cgroup2 rw\n' '0::/elsewhere\n'
put "$fs/cg2/cpu.max" "50000 100000"
is "v2: our cgroup outside the mounted subtree: no quota known" "$(quota)" "0.00"

layout '40 30 0:30 /docker/abc %s/cg2 rw - cgroup2 cgroup2 rw\n' '0::/docker/abcdef\n'
put "$fs/cg2def/cpu.max" "50000 100000"
is "v2: a sibling whose name starts like the mounted one is outside it" "$(quota)" "0.00"

layout '32 31 0:29 / %s/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n' '4:cpu,cpuacct:/svc\n1:name=systemd:/svc\n'
put "$fs/cpu,cpuacct/svc/cpu.cfs_quota_us" "50000"
put "$fs/cpu,cpuacct/svc/cpu.cfs_period_us" "100000"
is "v1: cpu joined with cpuacct" "$(quota)" "0.50"

put "$fs/cpu,cpuacct/svc/cpu.cfs_quota_us" "-1"
is "v1: -1 is no limit" "$(quota)" "0.00"

layout '33 31 0:30 / %s/cpuacct rw - cgroup cgroup rw,cpuacct\n' '3:cpuacct:/x\n'
put "$fs/cpuacct/x/cpu.cfs_quota_us" "50000"
put "$fs/cpuacct/x/cpu.cfs_period_us" "100000"
is "v1: cpuacct alone is not the cpu controller" "$(quota)" "0.00"

layout '32 31 0:29 / %s/cpu rw - cgroup cgroup rw,cpu\n41 31 0:38 / %s/unified rw - cgroup2 cgroup2 rw\n' '1:cpu:/s\n0::/s\n'
put "$fs/cpu/s/cpu.cfs_quota_us" "300000"
put "$fs/cpu/s/cpu.cfs_period_us" "100000"
put "$fs/unified/s/cpu.max" "120000 100000"
is "v1 and v2 mounted together: the tighter one" "$(quota)" "1.20"

layout '30 20 0:26 / %s/cg2 rw - cgroup2 cgroup2 rw\n' '0::/a\n'
put "$fs/cg2/a/cpu.max" "lots of nonsense"
put "$fs/cg2/cpu.max" "100000"
is "nonsense and a lone number are no limit" "$(quota)" "0.00"

n=$((n + 1)); dir="$tmp/case$n"; mkdir -p "$dir"
: > "$dir/mountinfo"; printf 'garbage\n::\n' > "$dir/cgroup"
is "no cgroup mounts, a garbled cgroup file: no limit" "$(quota)" "0.00"

finish
