//! The Distributed Modify node: runs an INSERT, UPDATE or DELETE planned by
//! `planner/modify_plan.rs` on the shards, as the statement itself or as one of its WITH
//! queries.
//!
//! At the first fetch it does all the writing — INSERT pulls every row from its child plan and
//! hands it to a [`ShardWriter`]; UPDATE and DELETE send one statement per (pruned) shard — and
//! adds the rows changed on the shards to the statement's row count. With RETURNING, the shards
//! return whole rows, which this node then yields one by one through PostgreSQL's projection
//! of the RETURNING list (ExecScan). Check options (row-level security's WITH CHECK, a view's
//! CHECK OPTION) are tested here with PostgreSQL's `ExecWithCheckOptions`: on INSERT's rows
//! before they are routed, on the new rows an UPDATE's shards return.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::distribution::shell::with_suffix;
use crate::executor::fragments::{FragmentSql, TextRow};
use crate::executor::scan::insert_statements;
use crate::executor::scan::{
    broadcast_value, evaluate_values, prune_by_param, typed_literal, value_text, values_in,
    BroadcastRows, ShardNames,
};
use crate::executor::shard_writer::{run_statements, RowInput, ShardWriter, WriteKind};
use crate::executor::triggers::{self, Event, Triggers};
use crate::executor::{row_by_row, upsert, write_locks};
use crate::metadata::cache;
use crate::planner::modify_plan::{
    self, has_generated_columns, is_conflict_update, ModifyKind, ModifyPlan, MODIFY_NAME,
};
use crate::planner::modify_pushdown::ROW_TAG_SQL;
use crate::planner::shippable::{BROADCAST_BASE, RELATION_BASE};
use crate::remote::quote::{quote_identifier, quote_literal, quote_qualified, replace_dollar_refs};
use crate::remote::NodeAddress;

static mut SCAN_METHODS: pg_sys::CustomScanMethods = pg_sys::CustomScanMethods {
    CustomName: MODIFY_NAME.as_ptr(),
    CreateCustomScanState: Some(create_state),
};

static mut EXEC_METHODS: pg_sys::CustomExecMethods = pg_sys::CustomExecMethods {
    CustomName: MODIFY_NAME.as_ptr(),
    BeginCustomScan: Some(begin),
    ExecCustomScan: Some(exec),
    EndCustomScan: Some(end),
    ReScanCustomScan: Some(rescan),
    MarkPosCustomScan: None,
    RestrPosCustomScan: None,
    EstimateDSMCustomScan: None,
    InitializeDSMCustomScan: None,
    ReInitializeDSMCustomScan: None,
    InitializeWorkerCustomScan: None,
    ShutdownCustomScan: None,
    ExplainCustomScan: Some(explain),
};

pub fn init() {
    // SAFETY: registers static method tables once, from _PG_init.
    unsafe { pg_sys::RegisterCustomScanMethods(&raw const SCAN_METHODS) };
}

pub fn scan_methods() -> *const pg_sys::CustomScanMethods {
    &raw const SCAN_METHODS
}

#[repr(C)]
struct ModifyState {
    css: pg_sys::CustomScanState,
    runtime: *mut ModifyRuntime,
}

pub(crate) struct ModifyRuntime {
    pub(crate) plan: ModifyPlan,
    /// The expressions behind `$<COORDINATOR_VALUE_BASE + i>`, ready to evaluate.
    coordinator_values: Vec<*mut pg_sys::ExprState>,
    done: bool,
    returned: std::vec::IntoIter<TextRow>,
    input: Option<RowInput>,
    /// The rows of the tables the statement broadcasts (`ModifyPlan::broadcasts`), once read.
    pub(crate) broadcast: Option<BroadcastRows>,
    /// The result relation, with the check options every new row must pass.
    pub(crate) result: *mut pg_sys::ResultRelInfo,
    /// The table's triggers for this write (None: it has none).
    pub(crate) triggers: Option<Triggers>,
}

