# snapfs: two commands for a newcomer, `make demo` and `make test`.
# Both install what is missing first (mount-helpers/setup is idempotent).

VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo

.PHONY: setup demo test bench clean umount-demo

setup:
	mount-helpers/setup

demo: setup
	mount-helpers/demo $(DEMO_DIR)

test: setup
	mount-helpers/run-tests

bench: setup
	$(PY) tests/bench.py
	$(PY) tests/bench_nbd.py
	$(PY) tests/bench_libvirt.py

umount-demo:
	-$(VENV)/bin/snapfs umount $(DEMO_DIR)/mnt

clean: umount-demo
	rm -rf $(DEMO_DIR) build
