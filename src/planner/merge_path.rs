//! ORDER BY without LIMIT over one Distributed Scan: each connection's fragments come back
//! sorted by the worker (`… UNION ALL … ORDER BY <positions>`) and the coordinator merges the
//! sorted streams, so no Sort runs here and the first rows arrive before the last are read.
//!
//! A table that is its query's only relation also gets a second, sorted path in the order the
//! query wants first (`query_pathkeys`: GROUP BY, DISTINCT or ORDER BY), so that a
//! GroupAggregate or Unique above it needs no Sort either; PostgreSQL picks it by cost.
//!
//! The merge compares the scan's own output columns, so every sort key must be one of them
//! (a column of the table, or an output of a pushed-down join, aggregate or window), sorted by
//! its type's default `<` or `>` under a collation that orders the same on every node.

use pgrx::pg_sys;
use pgrx::PgList;

use crate::planner::limit_path::{fragment_limit, limitable_scan, with_plan};
use crate::planner::scan_path::{new_custom_path, MergeKey, ScanPlan};
use crate::planner::shippable::{collation_ok, is_descending};

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
        // Each connection runs its share as one `… UNION ALL … ORDER BY` query, which cannot
        // lock rows.
        let Some((top, scan, plan)) = limitable_scan(root, input_rel) else {
            return;
        };
        if !plan.row_lock.is_empty() {
            return;
        }
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
        let descending = is_descending(pg_sys::exprType(expr), (*clause).sortop)?;
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

/// Adds a copy of the table scan `unsorted` whose rows come back in `query_pathkeys` order,
/// when `rel` is the query's only relation and every key is one of its columns.
pub unsafe fn add_sorted_table_path(
    root: *mut pg_sys::PlannerInfo,
    rel: *mut pg_sys::RelOptInfo,
    unsorted: *mut pg_sys::CustomPath,
    plan: &ScanPlan,
) {
    // SAFETY: the planner's pathkeys and equivalence classes; paths in planner memory.
    unsafe {
        let pathkeys = (*root).query_pathkeys;
        if pathkeys.is_null()
            || !plan.row_lock.is_empty()
            || pg_sys::bms_membership((*root).all_baserels) != pg_sys::BMS_Membership::BMS_SINGLETON
        {
            return;
        }
        let mut keys = Vec::new();
        for pathkey in PgList::<pg_sys::PathKey>::from_pg(pathkeys).iter_ptr() {
            let Some(key) = table_merge_key(rel, plan, pathkey) else {
                return;
            };
            keys.push(key);
        }
        let sorted_plan = ScanPlan {
            merge_keys: keys,
            ..plan.clone()
        };
        let rows = (*unsorted).path.rows;
        // Merging costs a comparison or two per row, less than a Sort of the same rows. And at
        // least 2% more than the unsorted scan: add_path would drop an unsorted path within 1%
        // of a sorted one, and the pushdowns build on the unsorted scan.
        let sorted = new_custom_path(
            rel,
            (*unsorted).path.pathtarget,
            rows,
            (*unsorted).path.total_cost * 1.02 + rows * 0.005,
            &sorted_plan,
            (*unsorted).methods,
        );
        (*sorted).flags = (*unsorted).flags;
        (*sorted).path.pathkeys = pathkeys;
        pg_sys::add_path(rel, sorted.cast());
    }
}

/// How the coordinator compares the column of `rel` that `pathkey` sorts by.
unsafe fn table_merge_key(
    rel: *mut pg_sys::RelOptInfo,
    plan: &ScanPlan,
    pathkey: *mut pg_sys::PathKey,
) -> Option<MergeKey> {
    // SAFETY: a pathkey of the query being planned and its equivalence class.
    unsafe {
        let class = (*pathkey).pk_eclass;
        let var = PgList::<pg_sys::EquivalenceMember>::from_pg((*class).ec_members)
            .iter_ptr()
            .map(|member| (*member).em_expr.cast::<pg_sys::Node>())
            .find(|expr| {
                (**expr).type_ == pg_sys::NodeTag::T_Var && {
                    let var = expr.cast::<pg_sys::Var>();
                    (*var).varno as u32 == (*rel).relid
                        && (*var).varlevelsup == 0
                        && (*var).varattno > 0
                }
            })?
            .cast::<pg_sys::Var>();
        let attno = (*var).varattno;
        let position = plan.columns.iter().position(|c| *c == attno)? + 1;
        let type_oid = (*var).vartype;
        let sort_operator = pg_sys::get_opfamily_member(
            (*pathkey).pk_opfamily,
            type_oid,
            type_oid,
            (*pathkey).pk_strategy as i16,
        );
        let descending = is_descending(type_oid, sort_operator)?;
        let collation = (*class).ec_collation;
        if !collation_ok(collation) {
            return None;
        }
        Some(MergeKey {
            slot_index: attno as usize - 1,
            position,
            sort_operator,
            collation,
            descending,
            nulls_first: (*pathkey).pk_nulls_first,
        })
    }
}
