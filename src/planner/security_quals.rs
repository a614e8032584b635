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
pub(crate) unsafe fn only_after(
    guard: &[*mut pg_sys::Node],
    clause: *mut pg_sys::Node,
) -> *mut pg_sys::Node {
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
        let when =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::CaseWhen>()).cast::<pg_sys::CaseWhen>();
        (*when).xpr.type_ = pg_sys::NodeTag::T_CaseWhen;
        (*when).expr = condition.cast();
        (*when).result = clause.cast();
        (*when).location = -1;
        let case =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::CaseExpr>()).cast::<pg_sys::CaseExpr>();
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

/// A copy of UPDATE or DELETE `query` in which every table its WHERE clauses filter directly
/// ([`filtered_by_where`], at every level: the statement, its subqueries) has its policy
/// conditions (`securityQuals`) in that WHERE clause, lowest level first, each condition that
/// is not leakproof behind the levels below it — the statement's own conditions are the top
/// level — so that the statement runs on the workers as one; also without check options
/// (tested on the coordinator). `query` itself when it has neither.
pub unsafe fn in_where_clause(query: *mut pg_sys::Query) -> *mut pg_sys::Query {
    // SAFETY: query is a valid UPDATE or DELETE; only the copy is changed.
    unsafe {
        let mut policies = false;
        crate::planner::each_query(query.cast(), &mut |level| {
            policies |= PgList::<pg_sys::RangeTblEntry>::from_pg((*level).rtable)
                .iter_ptr()
                .any(|rte| !(*rte).securityQuals.is_null());
        });
        if !policies && (*query).withCheckOptions.is_null() {
            return query;
        }
        let copy = pg_sys::copyObjectImpl(query.cast()).cast::<pg_sys::Query>();
        (*copy).withCheckOptions = std::ptr::null_mut();
        crate::planner::each_query(copy.cast(), &mut |level| merge_into_where(level));
        copy
    }
}

/// Range-table indexes of the tables whose rows the WHERE clause of `query` filters as they
/// are read: the plain entries of its FROM list (joined as by an inner join) and the target of
/// an UPDATE or DELETE. (Tables inside explicit JOINs are not among them.)
pub unsafe fn filtered_by_where(query: *mut pg_sys::Query) -> Vec<i32> {
    // SAFETY: query is a valid Query.
    unsafe {
        let mut indexes: Vec<i32> = PgList::<pg_sys::Node>::from_pg((*(*query).jointree).fromlist)
            .iter_ptr()
            .filter(|node| (**node).type_ == pg_sys::NodeTag::T_RangeTblRef)
            .map(|node| (*node.cast::<pg_sys::RangeTblRef>()).rtindex)
            .collect();
        let command = (*query).commandType;
        if matches!(
            command,
            pg_sys::CmdType::CMD_UPDATE | pg_sys::CmdType::CMD_DELETE
        ) && !indexes.contains(&(*query).resultRelation)
        {
            indexes.push((*query).resultRelation);
        }
        indexes
    }
}

