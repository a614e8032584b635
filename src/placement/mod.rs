//! Shard placement: moving shards between workers (`pgdist.move_shard`, `pgdist.rebalance`,
//! `pgdist.drain_node`).
//!
//! A move takes one shard index of a co-location group — that shard of every co-located table,
//! so co-located joins and foreign keys keep working — from one node to another, inside the
//! caller's transaction (two-phase commit: all moves happen or none):
//!
//! 1. lock the group's tables on the coordinator in EXCLUSIVE mode: writes wait, reads go on
//!    (from the old placements);
//! 2. create the shards on the target (without foreign keys), and copy the rows: on the source
//!    the shards are locked in SHARE mode first, which waits for transactions still prepared
//!    there (committed on the coordinator, COMMIT PREPARED in flight), so that the copy sees
//!    every committed row;
//! 3. once every move's rows are copied, lock the tables in ACCESS EXCLUSIVE mode (reads wait
//!    from here to the commit, which also sends COMMIT PREPARED before the locks go), point the
//!    placements at the targets, add the foreign keys there, ANALYZE the new shards and drop the
//!    old ones.
//!
//! `rebalance` plans moves so that, in every hash or range co-location group (or the one of a
//! table), no primary holds more shard indexes than `threshold` above the average, or two more
//! than another (`dry_run` only lists them); `drain_node` moves every shard off a node, to the
//! least loaded others. Moves block writes (`mode => 'blocking'`); online moves are not built.

use std::collections::{BTreeMap, BTreeSet};

use pgrx::prelude::*;

use crate::cluster::target_for;
use crate::distribution::create::{relation_name, shard_creation_batch};
use crate::distribution::data_move::{self, ShardSink};
use crate::distribution::shell::{self, TableDefinition};
use crate::distribution::{foreign_keys, run_on_placements, DistributionError};
use crate::error::OrRaise;
use crate::metadata::nodes;
use crate::metadata::tables::{self, DistTable, Method, Placement};
use crate::remote::NodeAddress;
use crate::transaction::remote_xact;

/// One shard index of one co-location group, from one node to another.
#[derive(Clone, Debug, PartialEq)]
struct Move {
    group: i32,
    index: i32,
    source: NodeAddress,
    target: NodeAddress,
}

/// A co-location group's tables, with their definitions and placements.
struct Group {
    members: Vec<(DistTable, TableDefinition, Vec<Placement>)>,
}

impl Group {
    fn load(colocation_id: i32) -> Result<Group, DistributionError> {
        let mut members = Vec::new();
        for table in tables::all_tables()?
            .into_iter()
            .filter(|t| t.colocation_id == colocation_id)
        {
            let definition = shell::read_definition(table.oid)?;
            let placements = tables::placements(table.oid)?;
            members.push((table, definition, placements));
        }
        members.sort_by_key(|(table, ..)| u32::from(table.oid));
        // Partitioned tables before their partitions, whose shards are created in theirs.
        let depths = members
            .iter()
            .map(|(table, ..)| partition_depth(table.oid))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ordered: Vec<_> = depths.into_iter().zip(members).collect();
        ordered.sort_by_key(|(depth, _)| *depth);
        Ok(Group {
            members: ordered.into_iter().map(|(_, member)| member).collect(),
        })
    }

    /// Node ids holding each shard index (from the group's first table: members share them).
    fn holders(&self) -> BTreeMap<i32, Vec<NodeAddress>> {
        let mut holders: BTreeMap<i32, Vec<NodeAddress>> = BTreeMap::new();
        if let Some((_, _, placements)) = self.members.first() {
            for placement in placements {
                holders
                    .entry(placement.shard_index)
                    .or_default()
                    .push(placement.node.clone());
            }
        }
        holders
    }

    fn lock(&self, mode: &str) -> Result<(), DistributionError> {
        for (table, ..) in &self.members {
            Spi::run(&format!(
                "LOCK TABLE {} IN {mode} MODE",
                relation_name(table.oid)
            ))?;
        }
        Ok(())
    }

