#!/usr/bin/env bash
# Bench: distributed writes against plain PostgreSQL, measured in the same run on the same
# machine. The plain side is an ordinary table on the coordinator (one PostgreSQL server with the
# same settings); the distributed side has the same definition, spread over 2 workers.
#   - COPY of ROWS rows from the client (\copy), rows/s
#   - pgbench's built-in TPC-B-like script, 4 clients: pgbench_accounts distributed by aid,
#     the small pgbench_branches / _tellers / _history tables local on the coordinator (TPS)
#   - multi-row INSERT, 100 rows per statement, 4 clients (rows/s)
#   bash bench/write.sh          ROWS=200000 SECONDS_EACH=5 bash bench/write.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-1000000}
SCALE=${SCALE:-10}
SECONDS_EACH=${SECONDS_EACH:-15}
export PGDIST_DEMO_DIR=/tmp/pgdist-bench PGDIST_DEMO_PORT=${PGDIST_BENCH_PORT:-9800} PGDIST_DEMO_NO_SAMPLE=1
export PGDIST_PROFILE=${PGDIST_PROFILE:-release}
bash scripts/demo.sh >/dev/null
trap 'bash scripts/demo.sh stop >/dev/null; rm -f /tmp/pgdist-bench-*.csv /tmp/pgdist-bench-*.sql' EXIT
PORT=$PGDIST_DEMO_PORT
PGBENCH=/usr/lib/postgresql/15/bin/pgbench
psql_c() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -At "$@"; }
ratio() { python3 -c "print(f'{$2 / $1:.2f}x')"; }

# COPY: the same file into a plain table and into a distributed one.
psql_c <<SQL
CREATE TABLE copy_plain (id bigint, customer_id int, amount numeric(12,2), note text);
CREATE TABLE copy_dist (LIKE copy_plain);
SELECT pgdist.create_distributed_table('copy_dist', 'id');
SQL
python3 -c "
import sys
with open('/tmp/pgdist-bench-copy.csv', 'w') as f:
    for i in range(1, $ROWS + 1):
        f.write(f'{i},{i % 5000},{(i % 10007) / 100:.2f},note {i}\n')
"
copy_rate() {
    local start end
    start=$(date +%s.%N)
    psql_c -c "\\copy $1 FROM '/tmp/pgdist-bench-copy.csv' WITH (FORMAT csv)"
    end=$(date +%s.%N)
    python3 -c "print(int($ROWS / ($end - $start)))"
}
copy_plain=$(copy_rate copy_plain)
copy_dist=$(copy_rate copy_dist)
[ "$(psql_c -c 'SELECT count(*) FROM copy_dist')" = "$ROWS" ] || { echo "COPY lost rows" >&2; exit 1; }

# pgbench TPC-B-like: the same tables in two schemas, chosen by search_path.
for schema in tpcb_plain tpcb_dist; do
    psql_c -c "CREATE SCHEMA $schema"
    PGOPTIONS="-c search_path=$schema" $PGBENCH -i -q -s "$SCALE" -h 127.0.0.1 -p "$PORT" -U postgres postgres >/dev/null 2>&1
done
psql_c -c "SET search_path = tpcb_dist; SELECT pgdist.create_distributed_table('pgbench_accounts', 'aid')" >/dev/null 2>&1
tpcb() {
    PGOPTIONS="-c search_path=$1" $PGBENCH -n -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -j 2 \
        -T "$SECONDS_EACH" -M "$2" postgres 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
tpcb_plain_simple=$(tpcb tpcb_plain simple)
tpcb_dist_simple=$(tpcb tpcb_dist simple)
tpcb_plain_prepared=$(tpcb tpcb_plain prepared)
tpcb_dist_prepared=$(tpcb tpcb_dist prepared)

# Multi-row INSERT: 100 rows per statement.
psql_c <<SQL
CREATE TABLE insert_plain (id bigint, customer_id int, amount numeric(12,2));
CREATE TABLE insert_dist (LIKE insert_plain);
SELECT pgdist.create_distributed_table('insert_dist', 'id');
SQL
multi_insert() {
    python3 -c "
values = ', '.join(f'(:base + {i}, {i}, {i}.5)' for i in range(100))
print('\\\\set base random(1, 1000000000)')
print(f'INSERT INTO $1 VALUES {values};')
" > "/tmp/pgdist-bench-$1.sql"
    $PGBENCH -n -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -j 2 -T "$SECONDS_EACH" \
        -f "/tmp/pgdist-bench-$1.sql" postgres 2>/dev/null \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | python3 -c "import sys; print(int(float(sys.stdin.read()) * 100))"
}
insert_plain=$(multi_insert insert_plain)
insert_dist=$(multi_insert insert_dist)

printf '%-58s %-14s %-14s %s\n' scenario plain distributed ratio
printf '%-58s %-14s %-14s %s\n' "COPY $ROWS rows through the coordinator (rows/s)" "$copy_plain" "$copy_dist" "$(ratio "$copy_plain" "$copy_dist")"
printf '%-58s %-14s %-14s %s\n' "pgbench TPC-B-like, scale $SCALE, 4 clients, -M simple (TPS)" "$tpcb_plain_simple" "$tpcb_dist_simple" "$(ratio "$tpcb_plain_simple" "$tpcb_dist_simple")"
printf '%-58s %-14s %-14s %s\n' "pgbench TPC-B-like, scale $SCALE, 4 clients, -M prepared (TPS)" "$tpcb_plain_prepared" "$tpcb_dist_prepared" "$(ratio "$tpcb_plain_prepared" "$tpcb_dist_prepared")"
printf '%-58s %-14s %-14s %s\n' "multi-row INSERT, 100 rows/statement, 4 clients (rows/s)" "$insert_plain" "$insert_dist" "$(ratio "$insert_plain" "$insert_dist")"
