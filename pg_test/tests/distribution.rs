//! Distributed, range and reference tables on a real coordinator + 2 workers: data lands in the
//! right shard (checked on the workers, with the type's hash function looked up there), DDL
//! reaches every shard or none, and bad input changes nothing.

use postgres::Client;

use pgdist_pg_test::compare::query_text;
use pgdist_pg_test::errors::{message, sqlstate};
use pgdist_pg_test::server::{free_ports, pg_bin, Server};
use pgdist_pg_test::{harness, tests, Cluster};

fn main() {
    harness::run(
        || Cluster::start(2),
        tests![
            hash_distribution_of_every_column_type_puts_rows_in_their_shards,
            empty_tables_get_empty_shards,
            range_distribution_splits_at_the_split_points,
            colocated_tables_share_placements,
            reference_tables_are_copied_to_every_worker_and_to_new_ones,
            remove_node_refuses_a_node_with_shards,
            ddl_reaches_every_shard,
            create_index_concurrently_builds_every_shard,
            table_settings_and_ownership_changes_reach_every_shard,
            ddl_that_a_worker_rejects_changes_nothing,
            prepared_reads_follow_column_type_changes,
            bad_input_gives_clear_errors_and_changes_nothing,
            a_node_down_during_distribution_leaves_nothing_behind,
            a_worker_failing_mid_distribution_leaves_nothing_behind,
            undistribute_brings_every_row_back,
            views_show_estimates_and_sizes,
            catalog_survives_pg_dump_and_restore,
            reads_see_the_shards_writes_that_would_see_each_other_are_refused,
            foreign_keys_reach_the_shards_and_unenforceable_ones_are_refused,
            vacuum_and_analyze_reach_every_shard,
            shards_move_to_a_new_worker_and_off_it_again,
            moves_under_concurrent_transfers_lose_nothing,
            rows_inserted_while_a_table_is_distributed_all_reach_its_shards,
            tables_and_their_shards_change_schema_together,
            table_owners_run_ddl_on_their_distributed_tables,
            partitioned_tables_are_distributed_with_their_partitions,
            row_triggers_fire_on_the_partition_that_holds_the_row,
        ],
    )
}

/// One placement as `pgdist.shards` shows it.
struct Shard {
    name: String,
    port: u16,
    min: Option<String>,
    max: Option<String>,
}

fn shards(client: &mut Client, table: &str) -> Vec<Shard> {
    client
        .query(
            "SELECT shard_name, port, min_value, max_value FROM pgdist.shards WHERE table_name = $1::text::regclass",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|row| Shard {
            name: row.get(0),
            port: row.get::<_, i32>(1) as u16,
            min: row.get(2),
            max: row.get(3),
        })
        .collect()
}

fn one_i64(client: &mut Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// Row count and an order-independent checksum of every row's text.
const CHECKSUM: &str = "count(*)::int8, coalesce(sum(hashtext(t::text)::int8), 0)::int8";

fn local_checksum(client: &mut Client, table: &str) -> (i64, i64) {
    let row = client
        .query_one(&format!("SELECT {CHECKSUM} FROM {table} t"), &[])
        .unwrap();
    (row.get(0), row.get(1))
}

/// Count and checksum over every shard, read on the workers.
fn shard_checksum(cluster: &Cluster, client: &mut Client, table: &str) -> (i64, i64) {
    let mut total = (0, 0);
    for shard in shards(client, table) {
        let row = cluster
            .worker_on(shard.port)
            .connect()
            .query_one(&format!("SELECT {CHECKSUM} FROM {} t", shard.name), &[])
            .unwrap();
        total.0 += row.get::<_, i64>(0);
        total.1 += row.get::<_, i64>(1);
    }
    total
}

/// The standard hash support function of `type_name`, looked up on `client`'s server.
fn hash_function(client: &mut Client, type_name: &str) -> String {
    client
        .query_one(
            "SELECT p.amproc::regproc::text FROM pg_opclass c
             JOIN pg_amproc p ON p.amprocfamily = c.opcfamily AND p.amprocnum = 1
              AND p.amproclefttype = c.opcintype AND p.amprocrighttype = c.opcintype
             WHERE c.opcmethod = (SELECT oid FROM pg_am WHERE amname = 'hash') AND c.opcdefault
               AND c.opcintype = $1::text::regtype",
            &[&type_name],
        )
        .unwrap()
        .get(0)
}

/// Shard tables on a worker whose name starts with `prefix_`.
fn shard_tables_on(server: &Server, prefix: &str) -> i64 {
    server
        .connect()
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relname LIKE $1",
            &[&format!("{}\\_%", prefix.replace('_', "\\_"))],
        )
        .unwrap()
        .get(0)
}

fn hash_distribution_of_every_column_type_puts_rows_in_their_shards(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    let kinds = [
        ("int4", "integer", "i"),
        ("int8", "bigint", "i::int8 * 1000003"),
        ("text", "text", "'key-' || i"),
        ("uuid", "uuid", "md5(i::text)::uuid"),
        ("numeric", "numeric", "i::numeric / 7"),
        ("date", "date", "date '1800-01-01' + i"),
    ];
    for (suffix, type_name, expr) in kinds {
        let table = format!("by_{suffix}");
        client
            .batch_execute(&format!(
                "CREATE TABLE {table} (k {type_name} NOT NULL, v int, payload text);
                 INSERT INTO {table} SELECT {expr}, i, repeat('x', i % 20) FROM generate_series(1, 100000) i;"
            ))
            .unwrap();
        let before = local_checksum(&mut client, &table);
        client
            .execute(
                "SELECT pgdist.create_distributed_table($1::text::regclass, 'k')",
                &[&table],
            )
            .unwrap();
        assert_eq!(
            shard_checksum(cluster, &mut client, &table),
            before,
            "{table}: rows changed"
        );
        assert_eq!(
            one_i64(&mut client, &format!("SELECT pg_relation_size('{table}')")),
            0,
            "shell not empty"
        );
        let placements = shards(&mut client, &table);
        assert_eq!(placements.len(), 32);
        for shard in placements {
            let mut worker = cluster.worker_on(shard.port).connect();
            let hash = hash_function(&mut worker, type_name);
            // date hashes as its int4 representation (days since 2000-01-01).
            let argument = if type_name == "date" {
                "k - date '2000-01-01'"
            } else {
                "k"
            };
            let misplaced = one_i64(
                &mut worker,
                &format!(
                    "SELECT count(*) FROM {} WHERE {hash}({argument}) NOT BETWEEN {} AND {}",
                    shard.name,
                    shard.min.unwrap(),
                    shard.max.unwrap()
                ),
            );
            assert_eq!(misplaced, 0, "{table}: rows outside {}", shard.name);
        }
    }
}

fn empty_tables_get_empty_shards(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute("CREATE TABLE empty_one (k int, v text)")
        .unwrap();
    client
        .execute(
            "SELECT pgdist.create_distributed_table('empty_one', 'k', shard_count => 6)",
            &[],
        )
        .unwrap();
    assert_eq!(shards(&mut client, "empty_one").len(), 6);
    assert_eq!(shard_checksum(cluster, &mut client, "empty_one"), (0, 0));
}

fn range_distribution_splits_at_the_split_points(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE events (day date NOT NULL, v int);
             INSERT INTO events SELECT date '2024-01-01' + (i % 366), i FROM generate_series(1, 20000) i;
             CREATE TABLE readings (sensor int NOT NULL, v float8);
             INSERT INTO readings SELECT i, i * 0.5 FROM generate_series(1, 10000) i;",
        )
        .unwrap();
    let before = local_checksum(&mut client, "events");
    client
        .execute(
            "SELECT pgdist.create_distributed_table('events', 'day', 'range', \
             split_points => ARRAY['2024-04-01', '2024-07-01', '2024-10-01'])",
            &[],
        )
        .unwrap();
    assert_eq!(shard_checksum(cluster, &mut client, "events"), before);
    let placements = shards(&mut client, "events");
    assert_eq!(placements.len(), 4);
    for shard in &placements {
        let mut condition = Vec::new();
        if let Some(min) = &shard.min {
            condition.push(format!("day < '{min}'"));
        }
        if let Some(max) = &shard.max {
            condition.push(format!("day >= '{max}'"));
        }
        let outside = one_i64(
            &mut cluster.worker_on(shard.port).connect(),
            &format!(
                "SELECT count(*) FROM {} WHERE {}",
                shard.name,
                condition.join(" OR ")
            ),
        );
        assert_eq!(outside, 0, "rows outside {}", shard.name);
        assert!(
            one_i64(
                &mut cluster.worker_on(shard.port).connect(),
                &format!("SELECT count(*) FROM {}", shard.name)
            ) > 0
        );
    }
    // Without split points, they come from the data's quantiles.
    let before = local_checksum(&mut client, "readings");
    client.execute("SELECT pgdist.create_distributed_table('readings', 'sensor', 'range', shard_count => 4)", &[]).unwrap();
    assert_eq!(shard_checksum(cluster, &mut client, "readings"), before);
    let bounds: Vec<Option<String>> = shards(&mut client, "readings")
        .into_iter()
        .map(|s| s.max)
        .collect();
    assert_eq!(
        bounds,
        vec![
            Some("2500".into()),
            Some("5000".into()),
            Some("7500".into()),
            None
        ]
    );
}

fn colocated_tables_share_placements(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE co_a (k int); CREATE TABLE co_b (k int, x text); CREATE TABLE co_c (k int);
             CREATE TABLE co_text (k text);
             SELECT pgdist.create_distributed_table('co_a', 'k', shard_count => 8);
             SELECT pgdist.create_distributed_table('co_b', 'k', shard_count => 8);
             SELECT pgdist.create_distributed_table('co_c', 'k', shard_count => 8, colocate_with => 'none');",
        )
        .unwrap();
    let group = |client: &mut Client, t: &str| -> i32 {
        client
            .query_one(
                "SELECT colocation_id FROM pgdist.tables WHERE table_name = $1::text::regclass",
                &[&t],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(group(&mut client, "co_a"), group(&mut client, "co_b"));
    assert_ne!(group(&mut client, "co_a"), group(&mut client, "co_c"));
    let nodes = |client: &mut Client, t: &str| -> Vec<u16> {
        shards(client, t).iter().map(|s| s.port).collect()
    };
    assert_eq!(nodes(&mut client, "co_a"), nodes(&mut client, "co_b"));
    let err = client
        .execute(
            "SELECT pgdist.create_distributed_table('co_text', 'k', colocate_with => 'co_a')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&err), "22023", "{err:?}");
    assert!(
        message(&err).contains("different types"),
        "{}",
        message(&err)
    );
}

fn reference_tables_are_copied_to_every_worker_and_to_new_ones(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
             INSERT INTO countries SELECT 'c' || i, 'Country ' || i FROM generate_series(1, 500) i;",
        )
        .unwrap();
    let before = local_checksum(&mut client, "countries");
    client
        .execute("SELECT pgdist.create_reference_table('countries')", &[])
        .unwrap();
    client
        .batch_execute(
            "CREATE TABLE cities (name text PRIMARY KEY, country text REFERENCES countries (code));
             INSERT INTO cities SELECT 'city' || i, 'c' || i FROM generate_series(1, 50) i;
             SELECT pgdist.create_reference_table('cities');",
        )
        .unwrap();
    let placements = shards(&mut client, "countries");
    assert_eq!(placements.len(), 2);
    for shard in &placements {
        let row = cluster
            .worker_on(shard.port)
            .connect()
            .query_one(&format!("SELECT {CHECKSUM} FROM {} t", shard.name), &[])
            .unwrap();
        assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), before);
    }
    // A worker that joins later gets its own copy; removing it takes the copy away.
    let port = free_ports(1)[0];
    let mut extra = Server::create(cluster.root(), "worker3", port, true);
    extra.start();
    let node_id: i32 = client
        .query_one("SELECT pgdist.add_node('127.0.0.1', $1)", &[&(port as i32)])
        .unwrap()
        .get(0);
    let name = &placements[0].name;
    let copied = extra
        .connect()
        .query_one(&format!("SELECT {CHECKSUM} FROM {name} t"), &[])
        .unwrap();
    assert_eq!((copied.get::<_, i64>(0), copied.get::<_, i64>(1)), before);
    // Its copies keep the foreign keys between reference tables.
    let city_copy = &shards(&mut client, "cities")[0].name;
    let keys = extra
        .connect()
        .query_one(
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conrelid = $1::text::regclass",
            &[city_copy],
        )
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(keys, 1);
    assert_eq!(shards(&mut client, "countries").len(), 3);
    client
        .execute("SELECT pgdist.remove_node($1)", &[&node_id])
        .unwrap();
    assert_eq!(shard_tables_on(&extra, "countries"), 0);
    assert_eq!(shard_tables_on(&extra, "cities"), 0);
    assert_eq!(shards(&mut client, "countries").len(), 2);
    cluster.extra.lock().unwrap().push(extra);
}

