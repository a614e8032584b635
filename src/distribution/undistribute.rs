//! `pgdist.undistribute_table`: every row back into the local table, shards dropped.

use std::collections::BTreeMap;

use pgrx::prelude::*;

use crate::cluster::target_for;
use crate::distribution::create::{checkout_nodes, distinct_nodes, relation_name};
use crate::distribution::data_move;
use crate::distribution::shell;
use crate::distribution::DistributionError;
use crate::error::OrRaise;
use crate::metadata::tables;
use crate::remote::NodeAddress;
use crate::transaction::remote_xact;

fn undistribute(oid: pg_sys::Oid) -> Result<(), DistributionError> {
    let name = relation_name(oid);
    Spi::run(&format!("LOCK TABLE {name} IN EXCLUSIVE MODE"))?;
    let table =
        tables::dist_table(oid)?.ok_or_else(|| DistributionError::NotDistributed(name.clone()))?;
    let definition = shell::read_definition(oid)?;
    let placements = tables::placements(oid)?;
    // From here on the table is local again for everything this transaction does.
    tables::delete_table(oid, table.colocation_id)?;

    let nodes = distinct_nodes(placements.iter().map(|p| &p.node));
    let checkout = checkout_nodes(&nodes)?;
    let mut copied = 0;
    let mut done = std::collections::BTreeSet::new();
    for placement in &placements {
        if !done.insert(placement.shard_index) {
            continue; // one placement per shard is enough
        }
        let Some(conn) = nodes
            .iter()
            .position(|n| *n == placement.node)
            .map(|i| &checkout.conns[i])
        else {
            continue;
        };
        copied += data_move::copy_shard_rows_to_local(
            &definition,
            conn,
            &definition.shard_relation(placement.shard_id),
        )?;
    }
    checkout.finish();

    let mut drops: BTreeMap<i32, (NodeAddress, Vec<String>)> = BTreeMap::new();
    for placement in &placements {
        drops
            .entry(placement.node.node_id)
            .or_insert_with(|| (placement.node.clone(), Vec::new()))
            .1
            .push(definition.shard_relation(placement.shard_id));
    }
    let work = drops
        .into_values()
        .map(|(node, shards)| {
            Ok((
                target_for(node)?,
                format!("DROP TABLE IF EXISTS {}", shards.join(", ")),
            ))
        })
        .collect::<Result<Vec<_>, DistributionError>>()?;
    remote_xact::run_batches(&work);
    pgrx::notice!("pgdist: {name} is a local table again; {copied} rows copied back");
    Ok(())
}

/// Turns a distributed or reference table back into an ordinary local table.
#[pg_extern]
fn undistribute_table(table_name: pgrx::PgRelation) {
    let oid = table_name.oid();
    crate::cluster::require_owner(oid);
    drop(table_name);
    undistribute(oid).or_raise()
}
