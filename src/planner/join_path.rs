//! Join pushdown: a join whose inputs are Distributed Scans runs on the workers, shard by shard,
//! when each fragment can compute its part of the join from the shards on its own node:
//!
//! - two distributed tables of one co-location group joined on their distribution columns
//!   (equality with the column type's hash equality operator), or both restricted to the same
//!   single shard: fragment *i* joins shard *i* of each, any join type;
//! - a distributed input with reference tables (a copy on every node): inner joins, and outer,
//!   semi and anti joins that keep the distributed side's rows;
//! - reference tables with each other: one fragment;
//! - a distributed input with a distributed table that is not co-located with it (inner, left,
//!   semi, anti): the table is read first and travels in the fragments as arrays — all of its
//!   rows to every fragment (broadcast), or, when it is joined on the other side's
//!   distribution column, each row only to the fragment of the shard its key hashes to
//!   (repartitioned). Chosen by cost against the coordinator's own join.
//!
//! Every clause of the join and of its inputs must be shippable; otherwise PostgreSQL joins the
//! inputs' rows on the coordinator, which is always correct. The pushed-down join is again a
//! Distributed Scan (scanrelid 0, its tuple the join's target list), so larger joins are built
//! input by input and aggregates above it can be pushed down too (`aggregate_path.rs`).
//!
//! The fragment is `SELECT r<rti>.<col>, … FROM <join tree> WHERE <pending conditions>`; base
//! tables with restrictions enter as `(SELECT * FROM <shard> WHERE …) r<rti>`, so their filters
//! apply before any outer join. Shard names are placeholders (`$<RELATION_BASE + rti>`) that
//! the executor fills in per fragment.

use pgrx::pg_sys;
use pgrx::PgList;

use crate::distribution::hashing::{hash_family, hash_index_sql};
use crate::metadata::cache;
use crate::metadata::tables::Method;
use crate::planner::row_locks;
use crate::planner::scan_path::{
    all_clauses_ship, distributed_path_of, from_list, is_hash_equality, new_custom_path,
    pushed_down_path_methods, ScanPlan,
};
use crate::planner::security_quals::join_clause_may_ship;
use crate::planner::shippable::{
    alias, deparse_qualified, shippable, travels_in_array, BROADCAST_BASE, RELATION_BASE,
};
use crate::remote::quote::quote_identifier;

static mut PREVIOUS_HOOK: pg_sys::set_join_pathlist_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster; we chain to the previous hook.
    unsafe {
        PREVIOUS_HOOK = pg_sys::set_join_pathlist_hook;
        pg_sys::set_join_pathlist_hook = Some(set_join_pathlist);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn set_join_pathlist(
    root: *mut pg_sys::PlannerInfo,
    joinrel: *mut pg_sys::RelOptInfo,
    outerrel: *mut pg_sys::RelOptInfo,
    innerrel: *mut pg_sys::RelOptInfo,
    jointype: pg_sys::JoinType::Type,
    extra: *mut pg_sys::JoinPathExtraData,
) {
    // SAFETY: arguments come from the planner and are valid for this call.
    unsafe {
        if let Some(previous) = PREVIOUS_HOOK {
            previous(root, joinrel, outerrel, innerrel, jointype, extra);
        }
        let Some((plan, total_cost)) =
            plan_join(root, joinrel, outerrel, innerrel, jointype, extra)
        else {
            return;
        };
        let path = new_custom_path(
            joinrel,
            (*joinrel).reltarget,
            (*joinrel).rows.max(1.0),
            total_cost,
            &plan,
            pushed_down_path_methods(),
        );
        pg_sys::add_path(joinrel, path.cast());
    }
}

/// How an input's rows are spread over the fragments.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Spread {
    /// Split by shard index among the shards of co-location group `.0`.
    Sharded(i32),
    /// All of them in every fragment (only reference tables).
    Replicated,
}

