# Fresh machine with Python 3.11: `make run` (main job on built-in data) and `make test`.
PYTHON ?= python3
UV = $(PYTHON) -m uv

.PHONY: setup run test test-slow browser bench

setup: .venv/.synced

.venv/.synced: pyproject.toml uv.lock
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen
	touch $@

run: setup
	.venv/bin/recflow run

test: setup
	.venv/bin/python -m pytest -m "not slow"

test-slow: setup browser
	.venv/bin/python -m pytest -m slow

# Debian's headless Chromium and its driver, for the browser tests.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

bench: setup
	.venv/bin/recflow bench ../shared/datasets/ml-latest-small --out bench/results/quality-ml-latest-small.json
