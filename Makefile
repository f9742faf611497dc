# The two commands a newcomer needs: `make demo` and `make test`. Both set up
# everything (system packages when root, the virtualenv) on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-integration test-kernel bench lint typecheck clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh

demo: $(STAMP)
	$(VENV)/bin/aftershock demo

test: $(STAMP)
	$(PY) -m pytest -m "not kernel" -p no:cacheprovider
	$(MAKE) test-kernel

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -p no:cacheprovider

test-integration: $(STAMP)
	$(PY) -m pytest tests/integration -p no:cacheprovider

# Boots Debian's kernel under QEMU (netem, cgroup v2) and runs the kernel tier
# inside it; skipped with a message where QEMU cannot run.
test-kernel: $(STAMP)
	bash tests/kernel/run.sh $(PY)

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
