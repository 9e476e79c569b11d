# Fresh machine with Python 3.11: `make run` (main job on built-in data) and `make test`.
PYTHON ?= python3
UV = $(PYTHON) -m uv

.PHONY: setup run test test-slow test-production browser postgres bench docs

setup: .venv/.synced

.venv/.synced: pyproject.toml uv.lock
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode
	touch $@

run: setup
	.venv/bin/recflow run

# The import contract (pyproject.toml, [tool.importlinter]), then the tests in a random order
# (pytest-randomly prints the seed; `pytest --randomly-seed=N` replays an order).
test: setup
	.venv/bin/lint-imports --no-cache
	.venv/bin/python -m pytest -m "not slow and not production"

test-slow: setup browser
	.venv/bin/python -m pytest -m slow

# The production topology (`recflow stack up --backend postgres`) on PostgreSQL: a worker,
# server faults, a 17-run load (tests/production/, docs/operations.md).
test-production: setup postgres
	.venv/bin/python -m pytest -m production

# Debian's PostgreSQL server, for the postgres stack (it runs from /usr/lib/postgresql/*/bin).
postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; }

# Debian's headless Chromium and its driver, for the browser tests.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Quality against the classical baselines (docs/quality.md) on real data, which the repository
# does not ship: directories and GroupLens archives (make bench DATASETS="movielens:ml-latest-small
# synthetic path/to/data"); results in bench/results/, tables in docs/quality.md and the README.
DATASETS ?= movielens:ml-latest-small synthetic
bench: setup
	.venv/bin/recflow bench $(DATASETS)

# docs/configuration.md, the configuration reference, from schemas/config.py (a test fails when
# the committed file is out of date).
docs: setup
	.venv/bin/python -m schemas.reference