/// Moves the policy conditions of the tables `query`'s WHERE clause filters into it (see
/// [`in_where_clause`]). A condition that is not leakproof waits for the lower levels of its
/// own table's policies, and one of the statement's for all policies of the tables it reads
/// (as PostgreSQL orders them per table).
unsafe fn merge_into_where(query: *mut pg_sys::Query) {
    // SAFETY: query is part of a private copy of the statement.
    unsafe {
        let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable);
        // Each table's policy levels, lowest first.
        let mut tables: Vec<(i32, Vec<Vec<*mut pg_sys::Node>>)> = Vec::new();
        for index in filtered_by_where(query) {
            let Some(rte) = rtable.get_ptr(index as usize - 1) else {
                continue;
            };
            if (*rte).securityQuals.is_null() {
                continue;
            }
            let levels = PgList::<pg_sys::Node>::from_pg((*rte).securityQuals)
                .iter_ptr()
                .map(|level| conjuncts(level))
                .collect();
            tables.push((index, levels));
            (*rte).securityQuals = std::ptr::null_mut();
        }
        if tables.is_empty() {
            return;
        }
        let guarded = |guard: &[*mut pg_sys::Node], clause: *mut pg_sys::Node| {
            if guard.is_empty() || !pg_sys::contain_leaked_vars(clause) {
                clause
            } else {
                only_after(guard, clause)
            }
        };
        let mut quals = PgList::<pg_sys::Node>::new();
        for (_, levels) in &tables {
            let mut lower: Vec<*mut pg_sys::Node> = Vec::new();
            for level in levels {
                for clause in level {
                    quals.push(guarded(&lower, *clause));
                }
                lower.extend(level);
            }
        }
        for clause in conjuncts((*(*query).jointree).quals) {
            let varnos = pg_sys::pull_varnos(std::ptr::null_mut(), clause);
            let guard: Vec<*mut pg_sys::Node> = tables
                .iter()
                .filter(|(index, _)| pg_sys::bms_is_member(*index, varnos))
                .flat_map(|(_, levels)| levels.iter().flatten().copied())
                .collect();
            quals.push(guarded(&guard, clause));
        }
        (*(*query).jointree).quals = pg_sys::make_ands_explicit(quals.into_pg()).cast();
    }
}

/// The ANDed conditions of `expr` (none for NULL).
pub(crate) unsafe fn conjuncts(expr: *mut pg_sys::Node) -> Vec<*mut pg_sys::Node> {
    // SAFETY: expr is a boolean expression or NULL.
    unsafe {
        PgList::<pg_sys::Node>::from_pg(pg_sys::make_ands_implicit(expr.cast()))
            .iter_ptr()
            .collect()
    }
}

/// Rewrites the policy conditions `x IN (SELECT c …)` of the distributed and reference tables
/// `query` reads (subqueries included) whose subquery does not depend on the row into
/// `x = ANY (ARRAY(SELECT c …))`, which means the same, NULLs included. PostgreSQL then
/// computes the subquery once before the scan (an init plan) and the workers get its result
/// as a value, instead of sending every row of the table to the coordinator to be tested
/// there — the membership policy `tenant IN (SELECT tenant FROM members WHERE who =
/// current_user)` would otherwise read the whole table.
pub unsafe fn policy_subqueries_computed_first(query: *mut pg_sys::Query) {
    // SAFETY: query is the statement being planned, which the planner may change.
    unsafe {
        crate::planner::each_query(query.cast(), &mut |level| {
            for rte in PgList::<pg_sys::RangeTblEntry>::from_pg((*level).rtable).iter_ptr() {
                if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION
                    && !(*rte).securityQuals.is_null()
                    && crate::metadata::cache::lookup((*rte).relid).is_some()
                {
                    (*rte).securityQuals =
                        in_arrays((*rte).securityQuals.cast(), std::ptr::null_mut()).cast();
                }
            }
        });
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn in_arrays(
    node: *mut pg_sys::Node,
    context: *mut std::ffi::c_void,
) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    // SAFETY: node is a valid expression node of a policy condition; the mutator copies what
    // it changes and leaves subqueries as they are.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => node,
            pg_sys::NodeTag::T_SubLink => match as_array_comparison(node.cast()) {
                Some(replacement) => replacement,
                None => node,
            },
            _ => pg_sys::expression_tree_mutator(
                node,
                Some(crate::planner::shippable::as_mutator(in_arrays)),
                context,
            ),
        }
    }
}

