//! Distributed writes and transactions on a real cluster: every DML kind checked against a plain
//! PostgreSQL given the same statements, COPY of a million rows, transaction blocks with
//! savepoints, a node failing at PREPARE, crashes of the coordinator or a worker between
//! PREPARE and COMMIT PREPARED resolved by `pgdist.recover_prepared_transactions()` and by the
//! maintenance daemon, a distributed deadlock, and a bank workload while a worker keeps crashing.

use std::time::{Duration, Instant};

use pgdist_pg_test::compare::{compare, is_ordered, query_text, run_on_both, Comparison};
use pgdist_pg_test::errors::sqlstate;
use pgdist_pg_test::{harness, tests, Cluster};
use postgres::{Client, SimpleQueryMessage};

fn main() {
    harness::run(
        || {
            let cluster = Cluster::start(2);
            let mut coordinator = cluster.coordinator_client();
            let mut reference = cluster.reference.connect();
            run_on_both(&mut coordinator, &mut reference, SCHEMA);
            coordinator.batch_execute(DISTRIBUTE).unwrap();
            // The crash tests call recovery themselves; the daemon's own test turns it back on.
            set_recovery_interval(&cluster, "-1");
            cluster
        },
        tests![
            inserts_match_plain_postgres,
            multi_row_inserts_return_rows_in_the_order_given,
            updates_and_deletes_match_plain_postgres,
            updates_and_deletes_reading_other_tables_match_plain_postgres,
            updates_and_deletes_broadcast_tables_that_are_not_co_located,
            updates_and_deletes_read_tables_of_the_coordinator,
            large_tables_tied_to_the_distribution_column_are_repartitioned_into_writes,
            writes_with_parameters_run_as_statements_prepared_on_the_workers,
            now_and_other_stable_values_are_computed_once_per_statement,
            writes_to_reference_and_range_tables_reach_every_shard,
            unsupported_writes_fail_with_0a000_and_change_nothing,
            transaction_blocks_read_their_writes_and_roll_back_everywhere,
            statements_that_read_a_node_twice_work_after_the_transaction_wrote_there,
            savepoints_roll_back_on_the_workers_too,
            repeatable_read_and_serializable_keep_one_snapshot_per_node,
            a_failure_at_prepare_leaves_nothing_visible,
            copy_of_a_million_rows_is_exact,
            copy_formats_options_and_bad_input_match_plain_postgres,
            insert_select_between_colocated_tables_runs_on_the_workers,
            writes_inside_with_match_plain_postgres,
            merge_matches_plain_postgres,
            coordinator_crash_after_commit_decision_is_committed_by_recovery,
            coordinator_crash_before_commit_decision_is_rolled_back_by_recovery,
            worker_crash_after_prepare_is_committed_once_it_is_back,
            the_maintenance_daemon_recovers_without_being_asked,
            a_deadlock_across_two_nodes_cancels_exactly_one_transaction,
            select_for_update_locks_rows_on_the_workers_until_commit,
            row_locks_in_joins_lock_the_rows_postgres_locks,
            row_level_security_applies_to_writes,
            foreign_keys_are_enforced_as_plain_postgres_enforces_them,
            triggers_fire_on_the_coordinator_as_plain_postgres_fires_them,
            concurrent_writes_of_the_same_rows_wait_instead_of_deadlocking,
            bank_transfers_stay_exact_while_a_worker_keeps_crashing,
        ],
    )
}

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, name text, qty int DEFAULT 1,
                    price numeric(10,2), seen timestamptz DEFAULT '2024-01-01 00:00:00+00',
                    tags text[], serial bigserial, doubled int GENERATED ALWAYS AS (qty * 2) STORED,
                    CONSTRAINT items_grp_name UNIQUE (id, name));
CREATE TABLE notes (item_id int, line int, body text);
CREATE TABLE colors (code text PRIMARY KEY, label text);
CREATE TABLE days (day date NOT NULL, n int);
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE big (id bigint, payload text);
CREATE TABLE src (id int, grp int, amount numeric, label text);
CREATE TABLE dst (id int, total numeric, n bigint, label text, tag text DEFAULT 'd');
INSERT INTO src SELECT i % 37, i % 5, i * 1.5, 'l' || (i % 11) FROM generate_series(1, 500) i;
CREATE TABLE copies (id int PRIMARY KEY, label text, amount numeric(10,2), at timestamptz,
                     tags text[], note text DEFAULT 'none', serial bigserial);
CREATE TABLE bank (id int PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE transfers (id bigint PRIMARY KEY, source int NOT NULL, target int NOT NULL, amount bigint NOT NULL);
CREATE TABLE stock (id int PRIMARY KEY, qty int, grp int);
CREATE TABLE stock_moves (id int NOT NULL, delta int);
CREATE TABLE stock_groups (grp int PRIMARY KEY, name text);
INSERT INTO stock SELECT i, i * 3, i % 5 FROM generate_series(1, 100) i;
INSERT INTO stock_moves SELECT i, (i * 37) % 300 FROM generate_series(1, 100) i;
INSERT INTO stock_groups SELECT i, 'g' || i FROM generate_series(0, 4) i;
CREATE TABLE stock_staging (id int, qty int, note text);
INSERT INTO stock_staging SELECT i, i * 10,
  CASE i % 10 WHEN 0 THEN 'drop' WHEN 1 THEN 'zero' ELSE 'keep' END FROM generate_series(1, 60) i;
INSERT INTO colors VALUES ('r', 'red'), ('g', 'green');
CREATE TABLE orders (id int PRIMARY KEY, customer int NOT NULL, amount int, status text);
CREATE TABLE orders_archive (id int, customer int, amount int, status text);
CREATE TABLE order_events (order_id int, what text);
INSERT INTO orders SELECT i, i % 13, (i * 7) % 100, CASE WHEN i % 4 = 0 THEN 'done' ELSE 'open' END
  FROM generate_series(1, 200) i;
";

const DISTRIBUTE: &str = "
SELECT pgdist.create_distributed_table('items', 'id', shard_count => 6);
SELECT pgdist.create_distributed_table('notes', 'item_id', shard_count => 4, colocate_with => 'none');
SELECT pgdist.create_reference_table('colors');
SELECT pgdist.create_distributed_table('days', 'day', 'range', split_points => ARRAY['2024-03-01', '2024-06-01']);
SELECT pgdist.create_distributed_table('accounts', 'id', shard_count => 4);
SELECT pgdist.create_distributed_table('big', 'id', shard_count => 8);
SELECT pgdist.create_distributed_table('copies', 'id', shard_count => 4);
SELECT pgdist.create_distributed_table('src', 'id', shard_count => 5);
SELECT pgdist.create_distributed_table('dst', 'id', colocate_with => 'src');
SELECT pgdist.create_distributed_table('bank', 'id', shard_count => 4);
SELECT pgdist.create_distributed_table('transfers', 'id', shard_count => 4, colocate_with => 'none');
SELECT pgdist.create_distributed_table('stock', 'id', shard_count => 4, colocate_with => 'none');
SELECT pgdist.create_distributed_table('stock_moves', 'id', colocate_with => 'stock');
SELECT pgdist.create_reference_table('stock_groups');
SELECT pgdist.create_distributed_table('orders', 'id', shard_count => 4, colocate_with => 'none');
SELECT pgdist.create_distributed_table('orders_archive', 'customer', shard_count => 3, colocate_with => 'none');
";

/// Rows (as text) and the row counts of a statement's commands.
type Outcome = Result<(Vec<Vec<Option<String>>>, Vec<u64>), String>;

fn outcome(client: &mut Client, sql: &str) -> Outcome {
    let messages = client.simple_query(sql).map_err(|err| sqlstate(&err))?;
    let mut rows = Vec::new();
    let mut counts = Vec::new();
    for message in messages {
        match message {
            SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            SimpleQueryMessage::CommandComplete(n) => counts.push(n),
            _ => {}
        }
    }
    if !is_ordered(sql) {
        rows.sort();
    }
    Ok((rows, counts))
}

/// Runs each statement on both servers; returned rows, counts and errors must agree, and so
/// must the whole table afterwards.
fn same_writes(cluster: &Cluster, table_query: &str, statements: &[&str]) {
    same_writes_to(cluster, &[table_query], statements);
}

/// As [`same_writes`], comparing every table of `table_queries` after each statement.
fn same_writes_to(cluster: &Cluster, table_queries: &[&str], statements: &[&str]) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    for sql in statements {
        let got = outcome(&mut coordinator, sql);
        let want = outcome(&mut reference, sql);
        assert_eq!(got, want, "different outcomes for\n  {sql}");
        for table_query in table_queries {
            let (got, want) = match (
                outcome(&mut coordinator, table_query),
                outcome(&mut reference, table_query),
            ) {
                (Ok((got, _)), Ok((want, _))) => (got, want),
                // Both in a failed transaction block, say.
                (Err(got), Err(want)) if got == want => continue,
                _ => panic!("{table_query} failed after\n  {sql}"),
            };
            if got == want {
                continue;
            }
            let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).collect();
            let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).collect();
            assert!(
                missing.is_empty() && extra.is_empty() && got.len() == want.len(),
                "after\n  {sql}\n{table_query} differs: missing {missing:?}, extra {extra:?}"
            );
        }
    }
}

fn inserts_match_plain_postgres(cluster: &Cluster) {
    same_writes(
        cluster,
        "SELECT * FROM items ORDER BY id",
        &[
            "INSERT INTO items (id, grp, name) VALUES (1, 1, 'one')",
            "INSERT INTO items (id, grp, name, qty, price, tags) VALUES (2, 1, 'two', 5, 9.99, '{a,b}'), (3, 2, NULL, NULL, -1, '{}'), (4, 2, 'it''s \\ tab\t', 0, 0, NULL)",
            "INSERT INTO items (id, grp, name) VALUES (5, 3, 'five') RETURNING id, serial, doubled, qty * 10 AS ten, upper(name)",
            "INSERT INTO items (id, grp, name) SELECT i, i % 7, 'gen ' || i FROM generate_series(10, 400) i",
            "INSERT INTO items (id, grp, name) SELECT i, i % 7, 'gen ' || i FROM generate_series(401, 420) i RETURNING *",
            "INSERT INTO items (id, grp) VALUES (1, 9)",
            "INSERT INTO items (id, grp, name) VALUES (1, 9, 'dup') ON CONFLICT DO NOTHING",
            "INSERT INTO items (id, grp, name) VALUES (1, 9, 'dup'), (6, 6, 'six') ON CONFLICT (id) DO NOTHING RETURNING id",
            "INSERT INTO items (id, grp, name, qty) VALUES (2, 9, 'upd', 3) ON CONFLICT (id) DO UPDATE SET qty = items.qty + excluded.qty, name = excluded.name || '!' RETURNING *",
            "INSERT INTO items (id, grp, name, qty) VALUES (3, 9, 'skip', 3), (4, 9, 'hit', 4) ON CONFLICT (id) DO UPDATE SET qty = excluded.qty WHERE items.grp = 2 AND excluded.qty > 3",
            "INSERT INTO items (id, grp, name) VALUES (5, 1, 'five') ON CONFLICT ON CONSTRAINT items_grp_name DO UPDATE SET grp = 50",
            "INSERT INTO items (grp, name) VALUES (1, 'no key')",
            "INSERT INTO notes SELECT id, g, name FROM items, generate_series(1, 3) g WHERE id < 30",
            "INSERT INTO items (id, grp, name) SELECT item_id + 1000, line, body FROM notes WHERE line = 2 ORDER BY item_id",
        ],
    );
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    compare(
        &mut coordinator,
        &mut reference,
        "SELECT * FROM notes ORDER BY item_id, line",
    );
    // A worker's error names the table and its constraint as the coordinator knows them, not
    // the shard's ("items_pkey", not "items_pkey_102008").
    let duplicate = "INSERT INTO items (id, grp) VALUES (1, 9)";
    let got = coordinator.batch_execute(duplicate).unwrap_err();
    let want = reference.batch_execute(duplicate).unwrap_err();
    let text = |err: &postgres::Error| err.as_db_error().map(|e| e.message().to_string());
    assert_eq!(text(&got), text(&want));
}

/// A multi-row INSERT … RETURNING returns its rows in the order of its VALUES (or of its
/// SELECT), as PostgreSQL does: applications pair the keys a sequence generated with their rows
/// by position (Django's `bulk_create`, for one), although the rows go to many shards.
fn multi_row_inserts_return_rows_in_the_order_given(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE tickets (id bigserial PRIMARY KEY, label text, made timestamptz DEFAULT '2024-01-01')",
    );
    coordinator
        .batch_execute("SELECT pgdist.create_distributed_table('tickets', 'id', shard_count => 8)")
        .unwrap();
    let labels: Vec<String> = (1..=40).map(|i| format!("('t{i}')")).collect();
    let values = format!(
        "INSERT INTO tickets (label) VALUES {} RETURNING id, label",
        labels.join(", ")
    );
    for sql in [
        values.as_str(),
        "INSERT INTO tickets (label) SELECT 'g' || g FROM generate_series(1, 3000) g RETURNING *",
        "INSERT INTO tickets (id, label) VALUES (9001, 'z'), (7, 'up'), (9000, 'y'), (3, 'up') \
         ON CONFLICT (id) DO UPDATE SET label = excluded.label || tickets.id RETURNING id, label",
        "WITH made AS (INSERT INTO tickets (label) VALUES ('w1'), ('w2'), ('w3'), ('w4'), ('w5') RETURNING id) \
         SELECT id FROM made",
    ] {
        let got = query_text(&mut coordinator, sql).unwrap();
        let want = query_text(&mut reference, sql).unwrap();
        assert!(got == want, "rows in another order for\n  {sql}\ncluster:   {got:?}\nreference: {want:?}");
    }
    run_on_both(&mut coordinator, &mut reference, "DROP TABLE tickets");
}

fn updates_and_deletes_match_plain_postgres(cluster: &Cluster) {
    same_writes(
        cluster,
        "SELECT * FROM items ORDER BY id",
        &[
            "UPDATE items SET name = 'renamed' WHERE id = 10",
            "UPDATE items SET qty = qty + 1, price = coalesce(price, 0) + 0.5 WHERE grp = 3",
            "UPDATE items SET tags = array_append(tags, 'x') WHERE id IN (2, 3, 4, 11, 12) RETURNING id, tags, doubled",
            "UPDATE items SET qty = 7 WHERE id = 99999",
            "UPDATE items SET name = lower(name) || id::text WHERE name LIKE 'gen 1%' AND id > 100",
            "UPDATE items SET qty = qty * 2 + id, seen = '2024-02-02 12:00+02' WHERE id BETWEEN 20 AND 40 RETURNING *",
            "UPDATE items SET id = id WHERE id = 1",
            "DELETE FROM items WHERE id = 11",
            "DELETE FROM items WHERE grp = 4 RETURNING id, name",
            "DELETE FROM items WHERE id = ANY (ARRAY[12, 13, 14, 99999])",
            "DELETE FROM notes WHERE body IS NULL OR line > 2",
            "UPDATE items SET qty = 1 / (qty - qty) WHERE id = 20",
            // Stable expressions without columns are computed once on the coordinator.
            "UPDATE items SET name = to_char(timestamp '2024-03-04 05:06', 'YYYY-MM-DD') || '/' || id WHERE id < 15",
            "UPDATE items SET seen = '2024-05-06 07:08'::timestamp AT TIME ZONE 'Europe/Paris' WHERE id BETWEEN 15 AND 25 RETURNING id, seen",
            "DELETE FROM items WHERE seen > timestamptz '2024-05-01' + interval '1 day' * length(current_schema()) AND id > 24",
            "INSERT INTO items (id, grp, name) VALUES (2, 9, 'x') ON CONFLICT (id) DO UPDATE SET name = to_char(date '2024-12-31', 'Mon') RETURNING id, name",
        ],
    );
    // Prepared statements: the parameter picks the shard at execution, also for generic plans.
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    let mut counts = Vec::new();
    for client in [&mut coordinator, &mut reference] {
        let update = client
            .prepare("UPDATE items SET qty = qty + $2 WHERE id = $1")
            .unwrap();
        let delete = client.prepare("DELETE FROM items WHERE id = $1").unwrap();
        let mut changed = Vec::new();
        for id in 20..32 {
            changed.push(client.execute(&update, &[&id, &3]).unwrap());
        }
        for id in 30..36 {
            changed.push(client.execute(&delete, &[&id]).unwrap());
        }
        counts.push(changed);
    }
    assert_eq!(counts[0], counts[1]);
    compare(
        &mut coordinator,
        &mut reference,
        "SELECT * FROM items ORDER BY id",
    );
    same_writes(
        cluster,
        "SELECT * FROM notes ORDER BY 1, 2",
        &["TRUNCATE notes"],
    );
}

