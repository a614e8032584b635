//! The source of a MERGE that the coordinator reads first — a subquery, a view, `VALUES`, a
//! function, a WITH query, a table of its own or one with row-level security — and sends to
//! the shards' MERGE statements as arrays (each shard only the rows whose key hashes to it).
//!
//! The source is written back as SQL and run through SPI at execution, in the statement's
//! snapshot and with its parameters, so that PostgreSQL applies to it what it applies to any
//! query: the policies of the tables it reads (as the user running it), and a view's owner's
//! privileges and policies. For that last point the views the rewriter expanded are put back
//! as views before the text is written (`views_restored`): the expansion's tables would
//! otherwise be read with the privileges of the user instead of the view's owner.

use std::ffi::{c_void, CStr};

use pgrx::pg_sys;
use pgrx::PgList;

use crate::metadata::cache;
use crate::planner::merge_plan::{new_node, range_entry, SOURCE_K};
use crate::planner::modify_pushdown::deparse_with_shards;
use crate::planner::scan_path::ScanPlan;
use crate::planner::shippable::{travels_in_array, BROADCAST_BASE};
use crate::remote::quote::quote_identifier;

/// A source the coordinator reads first (`ScanPlan::column_types`): the shards' `USING`
/// (`unnest($<BROADCAST_BASE>, …) AS pgdist_t2(<names>)`), the read, and the names given to
/// the source's columns when they are not a table's own (unique, for the shards' SQL).
pub struct SourceRead {
    pub using: String,
    pub read: ScanPlan,
    pub renamed: Option<Vec<String>>,
}

/// The source (entry `source_rti` of MERGE `parse`) as SQL the coordinator runs at execution:
/// every column, and with `partition_by` (the source column equated with the target's
/// distribution column) the index of the `target` shard each row belongs to (a NULL key:
/// the first, where inserting it fails as in PostgreSQL). None when a column cannot travel
/// in an array.
pub unsafe fn read_first(
    parse: *mut pg_sys::Query,
    source_rti: i32,
    partition_by: Option<i16>,
    target: pg_sys::Oid,
) -> Option<SourceRead> {
    // SAFETY: builds a SELECT over a private copy of the statement's range table and WITH
    // list; the source entry's columns are expanded, not changed.
    unsafe {
        let entry = range_entry((*parse).rtable, source_rti);
        let mut colnames: *mut pg_sys::List = std::ptr::null_mut();
        let mut colvars: *mut pg_sys::List = std::ptr::null_mut();
        pg_sys::expandRTE(entry, source_rti, 0, -1, false, &mut colnames, &mut colvars);
        let vars = PgList::<pg_sys::Var>::from_pg(colvars);
        let mut names: Vec<String> = Vec::new();
        for name in PgList::<pg_sys::String>::from_pg(colnames).iter_ptr() {
            let base = CStr::from_ptr((*name).sval).to_string_lossy().into_owned();
            let mut unique = base.clone();
            let mut suffix = 1;
            while names.contains(&unique) {
                unique = format!("{base}_{suffix}");
                suffix += 1;
            }
            names.push(unique);
        }
        let mut targets = PgList::<pg_sys::TargetEntry>::new();
        let mut column_types = Vec::new();
        let mut key_position = None;
        for (i, var) in vars.iter_ptr().enumerate() {
            if !travels_in_array((*var).vartype, (*var).varcollid) {
                return None;
            }
            if Some((*var).varattno) == partition_by {
                key_position = Some(i);
            }
            column_types.push((*var).vartype);
            targets.push(pg_sys::makeTargetEntry(
                var.cast(),
                (i + 1) as i16,
                std::ptr::null_mut(),
                false,
            ));
        }
        let select = new_node::<pg_sys::Query>(pg_sys::NodeTag::T_Query);
        (*select).commandType = pg_sys::CmdType::CMD_SELECT;
        (*select).canSetTag = true;
        (*select).rtable = pg_sys::copyObjectImpl((*parse).rtable.cast()).cast();
        (*select).cteList = pg_sys::copyObjectImpl((*parse).cteList.cast()).cast();
        let source_copy = range_entry((*select).rtable, source_rti);
        restore_view(source_copy);
        if (*source_copy).rtekind == pg_sys::RTEKind::RTE_SUBQUERY {
            views_restored((*source_copy).subquery.cast(), std::ptr::null_mut());
        }
        views_restored((*select).cteList.cast(), std::ptr::null_mut());
        let reference = new_node::<pg_sys::RangeTblRef>(pg_sys::NodeTag::T_RangeTblRef);
        (*reference).rtindex = source_rti;
        let mut from = PgList::<pg_sys::RangeTblRef>::new();
        from.push(reference);
        (*select).jointree = pg_sys::makeFromExpr(from.into_pg(), std::ptr::null_mut());
        (*select).targetList = targets.into_pg();
        let sql = deparse_with_shards(select, &[]).ok()?;
        let quoted: Vec<String> = names.iter().map(|n| quote_identifier(n)).collect();
        let statement_sql = match (partition_by, key_position) {
            (Some(_), Some(position)) => {
                let shard_count = cache::shards(target).len() as i32;
                let key = format!("pgdist_source.{}", quoted[position]);
                format!(
                    "SELECT pgdist_source.*, coalesce({}, 0) FROM ({sql}) pgdist_source({})",
                    crate::distribution::hashing::hash_index_sql(&key, shard_count),
                    quoted.join(", ")
                )
            }
            (Some(_), None) => return None,
            (None, _) => sql,
        };
        let arrays: Vec<String> = (0..names.len())
            .map(|i| format!("${}", BROADCAST_BASE + i as i32))
            .collect();
        let using = format!(
            "unnest({}) AS pgdist_t{SOURCE_K}({})",
            arrays.join(", "),
            quoted.join(", ")
        );
        let is_table = (*entry).rtekind == pg_sys::RTEKind::RTE_RELATION;
        Some(SourceRead {
            using,
            read: ScanPlan {
                statement_sql,
                columns: (1..=names.len() as i16).collect(),
                column_types,
                partitioned: partition_by.is_some(),
                ..Default::default()
            },
            renamed: (!is_table).then_some(names),
        })
    }
}

