//! `pgdist.create_distributed_table` and `pgdist.create_reference_table`.
//!
//! Order of work, all inside the caller's transaction so that a failure anywhere leaves nothing
//! behind (remote work is rolled back with it, see `transaction::remote_xact`):
//! validate → plan shards and placements → create the shards on the workers → copy the existing
//! rows into them → empty the local table (it stays as the shell) → record it in the catalog.

use std::collections::BTreeMap;

use pgrx::prelude::*;

use crate::cluster::target_for;
use crate::distribution::data_move::{self, ShardSink};
use crate::distribution::foreign_keys;
use crate::distribution::shell::{self, TableDefinition};
use crate::distribution::DistributionError;
use crate::distribution::{hashing, partition_names, user_types};
use crate::error::OrRaise;
use crate::metadata::nodes::{self, Node};
use crate::metadata::tables::{self, ColocationGroup, DistTable, Method, Placement};
use crate::remote::quote::{quote_identifier, quote_literal, quote_qualified};
use crate::remote::NodeAddress;
use crate::transaction::remote_xact;

/// What the caller asked for.
pub struct DistributionSpec {
    pub method: Method,
    pub column: Option<String>,
    pub shard_count: Option<i32>,
    pub colocate_with: String,
    pub replication_factor: Option<i32>,
    pub split_points: Option<Vec<String>>,
}

/// One shard to create: its bounds and the nodes of its placements.
struct PlannedShard {
    shard_id: i64,
    index: i32,
    min_value: Option<String>,
    max_value: Option<String>,
    nodes: Vec<NodeAddress>,
}

/// `relation::regclass::text`, as PostgreSQL prints it (quoted where needed).
pub fn relation_name(oid: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>("SELECT $1::oid::regclass::text", &[oid.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("{}", u32::from(oid)))
}

fn type_name(type_oid: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.format_type($1, NULL)",
        &[type_oid.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_default()
}

fn unsupported(table: &str, what: &str, hint: &str) -> DistributionError {
    DistributionError::Unsupported {
        table: table.into(),
        what: what.into(),
        hint: hint.into(),
    }
}

/// Refuses tables pgdist cannot distribute (yet).
fn validate_table(oid: pg_sys::Oid, name: &str, method: Method) -> Result<(), DistributionError> {
    if tables::dist_table(oid)?.is_some() {
        return Err(DistributionError::AlreadyDistributed(name.into()));
    }
    let row = Spi::connect(|client| -> Result<_, DistributionError> {
        let rows = client.select(
            "SELECT CASE c.relpersistence WHEN 't' THEN 'temporary' ELSE c.relkind::text END,
                    (c.relhassubclass AND c.relkind <> 'p')
                      OR EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhrelid = c.oid
                                 AND NOT EXISTS (SELECT 1 FROM pgdist.dist_table d WHERE d.table_oid = i.inhparent)),
                    EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                            WHERE t.tgrelid = c.oid AND NOT t.tgisinternal AND t.tgconstraint <> 0),
                    EXISTS (SELECT 1 FROM pg_catalog.pg_partition_tree(c.oid) t
                            JOIN pg_catalog.pg_class p ON p.oid = t.relid
                            WHERE p.relkind NOT IN ('r', 'p')
                               OR EXISTS (SELECT 1 FROM pgdist.dist_table d WHERE d.table_oid = p.oid))
             FROM pg_catalog.pg_class c WHERE c.oid = $1",
            None,
            &[oid.into()],
        )?;
        let mut found = None;
        for row in rows {
            found = Some((
                row.get::<String>(1)?.unwrap_or_default(),
                row.get::<bool>(2)?.unwrap_or_default(),
                row.get::<bool>(3)?.unwrap_or_default(),
                row.get::<bool>(4)?.unwrap_or_default(),
            ));
        }
        Ok(found)
    })?;
    let Some((relkind, inherits, constraint_triggers, odd_partitions)) = row else {
        return Err(DistributionError::NotATable(name.into()));
    };
    match relkind.as_str() {
        "r" => {}
        "p" if method != Method::Hash => {
            return Err(unsupported(
                name,
                "partitioned reference and range-distributed tables",
                "Distribute a partitioned table by hash: create_distributed_table(table, \
                 column).",
            ))
        }
        "p" if odd_partitions => {
            return Err(unsupported(
                name,
                "partitioned tables with foreign or distributed partitions",
                "Every partition must be an ordinary local table: undistribute_table() the \
                 distributed ones, detach the foreign ones.",
            ))
        }
        "p" => {}
        "temporary" => {
            return Err(unsupported(
                name,
                "temporary tables",
                "Distribute an ordinary table; a temporary table lives in one session of the \
                 coordinator only.",
            ))
        }
        _ => return Err(DistributionError::NotATable(name.into())),
    }
    if inherits {
        return Err(unsupported(
            name,
            "tables with inheritance, or partitions of a table that is not distributed",
            "Distribute a table without parents or children; for a partition, distribute its \
             partitioned table (the partitions follow).",
        ));
    }
    if constraint_triggers {
        return Err(unsupported(
            name,
            "constraint triggers",
            "Drop the table's constraint triggers before distributing it (plain triggers are \
             kept and fire on the coordinator).",
        ));
    }
    Ok(())
}

