//! UPDATE, DELETE and MERGE of a table with row triggers, row by row.
//!
//! A trigger may change the new row or skip it before it is written, and needs the old row
//! afterwards; a shard's `UPDATE … WHERE …` gives the coordinator no say in between. So the
//! write runs in two round trips. First every placement of each shard left after pruning locks
//! and returns its rows — `SELECT <tag>, ctid, tableoid, <columns>, <new values> FROM <shard>
//! [, <the statement's other tables>] WHERE … FOR [NO KEY] UPDATE OF <shard>`, the rows the
//! UPDATE would change, rechecked against concurrent writes as UPDATE rechecks them (a row a join
//! returns twice is changed once, as UPDATE … FROM changes it). Then the coordinator fires the
//! BEFORE ROW triggers on the rows of the first placement, tests the check options, and sends
//! every placement one statement that changes its rows by ctid and tableoid (the copies of a
//! shard hold the same rows, paired by content, so a placement's ctid names its copy of the row;
//! the tableoid tells the partitions of a partitioned shard apart). The shards
//! return the rows as stored (generated columns computed), which go to the AFTER ROW triggers
//! and RETURNING. A MERGE's statement returns, with each row, the action it takes, and the rows
//! it inserts without a ctid (`merge_plan::row_source`); those are inserted one by one.

use std::collections::BTreeMap;

use pgrx::pg_sys;

use crate::distribution::shell::with_suffix;
use crate::executor::fragments::{FragmentSql, TextRow};
use crate::executor::modify::{
    check_new_row, compute_generated_columns, has_checks, ModifyRuntime,
};
use crate::executor::scan::BroadcastRows;
use crate::executor::shard_writer::WriteError;
use crate::executor::shard_writer::{run_statements, run_statements_all_rows, RowInput};
use crate::executor::triggers::{Event, UpdateOutcome};
use crate::executor::write_locks;
use crate::metadata::cache;
use crate::planner::modify_plan::{has_generated_columns, ModifyKind};
use crate::planner::PlannerError;
use crate::remote::quote::{quote_identifier, quote_literal, quote_qualified};
use crate::remote::NodeAddress;

/// What the first column of a locked row says: its shard, its node and whether that node
/// holds the shard's first placement.
pub fn tag(shard_id: i64, node_id: i32, primary: bool) -> String {
    format!("{shard_id} {node_id} {}", u8::from(primary))
}

fn parse_tag(tag: &str) -> Option<(i64, i32, bool)> {
    let mut parts = tag.split(' ');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()? == "1",
    ))
}

/// Where a placement keeps its copy of a row: the ctid, in the table (or, in a partitioned
/// shard, the partition) `tableoid` — a ctid alone names a row in every partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RowId {
    ctid: String,
    tableoid: String,
}

/// One placement's copy of a row, locked.
struct Locked {
    id: RowId,
    /// The row's columns (every column that is not dropped).
    old: TextRow,
    /// The values of the SET columns (UPDATE).
    set: TextRow,
    /// The other tables' columns that RETURNING reads.
    extra: TextRow,
}

/// What a row's change writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    Update,
    Delete,
    /// An UPDATE moved the row to a partition whose INSERT triggers skipped it: it is deleted,
    /// and not counted.
    MovedAway,
    /// A MERGE inserts the row (`Change::old` holds it as proposed).
    Insert,
}

/// What MERGE action `extra` (the action index `row_source` returned) names in `actions`
/// (`ModifyPlan::merge_actions`); None: nothing.
fn merge_action(actions: &str, extra: &TextRow) -> Option<Write> {
    let index: usize = extra.first()?.as_deref()?.parse().ok()?;
    match actions.chars().nth(index)? {
        'u' => Some(Write::Update),
        'd' => Some(Write::Delete),
        'i' => Some(Write::Insert),
        _ => None,
    }
}

/// A row as the triggers let it through, with the change for each of its copies.
struct Change {
    old: TextRow,
    /// UPDATE: the new row before the shards store it.
    new: TextRow,
    /// What is written.
    write: Write,
    /// (node, row) of each copy, the first placement's first.
    copies: Vec<(i32, RowId)>,
    shard_id: i64,
    /// The other tables' columns that RETURNING reads.
    extra: TextRow,
}