/// One input of a join, as a worker will read it.
struct Input {
    plan: ScanPlan,
    /// The FROM item.
    from_sql: String,
    /// `from_sql` is a join, parenthesized (a table stays bare: `(t r1)` is not SQL).
    from_is_join: bool,
    /// Conditions on the FROM item's rows not applied inside it yet (ANDed).
    pending: Vec<String>,
    /// (range-table index, table) of every table read.
    relations: Vec<(u32, pg_sys::Oid)>,
    spread: Spread,
    /// Shard indexes left after plan-time pruning.
    shard_indexes: Vec<i32>,
    /// The total cost of its Distributed Scan.
    cost: f64,
    /// What reading it first and sending it with every fragment adds (broadcast only).
    broadcast_cost: f64,
    /// Its row-lock clauses, each naming its table's alias (`FOR UPDATE OF r2`).
    locks: Vec<String>,
}

impl Input {
    /// The input read by `rel`'s Distributed Scan, if it has one that can be joined on the
    /// workers.
    unsafe fn of(root: *mut pg_sys::PlannerInfo, rel: *mut pg_sys::RelOptInfo) -> Option<Input> {
        // SAFETY: rel is a relation of the query being planned.
        unsafe {
            let path = distributed_path_of(rel)?;
            let plan = ScanPlan::decode(&from_list((*path).custom_private));
            let locks = match (plan.row_lock.is_empty(), plan.from_sql.is_empty()) {
                (true, _) => Vec::new(),
                (false, true) => {
                    let rti = (*rel).relid;
                    vec![row_locks::clause_in_join(root, rti, &alias(rti))]
                }
                (false, false) => vec![plan.row_lock.clone()],
            };
            let from_is_join = plan.from_is_join;
            let (from_sql, pending, relations) = if plan.from_sql.is_empty() {
                // A base table: its filters must all run on the workers, before the join.
                let all_shipped = all_clauses_ship(rel)
                    && PgList::<pg_sys::RestrictInfo>::from_pg((*rel).baserestrictinfo)
                        .iter_ptr()
                        .all(|ri| shippable((*ri).clause.cast()));
                if !all_shipped {
                    return None;
                }
                let rti = (*rel).relid;
                let shard = format!("${}", RELATION_BASE + rti as i32);
                let from_sql = if plan.where_sql.is_empty() {
                    format!("{shard} {}{}", alias(rti), plan.sample)
                } else {
                    format!(
                        "(SELECT * FROM {shard}{} WHERE {}) {}",
                        plan.sample,
                        plan.where_sql,
                        alias(rti)
                    )
                };
                (from_sql, Vec::new(), vec![(rti, plan.relid)])
            } else {
                let pending = if plan.where_sql.is_empty() {
                    Vec::new()
                } else {
                    vec![plan.where_sql.clone()]
                };
                let from_sql = if from_is_join {
                    format!("({})", plan.from_sql)
                } else {
                    plan.from_sql.clone()
                };
                (from_sql, pending, plan.relations.clone())
            };
            let mut spread = Spread::Replicated;
            for (_, oid) in &relations {
                let table = cache::lookup(*oid)?;
                match table.method {
                    Method::Hash => spread = Spread::Sharded(table.colocation_id),
                    Method::Reference => {}
                    Method::Range => return None,
                }
            }
            let shards = cache::shards(plan.relid);
            let shard_indexes = plan
                .shard_ids
                .iter()
                .filter_map(|id| shards.iter().find(|(s, _)| s == id).map(|(_, i)| *i))
                .collect();
            Some(Input {
                plan,
                from_sql,
                from_is_join,
                pending,
                relations,
                spread,
                shard_indexes,
                cost: (*path).path.total_cost,
                broadcast_cost: 0.0,
                locks,
            })
        }
    }