fn now_and_other_stable_values_are_computed_once_per_statement(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut tx = coordinator.transaction().unwrap();
    tx.execute(
        "INSERT INTO items (id, grp) SELECT i, 70 + i % 2 FROM generate_series(5000, 5030) i",
        &[],
    )
    .unwrap();
    let changed = tx
        .execute("UPDATE items SET seen = now() WHERE grp IN (70, 71)", &[])
        .unwrap();
    assert_eq!(changed, 31);
    // now() is the transaction's start time: every changed row holds exactly that value.
    let same: i64 = tx
        .query_one("SELECT count(*) FROM items WHERE seen = now()", &[])
        .unwrap()
        .get(0);
    assert_eq!(same as u64, changed);
    // A prepared statement with a generic plan computes the value again at each execution.
    let bump = tx
        .prepare("UPDATE items SET seen = now() + make_interval(days => $2) WHERE id = $1 RETURNING seen - now()")
        .unwrap();
    let ids: Vec<i32> = tx
        .query(
            "SELECT id FROM items WHERE grp IN (70, 71) ORDER BY id LIMIT 8",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (days, id) in ids.iter().enumerate() {
        let rows = tx.query(&bump, &[id, &(days as i32)]).unwrap();
        assert_eq!(rows.len(), 1);
        let shown: String = tx
            .query_one("SELECT make_interval(days => $1)::text", &[&(days as i32)])
            .unwrap()
            .get(0);
        let got: String = tx
            .query_one(
                "SELECT (seen - now())::text FROM items WHERE id = $1",
                &[id],
            )
            .unwrap()
            .get(0);
        assert_eq!(got, shown, "item {id}");
    }
    let gone = tx
        .execute(
            "DELETE FROM items WHERE seen < now() + interval '3 days' AND grp = 70",
            &[],
        )
        .unwrap();
    let left: i64 = tx
        .query_one(
            "SELECT count(*) FROM items WHERE seen < now() + interval '3 days' AND grp = 70",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(gone > 0 && left == 0, "deleted {gone}, left {left}");
    tx.rollback().unwrap();
}

/// The name of the reference table `colors`' shard on a worker.
fn colors_shard(worker: &mut Client) -> String {
    worker
        .query_one(
            "SELECT relname::text FROM pg_class WHERE relname LIKE 'colors\\_%' AND relkind = 'r'",
            &[],
        )
        .unwrap()
        .get(0)
}

fn writes_to_reference_and_range_tables_reach_every_shard(cluster: &Cluster) {
    same_writes(
        cluster,
        "SELECT * FROM colors ORDER BY code",
        &[
            "INSERT INTO colors VALUES ('b', 'blue'), ('k', NULL)",
            "UPDATE colors SET label = upper(label) WHERE code <> 'r' RETURNING *",
            "DELETE FROM colors WHERE label IS NULL",
        ],
    );
    // Every worker holds the same copy.
    for worker in &cluster.workers {
        let mut client = worker.connect();
        let shard = colors_shard(&mut client);
        let rows = client
            .query(
                &format!("SELECT code, label FROM {shard} ORDER BY code"),
                &[],
            )
            .unwrap();
        let rows: Vec<(String, Option<String>)> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(
            rows,
            vec![
                ("b".into(), Some("BLUE".into())),
                ("g".into(), Some("GREEN".into())),
                ("r".into(), Some("red".into()))
            ]
        );
    }
    same_writes(
        cluster,
        "SELECT * FROM days ORDER BY day, n",
        &[
            "INSERT INTO days SELECT date '2024-01-01' + i, i FROM generate_series(0, 300, 7) i",
            "UPDATE days SET n = -n WHERE day >= '2024-05-01' AND day < '2024-07-01'",
            "DELETE FROM days WHERE day < '2024-02-01' RETURNING *",
        ],
    );
}

fn updates_and_deletes_reading_other_tables_match_plain_postgres(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    // A co-located join runs whole on every shard, the joined table's shard alongside.
    let plan = explain(
        &mut coordinator,
        "UPDATE stock SET qty = m.delta FROM stock_moves m WHERE m.id = stock.id",
    );
    assert!(
        plan.contains("Fragments: 4 on 2 node(s)")
            && plan.contains("FROM \"public\".\"stock_moves_"),
        "{plan}"
    );
    let plan = explain(
        &mut coordinator,
        "UPDATE stock SET qty = m.delta FROM stock_moves m WHERE m.id = stock.id AND stock.id = 7",
    );
    assert!(plan.contains("Fragments: 1 on 1 node(s)"), "{plan}");
    same_writes(
        cluster,
        "SELECT * FROM stock ORDER BY id",
        &[
            // FROM / USING with co-located and reference tables.
            "UPDATE stock SET qty = qty + m.delta FROM stock_moves m WHERE m.id = stock.id",
            "UPDATE stock s SET qty = 0 FROM stock_groups g WHERE g.grp = s.grp AND g.name = 'g1' RETURNING s.id, s.qty",
            "DELETE FROM stock USING stock_moves m WHERE m.id = stock.id AND m.delta > 280 RETURNING stock.*",
            "UPDATE stock SET qty = 5 FROM stock x WHERE x.id = stock.id AND x.grp = 2 AND stock.id < 50",
            "UPDATE stock SET grp = g.grp FROM stock_groups g WHERE g.name = 'g3' AND stock.id = 60",
            "UPDATE stock SET qty = m.delta FROM stock_moves m JOIN stock_groups g ON g.grp = m.delta % 5 WHERE m.id = stock.id AND stock.id = 70 AND g.name <> 'g0'",
            // Subqueries tied to the distribution column run on the shards too.
            "DELETE FROM stock WHERE id IN (SELECT id FROM stock_moves WHERE delta < 20)",
            "UPDATE stock SET qty = qty + 1 WHERE EXISTS (SELECT 1 FROM stock_moves m WHERE m.id = stock.id AND m.delta % 3 = 0)",
            "UPDATE stock SET qty = (SELECT sum(delta) FROM stock_moves m WHERE m.id = stock.id) WHERE id < 40 RETURNING id, qty",
            // Values the coordinator computes inside them (now(), settings), once per statement.
            "UPDATE stock SET qty = qty + 2 WHERE EXISTS (SELECT 1 FROM stock_moves m WHERE m.id = stock.id AND m.delta::text::int < extract(year FROM now()) - 1800 AND current_setting('search_path') <> '')",
            "DELETE FROM stock WHERE id IN (SELECT m.id FROM stock_moves m WHERE m.id = stock.id AND m.delta > 290 AND now() > '2000-01-01') RETURNING id",
            "UPDATE stock SET qty = s.total FROM (SELECT id, sum(delta) AS total FROM stock_moves GROUP BY id) s WHERE s.id = stock.id AND stock.grp = 1",
            "WITH moved AS (SELECT id FROM stock_moves WHERE delta > 250) DELETE FROM stock WHERE id IN (SELECT id FROM moved)",
            "DELETE FROM stock WHERE grp NOT IN (SELECT grp FROM stock_groups WHERE name > 'g3')",
            // Subqueries with one value for the statement are computed first.
            "UPDATE stock SET qty = (SELECT max(delta) FROM stock_moves) WHERE id < 10",
            "DELETE FROM stock WHERE qty > (SELECT avg(qty) + 50 FROM stock) RETURNING id",
            "UPDATE stock SET qty = -1 WHERE id IN (SELECT id FROM stock_moves ORDER BY delta DESC, id LIMIT 3) RETURNING id",
            "UPDATE stock SET qty = qty * 2 WHERE grp = ANY (ARRAY(SELECT grp FROM stock WHERE qty < 0)) OR NOT EXISTS (SELECT 1 FROM stock_moves WHERE delta > 1000)",
            "DELETE FROM stock WHERE id IN (SELECT item_id FROM notes) OR id > 95",
            "UPDATE stock SET qty = (SELECT count(*) FROM stock_moves m WHERE m.id = stock.id) + (SELECT count(*) FROM stock_groups) WHERE id BETWEEN 40 AND 45",
            // Several columns from one subquery.
            "UPDATE stock SET (qty, grp) = (SELECT m.delta, m.delta % 5 FROM stock_moves m WHERE m.id = stock.id) WHERE id BETWEEN 20 AND 30 RETURNING *",
            "UPDATE stock SET (grp, qty) = (SELECT g.grp, length(g.name) FROM stock_groups g WHERE g.grp = (stock.grp + 1) % 5) WHERE id > 90 RETURNING id, grp, qty",
            "UPDATE stock SET (qty) = (SELECT count(*) FROM stock_moves), grp = 1 WHERE id = 5",
            "UPDATE stock SET (qty, grp) = (SELECT max(m.delta), count(*) FROM stock_moves m WHERE m.id = stock.id) WHERE id BETWEEN 31 AND 36 RETURNING *",
            // RETURNING may use the other tables' columns.
            "UPDATE stock SET qty = qty + m.delta FROM stock_moves m WHERE m.id = stock.id AND stock.id < 8 RETURNING stock.id, m.delta, stock.qty - m.delta AS before",
            "DELETE FROM stock USING stock_groups g WHERE g.grp = stock.grp AND g.name = 'g4' AND stock.id > 88 RETURNING *",
            "UPDATE stock SET qty = qty + 1 FROM stock_moves m WHERE m.delta = stock.qty AND stock.id < 60 RETURNING stock.id, m.id AS mover, m.delta::text || '!'",
            "UPDATE stock s SET qty = 1 FROM (SELECT id, count(*) AS n FROM stock_moves GROUP BY id) c WHERE c.id = s.id AND s.id BETWEEN 80 AND 85 RETURNING s.id, c.n",
        ],
    );
    let plan: Vec<String> = coordinator
        .query(
            "EXPLAIN (VERBOSE, COSTS OFF) UPDATE stock SET qty = 1 FROM stock_moves m \
             WHERE m.id = stock.id RETURNING stock.id, m.delta",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        plan.iter()
            .any(|line| line.trim() == "Output: stock.id, m.delta"),
        "{plan:?}"
    );
    // Parameters in a pushed-down join, generic plans included.
    let mut reference = cluster.reference.connect();
    let mut results = Vec::new();
    for client in [&mut coordinator, &mut reference] {
        let update = client
            .prepare("UPDATE stock SET qty = m.delta + $2 FROM stock_moves m WHERE m.id = stock.id AND stock.id = $1")
            .unwrap();
        let changed: Vec<u64> = (50..60)
            .map(|id| client.execute(&update, &[&id, &1000]).unwrap())
            .collect();
        results.push(changed);
    }
    assert_eq!(results[0], results[1]);
    compare(
        &mut coordinator,
        &mut reference,
        "SELECT * FROM stock ORDER BY id",
    );
}

fn updates_and_deletes_broadcast_tables_that_are_not_co_located(cluster: &Cluster) {
    // notes (4 shards, its own group) is not co-located with items (6) or stock (4, another
    // group): its rows are read first and go with every shard's statement.
    same_writes(
        cluster,
        "SELECT * FROM notes ORDER BY 1, 2",
        &["INSERT INTO notes SELECT i, i % 4, CASE WHEN i % 3 <> 0 THEN 'note ' || i END FROM generate_series(1, 99, 2) i"],
    );
    let mut coordinator = cluster.coordinator_client();
    // Every shard's statement reads the table as arrays: all of its rows, or (tied to the
    // distribution column) only the rows of that shard.
    let mut assert_travels = |sql: &str, how: &str| {
        let plan = explain(&mut coordinator, sql);
        assert!(
            plan.contains("Fragments: 4 on 2 node(s)")
                && plan.contains("FROM unnest(")
                && plan.contains(how),
            "{plan}"
        );
    };
    assert_travels(
        "UPDATE stock SET qty = n.line FROM notes n WHERE n.item_id = stock.id",
        "notes: read first; each shard's statement gets the rows whose key hashes to it",
    );
    assert_travels(
        "UPDATE stock s SET grp = n.line % 7 FROM notes n WHERE n.line = s.qty",
        "notes: read first; every shard's statement gets all of them",
    );
    same_writes(
        cluster,
        "SELECT * FROM stock ORDER BY id",
        &[
            "UPDATE stock SET qty = n.line FROM notes n WHERE n.item_id = stock.id",
            "UPDATE stock s SET grp = n.line % 7 FROM notes n WHERE n.line = s.qty AND n.body IS NOT NULL RETURNING s.*",
            "DELETE FROM stock WHERE EXISTS (SELECT 1 FROM notes n WHERE n.item_id = stock.id AND n.line > 2)",
            "DELETE FROM stock s USING notes n WHERE n.line = s.id % 5 AND s.grp = 3 RETURNING s.id",
            "UPDATE stock SET qty = (SELECT count(*) FROM notes n WHERE n.line <= stock.grp) WHERE id > 90",
            "UPDATE stock SET qty = -qty WHERE NOT EXISTS (SELECT FROM notes n WHERE n.item_id = stock.id)",
        ],
    );
    same_writes(
        cluster,
        "SELECT * FROM items ORDER BY id",
        &[
            "UPDATE items SET qty = n.line FROM notes n WHERE n.item_id = items.id",
            "DELETE FROM items WHERE EXISTS (SELECT 1 FROM notes WHERE notes.item_id = items.id) AND grp = 1",
            "UPDATE items SET name = s.qty::text FROM stock s WHERE s.id = items.id AND s.grp = 2",
        ],
    );
    // A co-located table that is not joined on the distribution column is broadcast too.
    assert_travels(
        "UPDATE stock SET qty = m.delta FROM stock_moves m WHERE m.id = stock.id + 1",
        "stock_moves: read first; every shard's statement gets all of them",
    );
    same_writes(
        cluster,
        "SELECT * FROM stock ORDER BY id",
        &[
            "UPDATE stock SET qty = m.delta FROM stock_moves m WHERE m.id = stock.id + 1",
            "UPDATE stock SET qty = (SELECT count(*) FROM stock_moves m WHERE m.delta = stock.qty) WHERE id % 3 = 0",
            "DELETE FROM stock s USING stock_moves m WHERE m.delta = s.qty AND s.grp = 2 RETURNING s.id",
            "UPDATE stock SET qty = x.qty + 1 FROM stock x WHERE x.id = stock.id + 1 AND stock.id < 30 RETURNING stock.id, stock.qty",
            "UPDATE stock SET grp = m.delta % 4 FROM stock_moves m, stock_moves k WHERE k.id = stock.id AND m.id = k.delta AND stock.id > 80",
        ],
    );
    same_writes(cluster, "SELECT count(*) FROM notes", &["TRUNCATE notes"]);
}

/// A table too large to send whole with every shard's statement still works when it is tied
/// to the target's distribution column: each shard's statement gets only the rows whose key
/// hashes to it.
fn updates_and_deletes_read_tables_of_the_coordinator(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let plan = explain(
        &mut coordinator,
        "UPDATE stock SET qty = s.qty FROM stock_staging s WHERE s.id = stock.id",
    );
    assert!(
        plan.contains("Broadcast: stock_staging: read first; each shard's statement gets the rows whose key hashes to it"),
        "{plan}"
    );
    same_writes(
        cluster,
        "SELECT * FROM stock ORDER BY id",
        &[
            "UPDATE stock SET qty = s.qty FROM stock_staging s WHERE s.id = stock.id RETURNING stock.id, s.note",
            "DELETE FROM stock WHERE id IN (SELECT id FROM stock_staging WHERE note = 'drop') RETURNING *",
            "UPDATE stock SET qty = (SELECT max(qty) FROM stock_staging st WHERE st.id < stock.id) WHERE id BETWEEN 10 AND 15",
            "UPDATE stock SET qty = 0 FROM ONLY stock_staging s WHERE s.id = stock.id AND s.note = 'zero'",
            // A temporary table, and a row the transaction wrote a moment before.
            "CREATE TEMP TABLE fresh AS SELECT i AS id, -i AS qty FROM generate_series(20, 30) i; \
             UPDATE stock SET qty = fresh.qty FROM fresh WHERE fresh.id = stock.id RETURNING stock.*; DROP TABLE fresh",
            "BEGIN; INSERT INTO stock_staging VALUES (9, 999, 'late'); \
             UPDATE stock SET qty = s.qty FROM stock_staging s WHERE s.id = stock.id AND s.note = 'late' RETURNING stock.id; ROLLBACK",
        ],
    );
}

fn large_tables_tied_to_the_distribution_column_are_repartitioned_into_writes(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    for client in [&mut coordinator, &mut reference] {
        client
            .batch_execute(
                "CREATE TABLE refills (id int PRIMARY KEY, stock_ref int, amount int);
                 INSERT INTO refills SELECT i, CASE WHEN i % 13 = 0 THEN NULL ELSE i % 120 END, i % 7
                 FROM generate_series(1, 150000) i;",
            )
            .unwrap();
    }
    coordinator
        .batch_execute("SELECT pgdist.create_distributed_table('refills', 'id', shard_count => 3, colocate_with => 'none')")
        .unwrap();
    let tied = "UPDATE stock SET qty = s.total FROM (SELECT stock_ref, sum(amount) AS total FROM refills GROUP BY stock_ref) s WHERE s.stock_ref = stock.id";
    let plan = explain(&mut coordinator, tied);
    assert!(
        plan.contains(
            "refills: read first; each shard's statement gets the rows whose key hashes to it"
        ),
        "{plan}"
    );
    same_writes(
        cluster,
        "SELECT * FROM stock ORDER BY id",
        &[
            tied,
            "UPDATE stock SET qty = (SELECT count(*) FROM refills r WHERE r.stock_ref = stock.id AND r.amount > 2) WHERE grp = 1",
            "DELETE FROM stock WHERE id IN (SELECT stock_ref FROM refills WHERE amount = 6 AND id < 2000) RETURNING id",
            "UPDATE stock SET grp = 9 WHERE NOT EXISTS (SELECT FROM refills r WHERE r.stock_ref = stock.id AND r.id < 500)",
        ],
    );
    // Not tied to the distribution column: the whole table would go to every shard.
    let before = outcome(&mut coordinator, "SELECT * FROM stock ORDER BY id");
    let refused = outcome(
        &mut coordinator,
        "UPDATE stock SET qty = 0 FROM refills r WHERE r.amount = stock.qty",
    );
    assert_eq!(refused, Err("0A000".to_string()));
    assert_eq!(
        outcome(&mut coordinator, "SELECT * FROM stock ORDER BY id"),
        before
    );
    for client in [&mut coordinator, &mut reference] {
        client.batch_execute("DROP TABLE refills").unwrap();
    }
}

/// UPDATE and DELETE with parameters go to the workers as statements prepared once per
/// connection: executions that fail there, or whose transaction rolls back, leave the next
/// ones working, and RETURNING comes back as before.
fn writes_with_parameters_run_as_statements_prepared_on_the_workers(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    let setup = "SET plan_cache_mode = force_generic_plan;
        PREPARE up(int, int) AS UPDATE stock SET qty = qty + $2 WHERE id = $1 RETURNING id, qty;
        PREPARE del(int) AS DELETE FROM stock WHERE id = $1 AND qty < 0 RETURNING *;
        PREPARE halve(int, int) AS UPDATE stock SET qty = qty / $2 WHERE grp = $1;
        PREPARE bump_some(int[]) AS UPDATE stock SET qty = qty + 1 WHERE id = ANY($1) RETURNING id;
        PREPARE drop_some(int[]) AS DELETE FROM stock WHERE id = ANY($1) AND qty > 250;";
    for client in [&mut coordinator, &mut reference] {
        client.batch_execute(setup).unwrap();
    }
    for sql in [
        "EXECUTE up(5, 10)",
        "EXECUTE up(5, 10)",
        "EXECUTE up(6, -100000)",
        "EXECUTE del(6)",
        "EXECUTE halve(1, 0)",
        "EXECUTE halve(1, 2)",
        "BEGIN; EXECUTE up(7, 1); ROLLBACK",
        "EXECUTE up(7, 1)",
        "BEGIN; EXECUTE up(8, 1); EXECUTE halve(2, 0)",
        "ROLLBACK",
        "EXECUTE halve(2, 3)",
        "EXECUTE up(8, 2)",
        "EXECUTE bump_some('{1,2,3,50,99}')",
        "EXECUTE bump_some('{}')",
        "EXECUTE bump_some(NULL)",
        "EXECUTE bump_some('{4,NULL,4}')",
        "EXECUTE drop_some('{90,91,92,93,94,95,96,97,98,99,100}')",
    ] {
        let got = outcome(&mut coordinator, sql);
        let want = outcome(&mut reference, sql);
        assert_eq!(got, want, "different outcomes for\n  {sql}");
        assert_eq!(
            outcome(&mut coordinator, "SELECT * FROM stock ORDER BY id"),
            outcome(&mut reference, "SELECT * FROM stock ORDER BY id"),
            "after\n  {sql}"
        );
    }
    let plan = explain(&mut coordinator, "EXECUTE up(9, 1)");
    assert!(plan.contains("Fragments: 1 on 1 node(s)"), "{plan}");
    let plan = explain(&mut coordinator, "EXECUTE bump_some('{9,9}')");
    assert!(plan.contains("Fragments: 1 on 1 node(s)"), "{plan}");
    // In an open transaction, the worker connection's last command runs a prepared statement.
    coordinator
        .batch_execute("BEGIN; EXECUTE up(9, 1)")
        .unwrap();
    let executed: i64 = cluster
        .workers
        .iter()
        .map(|worker| {
            worker
                .connect()
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%EXECUTE pgdist_f%'",
                    &[],
                )
                .unwrap()
                .get::<_, i64>(0)
        })
        .sum();
    assert!(executed > 0);
    coordinator.batch_execute("ROLLBACK").unwrap();
    for client in [&mut coordinator, &mut reference] {
        client
            .batch_execute("DEALLOCATE ALL; RESET plan_cache_mode")
            .unwrap();
    }
}

fn explain(client: &mut Client, sql: &str) -> String {
    client
        .query(&format!("EXPLAIN (COSTS OFF) {sql}"), &[])
        .unwrap()
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

fn unsupported_writes_fail_with_0a000_and_change_nothing(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let before = outcome(&mut coordinator, "SELECT * FROM items ORDER BY id");
    for sql in [
        "UPDATE items SET id = id + 1 WHERE id = 2",
        "UPDATE items SET name = random()::text WHERE id = 2",
        "UPDATE items SET name = seen::text WHERE id = 2",
        "UPDATE items SET qty = n.line FROM notes n WHERE n.item_id = items.id RETURNING n",
        "WITH gone AS (DELETE FROM items WHERE id = 2 RETURNING *) SELECT count(*) FROM items",
        "INSERT INTO items (id, grp) VALUES (2, 2) ON CONFLICT (id) DO UPDATE SET id = 3",
    ] {
        let err = coordinator.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
        assert!(
            err.as_db_error().and_then(|d| d.hint()).is_some(),
            "{sql}: no hint"
        );
    }
    // A cursor's current row lives on a worker.
    let err = coordinator
        .batch_execute(
            "BEGIN; DECLARE c CURSOR FOR SELECT * FROM items WHERE id > 3 FOR UPDATE; FETCH c; \
             UPDATE items SET qty = 0 WHERE CURRENT OF c",
        )
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    coordinator.batch_execute("ROLLBACK").unwrap();
    let err = coordinator
        .batch_execute("INSERT INTO items (id, grp) VALUES (NULL, 1)")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23502");
    assert_eq!(
        before,
        outcome(&mut coordinator, "SELECT * FROM items ORDER BY id")
    );
}

fn count(client: &mut Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).unwrap().get(0)
}

/// Prepared transactions left on the workers by this coordinator.
fn prepared_on_workers(cluster: &Cluster) -> i64 {
    cluster
        .workers
        .iter()
        .map(|w| {
            count(
                &mut w.connect(),
                "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'pgdist\\_%'",
            )
        })
        .sum()
}

fn transaction_blocks_read_their_writes_and_roll_back_everywhere(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute("INSERT INTO accounts SELECT i, 100 FROM generate_series(1, 40) i")
        .unwrap();
    // Rolled back: nothing stays on any node.
    client
        .batch_execute(
            "BEGIN; UPDATE accounts SET balance = 0; INSERT INTO accounts VALUES (100, 1), (101, 1);",
        )
        .unwrap();
    assert_eq!(
        count(&mut client, "SELECT sum(balance)::bigint FROM accounts"),
        2
    );
    assert_eq!(
        count(&mut client, "SELECT count(*) FROM accounts WHERE id = 100"),
        1
    );
    client.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        count(&mut client, "SELECT sum(balance)::bigint FROM accounts"),
        4000
    );
    // An error anywhere aborts the whole transaction.
    client
        .batch_execute("BEGIN; UPDATE accounts SET balance = balance - 10 WHERE id = 1;")
        .unwrap();
    assert!(client
        .batch_execute("UPDATE accounts SET balance = balance / 0 WHERE id = 2")
        .is_err());
    client.batch_execute("COMMIT").unwrap();
    assert_eq!(
        count(&mut client, "SELECT balance FROM accounts WHERE id = 1"),
        100
    );
    // Committed across both nodes (two-phase), transfers between every pair of accounts.
    client.batch_execute("BEGIN").unwrap();
    for id in 1..40 {
        client
            .execute(
                "UPDATE accounts SET balance = balance - 1 WHERE id = $1",
                &[&id],
            )
            .unwrap();
        client
            .execute(
                "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                &[&(id + 1)],
            )
            .unwrap();
    }
    assert_eq!(
        count(&mut client, "SELECT balance FROM accounts WHERE id = 40"),
        101
    );
    client.batch_execute("COMMIT").unwrap();
    let mut other = cluster.coordinator_client();
    assert_eq!(
        count(&mut other, "SELECT sum(balance)::bigint FROM accounts"),
        4000
    );
    assert_eq!(
        count(&mut other, "SELECT balance FROM accounts WHERE id = 1"),
        99
    );
    assert_eq!(prepared_on_workers(cluster), 0);
}