    /// The members' placements of shard index `index` on `node`.
    fn shards_at(&self, index: i32, node: &NodeAddress) -> Vec<(&TableDefinition, &Placement)> {
        self.members
            .iter()
            .filter_map(|(_, definition, placements)| {
                placements
                    .iter()
                    .find(|p| p.shard_index == index && p.node == *node)
                    .map(|p| (definition, p))
            })
            .collect()
    }
}

/// Carries out `moves` (see the module comment); NOTICEs report each.
fn run_moves(moves: &[Move]) -> Result<(), DistributionError> {
    let mut groups: BTreeMap<i32, Group> = BTreeMap::new();
    for group in moves.iter().map(|m| m.group).collect::<BTreeSet<_>>() {
        let loaded = Group::load(group)?;
        loaded.lock("EXCLUSIVE")?;
        groups.insert(group, loaded);
    }
    for step in moves {
        let group = &groups[&step.group];
        let shards = group.shards_at(step.index, &step.source);
        if shards.is_empty() {
            return Err(DistributionError::Move(format!(
                "shard index {} of co-location group {} has no placement on {}",
                step.index, step.group, step.source
            )));
        }
        if !group.shards_at(step.index, &step.target).is_empty() {
            return Err(DistributionError::Move(format!(
                "{} already holds shard index {} of co-location group {}",
                step.target, step.index, step.group
            )));
        }
        copy_shards(&shards, &step.source, &step.target)?;
    }
    // Switch: from here reads wait until the commit.
    for group in groups.values() {
        group.lock("ACCESS EXCLUSIVE")?;
    }
    let mut drops = Vec::new();
    for step in moves {
        let group = &groups[&step.group];
        let shards = group.shards_at(step.index, &step.source);
        let ids: Vec<i64> = shards.iter().map(|(_, p)| p.shard_id).collect();
        tables::move_placements(&ids, step.source.node_id, step.target.node_id)?;
        drops.extend(
            shards
                .iter()
                .map(|(d, p)| (step.source.clone(), d.shard_relation(p.shard_id))),
        );
    }
    for step in moves {
        let group = &groups[&step.group];
        for (definition, placement) in group.shards_at(step.index, &step.source) {
            let moved = Placement {
                node: step.target.clone(),
                ..placement.clone()
            };
            foreign_keys::add_to_shards(definition, std::slice::from_ref(&moved))?;
            run_on_placements(std::slice::from_ref(&moved), |p| {
                vec![format!("ANALYZE {}", definition.shard_relation(p.shard_id))]
            })?;
        }
    }
    crate::distribution::run_naming_shards(drops, |list| format!("DROP TABLE IF EXISTS {list}"))
}

/// How many partitioned tables table `oid` is a partition of (0 for any other table).
fn partition_depth(oid: pg_sys::Oid) -> Result<i64, DistributionError> {
    Ok(Spi::get_one_with_args::<i64>(
        "SELECT count(*) FROM pg_catalog.pg_partition_ancestors($1) WHERE relid <> $1",
        &[oid.into()],
    )?
    .unwrap_or_default())
}

