//! `SELECT … FOR UPDATE / FOR NO KEY UPDATE / FOR SHARE / FOR KEY SHARE` (with `NOWAIT` or
//! `SKIP LOCKED`) on distributed and reference tables: the clause is sent with every fragment,
//! and the fragments run in the coordinator transaction's remote transaction on each node, so
//! the rows stay locked until the transaction ends (two-phase commit releases them with
//! everything else). PostgreSQL's own LockRows step, which would lock the coordinator's empty
//! shells, is taken out of the plan.
//!
//! Supported when the query reads only distributed and reference tables and runs whole as one
//! Distributed Scan: one table, or a join the workers run whole (co-located, or with reference
//! tables), whose fragments say `FOR UPDATE OF r<i>` for each locked table. A plan that joins
//! on the coordinator would lock every row each table's scan returns, so it is refused after
//! planning. LIMIT / OFFSET is supported when the query reads one shard and the LIMIT (with
//! its ORDER BY) goes into the fragment, which then locks just the rows it returns (the job
//! queue's `… WHERE tenant = 7 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED`); on several shards
//! each would lock its own first rows. Rows that a filter pgdist cannot send to the
//! workers (e.g. `now()`) removes on the coordinator are still locked.

use std::cell::RefCell;

use pgrx::pg_sys;
use pgrx::PgList;

use crate::distribution::create::relation_name;
use crate::metadata::cache;
use crate::planner::scan_path::{from_list, ScanPlan};
use crate::planner::{each_plan_node, PlannerError};

/// The lock clauses of the query being planned, per range-table entry.
struct Pending {
    query: *mut pg_sys::Query,
    /// (range-table index, strength such as `FOR UPDATE`, wait policy such as ` NOWAIT`).
    marks: Vec<(u32, &'static str, &'static str)>,
    /// The table named in errors.
    first_table: pg_sys::Oid,
    /// The query has LIMIT or OFFSET.
    limited: bool,
}

