//! The distributed scan path: PostgreSQL's planner plans every query as usual, and for each
//! distributed or reference table it meets, this replaces the (empty) shell's scan paths with a
//! CustomScan that reads the shards. Restriction clauses that can run on the workers are sent
//! with each fragment; the others stay as local filters. Equality on the distribution column
//! prunes shards: at plan time for constants, at execution for `$n` parameters.
//!
//! Everything above the scans — joins, aggregates, sorting, windows, subqueries — is executed
//! by PostgreSQL on the coordinator, so every query shape gets exactly PostgreSQL's answer,
//! unless a pushdown module (`join_path`, `aggregate_path`, `window_path`, `limit_path`) adds a
//! cheaper Distributed Scan that does that work on the workers.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::PgList;

use crate::distribution::hashing;
use crate::metadata::cache;
use crate::metadata::tables::{DistTable, Method};
use crate::planner::security_quals::shipped_forms;
use crate::planner::shippable::{
    deparse, new_param, shippable, with_coordinator_values, EXEC_PARAM_BASE,
};

static mut PREVIOUS_HOOK: pg_sys::set_rel_pathlist_hook_type = None;

pub const SCAN_NAME: &CStr = c"pgdist Distributed Scan";

static mut PATH_METHODS: pg_sys::CustomPathMethods = pg_sys::CustomPathMethods {
    CustomName: SCAN_NAME.as_ptr(),
    PlanCustomPath: Some(plan_path),
    ReparameterizeCustomPathByChild: None,
};

/// The path methods of scans that read more than a table — a pushed-down join or aggregate —
/// and are planned without a base relation.
pub fn pushed_down_path_methods() -> *const pg_sys::CustomPathMethods {
    &raw const PUSHED_DOWN_PATH_METHODS
}

/// True when `path` is a Distributed Scan (of a table, or of work pushed down).
pub unsafe fn is_distributed_scan(path: *mut pg_sys::Path) -> bool {
    // SAFETY: path is a valid Path node; the cast follows its tag.
    unsafe {
        (*path).type_ == pg_sys::NodeTag::T_CustomPath && {
            let methods = (*path.cast::<pg_sys::CustomPath>()).methods;
            std::ptr::eq(methods, &raw const PATH_METHODS)
                || std::ptr::eq(methods, &raw const PUSHED_DOWN_PATH_METHODS)
        }
    }
}

/// The unsorted Distributed Scan among `rel`'s paths: of the base table, or of a pushed-down
/// join (possibly under a projection that computes expressions over its columns).
pub unsafe fn distributed_path_of(rel: *mut pg_sys::RelOptInfo) -> Option<*mut pg_sys::CustomPath> {
    // SAFETY: rel's pathlist is a List of Paths; casts follow node tags.
    unsafe {
        PgList::<pg_sys::Path>::from_pg((*rel).pathlist)
            .iter_ptr()
            .map(|path| {
                if (*path).type_ == pg_sys::NodeTag::T_ProjectionPath {
                    (*path.cast::<pg_sys::ProjectionPath>()).subpath
                } else {
                    path
                }
            })
            .find(|path| is_distributed_scan(*path) && (**path).pathkeys.is_null())
            .map(|path| path.cast())
    }
}

static mut PUSHED_DOWN_PATH_METHODS: pg_sys::CustomPathMethods = pg_sys::CustomPathMethods {
    CustomName: SCAN_NAME.as_ptr(),
    PlanCustomPath: Some(plan_pushed_down_path),
    ReparameterizeCustomPathByChild: None,
};

/// A new CustomPath producing `target` for `parent`, carrying `plan`.
pub unsafe fn new_custom_path(
    parent: *mut pg_sys::RelOptInfo,
    target: *mut pg_sys::PathTarget,
    rows: f64,
    total_cost: f64,
    plan: &ScanPlan,
    methods: *const pg_sys::CustomPathMethods,
) -> *mut pg_sys::CustomPath {
    // SAFETY: a zeroed node in the planner's memory context, tagged and filled as PostgreSQL
    // expects of a CustomPath.
    unsafe {
        let path =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::CustomPath>()).cast::<pg_sys::CustomPath>();
        (*path).path.type_ = pg_sys::NodeTag::T_CustomPath;
        (*path).path.pathtype = pg_sys::NodeTag::T_CustomScan;
        (*path).path.parent = parent;
        (*path).path.pathtarget = target;
        (*path).path.rows = rows;
        (*path).path.startup_cost = 100.0;
        (*path).path.total_cost = total_cost;
        (*path).custom_private = to_list(plan.encode());
        (*path).methods = methods;
        path
    }
}

