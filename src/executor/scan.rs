//! The Distributed Scan node: reads the shards of one distributed or reference table.
//!
//! At the first fetch it prunes shards by the value of a `$n` parameter when the plan says so,
//! builds one fragment per shard — `SELECT <needed columns> FROM <shard> WHERE <shipped clauses>`,
//! preceded by the session settings that change how values are written and read — and starts
//! them on every node at once. Rows arrive as text and become Datums through the column types'
//! input functions, on the backend's thread. Local filters and projection are PostgreSQL's
//! (ExecScan).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::cluster::target_for;
use crate::distribution::hashing;
use crate::distribution::shell::with_suffix;
use crate::error::raise;
use crate::executor::fragments::{FragmentSql, FragmentStream, TextRow};
use crate::executor::merge::SortedMerge;
use crate::executor::rescan_cache::RescanCache;
use crate::metadata::cache;
use crate::planner::modify_plan::INSERT_TARGET_RTI;
use crate::planner::scan_path::{from_list, ScanPlan, SCAN_NAME};
use crate::planner::shippable::{
    BROADCAST_BASE, COORDINATOR_VALUE_BASE, EXEC_PARAM_BASE, RELATION_BASE,
};
use crate::remote::quote::{quote_identifier, quote_literal, quote_qualified, replace_dollar_refs};
use crate::remote::NodeAddress;

static mut SCAN_METHODS: pg_sys::CustomScanMethods = pg_sys::CustomScanMethods {
    CustomName: SCAN_NAME.as_ptr(),
    CreateCustomScanState: Some(create_state),
};

