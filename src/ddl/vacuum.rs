//! VACUUM and ANALYZE of distributed and reference tables reach their shards.
//!
//! PostgreSQL vacuums (or analyzes) the coordinator's empty shell as usual; then every shard
//! placement gets the same command with the same options and columns, nodes in parallel:
//! VACUUM over a connection of its own per node, outside any transaction as it requires;
//! ANALYZE too, unless it runs in a transaction block, whose remote transactions it then joins
//! (the block may have created the shards). A table the user may not vacuum (not its owner,
//! nor the database's, nor a superuser) is skipped, as PostgreSQL skips it with a warning. A
//! VACUUM or ANALYZE outside a transaction block also refreshes the row estimates the
//! coordinator plans with. One without a table list stays on the coordinator: the workers'
//! autovacuum looks after their shards.

use std::collections::BTreeMap;
use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::PgList;

use crate::cluster::target_for;
use crate::distribution::DistributionError;
use crate::metadata::tables::{self, DistTable};
use crate::remote::quote::quote_identifier;
use crate::remote::NodeAddress;
use crate::transaction::remote_xact;

/// What the shards run after the coordinator's VACUUM / ANALYZE.
pub struct ShardVacuum {
    /// `VACUUM (…)` or `ANALYZE (…)`, options included.
    command: String,
    /// Each table with its column list (`(a, b)` or empty).
    tables: Vec<(DistTable, String)>,
    /// VACUUM (with or without ANALYZE), or ANALYZE alone.
    vacuum: bool,
    analyze: bool,
}

/// The shard work of VACUUM / ANALYZE statement `stmt` run by `user`, when it names
/// distributed tables.
///
/// # Safety
/// `stmt` must be the VacuumStmt being run.
pub unsafe fn plan(stmt: *mut pg_sys::VacuumStmt, user: pg_sys::Oid) -> Option<ShardVacuum> {
    // SAFETY: the statement's parse tree; casts follow node tags, defGetString copies values.
    unsafe {
        let mut tables = Vec::new();
        for relation in PgList::<pg_sys::VacuumRelation>::from_pg((*stmt).rels).iter_ptr() {
            if (*relation).relation.is_null() {
                continue;
            }
            let Ok(Some(table)) = super::distributed((*relation).relation) else {
                continue;
            };
            if !may_vacuum(table.oid, user) {
                continue;
            }
            let columns: Vec<String> = PgList::<pg_sys::String>::from_pg((*relation).va_cols)
                .iter_ptr()
                .map(|name| quote_identifier(&CStr::from_ptr((*name).sval).to_string_lossy()))
                .collect();
            let columns = match columns.is_empty() {
                true => String::new(),
                false => format!(" ({})", columns.join(", ")),
            };
            tables.push((table, columns));
        }
        if tables.is_empty() {
            return None;
        }
        let mut analyze = !(*stmt).is_vacuumcmd;
        let mut options = Vec::new();
        for option in PgList::<pg_sys::DefElem>::from_pg((*stmt).options).iter_ptr() {
            let name = CStr::from_ptr((*option).defname)
                .to_string_lossy()
                .into_owned();
            if name == "analyze" {
                analyze = (*option).arg.is_null() || pg_sys::defGetBoolean(option);
            }
            let option_name = quote_identifier(&name);
            options.push(match (*option).arg.is_null() {
                true => option_name,
                false => {
                    let value = CStr::from_ptr(pg_sys::defGetString(option)).to_string_lossy();
                    // Numbers stay numbers (PARALLEL takes only an integer), words are quoted.
                    match (*(*option).arg).type_ {
                        pg_sys::NodeTag::T_Integer | pg_sys::NodeTag::T_Float => {
                            format!("{option_name} {value}")
                        }
                        _ => format!(
                            "{option_name} {}",
                            crate::remote::quote::quote_literal(&value)
                        ),
                    }
                }
            });
        }
        let verb = if (*stmt).is_vacuumcmd {
            "VACUUM"
        } else {
            "ANALYZE"
        };
        let command = match options.is_empty() {
            true => verb.to_string(),
            false => format!("{verb} ({})", options.join(", ")),
        };
        Some(ShardVacuum {
            command,
            tables,
            vacuum: (*stmt).is_vacuumcmd,
            analyze,
        })
    }
}

/// `user` may vacuum table `oid`: its owner, the database's owner or a superuser.
fn may_vacuum(oid: pg_sys::Oid, user: pg_sys::Oid) -> bool {
    // SAFETY: plain catalog checks of a role's rights.
    unsafe {
        pg_sys::superuser_arg(user)
            || pg_sys::pg_class_ownercheck(oid, user)
            || pg_sys::pg_database_ownercheck(pg_sys::MyDatabaseId, user)
    }
}

/// Runs the shards' VACUUM / ANALYZE; NOTICEs say how many shards each node did.
pub fn run(work: ShardVacuum) -> Result<(), DistributionError> {
    let mut per_node: BTreeMap<i32, (NodeAddress, Vec<String>)> = BTreeMap::new();
    for (table, columns) in &work.tables {
        let definition = crate::distribution::shell::read_definition(table.oid)?;
        for placement in tables::placements(table.oid)? {
            per_node
                .entry(placement.node.node_id)
                .or_insert_with(|| (placement.node.clone(), Vec::new()))
                .1
                .push(format!(
                    "{} {}{columns}",
                    work.command,
                    definition.shard_relation(placement.shard_id)
                ));
        }
    }
    // SAFETY: a plain read of the transaction state.
    let in_block = unsafe { pg_sys::IsTransactionBlock() };
    let done: Vec<(NodeAddress, usize)> = match work.vacuum || !in_block {
        // VACUUM refuses transaction blocks, so PostgreSQL ran it outside any: each shard's
        // runs on its own too, as does a lone ANALYZE.
        true => super::run_outside_transactions(per_node)?.map_err(DistributionError::Remote)?,
        // ANALYZE in a transaction block joins it (which may have created the shards).
        false => {
            let counts = per_node
                .values()
                .map(|(node, statements)| (node.clone(), statements.len()))
                .collect();
            let batches = per_node
                .into_values()
                .map(|(node, statements)| Ok((target_for(node)?, statements.join(";\n"))))
                .collect::<Result<Vec<_>, DistributionError>>()?;
            remote_xact::run_batches(&batches);
            counts
        }
    };
    for (node, shards) in done {
        pgrx::notice!("pgdist: {} ran on {shards} shards of {node}", work.command);
    }
    // The new counts are visible to the nodes' other sessions once committed: now, unless the
    // ANALYZE ran in a transaction block (then the maintenance daemon's next round).
    if work.analyze && (work.vacuum || !in_block) {
        crate::distribution::statistics::refresh_row_estimates()?;
    }
    Ok(())
}