#[pg_guard]
unsafe extern "C-unwind" fn create_state(cscan: *mut pg_sys::CustomScan) -> *mut pg_sys::Node {
    // SAFETY: allocates our node in the executor's memory context, tagged as a
    // CustomScanState whose first member is the CustomScanState PostgreSQL expects; the
    // runtime is freed with that memory, also when the statement fails.
    unsafe {
        let state = pg_sys::palloc0(std::mem::size_of::<ModifyState>()).cast::<ModifyState>();
        (*state).css.ss.ps.type_ = pg_sys::NodeTag::T_CustomScanState;
        (*state).css.methods = &raw const EXEC_METHODS;
        (*state).css.flags = (*cscan).flags;
        (*state).runtime = super::alloc_for_context(ModifyRuntime {
            plan: modify_plan::decode(cscan),
            coordinator_values: Vec::new(),
            done: false,
            returned: Vec::new().into_iter(),
            input: None,
            broadcast: None,
            result: std::ptr::null_mut(),
            triggers: None,
        });
        state.cast()
    }
}

unsafe fn runtime_of<'a>(node: *mut pg_sys::CustomScanState) -> &'a mut ModifyRuntime {
    // SAFETY: node was created by create_state; the runtime lives as long as the query memory.
    unsafe { &mut *(*node.cast::<ModifyState>()).runtime }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(
    node: *mut pg_sys::CustomScanState,
    estate: *mut pg_sys::EState,
    eflags: i32,
) {
    // SAFETY: the INSERT's row source (or the scans of the WITH queries whose rows an UPDATE or
    // DELETE reads) are initialised as our children; the scan slot has the
    // layout of the rows the shards return (the result relation's row type, or the planner's
    // `custom_scan_tlist` when RETURNING reads other tables); the node lives in the estate's
    // memory, as its list does.
    unsafe {
        let cscan = (*node).ss.ps.plan.cast::<pg_sys::CustomScan>();
        for child in pgrx::PgList::<pg_sys::Plan>::from_pg((*cscan).custom_plans).iter_ptr() {
            let child_state = pg_sys::ExecInitNode(child, estate, eflags);
            (*node).custom_ps = pg_sys::lappend((*node).custom_ps, child_state.cast());
        }
        let tupdesc = (*(*node).ss.ss_ScanTupleSlot).tts_tupleDescriptor;
        let runtime = runtime_of(node);
        crate::distribution::foreign_keys::load_related_placements(runtime.plan.relid);
        runtime.input = Some(RowInput::new(tupdesc));
        let mut checks = pgrx::PgList::<pg_sys::WithCheckOption>::new();
        for expr in pgrx::PgList::<pg_sys::Expr>::from_pg((*cscan).custom_exprs).iter_ptr() {
            if (*expr).type_ == pg_sys::NodeTag::T_WithCheckOption {
                checks.push(expr.cast());
            } else {
                let state = pg_sys::ExecInitExpr(expr, &mut (*node).ss.ps);
                runtime.coordinator_values.push(state);
            }
        }
        runtime.result = result_relation(node, estate, checks.into_pg());
        // A MERGE fires the triggers of its actions' events.
        let event = match runtime.plan.kind {
            ModifyKind::Insert => Some(Event::Insert),
            ModifyKind::Update => Some(Event::Update),
            ModifyKind::Delete => Some(Event::Delete),
            ModifyKind::Merge => runtime.plan.merge_events.first().copied(),
        };
        // An upsert fires UPDATE's triggers too.
        let also_update = is_conflict_update(&runtime.plan.on_conflict);
        let fires = |event| triggers::find(runtime.plan.relid, event).any();
        // EXPLAIN without ANALYZE fires nothing (PostgreSQL sets no transition capture up then).
        let explain_only = eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 != 0;
        let merge_events = &runtime.plan.merge_events;
        let fired = event.filter(|e| {
            fires(*e)
                || (also_update && fires(Event::Update))
                || merge_events.iter().any(|m| fires(*m))
        });
        if let Some(event) = fired.filter(|_| !explain_only) {
            let triggers = Triggers::new(estate, runtime.result, event, also_update, merge_events);
            runtime.triggers = Some(triggers);
        }
        if !runtime.plan.can_set_tag {
            // A write inside WITH runs to completion at the end of the statement even when
            // nothing reads it, as PostgreSQL does with its own ModifyTable nodes.
            (*estate).es_auxmodifytables = pg_sys::lcons(node.cast(), (*estate).es_auxmodifytables);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn exec(
    node: *mut pg_sys::CustomScanState,
) -> *mut pg_sys::TupleTableSlot {
    // SAFETY: ExecScan drives next_row and projects the RETURNING list.
    unsafe { pg_sys::ExecScan(&mut (*node).ss, Some(next_row), Some(recheck)) }
}

#[pg_guard]
unsafe extern "C-unwind" fn recheck(
    _node: *mut pg_sys::ScanState,
    _slot: *mut pg_sys::TupleTableSlot,
) -> bool {
    true
}

/// Does the node's writing, the first time it is asked to.
unsafe fn write_once(node: *mut pg_sys::CustomScanState) {
    // SAFETY: node is a Distributed Modify node being executed.
    unsafe {
        let runtime = runtime_of(node);
        if runtime.done {
            return;
        }
        runtime.done = true;
        if runtime.plan.kind == ModifyKind::Insert {
            run_writes_first(node, runtime.plan.relid);
        }
        if let Some(triggers) = &runtime.triggers {
            triggers.before_statement();
        }
        let (count, rows) = match runtime.plan.kind {
            ModifyKind::Insert => insert(node, runtime),
            ModifyKind::Update | ModifyKind::Delete | ModifyKind::Merge
                if !runtime.plan.row_source.is_empty() =>
            {
                row_by_row::update_or_delete(node, runtime)
            }
            ModifyKind::Update | ModifyKind::Delete | ModifyKind::Merge => {
                update_or_delete(node, runtime)
            }
        };
        if let Some(triggers) = &runtime.triggers {
            triggers.after_statement();
        }
        if runtime.plan.can_set_tag {
            (*(*node).ss.ps.state).es_processed += count;
        }
        runtime.returned = rows.into_iter();
    }
}

/// Runs, before a blind insert into `relid` writes, the statement's writes inside WITH that
/// must be over by then (`ModifyPlan::runs_before_writes_to`) and have not run yet.
unsafe fn run_writes_first(node: *mut pg_sys::CustomScanState, relid: pg_sys::Oid) {
    // SAFETY: the executor state's auxiliary ModifyTable list holds plan states; ours are
    // recognised by their methods before being used as Distributed Modify nodes.
    unsafe {
        let writes = (*(*node).ss.ps.state).es_auxmodifytables;
        for other in pgrx::PgList::<pg_sys::PlanState>::from_pg(writes).iter_ptr() {
            if other == node.cast() || (*other).type_ != pg_sys::NodeTag::T_CustomScanState {
                continue;
            }
            let other = other.cast::<pg_sys::CustomScanState>();
            if (*other).methods == &raw const EXEC_METHODS
                && runtime_of(other)
                    .plan
                    .runs_before_writes_to
                    .contains(&relid)
            {
                write_once(other);
            }
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn next_row(scan: *mut pg_sys::ScanState) -> *mut pg_sys::TupleTableSlot {
    // SAFETY: scan is our CustomScanState; the slot belongs to it.
    unsafe {
        let node = scan.cast::<pg_sys::CustomScanState>();
        write_once(node);
        let runtime = runtime_of(node);
        let slot = (*scan).ss_ScanTupleSlot;
        match (runtime.returned.next(), runtime.input.as_mut()) {
            (Some(row), Some(input)) => {
                let econtext = (*scan).ps.ps_ExprContext;
                let old = pg_sys::MemoryContextSwitchTo((*econtext).ecxt_per_tuple_memory);
                let stored = input.store(&row, slot);
                pg_sys::MemoryContextSwitchTo(old);
                stored
            }
            _ => pg_sys::ExecClearTuple(slot),
        }
    }
}

/// Routes every row of the child plan to its shard.
unsafe fn insert(
    node: *mut pg_sys::CustomScanState,
    runtime: &ModifyRuntime,
) -> (u64, Vec<TextRow>) {
    // SAFETY: the child produces rows in the result relation's attribute layout (INSERT's
    // target list has one entry per attribute); the values are read in its per-tuple memory.
    unsafe {
        let plan = &runtime.plan;
        let child = pg_sys::list_nth((*node).custom_ps, 0).cast::<pg_sys::PlanState>();
        if !plan.insert_select.is_empty() {
            let scan = distributed_scan_state(child);
            return run_statements(insert_statements(scan, &plan.insert_select, plan.relid));
        }
        // INSERT … SELECT streams its rows with COPY; a VALUES list is small enough to go as
        // one INSERT per shard, all of a node's in one round trip.
        let child_kind = (*(*child).plan).type_;
        let from_values = matches!(
            child_kind,
            pg_sys::NodeTag::T_ValuesScan | pg_sys::NodeTag::T_Result
        );
        // Row triggers: with ON CONFLICT, AFTER ROW triggers get the rows the shards inserted,
        // in the order the shards return them; a trigger function's queries run between
        // flushes, so the rows go as INSERT statements (COPY would keep connections busy
        // across rows). Generated columns are computed here too, for the triggers and checks
        // to see them (the shards compute them again).
        let row_triggers = runtime
            .triggers
            .as_ref()
            .filter(|_| triggers::find(plan.relid, Event::Insert).rows);
        let after_rows_returned = row_triggers.is_some() && !plan.on_conflict.is_empty();
        let generated = (row_triggers.is_some()
            || has_checks(runtime.result)
            || !plan.upsert_source.is_empty())
            && has_generated_columns(plan.relid);
        let kind = if plan.on_conflict.is_empty()
            && !plan.returning
            && !from_values
            && row_triggers.is_none()
        {
            WriteKind::Copy
        } else {
            WriteKind::Insert {
                alias: plan.alias.clone(),
                on_conflict: {
                    let values = evaluate_values(node, &runtime.coordinator_values);
                    let value = |id| value_text(node, &[], &values, id);
                    values_in(&plan.on_conflict, value, false).0
                },
                conflict_constraint: plan.conflict_constraint.clone(),
                returning: plan.returning || after_rows_returned,
            }
        };
        let mut writer = ShardWriter::new(plan.relid, kind);
        // An upsert with row triggers collects the rows and writes them row by row.
        let mut proposed = Vec::new();
        let columns = match plan.upsert_source.is_empty() {
            true => Vec::new(),
            false => row_by_row::live_columns((*(*node).ss.ss_currentRelation).rd_att),
        };
        loop {
            let Some(exec_proc) = (*child).ExecProcNode else {
                break;
            };
            let slot = exec_proc(child);
            if slot.is_null() || ((*slot).tts_flags & pg_sys::TTS_FLAG_EMPTY as u16) != 0 {
                break;
            }
            if let Some(triggers) = row_triggers {
                if !triggers.before_row(std::ptr::null_mut(), slot) {
                    continue;
                }
                // A row a trigger returned lives in memory the checks below reset.
                if let Some(materialize) = (*(*slot).tts_ops).materialize {
                    materialize(slot);
                }
            }
            if generated {
                compute_generated_columns(
                    runtime.result,
                    (*node).ss.ps.state,
                    slot,
                    pg_sys::CmdType::CMD_INSERT,
                );
            }
            let natts = (*(*slot).tts_tupleDescriptor).natts;
            if i32::from((*slot).tts_nvalid) < natts {
                pg_sys::slot_getsomeattrs_int(slot, natts);
            }
            check_new_row(
                node,
                runtime.result,
                slot,
                pg_sys::WCOKind::WCO_RLS_INSERT_CHECK,
            );
            let values = std::slice::from_raw_parts((*slot).tts_values, natts as usize);
            let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts as usize);
            if !plan.upsert_source.is_empty() {
                proposed.push(upsert::Proposed {
                    shard_id: writer.shard_for(values, nulls),
                    row: row_by_row::slot_text(slot, &columns),
                });
                continue;
            }
            writer.add(values, nulls);
            if let (Some(triggers), false) = (row_triggers, after_rows_returned) {
                triggers.after_row(std::ptr::null_mut(), slot);
            }
        }
        if !plan.upsert_source.is_empty() {
            let values = evaluate_values(node, &runtime.coordinator_values);
            let value = |id| value_text(node, &[], &values, id);
            let source = values_in(&plan.upsert_source, value, false).0;
            let target = values_in(&plan.conflict_target, value, false).0;
            return upsert::upsert(node, runtime, proposed, &source, &target);
        }
        writer.finish();
        let mut returned = std::mem::take(&mut writer.returned);
        if let (Some(triggers), true) = (row_triggers, after_rows_returned) {
            each_row_stored(node, &returned, |slot| {
                triggers.after_row(std::ptr::null_mut(), slot)
            });
            if !plan.returning {
                returned.clear();
            }
        }
        (writer.processed, returned)
    }
}

/// Computes the stored generated columns of the new row in `slot`, as PostgreSQL's INSERT or
/// UPDATE (`command`) does.
pub(crate) unsafe fn compute_generated_columns(
    result: *mut pg_sys::ResultRelInfo,
    estate: *mut pg_sys::EState,
    slot: *mut pg_sys::TupleTableSlot,
    command: pg_sys::CmdType::Type,
) {
    extern "C-unwind" {
        fn ExecComputeStoredGenerated(
            info: *mut pg_sys::ResultRelInfo,
            estate: *mut pg_sys::EState,
            slot: *mut pg_sys::TupleTableSlot,
            command: pg_sys::CmdType::Type,
        );
    }
    // SAFETY: result is the statement's result relation, slot holds a row of it; errors in a
    // generation expression cross into Rust as pgrx errors.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            ExecComputeStoredGenerated(result, estate, slot, command)
        });
    }
}

/// Runs `f` on each of `rows` (whole rows of the result relation) stored in a slot of the
/// relation's layout.
unsafe fn each_row_stored(
    node: *mut pg_sys::CustomScanState,
    rows: &[TextRow],
    mut f: impl FnMut(*mut pg_sys::TupleTableSlot),
) {
    // SAFETY: the slot has the relation's own layout; each row's values live in the per-tuple
    // memory until the next row.
    unsafe {
        let relation = (*node).ss.ss_currentRelation;
        let estate = (*node).ss.ps.state;
        let slot =
            pg_sys::ExecInitExtraTupleSlot(estate, (*relation).rd_att, &pg_sys::TTSOpsVirtual);
        let mut input = RowInput::new((*relation).rd_att);
        let econtext = (*node).ss.ps.ps_ExprContext;
        for row in rows {
            let old = pg_sys::MemoryContextSwitchTo((*econtext).ecxt_per_tuple_memory);
            input.store(row, slot);
            pg_sys::MemoryContextSwitchTo(old);
            f(slot);
            pg_sys::MemoryContextReset((*econtext).ecxt_per_tuple_memory);
        }
        pg_sys::ExecClearTuple(slot);
    }
}

/// The Distributed Scan's state under the projections and subquery scans of a pushed-down
/// INSERT … SELECT (the planner checked the shape: `modify_plan::pushed_down_insert`).
unsafe fn distributed_scan_state(
    mut state: *mut pg_sys::PlanState,
) -> *mut pg_sys::CustomScanState {
    // SAFETY: walks an initialised plan state tree of the shape the planner checked.
    unsafe {
        loop {
            state = match (*(*state).plan).type_ {
                pg_sys::NodeTag::T_SubqueryScan => {
                    (*state.cast::<pg_sys::SubqueryScanState>()).subplan
                }
                pg_sys::NodeTag::T_Result => (*state).lefttree,
                _ => return state.cast(),
            };
        }
    }
}

/// One statement per placement of every shard left after pruning, and those shards. Values
/// known only now go as parameters of a statement prepared on the worker connection, unless
/// tables are broadcast into it (their arrays are written in per shard).
pub(crate) unsafe fn statements(
    node: *mut pg_sys::CustomScanState,
    runtime: &ModifyRuntime,
) -> (Vec<(NodeAddress, Vec<(FragmentSql, bool)>)>, Vec<i64>) {
    // SAFETY: catalog lookups for the result relation; parameters as in the scan.
    unsafe {
        let plan = &runtime.plan;
        let relid = plan.relid;
        let shard_ids = prune_by_param(
            node,
            relid,
            plan.shard_ids.clone(),
            plan.prune_param,
            &[],
            &runtime.coordinator_values,
        );
        let (schema, name) = crate::executor::schema_and_name(relid);
        // An UPDATE under check options needs its new rows, to test them.
        let returning = (plan.returning || has_checks(runtime.result))
            .then(|| returning_columns(relid, &plan.target_alias))
            .filter(|_| plan.row_source.is_empty());
        // Every shard's statement, `$<RELATION_BASE + k>` standing for the shards of the
        // relations (the target alone, k = 0, in a plain UPDATE or DELETE).
        let template = if !plan.row_source.is_empty() {
            plan.row_source.clone()
        } else if plan.statement.is_empty() {
            let mut sql = match plan.kind {
                ModifyKind::Update => format!("UPDATE ${RELATION_BASE} SET {}", plan.set_sql),
                _ => format!("DELETE FROM ${RELATION_BASE}"),
            };
            if !plan.where_sql.is_empty() {
                sql.push_str(&format!(" WHERE {}", plan.where_sql));
            }
            sql
        } else {
            plan.statement.clone()
        };
        let values = evaluate_values(node, &runtime.coordinator_values);
        let value = |id| value_text(node, &[], &values, id);
        let (template, params) = values_in(&template, value, plan.broadcasts.is_empty());
        let relations: Vec<(u32, ShardNames)> = plan
            .relations
            .iter()
            .map(|(k, oid)| (*k, ShardNames::of(*oid)))
            .collect();
        let shards = cache::shards(relid);
        let placements = cache::placements(relid);
        let mut per_node: BTreeMap<i32, (NodeAddress, Vec<(FragmentSql, bool)>)> = BTreeMap::new();
        let mut written = Vec::new();
        for shard_id in shard_ids {
            let Some(index) = shards.iter().find(|(id, _)| *id == shard_id).map(|s| s.1) else {
                continue;
            };
            // A shard's MERGE without source rows does nothing: it is not sent.
            let source_rows = runtime.broadcast.as_ref();
            if plan.kind == ModifyKind::Merge
                && source_rows.is_some_and(|rows| !rows.feed(&plan.broadcasts, index))
            {
                continue;
            }
            let body = replace_dollar_refs(&template, |id| {
                if id < BROADCAST_BASE {
                    return None;
                }
                if id < RELATION_BASE {
                    let rows = runtime.broadcast.as_ref();
                    let array = broadcast_value(&plan.broadcasts, rows, id, Some(index));
                    return Some(typed_literal(array));
                }
                if plan.statement.is_empty() {
                    return Some(quote_qualified(
                        &schema,
                        &with_suffix(&name, &shard_id.to_string()),
                    ));
                }
                let k = u32::try_from(id - RELATION_BASE).ok()?;
                relations.iter().find(|(r, _)| *r == k)?.1.at(index)
            });
            written.push(shard_id);
            let shard_placements = placements.iter().filter(|p| p.shard_id == shard_id);
            for (i, placement) in shard_placements.enumerate() {
                let primary = i == 0;
                let mut statement = FragmentSql {
                    sql: body.clone(),
                    params: params.clone(),
                    result_types: String::new(),
                };
                if !plan.row_source.is_empty() {
                    // Every placement locks and returns its rows, tagged with where they are.
                    let tag = row_by_row::tag(shard_id, placement.node.node_id, primary);
                    statement.sql = body.replace(ROW_TAG_SQL, &quote_literal(&tag));
                }
                if let (Some((columns, types)), true) = (&returning, primary) {
                    statement.sql.push_str(&format!(" RETURNING {columns}"));
                    statement.result_types = types.clone();
                    if !plan.returning_extra.is_empty() {
                        statement
                            .sql
                            .push_str(&format!(", {}", plan.returning_extra_sql));
                        for column in &plan.returning_extra {
                            statement.result_types.push_str(&format!(
                                ",{}:{}",
                                u32::from(column.type_oid),
                                column.typmod
                            ));
                        }
                    }
                }
                per_node
                    .entry(placement.node.node_id)
                    .or_insert_with(|| (placement.node.clone(), Vec::new()))
                    .1
                    .push((statement, primary));
            }
        }
        (per_node.into_values().collect(), written)
    }
}

/// The target's columns as a RETURNING list (qualified by `alias` when there is one), and
/// their types (part of a prepared statement's identity).
pub(crate) unsafe fn returning_columns(relid: pg_sys::Oid, alias: &str) -> (String, String) {
    // SAFETY: the result relation is open and locked for the statement.
    unsafe {
        let relation = pg_sys::RelationIdGetRelation(relid);
        let tupdesc = (*relation).rd_att;
        let (names, types): (Vec<String>, Vec<String>) = (0..(*tupdesc).natts as usize)
            .map(|i| (*tupdesc).attrs.as_ptr().add(i))
            .filter(|a| !(**a).attisdropped)
            .map(|a| {
                let column =
                    quote_identifier(&CStr::from_ptr((*a).attname.data.as_ptr()).to_string_lossy());
                let name = if alias.is_empty() {
                    column
                } else {
                    format!("{alias}.{column}")
                };
                (
                    name,
                    format!("{}:{}", u32::from((*a).atttypid), (*a).atttypmod),
                )
            })
            .unzip();
        pg_sys::RelationClose(relation);
        (names.join(", "), types.join(","))
    }
}

unsafe fn update_or_delete(
    node: *mut pg_sys::CustomScanState,
    runtime: &mut ModifyRuntime,
) -> (u64, Vec<TextRow>) {
    // SAFETY: see statements(); the broadcast tables are read with this node's parameters.
    let (work, shards) = unsafe {
        if !runtime.plan.broadcasts.is_empty() {
            runtime.broadcast = Some(BroadcastRows::read(&runtime.plan.broadcasts, node));
        }
        statements(node, runtime)
    };
    write_locks::lock_for_multi_node_write(shards, work.len());
    let (count, rows) = run_statements(work);
    if !has_checks(runtime.result) {
        return (count, rows);
    }
    // SAFETY: each row starts with the result relation's columns (other tables' columns that
    // RETURNING reads may follow).
    unsafe {
        each_row_stored(node, &rows, |slot| {
            check_new_row(
                node,
                runtime.result,
                slot,
                pg_sys::WCOKind::WCO_RLS_UPDATE_CHECK,
            )
        });
    }
    let rows = if runtime.plan.returning {
        rows
    } else {
        Vec::new()
    };
    (count, rows)
}

/// The check a shard's MERGE makes on the distribution value of a row it inserts whose source
/// may hold NULL there (`merge_plan`): true when `present`, otherwise the error an INSERT of such
/// a row gets on the coordinator (23502).
#[pg_extern(volatile, parallel_safe)]
fn distribution_value_present(present: bool, table_name: &str, column: &str) -> bool {
    if !present {
        crate::error::raise(
            crate::executor::shard_writer::WriteError::NullDistributionValue {
                table: table_name.into(),
                column: column.into(),
            },
        );
    }
    true
}

/// A row-level security check that the shards make themselves — on a conflicting row of an
/// `INSERT … ON CONFLICT DO UPDATE`, on the rows a MERGE acts on (`security_quals::check_call`):
/// true when `passed`, otherwise PostgreSQL's own error for a check of `kind`: `new` (WITH
/// CHECK on the new row), `existing` (UPDATE's USING on a conflicting row) or `target` (a
/// MERGE action's USING on its target row).
#[pg_extern(volatile, parallel_safe)]
fn policy_check(
    passed: Option<bool>,
    kind: &str,
    table_name: &str,
    policy_name: Option<&str>,
) -> bool {
    if passed == Some(true) {
        return true;
    }
    let policy = policy_name.map(|p| format!(" \"{p}\"")).unwrap_or_default();
    let (row, using) = match kind {
        "existing" => ("new row", " (USING expression)"),
        "target" => ("target row", " (USING expression)"),
        _ => ("new row", ""),
    };
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!(
            "{row} violates row-level security policy{policy}{using} for table \"{table_name}\""
        )
    );
}

/// True when `result` has check options for [`check_new_row`] to test.
pub(crate) fn has_checks(result: *mut pg_sys::ResultRelInfo) -> bool {
    // SAFETY: result was set up by result_relation.
    !result.is_null() && unsafe { !(*result).ri_WithCheckOptions.is_null() }
}

/// The result relation of `node` set up with `checks` (the list may be empty), ready for
/// [`check_new_row`] and for firing triggers.
unsafe fn result_relation(
    node: *mut pg_sys::CustomScanState,
    estate: *mut pg_sys::EState,
    checks: *mut pg_sys::List,
) -> *mut pg_sys::ResultRelInfo {
    // SAFETY: as ExecInitModifyTable prepares its result relation's check options: the
    // relation is the one our scan opened, the expressions are initialised under our node.
    unsafe {
        let info = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            .cast::<pg_sys::ResultRelInfo>();
        let cscan = (*node).ss.ps.plan.cast::<pg_sys::CustomScan>();
        pg_sys::InitResultRelInfo(
            info,
            (*node).ss.ss_currentRelation,
            (*cscan).scan.scanrelid,
            std::ptr::null_mut(),
            (*estate).es_instrument,
        );
        let mut states = pgrx::PgList::<pg_sys::ExprState>::new();
        for check in pgrx::PgList::<pg_sys::WithCheckOption>::from_pg(checks).iter_ptr() {
            states.push(pg_sys::ExecInitQual(
                (*check).qual.cast(),
                &mut (*node).ss.ps,
            ));
        }
        (*info).ri_WithCheckOptions = checks;
        (*info).ri_WithCheckOptionExprs = states.into_pg();
        info
    }
}

/// Raises PostgreSQL's own error when the new row in `slot` fails a policy check of
/// `policy_kind` or a view's check option (`checks`: see [`result_relation`]).
pub(crate) unsafe fn check_new_row(
    node: *mut pg_sys::CustomScanState,
    checks: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    policy_kind: pg_sys::WCOKind::Type,
) {
    if !has_checks(checks) {
        return;
    }
    // SAFETY: checks was prepared by result_relation for this node's estate; slot holds a row
    // of the result relation.
    unsafe {
        let estate = (*node).ss.ps.state;
        for kind in [policy_kind, pg_sys::WCOKind::WCO_VIEW_CHECK] {
            pg_sys::ExecWithCheckOptions(kind, checks, slot, estate);
        }
        let per_tuple = (*estate).es_per_tuple_exprcontext;
        if !per_tuple.is_null() {
            pg_sys::MemoryContextReset((*per_tuple).ecxt_per_tuple_memory);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn end(node: *mut pg_sys::CustomScanState) {
    // SAFETY: ends the child plans we initialised in begin(); the AFTER events have fired.
    unsafe {
        if let Some(triggers) = runtime_of(node).triggers.as_mut() {
            triggers.close();
        }
        for child in pgrx::PgList::<pg_sys::PlanState>::from_pg((*node).custom_ps).iter_ptr() {
            pg_sys::ExecEndNode(child);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn rescan(_node: *mut pg_sys::CustomScanState) {}

#[pg_guard]
unsafe extern "C-unwind" fn explain(
    node: *mut pg_sys::CustomScanState,
    _ancestors: *mut pg_sys::List,
    es: *mut pg_sys::ExplainState,
) {
    // SAFETY: texts are copied into EXPLAIN's output by ExplainPropertyText.
    unsafe {
        let text = |label: &CStr, value: &str| {
            let value = CString::new(value).unwrap_or_default();
            pg_sys::ExplainPropertyText(label.as_ptr(), value.as_ptr(), es);
        };
        let runtime = runtime_of(node);
        match runtime.plan.kind {
            ModifyKind::Insert if !runtime.plan.insert_select.is_empty() => {
                text(
                    c"Pushdown",
                    "each fragment inserts its rows into the co-located shard",
                );
                let child = pg_sys::list_nth((*node).custom_ps, 0).cast::<pg_sys::PlanState>();
                let scan = distributed_scan_state(child);
                let work = insert_statements(scan, &runtime.plan.insert_select, runtime.plan.relid);
                if let Some((sql, _)) = work.first().and_then(|(_, jobs)| jobs.first()) {
                    text(c"Statement", &sql.literal());
                }
            }
            ModifyKind::Insert => {
                text(
                    c"Routing",
                    "each row to the shard of its distribution value",
                );
                if !runtime.plan.on_conflict.is_empty() {
                    text(c"On Conflict", &runtime.plan.on_conflict);
                }
            }
            _ => {
                // Broadcast rows would drown the statement's text: it shows empty arrays.
                let broadcast = runtime.broadcast.take();
                let (work, _) = statements(node, runtime);
                runtime.broadcast = broadcast;
                // Under ANALYZE, the fragments that ran (a MERGE skips shards without
                // source rows).
                let ran = runtime
                    .broadcast
                    .is_some()
                    .then(|| statements(node, runtime).0);
                let counted = ran.as_ref().unwrap_or(&work);
                let count: usize = counted.iter().map(|(_, jobs)| jobs.len()).sum();
                text(
                    c"Fragments",
                    &format!("{count} on {} node(s)", counted.len()),
                );
                if !runtime.plan.row_source.is_empty() {
                    text(
                        c"Row Triggers",
                        "each fragment locks and returns its rows; the triggers fire on the \
                         coordinator, then the rows are written by their ctid",
                    );
                }
                for read in &runtime.plan.broadcasts {
                    let name = match read.relid == pg_sys::InvalidOid {
                        _ if !read.with_query.is_empty() => {
                            format!("the rows of WITH query {}", read.with_query).into()
                        }
                        true => "the source query".into(),
                        false => CStr::from_ptr(pg_sys::get_rel_name(read.relid)).to_string_lossy(),
                    };
                    let how = match (read.partitioned, runtime.plan.kind) {
                        (true, ModifyKind::Merge) => {
                            "each shard's statement gets the rows whose key hashes to it, a \
                             shard without any gets none"
                        }
                        (true, _) => "each shard's statement gets the rows whose key hashes to it",
                        (false, _) => "every shard's statement gets all of them",
                    };
                    text(
                        c"Broadcast",
                        &format!("{name}: read first; {how} (arrays shown empty below)"),
                    );
                }
                if let Some((_, jobs)) = work.first() {
                    if let Some((sql, _)) = jobs.first() {
                        text(c"Fragment", &sql.literal());
                    }
                }
            }
        }
    }
}