/// The partitions of partitioned table `oid` (direct ones only), in creation order.
fn partitions(oid: pg_sys::Oid) -> Result<Vec<pg_sys::Oid>, DistributionError> {
    Ok(crate::metadata::oids(
        "SELECT inhrelid FROM pg_catalog.pg_inherits WHERE inhparent = $1 ORDER BY inhrelid",
        oid,
    )?)
}

/// Distributes partition `oid` of distributed table `parent` like its parent: by the same
/// column, co-located, each shard a partition of the parent's shard of the same index.
pub fn distribute_partition(oid: pg_sys::Oid, parent: &DistTable) -> Result<(), DistributionError> {
    distribute(
        oid,
        DistributionSpec {
            method: Method::Hash,
            column: parent.distribution_column.clone(),
            shard_count: None,
            colocate_with: relation_name(parent.oid),
            replication_factor: None,
            split_points: None,
        },
    )
}

/// How the rows of table `oid` leave its shell once they are in the shards: with TRUNCATE of it
/// and of the local tables whose foreign keys reference it (directly or through each other)
/// when those are all empty — TRUNCATE wants every referencing table in the same statement —,
/// or, when one of them has rows, with a DELETE that fires no foreign-key trigger: its rows keep
/// referencing the moved rows, which their inserts and the key's checks now find in the shards.
/// Refused when a distributed table references it (its rows cannot be checked there).
fn shell_emptying(oid: pg_sys::Oid, name: &str) -> Result<String, DistributionError> {
    let mut seen = vec![oid];
    let mut empty = vec![name.to_string()];
    let mut with_rows = false;
    let mut next = 0;
    while next < seen.len() {
        let referenced = seen[next];
        next += 1;
        for (table, distributed) in foreign_keys::referencing_tables(referenced)? {
            if seen.contains(&table) {
                continue;
            }
            seen.push(table);
            let referencing = relation_name(table);
            if distributed {
                return Err(unsupported(
                    name,
                    "tables referenced by distributed tables",
                    &format!(
                        "Drop the foreign key of {referencing}, distribute {name} and add the key \
                         again with ALTER TABLE."
                    ),
                ));
            }
            let has_rows =
                Spi::get_one::<bool>(&format!("SELECT EXISTS (SELECT 1 FROM ONLY {referencing})"))?;
            with_rows |= has_rows == Some(true);
            empty.push(referencing);
        }
    }
    Ok(match with_rows {
        true => format!("DELETE FROM ONLY {name}"),
        false => format!("TRUNCATE ONLY {}", empty.join(", ")),
    })
}

/// Uniqueness must include the distribution column; foreign keys must be ones the shards can
/// enforce (`foreign_keys::check`).
fn validate_constraints(
    table: &TableDefinition,
    referencing: &foreign_keys::Referencing,
    column: Option<&shell::Column>,
) -> Result<(), DistributionError> {
    for constraint in &table.constraints {
        foreign_keys::check(referencing, constraint)?;
    }
    let name = referencing.name;
    match column {
        Some(column) => require_column_in_unique_keys(table, name, column),
        None => Ok(()),
    }
}

