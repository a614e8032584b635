#!/usr/bin/env bash
# Installs what pgdist needs on Debian bookworm (apt packages, cargo-pgrx, `cargo pgrx init`),
# then builds pgdist and installs it into the system's PostgreSQL 15. Fast when all is there.
# Usage: scripts/setup.sh [--no-install]   (PGDIST_PROFILE=release for an optimised build)
set -euo pipefail

PG_MAJOR=15
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
PGRX_VERSION=0.18.1
APT_PACKAGES=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-client-$PG_MAJOR
              libclang-dev clang pkg-config libssl-dev openssl sudo)
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing apt packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    say "installing cargo-pgrx $PGRX_VERSION (takes about 10 minutes on 2 cores)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if ! grep -qs "pg$PG_MAJOR = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    say "cargo pgrx init --pg$PG_MAJOR $PG_CONFIG"
    cargo pgrx init "--pg$PG_MAJOR" "$PG_CONFIG"
fi

if [ "${1:-}" != "--no-install" ]; then
    profile_flag=()
    [ "${PGDIST_PROFILE:-debug}" = release ] && profile_flag=(--release)
    say "building and installing pgdist into $($PG_CONFIG --pkglibdir)"
    sudo_flag=()
    [ "$(id -u)" = 0 ] || sudo_flag=(--sudo)
    cargo pgrx install "${sudo_flag[@]}" "${profile_flag[@]}" --pg-config "$PG_CONFIG" >/dev/null
fi