/// Once a transaction has written on a node, everything it does there goes through one
/// connection. A statement that needs that connection while a stream of rows still reads from
/// it (a write fed by a scan of the node, a correlated subquery, a nested loop) takes it back:
/// the stream's remaining rows are set aside, in a temporary file past work_mem.
fn statements_that_read_a_node_twice_work_after_the_transaction_wrote_there(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE twice_a (id int PRIMARY KEY, x int, note text);
         CREATE TABLE twice_b (id int PRIMARY KEY, y int);
         INSERT INTO twice_a SELECT i, i % 100, repeat('n', i % 40) FROM generate_series(1, 3000) i;
         INSERT INTO twice_b SELECT i, i % 100 FROM generate_series(1, 1500) i;",
    );
    coordinator
        .batch_execute(
            "SELECT pgdist.create_distributed_table('twice_a', 'id', shard_count => 4);
             SELECT pgdist.create_distributed_table('twice_b', 'id', shard_count => 3, colocate_with => 'none');",
        )
        .unwrap();
    let tables = ["SELECT * FROM twice_a", "SELECT * FROM twice_b"];
    same_writes_to(
        cluster,
        &tables,
        &[
            "BEGIN",
            // Both nodes now carry the transaction.
            "UPDATE twice_a SET x = x + 1 WHERE id % 7 = 0",
            "UPDATE twice_b SET y = y - 1 WHERE id % 5 = 0",
            // Rows read from the nodes are written back to them (through the coordinator).
            "INSERT INTO twice_b SELECT id + 10000, x FROM twice_a",
            "INSERT INTO twice_a SELECT id + 20000, x, note FROM twice_a WHERE id % 3 = 0",
            "SET LOCAL work_mem = '64kB'",
            "INSERT INTO twice_b SELECT id + 30000, length(note) FROM twice_a",
            // A correlated subquery scans twice_b again for every row of twice_a.
            "SELECT count(*), sum(id) FROM twice_a a WHERE id < 200 AND x IN \
               (SELECT y FROM twice_b b WHERE b.id > a.id AND b.id < a.id + 50)",
            "SET LOCAL enable_hashjoin = off",
            "SET LOCAL enable_mergejoin = off",
            "SELECT count(*), sum(a.id - b.id) FROM twice_a a JOIN twice_b b ON a.x = b.y - 1 \
               WHERE a.id < 300 AND b.id < 3000",
            "DELETE FROM twice_b WHERE id IN (SELECT id + 10000 FROM twice_a WHERE x < 10) RETURNING id",
            "COMMIT",
            // A cursor keeps reading what it saw when it was opened, also across later writes
            // and a rolled-back savepoint.
            "BEGIN",
            "UPDATE twice_a SET x = x WHERE id % 2 = 0",
            "DECLARE cur CURSOR FOR SELECT id, x FROM twice_a ORDER BY id",
            "FETCH 3 FROM cur",
            "UPDATE twice_a SET x = -1 WHERE id < 10",
            "FETCH 3 FROM cur",
            "SAVEPOINT s1",
            "UPDATE twice_a SET x = 7 WHERE id = 1",
            "ROLLBACK TO SAVEPOINT s1",
            "FETCH 5 FROM cur",
            "COMMIT",
            "BEGIN",
            "DELETE FROM twice_a WHERE id > 20000",
            "INSERT INTO twice_b SELECT id + 90000, x FROM twice_a WHERE id < 100",
            "ROLLBACK",
        ],
    );
    assert_eq!(prepared_on_workers(cluster), 0);
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DROP TABLE twice_a; DROP TABLE twice_b",
    );
}

/// `BEGIN ISOLATION LEVEL REPEATABLE READ` / `SERIALIZABLE` (and `SET TRANSACTION`) work, and
/// the transaction sees one snapshot per node from its first read there on: a concurrent
/// transaction's committed changes stay out of its later reads, and updating a row that
/// transaction changed fails with 40001, as on one server. The same interleaving runs on the
/// cluster and on plain PostgreSQL.
fn repeatable_read_and_serializable_keep_one_snapshot_per_node(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE iso (id int PRIMARY KEY, v int);
         INSERT INTO iso SELECT i, i FROM generate_series(1, 40) i;",
    );
    coordinator
        .batch_execute("SELECT pgdist.create_distributed_table('iso', 'id', shard_count => 4)")
        .unwrap();
    let steps: &[(bool, &str)] = &[
        (true, "BEGIN ISOLATION LEVEL REPEATABLE READ"),
        (true, "SHOW transaction_isolation"),
        (true, "SELECT count(*), sum(v) FROM iso"),
        (false, "UPDATE iso SET v = v + 100"),
        (false, "INSERT INTO iso VALUES (41, 41), (42, 42)"),
        (true, "SELECT count(*), sum(v) FROM iso"),
        (true, "SELECT v FROM iso WHERE id = 7"),
        (true, "UPDATE iso SET v = 0 WHERE id = 7"),
        (true, "ROLLBACK"),
        (true, "BEGIN"),
        (true, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
        (true, "SELECT count(*), sum(v) FROM iso WHERE id > 10"),
        (
            true,
            "UPDATE iso SET v = v - 1 WHERE id IN (11, 12) RETURNING id, v",
        ),
        (true, "COMMIT"),
        // First read inside a savepoint (no snapshot can be exported there), kept after the
        // savepoint is rolled back.
        (true, "BEGIN ISOLATION LEVEL REPEATABLE READ"),
        (true, "SAVEPOINT s"),
        (true, "SELECT count(*), sum(v) FROM iso"),
        (false, "UPDATE iso SET v = v + 1 WHERE id < 5"),
        (true, "ROLLBACK TO SAVEPOINT s"),
        (true, "SELECT count(*), sum(v) FROM iso"),
        (
            true,
            "SELECT id, v FROM iso WHERE id < 5 ORDER BY id LIMIT 2",
        ),
        (true, "COMMIT"),
        // Read first, then written on every node, then read again: committed with two-phase
        // commit, the writes made in the snapshot of the first read.
        (true, "BEGIN ISOLATION LEVEL REPEATABLE READ"),
        (true, "SELECT count(*), sum(v) FROM iso"),
        (false, "UPDATE iso SET v = v + 1000 WHERE id = 20"),
        (
            true,
            "UPDATE iso SET v = v + 1 WHERE id BETWEEN 1 AND 10 RETURNING id, v",
        ),
        (true, "SELECT count(*), sum(v) FROM iso"),
        (true, "COMMIT"),
    ];
    let mut outcomes = Vec::new();
    for server in [0, 1] {
        let (mut first, mut second) = match server {
            0 => (cluster.coordinator_client(), cluster.coordinator_client()),
            _ => (cluster.reference.connect(), cluster.reference.connect()),
        };
        let seen: Vec<Outcome> = steps
            .iter()
            .map(|(in_first, sql)| match in_first {
                true => outcome(&mut first, sql),
                false => outcome(&mut second, sql),
            })
            .collect();
        outcomes.push((seen, outcome(&mut first, "SELECT * FROM iso ORDER BY id")));
    }
    assert_eq!(outcomes[0], outcomes[1]);
    let (seen, _) = &outcomes[0];
    assert_eq!(
        seen[2].as_ref().map(|r| &r.0),
        seen[5].as_ref().map(|r| &r.0)
    );
    assert_eq!(seen[7], Err("40001".to_string()));
    assert_eq!(
        seen[16].as_ref().map(|r| &r.0),
        seen[19].as_ref().map(|r| &r.0)
    );
    run_on_both(&mut coordinator, &mut reference, "DROP TABLE iso");
}

fn savepoints_roll_back_on_the_workers_too(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO accounts VALUES (200, 5);
             SAVEPOINT a;
             INSERT INTO accounts VALUES (201, 5), (202, 5), (203, 5);
             DELETE FROM accounts WHERE id = 200;
             ROLLBACK TO SAVEPOINT a;
             INSERT INTO accounts VALUES (204, 5);
             SAVEPOINT b;
             UPDATE accounts SET balance = 0 WHERE id >= 200;
             RELEASE SAVEPOINT b;",
        )
        .unwrap();
    // An error inside a savepoint on a node: rolling back to it makes the node usable again.
    client.batch_execute("SAVEPOINT c").unwrap();
    assert!(client
        .batch_execute("INSERT INTO accounts VALUES (204, 1)")
        .is_err());
    client
        .batch_execute("ROLLBACK TO SAVEPOINT c; COMMIT")
        .unwrap();
    let rows: Vec<(i32, i64)> = client
        .query(
            "SELECT id, balance FROM accounts WHERE id >= 200 ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![(200, 0), (204, 0)]);
    // A PL/pgSQL exception block is a savepoint too.
    client
        .batch_execute(
            "DO $$ BEGIN
               INSERT INTO accounts VALUES (210, 1);
               BEGIN
                 INSERT INTO accounts VALUES (211, 1);
                 INSERT INTO accounts VALUES (210, 1);
               EXCEPTION WHEN unique_violation THEN NULL;
               END;
             END $$",
        )
        .unwrap();
    assert_eq!(
        count(
            &mut client,
            "SELECT count(*) FROM accounts WHERE id IN (210, 211)"
        ),
        1
    );
    assert_eq!(prepared_on_workers(cluster), 0);
}