/// UNIQUE, PRIMARY KEY and EXCLUDE constraints and unique indexes must include the distribution
/// column: uniqueness is enforced per shard.
pub fn require_column_in_unique_keys(
    table: &TableDefinition,
    name: &str,
    column: &shell::Column,
) -> Result<(), DistributionError> {
    let constraints = table
        .constraints
        .iter()
        .filter(|c| matches!(c.kind.as_str(), "p" | "u" | "x"))
        .map(|c| (&c.name, &c.columns));
    let indexes = table
        .indexes
        .iter()
        .filter(|i| i.unique)
        .map(|i| (&i.name, &i.columns));
    for (constraint, columns) in constraints.chain(indexes) {
        if !columns.contains(&column.attnum) {
            return Err(DistributionError::UniqueWithoutDistributionColumn {
                table: name.into(),
                constraint: constraint.clone(),
                column: column.name.clone(),
            });
        }
    }
    Ok(())
}

/// Placement nodes of each shard of a new co-location group: round robin, `replication_factor`
/// consecutive nodes per shard.
fn round_robin(shard_count: i32, replication_factor: i32, nodes: &[Node]) -> Vec<Vec<NodeAddress>> {
    (0..shard_count as usize)
        .map(|i| {
            (0..replication_factor as usize)
                .map(|k| nodes[(i + k) % nodes.len()].address.clone())
                .collect()
        })
        .collect()
}

/// Placement nodes of each shard of an existing group (those of a member table).
fn group_placements(group: &ColocationGroup) -> Result<Vec<Vec<NodeAddress>>, DistributionError> {
    let member = tables::group_member(group.colocation_id)?.ok_or_else(|| {
        DistributionError::BadArgument(format!(
            "co-location group {} has no tables",
            group.colocation_id
        ))
    })?;
    let mut by_index: BTreeMap<i32, Vec<NodeAddress>> = BTreeMap::new();
    for placement in tables::placements(member)? {
        by_index
            .entry(placement.shard_index)
            .or_default()
            .push(placement.node);
    }
    Ok(by_index.into_values().collect())
}

/// Sorted, distinct range split points in the column type's text form.
fn range_split_points(
    table: &TableDefinition,
    column: &shell::Column,
    given: Option<Vec<String>>,
    shard_count: i32,
) -> Result<Vec<String>, DistributionError> {
    let points = match given {
        Some(points) => Spi::get_one_with_args::<Vec<String>>(
            &format!(
                "SELECT array_agg(v::text ORDER BY v) FROM (SELECT DISTINCT x::{} AS v FROM unnest($1::text[]) x) s",
                column.type_sql
            ),
            &[points.into()],
        )?,
        None => Spi::get_one::<Vec<String>>(&format!(
            "SELECT array_agg(q::text ORDER BY q) FROM (
               SELECT DISTINCT q FROM unnest((
                 SELECT percentile_disc(ARRAY(SELECT g::float8 / {shard_count} FROM generate_series(1, {last}) g))
                        WITHIN GROUP (ORDER BY {col}) FROM ONLY {rel})) q) s",
            last = shard_count - 1,
            col = quote_identifier(&column.name),
            rel = crate::remote::quote::quote_qualified(&table.schema, &table.name),
        ))?,
    };
    match points {
        Some(points) if !points.is_empty() => Ok(points),
        _ if shard_count == 1 => Ok(Vec::new()),
        _ => Err(DistributionError::BadArgument(
            "range distribution needs split_points, or rows to compute them from".into(),
        )),
    }
}

