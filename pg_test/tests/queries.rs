//! Differential tests of distributed SELECT: every query runs on the cluster (distributed,
//! co-located, non-co-located, range and reference tables) and on a plain PostgreSQL holding
//! the same rows; the answers must be identical. Unsupported queries must fail with 0A000 and
//! a hint — never with a different answer.

use std::sync::Mutex;

use std::time::{Duration, Instant};

use pgdist_pg_test::compare::{compare, run_on_both, Comparison};
use pgdist_pg_test::errors::{message, sqlstate};
use pgdist_pg_test::{harness, tests, Cluster};

fn main() {
    harness::run(
        || {
            let cluster = Cluster::start(2);
            load(&cluster);
            cluster
        },
        tests![
            router_queries,
            single_shard_statements_take_the_fast_path,
            multi_shard_scans_and_filters,
            aggregates_and_grouping,
            aggregates_pushed_down_to_the_workers,
            ordering_limits_and_distinct,
            joins,
            co_located_joins_run_on_the_workers,
            other_joins_broadcast_the_smaller_side,
            joins_on_a_distribution_column_repartition_the_other_side,
            grouping_by_the_distribution_column_runs_whole_on_the_workers,
            limits_run_on_the_workers,
            sorted_streams_merge_on_the_coordinator,
            rescanned_scans_send_their_fragments_once,
            distinct_aggregates_read_distinct_rows,
            subqueries_ctes_and_set_operations,
            window_functions,
            windows_partitioned_by_the_distribution_column_run_on_the_workers,
            every_type_and_null_round_trips,
            session_settings_travel_with_fragments,
            prepared_statements_prune_by_parameter,
            portals_fetch_in_batches_and_interleave,
            range_tables_prune_by_comparisons,
            explain_shows_fragments_remote_plans_and_timings,
            errors_match_plain_postgres,
            unsupported_queries_fail_with_0a000,
            tablesample_samples_every_shard_alike,
            statement_timeout_stops_fragments_on_every_node,
            a_worker_that_is_down_gives_a_clear_error,
            roles_are_checked_on_the_coordinator_and_need_no_account_on_the_workers,
            row_level_security_is_applied_on_the_workers,
        ],
    )
}

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE customers (customer_id int PRIMARY KEY, name text, country text, signup date, vip bool,
                        tags text[], profile jsonb);
CREATE TABLE orders (customer_id int NOT NULL, order_id bigint NOT NULL, amount numeric(10,2), qty int,
                     price float8, status mood, ordered_at timestamptz, note text, payload bytea, ref uuid,
                     waited interval, PRIMARY KEY (customer_id, order_id));
CREATE TABLE products (product_id int PRIMARY KEY, name text, category text, weight real);
CREATE TABLE countries (code text PRIMARY KEY, name text);
CREATE TABLE events (day date NOT NULL, kind text, n int);
INSERT INTO countries VALUES ('de', 'Germany'), ('fr', 'France'), ('jp', 'Japan'), ('us', 'United States'), ('zz', NULL);
INSERT INTO customers
SELECT i, 'customer ' || i, CASE WHEN i % 11 = 0 THEN NULL ELSE (ARRAY['de', 'fr', 'jp', 'us', 'xx'])[1 + i % 5] END,
       date '2020-01-01' + (i * 7) % 1500, CASE WHEN i % 13 = 0 THEN NULL ELSE i % 3 = 0 END,
       CASE WHEN i % 4 = 0 THEN ARRAY['a', 'b' || i % 3] END,
       CASE WHEN i % 6 <> 0 THEN jsonb_build_object('level', i % 4, 'name', 'c' || i) END
FROM generate_series(1, 2000) i;
INSERT INTO orders
SELECT 1 + i % 2100, i, CASE WHEN i % 17 = 0 THEN NULL ELSE (i % 997) / 10.0 END, i % 9,
       CASE WHEN i % 19 = 0 THEN NULL ELSE (i % 1000) / 7.0 END,
       (ARRAY['sad', 'ok', 'happy']::mood[])[1 + i % 3],
       timestamptz '2025-01-01 00:00:00+00' + (i * 3607) * interval '1 second',
       CASE WHEN i % 23 = 0 THEN NULL ELSE 'note ' || (i % 50) || E'\\ttab' END,
       CASE WHEN i % 29 = 0 THEN NULL ELSE decode(lpad(to_hex(i), 8, '0'), 'hex') END,
       md5(i::text)::uuid, (i % 100) * interval '1 minute'
FROM generate_series(1, 20000) i;
INSERT INTO products SELECT i, 'product ' || i, (ARRAY['tools', 'food', 'toys', NULL])[1 + i % 4], i * 1.5 FROM generate_series(1, 300) i;
INSERT INTO events SELECT date '2024-01-01' + i % 400, (ARRAY['click', 'view', 'buy'])[1 + i % 3], i FROM generate_series(1, 5000) i;
";

const DISTRIBUTE: &str = "
SELECT pgdist.create_distributed_table('customers', 'customer_id', shard_count => 8);
SELECT pgdist.create_distributed_table('orders', 'customer_id', shard_count => 8);
SELECT pgdist.create_distributed_table('products', 'product_id', shard_count => 5);
SELECT pgdist.create_reference_table('countries');
SELECT pgdist.create_distributed_table('events', 'day', 'range', split_points => ARRAY['2024-04-01', '2024-08-01', '2024-12-01']);
";

static UNSUPPORTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn load(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(&mut coordinator, &mut reference, SCHEMA);
    coordinator.batch_execute(DISTRIBUTE).unwrap();
    run_on_both(&mut coordinator, &mut reference, "ANALYZE");
}

/// Runs every query on both sides and requires the same answer.
fn check_all(cluster: &Cluster, queries: &[&str]) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    for sql in queries {
        if let Comparison::Unsupported(message) = compare(&mut coordinator, &mut reference, sql) {
            UNSUPPORTED
                .lock()
                .unwrap()
                .push(format!("{sql}: {message}"));
        }
    }
}

fn router_queries(cluster: &Cluster) {
    check_all(cluster, &[
        "SELECT * FROM customers WHERE customer_id = 42",
        "SELECT * FROM customers WHERE customer_id = 99999",
        "SELECT * FROM customers WHERE customer_id = 42 FOR UPDATE",
        "SELECT * FROM orders WHERE customer_id IN (4, 5) AND qty > 3 FOR SHARE",
        "SELECT customer_id, name FROM customers WHERE vip FOR NO KEY UPDATE SKIP LOCKED",
        "SELECT * FROM customers c JOIN orders o USING (customer_id) WHERE customer_id = 1 FOR SHARE",
        "SELECT name, country FROM customers WHERE customer_id = 7 AND vip",
        "SELECT * FROM orders WHERE customer_id = 5 ORDER BY order_id",
        "SELECT count(*), sum(amount), min(ordered_at), max(note) FROM orders WHERE customer_id = 5",
        "SELECT * FROM orders WHERE customer_id = 5 AND order_id = 4",
        "SELECT * FROM orders WHERE 5 = customer_id AND amount > 10 ORDER BY order_id",
        "SELECT * FROM orders WHERE customer_id IN (1, 2, 3, 2000) ORDER BY customer_id, order_id",
        "SELECT * FROM orders WHERE customer_id = ANY (ARRAY[10, 20, 30]) ORDER BY customer_id, order_id",
        "SELECT * FROM orders WHERE customer_id = 5 AND customer_id = 6",
        "SELECT * FROM orders WHERE customer_id = NULL",
        "SELECT * FROM orders WHERE customer_id IS NULL",
        "SELECT c.name, o.order_id, o.amount FROM customers c JOIN orders o USING (customer_id) WHERE c.customer_id = 77 ORDER BY o.order_id",
        "SELECT * FROM products WHERE product_id = 150",
        "SELECT * FROM countries WHERE code = 'jp'",
        "SELECT * FROM events WHERE day = '2024-05-05' ORDER BY n",
        "SELECT customer_id::bigint FROM customers WHERE customer_id = 12::bigint",
        "SELECT * FROM customers WHERE customer_id = 3.0",
    ]);
}

/// Statements pinned to one shard skip the standard planner and run whole on that shard.
fn single_shard_statements_take_the_fast_path(cluster: &Cluster) {
    let fast = [
        "SELECT * FROM orders WHERE customer_id = 5 ORDER BY order_id",
        "SELECT order_id, amount * qty AS total FROM orders WHERE customer_id = 17 AND qty > 2 ORDER BY total DESC NULLS LAST, order_id LIMIT 3 OFFSET 1",
        "SELECT status, count(*), sum(amount), avg(price), min(ordered_at), max(note) FROM orders WHERE customer_id = 9 GROUP BY status ORDER BY status",
        "SELECT qty, count(*) FROM orders WHERE customer_id = 9 GROUP BY qty HAVING count(*) > 1 ORDER BY qty",
        "SELECT count(DISTINCT qty), string_agg(order_id::text, ',' ORDER BY order_id), array_agg(amount ORDER BY order_id) FROM orders WHERE customer_id = 33",
        "SELECT DISTINCT qty FROM orders WHERE customer_id = 33 ORDER BY qty",
        "SELECT DISTINCT ON (qty) qty, order_id FROM orders WHERE customer_id = 33 ORDER BY qty, order_id DESC",
        "SELECT ordered_at, waited, payload, ref, status, price FROM orders WHERE customer_id = 44 ORDER BY order_id",
        "SELECT name, tags, profile -> 'level', signup + 1 FROM customers WHERE customer_id = 24",
        "SELECT count(*) FROM customers WHERE customer_id = 2001",
        "SELECT * FROM orders WHERE customer_id = 5 AND order_id = 4",
        "SELECT * FROM countries ORDER BY code",
        "SELECT * FROM countries ORDER BY name NULLS FIRST",
        "SELECT count(*), max(name) FROM countries WHERE code <> 'de'",
    ];
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    for sql in fast {
        assert!(matches!(
            compare(&mut coordinator, &mut reference, sql),
            Comparison::Same
        ));
        assert!(
            explain(&mut coordinator, sql)
                .iter()
                .any(|l| l.contains("Router: fast path")),
            "{sql}: {:?}",
            explain(&mut coordinator, sql)
        );
    }
    // Not pinned to one shard, or not expressible on a worker: the regular planner.
    for sql in [
        "SELECT * FROM orders WHERE customer_id IN (5, 6)",
        "SELECT * FROM orders WHERE customer_id = 5 AND ordered_at < now()",
        "SELECT c.name FROM customers c JOIN orders o USING (customer_id) WHERE c.customer_id = 5",
        "SELECT * FROM customers WHERE customer_id = 3.0",
    ] {
        assert!(
            !explain(&mut coordinator, sql)
                .iter()
                .any(|l| l.contains("Router: fast path")),
            "{sql}"
        );
    }
    // Parameters pick the shard at execution, in custom and in generic plans.
    for mode in ["force_custom_plan", "force_generic_plan"] {
        run_on_both(&mut coordinator, &mut reference, &format!(
            "SET plan_cache_mode = {mode}; PREPARE f(int, int) AS SELECT order_id, amount FROM orders WHERE customer_id = $1 ORDER BY order_id LIMIT $2"
        ));
        for id in [3, 4, 1000, 2100, 2101] {
            compare(
                &mut coordinator,
                &mut reference,
                &format!("EXECUTE f({id}, 4)"),
            );
        }
        // A NULL key matches no shard: the aggregate over no rows still answers.
        run_on_both(
            &mut coordinator,
            &mut reference,
            "PREPARE g(int) AS SELECT count(*), max(amount) FROM orders WHERE customer_id = $1",
        );
        for sql in ["EXECUTE g(NULL)", "EXECUTE g(5)"] {
            assert!(matches!(
                compare(&mut coordinator, &mut reference, sql),
                Comparison::Same
            ));
        }
        run_on_both(&mut coordinator, &mut reference, "DEALLOCATE g");
        let plan = explain(&mut coordinator, "EXECUTE f(3, 4)");
        assert!(
            plan.iter().any(|l| l.contains("Router: fast path")),
            "{plan:?}"
        );
        assert!(
            plan.iter().any(|l| l.contains("Fragments: 1 on 1")),
            "{plan:?}"
        );
        run_on_both(
            &mut coordinator,
            &mut reference,
            "DEALLOCATE f; RESET plan_cache_mode",
        );
    }
}

fn multi_shard_scans_and_filters(cluster: &Cluster) {
    check_all(cluster, &[
        "SELECT * FROM customers",
        "SELECT customer_id FROM customers WHERE vip",
        "SELECT customer_id FROM customers WHERE vip IS NULL",
        "SELECT customer_id FROM customers WHERE NOT vip",
        "SELECT customer_id, name FROM customers WHERE name LIKE 'customer 1%'",
        "SELECT customer_id FROM customers WHERE country IN ('de', 'jp')",
        "SELECT customer_id FROM customers WHERE country IS DISTINCT FROM 'de'",
        "SELECT customer_id FROM customers WHERE signup BETWEEN '2021-01-01' AND '2021-06-30'",
        "SELECT customer_id FROM customers WHERE tags @> ARRAY['a']",
        "SELECT customer_id FROM customers WHERE profile->>'level' = '2'",
        "SELECT customer_id FROM customers WHERE profile @> '{\"level\": 3}'",
        "SELECT order_id FROM orders WHERE amount > 99",
        "SELECT order_id FROM orders WHERE amount IS NULL",
        "SELECT order_id FROM orders WHERE price < 1.5",
        "SELECT order_id FROM orders WHERE status = 'happy' AND qty = 3",
        "SELECT order_id FROM orders WHERE status > 'sad' AND qty = 8",
        "SELECT order_id FROM orders WHERE ordered_at < '2025-01-05 12:00:00+00'",
        "SELECT order_id FROM orders WHERE ordered_at >= now() - interval '1000 years' AND qty = 1",
        "SELECT order_id FROM orders WHERE note LIKE '%7%tab' AND qty = 2",
        "SELECT order_id FROM orders WHERE payload = '\\x00000010'::bytea",
        "SELECT order_id FROM orders WHERE ref = md5('77')::uuid",
        "SELECT order_id FROM orders WHERE waited > interval '98 minutes'",
        "SELECT order_id FROM orders WHERE length(note) > 12 AND qty = 4",
        "SELECT order_id FROM orders WHERE (amount > 50 OR qty = 0) AND NOT (price > 100)",
        "SELECT order_id FROM orders WHERE CASE WHEN qty > 4 THEN amount ELSE 0 END > 90",
        "SELECT order_id FROM orders WHERE coalesce(amount, -1) = -1",
        "SELECT order_id FROM orders WHERE random() < 2 AND qty = 7",
        "SELECT upper(name), length(name), customer_id % 7 FROM customers",
        "SELECT * FROM events WHERE day >= '2024-07-15' AND day < '2024-08-15'",
        "SELECT * FROM events WHERE kind = 'buy' AND n % 97 = 0",
        "SELECT * FROM countries",
        "SELECT * FROM products WHERE category IS NULL",
        "SELECT p FROM products p WHERE product_id < 5",
        "SELECT row_to_json(c) FROM customers c WHERE customer_id % 400 = 0",
        "SELECT * FROM orders WHERE false",
        "SELECT count(*) FROM orders WHERE order_id % 2 = 0",
    ]);
}

