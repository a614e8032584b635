//! Window function pushdown: when every window of a query over one Distributed Scan (a table
//! or a pushed-down join) is partitioned by the distribution column — or the scan reads a
//! single shard — each partition lies in one fragment, so the workers compute the window
//! functions and the scan returns finished rows. Other windows are computed by PostgreSQL's
//! WindowAgg on the coordinator, which is always correct.
//!
//! Fragments spell each call out as `name(args) [FILTER (WHERE …)] OVER (PARTITION BY …
//! ORDER BY … <frame>)`; only built-in window functions and shippable arguments, keys and
//! frame offsets qualify.

use pgrx::pg_sys;
use pgrx::PgList;

use crate::planner::aggregate_path::rows_of_a_key_stay_together;
use crate::planner::scan_path::{
    all_clauses_ship, distributed_path_of, from_list, new_custom_path, pushed_down_path_methods,
    ScanPlan,
};
use crate::planner::shippable::{as_mutator, new_param, sort_key_text, ScanDeparser};
use crate::remote::quote::{quote_identifier, replace_dollar_refs};

/// While deparsing, `$<WINDOW_BASE + i>` stands for the i-th window function call.
const WINDOW_BASE: i32 = 400_000;

pub unsafe fn add_pushdown_path(
    root: *mut pg_sys::PlannerInfo,
    input_rel: *mut pg_sys::RelOptInfo,
    window_rel: *mut pg_sys::RelOptInfo,
) {
    // SAFETY: planner structures of the query being planned; new nodes in planner memory.
    unsafe {
        let parse = (*root).parse;
        let target = (*root).upper_targets[pg_sys::UpperRelationKind::UPPERREL_WINDOW as usize];
        if target.is_null()
            || (*parse).hasTargetSRFs
            || !matches!(
                (*input_rel).reloptkind,
                pg_sys::RelOptKind::RELOPT_BASEREL | pg_sys::RelOptKind::RELOPT_JOINREL
            )
        {
            return;
        }
        let Some(input) = distributed_path_of(input_rel) else {
            return;
        };
        let plan = ScanPlan::decode(&from_list((*input).custom_private));
        let all_shipped = all_clauses_ship(input_rel);
        if !all_shipped || !plan.row_lock.is_empty() {
            return;
        }
        let windows = PgList::<pg_sys::WindowClause>::from_pg((*parse).windowClause);
        if !windows
            .iter_ptr()
            .all(|w| rows_of_a_key_stay_together(root, &plan, (*w).partitionClause))
        {
            return;
        }
        let mut sql = ScanDeparser::new(root, &plan);
        let mut select = Vec::new();
        for expr in PgList::<pg_sys::Node>::from_pg((*target).exprs).iter_ptr() {
            let Some(text) = expression_text(root, &mut sql, expr) else {
                return;
            };
            select.push(text);
        }
        let plan = ScanPlan {
            select_sql: select.join(", "),
            columns: (1..=select.len() as i16).collect(),
            exec_params: sql.take_exec_params(),
            ..plan
        };
        let rows = (*input).path.rows;
        let path = new_custom_path(
            window_rel,
            target,
            rows,
            (*input).path.total_cost,
            &plan,
            pushed_down_path_methods(),
        );
        (*window_rel).pathlist = std::ptr::null_mut();
        (*window_rel).partial_pathlist = std::ptr::null_mut();
        pg_sys::add_path(window_rel, path.cast());
    }
}

struct WindowCalls {
    calls: Vec<*mut pg_sys::WindowFunc>,
}

