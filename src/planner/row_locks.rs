//! `SELECT … FOR UPDATE / FOR NO KEY UPDATE / FOR SHARE / FOR KEY SHARE` (with `NOWAIT` or
//! `SKIP LOCKED`) on one distributed or reference table: the clause is sent with every fragment,
//! and the fragments run in the coordinator transaction's remote transaction on each node, so
//! the rows stay locked until the transaction ends (two-phase commit releases them with
//! everything else). PostgreSQL's own LockRows step, which would lock the coordinator's empty
//! shell, is taken out of the plan.
//!
//! Supported when the query reads exactly that one table, without LIMIT / OFFSET (the workers
//! would lock every matching row, not just the ones returned). Rows that a filter pgdist
//! cannot send to the workers (e.g. `now()`) removes on the coordinator are still locked.

use std::cell::RefCell;

use pgrx::pg_sys;
use pgrx::PgList;

use crate::distribution::create::relation_name;
use crate::metadata::cache;
use crate::planner::PlannerError;

/// The lock clause for range-table entry `rti` of the query being planned.
struct Pending {
    query: *mut pg_sys::Query,
    rti: u32,
    clause: String,
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

/// Takes the row-lock clause of a top-level SELECT on a distributed table out of `parse` and
/// keeps it for the table's Distributed Scan, for as long as the returned scope lives.
pub unsafe fn take_from(parse: *mut pg_sys::Query) -> Result<Scope, PlannerError> {
    // SAFETY: parse is the query being planned; its range table and row marks are valid.
    unsafe {
        let marks = PgList::<pg_sys::RowMarkClause>::from_pg((*parse).rowMarks);
        let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg((*parse).rtable);
        let mut pending = None;
        for mark in marks.iter_ptr() {
            let Some(rte) = rtable.get_ptr((*mark).rti as usize - 1) else {
                continue;
            };
            if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION
                || cache::lookup((*rte).relid).is_none()
            {
                continue;
            }
            if rtable.len() != 1
                || !(*parse).limitCount.is_null()
                || !(*parse).limitOffset.is_null()
            {
                return Err(PlannerError::RowLocks(relation_name((*rte).relid)));
            }
            pending = Some(Pending {
                query: parse,
                rti: (*mark).rti,
                clause: lock_clause(mark),
            });
        }
        let outer = PENDING.take();
        if pending.is_some() {
            (*parse).rowMarks = std::ptr::null_mut();
        }
        PENDING.set(pending);
        Ok(Scope(outer))
    }
}

/// The lock clause for range-table entry `rti` of the query `root` plans, if it has one.
pub unsafe fn clause_for(root: *mut pg_sys::PlannerInfo, rti: u32) -> String {
    // SAFETY: root is the planner state of the query being planned.
    let query = unsafe { (*root).parse };
    PENDING.with_borrow(|pending| match pending {
        Some(p) if p.query == query && p.rti == rti => p.clause.clone(),
        _ => String::new(),
    })
}

unsafe fn lock_clause(mark: *mut pg_sys::RowMarkClause) -> String {
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
    format!("{strength}{wait}")
}
