//! ORDER BY without LIMIT over one Distributed Scan: each connection's fragments come back
//! sorted by the worker (`… UNION ALL … ORDER BY <positions>`) and the coordinator merges the
//! sorted streams, so no Sort runs here and the first rows arrive before the last are read.
//!
//! The merge compares the scan's own output columns, so every sort key must be one of them
//! (a column of the table, or an output of a pushed-down join, aggregate or window), sorted by
//! its type's default `<` or `>` under a collation that orders the same on every node.

use pgrx::pg_sys;
use pgrx::PgList;

use crate::planner::limit_path::{fragment_limit, limitable_scan, with_plan};
use crate::planner::scan_path::{MergeKey, ScanPlan};
use crate::planner::shippable::collation_ok;

/// Adds the merged path to `ordered_rel` when the query's rows come from one Distributed
/// Scan whose output holds every sort key.
pub unsafe fn add_merged_path(
    root: *mut pg_sys::PlannerInfo,
    input_rel: *mut pg_sys::RelOptInfo,
    ordered_rel: *mut pg_sys::RelOptInfo,
) {
    // SAFETY: the query's sort clauses and target list; paths in planner memory.
    unsafe {
        let parse = (*root).parse;
        // A constant LIMIT takes the top-N path instead (`limit_path.rs`).
        if (*parse).sortClause.is_null() || fragment_limit(parse).is_some() {
            return;
        }
        let Some((top, scan, plan)) = limitable_scan(root, input_rel) else {
            return;
        };
        let target = (*scan).path.pathtarget;
        let mut keys = Vec::new();
        for clause in PgList::<pg_sys::SortGroupClause>::from_pg((*parse).sortClause).iter_ptr() {
            let expr = pg_sys::get_sortgroupclause_expr(clause, (*parse).targetList);
            let Some(key) = merge_key(&plan, target, clause, expr.cast()) else {
                return;
            };
            keys.push(key);
        }
        let plan = ScanPlan {
            merge_keys: keys,
            ..plan
        };
        let mut path = with_plan(
            root,
            top,
            scan,
            &plan,
            (*scan).path.rows,
            (*root).sort_pathkeys,
        );
        let target = (*root).upper_targets[pg_sys::UpperRelationKind::UPPERREL_ORDERED as usize];
        if !target.is_null() && (*path).pathtarget != target {
            path = pg_sys::apply_projection_to_path(root, ordered_rel, path, target);
        }
        (*ordered_rel).pathlist = std::ptr::null_mut();
        (*ordered_rel).partial_pathlist = std::ptr::null_mut();
        pg_sys::add_path(ordered_rel, path);
    }
}

/// How the coordinator compares `expr` (a sort key) between two scan rows, if it is one of the
/// scan's output columns.
unsafe fn merge_key(
    plan: &ScanPlan,
    target: *mut pg_sys::PathTarget,
    clause: *mut pg_sys::SortGroupClause,
    expr: *mut pg_sys::Node,
) -> Option<MergeKey> {
    // SAFETY: expr is a sort expression of the query; target the scan path's output.
    unsafe {
        let slot_index = if plan.select_sql.is_empty() && plan.from_sql.is_empty() {
            // A table scan: its scan tuple is the table's row.
            if (*expr).type_ != pg_sys::NodeTag::T_Var {
                return None;
            }
            let var = expr.cast::<pg_sys::Var>();
            if (*var).varno as u32 != plan.base_rti
                || (*var).varlevelsup != 0
                || (*var).varattno < 1
            {
                return None;
            }
            (*var).varattno as usize - 1
        } else {
            // A pushed-down join, aggregate or window: its scan tuple is the path's target.
            PgList::<pg_sys::Node>::from_pg((*target).exprs)
                .iter_ptr()
                .position(|output| pg_sys::equal(output.cast(), expr.cast()))?
        };
        let position = plan
            .columns
            .iter()
            .position(|attno| *attno as usize == slot_index + 1)?
            + 1;
        let collation = pg_sys::exprCollation(expr);
        if !collation_ok(collation) {
            return None;
        }
        let types = pg_sys::lookup_type_cache(
            pg_sys::exprType(expr),
            (pg_sys::TYPECACHE_LT_OPR | pg_sys::TYPECACHE_GT_OPR) as i32,
        );
        let descending = if (*clause).sortop == (*types).lt_opr {
            false
        } else if (*clause).sortop == (*types).gt_opr {
            true
        } else {
            return None; // ORDER BY … USING another operator
        };
        Some(MergeKey {
            slot_index,
            position,
            sort_operator: (*clause).sortop,
            collation,
            descending,
            nulls_first: (*clause).nulls_first,
        })
    }
}