fn aggregates_and_grouping(cluster: &Cluster) {
    check_all(cluster, &[
        "SELECT count(*) FROM orders",
        "SELECT count(amount), count(DISTINCT customer_id), count(DISTINCT status) FROM orders",
        "SELECT sum(amount), avg(amount), min(amount), max(amount) FROM orders",
        "SELECT sum(qty), avg(qty), sum(order_id) FROM orders",
        "SELECT round(sum(price)::numeric, 4), round(avg(price)::numeric, 6) FROM orders",
        "SELECT round(stddev(amount), 6), round(variance(amount), 6), round(stddev_pop(qty), 6), round(var_samp(qty), 6) FROM orders",
        "SELECT bool_and(vip), bool_or(vip), every(vip) FROM customers",
        "SELECT bit_and(qty), bit_or(qty) FROM orders WHERE qty > 0",
        "SELECT min(ordered_at), max(ordered_at), min(status), max(status), min(note), max(ref::text) FROM orders",
        "SELECT status, count(*), sum(amount) FROM orders GROUP BY status",
        "SELECT customer_id, count(*), sum(amount) FROM orders GROUP BY customer_id",
        "SELECT qty, status, count(*) FROM orders GROUP BY qty, status",
        "SELECT qty, count(*) FROM orders GROUP BY qty HAVING count(*) > 2222",
        "SELECT customer_id % 10 AS bucket, avg(amount) FROM orders GROUP BY 1",
        "SELECT date_trunc('month', ordered_at) AS month, count(*) FROM orders GROUP BY 1",
        "SELECT country, count(*) FROM customers GROUP BY country",
        "SELECT country, vip, count(*) FROM customers GROUP BY ROLLUP (country, vip)",
        "SELECT country, vip, count(*) FROM customers GROUP BY CUBE (country, vip)",
        "SELECT string_agg(name, ',' ORDER BY customer_id) FROM customers WHERE customer_id < 30",
        "SELECT array_agg(order_id ORDER BY order_id) FROM orders WHERE customer_id = 10",
        "SELECT customer_id, array_agg(order_id ORDER BY order_id DESC) FROM orders WHERE customer_id < 20 GROUP BY customer_id",
        "SELECT jsonb_agg(code ORDER BY code) FROM countries",
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY amount) FROM orders",
        "SELECT mode() WITHIN GROUP (ORDER BY qty) FROM orders",
        "SELECT count(*) FILTER (WHERE qty > 4), sum(amount) FILTER (WHERE status = 'ok') FROM orders",
        "SELECT kind, count(*), min(day), max(day) FROM events GROUP BY kind",
        "SELECT category, count(*), sum(weight) FROM products GROUP BY category",
        "SELECT count(*) FROM (SELECT DISTINCT customer_id FROM orders) s",
        "SELECT sum(amount) / count(*) FROM orders HAVING count(*) > 0",
        "SELECT max(waited), min(waited), sum(waited) FROM orders",
    ]);
}

fn aggregates_pushed_down_to_the_workers(cluster: &Cluster) {
    check_all(cluster, &[
        "SELECT sum(order_id), avg(order_id), sum(qty::int8), count(note), count(*) FROM orders",
        "SELECT round(sum(price)::numeric, 3), round(avg(price)::numeric, 6), round(stddev(price)::numeric, 6) FROM orders",
        "SELECT round(var_pop(amount), 6), round(stddev_samp(qty::numeric), 6), regr_count(price, qty) FROM orders",
        "SELECT count(*), sum(amount), avg(amount), min(amount), max(note) FROM orders WHERE false",
        "SELECT count(*), sum(amount) FROM orders WHERE customer_id = 5",
        "SELECT status, count(*), avg(qty) FROM orders GROUP BY status",
        "SELECT note, count(*) FROM orders GROUP BY note",
        "SELECT ref, sum(amount) FROM orders WHERE qty = 3 GROUP BY ref",
        "SELECT date_trunc('week', ordered_at), max(amount), min(price) FROM orders GROUP BY 1",
        "SELECT qty, status, sum(amount) * 2 + count(*) AS mixed FROM orders GROUP BY qty, status",
        "SELECT qty FROM orders GROUP BY qty HAVING avg(amount) > 49.5",
        "SELECT qty, count(*) FROM orders WHERE amount > 50 GROUP BY qty HAVING max(price) > 140",
        "SELECT country, count(*), bool_or(vip), max(signup) FROM customers GROUP BY country",
        "SELECT customer_id, count(*), sum(amount) FROM orders GROUP BY customer_id HAVING count(*) > 9",
        "SELECT count(DISTINCT qty), sum(amount) FROM orders",
        "SELECT kind, count(*), sum(n) FROM events GROUP BY kind",
        "SELECT category, avg(weight), count(*) FROM products GROUP BY category",
    ]);
    // The plans really split the work: partial states on the workers, final step here.
    let mut coordinator = cluster.coordinator_client();
    for sql in [
        "SELECT count(*), sum(amount) FROM orders",
        "SELECT status, avg(amount) FROM orders GROUP BY status",
    ] {
        let plan = explain(&mut coordinator, sql);
        assert!(
            plan.iter().any(|l| l.contains("Finalize")),
            "{sql}: {plan:?}"
        );
        assert!(
            plan.iter().any(|l| l.contains("pgdist.partial_")),
            "{sql}: {plan:?}"
        );
    }
}

fn ordering_limits_and_distinct(cluster: &Cluster) {
    check_all(cluster, &[
        "SELECT * FROM orders ORDER BY order_id LIMIT 10",
        "SELECT * FROM orders ORDER BY amount DESC NULLS LAST, order_id LIMIT 15",
        "SELECT * FROM orders ORDER BY amount NULLS FIRST, order_id LIMIT 5",
        "SELECT order_id FROM orders ORDER BY order_id DESC LIMIT 10 OFFSET 100",
        "SELECT order_id, ordered_at FROM orders ORDER BY ordered_at, order_id LIMIT 7",
        "SELECT name FROM customers ORDER BY name COLLATE \"C\" LIMIT 10",
        "SELECT name FROM customers ORDER BY name LIMIT 10",
        "SELECT DISTINCT status FROM orders ORDER BY status",
        "SELECT DISTINCT qty, status FROM orders",
        "SELECT DISTINCT ON (customer_id) customer_id, order_id FROM orders ORDER BY customer_id, order_id DESC",
        "SELECT DISTINCT country FROM customers",
        "SELECT status, count(*) FROM orders GROUP BY status ORDER BY count(*) DESC, status",
        "SELECT customer_id, sum(amount) AS total FROM orders GROUP BY customer_id ORDER BY total DESC NULLS LAST, customer_id LIMIT 5",
        "SELECT * FROM events ORDER BY day, n LIMIT 20",
        "SELECT * FROM countries ORDER BY name NULLS FIRST",
        "SELECT order_id FROM orders ORDER BY order_id FETCH FIRST 3 ROWS ONLY",
        "SELECT * FROM customers ORDER BY customer_id LIMIT 0",
        "SELECT * FROM customers ORDER BY customer_id OFFSET 1995",
    ]);
}

fn joins(cluster: &Cluster) {
    check_all(cluster, &[
        "SELECT c.customer_id, count(o.order_id) FROM customers c JOIN orders o USING (customer_id) GROUP BY 1",
        "SELECT c.customer_id, count(o.order_id) FROM customers c LEFT JOIN orders o USING (customer_id) GROUP BY 1",
        "SELECT o.customer_id, count(*) FROM orders o LEFT JOIN customers c USING (customer_id) WHERE c.customer_id IS NULL GROUP BY 1",
        "SELECT count(*) FROM customers c FULL JOIN orders o ON o.customer_id = c.customer_id",
        "SELECT c.country, k.name, count(*) FROM customers c JOIN countries k ON k.code = c.country GROUP BY 1, 2",
        "SELECT c.country, k.name FROM customers c LEFT JOIN countries k ON k.code = c.country WHERE c.customer_id < 40",
        "SELECT k.code, count(c.customer_id) FROM countries k LEFT JOIN customers c ON c.country = k.code GROUP BY 1",
        "SELECT o.order_id, p.name FROM orders o JOIN products p ON p.product_id = o.qty * 30 + 1 WHERE o.customer_id < 50",
        "SELECT p.category, count(*) FROM orders o JOIN products p ON p.product_id = o.order_id % 300 + 1 GROUP BY 1",
        "SELECT a.customer_id, b.customer_id FROM customers a JOIN customers b ON a.customer_id = b.customer_id + 1000 WHERE a.customer_id < 1010",
        "SELECT count(*) FROM customers a CROSS JOIN countries",
        "SELECT count(*) FROM orders o JOIN customers c ON c.customer_id = o.customer_id AND c.vip JOIN countries k ON k.code = c.country",
        "SELECT c.name, e.kind FROM customers c JOIN events e ON e.n = c.customer_id WHERE c.customer_id < 30",
        "SELECT c.customer_id FROM customers c WHERE c.customer_id < 25 AND EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.customer_id AND o.qty = 3)",
        "SELECT c.customer_id FROM customers c WHERE c.customer_id < 300 AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.customer_id)",
        "SELECT * FROM customers c, LATERAL (SELECT order_id FROM orders o WHERE o.customer_id = c.customer_id ORDER BY order_id LIMIT 2) l WHERE c.customer_id < 15",
        "SELECT o.order_id, x.n FROM orders o JOIN LATERAL (SELECT count(*) AS n FROM events e WHERE e.n = o.order_id) x ON true WHERE o.customer_id = 9",
        "SELECT count(*) FROM orders o JOIN orders o2 ON o2.order_id = o.order_id + 1",
    ]);
}

