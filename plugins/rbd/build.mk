# The rbd plugin links librbd and librados (Debian: librbd-dev, librados-dev).
# Without their headers it is left out of the build, with a note, so that
# the rest builds on a machine without Ceph's libraries.
LIBS_rbd := -lrbd -lrados
ifeq ($(wildcard /usr/include/rbd/librbd.h),)
PLUGIN_SOS := $(filter-out plugins/rbd/%,$(PLUGIN_SOS))
$(info note: librbd-dev is not installed: the rbd plugin is not built (make deps installs it))
endif