/// Runs the UPDATE, DELETE or MERGE of `node` row by row; the rows written and RETURNING's
/// rows.
pub(crate) unsafe fn update_or_delete(
    node: *mut pg_sys::CustomScanState,
    runtime: &mut ModifyRuntime,
) -> (u64, Vec<TextRow>) {
    // SAFETY: slots have the result relation's layout; rows are converted with its types.
    unsafe {
        if !runtime.plan.broadcasts.is_empty() {
            runtime.broadcast = Some(BroadcastRows::read(&runtime.plan.broadcasts, node));
        }
        let (work, shards) = crate::executor::modify::statements(node, runtime);
        write_locks::lock_for_multi_node_write(shards, work.len());
        let addresses: BTreeMap<i32, NodeAddress> = work
            .iter()
            .map(|(address, _)| (address.node_id, address.clone()))
            .collect();
        let locked = run_statements_all_rows(work);
        let plan = &runtime.plan;
        let merge = plan.kind == ModifyKind::Merge;
        let mut rows = RowTriggers::new(node, runtime);
        let columns = &rows.columns;
        let shards = group_by_shard(locked, columns.len(), plan.set_attnos.len(), merge);
        let distribution = cache::lookup(plan.relid)
            .and_then(|t| t.distribution_attno())
            .and_then(|attno| columns.iter().position(|c| c.attno == attno));
        // MERGE: the rows an UPDATE or DELETE action already took. A second one fails, as the
        // SQL standard says, even when a BEFORE trigger skipped one of them (PostgreSQL then
        // fails or not by the order its join returns the two source rows in).
        let mut acted = std::collections::HashSet::new();
        let mut changes = Vec::new();
        for (shard_id, copies) in shards {
            let Some((primary, others)) = copies.split_first() else {
                continue;
            };
            for (i, row) in primary.1.iter().enumerate() {
                let what = match plan.kind {
                    ModifyKind::Merge => merge_action(&plan.merge_actions, &row.extra),
                    ModifyKind::Update => Some(Write::Update),
                    _ => Some(Write::Delete),
                };
                let takes_row = matches!(what, Some(Write::Update | Write::Delete));
                if merge && takes_row && !acted.insert((shard_id, row.id.clone())) {
                    crate::error::raise(WriteError::MergeRowTwice);
                }
                let Some((write, new)) = what.and_then(|what| rows.before(what, row)) else {
                    continue;
                };
                if write != Write::Delete && write != Write::MovedAway {
                    refuse_moved_row(plan.relid, &rows.columns, distribution, &row.old, &new);
                }
                // A MERGE's source row with a NULL key comes from the first shard.
                if let Some(index) =
                    distribution.filter(|i| write == Write::Insert && new[*i].is_none())
                {
                    crate::error::raise(WriteError::NullDistributionValue {
                        table: crate::distribution::create::relation_name(plan.relid),
                        column: rows.columns[index].name.clone(),
                    });
                }
                let mut copies = vec![(primary.0, row.id.clone())];
                copies.extend(
                    others
                        .iter()
                        .map(|(node_id, rows)| (*node_id, rows[i].id.clone())),
                );
                changes.push(Change {
                    old: row.old.clone(),
                    new,
                    write,
                    copies,
                    shard_id,
                    extra: row.extra.clone(),
                });
            }
        }
        let (count, stored) = run_statements(writes(
            plan.relid,
            plan,
            &changes,
            &rows.columns,
            &addresses,
        ));
        // The rows as the shards stored them, by change.
        let mut new_rows: Vec<Option<TextRow>> = vec![None; changes.len()];
        for mut row in stored {
            if let Some(index) = row
                .first()
                .cloned()
                .flatten()
                .and_then(|t| t.parse::<usize>().ok())
            {
                row.remove(0);
                if let Some(slot) = new_rows.get_mut(index) {
                    *slot = Some(row);
                }
            }
        }
        // An UPDATE does not count the rows it only deleted, as PostgreSQL counts a moved row
        // by its INSERT.
        let moved_away = changes
            .iter()
            .filter(|c| c.write == Write::MovedAway)
            .count() as u64;
        let mut returned = Vec::new();
        for (change, new) in changes.iter().zip(new_rows) {
            let row = match change.write {
                Write::Update | Write::Insert => new.unwrap_or_else(|| change.new.clone()),
                Write::Delete | Write::MovedAway => change.old.clone(),
            };
            rows.after(change, &row);
            if plan.returning && change.write != Write::MovedAway {
                returned.push([row, change.extra.clone()].concat());
            }
        }
        rows.clear();
        (count - moved_away, returned)
    }
}