/// The co-location group a new hash table joins (None: a new group).
fn choose_group(
    spec: &DistributionSpec,
    type_oid: pg_sys::Oid,
    shard_count: i32,
    replication_factor: i32,
) -> Result<Option<ColocationGroup>, DistributionError> {
    match spec.colocate_with.as_str() {
        "none" => Ok(None),
        "default" => Ok(tables::matching_group(
            spec.method,
            shard_count,
            Some(type_oid),
            replication_factor,
        )?),
        other => {
            let other_oid =
                Spi::get_one_with_args::<pg_sys::Oid>("SELECT $1::regclass::oid", &[other.into()])?
                    .unwrap_or(pg_sys::InvalidOid);
            let cannot = |why: &str| DistributionError::CannotColocate {
                other: other.into(),
                why: why.into(),
            };
            let other_table = tables::dist_table(other_oid)?
                .ok_or_else(|| cannot("it is not a distributed table"))?;
            if other_table.method != spec.method || spec.method != Method::Hash {
                return Err(cannot("only hash-distributed tables can be co-located"));
            }
            let group = tables::colocation_group(other_table.colocation_id)?
                .ok_or_else(|| cannot("its group is missing"))?;
            if group.distribution_type != Some(type_oid) {
                return Err(cannot("the distribution columns have different types"));
            }
            if spec.shard_count.is_some_and(|n| n != group.shard_count) {
                return Err(cannot(&format!("it has {} shards", group.shard_count)));
            }
            if spec
                .replication_factor
                .is_some_and(|n| n != group.replication_factor)
            {
                return Err(cannot(&format!(
                    "its replication factor is {}",
                    group.replication_factor
                )));
            }
            Ok(Some(group))
        }
    }
}

