//! Foreign keys of distributed and reference tables: which ones the shards can enforce, and the
//! shard DDL that enforces them.
//!
//! A foreign key is enforced by the workers when every referencing row and the row it
//! references live on the same node: each shard's key references the shard of the referenced
//! table on its own node — the co-located shard (same shard index) of a table in the same
//! co-location group when the key pairs the two distribution columns, or the node's copy of a
//! reference table. Then PostgreSQL on the worker checks inserts, and runs the ON DELETE /
//! ON UPDATE actions, inside the distributed transaction. Anything else (a key to a local table,
//! to a table of another group, a reference table referencing a distributed one) is refused
//! with 0A000. The coordinator's empty shells keep the constraint too, so `\d`, pg_dump, DROP
//! and TRUNCATE behave as in PostgreSQL.
//!
//! A local table may reference a distributed or reference table for a while (its foreign key
//! existed before the referenced table was distributed, or was added since): PostgreSQL checks
//! its inserts with a query that pgdist routes to the shards, but the shards' deletes and
//! updates cannot see it, so writes that could break it are refused until the local table is
//! distributed too (`local_reference_blocking`).

use std::collections::HashMap;

use pgrx::prelude::*;

use crate::distribution::shell::{shard_name, with_suffix, Constraint, TableDefinition};
use crate::distribution::DistributionError;
use crate::metadata::tables::{self, DistTable, Method, Placement};
use crate::metadata::{cache, MetadataError};
use crate::remote::quote::quote_qualified;

/// The referencing table as the checks need it (it may not be in the catalog yet).
pub struct Referencing<'a> {
    pub oid: pg_sys::Oid,
    pub name: &'a str,
    pub method: Method,
    pub distribution_attno: Option<i16>,
    /// None: a new co-location group of its own.
    pub colocation_id: Option<i32>,
}

impl<'a> Referencing<'a> {
    pub fn of(table: &DistTable, name: &'a str) -> Self {
        Referencing {
            oid: table.oid,
            name,
            method: table.method,
            distribution_attno: table.distribution_attno(),
            colocation_id: Some(table.colocation_id),
        }
    }
}

fn refuse(constraint: &Constraint, table: &str, why: &str, hint: &str) -> DistributionError {
    DistributionError::ForeignKey {
        constraint: constraint.name.clone(),
        table: table.into(),
        why: why.into(),
        hint: hint.into(),
    }
}

/// Refuses foreign key `constraint` of `referencing` unless the shards can enforce it.
pub fn check(referencing: &Referencing, constraint: &Constraint) -> Result<(), DistributionError> {
    let Some(key) = &constraint.foreign_key else {
        return Ok(());
    };
    let name = referencing.name;
    let referenced_name = crate::distribution::create::relation_name(key.table);
    let referenced = if key.table == referencing.oid {
        None // the table itself
    } else {
        Some(tables::dist_table(key.table)?.ok_or_else(|| {
            refuse(
                constraint,
                name,
                &format!("it references {referenced_name}, a local table of the coordinator"),
                &format!(
                    "Make {referenced_name} a reference table first \
                     (SELECT pgdist.create_reference_table('{referenced_name}')), or distribute \
                     it co-located with {name}."
                ),
            )
        })?)
    };
    let referenced_method = referenced.as_ref().map_or(referencing.method, |t| t.method);
    if referencing.method == Method::Reference {
        return match referenced_method {
            Method::Reference => Ok(()),
            _ => Err(refuse(
                constraint,
                name,
                &format!(
                    "reference table {name} would reference distributed table {referenced_name}"
                ),
                "Every node holds all rows of a reference table but only some shards of a \
                 distributed one: make the referenced table a reference table too, or \
                 distribute the referencing table.",
            )),
        };
    }
    let Some(attno) = referencing.distribution_attno else {
        return Ok(());
    };
    let pairs: Vec<(i16, i16)> = constraint
        .columns
        .iter()
        .copied()
        .zip(key.columns.iter().copied())
        .collect();
    if referenced_method != Method::Reference {
        let (referenced_attno, same_group) = match &referenced {
            None => (Some(attno), true),
            Some(table) => (
                table.distribution_attno(),
                referencing.method == Method::Hash
                    && table.method == Method::Hash
                    && referencing.colocation_id == Some(table.colocation_id),
            ),
        };
        if !same_group {
            return Err(refuse(
                constraint,
                name,
                &format!("{name} and {referenced_name} are not co-located"),
                &format!(
                    "Distribute {name} with colocate_with => '{referenced_name}' (same shard \
                     count and distribution column type), or make {referenced_name} a reference \
                     table."
                ),
            ));
        }
        if !pairs
            .iter()
            .any(|&(a, b)| a == attno && Some(b) == referenced_attno)
        {
            return Err(refuse(
                constraint,
                name,
                "it does not pair the distribution columns of the two tables",
                "The key must include the referencing table's distribution column, referencing \
                 the referenced table's distribution column, so that both rows live on the same \
                 shard.",
            ));
        }
    }
    if pairs.iter().any(|&(a, _)| a == attno) {
        let changes_key = |action: &str| matches!(action, "n" | "d");
        if changes_key(&key.on_delete) || changes_key(&key.on_update) || key.on_update == "c" {
            return Err(refuse(
                constraint,
                name,
                "its ON DELETE / ON UPDATE action would change the distribution column",
                "A changed distribution value would belong on another shard: use NO ACTION, \
                 RESTRICT or ON DELETE CASCADE, or leave the distribution column out of the key.",
            ));
        }
    }
    Ok(())
}

