//! Names of the indexes and constraints a partition's shards inherit from their parent's shards.
//!
//! Shard DDL addresses an index or constraint by its coordinator name with the shard's suffix
//! (`orders_2024_pkey` on shard 102040 is `orders_2024_pkey_102040`). PostgreSQL names the
//! index a new partition gets for its parent's index after the partition: on the coordinator
//! `orders_2024_pkey`, on the shard `orders_2024_102040_pkey`. So once a partition's shards
//! have their parent's indexes, pgdist renames them to the names DDL expects. Inherited CHECK
//! and foreign-key constraints keep the parent shard's name while attached (PostgreSQL forbids
//! renaming them, and so does not need the name); at DETACH they become the partition's own
//! and are renamed then.

use pgrx::prelude::*;

use crate::distribution::shell::with_suffix;
use crate::distribution::{run_on_placements, DistributionError};
use crate::metadata::tables::{self, DistTable, Placement};
use crate::remote::quote::{quote_identifier, quote_literal, quote_qualified};

/// The indexes of partition `oid` that belong to an index of its parent, as (parent's index,
/// partition's index) names on the coordinator.
pub fn inherited_indexes(oid: pg_sys::Oid) -> Result<Vec<(String, String)>, DistributionError> {
    Ok(Spi::connect(|client| {
        client
            .select(
                "SELECT p.relname::text, c.relname::text
                 FROM pg_catalog.pg_index x
                 JOIN pg_catalog.pg_class c ON c.oid = x.indexrelid
                 JOIN pg_catalog.pg_inherits h ON h.inhrelid = x.indexrelid
                 JOIN pg_catalog.pg_class p ON p.oid = h.inhparent
                 WHERE x.indrelid = $1 ORDER BY c.oid",
                None,
                &[oid.into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })?)
}

/// A statement for the node of shard `shard` (qualified relation, id `shard_id`) that renames
/// the indexes it has for the indexes of its parent's shard `parent_shard_id` (whose indexes live
/// in `parent_schema`) after `indexes` ([`inherited_indexes`]); None when there are none.
pub fn rename_inherited_indexes(
    shard: &str,
    shard_id: i64,
    parent_schema: &str,
    parent_shard_id: i64,
    indexes: &[(String, String)],
) -> Option<String> {
    if indexes.is_empty() {
        return None;
    }
    let pairs: Vec<String> = indexes
        .iter()
        .map(|(parent, index)| {
            let parent = quote_qualified(
                parent_schema,
                &with_suffix(parent, &parent_shard_id.to_string()),
            );
            format!(
                "({}, {})",
                quote_literal(&parent),
                quote_literal(&with_suffix(index, &shard_id.to_string()))
            )
        })
        .collect();
    Some(format!(
        "DO $pgdist$ DECLARE r record; BEGIN
         FOR r IN SELECT h.inhrelid::regclass AS index, c.relname AS name, v.target
           FROM (VALUES {}) AS v(parent, target)
           JOIN pg_catalog.pg_inherits h ON h.inhparent = pg_catalog.to_regclass(v.parent)
           JOIN pg_catalog.pg_index x ON x.indexrelid = h.inhrelid AND x.indrelid = {}::regclass
           JOIN pg_catalog.pg_class c ON c.oid = h.inhrelid
         LOOP
           IF r.name <> r.target THEN
             EXECUTE pg_catalog.format('ALTER INDEX %s RENAME TO %I', r.index, r.target);
           END IF;
         END LOOP; END $pgdist$",
        pairs.join(", "),
        quote_literal(shard)
    ))
}

/// Renames the inherited indexes on the shards of every distributed partition under `oid`
/// (and of `oid` itself when it is a partition), after DDL that may have given them new ones:
/// an index or key added to a partitioned table, a partition attached.
pub fn align_index_names(oid: pg_sys::Oid) -> Result<(), DistributionError> {
    let mut partitions = vec![oid];
    partitions.extend(tables::distributed_partitions(oid)?);
    for partition in partitions {
        let Some(parent) = parent_of(partition)? else {
            continue;
        };
        let indexes = inherited_indexes(partition)?;
        if indexes.is_empty() {
            continue;
        }
        let (parent_schema, _) = crate::executor::schema_and_name(parent);
        let (schema, name) = crate::executor::schema_and_name(partition);
        let parent_placements = tables::placements(parent)?;
        run_on_placements(&tables::placements(partition)?, |placement| {
            same_index(&parent_placements, placement)
                .and_then(|parent_shard_id| {
                    rename_inherited_indexes(
                        &shard_relation(&schema, &name, placement.shard_id),
                        placement.shard_id,
                        &parent_schema,
                        parent_shard_id,
                        &indexes,
                    )
                })
                .into_iter()
                .collect()
        })?;
    }
    Ok(())
}

/// After `partition` was detached from `parent`: its shards' CHECK and foreign-key constraints
/// that it had inherited, still named after the shard of the table that defined them, take the
/// partition's own shard names (a later `DROP CONSTRAINT` finds them).
pub fn rename_detached_constraints(
    parent: &DistTable,
    partition: &DistTable,
) -> Result<(), DistributionError> {
    // Each constraint that an ancestor has too, with the furthest such ancestor (the one that
    // defined it: inheritance keeps the name).
    let inherited: Vec<(String, pg_sys::Oid)> = Spi::connect(|client| {
        client
            .select(
                "SELECT k.conname::text,
                        (SELECT a.relid FROM pg_catalog.pg_partition_ancestors($2) WITH ORDINALITY AS a(relid, n)
                         JOIN pg_catalog.pg_constraint o ON o.conrelid = a.relid AND o.conname = k.conname
                         ORDER BY a.n DESC LIMIT 1)
                 FROM pg_catalog.pg_constraint k
                 WHERE k.conrelid = $1 AND k.contype IN ('c', 'f')",
                None,
                &[partition.oid.into(), parent.oid.into()],
            )?
            .filter_map(|row| {
                let name = row.get::<String>(1).ok().flatten()?;
                let origin = row.get::<pg_sys::Oid>(2).ok().flatten()?;
                Some(Ok((name, origin)))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })?;
    if inherited.is_empty() {
        return Ok(());
    }
    let (schema, name) = crate::executor::schema_and_name(partition.oid);
    let mut origins = Vec::new();
    for (_, origin) in &inherited {
        origins.push(tables::placements(*origin)?);
    }
    run_on_placements(&tables::placements(partition.oid)?, |placement| {
        let shard = shard_relation(&schema, &name, placement.shard_id);
        inherited
            .iter()
            .zip(&origins)
            .filter_map(|((constraint, _), origin)| {
                let origin_shard_id = same_index(origin, placement)?;
                let old = with_suffix(constraint, &origin_shard_id.to_string());
                let new = with_suffix(constraint, &placement.shard_id.to_string());
                Some(rename_constraint(&shard, &old, &new))
            })
            .collect()
    })
}

/// Renames constraint `old` of `shard` to `new`; drops it when the shard has `new` already (a
/// constraint the partition had of its own as well as inherited, one on the coordinator).
fn rename_constraint(shard: &str, old: &str, new: &str) -> String {
    let exists = |name: &str| {
        format!(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_constraint WHERE conrelid = {}::regclass AND conname = {})",
            quote_literal(shard),
            quote_literal(name)
        )
    };
    let (old_name, new_name) = (quote_identifier(old), quote_identifier(new));
    format!(
        "DO $pgdist$ BEGIN
         IF {} THEN
           IF {} THEN ALTER TABLE {shard} DROP CONSTRAINT {old_name};
           ELSE ALTER TABLE {shard} RENAME CONSTRAINT {old_name} TO {new_name};
           END IF;
         END IF; END $pgdist$",
        exists(old),
        exists(new),
    )
}

/// The id of the shard in `placements` with the index of `placement`.
fn same_index(placements: &[Placement], placement: &Placement) -> Option<i64> {
    placements
        .iter()
        .find(|p| p.shard_index == placement.shard_index)
        .map(|p| p.shard_id)
}

fn shard_relation(schema: &str, name: &str, shard_id: i64) -> String {
    quote_qualified(
        schema,
        &crate::distribution::shell::shard_name(name, shard_id),
    )
}

/// The partitioned table `oid` is a partition of, when that is distributed.
fn parent_of(oid: pg_sys::Oid) -> Result<Option<pg_sys::Oid>, DistributionError> {
    let parent = Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT (SELECT h.inhparent FROM pg_catalog.pg_inherits h
                 JOIN pgdist.dist_table d ON d.table_oid = h.inhparent
                 JOIN pg_catalog.pg_class c ON c.oid = h.inhrelid
                 WHERE h.inhrelid = $1 AND c.relispartition)",
        &[oid.into()],
    )?;
    Ok(parent)
}
