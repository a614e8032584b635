//! The planner hook. Queries that involve no distributed or reference table go to the standard
//! planner untouched (after one cheap look at the per-backend table cache). Reads of
//! distributed tables are planned by PostgreSQL with a Distributed Scan for each such table
//! (`scan_path.rs`); INSERT, UPDATE and DELETE get a Distributed Modify node (`modify_plan.rs`),
//! also inside WITH (`with_writes.rs`), and MERGE (`merge_plan.rs`). What is not supported yet
//! is refused here with 0A000 — row locks in some queries, some uses of row-level security —
//! rather than answered from the coordinator's empty shell table; a last check refuses any
//! finished plan that would still read a shell (`shell_read`).

pub mod aggregate_path;
pub mod coordinator_subqueries;
pub mod distinct_rows;
pub mod fast_path;
pub mod join_path;
pub mod limit_path;
pub mod merge_path;
pub mod merge_plan;
pub mod merge_source;
pub mod modify_plan;
pub mod modify_pushdown;
pub mod partitioned;
pub mod range_pruning;
pub mod row_locks;
pub mod scan_path;
pub mod security_quals;
pub mod shippable;
pub mod window_path;
pub mod with_writes;

use std::ffi::c_void;

use pgrx::prelude::*;

use crate::distribution::create::relation_name;
use crate::metadata::cache;

#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    #[error("this data-modifying statement on distributed table {0} is not supported yet")]
    Writes(String),
    #[error("table {0} is written by one part of this statement and read or written by another")]
    WrittenAndRead(String),
    #[error("MERGE into distributed table {0} cannot run on the worker nodes: it has {1}")]
    MergeNotPushable(String, String),
    #[error("row locks (FOR UPDATE / FOR SHARE) on distributed table {0} are not supported in this query")]
    RowLocks(String),
    #[error("{1} in a write to distributed table {0} cannot run on the worker nodes")]
    ModifyExpression(String, String),
    #[error("UPDATE or DELETE of distributed table {0} cannot run on the worker nodes: {1}")]
    ModifyNotPushable(String, String),
    #[error("modifying the distribution column \"{1}\" of distributed table {0} is not supported")]
    DistributionColumnUpdate(String, String),
    #[error("row-level security policies or check options of distributed table {0} are not supported in this write yet")]
    RowSecurity(String),
    #[error("WHERE CURRENT OF a cursor is not supported for distributed table {0}")]
    CurrentOf(String),
    #[error("system column {1} of distributed table {0} is not supported")]
    SystemColumn(String, String),
    #[error("UPDATE or DELETE of ONLY the partitioned table {0}, which has no rows of its own, is not supported")]
    OnlyPartitioned(String),
    #[error("this query would read the coordinator's empty copy of distributed table {0}")]
    ShellRead(String),
    #[error("this TABLESAMPLE on distributed table {0} is not supported yet")]
    TableSample(String),
    #[error("{1} on distributed table {0}, which has triggers, is not supported yet")]
    Triggers(String, String),
    #[error("this write to distributed table {0} changes rows of table {1} through a foreign key's action, which would skip the row triggers of {1}")]
    CascadeSkipsTriggers(String, String),
    #[error("this write could break the foreign key of local table {1} that references distributed table {0}, which the shards cannot check")]
    LocalReference(String, String),
}

