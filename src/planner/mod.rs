//! The planner hook. Queries that involve no distributed or reference table go to the standard
//! planner untouched (after one cheap look at the per-backend table cache). Reads of
//! distributed tables are planned by PostgreSQL with a Distributed Scan for each such table
//! (`scan_path.rs`). What is not supported yet is refused here with 0A000 — writes to
//! distributed tables, row locks on them, and reads in a transaction that already changed
//! shards — rather than answered from the coordinator's empty shell table.

pub mod aggregate_path;
pub mod range_pruning;
pub mod scan_path;
pub mod shippable;

use std::ffi::c_void;

use pgrx::prelude::*;

use crate::distribution::create::relation_name;
use crate::metadata::cache;

#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    #[error("writing to distributed table {0} through the coordinator is not supported yet")]
    Writes(String),
    #[error("row locks (FOR UPDATE / FOR SHARE) on distributed table {0} are not supported yet")]
    RowLocks(String),
    #[error("reading distributed table {0} after changing shards in the same transaction is not supported yet")]
    ReadAfterRemoteWork(String),
}

impl crate::error::PgError for PlannerError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            PlannerError::Writes(_) => {
                "Distributed INSERT, UPDATE, DELETE and COPY come with the distributed writes \
                                        work; until then load data before distributing the table."
                    .into()
            }
            PlannerError::RowLocks(_) => "Drop the FOR UPDATE / FOR SHARE clause.".into(),
            PlannerError::ReadAfterRemoteWork(_) => {
                "Commit the DDL or distribution first, then read.".into()
            }
        })
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
    scan_path::init();
    aggregate_path::init();
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
        if let Some(err) = unsafe { unsupported_use(parse) } {
            crate::error::raise(err);
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

/// What in `query` (subqueries, CTEs, sublinks included) pgdist cannot run yet, if anything.
unsafe fn unsupported_use(query: *mut pg_sys::Query) -> Option<PlannerError> {
    let mut found: Option<PlannerError> = None;
    // SAFETY: the walker visits the nodes of a valid Query; the context is `found`.
    unsafe { check_node(query.cast(), (&raw mut found).cast()) };
    found
}

/// The distributed table at range-table index `rti` (1-based) of `query`, if it is one.
unsafe fn distributed_rte(query: *mut pg_sys::Query, rti: i32) -> Option<pg_sys::Oid> {
    // SAFETY: rti indexes the query's range table.
    unsafe {
        let rtable = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable);
        let rte = rtable.get_ptr(usize::try_from(rti).ok()?.checked_sub(1)?)?;
        ((*rte).rtekind == pg_sys::RTEKind::RTE_RELATION && cache::lookup((*rte).relid).is_some())
            .then_some((*rte).relid)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_node(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: node is a valid parse node (walker contract); context is the Option we passed.
    unsafe {
        let found = &mut *context.cast::<Option<PlannerError>>();
        match (*node).type_ {
            pg_sys::NodeTag::T_RangeTblEntry => {
                let rte = node.cast::<pg_sys::RangeTblEntry>();
                if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION
                    && cache::lookup((*rte).relid).is_some()
                    && crate::transaction::remote_xact::has_participants()
                {
                    *found = Some(PlannerError::ReadAfterRemoteWork(relation_name(
                        (*rte).relid,
                    )));
                    return true;
                }
                false
            }
            pg_sys::NodeTag::T_Query => {
                let query = node.cast::<pg_sys::Query>();
                if (*query).commandType != pg_sys::CmdType::CMD_SELECT {
                    if let Some(oid) = distributed_rte(query, (*query).resultRelation) {
                        *found = Some(PlannerError::Writes(relation_name(oid)));
                        return true;
                    }
                }
                for mark in
                    pgrx::PgList::<pg_sys::RowMarkClause>::from_pg((*query).rowMarks).iter_ptr()
                {
                    if let Some(oid) = distributed_rte(query, (*mark).rti as i32) {
                        *found = Some(PlannerError::RowLocks(relation_name(oid)));
                        return true;
                    }
                }
                pg_sys::query_tree_walker(
                    query,
                    Some(check_node),
                    context,
                    pg_sys::QTW_EXAMINE_RTES_BEFORE as i32,
                )
            }
            _ => pg_sys::expression_tree_walker(node, Some(check_node), context),
        }
    }
}
