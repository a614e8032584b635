//! `INSERT … ON CONFLICT DO UPDATE` into a table with row triggers, one row at a time.
//!
//! A shard's own upsert gives the coordinator no say between finding the conflicting row and
//! updating it, where PostgreSQL fires the BEFORE UPDATE triggers. So the coordinator does what
//! PostgreSQL's speculative insertion does, in round trips: (1) every placement of a shard (the
//! first one first, then a reference table's copies) locks and returns the existing rows its
//! proposed rows conflict with — `SELECT … FROM <shard> JOIN (VALUES
//! <proposed rows>) AS excluded ON <conflict columns equal> FOR UPDATE` (`ModifyPlan::
//! upsert_source`), with the SET values and the DO UPDATE WHERE computed there; (2) a row with
//! a conflicting row is updated by ctid and tableoid after the BEFORE UPDATE triggers (unless
//! the WHERE says no), a row without is inserted with `ON CONFLICT DO NOTHING`; (3) a row whose
//! insert met a conflict after all (a concurrent insert, or a row this statement wrote) goes back
//! to (1). The first placement's rows decide; a copy updates its own copy of the row by its own
//! ctid, or inserts with `ON CONFLICT DO NOTHING` as well (its writes follow the first
//! placement's row locks, so it meets the same conflicts). A row that would change a row this statement already inserted or updated fails with
//! PostgreSQL's error (21000). The BEFORE INSERT triggers ran when the row was proposed; the
//! AFTER INSERT / UPDATE triggers are queued in the order the rows were written.

use std::collections::{BTreeMap, HashMap, HashSet};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::distribution::shell::with_suffix;
use crate::executor::fragments::{FragmentSql, TextRow};
use crate::executor::modify::ModifyRuntime;
use crate::executor::row_by_row::{
    assignments, live_columns, refuse_moved_row, slot_text, with_set_values,
};
use crate::executor::shard_writer::{run_statements, run_statements_all_rows, RowInput};
use crate::executor::triggers::Event;
use crate::metadata::cache;
use crate::planner::modify_pushdown::ROW_TAG_SQL;
use crate::planner::shippable::RELATION_BASE;
use crate::remote::quote::{quote_identifier, quote_literal, quote_qualified, replace_dollar_refs};
use crate::remote::NodeAddress;

/// How often a row may meet a conflict it could not then find before the statement gives up.
const MAX_ATTEMPTS: u32 = 5;

/// A row proposed for insertion (after the BEFORE INSERT triggers), with its shard.
pub(crate) struct Proposed {
    pub shard_id: i64,
    pub row: TextRow,
}

/// An existing row a proposed row conflicts with, locked.
struct Conflict {
    /// Its ctid in table (or partition) `tableoid` of the shard.
    ctid: String,
    tableoid: String,
    old: TextRow,
    set: TextRow,
    /// The DO UPDATE WHERE held.
    update: bool,
}

/// What happened to a proposed row, for the AFTER triggers.
enum Written {
    Inserted(TextRow),
    Updated { old: TextRow, new: TextRow },
}