impl crate::error::PgError for PlannerError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            PlannerError::Writes(_) => {
                "Run the INSERT, UPDATE or DELETE as a statement of its own.".into()
            }
            PlannerError::WrittenAndRead(_) => {
                "pgdist runs the parts of a statement with data-modifying WITH queries one \
                 after the other, so one part would see another's changes, which PostgreSQL \
                 never shows. Pass rows between the parts with RETURNING (an INSERT without ON \
                 CONFLICT may read the rows a WITH query returns even when both write the same \
                 table), or run the parts as separate statements in one transaction."
                    .into()
            }
            PlannerError::MergeNotPushable(..) => {
                "MERGE into a distributed table needs an ON condition that equates the \
                 target's distribution column with a source column of the same type or another \
                 integer type (which INSERT must then use); the source may be a table, a join, \
                 a view, a subquery, VALUES or a function. Otherwise use INSERT … ON CONFLICT, \
                 UPDATE … FROM and DELETE … USING."
                    .into()
            }
            PlannerError::RowLocks(_) => {
                "FOR UPDATE / FOR SHARE works on a query that reads only distributed and \
                 reference tables and that the workers run whole (one table, or a join of \
                 co-located or reference tables, with conditions the workers can evaluate: \
                 built-in functions, values computed first), with LIMIT or OFFSET only when it reads one \
                 shard (filter on the distribution column); lock the rows with such a query \
                 first, or drop the clause."
                    .into()
            }
            PlannerError::ModifyNotPushable(..) => {
                "Join other distributed tables on the distribution column (co-located tables) \
                 or use reference tables; compute other values first and pass them as \
                 constants or parameters."
                    .into()
            }
            PlannerError::ModifyExpression(..) => {
                "Writes may use columns, constants, parameters and immutable built-in \
                 functions and operators; compute other values first and pass them as \
                 constants or parameters."
                    .into()
            }
            PlannerError::DistributionColumnUpdate(table, column) => format!(
                "Delete the row and insert it again with the new value, in one statement if you \
                 like: WITH old AS (DELETE FROM {table} WHERE … RETURNING *) INSERT INTO {table} \
                 SELECT <new {column}>, … FROM old."
            ),
            PlannerError::CurrentOf(_) => {
                "The cursor's rows come from the shards on the workers; fetch the row's key \
                 with the cursor (its primary key) and write WHERE <key> = <value> instead."
                    .into()
            }
            PlannerError::SystemColumn(..) => {
                "The rows live in the shards, each with system columns of its own shard, which \
                 do not identify a row of the table; use the table's own columns (its primary \
                 key) instead."
                    .into()
            }
            PlannerError::LocalReference(_, referencing) => format!(
                "Distribute {referencing} too (co-located, or as a reference table): the shards \
                 then enforce its key. Until then rows can be inserted and columns outside the \
                 referenced key updated; or drop the foreign key."
            ),
            PlannerError::Triggers(..) => {
                "pgdist fires row triggers of INSERT (ON CONFLICT too), UPDATE and DELETE, and \
                 statement triggers of every write (MERGE's too); write the statement that way \
                 (SET (a, b) = (SELECT …) as one subquery per column, an upsert into a reference \
                 table or under row-level security as UPDATE, then INSERT … ON CONFLICT DO \
                 NOTHING), or drop the triggers."
                    .into()
            }
            PlannerError::CascadeSkipsTriggers(_, child) => format!(
                "The shards run ON DELETE / ON UPDATE actions, and triggers fire on the \
                 coordinator: change the rows of {child} with a statement of their own first, \
                 or drop its row triggers."
            ),
            PlannerError::TableSample(_) => {
                "Queries may sample distributed tables with TABLESAMPLE BERNOULLI or SYSTEM \
                 and arguments the workers can compute (constants, parameters); elsewhere, \
                 sample with a condition such as WHERE random() < 0.1 (each row with \
                 probability 0.1, as TABLESAMPLE BERNOULLI (10))."
                    .into()
            }
            PlannerError::OnlyPartitioned(_) => {
                "Leave out ONLY to change the rows of its partitions.".into()
            }
            PlannerError::ShellRead(_) => {
                "pgdist does not plan this query shape correctly yet; please report it. \
                 Writing the part that reads the table as a subquery with a WHERE clause may \
                 avoid it."
                    .into()
            }
            PlannerError::RowSecurity(_) => {
                "Policies and check options apply to SELECT, INSERT (also ON CONFLICT), UPDATE, \
                 DELETE and MERGE; not yet to ON CONFLICT DO UPDATE through a view WITH CHECK \
                 OPTION, or to a table inside an explicit JOIN of an UPDATE or DELETE (list it \
                 in FROM or USING instead). Use one of the supported forms, or \
                 run the statement as the table's owner (or a role with BYPASSRLS)."
                    .into()
            }
        })
    }
}

static mut PREVIOUS_HOOK: pg_sys::planner_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster before any backend exists; we chain to the
    // hook that was installed before us.
    unsafe {
        PREVIOUS_HOOK = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(plan);
    }
    scan_path::init();
    join_path::init();
    // SAFETY: as above.
    unsafe {
        PREVIOUS_UPPER_HOOK = pg_sys::create_upper_paths_hook;
        pg_sys::create_upper_paths_hook = Some(create_upper_paths);
    }
}

static mut PREVIOUS_UPPER_HOOK: pg_sys::create_upper_paths_hook_type = None;

