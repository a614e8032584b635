#!/usr/bin/env bash
# Bench: distributed SELECT against plain PostgreSQL, measured in the same run on the same
# machine. The plain side is a local copy of the same table on the coordinator (one ordinary
# PostgreSQL server with the same settings).
#   - router point lookups by key: pgbench, 4 clients, -M prepared and -M simple (TPS ratio)
#   - count(*), sum() and a ~100-group GROUP BY over ROWS rows (time ratio)
#   - a join of two co-located tables on their key, aggregated (time ratio)
#   - a join with a 5000-row table that is not co-located, aggregated (broadcast; time ratio)
#   - a join with a 0.3×ROWS table of another group on the big table's key (repartitioned)
#   - a top-10 by a non-key column (ORDER BY … LIMIT pushed into every fragment; time ratio)
#   - count(DISTINCT) grouped by another column (fragments return distinct rows; time ratio)
#   - every row in the order of a non-key column (sorted streams merged; time ratio)
#   - what the planner hook costs queries that touch no distributed table: the same local-table
#     lookups on the coordinator (pgdist loaded, distributed tables present) and on a server
#     without pgdist (TPS ratio)
#   bash bench/select.sh          ROWS=200000 SECONDS_EACH=5 bash bench/select.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-1000000}
SECONDS_EACH=${SECONDS_EACH:-10}
export PGDIST_DEMO_DIR=/tmp/pgdist-bench PGDIST_DEMO_PORT=${PGDIST_BENCH_PORT:-9800} PGDIST_DEMO_NO_SAMPLE=1
export PGDIST_PROFILE=${PGDIST_PROFILE:-release}
bash scripts/demo.sh >/dev/null
PORT=$PGDIST_DEMO_PORT
BIN=/usr/lib/postgresql/15/bin
PLAIN_DIR=/tmp/pgdist-bench-plain PLAIN_PORT=$((PORT + 10))
as_server_user() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
stop_all() {
    bash scripts/demo.sh stop >/dev/null
    as_server_user "$BIN/pg_ctl" -D "$PLAIN_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
}
trap stop_all EXIT
# A server without pgdist, configured like the cluster's nodes otherwise.
rm -rf "$PLAIN_DIR" && mkdir -p "$PLAIN_DIR" && { [ "$(id -u)" != 0 ] || chown postgres: "$PLAIN_DIR"; }
as_server_user "$BIN/initdb" -D "$PLAIN_DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
cat >>"$PLAIN_DIR/data/postgresql.conf" <<CONF
port = $PLAIN_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PLAIN_DIR'
max_prepared_transactions = 100
wal_level = logical
CONF
as_server_user "$BIN/pg_ctl" -D "$PLAIN_DIR/data" -l "$PLAIN_DIR/server.log" -w start >/dev/null
psql_c() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -At "$@"; }
timed() {
    psql_c -c "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); r record; BEGIN FOR r IN EXECUTE \$q\$$1\$q\$ LOOP END LOOP;
               RAISE NOTICE 'elapsed %', extract(epoch FROM clock_timestamp() - t0); END \$\$" 2>&1 \
        | sed -n 's/.*elapsed \([0-9.]*\).*/\1/p'
}
tps() { # table mode [port]
    printf '\\set id random(1, %d)\nSELECT * FROM %s WHERE id = :id;\n' "$ROWS" "$1" > /tmp/pgdist-bench-$1.sql
    "$BIN/pgbench" -n -h 127.0.0.1 -p "${3:-$PORT}" -U postgres -c 4 -j 2 -T "$SECONDS_EACH" -M "$2" \
        -f /tmp/pgdist-bench-$1.sql postgres 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}

