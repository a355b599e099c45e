# The qcow2 reading library is compiled into this plugin (and only into
# the plugins that name it), with zlib and zstd for compressed clusters.
SRCS_qcow2-readonly := $(wildcard common/qcow2/*.c)
LIBS_qcow2-readonly := -lz -lzstd
