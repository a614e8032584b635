//! Row-level security and security-barrier views on the workers: which conditions may run
//! there, and in what form, so that no row a policy hides is ever seen by a condition that
//! could leak it.
//!
//! PostgreSQL numbers every restriction clause of a table with a security level: the
//! policies' conditions (and a security-barrier view's) come first, the statement's own
//! after them. A clause of a higher level that is not leakproof — that could reveal the values
//! it sees through an error, a notice, a side effect (`1 / (secret - 42) > 0` fails exactly
//! for the hidden row whose secret is 42) — must only ever see rows that passed every clause
//! of lower levels. A worker knows nothing of levels: it orders the conditions of a WHERE
//! clause by cost. So a fragment says it explicitly: such a clause is sent as
//! `CASE WHEN <every lower-level clause> THEN <clause> ELSE false END`, which no planner
//! reorders; leakproof clauses and clauses without lower levels go as they are. A clause whose
//! lower levels do not all run on the workers stays on the coordinator, where PostgreSQL
//! orders the local filters by level itself.
//!
//! Statements without policies have every clause at level 0, and nothing changes for them.

use pgrx::{pg_sys, PgList};

use crate::planner::scan_path::shipped_form;

/// The restriction clauses of `rel` as they run on the workers, in the order of
/// `baserestrictinfo`: None for a clause that stays a local filter on the coordinator.
/// Values the coordinator computes for them are appended to `values`.
pub unsafe fn shipped_forms(
    rel: *mut pg_sys::RelOptInfo,
    values: &mut Vec<*mut pg_sys::Node>,
) -> Vec<Option<*mut pg_sys::Node>> {
    // SAFETY: rel's restriction clauses, as the planner made them.
    unsafe {
        let infos: Vec<*mut pg_sys::RestrictInfo> =
            PgList::<pg_sys::RestrictInfo>::from_pg((*rel).baserestrictinfo)
                .iter_ptr()
                .collect();
        let mut order: Vec<usize> = (0..infos.len()).collect();
        order.sort_by_key(|&i| (*infos[i]).security_level);
        let mut forms: Vec<Option<*mut pg_sys::Node>> = vec![None; infos.len()];
        // The unguarded form of every clause decided so far, lowest levels first.
        let mut lower: Vec<(u32, Option<*mut pg_sys::Node>)> = Vec::new();
        for i in order {
            let info = infos[i];
            let level = (*info).security_level;
            let below: Vec<Option<*mut pg_sys::Node>> = lower
                .iter()
                .filter(|(l, _)| *l < level)
                .map(|(_, form)| *form)
                .collect();
            let guarded = !below.is_empty() && !(*info).leakproof;
            let form = if guarded && below.iter().any(Option::is_none) {
                None
            } else {
                shipped_form((*info).clause.cast(), values)
            };
            lower.push((level, form));
            forms[i] = match form {
                Some(clause) if guarded => {
                    let guard: Vec<*mut pg_sys::Node> = below.into_iter().flatten().collect();
                    Some(only_after(&guard, clause))
                }
                other => other,
            };
        }
        forms
    }
}

/// `CASE WHEN <guard, ANDed in order> THEN <clause> ELSE false END`.
unsafe fn only_after(guard: &[*mut pg_sys::Node], clause: *mut pg_sys::Node) -> *mut pg_sys::Node {
    // SAFETY: builds new expression nodes in the current memory context around valid ones.
    unsafe {
        let condition = match guard {
            [single] => *single,
            _ => {
                let mut args = PgList::<pg_sys::Node>::new();
                for g in guard {
                    args.push(*g);
                }
                pg_sys::makeBoolExpr(pg_sys::BoolExprType::AND_EXPR, args.into_pg(), -1)
                    .cast::<pg_sys::Node>()
            }
        };
        let when = pg_sys::palloc0(std::mem::size_of::<pg_sys::CaseWhen>()).cast::<pg_sys::CaseWhen>();
        (*when).xpr.type_ = pg_sys::NodeTag::T_CaseWhen;
        (*when).expr = condition.cast();
        (*when).result = clause.cast();
        (*when).location = -1;
        let case = pg_sys::palloc0(std::mem::size_of::<pg_sys::CaseExpr>()).cast::<pg_sys::CaseExpr>();
        (*case).xpr.type_ = pg_sys::NodeTag::T_CaseExpr;
        (*case).casetype = pg_sys::BOOLOID;
        (*case).args = pg_sys::lappend(std::ptr::null_mut(), when.cast());
        (*case).defresult = pg_sys::makeBoolConst(false, false).cast();
        (*case).location = -1;
        case.cast()
    }
}