fn remove_node_refuses_a_node_with_shards(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    let port = cluster.workers[0].port as i32;
    let node_id: i32 = client
        .query_one("SELECT node_id FROM pgdist.nodes WHERE port = $1", &[&port])
        .unwrap()
        .get(0);
    let err = client
        .execute("SELECT pgdist.remove_node($1)", &[&node_id])
        .unwrap_err();
    assert_eq!(sqlstate(&err), "2BP01", "{err:?}");
    assert!(
        message(&err).contains("shard placement"),
        "{}",
        message(&err)
    );
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM pgdist.nodes"), 2);
}

/// Columns, constraints and indexes of a relation, without its name (to compare shell and shard).
fn shape(client: &mut Client, relation: &str) -> Vec<Vec<Option<String>>> {
    query_text(
        client,
        &format!(
            "SELECT 'column', attname, format_type(atttypid, atttypmod), attnotnull::text,
                    pg_get_expr(adbin, adrelid)
             FROM pg_attribute LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum
             WHERE attrelid = '{relation}'::regclass AND attnum > 0 AND NOT attisdropped
             UNION ALL
             SELECT 'constraint', contype::text, pg_get_constraintdef(oid), NULL, NULL
             FROM pg_constraint WHERE conrelid = '{relation}'::regclass
             UNION ALL
             SELECT 'index', regexp_replace(pg_get_indexdef(indexrelid), '^.* USING ', ''), NULL, NULL, NULL
             FROM pg_index WHERE indrelid = '{relation}'::regclass
             ORDER BY 1, 2, 3"
        ),
    )
    .unwrap()
}

fn assert_shards_match_shell(cluster: &Cluster, client: &mut Client, table: &str) {
    let expected = shape(client, table);
    for shard in shards(client, table) {
        let got = shape(&mut cluster.worker_on(shard.port).connect(), &shard.name);
        assert_eq!(got, expected, "{} differs from {table}", shard.name);
    }
}

/// Storage parameters, replica identity and a column's statistics target of `relation`.
fn settings_of(client: &mut Client, relation: &str) -> Vec<Vec<Option<String>>> {
    query_text(
        client,
        &format!(
            "SELECT coalesce(array_to_string(c.reloptions, ','), ''), c.relreplident::text, a.attstattarget::text
             FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'city'
             WHERE c.oid = '{relation}'::regclass"
        ),
    )
    .unwrap()
}

/// ALTER TABLE forms that the definition does not show reach the shards too (storage
/// parameters, statistics target, replica identity); ownership and row security stay on the
/// coordinator, which checks every statement.
fn table_settings_and_ownership_changes_reach_every_shard(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE stores (id int PRIMARY KEY, city text);
             INSERT INTO stores SELECT i, 'c' || i % 9 FROM generate_series(1, 100) i;
             SELECT pgdist.create_distributed_table('stores', 'id', shard_count => 3);
             CREATE ROLE store_owner;",
        )
        .unwrap();
    for step in [
        "ALTER TABLE stores SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05)",
        "ALTER TABLE stores ALTER COLUMN city SET STATISTICS 500",
        "ALTER TABLE stores REPLICA IDENTITY FULL",
        "ALTER TABLE stores RESET (autovacuum_vacuum_scale_factor)",
        "ALTER TABLE stores OWNER TO store_owner",
        "ALTER TABLE stores ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE stores DISABLE ROW LEVEL SECURITY",
        "CREATE INDEX stores_city ON stores (lower(city))",
        "ALTER INDEX stores_city SET (fillfactor = 60)",
        "ALTER INDEX stores_city ALTER COLUMN 1 SET STATISTICS 300",
        "ALTER INDEX stores_pkey SET (fillfactor = 80, deduplicate_items = off)",
        "ALTER INDEX stores_pkey RESET (deduplicate_items)",
    ] {
        client
            .batch_execute(step)
            .unwrap_or_else(|e| panic!("{step}: {e:?}"));
    }
    let expected = vec![vec![
        Some("fillfactor=70".to_string()),
        Some("f".to_string()),
        Some("500".to_string()),
    ]];
    assert_eq!(settings_of(&mut client, "stores"), expected);
    for shard in shards(&mut client, "stores") {
        let mut worker = cluster.worker_on(shard.port).connect();
        assert_eq!(
            settings_of(&mut worker, &shard.name),
            expected,
            "{}",
            shard.name
        );
    }
    // The indexes' settings too.
    let index_settings = |client: &mut Client, table: &str| {
        query_text(
            client,
            &format!(
                "SELECT coalesce(array_to_string(i.reloptions, ','), ''),
                        (SELECT string_agg(a.attstattarget::text, ',') FROM pg_attribute a WHERE a.attrelid = i.oid)
                 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                 WHERE x.indrelid = '{table}'::regclass ORDER BY x.indisprimary"
            ),
        )
        .unwrap()
    };
    let expected = index_settings(&mut client, "stores");
    assert_eq!(
        expected,
        vec![
            vec![Some("fillfactor=60".into()), Some("300".into())],
            vec![Some("fillfactor=80".into()), Some("-1".into())]
        ]
    );
    for shard in shards(&mut client, "stores") {
        let mut worker = cluster.worker_on(shard.port).connect();
        assert_eq!(
            index_settings(&mut worker, &shard.name),
            expected,
            "{}",
            shard.name
        );
    }
    let err = client
        .batch_execute("ALTER INDEX stores_city SET TABLESPACE pg_default")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    let owner = query_text(
        &mut client,
        "SELECT tableowner FROM pg_tables WHERE tablename = 'stores'",
    )
    .unwrap();
    assert_eq!(owner, vec![vec![Some("store_owner".to_string())]]);
    let err = client
        .batch_execute("ALTER TABLE stores REPLICA IDENTITY USING INDEX stores_pkey")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    client
        .batch_execute("DROP TABLE stores; DROP ROLE store_owner")
        .unwrap();
}

/// Indexes of `relation` (on the server `client` talks to) that are not valid.
fn invalid_indexes(client: &mut Client, relation: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM pg_index WHERE indrelid = '{relation}'::regclass AND NOT indisvalid"),
            &[],
        )
        .unwrap()
        .get(0)
}

/// CREATE INDEX CONCURRENTLY builds the index on the shell, then on every shard, each outside
/// a transaction; a failed build leaves the index INVALID, as PostgreSQL does.
fn create_index_concurrently_builds_every_shard(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE visits (site int, page int, hits int);
             INSERT INTO visits SELECT i % 50, i, i % 7 FROM generate_series(1, 5000) i;
             SELECT pgdist.create_distributed_table('visits', 'site', shard_count => 4);",
        )
        .unwrap();
    client
        .batch_execute("CREATE INDEX CONCURRENTLY visits_page ON visits (page) WHERE hits > 0")
        .unwrap();
    client
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY visits_site_page ON visits (site, page)")
        .unwrap();
    assert_shards_match_shell(cluster, &mut client, "visits");
    for shard in shards(&mut client, "visits") {
        let mut worker = cluster.worker_on(shard.port).connect();
        assert_eq!(
            invalid_indexes(&mut worker, &shard.name),
            0,
            "{}",
            shard.name
        );
    }
    let err = client
        .batch_execute("INSERT INTO visits VALUES (3, 3, 1)")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23505", "{err:?}");

    // Uniqueness without the distribution column is refused before anything is built.
    let err = client
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY visits_page_only ON visits (page)")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    // Inside a transaction block PostgreSQL refuses it, as for any table.
    let err = client
        .batch_execute("BEGIN; CREATE INDEX CONCURRENTLY visits_hits ON visits (hits)")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "25001", "{err:?}");
    client.batch_execute("ROLLBACK").unwrap();
    assert_shards_match_shell(cluster, &mut client, "visits");

    // Duplicates on the shards: their builds fail; the index is left INVALID on the
    // coordinator and DROP INDEX removes it everywhere.
    let err = client
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY visits_site_hits ON visits (site, hits)")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23505", "{err:?}");
    let hint = err.as_db_error().and_then(|e| e.hint()).unwrap_or_default();
    assert!(hint.contains("INVALID"), "{hint}");
    assert_eq!(invalid_indexes(&mut client, "visits"), 1);
    client.batch_execute("DROP INDEX visits_site_hits").unwrap();
    assert_shards_match_shell(cluster, &mut client, "visits");
    client
        .batch_execute("DROP INDEX CONCURRENTLY visits_page")
        .unwrap();
    assert_shards_match_shell(cluster, &mut client, "visits");
    client.batch_execute("DROP TABLE visits").unwrap();
}

fn ddl_reaches_every_shard(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int NOT NULL DEFAULT 0);
             INSERT INTO accounts SELECT i, 'o' || i, i FROM generate_series(1, 1000) i;
             SELECT pgdist.create_distributed_table('accounts', 'id', shard_count => 4);",
        )
        .unwrap();
    let steps = [
        "CREATE INDEX accounts_owner ON accounts (owner)",
        "CREATE UNIQUE INDEX accounts_id_owner ON accounts (id, owner)",
        "ALTER TABLE accounts ADD COLUMN opened date DEFAULT '2020-01-01' NOT NULL",
        "ALTER TABLE accounts ADD CONSTRAINT balance_positive CHECK (balance >= 0)",
        "ALTER TABLE accounts ALTER COLUMN balance TYPE bigint USING balance::bigint * 100",
        "ALTER TABLE accounts ALTER COLUMN owner SET DEFAULT 'nobody'",
        "ALTER TABLE accounts ALTER COLUMN owner SET NOT NULL",
        "ALTER TABLE accounts ALTER COLUMN owner DROP NOT NULL",
        "ALTER TABLE accounts ALTER COLUMN balance DROP DEFAULT",
        "ALTER TABLE accounts RENAME COLUMN owner TO holder",
        "ALTER TABLE accounts RENAME CONSTRAINT balance_positive TO balance_not_negative",
        "ALTER INDEX accounts_owner RENAME TO accounts_holder",
        "ALTER TABLE accounts DROP CONSTRAINT balance_not_negative",
        "DROP INDEX accounts_holder",
        "ALTER TABLE accounts DROP COLUMN opened",
        "ALTER TABLE accounts RENAME TO ledger",
    ];
    for step in steps {
        client
            .batch_execute(step)
            .unwrap_or_else(|e| panic!("{step}: {e:?}"));
        let table = if step.contains("RENAME TO ledger") {
            "ledger"
        } else {
            "accounts"
        };
        assert_shards_match_shell(cluster, &mut client, table);
    }
    // The USING expression converted the data on the shards.
    let (count, _) = shard_checksum(cluster, &mut client, "ledger");
    assert_eq!(count, 1000);
    let total: i64 = shards(&mut client, "ledger")
        .iter()
        .map(|s| {
            one_i64(
                &mut cluster.worker_on(s.port).connect(),
                &format!("SELECT sum(balance)::int8 FROM {}", s.name),
            )
        })
        .sum();
    assert_eq!(total, 500_500 * 100);
    client.batch_execute("TRUNCATE ledger").unwrap();
    assert_eq!(shard_checksum(cluster, &mut client, "ledger"), (0, 0));
    let names: Vec<String> = shards(&mut client, "ledger")
        .into_iter()
        .map(|s| s.name)
        .collect();
    client.batch_execute("DROP TABLE ledger").unwrap();
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM pgdist.shard s WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = s.table_oid)"), 0);
    for worker in &cluster.workers {
        for name in &names {
            let exists: bool = worker
                .connect()
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[name])
                .unwrap()
                .get(0);
            assert!(!exists, "{name} still exists on {}", worker.name);
        }
    }
    // Distribution column renames are followed; dropping it is refused.
    client
        .batch_execute(
            "CREATE TABLE renamed (k int, v int); SELECT pgdist.create_distributed_table('renamed', 'k', shard_count => 2);
             ALTER TABLE renamed RENAME COLUMN k TO key;",
        )
        .unwrap();
    let column: String = client
        .query_one(
            "SELECT distribution_column FROM pgdist.tables WHERE table_name = 'renamed'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(column, "key");
    let err = client
        .batch_execute("ALTER TABLE renamed DROP COLUMN key")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    assert!(err.as_db_error().and_then(|d| d.hint()).is_some());
    let err = client
        .batch_execute("ALTER TABLE renamed ADD CONSTRAINT u UNIQUE (v)")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    // A deferred constraint trigger would fire after the statement's rows are gone, and a
    // child's rows would not be read with the parent's: refused rather than silently skipped.
    for sql in [
        "CREATE FUNCTION zero_v() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.v := 0; RETURN NEW; END $$;
         CREATE CONSTRAINT TRIGGER zero AFTER INSERT ON renamed DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION zero_v()",
        "CREATE TABLE child (extra int) INHERITS (renamed)",
        "CREATE TABLE child (key int, v int); ALTER TABLE child INHERIT renamed",
    ] {
        let err = client.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
        assert!(err.as_db_error().and_then(|d| d.hint()).is_some(), "{sql}");
    }
}

