#!/bin/bash
# backup-cycle.sh CONTROL SOCKET BACKUP ROUND
# Round 0 takes the full backup; round N > 0 an incremental one onto a
# copy of the previous backup.  Each round leaves BACKUP.N equal to the
# disk at checkpoint cN.
set -e
ctl=$1 sock=$2 backup=$3 round=$4
here=$(dirname "$0")
nbdserve-ctl "$ctl" dirty-bitmap-overlay.checkpoint name=c$round
if [ "$round" -eq 0 ]; then
    nbdcopy "nbd+unix:///@c0?socket=$sock" "$backup.0"
else
    cp "$backup.$((round - 1))" "$backup.$round"
    # The bitmap that ended at cN is the one that began at c(N-1).
    prev=c$((round - 1))
    /usr/bin/python3 "$here/incremental-backup.py" "$sock" "$prev" "$backup.$round" "@c$round"
    nbdserve-ctl "$ctl" dirty-bitmap-overlay.release name=$prev
fi
