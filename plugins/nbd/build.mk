# The nbd plugin speaks to its backend with libnbd (Debian: libnbd-dev).
LIBS_nbd := -lnbd