/// Creates `shards` on `target` and copies their rows from `source`.
fn copy_shards(
    shards: &[(&TableDefinition, &Placement)],
    source: &NodeAddress,
    target: &NodeAddress,
) -> Result<(), DistributionError> {
    let mut creation = Vec::new();
    for (definition, placement) in shards {
        creation.push(shard_creation_batch(
            definition,
            &[(placement.shard_id, placement.shard_index)],
        )?);
    }
    let target_node = target_for(target.clone())?;
    remote_xact::run_batches(&[(target_node.clone(), creation.join(";\n"))]);
    let checkout = remote_xact::checkout_begun(&[target_for(source.clone())?, target_node])?;
    let relations: Vec<String> = shards
        .iter()
        .map(|(d, p)| d.shard_relation(p.shard_id))
        .collect();
    // Waits for transactions still prepared on the source, and keeps writes out.
    data_move::wait(
        checkout.conns[0]
            .simple_query_owned(format!("LOCK TABLE {} IN SHARE MODE", relations.join(", "))),
    )?;
    let mut rows = 0;
    for ((definition, placement), relation) in shards.iter().zip(&relations) {
        if definition.partition_key.is_some() {
            continue; // its rows are its partitions'
        }
        let sink = ShardSink::new(definition, placement.shard_id, vec![1]);
        rows += data_move::copy_between_nodes(
            &checkout.conns[0],
            relation,
            &data_move::column_list(definition),
            &sink,
            &checkout.conns,
        )?;
    }
    checkout.finish();
    pgrx::notice!(
        "pgdist: shard index {} ({} table{}, {rows} row{}) copied from {source} to {target}",
        shards[0].1.shard_index,
        shards.len(),
        if shards.len() == 1 { "" } else { "s" },
        if rows == 1 { "" } else { "s" }
    );
    Ok(())
}

/// The hash or range co-location group of table `oid`.
fn group_of(oid: pg_sys::Oid) -> Result<i32, DistributionError> {
    let name = relation_name(oid);
    let table = tables::dist_table(oid)?.ok_or(DistributionError::NotDistributed(name.clone()))?;
    if table.method == Method::Reference {
        return Err(DistributionError::Move(format!(
            "{name} is a reference table: every node holds all of it"
        )));
    }
    Ok(table.colocation_id)
}

/// Moves that leave each node of `nodes` with as many shard indexes of the group as the
/// others, give or take one (`holders`: the nodes of each shard index), or with none on
/// `drained`.
fn balancing_moves(
    group: i32,
    mut holders: BTreeMap<i32, Vec<NodeAddress>>,
    nodes: &[NodeAddress],
    drained: Option<&NodeAddress>,
    threshold: f64,
) -> Result<Vec<Move>, DistributionError> {
    let placements: usize = holders.values().map(Vec::len).sum();
    let average = placements as f64 / nodes.len().max(1) as f64;
    let count = |holders: &BTreeMap<i32, Vec<NodeAddress>>, node: &NodeAddress| {
        holders.values().filter(|h| h.contains(node)).count()
    };
    let targets: Vec<&NodeAddress> = nodes.iter().filter(|n| Some(*n) != drained).collect();
    let mut moves = Vec::new();
    loop {
        // The most loaded node (the drained one while it holds anything), and the least
        // loaded node that lacks one of its shard indexes.
        let from = match drained {
            Some(node) if count(&holders, node) > 0 => node.clone(),
            Some(_) => break,
            None => match nodes
                .iter()
                .max_by_key(|n| (count(&holders, n), std::cmp::Reverse(n.node_id)))
            {
                Some(node) => node.clone(),
                None => break,
            },
        };
        // An index moves once per plan: the moves copy from where it is now.
        let moved: Vec<i32> = moves.iter().map(|m: &Move| m.index).collect();
        let candidate = holders
            .iter()
            .filter(|(index, h)| h.contains(&from) && !moved.contains(index))
            .flat_map(|(index, h)| {
                targets
                    .iter()
                    .filter(|t| !h.contains(t))
                    .map(move |t| (*index, (*t).clone()))
            })
            .min_by_key(|(index, to)| (count(&holders, to), to.node_id, *index));
        let Some((index, to)) = candidate else {
            if drained.is_some() {
                return Err(DistributionError::Move(format!(
                    "no other node can take the shards of co-location group {group} on {from}"
                )));
            }
            break;
        };
        if drained.is_none()
            && (count(&holders, &from) <= count(&holders, &to) + 1
                || (count(&holders, &from) as f64) <= average * (1.0 + threshold))
        {
            break;
        }
        if let Some(h) = holders.get_mut(&index) {
            h.retain(|n| *n != from);
            h.push(to.clone());
        }
        moves.push(Move {
            group,
            index,
            source: from,
            target: to,
        });
    }
    Ok(moves)
}