/// A new Distributed Scan plan node for `best_path`, returning `tlist`.
unsafe fn new_custom_scan(
    best_path: *mut pg_sys::CustomPath,
    tlist: *mut pg_sys::List,
) -> *mut pg_sys::CustomScan {
    // SAFETY: a zeroed node in the planner's memory context, tagged as a CustomScan.
    unsafe {
        let scan =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::CustomScan>()).cast::<pg_sys::CustomScan>();
        (*scan).scan.plan.type_ = pg_sys::NodeTag::T_CustomScan;
        (*scan).scan.plan.targetlist = tlist;
        (*scan).flags = (*best_path).flags;
        (*scan).custom_private = (*best_path).custom_private;
        (*scan).methods = crate::executor::scan::scan_methods();
        scan
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn plan_pushed_down_path(
    _root: *mut pg_sys::PlannerInfo,
    _rel: *mut pg_sys::RelOptInfo,
    best_path: *mut pg_sys::CustomPath,
    tlist: *mut pg_sys::List,
    _clauses: *mut pg_sys::List,
    _custom_plans: *mut pg_sys::List,
) -> *mut pg_sys::Plan {
    // SAFETY: builds a CustomScan without a scan relation whose scan tuple is `tlist`
    // (custom_scan_tlist); setrefs turns the plan's target list into references to it.
    unsafe {
        let scan = new_custom_scan(best_path, tlist);
        (*scan).scan.scanrelid = 0;
        (*scan).custom_scan_tlist = pg_sys::copyObjectImpl(tlist.cast()).cast();
        // The executor parameters the pushed-down SQL uses: PostgreSQL then rescans the scan
        // when their values change (correlated subqueries).
        let plan = ScanPlan::decode(&from_list((*best_path).custom_private));
        let mut params = PgList::<pg_sys::Param>::new();
        for (id, type_oid) in plan.exec_params {
            params.push(new_param(
                pg_sys::ParamKind::PARAM_EXEC,
                id,
                type_oid,
                -1,
                pg_sys::InvalidOid,
            ));
        }
        (*scan).custom_exprs = params.into_pg().cast();
        scan.cast()
    }
}

pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster; we chain to the previous hook.
    unsafe {
        PREVIOUS_HOOK = pg_sys::set_rel_pathlist_hook;
        pg_sys::set_rel_pathlist_hook = Some(set_rel_pathlist);
    }
}

/// What the executor needs, kept in the plan (`custom_private`) as strings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScanPlan {
    /// The distributed table read.
    pub relid: pg_sys::Oid,
    /// The SELECT list when it is not the plain `columns` (aggregate pushdown).
    pub select_sql: String,
    /// `GROUP BY` positions (aggregate pushdown).
    pub group_by: String,
    /// Shipped clauses, ANDed; may contain `$n`.
    pub where_sql: String,
    /// Attribute numbers to fetch.
    pub columns: Vec<i16>,
    /// Shards left after plan-time pruning (empty: none).
    pub shard_ids: Vec<i64>,
    /// `$n` whose value picks the shard at execution (0: none; above EXEC_PARAM_BASE: an
    /// executor parameter). Negative: `$-n` is an array whose elements pick the shards
    /// (`key = ANY($n)`), possibly several.
    pub prune_param: i32,
    /// Executor parameters used in `where_sql`, with their types.
    pub exec_params: Vec<(i32, pg_sys::Oid)>,
    /// A pushed-down join: its FROM clause, where `$<RELATION_BASE + rti>` stands for the shard
    /// read for range-table entry `rti`, and `where_sql` uses `r<rti>.<column>`. `relid` is then
    /// the table whose shards the fragments follow.
    pub from_sql: String,
    /// The tables of a pushed-down join: (range-table index, table).
    pub relations: Vec<(u32, pg_sys::Oid)>,
    /// `FOR UPDATE` and the like (`row_locks.rs`): the fragments then run in the coordinator
    /// transaction's remote transactions.
    pub row_lock: String,
    /// The range-table index of the table read (a single table, not a join).
    pub base_rti: u32,
    /// `HAVING` of an aggregate computed whole on the workers.
    pub having: String,
    /// `ORDER BY` and `LIMIT` of each fragment (`limit_path.rs`): every fragment returns only
    /// the rows that can be among the query's first ones.
    pub order_by: String,
    pub limit: String,
    /// The expressions behind `$<COORDINATOR_VALUE_BASE + i>` in `where_sql`, computed at
    /// execution (`nodeToString` of a List; empty: none).
    pub coordinator_values: String,
    /// `ORDER BY` without `LIMIT` (`merge_path.rs`): each connection's fragments come back
    /// sorted by these keys and the scan merges the streams.
    pub merge_keys: Vec<MergeKey>,
    /// `SELECT DISTINCT` (`distinct_rows.rs`): the query needs each distinct row once only.
    pub distinct: bool,
    /// Tables of a non-co-located join read first (`join_path.rs`, broadcast): the scan of
    /// each, whose rows stand in the fragments as arrays, its columns numbered in order from
    /// `$<BROADCAST_BASE>`.
    pub broadcasts: Vec<ScanPlan>,
    /// A whole statement run as it is on its one shard (`fast_path.rs`), `$<RELATION_BASE +
    /// 1>` standing for the shard; the other SQL parts are then empty.
    pub statement_sql: String,
    /// A broadcast read repartitioned to the fragments (`join_path.rs`): its SELECT list ends
    /// with the shard index each row belongs to, and each fragment gets only its own rows.
    pub partitioned: bool,
    /// `from_sql` is a join (not a single table a semi or anti join kept alone in FROM, its
    /// other side being in an `EXISTS` of `where_sql`): it may be parenthesized.
    pub from_is_join: bool,
    /// A broadcast read of a query the coordinator runs itself (`relid` invalid: a MERGE
    /// source that is a subquery, `VALUES`, a function or a table with policies): the types
    /// of its columns, which `columns` numbers 1, 2, …; its SQL is `statement_sql`.
    pub column_types: Vec<pg_sys::Oid>,
    /// ` TABLESAMPLE <method> (…) [REPEATABLE (…)]` of the table read: each shard is sampled
    /// alike, so together they are a sample of the table (`sample_clause`).
    pub sample: String,
    /// A broadcast read of the RETURNING rows of the statement's data-modifying WITH query of
    /// this name, which one of the node's child plans returns (the reads in order, one child
    /// each): `columns` numbers its columns, `column_types` gives their types.
    pub with_query: String,
}