/// The lines of `EXPLAIN sql`.
fn explain(client: &mut postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(&format!("EXPLAIN {sql}"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// True when EXPLAIN shows the whole join of `sql` as one Distributed Scan whose fragment joins.
fn join_pushed_down(client: &mut postgres::Client, sql: &str) -> bool {
    let plan = explain(client, sql);
    let scans = plan
        .iter()
        .filter(|l| l.contains("Distributed Scan"))
        .count();
    let joined = plan
        .iter()
        .any(|l| l.contains("Fragment: SELECT") && (l.contains(" JOIN ") || l.contains("EXISTS")));
    scans == 1 && joined
}

fn co_located_joins_run_on_the_workers(cluster: &Cluster) {
    let pushed = [
        "SELECT c.customer_id, c.name, o.order_id, o.amount FROM customers c JOIN orders o USING (customer_id) WHERE o.qty = 3",
        "SELECT c.customer_id, o.order_id FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id AND o.amount > 90",
        "SELECT c.customer_id, o.order_id FROM orders o RIGHT JOIN customers c ON o.customer_id = c.customer_id AND o.qty = 1 WHERE c.customer_id < 300",
        "SELECT c.customer_id, o.order_id FROM customers c FULL JOIN orders o ON o.customer_id = c.customer_id AND o.qty = 2",
        "SELECT c.customer_id, o.order_id, o.amount FROM customers c LEFT JOIN orders o USING (customer_id) WHERE o.amount IS NULL OR o.amount > c.customer_id / 20.0",
        "SELECT customer_id, name FROM customers c WHERE EXISTS (SELECT FROM orders o WHERE o.customer_id = c.customer_id AND o.qty = 8)",
        "SELECT customer_id FROM customers WHERE customer_id IN (SELECT customer_id FROM orders WHERE amount > 99)",
        "SELECT customer_id FROM customers c WHERE NOT EXISTS (SELECT FROM orders o WHERE o.customer_id = c.customer_id AND o.status = 'happy')",
        "SELECT o.order_id, k.name FROM orders o JOIN customers c USING (customer_id) JOIN countries k ON k.code = c.country WHERE o.qty < 2",
        "SELECT c.customer_id, k.name FROM customers c LEFT JOIN countries k ON k.code = c.country",
        "SELECT c.customer_id FROM customers c WHERE c.country IN (SELECT code FROM countries WHERE name LIKE '%a%')",
        "SELECT c.customer_id FROM customers c WHERE NOT EXISTS (SELECT FROM countries k WHERE k.code = c.country)",
        "SELECT a.code, b.name FROM countries a JOIN countries b ON a.name < b.name",
        "SELECT a.code, b.code FROM countries a FULL JOIN countries b ON a.code = b.name",
        "SELECT c.name, o.order_id FROM customers c JOIN orders o ON o.customer_id = c.customer_id WHERE c.customer_id = 77",
        "SELECT o1.order_id, o2.order_id FROM orders o1 JOIN orders o2 USING (customer_id) WHERE o1.qty = 1 AND o2.qty = 2",
        "SELECT c.customer_id, o.order_id, o2.order_id FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id AND o.qty = 4 LEFT JOIN orders o2 ON o2.customer_id = o.customer_id AND o2.qty = 5 WHERE c.customer_id < 500",
        "SELECT c.customer_id, o.order_id FROM customers c JOIN (orders o LEFT JOIN countries k ON k.code = o.note) ON o.customer_id = c.customer_id WHERE c.vip",
        "SELECT c.customer_id, count(*), sum(o.amount) FROM customers c JOIN orders o USING (customer_id) GROUP BY c.customer_id HAVING count(*) > 9",
        "SELECT c.country, count(*) FROM customers c JOIN orders o USING (customer_id) GROUP BY 1",
        "SELECT c.customer_id, o.order_id FROM customers c JOIN orders o USING (customer_id) ORDER BY o.order_id DESC LIMIT 7",
        "SELECT count(*) FROM customers c JOIN orders o ON o.customer_id = c.customer_id AND o.price > c.customer_id",
        "SELECT c.customer_id, o.ordered_at, o.waited, o.payload, o.ref FROM customers c JOIN orders o USING (customer_id) WHERE c.tags IS NOT NULL AND o.qty = 0",
        // A key on the side an outer join null-extends prunes only that side's shards.
        "SELECT c.customer_id, o.order_id FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id AND o.customer_id = 77",
        "SELECT c.customer_id, o.order_id FROM (SELECT * FROM orders WHERE customer_id = 77) o RIGHT JOIN customers c USING (customer_id)",
        "SELECT c.customer_id, o.order_id FROM customers c FULL JOIN (SELECT * FROM orders WHERE customer_id = 77) o USING (customer_id)",
        "SELECT c.customer_id, o.order_id FROM (SELECT * FROM customers WHERE customer_id = 3) c FULL JOIN (SELECT * FROM orders WHERE customer_id = 77) o USING (customer_id)",
        "SELECT c.customer_id FROM customers c WHERE NOT EXISTS (SELECT FROM orders o WHERE o.customer_id = c.customer_id AND o.customer_id = 77)",
        "SELECT c.customer_id, o.order_id FROM (SELECT * FROM customers WHERE customer_id = 77) c LEFT JOIN orders o USING (customer_id)",
    ];
    let local = [
        "SELECT k.code, c.customer_id FROM countries k LEFT JOIN customers c ON c.country = k.code",
        "SELECT k.code FROM countries k WHERE EXISTS (SELECT FROM customers c WHERE c.country = k.code)",
        "SELECT c.name, e.kind FROM customers c JOIN events e ON e.n = c.customer_id",
        "SELECT c.customer_id, o.order_id FROM customers c JOIN orders o USING (customer_id) WHERE c.signup < now()",
        "SELECT c.customer_id, o.order_id FROM customers c FULL JOIN orders o ON o.customer_id = c.customer_id + 1",
    ];
    check_all(cluster, &pushed);
    check_all(cluster, &local);
    let mut coordinator = cluster.coordinator_client();
    for sql in pushed {
        assert!(
            join_pushed_down(&mut coordinator, sql),
            "not pushed down: {sql}"
        );
    }
    for sql in local {
        assert!(
            !join_pushed_down(&mut coordinator, sql),
            "pushed down: {sql}"
        );
    }
    // Parameters: generic plans prune the join to one shard at execution; correlated values
    // travel into a pushed-down join inside a subquery.
    coordinator
        .batch_execute(
            "SET plan_cache_mode = force_generic_plan;
             PREPARE customer_orders(int) AS SELECT c.name, o.order_id, o.amount FROM customers c JOIN orders o USING (customer_id) WHERE c.customer_id = $1 ORDER BY o.order_id",
        )
        .unwrap();
    let mut reference = cluster.reference.connect();
    for id in [3, 77, 1999, 5000] {
        let sql = format!("SELECT c.name, o.order_id, o.amount FROM customers c JOIN orders o USING (customer_id) WHERE c.customer_id = {id} ORDER BY o.order_id");
        let expected = reference.simple_query(&sql).unwrap();
        let got = coordinator
            .simple_query(&format!("EXECUTE customer_orders({id})"))
            .unwrap();
        assert_eq!(simple_rows(&got), simple_rows(&expected), "customer {id}");
    }
    let plan = coordinator
        .simple_query("EXPLAIN EXECUTE customer_orders(3)")
        .unwrap();
    assert!(
        simple_rows(&plan)
            .iter()
            .any(|r| r.contains("Fragments: 1 ")),
        "{:?}",
        simple_rows(&plan)
    );
    // A parameter on the side a LEFT JOIN null-extends prunes nothing.
    coordinator
        .batch_execute(
            "PREPARE with_orders_of(int) AS SELECT count(*), count(o.order_id) FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id AND o.customer_id = $1",
        )
        .unwrap();
    for id in [3, 77] {
        let sql = format!("SELECT count(*), count(o.order_id) FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id AND o.customer_id = {id}");
        let expected = reference.simple_query(&sql).unwrap();
        let got = coordinator
            .simple_query(&format!("EXECUTE with_orders_of({id})"))
            .unwrap();
        assert_eq!(simple_rows(&got), simple_rows(&expected), "customer {id}");
    }
    coordinator.batch_execute("RESET plan_cache_mode").unwrap();
    // Aggregates over a pushed-down join are computed partially on the workers too.
    let aggregates = [
        "SELECT c.country, count(*), sum(o.amount), round(avg(o.price)::numeric, 6), max(o.ordered_at) FROM customers c JOIN orders o USING (customer_id) GROUP BY 1",
        "SELECT k.name, count(DISTINCT c.customer_id) FROM customers c JOIN orders o USING (customer_id) JOIN countries k ON k.code = c.country GROUP BY 1",
        "SELECT count(*), sum(o.qty) FROM customers c JOIN orders o USING (customer_id) WHERE c.vip",
        "SELECT o.status, stddev(o.amount), bool_and(c.vip) FROM customers c LEFT JOIN orders o USING (customer_id) GROUP BY 1 HAVING count(*) > 100",
    ];
    check_all(cluster, &aggregates);
    for sql in [aggregates[0], aggregates[2], aggregates[3]] {
        let plan = explain(&mut coordinator, sql);
        assert!(
            plan.iter()
                .any(|l| l.contains(" JOIN ") && l.contains("pgdist.partial_")),
            "{sql}: {plan:?}"
        );
    }
    check_all(cluster, &[
        "SELECT c.customer_id, (SELECT count(*) FROM orders o JOIN customers c2 USING (customer_id) WHERE o.customer_id = c.customer_id AND o.qty > c2.customer_id % 9) FROM customers c WHERE c.customer_id < 40",
    ]);
}

fn other_joins_broadcast_the_smaller_side(cluster: &Cluster) {
    // Not co-located (products has 5 shards, customers and orders 8) or not joined on the
    // distribution columns: the smaller side is read first and sent with every fragment.
    let broadcast = [
        "SELECT o.order_id, p.name FROM orders o JOIN products p ON p.product_id = o.customer_id",
        "SELECT p.category, count(*), sum(o.amount), max(o.ordered_at) FROM orders o JOIN products p ON p.product_id = o.qty * 30 + 1 GROUP BY 1",
        "SELECT o.order_id, p.category, p.weight FROM orders o LEFT JOIN products p ON p.product_id = o.customer_id AND p.category <> 'food' WHERE o.qty = 2",
        "SELECT count(*) FROM orders o WHERE o.customer_id IN (SELECT product_id FROM products WHERE category = 'toys')",
        "SELECT o.order_id FROM orders o WHERE o.qty = 7 AND NOT EXISTS (SELECT FROM products p WHERE p.product_id = o.customer_id)",
        "SELECT c.country, p.category, count(*) FROM orders o JOIN customers c USING (customer_id) JOIN products p ON p.product_id = o.customer_id GROUP BY 1, 2",
        "SELECT o.order_id, p.name FROM orders o JOIN products p ON p.name = 'product ' || o.qty WHERE o.customer_id < 100",
        "SELECT a.customer_id, b.customer_id FROM customers a JOIN customers b ON a.customer_id = b.customer_id + 1000",
        "SELECT c.customer_id, o.order_id, o.amount, o.price, o.status, o.ordered_at, o.note, o.payload, o.ref, o.waited FROM customers c JOIN orders o ON c.customer_id = o.order_id WHERE o.qty = 3 AND o.order_id < 300",
        "SELECT o.order_id, c.name, c.signup, c.vip, c.profile FROM orders o JOIN customers c ON c.customer_id = o.qty WHERE o.customer_id < 50",
        "SELECT p.category, count(DISTINCT o.customer_id) FROM orders o JOIN products p ON p.product_id = o.customer_id GROUP BY 1",
        "SELECT o.order_id, p.name FROM orders o JOIN products p ON p.product_id = o.customer_id ORDER BY o.order_id DESC LIMIT 5",
        // A semi join keeps only its outer table in FROM, which then joins on as a bare table.
        "SELECT c.customer_id FROM customers c WHERE EXISTS (SELECT FROM orders o WHERE o.customer_id = c.customer_id AND o.order_id < 40) AND NOT EXISTS (SELECT FROM products p WHERE p.product_id = c.customer_id % 100)",
        "SELECT c.customer_id FROM customers c WHERE NOT EXISTS (SELECT FROM orders o WHERE o.customer_id = c.customer_id AND o.qty <> 4) AND c.customer_id % 100 IN (SELECT product_id FROM products WHERE category = 'food')",
        "SELECT c.customer_id, p.name FROM customers c JOIN products p ON p.product_id = c.customer_id % 50 WHERE NOT EXISTS (SELECT FROM orders o WHERE o.customer_id = c.customer_id AND o.qty > 1)",
    ];
    check_all(cluster, &broadcast);
    let mut coordinator = cluster.coordinator_client();
    for sql in broadcast {
        let plan = explain(&mut coordinator, sql);
        assert!(
            join_pushed_down(&mut coordinator, sql)
                && plan
                    .iter()
                    .any(|l| l.contains("Broadcast: ") || l.contains("Repartitioned: ")),
            "not broadcast: {sql}: {plan:?}"
        );
    }
    // EXPLAIN ANALYZE says how many rows were sent.
    let analyzed: Vec<String> = coordinator
        .query("EXPLAIN ANALYZE SELECT count(*) FROM orders o JOIN products p ON p.product_id = o.customer_id WHERE p.category = 'food'", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        analyzed
            .iter()
            .any(|l| l.contains(": products: 75 rows read first")),
        "{analyzed:?}"
    );
    // A parameter of the broadcast side, in custom and generic plans.
    let mut reference = cluster.reference.connect();
    let sql = "SELECT count(*), sum(o.amount)::text FROM orders o JOIN products p ON p.product_id = o.customer_id WHERE p.category = $1";
    for mode in ["force_custom_plan", "force_generic_plan"] {
        coordinator
            .batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .unwrap();
        let statement = coordinator.prepare(sql).unwrap();
        for category in ["food", "toys", "none", "tools"] {
            let got = coordinator.query_one(&statement, &[&category]).unwrap();
            let want = reference.query_one(sql, &[&category]).unwrap();
            assert_eq!(
                (got.get::<_, i64>(0), got.get::<_, Option<String>>(1)),
                (want.get::<_, i64>(0), want.get::<_, Option<String>>(1)),
                "{mode}, category {category}"
            );
        }
    }
    coordinator.batch_execute("RESET plan_cache_mode").unwrap();
    // Inside a transaction the broadcast side includes the transaction's own writes.
    for client in [&mut coordinator, &mut reference] {
        client
            .batch_execute("BEGIN; INSERT INTO products VALUES (1042, 'product new', 'food', 1)")
            .unwrap();
    }
    compare(
        &mut coordinator,
        &mut reference,
        "SELECT o.customer_id, count(*) FROM orders o JOIN products p ON p.product_id = o.customer_id WHERE p.category = 'food' AND o.customer_id > 1000 GROUP BY 1",
    );
    for client in [&mut coordinator, &mut reference] {
        client.batch_execute("ROLLBACK").unwrap();
    }
}

/// A table joined on the other side's distribution column is read first and each of its rows
/// sent only to the fragment of the shard its key hashes to (rows with a NULL key to none).
fn joins_on_a_distribution_column_repartition_the_other_side(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE refs (ref_id int PRIMARY KEY, product_ref int, customer_ref bigint, note text);
         INSERT INTO refs SELECT i, CASE WHEN i % 9 = 0 THEN NULL ELSE i % 400 END,
                                CASE WHEN i % 11 = 0 THEN NULL ELSE i % 2500 END, 'ref ' || i
         FROM generate_series(1, 3000) i;",
    );
    coordinator
        .batch_execute("SELECT pgdist.create_distributed_table('refs', 'ref_id', shard_count => 3)")
        .unwrap();
    // The kept side is the one with the distribution column, so it cannot be broadcast.
    let repartitioned = [
        "SELECT p.product_id, count(r.ref_id) FROM products p LEFT JOIN refs r ON r.product_ref = p.product_id GROUP BY 1",
        "SELECT p.category, count(*), min(r.note) FROM products p LEFT JOIN refs r ON r.product_ref = p.product_id AND r.ref_id > 100 GROUP BY 1",
        "SELECT c.customer_id, c.name, r.ref_id FROM customers c LEFT JOIN refs r ON r.customer_ref = c.customer_id WHERE c.customer_id < 40",
        "SELECT c.country, count(r.ref_id), max(r.note) FROM customers c LEFT JOIN refs r ON c.customer_id = r.customer_ref GROUP BY 1",
        "SELECT p.product_id, o.order_id FROM products p LEFT JOIN orders o ON o.order_id = p.product_id WHERE p.product_id < 50",
        "SELECT count(*) FROM products p WHERE NOT EXISTS (SELECT FROM refs r WHERE r.product_ref = p.product_id)",
        "SELECT p.name FROM products p WHERE p.product_id IN (SELECT product_ref FROM refs WHERE note LIKE '%7')",
        "SELECT c.customer_id, count(*), sum(o.amount) FROM customers c JOIN orders o USING (customer_id) LEFT JOIN refs r ON r.customer_ref = c.customer_id WHERE c.customer_id % 50 = 1 GROUP BY 1",
    ];
    for sql in repartitioned {
        assert!(matches!(
            compare(&mut coordinator, &mut reference, sql),
            Comparison::Same
        ));
        let plan = explain(&mut coordinator, sql);
        assert!(
            join_pushed_down(&mut coordinator, sql)
                && plan
                    .iter()
                    .any(|l| l.contains("Repartitioned: refs")
                        || l.contains("Repartitioned: orders")),
            "not repartitioned: {sql}: {plan:?}"
        );
    }
    // EXPLAIN ANALYZE counts the rows read (NULL keys included, though they go nowhere).
    let analyzed = explain(
        &mut coordinator,
        "ANALYZE SELECT count(r.ref_id) FROM products p LEFT JOIN refs r ON r.product_ref = p.product_id",
    );
    assert!(
        analyzed
            .iter()
            .any(|l| l.contains("Repartitioned: refs: 3000 rows")),
        "{analyzed:?}"
    );
    run_on_both(&mut coordinator, &mut reference, "DROP TABLE refs");
}

fn simple_rows(messages: &[postgres::SimpleQueryMessage]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL").to_string())
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .collect()
}

/// The fragment SQL that EXPLAIN shows for `sql` (the first scan's).
fn fragment(client: &mut postgres::Client, sql: &str) -> String {
    explain(client, sql)
        .into_iter()
        .find_map(|l| l.trim().strip_prefix("Fragment: ").map(str::to_string))
        .unwrap_or_default()
}

fn grouping_by_the_distribution_column_runs_whole_on_the_workers(cluster: &Cluster) {
    // Every group lives in one shard: the workers compute the final values, HAVING included,
    // whatever the aggregate.
    let whole = [
        "SELECT customer_id, count(*), count(DISTINCT qty), sum(amount) FROM orders GROUP BY customer_id",
        "SELECT customer_id, string_agg(order_id::text, ',' ORDER BY order_id DESC), array_agg(qty ORDER BY order_id) FROM orders WHERE customer_id < 40 GROUP BY customer_id",
        "SELECT customer_id, count(*) FILTER (WHERE qty > 4), max(note) FILTER (WHERE amount > 10) FROM orders GROUP BY 1",
        "SELECT customer_id, percentile_disc(0.5) WITHIN GROUP (ORDER BY qty), mode() WITHIN GROUP (ORDER BY status) FROM orders GROUP BY customer_id",
        "SELECT customer_id, count(*) FROM orders GROUP BY customer_id HAVING count(DISTINCT status) = 3 AND sum(qty) > 40",
        "SELECT customer_id, qty, count(*) FROM orders WHERE qty IN (1, 2) GROUP BY customer_id, qty",
        "SELECT customer_id, name, count(*) FROM customers GROUP BY customer_id",
        "SELECT c.customer_id, c.name, count(o.order_id), count(DISTINCT o.qty) FROM customers c JOIN orders o USING (customer_id) GROUP BY c.customer_id",
        "SELECT c.customer_id, count(o.order_id) FROM customers c LEFT JOIN orders o USING (customer_id) GROUP BY c.customer_id HAVING count(o.order_id) < 3",
        "SELECT c.customer_id, k.name, sum(o.amount) FROM customers c JOIN orders o USING (customer_id) JOIN countries k ON k.code = c.country GROUP BY 1, 2",
        "SELECT code, count(*), string_agg(name, '/' ORDER BY name) FROM countries GROUP BY code",
        "SELECT customer_id, count(DISTINCT status) FROM orders WHERE customer_id = 77 GROUP BY customer_id",
        "SELECT day, count(*), count(DISTINCT kind) FROM events GROUP BY day",
    ];
    // A group may span shards (grouped by another column, or by a column an outer join can
    // make NULL): partial aggregation or the coordinator, never per-shard final values.
    let not_whole = [
        "SELECT qty, count(DISTINCT customer_id), sum(amount) FROM orders GROUP BY qty",
        "SELECT o.customer_id, count(*) FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id AND o.qty = 1 GROUP BY o.customer_id",
        "SELECT o.customer_id, count(*) FROM orders o FULL JOIN customers c USING (customer_id) GROUP BY o.customer_id",
        "SELECT count(*), count(DISTINCT customer_id) FROM orders",
    ];
    let all: Vec<&str> = whole.iter().chain(not_whole.iter()).copied().collect();
    check_all(cluster, &all);
    let mut coordinator = cluster.coordinator_client();
    for sql in whole {
        let plan = explain(&mut coordinator, sql);
        let fragment = fragment(&mut coordinator, sql);
        assert!(
            !plan.iter().any(|l| l.contains("Aggregate")) && fragment.contains("GROUP BY"),
            "{sql} should aggregate on the workers only: {plan:#?}"
        );
    }
    for sql in not_whole {
        let fragment = fragment(&mut coordinator, sql);
        assert!(
            !fragment.contains("count(DISTINCT") && !fragment.contains("count(*)"),
            "{sql} must not finish groups on the workers: {fragment}"
        );
    }
}

fn limits_run_on_the_workers(cluster: &Cluster) {
    // Each fragment returns only its first LIMIT + OFFSET rows; the coordinator picks from those.
    let limited = [
        ("SELECT * FROM orders ORDER BY amount DESC NULLS LAST, order_id LIMIT 15", "LIMIT 15"),
        ("SELECT order_id, qty FROM orders WHERE qty > 2 ORDER BY order_id DESC LIMIT 10 OFFSET 100", "LIMIT 110"),
        ("SELECT order_id, price FROM orders ORDER BY price NULLS FIRST, order_id LIMIT 25", "LIMIT 25"),
        ("SELECT order_id, ordered_at FROM orders ORDER BY ordered_at, order_id FETCH FIRST 3 ROWS ONLY", "LIMIT 3"),
        ("SELECT order_id, amount * qty AS total FROM orders ORDER BY amount * qty DESC NULLS LAST, order_id LIMIT 4", "LIMIT 4"),
        ("SELECT name FROM customers ORDER BY name LIMIT 10", "LIMIT 10"),
        ("SELECT customer_id, sum(amount) AS total FROM orders GROUP BY customer_id ORDER BY total DESC NULLS LAST, customer_id LIMIT 5", "LIMIT 5"),
        ("SELECT c.name, o.order_id FROM customers c JOIN orders o USING (customer_id) WHERE o.qty = 4 ORDER BY o.order_id LIMIT 6", "LIMIT 6"),
        ("SELECT * FROM customers ORDER BY customer_id LIMIT 0", "LIMIT 0"),
        ("SELECT * FROM events ORDER BY day DESC, n LIMIT 20", "LIMIT 20"),
        ("SELECT order_id FROM orders WHERE customer_id = 5 ORDER BY order_id LIMIT 2", "LIMIT 2"),
        // now() is computed once on the coordinator and sent as a constant.
        ("SELECT order_id FROM orders WHERE ordered_at < now() - interval '1 day' ORDER BY order_id LIMIT 5", "LIMIT 5"),
    ];
    // Without ORDER BY any rows will do: compare the count, not the rows.
    let unordered = [
        (
            "SELECT count(*) FROM (SELECT * FROM orders LIMIT 37) s",
            "LIMIT 37",
        ),
        (
            "SELECT count(*) FROM (SELECT order_id FROM orders WHERE qty = 1 LIMIT 5 OFFSET 3) s",
            "LIMIT 8",
        ),
    ];
    // The LIMIT must stay on the coordinator: a filter or a sort key only the coordinator can
    // evaluate, a set-returning function, DISTINCT.
    let kept = [
        "SELECT order_id FROM orders WHERE ordered_at::text < '2025-03' ORDER BY order_id LIMIT 5",
        "SELECT order_id FROM orders ORDER BY order_id::text COLLATE \"C\", order_id LIMIT 5",
        "SELECT name FROM customers WHERE name COLLATE \"C\" > 'customer 5' ORDER BY name LIMIT 5",
        "SELECT order_id, generate_series(1, 2) FROM orders ORDER BY order_id LIMIT 5",
        "SELECT DISTINCT qty FROM orders ORDER BY qty LIMIT 3",
        "SELECT qty, count(*) FROM orders GROUP BY qty ORDER BY qty LIMIT 3",
    ];
    let all: Vec<&str> = limited
        .iter()
        .chain(unordered.iter())
        .map(|(sql, _)| *sql)
        .chain(kept.iter().copied())
        .collect();
    check_all(cluster, &all);
    let mut coordinator = cluster.coordinator_client();
    for (sql, limit) in limited.iter().chain(unordered.iter()) {
        let fragment = fragment(&mut coordinator, sql);
        assert!(fragment.ends_with(limit), "{sql}: {fragment}");
    }
    for sql in kept {
        let fragment = fragment(&mut coordinator, sql);
        assert!(!fragment.contains("LIMIT"), "{sql}: {fragment}");
    }
}

fn sorted_streams_merge_on_the_coordinator(cluster: &Cluster) {
    // ORDER BY without LIMIT: each connection's fragments come back sorted by the worker and
    // the coordinator merges the streams — no Sort node here. Every ORDER BY is a total order,
    // so the row order itself is compared.
    let merged = [
        "SELECT customer_id, order_id, amount FROM orders ORDER BY amount DESC NULLS LAST, order_id",
        "SELECT order_id, price, status FROM orders WHERE qty > 3 ORDER BY price NULLS FIRST, order_id DESC",
        "SELECT order_id, ordered_at, note FROM orders ORDER BY ordered_at, order_id",
        "SELECT status, order_id FROM orders WHERE qty = 2 ORDER BY status DESC, order_id",
        "SELECT name, customer_id, tags FROM customers ORDER BY name, customer_id",
        "SELECT ref, payload, order_id FROM orders ORDER BY payload NULLS FIRST, ref",
        "SELECT order_id, amount * 2 AS doubled FROM orders WHERE customer_id IN (5, 6, 700) ORDER BY amount, order_id",
        "SELECT customer_id, count(*), sum(amount) FROM orders GROUP BY customer_id ORDER BY sum(amount) DESC NULLS LAST, customer_id",
        "SELECT c.name, o.order_id, o.amount FROM customers c JOIN orders o USING (customer_id) WHERE o.qty = 4 ORDER BY o.amount NULLS FIRST, o.order_id",
        "SELECT customer_id, order_id, row_number() OVER (PARTITION BY customer_id ORDER BY order_id) AS rn FROM orders WHERE customer_id < 300 ORDER BY rn, customer_id",
        "SELECT * FROM events WHERE n % 7 = 0 ORDER BY day DESC, n",
        // The table's sorted path feeds a GroupAggregate or a WindowAgg without a Sort.
        "SELECT qty, count(DISTINCT status), min(note) FROM orders GROUP BY qty ORDER BY qty",
        "SELECT order_id, amount, rank() OVER (ORDER BY amount DESC NULLS LAST, order_id) FROM orders WHERE qty = 5",
    ];
    // A sort key the scan does not return, or one the workers would order differently, keeps
    // the coordinator's Sort.
    let sorted_here = [
        "SELECT order_id FROM orders WHERE qty = 1 ORDER BY order_id::text COLLATE \"C\"",
        "SELECT customer_id, name FROM customers ORDER BY name COLLATE \"C\", customer_id",
        "SELECT order_id FROM orders WHERE qty = 1 ORDER BY amount * qty, order_id",
    ];
    let all: Vec<&str> = merged.iter().chain(sorted_here.iter()).copied().collect();
    check_all(cluster, &all);
    let mut coordinator = cluster.coordinator_client();
    let has_sort = |plan: &[String]| {
        plan.iter().any(|l| {
            l.trim_start()
                .trim_start_matches("->")
                .trim()
                .starts_with("Sort ")
        })
    };
    for sql in merged {
        let plan = explain(&mut coordinator, sql);
        assert!(
            plan.iter().any(|l| l.contains("Merge: ")),
            "{sql} must merge sorted streams: {plan:#?}"
        );
        assert!(
            !has_sort(&plan),
            "{sql} must not sort on the coordinator: {plan:#?}"
        );
    }
    for sql in sorted_here {
        let plan = explain(&mut coordinator, sql);
        assert!(
            has_sort(&plan),
            "{sql} must sort on the coordinator: {plan:#?}"
        );
    }

    // A correlated subquery: the merged scan restarts for every outer row.
    check_all(cluster, &[
        "SELECT c.customer_id, (SELECT string_agg(s.order_id::text, ',') FROM (SELECT order_id FROM orders o WHERE o.customer_id IN (c.customer_id, c.customer_id + 1) ORDER BY amount NULLS FIRST, order_id) s) FROM customers c WHERE c.customer_id < 25 ORDER BY 1",
    ]);

    // Inside a transaction that has written on the nodes, the merged shares run on the
    // transaction's own connections and see its writes.
    let mut reference = cluster.reference.connect();
    for client in [&mut coordinator, &mut reference] {
        client
            .batch_execute("BEGIN; UPDATE orders SET amount = amount + 1000 WHERE qty = 7")
            .unwrap();
    }
    let sql = "SELECT order_id, amount FROM orders WHERE qty IN (6, 7) ORDER BY amount DESC NULLS FIRST, order_id";
    assert_eq!(
        compare(&mut coordinator, &mut reference, sql),
        Comparison::Same
    );
    for client in [&mut coordinator, &mut reference] {
        client.batch_execute("ROLLBACK").unwrap();
    }
}

/// A Distributed Scan that a nested loop rescans for every outer row keeps its rows (its
/// fragments read the same rows each time): every fragment runs once, however many loops.
fn rescanned_scans_send_their_fragments_once(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    let nested_loops = "SET enable_hashjoin = off; SET enable_mergejoin = off; \
                        SET enable_material = off; SET enable_hashagg = off";
    run_on_both(
        &mut coordinator,
        &mut reference,
        &format!(
            "CREATE TABLE visits (customer_id int, n int);
             INSERT INTO visits SELECT g % 300, g FROM generate_series(1, 2000) g;
             ANALYZE visits; {nested_loops}"
        ),
    );
    let queries = [
        "SELECT count(*), sum(v.n) FROM visits v WHERE v.n < 60 AND EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = v.customer_id AND c.vip)",
        "SELECT count(*) FROM visits v WHERE v.n < 40 AND NOT EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = v.customer_id + 1000)",
        "SELECT v.n, c.name FROM visits v LEFT JOIN LATERAL (SELECT name FROM customers c WHERE c.customer_id = v.customer_id ORDER BY 1 LIMIT 1) c ON true WHERE v.n < 25",
        "SELECT v.n, (SELECT count(*) FROM customers c WHERE c.customer_id < v.customer_id) FROM visits v WHERE v.n < 20",
    ];
    for sql in queries {
        compare(&mut coordinator, &mut reference, sql);
    }
    let plan = explain(
        &mut coordinator,
        &format!("(ANALYZE, COSTS OFF, TIMING OFF) {}", queries[0]),
    );
    assert!(
        plan.iter()
            .any(|l| l.contains("Distributed Scan") && l.contains("loops=59")),
        "{plan:#?}"
    );
    let fragments: usize = plan
        .iter()
        .filter_map(|l| l.split("Fragment Timings: node ").nth(1))
        .filter_map(|l| {
            l.split(": ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(
        fragments, 8,
        "one fragment per shard of customers: {plan:#?}"
    );
    run_on_both(
        &mut coordinator,
        &mut reference,
        "RESET ALL; DROP TABLE visits",
    );
}

fn distinct_aggregates_read_distinct_rows(cluster: &Cluster) {
    // Only aggregates that ignore duplicate rows, at least one DISTINCT, or SELECT DISTINCT:
    // the fragments return each distinct row of the columns read once.
    let deduplicated = [
        "SELECT status, count(DISTINCT customer_id) FROM orders GROUP BY status",
        "SELECT count(DISTINCT qty), min(ordered_at), max(note) FROM orders WHERE customer_id > 100",
        "SELECT qty, count(DISTINCT status), string_agg(DISTINCT note, ',' ORDER BY note) FROM orders GROUP BY qty HAVING count(DISTINCT status) > 1",
        "SELECT country, count(DISTINCT signup), bool_or(vip), array_agg(DISTINCT name ORDER BY name) FILTER (WHERE customer_id < 40) FROM customers GROUP BY country",
        "SELECT count(DISTINCT ref), count(DISTINCT payload) FILTER (WHERE qty > 3) FROM orders",
        "SELECT kind, count(DISTINCT day), max(n) FROM events GROUP BY kind",
        "SELECT count(DISTINCT ordered_at::date) FROM orders WHERE qty = 3",
        "SELECT count(DISTINCT customer_id) FROM orders WHERE amount IS NULL",
        "SELECT DISTINCT status, qty FROM orders WHERE qty < 5",
        "SELECT DISTINCT country FROM customers ORDER BY country NULLS FIRST",
        "SELECT DISTINCT kind, day FROM events WHERE n < 100 ORDER BY day, kind",
    ];
    // Duplicates matter (count(*), avg), equal values can differ (numeric, float, interval),
    // or the groups are finished on the workers anyway: no DISTINCT in the fragments.
    let kept = [
        "SELECT count(DISTINCT amount) FROM orders",
        "SELECT count(DISTINCT price), max(qty) FROM orders",
        "SELECT count(DISTINCT waited) FROM orders",
        "SELECT qty, count(DISTINCT status), count(*) FROM orders GROUP BY qty",
        "SELECT count(DISTINCT qty), avg(qty) FROM orders",
        "SELECT count(DISTINCT qty), random() < 2 FROM orders",
        "SELECT customer_id, count(DISTINCT qty) FROM orders GROUP BY customer_id",
        "SELECT DISTINCT amount FROM orders",
        "SELECT DISTINCT ON (qty) qty, order_id FROM orders ORDER BY qty, order_id",
    ];
    let all: Vec<&str> = deduplicated.iter().chain(kept.iter()).copied().collect();
    check_all(cluster, &all);
    let mut coordinator = cluster.coordinator_client();
    for sql in deduplicated {
        let fragment = fragment(&mut coordinator, sql);
        assert!(
            fragment.starts_with("SELECT DISTINCT "),
            "{sql}: {fragment}"
        );
    }
    for sql in kept {
        let fragment = fragment(&mut coordinator, sql);
        assert!(
            !fragment.starts_with("SELECT DISTINCT "),
            "{sql}: {fragment}"
        );
    }
}

fn subqueries_ctes_and_set_operations(cluster: &Cluster) {
    check_all(cluster, &[
        "SELECT * FROM customers WHERE customer_id IN (SELECT customer_id FROM orders WHERE amount > 99.5)",
        "SELECT * FROM customers WHERE customer_id NOT IN (SELECT customer_id FROM orders) AND customer_id < 100",
        "SELECT customer_id, (SELECT count(*) FROM orders o WHERE o.customer_id = c.customer_id) FROM customers c WHERE customer_id < 50",
        "SELECT customer_id FROM customers c WHERE (SELECT max(amount) FROM orders o WHERE o.customer_id = c.customer_id) > 99",
        "SELECT * FROM orders WHERE amount = (SELECT max(amount) FROM orders)",
        // A semi join of co-located tables inside another: the planner wants the inner
        // side's key (equal to the outer's), which EXISTS cannot return.
        "SELECT count(*) FROM products p WHERE p.product_id IN (SELECT c.customer_id FROM customers c WHERE c.customer_id IN (SELECT o.customer_id FROM orders o WHERE o.qty = 1))",
        "SELECT p.category, count(*) FROM products p WHERE p.product_id IN (SELECT c.customer_id FROM customers c WHERE c.customer_id IN (SELECT o.customer_id FROM orders o)) GROUP BY 1",
        "SELECT * FROM orders WHERE amount > ALL (SELECT amount FROM orders WHERE customer_id = 3 AND amount IS NOT NULL)",
        "WITH big AS (SELECT customer_id, sum(amount) s FROM orders GROUP BY 1) SELECT * FROM big WHERE s > 1000",
        "WITH big AS MATERIALIZED (SELECT * FROM orders WHERE qty = 8) SELECT count(*), sum(amount) FROM big",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT c.customer_id FROM customers c JOIN r ON r.n = c.customer_id",
        "SELECT s.country, s.n FROM (SELECT country, count(*) n FROM customers GROUP BY country) s WHERE s.n > 300",
        "SELECT customer_id FROM customers WHERE customer_id < 10 UNION SELECT customer_id FROM orders WHERE order_id < 10",
        "SELECT customer_id FROM customers WHERE customer_id < 10 UNION ALL SELECT customer_id FROM orders WHERE order_id < 10",
        // Arms without a condition become members of an append relation, each table read by
        // a Distributed Scan of its own (a reference table too).
        "SELECT count(*), sum(customer_id) FROM (SELECT customer_id FROM customers UNION ALL SELECT customer_id FROM orders) u",
        "SELECT country, count(*) FROM (SELECT country FROM customers UNION ALL SELECT code FROM countries) u GROUP BY 1",
        "SELECT customer_id FROM customers UNION ALL SELECT customer_id FROM orders ORDER BY 1 DESC LIMIT 5",
        "SELECT * FROM (SELECT customer_id AS id FROM customers UNION ALL SELECT order_id FROM orders) u WHERE id BETWEEN 100 AND 120",
        // An arm whose condition is constant false is left out, not read whole.
        "SELECT count(*) FROM (SELECT customer_id, 1 AS k FROM customers UNION ALL SELECT customer_id, 2 FROM orders) u WHERE k = 2",
        "SELECT k, count(*) FROM (SELECT customer_id, 1 AS k FROM customers UNION ALL SELECT customer_id, 2 FROM orders UNION ALL SELECT 0, 3 FROM countries) u WHERE k <> 2 GROUP BY k",
        "SELECT customer_id FROM customers INTERSECT SELECT customer_id FROM orders WHERE qty = 1",
        "SELECT customer_id FROM customers EXCEPT SELECT customer_id FROM orders",
        "SELECT code FROM countries EXCEPT SELECT country FROM customers",
        "SELECT * FROM (VALUES (1), (2), (3)) v(id) JOIN customers c ON c.customer_id = v.id",
        "SELECT generate_series(1, 3) AS g, (SELECT count(*) FROM countries)",
        "SELECT (SELECT name FROM customers WHERE customer_id = 5), (SELECT count(*) FROM orders WHERE customer_id = 5)",
    ]);
}

fn window_functions(cluster: &Cluster) {
    check_all(cluster, &[
        "SELECT customer_id, order_id, row_number() OVER (PARTITION BY customer_id ORDER BY order_id) FROM orders WHERE customer_id < 30",
        "SELECT customer_id, order_id, sum(amount) OVER (PARTITION BY customer_id ORDER BY order_id) FROM orders WHERE customer_id < 30",
        "SELECT order_id, rank() OVER (ORDER BY amount DESC NULLS LAST, order_id) FROM orders WHERE qty = 5",
        "SELECT status, qty, count(*), sum(count(*)) OVER (PARTITION BY status) FROM orders GROUP BY status, qty",
        "SELECT order_id, lag(order_id) OVER w, lead(amount) OVER w FROM orders WHERE customer_id = 12 WINDOW w AS (ORDER BY order_id)",
        "SELECT country, customer_id, dense_rank() OVER (PARTITION BY country ORDER BY signup, customer_id) FROM customers WHERE customer_id < 100",
        "SELECT order_id, ntile(4) OVER (ORDER BY order_id) FROM orders WHERE customer_id < 5",
        "SELECT day, n, first_value(n) OVER (PARTITION BY kind ORDER BY day, n) FROM events WHERE n < 200",
    ]);
}

fn windows_partitioned_by_the_distribution_column_run_on_the_workers(cluster: &Cluster) {
    let pushed = [
        "SELECT customer_id, order_id, row_number() OVER (PARTITION BY customer_id ORDER BY order_id DESC) FROM orders",
        "SELECT customer_id, order_id, sum(amount) OVER w, avg(price) OVER w FROM orders WHERE qty < 5 WINDOW w AS (PARTITION BY customer_id ORDER BY order_id ROWS BETWEEN 2 PRECEDING AND 1 FOLLOWING)",
        "SELECT customer_id, order_id, count(*) FILTER (WHERE amount > 50) OVER (PARTITION BY customer_id) FROM orders",
        "SELECT customer_id, order_id, rank() OVER (PARTITION BY customer_id ORDER BY qty, status), dense_rank() OVER (PARTITION BY customer_id, qty ORDER BY order_id) FROM orders",
        "SELECT customer_id, order_id, lag(amount, 2) OVER (PARTITION BY customer_id ORDER BY order_id) - amount AS change FROM orders",
        "SELECT customer_id, order_id, first_value(note) OVER (PARTITION BY customer_id ORDER BY order_id RANGE BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING EXCLUDE CURRENT ROW) FROM orders",
        "SELECT customer_id, order_id, sum(qty) OVER (PARTITION BY customer_id ORDER BY order_id GROUPS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM orders",
        "SELECT customer_id, order_id, ntile(3) OVER (PARTITION BY customer_id ORDER BY order_id) FROM orders ORDER BY customer_id, order_id LIMIT 12",
        "SELECT c.name, o.order_id, max(o.amount) OVER (PARTITION BY c.customer_id) FROM customers c JOIN orders o USING (customer_id) WHERE o.qty = 2",
        "SELECT order_id, row_number() OVER (ORDER BY order_id) FROM orders WHERE customer_id = 17",
        "SELECT code, name, row_number() OVER (ORDER BY code) FROM countries",
    ];
    // Partitions that may span fragments: the window is computed on the coordinator.
    let kept = [
        "SELECT order_id, rank() OVER (ORDER BY amount DESC NULLS LAST, order_id) FROM orders WHERE qty = 5",
        "SELECT customer_id, order_id, count(*) OVER (PARTITION BY qty) FROM orders WHERE customer_id < 20",
        "SELECT customer_id, order_id, row_number() OVER (PARTITION BY customer_id ORDER BY order_id), count(*) OVER () FROM orders WHERE customer_id < 20",
        "SELECT o.customer_id, o.order_id, count(*) OVER (PARTITION BY o.customer_id) FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id AND o.qty = 1",
        "SELECT customer_id, order_id, row_number() OVER (PARTITION BY customer_id ORDER BY order_id) FROM orders WHERE ordered_at::text < '2025-03'",
    ];
    let all: Vec<&str> = pushed.iter().chain(kept.iter()).copied().collect();
    check_all(cluster, &all);
    let mut coordinator = cluster.coordinator_client();
    for sql in pushed {
        let plan = explain(&mut coordinator, sql);
        assert!(
            !plan.iter().any(|l| l.contains("WindowAgg"))
                && fragment(&mut coordinator, sql).contains(" OVER ("),
            "{sql} should compute its windows on the workers: {plan:#?}"
        );
    }
    for sql in kept {
        let plan = explain(&mut coordinator, sql);
        assert!(
            plan.iter().any(|l| l.contains("WindowAgg")),
            "{sql}: {plan:#?}"
        );
    }
}

fn every_type_and_null_round_trips(cluster: &Cluster) {
    check_all(cluster, &[
        "SELECT customer_id, order_id, amount, qty, price, status, ordered_at, note, payload, ref, waited FROM orders",
        "SELECT customer_id, name, country, signup, vip, tags, profile FROM customers",
        "SELECT price, price::text, amount::text, ordered_at::text, waited::text FROM orders WHERE order_id < 50",
        "SELECT * FROM products",
        "SELECT profile, profile->'level', tags[1], array_length(tags, 1) FROM customers WHERE customer_id < 60",
        "SELECT NULL::int AS nothing, amount FROM orders WHERE amount IS NULL",
        "SELECT payload, encode(payload, 'base64') FROM orders WHERE order_id < 40",
    ]);
    // Special values and more types, with user-defined types that the workers get when the
    // table is distributed: an enum, domains (one over another), a composite type.
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TYPE grade AS ENUM ('low', 'mid', 'high');
         CREATE DOMAIN positive AS numeric(10,2) CHECK (VALUE > 0);
         CREATE DOMAIN small_positive AS positive NOT NULL CONSTRAINT below_100 CHECK (VALUE < 100);
         CREATE DOMAIN code AS text COLLATE \"C\" CHECK (VALUE ~ '^[A-Z]+$');
         CREATE TYPE price_tag AS (amount positive, label code, grades grade[]);
         CREATE TABLE odd_values (id int PRIMARY KEY, f4 real, f8 float8, n numeric, t time,
             tz timetz, ts timestamp, r int4range, tr tstzrange, ip inet, net cidr, mac macaddr,
             b bytea, bits bit(4), vb varbit, ch char(3), x xml, mo money, js json, pt point,
             ia int[], ta text[], nr numrange, iv interval, o oid, g grade, p small_positive,
             c code, tag price_tag);
         INSERT INTO odd_values VALUES
          (1, 'NaN', '-0', 'NaN', '24:00', '23:59:59.999999+14', 'infinity', '[1,5)',
           '[2024-01-01 00:00+02, 2024-02-01)', '10.0.0.1/8', '10.0.0.0/8', '08:00:2b:01:02:03',
           '\\x00ff', B'1010', B'101', 'ab', '<a>1</a>', 12.34, '{\"a\": [1, 2.50]}', '(1.5,2)',
           '{{1,2},{3,4}}', '{\"a,b\",\"c\\\"d\",NULL,\"NULL\"}', '(,3.5]', '1 mon -2 days 03:00:00.5', 42,
           'high', 5.5, 'AB', ROW(1.25, 'X', '{low,high}')),
          (2, 'Infinity', '1e-310', '-Infinity', '00:00', '12:00-03:30', '-infinity', 'empty', '(,)',
           '::1', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', '', B'0000', B'', 'x', '<b/>', -0.01, 'null',
           '(0,0)', '{}', '{}', 'empty', '-178000000 years', 0, 'low', 99.99, 'Z', ROW(NULL, NULL, '{}')),
          (3, '-Infinity', '1.7976931348623157e308', '1e-1000', '12:34:56.789', '00:00:00+00',
           '2000-02-29 12:00', '[3,3]', '[2024-06-01,)', '192.168.1.5', '192.168.1.0/24',
           '00:00:00:00:00:00', '\\x5c27', B'1111', B'1', '   ', 'text only', 0, '[]', '(-1e10,1e-10)',
           '{{NULL}}', '{\" lead\", \"trail \"}', '[1.5,1.5]', '0', 4294967295, 'mid', 0.01, 'QQ', NULL),
          (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1, NULL, NULL);",
    );
    coordinator
        .batch_execute(
            "SELECT pgdist.create_distributed_table('odd_values', 'id', shard_count => 3)",
        )
        .unwrap();
    check_all(cluster, &[
        "SELECT * FROM odd_values",
        "SELECT id, f8 / 2, n + 1, tz + interval '1 hour', r * '[2,10)', tr && '[2024-01-15,2024-01-16)',
                ip << '10.0.0.0/8', host(ip), b || '\\x01', bits & B'0110', g > 'mid', p + 1, ch || '|',
                mo * 2, js::text, ta[1], iv / 2, justify_interval(iv), (tag).label, (tag).grades[2],
                c || '!' FROM odd_values",
        "SELECT count(*), min(g), max(g), sum(mo), avg(f4), sum(f8), max(ts), min(tz), max(t), range_agg(r),
                string_agg(ta::text, ';' ORDER BY id), bit_or(bits), max(ip), min(mac), sum(p), max(c),
                xmlagg(x ORDER BY id)::text, array_agg(tag ORDER BY id) FROM odd_values",
        "SELECT g, count(*), sum(p) FROM odd_values GROUP BY g",
        "SELECT id FROM odd_values WHERE tag = ROW(1.25, 'X', '{low,high}')::price_tag",
        "SELECT id FROM odd_values WHERE f8 = '-0' OR n = 'NaN' OR f4 = 'Infinity'",
    ]);
    // The domains' checks hold on the cluster as on one server.
    for sql in [
        "INSERT INTO odd_values (id, p) VALUES (10, 150)",
        "INSERT INTO odd_values (id, p) VALUES (11, NULL)",
        "INSERT INTO odd_values (id, p, c) VALUES (12, 5, 'lower')",
        "UPDATE odd_values SET p = p * 50 WHERE id = 2",
    ] {
        compare(&mut coordinator, &mut reference, sql);
    }
    check_all(cluster, &["SELECT id, p, c FROM odd_values"]);
    // A column added later with a new type: the workers get the type with the column.
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE DOMAIN percent AS int CHECK (VALUE BETWEEN 0 AND 100);
         ALTER TABLE odd_values ADD COLUMN share percent DEFAULT 50;
         UPDATE odd_values SET share = id * 10 WHERE id < 3",
    );
    compare(
        &mut coordinator,
        &mut reference,
        "INSERT INTO odd_values (id, p, share) VALUES (20, 1, 101)",
    );
    check_all(cluster, &["SELECT id, share FROM odd_values"]);
    // Changes to the types reach the workers' copies.
    for sql in [
        "ALTER TYPE grade ADD VALUE 'top' AFTER 'high'",
        "INSERT INTO odd_values (id, p, g) VALUES (21, 2, 'top')",
        "ALTER TYPE grade RENAME VALUE 'low' TO 'bottom'",
        "UPDATE odd_values SET g = 'bottom' WHERE id = 3",
        "ALTER TYPE price_tag ADD ATTRIBUTE note text",
        "INSERT INTO odd_values (id, p, tag) VALUES (22, 3, ROW(2, 'Y', '{top}', 'new'))",
        "ALTER DOMAIN percent ADD CONSTRAINT even CHECK (VALUE % 2 = 0)",
        "UPDATE odd_values SET share = share + 1 WHERE id = 1",
        "ALTER DOMAIN percent RENAME CONSTRAINT even TO is_even",
        "ALTER DOMAIN percent DROP CONSTRAINT is_even",
        "UPDATE odd_values SET share = share + 1 WHERE id = 1",
        "ALTER TYPE grade RENAME TO level",
    ] {
        compare(&mut coordinator, &mut reference, sql);
    }
    check_all(
        cluster,
        &[
            "SELECT id, g, tag, share FROM odd_values",
            "SELECT id FROM odd_values WHERE g > 'high'::level",
        ],
    );
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DROP TABLE odd_values; DROP TYPE price_tag; DROP DOMAIN code, small_positive, positive, percent;
         DROP TYPE level",
    );
    // Dropped on the workers too: a type made again under the same name is the new one there.
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TYPE level AS ENUM ('x', 'y'); CREATE TABLE relevel (id int, l level)",
    );
    coordinator
        .batch_execute("SELECT pgdist.create_distributed_table('relevel', 'id')")
        .unwrap();
    compare(
        &mut coordinator,
        &mut reference,
        "INSERT INTO relevel VALUES (1, 'x'), (2, 'y') RETURNING *",
    );
    // Range types (with their multiranges) reach the workers too, when the table is
    // distributed or when a column of one is added: over a base type with a difference
    // function, over an enum, in another schema with a collation.
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TYPE floatrange AS RANGE (subtype = float8, subtype_diff = float8mi);
         CREATE TYPE levelrange AS RANGE (subtype = level);
         CREATE SCHEMA spans;
         CREATE TYPE spans.textspan AS RANGE (subtype = text, collation = \"C\");
         CREATE TABLE spanned (id int, fr floatrange, frs floatmultirange, lr levelrange);
         INSERT INTO spanned SELECT g, floatrange(g, g * 2.5), floatmultirange(floatrange(0, g),
           floatrange(g + 10, NULL)), levelrange('x', 'y', '[]') FROM generate_series(1, 5) g;",
    );
    coordinator
        .batch_execute("SELECT pgdist.create_distributed_table('spanned', 'id')")
        .unwrap();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "ALTER TABLE spanned ADD COLUMN ts spans.textspan;
         UPDATE spanned SET ts = spans.textspan('B', 'a') WHERE id < 3",
    );
    check_all(
        cluster,
        &[
            "SELECT * FROM spanned",
            "SELECT id, fr @> 3.5::float8, upper(fr) - lower(fr), frs @> 12.5::float8, lr @> 'y'::level,
                    ts @> 'Z'::text FROM spanned",
            "SELECT range_agg(fr), range_intersect_agg(lr) FROM spanned",
            "SELECT id FROM spanned WHERE fr && floatrange(4, 6)",
        ],
    );
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DROP TABLE relevel, spanned; DROP TYPE levelrange, level, floatrange, spans.textspan;
         DROP SCHEMA spans",
    );
}