/// Fires the row triggers of a row-by-row write and tests its new rows, one row at a time in
/// the node's per-row memory.
struct RowTriggers<'a> {
    node: *mut pg_sys::CustomScanState,
    runtime: &'a ModifyRuntime,
    /// The result relation's columns.
    columns: Vec<Column>,
    input: RowInput,
    old_slot: *mut pg_sys::TupleTableSlot,
    new_slot: *mut pg_sys::TupleTableSlot,
    /// New rows need their generated columns computed to be tested.
    generated: bool,
}

impl<'a> RowTriggers<'a> {
    unsafe fn new(node: *mut pg_sys::CustomScanState, runtime: &'a ModifyRuntime) -> Self {
        // SAFETY: the node's result relation is open; the slots live in its executor state.
        unsafe {
            let tupdesc = (*(*node).ss.ss_currentRelation).rd_att;
            let estate = (*node).ss.ps.state;
            let slot = || pg_sys::ExecInitExtraTupleSlot(estate, tupdesc, &pg_sys::TTSOpsVirtual);
            RowTriggers {
                node,
                runtime,
                columns: live_columns(tupdesc),
                input: RowInput::new(tupdesc),
                old_slot: slot(),
                new_slot: slot(),
                generated: has_checks(runtime.result) && has_generated_columns(runtime.plan.relid),
            }
        }
    }

    /// Runs `step` in the node's per-row memory, reset afterwards.
    unsafe fn per_row<T>(&mut self, step: impl FnOnce(&mut Self) -> T) -> T {
        // SAFETY: the expression context belongs to the node.
        unsafe {
            let memory = (*(*self.node).ss.ps.ps_ExprContext).ecxt_per_tuple_memory;
            let old_context = pg_sys::MemoryContextSwitchTo(memory);
            let result = step(self);
            pg_sys::MemoryContextSwitchTo(old_context);
            pg_sys::MemoryContextReset(memory);
            result
        }
    }

    /// `row` (its old version) as a heap tuple for the triggers.
    unsafe fn old_tuple(&mut self, old: &TextRow) -> pg_sys::HeapTuple {
        // SAFETY: the slot has the relation's layout.
        unsafe {
            self.input.store(old, self.old_slot);
            pg_sys::ExecCopySlotHeapTuple(self.old_slot)
        }
    }

    /// The BEFORE ROW triggers of locked row `row` that `what` writes, and the check options
    /// of its new row: what is written and the new row (None: a trigger skipped it).
    unsafe fn before(&mut self, what: Write, row: &Locked) -> Option<(Write, TextRow)> {
        // SAFETY: rows are stored into slots of the relation's layout.
        unsafe {
            self.per_row(|this| {
                let triggers = this.runtime.triggers.as_ref();
                let plan = &this.runtime.plan;
                match what {
                    Write::Update | Write::MovedAway => {
                        let new =
                            with_set_values(&row.old, &this.columns, &plan.set_attnos, &row.set);
                        let old = this.old_tuple(&row.old);
                        this.input.store(&new, this.new_slot);
                        let outcome = triggers.map_or(UpdateOutcome::Write, |t| {
                            t.before_update(old, this.new_slot)
                        });
                        match outcome {
                            UpdateOutcome::Write => {
                                Some((Write::Update, this.checked(Write::Update)))
                            }
                            UpdateOutcome::Delete => Some((Write::MovedAway, new)),
                            UpdateOutcome::Skip => None,
                        }
                    }
                    Write::Insert => {
                        this.input.store(&row.old, this.new_slot);
                        let kept = triggers.is_none_or(|t| {
                            t.before_row_of(Event::Insert, std::ptr::null_mut(), this.new_slot)
                        });
                        kept.then(|| (Write::Insert, this.checked(Write::Insert)))
                    }
                    Write::Delete => {
                        let old = this.old_tuple(&row.old);
                        let kept = triggers.is_none_or(|t| {
                            t.before_row_of(Event::Delete, old, std::ptr::null_mut())
                        });
                        kept.then(|| (Write::Delete, row.old.clone()))
                    }
                }
            })
        }
    }