/// `expr`, whose window function calls are written out in full, as worker SQL.
unsafe fn expression_text(
    root: *mut pg_sys::PlannerInfo,
    sql: &mut ScanDeparser,
    expr: *mut pg_sys::Node,
) -> Option<String> {
    // SAFETY: the mutator copies `expr`, putting placeholder parameters where window
    // functions were; each call is then written from its own parts.
    unsafe {
        let mut found = WindowCalls { calls: Vec::new() };
        let without_calls = take_window_calls(expr, (&raw mut found).cast());
        let text = sql.text(without_calls)?;
        let mut calls = Vec::new();
        for call in &found.calls {
            calls.push(call_text(root, sql, *call)?);
        }
        Some(replace_dollar_refs(&text, |id| {
            calls
                .get(usize::try_from(id.checked_sub(WINDOW_BASE)?).ok()?)
                .cloned()
        }))
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn take_window_calls(
    node: *mut pg_sys::Node,
    context: *mut std::ffi::c_void,
) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    // SAFETY: node is a valid expression node; context is the WindowCalls we passed.
    unsafe {
        if (*node).type_ == pg_sys::NodeTag::T_WindowFunc {
            let found = &mut *context.cast::<WindowCalls>();
            let call = node.cast::<pg_sys::WindowFunc>();
            found.calls.push(call);
            return new_param(
                pg_sys::ParamKind::PARAM_EXTERN,
                WINDOW_BASE + found.calls.len() as i32 - 1,
                (*call).wintype,
                -1,
                (*call).wincollid,
            )
            .cast();
        }
        pg_sys::expression_tree_mutator(node, Some(as_mutator(take_window_calls)), context)
    }
}

/// `name(args) [FILTER (WHERE …)] OVER (…)` for a built-in window function call.
unsafe fn call_text(
    root: *mut pg_sys::PlannerInfo,
    sql: &mut ScanDeparser,
    call: *mut pg_sys::WindowFunc,
) -> Option<String> {
    // SAFETY: parts of a valid WindowFunc; catalog lookups by oid.
    unsafe {
        if !crate::planner::shippable::builtin_for_everyone((*call).winfnoid) {
            return None;
        }
        let name = pg_sys::get_func_name((*call).winfnoid);
        if name.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr(name).to_string_lossy();
        let args = if (*call).winstar {
            "*".to_string()
        } else {
            let mut args = Vec::new();
            for arg in PgList::<pg_sys::Node>::from_pg((*call).args).iter_ptr() {
                args.push(sql.text(arg)?);
            }
            args.join(", ")
        };
        let filter = if (*call).aggfilter.is_null() {
            String::new()
        } else {
            format!(" FILTER (WHERE {})", sql.text((*call).aggfilter.cast())?)
        };
        let window = PgList::<pg_sys::WindowClause>::from_pg((*(*root).parse).windowClause)
            .iter_ptr()
            .find(|w| (**w).winref == (*call).winref)?;
        Some(format!(
            "pg_catalog.{}({args}){filter} OVER ({})",
            quote_identifier(&name),
            window_text(root, sql, window)?
        ))
    }
}

/// The inside of `OVER (…)`: partitioning, ordering and frame of `window`.
unsafe fn window_text(
    root: *mut pg_sys::PlannerInfo,
    sql: &mut ScanDeparser,
    window: *mut pg_sys::WindowClause,
) -> Option<String> {
    // SAFETY: parts of a valid WindowClause of the query being planned.
    unsafe {
        let tlist = (*(*root).parse).targetList;
        let mut parts = Vec::new();
        let mut partition = Vec::new();
        for clause in
            PgList::<pg_sys::SortGroupClause>::from_pg((*window).partitionClause).iter_ptr()
        {
            partition.push(sql.text(pg_sys::get_sortgroupclause_expr(clause, tlist).cast())?);
        }
        if !partition.is_empty() {
            parts.push(format!("PARTITION BY {}", partition.join(", ")));
        }
        let mut order = Vec::new();
        for clause in PgList::<pg_sys::SortGroupClause>::from_pg((*window).orderClause).iter_ptr() {
            order.push(sort_key_text(sql, clause, tlist)?);
        }
        if !order.is_empty() {
            parts.push(format!("ORDER BY {}", order.join(", ")));
        }
        parts.push(frame_text(sql, window)?);
        Some(parts.join(" ").trim_end().to_string())
    }
}

/// The frame clause of `window` (empty for the default frame).
unsafe fn frame_text(sql: &mut ScanDeparser, window: *mut pg_sys::WindowClause) -> Option<String> {
    // SAFETY: parts of a valid WindowClause.
    unsafe {
        let options = (*window).frameOptions as u32;
        if options & pg_sys::FRAMEOPTION_NONDEFAULT == 0 {
            return Some(String::new());
        }
        let has = |flag: u32| options & flag != 0;
        let mode = if has(pg_sys::FRAMEOPTION_RANGE) {
            "RANGE"
        } else if has(pg_sys::FRAMEOPTION_ROWS) {
            "ROWS"
        } else {
            "GROUPS"
        };
        let mut bound = |unbounded_preceding: u32,
                         unbounded_following: u32,
                         current_row: u32,
                         offset_preceding: u32,
                         offset_following: u32,
                         offset: *mut pg_sys::Node|
         -> Option<String> {
            Some(if has(unbounded_preceding) {
                "UNBOUNDED PRECEDING".to_string()
            } else if has(unbounded_following) {
                "UNBOUNDED FOLLOWING".to_string()
            } else if has(current_row) {
                "CURRENT ROW".to_string()
            } else if has(offset_preceding) {
                format!("{} PRECEDING", sql.text(offset)?)
            } else if has(offset_following) {
                format!("{} FOLLOWING", sql.text(offset)?)
            } else {
                return None;
            })
        };
        let start = bound(
            pg_sys::FRAMEOPTION_START_UNBOUNDED_PRECEDING,
            pg_sys::FRAMEOPTION_START_UNBOUNDED_FOLLOWING,
            pg_sys::FRAMEOPTION_START_CURRENT_ROW,
            pg_sys::FRAMEOPTION_START_OFFSET_PRECEDING,
            pg_sys::FRAMEOPTION_START_OFFSET_FOLLOWING,
            (*window).startOffset,
        )?;
        let end = bound(
            pg_sys::FRAMEOPTION_END_UNBOUNDED_PRECEDING,
            pg_sys::FRAMEOPTION_END_UNBOUNDED_FOLLOWING,
            pg_sys::FRAMEOPTION_END_CURRENT_ROW,
            pg_sys::FRAMEOPTION_END_OFFSET_PRECEDING,
            pg_sys::FRAMEOPTION_END_OFFSET_FOLLOWING,
            (*window).endOffset,
        )?;
        let mut text = if has(pg_sys::FRAMEOPTION_BETWEEN) {
            format!("{mode} BETWEEN {start} AND {end}")
        } else {
            format!("{mode} {start}")
        };
        if has(pg_sys::FRAMEOPTION_EXCLUDE_CURRENT_ROW) {
            text.push_str(" EXCLUDE CURRENT ROW");
        } else if has(pg_sys::FRAMEOPTION_EXCLUDE_GROUP) {
            text.push_str(" EXCLUDE GROUP");
        } else if has(pg_sys::FRAMEOPTION_EXCLUDE_TIES) {
            text.push_str(" EXCLUDE TIES");
        }
        Some(text)
    }
}
