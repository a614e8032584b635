//! Aggregate pushdown: when a query groups and aggregates one distributed table or a join
//! pushed down to the workers (`join_path.rs`), the workers
//! compute per-shard *partial* aggregates and PostgreSQL's own Agg node combines them, exactly
//! as parallel query splits an aggregate between workers and leader (AGGSPLIT_INITIAL_SERIAL /
//! AGGSPLIT_FINAL_DESERIAL).
//!
//! A worker runs `SELECT <group exprs>, pgdist.partial_<aggfnoid>(<args>), … FROM <shard>
//! WHERE <shipped clauses> GROUP BY <group exprs>`: each `pgdist.partial_*` aggregate (created by
//! `sql/partial_aggregates.sql` on every node) returns the built-in aggregate's transition state,
//! serialized when it is `internal`. The CustomScan returns those rows; the Agg node above
//! deserializes, combines and finalizes them and applies HAVING. Anything that does not fit —
//! DISTINCT / ORDER BY / FILTER in aggregates, non-built-in or non-combinable aggregates,
//! grouping sets, clauses or expressions that cannot run on the workers — keeps the plain plan
//! (aggregation on the coordinator), which is always correct.

use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::PgList;

use crate::planner::scan_path::{
    distributed_path_of, from_list, new_custom_path, pushed_down_path_methods, ScanPlan,
};
use crate::planner::shippable::{deparse, deparse_qualified, shippable};