/// Work above the scans that can move to the workers: each stage's pushdown module adds its
/// Distributed Scan path.
#[pg_guard]
unsafe extern "C-unwind" fn create_upper_paths(
    root: *mut pg_sys::PlannerInfo,
    stage: pg_sys::UpperRelationKind::Type,
    input_rel: *mut pg_sys::RelOptInfo,
    output_rel: *mut pg_sys::RelOptInfo,
    extra: *mut c_void,
) {
    // SAFETY: arguments come from the planner and are valid for this call; `extra` has the
    // type PostgreSQL documents for each stage.
    unsafe {
        if let Some(previous) = PREVIOUS_UPPER_HOOK {
            previous(root, stage, input_rel, output_rel, extra);
        }
        let sorted = !(*(*root).parse).sortClause.is_null();
        match stage {
            pg_sys::UpperRelationKind::UPPERREL_GROUP_AGG if !extra.is_null() => {
                aggregate_path::add_pushdown_path(root, input_rel, output_rel, extra.cast());
            }
            pg_sys::UpperRelationKind::UPPERREL_WINDOW => {
                window_path::add_pushdown_path(root, input_rel, output_rel);
            }
            pg_sys::UpperRelationKind::UPPERREL_ORDERED => {
                limit_path::add_top_n_path(root, input_rel, output_rel);
                merge_path::add_merged_path(root, input_rel, output_rel);
            }
            pg_sys::UpperRelationKind::UPPERREL_FINAL if !sorted && !extra.is_null() => {
                limit_path::add_first_rows_path(root, input_rel, output_rel, extra.cast());
            }
            _ => {}
        }
    }
}