/// Reads with parameters run as statements prepared on the workers; a column whose type
/// changes in between (in another session) gets a statement of its own, not an error. (The
/// query's own result types stay the same, as plain PostgreSQL requires of a prepared
/// statement.)
fn prepared_reads_follow_column_type_changes(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE retyped (id int PRIMARY KEY, code varchar(4), n int);
             INSERT INTO retyped SELECT i, 'c' || i % 100, i FROM generate_series(1, 500) i;
             SELECT pgdist.create_distributed_table('retyped', 'id', shard_count => 2);
             CREATE FUNCTION tagged(text) RETURNS text AS $$ SELECT '<' || $1 || '>' $$ LANGUAGE sql;
             CREATE FUNCTION doubled(bigint) RETURNS bigint AS $$ SELECT 2 * $1 $$ LANGUAGE sql;
             SET plan_cache_mode = force_generic_plan;
             PREPARE several(int) AS SELECT id, tagged(code), doubled(n) FROM retyped
                 WHERE n > $1 AND id < 30;",
        )
        .unwrap();
    let read = |client: &mut Client| {
        let mut rows = query_text(client, "EXECUTE several(20)").unwrap();
        rows.sort();
        rows
    };
    let before = read(&mut client);
    assert_eq!(before.len(), 9);
    cluster
        .coordinator_client()
        .batch_execute(
            "ALTER TABLE retyped ALTER COLUMN code TYPE varchar(10), ALTER COLUMN n TYPE bigint",
        )
        .unwrap();
    assert_eq!(read(&mut client), before);
    client
        .batch_execute(
            "DEALLOCATE ALL; RESET plan_cache_mode; DROP TABLE retyped;
             DROP FUNCTION tagged(text), doubled(bigint)",
        )
        .unwrap();
}

fn ddl_that_a_worker_rejects_changes_nothing(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE guarded (k int, v int); SELECT pgdist.create_distributed_table('guarded', 'k', shard_count => 4);",
        )
        .unwrap();
    // A row that only one shard holds violates the new constraint.
    let victim = shards(&mut client, "guarded").into_iter().next().unwrap();
    cluster
        .worker_on(victim.port)
        .connect()
        .batch_execute(&format!("INSERT INTO {} VALUES (1, -5)", victim.name))
        .unwrap();
    let before = shape(&mut client, "guarded");
    let err = client
        .batch_execute(
            "ALTER TABLE guarded ADD CONSTRAINT v_positive CHECK (v > 0), ADD COLUMN extra int",
        )
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23514", "{err:?}");
    assert!(
        message(&err).contains(&format!("127.0.0.1:{}", victim.port)),
        "{}",
        message(&err)
    );
    assert_eq!(shape(&mut client, "guarded"), before);
    assert_shards_match_shell(cluster, &mut client, "guarded");
    for worker in &cluster.workers {
        assert_eq!(
            one_i64(
                &mut worker.connect(),
                "SELECT count(*) FROM pg_prepared_xacts"
            ),
            0
        );
    }
}

fn bad_input_gives_clear_errors_and_changes_nothing(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE shapes (k int, p point, u int UNIQUE);
             INSERT INTO shapes VALUES (1, '(1,1)', 1);
             CREATE TABLE parent (k int PRIMARY KEY); CREATE TABLE child (k int REFERENCES parent);
             INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1);
             CREATE TABLE twice (k int); SELECT pgdist.create_distributed_table('twice', 'k', shard_count => 2);",
        )
        .unwrap();
    let shards_before = one_i64(&mut client, "SELECT count(*) FROM pgdist.shard");
    let cases = [
        (
            "SELECT pgdist.create_distributed_table('no_such_table', 'k')",
            "42P01",
        ),
        (
            "SELECT pgdist.create_distributed_table('shapes', 'nope')",
            "42703",
        ),
        (
            "SELECT pgdist.create_distributed_table('shapes', 'p')",
            "42883",
        ),
        (
            "SELECT pgdist.create_distributed_table('shapes', 'k')",
            "0A000",
        ),
        (
            "SELECT pgdist.create_distributed_table('twice', 'k')",
            "42710",
        ),
        (
            "SELECT pgdist.create_distributed_table('child', 'k')",
            "0A000",
        ),
        (
            "SELECT pgdist.create_distributed_table('shapes', 'k', 'list')",
            "22023",
        ),
        (
            "SELECT pgdist.create_distributed_table('shapes', 'k', 'hash', 0)",
            "22023",
        ),
        (
            "CREATE TEMP TABLE scratch (k int); SELECT pgdist.create_distributed_table('scratch', 'k')",
            "0A000",
        ),
        ("SELECT pgdist.create_reference_table('twice')", "42710"),
        ("SELECT pgdist.undistribute_table('shapes')", "42809"),
    ];
    for (sql, expected) in cases {
        let err = client.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), expected, "{sql}: {err:?}");
        let db = err.as_db_error().unwrap();
        if expected != "42P01" {
            assert!(
                db.hint().is_some() || expected.starts_with("42"),
                "{sql}: no hint: {err:?}"
            );
        }
    }
    assert_eq!(
        one_i64(&mut client, "SELECT count(*) FROM pgdist.shard"),
        shards_before
    );
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM shapes"), 1);
    for worker in &cluster.workers {
        for prefix in ["shapes", "parent", "child"] {
            assert_eq!(
                shard_tables_on(worker, prefix),
                0,
                "{prefix} shards on {}",
                worker.name
            );
        }
    }
    // NULLs in the distribution column are refused.
    client
        .batch_execute("CREATE TABLE holes (k int); INSERT INTO holes VALUES (1), (NULL)")
        .unwrap();
    let err = client
        .batch_execute("SELECT pgdist.create_distributed_table('holes', 'k')")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23502", "{err:?}");
}

fn a_node_down_during_distribution_leaves_nothing_behind(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute("CREATE TABLE unlucky (k int, v text); INSERT INTO unlucky SELECT i, 'v' FROM generate_series(1, 5000) i;")
        .unwrap();
    let down = &cluster.workers[1];
    down.ctl("stop");
    let result = client.batch_execute("SELECT pgdist.create_distributed_table('unlucky', 'k')");
    down.ctl("start");
    let err = result.unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err:?}");
    assert!(
        message(&err).contains(&down.port.to_string()),
        "{}",
        message(&err)
    );
    assert_eq!(
        one_i64(
            &mut client,
            "SELECT count(*) FROM pgdist.dist_table WHERE table_oid = 'unlucky'::regclass"
        ),
        0
    );
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM unlucky"), 5000);
    for worker in &cluster.workers {
        assert_eq!(shard_tables_on(worker, "unlucky"), 0);
    }
}

fn a_worker_failing_mid_distribution_leaves_nothing_behind(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute("CREATE TABLE midway (k int, v text); INSERT INTO midway SELECT i, 'v' FROM generate_series(1, 5000) i;")
        .unwrap();
    // Occupy the name of the shard that will go to the second worker: creating it fails there
    // after the first worker has created its shards.
    let next: i64 = one_i64(
        &mut client,
        "SELECT last_value + 1 FROM pgdist.shard_id_seq",
    );
    let second_worker_port: i32 = client
        .query_one(
            "SELECT port FROM pgdist.nodes ORDER BY node_id OFFSET 1 LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    let blocker = cluster.worker_on(second_worker_port as u16);
    blocker
        .connect()
        .batch_execute(&format!("CREATE TABLE midway_{} (x int)", next + 1))
        .unwrap();
    let err = client
        .batch_execute("SELECT pgdist.create_distributed_table('midway', 'k', shard_count => 4)")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42P07", "{err:?}");
    blocker
        .connect()
        .batch_execute(&format!("DROP TABLE midway_{}", next + 1))
        .unwrap();
    for worker in &cluster.workers {
        assert_eq!(
            shard_tables_on(worker, "midway"),
            0,
            "orphan shards on {}",
            worker.name
        );
        assert_eq!(
            one_i64(
                &mut worker.connect(),
                "SELECT count(*) FROM pg_prepared_xacts"
            ),
            0
        );
    }
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM midway"), 5000);
    assert_eq!(
        one_i64(
            &mut client,
            "SELECT count(*) FROM pgdist.dist_table WHERE table_oid = 'midway'::regclass"
        ),
        0
    );
}

fn undistribute_brings_every_row_back(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE roundtrip (k bigint PRIMARY KEY, t text, d timestamptz, n numeric, g int GENERATED ALWAYS AS (k::int % 7) STORED);
             INSERT INTO roundtrip SELECT i, CASE WHEN i % 10 = 0 THEN NULL ELSE E'tab\\there ' || i END,
                    '2024-01-01'::timestamptz + i * interval '1 minute', i / 3.0 FROM generate_series(1, 20000) i;",
        )
        .unwrap();
    let before = local_checksum(&mut client, "roundtrip");
    client
        .execute(
            "SELECT pgdist.create_distributed_table('roundtrip', 'k')",
            &[],
        )
        .unwrap();
    let names: Vec<(String, u16)> = shards(&mut client, "roundtrip")
        .into_iter()
        .map(|s| (s.name, s.port))
        .collect();
    client
        .execute("SELECT pgdist.undistribute_table('roundtrip')", &[])
        .unwrap();
    assert_eq!(local_checksum(&mut client, "roundtrip"), before);
    assert_eq!(
        one_i64(
            &mut client,
            "SELECT count(*) FROM pgdist.tables WHERE table_name = 'roundtrip'::regclass"
        ),
        0
    );
    for (name, port) in names {
        let exists: bool = cluster
            .worker_on(port)
            .connect()
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .unwrap()
            .get(0);
        assert!(!exists, "{name} still exists");
    }
}

fn views_show_estimates_and_sizes(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE sized (k int, filler text);
             INSERT INTO sized SELECT i, repeat('f', 100) FROM generate_series(1, 8000) i;
             SELECT pgdist.create_distributed_table('sized', 'k', shard_count => 4);",
        )
        .unwrap();
    let row = client
        .query_one(
            "SELECT method, distribution_column, shard_count, replication_factor, total_bytes
             FROM pgdist.tables WHERE table_name = 'sized'::regclass",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "hash");
    assert_eq!(row.get::<_, String>(1), "k");
    assert_eq!(row.get::<_, i32>(2), 4);
    assert_eq!(row.get::<_, i32>(3), 1);
    assert!(row.get::<_, i64>(4) > 8000 * 100, "total_bytes too small");
    let estimate = one_i64(
        &mut client,
        "SELECT sum(row_estimate)::int8 FROM pgdist.shards WHERE table_name = 'sized'::regclass",
    );
    assert_eq!(estimate, 8000);
    let smallest = one_i64(
        &mut client,
        "SELECT min(bytes) FROM pgdist.shards WHERE table_name = 'sized'::regclass",
    );
    assert!(smallest > 0);
    let _ = cluster;
}

