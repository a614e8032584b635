//! `pgdist.undistribute_table`: every row back into the local table, shards dropped.

use pgrx::prelude::*;

use crate::distribution::create::{checkout_nodes, distinct_nodes, relation_name};
use crate::distribution::data_move;
use crate::distribution::foreign_keys;
use crate::distribution::shell;
use crate::distribution::DistributionError;
use crate::error::OrRaise;
use crate::metadata::tables;

fn undistribute(oid: pg_sys::Oid) -> Result<(), DistributionError> {
    let name = relation_name(oid);
    Spi::run(&format!("LOCK TABLE {name} IN EXCLUSIVE MODE"))?;
    let table =
        tables::dist_table(oid)?.ok_or_else(|| DistributionError::NotDistributed(name.clone()))?;
    let definition = shell::read_definition(oid)?;
    if let Some(parent) = &definition.partition_of {
        if tables::dist_table(parent.parent)?.is_some() {
            return Err(DistributionError::Unsupported {
                table: name,
                what: "undistributing one partition of distributed partitioned tables".into(),
                hint: format!(
                    "Undistribute {} (its partitions follow), or detach the partition first.",
                    relation_name(parent.parent)
                ),
            });
        }
    }
    refuse_foreign_keys(&definition, &name)?;
    // A partitioned table's rows are its partitions': they come back first.
    let mut copied = 0;
    if definition.partition_key.is_some() {
        for partition in partitions_deepest_first(oid)? {
            copied += undistribute_partition(partition)?;
        }
    }
    let placements = tables::placements(oid)?;
    // From here on the table is local again for everything this transaction does.
    tables::delete_table(oid, table.colocation_id)?;
    copied += copy_back(&definition, &placements)?;
    pgrx::notice!("pgdist: {name} is a local table again; {copied} rows copied back");
    Ok(())
}

/// Copies the rows of `placements` (one per shard) into the local table, then drops them all.
/// A partitioned table's shards have no rows of their own.
fn copy_back(
    definition: &shell::TableDefinition,
    placements: &[tables::Placement],
) -> Result<u64, DistributionError> {
    let mut copied = 0;
    if definition.partition_key.is_none() {
        let nodes = distinct_nodes(placements.iter().map(|p| &p.node));
        let checkout = checkout_nodes(&nodes)?;
        let mut done = std::collections::BTreeSet::new();
        for placement in placements {
            let Some(conn) = nodes.iter().position(|n| *n == placement.node) else {
                continue;
            };
            if done.insert(placement.shard_index) {
                copied += crate::distribution::without_user_triggers(|| {
                    data_move::copy_shard_rows_to_local(
                        definition,
                        &checkout.conns[conn],
                        &definition.shard_relation(placement.shard_id),
                    )
                })?;
            }
        }
        checkout.finish();
    }
    let shards = placements
        .iter()
        .map(|p| (p.node.clone(), definition.shard_relation(p.shard_id)));
    crate::distribution::run_naming_shards(shards, |list| format!("DROP TABLE IF EXISTS {list}"))?;
    Ok(copied)
}

/// The distributed partitions of `oid`, at every level, the deepest first.
fn partitions_deepest_first(oid: pg_sys::Oid) -> Result<Vec<pg_sys::Oid>, DistributionError> {
    let mut partitions = tables::distributed_partitions(oid)?;
    partitions.reverse();
    Ok(partitions)
}

/// Undistributes a partition of a partitioned table being undistributed.
fn undistribute_partition(oid: pg_sys::Oid) -> Result<u64, DistributionError> {
    let Some(table) = tables::dist_table(oid)? else {
        return Ok(0);
    };
    let definition = shell::read_definition(oid)?;
    let placements = tables::placements(oid)?;
    tables::delete_table(oid, table.colocation_id)?;
    copy_back(&definition, &placements)
}

/// Refuses a table with foreign keys to or from distributed or reference tables (itself
/// included): the rows come back in batches, whose keys would be checked batch by batch (and
/// one remote lookup per row), and the referencing shards would keep keys to dropped shards.
fn refuse_foreign_keys(
    definition: &shell::TableDefinition,
    name: &str,
) -> Result<(), DistributionError> {
    let own = definition
        .constraints
        .iter()
        .filter(|c| {
            c.foreign_key
                .as_ref()
                .is_some_and(|k| tables::dist_table(k.table).ok().flatten().is_some())
        })
        .map(|c| format!("{} (on {name})", c.name));
    let mut keys: Vec<String> = own.collect();
    for (table, distributed) in foreign_keys::referencing_tables(definition.oid)? {
        if distributed {
            keys.push(format!("those of {}", relation_name(table)));
        }
    }
    if keys.is_empty() {
        return Ok(());
    }
    Err(DistributionError::UnsupportedStatement {
        what: format!(
            "undistributing {name}, which has foreign keys to or from distributed tables,"
        ),
        hint: format!(
            "Drop the foreign keys first ({}), undistribute, and add them again.",
            keys.join(", ")
        ),
    })
}

/// Turns a distributed or reference table back into an ordinary local table.
#[pg_extern]
fn undistribute_table(table_name: pgrx::PgRelation) {
    let oid = table_name.oid();
    crate::cluster::require_owner(oid);
    drop(table_name);
    crate::metadata::as_catalog_owner(|| undistribute(oid)).or_raise()
}