    /// This input — a distributed table, read alone — as a broadcast for a join whose other
    /// side is not co-located with it: its rows are read first (`broadcasts`) and stand in every
    /// one of the `fragments` as `unnest(<one array per column>) r<rti>(<columns>)`, so that
    /// each fragment sees all of them, as it would a reference table. The array columns are
    /// numbered from `$<first_param>`. None when a needed column cannot travel in an array
    /// unchanged.
    unsafe fn broadcast(
        self,
        rel: *mut pg_sys::RelOptInfo,
        first_param: i32,
        fragments: usize,
        partition: Option<Partition>,
    ) -> Option<Input> {
        // SAFETY: rel is this input's relation; catalog lookups of its columns' types.
        unsafe {
            let [(rti, relid)] = self.relations[..] else {
                return None;
            };
            if !self.plan.from_sql.is_empty() || !self.plan.coordinator_values.is_empty() {
                return None;
            }
            let mut columns = Vec::new();
            let mut names = Vec::new();
            for expr in PgList::<pg_sys::Node>::from_pg((*(*rel).reltarget).exprs).iter_ptr() {
                if (*expr).type_ != pg_sys::NodeTag::T_Var {
                    return None;
                }
                let var = expr.cast::<pg_sys::Var>();
                if (*var).varno as u32 != rti
                    || (*var).varattno <= 0
                    || !travels_in_array((*var).vartype, (*var).varcollid)
                {
                    return None;
                }
                columns.push((*var).varattno);
                let name =
                    std::ffi::CStr::from_ptr(pg_sys::get_attname(relid, (*var).varattno, false));
                names.push(quote_identifier(&name.to_string_lossy()));
            }
            if columns.is_empty() {
                return None;
            }
            let arrays: Vec<String> = (0..columns.len())
                .map(|i| format!("${}", first_param + i as i32))
                .collect();
            let from_sql = format!(
                "unnest({}) AS {}({})",
                arrays.join(", "),
                alias(rti),
                names.join(", ")
            );
            let rows = (*rel).rows.max(1.0);
            // Repartitioned: each row goes only to the fragment of the shard its key hashes to,
            // which the worker computes as one more column.
            let select_sql = match partition {
                Some(Partition { attno, shard_count }) if columns.contains(&attno) => {
                    let name = std::ffi::CStr::from_ptr(pg_sys::get_attname(relid, attno, false));
                    let key = quote_identifier(&name.to_string_lossy());
                    format!(
                        "{}, {}",
                        names.join(", "),
                        hash_index_sql(&key, shard_count)
                    )
                }
                _ => String::new(),
            };
            let partitioned = !select_sql.is_empty();
            let copies = if partitioned { 1.0 } else { fragments as f64 };
            let read = ScanPlan {
                relid,
                columns,
                select_sql,
                partitioned,
                where_sql: self.plan.where_sql,
                shard_ids: self.plan.shard_ids,
                prune_param: self.plan.prune_param,
                exec_params: self.plan.exec_params.clone(),
                base_rti: rti,
                ..Default::default()
            };
            Some(Input {
                plan: ScanPlan {
                    relid,
                    exec_params: self.plan.exec_params,
                    broadcasts: vec![read],
                    ..Default::default()
                },
                from_sql,
                from_is_join: false,
                pending: Vec::new(),
                relations: Vec::new(),
                spread: Spread::Replicated,
                shard_indexes: Vec::new(),
                cost: self.cost,
                // Read whole on the coordinator, then parsed again by every fragment (once in
                // all when repartitioned).
                broadcast_cost: 0.5 * self.cost + rows * copies * BROADCAST_ROW_COST,
                locks: Vec::new(),
            })
        }
    }

    /// True when `var` is the distribution column of one of this input's hash tables.
    unsafe fn has_distribution_column(&self, var: *mut pg_sys::Var) -> bool {
        // SAFETY: var is a valid Var of the query.
        unsafe {
            (*var).varlevelsup == 0
                && self.relations.iter().any(|(rti, oid)| {
                    *rti == (*var).varno as u32
                        && cache::lookup(*oid).is_some_and(|t| {
                            t.method == Method::Hash
                                && t.distribution_attno() == Some((*var).varattno)
                        })
                })
        }
    }
}

