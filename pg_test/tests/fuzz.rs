//! Randomized differential testing of query shapes: SELECTs built at random from distributed
//! tables (co-located, of other co-location groups, range-distributed, partitioned), a reference
//! table and a local table — joins of every kind, LATERAL, WITH, UNION / INTERSECT / EXCEPT,
//! subqueries in FROM, WHERE and the select list, grouping (ROLLUP, GROUPING SETS), aggregates,
//! window functions, DISTINCT (ON), LIMIT / OFFSET, VALUES, constant-false conditions — each run
//! on the cluster and on the plain reference server, whose answers must match; every fifth under
//! nested loops without Material nodes, so that scans are rescanned. A second run
//! does the same with expressions, conditions and aggregates over every kind of type, under
//! random session settings (time zone, DateStyle, float digits) and as prepared statements.
//! A third runs random writes — UPDATE and DELETE with subqueries, `FROM` and `USING`,
//! INSERT … SELECT, upserts, MERGE from tables, subqueries and VALUES, data-modifying WITH —
//! in transactions of a few statements with reads of what they wrote, savepoints rolled back
//! and now and then a ROLLBACK, and compares what each returns and every table afterwards (one of them partitioned, so rows
//! move between partitions).
//!
//! The default run is a fixed seed and a few hundred queries (the same every time). For a
//! longer hunt: `PGDIST_FUZZ_SEED=<n> PGDIST_FUZZ_QUERIES=<n> cargo test -p pgdist-pg-test
//! --test fuzz`. A failure prints the query and both answers.

use pgdist_pg_test::compare::{compare, query_text, run_on_both, Comparison};
use pgdist_pg_test::errors::sqlstate;
use pgdist_pg_test::{harness, tests, Cluster};

fn main() {
    harness::run(
        || Cluster::start(2),
        tests![
            random_queries_match_plain_postgres,
            random_expressions_match_plain_postgres,
            random_writes_match_plain_postgres
        ],
    )
}

const SETUP: &str = "
CREATE TABLE gt (id int PRIMARY KEY, v int, w text, n numeric);
CREATE TABLE gs (id int, v int, w text);
CREATE TABLE gr (id int PRIMARY KEY, v int, w text);
CREATE TABLE gx (id int, v int, w text);
CREATE TABLE gl (id int, v int, w text);
CREATE TABLE gd (id int NOT NULL, v int, w text);
CREATE TABLE gp (id int, v int, w text) PARTITION BY RANGE (v);
CREATE TABLE gp_low PARTITION OF gp FOR VALUES FROM (MINVALUE) TO (4);
CREATE TABLE gp_high PARTITION OF gp FOR VALUES FROM (4) TO (MAXVALUE) PARTITION BY LIST (w);
CREATE TABLE gp_high_p1 PARTITION OF gp_high FOR VALUES IN ('p1', 'p2', 'p3');
CREATE TABLE gp_high_rest PARTITION OF gp_high DEFAULT;
CREATE TABLE gp_null PARTITION OF gp DEFAULT;
INSERT INTO gt SELECT i, i % 13, 't' || (i % 20), i * 1.5 FROM generate_series(1, 80) i;
INSERT INTO gs SELECT i % 120, i % 11, CASE WHEN i % 5 = 0 THEN NULL ELSE 's' || (i % 15) END
  FROM generate_series(40, 150) i;
INSERT INTO gr SELECT i, i % 7, 'r' || i FROM generate_series(1, 100) i;
INSERT INTO gx SELECT i % 110, CASE WHEN i % 10 = 0 THEN NULL ELSE i % 9 END, 'x' || (i % 7)
  FROM generate_series(50, 160) i;
INSERT INTO gl SELECT i, i % 5, 'l' || i FROM generate_series(1, 30) i;
INSERT INTO gd SELECT i, i % 6, 'd' || (i % 9) FROM generate_series(1, 140, 2) i;
INSERT INTO gp SELECT i % 100, CASE WHEN i % 8 = 0 THEN NULL ELSE i % 10 END,
  CASE WHEN i % 6 = 0 THEN NULL ELSE 'p' || (i % 5) END FROM generate_series(10, 130) i;
";

const DISTRIBUTE: &str = "
SELECT pgdist.create_distributed_table('gt', 'id', shard_count => 4, colocate_with => 'none');
SELECT pgdist.create_distributed_table('gs', 'id', colocate_with => 'gt');
SELECT pgdist.create_reference_table('gr');
SELECT pgdist.create_distributed_table('gx', 'id', shard_count => 3, colocate_with => 'none');
SELECT pgdist.create_distributed_table('gd', 'id', 'range', split_points => ARRAY['30', '70', '100']);
SELECT pgdist.create_distributed_table('gp', 'id', colocate_with => 'gt');
";

const TABLES: [&str; 7] = ["gt", "gs", "gr", "gx", "gl", "gd", "gp"];

/// A small deterministic random source (xorshift64*): the same seed, the same queries.
struct Random(u64);