fn session_settings_travel_with_fragments(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    for setting in [
        "SET TimeZone = 'Asia/Tokyo'",
        "SET DateStyle = 'SQL, DMY'",
        "SET IntervalStyle = 'sql_standard'",
        "SET extra_float_digits = 0",
        "SET TimeZone = 'America/New_York'; SET DateStyle = 'German'",
        "SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'ISO, DMY'",
        // India's IST, not Israel's: the abbreviations travel too.
        "SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'SQL, DMY'; SET timezone_abbreviations = 'India'",
    ] {
        run_on_both(&mut coordinator, &mut reference, setting);
        for sql in [
            "SELECT order_id, ordered_at, waited, price, signup FROM orders JOIN customers USING (customer_id) WHERE order_id < 300",
            "SELECT order_id FROM orders WHERE ordered_at < '2025-01-03 05:00:00' AND waited < interval '30 minutes'",
            "SELECT customer_id FROM customers WHERE signup < '02.03.2020' OR signup = '2021-05-09'",
            "SELECT date_trunc('day', ordered_at), count(*) FROM orders GROUP BY 1",
        ] {
            compare(&mut coordinator, &mut reference, sql);
        }
        run_on_both(&mut coordinator, &mut reference, "RESET ALL");
    }
    // Where a zone's abbreviation means another zone on reading (IST: Israel in the default
    // table), timestamps written in a non-ISO DateStyle would come back as other instants:
    // refused, with the way out.
    coordinator
        .batch_execute("SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'SQL, DMY'")
        .unwrap();
    let err = coordinator
        .query("SELECT min(ordered_at) FROM orders", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    let hint = err.as_db_error().and_then(|e| e.hint()).unwrap_or_default();
    assert!(hint.contains("DateStyle"), "{hint}");
    coordinator.batch_execute("RESET ALL").unwrap();
}

fn prepared_statements_prune_by_parameter(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    // Extended protocol, typed parameters; enough executions for a generic plan.
    for id in [1, 5, 42, 1999, 5000, 42, 42, 42, 7, 7] {
        let sql = "SELECT order_id, amount, status::text FROM orders WHERE customer_id = $1 ORDER BY order_id";
        let got: Vec<(i64, Option<String>)> = coordinator
            .query(sql, &[&id])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get::<_, Option<String>>(2)))
            .collect();
        let want: Vec<(i64, Option<String>)> = reference
            .query(sql, &[&id])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get::<_, Option<String>>(2)))
            .collect();
        assert_eq!(got, want, "customer {id}");
    }
    // PREPARE / EXECUTE with forced generic plans prunes at execution.
    run_on_both(&mut coordinator, &mut reference, "SET plan_cache_mode = force_generic_plan; PREPARE c(int) AS SELECT count(*), sum(amount) FROM orders WHERE customer_id = $1");
    for id in [3, 4, 3, 1000, 2099, 2100] {
        compare(
            &mut coordinator,
            &mut reference,
            &format!("EXECUTE c({id})"),
        );
    }
    let plan: Vec<String> = coordinator
        .query("EXPLAIN EXECUTE c(3)", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("Fragments: 1 on 1")),
        "{plan:?}"
    );
    // `key = ANY($1)` reads the shards of the array's elements.
    run_on_both(&mut coordinator, &mut reference, "PREPARE a(int[]) AS SELECT count(*), sum(amount), max(order_id) FROM orders WHERE customer_id = ANY($1)");
    for ids in [
        "{3,4}",
        "{}",
        "{1000}",
        "{5,NULL,2100,7,8}",
        "{3,4}",
        "{NULL}",
        "{9,9,9}",
    ] {
        assert!(matches!(
            compare(
                &mut coordinator,
                &mut reference,
                &format!("EXECUTE a('{ids}')")
            ),
            Comparison::Same
        ));
    }
    compare(&mut coordinator, &mut reference, "EXECUTE a(NULL)");
    let plan = explain(&mut coordinator, "EXECUTE a('{3,3}')");
    assert!(
        plan.iter().any(|l| l.contains("Fragments: 1 on 1")),
        "{plan:?}"
    );
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DEALLOCATE a; DEALLOCATE c; RESET plan_cache_mode",
    );
    // Fragments with parameters run as statements prepared on the workers: an execution that
    // fails there, or a rolled-back transaction, leaves the next ones working.
    run_on_both(&mut coordinator, &mut reference, "SET plan_cache_mode = force_generic_plan; PREPARE d(int, int) AS SELECT order_id / $2 FROM orders WHERE customer_id = $1 OR qty = $2 ORDER BY 1");
    for sql in [
        "EXECUTE d(5, 1)",
        "EXECUTE d(5, 0)",
        "EXECUTE d(5, 2)",
        "BEGIN; EXECUTE d(6, 3); ROLLBACK",
        "EXECUTE d(6, 3)",
        "EXECUTE d(6, 0)",
        "EXECUTE d(7, 4)",
    ] {
        assert!(matches!(
            compare(&mut coordinator, &mut reference, sql),
            Comparison::Same
        ));
    }
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DEALLOCATE d; RESET plan_cache_mode",
    );
}