/// The smallest key from `from` up whose `accounts` shard lives on `worker`, and that shard.
fn key_on(client: &mut Client, worker: &pgdist_pg_test::Server, from: i32) -> (i32, String) {
    let row = client
        .query_one(
            "SELECT k, s.shard_name FROM pgdist.shards s, generate_series($2, $2 + 1000) k
             WHERE s.table_name = 'accounts'::regclass AND s.port = $1
               AND pgdist.hash_value(k) BETWEEN s.min_value::int AND s.max_value::int
             ORDER BY k LIMIT 1",
            &[&(worker.port as i32), &from],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

fn a_failure_at_prepare_leaves_nothing_visible(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    let (key1, _) = key_on(&mut client, &cluster.workers[0], 3000);
    let (key2, shard2) = key_on(&mut client, &cluster.workers[1], 3000);
    // A deferred trigger on worker 2's shard refuses to commit: PREPARE TRANSACTION fails there.
    let mut worker2 = cluster.workers[1].connect();
    worker2
        .batch_execute(&format!(
            "CREATE FUNCTION public.refuse_commit() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'refusing to commit'; END $$;
             CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT ON {shard2}
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.refuse_commit();"
        ))
        .unwrap();
    client.batch_execute("BEGIN").unwrap();
    client
        .execute(
            "INSERT INTO accounts VALUES ($1, 7), ($2, 7)",
            &[&key1, &key2],
        )
        .unwrap();
    let err = client.batch_execute("COMMIT").unwrap_err();
    assert!(format!("{err:?}").contains("refusing to commit"), "{err:?}");
    assert_eq!(
        count(
            &mut client,
            &format!("SELECT count(*) FROM accounts WHERE balance = 7 AND id IN ({key1}, {key2})")
        ),
        0
    );
    assert_eq!(prepared_on_workers(cluster), 0);
    worker2
        .batch_execute(&format!("DROP TRIGGER refuse_commit ON {shard2}"))
        .unwrap();
}

fn copy_of_a_million_rows_is_exact(cluster: &Cluster) {
    use std::io::Write;
    const ROWS: i64 = 1_000_000;
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    for client in [&mut coordinator, &mut reference] {
        let mut writer = client.copy_in("COPY big (id, payload) FROM STDIN").unwrap();
        let mut chunk = String::new();
        for i in 1..=ROWS {
            chunk.push_str(&format!("{i}\tpayload {}\\t{}\n", i * 7919 % 10007, i % 3));
            if chunk.len() > 1 << 16 {
                writer.write_all(chunk.as_bytes()).unwrap();
                chunk.clear();
            }
        }
        writer.write_all(chunk.as_bytes()).unwrap();
        assert_eq!(writer.finish().unwrap(), ROWS as u64);
    }
    let checksum = "SELECT count(*), sum(id), sum(hashtext(payload)::bigint), min(payload), max(payload) FROM big";
    assert!(matches!(
        compare(&mut coordinator, &mut reference, checksum),
        Comparison::Same
    ));
    // COPY TO reads the shards.
    let mut out = Vec::new();
    let mut reader = coordinator.copy_out("COPY big TO STDOUT").unwrap();
    std::io::copy(&mut reader, &mut out).unwrap();
    drop(reader);
    assert_eq!(out.iter().filter(|b| **b == b'\n').count() as i64, ROWS);
}

fn insert_select_between_colocated_tables_runs_on_the_workers(cluster: &Cluster) {
    let pushed_down = [
        "INSERT INTO dst (id, total, n) SELECT id, sum(amount), count(*) FROM src GROUP BY id",
        "INSERT INTO dst SELECT id, amount, 1, label FROM src WHERE amount > 600",
        "INSERT INTO dst (label, id, total) SELECT label, id, amount FROM src WHERE id = 3",
        "INSERT INTO dst (id, total) SELECT s.id, max(s.amount) FROM src s JOIN dst d USING (id) \
         WHERE d.n > 10 GROUP BY s.id",
    ];
    let through_coordinator = [
        "INSERT INTO dst (id, label) SELECT id + 1, label FROM src WHERE grp = 2",
        "INSERT INTO dst (n, id, label) SELECT grp, id, upper(label) FROM src WHERE id = 4",
        "INSERT INTO dst (id, n) SELECT grp, count(*) FROM src GROUP BY grp",
        "INSERT INTO dst (id, total) SELECT id, amount FROM src ORDER BY amount DESC LIMIT 3",
    ];
    let mut coordinator = cluster.coordinator_client();
    for (sql, pushdown) in pushed_down
        .iter()
        .map(|sql| (sql, true))
        .chain(through_coordinator.iter().map(|sql| (sql, false)))
    {
        let plan: Vec<String> = coordinator
            .query(&format!("EXPLAIN (COSTS OFF) {sql}"), &[])
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(
            plan.iter().any(|line| line.contains("Pushdown")),
            pushdown,
            "{sql}\n{}",
            plan.join("\n")
        );
    }
    let mut statements: Vec<&str> = pushed_down.to_vec();
    statements.extend(through_coordinator);
    // Inside a transaction the pushed-down rows are visible to later statements, and go away
    // with a rollback.
    let in_transaction = "BEGIN; INSERT INTO dst (id, n) SELECT id, -1 FROM src WHERE grp = 4; \
                          SELECT count(*) FROM dst WHERE n = -1; ROLLBACK; \
                          SELECT count(*) FROM dst WHERE n = -1";
    statements.push(in_transaction);
    same_writes(
        cluster,
        "SELECT * FROM dst ORDER BY id, total, n, label",
        &statements,
    );
}

fn writes_inside_with_match_plain_postgres(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let plan = explain(
        &mut coordinator,
        "WITH moved AS (DELETE FROM orders WHERE status = 'done' RETURNING *) \
         INSERT INTO orders_archive SELECT * FROM moved",
    );
    assert_eq!(
        plan.matches("pgdist Distributed Modify").count(),
        2,
        "{plan}"
    );
    let tables = [
        "SELECT * FROM orders ORDER BY id",
        "SELECT * FROM orders_archive ORDER BY id, status",
        "SELECT * FROM order_events ORDER BY order_id, what",
    ];
    same_writes_to(
        cluster,
        &tables,
        &[
            // Rows move from one distributed table to another through RETURNING.
            "WITH moved AS (DELETE FROM orders WHERE status = 'done' AND customer < 5 RETURNING *) \
             INSERT INTO orders_archive SELECT * FROM moved",
            "WITH moved AS (DELETE FROM orders WHERE id BETWEEN 10 AND 20 RETURNING id, customer, amount, status) \
             INSERT INTO orders_archive SELECT * FROM moved RETURNING id, customer",
            "WITH u AS (UPDATE orders SET amount = amount + 1 WHERE customer = 3 RETURNING id, amount) \
             SELECT count(*), sum(amount) FROM u",
            "WITH u AS (UPDATE orders SET status = 'seen' WHERE id = 42 RETURNING *) SELECT * FROM u",
            // A write nobody reads still runs, and its rows do not count as the statement's.
            "WITH d AS (DELETE FROM orders WHERE id = 7) SELECT 1 AS unreferenced",
            "WITH d AS (DELETE FROM orders WHERE customer = 12 RETURNING id) \
             UPDATE orders_archive SET status = 'x' WHERE customer = 12",
            "WITH i AS (INSERT INTO orders VALUES (1001, 1, 5, 'open'), (1002, 2, 6, 'open') RETURNING id) \
             SELECT array_agg(id ORDER BY id) FROM i",
            "WITH i AS (INSERT INTO orders SELECT id + 2000, customer, amount, 'copy' FROM orders_archive RETURNING *) \
             INSERT INTO order_events SELECT id, 'copied' FROM i",
            "WITH d AS (DELETE FROM orders_archive WHERE customer = 1 RETURNING *), \
                  e AS (INSERT INTO order_events SELECT id, 'gone' FROM d RETURNING *) \
             SELECT count(*) FROM e",
            // A write inside WITH may read the statement's other WITH queries and other tables.
            "WITH small AS (SELECT id FROM orders WHERE amount < 10), \
                  gone AS (DELETE FROM orders WHERE id IN (SELECT id FROM small) RETURNING id) \
             SELECT count(*) FROM gone",
            "WITH u AS (UPDATE orders o SET amount = o.amount * 2 FROM orders_archive a \
                        WHERE a.id = o.id - 2000 AND a.customer = 2 RETURNING o.id) \
             SELECT count(*) FROM u",
            "WITH d AS (DELETE FROM orders o USING orders_archive a WHERE a.id = o.id - 2000 RETURNING o.id, a.status) \
             SELECT status, count(*) FROM d GROUP BY status",
            "BEGIN; WITH d AS (DELETE FROM orders WHERE customer = 6 RETURNING *) \
             INSERT INTO orders_archive SELECT * FROM d; ROLLBACK",
            "WITH d AS (DELETE FROM orders WHERE amount > 90 RETURNING *) \
             INSERT INTO orders_archive SELECT * FROM d WHERE customer = 999",
            // UPDATE and DELETE reading a WITH query's rows: they travel with every shard's
            // statement.
            "INSERT INTO orders_archive SELECT id + 5000, customer, amount, status FROM orders \
             WHERE customer IN (2, 4, 7)",
            "WITH d AS (DELETE FROM orders WHERE customer = 4 RETURNING id, status) \
             UPDATE orders_archive SET status = 'gone ' || d.status FROM d \
             WHERE orders_archive.id = d.id + 5000 RETURNING orders_archive.*, d.id",
            "WITH u AS (UPDATE orders SET amount = amount + 5 WHERE customer = 2 RETURNING id, amount) \
             DELETE FROM orders_archive a USING u WHERE a.id = u.id + 5000 AND u.amount > 50 \
             RETURNING a.id, u.amount",
            "WITH d AS (DELETE FROM orders WHERE id = -1 RETURNING id) \
             DELETE FROM orders_archive WHERE id NOT IN (SELECT id FROM d) AND customer = 5",
            // Writes inside WITH reading the rows of other ones.
            "WITH d AS (DELETE FROM orders WHERE customer = 7 RETURNING id, amount), \
                  u AS (UPDATE orders_archive SET amount = d.amount FROM d \
                        WHERE orders_archive.id = d.id + 5000 RETURNING orders_archive.id), \
                  e AS (INSERT INTO order_events SELECT id, 'synced' FROM u RETURNING *) \
             SELECT count(*) FROM e",
            // A WITH query of a subquery with the same name is that query, not the write.
            "WITH d AS (DELETE FROM orders WHERE id = -2 RETURNING id) DELETE FROM orders_archive \
             WHERE id IN (WITH d AS MATERIALIZED (SELECT 5015 AS id) SELECT id FROM d) RETURNING id",
            "WITH e AS (INSERT INTO order_events VALUES (5, 'x'), (6, NULL) RETURNING order_id, what) \
             UPDATE orders SET status = coalesce(e.what, 'null') FROM e WHERE orders.id = e.order_id",
            "WITH e AS (INSERT INTO order_events VALUES (8, 'y') RETURNING order_id) \
             UPDATE orders SET status = 'noted' WHERE id IN (SELECT order_id FROM e)",
            // A blind insert (no ON CONFLICT, reading nothing of its table) shares its table
            // with a part that is over before it writes: a row gets a new distribution column
            // value, rows are copied within a table, a failing re-insert changes nothing.
            "WITH old AS (DELETE FROM orders WHERE id = 5 RETURNING *) \
             INSERT INTO orders SELECT 5005, customer, amount, status FROM old RETURNING id, customer",
            "WITH old AS (DELETE FROM orders WHERE id = 6 RETURNING *) \
             INSERT INTO orders SELECT id, customer + 1, amount, 'rekeyed' FROM old",
            "WITH old AS (DELETE FROM orders WHERE id = 9 RETURNING *) \
             INSERT INTO orders SELECT 1, customer, amount, status FROM old",
            "WITH u AS (UPDATE orders SET amount = amount + 100 WHERE customer = 8 RETURNING *) \
             INSERT INTO orders SELECT id + 6000, customer, amount, 'copy' FROM u RETURNING id, amount",
            "WITH d AS (DELETE FROM orders_archive WHERE customer = 2 RETURNING *), \
                  again AS (INSERT INTO orders_archive SELECT id, customer + 20, amount, status FROM d RETURNING id) \
             SELECT count(*) FROM again",
            "WITH i AS (INSERT INTO orders VALUES (7001, 3, 1, 'new') RETURNING id) \
             SELECT count(*), sum(amount) FROM orders",
            "WITH i AS (INSERT INTO orders VALUES (7002, 3, 1, 'new')), \
                  j AS (INSERT INTO orders VALUES (7003, 4, 2, 'new') RETURNING id) \
             SELECT count(*) FROM j",
            "WITH i AS (INSERT INTO orders VALUES (7004, 3, 1, 'new')) \
             UPDATE orders SET amount = -1 WHERE customer = 3 RETURNING id",
        ],
    );
    // Parameters pick the shard at execution, generic plans included.
    let mut reference = cluster.reference.connect();
    let mut results = Vec::new();
    for client in [&mut coordinator, &mut reference] {
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .unwrap();
        let delete = client
            .prepare("WITH d AS (DELETE FROM orders WHERE id = $1 RETURNING amount) SELECT coalesce(sum(amount), 0)::int8 FROM d")
            .unwrap();
        let amounts: Vec<i64> = (30..40)
            .map(|id| client.query_one(&delete, &[&id]).unwrap().get(0))
            .collect();
        results.push(amounts);
        client.batch_execute("RESET plan_cache_mode").unwrap();
    }
    assert_eq!(results[0], results[1]);
    compare(&mut coordinator, &mut reference, tables[0]);
    // Parts that would see each other's changes on the workers are refused.
    let before: Vec<Outcome> = tables
        .iter()
        .map(|t| outcome(&mut coordinator, t))
        .collect();
    for sql in [
        "WITH d AS (DELETE FROM orders WHERE id < 100 RETURNING *) SELECT count(*) FROM orders",
        "WITH a AS (UPDATE orders SET amount = 0 WHERE id = 1 RETURNING *), \
              b AS (DELETE FROM orders WHERE id = 2 RETURNING *) SELECT * FROM a, b",
        "WITH e AS (INSERT INTO order_events VALUES (1, 'x') RETURNING *) \
         SELECT count(*) FROM order_events JOIN orders ON orders.id = order_events.order_id",
        // An insert that reads its own table, one nobody waits for, one with ON CONFLICT, one
        // whose rows the part reading its table needs first.
        "WITH d AS (DELETE FROM orders_archive WHERE id < 100 RETURNING id) \
         INSERT INTO orders_archive SELECT * FROM orders_archive WHERE id IN (SELECT id FROM d)",
        "WITH d AS (DELETE FROM orders WHERE id < 5) INSERT INTO orders VALUES (8001, 1, 1, 'x')",
        "WITH i AS (INSERT INTO orders VALUES (8002, 1, 1, 'x') ON CONFLICT DO NOTHING) \
         SELECT count(*) FROM orders",
        "WITH i AS (INSERT INTO orders VALUES (8003, 1, 1, 'x') RETURNING id) \
         SELECT count(*) FROM orders, i",
        "WITH i AS (INSERT INTO orders VALUES (8004, 1, 1, 'x') RETURNING id) \
         UPDATE orders SET amount = 0 WHERE id IN (SELECT id FROM i)",
        // A blind insert into another table that reads the table the WITH query deletes from.
        "WITH d AS (DELETE FROM orders WHERE id = 50 RETURNING id) \
         INSERT INTO orders_archive SELECT o.* FROM orders o JOIN d USING (id)",
        "WITH d AS (DELETE FROM orders WHERE id = 3 RETURNING id) \
         UPDATE orders SET status = 'x' FROM d WHERE orders.id = d.id + 1",
    ] {
        let err = coordinator.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
        assert!(
            err.as_db_error().and_then(|d| d.hint()).is_some(),
            "{sql}: no hint"
        );
    }
    let after: Vec<Outcome> = tables
        .iter()
        .map(|t| outcome(&mut coordinator, t))
        .collect();
    assert_eq!(before, after);
}

/// MERGE runs as one MERGE per shard: with a co-located source joined on the distribution
/// columns, a reference source, or any other source — a table, a subquery, a view, VALUES, a
/// function, a WITH query — repartitioned by the source column the ON condition equates with
/// the distribution column; other shapes are refused with 0A000 and change nothing.
/// Asserts that both workers' copies of reference table `table` hold the same rows: `row` (SQL
/// for one row as text, quotes doubled) of each, ordered by `order`.
fn copies_agree(client: &mut Client, table: &str, row: &str, order: &str) {
    let copies: Vec<String> = client
        .query(
            &format!(
                "SELECT r.result FROM pgdist.shards s, LATERAL pgdist.run_on_workers(format(
                   'SELECT string_agg({row}, '','' ORDER BY {order}) FROM %s', s.shard_name)) r
                 WHERE s.table_name::text = '{table}' AND r.node_id = s.node_id"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        copies.len() == 2 && copies[0] == copies[1],
        "every copy of {table} holds the same rows: {copies:?}"
    );
}

fn merge_matches_plain_postgres(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE stock_levels (item int PRIMARY KEY, qty int NOT NULL, note text DEFAULT 'new');
         CREATE TABLE deliveries (item int, qty int, kind text);
         CREATE TABLE price_list (item int PRIMARY KEY, price numeric);
         CREATE TABLE shelf (item int PRIMARY KEY, qty int);
         CREATE TABLE elsewhere (item int, qty int);
         INSERT INTO stock_levels SELECT i, i * 10 FROM generate_series(1, 60) i;
         INSERT INTO deliveries SELECT i, i % 17, CASE i % 4 WHEN 0 THEN 'recall' WHEN 1 THEN 'add' ELSE 'set' END
           FROM generate_series(30, 90) i;
         INSERT INTO price_list SELECT i, i * 1.5 FROM generate_series(1, 100) i;
         INSERT INTO shelf SELECT i, i FROM generate_series(1, 20) i;
         INSERT INTO elsewhere SELECT i, i FROM generate_series(1, 50) i;",
    );
    coordinator
        .batch_execute(
            "SELECT pgdist.create_distributed_table('stock_levels', 'item', shard_count => 4, colocate_with => 'none');
             SELECT pgdist.create_distributed_table('deliveries', 'item', colocate_with => 'stock_levels');
             SELECT pgdist.create_reference_table('price_list');
             SELECT pgdist.create_reference_table('shelf');
             SELECT pgdist.create_distributed_table('elsewhere', 'item', shard_count => 3, colocate_with => 'none');",
        )
        .unwrap();
    let tables = ["SELECT * FROM stock_levels", "SELECT * FROM shelf"];
    same_writes_to(
        cluster,
        &tables,
        &[
            "MERGE INTO stock_levels s USING deliveries d ON s.item = d.item \
               WHEN MATCHED AND d.kind = 'recall' THEN DELETE \
               WHEN MATCHED AND d.kind = 'add' THEN UPDATE SET qty = s.qty + d.qty, note = 'added' \
               WHEN MATCHED THEN UPDATE SET qty = d.qty \
               WHEN NOT MATCHED AND d.qty > 3 THEN INSERT (item, qty) VALUES (d.item, d.qty * 2) \
               WHEN NOT MATCHED THEN DO NOTHING",
            "MERGE INTO stock_levels USING price_list p ON stock_levels.item = p.item AND p.price > 80 \
               WHEN MATCHED THEN UPDATE SET note = 'pricey ' || p.price",
            "MERGE INTO shelf USING price_list p ON shelf.item = p.item \
               WHEN MATCHED AND p.price < 10 THEN DELETE \
               WHEN NOT MATCHED AND p.item <= 30 THEN INSERT VALUES (p.item, 0)",
            "BEGIN",
            "UPDATE deliveries SET qty = qty + 100 WHERE item % 5 = 0",
            "MERGE INTO stock_levels s USING deliveries d ON d.item = s.item \
               WHEN MATCHED AND d.qty > 100 THEN UPDATE SET qty = d.qty",
            "ROLLBACK",
            // A target row matched twice fails on its shard as on one server (21000).
            "INSERT INTO deliveries VALUES (31, 1, 'add'), (31, 2, 'add')",
            "MERGE INTO stock_levels s USING deliveries d ON s.item = d.item WHEN MATCHED THEN UPDATE SET qty = 0",
            "DELETE FROM deliveries WHERE item = 31",
            // Repartitioned: a table of another co-location group, and a reference table that
            // inserts, each row sent only to the shard its key hashes to.
            "MERGE INTO stock_levels s USING elsewhere e ON s.item = e.item \
               WHEN MATCHED AND e.qty % 3 = 0 THEN DELETE \
               WHEN MATCHED THEN UPDATE SET qty = s.qty + e.qty \
               WHEN NOT MATCHED THEN INSERT VALUES (e.item, e.qty)",
            "MERGE INTO stock_levels s USING price_list p ON s.item = p.item \
               WHEN NOT MATCHED AND p.item % 2 = 0 THEN INSERT (item, qty, note) VALUES (p.item, 1, 'priced')",
            // A staging table of the coordinator, and a temporary one; a NULL key is inserted
            // nowhere and fails as on one server.
            "CREATE TABLE staging (item int, qty int, note text)",
            "INSERT INTO staging SELECT i, i % 9, 'staged' FROM generate_series(95, 130) i",
            "MERGE INTO stock_levels s USING staging g ON g.item = s.item \
               WHEN MATCHED AND g.qty = 0 THEN DELETE \
               WHEN MATCHED THEN UPDATE SET qty = g.qty, note = g.note \
               WHEN NOT MATCHED THEN INSERT VALUES (g.item, g.qty, g.note)",
            "INSERT INTO staging VALUES (NULL, 1, 'no key')",
            "MERGE INTO stock_levels s USING staging g ON g.item = s.item \
               WHEN NOT MATCHED THEN INSERT VALUES (g.item, g.qty, g.note)",
            "MERGE INTO stock_levels s USING staging g ON g.item = s.item \
               WHEN MATCHED THEN UPDATE SET qty = s.qty + 1",
            "CREATE TEMP TABLE fresh AS SELECT i AS item, -i AS qty FROM generate_series(1, 12) i; \
             MERGE INTO stock_levels s USING fresh f ON s.item = f.item \
               WHEN MATCHED THEN UPDATE SET qty = f.qty WHEN NOT MATCHED THEN INSERT VALUES (f.item, f.qty); \
             DROP TABLE fresh",
            "DROP TABLE staging",
            // Sources the coordinator reads first with SQL of their own: subqueries (an
            // aggregate, a join, duplicate column names), a view, VALUES, a function, a WITH
            // query; into a reference table, every copy gets every source row.
            "MERGE INTO stock_levels s USING (SELECT item, sum(qty) AS qty, count(*) AS n FROM deliveries GROUP BY item) d \
               ON s.item = d.item \
               WHEN MATCHED AND d.qty > 10 THEN DELETE \
               WHEN MATCHED THEN UPDATE SET qty = s.qty + d.qty, note = 'sum of ' || d.n \
               WHEN NOT MATCHED THEN INSERT VALUES (d.item, d.qty, 'summed')",
            "MERGE INTO stock_levels s USING (SELECT d.item, e.item, d.qty + e.qty FROM deliveries d JOIN elsewhere e ON e.item = d.item - 1) AS d(item, other, total) \
               ON s.item = d.item WHEN MATCHED THEN UPDATE SET qty = d.total, note = 'after ' || d.other",
            "CREATE VIEW big_deliveries AS SELECT item, qty * 100 AS qty FROM deliveries WHERE qty > 12",
            "MERGE INTO stock_levels s USING big_deliveries b ON s.item = b.item \
               WHEN MATCHED THEN UPDATE SET qty = b.qty WHEN NOT MATCHED THEN INSERT VALUES (b.item, b.qty, 'big')",
            "DROP VIEW big_deliveries",
            "MERGE INTO stock_levels s USING (VALUES (1, 'one'), (500, 'five hundred'), (2, NULL)) AS v(item, note) \
               ON s.item = v.item WHEN MATCHED THEN UPDATE SET note = v.note \
               WHEN NOT MATCHED THEN INSERT (item, qty, note) VALUES (v.item, 0, v.note)",
            "MERGE INTO stock_levels s USING generate_series(3, 600, 7) AS g(item) ON s.item = g.item \
               WHEN MATCHED AND g.item % 2 = 0 THEN DELETE WHEN NOT MATCHED THEN INSERT VALUES (g.item, g.item)",
            "WITH recalled AS (SELECT item FROM deliveries WHERE kind = 'recall') \
             MERGE INTO stock_levels s USING recalled r ON s.item = r.item WHEN MATCHED THEN UPDATE SET note = 'recalled'",
            "MERGE INTO stock_levels s USING (SELECT NULL::int AS item) n ON s.item = n.item \
               WHEN NOT MATCHED THEN INSERT VALUES (n.item, 1)",
            "MERGE INTO stock_levels s USING (SELECT item FROM deliveries UNION ALL SELECT item FROM deliveries) d \
               ON s.item = d.item WHEN MATCHED THEN UPDATE SET qty = 1",
            // A key of another integer type hashes alike.
            "MERGE INTO stock_levels s USING (SELECT item::bigint AS item, qty::smallint AS qty FROM deliveries WHERE kind = 'set') d \
               ON s.item = d.item WHEN MATCHED THEN UPDATE SET qty = d.qty WHEN NOT MATCHED THEN INSERT VALUES (d.item, d.qty, 'wide')",
            "MERGE INTO stock_levels s USING (VALUES (3000000000::bigint, 1)) AS v(item, qty) ON s.item = v.item \
               WHEN NOT MATCHED THEN INSERT VALUES (v.item, v.qty)",
            // A join as the source, read as the subquery it amounts to.
            "MERGE INTO stock_levels s USING deliveries d JOIN price_list p ON p.item = d.item \
               ON s.item = d.item WHEN MATCHED AND p.price > 60 THEN UPDATE SET note = 'priced ' || p.price \
               WHEN NOT MATCHED THEN INSERT VALUES (d.item, d.qty, 'joined')",
            "MERGE INTO stock_levels s USING elsewhere e FULL JOIN shelf h USING (item) AS j ON s.item = j.item \
               WHEN MATCHED THEN UPDATE SET qty = coalesce(e.qty, 0) + coalesce(h.qty, 0)",
            // The target as its own source: read before any shard changes it.
            "MERGE INTO stock_levels s USING stock_levels o ON s.item = o.item \
               WHEN MATCHED AND o.qty > 100 THEN UPDATE SET qty = s.qty + o.qty",
            "MERGE INTO stock_levels s USING (SELECT item + 1 AS item, qty FROM stock_levels) o ON s.item = o.item \
               WHEN MATCHED AND o.qty > 100 THEN UPDATE SET qty = s.qty + o.qty \
               WHEN NOT MATCHED AND o.item > 590 THEN INSERT VALUES (o.item, o.qty, 'next')",
            "MERGE INTO shelf USING deliveries d ON shelf.item = d.item \
               WHEN MATCHED AND d.kind = 'recall' THEN DELETE \
               WHEN MATCHED THEN UPDATE SET qty = shelf.qty + d.qty",
            "MERGE INTO shelf USING (SELECT item + 10 AS item, max(qty) AS qty FROM deliveries GROUP BY item) d ON shelf.item = d.item \
               WHEN NOT MATCHED THEN INSERT VALUES (d.item, d.qty)",
        ],
    );
    // A MERGE with a few source rows runs only on their shards.
    let mut tx = coordinator.transaction().unwrap();
    let plan: Vec<String> = tx
        .query(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) \
             MERGE INTO stock_levels s USING (VALUES (4, 40)) AS v(item, qty) ON s.item = v.item \
             WHEN MATCHED THEN UPDATE SET qty = v.qty",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        plan.iter()
            .any(|line| line.contains("Fragments: 1 on 1 node(s)")),
        "{plan:#?}"
    );
    tx.rollback().unwrap();
    // Refused: not joined on the distribution column, INSERT of another distribution value,
    // a changed distribution column, a source column of another type.
    for sql in [
        "MERGE INTO stock_levels s USING deliveries d ON s.qty = d.qty WHEN MATCHED THEN DELETE",
        "MERGE INTO stock_levels s USING elsewhere e ON s.item = e.item WHEN NOT MATCHED THEN INSERT VALUES (e.qty, 1)",
        "MERGE INTO stock_levels s USING deliveries d ON s.item = d.item WHEN MATCHED THEN UPDATE SET item = d.item + 1",
        "MERGE INTO stock_levels s USING (SELECT item::numeric AS item FROM deliveries) d ON s.item = d.item WHEN MATCHED THEN DELETE",
    ] {
        let err = coordinator.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
        assert!(err.as_db_error().and_then(|e| e.hint()).is_some(), "{sql}");
    }
    same_writes_to(cluster, &tables, &["SELECT 1"]);
    // With parameters, as a prepared statement (custom and generic plans).
    let mut client = cluster.coordinator_client();
    let statement = client
        .prepare(
            "MERGE INTO stock_levels s USING deliveries d ON s.item = d.item AND d.qty > $1 \
             WHEN MATCHED THEN UPDATE SET qty = s.qty + $2",
        )
        .unwrap();
    let mut plain = cluster.reference.connect();
    let plain_statement = plain
        .prepare(
            "MERGE INTO stock_levels s USING deliveries d ON s.item = d.item AND d.qty > $1 \
             WHEN MATCHED THEN UPDATE SET qty = s.qty + $2",
        )
        .unwrap();
    for round in 0..7 {
        let got = client
            .execute(&statement, &[&(round * 2), &1])
            .map_err(|e| sqlstate(&e));
        let want = plain
            .execute(&plain_statement, &[&(round * 2), &1])
            .map_err(|e| sqlstate(&e));
        assert_eq!(got, want, "round {round}");
    }
    same_writes_to(cluster, &tables, &["SELECT 1"]);
    // The upsert of a row given as parameters, as drivers send it.
    let upsert = "MERGE INTO stock_levels s USING (VALUES ($1::int, $2::int)) AS v(item, qty) \
                  ON s.item = v.item WHEN MATCHED THEN UPDATE SET qty = s.qty + v.qty \
                  WHEN NOT MATCHED THEN INSERT (item, qty) VALUES (v.item, v.qty)";
    let statement = client.prepare(upsert).unwrap();
    let plain_statement = plain.prepare(upsert).unwrap();
    for (item, qty) in [
        (5, 1),
        (700, 2),
        (700, 3),
        (6, 4),
        (701, 5),
        (5, 6),
        (702, 7),
    ] {
        let got = client.execute(&statement, &[&item, &qty]).unwrap();
        let want = plain.execute(&plain_statement, &[&item, &qty]).unwrap();
        assert_eq!(got, want, "({item}, {qty})");
    }
    same_writes_to(cluster, &tables, &["SELECT 1"]);
    // Statement triggers fire for the events of the MERGE's actions (BEFORE: INSERT, UPDATE,
    // DELETE; AFTER the other way round).
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE merge_log (n serial, what text);
         CREATE FUNCTION log_statement() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO merge_log (what) VALUES (TG_WHEN || ' ' || TG_OP); RETURN NULL; END $$;
         CREATE TRIGGER stock_before BEFORE INSERT OR UPDATE OR DELETE ON stock_levels
           FOR EACH STATEMENT EXECUTE FUNCTION log_statement();
         CREATE TRIGGER stock_after AFTER INSERT OR UPDATE OR DELETE ON stock_levels
           FOR EACH STATEMENT EXECUTE FUNCTION log_statement();",
    );
    same_writes_to(
        cluster,
        &["SELECT * FROM stock_levels", "SELECT * FROM merge_log ORDER BY n"],
        &[
            "MERGE INTO stock_levels s USING deliveries d ON s.item = d.item \
               WHEN MATCHED AND d.kind = 'recall' THEN DELETE WHEN MATCHED THEN UPDATE SET qty = d.qty \
               WHEN NOT MATCHED THEN INSERT VALUES (d.item, d.qty, 'merged')",
            "MERGE INTO stock_levels s USING (VALUES (9999, 1)) AS v(item, qty) ON s.item = v.item \
               WHEN MATCHED THEN UPDATE SET qty = v.qty",
            "MERGE INTO stock_levels s USING deliveries d ON s.item = d.item WHEN MATCHED THEN DO NOTHING",
        ],
    );
    // Row triggers fire for each row an action takes, on the coordinator: BEFORE ones change
    // or skip the row (an UPDATE, a DELETE, an INSERT), AFTER ones see it as stored, and the
    // transition tables hold the rows of every action, whatever the source.
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE merge_rows (what text);
         CREATE FUNCTION stock_row() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF TG_WHEN = 'AFTER' THEN
             INSERT INTO merge_rows VALUES (TG_OP || ' ' || coalesce(OLD::text, '') || ' ' || coalesce(NEW::text, ''));
             RETURN NULL;
           END IF;
           IF TG_OP = 'DELETE' THEN
             RETURN CASE WHEN OLD.qty % 3 = 0 THEN NULL ELSE OLD END;
           END IF;
           IF NEW.qty % 7 = 0 THEN RETURN NULL; END IF;
           NEW.note := coalesce(NEW.note, '') || ' ' || lower(TG_OP);
           RETURN NEW;
         END $$;
         CREATE FUNCTION stock_changed() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO merge_rows SELECT TG_OP || ' changed ' || count(*) || ' ' || coalesce(sum(qty), 0) FROM changed;
           RETURN NULL;
         END $$;
         CREATE TRIGGER stock_row_before BEFORE INSERT OR UPDATE OR DELETE ON stock_levels
           FOR EACH ROW EXECUTE FUNCTION stock_row();
         CREATE TRIGGER stock_row_after AFTER INSERT OR UPDATE OR DELETE ON stock_levels
           FOR EACH ROW EXECUTE FUNCTION stock_row();
         CREATE TRIGGER stock_updated AFTER UPDATE ON stock_levels REFERENCING NEW TABLE AS changed
           FOR EACH STATEMENT EXECUTE FUNCTION stock_changed();
         CREATE TRIGGER stock_deleted AFTER DELETE ON stock_levels REFERENCING OLD TABLE AS changed
           FOR EACH STATEMENT EXECUTE FUNCTION stock_changed();",
    );
    coordinator
        .batch_execute("SELECT pgdist.create_reference_table('merge_rows')")
        .unwrap();
    same_writes_to(
        cluster,
        &[
            "SELECT * FROM stock_levels",
            "SELECT * FROM merge_log ORDER BY n",
            "SELECT * FROM merge_rows",
        ],
        &[
            // A co-located source, read in place.
            "MERGE INTO stock_levels s USING deliveries d ON s.item = d.item \
               WHEN MATCHED AND d.kind = 'recall' THEN DELETE \
               WHEN MATCHED AND d.kind = 'add' THEN UPDATE SET qty = s.qty + d.qty \
               WHEN MATCHED THEN DO NOTHING \
               WHEN NOT MATCHED AND d.qty > 3 THEN INSERT (item, qty) VALUES (d.item, d.qty * 2)",
            // A reference table matched on the key; a repartitioned subquery; VALUES.
            "MERGE INTO stock_levels USING price_list p ON stock_levels.item = p.item AND p.price > 80 \
               WHEN MATCHED THEN UPDATE SET note = 'pricey ' || p.price",
            "MERGE INTO stock_levels s USING (SELECT item + 1 AS item, sum(qty) AS qty FROM elsewhere GROUP BY 1) e \
               ON s.item = e.item WHEN MATCHED AND e.qty > 40 THEN DELETE \
               WHEN MATCHED THEN UPDATE SET qty = s.qty - e.qty \
               WHEN NOT MATCHED THEN INSERT VALUES (e.item, e.qty)",
            "MERGE INTO stock_levels s USING (VALUES (200, 5), (201, 14), (2, 1)) AS v(item, qty) \
               ON s.item = v.item WHEN MATCHED THEN UPDATE SET qty = v.qty \
               WHEN NOT MATCHED THEN INSERT (item, qty) VALUES (v.item, v.qty)",
            // Two source rows for one target row: PostgreSQL's error, nothing changes.
            "MERGE INTO stock_levels s USING (VALUES (3, 1), (3, 2)) AS v(item, qty) \
               ON s.item = v.item WHEN MATCHED THEN UPDATE SET qty = v.qty",
            "BEGIN",
            "MERGE INTO stock_levels s USING stock_levels t ON s.item = t.item \
               WHEN MATCHED AND s.item % 4 = 0 THEN UPDATE SET qty = t.qty + 1",
            "ROLLBACK",
        ],
    );
    // Into a reference table: the triggers fire once per row, every copy gets the writes.
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE FUNCTION shelf_row() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF TG_WHEN = 'AFTER' THEN
             INSERT INTO merge_rows VALUES ('shelf ' || TG_OP || ' ' || coalesce(OLD::text, '') || ' ' || coalesce(NEW::text, ''));
             RETURN NULL;
           END IF;
           IF TG_OP = 'INSERT' AND NEW.qty = 0 THEN RETURN NULL; END IF;
           IF TG_OP = 'UPDATE' THEN NEW.qty := NEW.qty * 10; END IF;
           RETURN COALESCE(NEW, OLD);
         END $$;
         CREATE TRIGGER shelf_before BEFORE INSERT OR UPDATE OR DELETE ON shelf
           FOR EACH ROW EXECUTE FUNCTION shelf_row();
         CREATE TRIGGER shelf_after AFTER INSERT OR UPDATE OR DELETE ON shelf
           FOR EACH ROW EXECUTE FUNCTION shelf_row();",
    );
    same_writes_to(
        cluster,
        &["SELECT * FROM shelf", "SELECT * FROM merge_rows"],
        &[
            "MERGE INTO shelf USING price_list p ON shelf.item = p.item \
             WHEN MATCHED AND p.price < 6 THEN DELETE \
             WHEN MATCHED THEN UPDATE SET qty = shelf.qty + 1 \
             WHEN NOT MATCHED AND p.item <= 40 THEN INSERT VALUES (p.item, p.item % 3)",
        ],
    );
    copies_agree(&mut coordinator, "shelf", "item || '':'' || qty", "item");
    let fired: i64 = coordinator
        .query_one(
            "SELECT count(DISTINCT split_part(what, ' ', 1)) FROM merge_rows \
             WHERE what ~ '^(INSERT|UPDATE|DELETE) +[(]' OR what ~ '^(UPDATE|DELETE) changed [1-9]'",
            &[],
        )
        .unwrap()
        .get(0);
    let log: Vec<String> = coordinator
        .query("SELECT what FROM merge_rows ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        fired, 3,
        "every row trigger and transition table fired: {log:#?}"
    );
    let statement = client.prepare(upsert).unwrap();
    let plain_statement = plain.prepare(upsert).unwrap();
    for (item, qty) in [(5, 3), (800, 2), (800, 4), (801, 7)] {
        let got = client.execute(&statement, &[&item, &qty]).unwrap();
        let want = plain.execute(&plain_statement, &[&item, &qty]).unwrap();
        assert_eq!(got, want, "({item}, {qty})");
    }
    same_writes_to(
        cluster,
        &["SELECT * FROM stock_levels", "SELECT * FROM merge_rows"],
        &["SELECT 1"],
    );
    // Into a distribution column that allows NULL: rows with keys merge as on one server; a
    // source row without one fails as an INSERT of it does (23502), with or without row
    // triggers, and changes nothing.
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE loose (item int, qty int);
         INSERT INTO loose SELECT i, i FROM generate_series(1, 30) i;",
    );
    coordinator
        .batch_execute("SELECT pgdist.create_distributed_table('loose', 'item', shard_count => 4)")
        .unwrap();
    let merge_loose = "MERGE INTO loose l USING elsewhere e ON l.item = e.item \
                       WHEN MATCHED THEN UPDATE SET qty = l.qty + e.qty \
                       WHEN NOT MATCHED THEN INSERT VALUES (e.item, e.qty)";
    same_writes_to(cluster, &["SELECT * FROM loose"], &[merge_loose]);
    let with_null_key = "MERGE INTO loose l USING (SELECT item, qty FROM elsewhere UNION ALL \
                         SELECT NULL, 5) e ON l.item = e.item \
                         WHEN NOT MATCHED THEN INSERT VALUES (e.item, e.qty)";
    for triggers in [false, true] {
        if triggers {
            coordinator
                .batch_execute(
                    "CREATE TRIGGER loose_after AFTER INSERT ON loose FOR EACH ROW \
                     EXECUTE FUNCTION shelf_row()",
                )
                .unwrap();
        }
        let before = outcome(&mut coordinator, "SELECT * FROM loose ORDER BY item");
        let err = coordinator.batch_execute(with_null_key).unwrap_err();
        assert_eq!(sqlstate(&err), "23502", "{err:?}");
        assert_eq!(
            outcome(&mut coordinator, "SELECT * FROM loose ORDER BY item"),
            before
        );
    }
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DROP TABLE stock_levels, deliveries, price_list, shelf, elsewhere, merge_log, merge_rows, loose;
         DROP FUNCTION log_statement(), stock_row(), stock_changed(), shelf_row()",
    );
}

