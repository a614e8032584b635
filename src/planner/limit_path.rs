//! LIMIT pushdown: when a query's rows all come from one Distributed Scan (a table, a
//! pushed-down join, or an aggregate computed whole on the workers) and it asks for the first
//! `n` rows, each fragment returns at most `n + offset` rows — its own first ones in the
//! query's ORDER BY when there is one. PostgreSQL's Sort (a top-N heap sort) and Limit on the
//! coordinator then pick the answer from at most `shards × (n + offset)` rows instead of the
//! whole table.
//!
//! Only constant LIMIT / OFFSET and sort keys that mean the same on a worker (shippable
//! expressions, the type's default `<` or `>`) are pushed down; anything else keeps the plan
//! that reads every row, which is always correct.

use pgrx::pg_sys;
use pgrx::PgList;

use crate::planner::scan_path::{
    all_clauses_ship, from_list, is_distributed_scan, new_custom_path, ScanPlan,
};
use crate::planner::shippable::{sort_key_text, ScanDeparser};

/// How many rows each fragment must return: LIMIT + OFFSET, when both are constants.
pub unsafe fn fragment_limit(parse: *mut pg_sys::Query) -> Option<i64> {
    // SAFETY: LIMIT and OFFSET expressions of a planned query (coerced to bigint).
    unsafe {
        let constant = |node: *mut pg_sys::Node| -> Option<i64> {
            if node.is_null() {
                return Some(0);
            }
            let c = node.cast::<pg_sys::Const>();
            ((*node).type_ == pg_sys::NodeTag::T_Const
                && !(*c).constisnull
                && (*c).consttype == pg_sys::INT8OID)
                .then(|| (*c).constvalue.value() as i64)
        };
        if (*parse).limitOption != pg_sys::LimitOption::LIMIT_OPTION_COUNT
            || (*parse).limitCount.is_null()
        {
            return None;
        }
        constant((*parse).limitCount)?.checked_add(constant((*parse).limitOffset)?)
    }
}

/// The Distributed Scan that produces all of `rel`'s rows, if a LIMIT may go into its
/// fragments: `(rel's path, the scan under it, the scan's plan)`.
pub unsafe fn limitable_scan(
    root: *mut pg_sys::PlannerInfo,
    rel: *mut pg_sys::RelOptInfo,
) -> Option<(*mut pg_sys::Path, *mut pg_sys::CustomPath, ScanPlan)> {
    // SAFETY: rel's paths and clauses, as the planner made them.
    unsafe {
        let parse = (*root).parse;
        // A set-returning function or DISTINCT changes the rows after the scan.
        if (*parse).hasTargetSRFs
            || !(*parse).distinctClause.is_null()
            || !(*parse).setOperations.is_null()
        {
            return None;
        }
        // Every filter must run before the fragment's LIMIT.
        let all_shipped = all_clauses_ship(rel);
        if !all_shipped {
            return None;
        }
        let top = (*rel).cheapest_total_path;
        if top.is_null() {
            return None;
        }
        let scan = if (*top).type_ == pg_sys::NodeTag::T_ProjectionPath {
            (*top.cast::<pg_sys::ProjectionPath>()).subpath
        } else {
            top
        };
        if !is_distributed_scan(scan) || !(*scan).param_info.is_null() {
            return None;
        }
        let scan = scan.cast::<pg_sys::CustomPath>();
        let plan = ScanPlan::decode(&from_list((*scan).custom_private));
        // With row locks only on one shard: there the fragment locks just the rows it
        // returns, as PostgreSQL would.
        let locks_ok =
            plan.row_lock.is_empty() || plan.shard_ids.len() == 1 || plan.prune_param > 0;
        (locks_ok && plan.limit.is_empty() && plan.merge_keys.is_empty())
            .then_some((top, scan, plan))
    }
}