/// The shard relations (by shard index) of the tables the foreign keys of a definition
/// reference: what each shard's key points at.
pub struct Targets(HashMap<pg_sys::Oid, Vec<String>>);

impl Targets {
    pub fn of(table: &TableDefinition) -> Result<Self, MetadataError> {
        let mut targets = HashMap::new();
        for key in table
            .constraints
            .iter()
            .filter_map(|c| c.foreign_key.as_ref())
        {
            if targets.contains_key(&key.table) {
                continue;
            }
            let (schema, name) = crate::executor::schema_and_name(key.table);
            let mut shards: Vec<(i32, String)> = tables::placements(key.table)?
                .into_iter()
                .map(|p| {
                    (
                        p.shard_index,
                        quote_qualified(&schema, &shard_name(&name, p.shard_id)),
                    )
                })
                .collect();
            shards.dedup();
            targets.insert(key.table, shards.into_iter().map(|(_, s)| s).collect());
        }
        Ok(Targets(targets))
    }

    /// `ALTER TABLE … ADD CONSTRAINT … FOREIGN KEY` of shard `shard_id` (index `shard_index`) of
    /// `table`, or None when `constraint` is not a foreign key.
    pub fn shard_sql(
        &self,
        table: &TableDefinition,
        constraint: &Constraint,
        shard_id: i64,
        shard_index: i32,
    ) -> Option<String> {
        let key = constraint.foreign_key.as_ref()?;
        let shards = self.0.get(&key.table)?;
        // A reference table has one shard, which every node holds; a co-located table has the
        // same number of shards, the one of the same index on the same nodes.
        let referenced = match shards.len() {
            1 => shards.first(),
            _ => shards.get(usize::try_from(shard_index).ok()?),
        }?;
        Some(format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {}",
            table.shard_relation(shard_id),
            crate::remote::quote::quote_identifier(&with_suffix(
                &constraint.name,
                &shard_id.to_string()
            )),
            retarget(&constraint.definition, referenced)?
        ))
    }
}

/// `FOREIGN KEY (…) REFERENCES <relation>(…) …` with another referenced relation: the
/// name `pg_get_constraintdef` printed between `REFERENCES ` and the column list is replaced.
fn retarget(definition: &str, relation: &str) -> Option<String> {
    let start = definition.find(" REFERENCES ")? + " REFERENCES ".len();
    let mut quoted = false;
    let end = definition[start..]
        .char_indices()
        .find_map(|(at, c)| match c {
            '"' => {
                quoted = !quoted;
                None
            }
            '(' if !quoted => Some(start + at),
            _ => None,
        })?;
    Some(format!(
        "{}{relation}{}",
        &definition[..start],
        &definition[end..]
    ))
}

