#!/usr/bin/python3
# Incremental backup from a dirty bitmap: copies every extent that the
# bitmap marks dirty from the NBD export onto TARGET, a copy of the
# previous backup.  Usage: incremental-backup.py SOCKET BITMAP TARGET
# SPDX-License-Identifier: BSD-3-Clause
import sys

import nbd

socket, bitmap, target = sys.argv[1:4]
context = "qemu:dirty-bitmap:" + bitmap
h = nbd.NBD()
h.add_meta_context(context)
h.connect_uri("nbd+unix:///?socket=" + socket)
if not h.can_meta_context(context):
    sys.exit("the server does not offer " + context)
size = h.get_size()
copied = 0
with open(target, "r+b") as out:
    pos = 0
    while pos < size:
        extents = []

        def collect(name, offset, entries, err):
            if name == context:
                extents.extend(zip(entries[0::2], entries[1::2]))
            return 0

        h.block_status(min(size - pos, 1 << 30), pos, collect)
        for length, flags in extents:
            length = min(length, size - pos)
            if flags & 1:  # dirty
                for at in range(pos, pos + length, 32 << 20):
                    n = min(32 << 20, pos + length - at)
                    out.seek(at)
                    out.write(h.pread(n, at))
                copied += length
            pos += length
h.shutdown()
print("copied %d of %d bytes" % (copied, size))
