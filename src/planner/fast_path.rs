//! The router fast path: a SELECT that reads one distributed table and pins its distribution
//! column to one value (`= constant` or `= $n`), or reads one reference table, runs whole on
//! one shard. Every row it can see lives in that shard, so aggregates, GROUP BY, ORDER BY,
//! DISTINCT and LIMIT computed there are the query's own answer.
//!
//! Such a query skips the standard planner: it is written back as SQL (`pg_get_querydef`, as
//! UPDATE and DELETE are) and planned as a single Distributed Scan whose fragment is the whole
//! statement. With `$n` the shard is picked at execution, so one cached plan serves every
//! value. Anything else — joins, subqueries, CTEs, row locks, expressions that cannot run on a
//! worker, output types that cannot come back as text — goes to the regular planner.

use pgrx::{pg_sys, PgList};

use crate::metadata::cache;
use crate::metadata::tables::{DistTable, Method};
use crate::planner::modify_pushdown;
use crate::planner::scan_path::{self, ScanPlan};
use crate::planner::shippable::{shippable, EXEC_PARAM_BASE};

/// The range-table index of the one table a fast-path query reads.
const TABLE_RTI: u32 = 1;

/// The plan of `parse` when it qualifies for the fast path.
pub unsafe fn plan(
    parse: *mut pg_sys::Query,
    cursor_options: i32,
) -> Option<*mut pg_sys::PlannedStmt> {
    // SAFETY: parse is the analysed statement being planned; we only read it and a copy.
    unsafe {
        let table = single_table(parse)?;
        // A scrollable cursor needs a plan that can run backwards: the standard planner adds a
        // Material node for that.
        if cursor_options & pg_sys::CURSOR_OPT_SCROLL as i32 != 0 {
            return None;
        }
        let (shard_ids, prune_param) = shard(parse, &table)?;
        let outputs = output_entries(parse)?;
        let copy = pg_sys::copyObjectImpl(parse.cast()).cast::<pg_sys::Query>();
        let rte = pg_sys::list_nth((*copy).rtable, 0).cast::<pg_sys::RangeTblEntry>();
        modify_pushdown::set_alias(rte, TABLE_RTI);
        let statement =
            modify_pushdown::deparse_with_shards(copy, &[(TABLE_RTI, table.oid)]).ok()?;
        let plan = ScanPlan {
            relid: table.oid,
            statement_sql: statement,
            columns: (1..=outputs.len() as i16).collect(),
            shard_ids,
            prune_param,
            relations: vec![(TABLE_RTI, table.oid)],
            ..Default::default()
        };
        Some(planned_stmt(parse, &table, plan, &outputs))
    }
}

/// The distributed (hash) or reference table that `parse` reads, when it reads only that
/// table, by itself, in a plain SELECT.
unsafe fn single_table(parse: *mut pg_sys::Query) -> Option<DistTable> {
    // SAFETY: reads fields of a valid Query.
    unsafe {
        let q = &*parse;
        let plain_select = q.commandType == pg_sys::CmdType::CMD_SELECT
            && q.utilityStmt.is_null()
            && q.cteList.is_null()
            && q.setOperations.is_null()
            && q.rowMarks.is_null()
            && !q.hasSubLinks
            && !q.hasWindowFuncs
            && !q.hasTargetSRFs
            && !q.hasRowSecurity
            && !q.hasForUpdate
            && q.groupingSets.is_null();
        let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg(q.rtable);
        let from = PgList::<pg_sys::Node>::from_pg((*q.jointree).fromlist);
        if !plain_select || rtable.len() != 1 || from.len() != 1 {
            return None;
        }
        let rte = rtable.get_ptr(0)?;
        let only_ref = from.get_ptr(0)?;
        if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION
            || !(*rte).tablesample.is_null()
            || !(*rte).securityQuals.is_null()
            || (*only_ref).type_ != pg_sys::NodeTag::T_RangeTblRef
        {
            return None;
        }
        cache::lookup((*rte).relid).filter(|t| matches!(t.method, Method::Hash | Method::Reference))
    }
}

/// True when `node` reads a system column (`ctid`, `xmin`, …) of the table.
unsafe fn reads_system_columns(node: *mut pg_sys::Node) -> bool {
    let mut set: *mut pg_sys::Bitmapset = std::ptr::null_mut();
    // SAFETY: node is an expression of the query; pull_varattnos numbers attributes from
    // FirstLowInvalidHeapAttributeNumber, so system columns come first.
    unsafe {
        pg_sys::pull_varattnos(node, TABLE_RTI, &mut set);
        let first = pg_sys::bms_next_member(set, -1);
        first >= 0 && first + pg_sys::FirstLowInvalidHeapAttributeNumber < 0
    }
}