fn catalog_survives_pg_dump_and_restore(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    let dump = cluster.root().join("coordinator.dump");
    let port = cluster.coordinator.port.to_string();
    let out = std::process::Command::new(pg_bin("pg_dump"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-Fc",
            "-f",
        ])
        .arg(&dump)
        .arg("postgres")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    client.batch_execute("CREATE DATABASE restored").unwrap();
    let out = std::process::Command::new(pg_bin("pg_restore"))
        .env("PGOPTIONS", "-c pgdist.enable_ddl_propagation=off")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "--exit-on-error",
            "-d",
            "restored",
        ])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let catalog = "SELECT t.table_oid::text, t.method, t.distribution_column, count(s.shard_id)
                   FROM pgdist.dist_table t JOIN pgdist.shard s USING (table_oid) GROUP BY 1, 2, 3 ORDER BY 1";
    let original = query_text(&mut client, catalog).unwrap();
    let mut restored = postgres::Client::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=restored"),
        postgres::NoTls,
    )
    .unwrap();
    assert_eq!(query_text(&mut restored, catalog).unwrap(), original);
    assert!(!original.is_empty());
    drop(restored);
    client.batch_execute("DROP DATABASE restored").unwrap();
}

fn reads_see_the_shards_writes_that_would_see_each_other_are_refused(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE guarded_reads (k int, v int); INSERT INTO guarded_reads SELECT i, i FROM generate_series(1, 100) i;
             SELECT pgdist.create_distributed_table('guarded_reads', 'k', shard_count => 2);
             CREATE VIEW guarded_view AS SELECT * FROM guarded_reads;
             CREATE TABLE plain_local (k int); INSERT INTO plain_local VALUES (1), (2);",
        )
        .unwrap();
    // Reads see the rows in the shards, not the empty shell.
    assert_eq!(
        one_i64(&mut client, "SELECT count(*) FROM guarded_reads"),
        100
    );
    assert_eq!(
        one_i64(&mut client, "SELECT sum(v)::int8 FROM guarded_view"),
        5050
    );
    assert_eq!(
        one_i64(
            &mut client,
            "SELECT count(*) FROM plain_local WHERE k IN (SELECT k FROM guarded_reads)"
        ),
        2
    );
    for sql in [
        "WITH d AS (DELETE FROM guarded_reads RETURNING *) SELECT count(*) FROM guarded_view",
        "SELECT * FROM guarded_reads ORDER BY v LIMIT 1 FOR UPDATE",
    ] {
        let err = client.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
        assert!(
            err.as_db_error().and_then(|d| d.hint()).is_some(),
            "{sql}: no hint"
        );
    }
    assert_eq!(shard_checksum(cluster, &mut client, "guarded_reads").0, 100);
    // The transaction that distributed a table reads and writes its new shards.
    client
        .batch_execute(
            "BEGIN; CREATE TABLE fresh (k int); INSERT INTO fresh VALUES (1), (2);
             SELECT pgdist.create_distributed_table('fresh', 'k');
             INSERT INTO fresh VALUES (3);",
        )
        .unwrap();
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM fresh"), 3);
    client.batch_execute("ROLLBACK").unwrap();
}

/// Foreign-key constraints of `table`'s shards on the workers, as (shard, constraint) names.
fn shard_foreign_keys(
    cluster: &Cluster,
    client: &mut Client,
    table: &str,
) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    for shard in shards(client, table) {
        for row in cluster
            .worker_on(shard.port)
            .connect()
            .query(
                "SELECT conname::text FROM pg_constraint WHERE contype = 'f' AND conrelid = $1::text::regclass",
                &[&shard.name],
            )
            .unwrap()
        {
            keys.push((shard.name.clone(), row.get(0)));
        }
    }
    keys.sort();
    keys
}

/// Foreign keys added to distributed tables with ALTER TABLE are created on every shard
/// (checking the rows there), renamed and dropped with the shell's; keys the shards cannot
/// enforce are refused with 0A000 and change nothing; a local table that references a
/// distributed one has its inserts checked against the shards until it is distributed too,
/// and writes that could break its key are refused meanwhile.
fn foreign_keys_reach_the_shards_and_unenforceable_ones_are_refused(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE fk_tenants (id int PRIMARY KEY, name text);
             CREATE TABLE fk_users (tenant int, id int, email text, PRIMARY KEY (tenant, id));
             CREATE TABLE fk_plans (code text PRIMARY KEY);
             CREATE TABLE fk_apart (id int PRIMARY KEY);
             INSERT INTO fk_tenants SELECT i, 't' || i FROM generate_series(1, 20) i;
             INSERT INTO fk_users SELECT i % 21, i, 'u' || i FROM generate_series(1, 100) i;
             INSERT INTO fk_plans VALUES ('free'), ('pro');
             SELECT pgdist.create_distributed_table('fk_tenants', 'id', shard_count => 4, colocate_with => 'none');
             SELECT pgdist.create_distributed_table('fk_users', 'tenant', colocate_with => 'fk_tenants');
             SELECT pgdist.create_reference_table('fk_plans');
             SELECT pgdist.create_distributed_table('fk_apart', 'id', shard_count => 3, colocate_with => 'none');",
        )
        .unwrap();
    // Rows of tenant 0 reference no tenant: the workers find them, nothing is created.
    let add = "ALTER TABLE fk_users ADD CONSTRAINT fk_users_tenant FOREIGN KEY (tenant) REFERENCES fk_tenants (id)";
    let err = client.batch_execute(add).unwrap_err();
    assert_eq!(sqlstate(&err), "23503", "{err:?}");
    assert!(shard_foreign_keys(cluster, &mut client, "fk_users").is_empty());
    client
        .batch_execute(&format!("DELETE FROM fk_users WHERE tenant = 0; {add}"))
        .unwrap();
    let keys = shard_foreign_keys(cluster, &mut client, "fk_users");
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(keys
        .iter()
        .all(|(shard, key)| key.starts_with("fk_users_tenant_")
            && shard.ends_with(&key["fk_users_tenant_".len()..])));
    let err = client
        .batch_execute("INSERT INTO fk_users VALUES (99, 1, 'x')")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23503", "{err:?}");
    assert!(
        message(&err).contains("fk_users_tenant"),
        "{}",
        message(&err)
    );
    client
        .batch_execute(
            "ALTER TABLE fk_users RENAME CONSTRAINT fk_users_tenant TO fk_users_of_tenant",
        )
        .unwrap();
    let keys = shard_foreign_keys(cluster, &mut client, "fk_users");
    assert!(
        keys.iter()
            .all(|(_, key)| key.starts_with("fk_users_of_tenant_")),
        "{keys:?}"
    );
    client
        .batch_execute("ALTER TABLE fk_users DROP CONSTRAINT fk_users_of_tenant")
        .unwrap();
    assert!(shard_foreign_keys(cluster, &mut client, "fk_users").is_empty());
    client
        .batch_execute("INSERT INTO fk_users VALUES (99, 1, 'x')")
        .unwrap();
    // NOT VALID leaves the rows already there alone; VALIDATE CONSTRAINT checks every shard's.
    client
        .batch_execute("ALTER TABLE fk_users ADD CONSTRAINT fk_users_tenant FOREIGN KEY (tenant) REFERENCES fk_tenants (id) NOT VALID")
        .unwrap();
    assert_eq!(
        shard_foreign_keys(cluster, &mut client, "fk_users").len(),
        4
    );
    let validate = "ALTER TABLE fk_users VALIDATE CONSTRAINT fk_users_tenant";
    let err = client.batch_execute(validate).unwrap_err();
    assert_eq!(sqlstate(&err), "23503", "{err:?}");
    client
        .batch_execute(&format!(
            "DELETE FROM fk_users WHERE tenant = 99; {validate}"
        ))
        .unwrap();
    for worker in &cluster.workers {
        let unvalidated = worker
            .connect()
            .query_one(
                "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND NOT convalidated
                   AND conname LIKE 'fk_users_tenant_%'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(unvalidated, 0, "on {}", worker.name);
    }
    client
        .batch_execute("ALTER TABLE fk_users DROP CONSTRAINT fk_users_tenant; INSERT INTO fk_users VALUES (99, 1, 'x')")
        .unwrap();

    // Keys the shards cannot enforce.
    client
        .batch_execute(
            "CREATE TABLE fk_local (id int PRIMARY KEY); ALTER TABLE fk_users ADD COLUMN plan text",
        )
        .unwrap();
    for sql in [
        "ALTER TABLE fk_users ADD FOREIGN KEY (tenant) REFERENCES fk_apart (id)",
        "ALTER TABLE fk_users ADD FOREIGN KEY (id) REFERENCES fk_tenants (id)",
        "ALTER TABLE fk_users ADD FOREIGN KEY (tenant) REFERENCES fk_local (id)",
        "ALTER TABLE fk_users ADD FOREIGN KEY (tenant) REFERENCES fk_tenants (id) ON DELETE SET NULL",
        "ALTER TABLE fk_plans ADD COLUMN tenant int REFERENCES fk_tenants (id)",
    ] {
        let err = client
            .batch_execute(&format!("DELETE FROM fk_users WHERE tenant = 99; {sql}"))
            .unwrap_err();
        let state = sqlstate(&err);
        // A key whose rows do not match fails PostgreSQL's own check first.
        assert!(state == "0A000" || state == "23503", "{sql}: {err:?}");
        if state == "0A000" {
            assert!(err.as_db_error().and_then(|d| d.hint()).is_some(), "{sql}");
        }
    }
    client
        .batch_execute("DELETE FROM fk_users WHERE tenant = 99")
        .unwrap();
    for sql in [
        "ALTER TABLE fk_users ADD FOREIGN KEY (tenant) REFERENCES fk_apart (id)",
        "ALTER TABLE fk_users ADD FOREIGN KEY (tenant) REFERENCES fk_local (id)",
    ] {
        let err = client
            .batch_execute(&format!("INSERT INTO fk_apart SELECT generate_series(1, 20); INSERT INTO fk_local SELECT generate_series(1, 20); {sql}"))
            .unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
    }
    assert!(shard_foreign_keys(cluster, &mut client, "fk_users").is_empty());
    assert!(shard_foreign_keys(cluster, &mut client, "fk_plans").is_empty());
    // A key to a reference table, on a column other than the distribution column, may cascade.
    client
        .batch_execute(
            "UPDATE fk_users SET plan = CASE WHEN id % 2 = 0 THEN 'pro' ELSE 'free' END;
             ALTER TABLE fk_users ADD FOREIGN KEY (plan) REFERENCES fk_plans (code) ON UPDATE CASCADE ON DELETE SET NULL;
             UPDATE fk_plans SET code = 'premium' WHERE code = 'pro';
             DELETE FROM fk_plans WHERE code = 'free';",
        )
        .unwrap();
    assert_eq!(
        one_i64(
            &mut client,
            "SELECT count(*) FROM fk_users WHERE plan = 'premium'"
        ),
        48
    );
    assert_eq!(
        one_i64(
            &mut client,
            "SELECT count(*) FROM fk_users WHERE plan IS NULL"
        ),
        48
    );

    // A local table referencing a distributed one: checked inserts, guarded writes.
    client
        .batch_execute("CREATE TABLE fk_invoices (tenant int REFERENCES fk_tenants (id), n int)")
        .unwrap();
    client
        .batch_execute("INSERT INTO fk_invoices VALUES (1, 1), (2, 1)")
        .unwrap();
    let err = client
        .batch_execute("INSERT INTO fk_invoices VALUES (42, 1)")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23503", "{err:?}");
    client
        .batch_execute("UPDATE fk_tenants SET name = 'renamed' WHERE id = 1")
        .unwrap();
    for sql in [
        "DELETE FROM fk_tenants WHERE id = 20",
        "UPDATE fk_tenants SET id = 21 WHERE id = 20",
    ] {
        let err = client.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
        assert!(message(&err).contains("fk_invoices"), "{}", message(&err));
    }
    // Distributing it moves the key to the shards; the guard is gone.
    client
        .batch_execute(
            "SELECT pgdist.create_distributed_table('fk_invoices', 'tenant', colocate_with => 'fk_tenants');
             DELETE FROM fk_tenants WHERE id = 20;",
        )
        .unwrap();
    assert_eq!(
        shard_foreign_keys(cluster, &mut client, "fk_invoices").len(),
        4
    );
    let err = client
        .batch_execute("DELETE FROM fk_tenants WHERE id = 1")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23503", "{err:?}");
    let err = client
        .batch_execute("SELECT pgdist.undistribute_table('fk_tenants')")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");

    // DROP … CASCADE takes the shards' keys with the shells' ones.
    let err = client.batch_execute("DROP TABLE fk_tenants").unwrap_err();
    assert_eq!(sqlstate(&err), "2BP01", "{err:?}");
    client
        .batch_execute("DROP TABLE fk_tenants CASCADE")
        .unwrap();
    assert!(shard_foreign_keys(cluster, &mut client, "fk_invoices").is_empty());
    client
        .batch_execute("INSERT INTO fk_invoices VALUES (42, 1)")
        .unwrap();

    // An existing schema converts table by table, referenced tables first: the rows of a
    // loaded local table keep their key to the rows that moved to the shards (no ON DELETE
    // action fires), and the key goes to the shards when that table is distributed too.
    client
        .batch_execute(
            "CREATE TABLE fk_products (id int PRIMARY KEY, name text);
             INSERT INTO fk_products SELECT i, 'p' || i FROM generate_series(1, 10) i;
             CREATE TABLE fk_lines (order_id int, product int REFERENCES fk_products (id) ON DELETE CASCADE, qty int);
             INSERT INTO fk_lines SELECT i, 1 + i % 10, i FROM generate_series(1, 100) i;
             SELECT pgdist.create_reference_table('fk_products');",
        )
        .unwrap();
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM fk_lines"), 100);
    assert_eq!(
        one_i64(
            &mut client,
            "SELECT count(*) FROM fk_lines JOIN fk_products p ON p.id = product"
        ),
        100
    );
    let err = client
        .batch_execute("INSERT INTO fk_lines VALUES (101, 99, 1)")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23503", "{err:?}");
    let err = client
        .batch_execute("DELETE FROM fk_products WHERE id = 1")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    assert!(message(&err).contains("fk_lines"), "{}", message(&err));
    client
        .batch_execute(
            "SELECT pgdist.create_distributed_table('fk_lines', 'order_id');
             DELETE FROM fk_products WHERE id = 1;",
        )
        .unwrap();
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM fk_lines"), 90);
    let line_shards = shards(&mut client, "fk_lines").len();
    assert_eq!(
        shard_foreign_keys(cluster, &mut client, "fk_lines").len(),
        line_shards
    );
    let err = client
        .batch_execute("INSERT INTO fk_lines VALUES (101, 99, 1)")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23503", "{err:?}");
    // A worker's error names the partition the row went to, as PostgreSQL does.
    client
        .batch_execute(
            "CREATE TABLE fk_parts (order_id int, product int REFERENCES fk_products (id), qty int)
               PARTITION BY RANGE (qty);
             CREATE TABLE fk_parts_low PARTITION OF fk_parts FOR VALUES FROM (MINVALUE) TO (100);
             CREATE TABLE fk_parts_high PARTITION OF fk_parts DEFAULT;
             SELECT pgdist.create_distributed_table('fk_parts', 'order_id');",
        )
        .unwrap();
    let err = client
        .batch_execute("INSERT INTO fk_parts VALUES (1, 99, 5)")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23503", "{err:?}");
    assert!(
        message(&err).contains("on table \"fk_parts_low\""),
        "{}",
        message(&err)
    );
    client
        .batch_execute("DROP TABLE fk_parts, fk_lines, fk_products")
        .unwrap();
}