/// Writes the proposed rows; the rows written and RETURNING's rows.
pub(crate) unsafe fn upsert(
    node: *mut pg_sys::CustomScanState,
    runtime: &ModifyRuntime,
    proposed: Vec<Proposed>,
    upsert_source: &str,
    conflict_target: &str,
) -> (u64, Vec<TextRow>) {
    // SAFETY: slots have the result relation's layout; rows are converted with its types.
    unsafe {
        let plan = &runtime.plan;
        let relation = (*node).ss.ss_currentRelation;
        let tupdesc = (*relation).rd_att;
        let columns = live_columns(tupdesc);
        let table = crate::distribution::create::relation_name(plan.relid);
        // Each shard's placements, the first one's first.
        let mut nodes: HashMap<i64, Vec<NodeAddress>> = HashMap::new();
        for placement in cache::placements(plan.relid).iter() {
            nodes
                .entry(placement.shard_id)
                .or_default()
                .push(placement.node.clone());
        }
        let (schema, name) = crate::executor::schema_and_name(plan.relid);
        let shard_name =
            |shard_id: i64| quote_qualified(&schema, &with_suffix(&name, &shard_id.to_string()));
        let casts: Vec<&str> = columns.iter().map(|c| c.type_name.as_str()).collect();
        let literal = |value: &Option<String>, cast: &str| match value {
            Some(text) => format!("{}::{cast}", quote_literal(text)),
            None => format!("NULL::{cast}"),
        };
        let stored: Vec<usize> = (0..columns.len())
            .filter(|i| !columns[*i].generated)
            .collect();
        let stored_names = stored
            .iter()
            .map(|i| quote_identifier(&columns[*i].name))
            .collect::<Vec<_>>()
            .join(", ");
        let all_names = columns
            .iter()
            .map(|c| quote_identifier(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let alias = if plan.alias.is_empty() {
            String::new()
        } else {
            format!(" AS {}", plan.alias)
        };
        let distribution = cache::lookup(plan.relid)
            .and_then(|t| t.distribution_attno())
            .and_then(|attno| columns.iter().position(|c| c.attno == attno));
        let triggers = runtime.triggers.as_ref();
        let estate = (*node).ss.ps.state;
        let old_slot = pg_sys::ExecInitExtraTupleSlot(estate, tupdesc, &pg_sys::TTSOpsVirtual);
        let new_slot = pg_sys::ExecInitExtraTupleSlot(estate, tupdesc, &pg_sys::TTSOpsVirtual);
        let mut input = RowInput::new(tupdesc);
        let econtext = (*node).ss.ps.ps_ExprContext;

        let shards: Vec<i64> = proposed.iter().map(|p| p.shard_id).collect();
        let written_nodes: HashSet<i32> = shards
            .iter()
            .filter_map(|s| nodes.get(s))
            .flatten()
            .map(|n| n.node_id)
            .collect();
        crate::executor::write_locks::lock_for_multi_node_write(shards, written_nodes.len());
        let mut pending: Vec<usize> = (0..proposed.len()).collect();
        let mut attempts = vec![0u32; proposed.len()];
        // (shard, ctid, tableoid) of the rows written.
        let mut touched: HashSet<(i64, String, String)> = HashSet::new();
        let mut written: Vec<Written> = Vec::new();
        let mut count = 0;
        while !pending.is_empty() {
            // (1) Lock the rows the pending rows conflict with.
            let mut per_shard: BTreeMap<i64, Vec<String>> = BTreeMap::new();
            for &n in &pending {
                let row = &proposed[n];
                let values: Vec<String> = row
                    .row
                    .iter()
                    .zip(&casts)
                    .map(|(v, cast)| literal(v, cast))
                    .collect();
                per_shard
                    .entry(row.shard_id)
                    .or_default()
                    .push(format!("({n}, {})", values.join(", ")));
            }
            let mut work: BTreeMap<i32, (NodeAddress, Vec<(FragmentSql, bool)>)> = BTreeMap::new();
            for (shard_id, rows) in &per_shard {
                let at = upsert_source.rfind("{rows}").unwrap_or(upsert_source.len());
                let mut sql = upsert_source.to_string();
                sql.replace_range(at..(at + "{rows}".len()).min(sql.len()), &rows.join(", "));
                let sql = replace_dollar_refs(&sql, |id| {
                    (id == RELATION_BASE).then(|| shard_name(*shard_id))
                });
                // Every copy of the shard locks its rows (the first placement's first), tagged
                // with its node.
                for (i, address) in nodes.get(shard_id).into_iter().flatten().enumerate() {
                    let tag = quote_literal(&address.node_id.to_string());
                    let sql = sql.replacen(ROW_TAG_SQL, &tag, 1);
                    work.entry(address.node_id)
                        .or_insert_with(|| (address.clone(), Vec::new()))
                        .1
                        .push((FragmentSql::plain(sql), i == 0));
                }
            }
            let locked = run_statements_all_rows(work.into_values().collect());
            let width = columns.len();
            let sets = plan.set_attnos.len();
            let mut conflicts: HashMap<usize, Conflict> = HashMap::new();
            // (proposed row, node) → (ctid, tableoid) of the conflicting row in a copy.
            let mut in_copies: HashMap<(usize, i32), (String, String)> = HashMap::new();
            let mut seen: HashSet<(i64, String, String)> = HashSet::new();
            for mut row in locked {
                // tag, ctid, tableoid, columns, pgdist_n, SET values, WHERE
                if row.len() != 3 + width + 1 + sets + 1 {
                    continue;
                }
                let node_id: i32 = row[0].as_deref().and_then(|t| t.parse().ok()).unwrap_or(0);
                let update = row.pop().flatten().as_deref() == Some("t");
                let set = row.split_off(3 + width + 1);
                let n: usize = row
                    .pop()
                    .flatten()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(usize::MAX);
                let old = row.split_off(3);
                let tableoid = row.pop().flatten().unwrap_or_default();
                let ctid = row.pop().flatten().unwrap_or_default();
                let shard_id = proposed.get(n).map_or(0, |p| p.shard_id);
                let first = nodes.get(&shard_id).and_then(|n| n.first());
                if first.is_some_and(|address| address.node_id != node_id) {
                    in_copies.insert((n, node_id), (ctid, tableoid));
                    continue;
                }
                let key = (shard_id, ctid.clone(), tableoid.clone());
                if touched.contains(&key) || !seen.insert(key) {
                    affect_twice();
                }
                conflicts.insert(
                    n,
                    Conflict {
                        ctid,
                        tableoid,
                        old,
                        set,
                        update,
                    },
                );
            }
            // (2) Update the rows with a conflict, insert the others.
            let mut statements: BTreeMap<i32, (NodeAddress, Vec<(FragmentSql, bool)>)> =
                BTreeMap::new();
            let mut updates: HashMap<usize, TextRow> = HashMap::new();
            let mut inserts = Vec::new();
            for &n in &pending {
                let row = &proposed[n];
                let Some((address, copies)) =
                    nodes.get(&row.shard_id).and_then(|n| n.split_first())
                else {
                    continue;
                };
                let shard = shard_name(row.shard_id);
                // The statement for the first placement, and for the copies.
                let (sql, copy_sql) = match conflicts.get(&n) {
                    Some(conflict) if !conflict.update => continue,
                    Some(conflict) => {
                        let mut new = with_set_values(
                            &conflict.old,
                            &columns,
                            &plan.set_attnos,
                            &conflict.set,
                        );
                        if let Some(triggers) = triggers {
                            let old_context =
                                pg_sys::MemoryContextSwitchTo((*econtext).ecxt_per_tuple_memory);
                            input.store(&conflict.old, old_slot);
                            let old_tuple = pg_sys::ExecCopySlotHeapTuple(old_slot);
                            input.store(&new, new_slot);
                            let keep = triggers.before_row_of(Event::Update, old_tuple, new_slot);
                            if keep {
                                new = slot_text(new_slot, &columns);
                            }
                            pg_sys::MemoryContextSwitchTo(old_context);
                            pg_sys::MemoryContextReset((*econtext).ecxt_per_tuple_memory);
                            if !keep {
                                continue;
                            }
                        }
                        refuse_moved_row(plan.relid, &columns, distribution, &conflict.old, &new);
                        let assignments =
                            assignments(&columns, &plan.set_attnos, &conflict.old, &new);
                        updates.insert(n, conflict.old.clone());
                        let update = |ctid: &str, tableoid: &str| {
                            format!(
                                "UPDATE {shard} SET {assignments} WHERE ctid = {} AND tableoid = {}",
                                quote_literal(ctid),
                                quote_literal(tableoid)
                            )
                        };
                        let copy_sql = |node_id: i32| match in_copies.get(&(n, node_id)) {
                            Some((ctid, tableoid)) => update(ctid, tableoid),
                            None => pgrx::error!(
                                "pgdist: the placements of shard {} hold different rows",
                                row.shard_id
                            ),
                        };
                        let copy_sql: Vec<String> =
                            copies.iter().map(|c| copy_sql(c.node_id)).collect();
                        let sql = format!(
                            "{} RETURNING '{n}', ctid, tableoid, {all_names}",
                            update(&conflict.ctid, &conflict.tableoid)
                        );
                        (sql, copy_sql)
                    }
                    None => {
                        let values: Vec<String> = stored
                            .iter()
                            .map(|i| literal(&row.row[*i], &casts[*i]))
                            .collect();
                        let target = conflict_target.replace(
                            "{constraint}",
                            &quote_identifier(&with_suffix(
                                &plan.conflict_constraint,
                                &row.shard_id.to_string(),
                            )),
                        );
                        inserts.push(n);
                        // A copy meets a conflict exactly when the first placement does: their
                        // writes are ordered by the first placement's row locks.
                        let insert = format!(
                            "INSERT INTO {shard}{alias} ({stored_names}) OVERRIDING SYSTEM VALUE \
                             VALUES ({}) ON CONFLICT {target} DO NOTHING",
                            values.join(", ")
                        );
                        let sql = format!("{insert} RETURNING '{n}', ctid, tableoid, {all_names}");
                        (sql, vec![insert; copies.len()])
                    }
                };
                let statements_of = [(address, sql)]
                    .into_iter()
                    .chain(copies.iter().zip(copy_sql));
                for (i, (address, sql)) in statements_of.enumerate() {
                    statements
                        .entry(address.node_id)
                        .or_insert_with(|| (address.clone(), Vec::new()))
                        .1
                        .push((FragmentSql::plain(sql), i == 0));
                }
            }
            let (done, rows) = run_statements(statements.into_values().collect());
            count += done;
            let mut stored_rows: HashMap<usize, TextRow> = HashMap::new();
            for mut row in rows {
                let n: usize = row
                    .first()
                    .cloned()
                    .flatten()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(usize::MAX);
                let Some(proposal) = proposed.get(n) else {
                    continue;
                };
                let stored = row.split_off(3.min(row.len()));
                let tableoid = row.pop().flatten().unwrap_or_default();
                let ctid = row.pop().flatten().unwrap_or_default();
                touched.insert((proposal.shard_id, ctid, tableoid));
                stored_rows.insert(n, stored);
            }
            // (3) Rows whose insert met a conflict try again.
            let mut again = Vec::new();
            for &n in &pending {
                match (stored_rows.remove(&n), updates.remove(&n)) {
                    (Some(new), Some(old)) => written.push(Written::Updated { old, new }),
                    (Some(new), None) => written.push(Written::Inserted(new)),
                    (None, _) if inserts.contains(&n) => {
                        attempts[n] += 1;
                        if attempts[n] > MAX_ATTEMPTS {
                            pgrx::error!(
                                "pgdist: a row of the ON CONFLICT DO UPDATE into {table} kept \
                                 conflicting with a row it could not find"
                            );
                        }
                        again.push(n);
                    }
                    (None, _) => {}
                }
            }
            pending = again;
        }
        let mut returned = Vec::new();
        for write in written {
            let old_context = pg_sys::MemoryContextSwitchTo((*econtext).ecxt_per_tuple_memory);
            let new = match &write {
                Written::Inserted(new) | Written::Updated { new, .. } => new,
            };
            if let Some(triggers) = triggers {
                input.store(new, new_slot);
                match &write {
                    Written::Inserted(_) => {
                        triggers.after_row_of(Event::Insert, std::ptr::null_mut(), new_slot)
                    }
                    Written::Updated { old, .. } => {
                        input.store(old, old_slot);
                        let old_tuple = pg_sys::ExecCopySlotHeapTuple(old_slot);
                        triggers.after_row_of(Event::Update, old_tuple, new_slot)
                    }
                }
            }
            pg_sys::MemoryContextSwitchTo(old_context);
            pg_sys::MemoryContextReset((*econtext).ecxt_per_tuple_memory);
            if plan.returning {
                returned.push(new.clone());
            }
        }
        pg_sys::ExecClearTuple(old_slot);
        pg_sys::ExecClearTuple(new_slot);
        (count, returned)
    }
}

/// PostgreSQL's error for a row changed twice by one `ON CONFLICT DO UPDATE`.
fn affect_twice() -> ! {
    pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_CARDINALITY_VIOLATION,
        "ON CONFLICT DO UPDATE command cannot affect row a second time",
        "pgdist",
    )
    .set_hint(
        "Ensure that no rows proposed for insertion within the same command have duplicate \
         constrained values.",
    )
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}