psql_c <<SQL
CREATE TABLE bench_local (id bigint PRIMARY KEY, customer_id int, amount numeric(12,2), note text);
INSERT INTO bench_local SELECT i, i % 5000, (i % 10007) / 100.0, 'note ' || i FROM generate_series(1, $ROWS) i;
CREATE TABLE bench_dist AS SELECT * FROM bench_local;
ALTER TABLE bench_dist ADD PRIMARY KEY (id);
VACUUM ANALYZE bench_local;
SELECT pgdist.create_distributed_table('bench_dist', 'id');
CREATE TABLE bench_local_extra (id bigint PRIMARY KEY, weight int);
INSERT INTO bench_local_extra SELECT i, i % 7 FROM generate_series(1, $ROWS) i;
CREATE TABLE bench_dist_extra AS SELECT * FROM bench_local_extra;
ALTER TABLE bench_dist_extra ADD PRIMARY KEY (id);
VACUUM ANALYZE bench_local_extra;
SELECT pgdist.create_distributed_table('bench_dist_extra', 'id', colocate_with => 'bench_dist');
CREATE TABLE bench_local_dim (customer_id int PRIMARY KEY, region text);
INSERT INTO bench_local_dim SELECT i, 'region ' || i % 10 FROM generate_series(0, 4999) i;
CREATE TABLE bench_dist_dim AS SELECT * FROM bench_local_dim;
ALTER TABLE bench_dist_dim ADD PRIMARY KEY (customer_id);
VACUUM ANALYZE bench_local_dim;
SELECT pgdist.create_distributed_table('bench_dist_dim', 'customer_id');
CREATE TABLE bench_local_refs (ref_id int PRIMARY KEY, bench_id bigint, w int);
INSERT INTO bench_local_refs SELECT i, (i::bigint * 7) % $ROWS + 1, i % 5 FROM generate_series(1, $ROWS * 3 / 10) i;
CREATE TABLE bench_dist_refs AS SELECT * FROM bench_local_refs;
ALTER TABLE bench_dist_refs ADD PRIMARY KEY (ref_id);
VACUUM ANALYZE bench_local_refs;
SELECT pgdist.create_distributed_table('bench_dist_refs', 'ref_id', shard_count => 16);
SQL

psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PLAIN_PORT" -U postgres -d postgres <<SQL
CREATE TABLE bench_local (id bigint PRIMARY KEY, customer_id int, amount numeric(12,2), note text);
INSERT INTO bench_local SELECT i, i % 5000, (i % 10007) / 100.0, 'note ' || i FROM generate_series(1, $ROWS) i;
VACUUM ANALYZE bench_local;
SQL

results=()
for mode in prepared simple; do
    without=$(tps bench_local "$mode" "$PLAIN_PORT"); with=$(tps bench_local "$mode")
    results+=("local-table point SELECT, pgdist loaded (-M $mode)|$without TPS|$with TPS|$(python3 -c "print(f'{$with / $without:.2f}x TPS')")")
done
for mode in prepared simple; do
    plain=$(tps bench_local "$mode"); dist=$(tps bench_dist "$mode")
    results+=("router point SELECT (-M $mode)|$plain TPS|$dist TPS|$(python3 -c "print(f'{$dist / $plain:.2f}x TPS')")")
done
for q in "SELECT count(*) FROM TABLE" "SELECT sum(amount) FROM TABLE" "SELECT customer_id % 100, count(*), sum(amount) FROM TABLE GROUP BY 1" \
         "SELECT e.weight, count(*), sum(t.amount) FROM TABLE t JOIN TABLE_extra e USING (id) GROUP BY 1" \
         "SELECT d.region, count(*), sum(t.amount) FROM TABLE t JOIN TABLE_dim d USING (customer_id) GROUP BY 1" \
         "SELECT t.customer_id % 10, count(*), sum(r.w) FROM TABLE t JOIN TABLE_refs r ON r.bench_id = t.id GROUP BY 1" \
         "SELECT * FROM TABLE ORDER BY amount DESC, id LIMIT 10" \
         "SELECT customer_id % 100, count(DISTINCT customer_id) FROM TABLE GROUP BY 1" \
         "SELECT id, amount FROM TABLE ORDER BY amount, id"; do
    plain=$(timed "${q//TABLE/bench_local}"); dist=$(timed "${q//TABLE/bench_dist}")
    results+=("${q//TABLE/t}|${plain}s|${dist}s|$(python3 -c "print(f'{$dist / $plain:.2f}x the time')")")
done
printf '%-60s %-16s %-16s %s\n' "scenario ($ROWS rows)" plain "distributed (or with pgdist)" ratio
for r in "${results[@]}"; do IFS='|' read -r a b c d <<<"$r"; printf '%-60s %-16s %-16s %s\n' "$a" "$b" "$c" "$d"; done