/// True when join clause `info` may run on the workers with the tables `relids` it joins:
/// it is leakproof, or none of those tables has conditions of a lower level (a worker could
/// otherwise test it, in an index scan, on rows a policy hides).
pub unsafe fn join_clause_may_ship(
    root: *mut pg_sys::PlannerInfo,
    info: *mut pg_sys::RestrictInfo,
    relids: *mut pg_sys::Bitmapset,
) -> bool {
    // SAFETY: relids are base relations of the query being planned.
    unsafe {
        if (*info).leakproof || (*info).security_level == 0 {
            return true;
        }
        let mut member = -1;
        loop {
            member = pg_sys::bms_next_member(relids, member);
            if member < 0 {
                return true;
            }
            let rel = *(*root).simple_rel_array.add(member as usize);
            if !rel.is_null() && (*rel).baserestrict_min_security < (*info).security_level {
                return false;
            }
        }
    }
}

/// A copy of UPDATE or DELETE `query` whose target's policy conditions (`securityQuals`) are
/// part of its WHERE clause, lowest level first, each condition that is not leakproof behind
/// the levels below it — the statement's own conditions are the top level — so that the
/// statement runs on the workers as one, and without its check options; `query` itself when
/// it has neither.
pub unsafe fn in_where_clause(query: *mut pg_sys::Query) -> *mut pg_sys::Query {
    // SAFETY: query is a valid UPDATE or DELETE; only the copy is changed.
    unsafe {
        let target = |query: *mut pg_sys::Query| {
            let index = usize::try_from((*query).resultRelation - 1).ok()?;
            PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable).get_ptr(index)
        };
        let has_quals = target(query).is_some_and(|rte| !(*rte).securityQuals.is_null());
        if !has_quals && (*query).withCheckOptions.is_null() {
            return query;
        }
        let copy = pg_sys::copyObjectImpl(query.cast()).cast::<pg_sys::Query>();
        // The coordinator tests the new rows (`executor/modify.rs`), not the workers.
        (*copy).withCheckOptions = std::ptr::null_mut();
        let Some(rte) = target(copy) else {
            return copy;
        };
        if !has_quals {
            return copy;
        }
        let mut levels: Vec<Vec<*mut pg_sys::Node>> =
            PgList::<pg_sys::Node>::from_pg((*rte).securityQuals)
                .iter_ptr()
                .map(|level| conjuncts(level))
                .collect();
        levels.push(conjuncts((*(*copy).jointree).quals));
        let mut lower: Vec<*mut pg_sys::Node> = Vec::new();
        let mut quals = PgList::<pg_sys::Node>::new();
        for level in levels {
            for clause in &level {
                if lower.is_empty() || !pg_sys::contain_leaked_vars(*clause) {
                    quals.push(*clause);
                } else {
                    quals.push(only_after(&lower, *clause));
                }
            }
            lower.extend(level);
        }
        (*(*copy).jointree).quals = pg_sys::make_ands_explicit(quals.into_pg()).cast();
        (*rte).securityQuals = std::ptr::null_mut();
        copy
    }
}

/// The ANDed conditions of `expr` (none for NULL).
unsafe fn conjuncts(expr: *mut pg_sys::Node) -> Vec<*mut pg_sys::Node> {
    // SAFETY: expr is a boolean expression or NULL.
    unsafe {
        PgList::<pg_sys::Node>::from_pg(pg_sys::make_ands_implicit(expr.cast()))
            .iter_ptr()
            .collect()
    }
}
