#!/usr/bin/env bash
# The main job: starts a local pgdist cluster (a coordinator and 2 workers on loopback),
# creates the extension, adds the workers and shows the cluster working.
#   bash scripts/demo.sh          set up everything, start the cluster, show it
#   bash scripts/demo.sh stop     stop the cluster and delete its data
# Settings: PGDIST_DEMO_DIR (default /tmp/pgdist-demo), PGDIST_DEMO_PORT (default 9700: the
# coordinator; workers on the next ports), PGDIST_DEMO_NO_SAMPLE=1 (skip the sample dataset).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${PGDIST_DEMO_DIR:-/tmp/pgdist-demo}
BASE_PORT=${PGDIST_DEMO_PORT:-9700}
BIN=/usr/lib/postgresql/15/bin
NAMES=(coordinator worker1 worker2)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
# PostgreSQL refuses to run as root: run the servers as the postgres OS user then.
as_server_user() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
unset RUST_BACKTRACE  # keep Rust backtraces out of the servers' error messages
port_of() { echo $((BASE_PORT + $1)); }
psql_on() { local port=$1; shift; psql -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }

stop_cluster() {
    for name in "${NAMES[@]}"; do
        if [ -f "$DIR/$name/data/postmaster.pid" ]; then
            as_server_user "$BIN/pg_ctl" -D "$DIR/$name/data" -m fast -w stop >/dev/null || true
        fi
    done
    rm -rf "$DIR"
    say "pgdist demo cluster stopped and removed ($DIR)"
}

if [ "${1:-}" = stop ]; then
    stop_cluster
    exit 0
fi

bash scripts/setup.sh

if [ -f "$DIR/coordinator/data/postmaster.pid" ]; then
    say "a demo cluster is already running in $DIR; showing it"
else
    for i in "${!NAMES[@]}"; do
        port=$(port_of "$i")
        if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port $port is in use: set PGDIST_DEMO_PORT to a free range" >&2
            exit 1
        fi
    done
    rm -rf "$DIR"
    mkdir -p "$DIR"
    [ "$(id -u)" = 0 ] && chown postgres: "$DIR"
    for i in "${!NAMES[@]}"; do
        name=${NAMES[$i]}
        port=$(port_of "$i")
        say "starting $name on port $port"
        as_server_user "$BIN/initdb" -D "$DIR/$name/data" -U postgres --auth=trust -E UTF8 \
            --locale=C.UTF-8 >/dev/null
        cat >>"$DIR/$name/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR/$name'
shared_preload_libraries = 'pgdist'
max_prepared_transactions = 100
wal_level = logical
CONF
        as_server_user "$BIN/pg_ctl" -D "$DIR/$name/data" -l "$DIR/$name/server.log" -w start >/dev/null
    done
    coordinator=$(port_of 0)
    psql_on "$coordinator" -q -c "CREATE EXTENSION pgdist"
    for i in 1 2; do
        say "adding worker$i"
        psql_on "$coordinator" -q -c "SELECT pgdist.add_node('127.0.0.1', $(port_of "$i"))" >/dev/null
    done
    if [ -z "${PGDIST_DEMO_NO_SAMPLE:-}" ]; then
        say "distributing a sample dataset: customers and orders (co-located by customer_id), countries (reference)"
        psql_on "$coordinator" -q <<'SQL'
CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
INSERT INTO countries VALUES ('de', 'Germany'), ('fr', 'France'), ('jp', 'Japan'), ('us', 'United States');
CREATE TABLE customers (customer_id int PRIMARY KEY, name text NOT NULL, country text);
INSERT INTO customers SELECT i, 'customer ' || i, (ARRAY['de', 'fr', 'jp', 'us'])[1 + i % 4]
FROM generate_series(1, 10000) i;
CREATE TABLE orders (customer_id int NOT NULL, order_id bigint NOT NULL, amount numeric(10,2), ordered_at date,
                     PRIMARY KEY (customer_id, order_id));
CREATE INDEX ON orders (ordered_at);
INSERT INTO orders SELECT 1 + i % 10000, i, (i % 997) / 10.0, date '2025-01-01' + i % 365
FROM generate_series(1, 200000) i;
SELECT pgdist.create_reference_table('countries');
SELECT pgdist.create_distributed_table('customers', 'customer_id');
SELECT pgdist.create_distributed_table('orders', 'customer_id');
ALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'new';
SQL
    fi
fi

coordinator=$(port_of 0)
say "the cluster: SELECT * FROM pgdist.nodes"
psql_on "$coordinator" -c "SELECT * FROM pgdist.nodes"
say "one command on every worker: SELECT * FROM pgdist.run_on_workers('SELECT version()')"
psql_on "$coordinator" -c "SELECT node_id, success, left(result, 40) AS result FROM pgdist.run_on_workers('SELECT version()')"
if [ -z "${PGDIST_DEMO_NO_SAMPLE:-}" ]; then
    say "distributed tables: SELECT * FROM pgdist.tables"
    psql_on "$coordinator" -c "SELECT * FROM pgdist.tables"
    say "their shards (first 6): SELECT * FROM pgdist.shards"
    psql_on "$coordinator" -c "SELECT shard_id, table_name, shard_name, node_id, min_value, max_value, row_estimate, bytes FROM pgdist.shards LIMIT 6"
    say "the ALTER TABLE above reached every shard: SELECT * FROM pgdist.run_on_workers(...)"
    psql_on "$coordinator" -c "SELECT node_id, result AS shards_with_status_column FROM pgdist.run_on_workers(\$\$SELECT count(*) FROM pg_attribute WHERE attname = 'status' AND attrelid::regclass::text LIKE 'orders\\_%'\$\$)"
    say "a router lookup: one shard on one node"
    psql_on "$coordinator" -c "SELECT * FROM orders WHERE customer_id = 42 ORDER BY order_id LIMIT 3" \
        -c "EXPLAIN SELECT * FROM orders WHERE customer_id = 42"
    say "a multi-shard aggregate: partial aggregates on every shard, combined on the coordinator"
    psql_on "$coordinator" -c "SELECT extract(quarter FROM ordered_at) AS quarter, count(*), sum(amount) FROM orders GROUP BY 1 ORDER BY 1" \
        -c "EXPLAIN SELECT extract(quarter FROM ordered_at) AS quarter, count(*), sum(amount) FROM orders GROUP BY 1 ORDER BY 1"
    say "a co-located join with a reference table, joined and aggregated on the workers"
    psql_on "$coordinator" -c "SELECT k.name, count(*), sum(o.amount) FROM orders o JOIN customers c USING (customer_id) JOIN countries k ON k.code = c.country GROUP BY 1 ORDER BY 1" \
        -c "EXPLAIN SELECT k.name, count(*), sum(o.amount) FROM orders o JOIN customers c USING (customer_id) JOIN countries k ON k.code = c.country GROUP BY 1 ORDER BY 1"
fi

cat <<EOF_TEXT

pgdist demo cluster is running (data and logs in $DIR).
  connect:  psql -h 127.0.0.1 -p $coordinator -U postgres
  stop:     bash scripts/demo.sh stop
EOF_TEXT