fn range_tables_prune_by_comparisons(cluster: &Cluster) {
    // events is split at 2024-04-01, 2024-08-01 and 2024-12-01.
    check_all(
        cluster,
        &[
            "SELECT * FROM events WHERE day = '2024-04-01'",
            "SELECT * FROM events WHERE day = '2024-03-31'",
            "SELECT count(*), sum(n) FROM events WHERE day < '2024-04-01'",
            "SELECT count(*), sum(n) FROM events WHERE day <= '2024-04-01'",
            "SELECT count(*) FROM events WHERE day > '2024-11-30'",
            "SELECT count(*) FROM events WHERE day >= '2024-12-01'",
            "SELECT count(*) FROM events WHERE day BETWEEN '2024-05-01' AND '2024-06-01'",
            "SELECT count(*) FROM events WHERE '2024-08-01' <= day AND day < '2024-08-03'",
            "SELECT count(*), sum(n) FROM events WHERE day < '1999-01-01'",
            "SELECT * FROM events WHERE day IN ('2024-01-05', '2024-12-24') ORDER BY day, n",
            "SELECT count(*) FROM events WHERE day > '2024-06-01' OR kind = 'buy'",
            "SELECT count(*) FROM events WHERE day > '2024-05-01'::timestamp",
        ],
    );
    let mut coordinator = cluster.coordinator_client();
    let fragments = |client: &mut postgres::Client, sql: &str| -> String {
        let plan = explain(client, sql);
        plan.into_iter()
            .find(|l| l.contains("Fragments:"))
            .unwrap_or_default()
    };
    for (sql, expected) in [
        (
            "SELECT * FROM events WHERE day = '2024-04-01'",
            "Fragments: 1 ",
        ),
        (
            "SELECT * FROM events WHERE day < '2024-04-01'",
            "Fragments: 1 ",
        ),
        (
            "SELECT * FROM events WHERE day >= '2024-08-01'",
            "Fragments: 2 ",
        ),
        (
            "SELECT * FROM events WHERE day BETWEEN '2024-05-01' AND '2024-06-01'",
            "Fragments: 1 ",
        ),
        (
            "SELECT * FROM events WHERE day < '1999-01-01'",
            "Fragments: 1 ",
        ),
        (
            "SELECT * FROM events WHERE day >= '2024-09-01' AND day < '2024-03-01'",
            "Fragments: 0 ",
        ),
        (
            "SELECT * FROM events WHERE day > '2024-06-01' OR kind = 'buy'",
            "Fragments: 4 ",
        ),
    ] {
        let line = fragments(&mut coordinator, sql);
        assert!(line.contains(expected), "{sql}: {line}");
    }
}

