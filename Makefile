# One command per job, the same locally and in CI (DESIGN.md section 5).
# Every target installs what it needs itself: Debian tools (as root, when missing) and a locked venv.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
SYS_TOOLS := nft iptables conntrack ipset ip
SYS_PKGS := nftables iptables conntrack ipset iproute2
PYTEST_ARGS ?=

.PHONY: demo test lint bench sysdeps venv clean format lock

demo: sysdeps venv
	$(VENV)/bin/kube-proxy demo

test: sysdeps venv
	@set +e; $(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected (exit 5), treated as success"; rc=0; fi; exit $$rc

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench: sysdeps venv
	$(PY) -m bench.run

# Debian tools the data path needs; installed only when missing and only as root.
sysdeps:
	@missing=""; for t in $(SYS_TOOLS); do command -v $$t >/dev/null 2>&1 || PATH=$$PATH:/usr/sbin:/sbin command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages for:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYS_PKGS) >/dev/null; \
	  else echo "missing tools:$$missing (run as root, or: apt-get install $(SYS_PKGS)); lab tests will be skipped"; fi; \
	fi

$(VENV)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
	uv sync --locked
	@touch $@

venv: $(VENV)/.synced

# Re-resolve after editing dependencies in pyproject.toml (CI only ever installs what is locked).
lock:
	@command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
	uv lock

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