    /// The new row of an UPDATE or a MERGE's INSERT (`write`) as the BEFORE triggers left it
    /// in the new slot, tested against the check options.
    unsafe fn checked(&mut self, write: Write) -> TextRow {
        use pg_sys::WCOKind::{WCO_RLS_INSERT_CHECK, WCO_RLS_UPDATE_CHECK};
        // SAFETY: the new slot holds a row of the relation.
        unsafe {
            let new = slot_text(self.new_slot, &self.columns);
            let (command, check) = match write {
                Write::Insert => (pg_sys::CmdType::CMD_INSERT, WCO_RLS_INSERT_CHECK),
                _ => (pg_sys::CmdType::CMD_UPDATE, WCO_RLS_UPDATE_CHECK),
            };
            let result = self.runtime.result;
            if self.generated {
                let estate = (*self.node).ss.ps.state;
                compute_generated_columns(result, estate, self.new_slot, command);
            }
            check_new_row(self.node, result, self.new_slot, check);
            new
        }
    }

    /// Queues the AFTER ROW triggers of `change`, whose row as stored is `row`.
    unsafe fn after(&mut self, change: &Change, row: &TextRow) {
        let Some(triggers) = self.runtime.triggers.as_ref() else {
            return;
        };
        // SAFETY: as before.
        unsafe {
            self.per_row(|this| match change.write {
                Write::Update => {
                    let old = this.old_tuple(&change.old);
                    triggers.after_update(old, this.input.store(row, this.new_slot))
                }
                Write::MovedAway => {
                    let old = this.old_tuple(&change.old);
                    triggers.after_update(old, std::ptr::null_mut())
                }
                Write::Delete => {
                    let old = this.old_tuple(&change.old);
                    triggers.after_row_of(Event::Delete, old, std::ptr::null_mut())
                }
                Write::Insert => {
                    let new = this.input.store(row, this.new_slot);
                    triggers.after_row_of(Event::Insert, std::ptr::null_mut(), new)
                }
            })
        }
    }

    fn clear(&self) {
        // SAFETY: the slots belong to the node's executor state.
        unsafe {
            pg_sys::ExecClearTuple(self.old_slot);
            pg_sys::ExecClearTuple(self.new_slot);
        }
    }
}

/// Each shard's locked rows per placement, the first placement's first, every placement's
/// rows in the same order (by content: the copies hold the same rows).
fn group_by_shard(
    rows: Vec<TextRow>,
    columns: usize,
    set_values: usize,
    keep_repeats: bool,
) -> BTreeMap<i64, Vec<(i32, Vec<Locked>)>> {
    let mut shards: BTreeMap<i64, BTreeMap<(bool, i32), Vec<Locked>>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for mut row in rows {
        let Some((shard_id, node_id, primary)) = row
            .first()
            .cloned()
            .flatten()
            .as_deref()
            .and_then(parse_tag)
        else {
            continue;
        };
        let extra = row.split_off((3 + columns + set_values).min(row.len()));
        let set = row.split_off((3 + columns).min(row.len()));
        let old = row.split_off(3.min(row.len()));
        let tableoid = row.pop().flatten().unwrap_or_default();
        let ctid = row.pop().flatten().unwrap_or_default();
        let id = RowId { ctid, tableoid };
        // A join may return a row more than once; it is changed once, with the first values
        // (a MERGE's rows are all kept: an action on a row already changed fails).
        if !keep_repeats && !seen.insert((shard_id, node_id, id.clone())) {
            continue;
        }
        let rows = shards
            .entry(shard_id)
            .or_default()
            .entry((!primary, node_id))
            .or_default();
        rows.push(Locked {
            id,
            old,
            set,
            extra,
        });
    }
    shards
        .into_iter()
        .map(|(shard_id, placements)| {
            let copies = placements
                .into_iter()
                .map(|((_, node_id), mut rows)| {
                    // A MERGE's row to insert may equal a row it updates: the action tells them apart.
                    rows.sort_by(|a, b| {
                        (&a.old, &a.extra, &a.set).cmp(&(&b.old, &b.extra, &b.set))
                    });
                    (node_id, rows)
                })
                .collect::<Vec<_>>();
            let count = copies.first().map_or(0, |(_, rows)| rows.len());
            if copies.iter().any(|(_, rows)| rows.len() != count) {
                pgrx::error!("pgdist: the placements of shard {shard_id} hold different rows");
            }
            (shard_id, copies)
        })
        .collect()
}

