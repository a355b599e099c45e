# The qcow2 library (reading and the writable overlay) is compiled into
# this plugin, with zlib and zstd for compressed clusters of a qcow2 base.
SRCS_dirty-bitmap-overlay := $(wildcard common/qcow2/*.c)
LIBS_dirty-bitmap-overlay := -lz -lzstd