/// How many strings a ScanPlan without broadcasts encodes to, the last one the number of
/// broadcasts (whose own parts follow).
const ENCODED_PARTS: usize = 25;

/// One sort key of a merged scan.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeKey {
    /// The key's column in the scan tuple (0-based).
    pub slot_index: usize,
    /// Its position in each fragment's SELECT list (1-based).
    pub position: usize,
    pub sort_operator: pg_sys::Oid,
    pub collation: pg_sys::Oid,
    pub descending: bool,
    pub nulls_first: bool,
}

impl MergeKey {
    fn encode(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}:{}",
            self.slot_index,
            self.position,
            u32::from(self.sort_operator),
            u32::from(self.collation),
            u8::from(self.descending),
            u8::from(self.nulls_first)
        )
    }

    fn decode(text: &str) -> Option<MergeKey> {
        let fields: Vec<u32> = text
            .split(':')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let [slot_index, position, sort_operator, collation, descending, nulls_first] = fields[..]
        else {
            return None;
        };
        Some(MergeKey {
            slot_index: slot_index as usize,
            position: position as usize,
            sort_operator: pg_sys::Oid::from(sort_operator),
            collation: pg_sys::Oid::from(collation),
            descending: descending == 1,
            nulls_first: nulls_first == 1,
        })
    }

    /// The key in a fragment's `ORDER BY`.
    pub fn order_by_text(&self) -> String {
        let direction = if self.descending { "DESC" } else { "ASC" };
        let nulls = if self.nulls_first { "FIRST" } else { "LAST" };
        format!("{} {direction} NULLS {nulls}", self.position)
    }
}

impl ScanPlan {
    pub fn encode(&self) -> Vec<String> {
        let join = |v: Vec<String>| v.join(",");
        let mut parts = vec![
            u32::from(self.relid).to_string(),
            self.select_sql.clone(),
            self.group_by.clone(),
            self.where_sql.clone(),
            join(self.columns.iter().map(ToString::to_string).collect()),
            join(self.shard_ids.iter().map(ToString::to_string).collect()),
            self.prune_param.to_string(),
            join(
                self.exec_params
                    .iter()
                    .map(|(id, ty)| format!("{id}:{}", u32::from(*ty)))
                    .collect(),
            ),
            self.from_sql.clone(),
            join(
                self.relations
                    .iter()
                    .map(|(rti, oid)| format!("{rti}:{}", u32::from(*oid)))
                    .collect(),
            ),
            self.row_lock.clone(),
            self.base_rti.to_string(),
            self.having.clone(),
            self.order_by.clone(),
            self.limit.clone(),
            self.coordinator_values.clone(),
            join(self.merge_keys.iter().map(MergeKey::encode).collect()),
            u8::from(self.distinct).to_string(),
            self.statement_sql.clone(),
            u8::from(self.partitioned).to_string(),
            u8::from(self.from_is_join).to_string(),
            join(
                self.column_types
                    .iter()
                    .map(|ty| u32::from(*ty).to_string())
                    .collect(),
            ),
            self.sample.clone(),
            self.with_query.clone(),
        ];
        parts.extend(encode_broadcasts(&self.broadcasts));
        parts
    }