/// The statements that write `changes`: per placement of each shard, one UPDATE joining the new
/// values on the rows' ctid and tableoid (or one DELETE joining those); the first placement's
/// UPDATE returns the rows as stored, tagged with their change's index.
fn writes(
    relid: pg_sys::Oid,
    plan: &crate::planner::modify_plan::ModifyPlan,
    changes: &[Change],
    columns: &[Column],
    addresses: &BTreeMap<i32, NodeAddress>,
) -> Vec<(NodeAddress, Vec<(FragmentSql, bool)>)> {
    let (schema, name) = crate::executor::schema_and_name(relid);
    let returning = columns
        .iter()
        .map(|c| format!("pgdist_t.{}", quote_identifier(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut by_shard: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (index, change) in changes.iter().enumerate() {
        by_shard.entry(change.shard_id).or_default().push(index);
    }
    let mut per_node: BTreeMap<i32, Vec<(FragmentSql, bool)>> = BTreeMap::new();
    for (shard_id, indexes) in by_shard {
        let shard = quote_qualified(&schema, &with_suffix(&name, &shard_id.to_string()));
        let of = |writes: &[Write]| -> Vec<usize> {
            indexes
                .iter()
                .copied()
                .filter(|n| writes.contains(&changes[*n].write))
                .collect()
        };
        let updated = of(&[Write::Update]);
        let deleted = of(&[Write::Delete, Write::MovedAway]);
        let inserted = of(&[Write::Insert]);
        // The SET columns and every column a trigger changed in one of the shard's rows.
        let assigned: Vec<usize> = (0..columns.len())
            .filter(|i| {
                let c = &columns[*i];
                !c.generated
                    && (plan.set_attnos.contains(&c.attno)
                        || updated
                            .iter()
                            .any(|n| changes[*n].new[*i] != changes[*n].old[*i]))
            })
            .collect();
        let copies = changes[indexes[0]].copies.len();
        for copy in 0..copies {
            let primary = copy == 0;
            let Some(node_id) = changes[indexes[0]].copies.get(copy).map(|c| c.0) else {
                continue;
            };
            let row_id = |n: usize| {
                let id = changes[n].copies.get(copy).map(|c| &c.1);
                let ctid = id.map_or("", |id| id.ctid.as_str());
                let tableoid = id.map_or("", |id| id.tableoid.as_str());
                format!(
                    "{}::tid, {}::oid",
                    quote_literal(ctid),
                    quote_literal(tableoid)
                )
            };
            let same_row = "pgdist_t.ctid = pgdist_v.pgdist_ctid \
                            AND pgdist_t.tableoid = pgdist_v.pgdist_tableoid";
            let jobs = per_node.entry(node_id).or_default();
            if !updated.is_empty() {
                let rows: Vec<String> = updated
                    .iter()
                    .map(|n| {
                        let mut values = vec![n.to_string(), row_id(*n)];
                        values.extend(assigned.iter().map(|i| {
                            let text = changes[*n].new[*i].as_deref();
                            let value = text.map_or("NULL".into(), quote_literal);
                            format!("{value}::{}", columns[*i].type_name)
                        }));
                        format!("({})", values.join(", "))
                    })
                    .collect();
                let names: Vec<String> = assigned
                    .iter()
                    .map(|i| quote_identifier(&columns[*i].name))
                    .collect();
                let sets: Vec<String> = names
                    .iter()
                    .map(|c| format!("{c} = pgdist_v.{c}"))
                    .collect();
                let mut sql = format!(
                    "UPDATE {shard} AS pgdist_t SET {} FROM (VALUES {}) AS pgdist_v \
                     (pgdist_n, pgdist_ctid, pgdist_tableoid, {}) WHERE {same_row}",
                    sets.join(", "),
                    rows.join(", "),
                    names.join(", ")
                );
                if primary {
                    sql.push_str(&format!(" RETURNING pgdist_v.pgdist_n, {returning}"));
                }
                jobs.push((FragmentSql::plain(sql), primary));
            }
            if !deleted.is_empty() {
                let rows: Vec<String> = deleted
                    .iter()
                    .map(|n| format!("({})", row_id(*n)))
                    .collect();
                let sql = format!(
                    "DELETE FROM {shard} AS pgdist_t USING (VALUES {}) AS pgdist_v \
                     (pgdist_ctid, pgdist_tableoid) WHERE {same_row}",
                    rows.join(", ")
                );
                jobs.push((FragmentSql::plain(sql), primary));
            }
            // One INSERT per row, returning it as stored with its change's index.
            let names: Vec<String> = columns
                .iter()
                .filter(|c| !c.generated)
                .map(|c| quote_identifier(&c.name))
                .collect();
            for n in &inserted {
                let values: Vec<String> = columns
                    .iter()
                    .zip(&changes[*n].new)
                    .filter(|(c, _)| !c.generated)
                    .map(|(c, value)| {
                        let value = value.as_deref().map_or("NULL".into(), quote_literal);
                        format!("{value}::{}", c.type_name)
                    })
                    .collect();
                let mut sql = format!(
                    "INSERT INTO {shard} AS pgdist_t ({}) VALUES ({})",
                    names.join(", "),
                    values.join(", ")
                );
                if primary {
                    sql.push_str(&format!(" RETURNING {n}, {returning}"));
                }
                jobs.push((FragmentSql::plain(sql), primary));
            }
        }
    }
    per_node
        .into_iter()
        .filter_map(|(node_id, jobs)| Some((addresses.get(&node_id)?.clone(), jobs)))
        .collect()
}

/// `old` with the SET values `set` (of columns `set_attnos`) in place.
pub(crate) fn with_set_values(
    old: &TextRow,
    columns: &[Column],
    set_attnos: &[i16],
    set: &TextRow,
) -> TextRow {
    let mut new = old.clone();
    for (attno, value) in set_attnos.iter().zip(set) {
        if let Some(index) = columns.iter().position(|c| c.attno == *attno) {
            new[index] = value.clone();
        }
    }
    new
}

/// Raises 0A000 when the new row of an UPDATE (a trigger's doing) has another value in the
/// distribution column (at `distribution` among `columns`): the row would belong elsewhere.
pub(crate) fn refuse_moved_row(
    relid: pg_sys::Oid,
    columns: &[Column],
    distribution: Option<usize>,
    old: &TextRow,
    new: &TextRow,
) {
    if let Some(index) = distribution.filter(|i| new[*i] != old[*i]) {
        let table = crate::distribution::create::relation_name(relid);
        let column = columns[index].name.clone();
        crate::error::raise(PlannerError::DistributionColumnUpdate(table, column));
    }
}

/// `column = value, …` of an UPDATE by ctid: the SET columns and the columns a trigger changed
/// (generated columns are the shard's to compute).
pub(crate) fn assignments(
    columns: &[Column],
    set_attnos: &[i16],
    old: &TextRow,
    new: &TextRow,
) -> String {
    columns
        .iter()
        .enumerate()
        .filter(|(i, c)| !c.generated && (set_attnos.contains(&c.attno) || new[*i] != old[*i]))
        .map(|(i, c)| {
            let value = new[i].as_deref().map_or("NULL".into(), quote_literal);
            format!("{} = {value}", quote_identifier(&c.name))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A column of the result relation that is not dropped.
pub(crate) struct Column {
    pub(crate) attno: i16,
    pub(crate) name: String,
    pub(crate) generated: bool,
    /// The type as SQL (`numeric(10,2)`), for casts.
    pub(crate) type_name: String,
}

pub(crate) unsafe fn live_columns(tupdesc: pg_sys::TupleDesc) -> Vec<Column> {
    // SAFETY: tupdesc is the open result relation's descriptor.
    unsafe {
        (0..(*tupdesc).natts as usize)
            .map(|i| &*(*tupdesc).attrs.as_ptr().add(i))
            .filter(|a| !a.attisdropped)
            .map(|a| Column {
                attno: a.attnum,
                name: std::ffi::CStr::from_ptr(a.attname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
                generated: a.attgenerated != 0,
                type_name: std::ffi::CStr::from_ptr(pg_sys::format_type_with_typemod(
                    a.atttypid,
                    a.atttypmod,
                ))
                .to_string_lossy()
                .into_owned(),
            })
            .collect()
    }
}

/// The text of the live columns of the row in `slot`.
pub(crate) unsafe fn slot_text(slot: *mut pg_sys::TupleTableSlot, columns: &[Column]) -> TextRow {
    // SAFETY: slot holds a row of the relation the columns describe.
    unsafe {
        pg_sys::slot_getallattrs(slot);
        let tupdesc = (*slot).tts_tupleDescriptor;
        columns
            .iter()
            .map(|c| {
                let i = (c.attno - 1) as usize;
                if *(*slot).tts_isnull.add(i) {
                    return None;
                }
                let attribute = (*tupdesc).attrs.as_ptr().add(i);
                let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
                pg_sys::getTypeOutputInfo((*attribute).atttypid, &mut output, &mut varlena);
                let text = pg_sys::OidOutputFunctionCall(output, *(*slot).tts_values.add(i));
                Some(
                    std::ffi::CStr::from_ptr(text)
                        .to_string_lossy()
                        .into_owned(),
                )
            })
            .collect()
    }
}