static mut PREVIOUS_HOOK: pg_sys::create_upper_paths_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster; we chain to the previous hook.
    unsafe {
        PREVIOUS_HOOK = pg_sys::create_upper_paths_hook;
        pg_sys::create_upper_paths_hook = Some(create_upper_paths);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn create_upper_paths(
    root: *mut pg_sys::PlannerInfo,
    stage: pg_sys::UpperRelationKind::Type,
    input_rel: *mut pg_sys::RelOptInfo,
    output_rel: *mut pg_sys::RelOptInfo,
    extra: *mut std::ffi::c_void,
) {
    // SAFETY: arguments come from the planner and are valid for this call.
    unsafe {
        if let Some(previous) = PREVIOUS_HOOK {
            previous(root, stage, input_rel, output_rel, extra);
        }
        if stage != pg_sys::UpperRelationKind::UPPERREL_GROUP_AGG || extra.is_null() {
            return;
        }
        add_pushdown_path(root, input_rel, output_rel, extra.cast());
    }
}

/// The text that computes `aggref`'s partial state on a worker, if it can be pushed down.
unsafe fn partial_call(aggref: *mut pg_sys::Aggref, sql: &mut Deparser) -> Option<String> {
    // SAFETY: aggref is a valid Aggref of the query.
    unsafe {
        if !(*aggref).aggorder.is_null()
            || !(*aggref).aggdistinct.is_null()
            || !(*aggref).aggfilter.is_null()
            || (*aggref).aggkind != b'n' as std::ffi::c_char
            || (*aggref).agglevelsup != 0
            || (*aggref).aggvariadic
            || u32::from((*aggref).aggfnoid) >= pg_sys::FirstNormalObjectId
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

/// Writes expressions over the aggregated input as worker SQL: a base table's columns
/// unqualified, a pushed-down join's as `r<rti>.<column>`.
struct Deparser {
    root: *mut pg_sys::PlannerInfo,
    /// The base table and its range-table index; None for a join.
    base: Option<(pg_sys::Oid, u32)>,
    exec_params: Vec<(i32, pg_sys::Oid)>,
}

impl Deparser {
    /// The text of `expr`, or None when it cannot run on the workers.
    unsafe fn text(&mut self, expr: *mut pg_sys::Node) -> Option<String> {
        // SAFETY: expr is a valid expression of the query being planned.
        unsafe {
            if !shippable(expr) {
                return None;
            }
            let (text, params) = match self.base {
                Some((relid, rti)) => deparse(expr, relid, rti),
                None => deparse_qualified(self.root, expr),
            };
            self.exec_params.extend(params);
            Some(text)
        }
    }
}

unsafe fn add_pushdown_path(
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
        let all_shipped = PgList::<pg_sys::RestrictInfo>::from_pg((*input_rel).baserestrictinfo)
            .iter_ptr()
            .all(|ri| shippable((*ri).clause.cast()));
        if !all_shipped {
            return;
        }
        let mut sql = Deparser {
            root,
            base: base_plan
                .from_sql
                .is_empty()
                .then_some((base_plan.relid, (*input_rel).relid)),
            exec_params: base_plan.exec_params.clone(),
        };

        let grouping_target = (*output_rel).reltarget;
        let partial_target = pg_sys::create_empty_pathtarget();
        let mut select = Vec::new();
        let mut group_positions = Vec::new();
        let mut others = PgList::<pg_sys::Node>::new();
        let exprs = PgList::<pg_sys::Node>::from_pg((*grouping_target).exprs);
        for (i, expr) in exprs.iter_ptr().enumerate() {
            let sortgroupref = if (*grouping_target).sortgrouprefs.is_null() {
                0
            } else {
                *(*grouping_target).sortgrouprefs.add(i)
            };
            let grouped = sortgroupref != 0
                && !pg_sys::get_sortgroupref_clause_noerr(sortgroupref, (*parse).groupClause)
                    .is_null();
            if grouped {
                let Some(text) = sql.text(expr) else {
                    return;
                };
                pg_sys::add_column_to_pathtarget(partial_target, expr.cast(), sortgroupref);
                select.push(text);
                group_positions.push(select.len().to_string());
            } else {
                others.push(expr);
            }
        }
        if !(*extra).havingQual.is_null() {
            others.push((*extra).havingQual);
        }
        let needed = pg_sys::pull_var_clause(
            others.into_pg().cast(),
            pg_sys::PVC_INCLUDE_AGGREGATES as i32,
        );
        for node in PgList::<pg_sys::Node>::from_pg(needed).iter_ptr() {
            if (*node).type_ != pg_sys::NodeTag::T_Aggref {
                return; // a column outside the GROUP BY (functional dependency): keep it simple
            }
            let Some(call) = partial_call(node.cast(), &mut sql) else {
                return;
            };
            let partial = pg_sys::copyObjectImpl(node.cast()).cast::<pg_sys::Aggref>();
            pg_sys::mark_partial_aggref(partial, pg_sys::AggSplit::AGGSPLIT_INITIAL_SERIAL);
            pg_sys::add_column_to_pathtarget(partial_target, partial.cast(), 0);
            select.push(call);
        }

        pg_sys::set_pathtarget_cost_width(root, partial_target);
        let mut exec_params = sql.exec_params;
        exec_params.sort_unstable_by_key(|(id, _)| *id);
        exec_params.dedup_by_key(|(id, _)| *id);
        let plan = ScanPlan {
            select_sql: select.join(", "),
            group_by: group_positions.join(", "),
            columns: (1..=select.len() as i16).collect(),
            exec_params,
            ..base_plan
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
        let agg = pg_sys::create_agg_path(
            root,
            output_rel,
            input,
            grouping_target,
            strategy,
            pg_sys::AggSplit::AGGSPLIT_FINAL_DESERIAL,
            (*parse).groupClause,
            // Already an implicit-AND list at this stage of planning.
            (*extra).havingQual.cast::<pg_sys::List>(),
            // extra->agg_final_costs is only filled in when PostgreSQL plans a parallel
            // partial aggregate itself; the workers do the transitions here anyway.
            &pg_sys::AggClauseCosts::default(),
            groups,
        );
        // Pushed down is always cheaper than moving every row; make it the only choice.
        (*output_rel).pathlist = std::ptr::null_mut();
        (*output_rel).partial_pathlist = std::ptr::null_mut();
        pg_sys::add_path(output_rel, agg.cast());
    }
}
