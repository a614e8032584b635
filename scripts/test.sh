#!/usr/bin/env bash
# Runs every pgdist test: unit and in-server tests (`cargo pgrx test`), then the multi-node
# suites in pg_test/ against real PostgreSQL servers. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-install

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
PG_DATA_DIR=${PGDIST_PGRX_DATA:-/tmp/pgdist-pgrx}

say "unit and in-server tests (cargo pgrx test pg15)"
if [ "$(id -u)" = 0 ]; then
    # PostgreSQL refuses to run as root: the test server runs as the postgres OS user.
    cargo pgrx test pg15 --runas postgres --pgdata "$PG_DATA_DIR"
else
    cargo pgrx test pg15
fi

# `cargo pgrx test` installed a build with test-only functions; the clusters get the real one.
bash scripts/setup.sh
say "multi-node tests (pg_test: coordinator + workers + reference server on loopback)"
cargo test -p pgdist-pg-test -- "$@"