/// `x = ANY (ARRAY(SELECT c …))` for `x IN (SELECT c …)` (`x op ANY (SELECT c …)`) whose
/// subquery does not depend on the row; None for any other sublink.
unsafe fn as_array_comparison(sublink: *mut pg_sys::SubLink) -> Option<*mut pg_sys::Node> {
    // SAFETY: sublink is a valid, analysed SubLink; new nodes are built around its parts.
    unsafe {
        if (*sublink).subLinkType != pg_sys::SubLinkType::ANY_SUBLINK
            || (*(*sublink).testexpr).type_ != pg_sys::NodeTag::T_OpExpr
        {
            return None;
        }
        let test = (*sublink).testexpr.cast::<pg_sys::OpExpr>();
        let args = PgList::<pg_sys::Node>::from_pg((*test).args);
        let (Some(row_side), Some(column)) = (args.get_ptr(0), args.get_ptr(1)) else {
            return None;
        };
        let column_is_the_subquerys = (*column).type_ == pg_sys::NodeTag::T_Param
            && (*column.cast::<pg_sys::Param>()).paramkind == pg_sys::ParamKind::PARAM_SUBLINK
            && (*column.cast::<pg_sys::Param>()).paramid == 1;
        let subquery = (*sublink).subselect.cast::<pg_sys::Query>();
        let outputs = PgList::<pg_sys::TargetEntry>::from_pg((*subquery).targetList)
            .iter_ptr()
            .filter(|entry| !(**entry).resjunk)
            .count();
        if args.len() != 2
            || !column_is_the_subquerys
            || outputs != 1
            || pg_sys::contain_vars_of_level(subquery.cast(), 1)
            || pg_sys::get_array_type(pg_sys::exprType(column)) == pg_sys::InvalidOid
        {
            return None;
        }
        let array =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::SubLink>()).cast::<pg_sys::SubLink>();
        (*array).xpr.type_ = pg_sys::NodeTag::T_SubLink;
        (*array).subLinkType = pg_sys::SubLinkType::ARRAY_SUBLINK;
        (*array).subselect = subquery.cast();
        (*array).location = -1;
        Some(crate::planner::coordinator_subqueries::over_array(
            test,
            row_side,
            array.cast(),
            true,
        ))
    }
}

/// `pgdist.policy_check(<passed>, …)`: the call by which a shard tests check option `option`
/// (of a row-level security policy) itself, `passed` being the option's condition as SQL.
pub unsafe fn check_call(passed: &str, option: *mut pg_sys::WithCheckOption) -> String {
    use pg_sys::WCOKind::{
        WCO_RLS_CONFLICT_CHECK, WCO_RLS_MERGE_DELETE_CHECK, WCO_RLS_MERGE_UPDATE_CHECK,
    };
    // SAFETY: option is a valid WithCheckOption; its names are C strings or NULL.
    unsafe {
        let kind = match (*option).kind {
            WCO_RLS_CONFLICT_CHECK => "existing",
            WCO_RLS_MERGE_UPDATE_CHECK | WCO_RLS_MERGE_DELETE_CHECK => "target",
            _ => "new",
        };
        let name = |name: *mut std::ffi::c_char| match name.is_null() {
            true => "NULL".to_string(),
            false => crate::remote::quote::quote_literal(
                &std::ffi::CStr::from_ptr(name).to_string_lossy(),
            ),
        };
        format!(
            "pgdist.policy_check({passed}, '{kind}', {}, {})",
            name((*option).relname),
            name((*option).polname)
        )
    }
}

/// Check option `option`'s condition on the new row a write makes of the target's row
/// (range-table entry `target`, `target_rti`): the target's columns replaced by the values
/// `assignments` (entries by column number) give them; a column without one keeps the
/// target's value (UPDATE) or is NULL (INSERT, `keep_missing` false). Membership subqueries are
/// computed first.
pub unsafe fn on_new_row(
    option: *mut pg_sys::WithCheckOption,
    target_rti: i32,
    target: *mut pg_sys::RangeTblEntry,
    assignments: *mut pg_sys::List,
    keep_missing: bool,
) -> *mut pg_sys::Node {
    // SAFETY: option's condition is copied before it is rewritten.
    unsafe {
        let condition = crate::planner::coordinator_subqueries::computed_first_in(
            pg_sys::copyObjectImpl((*option).qual.cast()).cast(),
        );
        let missing = match keep_missing {
            true => pg_sys::ReplaceVarsNoMatchOption::REPLACEVARS_CHANGE_VARNO,
            false => pg_sys::ReplaceVarsNoMatchOption::REPLACEVARS_SUBSTITUTE_NULL,
        };
        let mut sublinks = false;
        pg_sys::ReplaceVarsFromTargetList(
            condition,
            target_rti,
            0,
            target,
            assignments,
            missing,
            target_rti,
            &mut sublinks,
        )
    }
}
