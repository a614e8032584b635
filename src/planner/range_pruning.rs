//! Shard pruning for range-distributed tables: comparisons of the distribution column with
//! constants (`=`, `<`, `<=`, `>`, `>=`, `= ANY(array)`), ANDed, keep only the shards whose
//! `[min_value, max_value)` can hold matching rows. Bounds and constants are compared with the
//! column type's default btree comparison function; the result is always a superset of the
//! shards needed, never fewer.

use std::cmp::Ordering;
use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::PgList;

use crate::metadata::tables::{DistTable, Placement};

/// btree strategy numbers.
const LESS: i32 = 1;
const LESS_EQUAL: i32 = 2;
const EQUAL: i32 = 3;
const GREATER_EQUAL: i32 = 4;
const GREATER: i32 = 5;

struct Comparator {
    cmp_proc: pg_sys::Oid,
    collation: pg_sys::Oid,
}

impl Comparator {
    fn compare(&self, a: pg_sys::Datum, b: pg_sys::Datum) -> Ordering {
        // SAFETY: the btree comparison support function of the column's type, called on two
        // non-NULL values of that type; it returns an int4.
        let result = unsafe { pg_sys::OidFunctionCall2Coll(self.cmp_proc, self.collation, a, b) };
        (result.value() as i32).cmp(&0)
    }
}

/// One shard's bounds as Datums of the column type (None: unbounded).
struct Bounds {
    shard_id: i64,
    min: Option<pg_sys::Datum>,
    max: Option<pg_sys::Datum>,
}

/// Can a value `op c` lie in `[min, max)`?
fn may_hold(bounds: &Bounds, strategy: i32, c: pg_sys::Datum, cmp: &Comparator) -> bool {
    let above_min = |inclusive: bool| match bounds.min {
        None => true,
        Some(min) => match cmp.compare(min, c) {
            Ordering::Less => true,
            Ordering::Equal => inclusive,
            Ordering::Greater => false,
        },
    };
    let below_max = || {
        bounds
            .max
            .is_none_or(|max| cmp.compare(c, max) == Ordering::Less)
    };
    match strategy {
        EQUAL => above_min(true) && below_max(),
        LESS => above_min(false),
        LESS_EQUAL => above_min(true),
        GREATER | GREATER_EQUAL => below_max(),
        _ => true,
    }
}

/// The shards of a range table with their bounds, and how to compare values of its column.
pub struct RangeMap {
    attno: i16,
    type_oid: pg_sys::Oid,
    family: pg_sys::Oid,
    cmp: Comparator,
    shards: Vec<Bounds>,
}

impl RangeMap {
    /// The map of range table `table`, or None when its column type has no btree ordering.
    pub unsafe fn new(table: &DistTable, placements: &[Placement]) -> Option<RangeMap> {
        let attno = table.distribution_attno()?;
        // SAFETY: catalog lookups for the distribution column's type and its btree support;
        // bound texts go through the type's input function.
        unsafe {
            let type_oid = pg_sys::get_atttype(table.oid, attno);
            let opclass = pg_sys::GetDefaultOpClass(type_oid, pg_sys::BTREE_AM_OID);
            if opclass == pg_sys::InvalidOid {
                return None;
            }
            let family = pg_sys::get_opclass_family(opclass);
            let cmp_proc = pg_sys::get_opfamily_proc(family, type_oid, type_oid, 1);
            if cmp_proc == pg_sys::InvalidOid {
                return None;
            }
            let collatable = pg_sys::get_typcollation(type_oid) != pg_sys::InvalidOid;
            let cmp = Comparator {
                cmp_proc,
                collation: if collatable {
                    pg_sys::DEFAULT_COLLATION_OID
                } else {
                    pg_sys::InvalidOid
                },
            };
            let mut input = pg_sys::InvalidOid;
            let mut io_param = pg_sys::InvalidOid;
            pg_sys::getTypeInputInfo(type_oid, &mut input, &mut io_param);
            let parse = |text: &Option<String>| -> Option<pg_sys::Datum> {
                let text = CString::new(text.as_deref()?).ok()?;
                Some(pg_sys::OidInputFunctionCall(
                    input,
                    text.as_ptr().cast_mut(),
                    io_param,
                    -1,
                ))
            };
            let mut shards: Vec<Bounds> = Vec::new();
            for placement in placements {
                if shards.iter().all(|b| b.shard_id != placement.shard_id) {
                    shards.push(Bounds {
                        shard_id: placement.shard_id,
                        min: parse(&placement.min_value),
                        max: parse(&placement.max_value),
                    });
                }
            }
            Some(RangeMap {
                attno,
                type_oid,
                family,
                cmp,
                shards,
            })
        }
    }