/// `COPY … FROM STDIN` of `data` on one server: the row count, or the error's SQLSTATE.
fn copy_into(client: &mut Client, sql: &str, data: &[u8]) -> Result<u64, String> {
    use std::io::Write;
    let mut writer = client.copy_in(sql).map_err(|err| sqlstate(&err))?;
    writer.write_all(data).map_err(|err| err.to_string())?;
    writer.finish().map_err(|err| sqlstate(&err))
}

fn copy_formats_options_and_bad_input_match_plain_postgres(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    let tables = [
        "SELECT * FROM copies ORDER BY id",
        "SELECT * FROM colors ORDER BY code",
        "SELECT * FROM days ORDER BY day, n",
    ];
    let binary = {
        use std::io::Read;
        let mut out = Vec::new();
        reference
            .copy_out(
                "COPY (SELECT 900 + i, 'binary ' || i, i * 1.5, timestamptz '2024-05-01 10:00+02', \
                 ARRAY['x', NULL], NULL, i FROM generate_series(1, 3) i) TO STDOUT (FORMAT binary)",
            )
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    };
    let cases: Vec<(&str, &[u8])> = vec![
        // Text, every column in another order: escapes, NULLs, arrays, non-ASCII.
        (
            "COPY copies (note, id, label, amount, at, tags, serial) FROM STDIN",
            b"a\\tb\t1\tback\\\\slash\t1.50\t2024-01-02 03:04:05+00\t{a,\"b c\"}\t1\n\
              \\N\t2\tline\\nbreak\t\\N\t\\N\t\\N\t2\n\
              caf\xc3\xa9\t3\t\xe2\x82\xac\t-7.25\t2024-07-01 12:00:00-05\t{}\t3\n",
        ),
        // CSV with a header, quotes, a separator and a line break inside quotes, '' vs NULL.
        (
            "COPY copies (id, label, amount, at, tags, note, serial) FROM STDIN \
             (FORMAT csv, HEADER, DELIMITER ';', NULL 'NULL')",
            b"id;label;amount;at;tags;note;serial\n\
              10;\"semi;colon\";2.5;2024-02-03 04:05:06+00;\"{1,2}\";\"two\nlines\";10\n\
              11;\"\";NULL;NULL;NULL;NULL;11\n\
              12;\"say \"\"hi\"\"\";0;2024-02-03 04:05:06+00;{};plain;12\n",
        ),
        // Columns left out get their defaults, sequences included (parsed here).
        (
            "COPY copies (id, label) FROM STDIN",
            b"20\tdefaults\n21\tmore\n",
        ),
        // FORCE_NULL goes through the full parser too.
        (
            "COPY copies (id, label, amount, at, tags, note, serial) FROM STDIN \
             (FORMAT csv, FORCE_NULL (label))",
            b"30,\"\",1,2024-01-01,{},n,30\n31,x,1,2024-01-01,{},n,31\n",
        ),
        ("COPY copies FROM STDIN (FORMAT binary)", &binary),
        // Bad input: nothing of the statement may stay.
        (
            "COPY copies FROM STDIN",
            b"40\tok\t1\t\\N\t\\N\tn\t40\n41\tbad\tnot-a-number\t\\N\t\\N\tn\t41\n",
        ),
        (
            "COPY copies FROM STDIN",
            b"42\tok\t1\t\\N\t\\N\tn\t42\nforty-three\tbad\t1\t\\N\t\\N\tn\t43\n",
        ),
        (
            "COPY copies FROM STDIN",
            b"44\tok\t1\t\\N\t\\N\tn\t44\textra\n",
        ),
        ("COPY copies FROM STDIN", b"45\tok\t1\n"),
        (
            "COPY copies FROM STDIN",
            b"\\N\tno key\t1\t\\N\t\\N\tn\t46\n",
        ),
        (
            "COPY copies FROM STDIN",
            b"47\tfirst\t1\t\\N\t\\N\tn\t47\n47\tagain\t1\t\\N\t\\N\tn\t48\n",
        ),
        (
            "COPY copies (id, label) FROM STDIN",
            b"48\tok\n49\t\\N\textra\n",
        ),
        // Reference and range tables.
        ("COPY colors FROM STDIN", b"y\tyellow\nw\t\\N\n"),
        (
            "COPY days FROM STDIN (FORMAT csv)",
            b"2024-04-04,4\n2024-09-09,9\n1999-01-01,0\n",
        ),
    ];
    for (sql, data) in cases {
        let got = copy_into(&mut coordinator, sql, data);
        let want = copy_into(&mut reference, sql, data);
        assert_eq!(got, want, "different outcomes for\n  {sql}");
        for contents in tables {
            assert!(
                matches!(
                    compare(&mut coordinator, &mut reference, contents),
                    Comparison::Same
                ),
                "{contents} differs after\n  {sql}"
            );
        }
    }
    // A value a worker cannot read is reported with its row and column, as COPY does.
    {
        use std::io::Write;
        let mut writer = coordinator.copy_in("COPY copies FROM STDIN").unwrap();
        let rows: String = (70..90)
            .map(|i| {
                format!(
                    "{i}\tx\t{}\t\\N\t\\N\tn\t{i}\n",
                    if i == 86 { "1.2.3" } else { "1" }
                )
            })
            .collect();
        writer.write_all(rows.as_bytes()).unwrap();
        let err = writer.finish().unwrap_err();
        let text = pgdist_pg_test::errors::message(&err);
        assert!(
            text.contains("1.2.3") && text.contains("row 17, column amount"),
            "{text}"
        );
    }
    // A failed COPY inside a savepoint rolls back to it; the transaction goes on.
    for client in [&mut coordinator, &mut reference] {
        client
            .batch_execute("BEGIN; SAVEPOINT before_copy")
            .unwrap();
        let bad = copy_into(
            client,
            "COPY copies FROM STDIN",
            b"60\tx\t1\t\\N\t\\N\tn\t60\n61\tx\tbad\t\\N\t\\N\tn\t61\n",
        );
        assert_eq!(bad, Err("22P02".to_string()));
        client
            .batch_execute("ROLLBACK TO SAVEPOINT before_copy")
            .unwrap();
        let good = copy_into(
            client,
            "COPY copies FROM STDIN",
            b"62\tkept\t1\t\\N\t\\N\tn\t62\n",
        );
        assert_eq!(good, Ok(1));
        client.batch_execute("COMMIT").unwrap();
    }
    assert!(matches!(
        compare(&mut coordinator, &mut reference, tables[0]),
        Comparison::Same
    ));
    // Every worker got the rows COPY wrote into the reference table.
    for worker in &cluster.workers {
        let mut client = worker.connect();
        let shard = colors_shard(&mut client);
        let copied: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {shard} WHERE code IN ('y', 'w')"),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(copied, 2, "{shard} on {}", worker.port);
    }
}

/// Starts a two-node transaction that pauses at `point` in a session of its own; returns the
/// keys it inserts and the session's thread (which ends when the session is killed or done).
fn paused_transaction(
    cluster: &Cluster,
    point: &str,
    base: i32,
) -> (
    i32,
    i32,
    std::thread::JoinHandle<Result<(), postgres::Error>>,
) {
    let mut client = cluster.coordinator_client();
    let (key1, _) = key_on(&mut client, &cluster.workers[0], base);
    let (key2, _) = key_on(&mut client, &cluster.workers[1], base);
    let point = point.to_string();
    let conninfo = cluster.coordinator.conninfo();
    let handle = std::thread::spawn(move || {
        let mut session = Client::connect(&conninfo, postgres::NoTls)?;
        session.batch_execute(&format!(
            "SET pgdist.debug_pause_at = '{point}';
             BEGIN;
             INSERT INTO accounts VALUES ({key1}, 1), ({key2}, 1);
             COMMIT;"
        ))
    });
    (key1, key2, handle)
}