    pub fn decode(parts: &[String]) -> ScanPlan {
        let broadcasts = decode_broadcasts(parts.get(ENCODED_PARTS - 1..).unwrap_or_default());
        let (head, parts) = parts.split_at(parts.len().min(3));
        let relid = head
            .first()
            .and_then(|s| s.parse::<u32>().ok())
            .map(pg_sys::Oid::from)
            .unwrap_or(pg_sys::InvalidOid);
        fn pairs<T: std::str::FromStr>(s: &str) -> Vec<(T, pg_sys::Oid)> {
            s.split(',')
                .filter_map(|p| p.split_once(':'))
                .filter_map(|(n, oid)| {
                    Some((n.parse().ok()?, pg_sys::Oid::from(oid.parse::<u32>().ok()?)))
                })
                .collect()
        }
        fn numbers<T: std::str::FromStr>(s: &str) -> Vec<T> {
            s.split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| p.parse().ok())
                .collect()
        }
        ScanPlan {
            relid,
            select_sql: head.get(1).cloned().unwrap_or_default(),
            group_by: head.get(2).cloned().unwrap_or_default(),
            where_sql: parts.first().cloned().unwrap_or_default(),
            columns: parts.get(1).map(|s| numbers(s)).unwrap_or_default(),
            shard_ids: parts.get(2).map(|s| numbers(s)).unwrap_or_default(),
            prune_param: parts
                .get(3)
                .and_then(|s| s.parse().ok())
                .unwrap_or_default(),
            exec_params: parts.get(4).map(|s| pairs(s)).unwrap_or_default(),
            from_sql: parts.get(5).cloned().unwrap_or_default(),
            relations: parts.get(6).map(|s| pairs(s)).unwrap_or_default(),
            row_lock: parts.get(7).cloned().unwrap_or_default(),
            base_rti: parts
                .get(8)
                .and_then(|s| s.parse().ok())
                .unwrap_or_default(),
            having: parts.get(9).cloned().unwrap_or_default(),
            order_by: parts.get(10).cloned().unwrap_or_default(),
            limit: parts.get(11).cloned().unwrap_or_default(),
            coordinator_values: parts.get(12).cloned().unwrap_or_default(),
            merge_keys: parts
                .get(13)
                .map(|s| s.split(',').filter_map(MergeKey::decode).collect())
                .unwrap_or_default(),
            distinct: parts.get(14).is_some_and(|s| s == "1"),
            statement_sql: parts.get(15).cloned().unwrap_or_default(),
            partitioned: parts.get(16).is_some_and(|s| s == "1"),
            from_is_join: parts.get(17).is_some_and(|s| s == "1"),
            column_types: parts
                .get(18)
                .map(|s| {
                    numbers::<u32>(s)
                        .into_iter()
                        .map(pg_sys::Oid::from)
                        .collect()
                })
                .unwrap_or_default(),
            sample: parts.get(19).cloned().unwrap_or_default(),
            with_query: parts.get(20).cloned().unwrap_or_default(),
            broadcasts,
        }
    }
}

/// Broadcast scans (`ScanPlan::broadcasts`, `ModifyPlan::broadcasts`) as strings: their
/// number, then the parts of each.
pub fn encode_broadcasts(broadcasts: &[ScanPlan]) -> Vec<String> {
    let mut parts = vec![broadcasts.len().to_string()];
    for broadcast in broadcasts {
        parts.extend(broadcast.encode());
    }
    parts
}

/// The broadcast scans `encode_broadcasts` wrote at the start of `parts`.
pub fn decode_broadcasts(parts: &[String]) -> Vec<ScanPlan> {
    let count: usize = parts
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    parts
        .get(1..)
        .unwrap_or_default()
        .chunks(ENCODED_PARTS)
        .take(count)
        .map(ScanPlan::decode)
        .collect()
}

/// Strings → a List of String nodes (what custom_private holds).
pub unsafe fn to_list(parts: Vec<String>) -> *mut pg_sys::List {
    let mut list = PgList::<pg_sys::String>::new();
    for part in parts {
        let text = CString::new(part).unwrap_or_default();
        // SAFETY: pstrdup copies the text into the current memory context; makeString keeps it.
        unsafe { list.push(pg_sys::makeString(pg_sys::pstrdup(text.as_ptr()))) };
    }
    list.into_pg()
}

pub unsafe fn from_list(list: *mut pg_sys::List) -> Vec<String> {
    // SAFETY: list was built by to_list (String nodes).
    unsafe {
        PgList::<pg_sys::String>::from_pg(list)
            .iter_ptr()
            .map(|s| CStr::from_ptr((*s).sval).to_string_lossy().into_owned())
            .collect()
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn set_rel_pathlist(
    root: *mut pg_sys::PlannerInfo,
    rel: *mut pg_sys::RelOptInfo,
    rti: pg_sys::Index,
    rte: *mut pg_sys::RangeTblEntry,
) {
    // SAFETY: arguments come from the planner and are valid for this call.
    unsafe {
        if let Some(previous) = PREVIOUS_HOOK {
            previous(root, rel, rti, rte);
        }
        // A relation proven empty (a condition that is constant false, as in the arm of
        // `… UNION ALL …) WHERE k = 2` that sets k to 1) keeps its dummy path: its conditions
        // are gone, and a scan of the shards would return every row.
        if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION
            || crate::planner::shells_only()
            || !scanned_alone(root, rel)
            || pg_sys::is_dummy_rel(rel)
        {
            return;
        }
        let Some(table) = cache::lookup((*rte).relid) else {
            return;
        };
        let mut plan = plan_scan(&table, rel);
        if !(*rte).tablesample.is_null() {
            match sample_clause((*rte).tablesample, table.oid, rti) {
                Some(sample) => plan.sample = sample,
                // PostgreSQL's sample scan of the shell is refused after planning.
                None => return,
            }
        }
        plan.row_lock = crate::planner::row_locks::clause_for(root, rti);
        plan.distinct = crate::planner::distinct_rows::only_distinct_rows_needed(
            root,
            rel,
            table.oid,
            &plan.columns,
        );
        let path = add_distributed_path(root, rel, &plan, &table);
        crate::planner::merge_path::add_sorted_table_path(root, rel, path, &plan);
    }
}

/// ` TABLESAMPLE …` for the fragments reading table `relid` (range-table index `rti`), when
/// sampling each shard alike samples the table alike: the built-in percentage methods
/// (BERNOULLI, SYSTEM) with arguments the workers can evaluate. None otherwise.
unsafe fn sample_clause(
    sample: *mut pg_sys::TableSampleClause,
    relid: pg_sys::Oid,
    rti: u32,
) -> Option<String> {
    // SAFETY: sample is the (preprocessed) TABLESAMPLE clause of a relation being planned.
    unsafe {
        let method = sampling_method((*sample).tsmhandler)?;
        let mut args = Vec::new();
        for arg in PgList::<pg_sys::Node>::from_pg((*sample).args).iter_ptr() {
            if !shippable(arg) {
                return None;
            }
            args.push(deparse(arg, relid, rti).0);
        }
        let mut clause = format!(" TABLESAMPLE {method} ({})", args.join(", "));
        let repeatable = (*sample).repeatable.cast::<pg_sys::Node>();
        if !repeatable.is_null() {
            if !shippable(repeatable) {
                return None;
            }
            clause.push_str(&format!(
                " REPEATABLE ({})",
                deparse(repeatable, relid, rti).0
            ));
        }
        Some(clause)
    }
}

/// True when the shards can each take TABLESAMPLE clause `sample` (see `sample_clause`).
pub unsafe fn samples_on_shards(sample: *mut pg_sys::TableSampleClause) -> bool {
    // SAFETY: sample is a TABLESAMPLE clause of the query being planned.
    unsafe {
        let repeatable = (*sample).repeatable.cast::<pg_sys::Node>();
        sampling_method((*sample).tsmhandler).is_some()
            && PgList::<pg_sys::Node>::from_pg((*sample).args)
                .iter_ptr()
                .all(|arg| shippable(arg))
            && (repeatable.is_null() || shippable(repeatable))
    }
}

/// `system` or `bernoulli` for PostgreSQL's built-in percentage sampling methods (whose
/// sample of a table is the union of the same samples of its parts); None for others, such as
/// `system_rows (n)`, which would return n rows per shard.
fn sampling_method(handler: pg_sys::Oid) -> Option<&'static str> {
    // SAFETY: catalog lookups of a function by oid; the name is copied at once.
    unsafe {
        if pg_sys::get_func_namespace(handler) != pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE) {
            return None;
        }
        let name = pg_sys::get_func_name(handler);
        if name.is_null() {
            return None;
        }
        match CStr::from_ptr(name).to_bytes() {
            b"system" => Some("system"),
            b"bernoulli" => Some("bernoulli"),
            _ => None,
        }
    }
}