/// One number from a worker.
fn worker_i64(cluster: &Cluster, port: u16, sql: &str) -> i64 {
    cluster
        .worker_on(port)
        .connect()
        .query_one(sql, &[])
        .unwrap_or_else(|err| panic!("{sql}: {err:?}"))
        .get(0)
}

/// VACUUM and ANALYZE of a distributed table run on every shard with the statement's options
/// and columns; ANALYZE refreshes the row estimate the coordinator plans with; a table the
/// user may not vacuum is skipped, as PostgreSQL skips it.
fn vacuum_and_analyze_reach_every_shard(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE vac (id int, v int, w text);
             SELECT pgdist.create_distributed_table('vac', 'id', shard_count => 4, colocate_with => 'none');
             INSERT INTO vac SELECT i, i % 10, 'w' || i FROM generate_series(1, 10000) i;
             ANALYZE vac (id);",
        )
        .unwrap();
    // In the transaction that created the shards, and on its own.
    client.batch_execute("ANALYZE vac (v)").unwrap();
    let statistics = |client: &mut Client, column: &str| -> Vec<i64> {
        shards(client, "vac")
            .iter()
            .map(|shard| {
                worker_i64(
                    cluster,
                    shard.port,
                    &format!(
                        "SELECT count(*) FROM pg_statistic s JOIN pg_attribute a
                           ON a.attrelid = s.starelid AND a.attnum = s.staattnum
                         WHERE s.starelid = '{}'::regclass AND a.attname = '{column}'",
                        shard.name
                    ),
                )
            })
            .collect()
    };
    assert_eq!(statistics(&mut client, "v"), vec![1; 4]);
    assert_eq!(statistics(&mut client, "w"), vec![0; 4]);
    let estimate = one_i64(
        &mut client,
        "SELECT row_estimate::int8 FROM pgdist.dist_table WHERE table_oid = 'vac'::regclass",
    );
    assert!(
        (9000..=11000).contains(&estimate),
        "row estimate {estimate}"
    );
    client
        .batch_execute("VACUUM (ANALYZE, PARALLEL 2, INDEX_CLEANUP off) vac")
        .unwrap();
    assert_eq!(statistics(&mut client, "w"), vec![1; 4]);
    // VACUUM FULL rewrites every shard.
    let files = |client: &mut Client| -> Vec<i64> {
        shards(client, "vac")
            .iter()
            .map(|shard| {
                worker_i64(
                    cluster,
                    shard.port,
                    &format!("SELECT pg_relation_filenode('{}')::int8", shard.name),
                )
            })
            .collect()
    };
    let before = files(&mut client);
    client
        .batch_execute("DELETE FROM vac WHERE id > 5000")
        .unwrap();
    client
        .batch_execute("VACUUM (FULL, VERBOSE false) vac")
        .unwrap();
    let after = files(&mut client);
    assert!(
        before.iter().zip(&after).all(|(b, a)| b != a),
        "{before:?} {after:?}"
    );
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM vac"), 5000);
    // Not the owner: skipped with PostgreSQL's warning, not an error.
    for sql in [
        "CREATE ROLE vac_stranger; GRANT SELECT ON vac TO vac_stranger; SET ROLE vac_stranger",
        "VACUUM vac",
        "ANALYZE vac",
        "RESET ROLE",
    ] {
        client.batch_execute(sql).unwrap();
    }
    assert_eq!(files(&mut client), after);
    client
        .batch_execute("DROP TABLE vac; DROP ROLE vac_stranger")
        .unwrap();
}

/// Shard indexes of `table` per worker port.
fn shards_per_port(client: &mut Client, table: &str) -> Vec<(i32, i64)> {
    client
        .query(
            "SELECT port, count(*) FROM pgdist.shards WHERE table_name = $1::text::regclass
             GROUP BY port ORDER BY port",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// `rebalance` spreads a co-location group over a worker added later — every co-located
/// table's shard of an index moving together, with its rows, indexes and foreign keys — while
/// a writer that held the tables first is waited for and its row moves too; `drain_node`
/// moves everything off it again so that it can be removed. Queries give the same answers
/// throughout.
fn shards_move_to_a_new_worker_and_off_it_again(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE mv_codes (code int PRIMARY KEY);
             CREATE TABLE mv_accounts (id int PRIMARY KEY, v int);
             CREATE TABLE mv_events (account int REFERENCES mv_accounts (id), n int,
                                     code int REFERENCES mv_codes (code));
             CREATE INDEX mv_events_n ON mv_events (n);
             SELECT pgdist.create_reference_table('mv_codes');
             SELECT pgdist.create_distributed_table('mv_accounts', 'id', shard_count => 6, colocate_with => 'none');
             SELECT pgdist.create_distributed_table('mv_events', 'account', colocate_with => 'mv_accounts');
             INSERT INTO mv_codes SELECT generate_series(1, 5);
             INSERT INTO mv_accounts SELECT i, i % 7 FROM generate_series(1, 3000) i;
             INSERT INTO mv_events SELECT i % 3000 + 1, i, i % 5 + 1 FROM generate_series(1, 6000) i;",
        )
        .unwrap();
    let answers = |client: &mut Client| {
        query_text(
            client,
            "SELECT (SELECT count(*) || '/' || sum(v) FROM mv_accounts),
                    (SELECT count(*) || '/' || sum(n) FROM mv_events),
                    (SELECT count(*) FROM mv_accounts a JOIN mv_events e ON e.account = a.id WHERE a.v = 3)",
        )
        .unwrap()
    };
    let before = answers(&mut client);
    let checksums = (
        local_checksum(&mut client, "mv_accounts"),
        local_checksum(&mut client, "mv_events"),
    );
    let port = free_ports(1)[0];
    let mut extra = Server::create(cluster.root(), "worker_moves", port, true);
    extra.start();
    let node_id: i32 = client
        .query_one("SELECT pgdist.add_node('127.0.0.1', $1)", &[&(port as i32)])
        .unwrap()
        .get(0);
    // A writer that got there first is waited for; its row moves with the rest.
    let mut writer = cluster.coordinator_client();
    writer
        .batch_execute("BEGIN; INSERT INTO mv_accounts VALUES (5000, 1)")
        .unwrap();
    let connect = cluster.coordinator.conninfo();
    let mover = std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&connect, postgres::NoTls).unwrap();
        client
            .query_one(
                "SELECT count(*) FROM pgdist.rebalance(relation => 'mv_events')",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!mover.is_finished(), "the move did not wait for the writer");
    writer.batch_execute("COMMIT").unwrap();
    // Two shard indexes, each of both co-located tables.
    assert_eq!(mover.join().unwrap(), 4);
    assert_eq!(
        shards_per_port(&mut client, "mv_accounts").len(),
        3,
        "{:?}",
        shards_per_port(&mut client, "mv_accounts")
    );
    assert!(shards_per_port(&mut client, "mv_accounts")
        .iter()
        .all(|(_, count)| *count == 2));
    assert_eq!(
        shards_per_port(&mut client, "mv_events"),
        shards_per_port(&mut client, "mv_accounts")
    );
    client
        .batch_execute("DELETE FROM mv_accounts WHERE id = 5000")
        .unwrap();
    assert_eq!(answers(&mut client), before);
    assert_eq!(local_checksum(&mut client, "mv_accounts"), checksums.0);
    assert_eq!(local_checksum(&mut client, "mv_events"), checksums.1);
    // The moved shards keep their index and foreign keys.
    let moved = extra
        .connect()
        .query_one(
            "SELECT count(*) FILTER (WHERE c.contype = 'f'), count(DISTINCT i.indexrelid)
             FROM pg_class r LEFT JOIN pg_constraint c ON c.conrelid = r.oid
             LEFT JOIN pg_index i ON i.indrelid = r.oid
             WHERE r.relname LIKE 'mv\\_events\\_%' AND r.relkind = 'r'",
            &[],
        )
        .unwrap();
    assert!(
        moved.get::<_, i64>(0) >= 4,
        "foreign keys on the new worker"
    );
    assert_eq!(moved.get::<_, i64>(1), 2, "the index of each moved shard");
    for sql in [
        "INSERT INTO mv_events SELECT 9999, 1, 1",
        "INSERT INTO mv_events SELECT id, 1, 99 FROM mv_accounts",
    ] {
        let err = client.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "23503", "{sql}: {err:?}");
    }
    // Not a way to move a reference table, a shard to where it is, or for a non-superuser.
    let shard: i64 = client
        .query_one(
            "SELECT shard_id FROM pgdist.shards WHERE table_name = 'mv_accounts'::regclass AND port = $1 LIMIT 1",
            &[&(port as i32)],
        )
        .unwrap()
        .get(0);
    for (sql, state) in [
        (
            format!("SELECT pgdist.move_shard({shard}, {node_id}, 'blocking')"),
            "22023",
        ),
        (
            "SELECT pgdist.rebalance(relation => 'mv_codes')".to_string(),
            "22023",
        ),
        (
            "SELECT pgdist.move_shard(-1, 1, 'blocking')".to_string(),
            "22023",
        ),
        (format!("SELECT pgdist.move_shard({shard}, 1)"), "0A000"),
        (
            "SELECT pgdist.rebalance('by_disk_size')".to_string(),
            "0A000",
        ),
    ] {
        let err = client.batch_execute(&sql).unwrap_err();
        assert_eq!(sqlstate(&err), state, "{sql}: {err:?}");
        assert!(err.as_db_error().and_then(|d| d.hint()).is_some(), "{sql}");
    }
    // A dry run lists the moves without making them.
    let planned = one_i64(
        &mut client,
        "SELECT count(*) FROM pgdist.rebalance(dry_run => true, threshold => 0, relation => 'mv_events')",
    );
    assert_eq!(planned, 0, "already balanced");
    // A target that is down: a clear error, and nothing moved.
    let placements_before = query_text(
        &mut client,
        "SELECT shard_id, node_id FROM pgdist.shards ORDER BY 1, 2",
    )
    .unwrap();
    let back: i64 = client
        .query_one(
            "SELECT shard_id FROM pgdist.shards WHERE table_name = 'mv_accounts'::regclass AND port <> $1 LIMIT 1",
            &[&(port as i32)],
        )
        .unwrap()
        .get(0);
    extra.stop();
    let err = client
        .batch_execute(&format!(
            "SELECT pgdist.move_shard({back}, {node_id}, 'blocking')"
        ))
        .unwrap_err();
    assert!(sqlstate(&err).starts_with("08"), "{err:?}");
    extra.start();
    assert_eq!(
        query_text(
            &mut client,
            "SELECT shard_id, node_id FROM pgdist.shards ORDER BY 1, 2"
        )
        .unwrap(),
        placements_before
    );
    assert_eq!(answers(&mut client), before);
    // Off the new worker again, and it can leave.
    let moved_off: i64 = client
        .query_one("SELECT pgdist.drain_node($1)", &[&node_id])
        .unwrap()
        .get(0);
    assert_eq!(moved_off, 4);
    client
        .execute("SELECT pgdist.remove_node($1)", &[&node_id])
        .unwrap();
    assert_eq!(answers(&mut client), before);
    assert_eq!(local_checksum(&mut client, "mv_events"), checksums.1);
    assert_eq!(shard_tables_on(&extra, "mv_accounts"), 0);
    cluster.extra.lock().unwrap().push(extra);
}

