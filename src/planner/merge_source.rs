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
//!
//! A source that is a join (`USING a JOIN b ON …`) is first turned into the subquery it
//! amounts to (`join_as_subquery`): the columns the statement reads become the subquery's.

use std::ffi::{c_void, CStr};

use pgrx::pg_sys;
use pgrx::PgList;

use crate::metadata::cache;
use crate::planner::merge_plan::{new_node, range_entry, SOURCE_K};
use crate::planner::modify_pushdown::deparse_with_shards;
use crate::planner::scan_path::ScanPlan;
use crate::planner::shippable::{as_mutator, travels_in_array, BROADCAST_BASE};
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
        let using = unnest_source(&quoted);
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

/// The shards' `USING` for a source whose columns (`names`, quoted) arrive as arrays:
/// `unnest($<BROADCAST_BASE>, …) AS pgdist_t2(<names>)`.
pub fn unnest_source(names: &[String]) -> String {
    let arrays: Vec<String> = (0..names.len())
        .map(|i| format!("${}", BROADCAST_BASE + i as i32))
        .collect();
    format!(
        "unnest({}) AS pgdist_t{SOURCE_K}({})",
        arrays.join(", "),
        names.join(", ")
    )
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

/// MERGE `parse` with a source that is a join rewritten, in a copy, to read a subquery of
/// that join instead: its select list is every column of the join's tables the statement
/// reads, and those references now point at the subquery's columns. Any other MERGE is
/// returned as it is.
pub unsafe fn join_as_subquery(parse: *mut pg_sys::Query) -> *mut pg_sys::Query {
    // SAFETY: parse is a valid MERGE; only a copy of it changes.
    unsafe {
        let from = PgList::<pg_sys::Node>::from_pg((*(*parse).jointree).fromlist);
        let join = match from.get_ptr(0) {
            Some(item) if from.len() == 1 && (*item).type_ == pg_sys::NodeTag::T_JoinExpr => item,
            _ => return parse,
        };
        let parse: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
        let mut remap = Remap {
            inside: join_relids(join),
            columns: Vec::new(),
            subquery_rti: PgList::<pg_sys::Node>::from_pg((*parse).rtable).len() as i32 + 1,
        };
        let context = (&raw mut remap).cast::<c_void>();
        let jointree = (*parse).jointree;
        (*jointree).quals = remap_var((*jointree).quals, context);
        for action in PgList::<pg_sys::MergeAction>::from_pg((*parse).mergeActionList).iter_ptr() {
            (*action).qual = remap_var((*action).qual, context);
            (*action).targetList = remap_var((*action).targetList.cast(), context).cast();
        }
        let mut targets = PgList::<pg_sys::TargetEntry>::new();
        let mut names = PgList::<pg_sys::String>::new();
        for (i, var) in remap.columns.iter().enumerate() {
            let name = std::ffi::CString::new(format!("c{}", i + 1)).unwrap_or_default();
            targets.push(pg_sys::makeTargetEntry(
                pg_sys::copyObjectImpl(var.cast()).cast(),
                (i + 1) as i16,
                pg_sys::pstrdup(name.as_ptr()),
                false,
            ));
            names.push(pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())));
        }
        let subquery = new_node::<pg_sys::Query>(pg_sys::NodeTag::T_Query);
        (*subquery).commandType = pg_sys::CmdType::CMD_SELECT;
        (*subquery).canSetTag = true;
        (*subquery).rtable = pg_sys::copyObjectImpl((*parse).rtable.cast()).cast();
        let mut subquery_from = PgList::<pg_sys::Node>::new();
        subquery_from.push(pg_sys::copyObjectImpl(join.cast()).cast());
        (*subquery).jointree = pg_sys::makeFromExpr(subquery_from.into_pg(), std::ptr::null_mut());
        (*subquery).targetList = targets.into_pg();
        let entry = new_node::<pg_sys::RangeTblEntry>(pg_sys::NodeTag::T_RangeTblEntry);
        (*entry).rtekind = pg_sys::RTEKind::RTE_SUBQUERY;
        (*entry).subquery = subquery;
        (*entry).inFromCl = true;
        (*entry).eref = pg_sys::makeAlias(c"pgdist_source".as_ptr(), names.into_pg());
        let mut rtable = PgList::<pg_sys::RangeTblEntry>::from_pg((*parse).rtable);
        // The statement no longer reads the join itself (its tables stay, unread): an
        // unread join entry would trip up ruleutils, which names a join's columns from the
        // join tree.
        for (i, other) in rtable.iter_ptr().enumerate() {
            if (*other).rtekind == pg_sys::RTEKind::RTE_JOIN
                && remap.inside.contains(&(i as i32 + 1))
            {
                (*other).rtekind = pg_sys::RTEKind::RTE_RESULT;
                (*other).joinaliasvars = std::ptr::null_mut();
                (*other).joinleftcols = std::ptr::null_mut();
                (*other).joinrightcols = std::ptr::null_mut();
            }
        }
        rtable.push(entry);
        (*parse).rtable = rtable.into_pg();
        let reference = new_node::<pg_sys::RangeTblRef>(pg_sys::NodeTag::T_RangeTblRef);
        (*reference).rtindex = remap.subquery_rti;
        let mut fromlist = PgList::<pg_sys::RangeTblRef>::new();
        fromlist.push(reference);
        (*jointree).fromlist = fromlist.into_pg();
        parse
    }
}

/// The columns of a join's tables that a MERGE reads, gathered while its references are
/// pointed at the subquery that returns them.
struct Remap {
    /// The range-table indexes inside the join (its tables and joins).
    inside: Vec<i32>,
    /// The subquery's columns, in order: the original references.
    columns: Vec<*mut pg_sys::Var>,
    subquery_rti: i32,
}

/// The range-table indexes of `node` (a join tree item) and everything below it.
unsafe fn join_relids(node: *mut pg_sys::Node) -> Vec<i32> {
    // SAFETY: node is a join tree item; casts follow the tags.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_RangeTblRef => vec![(*node.cast::<pg_sys::RangeTblRef>()).rtindex],
            pg_sys::NodeTag::T_JoinExpr => {
                let join = node.cast::<pg_sys::JoinExpr>();
                let mut relids = join_relids((*join).larg);
                relids.extend(join_relids((*join).rarg));
                relids.push((*join).rtindex);
                relids
            }
            _ => Vec::new(),
        }
    }
}

/// `node` with the references to the join's tables pointed at the subquery's columns.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn remap_var(
    node: *mut pg_sys::Node,
    context: *mut c_void,
) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    // SAFETY: node is a valid expression node; context is the Remap join_as_subquery passes.
    unsafe {
        let remap = &mut *context.cast::<Remap>();
        if (*node).type_ == pg_sys::NodeTag::T_Var {
            let var = node.cast::<pg_sys::Var>();
            if (*var).varlevelsup == 0 && remap.inside.contains(&(*var).varno) {
                let position = remap
                    .columns
                    .iter()
                    .position(|seen| pg_sys::equal(seen.cast(), var.cast()))
                    .unwrap_or_else(|| {
                        remap.columns.push(var);
                        remap.columns.len() - 1
                    });
                return pg_sys::makeVar(
                    remap.subquery_rti,
                    (position + 1) as i16,
                    (*var).vartype,
                    (*var).vartypmod,
                    (*var).varcollid,
                    0,
                )
                .cast();
            }
        }
        pg_sys::expression_tree_mutator(node, Some(as_mutator(remap_var)), context)
    }
}