/// Waits until `check` holds (at most 30 s).
fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the coordinator backend that is paused at a debug point (a crash: the postmaster
/// restarts every process) and waits until the coordinator accepts connections again.
fn crash_paused_coordinator_backend(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    let mut pid = 0;
    wait_for("the paused session", || {
        pid = client
            .query_one(
                "SELECT coalesce(max(pid), 0) FROM pg_stat_activity WHERE query LIKE '%SET pgdist.debug_pause_at%' AND pid <> pg_backend_pid()",
                &[],
            )
            .map(|r| r.get(0))
            .unwrap_or(0);
        pid != 0
    });
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .output();
    wait_for("the crashed backend to be gone", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    wait_for("the coordinator to restart", || {
        Client::connect(&cluster.coordinator.conninfo(), postgres::NoTls)
            .and_then(|mut c| c.simple_query("SELECT 1"))
            .is_ok()
    });
}

fn recover(cluster: &Cluster) -> i64 {
    count(
        &mut cluster.coordinator_client(),
        "SELECT pgdist.recover_prepared_transactions()",
    )
}

/// The commit decisions recorded so far.
fn decisions(cluster: &Cluster) -> i64 {
    count(
        &mut cluster.coordinator_client(),
        "SELECT count(*) FROM pgdist.transaction_decision",
    )
}

fn coordinator_crash_after_commit_decision_is_committed_by_recovery(cluster: &Cluster) {
    recover(cluster);
    let (key1, key2, session) = paused_transaction(cluster, "before_commit_prepared", 5000);
    wait_for("the commit decision", || {
        decisions(cluster) == 2 && prepared_on_workers(cluster) == 2
    });
    crash_paused_coordinator_backend(cluster);
    assert!(session.join().unwrap().is_err());
    assert_eq!(prepared_on_workers(cluster), 2, "both nodes are in doubt");
    assert_eq!(recover(cluster), 2);
    let mut client = cluster.coordinator_client();
    assert_eq!(
        count(
            &mut client,
            &format!("SELECT count(*) FROM accounts WHERE id IN ({key1}, {key2})")
        ),
        2
    );
    assert_eq!(prepared_on_workers(cluster), 0);
    assert_eq!(recover(cluster), 0);
    assert_eq!(
        count(
            &mut client,
            "SELECT count(*) FROM pgdist.transaction_decision"
        ),
        0,
        "decisions are cleaned up"
    );
}

fn coordinator_crash_before_commit_decision_is_rolled_back_by_recovery(cluster: &Cluster) {
    recover(cluster);
    let (key1, key2, session) = paused_transaction(cluster, "after_prepare", 7000);
    wait_for("both nodes to prepare", || {
        prepared_on_workers(cluster) == 2
    });
    crash_paused_coordinator_backend(cluster);
    assert!(session.join().unwrap().is_err());
    assert_eq!(recover(cluster), 2);
    assert_eq!(prepared_on_workers(cluster), 0);
    assert_eq!(
        count(
            &mut cluster.coordinator_client(),
            &format!("SELECT count(*) FROM accounts WHERE id IN ({key1}, {key2})")
        ),
        0
    );
}

fn worker_crash_after_prepare_is_committed_once_it_is_back(cluster: &Cluster) {
    recover(cluster);
    let (key1, key2, session) = paused_transaction(cluster, "before_commit_prepared:3000", 9000);
    wait_for("the commit decision", || decisions(cluster) == 2);
    let worker = &cluster.workers[1];
    worker.crash();
    // The coordinator's COMMIT PREPARED fails on the dead worker: the client is told the
    // transaction committed (it did) and recovery finishes it.
    session.join().unwrap().unwrap();
    worker.ctl("start");
    assert_eq!(recover(cluster), 1);
    assert_eq!(prepared_on_workers(cluster), 0);
    assert_eq!(
        count(
            &mut cluster.coordinator_client(),
            &format!("SELECT count(*) FROM accounts WHERE id IN ({key1}, {key2})")
        ),
        2
    );
}

/// Sets `pgdist.recovery_interval` on the coordinator and waits until its daemon has it.
fn set_recovery_interval(cluster: &Cluster, value: &str) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(&format!(
            "ALTER SYSTEM SET pgdist.recovery_interval = '{value}'"
        ))
        .unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(300));
}

fn the_maintenance_daemon_recovers_without_being_asked(cluster: &Cluster) {
    recover(cluster);
    // Takes effect when the coordinator starts again (the running daemon must not commit the
    // paused transaction itself).
    cluster
        .coordinator_client()
        .batch_execute("ALTER SYSTEM SET pgdist.recovery_interval = '200ms'")
        .unwrap();
    let (key1, key2, session) = paused_transaction(cluster, "before_commit_prepared", 11000);
    wait_for("the commit decision", || {
        decisions(cluster) == 2 && prepared_on_workers(cluster) == 2
    });
    // The whole coordinator goes down, as a machine crash would, and starts again.
    cluster.coordinator.crash();
    assert!(session.join().unwrap().is_err());
    cluster.coordinator.ctl("start");
    // Nobody connects to the coordinator: its daemon starts with the server and commits the
    // transaction on both nodes, which release their locks.
    wait_for("the daemon to commit both nodes", || {
        prepared_on_workers(cluster) == 0
    });
    let mut client = cluster.coordinator_client();
    assert_eq!(
        count(
            &mut client,
            &format!("SELECT count(*) FROM accounts WHERE id IN ({key1}, {key2})")
        ),
        2
    );
    wait_for("the decisions to be cleaned up", || decisions(cluster) == 0);
    assert_eq!(
        count(
            &mut client,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pgdist maintenance' AND datname = current_database()"
        ),
        1
    );
    set_recovery_interval(cluster, "-1");
}

fn a_deadlock_across_two_nodes_cancels_exactly_one_transaction(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    let (key1, _) = key_on(&mut client, &cluster.workers[0], 13000);
    let (key2, _) = key_on(&mut client, &cluster.workers[1], 13000);
    client
        .execute(
            "INSERT INTO accounts VALUES ($1, 100), ($2, 100)",
            &[&key1, &key2],
        )
        .unwrap();
    // Each session locks its first row, then waits for the other session's row on the other
    // node: no single node sees the cycle.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(3));
    let sessions: Vec<_> = [(key1, key2), (key2, key1)]
        .into_iter()
        .map(|(first, second)| {
            let conninfo = cluster.coordinator.conninfo();
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<(), postgres::Error> {
                let mut session = Client::connect(&conninfo, postgres::NoTls)?;
                let mut tx = session.transaction()?;
                tx.execute(
                    "UPDATE accounts SET balance = balance - 1 WHERE id = $1",
                    &[&first],
                )?;
                barrier.wait();
                tx.execute(
                    "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                    &[&second],
                )?;
                tx.commit()
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    // While they wait, the view shows both transactions and the lock waits on the nodes.
    std::thread::sleep(Duration::from_millis(300));
    let waiting = count(
        &mut client,
        "SELECT count(DISTINCT coordinator_pid) FROM pgdist.distributed_transactions
         WHERE remote_wait_event LIKE 'Lock:%' AND coordinator_state = 'active'",
    );
    let outcomes: Vec<_> = sessions.into_iter().map(|s| s.join().unwrap()).collect();
    println!("deadlock resolved after {:?}", started.elapsed());
    assert_eq!(waiting, 2, "both transactions wait on a node");
    let errors: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one transaction is cancelled: {outcomes:?}"
    );
    assert_eq!(sqlstate(errors[0]), "40P01");
    assert!(
        format!("{:?}", errors[0]).contains("distributed deadlock"),
        "{:?}",
        errors[0]
    );
    assert_eq!(
        count(
            &mut client,
            &format!("SELECT sum(balance)::bigint FROM accounts WHERE id IN ({key1}, {key2})")
        ),
        200
    );
    assert_eq!(
        count(
            &mut client,
            "SELECT count(*) FROM pgdist.distributed_transactions"
        ),
        0
    );
}

fn select_for_update_locks_rows_on_the_workers_until_commit(cluster: &Cluster) {
    let mut setup = cluster.coordinator_client();
    setup
        .batch_execute(
            "CREATE TABLE seats (id int PRIMARY KEY, taken_by text);
             SELECT pgdist.create_distributed_table('seats', 'id', shard_count => 4);
             INSERT INTO seats SELECT i, NULL FROM generate_series(1, 10) i;",
        )
        .unwrap();
    let mut holder = cluster.coordinator_client();
    holder.batch_execute("BEGIN").unwrap();
    let locked = holder
        .query("SELECT id FROM seats WHERE id = 3 FOR UPDATE", &[])
        .unwrap();
    assert_eq!(locked.len(), 1);

    // Another session sees the lock: NOWAIT fails with the worker's 55P03, SKIP LOCKED skips
    // the row on every shard, and a plain update waits for the holder's commit.
    let mut other = cluster.coordinator_client();
    let err = other
        .query("SELECT * FROM seats WHERE id = 3 FOR UPDATE NOWAIT", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&err), "55P03", "{err:?}");
    let free: Vec<i32> = other
        .query(
            "SELECT id FROM seats WHERE id <= 5 ORDER BY id FOR NO KEY UPDATE SKIP LOCKED",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(free, vec![1, 2, 4, 5]);
    let conninfo = cluster.coordinator.conninfo();
    let waiter = std::thread::spawn(move || {
        let mut session = Client::connect(&conninfo, postgres::NoTls).unwrap();
        let started = Instant::now();
        session
            .execute(
                "UPDATE seats SET taken_by = taken_by || ' and waiter' WHERE id = 3",
                &[],
            )
            .unwrap();
        started.elapsed()
    });
    std::thread::sleep(Duration::from_millis(500));
    holder
        .batch_execute("UPDATE seats SET taken_by = 'holder' WHERE id = 3; COMMIT")
        .unwrap();
    let waited = waiter.join().unwrap();
    assert!(
        waited >= Duration::from_millis(400),
        "the update waited: {waited:?}"
    );
    let taken: String = setup
        .query_one("SELECT taken_by FROM seats WHERE id = 3", &[])
        .unwrap()
        .get(0);
    assert_eq!(taken, "holder and waiter");
    assert_eq!(prepared_on_workers(cluster), 0);

    // Shapes where the workers would lock other rows than PostgreSQL: refused, with a hint.
    for sql in [
        "SELECT * FROM seats ORDER BY id LIMIT 1 FOR UPDATE",
        "SELECT * FROM seats s JOIN notes n ON n.line = s.id FOR UPDATE OF s",
        "SELECT * FROM seats s JOIN stock_staging l ON l.id = s.id FOR UPDATE OF s",
        "SELECT * FROM seats WHERE id IN (SELECT id FROM seats WHERE id < 3 FOR UPDATE)",
        // A condition only the coordinator can test: the workers would lock every seat.
        "SELECT * FROM seats WHERE id::text = (random() * 0 + 3)::int::text FOR UPDATE",
    ] {
        let err = other.query(sql, &[]).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
        assert!(err.as_db_error().and_then(|e| e.hint()).is_some(), "{sql}");
    }
}

/// A join the workers run whole (co-located tables, reference tables) locks on each shard the
/// rows PostgreSQL would lock: those of the named tables that join, and no others.
fn row_locks_in_joins_lock_the_rows_postgres_locks(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE rooms (hotel int, room int, state text, PRIMARY KEY (hotel, room));
         CREATE TABLE stays (hotel int, room int, guest text);
         CREATE TABLE room_states (state text PRIMARY KEY, label text);
         INSERT INTO rooms SELECT i % 6, i, CASE WHEN i % 3 = 0 THEN 'free' ELSE 'taken' END
           FROM generate_series(1, 60) i;
         INSERT INTO stays SELECT i % 6, i, 'guest ' || i FROM generate_series(1, 60, 4) i;
         INSERT INTO room_states VALUES ('free', 'Free'), ('taken', 'Taken');",
    );
    coordinator
        .batch_execute(
            "SELECT pgdist.create_distributed_table('rooms', 'hotel', shard_count => 4);
             SELECT pgdist.create_distributed_table('stays', 'hotel', colocate_with => 'rooms');
             SELECT pgdist.create_reference_table('room_states');",
        )
        .unwrap();
    same_writes_to(
        cluster,
        &["SELECT * FROM rooms", "SELECT * FROM stays"],
        &[
            "BEGIN",
            "SELECT r.room, s.guest FROM rooms r JOIN stays s USING (hotel, room) WHERE hotel = 3 FOR UPDATE",
            "SELECT r.room, t.label FROM rooms r JOIN room_states t USING (state) WHERE r.room < 20 FOR UPDATE OF r NOWAIT",
            "SELECT r.room FROM rooms r LEFT JOIN stays s USING (hotel, room) WHERE s.guest IS NULL FOR SHARE OF r",
            "SELECT room FROM rooms r WHERE hotel IN (SELECT hotel FROM stays WHERE guest = 'guest 5') FOR NO KEY UPDATE",
            "UPDATE rooms SET state = 'taken' FROM stays s WHERE s.hotel = rooms.hotel AND s.room = rooms.room",
            "SELECT * FROM rooms WHERE hotel = 2 AND state = 'free' ORDER BY room LIMIT 2 OFFSET 1 FOR UPDATE",
            "SELECT r.room FROM rooms r JOIN stays s USING (hotel, room) WHERE hotel = 5 ORDER BY room DESC LIMIT 1 FOR UPDATE OF r",
            "COMMIT",
        ],
    );
    // A queue per hotel: each taker locks just the row it gets, the next one skips it.
    let queue =
        "SELECT room FROM rooms WHERE hotel = 4 ORDER BY room LIMIT 1 FOR UPDATE SKIP LOCKED";
    let mut first = cluster.coordinator_client();
    let mut second = cluster.coordinator_client();
    first.batch_execute("BEGIN").unwrap();
    second.batch_execute("BEGIN").unwrap();
    let taken: i32 = first.query_one(queue, &[]).unwrap().get(0);
    let next: i32 = second.query_one(queue, &[]).unwrap().get(0);
    assert_eq!((taken, next), (4, 10));
    first.batch_execute("COMMIT").unwrap();
    second.batch_execute("COMMIT").unwrap();
    // Locked: the rooms with a stay at hotel 1 (rows 1, 13, 25, 37, 49 of rooms), not the stays.
    let mut holder = cluster.coordinator_client();
    holder.batch_execute("BEGIN").unwrap();
    let locked = holder
        .query(
            "SELECT r.room FROM rooms r JOIN stays s USING (hotel, room) WHERE hotel = 1 FOR UPDATE OF r",
            &[],
        )
        .unwrap();
    assert_eq!(locked.len(), 5);
    let mut other = cluster.coordinator_client();
    let free: Vec<i32> = other
        .query(
            "SELECT room FROM rooms WHERE hotel = 1 ORDER BY room FOR UPDATE SKIP LOCKED",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(free, vec![7, 19, 31, 43, 55]);
    let stays = other
        .query("SELECT * FROM stays WHERE hotel = 1 FOR UPDATE NOWAIT", &[])
        .unwrap();
    assert_eq!(stays.len(), 5);
    let err = other
        .query(
            "SELECT * FROM rooms WHERE hotel = 1 AND room = 13 FOR UPDATE NOWAIT",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&err), "55P03", "{err:?}");
    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(prepared_on_workers(cluster), 0);
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DROP TABLE rooms; DROP TABLE stays; DROP TABLE room_states",
    );
}

fn bank_transfers_stay_exact_while_a_worker_keeps_crashing(cluster: &Cluster) {
    const ACCOUNTS: i32 = 40;
    const CLIENTS: usize = 4;
    let mut client = cluster.coordinator_client();
    client
        .execute(
            "INSERT INTO bank SELECT g, 1000 FROM generate_series(1, $1) g",
            &[&ACCOUNTS],
        )
        .unwrap();
    set_recovery_interval(cluster, "500ms");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS as i64)
        .map(|c| {
            let conninfo = cluster.coordinator.conninfo();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut session = Client::connect(&conninfo, postgres::NoTls).unwrap();
                let (mut acknowledged, mut unknown, mut failed) = (Vec::new(), Vec::new(), 0);
                let mut n: i64 = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let id = c * 1_000_000 + n;
                    let source = (id * 7 % i64::from(ACCOUNTS)) as i32 + 1;
                    let target = (id * 13 % i64::from(ACCOUNTS)) as i32 + 1;
                    let amount = id % 50 + 1;
                    let transfer = (|| -> Result<(), postgres::Error> {
                        let mut tx = session.transaction()?;
                        tx.execute(
                            "UPDATE bank SET balance = balance - $2 WHERE id = $1",
                            &[&source, &amount],
                        )?;
                        tx.execute(
                            "UPDATE bank SET balance = balance + $2 WHERE id = $1",
                            &[&target, &amount],
                        )?;
                        tx.execute(
                            "INSERT INTO transfers VALUES ($1, $2, $3, $4)",
                            &[&id, &source, &target, &amount],
                        )?;
                        tx.commit()
                    })();
                    match transfer {
                        Ok(()) => acknowledged.push(id),
                        // A one-phase commit whose node died after COMMIT was sent.
                        Err(err) if sqlstate(&err) == "08007" => unknown.push(id),
                        Err(err) => {
                            failed += 1;
                            assert!(
                                !sqlstate(&err).starts_with("XX"),
                                "transfer {id} failed badly: {err:?}"
                            );
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                (acknowledged, unknown, failed)
            })
        })
        .collect();
    let worker = &cluster.workers[1];
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        worker.crash();
        std::thread::sleep(Duration::from_millis(500));
        worker.ctl("start");
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acknowledged, mut unknown) = (Vec::new(), Vec::new());
    let mut failed = 0;
    for handle in clients {
        let (ids, unknown_ids, errors) = handle.join().unwrap();
        acknowledged.extend(ids);
        unknown.extend(unknown_ids);
        failed += errors;
    }
    println!(
        "bank: {} transfers acknowledged, {failed} failed while the worker was down, {} with \
         an unknown outcome",
        acknowledged.len(),
        unknown.len()
    );
    assert!(acknowledged.len() > 50, "the workload made progress");
    wait_for("nothing left in doubt", || {
        prepared_on_workers(cluster) == 0
    });
    set_recovery_interval(cluster, "-1");
    assert_eq!(
        count(&mut client, "SELECT sum(balance)::bigint FROM bank"),
        i64::from(ACCOUNTS) * 1000,
        "money is neither created nor lost"
    );
    let mut stored: Vec<i64> = client
        .query("SELECT id FROM transfers", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Exactly the acknowledged transfers, plus perhaps some whose outcome was reported
    // unknown; never one that was reported failed.
    stored.retain(|id| !unknown.contains(id));
    stored.sort_unstable();
    acknowledged.sort_unstable();
    assert_eq!(
        stored, acknowledged,
        "exactly the acknowledged transfers are stored"
    );
    // Every balance is explained by the stored transfers.
    assert_eq!(
        count(
            &mut client,
            "SELECT count(*) FROM bank b WHERE b.balance <> 1000
               - coalesce((SELECT sum(amount) FROM transfers WHERE source = b.id), 0)
               + coalesce((SELECT sum(amount) FROM transfers WHERE target = b.id), 0)"
        ),
        0
    );
}