/// The plan of the join of `outerrel` and `innerrel` on the workers, if it can run there, and
/// the cost of its inputs' Distributed Scans.
unsafe fn plan_join(
    root: *mut pg_sys::PlannerInfo,
    joinrel: *mut pg_sys::RelOptInfo,
    outerrel: *mut pg_sys::RelOptInfo,
    innerrel: *mut pg_sys::RelOptInfo,
    jointype: pg_sys::JoinType::Type,
    extra: *mut pg_sys::JoinPathExtraData,
) -> Option<(ScanPlan, f64)> {
    use pg_sys::JoinType::*;
    // SAFETY: planner structures of the query being planned.
    unsafe {
        if !matches!(
            jointype,
            JOIN_INNER | JOIN_LEFT | JOIN_RIGHT | JOIN_FULL | JOIN_SEMI | JOIN_ANTI
        ) || !(*joinrel).lateral_relids.is_null()
        {
            return None;
        }
        let outer = Input::of(root, outerrel)?;
        let mut inner = Input::of(root, innerrel)?;
        // Locked rows must be the shards' own: a broadcast input's rows are copies, and the
        // inner side of a semi or anti join only tests for matches.
        let locked = !outer.locks.is_empty() || !inner.locks.is_empty();
        if !inner.locks.is_empty() && matches!(jointype, JOIN_SEMI | JOIN_ANTI) {
            return None;
        }

        // The join's own clauses: those that decide which rows match (ON), and, for outer and
        // anti joins, those that filter the joined rows (pushed down from WHERE). Inner and
        // semi joins treat them all alike, as PostgreSQL's executor does.
        let outer_join = matches!(jointype, JOIN_LEFT | JOIN_RIGHT | JOIN_FULL | JOIN_ANTI);
        let mut on_clauses = Vec::new();
        let mut after_clauses = Vec::new();
        for ri in PgList::<pg_sys::RestrictInfo>::from_pg((*extra).restrictlist).iter_ptr() {
            let clause = (*ri).clause.cast::<pg_sys::Node>();
            if !shippable(clause) || !join_clause_may_ship(root, ri, (*joinrel).relids) {
                return None;
            }
            let filters_joined_rows = (*ri).is_pushed_down
                || !pg_sys::bms_is_subset((*ri).required_relids, (*joinrel).relids);
            if outer_join && filters_joined_rows {
                after_clauses.push(clause);
            } else {
                on_clauses.push(clause);
            }
        }
        let targets = PgList::<pg_sys::Node>::from_pg((*(*joinrel).reltarget).exprs);
        if !targets
            .iter_ptr()
            .all(|expr| (*expr).type_ == pg_sys::NodeTag::T_Var && shippable(expr))
        {
            return None;
        }
        // A semi or anti join's inner side is only tested inside EXISTS: none of its columns
        // can be returned (the planner may want one that equals an outer column).
        let reads_inner = targets.iter_ptr().any(|expr| {
            pg_sys::bms_is_member((*expr.cast::<pg_sys::Var>()).varno, (*innerrel).relids)
        });
        if reads_inner && matches!(jointype, JOIN_SEMI | JOIN_ANTI) {
            return None;
        }

        if let (Spread::Sharded(a), Spread::Sharded(b)) = (outer.spread, inner.spread) {
            let same_single_shard = (outer.shard_indexes.len() == 1
                && outer.shard_indexes == inner.shard_indexes)
                || (outer.plan.prune_param > 0 && outer.plan.prune_param == inner.plan.prune_param);
            let co_partitioned = on_clauses
                .iter()
                .any(|clause| equates_distribution_columns(*clause, &outer, &inner));
            if a != b || !(same_single_shard || co_partitioned) {
                if locked {
                    return None;
                }
                // Not co-located: every fragment of the outer side gets all the inner rows, or
                // only its own when they join on the outer side's distribution column.
                let first_param = BROADCAST_BASE + broadcast_columns(&outer.plan) as i32;
                let partition = on_clauses
                    .iter()
                    .find_map(|clause| repartition_key(*clause, &outer, &inner));
                inner =
                    inner.broadcast(innerrel, first_param, outer.shard_indexes.len(), partition)?;
            }
        }
        let (spread, shard_indexes) = match (outer.spread, inner.spread) {
            (Spread::Sharded(a), Spread::Sharded(_)) => (
                Spread::Sharded(a),
                joined_shards(jointype, &outer.shard_indexes, &inner.shard_indexes),
            ),
            (Spread::Sharded(a), Spread::Replicated)
                if matches!(jointype, JOIN_INNER | JOIN_LEFT | JOIN_SEMI | JOIN_ANTI) =>
            {
                (Spread::Sharded(a), outer.shard_indexes.clone())
            }
            (Spread::Replicated, Spread::Sharded(a))
                if matches!(jointype, JOIN_INNER | JOIN_RIGHT) =>
            {
                (Spread::Sharded(a), inner.shard_indexes.clone())
            }
            (Spread::Replicated, Spread::Replicated) => {
                (Spread::Replicated, outer.shard_indexes.clone())
            }
            _ => return None,
        };
        // The table whose shards the fragments follow.
        let anchor = match (spread, outer.spread) {
            (Spread::Sharded(_), Spread::Replicated) => inner.plan.relid,
            _ => outer.plan.relid,
        };
        let relations: Vec<(u32, pg_sys::Oid)> = outer
            .relations
            .iter()
            .chain(&inner.relations)
            .copied()
            .collect();
        if !replicas_beside_shards(&relations, anchor) {
            return None;
        }
        let anchor_shards = cache::shards(anchor);
        let shard_ids = shard_indexes
            .iter()
            .filter_map(|index| {
                anchor_shards
                    .iter()
                    .find(|(_, i)| i == index)
                    .map(|(id, _)| *id)
            })
            .collect();
        // Co-located tables hash a value to the same shard index: a parameter that prunes
        // a side whose rows the join keeps prunes the join (a reference table never has one).
        let prune_param = match jointype {
            JOIN_LEFT | JOIN_ANTI => outer.plan.prune_param,
            JOIN_RIGHT => inner.plan.prune_param,
            JOIN_FULL if outer.plan.prune_param != inner.plan.prune_param => 0,
            _ => outer.plan.prune_param.max(inner.plan.prune_param),
        };

        let mut exec_params: Vec<(i32, pg_sys::Oid)> = outer
            .plan
            .exec_params
            .iter()
            .chain(&inner.plan.exec_params)
            .copied()
            .collect();
        let mut sql = |clauses: &[*mut pg_sys::Node]| -> Vec<String> {
            clauses
                .iter()
                .map(|clause| {
                    let (text, params) = deparse_qualified(root, *clause);
                    exec_params.extend(params);
                    format!("({text})")
                })
                .collect()
        };
        let on = sql(&on_clauses);
        let after = sql(&after_clauses);
        let select: Vec<String> = targets
            .iter_ptr()
            .map(|expr| deparse_qualified(root, expr).0)
            .collect();
        let conditions = |parts: Vec<String>| {
            if parts.is_empty() {
                "true".to_string()
            } else {
                parts.join(" AND ")
            }
        };
        let select = if select.is_empty() {
            // No column needed (count(*)): one constant per row.
            vec!["1".to_string()]
        } else {
            select
        };
        let from_is_join = !matches!(jointype, JOIN_SEMI | JOIN_ANTI) || outer.from_is_join;
        let (from_sql, mut pending) = match jointype {
            JOIN_INNER => (
                format!(
                    "{} JOIN {} ON {}",
                    outer.from_sql,
                    inner.from_sql,
                    conditions(on)
                ),
                [outer.pending, inner.pending].concat(),
            ),
            JOIN_LEFT => (
                format!(
                    "{} LEFT JOIN {} ON {}",
                    outer.from_sql,
                    inner.from_sql,
                    conditions([on, inner.pending].concat())
                ),
                outer.pending,
            ),
            JOIN_RIGHT => (
                format!(
                    "{} RIGHT JOIN {} ON {}",
                    outer.from_sql,
                    inner.from_sql,
                    conditions([on, outer.pending].concat())
                ),
                inner.pending,
            ),
            JOIN_FULL if outer.pending.is_empty() && inner.pending.is_empty() => (
                format!(
                    "{} FULL JOIN {} ON {}",
                    outer.from_sql,
                    inner.from_sql,
                    conditions(on)
                ),
                Vec::new(),
            ),
            JOIN_SEMI | JOIN_ANTI => {
                let negation = if jointype == JOIN_ANTI { "NOT " } else { "" };
                let exists = format!(
                    "({negation}EXISTS (SELECT FROM {} WHERE {}))",
                    inner.from_sql,
                    conditions([on, inner.pending].concat())
                );
                (outer.from_sql, [outer.pending, vec![exists]].concat())
            }
            _ => return None,
        };
        pending.extend(after);
        exec_params.sort_unstable_by_key(|(id, _)| *id);
        exec_params.dedup_by_key(|(id, _)| *id);
        let columns = (1..=targets.len() as i16).collect();
        // Broadcast columns are numbered across the whole join: only one side may bring any.
        if !outer.plan.broadcasts.is_empty() && !inner.plan.broadcasts.is_empty() {
            return None;
        }
        let broadcasts = [outer.plan.broadcasts, inner.plan.broadcasts].concat();
        let row_lock = [outer.locks, inner.locks].concat().join(" ");
        let plan = ScanPlan {
            relid: anchor,
            select_sql: select.join(", "),
            where_sql: pending.join(" AND "),
            columns,
            shard_ids,
            prune_param,
            exec_params,
            from_sql,
            from_is_join,
            relations,
            broadcasts,
            row_lock,
            ..Default::default()
        };
        // Half the inputs' cost: any join on the coordinator costs at least both inputs, so
        // when the workers can run a join they do, and the largest such join wins.
        let cost = 0.5 * (outer.cost + inner.cost) + outer.broadcast_cost + inner.broadcast_cost;
        Some((plan, cost))
    }
}