/// A copy of `top` whose scan runs `plan`, returning `rows` rows in the order of `pathkeys`.
pub unsafe fn with_plan(
    root: *mut pg_sys::PlannerInfo,
    top: *mut pg_sys::Path,
    scan: *mut pg_sys::CustomPath,
    plan: &ScanPlan,
    rows: f64,
    pathkeys: *mut pg_sys::List,
) -> *mut pg_sys::Path {
    // SAFETY: new paths in planner memory over the same relations and targets.
    unsafe {
        let shards = plan.shard_ids.len().max(1) as f64;
        let limited = new_custom_path(
            (*scan).path.parent,
            (*scan).path.pathtarget,
            rows,
            100.0 + 10.0 * shards + rows * 0.01,
            plan,
            (*scan).methods,
        );
        (*limited).flags = (*scan).flags;
        (*limited).path.pathkeys = pathkeys;
        if top == scan.cast() {
            limited.cast()
        } else {
            pg_sys::create_projection_path(root, (*top).parent, limited.cast(), (*top).pathtarget)
                .cast()
        }
    }
}

/// `ORDER BY … LIMIT n`: fragments sort and return their first rows; the coordinator sorts
/// those.
pub unsafe fn add_top_n_path(
    root: *mut pg_sys::PlannerInfo,
    input_rel: *mut pg_sys::RelOptInfo,
    ordered_rel: *mut pg_sys::RelOptInfo,
) {
    // SAFETY: the query's sort clauses and target list; paths in planner memory.
    unsafe {
        let parse = (*root).parse;
        let Some(limit) = fragment_limit(parse) else {
            return;
        };
        let Some((top, scan, plan)) = limitable_scan(root, input_rel) else {
            return;
        };
        let mut sql = ScanDeparser::new(root, &plan);
        let mut keys = Vec::new();
        for clause in PgList::<pg_sys::SortGroupClause>::from_pg((*parse).sortClause).iter_ptr() {
            let Some(key) = sort_key_text(&mut sql, clause, (*parse).targetList) else {
                return;
            };
            keys.push(key);
        }
        let plan = ScanPlan {
            order_by: keys.join(", "),
            limit: limit.to_string(),
            exec_params: sql.take_exec_params(),
            ..plan
        };
        let shards = plan.shard_ids.len().max(1) as f64;
        let rows = (*scan).path.rows.min(shards * limit as f64).max(1.0);
        let path = with_plan(root, top, scan, &plan, rows, std::ptr::null_mut());
        let mut sorted: *mut pg_sys::Path = pg_sys::create_sort_path(
            root,
            ordered_rel,
            path,
            (*root).sort_pathkeys,
            (*root).limit_tuples,
        )
        .cast();
        let target = (*root).upper_targets[pg_sys::UpperRelationKind::UPPERREL_ORDERED as usize];
        if !target.is_null() && (*sorted).pathtarget != target {
            sorted = pg_sys::apply_projection_to_path(root, ordered_rel, sorted, target);
        }
        (*ordered_rel).pathlist = std::ptr::null_mut();
        (*ordered_rel).partial_pathlist = std::ptr::null_mut();
        pg_sys::add_path(ordered_rel, sorted);
    }
}

/// `LIMIT n` without ORDER BY: any `n` rows will do, so each fragment stops after `n`.
pub unsafe fn add_first_rows_path(
    root: *mut pg_sys::PlannerInfo,
    input_rel: *mut pg_sys::RelOptInfo,
    final_rel: *mut pg_sys::RelOptInfo,
    extra: *mut pg_sys::FinalPathExtraData,
) {
    // SAFETY: the query's LIMIT clause; paths in planner memory.
    unsafe {
        let parse = (*root).parse;
        if !(*extra).limit_needed || !(*parse).rowMarks.is_null() {
            return;
        }
        let Some(limit) = fragment_limit(parse) else {
            return;
        };
        let Some((top, scan, plan)) = limitable_scan(root, input_rel) else {
            return;
        };
        let plan = ScanPlan {
            limit: limit.to_string(),
            ..plan
        };
        let shards = plan.shard_ids.len().max(1) as f64;
        let rows = (*scan).path.rows.min(shards * limit as f64).max(1.0);
        let path = with_plan(root, top, scan, &plan, rows, std::ptr::null_mut());
        let limited = pg_sys::create_limit_path(
            root,
            final_rel,
            path,
            (*parse).limitOffset,
            (*parse).limitCount,
            (*parse).limitOption,
            (*extra).offset_est,
            (*extra).count_est,
        );
        (*final_rel).pathlist = std::ptr::null_mut();
        (*final_rel).partial_pathlist = std::ptr::null_mut();
        pg_sys::add_path(final_rel, limited.cast());
    }
}