/// Adds the foreign keys of `table` to its shard `placements` (nodes in parallel, in the
/// coordinator's transaction): the workers check the rows already there.
pub fn add_to_shards(
    table: &TableDefinition,
    placements: &[Placement],
) -> Result<(), DistributionError> {
    // A partition's copies of its parent's keys come with `PARTITION OF`, as do the clones
    // PostgreSQL keeps for each partition of a referenced partitioned table.
    let keys: Vec<&Constraint> = table
        .constraints
        .iter()
        .filter(|c| c.foreign_key.is_some() && !c.inherited)
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    let targets = Targets::of(table)?;
    crate::distribution::run_on_placements(placements, |placement| {
        keys.iter()
            .filter_map(|c| targets.shard_sql(table, c, placement.shard_id, placement.shard_index))
            .collect()
    })
}

/// Tables other than `oid` itself whose foreign keys reference it, with whether each is a
/// distributed or reference table.
pub fn referencing_tables(oid: pg_sys::Oid) -> Result<Vec<(pg_sys::Oid, bool)>, MetadataError> {
    let referencing = Spi::connect(|client| {
        client
            .select(
                "SELECT DISTINCT conrelid FROM pg_catalog.pg_constraint
                 WHERE confrelid = $1 AND contype = 'f' AND conrelid <> $1",
                None,
                &[oid.into()],
            )?
            .map(|row| Ok(row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid)))
            .collect::<Result<Vec<_>, MetadataError>>()
    })?;
    referencing
        .into_iter()
        .map(|table| Ok((table, tables::dist_table(table)?.is_some())))
        .collect()
}

/// A local table with a foreign key to distributed or reference table `relid` whose referenced
/// columns a write could change: `assigned` are the columns an UPDATE sets (None: the write
/// deletes rows). Found through the key's action triggers on the coordinator's shell.
///
/// # Safety
/// Call inside a transaction, with `relid` locked by the statement being planned.
pub unsafe fn local_reference_blocking(
    relid: pg_sys::Oid,
    assigned: Option<&[i16]>,
) -> Option<String> {
    let mut constraints = Vec::new();
    // SAFETY: the relation is open (the statement locks it) and stays so while we read its
    // trigger descriptor; RelationClose releases our reference.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return None;
        }
        let triggers = (*rel).trigdesc;
        if !triggers.is_null() {
            for i in 0..(*triggers).numtriggers as usize {
                let trigger = &*(*triggers).triggers.add(i);
                let other = trigger.tgconstrrelid;
                if trigger.tgisinternal
                    && other != pg_sys::InvalidOid
                    && other != relid
                    && pg_sys::RI_FKey_trigger_type(trigger.tgfoid) == pg_sys::RI_TRIGGER_PK as i32
                    && cache::lookup(other).is_none()
                {
                    constraints.push((trigger.tgconstraint, other));
                }
            }
        }
        pg_sys::RelationClose(rel);
    }
    for (constraint, table) in constraints {
        let blocks = match assigned {
            None => true,
            Some(assigned) => Spi::get_one_with_args::<Vec<i16>>(
                "SELECT confkey FROM pg_catalog.pg_constraint WHERE oid = $1",
                &[constraint.into()],
            )
            .ok()
            .flatten()
            .is_none_or(|columns| columns.iter().any(|c| assigned.contains(c))),
        };
        if blocks {
            return Some(crate::distribution::create::relation_name(table));
        }
    }
    None
}

/// Loads the placements of the distributed and reference tables that table `relid`'s foreign
/// keys reference or are referenced from, and of its leaf partitions (where a row lands), so that
/// a worker's foreign-key error names them as the coordinator does (`error::coordinator_names`
/// reads only what is loaded).
///
/// # Safety
/// Call inside a transaction, with `relid` locked by the running statement.
pub unsafe fn load_related_placements(relid: pg_sys::Oid) {
    let mut related = Vec::new();
    // SAFETY: as in local_reference_blocking.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return;
        }
        let triggers = (*rel).trigdesc;
        if !triggers.is_null() {
            for i in 0..(*triggers).numtriggers as usize {
                let other = (*(*triggers).triggers.add(i)).tgconstrrelid;
                if other != pg_sys::InvalidOid && !related.contains(&other) {
                    related.push(other);
                }
            }
        }
        pg_sys::RelationClose(rel);
    }
    related.extend(crate::metadata::leaf_partitions(relid));
    for table in related {
        if cache::lookup(table).is_some() {
            cache::placements(table);
        }
    }
}