/// The cost of one broadcast row in one fragment: sent, parsed from its array and hashed
/// there, against the 0.01 of a row read back from the workers.
const BROADCAST_ROW_COST: f64 = 0.005;

/// How many broadcast columns `plan` numbers already.
fn broadcast_columns(plan: &ScanPlan) -> usize {
    plan.broadcasts.iter().map(|b| b.columns.len()).sum()
}

/// True when `clause` is `a = b` with `a` the distribution column of a hash table of one input
/// and `b` of the other, under the column type's hash equality: matching rows are then always
/// in shards with the same index.
unsafe fn equates_distribution_columns(
    clause: *mut pg_sys::Node,
    outer: &Input,
    inner: &Input,
) -> bool {
    // SAFETY: clause is a valid expression; casts follow node tags.
    unsafe {
        if (*clause).type_ != pg_sys::NodeTag::T_OpExpr {
            return false;
        }
        let op = clause.cast::<pg_sys::OpExpr>();
        let args = PgList::<pg_sys::Node>::from_pg((*op).args);
        let as_var = |n: Option<*mut pg_sys::Node>| {
            let mut n = n?;
            while (*n).type_ == pg_sys::NodeTag::T_RelabelType {
                n = (*n.cast::<pg_sys::RelabelType>()).arg.cast();
            }
            ((*n).type_ == pg_sys::NodeTag::T_Var).then(|| n.cast::<pg_sys::Var>())
        };
        let (Some(left), Some(right)) = (as_var(args.get_ptr(0)), as_var(args.get_ptr(1))) else {
            return false;
        };
        let Some(family) = hash_family((*left).vartype) else {
            return false;
        };
        args.len() == 2
            && (*left).vartype == (*right).vartype
            && is_hash_equality((*op).opno, family)
            && ((outer.has_distribution_column(left) && inner.has_distribution_column(right))
                || (outer.has_distribution_column(right) && inner.has_distribution_column(left)))
    }
}

