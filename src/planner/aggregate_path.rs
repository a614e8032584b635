//! Aggregate pushdown for a query that groups and aggregates one distributed table or a join
//! pushed down to the workers (`join_path.rs`).
//!
//! When no group can span two fragments — GROUP BY includes the distribution column, or the scan
//! reads one shard — the workers compute the **whole** aggregate: `SELECT <output> FROM <shard>
//! … GROUP BY … HAVING …`, any built-in aggregate included (DISTINCT, ORDER BY, FILTER,
//! ordered-set), and the scan returns the result rows.
//!
//! Otherwise the workers compute per-shard *partial* aggregates and PostgreSQL's own Agg node
//! combines them, exactly as parallel query splits an aggregate between workers and leader
//! (AGGSPLIT_INITIAL_SERIAL / AGGSPLIT_FINAL_DESERIAL). A worker runs `SELECT <group exprs>,
//! pgdist.partial_<aggfnoid>(<args>), … FROM <shard> WHERE <shipped clauses> GROUP BY <group
//! exprs>`: each `pgdist.partial_*` aggregate (created by `sql/partial_aggregates.sql` on every
//! node) returns the built-in aggregate's transition state, serialized when it is `internal`.
//! The CustomScan returns those rows; the Agg node above deserializes, combines and finalizes
//! them and applies HAVING.
//!
//! Anything that does not fit — DISTINCT / ORDER BY / FILTER in aggregates across shards,
//! non-built-in or non-combinable aggregates, grouping sets, clauses or expressions that cannot
//! run on the workers — keeps the plain plan (aggregation on the coordinator), which is always
//! correct.

use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::PgList;

use crate::metadata::cache;
use crate::metadata::tables::Method;
use crate::planner::scan_path::{
    all_clauses_ship, distributed_path_of, from_list, new_custom_path, pushed_down_path_methods,
    ScanPlan,
};
use crate::planner::shippable::ScanDeparser;

/// The text that computes `aggref`'s partial state on a worker, if it can be pushed down.
unsafe fn partial_call(aggref: *mut pg_sys::Aggref, sql: &mut ScanDeparser) -> Option<String> {
    // SAFETY: aggref is a valid Aggref of the query.
    unsafe {
        if !(*aggref).aggorder.is_null()
            || !(*aggref).aggdistinct.is_null()
            || !(*aggref).aggfilter.is_null()
            || (*aggref).aggkind != b'n' as std::ffi::c_char
            || (*aggref).agglevelsup != 0
            || (*aggref).aggvariadic
            || !crate::planner::shippable::builtin_for_everyone((*aggref).aggfnoid)
        {
            return None;
        }
        let name = format!("partial_{}", u32::from((*aggref).aggfnoid));
        let cname = CString::new(name.clone()).ok()?;
        let mut qualified = PgList::<pg_sys::String>::new();
        qualified.push(pg_sys::makeString(pg_sys::pstrdup(c"pgdist".as_ptr())));
        qualified.push(pg_sys::makeString(pg_sys::pstrdup(cname.as_ptr())));
        if pg_sys::LookupFuncName(qualified.into_pg(), -1, std::ptr::null(), true)
            == pg_sys::InvalidOid
        {
            return None;
        }
        let mut args = Vec::new();
        for entry in PgList::<pg_sys::TargetEntry>::from_pg((*aggref).args).iter_ptr() {
            args.push(sql.text((*entry).expr.cast())?);
        }
        let args = if (*aggref).aggstar {
            "*".to_string()
        } else {
            args.join(", ")
        };
        Some(format!("pgdist.{name}({args})"))
    }
}