/// True when `rel` is read by a scan of its own: a base relation, or an arm of a `UNION ALL`
/// the planner pulled up into an append relation (`SELECT a FROM t UNION ALL SELECT a FROM
/// u`). A child of an inheritance tree or a partitioned table is not: its parent's scan reads
/// it.
unsafe fn scanned_alone(root: *mut pg_sys::PlannerInfo, rel: *mut pg_sys::RelOptInfo) -> bool {
    // SAFETY: the planner's append-relation array has an entry for every member relation.
    unsafe {
        match (*rel).reloptkind {
            pg_sys::RelOptKind::RELOPT_BASEREL => true,
            pg_sys::RelOptKind::RELOPT_OTHER_MEMBER_REL => {
                let info = *(*root).append_rel_array.add((*rel).relid as usize);
                !info.is_null() && (*info).parent_reloid == pg_sys::InvalidOid
            }
            _ => false,
        }
    }
}

/// `clause` as it runs on the workers — with placeholders for the values the coordinator
/// computes, appended to `values` — or None when it stays a local filter. The same rule
/// decides at path and at plan time.
pub(crate) unsafe fn shipped_form(
    clause: *mut pg_sys::Node,
    values: &mut Vec<*mut pg_sys::Node>,
) -> Option<*mut pg_sys::Node> {
    // SAFETY: clause is a valid restriction clause.
    unsafe {
        let before = values.len();
        let shipped = with_coordinator_values(clause, values);
        if shippable(shipped) {
            Some(shipped)
        } else {
            values.truncate(before);
            None
        }
    }
}

/// True when every restriction clause of `rel` runs on the workers (its Distributed Scan then
/// returns exactly the rows of `rel`, so work above it may move to the workers too).
pub unsafe fn all_clauses_ship(rel: *mut pg_sys::RelOptInfo) -> bool {
    // SAFETY: rel's restriction clauses, as the planner made them.
    unsafe {
        shipped_forms(rel, &mut Vec::new())
            .iter()
            .all(Option::is_some)
    }
}