/// Shards move back and forth while four sessions keep transferring money between accounts on
/// different shards: afterwards the total is unchanged, every acknowledged transfer is in the
/// ledger exactly once, and no transfer failed other than by a deadlock or serialization
/// error (none, say, because a shard was not where the plan looked for it).
fn moves_under_concurrent_transfers_lose_nothing(cluster: &Cluster) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE mt_accounts (id int PRIMARY KEY, balance bigint NOT NULL);
             CREATE TABLE mt_ledger (account int, transfer text, amount bigint);
             SELECT pgdist.create_distributed_table('mt_accounts', 'id', shard_count => 4, colocate_with => 'none');
             SELECT pgdist.create_distributed_table('mt_ledger', 'account', colocate_with => 'mt_accounts');
             INSERT INTO mt_accounts SELECT i, 1000 FROM generate_series(1, 40) i;",
        )
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|session| {
            let conninfo = cluster.coordinator.conninfo();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut client = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
                let (mut done, mut unexpected) = (Vec::new(), Vec::new());
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let (from, to) = ((session * 7 + n) % 40 + 1, (session * 11 + n * 3) % 40 + 1);
                    if from == to {
                        continue;
                    }
                    let name = format!("{session}-{n}");
                    let result = client.batch_execute(&format!(
                        "BEGIN;
                         UPDATE mt_accounts SET balance = balance - 1 WHERE id = {from};
                         UPDATE mt_accounts SET balance = balance + 1 WHERE id = {to};
                         INSERT INTO mt_ledger VALUES ({from}, '{name}', -1), ({to}, '{name}', 1);
                         COMMIT;"
                    ));
                    match result {
                        Ok(()) => done.push(name),
                        Err(err) => {
                            let _ = client.batch_execute("ROLLBACK");
                            let state = sqlstate(&err);
                            if state != "40P01" && state != "40001" {
                                unexpected.push(format!("{state}: {}", message(&err)));
                            }
                        }
                    }
                }
                (done, unexpected)
            })
        })
        .collect();
    let port = free_ports(1)[0];
    let mut extra = Server::create(cluster.root(), "worker_busy", port, true);
    extra.start();
    let node_id: i32 = client
        .query_one("SELECT pgdist.add_node('127.0.0.1', $1)", &[&(port as i32)])
        .unwrap()
        .get(0);
    for _ in 0..2 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        client
            .batch_execute("SELECT pgdist.rebalance(relation => 'mt_accounts')")
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        client
            .query_one("SELECT pgdist.drain_node($1)", &[&node_id])
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for worker in workers {
        let (done, unexpected) = worker.join().unwrap();
        assert!(unexpected.is_empty(), "transfers failed: {unexpected:?}");
        acknowledged.extend(done);
    }
    assert!(
        acknowledged.len() > 20,
        "only {} transfers",
        acknowledged.len()
    );
    assert_eq!(
        one_i64(&mut client, "SELECT sum(balance)::int8 FROM mt_accounts"),
        40_000
    );
    let ledger = query_text(
        &mut client,
        "SELECT transfer, count(*), sum(amount) FROM mt_ledger GROUP BY transfer ORDER BY transfer",
    )
    .unwrap();
    assert_eq!(ledger.len(), acknowledged.len());
    assert!(ledger
        .iter()
        .all(|row| row[1].as_deref() == Some("2") && row[2].as_deref() == Some("0")));
    client
        .execute("SELECT pgdist.remove_node($1)", &[&node_id])
        .unwrap();
    cluster.extra.lock().unwrap().push(extra);
}

/// A session inserting rows one by one while the table is distributed: its inserts wait for
/// the distribution and then go to the shards (none into the coordinator's emptied table,
/// where no query would find them).
fn rows_inserted_while_a_table_is_distributed_all_reach_its_shards(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE TABLE busy (id int, v int);
             INSERT INTO busy SELECT i, i FROM generate_series(1, 100000) i;",
        )
        .unwrap();
    let conninfo = cluster.coordinator.conninfo();
    let inserter = std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        for i in 0..300 {
            client
                .execute("INSERT INTO busy VALUES ($1, 0)", &[&(200_000 + i)])
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    client
        .batch_execute("SELECT pgdist.create_distributed_table('busy', 'id', shard_count => 4)")
        .unwrap();
    inserter.join().unwrap();
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM busy"), 100_300);
    let on_shards: i64 = shards(&mut client, "busy")
        .iter()
        .map(|shard| {
            worker_i64(
                cluster,
                shard.port,
                &format!("SELECT count(*) FROM {}", shard.name),
            )
        })
        .sum();
    assert_eq!(on_shards, 100_300);
    client.batch_execute("DROP TABLE busy").unwrap();
}

/// ALTER TABLE … SET SCHEMA moves the shards along; ALTER SCHEMA … RENAME renames the schema on
/// the workers too; the tables keep working afterwards.
fn tables_and_their_shards_change_schema_together(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE SCHEMA sa; CREATE SCHEMA sb;
             CREATE TABLE sa.moving (id int PRIMARY KEY, v int);
             CREATE TABLE sa.lookup (k int PRIMARY KEY);
             INSERT INTO sa.moving SELECT i, i FROM generate_series(1, 100) i;
             INSERT INTO sa.lookup SELECT generate_series(1, 10);
             SELECT pgdist.create_distributed_table('sa.moving', 'id', shard_count => 4);
             SELECT pgdist.create_reference_table('sa.lookup');
             ALTER TABLE sa.moving SET SCHEMA sb;
             ALTER TABLE sa.lookup SET SCHEMA sb;",
        )
        .unwrap();
    let on_workers = |client: &mut Client, table: &str| -> i64 {
        shards(client, table)
            .iter()
            .map(|shard| {
                worker_i64(
                    cluster,
                    shard.port,
                    &format!("SELECT count(*) FROM {}", shard.name),
                )
            })
            .sum()
    };
    assert!(shards(&mut client, "sb.moving")
        .iter()
        .all(|s| s.name.starts_with("sb.")));
    assert_eq!(on_workers(&mut client, "sb.moving"), 100);
    assert_eq!(on_workers(&mut client, "sb.lookup"), 20);
    client
        .batch_execute(
            "ALTER SCHEMA sb RENAME TO sc;
             INSERT INTO sc.moving VALUES (101, 1);
             ALTER TABLE sc.moving ADD COLUMN w int DEFAULT 7;",
        )
        .unwrap();
    assert!(shards(&mut client, "sc.moving")
        .iter()
        .all(|s| s.name.starts_with("sc.")));
    assert_eq!(on_workers(&mut client, "sc.moving"), 101);
    assert_eq!(
        one_i64(
            &mut client,
            "SELECT count(*) FROM sc.moving m JOIN sc.lookup l ON l.k = m.v WHERE m.w = 7"
        ),
        11
    );
    client.batch_execute("DROP SCHEMA sa, sc CASCADE").unwrap();
}

/// A table's owner who is not a superuser distributes it and changes it as on one server: the
/// DDL reaches the shards (pgdist's catalog is read as its owner, the rights are checked on the
/// table); a role that does not own it gets PostgreSQL's error.
fn table_owners_run_ddl_on_their_distributed_tables(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute(
            "CREATE ROLE ddl_owner; CREATE ROLE ddl_stranger;
             CREATE TABLE owned_parent (id int PRIMARY KEY);
             CREATE TABLE owned (id int PRIMARY KEY, v int);
             SELECT pgdist.create_distributed_table('owned_parent', 'id', shard_count => 4, colocate_with => 'none');
             SELECT pgdist.create_distributed_table('owned', 'id', colocate_with => 'owned_parent');
             ALTER TABLE owned OWNER TO ddl_owner; ALTER TABLE owned_parent OWNER TO ddl_owner;
             GRANT SELECT ON owned TO ddl_stranger; GRANT CREATE ON SCHEMA public TO ddl_owner;",
        )
        .unwrap();
    let run = |client: &mut Client, statements: &[&str]| {
        for sql in statements {
            client
                .batch_execute(sql)
                .unwrap_or_else(|err| panic!("{sql}: {err:?}"));
        }
    };
    run(
        &mut client,
        &[
            "SET ROLE ddl_owner",
            "INSERT INTO owned_parent SELECT generate_series(1, 20)",
            "INSERT INTO owned SELECT i, i FROM generate_series(1, 20) i",
            "ALTER TABLE owned ADD COLUMN w int DEFAULT 3",
            "CREATE INDEX owned_v ON owned (v)",
            "RESET ROLE",
        ],
    );
    assert_shards_match_shell(cluster, &mut client, "owned");
    run(
        &mut client,
        &[
            "SET ROLE ddl_owner",
            "ALTER TABLE owned ADD FOREIGN KEY (id) REFERENCES owned_parent (id)",
            "ANALYZE owned",
            "VACUUM owned",
            "TRUNCATE owned",
            // Its own tables it distributes and undistributes too.
            "CREATE TABLE own_new (id int, v int); INSERT INTO own_new VALUES (1, 1), (2, 2)",
            "SELECT pgdist.create_distributed_table('own_new', 'id', shard_count => 2)",
            "INSERT INTO own_new VALUES (3, 3)",
            "SELECT pgdist.undistribute_table('own_new')",
            "RESET ROLE",
        ],
    );
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM ONLY own_new"), 3);
    assert_eq!(shard_foreign_keys(cluster, &mut client, "owned").len(), 4);
    assert_eq!(one_i64(&mut client, "SELECT count(*) FROM owned"), 0);
    let err = client
        .batch_execute("SET ROLE ddl_stranger; ALTER TABLE owned ADD COLUMN x int")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err:?}");
    client
        .batch_execute(
            "RESET ROLE; DROP TABLE owned, owned_parent, own_new; REVOKE CREATE ON SCHEMA public FROM ddl_owner;
             DROP ROLE ddl_owner; DROP ROLE ddl_stranger",
        )
        .unwrap();
}

