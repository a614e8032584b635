//! Aggregate pushdown: when a query groups and aggregates one distributed table, the workers
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
    from_list, is_distributed_scan, new_custom_path, pushed_down_path_methods, ScanPlan,
};
use crate::planner::shippable::{deparse, shippable};

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
unsafe fn partial_call(
    aggref: *mut pg_sys::Aggref,
    relid: pg_sys::Oid,
    rti: u32,
) -> Option<String> {
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
            let expr = (*entry).expr.cast::<pg_sys::Node>();
            if !shippable(expr) {
                return None;
            }
            args.push(deparse(expr, relid, rti).0);
        }
        let args = if (*aggref).aggstar {
            "*".to_string()
        } else {
            args.join(", ")
        };
        Some(format!("pgdist.{name}({args})"))
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
        if (*input_rel).reloptkind != pg_sys::RelOptKind::RELOPT_BASEREL
            || !(*parse).groupingSets.is_null()
            || (*parse).hasTargetSRFs
        {
            return;
        }
        // The scan may sit under a projection that computes the grouping expressions.
        let unwrap = |path: *mut pg_sys::Path| {
            if (*path).type_ == pg_sys::NodeTag::T_ProjectionPath {
                (*path.cast::<pg_sys::ProjectionPath>()).subpath
            } else {
                path
            }
        };
        let Some(base) = PgList::<pg_sys::Path>::from_pg((*input_rel).pathlist)
            .iter_ptr()
            .map(unwrap)
            .find(|p| is_distributed_scan(*p))
        else {
            return;
        };
        let base_plan = ScanPlan::decode(&from_list(
            (*base.cast::<pg_sys::CustomPath>()).custom_private,
        ));
        // Every restriction clause must run on the workers, or the partial results would be wrong.
        let all_shipped = PgList::<pg_sys::RestrictInfo>::from_pg((*input_rel).baserestrictinfo)
            .iter_ptr()
            .all(|ri| shippable((*ri).clause.cast()));
        if !all_shipped {
            return;
        }
        let rti = (*input_rel).relid;
        let relid = base_plan.relid;

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
                if !shippable(expr) {
                    return;
                }
                pg_sys::add_column_to_pathtarget(partial_target, expr.cast(), sortgroupref);
                select.push(deparse(expr, relid, rti).0);
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
            let Some(call) = partial_call(node.cast(), relid, rti) else {
                return;
            };
            let partial = pg_sys::copyObjectImpl(node.cast()).cast::<pg_sys::Aggref>();
            pg_sys::mark_partial_aggref(partial, pg_sys::AggSplit::AGGSPLIT_INITIAL_SERIAL);
            pg_sys::add_column_to_pathtarget(partial_target, partial.cast(), 0);
            select.push(call);
        }

        pg_sys::set_pathtarget_cost_width(root, partial_target);
        let plan = ScanPlan {
            select_sql: select.join(", "),
            group_by: group_positions.join(", "),
            columns: (1..=select.len() as i16).collect(),
            ..base_plan
        };
        let groups = if (*parse).groupClause.is_null() {
            1.0
        } else {
            (*output_rel).rows.max(1.0)
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
            &(*extra).agg_final_costs,
            groups,
        );
        // Pushed down is always cheaper than moving every row; make it the only choice.
        (*output_rel).pathlist = std::ptr::null_mut();
        (*output_rel).partial_pathlist = std::ptr::null_mut();
        pg_sys::add_path(output_rel, agg.cast());
    }
}