#[cfg(test)]
mod unit {
    use super::retarget;

    #[test]
    fn the_referenced_relation_is_replaced() {
        assert_eq!(
            retarget(
                "FOREIGN KEY (customer_id) REFERENCES public.customers(id) ON DELETE CASCADE",
                "public.customers_102040"
            )
            .as_deref(),
            Some("FOREIGN KEY (customer_id) REFERENCES public.customers_102040(id) ON DELETE CASCADE")
        );
        assert_eq!(
            retarget(
                "FOREIGN KEY (a, b) REFERENCES \"odd (schema\".\"t(x\"(a, b) NOT VALID",
                "\"odd (schema\".\"t(x_7\""
            )
            .as_deref(),
            Some("FOREIGN KEY (a, b) REFERENCES \"odd (schema\".\"t(x_7\"(a, b) NOT VALID")
        );
        assert_eq!(retarget("CHECK ((a > 0))", "x"), None);
    }
}

/// A table whose row triggers would miss what a write to `relid` changes through foreign-key
/// actions (ON DELETE / ON UPDATE CASCADE, SET NULL, SET DEFAULT), which the shards run where
/// no trigger fires (`executor/triggers.rs`): `deletes` when the write deletes rows, `sets` the
/// columns it updates; followed from table to table.
pub fn cascade_into_row_triggers(
    relid: pg_sys::Oid,
    deletes: bool,
    sets: &[i16],
) -> Option<String> {
    use crate::executor::triggers::{self, Event};
    let mut pending = vec![(relid, deletes, sets.to_vec())];
    let mut seen = std::collections::HashSet::new();
    while let Some((table, deletes, sets)) = pending.pop() {
        // SAFETY: a look at the table's trigger descriptor in the relation cache.
        if !seen.insert((table, deletes, sets.clone())) || unsafe { !is_referenced(table) } {
            continue;
        }
        let keys = Spi::connect(|client| -> Result<Vec<_>, pgrx::spi::Error> {
            client
                .select(
                    "SELECT conrelid, confdeltype::text, confupdtype::text, confkey, conkey
                       FROM pg_catalog.pg_constraint WHERE confrelid = $1 AND contype = 'f'",
                    None,
                    &[table.into()],
                )?
                .map(|row| {
                    Ok((
                        row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                        row.get::<String>(2)?.unwrap_or_default(),
                        row.get::<String>(3)?.unwrap_or_default(),
                        row.get::<Vec<i16>>(4)?.unwrap_or_default(),
                        row.get::<Vec<i16>>(5)?.unwrap_or_default(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
        for (child, on_delete, on_update, referenced, referencing) in keys {
            let mut child_deletes = false;
            let mut child_sets = Vec::new();
            if deletes {
                match on_delete.as_str() {
                    "c" => child_deletes = true,
                    "n" | "d" => child_sets.extend(&referencing),
                    _ => {}
                }
            }
            let key_changes = referenced.iter().any(|c| sets.contains(c));
            if key_changes && matches!(on_update.as_str(), "c" | "n" | "d") {
                child_sets.extend(&referencing);
            }
            // SAFETY: a look at the child's trigger descriptor in the relation cache.
            let fires = |event| unsafe { triggers::find(child, event) }.rows;
            if (child_deletes && fires(Event::Delete))
                || (!child_sets.is_empty() && fires(Event::Update))
            {
                return Some(crate::distribution::create::relation_name(child));
            }
            if child_deletes || !child_sets.is_empty() {
                pending.push((child, child_deletes, child_sets));
            }
        }
    }
    None
}

/// True when a foreign key references `relid` (its shell has the key's action triggers): cheap,
/// from the relation cache.
unsafe fn is_referenced(relid: pg_sys::Oid) -> bool {
    // SAFETY: the descriptor is read while we hold our reference to the relation.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return false;
        }
        let triggers = (*rel).trigdesc;
        let referenced = !triggers.is_null()
            && (0..(*triggers).numtriggers as usize).any(|i| {
                let trigger = &*(*triggers).triggers.add(i);
                trigger.tgisinternal
                    && pg_sys::RI_FKey_trigger_type(trigger.tgfoid) == pg_sys::RI_TRIGGER_PK as i32
            });
        pg_sys::RelationClose(rel);
        referenced
    }
}