const PARTITIONED_SCHEMA: &str = "
CREATE TABLE pev (id bigint NOT NULL, tenant int NOT NULL, day date NOT NULL,
                  amount numeric CHECK (amount >= 0), note text, PRIMARY KEY (tenant, id, day))
  PARTITION BY RANGE (day);
CREATE TABLE pev_2024 PARTITION OF pev FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE pev_2025 PARTITION OF pev FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')
  PARTITION BY HASH (id);
CREATE TABLE pev_2025_a PARTITION OF pev_2025 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE pev_2025_b PARTITION OF pev_2025 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE pev_other PARTITION OF pev DEFAULT;
CREATE INDEX ON pev (day);
INSERT INTO pev SELECT g, g % 17, date '2023-10-01' + (g % 800), (g * 7) % 1000, 'n' || g
  FROM generate_series(1, 3000) g;
CREATE TABLE pcust (tenant int PRIMARY KEY, name text);
INSERT INTO pcust SELECT g, 'c' || (g % 5) FROM generate_series(0, 16) g;
";

/// What the cluster and plain PostgreSQL must answer alike about the partitioned table.
const PARTITIONED_READS: &[&str] = &[
    "SELECT count(*), sum(amount), sum(day - date '2020-01-01') FROM pev",
    "SELECT tenant, count(*), max(day) FROM pev GROUP BY tenant",
    "SELECT * FROM pev WHERE tenant = 3 AND day < '2023-11-01' ORDER BY id",
    "SELECT * FROM pev WHERE day BETWEEN '2024-06-01' AND '2024-06-10' ORDER BY id",
    "SELECT count(*) FROM pev_2025",
    "SELECT count(*) FROM pev_2025_a",
    "SELECT count(*) FROM pev_other",
    "SELECT count(*) FROM ONLY pev",
    "SELECT c.name, count(*), sum(e.amount) FROM pev e JOIN pcust c USING (tenant) GROUP BY c.name",
    "SELECT date_trunc('month', day)::date, count(*) FROM pev GROUP BY 1 ORDER BY 1 LIMIT 5",
    "SELECT id, day FROM pev ORDER BY amount DESC, id LIMIT 5",
];

fn compare_partitioned(coordinator: &mut Client, reference: &mut Client) {
    pgdist_pg_test::compare::assert_same(coordinator, reference, PARTITIONED_READS);
}

fn partitioned_tables_are_distributed_with_their_partitions(cluster: &Cluster) {
    use pgdist_pg_test::compare::{assert_same, run_on_both};
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(&mut coordinator, &mut reference, PARTITIONED_SCHEMA);
    coordinator
        .batch_execute(
            "SELECT pgdist.create_distributed_table('pev', 'tenant');
             SELECT pgdist.create_distributed_table('pcust', 'tenant', colocate_with => 'pev');",
        )
        .unwrap();
    // Every partition, at every level, is a distributed table of the parent's group.
    let groups = query_text(
        &mut coordinator,
        "SELECT count(*), count(DISTINCT colocation_id) FROM pgdist.tables WHERE table_name::text LIKE 'pev%'",
    )
    .unwrap();
    assert_eq!(groups, vec![vec![Some("6".into()), Some("1".into())]]);
    // On a worker, a shard of the parent is a partitioned table over the partitions' shards.
    let shard = shards(&mut coordinator, "pev").remove(0);
    let mut worker = cluster.worker_on(shard.port).connect();
    assert_eq!(
        one_i64(
            &mut worker,
            &format!("SELECT count(*) FROM pg_partition_tree('{}')", shard.name)
        ),
        6
    );
    assert_eq!(
        one_i64(&mut coordinator, "SELECT pg_relation_size('pev_2024')"),
        0,
        "the rows left the coordinator"
    );
    compare_partitioned(&mut coordinator, &mut reference);

    // Writes: rows are routed to their shard, and there to their partition.
    assert_same(
        &mut coordinator,
        &mut reference,
        &[
        "INSERT INTO pev VALUES (5001, 1, '2024-05-05', 5, 'x'), (5002, 2, '2025-05-05', 6, 'y'),
                                (5003, 3, '2022-01-01', 7, 'z') RETURNING *",
        "INSERT INTO pev VALUES (5001, 1, '2024-05-05', 50, 'x')
           ON CONFLICT (tenant, id, day) DO UPDATE SET amount = excluded.amount RETURNING amount",
        "UPDATE pev SET amount = amount + 1 WHERE day < '2024-03-01' RETURNING id, amount",
        "UPDATE pev SET day = day + 365 WHERE id % 10 = 0 RETURNING id, day",
        "DELETE FROM pev WHERE amount > 900 RETURNING id",
        "INSERT INTO pev VALUES (5004, 4, '2024-07-07', -1, 'negative')",
        "INSERT INTO pev SELECT id + 10000, tenant, day, amount, note FROM pev WHERE tenant = 5",
        ],
    );
    // Statement triggers fire on the coordinator, with their transition tables (rows that
    // move between partitions included).
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE pev_log (op text, n bigint, total numeric);
         CREATE FUNCTION pev_count() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF TG_OP = 'INSERT' THEN INSERT INTO pev_log SELECT TG_OP, count(*), sum(amount) FROM new_rows;
           ELSIF TG_OP = 'UPDATE' THEN INSERT INTO pev_log SELECT TG_OP, count(*), sum(amount) FROM new_rows;
           ELSE INSERT INTO pev_log SELECT TG_OP, count(*), sum(amount) FROM old_rows; END IF;
           RETURN NULL;
         END $$;
         CREATE TRIGGER pev_inserted AFTER INSERT ON pev REFERENCING NEW TABLE AS new_rows
           FOR EACH STATEMENT EXECUTE FUNCTION pev_count();
         CREATE TRIGGER pev_updated AFTER UPDATE ON pev REFERENCING NEW TABLE AS new_rows
           FOR EACH STATEMENT EXECUTE FUNCTION pev_count();
         CREATE TRIGGER pev_deleted AFTER DELETE ON pev REFERENCING OLD TABLE AS old_rows
           FOR EACH STATEMENT EXECUTE FUNCTION pev_count();",
    );
    assert_same(
        &mut coordinator,
        &mut reference,
        &[
        "INSERT INTO pev VALUES (8001, 1, '2024-03-03', 5, 't'), (8002, 2, '2025-03-03', 6, 't')",
        "UPDATE pev SET amount = amount + 1 WHERE note = 't'",
        "UPDATE pev SET day = day + 365 WHERE note = 't' AND tenant = 1",
        "DELETE FROM pev WHERE note = 't'",
        "SELECT * FROM pev_log ORDER BY op",
        ],
    );
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DROP TRIGGER pev_inserted ON pev; DROP TRIGGER pev_updated ON pev; DROP TRIGGER pev_deleted ON pev;
         DROP FUNCTION pev_count(); DROP TABLE pev_log",
    );
    for client in [&mut coordinator, &mut reference] {
        let mut copy = client
            .copy_in("COPY pev (id, tenant, day, amount) FROM STDIN")
            .unwrap();
        std::io::Write::write_all(
            &mut copy,
            b"7001\t1\t2025-02-02\t3\n7002\t2\t2024-02-02\t3\n",
        )
        .unwrap();
        copy.finish().unwrap();
    }
    compare_partitioned(&mut coordinator, &mut reference);

    // DDL: partitions created, attached, detached and dropped reach the shards.
    for sql in [
        "ALTER TABLE pev ADD COLUMN extra int DEFAULT 7",
        "CREATE TABLE pev_2027 (LIKE pev INCLUDING CONSTRAINTS)",
        "INSERT INTO pev_2027 SELECT g, g % 17, date '2027-01-01' + g, 1, 'late', 7 FROM generate_series(1, 50) g",
        "ALTER TABLE pev ATTACH PARTITION pev_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
        "CREATE TABLE pev_2028 PARTITION OF pev FOR VALUES FROM ('2028-01-01') TO ('2029-01-01')",
        "INSERT INTO pev VALUES (6000, 4, '2028-02-02', 1, 'n', 1)",
        "ALTER TABLE pev DETACH PARTITION pev_2024",
        "DROP TABLE pev_2028",
    ] {
        run_on_both(&mut coordinator, &mut reference, sql);
    }
    assert_same(
        &mut coordinator,
        &mut reference,
        &[
            "SELECT extra, count(*) FROM pev GROUP BY 1",
            "SELECT count(*) FROM pev WHERE day >= '2027-01-01'",
            "SELECT count(*), sum(amount) FROM pev_2024",
            "SELECT count(*) FROM pev_2027",
        ],
    );
    compare_partitioned(&mut coordinator, &mut reference);
    // A move takes the parent's and every partition's shard of one index together.
    let row = coordinator
        .query_one(
            "SELECT s.shard_id, (SELECT n.node_id FROM pgdist.nodes n
                                 WHERE n.node_id <> s.node_id AND n.role = 'primary' LIMIT 1)
             FROM pgdist.shards s WHERE s.table_name = 'pev'::regclass ORDER BY s.shard_id LIMIT 1",
            &[],
        )
        .unwrap();
    let (shard_id, target): (i64, i32) = (row.get(0), row.get(1));
    coordinator
        .batch_execute(&format!(
            "SELECT pgdist.move_shard({shard_id}, {target}, mode => 'blocking')"
        ))
        .unwrap();
    compare_partitioned(&mut coordinator, &mut reference);
    // A partition's shard has its indexes under the partition's names (PostgreSQL names the
    // ones it makes for the parent's indexes after the shard), so DDL on them reaches the
    // shards: here an index added to the parent, and the keys, checks and indexes of the
    // detached partition, which are its own now.
    for sql in [
        "CREATE INDEX pev_note ON pev (note)",
        "ALTER INDEX pev_2025_a_note_idx RENAME TO pev_2025_a_by_note",
        "ALTER TABLE pev_2024 DROP CONSTRAINT pev_amount_check",
        "ALTER TABLE pev_2024 DROP CONSTRAINT pev_2024_pkey",
        "DROP INDEX pev_2024_day_idx",
        "INSERT INTO pev_2024 SELECT * FROM pev_2024 WHERE id < 300",
        "INSERT INTO pev_2024 (id, tenant, day, amount) VALUES (9, 1, '2024-02-02', -5)",
        // An index built partition by partition, then attached to the parent's.
        "CREATE INDEX pev_amount ON ONLY pev (amount)",
        "CREATE INDEX pev_other_amount ON pev_other (amount)",
        "ALTER INDEX pev_amount ATTACH PARTITION pev_other_amount",
    ] {
        run_on_both(&mut coordinator, &mut reference, sql);
    }
    let attached: i64 = cluster
        .workers
        .iter()
        .map(|worker| {
            one_i64(
                &mut worker.connect(),
                "SELECT count(*) FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
                 JOIN pg_class p ON p.oid = h.inhparent
                 WHERE c.relname LIKE 'pev_other_amount%' AND p.relname LIKE 'pev_amount%'",
            )
        })
        .sum();
    assert_eq!(
        attached,
        one_i64(
            &mut coordinator,
            "SELECT count(*) FROM pgdist.shards WHERE table_name = 'pev_other'::regclass"
        ),
        "every shard's index attached to its parent shard's"
    );
    for worker in &cluster.workers {
        let misnamed = one_i64(
            &mut worker.connect(),
            "SELECT count(*) FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid
             JOIN pg_class i ON i.oid = x.indexrelid
             WHERE t.relname LIKE 'pev%' AND i.relname NOT LIKE '%' || substring(t.relname FROM '_[0-9]+$')",
        );
        assert_eq!(
            misnamed, 0,
            "shard indexes not named after the shard's table's"
        );
    }
    assert_same(
        &mut coordinator,
        &mut reference,
        &[
            "SELECT count(*), count(DISTINCT (tenant, id, day)), min(amount) FROM pev_2024",
            "SELECT count(*) FROM pev WHERE note = 'n17'",
        ],
    );
    compare_partitioned(&mut coordinator, &mut reference);
    // Refused with a hint, changing nothing.
    for sql in [
        "UPDATE ONLY pev SET amount = 0",
        "ALTER TABLE pev DETACH PARTITION pev_2027 CONCURRENTLY",
    ] {
        let err = coordinator.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
    }
    compare_partitioned(&mut coordinator, &mut reference);

    // Undistributed, every row is local again; the detached partition stays distributed.
    coordinator
        .batch_execute("SELECT pgdist.undistribute_table('pev')")
        .unwrap();
    assert_eq!(
        one_i64(
            &mut coordinator,
            "SELECT count(*) FROM pgdist.tables WHERE table_name::text LIKE 'pev%'"
        ),
        1
    );
    compare_partitioned(&mut coordinator, &mut reference);
    for sql in ["DROP TABLE pev, pev_2024, pcust"] {
        run_on_both(&mut coordinator, &mut reference, sql);
    }
    assert_eq!(
        one_i64(
            &mut coordinator,
            "SELECT count(*) FROM pgdist.tables WHERE table_name::text LIKE 'p%'"
        ),
        0
    );
}