fn primary_addresses() -> Result<Vec<NodeAddress>, DistributionError> {
    Ok(nodes::primary_nodes()?
        .into_iter()
        .map(|n| n.address)
        .collect())
}

/// The hash and range co-location groups, or the one of `table`.
fn groups(table: Option<pg_sys::Oid>) -> Result<Vec<i32>, DistributionError> {
    Ok(match table {
        Some(oid) => vec![group_of(oid)?],
        None => tables::all_tables()?
            .into_iter()
            .filter(|t| t.method != Method::Reference)
            .map(|t| t.colocation_id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    })
}

/// One row of `rebalance`'s answer: a shard that moves (or would, with `dry_run`).
type MoveRow = (i64, pg_sys::Oid, i32, i32, Option<i64>);

/// Plans the moves of `groups` (balanced within `threshold`, or off `drained`), runs them
/// unless `dry_run`, and returns a row per shard moved.
fn balance(
    groups: Vec<i32>,
    drained: Option<&NodeAddress>,
    threshold: f64,
    dry_run: bool,
) -> Result<Vec<MoveRow>, DistributionError> {
    nodes::lock_membership()?;
    let nodes = primary_addresses()?;
    let mut moves = Vec::new();
    let mut rows = Vec::new();
    for group in groups {
        let loaded = Group::load(group)?;
        let planned = balancing_moves(group, loaded.holders(), &nodes, drained, threshold)?;
        for step in &planned {
            for (definition, placement) in loaded.shards_at(step.index, &step.source) {
                rows.push((
                    placement.shard_id,
                    definition.oid,
                    step.source.node_id,
                    step.target.node_id,
                    shard_bytes(definition, placement),
                ));
            }
        }
        moves.extend(planned);
    }
    if !dry_run {
        run_moves(&moves)?;
    }
    Ok(rows)
}

/// The size of a shard placement, asked from its node (None when it does not answer).
fn shard_bytes(definition: &TableDefinition, placement: &Placement) -> Option<i64> {
    let target = target_for(placement.node.clone()).ok()?;
    let sql = format!(
        "SELECT pg_catalog.pg_total_relation_size({})",
        crate::remote::quote::quote_literal(&definition.shard_relation(placement.shard_id))
    );
    let rows = crate::remote::run_on_each(std::slice::from_ref(&target), &sql)
        .pop()?
        .ok()?;
    crate::remote::rows_as_text(&rows)
        .first()?
        .first()?
        .as_deref()?
        .parse()
        .ok()
}

/// Moves shard `shard_id` — with the co-located shards of its index — to node
/// `target_node_id` (from `source_node_id`, needed only when the shard has several
/// placements). `mode => 'blocking'` is the one supported: writes to the tables wait while
/// the rows are copied.
#[pg_extern]
fn move_shard(
    shard_id: i64,
    target_node_id: i32,
    mode: default!(&str, "'online'"),
    source_node_id: default!(Option<i32>, "NULL"),
) {
    crate::cluster::require_superuser("move shards");
    if mode != "blocking" {
        crate::error::raise(DistributionError::UnsupportedStatement {
            what: format!("pgdist.move_shard with mode => '{mode}'"),
            hint: "Online moves (writes flowing during the copy) are not built yet: use \
                   mode => 'blocking', where writes to the moved tables wait while the rows are \
                   copied and reads go on."
                .into(),
        });
    }
    move_shard_impl(shard_id, target_node_id, source_node_id).or_raise()
}

fn move_shard_impl(
    shard_id: i64,
    target_node: i32,
    source_node: Option<i32>,
) -> Result<(), DistributionError> {
    nodes::lock_membership()?;
    let table = Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT (SELECT table_oid::oid FROM pgdist.shard WHERE shard_id = $1)",
        &[shard_id.into()],
    )?
    .ok_or_else(|| DistributionError::Move(format!("there is no shard {shard_id}")))?;
    let group = group_of(table)?;
    let placements: Vec<Placement> = tables::placements(table)?
        .into_iter()
        .filter(|p| p.shard_id == shard_id)
        .collect();
    let source = match (source_node, placements.as_slice()) {
        (None, [only]) => only.node.clone(),
        (None, _) => {
            return Err(DistributionError::Move(format!(
                "shard {shard_id} has {} placements: say which one with source_node_id",
                placements.len()
            )))
        }
        (Some(id), _) => placements
            .iter()
            .find(|p| p.node.node_id == id)
            .map(|p| p.node.clone())
            .ok_or_else(|| {
                DistributionError::Move(format!("shard {shard_id} has no placement on node {id}"))
            })?,
    };
    let target = primary_addresses()?
        .into_iter()
        .find(|n| n.node_id == target_node)
        .ok_or_else(|| {
            DistributionError::Move(format!("node {target_node} is not a primary worker"))
        })?;
    run_moves(&[Move {
        group,
        index: placements[0].shard_index,
        source,
        target,
    }])
}

