#!/usr/bin/env bash
# Bench: distributing a table of ROWS rows (default 1M) over 2 workers, against a plain
# `INSERT INTO copy SELECT * FROM t` on one server, measured in the same run on the same machine.
# Prints rows/s for both and the ratio. Builds pgdist with the release profile.
#   bash bench/distribute.sh            ROWS=200000 bash bench/distribute.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-1000000}
export PGDIST_DEMO_DIR=/tmp/pgdist-bench PGDIST_DEMO_PORT=${PGDIST_BENCH_PORT:-9800} PGDIST_DEMO_NO_SAMPLE=1
export PGDIST_PROFILE=${PGDIST_PROFILE:-release}
bash scripts/demo.sh >/dev/null
trap 'bash scripts/demo.sh stop >/dev/null' EXIT
psql_c() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGDIST_DEMO_PORT" -U postgres -d postgres -At "$@"; }
# Seconds that one SQL statement takes, measured by the server.
timed() {
    psql_c -c "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN EXECUTE \$q\$$1\$q\$;
               RAISE NOTICE 'elapsed %', extract(epoch FROM clock_timestamp() - t0); END \$\$" 2>&1 \
        | sed -n 's/.*elapsed \([0-9.]*\).*/\1/p'
}

psql_c <<SQL
CREATE TABLE src (id bigint, customer_id int, amount numeric(12,2), note text, created_at timestamptz);
INSERT INTO src SELECT i, i % 50000, (i % 10007) / 100.0, 'order note ' || i, '2025-01-01'::timestamptz + i * interval '1 second'
FROM generate_series(1, $ROWS) i;
CREATE TABLE plain_copy (LIKE src);
CREATE TABLE dist AS SELECT * FROM src;
VACUUM ANALYZE src, dist;
SQL
plain=$(timed "INSERT INTO plain_copy SELECT * FROM src")
distributed=$(timed "SELECT pgdist.create_distributed_table('dist', 'customer_id')")
python3 - "$ROWS" "$plain" "$distributed" <<'PY'
import sys
rows, plain, dist = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
print(f"rows                         {rows}")
print(f"plain INSERT … SELECT        {plain:8.2f} s  {rows / plain:12,.0f} rows/s")
print(f"create_distributed_table     {dist:8.2f} s  {rows / dist:12,.0f} rows/s")
print(f"ratio (distribute / plain)   {dist / plain:8.2f}x the time")
PY