unsafe fn plan_scan(table: &DistTable, rel: *mut pg_sys::RelOptInfo) -> ScanPlan {
    // SAFETY: rel is a base relation of the query being planned.
    unsafe {
        let mut values = Vec::new();
        let mut exec_params = Vec::new();
        let mut parts = Vec::new();
        // Pruning looks at the clauses as they ship.
        let mut clauses = Vec::new();
        let forms = shipped_forms(rel, &mut values);
        let infos = PgList::<pg_sys::RestrictInfo>::from_pg((*rel).baserestrictinfo);
        for (ri, form) in infos.iter_ptr().zip(forms) {
            let clause = (*ri).clause.cast::<pg_sys::Node>();
            let Some(shipped) = form else {
                continue;
            };
            // `key = <a value the coordinator computes>` prunes at execution, as `key = $n`.
            clauses.push(if shippable(clause) { clause } else { shipped });
            let (text, params) = deparse(shipped, table.oid, (*rel).relid);
            parts.push(format!("({text})"));
            exec_params.extend(params);
        }
        let where_sql = parts.join(" AND ");
        let columns = needed_columns(rel);
        let shards = cache::shards(table.oid);
        let all = || shards.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        let (shard_ids, prune_param) = match table.method {
            Method::Hash => prune(table, &clauses, &shards),
            Method::Range => {
                let placements = cache::placements(table.oid);
                (
                    crate::planner::range_pruning::prune(table, &clauses, &placements)
                        .unwrap_or_else(all),
                    0,
                )
            }
            Method::Reference => (all(), 0),
        };
        ScanPlan {
            relid: table.oid,
            where_sql,
            columns,
            shard_ids,
            prune_param,
            exec_params,
            base_rti: (*rel).relid,
            coordinator_values: if values.is_empty() {
                String::new()
            } else {
                let mut list = PgList::<pg_sys::Node>::new();
                for value in values {
                    list.push(value);
                }
                CStr::from_ptr(pg_sys::nodeToString(list.into_pg().cast()))
                    .to_string_lossy()
                    .into_owned()
            },
            ..Default::default()
        }
    }
}

/// Columns the query needs from this table: its target list and the local filters'.
unsafe fn needed_columns(rel: *mut pg_sys::RelOptInfo) -> Vec<i16> {
    let mut attnos: Vec<i16> = Vec::new();
    // SAFETY: reltarget and baserestrictinfo belong to rel; pull_varattnos fills a Bitmapset
    // with attno - FirstLowInvalidHeapAttributeNumber.
    unsafe {
        let mut set: *mut pg_sys::Bitmapset = std::ptr::null_mut();
        let relid = (*rel).relid;
        pg_sys::pull_varattnos((*(*rel).reltarget).exprs.cast(), relid, &mut set);
        // Shipped clauses run on the workers: only local filters need their columns here.
        let forms = shipped_forms(rel, &mut Vec::new());
        let infos = PgList::<pg_sys::RestrictInfo>::from_pg((*rel).baserestrictinfo);
        for (ri, form) in infos.iter_ptr().zip(forms) {
            if form.is_none() {
                pg_sys::pull_varattnos((*ri).clause.cast(), relid, &mut set);
            }
        }
        let offset = pg_sys::FirstLowInvalidHeapAttributeNumber;
        let mut member = -1;
        loop {
            member = pg_sys::bms_next_member(set, member);
            if member < 0 {
                break;
            }
            let attno = (member + offset) as i16;
            if attno > 0 {
                attnos.push(attno);
            } else if attno == 0 {
                // A whole-row reference needs every column.
                attnos = (1..=(*rel).max_attr).collect();
                break;
            }
        }
    }
    attnos
}

/// Shards that can hold rows satisfying `clauses` (equality or IN on the distribution column),
/// and the `$n` that decides it at execution.
pub unsafe fn prune(
    table: &DistTable,
    clauses: &[*mut pg_sys::Node],
    shards: &[(i64, i32)],
) -> (Vec<i64>, i32) {
    let all: Vec<i64> = shards.iter().map(|(id, _)| *id).collect();
    let Some(attno) = table.distribution_attno() else {
        return (all, 0);
    };
    // SAFETY: catalog lookups for the distribution column; clauses are valid expressions.
    unsafe {
        let Some(family) = hashing::hash_family(pg_sys::get_atttype(table.oid, attno)) else {
            return (all, 0);
        };
        let shard_count = shards.len() as i32;
        let mut allowed: Option<Vec<i64>> = None;
        let mut param = 0;
        for clause in clauses {
            match equality_values(*clause, attno, family) {
                Some(Equality::Values(values)) => {
                    let ids: Vec<i64> = values
                        .into_iter()
                        .filter_map(|(ty, datum)| hashing::hash_datum(ty, datum))
                        .map(|h| hashing::hash_shard_index(h, shard_count))
                        .filter_map(|index| {
                            shards.iter().find(|(_, i)| *i == index).map(|(id, _)| *id)
                        })
                        .collect();
                    allowed = Some(match allowed {
                        None => ids,
                        Some(previous) => {
                            previous.into_iter().filter(|id| ids.contains(id)).collect()
                        }
                    });
                }
                Some(Equality::Param(id)) => param = id,
                // A single value prunes better.
                Some(Equality::ArrayParam(id)) if param <= 0 => param = -id,
                _ => {}
            }
        }
        let mut ids = allowed.unwrap_or(all);
        ids.sort_unstable();
        ids.dedup();
        (ids, param)
    }
}

/// True when `opno` is the equality operator of hash operator family `family`.
pub unsafe fn is_hash_equality(opno: pg_sys::Oid, family: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookups by oid.
    unsafe {
        pg_sys::op_in_opfamily(opno, family)
            && pg_sys::get_op_opfamily_strategy(opno, family)
                == pg_sys::HTEqualStrategyNumber as i32
    }
}

