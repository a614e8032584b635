//! Live numbers for the `pgdist.tables` and `pgdist.shards` views, asked from the nodes.

use std::collections::{BTreeMap, HashMap};

use pgrx::prelude::*;

use crate::cluster::target_for;
use crate::distribution::shell::with_suffix;
use crate::error::OrRaise;
use crate::metadata::MetadataError;
use crate::remote::quote::quote_literal;
use crate::remote::{self, NodeAddress};

/// The schema-qualified name of a shard's table on its nodes.
#[pg_extern(stable, parallel_safe)]
fn shard_name(table_name: pg_sys::Oid, shard_id: i64) -> Option<String> {
    let (schema, name) = Spi::get_two_with_args::<String, String>(
        "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        &[table_name.into()],
    )
    .ok()?;
    Some(pgrx::spi::quote_qualified_identifier(
        schema?,
        with_suffix(&name?, &shard_id.to_string()),
    ))
}

fn placements_by_node() -> Result<BTreeMap<i32, (NodeAddress, Vec<(i64, String)>)>, MetadataError> {
    let rows = Spi::connect(|client| {
        client
            .select(
                "SELECT p.node_id, n.host, n.port, s.shard_id, pgdist.shard_name(s.table_oid, s.shard_id)
                 FROM pgdist.placement p JOIN pgdist.shard s USING (shard_id) JOIN pgdist.node n USING (node_id)",
                None,
                &[],
            )?
            .map(|row| {
                Ok((
                    NodeAddress {
                        node_id: row.get(1)?.unwrap_or_default(),
                        host: row.get(2)?.unwrap_or_default(),
                        port: row.get::<i32>(3)?.unwrap_or_default() as u16,
                    },
                    row.get::<i64>(4)?.unwrap_or_default(),
                    row.get::<String>(5)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, MetadataError>>()
    })?;
    let mut by_node: BTreeMap<i32, (NodeAddress, Vec<(i64, String)>)> = BTreeMap::new();
    for (node, shard_id, name) in rows {
        by_node
            .entry(node.node_id)
            .or_insert_with(|| (node, Vec::new()))
            .1
            .push((shard_id, name));
    }
    Ok(by_node)
}

type StatisticsRow = (i64, i32, Option<i64>, Option<i64>);

fn statistics() -> Result<Vec<StatisticsRow>, MetadataError> {
    let by_node = placements_by_node()?;
    let mut work = Vec::new();
    for (node, shards) in by_node.values() {
        let values: Vec<String> = shards
            .iter()
            .map(|(id, name)| format!("({id}, {})", quote_literal(name)))
            .collect();
        let query = format!(
            "SELECT v.id, sum(CASE WHEN c.reltuples >= 0 THEN c.reltuples::int8 ELSE s.n_live_tup END),
                    sum(pg_catalog.pg_total_relation_size(c.oid))::int8
             FROM (VALUES {}) v(id, name)
             LEFT JOIN pg_catalog.pg_class t ON t.oid = pg_catalog.to_regclass(v.name)
             LEFT JOIN pg_catalog.pg_class c ON c.oid = t.oid AND t.relkind <> 'p'
                  OR t.relkind = 'p' AND c.oid IN (SELECT relid FROM pg_catalog.pg_partition_tree(t.oid) WHERE isleaf)
             LEFT JOIN pg_catalog.pg_stat_user_tables s ON s.relid = c.oid
             GROUP BY v.id",
            values.join(", ")
        );
        work.push((target_for(node.clone()).or_raise(), query));
    }
    let mut rows = Vec::new();
    for ((node, _), outcome) in by_node.values().zip(remote::run_each(&work)) {
        // A node that does not answer leaves its shards' numbers NULL.
        let Ok(messages) = outcome else { continue };
        for row in remote::rows_as_text(&messages) {
            let parse = |i: usize| {
                row.get(i)
                    .cloned()
                    .flatten()
                    .and_then(|v| v.parse::<i64>().ok())
            };
            rows.push((
                parse(0).unwrap_or_default(),
                node.node_id,
                parse(1),
                parse(2),
            ));
        }
    }
    Ok(rows)
}

/// Row estimate and size of every shard placement, asked from the nodes (NULL for a node that
/// does not answer).
#[pg_extern]
fn shard_statistics() -> TableIterator<
    'static,
    (
        name!(shard_id, i64),
        name!(node_id, i32),
        name!(row_estimate, Option<i64>),
        name!(bytes, Option<i64>),
    ),
> {
    TableIterator::new(statistics().or_raise())
}

/// Stores each distributed table's row count — its shards' counts as the nodes estimate them,
/// summed — in `pgdist.dist_table.row_estimate`, where the planner sizes scans and joins by it.
/// A table with a shard that no node answered for keeps its number; a number within 10% of
/// the stored one is left alone, so that cached plans are not invalidated for nothing.
/// Returns how many tables changed.
pub fn refresh_row_estimates() -> Result<i64, MetadataError> {
    let mut shard_rows: HashMap<i64, i64> = HashMap::new();
    for (shard_id, _, rows, _) in statistics()? {
        if let Some(rows) = rows {
            let entry = shard_rows.entry(shard_id).or_default();
            *entry = (*entry).max(rows);
        }
    }
    let shards = Spi::connect(|client| {
        client
            .select(
                "SELECT table_oid::oid, shard_id FROM pgdist.shard",
                None,
                &[],
            )?
            .map(|row| {
                Ok((
                    row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                    row.get::<i64>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, MetadataError>>()
    })?;
    let mut table_rows: HashMap<pg_sys::Oid, Option<f64>> = HashMap::new();
    for (table, shard_id) in shards {
        let sum = table_rows.entry(table).or_insert(Some(0.0));
        *sum = sum
            .zip(shard_rows.get(&shard_id))
            .map(|(sum, rows)| sum + *rows as f64);
    }
    let mut changed = 0;
    for (table, rows) in table_rows {
        let Some(rows) = rows else { continue };
        changed += Spi::get_one_with_args::<i64>(
            "WITH changed AS (
                 UPDATE pgdist.dist_table SET row_estimate = $2
                 WHERE table_oid = $1::oid::regclass
                   AND (row_estimate IS NULL OR abs(row_estimate - $2) > 0.1 * greatest(row_estimate, 100))
                 RETURNING 1)
             SELECT count(*) FROM changed",
            &[table.into(), rows.into()],
        )?
        .unwrap_or_default();
    }
    if changed > 0 {
        crate::metadata::cache::invalidate();
    }
    Ok(changed)
}

/// Asks the nodes for every distributed table's row count now, rather than at the maintenance
/// daemon's next round (`pgdist.statistics_interval`); returns how many tables changed.
#[pg_extern(name = "refresh_row_estimates")]
fn refresh_row_estimates_now() -> i64 {
    crate::cluster::require_superuser("refresh row estimates");
    refresh_row_estimates().or_raise()
}