/// The extended protocol's portals (a driver's fetch size: `Execute` with a row limit) fetch
/// a distributed query's rows batch by batch, and two open portals interleave — also in a
/// REPEATABLE READ transaction, where both read every node through the transaction's one
/// connection there. The rows match plain PostgreSQL's.
fn portals_fetch_in_batches_and_interleave(cluster: &Cluster) {
    let first = "SELECT customer_id, order_id, amount::text FROM orders WHERE order_id % 20 = 0 \
                 ORDER BY order_id";
    let second = "SELECT o.order_id, c.name FROM orders o JOIN customers c USING (customer_id) \
                  WHERE o.qty > $1 AND o.order_id % 30 = 0 ORDER BY o.order_id";
    let mut results = Vec::new();
    for server in [0, 1] {
        let mut client = match server {
            0 => cluster.coordinator_client(),
            _ => cluster.reference.connect(),
        };
        let mut rows = Vec::new();
        for isolation in [
            postgres::IsolationLevel::ReadCommitted,
            postgres::IsolationLevel::RepeatableRead,
        ] {
            let mut transaction = client
                .build_transaction()
                .isolation_level(isolation)
                .start()
                .unwrap();
            let one = transaction.bind(first, &[]).unwrap();
            let two = transaction.bind(second, &[&2i32]).unwrap();
            loop {
                let a = transaction.query_portal(&one, 7).unwrap();
                let b = transaction.query_portal(&two, 5).unwrap();
                if a.is_empty() && b.is_empty() {
                    break;
                }
                for row in &a {
                    let (customer, order, amount): (i32, i64, Option<String>) =
                        (row.get(0), row.get(1), row.get(2));
                    rows.push(format!("a {customer} {order} {amount:?}"));
                }
                for row in &b {
                    let (order, name): (i64, Option<String>) = (row.get(0), row.get(1));
                    rows.push(format!("b {order} {name:?}"));
                }
            }
            transaction.commit().unwrap();
        }
        results.push(rows);
    }
    assert!(results[0].len() > 100, "{}", results[0].len());
    assert_eq!(results[0], results[1]);
}