    /// The shard whose range holds `value` (a non-NULL value of the column's type).
    pub fn shard_for(&self, value: pg_sys::Datum) -> Option<i64> {
        self.shards
            .iter()
            .find(|b| may_hold(b, EQUAL, value, &self.cmp))
            .map(|b| b.shard_id)
    }
}

/// The shards of range table `table` that `clauses` leave, or None when they prune nothing.
pub unsafe fn prune(
    table: &DistTable,
    clauses: &[*mut pg_sys::Node],
    placements: &[Placement],
) -> Option<Vec<i64>> {
    // SAFETY: see RangeMap::new; the clauses are valid expressions.
    unsafe {
        let map = RangeMap::new(table, placements)?;
        let mut kept: Vec<bool> = vec![true; map.shards.len()];
        let mut pruned_any = false;
        for clause in clauses {
            let Some(conditions) = comparisons(*clause, map.attno, map.type_oid, map.family) else {
                continue;
            };
            pruned_any = true;
            for (keep, bounds) in kept.iter_mut().zip(&map.shards) {
                // ANY(array): some element must fit; a plain comparison is a one-element list.
                *keep &= conditions
                    .iter()
                    .any(|(strategy, c)| may_hold(bounds, *strategy, *c, &map.cmp));
            }
        }
        pruned_any.then(|| {
            map.shards
                .iter()
                .zip(kept)
                .filter(|(_, keep)| *keep)
                .map(|(b, _)| b.shard_id)
                .collect()
        })
    }
}

/// `(strategy, constant)` pairs (alternatives) that `clause` requires of the column, if it is
/// a comparison of the column with constants of its own type.
unsafe fn comparisons(
    clause: *mut pg_sys::Node,
    attno: i16,
    type_oid: pg_sys::Oid,
    family: pg_sys::Oid,
) -> Option<Vec<(i32, pg_sys::Datum)>> {
    // SAFETY: clause is a valid expression; casts follow node tags.
    unsafe {
        let is_column = |n: *mut pg_sys::Node| {
            !n.is_null()
                && (*n).type_ == pg_sys::NodeTag::T_Var
                && (*n.cast::<pg_sys::Var>()).varattno == attno
        };
        let constant = |n: *mut pg_sys::Node| -> Option<*mut pg_sys::Const> {
            let c = n.cast::<pg_sys::Const>();
            (!n.is_null()
                && (*n).type_ == pg_sys::NodeTag::T_Const
                && (*c).consttype == type_oid
                && !(*c).constisnull)
                .then_some(c)
        };
        match (*clause).type_ {
            pg_sys::NodeTag::T_OpExpr => {
                let op = clause.cast::<pg_sys::OpExpr>();
                let args = PgList::<pg_sys::Node>::from_pg((*op).args);
                if args.len() != 2 {
                    return None;
                }
                let (left, right) = (args.get_ptr(0)?, args.get_ptr(1)?);
                let (opno, c) = if is_column(left) {
                    ((*op).opno, constant(right)?)
                } else if is_column(right) {
                    (pg_sys::get_commutator((*op).opno), constant(left)?)
                } else {
                    return None;
                };
                if opno == pg_sys::InvalidOid || !pg_sys::op_in_opfamily(opno, family) {
                    return None;
                }
                Some(vec![(
                    pg_sys::get_op_opfamily_strategy(opno, family),
                    (*c).constvalue,
                )])
            }
            pg_sys::NodeTag::T_ScalarArrayOpExpr => {
                let op = clause.cast::<pg_sys::ScalarArrayOpExpr>();
                let args = PgList::<pg_sys::Node>::from_pg((*op).args);
                if !(*op).useOr
                    || args.len() != 2
                    || !is_column(args.get_ptr(0)?)
                    || !pg_sys::op_in_opfamily((*op).opno, family)
                    || pg_sys::get_op_opfamily_strategy((*op).opno, family) != EQUAL
                {
                    return None;
                }
                let (element_type, elements) =
                    crate::planner::scan_path::const_array_elements(args.get_ptr(1)?)?;
                if element_type != type_oid {
                    return None;
                }
                Some(
                    elements
                        .into_iter()
                        .map(|(_, value)| (EQUAL, value))
                        .collect(),
                )
            }
            _ => None,
        }
    }
}