pub unsafe fn add_pushdown_path(
    root: *mut pg_sys::PlannerInfo,
    input_rel: *mut pg_sys::RelOptInfo,
    output_rel: *mut pg_sys::RelOptInfo,
    extra: *mut pg_sys::GroupPathExtraData,
) {
    // SAFETY: planner structures of the query being planned; new nodes are palloc'd in the
    // planner's memory context.
    unsafe {
        let parse = (*root).parse;
        if !matches!(
            (*input_rel).reloptkind,
            pg_sys::RelOptKind::RELOPT_BASEREL | pg_sys::RelOptKind::RELOPT_JOINREL
        ) || !(*parse).groupingSets.is_null()
            || (*parse).hasTargetSRFs
        {
            return;
        }
        let Some(input) = distributed_path_of(input_rel) else {
            return;
        };
        let base_plan = ScanPlan::decode(&from_list((*input).custom_private));
        // Every restriction clause must run on the workers, or the partial results would be
        // wrong (a pushed-down join exists only when all of its clauses do).
        let all_shipped = all_clauses_ship(input_rel);
        if !all_shipped {
            return;
        }
        let Some(grouping) = Grouping::of(root, output_rel, extra) else {
            return;
        };
        let groups = if (*parse).groupClause.is_null() {
            1.0
        } else {
            let exprs = pg_sys::get_sortgrouplist_exprs((*parse).groupClause, (*parse).targetList);
            pg_sys::estimate_num_groups(
                root,
                exprs,
                (*input_rel).rows,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
            .max(1.0)
        };
        let path = if groups_stay_in_one_fragment(root, &base_plan) {
            whole_path(root, output_rel, &grouping, &base_plan, groups)
        } else {
            None
        };
        let Some(path) =
            path.or_else(|| partial_path(root, output_rel, &grouping, &base_plan, groups))
        else {
            return;
        };
        // Pushed down is always cheaper than moving every row; make it the only choice.
        (*output_rel).pathlist = std::ptr::null_mut();
        (*output_rel).partial_pathlist = std::ptr::null_mut();
        pg_sys::add_path(output_rel, path);
    }
}

/// The grouped query's output, sorted out.
struct Grouping {
    target: *mut pg_sys::PathTarget,
    /// (expression, sortgroupref) of the grouped expressions.
    grouped: Vec<(*mut pg_sys::Node, u32)>,
    /// The aggregates the output and HAVING use.
    aggregates: Vec<*mut pg_sys::Aggref>,
    /// HAVING, an implicit-AND list (NULL: none).
    having: *mut pg_sys::List,
    /// Columns the output uses outside aggregates without grouping by them: they depend on
    /// the grouped primary key, so the workers may group by them too.
    dependent_columns: Vec<*mut pg_sys::Node>,
}

impl Grouping {
    unsafe fn of(
        root: *mut pg_sys::PlannerInfo,
        output_rel: *mut pg_sys::RelOptInfo,
        extra: *mut pg_sys::GroupPathExtraData,
    ) -> Option<Grouping> {
        // SAFETY: the grouped relation's target and the query's GROUP BY, as the planner made
        // them.
        unsafe {
            let parse = (*root).parse;
            let target = (*output_rel).reltarget;
            let mut grouped = Vec::new();
            let mut others = PgList::<pg_sys::Node>::new();
            let exprs = PgList::<pg_sys::Node>::from_pg((*target).exprs);
            for (i, expr) in exprs.iter_ptr().enumerate() {
                let sortgroupref = if (*target).sortgrouprefs.is_null() {
                    0
                } else {
                    *(*target).sortgrouprefs.add(i)
                };
                let is_grouped = sortgroupref != 0
                    && !pg_sys::get_sortgroupref_clause_noerr(sortgroupref, (*parse).groupClause)
                        .is_null();
                if is_grouped {
                    grouped.push((expr, sortgroupref));
                } else {
                    others.push(expr);
                }
            }
            // Already an implicit-AND list at this stage of planning.
            let having = (*extra).havingQual;
            if !having.is_null() {
                others.push(having);
            }
            let needed = pg_sys::pull_var_clause(
                others.into_pg().cast(),
                (pg_sys::PVC_INCLUDE_AGGREGATES | pg_sys::PVC_INCLUDE_PLACEHOLDERS) as i32,
            );
            let mut aggregates = Vec::new();
            let mut dependent_columns = Vec::new();
            for node in PgList::<pg_sys::Node>::from_pg(needed).iter_ptr() {
                match (*node).type_ {
                    pg_sys::NodeTag::T_Aggref => aggregates.push(node.cast()),
                    pg_sys::NodeTag::T_Var => dependent_columns.push(node),
                    _ => return None,
                }
            }
            Some(Grouping {
                target,
                grouped,
                aggregates,
                having: having.cast(),
                dependent_columns,
            })
        }
    }
}

/// True when no group can span two fragments (see `rows_of_a_key_stay_together`); a query
/// without GROUP BY returns one row even without input, so every fragment's part must be
/// combined.
unsafe fn groups_stay_in_one_fragment(root: *mut pg_sys::PlannerInfo, plan: &ScanPlan) -> bool {
    // SAFETY: the query being planned.
    unsafe {
        let groups = (*(*root).parse).groupClause;
        !groups.is_null() && rows_of_a_key_stay_together(root, plan, groups)
    }
}

/// True when the rows that agree on the keys `clauses` (GROUP BY or PARTITION BY items) are
/// all read by one fragment: the keys include the distribution column of a distributed table
/// that no outer join can fill with NULLs, or the scan reads a single shard.
pub unsafe fn rows_of_a_key_stay_together(
    root: *mut pg_sys::PlannerInfo,
    plan: &ScanPlan,
    clauses: *mut pg_sys::List,
) -> bool {
    // SAFETY: SortGroupClauses of the query being planned, and its range table.
    unsafe {
        let parse = (*root).parse;
        if plan.prune_param > 0 || plan.shard_ids.len() == 1 {
            return true;
        }
        let relations = if plan.relations.is_empty() {
            vec![(plan.base_rti, plan.relid)]
        } else {
            plan.relations.clone()
        };
        PgList::<pg_sys::SortGroupClause>::from_pg(clauses)
            .iter_ptr()
            .any(|clause| {
                let mut expr = pg_sys::get_sortgroupclause_expr(clause, (*parse).targetList)
                    .cast::<pg_sys::Node>();
                while (*expr).type_ == pg_sys::NodeTag::T_RelabelType {
                    expr = (*expr.cast::<pg_sys::RelabelType>()).arg.cast();
                }
                if (*expr).type_ != pg_sys::NodeTag::T_Var {
                    return false;
                }
                let var = expr.cast::<pg_sys::Var>();
                let Some((_, oid)) = relations
                    .iter()
                    .find(|(rti, _)| *rti == (*var).varno as u32)
                else {
                    return false;
                };
                !pg_sys::bms_is_member((*var).varno, (*root).nullable_baserels)
                    && cache::lookup(*oid).is_some_and(|table| {
                        table.method != Method::Reference
                            && table.distribution_attno() == Some((*var).varattno)
                    })
            })
    }
}

/// The workers compute the whole aggregate, HAVING included; the scan returns the result rows.
unsafe fn whole_path(
    root: *mut pg_sys::PlannerInfo,
    output_rel: *mut pg_sys::RelOptInfo,
    grouping: &Grouping,
    base_plan: &ScanPlan,
    groups: f64,
) -> Option<*mut pg_sys::Path> {
    // SAFETY: expressions of the query being planned; the path is palloc'd by new_custom_path.
    unsafe {
        let mut sql = ScanDeparser::new(root, base_plan);
        let mut select = Vec::new();
        let mut group_positions = Vec::new();
        for expr in PgList::<pg_sys::Node>::from_pg((*grouping.target).exprs).iter_ptr() {
            select.push(sql.text(expr)?);
            if grouping.grouped.iter().any(|(grouped, _)| *grouped == expr) {
                group_positions.push(select.len().to_string());
            }
        }
        for column in &grouping.dependent_columns {
            group_positions.push(sql.text(*column)?);
        }
        let having = if grouping.having.is_null() {
            String::new()
        } else {
            sql.text(pg_sys::make_ands_explicit(grouping.having).cast())?
        };
        let plan = ScanPlan {
            select_sql: select.join(", "),
            group_by: group_positions.join(", "),
            having,
            columns: (1..=select.len() as i16).collect(),
            exec_params: sql.take_exec_params(),
            distinct: false,
            ..base_plan.clone()
        };
        let shards = plan.shard_ids.len().max(1) as f64;
        let total_cost = 100.0 + 10.0 * shards + groups * 0.01;
        Some(
            new_custom_path(
                output_rel,
                grouping.target,
                groups,
                total_cost,
                &plan,
                pushed_down_path_methods(),
            )
            .cast(),
        )
    }
}

/// The workers compute partial states per group; a Finalize Agg node here combines them.
unsafe fn partial_path(
    root: *mut pg_sys::PlannerInfo,
    output_rel: *mut pg_sys::RelOptInfo,
    grouping: &Grouping,
    base_plan: &ScanPlan,
    groups: f64,
) -> Option<*mut pg_sys::Path> {
    // SAFETY: expressions of the query being planned; new nodes are palloc'd in the planner's
    // memory context.
    unsafe {
        let parse = (*root).parse;
        let mut sql = ScanDeparser::new(root, base_plan);
        let partial_target = pg_sys::create_empty_pathtarget();
        let mut select = Vec::new();
        let mut group_positions = Vec::new();
        for (expr, sortgroupref) in &grouping.grouped {
            select.push(sql.text(*expr)?);
            pg_sys::add_column_to_pathtarget(partial_target, expr.cast(), *sortgroupref);
            group_positions.push(select.len().to_string());
        }
        for column in &grouping.dependent_columns {
            select.push(sql.text(*column)?);
            pg_sys::add_column_to_pathtarget(partial_target, column.cast(), 0);
            group_positions.push(select.len().to_string());
        }
        for aggref in &grouping.aggregates {
            select.push(partial_call(*aggref, &mut sql)?);
            let partial = pg_sys::copyObjectImpl(aggref.cast()).cast::<pg_sys::Aggref>();
            pg_sys::mark_partial_aggref(partial, pg_sys::AggSplit::AGGSPLIT_INITIAL_SERIAL);
            pg_sys::add_column_to_pathtarget(partial_target, partial.cast(), 0);
        }
        pg_sys::set_pathtarget_cost_width(root, partial_target);
        let plan = ScanPlan {
            select_sql: select.join(", "),
            group_by: group_positions.join(", "),
            columns: (1..=select.len() as i16).collect(),
            exec_params: sql.take_exec_params(),
            distinct: false,
            ..base_plan.clone()
        };
        let shards = plan.shard_ids.len().max(1) as f64;
        let partial_rel = pg_sys::fetch_upper_rel(
            root,
            pg_sys::UpperRelationKind::UPPERREL_PARTIAL_GROUP_AGG,
            std::ptr::null_mut(),
        );
        (*partial_rel).reltarget = partial_target;
        let total_cost = 100.0 + 10.0 * shards + groups * shards * 0.01;
        let path = new_custom_path(
            partial_rel,
            partial_target,
            groups * shards,
            total_cost,
            &plan,
            pushed_down_path_methods(),
        );

        let mut input: *mut pg_sys::Path = path.cast();
        let strategy = if (*parse).groupClause.is_null() {
            pg_sys::AggStrategy::AGG_PLAIN
        } else if pg_sys::grouping_is_hashable((*parse).groupClause) {
            pg_sys::AggStrategy::AGG_HASHED
        } else {
            input =
                pg_sys::create_sort_path(root, partial_rel, input, (*root).group_pathkeys, -1.0)
                    .cast();
            pg_sys::AggStrategy::AGG_SORTED
        };
        Some(
            pg_sys::create_agg_path(
                root,
                output_rel,
                input,
                grouping.target,
                strategy,
                pg_sys::AggSplit::AGGSPLIT_FINAL_DESERIAL,
                (*parse).groupClause,
                grouping.having,
                // extra->agg_final_costs is only filled in when PostgreSQL plans a parallel
                // partial aggregate itself; the workers do the transitions here anyway.
                &pg_sys::AggClauseCosts::default(),
                groups,
            )
            .cast(),
        )
    }
}