fn explain_shows_fragments_remote_plans_and_timings(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let lines = |client: &mut postgres::Client, sql: &str| -> Vec<String> {
        client
            .query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let plan = lines(
        &mut coordinator,
        "EXPLAIN SELECT * FROM orders WHERE customer_id = 42",
    );
    assert!(
        plan.iter().any(|l| l.contains("Fragments: 1 on 1 node(s)")),
        "{plan:?}"
    );
    assert!(
        plan.iter()
            .any(|l| l.contains("Fragment: SELECT ") && l.contains("orders_")),
        "{plan:?}"
    );
    let plan = lines(
        &mut coordinator,
        "EXPLAIN (ANALYZE) SELECT count(*) FROM orders WHERE qty = 3",
    );
    assert!(
        plan.iter().any(|l| l.contains("Fragments: 8 on 2 node(s)")),
        "{plan:?}"
    );
    assert!(plan.iter().any(|l| l.contains("Remote Plan:")), "{plan:?}");
    let timings: Vec<&String> = plan
        .iter()
        .filter(|l| l.contains("Fragment Timings: node"))
        .collect();
    assert_eq!(timings.len(), 2, "{plan:?}");
    let fragments: usize = timings
        .iter()
        .filter_map(|l| {
            l.split(": ")
                .nth(2)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(fragments, 8, "{plan:?}");
    // In JSON the properties with several values are lists, not repeated keys.
    coordinator
        .batch_execute(
            "CREATE FUNCTION explain_json(q text) RETURNS jsonb LANGUAGE plpgsql AS $$
             DECLARE plan jsonb;
             BEGIN EXECUTE 'EXPLAIN (ANALYZE, FORMAT JSON) ' || q INTO plan; RETURN plan; END $$",
        )
        .unwrap();
    let (timings, remote_plan): (i32, i32) = coordinator
        .query_one(
            "SELECT jsonb_array_length(s -> 'Fragment Timings')::int,
                    jsonb_array_length(s -> 'Remote Plan')::int
               FROM explain_json('SELECT count(*) FROM orders WHERE qty = 3') p,
                    jsonb_path_query(p, 'strict $.**') s
              WHERE s ? 'Fragment Timings'",
            &[],
        )
        .map(|row| (row.get(0), row.get(1)))
        .unwrap();
    assert_eq!(timings, 2);
    assert!(
        remote_plan >= 2,
        "the remote plan has several lines: {remote_plan}"
    );
    coordinator
        .batch_execute("DROP FUNCTION explain_json")
        .unwrap();
}

fn errors_match_plain_postgres(cluster: &Cluster) {
    check_all(
        cluster,
        &[
            "SELECT order_id / (qty - qty) FROM orders WHERE customer_id = 3",
            "SELECT * FROM orders WHERE 1 / (qty - qty) = 1",
            "SELECT no_such_column FROM orders",
            "SELECT * FROM orders WHERE note::int > 3",
            "SELECT (profile->>'name')::int FROM customers",
        ],
    );
}

fn unsupported_queries_fail_with_0a000(cluster: &Cluster) {
    check_all(
        cluster,
        &[
            "SELECT * FROM customers ORDER BY customer_id LIMIT 3 FOR UPDATE",
            "SELECT * FROM customers c JOIN orders o ON o.order_id = c.customer_id FOR UPDATE OF c",
        ],
    );
    // System columns would describe a shard's row, not the table's: refused, not answered.
    let mut coordinator = cluster.coordinator_client();
    for sql in [
        "SELECT ctid, name FROM customers WHERE customer_id = 1",
        "SELECT tableoid::regclass, count(*) FROM orders GROUP BY 1",
        "SELECT count(*) FROM customers c JOIN orders o USING (customer_id) WHERE o.xmin <> '0'::xid",
        // Samples whose arguments the workers cannot compute, or in a write: reading every
        // row would be no sample.
        "SELECT count(*) FROM orders TABLESAMPLE BERNOULLI (random() * 10) REPEATABLE (3)",
        "UPDATE orders o SET qty = 0 FROM customers c TABLESAMPLE SYSTEM (50) WHERE c.customer_id = o.customer_id",
    ] {
        let err = coordinator.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
        assert!(err.as_db_error().and_then(|d| d.hint()).is_some(), "{sql}");
    }
    let unsupported = UNSUPPORTED.lock().unwrap();
    println!("queries answered with 0A000 so far: {}", unsupported.len());
    for line in unsupported.iter() {
        println!("  {line}");
    }
}

/// Fragments still running on `server` (their text mentions the shards of `orders`).
fn one_count(client: &mut postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .unwrap_or_else(|err| panic!("{sql}: {err:?}"))
        .get(0)
}

/// TABLESAMPLE BERNOULLI / SYSTEM samples every shard alike, so together the shards' samples
/// are a sample of the table: all rows at 100 %, none at 0 %, about the percentage in between,
/// only rows of the table, the same rows again with the same REPEATABLE seed.
fn tablesample_samples_every_shard_alike(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE sampled (id int PRIMARY KEY, v int);
         INSERT INTO sampled SELECT i, i % 10 FROM generate_series(1, 20000) i;",
    );
    coordinator
        .batch_execute(
            "SELECT pgdist.create_distributed_table('sampled', 'id', shard_count => 8, colocate_with => 'none')",
        )
        .unwrap();
    for sql in [
        "SELECT count(*), sum(v) FROM sampled TABLESAMPLE BERNOULLI (100)",
        "SELECT count(*), sum(v) FROM sampled TABLESAMPLE SYSTEM (100) WHERE v > 3",
        "SELECT count(*) FROM sampled TABLESAMPLE SYSTEM (0)",
        "SELECT v, count(*) FROM sampled TABLESAMPLE BERNOULLI (100) REPEATABLE (4) GROUP BY v ORDER BY v",
        "SELECT count(*) FROM sampled s TABLESAMPLE BERNOULLI (100) JOIN sampled t USING (id) WHERE t.v = 2",
    ] {
        let outcome = compare(&mut coordinator, &mut reference, sql);
        assert!(!matches!(outcome, Comparison::Unsupported(_)), "{sql}");
    }
    let sample = "SELECT count(*) FROM sampled TABLESAMPLE BERNOULLI (30) REPEATABLE (11)";
    let first = one_count(&mut coordinator, sample);
    assert!(
        (5000..7000).contains(&first),
        "{first} of 20000 rows at 30 %"
    );
    assert_eq!(one_count(&mut coordinator, sample), first);
    let system = one_count(
        &mut coordinator,
        "SELECT count(*) FROM sampled TABLESAMPLE SYSTEM (50)",
    );
    assert!(
        (3000..17000).contains(&system),
        "{system} of 20000 rows at 50 % of the pages"
    );
    // Joined with the table itself on the workers: every sampled row is one of its rows.
    let joined = one_count(
        &mut coordinator,
        "SELECT count(*) FROM sampled s TABLESAMPLE BERNOULLI (30) REPEATABLE (11)
           JOIN sampled t ON t.id = s.id AND t.v = s.v",
    );
    assert_eq!(joined, first);
    assert!(fragment(&mut coordinator, sample).contains("TABLESAMPLE bernoulli"));
    // With the percentage as a parameter (custom and generic plans).
    coordinator
        .batch_execute("PREPARE sample_of(float4) AS SELECT count(*) FROM sampled TABLESAMPLE BERNOULLI ($1) REPEATABLE (1)")
        .unwrap();
    for _ in 0..7 {
        assert_eq!(one_count(&mut coordinator, "EXECUTE sample_of(100)"), 20000);
        assert_eq!(one_count(&mut coordinator, "EXECUTE sample_of(0)"), 0);
    }
    run_on_both(&mut coordinator, &mut reference, "DROP TABLE sampled");
}

fn running_fragments(server: &pgdist_pg_test::Server) -> i64 {
    server
        .connect()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%orders\\_%' \
             AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0)
}

fn statement_timeout_stops_fragments_on_every_node(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute("SET statement_timeout = '1s'")
        .unwrap();
    // repeat() and length() are immutable built-ins: shipped, so the workers do the slow part.
    let started = Instant::now();
    let err = client
        .batch_execute("SELECT count(*) FROM orders WHERE length(repeat(note, 200000)) > 0")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "took {:?}",
        started.elapsed()
    );
    // The cancel requests reach the workers at once; give them a moment to stop.
    let deadline = Instant::now() + Duration::from_secs(2);
    while cluster.workers.iter().any(|w| running_fragments(w) > 0) {
        assert!(
            Instant::now() < deadline,
            "fragments still running after the timeout"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    client.batch_execute("RESET statement_timeout").unwrap();
    let count: i64 = client
        .query_one("SELECT count(*) FROM orders", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 20000);
}

fn a_worker_that_is_down_gives_a_clear_error(cluster: &Cluster) {
    let down = &cluster.workers[1];
    down.ctl("stop");
    let started = Instant::now();
    let result = cluster
        .coordinator_client()
        .batch_execute("SELECT count(*) FROM orders");
    down.ctl("start");
    let err = result.unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err:?}");
    assert!(
        message(&err).contains(&down.port.to_string()),
        "{}",
        message(&err)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let count: i64 = cluster
        .coordinator_client()
        .query_one("SELECT count(*) FROM orders", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 20000);
    // A session's cached connections to a node that restarted since are replaced quietly.
    let mut session = cluster.coordinator_client();
    let count_all = |session: &mut postgres::Client| -> i64 {
        session
            .query_one("SELECT count(*) FROM orders", &[])
            .unwrap()
            .get(0)
    };
    assert_eq!(count_all(&mut session), 20000);
    down.ctl("restart");
    assert_eq!(count_all(&mut session), 20000);
}

/// A role that exists only on the coordinator: its privileges are checked there (tables,
/// columns, functions, administration), and its fragments run under pgdist's own login.
fn roles_are_checked_on_the_coordinator_and_need_no_account_on_the_workers(cluster: &Cluster) {
    let mut admin = cluster.coordinator_client();
    admin
        .batch_execute(
            "CREATE ROLE reader LOGIN NOINHERIT;
             CREATE ROLE analyst NOLOGIN;
             GRANT analyst TO reader;
             GRANT SELECT ON customers, orders TO analyst;
             GRANT SELECT (customer_id, name) ON customers TO reader;
             CREATE VIEW cheap_orders AS SELECT * FROM orders WHERE amount < 10 WITH CHECK OPTION;
             GRANT ALL ON cheap_orders TO analyst;
             CREATE TABLE reader_notes (n int); INSERT INTO reader_notes VALUES (1), (2);
             GRANT SELECT ON reader_notes TO reader;",
        )
        .unwrap();
    for worker in &cluster.workers {
        let roles: i64 = worker
            .connect()
            .query_one(
                "SELECT count(*) FROM pg_roles WHERE rolname IN ('reader', 'analyst')",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(roles, 0, "the roles exist on a worker");
    }
    // A backend of the role's own, whose first catalog read happens as the role.
    let conninfo = format!(
        "host=127.0.0.1 port={} user=reader dbname=postgres",
        cluster.coordinator.port
    );
    let mut session = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    let mut reference = cluster.reference.connect();
    let denied = |session: &mut postgres::Client, sql: &str| {
        let err = session.simple_query(sql).expect_err(sql);
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err:?}");
    };
    // Its own column privileges, then the tables only its NOLOGIN role may read.
    compare(
        &mut session,
        &mut reference,
        "SELECT customer_id, name FROM customers WHERE customer_id IN (7, 8, 900)",
    );
    denied(
        &mut session,
        "SELECT country FROM customers WHERE customer_id = 7",
    );
    denied(&mut session, "SELECT count(*) FROM orders");
    session.batch_execute("SET ROLE analyst").unwrap();
    for sql in [
        "SELECT count(*), sum(amount)::text, avg(qty)::text FROM orders",
        "SELECT * FROM customers WHERE customer_id = 7",
        "SELECT c.country, count(*), max(o.ordered_at) FROM customers c JOIN orders o USING (customer_id) GROUP BY 1",
        "SELECT status, count(DISTINCT customer_id) FROM orders GROUP BY 1",
        "SELECT order_id FROM orders ORDER BY amount DESC NULLS LAST, order_id LIMIT 5",
    ] {
        compare(&mut session, &mut reference, sql);
    }
    // Writes it has no privilege for, and a function PUBLIC may not execute: refused on the
    // coordinator, nothing sent.
    for sql in [
        "UPDATE orders SET qty = 0 WHERE customer_id = 7",
        "DELETE FROM orders WHERE qty = 1",
        "INSERT INTO orders (customer_id, order_id) VALUES (7, 99999)",
        "TRUNCATE orders",
        "SELECT pgdist.run_on_workers('SELECT 1')",
        "SELECT pgdist.undistribute_table('orders')",
        "SELECT pgdist.add_node('127.0.0.1', 1)",
    ] {
        denied(&mut session, sql);
    }
    admin
        .batch_execute("REVOKE EXECUTE ON FUNCTION abs(int) FROM PUBLIC")
        .unwrap();
    denied(
        &mut session,
        "SELECT count(*) FROM orders WHERE abs(qty) = 3",
    );
    admin
        .batch_execute("GRANT EXECUTE ON FUNCTION abs(int) TO PUBLIC")
        .unwrap();
    compare(
        &mut session,
        &mut reference,
        "SELECT count(*) FROM orders WHERE abs(qty) = 3",
    );
    // A view's check option is tested on the coordinator: rows that stay in the view are
    // written, a row that would leave it fails with PostgreSQL's error and changes nothing.
    session
        .simple_query("UPDATE cheap_orders SET qty = qty WHERE customer_id = 7")
        .expect("rows stay in the view");
    let err = session
        .simple_query("UPDATE cheap_orders SET amount = amount + 50 WHERE customer_id = 7")
        .expect_err("check option");
    assert_eq!(sqlstate(&err), "44000", "{err:?}");
    compare(
        &mut admin,
        &mut reference,
        "SELECT count(*), sum(qty) FROM orders",
    );
    session.batch_execute("RESET ROLE").unwrap();
    let local: i64 = session
        .query_one("SELECT sum(n) FROM reader_notes", &[])
        .unwrap()
        .get(0);
    assert_eq!(local, 3);
    drop(session);
    admin
        .batch_execute(
            "DROP TABLE reader_notes; DROP VIEW cheap_orders;
             REVOKE ALL ON customers, orders FROM reader, analyst; DROP ROLE reader, analyst",
        )
        .unwrap();
}

/// Row-level security and security-barrier views: the policies' conditions run on the workers
/// with each fragment, and a condition of the query that could leak a hidden row (here: one
/// that fails with division by zero on it) never sees one — on the workers either.
fn row_level_security_is_applied_on_the_workers(cluster: &Cluster) {
    let mut admin = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut admin,
        &mut reference,
        "CREATE ROLE tenant_app NOLOGIN;
         CREATE TABLE notes (tenant int NOT NULL, id int NOT NULL, author text, secret int,
                             body text, PRIMARY KEY (tenant, id));
         CREATE TABLE tags (tenant int NOT NULL, note_id int, tag text);
         CREATE TABLE memberships (tenant int, member text);
         INSERT INTO notes SELECT g % 6, g, 'a' || g % 4, g % 40, 'note ' || g
           FROM generate_series(1, 600) g;
         INSERT INTO notes VALUES (1, 1000, 'hidden', 100000, 'x'), (2, 1001, 'a1', 999, 'y'),
                                  (3, 1002, 'hidden', 100000, 'z');
         INSERT INTO tags SELECT g % 6, g, 't' || g % 5 FROM generate_series(1, 600, 3) g;
         INSERT INTO memberships VALUES (3, 'tenant_app'), (4, 'someone');
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         ALTER TABLE tags ENABLE ROW LEVEL SECURITY;
         CREATE POLICY by_setting ON notes
           USING (tenant = current_setting('app.tenant', true)::int);
         CREATE POLICY by_membership ON notes
           USING (tenant IN (SELECT m.tenant FROM memberships m WHERE m.member = current_user));
         -- Costlier than the query's conditions: a worker left alone would test those first.
         CREATE POLICY not_hidden ON notes AS RESTRICTIVE
           USING (author <> ALL (ARRAY['hidden', 'x1', 'x2', 'x3', 'x4', 'x5', 'x6', 'x7', 'x8',
                                       'x9', 'x10', 'x11', 'x12', 'x13', 'x14', 'x15', 'x16']));
         CREATE POLICY tags_by_setting ON tags
           USING (tenant = current_setting('app.tenant', true)::int);
         CREATE VIEW cheap_notes WITH (security_barrier) AS
           SELECT tenant, id, secret FROM notes WHERE secret < 20;
         GRANT SELECT ON notes, tags, memberships, cheap_notes TO tenant_app;",
    );
    admin
        .batch_execute(
            "SELECT pgdist.create_distributed_table('notes', 'tenant', shard_count => 6);
             SELECT pgdist.create_distributed_table('tags', 'tenant', colocate_with => 'notes');
             SELECT pgdist.create_reference_table('memberships');",
        )
        .unwrap();
    let sessions = [&mut admin, &mut reference];
    for session in sessions {
        session
            .batch_execute("SET ROLE tenant_app; SET app.tenant = '1'")
            .unwrap();
    }
    let same = |admin: &mut postgres::Client, reference: &mut postgres::Client, sql: &str| {
        let outcome = compare(admin, reference, sql);
        assert!(matches!(outcome, Comparison::Same), "{sql}: refused");
    };
    let queries = [
        "SELECT count(*), sum(secret) FROM notes",
        "SELECT tenant, author, count(*) FROM notes GROUP BY 1, 2",
        "SELECT id, secret FROM notes WHERE id < 60 ORDER BY id",
        "SELECT id FROM notes ORDER BY secret DESC, id LIMIT 4",
        // Conditions that fail on the hidden rows (secret 100000) if they ever see them, and
        // on the visible one of tenant 2 (secret 999).
        "SELECT count(*) FROM notes WHERE secret::smallint >= 0",
        "SELECT id FROM notes WHERE secret::smallint < 30 AND id < 50",
        "SELECT count(*) FROM notes n JOIN tags t USING (tenant) WHERE n.secret::smallint = t.note_id",
        "SELECT count(*) FROM notes WHERE 1 / (secret - 999) >= 0",
        "SELECT id FROM notes WHERE 1 / (secret - 999) >= 0 AND id < 50",
        "SELECT author, count(*) FROM notes WHERE (secret::text || 'x')::int IS NULL OR 1 / (secret - 999) >= 0 GROUP BY 1",
        "SELECT n.id, t.tag FROM notes n JOIN tags t ON t.tenant = n.tenant AND t.note_id = n.id WHERE 1 / (n.secret - 999) >= 0",
        "SELECT count(*) FROM notes n JOIN memberships m ON m.tenant = n.tenant OR 1 / (n.secret - 999) > 5",
        "SELECT count(*) FROM notes n JOIN tags t ON t.tenant = n.tenant AND 1 / (n.secret - 999) = t.note_id",
        "SELECT id, rank() OVER (PARTITION BY tenant ORDER BY secret, id) FROM notes WHERE 1 / (secret - 999) >= 0",
        "SELECT count(*) FROM cheap_notes WHERE 1 / (secret - 999) >= 0",
        "SELECT tenant, count(*) FROM cheap_notes GROUP BY 1",
        "SELECT count(*) FROM notes WHERE id IN (SELECT note_id FROM tags WHERE 1 / (note_id - 1000) <> 7)",
        "SELECT note_id FROM tags WHERE tenant = 1 AND note_id < 100 ORDER BY note_id FOR UPDATE",
    ];
    for sql in queries {
        same(&mut admin, &mut reference, sql);
    }
    // The policy's `tenant = <setting>` picks the one shard at execution, as `tenant = $1`.
    let plan = explain(&mut admin, "SELECT count(*) FROM tags");
    assert!(
        plan.iter().any(|line| line.contains("Fragments: 1 on 1")),
        "{plan:?}"
    );
    // The membership policy's subquery is computed once, first: the workers filter by its
    // result (and count), instead of sending every row to the coordinator to be tested.
    let plan = explain(&mut admin, "SELECT count(*) FROM notes");
    assert!(
        plan.iter().any(|line| line.contains("InitPlan"))
            && !plan.iter().any(|line| line.contains("Filter:"))
            && plan.iter().any(|line| line.contains("= ANY")),
        "{plan:?}"
    );
    // Another tenant through the setting, then the membership policy alone.
    for setting in ["SET app.tenant = '2'", "SET app.tenant = '-1'"] {
        run_on_both(&mut admin, &mut reference, setting);
        for sql in queries {
            same(&mut admin, &mut reference, sql);
        }
    }
    // The plan a prepared statement keeps follows the setting's value at each execution.
    run_on_both(
        &mut admin,
        &mut reference,
        "PREPARE by_id(int) AS SELECT id, secret FROM notes WHERE id = $1 OR id = $1 + 6",
    );
    for (tenant, id) in [
        (1, 7),
        (2, 8),
        (1, 1000),
        (2, 1001),
        (1, 13),
        (5, 11),
        (1, 19),
    ] {
        run_on_both(
            &mut admin,
            &mut reference,
            &format!("SET app.tenant = '{tenant}'"),
        );
        same(&mut admin, &mut reference, &format!("EXECUTE by_id({id})"));
    }
    // Superusers and owners are not subject to the policies.
    run_on_both(&mut admin, &mut reference, "RESET ROLE");
    same(
        &mut admin,
        &mut reference,
        "SELECT count(*), sum(secret) FROM notes",
    );
    run_on_both(
        &mut admin,
        &mut reference,
        "DEALLOCATE by_id; RESET app.tenant",
    );
    admin
        .batch_execute(
            "DROP VIEW cheap_notes; DROP TABLE notes, tags, memberships; DROP ROLE tenant_app",
        )
        .unwrap();
    reference
        .batch_execute(
            "DROP VIEW cheap_notes; DROP TABLE notes, tags, memberships; DROP ROLE tenant_app",
        )
        .unwrap();
}