/// A partitioned table with row triggers on the parent (cloned to every partition; one only for
/// UPDATE OF a column) and on single partitions, one of whose columns are in another order than
/// the parent's.
const PARTITION_TRIGGERS_SCHEMA: &str = "
CREATE TABLE ptr_log (tg text, op text, tbl text, old_row text, new_row text);
CREATE TABLE ptr (tenant int NOT NULL, day date NOT NULL, amount numeric, note text, stamp text,
                  PRIMARY KEY (tenant, day)) PARTITION BY RANGE (day);
CREATE TABLE ptr_2024 PARTITION OF ptr FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE ptr_2025 (note text, amount numeric, stamp text, day date NOT NULL, tenant int NOT NULL);
ALTER TABLE ptr ATTACH PARTITION ptr_2025 FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE ptr_rest PARTITION OF ptr DEFAULT;
CREATE FUNCTION ptr_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.stamp := TG_TABLE_NAME || ':' || TG_OP;
  IF NEW.note = 'skip' THEN RETURN NULL; END IF;
  IF NEW.note = 'double' THEN NEW.amount := NEW.amount * 2; END IF;
  IF NEW.note = 'move' THEN NEW.day := NEW.day + 400; END IF;
  IF NEW.note = 'gone' AND TG_OP = 'INSERT' THEN RETURN NULL; END IF;
  RETURN NEW;
END $$;
CREATE FUNCTION ptr_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO ptr_log VALUES (TG_NAME, TG_OP, TG_TABLE_NAME,
     CASE WHEN TG_OP <> 'INSERT' THEN (OLD.tenant, OLD.day, OLD.amount, OLD.note)::text END,
     CASE WHEN TG_OP <> 'DELETE' THEN (NEW.tenant, NEW.day, NEW.amount, NEW.note, NEW.stamp)::text END);
  IF TG_OP = 'DELETE' AND OLD.note = 'keep' THEN RETURN NULL; END IF;
  RETURN COALESCE(NEW, OLD);
END $$;
CREATE FUNCTION ptr_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO ptr_log (tg, op, tbl, new_row) SELECT TG_NAME, TG_OP, TG_TABLE_NAME, count(*) FROM changed;
  RETURN NULL;
END $$;
CREATE TRIGGER a_stamp BEFORE INSERT OR UPDATE ON ptr FOR EACH ROW EXECUTE FUNCTION ptr_stamp();
CREATE TRIGGER b_keep BEFORE DELETE ON ptr_2024 FOR EACH ROW EXECUTE FUNCTION ptr_audit();
CREATE TRIGGER c_audit AFTER INSERT OR UPDATE OR DELETE ON ptr FOR EACH ROW EXECUTE FUNCTION ptr_audit();
CREATE TRIGGER d_2025 AFTER UPDATE ON ptr_2025 FOR EACH ROW EXECUTE FUNCTION ptr_audit();
CREATE TRIGGER g_amount AFTER UPDATE OF amount ON ptr FOR EACH ROW EXECUTE FUNCTION ptr_audit();
CREATE TRIGGER e_updated AFTER UPDATE ON ptr REFERENCING NEW TABLE AS changed
  FOR EACH STATEMENT EXECUTE FUNCTION ptr_count();
CREATE TRIGGER f_deleted AFTER DELETE ON ptr REFERENCING OLD TABLE AS changed
  FOR EACH STATEMENT EXECUTE FUNCTION ptr_count();
";

fn row_triggers_fire_on_the_partition_that_holds_the_row(cluster: &Cluster) {
    use pgdist_pg_test::compare::{assert_same, run_on_both};
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(&mut coordinator, &mut reference, PARTITION_TRIGGERS_SCHEMA);
    coordinator
        .batch_execute(
            "SELECT pgdist.create_distributed_table('ptr', 'tenant', shard_count => 4);
             SELECT pgdist.create_reference_table('ptr_log');",
        )
        .unwrap();
    // Each row meets the triggers of the partition it is in (the parent's clones and the
    // partition's own), with the partition as TG_TABLE_NAME; BEFORE triggers change or skip
    // it; transition tables hold the statement's rows. Compared with plain PostgreSQL: the
    // tables, and everything the triggers wrote.
    assert_same(
        &mut coordinator,
        &mut reference,
        &[
            "INSERT INTO ptr VALUES (1, '2024-03-01', 10, 'a'), (2, '2025-03-01', 20, 'b'), (3, '2027-01-01', 30, 'c'),
               (4, '2024-05-05', 40, 'skip'), (5, '2025-06-06', 50, 'double') RETURNING *",
            "INSERT INTO ptr (tenant, day, amount, note) SELECT g, date '2024-01-01' + g * 5, g,
               CASE WHEN g % 7 = 0 THEN 'keep' END FROM generate_series(10, 200) g",
            "UPDATE ptr SET amount = amount + 1 WHERE tenant < 20 RETURNING tenant, amount, stamp",
            "UPDATE ptr SET note = 'double' WHERE tenant = 2",
            "DELETE FROM ptr WHERE tenant BETWEEN 30 AND 60 RETURNING tenant, note",
            "DELETE FROM ptr USING ptr x WHERE x.tenant = ptr.tenant AND x.day = ptr.day AND x.amount > 195",
            "UPDATE ptr SET amount = -amount WHERE day >= '2025-01-01'",
            "INSERT INTO ptr VALUES (7, '2024-03-01', 1, 'new'), (1, '2024-03-01', 1, 'dup')
               ON CONFLICT (tenant, day) DO NOTHING RETURNING *",
            "INSERT INTO ptr VALUES (1, '2024-03-01', 5, 'x'), (600, '2025-01-05', 6, 'y'), (5, '2025-06-06', 1, 'z')
               ON CONFLICT (tenant, day) DO UPDATE SET amount = ptr.amount + excluded.amount, note = excluded.note
               RETURNING *",
            "INSERT INTO ptr_2025 (tenant, day, amount, note) VALUES (8, '2025-08-08', 8, 'direct')",
            "UPDATE ptr_2025 SET amount = 0 WHERE tenant = 8",
            "SELECT * FROM ptr",
            "SELECT * FROM ptr_log",
        ],
    );
    // EXPLAIN fires nothing.
    coordinator
        .batch_execute("EXPLAIN UPDATE ptr SET amount = 0; EXPLAIN DELETE FROM ptr")
        .unwrap();
    for client in [&mut coordinator, &mut reference] {
        let mut copy = client
            .copy_in("COPY ptr (tenant, day, amount, note) FROM STDIN")
            .unwrap();
        std::io::Write::write_all(
            &mut copy,
            b"300\t2025-02-02\t3\tcopied\n301\t2024-02-02\t4\tskip\n302\t2030-01-01\t5\tdouble\n",
        )
        .unwrap();
        copy.finish().unwrap();
    }
    assert_same(
        &mut coordinator,
        &mut reference,
        &["SELECT * FROM ptr", "SELECT * FROM ptr_log"],
    );
    // An UPDATE that moves a row to another partition deletes it from the one and inserts it
    // into the other, as in PostgreSQL: the first partition's DELETE triggers fire (b_keep
    // keeps the row where it is), then the other's INSERT triggers (a_stamp drops a row noted
    // 'gone': it is only deleted, and not counted), and the transition tables get the row.
    assert_same(
        &mut coordinator,
        &mut reference,
        &[
            "UPDATE ptr SET day = day + 365 WHERE tenant BETWEEN 60 AND 130 RETURNING *",
            "UPDATE ptr SET day = '2025-05-05' WHERE tenant = 1",
            "UPDATE ptr SET note = 'gone', day = day + 365 WHERE tenant BETWEEN 131 AND 145
               RETURNING tenant, day, stamp",
            "BEGIN; UPDATE ptr SET day = day - 365 WHERE tenant = 7; ROLLBACK",
        ],
    );
    let gone = "UPDATE ptr SET note = 'gone', day = day - 365 WHERE tenant BETWEEN 146 AND 170";
    let counts =
        [&mut coordinator, &mut reference].map(|client| client.execute(gone, &[]).unwrap());
    assert_eq!(counts[0], counts[1], "{gone}");
    assert_same(
        &mut coordinator,
        &mut reference,
        &["SELECT * FROM ptr", "SELECT * FROM ptr_log"],
    );
    // A trigger may not move an inserted row (PostgreSQL's own error, also for the INSERT
    // half of a moving UPDATE), nor an upsert's updated row: nothing changes.
    for sql in [
        "INSERT INTO ptr VALUES (500, '2024-06-01', 1, 'move')",
        "UPDATE ptr SET note = 'move' WHERE tenant = 7",
        "INSERT INTO ptr VALUES (7, '2024-03-01', 5, 'x') ON CONFLICT (tenant, day) DO UPDATE SET note = 'move'",
    ] {
        let err = coordinator.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
    }
    assert_same(
        &mut coordinator,
        &mut reference,
        &["SELECT * FROM ptr", "SELECT * FROM ptr_log"],
    );
    // Without row triggers on the partitions, rows move as in PostgreSQL, transition tables
    // and all.
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DROP TRIGGER a_stamp ON ptr; DROP TRIGGER b_keep ON ptr_2024; DROP TRIGGER c_audit ON ptr;
         DROP TRIGGER d_2025 ON ptr_2025; DROP TRIGGER g_amount ON ptr",
    );
    assert_same(
        &mut coordinator,
        &mut reference,
        &[
            "UPDATE ptr SET day = day + 365 WHERE tenant < 30",
            "SELECT * FROM ptr",
            "SELECT * FROM ptr_log",
        ],
    );
    coordinator
        .batch_execute(
            "SELECT pgdist.undistribute_table('ptr'); SELECT pgdist.undistribute_table('ptr_log')",
        )
        .unwrap();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DROP TABLE ptr, ptr_log; DROP FUNCTION ptr_stamp(), ptr_audit(), ptr_count()",
    );
}