static mut EXEC_METHODS: pg_sys::CustomExecMethods = pg_sys::CustomExecMethods {
    CustomName: SCAN_NAME.as_ptr(),
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
struct DistributedScanState {
    css: pg_sys::CustomScanState,
    runtime: *mut ScanRuntime,
}

/// How to turn one fetched text value into a Datum.
struct ColumnInput {
    /// 0-based index into the slot.
    slot_index: usize,
    finfo: Box<pg_sys::FmgrInfo>,
    io_param: pg_sys::Oid,
    typmod: i32,
}

struct ScanRuntime {
    plan: ScanPlan,
    relid: pg_sys::Oid,
    /// The expressions behind `$<COORDINATOR_VALUE_BASE + i>`, ready to evaluate.
    coordinator_values: Vec<*mut pg_sys::ExprState>,
    inputs: Vec<ColumnInput>,
    stream: Option<FragmentStream>,
    /// ORDER BY without LIMIT: the merge of the sorted streams (`ScanPlan::merge_keys`).
    merge: Option<SortedMerge>,
    /// The rows of the tables the scan broadcasts (`ScanPlan::broadcasts`), once read.
    broadcast: Option<BroadcastRows>,
    /// The executor expects rescans and the fragments read the same rows each time: the rows
    /// are kept.
    rows_stay: bool,
    /// Those rows (`rescan_cache.rs`).
    cache: Option<RescanCache>,
}

impl ScanRuntime {
    fn new(plan: ScanPlan) -> ScanRuntime {
        ScanRuntime {
            relid: plan.relid,
            plan,
            coordinator_values: Vec::new(),
            inputs: Vec::new(),
            stream: None,
            merge: None,
            broadcast: None,
            rows_stay: false,
            cache: None,
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn create_state(cscan: *mut pg_sys::CustomScan) -> *mut pg_sys::Node {
    // SAFETY: allocates our node in the current (executor) memory context, tagged as a
    // CustomScanState whose first member is the CustomScanState PostgreSQL expects.
    unsafe {
        let state = pg_sys::palloc0(std::mem::size_of::<DistributedScanState>())
            .cast::<DistributedScanState>();
        (*state).css.ss.ps.type_ = pg_sys::NodeTag::T_CustomScanState;
        (*state).css.methods = &raw const EXEC_METHODS;
        (*state).css.flags = (*cscan).flags;
        let plan = ScanPlan::decode(&from_list((*cscan).custom_private));
        // Freed with the query's memory, also when the query fails.
        (*state).runtime = super::alloc_for_context(ScanRuntime::new(plan));
        state.cast()
    }
}

unsafe fn runtime_of<'a>(node: *mut pg_sys::CustomScanState) -> &'a mut ScanRuntime {
    // SAFETY: node was created by create_state; the runtime lives as long as the query memory.
    unsafe { &mut *(*node.cast::<DistributedScanState>()).runtime }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(
    node: *mut pg_sys::CustomScanState,
    _estate: *mut pg_sys::EState,
    eflags: i32,
) {
    // SAFETY: the scan relation is open (scanrelid > 0); we read its descriptor.
    unsafe {
        let runtime = runtime_of(node);
        let relation = (*node).ss.ss_currentRelation;
        runtime.relid = if relation.is_null() {
            runtime.plan.relid
        } else {
            (*relation).rd_id
        };
        let mut volatile = false;
        if !runtime.plan.coordinator_values.is_empty() {
            let text = CString::new(runtime.plan.coordinator_values.as_str()).unwrap_or_default();
            let values = pg_sys::stringToNode(text.as_ptr()).cast::<pg_sys::List>();
            volatile = pg_sys::contain_volatile_functions(values.cast());
            runtime.coordinator_values = pgrx::PgList::<pg_sys::Expr>::from_pg(values)
                .iter_ptr()
                .map(|expr| pg_sys::ExecInitExpr(expr, &mut (*node).ss.ps))
                .collect();
        }
        // Kept only where the executor expects rescans (a nested loop's inner side without
        // parameters from the outer one, a subplan run again), as a Material node keeps them.
        let plan = &runtime.plan;
        runtime.rows_stay = eflags & pg_sys::EXEC_FLAG_REWIND as i32 != 0
            && !volatile
            && plan.exec_params.is_empty()
            && plan.broadcasts.iter().all(|b| b.exec_params.is_empty());
        // The scan tuple: the table's columns, or the pushed-down aggregate's output.
        let tupdesc = (*(*node).ss.ss_ScanTupleSlot).tts_tupleDescriptor;
        runtime.inputs = runtime
            .plan
            .columns
            .iter()
            .map(|attno| {
                let attribute = (*tupdesc).attrs.as_ptr().add(*attno as usize - 1);
                let (finfo, io_param) = crate::executor::input_function((*attribute).atttypid);
                ColumnInput {
                    slot_index: *attno as usize - 1,
                    finfo,
                    io_param,
                    typmod: (*attribute).atttypmod,
                }
            })
            .collect();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn exec(
    node: *mut pg_sys::CustomScanState,
) -> *mut pg_sys::TupleTableSlot {
    // SAFETY: ExecScan drives our access method and applies local quals and projection.
    unsafe { pg_sys::ExecScan(&mut (*node).ss, Some(next_tuple), Some(recheck)) }
}

#[pg_guard]
unsafe extern "C-unwind" fn recheck(
    _node: *mut pg_sys::ScanState,
    _slot: *mut pg_sys::TupleTableSlot,
) -> bool {
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn next_tuple(
    scan: *mut pg_sys::ScanState,
) -> *mut pg_sys::TupleTableSlot {
    // SAFETY: scan is our CustomScanState (ss is its first member); the slot belongs to it.
    unsafe {
        let node = scan.cast::<pg_sys::CustomScanState>();
        let runtime = runtime_of(node);
        let slot = (*scan).ss_ScanTupleSlot;
        if let Some(cache) = runtime.cache.as_mut().filter(|c| c.replaying()) {
            if let Some(row) = cache.next(slot) {
                return row;
            }
            if cache.complete() {
                return pg_sys::ExecClearTuple(slot);
            }
            // Past the kept rows of an unfinished first pass: the fragments go on.
        }
        if runtime.rows_stay && runtime.stream.is_none() {
            let tupdesc = (*slot).tts_tupleDescriptor;
            runtime.cache = Some(RescanCache::new((*scan).ps.state, tupdesc));
        }
        let slot = fetch(scan);
        if let Some(cache) = runtime.cache.as_mut() {
            cache.keep(slot);
        }
        slot
    }
}

/// The next row of the fragments.
unsafe fn fetch(scan: *mut pg_sys::ScanState) -> *mut pg_sys::TupleTableSlot {
    // SAFETY: as next_tuple.
    unsafe {
        let node = scan.cast::<pg_sys::CustomScanState>();
        let runtime = runtime_of(node);
        let slot = (*scan).ss_ScanTupleSlot;
        let per_tuple_memory = (*(*scan).ps.ps_ExprContext).ecxt_per_tuple_memory;
        if runtime.stream.is_none() {
            let stream = start(runtime, node);
            if !runtime.plan.merge_keys.is_empty() {
                let old = pg_sys::MemoryContextSwitchTo((*(*scan).ps.state).es_query_cxt);
                match runtime.merge.as_mut() {
                    Some(merge) => merge.restart(stream.stream_count()),
                    None => {
                        runtime.merge = Some(SortedMerge::new(
                            &runtime.plan.merge_keys,
                            (*slot).tts_tupleDescriptor,
                            stream.stream_count(),
                        ))
                    }
                }
                pg_sys::MemoryContextSwitchTo(old);
            }
            runtime.stream = Some(stream);
        }
        let ScanRuntime {
            stream: Some(stream),
            inputs,
            merge,
            ..
        } = runtime
        else {
            return pg_sys::ExecClearTuple(slot);
        };
        if let Some(merge) = merge {
            let next = merge.next(|index, head| match stream.next_from(index) {
                Ok(Some(row)) => {
                    store_row(inputs, head, row, per_tuple_memory);
                    // The row must outlive per-tuple memory while other streams move on.
                    if let Some(materialize) = (*(*head).tts_ops).materialize {
                        materialize(head);
                    }
                    true
                }
                Ok(None) => false,
                Err(err) => raise(err),
            });
            return next.unwrap_or_else(|| pg_sys::ExecClearTuple(slot));
        }
        match stream.next() {
            Ok(Some(row)) => store_row(inputs, slot, row, per_tuple_memory),
            Ok(None) => pg_sys::ExecClearTuple(slot),
            Err(err) => raise(err),
        }
    }
}

/// Stores one fetched row in `slot`, its values converted by the column types' input
/// functions in `memory`.
unsafe fn store_row(
    inputs: &mut [ColumnInput],
    slot: *mut pg_sys::TupleTableSlot,
    row: crate::executor::fragments::TextRow,
    memory: pg_sys::MemoryContext,
) -> *mut pg_sys::TupleTableSlot {
    // SAFETY: slot has the scan's descriptor, which `inputs` index.
    unsafe {
        pg_sys::ExecClearTuple(slot);
        let natts = (*(*slot).tts_tupleDescriptor).natts as usize;
        let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
        let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
        nulls.fill(true);
        let old = pg_sys::MemoryContextSwitchTo(memory);
        for (input, value) in inputs.iter_mut().zip(row) {
            if let Some(text) = value {
                let text = CString::new(text).unwrap_or_default();
                values[input.slot_index] = pg_sys::InputFunctionCall(
                    &mut *input.finfo,
                    text.as_ptr().cast_mut(),
                    input.io_param,
                    input.typmod,
                );
                nulls[input.slot_index] = false;
            }
        }
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::ExecStoreVirtualTuple(slot)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn end(node: *mut pg_sys::CustomScanState) {
    // SAFETY: drops the remote work of this scan (cancelling what still runs).
    unsafe {
        let runtime = runtime_of(node);
        runtime.stream = None;
        runtime.merge = None;
        if let Some(cache) = runtime.cache.take() {
            cache.end();
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn rescan(node: *mut pg_sys::CustomScanState) {
    // SAFETY: the next fetch replays the kept rows or starts the fragments again (parameters
    // may have changed).
    unsafe {
        let runtime = runtime_of(node);
        // Kept rows are replayed; an unfinished first pass goes on after them.
        if let Some(cache) = runtime.cache.as_mut() {
            if cache.complete() || runtime.stream.is_some() {
                cache.rewind();
                pg_sys::ExecScanReScan(&mut (*node).ss);
                return;
            }
        }
        if let Some(cache) = runtime.cache.take() {
            cache.end();
        }
        runtime.stream = None;
        if runtime
            .plan
            .broadcasts
            .iter()
            .any(|b| !b.exec_params.is_empty())
        {
            runtime.broadcast = None;
        }
        pg_sys::ExecScanReScan(&mut (*node).ss);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn explain(
    node: *mut pg_sys::CustomScanState,
    _ancestors: *mut pg_sys::List,
    es: *mut pg_sys::ExplainState,
) {
    // SAFETY: EXPLAIN runs begin() first, so the relation is known; texts are copied into
    // EXPLAIN's output by ExplainPropertyText.
    unsafe {
        let text = |label: &CStr, value: &str| {
            let value = CString::new(value).unwrap_or_default();
            pg_sys::ExplainPropertyText(label.as_ptr(), value.as_ptr(), es);
        };
        // A property with several values: a line each in text, one list in JSON, XML or YAML
        // (where a repeated key would lose all but one value).
        let lines = |label: &CStr, values: &[String]| {
            if values.is_empty() {
                return;
            }
            if (*es).format == pg_sys::ExplainFormat::EXPLAIN_FORMAT_TEXT {
                for value in values {
                    text(label, value);
                }
                return;
            }
            let mut list = pgrx::PgList::<std::ffi::c_char>::new();
            for value in values {
                let value = CString::new(value.as_str()).unwrap_or_default();
                list.push(pg_sys::pstrdup(value.as_ptr()));
            }
            pg_sys::ExplainPropertyList(label.as_ptr(), list.into_pg(), es);
        };
        let runtime = runtime_of(node);
        // Broadcast rows would drown the fragment's text: it shows empty arrays instead.
        let broadcast = runtime.broadcast.take();
        let (work, nodes) = fragments(runtime, node, None);
        runtime.broadcast = broadcast;
        let count: usize = work.iter().map(|(_, f)| f.len()).sum();
        text(c"Fragments", &format!("{count} on {nodes} node(s)"));
        if !runtime.plan.statement_sql.is_empty() {
            text(
                c"Router",
                "fast path, the whole statement runs on one shard",
            );
        }
        let (mut repartitioned, mut broadcast) = (Vec::new(), Vec::new());
        for (index, read) in runtime.plan.broadcasts.iter().enumerate() {
            let rows = match &runtime.broadcast {
                Some(read) => format!("{} rows", read.counts[index]),
                None => "its rows".to_string(),
            };
            let name = CStr::from_ptr(pg_sys::get_rel_name(read.relid)).to_string_lossy();
            if read.partitioned {
                repartitioned.push(format!("{name}: {rows} read first, each sent as arrays only to the fragment of the shard its join key hashes to (shown empty below)"));
            } else {
                broadcast.push(format!("{name}: {rows} read first and sent with every fragment as arrays (shown empty below)"));
            }
        }
        lines(c"Repartitioned", &repartitioned);
        lines(c"Broadcast", &broadcast);
        let Some((target, first)) = work
            .first()
            .and_then(|(t, f)| f.first().map(|sql| (t, sql.literal())))
        else {
            return;
        };
        text(c"Fragment", &first);
        if let Some(order) = merge_order(&runtime.plan) {
            text(
                c"Merge",
                &format!("each connection's fragments sorted by ORDER BY {order}, streams merged"),
            );
        }
        if (*es).verbose || (*es).analyze {
            // The plan the worker makes for that fragment.
            let explain = format!("EXPLAIN (COSTS OFF) {first}");
            if let Some(Ok(messages)) =
                crate::remote::run_on_each(std::slice::from_ref(target), &explain).pop()
            {
                let plan: Vec<String> = crate::remote::rows_as_text(&messages)
                    .into_iter()
                    .filter_map(|row| row.into_iter().next().flatten())
                    .collect();
                lines(c"Remote Plan", &plan);
            }
        }
        if (*es).analyze {
            let stats = runtime
                .stream
                .as_ref()
                .map(|s| s.stats.clone())
                .unwrap_or_default();
            let mut per_node: BTreeMap<i32, (usize, u64, f64, f64)> = BTreeMap::new();
            for stat in &stats {
                let entry = per_node.entry(stat.node_id).or_default();
                let ms = stat.elapsed.as_secs_f64() * 1000.0;
                *entry = (
                    entry.0 + stat.fragments,
                    entry.1 + stat.rows,
                    entry.2.max(ms),
                    entry.3 + ms,
                );
            }
            let timings: Vec<String> = per_node
                .into_iter()
                .map(|(node_id, (fragments, rows, slowest, total))| {
                    format!("node {node_id}: {fragments} fragment(s), {rows} rows, slowest {slowest:.3} ms, total {total:.3} ms")
                })
                .collect();
            lines(c"Fragment Timings", &timings);
        }
    }
}

/// The value and type of `$id`: a statement parameter, or (above EXEC_PARAM_BASE) an executor
/// parameter, whose init plan runs first if needed. None for NULL or unknown.
unsafe fn param_datum(
    node: *mut pg_sys::CustomScanState,
    exec_params: &[(i32, pg_sys::Oid)],
    coordinator_values: &[*mut pg_sys::ExprState],
    id: i32,
) -> Option<(pg_sys::Oid, pg_sys::Datum)> {
    // SAFETY: node is a running scan; ids index the statement's or the executor's parameters,
    // or the expressions the coordinator computes (initialised under this node).
    unsafe {
        let econtext = (*node).ss.ps.ps_ExprContext;
        if (COORDINATOR_VALUE_BASE..BROADCAST_BASE).contains(&id) {
            let state = *coordinator_values.get((id - COORDINATOR_VALUE_BASE) as usize)?;
            let mut isnull = false;
            let value = (*state).evalfunc?(state, econtext, &mut isnull);
            return (!isnull).then(|| (pg_sys::exprType((*state).expr.cast()), value));
        }
        if id >= EXEC_PARAM_BASE {
            let exec_id = id - EXEC_PARAM_BASE;
            let type_oid = exec_params.iter().find(|(p, _)| *p == exec_id)?.1;
            // Evaluating a Param expression runs its init plan first when it has one.
            let param =
                pg_sys::palloc0(std::mem::size_of::<pg_sys::Param>()).cast::<pg_sys::Param>();
            (*param).xpr.type_ = pg_sys::NodeTag::T_Param;
            (*param).paramkind = pg_sys::ParamKind::PARAM_EXEC;
            (*param).paramid = exec_id;
            (*param).paramtype = type_oid;
            (*param).paramtypmod = -1;
            (*param).location = -1;
            let state = pg_sys::ExecInitExpr(param.cast(), &mut (*node).ss.ps);
            let mut isnull = false;
            let value = (*state)
                .evalfunc
                .map(|eval| eval(state, econtext, &mut isnull))?;
            return (!isnull).then_some((type_oid, value));
        }
        let params = (*(*node).ss.ps.state).es_param_list_info;
        if params.is_null() || id < 1 || id > (*params).numParams {
            return None;
        }
        let mut workspace = pg_sys::ParamExternData::default();
        let param = match (*params).paramFetch {
            Some(fetch) => fetch(params, id, false, &mut workspace),
            None => (*params).params.as_mut_ptr().add(id as usize - 1),
        };
        (!param.is_null() && !(*param).isnull).then(|| ((*param).ptype, (*param).value))
    }
}

/// `$id`'s value as text with its type name, or None for NULL.
pub unsafe fn param_text(
    node: *mut pg_sys::CustomScanState,
    exec_params: &[(i32, pg_sys::Oid)],
    id: i32,
) -> Option<(String, String)> {
    // SAFETY: see param_datum and datum_text.
    unsafe {
        let (type_oid, value) = param_datum(node, exec_params, &[], id)?;
        Some(datum_text(type_oid, value))
    }
}

/// The values of the expressions the coordinator computes for a statement
/// (`shippable::with_coordinator_values`), as text with their type names (None for NULL).
pub unsafe fn evaluate_values(
    node: *mut pg_sys::CustomScanState,
    states: &[*mut pg_sys::ExprState],
) -> Vec<Option<(String, String)>> {
    // SAFETY: the expression states belong to this running node; each value is turned into
    // text at once.
    unsafe {
        let econtext = (*node).ss.ps.ps_ExprContext;
        states
            .iter()
            .map(|state| {
                let mut isnull = false;
                let value = (*(*state)).evalfunc?(*state, econtext, &mut isnull);
                (!isnull).then(|| datum_text(pg_sys::exprType((*(*state)).expr.cast()), value))
            })
            .collect()
    }
}

/// The text of `$id` in fragment SQL: a value computed here (from COORDINATOR_VALUE_BASE), or
/// a statement or executor parameter.
///
/// # Safety
/// `node` must be a running Distributed Scan or Modify (its parameters are read).
pub unsafe fn value_text(
    node: *mut pg_sys::CustomScanState,
    exec_params: &[(i32, pg_sys::Oid)],
    values: &[Option<(String, String)>],
    id: i32,
) -> Option<(String, String)> {
    if id >= COORDINATOR_VALUE_BASE {
        values
            .get((id - COORDINATOR_VALUE_BASE) as usize)
            .cloned()
            .flatten()
    } else {
        // SAFETY: see param_text.
        unsafe { param_text(node, exec_params, id) }
    }
}

/// A value as text, with the name of its type.
pub unsafe fn datum_text(type_oid: pg_sys::Oid, value: pg_sys::Datum) -> (String, String) {
    // SAFETY: output functions of the value's own type; the C strings are copied at once.
    unsafe {
        let mut output = pg_sys::InvalidOid;
        let mut varlena = false;
        pg_sys::getTypeOutputInfo(type_oid, &mut output, &mut varlena);
        let text = pg_sys::OidOutputFunctionCall(output, value);
        let type_name = pg_sys::format_type_be(type_oid);
        (
            CStr::from_ptr(text).to_string_lossy().into_owned(),
            CStr::from_ptr(type_name).to_string_lossy().into_owned(),
        )
    }
}

/// A value as SQL: `('text'::type)`, or NULL.
pub fn typed_literal(value: Option<(String, String)>) -> String {
    match value {
        Some((text, type_name)) => format!("({}::{type_name})", quote_literal(&text)),
        None => "NULL".to_string(),
    }
}

/// `sql` with each distinct statement or executor parameter `$n` (not a relation or
/// broadcast placeholder) renumbered `$1`, `$2`, … in order of first use, and their values as
/// typed literals with their types; None when there is none, or one is NULL (its type
/// unknown).
fn parameterize(
    sql: &str,
    value: impl Fn(i32) -> Option<(String, String)>,
) -> Option<(String, Vec<(String, String)>)> {
    let found = std::cell::RefCell::new((Vec::<i32>::new(), Vec::new(), false));
    let body = replace_dollar_refs(sql, |id| {
        if id >= BROADCAST_BASE {
            return None;
        }
        let mut found = found.borrow_mut();
        let (ids, values, null) = &mut *found;
        let position = match ids.iter().position(|known| *known == id) {
            Some(position) => position,
            None => {
                let Some((text, type_name)) = value(id) else {
                    *null = true;
                    return None;
                };
                ids.push(id);
                values.push((typed_literal(Some((text, type_name.clone()))), type_name));
                ids.len() - 1
            }
        };
        Some(format!("${}", position + 1))
    });
    let (_, values, null) = found.into_inner();
    (!null && !values.is_empty()).then_some((body, values))
}

/// `sql` with the values known now (`value` of each `$n` below the broadcast placeholders): as
/// parameters `$1`, `$2`, … of a statement to prepare, with their values, when `prepare` and
/// no value is NULL; otherwise written in as typed literals.
pub fn values_in(
    sql: &str,
    value: impl Fn(i32) -> Option<(String, String)>,
    prepare: bool,
) -> (String, Vec<(String, String)>) {
    if let Some(parameterized) = prepare.then(|| parameterize(sql, &value)).flatten() {
        return parameterized;
    }
    let written = replace_dollar_refs(sql, |id| {
        (id < BROADCAST_BASE).then(|| typed_literal(value(id)))
    });
    (written, Vec::new())
}

/// `shard_ids` narrowed to the shard that the value of `$param` picks (param 0: unchanged).
pub unsafe fn prune_by_param(
    node: *mut pg_sys::CustomScanState,
    relid: pg_sys::Oid,
    shard_ids: Vec<i64>,
    param: i32,
    exec_params: &[(i32, pg_sys::Oid)],
    coordinator_values: &[*mut pg_sys::ExprState],
) -> Vec<i64> {
    if param == 0 {
        return shard_ids;
    }
    let shards = cache::shards(relid);
    let shard_of = |(type_oid, value): (pg_sys::Oid, pg_sys::Datum)| {
        let index =
            hashing::hash_shard_index(hashing::hash_datum(type_oid, value)?, shards.len() as i32);
        shards.iter().find(|(_, i)| *i == index).map(|(id, _)| *id)
    };
    // SAFETY: node is a running scan; see param_datum. A negative `param` is an array.
    let targets: Vec<i64> = unsafe {
        match param_datum(node, exec_params, coordinator_values, param.abs()) {
            None => Vec::new(),
            Some(value) if param > 0 => shard_of(value).into_iter().collect(),
            Some((_, array)) => crate::planner::scan_path::array_elements(array)
                .1
                .into_iter()
                .filter_map(shard_of)
                .collect(),
        }
    };
    shard_ids
        .into_iter()
        .filter(|s| targets.contains(s))
        .collect()
}

/// The text of every fragment, with `$<RELATION_BASE + rti>` for the shards read.
fn fragment_sql(plan: &ScanPlan, relid: pg_sys::Oid) -> String {
    if !plan.statement_sql.is_empty() {
        return plan.statement_sql.clone();
    }
    let (select, from) = if !plan.from_sql.is_empty() {
        (plan.select_sql.clone(), plan.from_sql.clone())
    } else if !plan.select_sql.is_empty() {
        (
            plan.select_sql.clone(),
            format!("${RELATION_BASE}{}", plan.sample),
        )
    } else {
        let columns = plan.columns.iter().map(|attno| {
            // SAFETY: a catalog lookup of a column of the scanned table.
            let name = unsafe { CStr::from_ptr(pg_sys::get_attname(relid, *attno, false)) };
            quote_identifier(&name.to_string_lossy())
        });
        (
            columns.collect::<Vec<_>>().join(", "),
            format!("${RELATION_BASE}{}", plan.sample),
        )
    };
    let distinct = if plan.distinct { "DISTINCT " } else { "" };
    let mut sql = format!("SELECT {distinct}{select} FROM {from}");
    for (keyword, text) in [
        ("WHERE", &plan.where_sql),
        ("GROUP BY", &plan.group_by),
        ("HAVING", &plan.having),
        ("ORDER BY", &plan.order_by),
        ("LIMIT", &plan.limit),
    ] {
        if !text.is_empty() {
            sql.push_str(&format!(" {keyword} {text}"));
        }
    }
    if !plan.row_lock.is_empty() {
        sql.push_str(&format!(" {}", plan.row_lock));
    }
    sql
}

/// One entry per node: its target and the fragments to run there. With `insert`, each fragment
/// is wrapped in the statement of a pushed-down INSERT … SELECT into that table
/// (`ModifyPlan::insert_select`).
unsafe fn fragments(
    runtime: &ScanRuntime,
    node: *mut pg_sys::CustomScanState,
    insert: Option<(&str, pg_sys::Oid)>,
) -> (Vec<(crate::remote::NodeTarget, Vec<FragmentSql>)>, usize) {
    // SAFETY: catalog lookups for the scanned relations; params as in param_datum.
    unsafe {
        let plan = &runtime.plan;
        let relid = runtime.relid;
        let mut shard_ids = prune_by_param(
            node,
            relid,
            plan.shard_ids.clone(),
            plan.prune_param,
            &plan.exec_params,
            &runtime.coordinator_values,
        );
        // A whole statement still runs when its parameter matches no shard (NULL): it finds
        // no rows there, and an aggregate over no rows still returns its one row.
        if shard_ids.is_empty() && !plan.statement_sql.is_empty() {
            shard_ids.extend(plan.shard_ids.first());
        }
        let values = evaluate_values(node, &runtime.coordinator_values);
        let value = |id| value_text(node, &plan.exec_params, &values, id);
        // The SQL of every fragment, shard and broadcast placeholders filled in per shard;
        // values go as parameters of a prepared statement, except next to broadcast arrays and
        // into INSERT … SELECT.
        let prepare = plan.broadcasts.is_empty() && insert.is_none();
        let (mut template, params) = values_in(&fragment_sql(plan, relid), value, prepare);
        let result_types = if params.is_empty() {
            String::new()
        } else {
            column_types(node, &plan.columns)
        };
        // (range-table index, shards by index) of every table read; the scanned table alone
        // is index 0.
        let mut relations: Vec<(u32, ShardNames)> = if plan.relations.is_empty() {
            vec![(0, ShardNames::of(relid))]
        } else {
            plan.relations
                .iter()
                .map(|(rti, oid)| (*rti, ShardNames::of(*oid)))
                .collect()
        };
        if let Some((statement, target)) = insert {
            template = statement.replacen("{fragment}", &template, 1);
            relations.push((INSERT_TARGET_RTI, ShardNames::of(target)));
        }
        let anchor_shards = cache::shards(relid);
        let placements = cache::placements(relid);
        let mut per_node: BTreeMap<i32, (NodeAddress, Vec<FragmentSql>)> = BTreeMap::new();
        for shard_id in &shard_ids {
            // The first placement (lowest node id) of each shard serves reads.
            let Some(placement) = placements.iter().find(|p| p.shard_id == *shard_id) else {
                continue;
            };
            let Some(index) = anchor_shards
                .iter()
                .find(|(id, _)| id == shard_id)
                .map(|s| s.1)
            else {
                continue;
            };
            let sql = replace_dollar_refs(&template, |id| {
                if id < RELATION_BASE {
                    let rows = runtime.broadcast.as_ref();
                    let array = broadcast_value(&plan.broadcasts, rows, id, Some(index));
                    return (id >= BROADCAST_BASE).then(|| typed_literal(array));
                }
                let rti = u32::try_from(id - RELATION_BASE).ok()?;
                let (_, names) = relations.iter().find(|(r, _)| *r == rti)?;
                names.at(index)
            });
            per_node
                .entry(placement.node.node_id)
                .or_insert_with(|| (placement.node.clone(), Vec::new()))
                .1
                .push(FragmentSql {
                    sql,
                    params: params.clone(),
                    result_types: result_types.clone(),
                });
        }
        let work = per_node
            .into_values()
            .map(|(node, sqls)| (target_for(node).unwrap_or_else(|e| raise(e)), sqls))
            .collect::<Vec<_>>();
        let count = work.len();
        (work, count)
    }
}

/// The types (and typmods) of scan tuple columns `columns`, as text.
unsafe fn column_types(node: *mut pg_sys::CustomScanState, columns: &[i16]) -> String {
    // SAFETY: the scan slot's descriptor has every column the plan fetches.
    unsafe {
        let tupdesc = (*(*node).ss.ss_ScanTupleSlot).tts_tupleDescriptor;
        let types: Vec<String> = columns
            .iter()
            .map(|attno| {
                let attribute = (*tupdesc).attrs.as_ptr().add(*attno as usize - 1);
                format!(
                    "{}:{}",
                    u32::from((*attribute).atttypid),
                    (*attribute).atttypmod
                )
            })
            .collect();
        types.join(",")
    }
}

/// A pushed-down INSERT … SELECT: the child scan `node`'s fragments, each wrapped in
/// `statement` (`ModifyPlan::insert_select`) so that it writes its rows into the co-located
/// shard of `target`; by node, each marked as counting its rows.
pub unsafe fn insert_statements(
    node: *mut pg_sys::CustomScanState,
    statement: &str,
    target: pg_sys::Oid,
) -> Vec<(NodeAddress, Vec<(FragmentSql, bool)>)> {
    // SAFETY: node is a running Distributed Scan (initialised, never read from).
    let (work, _) = unsafe {
        let runtime = runtime_of(node);
        read_broadcasts(runtime, node);
        fragments(runtime, node, Some((statement, target)))
    };
    work.into_iter()
        .map(|(target, sqls)| {
            (
                target.node,
                sqls.into_iter().map(|sql| (sql, true)).collect(),
            )
        })
        .collect()
}

/// The qualified shard names of one table, by shard index (written only for the shards read).
pub struct ShardNames {
    schema: String,
    name: String,
    reference: bool,
    /// (shard id, shard index)
    shards: Vec<(i64, i32)>,
}

impl ShardNames {
    pub fn of(relid: pg_sys::Oid) -> ShardNames {
        let (schema, name) = crate::executor::schema_and_name(relid);
        ShardNames {
            schema,
            name,
            reference: cache::lookup(relid)
                .is_some_and(|t| t.method == crate::metadata::tables::Method::Reference),
            shards: cache::shards(relid),
        }
    }

    /// The shard with index `index` (a reference table's only shard whatever the index).
    pub fn at(&self, index: i32) -> Option<String> {
        let (id, _) = if self.reference {
            self.shards.first()?
        } else {
            self.shards.iter().find(|(_, i)| *i == index)?
        };
        Some(quote_qualified(
            &self.schema,
            &with_suffix(&self.name, &id.to_string()),
        ))
    }
}

/// The `ORDER BY` of each connection's merged share, when the scan merges sorted streams.
fn merge_order(plan: &ScanPlan) -> Option<String> {
    (!plan.merge_keys.is_empty()).then(|| {
        let keys: Vec<String> = plan.merge_keys.iter().map(|k| k.order_by_text()).collect();
        keys.join(", ")
    })
}

unsafe fn start(runtime: &mut ScanRuntime, node: *mut pg_sys::CustomScanState) -> FragmentStream {
    // SAFETY: see fragments().
    let work = unsafe {
        read_broadcasts(runtime, node);
        fragments(runtime, node, None).0
    };
    start_fragments(
        work,
        !runtime.plan.row_lock.is_empty(),
        merge_order(&runtime.plan),
    )
}

/// Starts `work` on every node at once, with the session's settings.
fn start_fragments(
    work: Vec<(crate::remote::NodeTarget, Vec<FragmentSql>)>,
    row_lock: bool,
    merge_order: Option<String>,
) -> FragmentStream {
    // SAFETY: reads GUC values of this backend.
    let settings = unsafe { crate::executor::session::settings() };
    if crate::gucs::log_remote_commands() {
        for (target, sqls) in &work {
            for sql in sqls {
                pgrx::log!("pgdist: issuing on {}: {}", target.node, sql.literal());
            }
        }
    }
    FragmentStream::start(
        work,
        settings,
        crate::gucs::max_connections_per_node() as usize,
        row_lock,
        merge_order,
    )
}

/// Reads the tables the scan broadcasts, unless read already.
unsafe fn read_broadcasts(runtime: &mut ScanRuntime, node: *mut pg_sys::CustomScanState) {
    if runtime.broadcast.is_none() && !runtime.plan.broadcasts.is_empty() {
        // SAFETY: node is this running scan.
        runtime.broadcast = Some(unsafe { BroadcastRows::read(&runtime.plan.broadcasts, node) });
    }
}

/// The rows of the tables a statement broadcasts (`ScanPlan::broadcasts`): each column's
/// values as array literals, in `$<BROADCAST_BASE + i>` order.
pub struct BroadcastRows {
    arrays: Vec<ColumnArrays>,
    /// Rows read, per table.
    counts: Vec<usize>,
}

/// One broadcast column's values.
enum ColumnArrays {
    /// One array that every fragment gets.
    Every(String),
    /// A repartitioned table's (`ScanPlan::partitioned`): by shard index, the array of the
    /// rows that belong to that shard's fragment.
    ByShard(HashMap<i32, String>),
}

impl BroadcastRows {
    /// Runs the scans `reads` on the workers now (a local table or a query is read on the
    /// coordinator).
    ///
    /// # Safety
    /// `node` must be a running Distributed Scan or Modify: it supplies the parameters.
    pub unsafe fn read(reads: &[ScanPlan], node: *mut pg_sys::CustomScanState) -> BroadcastRows {
        let mut arrays = Vec::new();
        let mut counts = Vec::new();
        let mut children = 0;
        for read in reads {
            let mut next_row: Box<dyn FnMut() -> Option<TextRow>> = if !read.with_query.is_empty() {
                // SAFETY: a Distributed Modify has an initialised child scan per WITH
                // query it reads, in the order of its reads.
                let child = unsafe { pg_sys::list_nth((*node).custom_ps, children) };
                children += 1;
                // SAFETY: as above.
                let mut rows = unsafe { child_rows(child.cast()) }.into_iter();
                Box::new(move || rows.next())
            } else if cache::lookup(read.relid).is_none() {
                // SAFETY: the statement holds a lock on the table.
                let mut rows = unsafe { local_rows(read, node) }.into_iter();
                Box::new(move || rows.next())
            } else {
                let table = ScanRuntime::new(read.clone());
                // SAFETY: the broadcast's parameters are those of the running node.
                let (work, _) = unsafe { fragments(&table, node, None) };
                let mut stream = start_fragments(work, false, None);
                Box::new(move || stream.next().unwrap_or_else(|err| raise(err)))
            };
            // Array literals under construction, per shard index (-1: every fragment's).
            let mut open: HashMap<i32, Vec<String>> = HashMap::new();
            let mut rows = 0;
            while let Some(mut row) = next_row() {
                rows += 1;
                let shard_index = if read.partitioned {
                    // The last value is the row's shard index; none (a NULL key) matches
                    // nothing, so the row goes nowhere.
                    match row.pop().flatten().and_then(|index| index.parse().ok()) {
                        Some(index) => index,
                        None => continue,
                    }
                } else {
                    -1
                };
                let columns = open
                    .entry(shard_index)
                    .or_insert_with(|| vec![String::from("{"); read.columns.len()]);
                for (array, value) in columns.iter_mut().zip(row) {
                    if array.len() > 1 {
                        array.push(',');
                    }
                    push_array_element(array, value.as_deref());
                }
            }
            for column in 0..read.columns.len() {
                let mut by_shard: HashMap<i32, String> = open
                    .iter_mut()
                    .map(|(index, columns)| {
                        let mut array = std::mem::take(&mut columns[column]);
                        array.push('}');
                        (*index, array)
                    })
                    .collect();
                arrays.push(if read.partitioned {
                    ColumnArrays::ByShard(by_shard)
                } else {
                    ColumnArrays::Every(by_shard.remove(&-1).unwrap_or_else(|| "{}".into()))
                });
            }
            counts.push(rows);
        }
        BroadcastRows { arrays, counts }
    }

    /// True when every table of `reads` (those read into these rows) has rows for the
    /// fragment of shard `shard_index`.
    pub fn feed(&self, reads: &[ScanPlan], shard_index: i32) -> bool {
        let mut first_column = 0;
        for (read, count) in reads.iter().zip(&self.counts) {
            let fed = match self.arrays.get(first_column) {
                Some(ColumnArrays::ByShard(by_shard)) => by_shard.contains_key(&shard_index),
                _ => *count > 0,
            };
            if !fed {
                return false;
            }
            first_column += read.columns.len();
        }
        true
    }
}

/// The rows of `read` — a table of the coordinator itself, or a query it runs (`relid`
/// invalid) with the parameters of the running `node` — in the running statement's snapshot
/// (read-only SPI takes no new one), each column as its output function writes it.
/// Every row `child` returns, as text (running it to its end).
///
/// # Safety
/// `child` must be an initialised plan state of the running statement.
unsafe fn child_rows(child: *mut pg_sys::PlanState) -> Vec<TextRow> {
    // SAFETY: the slots the child returns stay valid until its next row; each value is turned
    // into text (by its type's output function) before that.
    unsafe {
        let mut rows = Vec::new();
        let mut outputs: Vec<(pg_sys::Oid, bool)> = Vec::new();
        loop {
            let Some(exec) = (*child).ExecProcNode else {
                break;
            };
            let slot = exec(child);
            if slot.is_null() || (*slot).tts_flags & pg_sys::TTS_FLAG_EMPTY as u16 != 0 {
                break;
            }
            pg_sys::slot_getallattrs(slot);
            let desc = (*slot).tts_tupleDescriptor;
            let natts = (*desc).natts as usize;
            if outputs.is_empty() {
                for i in 0..natts {
                    let attribute = (*desc).attrs.as_ptr().add(i);
                    let (mut function, mut varlena) = (pg_sys::InvalidOid, false);
                    pg_sys::getTypeOutputInfo((*attribute).atttypid, &mut function, &mut varlena);
                    outputs.push((function, varlena));
                }
            }
            let mut row = Vec::with_capacity(natts);
            for (i, (function, _)) in outputs.iter().enumerate() {
                if *(*slot).tts_isnull.add(i) {
                    row.push(None);
                    continue;
                }
                let text = pg_sys::OidOutputFunctionCall(*function, *(*slot).tts_values.add(i));
                row.push(Some(CStr::from_ptr(text).to_string_lossy().into_owned()));
            }
            rows.push(row);
        }
        rows
    }
}

unsafe fn local_rows(read: &ScanPlan, node: *mut pg_sys::CustomScanState) -> Vec<TextRow> {
    // SAFETY: SPI is connected and finished around the query; values are copied out before.
    // The parameters are read from the running node's executor state.
    unsafe {
        let (sql, what) = if read.relid == pg_sys::InvalidOid {
            (read.statement_sql.clone(), "the source query".to_string())
        } else {
            let select = if read.select_sql.is_empty() {
                read.columns
                    .iter()
                    .map(|attno| {
                        let name = CStr::from_ptr(pg_sys::get_attname(read.relid, *attno, false));
                        quote_identifier(&name.to_string_lossy())
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                read.select_sql.clone()
            };
            let (schema, name) = crate::executor::schema_and_name(read.relid);
            let table = quote_qualified(&schema, &name);
            (format!("SELECT {select} FROM {table}"), table)
        };
        let sql = CString::new(sql).unwrap_or_default();
        let (mut types, mut values, nulls) = statement_params(node);
        pg_sys::SPI_connect();
        let status = pg_sys::SPI_execute_with_args(
            sql.as_ptr(),
            types.len() as i32,
            types.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_ptr(),
            true,
            0,
        );
        if status != pg_sys::SPI_OK_SELECT as i32 {
            pg_sys::SPI_finish();
            pgrx::error!("pgdist could not read {what} for the shards");
        }
        let table = pg_sys::SPI_tuptable;
        let mut rows = Vec::new();
        if !table.is_null() {
            let natts = (*(*table).tupdesc).natts;
            for i in 0..pg_sys::SPI_processed as usize {
                let tuple = *(*table).vals.add(i);
                rows.push(
                    (1..=natts)
                        .map(|column| {
                            let value = pg_sys::SPI_getvalue(tuple, (*table).tupdesc, column);
                            (!value.is_null())
                                .then(|| CStr::from_ptr(value).to_string_lossy().into_owned())
                        })
                        .collect(),
                );
            }
        }
        pg_sys::SPI_finish();
        rows
    }
}

/// The `$n` parameters of the statement `node` runs in, for SPI: types, values and nulls
/// (`'n'`); a parameter not fetched has no type (only an error if the SQL used it).
unsafe fn statement_params(
    node: *mut pg_sys::CustomScanState,
) -> (Vec<pg_sys::Oid>, Vec<pg_sys::Datum>, Vec<std::ffi::c_char>) {
    // SAFETY: the parameter list belongs to the running executor state; fetched values stay
    // valid for the statement.
    unsafe {
        let params = (*(*node).ss.ps.state).es_param_list_info;
        let count = if params.is_null() {
            0
        } else {
            (*params).numParams
        };
        let mut parts = (Vec::new(), Vec::new(), Vec::new());
        for id in 1..=count {
            let mut workspace = pg_sys::ParamExternData::default();
            let param = match (*params).paramFetch {
                Some(fetch) => fetch(params, id, false, &mut workspace),
                None => (*params).params.as_mut_ptr().add(id as usize - 1),
            };
            let (type_oid, value, null) = match param.is_null() {
                true => (pg_sys::InvalidOid, pg_sys::Datum::from(0), true),
                false => ((*param).ptype, (*param).value, (*param).isnull),
            };
            parts.0.push(type_oid);
            parts.1.push(value);
            parts
                .2
                .push(if null { b'n' } else { b' ' } as std::ffi::c_char);
        }
        parts
    }
}

/// The value of broadcast column `$id` of `reads` in the fragment of shard `shard_index`: its
/// array literal (empty when the rows are not read, as under a plain EXPLAIN) and the array
/// type's name.
pub fn broadcast_value(
    reads: &[ScanPlan],
    rows: Option<&BroadcastRows>,
    id: i32,
    shard_index: Option<i32>,
) -> Option<(String, String)> {
    let index = usize::try_from(id - BROADCAST_BASE).ok()?;
    let (read, position) = reads
        .iter()
        .flat_map(|read| (0..read.columns.len()).map(move |position| (read, position)))
        .nth(index)?;
    // SAFETY: catalog lookups of a column of a table the plan reads, or of a type.
    let type_name = unsafe {
        let element_type = match read.relid == pg_sys::InvalidOid {
            true => *read.column_types.get(position)?,
            false => pg_sys::get_atttype(read.relid, read.columns[position]),
        };
        let array_type = pg_sys::get_array_type(element_type);
        CStr::from_ptr(pg_sys::format_type_be(array_type))
            .to_string_lossy()
            .into_owned()
    };
    let array = match rows.and_then(|rows| rows.arrays.get(index)) {
        Some(ColumnArrays::Every(array)) => Some(array),
        Some(ColumnArrays::ByShard(by_shard)) => shard_index.and_then(|i| by_shard.get(&i)),
        None => None,
    };
    Some((
        array.cloned().unwrap_or_else(|| "{}".to_string()),
        type_name,
    ))
}

/// Appends one element to an array literal: NULL, or the value double-quoted.
fn push_array_element(array: &mut String, value: Option<&str>) {
    let Some(value) = value else {
        array.push_str("NULL");
        return;
    };
    array.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            array.push('\\');
        }
        array.push(c);
    }
    array.push('"');
}

#[cfg(test)]
mod unit {
    use super::{parameterize, push_array_element};
    use crate::executor::fragments::FragmentSql;

    #[test]
    fn array_elements_are_quoted_and_escaped() {
        let mut array = String::from("{");
        push_array_element(&mut array, Some(r#"a "b" \c"#));
        array.push(',');
        push_array_element(&mut array, None);
        array.push(',');
        push_array_element(&mut array, Some("NULL"));
        array.push('}');
        assert_eq!(array, r#"{"a \"b\" \\c",NULL,"NULL"}"#);
    }

    #[test]
    fn parameters_are_numbered_in_order_and_written_back_as_typed_literals() {
        let value = |id: i32| match id {
            7 => Some(("it's".to_string(), "text".to_string())),
            100_003 => Some(("3".to_string(), "integer".to_string())),
            _ => None,
        };
        let sql = "(a = $7) AND (b = '$7') AND (c = $100003) AND (d = $7) FROM $300001";
        let (body, params) = parameterize(sql, value).unwrap();
        assert_eq!(
            body,
            "(a = $1) AND (b = '$7') AND (c = $2) AND (d = $1) FROM $300001"
        );
        let fragment = FragmentSql {
            sql: body,
            params,
            result_types: String::new(),
        };
        assert_eq!(
            fragment.literal(),
            "(a = ('it''s'::text)) AND (b = '$7') AND (c = ('3'::integer)) AND (d = ('it''s'::text)) FROM $300001"
        );
        // A NULL value has no type to prepare with: the fragment goes as plain SQL.
        assert!(parameterize("(a = $7) AND (e = $8)", value).is_none());
    }
}