impl Random {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }

    fn between(&mut self, low: i32, high: i32) -> i32 {
        low + self.below((high - low + 1) as usize) as i32
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Builds one query; every FROM item has the columns id, v, w.
struct Generator {
    random: Random,
    aliases: usize,
}

impl Generator {
    fn alias(&mut self) -> String {
        self.aliases += 1;
        format!("a{}", self.aliases)
    }

    fn condition(&mut self, a: &str, depth: u32) -> String {
        let r = &mut self.random;
        let simple = [
            format!("{a}.v > {}", r.between(0, 10)),
            format!("{a}.w IS NULL"),
            format!("{a}.v % 2 = 0"),
            format!("{a}.id < {}", r.between(20, 120)),
            format!("{a}.id = {}", r.between(1, 120)),
            format!("{a}.id IN ({}, {})", r.between(1, 60), r.between(40, 120)),
            "false".into(),
            "1 = 2".into(),
            format!("{a}.w LIKE '%1%'"),
            format!("{a}.v IS NOT NULL"),
            format!(
                "{a}.id BETWEEN {} AND {}",
                r.between(1, 50),
                r.between(50, 130)
            ),
        ];
        let mut condition = simple[r.below(simple.len())].clone();
        if depth < 2 && self.random.chance(25) {
            let table = self.random.pick(&TABLES);
            let b = self.alias();
            let inner = self.condition(&b, depth + 1);
            let shapes = [
                format!("EXISTS (SELECT 1 FROM {table} {b} WHERE {b}.id = {a}.id AND {inner})"),
                format!("{a}.id IN (SELECT {b}.id FROM {table} {b} WHERE {inner})"),
                format!("{a}.id NOT IN (SELECT {b}.id FROM {table} {b} WHERE {b}.id IS NOT NULL AND {inner})"),
                format!("{a}.v = (SELECT max({b}.v) FROM {table} {b} WHERE {b}.id = {a}.id)"),
                format!("{a}.v < (SELECT count(*) FROM {table} {b} WHERE {inner})"),
            ];
            condition = shapes[self.random.below(shapes.len())].clone();
        }
        condition
    }

    /// A FROM item and its alias.
    fn from_item(&mut self, depth: u32) -> (String, String) {
        let a = self.alias();
        let r = self.random.below(100);
        if depth >= 2 || r < 45 {
            return (format!("{} {a}", self.random.pick(&TABLES)), a);
        }
        if r < 60 {
            let (t1, t2) = (self.random.pick(&TABLES), self.random.pick(&TABLES));
            let (b1, b2) = (self.alias(), self.alias());
            let w1 = match self.random.chance(50) {
                true => format!(" WHERE {}", self.condition(&b1, depth + 1)),
                false => String::new(),
            };
            let w2 = match self.random.chance(50) {
                true => format!(" WHERE {}", self.condition(&b2, depth + 1)),
                false => String::new(),
            };
            let op = self
                .random
                .pick(&["UNION ALL", "UNION ALL", "UNION", "EXCEPT", "INTERSECT"]);
            // Constant tags let a condition above rule an arm out (`WHERE v = 2`).
            let (v1, v2) = match self.random.below(3) {
                0 => ("1".to_string(), "2".to_string()),
                1 => (format!("{b1}.v"), format!("{b2}.v")),
                _ => ("1".to_string(), "1".to_string()),
            };
            let sql = format!(
                "(SELECT {b1}.id, {v1} AS v, {b1}.w FROM {t1} {b1}{w1} {op} \
                 SELECT {b2}.id, {v2}, {b2}.w FROM {t2} {b2}{w2}) {a}"
            );
            return (sql, a);
        }
        if r < 75 {
            let (inner, b) = self.from_item(depth + 1);
            let condition = self.condition(&b, depth + 1);
            let sql = match self.random.chance(50) {
                true => format!(
                    "(SELECT {b}.id, count(*)::int AS v, min({b}.w) AS w FROM {inner} \
                     WHERE {condition} GROUP BY {b}.id) {a}"
                ),
                false => {
                    format!("(SELECT {b}.id, {b}.v, {b}.w FROM {inner} WHERE {condition}) {a}")
                }
            };
            return (sql, a);
        }
        if r < 85 {
            let (s1, b1) = self.from_item(depth + 1);
            let (s2, b2) = self.from_item(depth + 1);
            let join = self
                .random
                .pick(&["JOIN", "LEFT JOIN", "FULL JOIN", "RIGHT JOIN"]);
            let on = [
                format!("{b1}.id = {b2}.id"),
                format!("{b1}.v = {b2}.v"),
                format!("{b1}.id = {b2}.v"),
                format!("{b1}.id = {b2}.id AND {b2}.v > 3"),
            ];
            let on = &on[self.random.below(on.len())];
            let sql = format!(
                "(SELECT {b1}.id, {b2}.v, coalesce({b1}.w, {b2}.w) AS w FROM {s1} {join} {s2} ON {on}) {a}"
            );
            return (sql, a);
        }
        if r < 92 {
            return (
                format!("(VALUES (1, 2, 'a'), (45, NULL, 'b'), (70, 3, NULL)) {a}(id, v, w)"),
                a,
            );
        }
        let (inner, b) = self.from_item(depth + 1);
        let limit = self.random.between(1, 30);
        let sql = format!(
            "(SELECT {b}.id, {b}.v, {b}.w FROM {inner} ORDER BY {b}.id, {b}.v, {b}.w LIMIT {limit}) {a}"
        );
        (sql, a)
    }

    fn query(&mut self) -> String {
        self.aliases = 0;
        // Sometimes the first FROM item is a WITH query.
        let mut with = String::new();
        let (first, a1) = if self.random.chance(12) {
            let (inner, b) = self.from_item(1);
            let condition = self.condition(&b, 1);
            let materialized = self
                .random
                .pick(&["", "MATERIALIZED ", "NOT MATERIALIZED "]);
            with = format!(
                "WITH c AS {materialized}(SELECT {b}.id, {b}.v, {b}.w FROM {inner} WHERE {condition}) "
            );
            let a = self.alias();
            (format!("c {a}"), a)
        } else {
            self.from_item(0)
        };
        let mut from = first;
        let mut aliases = vec![a1.clone()];
        for _ in 0..self.random.below(3) {
            let last = aliases[aliases.len() - 1].clone();
            if self.random.chance(15) {
                let (lateral, a2) = self.lateral(&a1, &last);
                let join = self.random.pick(&["JOIN", "LEFT JOIN"]);
                from = format!("{from} {join} {lateral} ON true");
                aliases.push(a2);
                continue;
            }
            let (item, a2) = self.from_item(1);
            let join = self
                .random
                .pick(&["JOIN", "LEFT JOIN", "JOIN", "FULL JOIN"]);
            let on = [
                format!("{a1}.id = {a2}.id"),
                format!("{last}.v = {a2}.v"),
                format!("{a1}.id = {a2}.id AND {a2}.v > 2"),
                format!("{a1}.id = {a2}.v"),
            ];
            let on = on[self.random.below(on.len())].clone();
            from = format!("{from} {join} {item} ON {on}");
            aliases.push(a2);
        }
        let mut conditions = Vec::new();
        for _ in 0..self.random.below(3) {
            let alias = aliases[self.random.below(aliases.len())].clone();
            conditions.push(self.condition(&alias, 0));
        }
        let filter = match conditions.is_empty() {
            true => String::new(),
            false => format!(" WHERE {}", conditions.join(" AND ")),
        };
        let a = aliases[self.random.below(aliases.len())].clone();
        let body = match self.random.below(100) {
            0..=29 => {
                let distinct = if self.random.chance(20) {
                    "DISTINCT "
                } else {
                    ""
                };
                let w = match self.random.chance(15) {
                    true => {
                        let table = self.random.pick(&TABLES);
                        format!("(SELECT max(x.w) FROM {table} x WHERE x.id = {a}.id)")
                    }
                    false => format!("{a}.w"),
                };
                let mut sql = format!("SELECT {distinct}{a}.id, {a}.v, {w} FROM {from}{filter}");
                if self.random.chance(30) {
                    sql.push_str(&format!(
                        " ORDER BY 1, 2, 3 LIMIT {}",
                        self.random.between(1, 20)
                    ));
                    if self.random.chance(30) {
                        sql.push_str(&format!(" OFFSET {}", self.random.between(1, 10)));
                    }
                }
                sql
            }
            30..=39 => {
                let window = self.window(&a);
                format!("SELECT {a}.id, {a}.v, {a}.w, {window} FROM {from}{filter}")
            }
            40..=44 => {
                let key = self.random.pick(&["v", "w", "id"]);
                format!(
                    "SELECT DISTINCT ON ({a}.{key}) {a}.{key}, {a}.id, {a}.v, {a}.w FROM {from}{filter} \
                     ORDER BY {a}.{key}, {a}.id, {a}.v, {a}.w"
                )
            }
            45..=79 => {
                let group = [
                    format!("{a}.v"),
                    format!("{a}.id"),
                    format!("{a}.w"),
                    format!("{a}.v % 3"),
                ];
                let group = group[self.random.below(group.len())].clone();
                let aggregates = self.aggregates(&a);
                let having = match self.random.chance(30) {
                    true => format!(" HAVING count(*) > {}", self.random.between(0, 3)),
                    false => String::new(),
                };
                let grouping = match self.random.below(10) {
                    0 => format!("ROLLUP ({group})"),
                    1 => format!("GROUPING SETS (({group}), ({a}.v > 3), ())"),
                    _ => "1".to_string(),
                };
                format!(
                    "SELECT {group}, {aggregates} FROM {from}{filter} GROUP BY {grouping}{having}"
                )
            }
            _ => format!("SELECT {} FROM {from}{filter}", self.aggregates(&a)),
        };
        format!("{with}{body}")
    }

    /// A LATERAL subquery reading a table for each row of `first` or `last`, and its alias.
    fn lateral(&mut self, first: &str, last: &str) -> (String, String) {
        let a = self.alias();
        let b = self.alias();
        let table = self.random.pick(&TABLES);
        let sql = match self.random.chance(50) {
            true => format!(
                "LATERAL (SELECT {last}.id AS id, count(*)::int AS v, max({b}.w) AS w \
                 FROM {table} {b} WHERE {b}.v = {last}.v) {a}"
            ),
            false => format!(
                "LATERAL (SELECT {b}.id, {b}.v, {b}.w FROM {table} {b} WHERE {b}.id = {first}.id \
                 ORDER BY {b}.v, {b}.w LIMIT 2) {a}"
            ),
        };
        (sql, a)
    }

    /// A window function over the rows of `a`, ordered by all of its columns (rows that tie
    /// are alike), partitioned by one of them or not at all.
    fn window(&mut self, a: &str) -> String {
        let function = self.random.pick(&[
            "row_number()",
            "rank()",
            "dense_rank()",
            "count(*)",
            "sum({a}.v)",
            "lag({a}.v)",
            "lead({a}.w, 2)",
            "first_value({a}.w)",
            "avg({a}.v)",
        ]);
        let function = function.replace("{a}", a);
        let partition = self.random.pick(&["", "id", "v", "w"]);
        let partition = match partition {
            "" => String::new(),
            column => format!("PARTITION BY {a}.{column} "),
        };
        let frame = self.random.pick(&[
            "",
            "",
            " ROWS BETWEEN 1 PRECEDING AND 1 FOLLOWING",
            " RANGE BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING",
        ]);
        format!("{function} OVER ({partition}ORDER BY {a}.id, {a}.v, {a}.w{frame})")
    }

    fn aggregates(&mut self, a: &str) -> String {
        let all = [
            "count(*)".to_string(),
            format!("count({a}.w)"),
            format!("sum({a}.v)"),
            format!("min({a}.w)"),
            format!("max({a}.id)"),
            format!("avg({a}.v)"),
            format!("count(DISTINCT {a}.v)"),
            format!("string_agg({a}.w, ',' ORDER BY {a}.w)"),
            format!("bool_and({a}.v > 2)"),
            format!("array_agg({a}.id ORDER BY {a}.id)"),
        ];
        (0..3)
            .map(|_| all[self.random.below(all.len())].clone())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn random_queries_match_plain_postgres(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(&mut coordinator, &mut reference, SETUP);
    coordinator.batch_execute(DISTRIBUTE).unwrap();
    let seed = setting("PGDIST_FUZZ_SEED", 7);
    let queries = setting("PGDIST_FUZZ_QUERIES", 300);
    let mut generator = Generator {
        random: Random(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
        aliases: 0,
    };
    let mut refused = 0;
    let verbose = std::env::var_os("PGDIST_FUZZ_VERBOSE").is_some();
    for i in 0..queries {
        let sql = generator.query();
        if verbose {
            eprintln!("query: {sql}");
        }
        // Every fifth query joins by nested loops without Material nodes: the scans on their
        // inner side are rescanned for every outer row.
        let nested = i % 5 == 4;
        if nested {
            run_on_both(&mut coordinator, &mut reference, NESTED_LOOPS);
        }
        // Every seventh runs in a REPEATABLE READ transaction block, reading every node
        // through the transaction's one connection there.
        let repeatable = i % 7 == 3;
        if repeatable {
            run_on_both(
                &mut coordinator,
                &mut reference,
                "BEGIN ISOLATION LEVEL REPEATABLE READ",
            );
        }
        if compare(&mut coordinator, &mut reference, &sql) != Comparison::Same {
            refused += 1;
        }
        if repeatable {
            run_on_both(&mut coordinator, &mut reference, "COMMIT");
        }
        if nested {
            run_on_both(
                &mut coordinator,
                &mut reference,
                "RESET enable_hashjoin; RESET enable_mergejoin; RESET enable_material",
            );
        }
    }
    eprintln!("fuzz: seed {seed}, {queries} queries, {refused} refused with 0A000");
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DROP TABLE gt, gs, gr, gx, gl, gd, gp",
    );
}

const NESTED_LOOPS: &str =
    "SET enable_hashjoin = off; SET enable_mergejoin = off; SET enable_material = off";

const TYPED_SETUP: &str = "
CREATE TABLE et (id int, k int, n numeric(12,3), f float8, ts timestamptz, d date, iv interval,
                 j jsonb, a int[], t text, b bool, u uuid);
INSERT INTO et SELECT i, i % 17, CASE WHEN i % 11 = 0 THEN NULL ELSE (i * 7.125) % 100 END,
  CASE WHEN i % 13 = 0 THEN NULL ELSE i / 3.0 END,
  timestamptz '2024-03-30 22:00+00' + i * interval '37 minutes', date '2024-01-01' + (i % 400),
  (i % 50) * interval '1 hour 7 minutes',
  CASE WHEN i % 7 = 0 THEN NULL ELSE jsonb_build_object('x', i % 5, 'y', ARRAY[i, i + 1], 'z', 't' || (i % 3)) END,
  CASE WHEN i % 9 = 0 THEN NULL ELSE ARRAY[i % 4, i % 6] END,
  CASE WHEN i % 8 = 0 THEN NULL ELSE 'T' || (i % 23) END,
  CASE WHEN i % 10 = 0 THEN NULL ELSE i % 3 = 0 END, md5(i::text)::uuid
FROM generate_series(1, 600) i;
CREATE TABLE eu (k int, label text);
INSERT INTO eu SELECT i, 'L' || i FROM generate_series(0, 20) i;
";

const SCALARS: &[&str] = &[
    "id",
    "k",
    "n",
    "f",
    "ts",
    "d",
    "iv",
    "j->'x'",
    "j->>'z'",
    "a[1]",
    "t",
    "b",
    "u",
    "date_trunc('day', ts)",
    "ts::date",
    "extract(hour from ts)",
    "to_char(ts, 'YYYY-MM-DD HH24')",
    "ts + iv",
    "d + 3",
    "n * 2 / 3",
    "round(f::numeric, 2)",
    "coalesce(t, 'none')",
    "upper(t)",
    "length(t)",
    "t || k",
    "j ? 'x'",
    "jsonb_array_length(j->'y')",
    "cardinality(a)",
    "a @> ARRAY[1]",
    "k % 4",
    "CASE WHEN k > 8 THEN 'hi' ELSE 'lo' END",
    "greatest(k, 5)",
    "nullif(k, 3)",
    "abs(n - 50)",
    "ts AT TIME ZONE 'UTC'",
    "date_part('dow', d)",
    "substr(t, 2)",
    "u::text",
    "iv * 2",
    "justify_hours(iv)",
    "(ts - interval '1 day')::date",
    "to_char(d, 'Mon')",
    "regexp_replace(t, '[0-9]', 'x')",
    "split_part(t, '1', 1)",
    "lower(j->>'z')",
    "n::int",
    "f::int",
    "b::int",
    "ts::text",
    "d::text || '!'",
];

const CONDITIONS: &[&str] = &[
    "k > 7",
    "n IS NULL",
    "n > 40",
    "f < 50",
    "ts > '2024-04-05 10:00+02'",
    "d BETWEEN '2024-02-01' AND '2024-06-01'",
    "iv > interval '10 hours'",
    "j->>'z' = 't1'",
    "j @> '{\"x\": 2}'",
    "a && ARRAY[3]",
    "t LIKE 'T1%'",
    "t ILIKE 't2%'",
    "b",
    "NOT b",
    "b IS NULL",
    "id IN (7, 300, 555)",
    "ts::date = d",
    "extract(hour from ts) < 12",
    "date_trunc('month', ts) = '2024-04-01'",
    "k = ANY(a)",
    "u::text < '5'",
    "to_char(ts, 'HH24') = '01'",
    "ts + iv > '2024-04-10'",
    "n::text LIKE '%5%'",
    "f::numeric > n",
    "t ~ '^T[12]'",
    "j ? 'y'",
    "k IN (SELECT k FROM eu WHERE label LIKE 'L1%')",
    "EXISTS (SELECT 1 FROM eu WHERE eu.k = et.k AND label > 'L5')",
    "d < '03/04/2024'",
];

const AGGREGATES: &[&str] = &[
    "count(*)",
    "count(n)",
    "sum(n)",
    "avg(n)",
    "min(ts)",
    "max(d)",
    "sum(iv)",
    "avg(iv)",
    "min(t)",
    "max(t)",
    "bool_and(b)",
    "bool_or(b)",
    "string_agg(t, ',' ORDER BY t, id)",
    "array_agg(k ORDER BY k, id)",
    "count(DISTINCT k)",
    "count(DISTINCT t)",
    "sum(DISTINCT k)",
    "stddev(n)",
    "variance(k)",
    "stddev_pop(k)",
    "var_samp(n)",
    "bit_and(k)",
    "bit_or(k)",
    "jsonb_agg(j->'x' ORDER BY id)",
    "count(*) FILTER (WHERE b)",
    "sum(k) FILTER (WHERE n > 20)",
    "percentile_cont(0.5) WITHIN GROUP (ORDER BY n)",
    "mode() WITHIN GROUP (ORDER BY k)",
    "max(a)",
    "avg(f)::numeric(20,6)",
    "every(k > 2)",
    "max(ts + iv)",
    "min(j->>'z')",
];

/// Settings under which values cross between nodes as text; zones whose abbreviations read
/// back as themselves in every DateStyle.
const SESSIONS: &[&str] = &[
    "SET TimeZone = 'UTC'",
    "SET TimeZone = 'Europe/Berlin'; SET DateStyle = 'SQL, DMY'",
    "SET TimeZone = 'America/New_York'; SET DateStyle = 'German'",
    "SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'ISO, DMY'; SET extra_float_digits = 0",
    "SET TimeZone = 'America/St_Johns'; SET DateStyle = 'Postgres, MDY'; SET IntervalStyle = 'sql_standard'",
    "SET TimeZone = 'Australia/Adelaide'; SET IntervalStyle = 'iso_8601'; SET extra_float_digits = 1",
];

impl Generator {
    fn pick(&mut self, items: &[&str], count: usize) -> Vec<String> {
        (0..count)
            .map(|_| items[self.random.below(items.len())].to_string())
            .collect()
    }

    fn typed_query(&mut self) -> String {
        let count = self.random.below(3);
        let conditions = self.pick(CONDITIONS, count);
        let filter = match conditions.is_empty() {
            true => String::new(),
            false => format!(" WHERE {}", conditions.join(" AND ")),
        };
        match self.random.below(100) {
            0..=29 => {
                let count = 1 + self.random.below(3);
                let columns = self.pick(SCALARS, count).join(", ");
                let limit = match self.random.chance(30) {
                    true => format!(" ORDER BY id LIMIT {}", self.random.between(1, 20)),
                    false => String::new(),
                };
                format!("SELECT id, {columns} FROM et{filter}{limit}")
            }
            30..=74 => {
                let group = self.pick(SCALARS, 1).remove(0);
                let aggregates = self.pick(AGGREGATES, 3).join(", ");
                let having = match self.random.chance(30) {
                    true => format!(" HAVING count(*) > {}", self.random.between(1, 20)),
                    false => String::new(),
                };
                format!("SELECT {group}, {aggregates} FROM et{filter} GROUP BY 1{having}")
            }
            75..=89 => format!(
                "SELECT {} FROM et{filter}",
                self.pick(AGGREGATES, 3).join(", ")
            ),
            _ => format!(
                "SELECT DISTINCT {} FROM et{filter}",
                self.pick(SCALARS, 1)[0]
            ),
        }
    }
}

fn random_expressions_match_plain_postgres(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(&mut coordinator, &mut reference, TYPED_SETUP);
    coordinator
        .batch_execute(
            "SELECT pgdist.create_distributed_table('et', 'id', shard_count => 6);
             SELECT pgdist.create_reference_table('eu');",
        )
        .unwrap();
    let seed = setting("PGDIST_FUZZ_SEED", 7);
    let queries = setting("PGDIST_FUZZ_QUERIES", 300);
    let mut generator = Generator {
        random: Random(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1),
        aliases: 0,
    };
    for i in 0..queries {
        let session = SESSIONS[generator.random.below(SESSIONS.len())];
        run_on_both(
            &mut coordinator,
            &mut reference,
            &format!("RESET ALL; {session}"),
        );
        let sql = generator.typed_query();
        if i % 4 == 3 {
            // As a prepared statement: custom plans first, then the generic one.
            let prepared = format!("PREPARE typed(int) AS {}", parameterized(&sql));
            run_on_both(&mut coordinator, &mut reference, &prepared);
            for _ in 0..7 {
                let value = generator.random.between(0, 16);
                compare(
                    &mut coordinator,
                    &mut reference,
                    &format!("EXECUTE typed({value})"),
                );
            }
            run_on_both(&mut coordinator, &mut reference, "DEALLOCATE typed");
        } else {
            compare(&mut coordinator, &mut reference, &sql);
        }
    }
    run_on_both(
        &mut coordinator,
        &mut reference,
        "RESET ALL; DROP TABLE et, eu",
    );
}

/// `sql` with a condition on the parameter `$1` added to its WHERE clause (or as one).
fn parameterized(sql: &str) -> String {
    let condition = "k <> $1";
    if let Some(at) = top_level_find(sql, " WHERE ") {
        return format!("{} WHERE {condition} AND {}", &sql[..at], &sql[at + 7..]);
    }
    for clause in [" GROUP BY", " ORDER BY"] {
        if let Some(at) = top_level_find(sql, clause) {
            return format!("{} WHERE {condition}{}", &sql[..at], &sql[at..]);
        }
    }
    format!("{sql} WHERE {condition}")
}

/// Where `needle` first occurs in `sql` outside parentheses.
fn top_level_find(sql: &str, needle: &str) -> Option<usize> {
    let mut depth = 0;
    for (at, c) in sql.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ if depth == 0 && sql[at..].starts_with(needle) => return Some(at),
            _ => {}
        }
    }
    None
}

const WRITE_SETUP: &str = "
CREATE TABLE w1 (id int PRIMARY KEY, grp int, v int);
CREATE TABLE w2 (id int, grp int, v int) PARTITION BY LIST (grp);
CREATE TABLE w2_low PARTITION OF w2 FOR VALUES IN (0, 1, 2);
CREATE TABLE w2_rest PARTITION OF w2 DEFAULT;
CREATE TABLE w3 (id int, grp int, v int);
CREATE TABLE wr (grp int PRIMARY KEY, name text);
CREATE TABLE wl (id int, note text);
CREATE TABLE wc (id int, seq int, v int);
INSERT INTO w1 SELECT i, i % 7, (i * 13) % 50 FROM generate_series(1, 120) i;
INSERT INTO wc SELECT i % 120 + 1, i, i % 11 FROM generate_series(1, 200) i;
INSERT INTO w2 SELECT i % 90, i % 5, i % 60 FROM generate_series(1, 150) i;
INSERT INTO w3 SELECT i, i % 9, (i * 7) % 40 FROM generate_series(1, 100) i;
INSERT INTO wr SELECT g, 'g' || g FROM generate_series(0, 6) g;
INSERT INTO wl SELECT i, 'n' || i FROM generate_series(1, 30) i;
CREATE TABLE wlog (t text, op text, old_row text, new_row text);
";

/// Triggers created once the tables are distributed: w3's change rows or skip them and log
/// every row written, wr's log the rows deleted (into a distributed table, within the same write).
const WRITE_TRIGGERS: &str = "
CREATE FUNCTION w_before() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    IF OLD.v % 11 = 5 THEN RETURN NULL; END IF;
    RETURN OLD;
  END IF;
  IF NEW.v % 13 = 0 THEN RETURN NULL; END IF;
  IF NEW.v > 35 THEN NEW.v := 35; END IF;
  RETURN NEW;
END $$;
CREATE FUNCTION w_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO wlog VALUES (TG_TABLE_NAME, TG_OP,
    CASE WHEN TG_OP <> 'INSERT' THEN OLD::text END, CASE WHEN TG_OP <> 'DELETE' THEN NEW::text END);
  RETURN NULL;
END $$;
CREATE TRIGGER w3_before BEFORE UPDATE OR DELETE ON w3 FOR EACH ROW EXECUTE FUNCTION w_before();
CREATE TRIGGER w3_log AFTER INSERT OR UPDATE OR DELETE ON w3 FOR EACH ROW EXECUTE FUNCTION w_log();
CREATE TRIGGER wr_log AFTER DELETE ON wr FOR EACH ROW EXECUTE FUNCTION w_log();
";

/// Triggers of the partitioned table w2, created halfway (MERGE runs into it per shard
/// before, row by row after): one partition's change or skip the rows updated, deleted or
/// inserted (also by an UPDATE moving them there), every partition's log the rows written, and
/// the statement's transition tables are logged.
const PARTITION_TRIGGERS: &str = "
CREATE FUNCTION w_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO wlog SELECT TG_TABLE_NAME, TG_OP, count(*)::text, sum(v)::text FROM changed;
  RETURN NULL;
END $$;
CREATE TRIGGER w2_updated AFTER UPDATE ON w2 REFERENCING NEW TABLE AS changed
  FOR EACH STATEMENT EXECUTE FUNCTION w_count();
CREATE TRIGGER w2_deleted AFTER DELETE ON w2 REFERENCING OLD TABLE AS changed
  FOR EACH STATEMENT EXECUTE FUNCTION w_count();
CREATE TRIGGER w2_before BEFORE UPDATE OR DELETE ON w2_low FOR EACH ROW EXECUTE FUNCTION w_before();
CREATE TRIGGER w2_rest_before BEFORE INSERT ON w2_rest FOR EACH ROW EXECUTE FUNCTION w_before();
CREATE TRIGGER w2_log AFTER INSERT OR UPDATE OR DELETE ON w2 FOR EACH ROW EXECUTE FUNCTION w_log();
";

/// Foreign keys added once the tables are distributed (the shards check the rows).
const WRITE_KEYS: &str = "
ALTER TABLE wc ADD FOREIGN KEY (id) REFERENCES w1 (id) ON DELETE CASCADE;
ALTER TABLE w1 ADD FOREIGN KEY (grp) REFERENCES wr (grp) ON DELETE CASCADE;
";

const WRITE_TABLES: [&str; 7] = [
    "SELECT * FROM w1 ORDER BY 1, 2, 3",
    "SELECT * FROM wc ORDER BY 1, 2, 3",
    "SELECT * FROM w2 ORDER BY 1, 2, 3",
    "SELECT * FROM w3 ORDER BY 1, 2, 3",
    "SELECT * FROM wr ORDER BY 1, 2",
    "SELECT * FROM wl ORDER BY 1, 2",
    "SELECT * FROM wlog ORDER BY 1, 2, 3, 4",
];

impl Generator {
    fn number(&mut self) -> i32 {
        self.random.between(0, 60)
    }

    /// A condition on table `t` (columns id, grp, v), often with one on another table.
    fn write_condition(&mut self, t: &str) -> String {
        let (a, b, c) = (self.number(), self.number(), self.number());
        let simple = [
            format!("id = {a}"),
            format!("id IN ({a}, {b}, {c})"),
            format!("v < {a}"),
            format!("grp = {}", a % 9),
            format!("v BETWEEN {a} AND {b}"),
            format!("grp IN (SELECT grp FROM wr WHERE name < 'g{}')", a % 7),
            "v IS NULL".into(),
            format!("id % {} = 0", 2 + a % 6),
        ];
        let mut condition = simple[self.random.below(simple.len())].clone();
        if self.random.chance(60) {
            let other = self.random.pick(&["w1", "w2", "w3", "wl"]);
            let column = if other == "wl" {
                "id"
            } else {
                self.random.pick(&["id", "grp"])
            };
            let k = self.number();
            let value = if other == "wl" { "id" } else { "v" };
            let shapes = [
                format!("EXISTS (SELECT 1 FROM {other} x WHERE x.{column} = {t}.{column} AND x.{value} > {k})"),
                format!("NOT EXISTS (SELECT 1 FROM {other} x WHERE x.{column} = {t}.{column})"),
                format!("{column} IN (SELECT {column} FROM {other} WHERE {value} < {k})"),
                format!("v > (SELECT avg({value}) FROM {other})"),
                format!("v < (SELECT max(x.{value}) FROM {other} x WHERE x.{column} = {t}.{column})"),
            ];
            let joiner = if self.random.chance(70) { "AND" } else { "OR" };
            condition = format!(
                "{condition} {joiner} {}",
                shapes[self.random.below(shapes.len())]
            );
        }
        condition
    }

    fn write_statement(&mut self) -> String {
        let t = self.random.pick(&["w1", "w2", "w3", "w1", "wr"]);
        let returning = self
            .random
            .pick(&["", "", " RETURNING id, v", " RETURNING *"]);
        if t == "wr" {
            let g = self.random.between(0, 12);
            return match self.random.below(3) {
                0 => format!("UPDATE wr SET name = name || 'x' WHERE grp = {g}"),
                // w1.grp references wr, wc.id w1: the delete cascades from every node's copy
                // of wr into the shards of w1 and on into wc's (groups 5 and 6 at most).
                1 => format!("DELETE FROM wr WHERE grp = {}", g.max(5)),
                _ => format!(
                    "INSERT INTO wr VALUES ({g}, 'n') ON CONFLICT (grp) DO UPDATE SET name = excluded.name || wr.name"
                ),
            };
        }
        if self.random.chance(10) {
            // wc references w1 (co-located): checked on the shards, emptied by w1's deletes.
            let (a, b) = (self.random.between(0, 140), self.number());
            return match self.random.chance(50) {
                true => format!("INSERT INTO wc VALUES ({a}, {b}, {b}), ({}, {b}, 0)", a / 2),
                false => format!("DELETE FROM wc WHERE seq % 7 = {} AND v < {b}", b % 7),
            };
        }
        let condition = self.write_condition(t);
        let k = self.number();
        match self.random.below(10) {
            0 | 1 => {
                let set = [
                    format!("v = v + {}", 1 + k % 5),
                    "v = NULL".into(),
                    "v = coalesce(v, 0) * 2 % 97".into(),
                    format!("v = (SELECT max(x.v) FROM w2 x WHERE x.id = {t}.id)"),
                    format!("v = (SELECT count(*) FROM w3 x WHERE x.grp = {t}.grp)"),
                    "v = (SELECT min(v) FROM w1)".into(),
                    // Moves rows between w2's partitions.
                    format!("grp = (grp + {}) % 6", 1 + k % 4),
                ];
                let set = &set[self.random.below(set.len())];
                format!("UPDATE {t} SET {set} WHERE {condition}{returning}")
            }
            2 | 3 => format!("DELETE FROM {t} WHERE {condition}{returning}"),
            4 => format!(
                "UPDATE {t} SET v = x.grp FROM wr x WHERE x.grp = {t}.grp AND {t}.v < {k}{returning}"
            ),
            5 => {
                let other = self.random.pick(&["w1", "w2", "w3", "wl"]);
                let value = if other == "wl" { "id" } else { "v" };
                format!("DELETE FROM {t} USING {other} x WHERE x.id = {t}.id AND x.{value} > {k}")
            }
            6 => {
                let source = self.random.pick(&["w1", "w2", "w3"]);
                let offset = self.random.between(200, 400);
                // Distinct ids: which duplicate an ON CONFLICT keeps is not defined.
                let conflict = if t == "w1" { " ON CONFLICT (id) DO NOTHING" } else { "" };
                format!(
                    "INSERT INTO {t} (id, grp, v) SELECT DISTINCT ON (id) id + {offset}, grp, v FROM {source} \
                     WHERE v < {} ORDER BY id, grp, v{conflict}",
                    k % 15
                )
            }
            7 | 8 => {
                let source = self.random.pick(&[
                    "w2",
                    "w3",
                    "(SELECT id, max(v) AS v, min(grp) AS grp FROM w3 GROUP BY id)",
                    "(SELECT DISTINCT ON (id) id, v, grp FROM w2 ORDER BY id, v, grp)",
                    "(VALUES (1, 2, 3), (60, NULL, 1), (700, 3, NULL)) AS v0(id, v, grp)",
                    "(SELECT g AS id, g % 5 AS v, g % 3 AS grp FROM generate_series(70, 130) g)",
                ]);
                let insert = match self.random.chance(50) {
                    true => " WHEN NOT MATCHED AND s.id IS NOT NULL THEN INSERT (id, grp, v) VALUES (s.id, s.grp, s.v)",
                    false => "",
                };
                let matched = self.random.pick(&[
                    "WHEN MATCHED AND s.v > 20 THEN DELETE WHEN MATCHED THEN UPDATE SET v = s.v",
                    // grp is w3's distribution column.
                    match t {
                        "w3" => "WHEN MATCHED AND s.v < 15 THEN UPDATE SET v = t.v + coalesce(s.v, 0)",
                        _ => "WHEN MATCHED THEN UPDATE SET v = t.v + coalesce(s.v, 0), grp = s.grp",
                    },
                    "WHEN MATCHED AND t.v < s.v THEN DO NOTHING",
                ]);
                // w3 (row triggers) is distributed by grp, which the ON condition must equate.
                let on = match t {
                    "w3" => "t.grp = s.grp AND t.id = s.id",
                    _ => "t.id = s.id",
                };
                format!("MERGE INTO {t} t USING {source} s ON {on} {matched}{insert}")
            }
            _ => {
                let inner = match self.random.chance(50) {
                    true => format!("DELETE FROM {t} WHERE {condition} RETURNING *"),
                    false => format!("UPDATE {t} SET v = v - 1 WHERE {condition} RETURNING *"),
                };
                // Rows written back into their own table (with new keys): a blind insert.
                let back = format!("INSERT INTO {t} SELECT id + 500, (grp + 1) % 6, v FROM d");
                let outer = self.random.pick(&[
                    "SELECT count(*), sum(v) FROM d",
                    "SELECT d.id, x.name FROM d JOIN wr x USING (grp) ORDER BY d.id, x.name",
                    "INSERT INTO wl SELECT id, 'moved' FROM d",
                    "DELETE FROM w3 WHERE id IN (SELECT id FROM d)",
                    "UPDATE w2 SET v = coalesce(v, 0) + 1 WHERE id IN (SELECT id FROM d) RETURNING id, v",
                    &back,
                ]);
                format!("WITH d AS ({inner}) {outer}")
            }
        }
    }
}

/// What a statement did on one server: its rows (sorted unless ordered) and row count, or
/// its SQLSTATE.
fn write_outcome(
    client: &mut postgres::Client,
    sql: &str,
) -> Result<(Vec<Vec<Option<String>>>, u64), String> {
    let mut rows = Vec::new();
    let mut count = 0;
    for message in client.simple_query(sql).map_err(|err| sqlstate(&err))? {
        match message {
            postgres::SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            postgres::SimpleQueryMessage::CommandComplete(n) => count = n,
            _ => {}
        }
    }
    if !pgdist_pg_test::compare::is_ordered(sql) {
        rows.sort();
    }
    Ok((rows, count))
}

fn random_writes_match_plain_postgres(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(&mut coordinator, &mut reference, WRITE_SETUP);
    coordinator
        .batch_execute(
            "SELECT pgdist.create_distributed_table('w1', 'id', shard_count => 4, colocate_with => 'none');
             SELECT pgdist.create_distributed_table('w2', 'id', colocate_with => 'w1');
             SELECT pgdist.create_distributed_table('w3', 'grp', shard_count => 3, colocate_with => 'none');
             SELECT pgdist.create_reference_table('wr');
             SELECT pgdist.create_distributed_table('wc', 'id', colocate_with => 'w1');
             SELECT pgdist.create_distributed_table('wlog', 'op', shard_count => 2, colocate_with => 'none');",
        )
        .unwrap();
    run_on_both(&mut coordinator, &mut reference, WRITE_KEYS);
    run_on_both(&mut coordinator, &mut reference, WRITE_TRIGGERS);
    let seed = setting("PGDIST_FUZZ_SEED", 7);
    let statements = setting("PGDIST_FUZZ_QUERIES", 300) / 2;
    let mut generator = Generator {
        random: Random(seed.wrapping_mul(0x94D0_49BB_1331_11EB) | 1),
        aliases: 0,
    };
    let verbose = std::env::var_os("PGDIST_FUZZ_VERBOSE").is_some();
    let mut refused = 0;
    let mut written = 0;
    let mut partition_triggers = false;
    while written < statements {
        if !partition_triggers && written >= statements / 2 {
            run_on_both(&mut coordinator, &mut reference, PARTITION_TRIGGERS);
            partition_triggers = true;
        }
        // A transaction of one to three statements, some of them reads of a table it wrote,
        // some behind a savepoint that is rolled back; then COMMIT, or now and then ROLLBACK.
        // Some run under REPEATABLE READ, where every read goes through the transaction's
        // connections.
        let begin = match generator.random.chance(20) {
            true => "BEGIN ISOLATION LEVEL REPEATABLE READ",
            false => "BEGIN",
        };
        run_on_both(&mut coordinator, &mut reference, begin);
        let mut history = vec![begin.to_string()];
        let mut savepoint = false;
        let mut failed = false;
        for _ in 0..1 + generator.random.below(3) {
            if !savepoint && generator.random.chance(25) {
                run_on_both(&mut coordinator, &mut reference, "SAVEPOINT s");
                history.push("SAVEPOINT s".to_string());
                savepoint = true;
            }
            let sql = match generator.random.chance(25) {
                true => WRITE_TABLES[generator.random.below(WRITE_TABLES.len())].to_string(),
                false => {
                    written += 1;
                    generator.write_statement()
                }
            };
            history.push(sql.clone());
            let started = std::time::Instant::now();
            let got = write_outcome(&mut coordinator, &sql);
            if verbose && started.elapsed().as_secs() >= 2 {
                eprintln!("slow ({:?}): {sql}", started.elapsed());
            }
            let want = write_outcome(&mut reference, &sql);
            match (&got, &want) {
                (Ok(_), Ok(_)) => assert_eq!(
                    got,
                    want,
                    "different outcomes in the transaction\n  {}",
                    history.join(";\n  ")
                ),
                // Refused by the cluster: the reference's change is undone too. A MERGE whose
                // two source rows take one target row fails on the cluster even when a BEFORE
                // trigger skipped one of them; PostgreSQL then fails or not by its join order.
                (Err(state), Ok(_))
                    if state == "0A000" || (state == "21000" && sql.starts_with("MERGE")) =>
                {
                    refused += 1;
                    if verbose {
                        eprintln!("refused: {sql}");
                    }
                }
                // A WITH query's rows written back into its own table: PostgreSQL checks the
                // unique index as each row arrives, so a new key that another of the query's
                // rows still holds fails there, depending on its scan order; pgdist's WITH query
                // is over first (the SQL standard's end-of-statement check).
                (Ok(_), Err(state)) if state == "23505" && sql.starts_with("WITH") => {
                    refused += 1;
                }
                // Both failed: which error comes first may differ (evaluation order).
                (Err(_), Err(_)) => {}
                _ => panic!(
                    "different outcomes in the transaction\n  {}\ncluster:   {got:?}\nreference: {want:?}",
                    history.join(";\n  ")
                ),
            }
            if got.is_err() || want.is_err() || (savepoint && generator.random.chance(30)) {
                if !savepoint {
                    failed = true;
                    break;
                }
                run_on_both(&mut coordinator, &mut reference, "ROLLBACK TO SAVEPOINT s");
                history.push("ROLLBACK TO SAVEPOINT s".to_string());
                savepoint = false;
            }
        }
        let end = match failed || generator.random.chance(10) {
            true => "ROLLBACK",
            false => "COMMIT",
        };
        history.push(end.to_string());
        run_on_both(&mut coordinator, &mut reference, end);
        for table in WRITE_TABLES {
            let cluster_rows = query_text(&mut coordinator, table).unwrap();
            let reference_rows = query_text(&mut reference, table).unwrap();
            assert!(
                cluster_rows == reference_rows,
                "after\n  {}\n{table} differs:\ncluster:   {cluster_rows:?}\nreference: {reference_rows:?}",
                history.join(";\n  ")
            );
        }
    }
    eprintln!("fuzz: seed {seed}, {statements} writes, {refused} refused or failed on one side");
    run_on_both(
        &mut coordinator,
        &mut reference,
        "DROP TABLE wc, w1, w2, w3, wr, wl, wlog; DROP FUNCTION w_before, w_log, w_count",
    );
}