/// Creates shards and placements, moves the rows, records the table. The heart of both SQL
/// functions.
pub fn distribute(oid: pg_sys::Oid, spec: DistributionSpec) -> Result<(), DistributionError> {
    let name = relation_name(oid);
    nodes::lock_membership()?;
    Spi::run(&format!("LOCK TABLE {name} IN EXCLUSIVE MODE"))?;
    validate_table(oid, &name, spec.method)?;
    let table = shell::read_definition(oid)?;
    let column = match &spec.column {
        Some(column) => {
            Some(
                table
                    .column(column)
                    .ok_or_else(|| DistributionError::NoSuchColumn {
                        table: name.clone(),
                        column: column.clone(),
                    })?,
            )
        }
        None => None,
    };
    let workers = nodes::primary_nodes()?;
    if workers.is_empty() {
        return Err(DistributionError::NoWorkers);
    }

    let (group, shard_nodes, bounds, index_sql) = match (spec.method, column) {
        (Method::Reference, _) => {
            let group = tables::matching_group(Method::Reference, 1, None, 1)?;
            let nodes: Vec<NodeAddress> = workers.iter().map(|n| n.address.clone()).collect();
            (
                group.map(|g| g.colocation_id),
                vec![nodes],
                vec![(None, None)],
                "0".to_string(),
            )
        }
        (_, None) => {
            return Err(DistributionError::BadArgument(
                "a distribution column is required".into(),
            ))
        }
        (Method::Hash, Some(column)) => {
            if hashing::hash_function(column.type_oid).is_none() {
                return Err(DistributionError::NoHashFunction(type_name(
                    column.type_oid,
                )));
            }
            let requested_rf = spec
                .replication_factor
                .unwrap_or_else(crate::gucs::replication_factor);
            let requested_count = spec.shard_count.unwrap_or_else(crate::gucs::shard_count);
            if requested_count < 1 {
                return Err(DistributionError::BadArgument(
                    "shard_count must be at least 1".into(),
                ));
            }
            let group = choose_group(&spec, column.type_oid, requested_count, requested_rf)?;
            let (shard_count, rf) = group.as_ref().map_or((requested_count, requested_rf), |g| {
                (g.shard_count, g.replication_factor)
            });
            if rf as usize > workers.len() {
                return Err(DistributionError::BadArgument(format!(
                    "replication_factor {rf} needs at least {rf} worker nodes, there are {}",
                    workers.len()
                )));
            }
            let shard_nodes = match &group {
                Some(group) => group_placements(group)?,
                None => round_robin(shard_count, rf, &workers),
            };
            let bounds = hashing::hash_ranges(shard_count)
                .into_iter()
                .map(|(min, max)| (Some(min.to_string()), Some(max.to_string())))
                .collect();
            let index_sql = hashing::hash_index_sql(&quote_identifier(&column.name), shard_count);
            (
                group.map(|g| g.colocation_id),
                shard_nodes,
                bounds,
                index_sql,
            )
        }
        (Method::Range, Some(column)) => {
            if !hashing::has_btree_ordering(column.type_oid) {
                return Err(DistributionError::NoOrdering(type_name(column.type_oid)));
            }
            if spec.colocate_with != "default" && spec.colocate_with != "none" {
                return Err(unsupported(
                    &name,
                    "co-located range tables",
                    "Use colocate_with => 'none'.",
                ));
            }
            let rf = spec
                .replication_factor
                .unwrap_or_else(crate::gucs::replication_factor);
            let requested = spec.shard_count.unwrap_or_else(crate::gucs::shard_count);
            let points = range_split_points(&table, column, spec.split_points.clone(), requested)?;
            let shard_count = points.len() as i32 + 1;
            if rf as usize > workers.len() {
                return Err(DistributionError::BadArgument(format!(
                    "replication_factor {rf} needs at least {rf} worker nodes"
                )));
            }
            let mut lower = vec![None];
            lower.extend(points.iter().cloned().map(Some));
            let mut upper: Vec<Option<String>> = points.iter().cloned().map(Some).collect();
            upper.push(None);
            let array = format!(
                "ARRAY[{}]::{}[]",
                points
                    .iter()
                    .map(|p| quote_literal(p))
                    .collect::<Vec<_>>()
                    .join(", "),
                column.type_sql
            );
            let index_sql = if points.is_empty() {
                "0".to_string()
            } else {
                format!(
                    "pg_catalog.width_bucket({}, {array})",
                    quote_identifier(&column.name)
                )
            };
            (
                None,
                round_robin(shard_count, rf, &workers),
                lower.into_iter().zip(upper).collect(),
                index_sql,
            )
        }
    };
    validate_constraints(
        &table,
        &foreign_keys::Referencing {
            oid,
            name: &name,
            method: spec.method,
            distribution_attno: column.map(|c| c.attnum),
            colocation_id: group,
        },
        column,
    )?;
    let emptying = shell_emptying(oid, &name)?;
    if let Some(column) = column {
        let has_nulls = Spi::get_one::<bool>(&format!(
            "SELECT EXISTS (SELECT 1 FROM ONLY {name} WHERE {} IS NULL)",
            quote_identifier(&column.name)
        ))?;
        if has_nulls == Some(true) {
            return Err(DistributionError::NullDistributionValue);
        }
    }

    let mut shards = Vec::with_capacity(shard_nodes.len());
    for (index, (nodes, (min_value, max_value))) in shard_nodes.into_iter().zip(bounds).enumerate()
    {
        shards.push(PlannedShard {
            shard_id: tables::next_shard_id()?,
            index: index as i32,
            min_value,
            max_value,
            nodes,
        });
    }
    create_shards(&table, &shards)?;
    // A partitioned table has no rows of its own: its partitions move theirs.
    let partitioned = table.partition_key.is_some();
    let moved = if partitioned {
        0
    } else {
        let moved = move_rows(&table, &shards, &index_sql)?;
        crate::distribution::without_user_triggers(|| Spi::run(&emptying))?;
        moved
    };

    let colocation_id = match group {
        Some(id) => id,
        None => {
            let type_oid = column.map(|c| c.type_oid);
            let rf = shards.first().map_or(1, |s| s.nodes.len() as i32);
            let rf = if spec.method == Method::Reference {
                1
            } else {
                rf
            };
            tables::insert_group(spec.method, shards.len() as i32, type_oid, rf)?
        }
    };
    tables::insert_table(&DistTable {
        oid,
        method: spec.method,
        distribution_column: column.map(|c| c.name.clone()),
        colocation_id,
        // Unknown for an empty table until the maintenance daemon asks the nodes.
        row_estimate: (moved > 0).then_some(moved as f64),
    })?;
    for shard in &shards {
        for node in &shard.nodes {
            tables::insert_placement(
                &Placement {
                    shard_id: shard.shard_id,
                    shard_index: shard.index,
                    min_value: shard.min_value.clone(),
                    max_value: shard.max_value.clone(),
                    node: node.clone(),
                },
                oid,
            )?;
        }
    }
    foreign_keys::add_to_shards(&table, &tables::placements(oid)?)?;
    let node_count = shards
        .iter()
        .flat_map(|s| s.nodes.iter().map(|n| n.node_id))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    pgrx::notice!(
        "pgdist: {name} now has {} shard{} on {node_count} node{}; {moved} existing row{} moved",
        shards.len(),
        if shards.len() == 1 { "" } else { "s" },
        if node_count == 1 { "" } else { "s" },
        if moved == 1 { "" } else { "s" }
    );
    if partitioned {
        let parent = tables::dist_table(oid)?.ok_or_else(|| DistributionError::NotATable(name))?;
        for partition in partitions(oid)? {
            distribute_partition(partition, &parent)?;
        }
    }
    Ok(())
}

