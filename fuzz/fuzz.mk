# nbdserve fuzzing harnesses (libFuzzer, clang).  Included by GNUmakefile.
#   make fuzz                 every target for FUZZ_SECONDS (default 60)
#   make fuzz-build           just build them (tests/fuzz.t replays the corpora)
# Working corpora grow in fuzz/corpus/TARGET (seeded from the checked-in
# tests/fuzz/TARGET); crashes land in fuzz/crashes/.  The server's own
# messages (refusals of bad input) are silenced with -close_fd_mask=2.
# SPDX-License-Identifier: BSD-3-Clause

FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := handshake transmission parsers qcow2 qcow2-overlay
# Longest input the fuzzer makes; qcow2 images (a header cluster, tables,
# data) need more room than protocol streams.
FUZZ_MAX_LEN       := 65536
FUZZ_MAX_LEN_qcow2 := 1048576
FUZZ_MAX_LEN_qcow2-overlay := 1048576
FUZZ_SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_CFLAGS  := -std=gnu11 -g -O1 -fno-omit-frame-pointer $(FUZZ_SAN) -fsanitize=fuzzer-no-link \
                -Wall -Wextra -Werror -Wno-unused-command-line-argument -D_GNU_SOURCE -pthread \
                -Iinclude -Iserver -Ifuzz -DPACKAGE_VERSION='"$(VERSION)"' \
                -DPLUGINDIR='"$(PLUGINDIR)"' -DFILTERDIR='"$(FILTERDIR)"'
FUZZ_OBJS    := $(patsubst server/%.c,fuzz/build/%.o,$(filter-out server/main.c,$(SERVER_SRCS))) \
                fuzz/build/common.o
FUZZ_BINS    := $(addprefix fuzz/build/,$(FUZZ_TARGETS))
# The qcow2 target runs the library alone, not the server.
QCOW2_FUZZ_OBJS := $(patsubst common/qcow2/%.c,fuzz/build/qcow2-lib/%.o,$(wildcard common/qcow2/*.c))
# The harnesses load their own build of the memory plugin, instrumented
# like them (a gcc sanitizer build of the plugin would not mix with
# clang's runtime, and this way the fuzzer sees the plugin's branches).
FUZZ_PLUGIN  := fuzz/build/nbdserve-memory-plugin.so

.PHONY: fuzz fuzz-build
.SECONDARY: $(FUZZ_OBJS) $(QCOW2_FUZZ_OBJS) fuzz/build/qcow2-files.o
fuzz-build: $(FUZZ_BINS) $(FUZZ_PLUGIN)

$(FUZZ_PLUGIN): $(wildcard plugins/memory/*.c plugins/memory/*.h include/*.h)
	@mkdir -p fuzz/build
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fPIC -shared $(filter %.c,$^) -o $@

fuzz/build/%.o: server/%.c $(wildcard server/*.h include/*.h)
	@mkdir -p fuzz/build
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

fuzz/build/common.o: fuzz/common.c fuzz/common.h $(wildcard server/*.h include/*.h)
	@mkdir -p fuzz/build
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

fuzz/build/qcow2-lib/%.o: common/qcow2/%.c $(wildcard common/qcow2/*.h)
	@mkdir -p fuzz/build/qcow2-lib
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

fuzz/build/qcow2-files.o: fuzz/qcow2-files.c fuzz/qcow2-files.h $(wildcard common/qcow2/*.h)
	@mkdir -p fuzz/build
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

fuzz/build/qcow2: fuzz/qcow2.c fuzz/build/qcow2-files.o $(QCOW2_FUZZ_OBJS)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $^ -o $@ -lz -lzstd

# The overlay target: the same library, opened for writing.
fuzz/build/qcow2-overlay: fuzz/qcow2-overlay.c fuzz/build/qcow2-files.o $(QCOW2_FUZZ_OBJS)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $^ -o $@ -lz -lzstd

# The plugin the harness loads finds the nbdserve_* functions through the
# server's dynamic list, as in ./nbdserve; clang adds the sanitizer
# runtime's own list of symbols beside it.
fuzz/build/%: fuzz/%.c $(FUZZ_OBJS) $(SERVER_DYNLIST)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $(SERVER_EXPORTS) $(filter-out $(SERVER_DYNLIST),$^) -o $@ $(SERVER_LIBS)

fuzz: fuzz-build
	@mkdir -p fuzz/crashes
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; \
	  max=$(FUZZ_MAX_LEN); case $$t in qcow2*) max=$(FUZZ_MAX_LEN_qcow2);; esac; \
	  echo "== $$t ($(FUZZ_SECONDS) s)"; \
	  ./fuzz/build/$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 -timeout=20 -close_fd_mask=2 \
	    -artifact_prefix=fuzz/crashes/$$t- -max_len=$$max \
	    fuzz/corpus/$$t tests/fuzz/$$t 2>&1 | grep -E '^(#[0-9]+.*DONE|stat::|==[0-9]+==ERROR|SUMMARY)' \
	    || exit 1; \
	done