/// The one shard the query reads — or every shard and the `$n` that picks one at execution —
/// when every expression in it can run on a worker.
unsafe fn shard(parse: *mut pg_sys::Query, table: &DistTable) -> Option<(Vec<i64>, i32)> {
    // SAFETY: reads a valid Query and catalog entries of its table.
    unsafe {
        let q = &*parse;
        let quals = (*q.jointree).quals;
        // System columns of the shards are refused by the regular path.
        let system_columns = [quals, q.havingQual, q.targetList.cast()]
            .into_iter()
            .any(|node| reads_system_columns(node));
        let everything_ships = !system_columns
            && shippable(quals)
            && shippable(q.havingQual)
            && shippable(q.limitCount)
            && shippable(q.limitOffset)
            && PgList::<pg_sys::Node>::from_pg(q.targetList)
                .iter_ptr()
                .all(|entry| shippable(entry));
        if !everything_ships {
            return None;
        }
        let shards = cache::shards(table.oid);
        if table.method == Method::Reference {
            return (shards.len() == 1).then(|| (vec![shards[0].0], 0));
        }
        let clauses: Vec<*mut pg_sys::Node> =
            PgList::<pg_sys::Node>::from_pg(pg_sys::make_ands_implicit(quals.cast()))
                .iter_ptr()
                .collect();
        let (ids, param) = scan_path::prune(table, &clauses, &shards);
        let statement_param = param > 0 && param < EXEC_PARAM_BASE;
        match ids.len() {
            1 => Some((ids, if statement_param { param } else { 0 })),
            _ if statement_param && ids.len() == shards.len() => Some((ids, param)),
            _ => None,
        }
    }
}

/// The query's output columns (junk columns left out), when each can come back as text and
/// be read by its type's input function.
unsafe fn output_entries(parse: *mut pg_sys::Query) -> Option<Vec<*mut pg_sys::TargetEntry>> {
    // SAFETY: reads the target list of a valid Query; type lookups by oid.
    unsafe {
        let entries: Vec<_> = PgList::<pg_sys::TargetEntry>::from_pg((*parse).targetList)
            .iter_ptr()
            .filter(|entry| !(**entry).resjunk)
            .collect();
        let readable = entries.iter().all(|entry| {
            let type_oid = pg_sys::exprType((**entry).expr.cast());
            pg_sys::get_typtype(type_oid) != pg_sys::TYPTYPE_PSEUDO as std::ffi::c_char
        });
        readable.then_some(entries)
    }
}

/// A PlannedStmt whose only node is the Distributed Scan of `plan`, returning `outputs`.
unsafe fn planned_stmt(
    parse: *mut pg_sys::Query,
    table: &DistTable,
    plan: ScanPlan,
    outputs: &[*mut pg_sys::TargetEntry],
) -> *mut pg_sys::PlannedStmt {
    // SAFETY: nodes are made in the planner's memory context and filled as the executor
    // expects of a CustomScan without a scan relation (its scan tuple is custom_scan_tlist;
    // the plan's target list refers to it through INDEX_VAR).
    unsafe {
        let mut scan_tlist = PgList::<pg_sys::TargetEntry>::new();
        let mut tlist = PgList::<pg_sys::TargetEntry>::new();
        let mut width = 0;
        for (entry, resno) in outputs.iter().zip(1i16..) {
            let expr = (**entry).expr.cast::<pg_sys::Node>();
            let (type_oid, typmod) = (pg_sys::exprType(expr), pg_sys::exprTypmod(expr));
            width += pg_sys::get_typavgwidth(type_oid, typmod);
            scan_tlist.push(pg_sys::makeTargetEntry(
                pg_sys::copyObjectImpl(expr.cast()).cast(),
                resno,
                (**entry).resname,
                false,
            ));
            let var = pg_sys::makeVar(
                pg_sys::INDEX_VAR as i32,
                resno,
                type_oid,
                typmod,
                pg_sys::exprCollation(expr),
                0,
            );
            tlist.push(pg_sys::makeTargetEntry(
                var.cast(),
                resno,
                (**entry).resname,
                false,
            ));
        }
        let all_shards = cache::shards(table.oid).len().max(1) as f64;
        let rows = table
            .row_estimate
            .map_or(1.0, |rows| (rows / all_shards).max(1.0).round());

        let scan =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::CustomScan>()).cast::<pg_sys::CustomScan>();
        (*scan).scan.plan.type_ = pg_sys::NodeTag::T_CustomScan;
        (*scan).scan.plan.startup_cost = 100.0;
        (*scan).scan.plan.total_cost = 110.0;
        (*scan).scan.plan.plan_rows = rows;
        (*scan).scan.plan.plan_width = width;
        (*scan).scan.plan.targetlist = tlist.into_pg();
        (*scan).scan.scanrelid = 0;
        (*scan).custom_scan_tlist = scan_tlist.into_pg();
        (*scan).custom_relids = pg_sys::bms_make_singleton(TABLE_RTI as i32);
        (*scan).custom_private = scan_path::to_list(plan.encode());
        (*scan).methods = crate::executor::scan::scan_methods();

        let stmt = pg_sys::palloc0(std::mem::size_of::<pg_sys::PlannedStmt>())
            .cast::<pg_sys::PlannedStmt>();
        (*stmt).type_ = pg_sys::NodeTag::T_PlannedStmt;
        (*stmt).commandType = pg_sys::CmdType::CMD_SELECT;
        (*stmt).queryId = (*parse).queryId;
        (*stmt).canSetTag = (*parse).canSetTag;
        (*stmt).planTree = scan.cast();
        (*stmt).rtable = (*parse).rtable;
        // The plan is invalid once the table or pgdist's metadata changes.
        let mut relations = pg_sys::lappend_oid(std::ptr::null_mut(), table.oid);
        if let Some(catalog) = cache::catalog_relid() {
            relations = pg_sys::lappend_oid(relations, catalog);
        }
        (*stmt).relationOids = relations;
        (*stmt).stmt_location = (*parse).stmt_location;
        (*stmt).stmt_len = (*parse).stmt_len;
        stmt
    }
}