/// The statements that create `shards` (id, index) of `table` (and what they need) on one
/// node. A partition's shards become partitions of its parent's shards of the same index.
pub fn shard_creation_batch(
    table: &TableDefinition,
    shards: &[(i64, i32)],
) -> Result<String, DistributionError> {
    let mut statements = vec![format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        quote_identifier(&table.schema)
    )];
    statements.extend(user_types::type_statements(table.oid)?);
    let parent = match &table.partition_of {
        Some(partition) if tables::dist_table(partition.parent)?.is_some() => Some((
            crate::executor::schema_and_name(partition.parent),
            tables::placements(partition.parent)?,
        )),
        _ => None,
    };
    let inherited_indexes = match parent {
        Some(_) => partition_names::inherited_indexes(table.oid)?,
        None => Vec::new(),
    };
    for (shard_id, index) in shards {
        let parent_shard = parent.as_ref().and_then(|((schema, name), placements)| {
            placements
                .iter()
                .find(|p| p.shard_index == *index)
                .map(|p| {
                    (
                        schema,
                        quote_qualified(schema, &shell::shard_name(name, p.shard_id)),
                        p.shard_id,
                    )
                })
        });
        statements.extend(shell::create_shard_sql(
            table,
            *shard_id,
            parent_shard
                .as_ref()
                .map(|(_, relation, _)| relation.as_str()),
        ));
        if let Some((schema, _, parent_shard_id)) = parent_shard {
            statements.extend(partition_names::rename_inherited_indexes(
                &table.shard_relation(*shard_id),
                *shard_id,
                schema,
                parent_shard_id,
                &inherited_indexes,
            ));
        }
    }
    Ok(statements.join(";\n"))
}

/// Creates every shard on its nodes, one batch per node, all nodes at once.
fn create_shards(
    table: &TableDefinition,
    shards: &[PlannedShard],
) -> Result<(), DistributionError> {
    let mut per_node: BTreeMap<i32, (NodeAddress, Vec<(i64, i32)>)> = BTreeMap::new();
    for shard in shards {
        for node in &shard.nodes {
            per_node
                .entry(node.node_id)
                .or_insert_with(|| (node.clone(), Vec::new()))
                .1
                .push((shard.shard_id, shard.index));
        }
    }
    let mut work = Vec::new();
    for (node, shard_ids) in per_node.into_values() {
        work.push((target_for(node)?, shard_creation_batch(table, &shard_ids)?));
    }
    remote_xact::run_batches(&work);
    Ok(())
}

/// Copies the local rows into the new shards.
fn move_rows(
    table: &TableDefinition,
    shards: &[PlannedShard],
    index_sql: &str,
) -> Result<u64, DistributionError> {
    let nodes = distinct_nodes(shards.iter().flat_map(|s| &s.nodes));
    let checkout = checkout_nodes(&nodes)?;
    let sinks: Vec<ShardSink> = shards
        .iter()
        .map(|shard| {
            let conns = shard
                .nodes
                .iter()
                .filter_map(|n| nodes.iter().position(|m| m == n))
                .collect();
            ShardSink::new(table, shard.shard_id, conns)
        })
        .collect();
    let moved = data_move::copy_local_rows(table, index_sql, &sinks, &checkout.conns)?;
    checkout.finish();
    if moved > 0 {
        // Fresh statistics: real row estimates in pgdist.shards and good plans on the workers.
        let mut per_node: BTreeMap<i32, (NodeAddress, Vec<String>)> = BTreeMap::new();
        for shard in shards {
            for node in &shard.nodes {
                let entry = per_node
                    .entry(node.node_id)
                    .or_insert_with(|| (node.clone(), Vec::new()));
                entry
                    .1
                    .push(format!("ANALYZE {}", table.shard_relation(shard.shard_id)));
            }
        }
        let work = per_node
            .into_values()
            .map(|(node, statements)| Ok((target_for(node)?, statements.join(";\n"))))
            .collect::<Result<Vec<_>, DistributionError>>()?;
        remote_xact::run_batches(&work);
    }
    Ok(moved)
}