/// Spreads the shard indexes of every hash and range co-location group (or of `relation`'s)
/// over the primary workers: a node holding more than `threshold` above the average gives
/// shard indexes to the least loaded nodes, as long as that narrows the gap. Returns the moves,
/// made unless `dry_run`. (`pgdist.rebalance` in `sql/views.sql` calls it and shows the tables
/// as regclass.)
#[pg_extern]
fn rebalance_moves(
    strategy: &str,
    threshold: f64,
    dry_run: bool,
    relation: Option<pgrx::PgRelation>,
) -> TableIterator<
    'static,
    (
        name!(shard_id, i64),
        name!(table_oid, pg_sys::Oid),
        name!(source_node, i32),
        name!(target_node, i32),
        name!(bytes, Option<i64>),
    ),
> {
    crate::cluster::require_superuser("move shards");
    if strategy != "by_shard_count" {
        crate::error::raise(DistributionError::UnsupportedStatement {
            what: format!("pgdist.rebalance with strategy => '{strategy}'"),
            hint: "Use strategy => 'by_shard_count' (the default).".into(),
        });
    }
    let table = relation.map(|t| t.oid());
    let rows = balance(groups(table).or_raise(), None, threshold, dry_run).or_raise();
    TableIterator::new(rows)
}

/// Moves every shard of distributed tables off node `node_id` (before `remove_node`); returns
/// how many shards moved.
#[pg_extern]
fn drain_node(node_id: i32) -> i64 {
    crate::cluster::require_superuser("move shards");
    let drained = nodes::node_by_id(node_id)
        .or_raise()
        .map(|n| n.address)
        .unwrap_or_else(|| {
            crate::error::raise(DistributionError::Move(format!(
                "there is no node {node_id}"
            )))
        });
    balance(groups(None).or_raise(), Some(&drained), 0.0, false)
        .or_raise()
        .len() as i64
}

#[cfg(test)]
mod unit {
    use super::*;

    fn node(id: i32) -> NodeAddress {
        NodeAddress {
            node_id: id,
            host: "h".into(),
            port: 5000 + id as u16,
        }
    }

    #[test]
    fn balancing_spreads_shard_indexes_evenly() {
        let holders: BTreeMap<i32, Vec<NodeAddress>> =
            (0..6).map(|i| (i, vec![node(1 + i % 2)])).collect();
        let nodes = [node(1), node(2), node(3)];
        let moves = balancing_moves(7, holders.clone(), &nodes, None, 0.1).unwrap();
        assert_eq!(moves.len(), 2);
        assert!(moves.iter().all(|m| m.target == node(3)));
        // Within the threshold of the average (2 each): nothing to do.
        assert!(balancing_moves(7, holders.clone(), &nodes, None, 0.6)
            .unwrap()
            .is_empty());
        let drained = balancing_moves(7, holders, &nodes, Some(&node(1)), 0.0).unwrap();
        assert_eq!(drained.len(), 3);
        assert!(drained
            .iter()
            .all(|m| m.source == node(1) && m.target != node(1)));
    }
}
