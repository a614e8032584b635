//! Distributed partitioned tables are planned as the single tables they are to their users.
//!
//! Each shard of a distributed partitioned table is a partitioned table on its worker, whose
//! partitions are the shards of the partitions (`distribution/create.rs`): the worker routes
//! rows and prunes partitions itself. So the coordinator must not expand the parent into its
//! partitions — each a distributed table of its own, read by a scan of its own, with nothing
//! pushed down above the Append that would join them. Before planning, a read of the parent
//! (`inh`) is therefore marked as a read of a plain table, which the Distributed Scan replaces
//! like any other; the partitions stay distributed tables that queries may name directly.
//! `UPDATE ONLY` / `DELETE FROM ONLY` the parent (which change nothing in PostgreSQL) are
//! refused; `SELECT … FROM ONLY` the parent stays the empty read PostgreSQL makes of it. When
//! pgdist writes such a query back as SQL for the workers, the marked reads are turned back
//! ([`with_parents_read_whole`]) so that the shard is not read `ONLY`.

use pgrx::pg_sys;
use pgrx::PgList;

use crate::distribution::create::relation_name;
use crate::metadata::cache;
use crate::planner::{each_query, PlannerError};

/// Marks every read of a distributed partitioned table in `parse` (and the queries inside it)
/// as a read of a plain table.
///
/// # Safety
/// `parse` must be the query being planned.
pub unsafe fn read_parents_whole(parse: *mut pg_sys::Query) -> Result<(), PlannerError> {
    let mut refused = None;
    // SAFETY: each_query hands over valid queries; their range tables hold range table entries.
    unsafe {
        each_query(parse.cast(), &mut |query| {
            let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable);
            for (index, rte) in rtable.iter_ptr().enumerate() {
                let partitioned = (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION
                    && (*rte).relkind == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char
                    && cache::lookup((*rte).relid).is_some();
                if !partitioned {
                    continue;
                }
                if (*rte).inh {
                    (*rte).inh = false;
                    (*rte).relkind = pg_sys::RELKIND_RELATION as std::ffi::c_char;
                } else if (*query).resultRelation == index as i32 + 1
                    && (*query).commandType != pg_sys::CmdType::CMD_INSERT
                    && refused.is_none()
                {
                    refused = Some(PlannerError::OnlyPartitioned(relation_name((*rte).relid)));
                }
            }
        });
    }
    refused.map_or(Ok(()), Err)
}

/// Runs `deparse` on `query` with the reads [`read_parents_whole`] marked as reads of plain
/// tables shown as reads of the whole partitioned table again (no `ONLY`).
///
/// # Safety
/// `query` must be a valid query.
pub unsafe fn with_parents_read_whole<T>(
    query: *mut pg_sys::Query,
    deparse: impl FnOnce() -> T,
) -> T {
    let mut marked = Vec::new();
    // SAFETY: each_query hands over valid queries; their range tables hold range table entries.
    unsafe {
        each_query(query.cast(), &mut |query| {
            for rte in PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable).iter_ptr() {
                if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION
                    && !(*rte).inh
                    && (*rte).relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char
                    && pg_sys::get_rel_relkind((*rte).relid)
                        == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char
                {
                    (*rte).inh = true;
                    marked.push(rte);
                }
            }
        });
    }
    let result = deparse();
    for rte in marked {
        // SAFETY: the entries found above, still part of the query. The deparser's
        // AcquireRewriteLocks set their relkind back to the table's own: marked again, so
        // that the next deparse of the query finds them.
        unsafe {
            (*rte).inh = false;
            (*rte).relkind = pg_sys::RELKIND_RELATION as std::ffi::c_char;
        }
    }
    result
}