thread_local! {
    static SHELLS_ONLY: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// While it lives, queries read the coordinator's shells as the plain tables they are: for the
/// queries PostgreSQL runs inside ALTER TABLE on a distributed table (the check of a new
/// foreign key reads the referencing table, an empty shell; the shards check their rows).
pub struct ShellsOnly(());

impl ShellsOnly {
    pub fn enter() -> ShellsOnly {
        SHELLS_ONLY.set(SHELLS_ONLY.get() + 1);
        ShellsOnly(())
    }
}

impl Drop for ShellsOnly {
    fn drop(&mut self) {
        SHELLS_ONLY.set(SHELLS_ONLY.get().saturating_sub(1));
    }
}

pub fn shells_only() -> bool {
    SHELLS_ONLY.get() > 0
}

#[pg_guard]
unsafe extern "C-unwind" fn plan(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: std::ffi::c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    // SAFETY: chaining with the arguments we were given.
    let plan_rest = || unsafe {
        match PREVIOUS_HOOK {
            Some(previous) => previous(parse, query_string, cursor_options, bound_params),
            None => pg_sys::standard_planner(parse, query_string, cursor_options, bound_params),
        }
    };
    let any_distributed = cache::with_tables(|tables| !tables.is_empty());
    if !any_distributed || shells_only() {
        return plan_rest();
    }
    // SAFETY: parse is the query being planned, valid for this call.
    if let Err(err) = unsafe { partitioned::read_parents_whole(parse) } {
        crate::error::raise(err);
    }
    // SAFETY: parse is the query being planned, valid for this call.
    if let Some(stmt) = unsafe { fast_path::plan(parse, cursor_options) } {
        return stmt;
    }
    // Lives until planning ends: the table's scan picks the lock clause up.
    // SAFETY: parse is the query being planned, valid for this call.
    let _row_locks =
        unsafe { row_locks::take_from(parse) }.unwrap_or_else(|err| crate::error::raise(err));
    // SAFETY: as above.
    unsafe {
        if let Some(err) = unsupported_use(parse) {
            crate::error::raise(err);
        }
        security_quals::policy_subqueries_computed_first(parse);
        let with_writes =
            with_writes::analyse(parse).unwrap_or_else(|err| crate::error::raise(err));
        let written = match (*parse).commandType {
            pg_sys::CmdType::CMD_SELECT => None,
            _ => distributed_rte(parse, (*parse).resultRelation).and_then(cache::lookup),
        };
        let stmt = match written {
            Some(table) => modify_plan::plan(parse, &table, plan_rest)
                .unwrap_or_else(|err| crate::error::raise(err)),
            None => plan_rest(),
        };
        with_writes::plan(stmt, with_writes).unwrap_or_else(|err| crate::error::raise(err));
        row_locks::check_plan(stmt).unwrap_or_else(|err| crate::error::raise(err));
        if let Some(oid) = shell_read(stmt) {
            crate::error::raise(PlannerError::ShellRead(relation_name(oid)));
        }
        stmt
    }
}

/// The distributed or reference table a PostgreSQL scan of plan `stmt` would read on the
/// coordinator, whose copy is an empty shell: a safety net that turns a shape the scan paths
/// missed into an error instead of a wrong answer.
unsafe fn shell_read(stmt: *mut pg_sys::PlannedStmt) -> Option<pg_sys::Oid> {
    // SAFETY: stmt is a finished plan; scans' relation indexes point into its range table.
    unsafe {
        let mut found = None;
        let mut check = |plan: *mut pg_sys::Plan| {
            let tag = (*plan).type_ as u32;
            let postgres_scan = (pg_sys::NodeTag::T_SeqScan as u32
                ..=pg_sys::NodeTag::T_TidRangeScan as u32)
                .contains(&tag)
                && (*plan).type_ != pg_sys::NodeTag::T_BitmapIndexScan;
            if found.is_none() && postgres_scan {
                let rti = (*plan.cast::<pg_sys::Scan>()).scanrelid;
                if rti > 0 {
                    let rte = pg_sys::list_nth((*stmt).rtable, rti as i32 - 1)
                        .cast::<pg_sys::RangeTblEntry>();
                    if cache::lookup((*rte).relid).is_some() {
                        found = Some((*rte).relid);
                    }
                }
            }
        };
        each_plan_node((*stmt).planTree, &mut check);
        for plan in pgrx::PgList::<pg_sys::Plan>::from_pg((*stmt).subplans).iter_ptr() {
            each_plan_node(plan, &mut check);
        }
        found
    }
}

/// Calls `f` on `plan` and every plan below it: its children, and the plans of appends,
/// bitmap combinations, subquery scans and custom scans.
pub(crate) unsafe fn each_plan_node(plan: *mut pg_sys::Plan, f: &mut dyn FnMut(*mut pg_sys::Plan)) {
    if plan.is_null() {
        return;
    }
    // SAFETY: plan is a node of a finished plan tree; casts follow its tag, lists hold plans.
    unsafe {
        f(plan);
        each_plan_node((*plan).lefttree, f);
        each_plan_node((*plan).righttree, f);
        let lists = match (*plan).type_ {
            pg_sys::NodeTag::T_Append => vec![(*plan.cast::<pg_sys::Append>()).appendplans],
            pg_sys::NodeTag::T_MergeAppend => {
                vec![(*plan.cast::<pg_sys::MergeAppend>()).mergeplans]
            }
            pg_sys::NodeTag::T_BitmapAnd => vec![(*plan.cast::<pg_sys::BitmapAnd>()).bitmapplans],
            pg_sys::NodeTag::T_BitmapOr => vec![(*plan.cast::<pg_sys::BitmapOr>()).bitmapplans],
            pg_sys::NodeTag::T_CustomScan => {
                vec![(*plan.cast::<pg_sys::CustomScan>()).custom_plans]
            }
            pg_sys::NodeTag::T_SubqueryScan => {
                each_plan_node((*plan.cast::<pg_sys::SubqueryScan>()).subplan, f);
                Vec::new()
            }
            _ => Vec::new(),
        };
        for list in lists {
            for child in pgrx::PgList::<pg_sys::Plan>::from_pg(list).iter_ptr() {
                each_plan_node(child, f);
            }
        }
    }
}

/// Calls `f` on `node` and every query inside it (subqueries, WITH queries, sublinks), outer
/// levels first.
pub(crate) unsafe fn each_query(node: *mut pg_sys::Node, f: &mut dyn FnMut(*mut pg_sys::Query)) {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walk(
        node: *mut pg_sys::Node,
        context: *mut std::ffi::c_void,
    ) -> bool {
        if node.is_null() {
            return false;
        }
        // SAFETY: node is a valid node; context is the closure passed below.
        unsafe {
            if (*node).type_ == pg_sys::NodeTag::T_Query {
                let f = &mut *context.cast::<&mut dyn FnMut(*mut pg_sys::Query)>();
                f(node.cast());
                return pg_sys::query_tree_walker(node.cast(), Some(walk), context, 0);
            }
            pg_sys::expression_tree_walker(node, Some(walk), context)
        }
    }
    let mut f = f;
    // SAFETY: the walk only hands valid Query nodes to `f`; the context outlives it.
    unsafe {
        walk(node, (&raw mut f).cast());
    }
}

struct Check {
    /// The queries the walk is in, innermost last (for the range table a Var refers to).
    levels: Vec<*mut pg_sys::Query>,
    /// How many of those UPDATE or DELETE a distributed or reference table.
    in_distributed_write: usize,
    /// How many of those MERGE into one.
    in_distributed_merge: usize,
    found: Option<PlannerError>,
}

/// What in `query` (subqueries, CTEs, sublinks included) pgdist cannot run yet, if anything.
unsafe fn unsupported_use(query: *mut pg_sys::Query) -> Option<PlannerError> {
    let mut check = Check {
        levels: Vec::new(),
        in_distributed_write: 0,
        in_distributed_merge: 0,
        found: None,
    };
    // SAFETY: the walker visits the nodes of a valid Query; the context is `check`.
    unsafe { check_node(query.cast(), (&raw mut check).cast()) };
    check.found
}

/// The distributed table at range-table index `rti` (1-based) of `query`, if it is one.
unsafe fn distributed_rte(query: *mut pg_sys::Query, rti: i32) -> Option<pg_sys::Oid> {
    // SAFETY: rti indexes the query's range table.
    unsafe {
        let rtable = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable);
        let rte = rtable.get_ptr(usize::try_from(rti).ok()?.checked_sub(1)?)?;
        ((*rte).rtekind == pg_sys::RTEKind::RTE_RELATION && cache::lookup((*rte).relid).is_some())
            .then_some((*rte).relid)
    }
}