/// How a broadcast table's rows are split among the fragments of the other side: by the hash
/// of its column `attno`, into `shard_count` shards.
#[derive(Clone, Copy)]
struct Partition {
    attno: i16,
    shard_count: i32,
}

/// When `clause` is `a = b` with `a` a distribution column of the outer input's hash tables and
/// `b` a column of the inner input (a single table), under a hash equality of `a`'s type whose
/// family also hashes `b`'s type: equal values hash alike, so each inner row can only match
/// outer rows of the shard its `b` hashes to.
unsafe fn repartition_key(
    clause: *mut pg_sys::Node,
    outer: &Input,
    inner: &Input,
) -> Option<Partition> {
    // SAFETY: clause is a valid expression; casts follow node tags.
    unsafe {
        let [(inner_rti, _)] = inner.relations[..] else {
            return None;
        };
        if (*clause).type_ != pg_sys::NodeTag::T_OpExpr {
            return None;
        }
        let op = clause.cast::<pg_sys::OpExpr>();
        let args = PgList::<pg_sys::Node>::from_pg((*op).args);
        if args.len() != 2 {
            return None;
        }
        let as_var = |n: Option<*mut pg_sys::Node>| {
            let mut n = n?;
            while (*n).type_ == pg_sys::NodeTag::T_RelabelType {
                n = (*n.cast::<pg_sys::RelabelType>()).arg.cast();
            }
            ((*n).type_ == pg_sys::NodeTag::T_Var).then(|| n.cast::<pg_sys::Var>())
        };
        let (left, right) = (as_var(args.get_ptr(0))?, as_var(args.get_ptr(1))?);
        let is_inner_column = |var: *mut pg_sys::Var| {
            (*var).varlevelsup == 0 && (*var).varno as u32 == inner_rti && (*var).varattno > 0
        };
        let (key, column) = if outer.has_distribution_column(left) && is_inner_column(right) {
            (left, right)
        } else if outer.has_distribution_column(right) && is_inner_column(left) {
            (right, left)
        } else {
            return None;
        };
        let family = hash_family((*key).vartype)?;
        if !is_hash_equality((*op).opno, family) || hash_family((*column).vartype) != Some(family) {
            return None;
        }
        Some(Partition {
            attno: (*column).varattno,
            shard_count: cache::shards(outer.plan.relid).len() as i32,
        })
    }
}