thread_local! {
    static PENDING: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// Restores the lock clause of an outer planning run (planning can nest through SPI) when the
/// current one ends, also by an error.
pub struct Scope(Option<Pending>);

impl Drop for Scope {
    fn drop(&mut self) {
        PENDING.set(self.0.take());
    }
}

/// Takes the row-lock clauses of a top-level SELECT on distributed tables out of `parse` and
/// keeps them for the Distributed Scans, for as long as the returned scope lives.
pub unsafe fn take_from(parse: *mut pg_sys::Query) -> Result<Scope, PlannerError> {
    // SAFETY: parse is the query being planned; its range table and row marks are valid.
    unsafe {
        let marks = PgList::<pg_sys::RowMarkClause>::from_pg((*parse).rowMarks);
        let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg((*parse).rtable);
        let mut pending = Pending {
            query: parse,
            marks: Vec::new(),
            first_table: pg_sys::InvalidOid,
            limited: !(*parse).limitCount.is_null() || !(*parse).limitOffset.is_null(),
        };
        for mark in marks.iter_ptr() {
            let Some(rte) = rtable.get_ptr((*mark).rti as usize - 1) else {
                continue;
            };
            if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION
                || cache::lookup((*rte).relid).is_none()
            {
                continue;
            }
            let only_distributed = rtable.iter_ptr().all(|rte| match (*rte).rtekind {
                pg_sys::RTEKind::RTE_RELATION => cache::lookup((*rte).relid).is_some(),
                pg_sys::RTEKind::RTE_JOIN => true,
                _ => false,
            });
            if !only_distributed {
                return Err(PlannerError::RowLocks(relation_name((*rte).relid)));
            }
            if pending.marks.is_empty() {
                pending.first_table = (*rte).relid;
            }
            let (strength, wait) = lock_clause(mark);
            pending.marks.push(((*mark).rti, strength, wait));
        }
        let outer = PENDING.take();
        let locks = !pending.marks.is_empty();
        if locks {
            (*parse).rowMarks = std::ptr::null_mut();
            PENDING.set(Some(pending));
        }
        Ok(Scope(outer))
    }
}

/// The lock clause for range-table entry `rti` read alone by the query `root` plans, if it has
/// one: `FOR UPDATE`.
pub unsafe fn clause_for(root: *mut pg_sys::PlannerInfo, rti: u32) -> String {
    // SAFETY: as clause.
    unsafe { clause(root, rti, None) }
}

/// The lock clause for range-table entry `rti`, known as `alias` in a join's fragment, if it
/// has one: `FOR UPDATE OF r2`.
pub unsafe fn clause_in_join(root: *mut pg_sys::PlannerInfo, rti: u32, alias: &str) -> String {
    // SAFETY: as clause.
    unsafe { clause(root, rti, Some(alias)) }
}

unsafe fn clause(root: *mut pg_sys::PlannerInfo, rti: u32, alias: Option<&str>) -> String {
    // SAFETY: root is the planner state of the query being planned.
    let query = unsafe { (*root).parse };
    PENDING.with_borrow(|pending| match pending {
        Some(p) if p.query == query => p
            .marks
            .iter()
            .find(|(r, _, _)| *r == rti)
            .map(|(_, strength, wait)| match alias {
                Some(alias) => format!("{strength} OF {alias}{wait}"),
                None => format!("{strength}{wait}"),
            })
            .unwrap_or_default(),
        _ => String::new(),
    })
}

/// After planning a query with row locks: refuses a plan that reads its tables in more than one
/// scan (a join on the coordinator) or filters rows on the coordinator, either of which would
/// lock rows PostgreSQL would not, and a LIMIT or
/// OFFSET that does not run on the one shard the query reads (every shard would lock its own
/// first rows).
pub unsafe fn check_plan(stmt: *mut pg_sys::PlannedStmt) -> Result<(), PlannerError> {
    let Some((table, limited)) =
        PENDING.with_borrow(|p| p.as_ref().map(|p| (p.first_table, p.limited)))
    else {
        return Ok(());
    };
    // SAFETY: stmt is the finished plan of the query being planned.
    let (scans, scan, filtered_here) = unsafe {
        // The scan nodes (the node types between T_Scan and T_CustomScan are PostgreSQL's
        // scans).
        let mut scans = Vec::new();
        let mut collect = |plan: *mut pg_sys::Plan| {
            let tag = (*plan).type_ as u32;
            if (pg_sys::NodeTag::T_Scan as u32..=pg_sys::NodeTag::T_CustomScan as u32)
                .contains(&tag)
            {
                scans.push(plan);
            }
        };
        each_plan_node((*stmt).planTree, &mut collect);
        for plan in PgList::<pg_sys::Plan>::from_pg((*stmt).subplans).iter_ptr() {
            each_plan_node(plan, &mut collect);
        }
        let scan = match scans[..] {
            [only] if (*only).type_ == pg_sys::NodeTag::T_CustomScan => {
                let private = (*only.cast::<pg_sys::CustomScan>()).custom_private;
                Some(ScanPlan::decode(&from_list(private)))
            }
            _ => None,
        };
        // A condition that stays on the coordinator would filter rows the workers locked.
        let filtered_here = scans.iter().any(|plan| !(**plan).qual.is_null());
        (scans.len(), scan, filtered_here)
    };
    let limit_on_one_shard = |plan: &ScanPlan| {
        !plan.limit.is_empty() && (plan.shard_ids.len() == 1 || plan.prune_param > 0)
    };
    match scan {
        _ if scans > 1 || filtered_here => Err(PlannerError::RowLocks(relation_name(table))),
        Some(plan) if limited && !limit_on_one_shard(&plan) => {
            Err(PlannerError::RowLocks(relation_name(table)))
        }
        _ => Ok(()),
    }
}

unsafe fn lock_clause(mark: *mut pg_sys::RowMarkClause) -> (&'static str, &'static str) {
    use pg_sys::LockClauseStrength::*;
    use pg_sys::LockWaitPolicy::{LockWaitError as ERROR, LockWaitSkip as SKIP};
    // SAFETY: mark is a valid RowMarkClause.
    let (strength, wait) = unsafe { ((*mark).strength, (*mark).waitPolicy) };
    let strength = match strength {
        LCS_FORKEYSHARE => "FOR KEY SHARE",
        LCS_FORSHARE => "FOR SHARE",
        LCS_FORNOKEYUPDATE => "FOR NO KEY UPDATE",
        _ => "FOR UPDATE",
    };
    let wait = match wait {
        SKIP => " SKIP LOCKED",
        ERROR => " NOWAIT",
        _ => "",
    };
    (strength, wait)
}