/// True when `query` writes a distributed or reference table.
unsafe fn writes_distributed_table(query: *mut pg_sys::Query) -> bool {
    // SAFETY: query is a valid Query.
    unsafe {
        (*query).commandType != pg_sys::CmdType::CMD_SELECT
            && distributed_rte(query, (*query).resultRelation).is_some()
    }
}

/// A table of `query` read under row-level security or a security-barrier view (the
/// rewriter's `securityQuals`), or a distributed table written under a check option, in a way
/// pgdist does not apply yet. Checked inside writes to distributed tables, whose UPDATE,
/// DELETE and MERGE statements go to the workers as SQL text (reads apply the conditions on
/// the workers: `security_quals.rs`). What is applied: UPDATE and DELETE take the conditions
/// of the tables their WHERE clauses filter directly (target, FROM list, at every level) into
/// those clauses; INSERT and UPDATE test check options on the coordinator, `ON CONFLICT DO
/// UPDATE` and MERGE on the shards; a MERGE's source is read with its policies by the
/// coordinator. Not yet: tables inside explicit JOINs of an UPDATE or DELETE, and `ON
/// CONFLICT DO UPDATE` through a view with a check option.
unsafe fn row_security_on_distributed_table(
    query: *mut pg_sys::Query,
    in_update_or_delete: bool,
    in_merge: bool,
) -> Option<pg_sys::Oid> {
    use pg_sys::CmdType::{CMD_INSERT, CMD_MERGE, CMD_UPDATE};
    // SAFETY: query is a valid Query; its range table holds RangeTblEntry nodes.
    unsafe {
        let command = (*query).commandType;
        let target = (*query).resultRelation;
        // Below a MERGE, a query either is computed first as SQL of its own (a policy's
        // subquery, planned again with its tables' policies) or is refused by `merge_plan.rs`.
        if in_merge && command != CMD_MERGE {
            return None;
        }
        // ON CONFLICT DO UPDATE: the shards test the policies on conflicting rows; a view's
        // check option would have to be tested on the rows they return.
        let conflict_update = !(*query).onConflict.is_null()
            && (*(*query).onConflict).action == pg_sys::OnConflictAction::ONCONFLICT_UPDATE;
        let view_check =
            pgrx::PgList::<pg_sys::WithCheckOption>::from_pg((*query).withCheckOptions)
                .iter_ptr()
                .any(|option| (*option).kind == pg_sys::WCOKind::WCO_VIEW_CHECK);
        let checks_tested = matches!(command, CMD_INSERT | CMD_UPDATE | CMD_MERGE)
            && !(conflict_update && view_check);
        if !(*query).withCheckOptions.is_null() && !checks_tested {
            if let Some(oid) = distributed_rte(query, target) {
                return Some(oid);
            }
        }
        // A MERGE's shards apply its target's; its source, read by the coordinator with
        // SQL of its own, gets its own (`merge_plan.rs`).
        if command == CMD_MERGE {
            return None;
        }
        let applied = match in_update_or_delete && !in_merge {
            true => security_quals::filtered_by_where(query),
            false => Vec::new(),
        };
        // Inside UPDATE, DELETE and MERGE every table counts: a local one is read there too.
        let any_table = in_update_or_delete || in_merge;
        pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable)
            .iter_ptr()
            .enumerate()
            .find(|(i, rte)| {
                (**rte).rtekind == pg_sys::RTEKind::RTE_RELATION
                    && !(**rte).securityQuals.is_null()
                    && (any_table || cache::lookup((**rte).relid).is_some())
                    && !applied.contains(&(*i as i32 + 1))
            })
            .map(|(_, rte)| (*rte).relid)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_node(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: node is a valid parse node (walker contract); context is the Check we passed.
    unsafe {
        let check = &mut *context.cast::<Check>();
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => {
                let query = node.cast::<pg_sys::Query>();
                // UPDATE, DELETE and MERGE go to the workers as text, subqueries included;
                // INSERT keeps PostgreSQL's plan of its rows.
                let distributed_write = writes_distributed_table(query);
                let merge = distributed_write && (*query).commandType == pg_sys::CmdType::CMD_MERGE;
                let writes = distributed_write
                    && matches!(
                        (*query).commandType,
                        pg_sys::CmdType::CMD_UPDATE | pg_sys::CmdType::CMD_DELETE
                    );
                check.in_distributed_write += usize::from(writes);
                check.in_distributed_merge += usize::from(merge);
                if distributed_write
                    || check.in_distributed_write > 0
                    || check.in_distributed_merge > 0
                {
                    let found = row_security_on_distributed_table(
                        query,
                        check.in_distributed_write > 0,
                        check.in_distributed_merge > 0,
                    );
                    if let Some(oid) = found {
                        check.found = Some(PlannerError::RowSecurity(relation_name(oid)));
                        return true;
                    }
                }
                // A read samples each shard alike (`scan_path::sample_clause`); a write would
                // have to ship the clause in its statement.
                let reads_only = (*query).commandType == pg_sys::CmdType::CMD_SELECT
                    && check.in_distributed_write == 0
                    && check.in_distributed_merge == 0
                    && !distributed_write;
                let sampled = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable)
                    .iter_ptr()
                    .find(|rte| {
                        let sample = (**rte).tablesample;
                        !sample.is_null()
                            && cache::lookup((**rte).relid).is_some()
                            && !(reads_only && scan_path::samples_on_shards(sample))
                    });
                if let Some(rte) = sampled {
                    check.found = Some(PlannerError::TableSample(relation_name((*rte).relid)));
                    return true;
                }
                for mark in
                    pgrx::PgList::<pg_sys::RowMarkClause>::from_pg((*query).rowMarks).iter_ptr()
                {
                    if let Some(oid) = distributed_rte(query, (*mark).rti as i32) {
                        check.found = Some(PlannerError::RowLocks(relation_name(oid)));
                        return true;
                    }
                }
                check.levels.push(query);
                let found = pg_sys::query_tree_walker(query, Some(check_node), context, 0);
                check.in_distributed_write -= usize::from(writes);
                check.in_distributed_merge -= usize::from(merge);
                check.levels.pop();
                found
            }
            pg_sys::NodeTag::T_Var if (*node.cast::<pg_sys::Var>()).varattno < 0 => {
                let var = node.cast::<pg_sys::Var>();
                let level = check
                    .levels
                    .len()
                    .checked_sub(1 + (*var).varlevelsup as usize);
                let table = level.and_then(|l| distributed_rte(check.levels[l], (*var).varno));
                if let Some(oid) = table {
                    let name = pg_sys::get_attname(oid, (*var).varattno, false);
                    check.found = Some(PlannerError::SystemColumn(
                        relation_name(oid),
                        std::ffi::CStr::from_ptr(name)
                            .to_string_lossy()
                            .into_owned(),
                    ));
                    return true;
                }
                false
            }
            _ => pg_sys::expression_tree_walker(node, Some(check_node), context),
        }
    }
}