/// Writes under row-level security and views' check options, as another role: UPDATE and
/// DELETE change only the rows their policies let them (and a condition of the statement
/// that could leak a hidden row never sees one), INSERT and UPDATE refuse new rows that fail
/// a policy's WITH CHECK or a view's CHECK OPTION with PostgreSQL's own error, and nothing of
/// a refused statement stays behind.
/// Foreign keys between co-located tables and to reference tables, declared before the tables
/// were distributed (in the order a schema is usually written): every check and every ON
/// DELETE / ON UPDATE action happens as on one server.
fn foreign_keys_are_enforced_as_plain_postgres_enforces_them(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE fk_regions (code text PRIMARY KEY, name text);
         CREATE TABLE fk_countries (code text PRIMARY KEY,
                                    region text REFERENCES fk_regions (code) ON DELETE RESTRICT);
         CREATE TABLE fk_customers (id int PRIMARY KEY, name text,
                                    country text REFERENCES fk_countries (code) ON UPDATE CASCADE);
         CREATE TABLE fk_orders (customer int REFERENCES fk_customers (id) ON DELETE CASCADE,
                                 id int, amount int, PRIMARY KEY (customer, id));
         CREATE TABLE fk_lines (customer int, order_id int, line int, qty int,
                                PRIMARY KEY (customer, order_id, line),
                                FOREIGN KEY (customer, order_id) REFERENCES fk_orders (customer, id)
                                  ON DELETE CASCADE DEFERRABLE);
         CREATE TABLE fk_staging (customer int, id int, amount int);",
    );
    coordinator
        .batch_execute(
            "SELECT pgdist.create_reference_table('fk_regions');
             SELECT pgdist.create_reference_table('fk_countries');
             SELECT pgdist.create_distributed_table('fk_customers', 'id', shard_count => 4, colocate_with => 'none');
             SELECT pgdist.create_distributed_table('fk_orders', 'customer', colocate_with => 'fk_customers');
             SELECT pgdist.create_distributed_table('fk_lines', 'customer', colocate_with => 'fk_customers');
             SELECT pgdist.create_distributed_table('fk_staging', 'customer', colocate_with => 'fk_customers');",
        )
        .unwrap();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "INSERT INTO fk_regions VALUES ('eu', 'Europe'), ('as', 'Asia'), ('af', 'Africa');
         INSERT INTO fk_countries VALUES ('nl', 'eu'), ('fr', 'eu'), ('jp', 'as'), ('ke', NULL);
         INSERT INTO fk_customers SELECT i, 'c' || i, (ARRAY['nl', 'fr', 'jp', NULL])[i % 4 + 1]
           FROM generate_series(1, 40) i;
         INSERT INTO fk_orders SELECT i % 30 + 1, i, i * 3 FROM generate_series(1, 120) i;
         INSERT INTO fk_lines SELECT customer, id, l, l FROM fk_orders, generate_series(1, 3) l;
         INSERT INTO fk_staging SELECT i % 50 + 1, 1000 + i, i FROM generate_series(1, 60) i;",
    );
    let tables = [
        "SELECT * FROM fk_countries",
        "SELECT * FROM fk_customers",
        "SELECT * FROM fk_orders",
        "SELECT * FROM fk_lines",
    ];
    same_writes_to(
        cluster,
        &tables,
        &[
            // Checks on insert and update, one row or many, on any shard.
            "INSERT INTO fk_orders VALUES (99, 1, 1)",
            "INSERT INTO fk_orders VALUES (1, 500, 1), (2, 501, 1), (77, 502, 1)",
            "INSERT INTO fk_orders VALUES (1, 500, 1), (2, 501, 1)",
            "INSERT INTO fk_customers VALUES (50, 'x', 'de')",
            "INSERT INTO fk_customers VALUES (50, 'x', 'ke') RETURNING *",
            "UPDATE fk_customers SET country = 'xx' WHERE id = 3",
            "UPDATE fk_customers SET country = 'jp' WHERE id % 7 = 0",
            "INSERT INTO fk_orders SELECT * FROM fk_staging",
            "INSERT INTO fk_orders SELECT * FROM fk_staging WHERE customer <= 40",
            "INSERT INTO fk_lines VALUES (5, 9999, 1, 1)",
            "INSERT INTO fk_orders VALUES (4, 600, 0) ON CONFLICT DO NOTHING",
            "MERGE INTO fk_orders o USING fk_staging s ON o.customer = s.customer AND o.id = s.id + 100 \
               WHEN NOT MATCHED THEN INSERT VALUES (s.customer, s.id + 100, s.amount)",
            // ON DELETE CASCADE through two levels, NO ACTION and RESTRICT.
            "DELETE FROM fk_customers WHERE id IN (3, 4, 5)",
            "DELETE FROM fk_orders WHERE customer = 6 AND id % 2 = 0",
            "DELETE FROM fk_customers WHERE id > 25 RETURNING id",
            "DELETE FROM fk_countries WHERE code = 'nl'",
            "DELETE FROM fk_countries WHERE code = 'ke'",
            "DELETE FROM fk_regions WHERE code = 'eu'",
            "DELETE FROM fk_regions WHERE code = 'af'",
            // ON UPDATE CASCADE from a reference table into the distributed shards of every node.
            "UPDATE fk_countries SET code = 'fr2' WHERE code = 'fr'",
            "UPDATE fk_regions SET code = 'eu2' WHERE code = 'eu'",
            // Deferred checks run at commit (PREPARE on the workers).
            "BEGIN",
            "SET CONSTRAINTS ALL DEFERRED",
            "INSERT INTO fk_lines VALUES (7, 700, 1, 1)",
            "INSERT INTO fk_orders VALUES (7, 700, 1)",
            "COMMIT",
            "BEGIN",
            "SET CONSTRAINTS ALL DEFERRED",
            "INSERT INTO fk_lines VALUES (8, 800, 1, 1)",
            "COMMIT",
            // A failed check in a transaction aborts it everywhere.
            "INSERT INTO fk_orders VALUES (9, 900, 1); INSERT INTO fk_orders VALUES (999, 901, 1)",
            // SET CONSTRAINTS ALL IMMEDIATE checks what was deferred, on the nodes too; a
            // rolled-back savepoint takes back what SET CONSTRAINTS did in it.
            "BEGIN",
            "SET CONSTRAINTS ALL DEFERRED",
            "INSERT INTO fk_lines VALUES (9, 901, 1, 1)",
            "SAVEPOINT s",
            "SET CONSTRAINTS ALL IMMEDIATE",
            "ROLLBACK TO SAVEPOINT s",
            "INSERT INTO fk_orders VALUES (9, 901, 1)",
            "COMMIT",
            "BEGIN",
            "SAVEPOINT s",
            "SET CONSTRAINTS ALL DEFERRED",
            "ROLLBACK TO SAVEPOINT s",
            "INSERT INTO fk_lines VALUES (10, 903, 1, 1)",
            "ROLLBACK",
            "BEGIN",
            "SET CONSTRAINTS ALL DEFERRED",
            "INSERT INTO fk_lines VALUES (10, 904, 1, 1)",
            "SET CONSTRAINTS ALL IMMEDIATE",
            "ROLLBACK",
            // TRUNCATE as PostgreSQL allows it.
            "TRUNCATE fk_customers",
            "TRUNCATE fk_orders, fk_lines",
            "TRUNCATE fk_customers CASCADE",
        ],
    );
    // A WITH query whose delete cascades to a table the statement reads would show the
    // cascade, which PostgreSQL hides until the statement ends: refused, nothing changes.
    coordinator
        .batch_execute("INSERT INTO fk_customers VALUES (2, 'c2', 'jp'); INSERT INTO fk_orders VALUES (2, 1, 1)")
        .unwrap();
    let err = coordinator
        .batch_execute("WITH d AS (DELETE FROM fk_customers WHERE id = 2 RETURNING id) SELECT count(*) FROM fk_orders")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    assert_eq!(count(&mut coordinator, "SELECT count(*) FROM fk_orders"), 1);
}

