//! Aggregates that ignore duplicate rows: when a query over one distributed table computes
//! only aggregates whose results do not change if a row appears twice — any `agg(DISTINCT …)`,
//! `min`, `max`, `bool_and` / `bool_or` / `every`, `bit_and` / `bit_or` — and at least one of
//! them is DISTINCT (without one, partial aggregation is better) — or a `SELECT DISTINCT`
//! without aggregates —, each fragment returns only the distinct rows of the columns the query
//! reads (`SELECT DISTINCT …`), and PostgreSQL finishes on the coordinator:
//! `count(DISTINCT user_id) … GROUP BY day` moves one row per shard, day and user instead of
//! every row.
//!
//! A row dropped that way must be identical to one kept in everything the query computes from
//! it. So every column's type must have an equality that implies identical values — the btree
//! "equal image" property PostgreSQL's index deduplication relies on (not numeric, float or
//! interval, whose equal values can print differently) — and no expression may be volatile.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::PgList;

/// The btree support function that says whether equality implies image equality.
const BTEQUALIMAGE_PROC: i16 = 4;

/// Built-in aggregates whose result ignores how often each input row appears.
const DUPLICATE_INSENSITIVE: [&str; 7] = [
    "min", "max", "bool_and", "bool_or", "every", "bit_and", "bit_or",
];

/// True when the fragments of `rel` (table `relid`, reading `columns`) may return distinct rows
/// only.
pub unsafe fn only_distinct_rows_needed(
    root: *mut pg_sys::PlannerInfo,
    rel: *mut pg_sys::RelOptInfo,
    relid: pg_sys::Oid,
    columns: &[i16],
) -> bool {
    // SAFETY: the query being planned and its relation.
    unsafe {
        let parse = (*root).parse;
        if (*parse).commandType != pg_sys::CmdType::CMD_SELECT
            || (*parse).hasWindowFuncs
            || (*parse).hasTargetSRFs
            || !(*parse).groupingSets.is_null()
            || !(*parse).rowMarks.is_null()
            || columns.is_empty()
        {
            return false;
        }
        // The table must be the query's only relation.
        let from = PgList::<pg_sys::Node>::from_pg((*(*parse).jointree).fromlist);
        let only_this = from.len() == 1
            && from.get_ptr(0).is_some_and(|item| {
                (*item).type_ == pg_sys::NodeTag::T_RangeTblRef
                    && (*item.cast::<pg_sys::RangeTblRef>()).rtindex as u32 == (*rel).relid
            });
        if !only_this || !crate::planner::scan_path::all_clauses_ship(rel) {
            return false;
        }
        let target = (*parse).targetList.cast::<pg_sys::Node>();
        let having = (*parse).havingQual;
        let duplicates_ignored = if (*parse).hasAggs {
            let mut aggregates = Aggregates::default();
            aggregates.collect(target) && aggregates.collect(having) && aggregates.distinct
        } else {
            // SELECT DISTINCT (not DISTINCT ON, which keeps one whole row of each group).
            !(*parse).distinctClause.is_null() && !(*parse).hasDistinctOn
        };
        if !duplicates_ignored {
            return false;
        }
        if pg_sys::contain_volatile_functions(target) || pg_sys::contain_volatile_functions(having)
        {
            return false;
        }
        columns
            .iter()
            .all(|attno| equality_is_identity(relid, *attno))
    }
}

#[derive(Default)]
struct Aggregates {
    /// At least one aggregate seen is DISTINCT.
    distinct: bool,
}

impl Aggregates {
    /// Looks at the aggregates of `node`; false when one counts duplicates.
    unsafe fn collect(&mut self, node: *mut pg_sys::Node) -> bool {
        #[pgrx::pg_guard]
        unsafe extern "C-unwind" fn walk(
            node: *mut pg_sys::Node,
            context: *mut std::ffi::c_void,
        ) -> bool {
            if node.is_null() {
                return false;
            }
            // SAFETY: node is a valid node; casts follow its tag; context is our Aggregates.
            unsafe {
                if (*node).type_ != pg_sys::NodeTag::T_Aggref {
                    return pg_sys::expression_tree_walker(node, Some(walk), context);
                }
                let found = &mut *context.cast::<Aggregates>();
                let aggref = node.cast::<pg_sys::Aggref>();
                let distinct = !(*aggref).aggdistinct.is_null();
                let ok = (*aggref).agglevelsup == 0
                    && (*aggref).aggkind == b'n' as std::ffi::c_char // AGGKIND_NORMAL
                    && (distinct || ignores_duplicates((*aggref).aggfnoid));
                found.distinct |= distinct;
                // Stop at the first aggregate that counts duplicates.
                !ok
            }
        }
        // SAFETY: the walker only reads the tree; self outlives the walk.
        let counts_duplicates = unsafe { walk(node, (self as *mut Aggregates).cast()) };
        !counts_duplicates
    }
}

/// True for the built-in aggregates in DUPLICATE_INSENSITIVE.
unsafe fn ignores_duplicates(aggregate: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookups of an aggregate function.
    unsafe {
        if u32::from(aggregate) >= pg_sys::FirstNormalObjectId
            || pg_sys::get_func_namespace(aggregate)
                != pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE)
        {
            return false;
        }
        let name = pg_sys::get_func_name(aggregate);
        !name.is_null()
            && DUPLICATE_INSENSITIVE.contains(&CStr::from_ptr(name).to_string_lossy().as_ref())
    }
}

/// True when two equal values of column `attno` are always identical (btree equal image).
unsafe fn equality_is_identity(relid: pg_sys::Oid, attno: i16) -> bool {
    // SAFETY: catalog lookups of a column, its type's default btree operator class and its
    // support function, which takes the type's oid and returns a bool.
    unsafe {
        let mut type_oid = pg_sys::InvalidOid;
        let mut typmod = -1;
        let mut collation = pg_sys::InvalidOid;
        pg_sys::get_atttypetypmodcoll(relid, attno, &mut type_oid, &mut typmod, &mut collation);
        let opclass = pg_sys::GetDefaultOpClass(type_oid, pg_sys::BTREE_AM_OID);
        if opclass == pg_sys::InvalidOid {
            return false;
        }
        let input = pg_sys::get_opclass_input_type(opclass);
        let proc = pg_sys::get_opfamily_proc(
            pg_sys::get_opclass_family(opclass),
            input,
            input,
            BTEQUALIMAGE_PROC,
        );
        proc != pg_sys::InvalidOid
            && pg_sys::OidFunctionCall1Coll(proc, collation, pg_sys::Datum::from(input)).value()
                != 0
    }
}