/// Puts back as views, in `node` (a query, a list of WITH queries or an expression) and
/// below, the subqueries the rewriter expanded views into.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn views_restored(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: node is a private copy of part of the statement; casts follow the tags.
    unsafe {
        if (*node).type_ == pg_sys::NodeTag::T_Query {
            let query = node.cast::<pg_sys::Query>();
            for entry in PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable).iter_ptr() {
                restore_view(entry);
            }
            return pg_sys::query_tree_walker(query, Some(views_restored), context, 0);
        }
        pg_sys::expression_tree_walker(node, Some(views_restored), context)
    }
}

/// Entry `entry` back as a reference to the view it is the expansion of, if it is one: in
/// PostgreSQL 15 an expanded view's query keeps the view itself, unread, as its first entry
/// (a view that is read is always expanded, so such an entry is nothing else).
unsafe fn restore_view(entry: *mut pg_sys::RangeTblEntry) {
    // SAFETY: entry is a private copy; its subquery's range table holds RangeTblEntry nodes.
    unsafe {
        if (*entry).rtekind != pg_sys::RTEKind::RTE_SUBQUERY
            || (*(*entry).subquery).rtable.is_null()
        {
            return;
        }
        let first = range_entry((*(*entry).subquery).rtable, 1);
        if (*first).rtekind != pg_sys::RTEKind::RTE_RELATION
            || (*first).relkind != pg_sys::RELKIND_VIEW as std::ffi::c_char
            || (*first).inFromCl
        {
            return;
        }
        (*entry).rtekind = pg_sys::RTEKind::RTE_RELATION;
        (*entry).relid = (*first).relid;
        (*entry).relkind = pg_sys::RELKIND_VIEW as std::ffi::c_char;
        (*entry).rellockmode = pg_sys::AccessShareLock as i32;
        (*entry).inh = true;
        (*entry).subquery = std::ptr::null_mut();
        (*entry).security_barrier = false;
    }
}