/// True when every reference table among `relations` has a copy on each node that holds a
/// shard of `anchor` (the node a fragment runs on).
fn replicas_beside_shards(relations: &[(u32, pg_sys::Oid)], anchor: pg_sys::Oid) -> bool {
    let anchor_nodes: Vec<i32> = cache::placements(anchor)
        .iter()
        .map(|p| p.node.node_id)
        .collect();
    relations.iter().all(|(_, oid)| {
        cache::lookup(*oid).is_some_and(|table| table.method != Method::Reference) || {
            let copies = cache::placements(*oid);
            anchor_nodes
                .iter()
                .all(|node| copies.iter().any(|p| p.node.node_id == *node))
        }
    })
}

/// The shards a join of two co-located inputs must read, given the shards each input's own
/// conditions leave: rows come only from both (inner and semi joins), from the side whose rows
/// an outer join keeps (its other side's conditions only null-extend), or from either (full).
fn joined_shards(jointype: pg_sys::JoinType::Type, outer: &[i32], inner: &[i32]) -> Vec<i32> {
    use pg_sys::JoinType::*;
    match jointype {
        JOIN_LEFT | JOIN_ANTI => outer.to_vec(),
        JOIN_RIGHT => inner.to_vec(),
        JOIN_FULL => {
            let mut either: Vec<i32> = outer.iter().chain(inner).copied().collect();
            either.sort_unstable();
            either.dedup();
            either
        }
        _ => outer
            .iter()
            .copied()
            .filter(|i| inner.contains(i))
            .collect(),
    }
}