/// The element type and non-NULL elements of a constant array expression, if it is one.
pub unsafe fn const_array_elements(
    node: *mut pg_sys::Node,
) -> Option<(pg_sys::Oid, Vec<(pg_sys::Oid, pg_sys::Datum)>)> {
    // SAFETY: node is a valid expression; the cast follows its tag.
    unsafe {
        if node.is_null()
            || (*node).type_ != pg_sys::NodeTag::T_Const
            || (*node.cast::<pg_sys::Const>()).constisnull
        {
            return None;
        }
        Some(array_elements((*node.cast::<pg_sys::Const>()).constvalue))
    }
}

/// The element type and non-NULL elements of the array `value` (not NULL).
pub unsafe fn array_elements(
    value: pg_sys::Datum,
) -> (pg_sys::Oid, Vec<(pg_sys::Oid, pg_sys::Datum)>) {
    // SAFETY: value is an array datum; it is detoasted and deconstructed into Datums that live
    // in the current memory context.
    unsafe {
        let array = pg_sys::pg_detoast_datum(value.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
        let element_type = (*array).elemtype;
        let (mut len, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
        pg_sys::get_typlenbyvalalign(element_type, &mut len, &mut byval, &mut align);
        let mut values: *mut pg_sys::Datum = std::ptr::null_mut();
        let mut nulls: *mut bool = std::ptr::null_mut();
        let mut count = 0;
        pg_sys::deconstruct_array(
            array,
            element_type,
            len.into(),
            byval,
            align,
            &mut values,
            &mut nulls,
            &mut count,
        );
        let elements = (0..count as usize)
            .filter(|i| !*nulls.add(*i))
            .map(|i| (element_type, *values.add(i)))
            .collect();
        (element_type, elements)
    }
}

enum Equality {
    /// Constants (type, value) the column must equal one of.
    Values(Vec<(pg_sys::Oid, pg_sys::Datum)>),
    /// A `$n` the column must equal.
    Param(i32),
    /// A `$n` array the column must equal an element of.
    ArrayParam(i32),
}

/// `column = constant`, `column = $n` or `column = ANY(constant array)` with an equality
/// operator of the column type's hash operator family.
unsafe fn equality_values(
    clause: *mut pg_sys::Node,
    attno: i16,
    family: pg_sys::Oid,
) -> Option<Equality> {
    // SAFETY: clause is a valid expression; casts follow node tags.
    unsafe {
        let strip = |mut n: *mut pg_sys::Node| {
            while !n.is_null() && (*n).type_ == pg_sys::NodeTag::T_RelabelType {
                n = (*n.cast::<pg_sys::RelabelType>()).arg.cast();
            }
            n
        };
        let is_column = |n: *mut pg_sys::Node| {
            let n = strip(n);
            !n.is_null()
                && (*n).type_ == pg_sys::NodeTag::T_Var
                && (*n.cast::<pg_sys::Var>()).varattno == attno
        };
        let is_equality = |opno: pg_sys::Oid| is_hash_equality(opno, family);
        match (*clause).type_ {
            pg_sys::NodeTag::T_OpExpr => {
                let op = clause.cast::<pg_sys::OpExpr>();
                let args = PgList::<pg_sys::Node>::from_pg((*op).args);
                if args.len() != 2 || !is_equality((*op).opno) {
                    return None;
                }
                let (left, right) = (args.get_ptr(0)?, args.get_ptr(1)?);
                let other = if is_column(left) {
                    strip(right)
                } else if is_column(right) {
                    strip(left)
                } else {
                    return None;
                };
                match (*other).type_ {
                    pg_sys::NodeTag::T_Const => {
                        let c = other.cast::<pg_sys::Const>();
                        // NULL = anything is never true: no shard.
                        Some(Equality::Values(if (*c).constisnull {
                            vec![]
                        } else {
                            vec![((*c).consttype, (*c).constvalue)]
                        }))
                    }
                    pg_sys::NodeTag::T_Param => param_id(other).map(Equality::Param),
                    _ => None,
                }
            }
            pg_sys::NodeTag::T_ScalarArrayOpExpr => {
                let op = clause.cast::<pg_sys::ScalarArrayOpExpr>();
                let args = PgList::<pg_sys::Node>::from_pg((*op).args);
                if !(*op).useOr
                    || args.len() != 2
                    || !is_equality((*op).opno)
                    || !is_column(args.get_ptr(0)?)
                {
                    return None;
                }
                let array = strip(args.get_ptr(1)?);
                match param_id(array) {
                    Some(id) => Some(Equality::ArrayParam(id)),
                    None => Some(Equality::Values(const_array_elements(array)?.1)),
                }
            }
            _ => None,
        }
    }
}

/// The id by which pruning finds parameter `node` at execution (see `ScanPlan::prune_param`).
unsafe fn param_id(node: *mut pg_sys::Node) -> Option<i32> {
    // SAFETY: node is a valid expression node; the cast follows its tag.
    unsafe {
        if (*node).type_ != pg_sys::NodeTag::T_Param {
            return None;
        }
        let param = node.cast::<pg_sys::Param>();
        match (*param).paramkind {
            pg_sys::ParamKind::PARAM_EXTERN => Some((*param).paramid),
            pg_sys::ParamKind::PARAM_EXEC => Some(EXEC_PARAM_BASE + (*param).paramid),
            _ => None,
        }
    }
}

unsafe fn add_distributed_path(
    root: *mut pg_sys::PlannerInfo,
    rel: *mut pg_sys::RelOptInfo,
    plan: &ScanPlan,
    table: &DistTable,
) -> *mut pg_sys::CustomPath {
    // SAFETY: we build a CustomPath in planner memory and hand it to add_path, replacing the
    // shell table's paths (which would read the empty shell).
    unsafe {
        (*rel).pathlist = std::ptr::null_mut();
        (*rel).partial_pathlist = std::ptr::null_mut();
        (*rel).consider_parallel = false;
        // A parameter that prunes at execution leaves one shard: cost it so, or PostgreSQL
        // would keep re-planning prepared statements instead of using their generic plan.
        let shards = if plan.prune_param > 0 {
            1.0
        } else {
            plan.shard_ids.len().max(1) as f64
        };
        // The shell is empty: the rows are those the nodes last counted in the shards read, as
        // many as the filters keep; 1000 per shard while nobody has counted.
        let rows = match table.row_estimate {
            Some(table_rows) => {
                let all_shards = cache::shards(plan.relid).len().max(1) as f64;
                let tuples = table_rows * (shards / all_shards).min(1.0);
                let selectivity = pg_sys::clauselist_selectivity(
                    root,
                    (*rel).baserestrictinfo,
                    0,
                    pg_sys::JoinType::JOIN_INNER,
                    std::ptr::null_mut(),
                );
                (*rel).tuples = tuples.max(1.0);
                (tuples * selectivity).max(1.0).round()
            }
            None => ((*rel).rows).max(1000.0 * shards),
        };
        (*rel).rows = rows;
        // Without this, group and distinct estimates clamp to one row.
        (*rel).tuples = (*rel).tuples.max(rows);
        let total_cost = 100.0 + 10.0 * shards + rows * 0.01;
        let path = new_custom_path(
            rel,
            (*rel).reltarget,
            rows,
            total_cost,
            plan,
            &raw const PATH_METHODS,
        );
        pg_sys::add_path(rel, path.cast());
        path
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn plan_path(
    _root: *mut pg_sys::PlannerInfo,
    rel: *mut pg_sys::RelOptInfo,
    best_path: *mut pg_sys::CustomPath,
    tlist: *mut pg_sys::List,
    clauses: *mut pg_sys::List,
    _custom_plans: *mut pg_sys::List,
) -> *mut pg_sys::Plan {
    // SAFETY: builds the CustomScan node from the chosen path, as the planner expects.
    unsafe {
        let mut local_list = PgList::<pg_sys::RestrictInfo>::new();
        // Shipped clauses go to custom_exprs: the executor does not evaluate them, but the
        // planner then knows which parameters the scan depends on (and rescans it when they
        // change).
        let mut shipped_list = PgList::<pg_sys::Node>::new();
        let infos: Vec<*mut pg_sys::RestrictInfo> =
            PgList::<pg_sys::RestrictInfo>::from_pg((*rel).baserestrictinfo)
                .iter_ptr()
                .collect();
        let forms = shipped_forms(rel, &mut Vec::new());
        for ri in PgList::<pg_sys::RestrictInfo>::from_pg(clauses).iter_ptr() {
            let ships = match infos.iter().position(|info| std::ptr::eq(*info, ri)) {
                Some(i) => forms[i].is_some(),
                None => shipped_form((*ri).clause.cast(), &mut Vec::new()).is_some(),
            };
            if ships {
                shipped_list.push((*ri).clause.cast());
            } else {
                local_list.push(ri);
            }
        }
        let scan = new_custom_scan(best_path, tlist);
        (*scan).scan.plan.qual = pg_sys::extract_actual_clauses(local_list.into_pg(), false);
        (*scan).scan.scanrelid = (*rel).relid;
        (*scan).custom_exprs = shipped_list.into_pg();
        scan.cast()
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn plans_with_broadcasts_survive_encoding() {
        let broadcast = ScanPlan {
            relid: pg_sys::Oid::from(17000),
            columns: vec![1, 3],
            where_sql: "(region = 'north')".into(),
            shard_ids: vec![102_040, 102_041],
            partitioned: true,
            ..Default::default()
        };
        let query_read = ScanPlan {
            statement_sql: "SELECT 1, 'a'".into(),
            columns: vec![1, 2],
            column_types: vec![pg_sys::INT4OID, pg_sys::TEXTOID],
            ..Default::default()
        };
        let plan = ScanPlan {
            relid: pg_sys::Oid::from(16999),
            from_sql: "$300001 r1 JOIN unnest($270000, $270001) AS r2(a, b) ON (r1.x = r2.a)"
                .into(),
            from_is_join: true,
            relations: vec![(1, pg_sys::Oid::from(16999))],
            distinct: true,
            broadcasts: vec![broadcast.clone(), query_read, broadcast],
            ..Default::default()
        };
        assert_eq!(ScanPlan::decode(&plan.encode()), plan);
        let plain = ScanPlan {
            where_sql: "(a > 1)".into(),
            statement_sql: "SELECT 1".into(),
            sample: " TABLESAMPLE bernoulli ('10'::real)".into(),
            ..Default::default()
        };
        assert_eq!(plain.encode().len(), ENCODED_PARTS);
        assert_eq!(ScanPlan::decode(&plain.encode()), plain);
    }
}
