//! The planner hook. Queries that involve no distributed or reference table go to the standard
//! planner untouched (after one cheap look at the per-backend table cache).
//!
//! The distributed executor is not built yet, so a query that reads or writes a distributed or
//! reference table is refused with 0A000 rather than answered from the coordinator's empty shell
//! table: an error is acceptable, a wrong answer is not.

use std::ffi::c_void;

use pgrx::prelude::*;

use crate::distribution::create::relation_name;
use crate::metadata::cache;

#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    #[error("queries on distributed table {0} are not supported yet")]
    ExecutorMissing(String),
}

impl crate::error::PgError for PlannerError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
    }

    fn hint(&self) -> Option<String> {
        Some(
            "This pgdist build distributes tables and their DDL; reads and writes through the \
             coordinator come with the distributed executor. Until then use \
             pgdist.run_on_workers() or pgdist.undistribute_table()."
                .into(),
        )
    }
}

static mut PREVIOUS_HOOK: pg_sys::planner_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster before any backend exists; we chain to the
    // hook that was installed before us.
    unsafe {
        PREVIOUS_HOOK = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(plan);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn plan(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: std::ffi::c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    let any_distributed = cache::with_tables(|tables| !tables.is_empty());
    if any_distributed {
        // SAFETY: parse is the query being planned, valid for this call.
        if let Some(oid) = unsafe { first_distributed_relation(parse) } {
            crate::error::raise(PlannerError::ExecutorMissing(relation_name(oid)));
        }
    }
    // SAFETY: chaining with the arguments we were given.
    unsafe {
        match PREVIOUS_HOOK {
            Some(previous) => previous(parse, query_string, cursor_options, bound_params),
            None => pg_sys::standard_planner(parse, query_string, cursor_options, bound_params),
        }
    }
}

/// The first distributed or reference table anywhere in `query` (subqueries, CTEs, sublinks).
unsafe fn first_distributed_relation(query: *mut pg_sys::Query) -> Option<pg_sys::Oid> {
    let mut found = pg_sys::InvalidOid;
    // SAFETY: query_tree_walker visits the nodes of a valid Query; the context is `found`.
    unsafe {
        pg_sys::query_tree_walker(
            query,
            Some(find_distributed),
            (&raw mut found).cast::<c_void>(),
            pg_sys::QTW_EXAMINE_RTES_BEFORE as i32,
        );
    }
    (found != pg_sys::InvalidOid).then_some(found)
}

#[pg_guard]
unsafe extern "C-unwind" fn find_distributed(
    node: *mut pg_sys::Node,
    context: *mut c_void,
) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: node is a valid parse node (walker contract); context is the &mut Oid we passed.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_RangeTblEntry => {
                let rte = node.cast::<pg_sys::RangeTblEntry>();
                if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION
                    && cache::lookup((*rte).relid).is_some()
                {
                    *context.cast::<pg_sys::Oid>() = (*rte).relid;
                    return true;
                }
                false
            }
            pg_sys::NodeTag::T_Query => pg_sys::query_tree_walker(
                node.cast(),
                Some(find_distributed),
                context,
                pg_sys::QTW_EXAMINE_RTES_BEFORE as i32,
            ),
            _ => pg_sys::expression_tree_walker(node, Some(find_distributed), context),
        }
    }
}
