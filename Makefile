# snapfs: two commands for a newcomer, `make demo` and `make test`.
# Both install what is missing first (mount-helpers/setup is idempotent).

VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo

.PHONY: setup demo demo-libvirt test bench-deps bench bench-scale clean umount-demo

setup:
	mount-helpers/setup

demo: setup
	mount-helpers/demo $(DEMO_DIR)

demo-libvirt: setup
	mount-helpers/demo-libvirt $(DEMO_DIR)

test: setup
	mount-helpers/run-tests

# fio (Debian's package) for tests/bench_random.py: installed only for the benches,
# as mount-helpers/setup installs its packages (only when missing; sudo unless root).
bench-deps:
	@command -v fio >/dev/null || { \
		echo 'bench-deps: installing Debian package: fio' >&2; \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends fio >/dev/null; }

bench: setup bench-deps
	$(PY) tests/bench.py
	$(PY) tests/bench_nbd.py
	$(PY) tests/bench_libvirt.py
	$(PY) tests/bench_restore.py
	$(PY) tests/bench_qcow2.py
	$(PY) tests/bench_memory.py
	$(PY) tests/bench_remote.py
	$(PY) tests/bench_random.py
	$(PY) tests/bench_recovery.py

bench-scale: setup
	$(PY) tests/bench_scale.py

umount-demo:
	@if [ -d $(DEMO_DIR)/mnt ] && findmnt -rn --mountpoint "$$(cd $(DEMO_DIR)/mnt && pwd)" >/dev/null; then \
		$(VENV)/bin/snapfs umount $(DEMO_DIR)/mnt; fi
	@mount-helpers/demo-libvirt --remove $(DEMO_DIR)

clean: umount-demo
	rm -rf $(DEMO_DIR) build