fn row_level_security_applies_to_writes(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE ROLE clerk NOLOGIN;
         CREATE TABLE ledger (tenant int NOT NULL, id int NOT NULL, scratch int, secret int,
                              note text, PRIMARY KEY (tenant, id));
         ALTER TABLE ledger DROP COLUMN scratch;
         CREATE TABLE clerks (tenant int, clerk text);
         INSERT INTO ledger SELECT g % 4, g, g % 30, 'n' || g FROM generate_series(1, 200) g;
         INSERT INTO ledger VALUES (2, 1000, 100000, 'hidden'), (1, 1001, 100000, 'big'),
                                   (1, 1002, 5, 'frozen');
         INSERT INTO clerks VALUES (3, 'clerk'), (1, 'someone'), (0, 'clerk');
         CREATE TABLE ledger_stage (tenant int NOT NULL, id int, secret int, note text);
         INSERT INTO ledger_stage SELECT g % 4, g, g, 's' || g FROM generate_series(90, 110) g;
         INSERT INTO ledger_stage VALUES (1, 1002, 1, 'x'), (2, 2, 1, 'other');
         CREATE TABLE limits (tenant int, cap int);
         INSERT INTO limits VALUES (1, 7), (2, 0), (3, 9);
         ALTER TABLE clerks ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own_rows ON clerks USING (clerk = current_user);
         ALTER TABLE limits ENABLE ROW LEVEL SECURITY;
         CREATE POLICY positive ON limits USING (cap > 0);
         ALTER TABLE ledger ENABLE ROW LEVEL SECURITY;
         CREATE POLICY read_own ON ledger FOR SELECT
           USING (tenant = current_setting('app.tenant', true)::int);
         CREATE POLICY add_own ON ledger FOR INSERT
           WITH CHECK (tenant = current_setting('app.tenant', true)::int AND secret < 500);
         CREATE POLICY change_own ON ledger FOR UPDATE
           USING (tenant = current_setting('app.tenant', true)::int) WITH CHECK (secret < 600);
         CREATE POLICY change_assigned ON ledger FOR UPDATE
           USING (tenant IN (SELECT c.tenant FROM clerks c WHERE c.clerk = current_user));
         CREATE POLICY read_assigned ON ledger FOR SELECT
           USING (tenant IN (SELECT c.tenant FROM clerks c WHERE c.clerk = current_user));
         CREATE POLICY not_frozen ON ledger AS RESTRICTIVE FOR UPDATE USING (note <> 'frozen');
         CREATE POLICY drop_small ON ledger FOR DELETE
           USING (tenant = current_setting('app.tenant', true)::int AND secret < 10);
         CREATE VIEW small_ledger AS SELECT * FROM ledger WHERE secret < 100 WITH CHECK OPTION;
         GRANT ALL ON ledger, small_ledger TO clerk;
         CREATE VIEW every_clerk AS SELECT * FROM clerks;
         GRANT SELECT ON clerks, limits, ledger_stage, every_clerk TO clerk;",
    );
    coordinator
        .batch_execute(
            "SELECT pgdist.create_distributed_table('ledger', 'tenant', shard_count => 4);
             SELECT pgdist.create_reference_table('clerks');",
        )
        .unwrap();
    let as_clerk =
        |tenant: i32, sql: &str| format!("SET ROLE clerk; SET app.tenant = '{tenant}'; {sql}");
    // Each statement run as the clerk of a tenant, compared with plain PostgreSQL.
    let same_as_clerk = |tables: &[&str], statements: &[(i32, &str)]| {
        let statements: Vec<String> = statements
            .iter()
            .map(|(tenant, sql)| as_clerk(*tenant, sql))
            .collect();
        let statements: Vec<&str> = statements.iter().map(String::as_str).collect();
        same_writes_to(cluster, tables, &statements);
    };
    same_as_clerk(&["RESET ROLE; SELECT * FROM ledger ORDER BY tenant, id"], &[
        (1, "INSERT INTO ledger VALUES (1, 2000, 5, 'new')"),
        (1, "INSERT INTO ledger VALUES (1, 2001, 5, 'a'), (1, 2002, 7, 'b') RETURNING id, secret"),
        (1, "INSERT INTO ledger VALUES (2, 2003, 5, 'other tenant')"),
        (1, "INSERT INTO ledger VALUES (1, 2004, 501, 'too secret')"),
        (1, "INSERT INTO ledger SELECT 1, 3000 + g, g * 20, 'bulk' FROM generate_series(1, 30) g"),
        (1, "INSERT INTO ledger SELECT 1, 3000 + g, g, 'bulk' FROM generate_series(1, 30) g"),
        (1, "INSERT INTO ledger SELECT tenant, id + 10000, secret, note FROM ledger WHERE id BETWEEN 3001 AND 3010"),
        (1, "INSERT INTO ledger VALUES (1, 2000, 5, 'again') ON CONFLICT DO NOTHING"),
        (1, "UPDATE ledger SET secret = secret + 1 WHERE id > 2990 RETURNING id, secret"),
        // Fails on the hidden row of tenant 2 if it ever sees it; on tenant 1's own big one
        // as in PostgreSQL.
        (2, "UPDATE ledger SET note = 'seen' WHERE secret::smallint >= 0"),
        (1, "UPDATE ledger SET note = 'seen' WHERE secret::smallint >= 0"),
        (1, "UPDATE ledger SET secret = 700 WHERE id = 3001"),
        (1, "UPDATE ledger SET note = 'not mine' WHERE tenant = 2"),
        (3, "UPDATE ledger SET note = 'assigned ' || id WHERE id % 10 = 3"),
        (3, "UPDATE ledger SET note = 'joined' FROM clerks c WHERE c.tenant = ledger.tenant AND ledger.id < 40"),
        (1, "DELETE FROM ledger WHERE id < 60 AND secret::smallint >= 0 RETURNING id"),
        // The policies of the other tables an UPDATE or DELETE reads (a reference table, a
        // local table of the coordinator), also in a subquery.
        (3, "UPDATE ledger SET note = 'via ' || c.clerk FROM clerks c WHERE c.tenant = ledger.tenant AND ledger.id < 100"),
        (1, "UPDATE ledger SET secret = l.cap FROM limits l WHERE l.tenant = ledger.tenant AND ledger.id BETWEEN 100 AND 120"),
        (2, "UPDATE ledger SET secret = l.cap FROM limits l WHERE l.tenant = ledger.tenant AND ledger.id < 100"),
        (3, "UPDATE ledger SET note = 'sub' WHERE id IN (SELECT tenant * 10 + 1 FROM clerks)"),
        (1, "DELETE FROM ledger USING limits l WHERE l.tenant = ledger.tenant AND ledger.secret::smallint < 3"),
        // New rows checked when RETURNING also reads another table (after a dropped column).
        (1, "UPDATE ledger SET secret = 700 FROM limits l WHERE l.tenant = ledger.tenant AND ledger.id = 3003 RETURNING l.cap"),
        (1, "UPDATE ledger SET secret = 8 FROM limits l WHERE l.tenant = ledger.tenant AND ledger.id = 3003 RETURNING l.cap, ledger.note"),
        (2, "DELETE FROM ledger WHERE id > 100"),
        // Upserts: INSERT's check on the proposed row (coordinator), UPDATE's USING on the
        // conflicting row and its WITH CHECK on the new one (shards).
        (1, "INSERT INTO ledger VALUES (1, 2000, 5, 'up') ON CONFLICT (tenant, id) DO UPDATE SET note = excluded.note, secret = ledger.secret + 1 RETURNING *"),
        (1, "INSERT INTO ledger VALUES (1, 2001, 5, 'up') ON CONFLICT (tenant, id) DO UPDATE SET secret = 700"),
        (3, "INSERT INTO ledger VALUES (3, 3, 5, 'x') ON CONFLICT (tenant, id) DO UPDATE SET secret = 700"),
        (1, "INSERT INTO ledger VALUES (2, 2, 5, 'x') ON CONFLICT (tenant, id) DO UPDATE SET note = 'x'"),
        (1, "INSERT INTO ledger VALUES (1, 1002, 5, 'x') ON CONFLICT (tenant, id) DO UPDATE SET note = 'x'"),
        (1, "INSERT INTO ledger VALUES (1, 1002, 5, 'x') ON CONFLICT (tenant, id) DO UPDATE SET note = 'x' WHERE ledger.secret > 5"),
        (1, "INSERT INTO ledger SELECT 1, g, 3, 'bulk' FROM generate_series(20, 40) g ON CONFLICT (tenant, id) DO UPDATE SET note = 'bulk ' || excluded.id WHERE ledger.secret > 3 RETURNING id, note"),
        (1, "UPDATE ledger SET note = 'thawed' WHERE id = 1002"),
        // MERGE: the target's policies on the shards, each action's checks once chosen.
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED AND s.secret > 100 THEN UPDATE SET secret = l.secret + 1 WHEN NOT MATCHED AND s.tenant = 1 THEN INSERT VALUES (s.tenant, s.id, s.secret, s.note)"),
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED AND s.id = 1002 THEN UPDATE SET note = 'thaw'"),
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED AND s.id = 97 THEN UPDATE SET secret = 700"),
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN NOT MATCHED AND s.tenant = 2 THEN INSERT VALUES (s.tenant, s.id, s.secret, s.note)"),
        (2, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id AND 100 / (l.secret + 1) >= 0 WHEN MATCHED AND l.secret < 10 THEN DELETE"),
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED AND l.secret < 10 THEN DELETE WHEN MATCHED THEN UPDATE SET note = 'kept'"),
        // A source with policies, read with them by the coordinator (as the user, or through
        // a view as its owner, who sees every row).
        (3, "MERGE INTO ledger l USING clerks c ON l.tenant = c.tenant AND l.id BETWEEN 20 AND 30 WHEN MATCHED THEN UPDATE SET note = 'by ' || c.clerk"),
        (3, "MERGE INTO ledger l USING (SELECT tenant, 5000 + tenant AS id FROM clerks WHERE tenant > 0) c ON l.tenant = c.tenant AND l.id = c.id WHEN NOT MATCHED THEN INSERT VALUES (c.tenant, c.id, 1, 'from clerks')"),
        (3, "MERGE INTO ledger l USING every_clerk c ON l.tenant = c.tenant AND l.id BETWEEN 30 AND 40 WHEN MATCHED THEN UPDATE SET note = 'seen by ' || c.clerk"),
        (1, "UPDATE small_ledger SET secret = 150 WHERE id = 3002"),
        (1, "UPDATE small_ledger SET secret = 50 WHERE id = 3002 RETURNING id, secret"),
        (1, "INSERT INTO small_ledger VALUES (1, 4000, 200, 'v')"),
        (1, "INSERT INTO small_ledger VALUES (1, 4001, 20, 'v')"),
    ]);
    // PostgreSQL's own messages.
    for (sql, message) in [
        (
            "INSERT INTO ledger VALUES (1, 5000, 900, 'x')",
            "new row violates row-level security policy for table \"ledger\"",
        ),
        (
            "UPDATE small_ledger SET secret = 150 WHERE id = 3003",
            "new row violates check option for view \"small_ledger\"",
        ),
        (
            "INSERT INTO ledger VALUES (1, 1002, 5, 'x') ON CONFLICT (tenant, id) DO UPDATE SET note = 'x'",
            "new row violates row-level security policy \"not_frozen\" (USING expression) for table \"ledger\"",
        ),
    ] {
        let err = coordinator.batch_execute(&as_clerk(1, sql)).unwrap_err();
        let db = err.as_db_error().expect("a server error");
        assert_eq!(db.message(), message, "{sql}");
        coordinator.batch_execute("RESET ROLE").unwrap();
    }
    // In a transaction, with parameters (a prepared statement with a generic plan).
    let mut tx = coordinator.transaction().unwrap();
    tx.batch_execute("SET LOCAL ROLE clerk; SET LOCAL app.tenant = '1'")
        .unwrap();
    let bump = tx
        .prepare("UPDATE ledger SET secret = secret + $2 WHERE id = $1")
        .unwrap();
    let changed: Vec<u64> = [
        (3004, 1),
        (3005, 1),
        (1000, 1),
        (3006, 1),
        (3007, 1),
        (3008, 1),
    ]
    .iter()
    .map(|(id, by)| tx.execute(&bump, &[id, by]).unwrap())
    .collect();
    assert_eq!(changed, vec![1, 1, 0, 1, 1, 1], "row 1000 is tenant 2's");
    let err = tx.execute(&bump, &[&3009, &1000]).unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err:?}");
    tx.rollback().unwrap();
    // UPDATE … FROM pinned to a tenant by a value the coordinator computes.
    coordinator
        .batch_execute("RESET ROLE; SET app.tenant = '3'")
        .unwrap();
    let pinned = coordinator
        .execute(
            "UPDATE ledger SET note = note FROM clerks c
              WHERE ledger.tenant = current_setting('app.tenant')::int AND c.tenant = ledger.tenant",
            &[],
        )
        .unwrap();
    let expected = count(
        &mut coordinator,
        "SELECT count(*) FROM ledger WHERE tenant = 3",
    );
    assert_eq!(pinned as i64, expected);
    // COPY as the clerk: FROM is refused as PostgreSQL refuses it (it would bypass the
    // policies' WITH CHECK); TO returns the rows the policies show.
    let copy_out = |client: &mut Client| {
        use std::io::Read;
        let mut text = String::new();
        client
            .copy_out("COPY ledger TO STDOUT")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.sort();
        lines
    };
    for client in [&mut coordinator, &mut reference] {
        client
            .batch_execute("SET ROLE clerk; SET app.tenant = '1'")
            .unwrap();
    }
    assert_eq!(copy_out(&mut coordinator), copy_out(&mut reference));
    for client in [&mut coordinator, &mut reference] {
        let refused = copy_into(client, "COPY ledger FROM STDIN", b"1\t7777\t1\tx\n");
        assert_eq!(refused, Err("0A000".to_string()));
    }
    let (mut coordinator, mut reference) =
        (cluster.coordinator_client(), cluster.reference.connect());
    // A MERGE into the table with row triggers runs row by row: each action's USING checks on
    // the target row in the shards' statement, the WITH CHECK ones on the coordinator on the
    // row the BEFORE triggers leave (a trigger that raises `secret` fails them).
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE ledger_log (what text);
         GRANT INSERT, SELECT ON ledger_log TO clerk;
         CREATE FUNCTION ledger_row() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF TG_WHEN = 'AFTER' THEN
             INSERT INTO ledger_log VALUES (TG_OP || ' ' || coalesce(OLD::text, '') || ' ' || coalesce(NEW::text, ''));
             RETURN NULL;
           END IF;
           IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
           IF NEW.note = 'skip' THEN RETURN NULL; END IF;
           IF NEW.note = 'bump' THEN NEW.secret := NEW.secret + 550; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER ledger_before BEFORE INSERT OR UPDATE OR DELETE ON ledger
           FOR EACH ROW EXECUTE FUNCTION ledger_row();
         CREATE TRIGGER ledger_after AFTER INSERT OR UPDATE OR DELETE ON ledger
           FOR EACH ROW EXECUTE FUNCTION ledger_row();
         UPDATE ledger_stage SET note = CASE WHEN id % 3 = 0 THEN 'skip' WHEN id % 4 = 1 THEN 'bump' ELSE note END;",
    );
    coordinator
        .batch_execute("SELECT pgdist.create_reference_table('ledger_log')")
        .unwrap();
    let tables = [
        "RESET ROLE; SELECT * FROM ledger ORDER BY tenant, id",
        "RESET ROLE; SELECT * FROM ledger_log ORDER BY 1",
    ];
    same_as_clerk(&tables, &[
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED AND s.secret > 100 THEN UPDATE SET secret = l.secret + 1 WHEN NOT MATCHED AND s.tenant = 1 AND s.note <> 'bump' THEN INSERT VALUES (s.tenant, s.id, s.secret, s.note)"),
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED AND s.id <> 1002 AND s.note <> 'bump' THEN UPDATE SET note = s.note"),
        // The trigger raises the secret of 'bump' rows: within UPDATE's policy from 7, past
        // it from 60 (which the policy allows before the trigger), past INSERT's for new rows.
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED AND s.id = 97 THEN UPDATE SET note = s.note"),
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED AND s.id = 101 THEN UPDATE SET note = s.note, secret = 60"),
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id + 8000 WHEN NOT MATCHED AND s.tenant = 1 AND s.note <> 'bump' THEN INSERT VALUES (s.tenant, s.id + 8000, s.secret, s.note)"),
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id + 9000 WHEN NOT MATCHED AND s.tenant = 1 THEN INSERT VALUES (s.tenant, s.id + 9000, s.secret, s.note)"),
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN NOT MATCHED AND s.tenant = 2 THEN INSERT VALUES (s.tenant, s.id, s.secret, 'other')"),
        // USING checks on the target row: the frozen row, DELETE's policy.
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED AND s.id = 1002 THEN UPDATE SET note = 'thaw'"),
        (1, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED AND l.secret < 10 AND s.id <> 1002 THEN DELETE WHEN MATCHED AND s.id <> 1002 THEN UPDATE SET note = 'kept'"),
        (2, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED THEN DELETE"),
        (2, "MERGE INTO ledger l USING ledger_stage s ON l.tenant = s.tenant AND l.id = s.id WHEN MATCHED AND l.secret < 10 THEN DELETE"),
    ]);
    for client in [&mut coordinator, &mut reference] {
        client
            .batch_execute(
                "DROP VIEW small_ledger;
                 DROP TABLE ledger, clerks, limits, ledger_stage, ledger_log CASCADE;
                 DROP FUNCTION ledger_row(); DROP ROLE clerk",
            )
            .unwrap();
    }
}

const TRIGGER_SCHEMA: &str = "
CREATE TABLE tr_items (id int PRIMARY KEY, name text, qty int, note text,
                       total int GENERATED ALWAYS AS (qty * 2) STORED);
CREATE TABLE tr_codes (code text PRIMARY KEY, label text);
CREATE TABLE tr_audit (seq bigserial, op text, old_row text, new_row text);
CREATE TABLE tr_sums (what text, n bigint, s bigint);
CREATE FUNCTION tr_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.qty < 0 THEN RETURN NULL; END IF;
  IF NEW.qty = 666 THEN RAISE EXCEPTION 'qty 666 for %', NEW.id USING ERRCODE = 'check_violation'; END IF;
  NEW.note := TG_OP || ':' || coalesce(NEW.name, '?');
  NEW.name := upper(NEW.name);
  RETURN NEW;
END $$;
CREATE FUNCTION tr_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO tr_audit (op, old_row, new_row) VALUES (
    TG_TABLE_NAME || ' ' || TG_NAME || ' ' || TG_OP || ' ' || TG_WHEN || ' ' || TG_LEVEL,
    CASE WHEN TG_LEVEL = 'ROW' AND TG_OP <> 'INSERT' THEN OLD::text END,
    CASE WHEN TG_LEVEL = 'ROW' AND TG_OP <> 'DELETE' THEN NEW::text END);
  IF TG_OP = 'DELETE' AND TG_LEVEL = 'ROW' AND TG_WHEN = 'BEFORE' THEN
    IF OLD::text LIKE '%13%' THEN RETURN NULL; END IF;
    RETURN OLD;
  END IF;
  RETURN NEW;
END $$;
CREATE FUNCTION tr_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN
    INSERT INTO tr_sums SELECT TG_OP || ' old', count(*), sum(qty) FROM old_rows;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    INSERT INTO tr_sums SELECT TG_OP || ' new', count(*), sum(total) FROM new_rows;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER a_stamp BEFORE INSERT OR UPDATE ON tr_items FOR EACH ROW EXECUTE FUNCTION tr_stamp();
CREATE TRIGGER b_after AFTER INSERT OR UPDATE OR DELETE ON tr_items FOR EACH ROW EXECUTE FUNCTION tr_log();
CREATE TRIGGER c_before_delete BEFORE DELETE ON tr_items FOR EACH ROW EXECUTE FUNCTION tr_log();
CREATE TRIGGER d_statement BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON tr_items
  FOR EACH STATEMENT EXECUTE FUNCTION tr_log();
CREATE TRIGGER e_statement AFTER INSERT OR UPDATE OR DELETE ON tr_items FOR EACH STATEMENT EXECUTE FUNCTION tr_log();
CREATE TRIGGER f_qty AFTER UPDATE OF qty ON tr_items FOR EACH ROW
  WHEN (OLD.qty IS DISTINCT FROM NEW.qty) EXECUTE FUNCTION tr_log();
CREATE TRIGGER g_inserted AFTER INSERT ON tr_items REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION tr_count();
CREATE TRIGGER g_updated AFTER UPDATE ON tr_items REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION tr_count();
CREATE TRIGGER g_deleted AFTER DELETE ON tr_items REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION tr_count();
CREATE TRIGGER codes_log AFTER INSERT OR UPDATE OR DELETE ON tr_codes FOR EACH ROW EXECUTE FUNCTION tr_log();
INSERT INTO tr_items (id, name, qty) VALUES (1000, 'before distribution', 1);
";

fn triggers_fire_on_the_coordinator_as_plain_postgres_fires_them(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(&mut coordinator, &mut reference, TRIGGER_SCHEMA);
    run_on_both(
        &mut coordinator,
        &mut reference,
        "TRUNCATE tr_audit, tr_sums",
    );
    // Rows that move into the shards are not new writes: no trigger fires.
    coordinator
        .batch_execute(
            "SELECT pgdist.create_distributed_table('tr_items', 'id', shard_count => 4);
             SELECT pgdist.create_reference_table('tr_codes');
             SELECT pgdist.create_distributed_table('tr_audit', 'seq', shard_count => 2);
             SELECT pgdist.create_distributed_table('tr_sums', 'what', shard_count => 2);",
        )
        .unwrap();
    assert_eq!(count(&mut coordinator, "SELECT count(*) FROM tr_audit"), 0);
    let tables = [
        "SELECT * FROM tr_items",
        "SELECT * FROM tr_codes",
        "SELECT op, old_row, new_row FROM tr_audit",
        "SELECT * FROM tr_sums",
    ];
    same_writes_to(
        cluster,
        &tables,
        &[
            // BEFORE ROW triggers change rows or skip them; AFTER ROW triggers see them as
            // stored (generated column included); statement triggers and transition tables.
            "INSERT INTO tr_items (id, name, qty) VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', -1), (4, 'd', 13)",
            "INSERT INTO tr_items (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(10, 30) i",
            "INSERT INTO tr_items (id, name, qty) VALUES (5, 'e', 5), (6, NULL, -6) RETURNING *",
            "INSERT INTO tr_items (id, name, qty) VALUES (1, 'dup', 1), (7, 'g', 7) ON CONFLICT DO NOTHING",
            "INSERT INTO tr_items (id, name, qty) VALUES (8, 'h', 666)",
            // Upserts: BEFORE INSERT on every proposed row, then BEFORE / AFTER UPDATE on the
            // conflicting rows or AFTER INSERT on the new ones; a row changed twice fails.
            "INSERT INTO tr_items (id, name, qty) VALUES (1, 'up', 3), (200, 'new', 4), (201, 'skip', -2) \
               ON CONFLICT (id) DO UPDATE SET qty = excluded.qty + tr_items.qty, name = excluded.name",
            "INSERT INTO tr_items (id, name, qty) VALUES (2, 'x', 5) ON CONFLICT (id) DO UPDATE SET qty = excluded.qty \
               WHERE tr_items.qty > 100",
            "INSERT INTO tr_items (id, name, qty) VALUES (1, 'neg', 1) ON CONFLICT (id) DO UPDATE SET qty = -1 RETURNING *",
            "INSERT INTO tr_items (id, name, qty) VALUES (202, 'a', 1), (202, 'b', 2) ON CONFLICT (id) DO UPDATE SET qty = excluded.qty",
            "INSERT INTO tr_items (id, name, qty) VALUES (200, 'a', 1), (200, 'b', 2) ON CONFLICT (id) DO UPDATE SET qty = excluded.qty",
            "INSERT INTO tr_items AS t (id, name, qty) SELECT id, 'sel', 7 FROM tr_items WHERE id < 20 \
               ON CONFLICT ON CONSTRAINT tr_items_pkey DO UPDATE SET note = t.note || '+' RETURNING t.id, t.note, t.total",
            "INSERT INTO tr_items (id, name, qty) SELECT id + 100, name, qty FROM tr_items WHERE id < 20",
            "UPDATE tr_items SET qty = qty + 1 WHERE id = 1",
            "UPDATE tr_items SET name = 'zz' WHERE id > 20 AND id < 110",
            "UPDATE tr_items SET qty = -5 WHERE id = 2",
            "UPDATE tr_items SET qty = 666 WHERE id >= 10",
            "UPDATE tr_items SET qty = qty * 2, name = name || '!' WHERE id % 3 = 0 RETURNING id, name, qty, total",
            "UPDATE tr_items SET note = 'same' WHERE id = 5",
            "DELETE FROM tr_items WHERE id IN (4, 12, 14)",
            "DELETE FROM tr_items WHERE qty > 25 RETURNING id, total",
            "DELETE FROM tr_items WHERE id = 1000",
            // Transactions and savepoints take back what the triggers did too.
            "BEGIN",
            "UPDATE tr_items SET qty = 50 WHERE id = 5",
            "SAVEPOINT s",
            "DELETE FROM tr_items WHERE id < 10",
            "ROLLBACK TO SAVEPOINT s",
            "INSERT INTO tr_items (id, name, qty) VALUES (9, 'i', 9)",
            "COMMIT",
            "BEGIN",
            "DELETE FROM tr_items WHERE id = 9",
            "ROLLBACK",
            // Writes inside WITH fire their triggers.
            "WITH gone AS (DELETE FROM tr_items WHERE id = 5 RETURNING id, name) \
               INSERT INTO tr_codes SELECT 'c' || id, name FROM gone",
            // A reference table's triggers fire once, not once per node.
            "INSERT INTO tr_codes VALUES ('a', 'x'), ('b', 'y')",
            "UPDATE tr_codes SET label = 'z' WHERE code = 'b'",
            "DELETE FROM tr_codes WHERE code = 'a'",
            // An upsert into it: each copy locks its conflicting rows, the first one's decide.
            "INSERT INTO tr_codes VALUES ('b', 'upd'), ('q', 'new') \
               ON CONFLICT (code) DO UPDATE SET label = excluded.label || tr_codes.label RETURNING *",
            "INSERT INTO tr_codes VALUES ('q', 'again'), ('r', 'new') ON CONFLICT (code) \
               DO UPDATE SET label = excluded.label WHERE tr_codes.label = 'nomatch'",
            "INSERT INTO tr_codes VALUES ('r', 'one'), ('r', 'two') ON CONFLICT (code) DO UPDATE SET label = excluded.label",
            // UPDATE and DELETE reading other tables (one code per item: PostgreSQL would pick
            // any of several) and subqueries.
            "INSERT INTO tr_codes VALUES ('zz', 'zz')",
            "UPDATE tr_items t SET qty = t.qty + length(c.code) FROM tr_codes c WHERE upper(c.label) = t.name",
            "UPDATE tr_items SET note = (SELECT max(code) FROM tr_codes) WHERE id IN (SELECT id FROM tr_items WHERE qty > 20) RETURNING *",
            "UPDATE tr_items t SET qty = t.qty + 1 FROM tr_codes c WHERE upper(c.label) = t.name RETURNING t.id, c.code, t.qty",
            "DELETE FROM tr_items t USING tr_codes c WHERE c.code = 'zz' AND t.qty > 25 RETURNING t.id, c.code, t.total",
            // Switching triggers off and on, dropping them.
            "ALTER TABLE tr_items DISABLE TRIGGER USER",
            "UPDATE tr_items SET qty = 3 WHERE id = 3",
            "ALTER TABLE tr_items ENABLE TRIGGER USER",
            "ALTER TABLE tr_items DISABLE TRIGGER a_stamp",
            "UPDATE tr_items SET qty = -3 WHERE id = 7",
            "ALTER TABLE tr_items ENABLE TRIGGER a_stamp",
            "ALTER TRIGGER f_qty ON tr_items RENAME TO f_quantity",
            "DROP TRIGGER c_before_delete ON tr_items",
            "DELETE FROM tr_items WHERE id = 113",
            "TRUNCATE tr_items",
        ],
    );
    // COPY fires the same triggers as INSERT.
    run_on_both(
        &mut coordinator,
        &mut reference,
        "TRUNCATE tr_audit, tr_sums",
    );
    for (sql, data) in [
        (
            "COPY tr_items (id, name, qty) FROM STDIN",
            &b"60\tcopy\t1\n61\tskipped\t-3\n62\t\\N\t7\n"[..],
        ),
        (
            "COPY tr_items (id, name, qty) FROM STDIN (FORMAT csv)",
            &b"70,c70,4\n71,c71,666\n"[..],
        ),
    ] {
        assert_eq!(
            copy_into(&mut coordinator, sql, data),
            copy_into(&mut reference, sql, data),
            "{sql}"
        );
    }
    for table in tables {
        compare(&mut coordinator, &mut reference, table);
    }
    // A MERGE fires the row triggers too (more in merge_matches_plain_postgres).
    let merge =
        "MERGE INTO tr_items t USING (SELECT 61 AS id) s ON t.id = s.id WHEN MATCHED THEN DELETE";
    let counts =
        [&mut coordinator, &mut reference].map(|client| client.execute(merge, &[]).unwrap());
    assert_eq!(counts[0], counts[1], "{merge}");
    for table in tables {
        compare(&mut coordinator, &mut reference, table);
    }
    copies_agree(
        &mut coordinator,
        "tr_codes",
        "code || '':'' || label",
        "code",
    );
    // Only what the coordinator cannot fire as PostgreSQL does is refused, changing nothing.
    for sql in [
        "CREATE CONSTRAINT TRIGGER h_deferred AFTER INSERT ON tr_items DEFERRABLE INITIALLY DEFERRED \
           FOR EACH ROW EXECUTE FUNCTION tr_log()",
        "ALTER TABLE tr_items DISABLE TRIGGER ALL",
    ] {
        let err = coordinator.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
    }
    for table in tables {
        compare(&mut coordinator, &mut reference, table);
    }
    // A foreign key's action runs on the shards, where the referencing table's row triggers
    // would not fire: writes that would set it off are refused; others go on.
    coordinator
        .batch_execute(
            "CREATE TABLE tr_parents (id int PRIMARY KEY, label text);
             SELECT pgdist.create_distributed_table('tr_parents', 'id', colocate_with => 'tr_items');
             INSERT INTO tr_parents SELECT id, 'p' FROM tr_items;
             ALTER TABLE tr_items ADD FOREIGN KEY (id) REFERENCES tr_parents (id) ON DELETE CASCADE;",
        )
        .unwrap();
    for sql in [
        "DELETE FROM tr_parents WHERE id = 60",
        "WITH gone AS (DELETE FROM tr_parents RETURNING id) SELECT count(*) FROM gone",
    ] {
        let err = coordinator.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
    }
    coordinator
        .batch_execute("UPDATE tr_parents SET label = 'q'")
        .unwrap();
    coordinator
        .batch_execute(
            "ALTER TABLE tr_items DROP CONSTRAINT tr_items_id_fkey; DROP TABLE tr_parents",
        )
        .unwrap();
    // Undistributing moves rows without firing anything; the triggers stay on the table.
    coordinator
        .batch_execute("SELECT pgdist.undistribute_table('tr_items')")
        .unwrap();
    compare(
        &mut coordinator,
        &mut reference,
        "SELECT op, old_row, new_row FROM tr_audit",
    );
    run_on_both(
        &mut coordinator,
        &mut reference,
        "UPDATE tr_items SET qty = 8 WHERE id = 62",
    );
    for table in tables {
        compare(&mut coordinator, &mut reference, table);
    }
}

/// Statements that change the same rows, run by several sessions at once, wait for each other as
/// on one server — they do not deadlock — whether they change several shards on several nodes
/// (with row triggers too) or a reference table's row on every node.
fn concurrent_writes_of_the_same_rows_wait_instead_of_deadlocking(cluster: &Cluster) {
    const CLIENTS: i64 = 4;
    const ROUNDS: i64 = 40;
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE hot (id int PRIMARY KEY, n int, touched int DEFAULT 0);
             CREATE TABLE hot_settings (name text PRIMARY KEY, n int);
             CREATE FUNCTION hot_touch() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN NEW.touched := OLD.touched + 1; RETURN NEW; END $$;
             INSERT INTO hot SELECT g, 0 FROM generate_series(1, 8) g;
             INSERT INTO hot_settings VALUES ('counter', 0);
             SELECT pgdist.create_distributed_table('hot', 'id', shard_count => 4);
             SELECT pgdist.create_reference_table('hot_settings');",
        )
        .unwrap();
    let nodes: i64 = client
        .query_one(
            "SELECT count(DISTINCT node_id) FROM pgdist.shards WHERE table_name = 'hot'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(nodes, 2, "the rows must live on both workers");
    let run = |statements: &'static [&'static str]| {
        let sessions: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let conninfo = cluster.coordinator.conninfo();
                std::thread::spawn(move || {
                    let mut session = Client::connect(&conninfo, postgres::NoTls).unwrap();
                    for _ in 0..ROUNDS {
                        for sql in statements {
                            session
                                .batch_execute(sql)
                                .unwrap_or_else(|err| panic!("{sql}: {err:?}"));
                        }
                    }
                })
            })
            .collect();
        for session in sessions {
            session.join().unwrap();
        }
    };
    let total = CLIENTS * ROUNDS;
    run(&[
        "UPDATE hot SET n = n + 1",
        "UPDATE hot_settings SET n = n + 1 WHERE name = 'counter'",
        "BEGIN; UPDATE hot SET n = n + 1 WHERE id IN (1, 2, 3, 4, 5); \
         UPDATE hot_settings SET n = n + 1; COMMIT",
    ]);
    let sums = |client: &mut Client| -> (i64, i64, i64) {
        let row = client
            .query_one(
                "SELECT sum(n)::bigint, sum(touched)::bigint, (SELECT n FROM hot_settings)::bigint FROM hot",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(sums(&mut client), (total * (8 + 5), 0, total * 2));
    // Row by row, with a trigger.
    client
        .batch_execute(
            "CREATE TRIGGER touch BEFORE UPDATE ON hot FOR EACH ROW EXECUTE FUNCTION hot_touch()",
        )
        .unwrap();
    run(&["UPDATE hot SET n = n + 1 WHERE id <= 4"]);
    assert_eq!(
        sums(&mut client),
        (total * (8 + 5) + total * 4, total * 4, total * 2)
    );
    // Upserts of the same keys, row by row with the trigger.
    run(&[
        "INSERT INTO hot (id, n) VALUES (1, 0), (2, 0), (3, 0), (9, 1) \
           ON CONFLICT (id) DO UPDATE SET n = hot.n + 1",
    ]);
    assert_eq!(
        sums(&mut client),
        (
            total * (8 + 5 + 4 + 4),
            total * (4 + 3) + (total - 1),
            total * 2
        )
    );
}