/// Distributes a table by the hash (or range) of one column.
#[allow(clippy::too_many_arguments)]
#[pg_extern]
fn create_distributed_table(
    table_name: pgrx::PgRelation,
    distribution_column: &str,
    method: default!(&str, "'hash'"),
    shard_count: default!(Option<i32>, "NULL"),
    colocate_with: default!(&str, "'default'"),
    replication_factor: default!(Option<i32>, "NULL"),
    split_points: default!(Option<Vec<String>>, "NULL"),
) {
    let method = match Method::parse(method) {
        Some(method @ (Method::Hash | Method::Range)) => method,
        _ => crate::error::raise(DistributionError::BadMethod(method.into())),
    };
    let spec = DistributionSpec {
        method,
        column: Some(distribution_column.into()),
        shard_count,
        colocate_with: colocate_with.into(),
        replication_factor,
        split_points,
    };
    let oid = table_name.oid();
    crate::cluster::require_owner(oid);
    drop(table_name); // close it: TRUNCATE refuses a relation this statement still holds open
                      // The owner may distribute the table; pgdist's catalog is written as its owner.
    crate::metadata::as_catalog_owner(|| distribute(oid, spec)).or_raise()
}

/// Makes a table a reference table: one full copy on every worker.
#[pg_extern]
fn create_reference_table(table_name: pgrx::PgRelation) {
    let spec = DistributionSpec {
        method: Method::Reference,
        column: None,
        shard_count: Some(1),
        colocate_with: "default".into(),
        replication_factor: None,
        split_points: None,
    };
    let oid = table_name.oid();
    crate::cluster::require_owner(oid);
    drop(table_name);
    // The owner may distribute the table; pgdist's catalog is written as its owner.
    crate::metadata::as_catalog_owner(|| distribute(oid, spec)).or_raise()
}

/// Gives a node that joins the cluster its copy of reference table `oid`.
pub fn replicate_reference_table(
    oid: pg_sys::Oid,
    node: &NodeAddress,
) -> Result<(), DistributionError> {
    // Writes wait until the new copy is in the catalog (and so gets them too).
    Spi::run(&format!(
        "LOCK TABLE {} IN EXCLUSIVE MODE",
        relation_name(oid)
    ))?;
    let table = shell::read_definition(oid)?;
    let placements = tables::placements(oid)?;
    let Some(source) = placements.iter().find(|p| p.node != *node) else {
        return Ok(());
    };
    let target = target_for(node.clone())?;
    remote_xact::run_batches(&[(
        target.clone(),
        shard_creation_batch(&table, &[(source.shard_id, source.shard_index)])?,
    )]);
    let checkout = remote_xact::checkout_begun(&[target_for(source.node.clone())?, target])?;
    // Waits for writes still prepared on the source, so that the copy has every committed row.
    data_move::wait(checkout.conns[0].simple_query_owned(format!(
        "LOCK TABLE {} IN SHARE MODE",
        table.shard_relation(source.shard_id)
    )))?;
    let sink = ShardSink::new(&table, source.shard_id, vec![1]);
    data_move::copy_between_nodes(
        &checkout.conns[0],
        &table.shard_relation(source.shard_id),
        &data_move::column_list(&table),
        &sink,
        &checkout.conns,
    )?;
    checkout.finish();
    tables::insert_placement(
        &Placement {
            node: node.clone(),
            ..source.clone()
        },
        oid,
    )?;
    Ok(())
}

/// Each node once, in first-seen order.
pub fn distinct_nodes<'a>(nodes: impl IntoIterator<Item = &'a NodeAddress>) -> Vec<NodeAddress> {
    let mut distinct: Vec<NodeAddress> = Vec::new();
    for node in nodes {
        if !distinct.contains(node) {
            distinct.push(node.clone());
        }
    }
    distinct
}

/// The participant connections (in the coordinator transaction) for `nodes`, in that order.
pub fn checkout_nodes(nodes: &[NodeAddress]) -> Result<remote_xact::Checkout, DistributionError> {
    let targets = nodes
        .iter()
        .cloned()
        .map(target_for)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(remote_xact::checkout_begun(&targets)?)
}
