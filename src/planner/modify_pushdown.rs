//! UPDATE and DELETE that read other tables — `FROM` / `USING`, subqueries in `SET` or
//! `WHERE` — run as whole statements, shard by shard.
//!
//! That is exact when every distributed table the statement reads is co-located with the
//! target and tied to the target's distribution column by equalities (then the rows a target
//! row can meet all live in shards of the same index), and every other table is a reference
//! table, complete on every node. A subquery that combines rows (aggregates, DISTINCT, LIMIT,
//! window functions, set operations) must be pinned to one distribution value: correlated by
//! an equality with the outer distribution column, or grouped by its own distribution column
//! (without LIMIT). A distributed table that is not co-located with the target, or a
//! co-located one not tied to the target's distribution column, is broadcast:
//! read first and written into every shard's statement as `unnest(<one array per column>)`,
//! so that, like a reference table, it is complete wherever the statement runs (up to
//! `BROADCAST_MAX_ROWS` rows) — or, when one of its columns is tied to the target's
//! distribution column, each shard's statement gets only the rows whose value hashes to that
//! shard (repartitioned, any size). Everything else is refused with 0A000 and the reason.
//!
//! The statement is written back as SQL by PostgreSQL's own deparser (`pg_get_querydef`)
//! under an empty search_path, so every name comes out schema-qualified; each distributed or
//! reference table gets a unique alias first, and the qualified table name in front of that
//! alias becomes the placeholder `$<RELATION_BASE + k>`, filled per shard by the executor.

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};

use pgrx::{pg_sys, PgList};

use crate::distribution::create::relation_name;
use crate::metadata::cache;
use crate::metadata::tables::{DistTable, Method};
use crate::planner::scan_path::{is_hash_equality, ScanPlan};
use crate::planner::shippable::{
    builtin_immutable, collation_ok, shippable, travels_in_array, BROADCAST_BASE, RELATION_BASE,
};
use crate::planner::PlannerError;
use crate::remote::quote::quote_identifier;

/// A statement to run once on every (pruned) shard of its target.
pub struct Pushdown {
    /// The statement; `$<RELATION_BASE + k>` stands for the shard of relation k.
    pub statement: String,
    /// Relation k of the statement, by k.
    pub relations: Vec<(u32, pg_sys::Oid)>,
    /// The alias the target goes by in the statement.
    pub target_alias: String,
    /// The tables broadcast into the statement (`ModifyPlan::broadcasts`).
    pub broadcasts: Vec<ScanPlan>,
    /// The columns of other tables that RETURNING uses (`ModifyPlan::returning_extra`).
    pub returning_extra: Vec<ExtraColumn>,
    /// Those columns as SQL in the shards' statement, `pgdist_t2.name, …` (empty: none).
    pub returning_extra_sql: String,
    /// With `lock_rows`: the statement as a SELECT that locks and returns the target's rows
    /// (`ModifyPlan::row_source`), and the columns its SET values are for.
    pub row_source: String,
    pub set_attnos: Vec<i16>,
}

/// A column of another table that RETURNING uses: the shards return it after the target's
/// columns. Range-table index and attribute number in the statement, type and typmod.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExtraColumn {
    pub rti: i32,
    pub attno: i16,
    pub type_oid: pg_sys::Oid,
    pub typmod: i32,
}

/// The most rows (by the table's row estimate) a table may have to be broadcast into every
/// shard's statement; a larger one that is not co-located is refused.
const BROADCAST_MAX_ROWS: f64 = 100_000.0;

/// A table written into the statement as arrays of its rows: its alias number, the table, the
/// columns the statement reads, where it stands (query address, range-table index), and the
/// column tied to the target's distribution column, if any: then each shard's statement gets
/// only the rows whose value hashes to that shard (repartitioned).
struct Broadcast {
    k: u32,
    relid: pg_sys::Oid,
    columns: Vec<i16>,
    entry: (usize, i32),
    partition_by: Option<i16>,
    /// Instead of a table, the RETURNING rows of a data-modifying WITH query of the statement
    /// (`relid` invalid, `columns` its column numbers).
    cte: Option<WithRows>,
}

/// A data-modifying WITH query whose RETURNING rows a statement reads: they are read first
/// (which runs it) and travel with every shard's statement.
#[derive(Clone)]
struct WithRows {
    name: String,
    /// Column names and types.
    columns: Vec<(String, pg_sys::Oid)>,
}

/// A column of one range-table entry of one query level: (query address, rti, attno).
type Key = (usize, i32, i16);

/// What one query level (the statement or a subquery) looks like after the walk.
struct Level {
    query: *mut pg_sys::Query,
    /// The entries of `Walk::hash_columns` for the distributed tables it reads, itself or in
    /// its subqueries.
    hash_reads: std::ops::Range<usize>,
    /// Equalities of its own columns with columns of outer levels (local side).
    correlated: Vec<Key>,
}

struct Walk {
    top: *mut pg_sys::Query,
    target: pg_sys::Oid,
    target_method: Method,
    colocation_id: i32,
    target_key: Key,
    family: pg_sys::Oid,
    levels: Vec<*mut pg_sys::Query>,
    finished: Vec<Level>,
    /// Union-find over columns known equal.
    parent: HashMap<Key, Key>,
    /// The distribution column of every co-located table read.
    hash_columns: Vec<(Key, pg_sys::Oid)>,
    /// Those of `hash_columns` whose table is broadcast after all (not tied to the target's
    /// distribution column).
    broadcast_keys: Vec<Key>,
    relations: Vec<(u32, pg_sys::Oid)>,
    broadcasts: Vec<Broadcast>,
    target_alias: String,
    /// Inside a WITH query (evaluated once for the whole statement).
    in_cte: usize,
    /// The statement's data-modifying WITH queries (their rows may be read).
    with_writes: Vec<*mut pg_sys::CommonTableExpr>,
    problem: Option<String>,
}

/// The statement `parse` (an UPDATE or DELETE of `table` reading other relations) as SQL for
/// every shard, or why it cannot run on the workers.
pub unsafe fn plan(
    parse: *mut pg_sys::Query,
    table: &DistTable,
    lock_rows: bool,
) -> Result<Pushdown, PlannerError> {
    let refuse = |reason: String| PlannerError::ModifyNotPushable(relation_name(table.oid), reason);
    if !matches!(table.method, Method::Hash | Method::Reference) {
        return Err(refuse("it is range-distributed".into()));
    }
    // SAFETY: `parse` is a private copy of the analysed statement (see modify_plan); the walk
    // reads it and sets aliases on its range-table entries; catalog lookups by oid.
    unsafe {
        let result_rti = (*parse).resultRelation;
        let dist_attno = table.distribution_attno().unwrap_or(0);
        let family = if dist_attno > 0 {
            crate::distribution::hashing::hash_family(pg_sys::get_atttype(table.oid, dist_attno))
                .unwrap_or(pg_sys::InvalidOid)
        } else {
            pg_sys::InvalidOid
        };
        order_multiple_assignments(parse).map_err(refuse)?;
        let returning_extra = returning_extra(parse, result_rti).map_err(refuse)?;
        (*parse).returningList = returning_list(&returning_extra);
        let mut walk = Walk {
            top: parse,
            target: table.oid,
            target_method: table.method,
            colocation_id: table.colocation_id,
            target_key: (parse as usize, result_rti, dist_attno),
            family,
            levels: Vec::new(),
            finished: Vec::new(),
            parent: HashMap::new(),
            hash_columns: Vec::new(),
            broadcast_keys: Vec::new(),
            relations: Vec::new(),
            broadcasts: Vec::new(),
            target_alias: String::new(),
            in_cte: 0,
            with_writes: Vec::new(),
            problem: None,
        };
        walk.visit_query(parse);
        if let Some(problem) = walk.problem.take() {
            return Err(refuse(problem));
        }
        walk.broadcast_unpinned_tables();
        walk.check_pinned().map_err(refuse)?;
        walk.partition_broadcasts();
        if let Some(problem) = walk.problem.take() {
            return Err(refuse(problem));
        }
        let mut statement = deparse(parse, &walk.relations, &walk.broadcasts).map_err(refuse)?;
        let mut returning_extra_sql = String::new();
        if !returning_extra.is_empty() {
            // RETURNING comes last, and lists only columns.
            let at = statement.rfind(" RETURNING ").ok_or_else(|| {
                refuse("pgdist could not write its RETURNING list for the shards".into())
            })?;
            returning_extra_sql = statement.split_off(at)[" RETURNING ".len()..].to_string();
        }
        let (mut row_source, mut set_attnos) = (String::new(), Vec::new());
        if lock_rows {
            set_attnos = into_locking_select(parse, table.oid, &returning_extra)
                .map_err(|what| PlannerError::Triggers(relation_name(table.oid), what.into()))?;
            row_source = deparse(parse, &walk.relations, &walk.broadcasts).map_err(refuse)?;
        }
        let broadcasts = walk
            .broadcasts
            .iter()
            .map(|b| broadcast_read(b, table.oid))
            .collect();
        Ok(Pushdown {
            statement,
            relations: walk.relations,
            target_alias: walk.target_alias,
            broadcasts,
            returning_extra,
            returning_extra_sql,
            row_source,
            set_attnos,
        })
    }
}

/// Turns UPDATE or DELETE `parse` of `relid` into the SELECT that locks and returns the rows it
/// would change, for the row-by-row write (`executor/row_by_row.rs`): `SELECT <row tag>,
/// target.ctid, target.tableoid, <target's columns>, <SET values> FROM <target and the statement's other
/// tables> WHERE … FOR [NO KEY] UPDATE OF target`, followed by the other tables' columns
/// that RETURNING reads (`extra`). Returns the columns of the SET values.
unsafe fn into_locking_select(
    parse: *mut pg_sys::Query,
    relid: pg_sys::Oid,
    extra: &[ExtraColumn],
) -> Result<Vec<i16>, &'static str> {
    // SAFETY: parse is our private copy; the new nodes are made in the planner's memory.
    unsafe {
        let rti = (*parse).resultRelation;
        let update = (*parse).commandType == pg_sys::CmdType::CMD_UPDATE;
        let mut targets = PgList::<pg_sys::TargetEntry>::new();
        let mut add = |expr: *mut pg_sys::Expr| {
            let resno = targets.len() as i16 + 1;
            let name = CString::new(format!("c{resno}")).unwrap_or_default();
            let entry = pg_sys::makeTargetEntry(expr, resno, pg_sys::pstrdup(name.as_ptr()), false);
            targets.push(entry);
        };
        let tag = pg_sys::makeConst(
            pg_sys::TEXTOID,
            -1,
            pg_sys::DEFAULT_COLLATION_OID,
            -1,
            pg_sys::Datum::from(pg_sys::cstring_to_text(ROW_TAG_VALUE.as_ptr())),
            false,
            false,
        );
        add(tag.cast());
        let ctid = pg_sys::SelfItemPointerAttributeNumber as i16;
        add(pg_sys::makeVar(rti, ctid, pg_sys::TIDOID, -1, pg_sys::InvalidOid, 0).cast());
        let tableoid = pg_sys::TableOidAttributeNumber as i16;
        add(pg_sys::makeVar(rti, tableoid, pg_sys::OIDOID, -1, pg_sys::InvalidOid, 0).cast());
        let relation = pg_sys::RelationIdGetRelation(relid);
        let tupdesc = (*relation).rd_att;
        for i in 0..(*tupdesc).natts as usize {
            let a = &*(*tupdesc).attrs.as_ptr().add(i);
            if !a.attisdropped {
                add(
                    pg_sys::makeVar(rti, a.attnum, a.atttypid, a.atttypmod, a.attcollation, 0)
                        .cast(),
                );
            }
        }
        pg_sys::RelationClose(relation);
        let mut set_attnos = Vec::new();
        if update {
            for entry in PgList::<pg_sys::TargetEntry>::from_pg((*parse).targetList).iter_ptr() {
                if (*entry).resjunk {
                    return Err("an UPDATE that sets several columns from one subquery");
                }
                set_attnos.push((*entry).resno);
                add((*entry).expr);
            }
        }
        for column in extra {
            let collation = pg_sys::get_typcollation(column.type_oid);
            add(pg_sys::makeVar(
                column.rti,
                column.attno,
                column.type_oid,
                column.typmod,
                collation,
                0,
            )
            .cast());
        }
        let lock = pg_sys::palloc0(std::mem::size_of::<pg_sys::RowMarkClause>())
            .cast::<pg_sys::RowMarkClause>();
        (*lock).type_ = pg_sys::NodeTag::T_RowMarkClause;
        (*lock).rti = rti as u32;
        (*lock).strength = match update {
            true => pg_sys::LockClauseStrength::LCS_FORNOKEYUPDATE,
            false => pg_sys::LockClauseStrength::LCS_FORUPDATE,
        };
        (*lock).waitPolicy = pg_sys::LockWaitPolicy::LockWaitBlock;
        let target = pg_sys::list_nth((*parse).rtable, rti - 1).cast::<pg_sys::RangeTblEntry>();
        (*target).inFromCl = true;
        (*parse).commandType = pg_sys::CmdType::CMD_SELECT;
        (*parse).resultRelation = 0;
        (*parse).targetList = targets.into_pg();
        (*parse).returningList = std::ptr::null_mut();
        (*parse).rowMarks = pg_sys::lappend(std::ptr::null_mut(), lock.cast());
        (*parse).hasForUpdate = true;
        Ok(set_attnos)
    }
}

/// The value of the first column of a row-by-row write's locking SELECT, which the executor
/// replaces by where each placement's rows are (`executor/row_by_row.rs`), and how it reads in
/// the deparsed SELECT.
pub const ROW_TAG_VALUE: &CStr = c"pgdist row tag";
pub const ROW_TAG_SQL: &str = "'pgdist row tag'::text";

/// The scan that reads `columns` of table `relid` first and computes, on the workers, the index
/// of the `target` shard each row belongs to by its column `partition_by` (MERGE's source).
/// Rows whose key is NULL go to the first shard (a MERGE may still insert them, and must fail
/// there as PostgreSQL would), not nowhere.
pub(crate) fn repartitioned_read(
    relid: pg_sys::Oid,
    columns: Vec<i16>,
    partition_by: i16,
    target: pg_sys::Oid,
) -> ScanPlan {
    let b = Broadcast {
        k: 0,
        relid,
        columns,
        entry: (0, 0),
        partition_by: Some(partition_by),
        cte: None,
    };
    ScanPlan {
        select_sql: partitioned_select(&b, target, true),
        ..broadcast_read(&b, target)
    }
}

/// The scan that reads broadcast table `b` first; a repartitioned one also computes, on the
/// workers, the index of the `target` shard each row belongs to (its last column).
fn broadcast_read(b: &Broadcast, target: pg_sys::Oid) -> ScanPlan {
    if let Some(cte) = &b.cte {
        return ScanPlan {
            columns: b.columns.clone(),
            column_types: cte.columns.iter().map(|(_, ty)| *ty).collect(),
            with_query: cte.name.clone(),
            ..Default::default()
        };
    }
    ScanPlan {
        relid: b.relid,
        columns: b.columns.clone(),
        shard_ids: cache::shards(b.relid).iter().map(|(id, _)| *id).collect(),
        partitioned: b.partition_by.is_some(),
        select_sql: partitioned_select(b, target, false),
        ..Default::default()
    }
}

/// The select list of a repartitioned read: the columns, then the target shard index of the
/// row (NULL for a NULL key, or 0 with `null_keys_to_first`); empty when not repartitioned.
fn partitioned_select(b: &Broadcast, target: pg_sys::Oid, null_keys_to_first: bool) -> String {
    let name = |attno: i16| {
        // SAFETY: a catalog lookup of a column the statement reads.
        let name = unsafe { CStr::from_ptr(pg_sys::get_attname(b.relid, attno, false)) };
        quote_identifier(&name.to_string_lossy())
    };
    b.partition_by.map_or_else(String::new, |attno| {
        let names: Vec<String> = b.columns.iter().map(|a| name(*a)).collect();
        let shard_count = cache::shards(target).len() as i32;
        let index = crate::distribution::hashing::hash_index_sql(&name(attno), shard_count);
        match null_keys_to_first {
            true => format!("{}, coalesce({index}, 0)", names.join(", ")),
            false => format!("{}, {index}", names.join(", ")),
        }
    })
}

/// Puts the SET entries of `UPDATE … SET (a, b) = (SELECT …)` in the order ruleutils writes
/// them back in: each group together, in the order of its subquery's columns, the groups in
/// the order of their subqueries (the junk entries at the end), after the other entries. The
/// rewriter sorted the entries by column number, which would pair columns and values wrongly.
/// Why not, when a value is more than the subquery's column (with an implicit cast).
unsafe fn order_multiple_assignments(parse: *mut pg_sys::Query) -> Result<(), String> {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn find(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
        if node.is_null() {
            return false;
        }
        // SAFETY: node is an expression of a SET entry; context is the Option we passed.
        unsafe {
            if (*node).type_ == pg_sys::NodeTag::T_Param
                && (*node.cast::<pg_sys::Param>()).paramkind == pg_sys::ParamKind::PARAM_MULTIEXPR
            {
                *context.cast::<Option<*mut pg_sys::Param>>() = Some(node.cast());
                return true;
            }
            pg_sys::expression_tree_walker(node, Some(find), context)
        }
    }
    // SAFETY: parse is a private copy; only the order of its target list changes.
    unsafe {
        let entries = PgList::<pg_sys::TargetEntry>::from_pg((*parse).targetList);
        let mut keyed = Vec::new();
        for (position, entry) in entries.iter_ptr().enumerate() {
            let expr = (*entry).expr.cast::<pg_sys::Node>();
            let mut param: Option<*mut pg_sys::Param> = None;
            find(expr, (&raw mut param).cast());
            let key = match param {
                _ if (*entry).resjunk => (2, position as i32),
                // paramid is (subLinkId << 16) | column.
                Some(param) if pg_sys::strip_implicit_coercions(expr) == param.cast() => {
                    (1, (*param).paramid)
                }
                Some(_) => {
                    return Err(
                        "it sets a field or element from a subquery of several columns".into(),
                    )
                }
                None => (0, position as i32),
            };
            keyed.push((key, entry));
        }
        keyed.sort_by_key(|(key, _)| *key);
        let mut ordered = PgList::<pg_sys::TargetEntry>::new();
        for (_, entry) in keyed {
            ordered.push(entry);
        }
        (*parse).targetList = ordered.into_pg();
        Ok(())
    }
}

/// The columns of other tables that RETURNING uses, in order of first use (the coordinator
/// computes RETURNING from the target's rows and these); why not when it uses more than
/// columns of this statement's tables.
unsafe fn returning_extra(
    parse: *mut pg_sys::Query,
    result_rti: i32,
) -> Result<Vec<ExtraColumn>, String> {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
        if node.is_null() {
            return false;
        }
        // SAFETY: node is an expression of the RETURNING list; context is the Collect.
        unsafe {
            let collect = &mut *context.cast::<Collect>();
            if (*node).type_ == pg_sys::NodeTag::T_Var {
                let var = node.cast::<pg_sys::Var>();
                if (*var).varlevelsup == 0 && (*var).varno != collect.result_rti {
                    if (*var).varattno <= 0 {
                        collect.problem = true;
                        return true;
                    }
                    let column = ExtraColumn {
                        rti: (*var).varno,
                        attno: (*var).varattno,
                        type_oid: (*var).vartype,
                        typmod: (*var).vartypmod,
                    };
                    if !collect.columns.contains(&column) {
                        collect.columns.push(column);
                    }
                }
                return false;
            }
            pg_sys::expression_tree_walker(node, Some(walk), context)
        }
    }
    struct Collect {
        result_rti: i32,
        columns: Vec<ExtraColumn>,
        problem: bool,
    }
    let mut collect = Collect {
        result_rti,
        columns: Vec::new(),
        problem: false,
    };
    // SAFETY: the RETURNING list of a valid statement.
    unsafe { walk((*parse).returningList.cast(), (&raw mut collect).cast()) };
    if collect.problem {
        return Err("RETURNING uses a whole row or a system column of another table".into());
    }
    Ok(collect.columns)
}

/// A RETURNING list of `columns` (as Vars), for the shards' statement.
unsafe fn returning_list(columns: &[ExtraColumn]) -> *mut pg_sys::List {
    let mut list = PgList::<pg_sys::TargetEntry>::new();
    // SAFETY: builds new nodes in the planner's memory.
    unsafe {
        for (resno, column) in (1..).zip(columns) {
            let var = pg_sys::makeVar(
                column.rti,
                column.attno,
                column.type_oid,
                column.typmod,
                pg_sys::get_typcollation(column.type_oid),
                0,
            );
            list.push(pg_sys::makeTargetEntry(
                var.cast(),
                resno,
                std::ptr::null_mut(),
                false,
            ));
        }
    }
    list.into_pg()
}

impl Walk {
    fn fail(&mut self, problem: String) {
        self.problem.get_or_insert(problem);
    }

    fn find(&self, mut key: Key) -> Key {
        while let Some(next) = self.parent.get(&key) {
            if *next == key {
                break;
            }
            key = *next;
        }
        key
    }

    fn union(&mut self, a: Key, b: Key) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.parent.insert(a, b);
        }
    }

    fn pinned(&self, key: Key) -> bool {
        self.find(key) == self.find(self.target_key)
    }

    /// The column a Var of the current level stands for, through join aliases.
    unsafe fn key_of(&self, var: *mut pg_sys::Var) -> Option<Key> {
        // SAFETY: var belongs to the level `varlevelsup` above the current one.
        unsafe {
            let depth = self
                .levels
                .len()
                .checked_sub(1 + (*var).varlevelsup as usize)?;
            key_in(self.levels[depth], var)
        }
    }

    unsafe fn visit_query(&mut self, query: *mut pg_sys::Query) {
        // SAFETY: query is a valid (sub)query of the statement.
        unsafe {
            self.levels.push(query);
            let hash_before = self.hash_columns.len();
            let mut correlated = Vec::new();
            let ctes = PgList::<pg_sys::CommonTableExpr>::from_pg((*query).cteList);
            // Writes of their own (`with_writes.rs`); the statement may read their rows.
            self.with_writes.extend(ctes.iter_ptr().filter(|cte| {
                (*(**cte).ctequery.cast::<pg_sys::Query>()).commandType
                    != pg_sys::CmdType::CMD_SELECT
            }));
            let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable);
            for (i, rte) in rtable.iter_ptr().enumerate() {
                let rti = i as i32 + 1;
                match (*rte).rtekind {
                    pg_sys::RTEKind::RTE_RELATION => self.relation(query, rti, rte),
                    pg_sys::RTEKind::RTE_SUBQUERY => {
                        let sub = (*rte).subquery;
                        self.visit_query(sub);
                        for entry in
                            PgList::<pg_sys::TargetEntry>::from_pg((*sub).targetList).iter_ptr()
                        {
                            let expr = strip((*entry).expr.cast());
                            if (*expr).type_ == pg_sys::NodeTag::T_Var
                                && (*expr.cast::<pg_sys::Var>()).varlevelsup == 0
                            {
                                if let Some(inner) = key_in(sub, expr.cast()) {
                                    self.union((query as usize, rti, (*entry).resno), inner);
                                }
                            }
                        }
                    }
                    pg_sys::RTEKind::RTE_CTE => self.with_query_rows(rte),
                    pg_sys::RTEKind::RTE_JOIN
                    | pg_sys::RTEKind::RTE_FUNCTION
                    | pg_sys::RTEKind::RTE_VALUES
                    | pg_sys::RTEKind::RTE_RESULT => {}
                    _ => self.fail("it reads a kind of relation pgdist cannot ship".into()),
                }
            }
            for cte in ctes.iter_ptr() {
                let body = (*cte).ctequery.cast::<pg_sys::Query>();
                if (*body).commandType != pg_sys::CmdType::CMD_SELECT {
                    continue;
                }
                self.in_cte += 1;
                self.visit_query((*cte).ctequery.cast());
                self.in_cte -= 1;
            }
            self.jointree_equalities((*query).jointree.cast(), &mut correlated);
            pg_sys::query_tree_walker(
                query,
                Some(walk_node),
                (self as *mut Walk).cast(),
                (pg_sys::QTW_IGNORE_RT_SUBQUERIES
                    | pg_sys::QTW_IGNORE_CTE_SUBQUERIES
                    | pg_sys::QTW_IGNORE_JOINALIASES) as i32,
            );
            self.levels.pop();
            self.finished.push(Level {
                query,
                hash_reads: hash_before..self.hash_columns.len(),
                correlated,
            });
        }
    }

    unsafe fn relation(
        &mut self,
        query: *mut pg_sys::Query,
        rti: i32,
        rte: *mut pg_sys::RangeTblEntry,
    ) {
        // SAFETY: rte is a relation entry of `query`.
        unsafe {
            let relid = (*rte).relid;
            let Some(table) = cache::lookup(relid) else {
                self.local_table(query, rti, rte);
                return;
            };
            match table.method {
                Method::Reference => {}
                Method::Hash
                    if self.target_method == Method::Hash
                        && table.colocation_id == self.colocation_id =>
                {
                    if self.in_cte > 0 {
                        self.fail(format!(
                            "a WITH query reads distributed table {}",
                            relation_name(relid)
                        ));
                        return;
                    }
                    let attno = table.distribution_attno().unwrap_or(0);
                    self.hash_columns
                        .push(((query as usize, rti, attno), relid));
                }
                Method::Hash => {
                    let target = relation_name(self.target);
                    self.broadcast(
                        query,
                        rti,
                        rte,
                        broadcast_columns(query, rti, relid),
                        |why| {
                            format!(
                                "{} is not co-located with {target} and {why}",
                                relation_name(relid)
                            )
                        },
                    );
                    return;
                }
                Method::Range => {
                    self.fail(format!(
                        "{} is not co-located with {}",
                        relation_name(relid),
                        relation_name(self.target)
                    ));
                    return;
                }
            }
            let k = (self.relations.len() + self.broadcasts.len()) as u32;
            if query == self.top && rti == (*query).resultRelation {
                self.target_alias = format!("pgdist_t{k}");
            }
            set_alias(rte, k);
            self.relations.push((k, relid));
        }
    }

    /// A table of the coordinator itself (a staging or temporary table, say) is broadcast
    /// like a table that is not co-located: the coordinator reads it, in the statement's
    /// snapshot, when the write starts.
    unsafe fn local_table(
        &mut self,
        query: *mut pg_sys::Query,
        rti: i32,
        rte: *mut pg_sys::RangeTblEntry,
    ) {
        // SAFETY: rte is a relation entry of `query`; catalog lookups by oid.
        unsafe {
            let relid = (*rte).relid;
            let readable = matches!(
                (*rte).relkind as u8,
                pg_sys::RELKIND_RELATION
                    | pg_sys::RELKIND_PARTITIONED_TABLE
                    | pg_sys::RELKIND_MATVIEW
                    | pg_sys::RELKIND_FOREIGN_TABLE
            );
            let columns = match broadcast_columns(query, rti, relid) {
                // `ONLY parent` of a table with children: the read would include them.
                _ if !readable || (!(*rte).inh && has_children(relid)) => {
                    Err("pgdist cannot read it for the shards".into())
                }
                result => result,
            };
            self.broadcast(query, rti, rte, columns, |why| {
                format!(
                    "{} is a local table of the coordinator and {why}",
                    relation_name(relid)
                )
            });
        }
    }

    /// Entry `rte` names a WITH query: the rows of a data-modifying one travel with every
    /// shard's statement (plain ones were inlined, or are read on the shards as written).
    unsafe fn with_query_rows(&mut self, rte: *mut pg_sys::RangeTblEntry) {
        // SAFETY: rte is a WITH query entry of the statement; the WITH queries found so far
        // belong to the statement too.
        unsafe {
            // Only the statement's own WITH list has data-modifying queries: the entry must
            // name one there, not a query of its own level that has the same name.
            let depth = self.levels.len().saturating_sub(1);
            if (*rte).ctelevelsup as usize != depth {
                return;
            }
            let name = CStr::from_ptr((*rte).ctename);
            let Some(&cte) = self
                .with_writes
                .iter()
                .find(|cte| CStr::from_ptr((***cte).ctename) == name)
            else {
                return;
            };
            if self.in_cte > 0 {
                self.fail("a WITH query reads the rows of a data-modifying WITH query".into());
                return;
            }
            let names = PgList::<pg_sys::String>::from_pg((*cte).ctecolnames);
            let mut columns = Vec::new();
            let mut travel = true;
            for (name, i) in names.iter_ptr().zip(0..) {
                let type_oid = pg_sys::list_nth_oid((*cte).ctecoltypes, i);
                let collation = pg_sys::list_nth_oid((*cte).ctecolcollations, i);
                travel &= travels_in_array(type_oid, collation);
                columns.push((
                    CStr::from_ptr((*name).sval).to_string_lossy().into_owned(),
                    type_oid,
                ));
            }
            if !travel {
                self.fail(format!(
                    "a column of the rows of WITH query {} cannot travel in an array",
                    name.to_string_lossy()
                ));
                return;
            }
            let k = (self.relations.len() + self.broadcasts.len()) as u32;
            self.broadcasts.push(Broadcast {
                k,
                relid: pg_sys::InvalidOid,
                columns: (1..=columns.len() as i16).collect(),
                entry: (0, 0),
                partition_by: None,
                cte: Some(WithRows {
                    name: name.to_string_lossy().into_owned(),
                    columns,
                }),
            });
            set_alias(rte, k);
        }
    }

    /// Broadcasts the table of entry `rti` of `query` with the `columns` the statement reads,
    /// or fails with `refusal(why)`.
    unsafe fn broadcast(
        &mut self,
        query: *mut pg_sys::Query,
        rti: i32,
        rte: *mut pg_sys::RangeTblEntry,
        columns: Result<Vec<i16>, String>,
        refusal: impl FnOnce(String) -> String,
    ) {
        let k = (self.relations.len() + self.broadcasts.len()) as u32;
        match columns {
            Ok(columns) => self.broadcasts.push(Broadcast {
                k,
                // SAFETY: rte is a relation entry of `query`.
                relid: unsafe { (*rte).relid },
                columns,
                entry: (query as usize, rti),
                partition_by: None,
                cte: None,
            }),
            Err(why) => self.fail(refusal(why)),
        }
        // SAFETY: as above.
        unsafe { set_alias(rte, k) };
    }

    /// Equalities among the AND-ed conditions of WHERE and of inner joins' ON.
    unsafe fn jointree_equalities(&mut self, node: *mut pg_sys::Node, correlated: &mut Vec<Key>) {
        if node.is_null() {
            return;
        }
        // SAFETY: node is part of the current level's join tree.
        unsafe {
            match (*node).type_ {
                pg_sys::NodeTag::T_FromExpr => {
                    let from = node.cast::<pg_sys::FromExpr>();
                    for item in PgList::<pg_sys::Node>::from_pg((*from).fromlist).iter_ptr() {
                        self.jointree_equalities(item, correlated);
                    }
                    self.equalities((*from).quals, correlated);
                }
                pg_sys::NodeTag::T_JoinExpr => {
                    let join = node.cast::<pg_sys::JoinExpr>();
                    self.jointree_equalities((*join).larg, correlated);
                    self.jointree_equalities((*join).rarg, correlated);
                    if (*join).jointype == pg_sys::JoinType::JOIN_INNER {
                        self.equalities((*join).quals, correlated);
                    }
                }
                _ => {}
            }
        }
    }

    /// Records `a = b` of two columns for every such conjunct of `quals`.
    unsafe fn equalities(&mut self, quals: *mut pg_sys::Node, correlated: &mut Vec<Key>) {
        // SAFETY: quals is an expression of the current level.
        unsafe {
            for conjunct in conjuncts(quals) {
                let Some((a, b)) = self.column_equality(conjunct) else {
                    continue;
                };
                let (Some(ka), Some(kb)) = (self.key_of(a), self.key_of(b)) else {
                    continue;
                };
                self.union(ka, kb);
                match ((*a).varlevelsup == 0, (*b).varlevelsup == 0) {
                    (true, false) => correlated.push(ka),
                    (false, true) => correlated.push(kb),
                    _ => {}
                }
            }
        }
    }

    /// `column = column` with an equality of the distribution column's hash family.
    unsafe fn column_equality(
        &self,
        node: *mut pg_sys::Node,
    ) -> Option<(*mut pg_sys::Var, *mut pg_sys::Var)> {
        // SAFETY: node is a valid expression; casts follow tags.
        unsafe {
            if (*node).type_ != pg_sys::NodeTag::T_OpExpr || self.family == pg_sys::InvalidOid {
                return None;
            }
            let op = node.cast::<pg_sys::OpExpr>();
            let args = PgList::<pg_sys::Node>::from_pg((*op).args);
            if args.len() != 2 || !is_hash_equality((*op).opno, self.family) {
                return None;
            }
            let (a, b) = (strip(args.get_ptr(0)?), strip(args.get_ptr(1)?));
            let is_var = |n: *mut pg_sys::Node| (*n).type_ == pg_sys::NodeTag::T_Var;
            (is_var(a) && is_var(b)).then(|| (a.cast(), b.cast()))
        }
    }

    /// `x IN (SELECT y …)`: x and y are equal for every row the subquery contributes.
    unsafe fn sublink_equalities(&mut self, sublink: *mut pg_sys::SubLink) {
        // SAFETY: a SubLink of the current level; its Params point at the subquery's output.
        unsafe {
            if (*sublink).subLinkType != pg_sys::SubLinkType::ANY_SUBLINK
                || self.family == pg_sys::InvalidOid
            {
                return;
            }
            let sub = (*sublink).subselect.cast::<pg_sys::Query>();
            for conjunct in conjuncts((*sublink).testexpr) {
                if (*conjunct).type_ != pg_sys::NodeTag::T_OpExpr {
                    continue;
                }
                let op = conjunct.cast::<pg_sys::OpExpr>();
                let args = PgList::<pg_sys::Node>::from_pg((*op).args);
                if args.len() != 2 || !is_hash_equality((*op).opno, self.family) {
                    continue;
                }
                let (Some(outer), Some(param)) = (args.get_ptr(0), args.get_ptr(1)) else {
                    continue;
                };
                let (outer, param) = (strip(outer), strip(param));
                if (*outer).type_ != pg_sys::NodeTag::T_Var
                    || (*param).type_ != pg_sys::NodeTag::T_Param
                {
                    continue;
                }
                let position = (*param.cast::<pg_sys::Param>()).paramid;
                let entry =
                    pg_sys::list_nth((*sub).targetList, position - 1).cast::<pg_sys::TargetEntry>();
                let inner = strip((*entry).expr.cast());
                if (*inner).type_ != pg_sys::NodeTag::T_Var
                    || (*inner.cast::<pg_sys::Var>()).varlevelsup != 0
                {
                    continue;
                }
                if let (Some(a), Some(b)) = (self.key_of(outer.cast()), key_in(sub, inner.cast())) {
                    self.union(a, b);
                }
            }
        }
    }

    /// Co-located tables that are not tied to the target's distribution column are read
    /// first and written into every shard's statement, like tables of other co-location groups
    /// (when they can be: see `broadcast_columns`); the entry keeps its alias.
    unsafe fn broadcast_unpinned_tables(&mut self) {
        let unpinned: Vec<(Key, pg_sys::Oid)> = self
            .hash_columns
            .iter()
            .filter(|(key, _)| !self.pinned(*key))
            .copied()
            .collect();
        for (key @ (query, rti, _), relid) in unpinned {
            // SAFETY: the key names a relation entry of one of the statement's queries, which
            // the walk named `pgdist_t<k>`.
            unsafe {
                let query = query as *mut pg_sys::Query;
                let Ok(columns) = broadcast_columns(query, rti, relid) else {
                    continue;
                };
                let rte =
                    pg_sys::list_nth((*query).rtable, rti - 1).cast::<pg_sys::RangeTblEntry>();
                let alias = CStr::from_ptr((*(*rte).alias).aliasname).to_string_lossy();
                let Some(k) = alias.strip_prefix("pgdist_t").and_then(|k| k.parse().ok()) else {
                    continue;
                };
                self.relations.retain(|(known, _)| *known != k);
                self.broadcasts.push(Broadcast {
                    k,
                    relid,
                    columns,
                    entry: (query as usize, rti),
                    partition_by: None,
                    cte: None,
                });
                self.broadcast_keys.push(key);
            }
        }
    }

    /// Ties each broadcast table to the target's shards where it can (a column it reads is
    /// equal to the target's distribution column, of a type hashed alike), and refuses the
    /// ones that must travel whole but are too large.
    unsafe fn partition_broadcasts(&mut self) {
        for i in 0..self.broadcasts.len() {
            if self.broadcasts[i].cte.is_some() {
                continue; // read whole on the coordinator, sent whole
            }
            let (query, rti) = self.broadcasts[i].entry;
            let relid = self.broadcasts[i].relid;
            // SAFETY: catalog lookups of the table's columns.
            let tied = self.broadcasts[i].columns.iter().copied().find(|attno| {
                self.pinned((query, rti, *attno))
                    && crate::distribution::hashing::hash_family(unsafe {
                        pg_sys::get_atttype(relid, *attno)
                    }) == Some(self.family)
            });
            self.broadcasts[i].partition_by = tied;
            let rows = match cache::lookup(relid) {
                Some(table) => table.row_estimate,
                // SAFETY: a catalog lookup of a local table the statement reads.
                None => unsafe { local_row_estimate(relid) },
            };
            if let (None, Some(rows)) = (tied, rows.filter(|rows| *rows > BROADCAST_MAX_ROWS)) {
                self.fail(format!(
                    "{} has about {rows:.0} rows, too many to send with every shard's \
                     statement, and is not joined on the distribution column of {}",
                    relation_name(relid),
                    relation_name(self.target)
                ));
            }
        }
    }

    /// True when `level` reads shards of co-located tables (not broadcast ones).
    fn reads_shards(&self, level: &Level) -> bool {
        self.hash_columns[level.hash_reads.clone()]
            .iter()
            .any(|(key, _)| !self.broadcast_keys.contains(key))
    }

    /// Every co-located table (not broadcast) is tied to the target's distribution column,
    /// and every subquery that combines rows of shards sees the rows of one distribution value
    /// only.
    fn check_pinned(&self) -> Result<(), String> {
        for (key, relid) in &self.hash_columns {
            if !self.pinned(*key) && !self.broadcast_keys.contains(key) {
                return Err(format!(
                    "distributed table {} is not joined to {} on the distribution column",
                    relation_name(*relid),
                    relation_name(self.target)
                ));
            }
        }
        for level in &self.finished {
            if level.query == self.top || !self.reads_shards(level) {
                continue;
            }
            // SAFETY: the levels are the statement's own (sub)queries.
            let (combines, limited, group_ok) = unsafe {
                let q = level.query;
                let limited = !(*q).limitCount.is_null()
                    || !(*q).limitOffset.is_null()
                    || (*q).hasWindowFuncs
                    || !(*q).setOperations.is_null()
                    || !(*q).groupingSets.is_null()
                    || (*q).hasTargetSRFs
                    || (*q).hasDistinctOn;
                let combines = limited
                    || (*q).hasAggs
                    || !(*q).groupClause.is_null()
                    || !(*q).distinctClause.is_null();
                let keyed = |clauses: *mut pg_sys::List| {
                    clauses.is_null() || self.groups_by_key(q, clauses)
                };
                let group_ok = (!(*q).groupClause.is_null() || !(*q).distinctClause.is_null())
                    && keyed((*q).groupClause)
                    && keyed((*q).distinctClause);
                (combines, limited, group_ok)
            };
            let correlated = level.correlated.iter().any(|k| self.pinned(*k));
            if combines && !correlated && (limited || !group_ok) {
                return Err("a subquery combines rows of several distribution values \
                            (aggregate, DISTINCT, LIMIT, window or set operation) without \
                            being correlated on, or grouped by, the distribution column"
                    .into());
            }
        }
        Ok(())
    }

    /// True when the GROUP BY / DISTINCT `clauses` of `query` include a column tied to the
    /// target's distribution column.
    fn groups_by_key(&self, query: *mut pg_sys::Query, clauses: *mut pg_sys::List) -> bool {
        // SAFETY: clauses belong to query; its target list holds their expressions.
        unsafe {
            PgList::<pg_sys::SortGroupClause>::from_pg(clauses)
                .iter_ptr()
                .any(|clause| {
                    let expr =
                        strip(pg_sys::get_sortgroupclause_expr(clause, (*query).targetList).cast());
                    (*expr).type_ == pg_sys::NodeTag::T_Var
                        && (*expr.cast::<pg_sys::Var>()).varlevelsup == 0
                        && key_in(query, expr.cast()).is_some_and(|k| self.pinned(k))
                })
        }
    }
}

/// Names range-table entry `rte` `pgdist_t<k>` in the statement.
pub(crate) unsafe fn set_alias(rte: *mut pg_sys::RangeTblEntry, k: u32) {
    let name = CString::new(format!("pgdist_t{k}")).unwrap_or_default();
    // SAFETY: makeAlias copies the name into the planner's memory.
    unsafe { (*rte).alias = pg_sys::makeAlias(name.as_ptr(), std::ptr::null_mut()) };
}

/// The columns of table `relid` — entry `rti` of `query` — that the statement reads, when the
/// table can be broadcast: read column by column, each column able to travel in an array;
/// otherwise why not. (Its size is checked once it is known whether it is repartitioned.)
unsafe fn broadcast_columns(
    query: *mut pg_sys::Query,
    rti: i32,
    relid: pg_sys::Oid,
) -> Result<Vec<i16>, String> {
    // SAFETY: the walk reads the statement; catalog lookups of the table's columns.
    unsafe {
        let mut columns = columns_read(query, rti).ok_or("the statement reads its whole rows")?;
        columns.sort_unstable();
        columns.dedup();
        if columns.is_empty() {
            // Only its rows count (`… USING t` without conditions): any column will do.
            columns.push(1);
        }
        for attno in &columns {
            let (mut type_oid, mut typmod, mut collation) =
                (pg_sys::InvalidOid, 0, pg_sys::InvalidOid);
            pg_sys::get_atttypetypmodcoll(
                relid,
                *attno,
                &mut type_oid,
                &mut typmod,
                &mut collation,
            );
            if !travels_in_array(type_oid, collation) {
                let name = CStr::from_ptr(pg_sys::get_attname(relid, *attno, false));
                return Err(format!(
                    "its column {} cannot be sent to the shards as an array",
                    name.to_string_lossy()
                ));
            }
        }
        Ok(columns)
    }
}

/// What local table `relid`'s pg_class row says.
unsafe fn class_of<R>(relid: pg_sys::Oid, read: impl FnOnce(&pg_sys::FormData_pg_class) -> R) -> R {
    // SAFETY: the table is locked for the statement; the relation is closed again at once.
    unsafe {
        let relation = pg_sys::RelationIdGetRelation(relid);
        let result = read(&*(*relation).rd_rel);
        pg_sys::RelationClose(relation);
        result
    }
}

/// The row count of local table `relid` by its statistics (None before the first ANALYZE).
unsafe fn local_row_estimate(relid: pg_sys::Oid) -> Option<f64> {
    // SAFETY: see class_of.
    let rows = unsafe { class_of(relid, |class| f64::from(class.reltuples)) };
    (rows >= 0.0).then_some(rows)
}

/// True when local table `relid` has inheritance children or partitions.
unsafe fn has_children(relid: pg_sys::Oid) -> bool {
    // SAFETY: see class_of.
    unsafe { class_of(relid, |class| class.relhassubclass) }
}

/// The attribute numbers of range-table entry `rti` of `query` that `query` and its
/// subqueries read; None when something reads a whole row or a system column.
unsafe fn columns_read(query: *mut pg_sys::Query, rti: i32) -> Option<Vec<i16>> {
    struct Reads {
        rti: i32,
        depth: u32,
        columns: Vec<i16>,
        whole_row: bool,
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
        if node.is_null() {
            return false;
        }
        // SAFETY: node is part of the statement; context is the Reads we passed.
        unsafe {
            let reads = &mut *context.cast::<Reads>();
            match (*node).type_ {
                pg_sys::NodeTag::T_Var => {
                    let var = node.cast::<pg_sys::Var>();
                    if (*var).varno == reads.rti && (*var).varlevelsup == reads.depth {
                        if (*var).varattno > 0 {
                            reads.columns.push((*var).varattno);
                        } else {
                            reads.whole_row = true;
                        }
                    }
                    false
                }
                pg_sys::NodeTag::T_Query => {
                    reads.depth += 1;
                    let done = pg_sys::query_tree_walker(node.cast(), Some(walk), context, 0);
                    reads.depth -= 1;
                    done
                }
                _ => pg_sys::expression_tree_walker(node, Some(walk), context),
            }
        }
    }
    let mut reads = Reads {
        rti,
        depth: 0,
        columns: Vec::new(),
        whole_row: false,
    };
    // SAFETY: the walker only reads the statement.
    unsafe {
        pg_sys::query_tree_walker(query, Some(walk), (&raw mut reads).cast(), 0);
    }
    (!reads.whole_row).then_some(reads.columns)
}

/// The column `var` (a Var of `query`'s own level) stands for, following join aliases.
unsafe fn key_in(query: *mut pg_sys::Query, var: *mut pg_sys::Var) -> Option<Key> {
    // SAFETY: var's varno indexes query's range table.
    unsafe {
        let rte =
            pg_sys::list_nth((*query).rtable, (*var).varno - 1).cast::<pg_sys::RangeTblEntry>();
        if (*rte).rtekind == pg_sys::RTEKind::RTE_JOIN {
            let aliases = (*rte).joinaliasvars;
            let index = (*var).varattno as i32 - 1;
            if index < 0 || index >= pg_sys::list_length(aliases) {
                return None;
            }
            let inner = strip(pg_sys::list_nth(aliases, index).cast());
            return ((*inner).type_ == pg_sys::NodeTag::T_Var)
                .then(|| key_in(query, inner.cast()))
                .flatten();
        }
        Some((query as usize, (*var).varno, (*var).varattno))
    }
}

/// `node` without binary-compatible relabelings.
unsafe fn strip(mut node: *mut pg_sys::Node) -> *mut pg_sys::Node {
    // SAFETY: walks RelabelType args of a valid expression.
    unsafe {
        while !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_RelabelType {
            node = (*node.cast::<pg_sys::RelabelType>()).arg.cast();
        }
        node
    }
}

/// The AND-ed parts of a condition.
unsafe fn conjuncts(node: *mut pg_sys::Node) -> Vec<*mut pg_sys::Node> {
    // SAFETY: node is a valid expression (or NULL); casts follow tags.
    unsafe {
        if node.is_null() {
            return Vec::new();
        }
        if (*node).type_ == pg_sys::NodeTag::T_BoolExpr
            && (*node.cast::<pg_sys::BoolExpr>()).boolop == pg_sys::BoolExprType::AND_EXPR
        {
            return PgList::<pg_sys::Node>::from_pg((*node.cast::<pg_sys::BoolExpr>()).args)
                .iter_ptr()
                .flat_map(|arg| conjuncts(arg))
                .collect();
        }
        if (*node).type_ == pg_sys::NodeTag::T_List {
            return PgList::<pg_sys::Node>::from_pg(node.cast())
                .iter_ptr()
                .flat_map(|arg| conjuncts(arg))
                .collect();
        }
        vec![node]
    }
}

/// True when `node` reaches outside its own level or into a subquery: such expressions are
/// checked node by node instead of by `shippable`.
unsafe fn reaches_out(node: *mut pg_sys::Node) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
        if node.is_null() {
            return false;
        }
        // SAFETY: node is a valid node; casts follow its tag.
        unsafe {
            match (*node).type_ {
                pg_sys::NodeTag::T_SubLink => true,
                pg_sys::NodeTag::T_Var => (*node.cast::<pg_sys::Var>()).varlevelsup > 0,
                pg_sys::NodeTag::T_Aggref => (*node.cast::<pg_sys::Aggref>()).agglevelsup > 0,
                pg_sys::NodeTag::T_Param => matches!(
                    (*node.cast::<pg_sys::Param>()).paramkind,
                    pg_sys::ParamKind::PARAM_SUBLINK | pg_sys::ParamKind::PARAM_MULTIEXPR
                ),
                _ => pg_sys::expression_tree_walker(node, Some(walk), context),
            }
        }
    }
    // SAFETY: the walker only reads the tree.
    unsafe { walk(node, std::ptr::null_mut()) }
}

/// Whether `node` itself (not its arguments) means the same on a worker.
unsafe fn shippable_itself(node: *mut pg_sys::Node) -> bool {
    // SAFETY: node is a valid expression node; casts follow its tag.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_Var => (*node.cast::<pg_sys::Var>()).varattno > 0,
            pg_sys::NodeTag::T_Const => true,
            // PARAM_MULTIEXPR: a column of `SET (a, b) = (SELECT …)`, whose subquery is the
            // statement's (junk) target entry.
            pg_sys::NodeTag::T_Param => matches!(
                (*node.cast::<pg_sys::Param>()).paramkind,
                pg_sys::ParamKind::PARAM_EXTERN
                    | pg_sys::ParamKind::PARAM_SUBLINK
                    | pg_sys::ParamKind::PARAM_MULTIEXPR
            ),
            pg_sys::NodeTag::T_OpExpr
            | pg_sys::NodeTag::T_DistinctExpr
            | pg_sys::NodeTag::T_NullIfExpr => {
                let op = node.cast::<pg_sys::OpExpr>();
                builtin_immutable(pg_sys::get_opcode((*op).opno)) && collation_ok((*op).inputcollid)
            }
            pg_sys::NodeTag::T_ScalarArrayOpExpr => {
                let op = node.cast::<pg_sys::ScalarArrayOpExpr>();
                builtin_immutable(pg_sys::get_opcode((*op).opno)) && collation_ok((*op).inputcollid)
            }
            pg_sys::NodeTag::T_FuncExpr => {
                let func = node.cast::<pg_sys::FuncExpr>();
                builtin_immutable((*func).funcid) && collation_ok((*func).inputcollid)
            }
            pg_sys::NodeTag::T_Aggref => {
                let aggref = node.cast::<pg_sys::Aggref>();
                crate::planner::shippable::builtin_for_everyone((*aggref).aggfnoid)
                    && collation_ok((*aggref).inputcollid)
            }
            pg_sys::NodeTag::T_RelabelType => {
                let relabel = node.cast::<pg_sys::RelabelType>();
                (*relabel).resultcollid == pg_sys::exprCollation((*relabel).arg.cast())
            }
            pg_sys::NodeTag::T_SubLink
            | pg_sys::NodeTag::T_BoolExpr
            | pg_sys::NodeTag::T_NullTest
            | pg_sys::NodeTag::T_BooleanTest
            | pg_sys::NodeTag::T_CoalesceExpr
            | pg_sys::NodeTag::T_CaseExpr
            | pg_sys::NodeTag::T_CaseWhen
            | pg_sys::NodeTag::T_CaseTestExpr
            | pg_sys::NodeTag::T_ArrayExpr
            | pg_sys::NodeTag::T_RowExpr
            | pg_sys::NodeTag::T_TargetEntry
            | pg_sys::NodeTag::T_List => true,
            _ => false,
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn walk_node(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: context is the Walk of `plan`; node is part of the statement.
    unsafe {
        let walk = &mut *context.cast::<Walk>();
        if walk.problem.is_some() {
            return true;
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => {
                walk.visit_query(node.cast());
                false
            }
            pg_sys::NodeTag::T_FromExpr
            | pg_sys::NodeTag::T_JoinExpr
            | pg_sys::NodeTag::T_RangeTblRef
            | pg_sys::NodeTag::T_SortGroupClause
            | pg_sys::NodeTag::T_List
            | pg_sys::NodeTag::T_TargetEntry
            | pg_sys::NodeTag::T_RangeTblFunction => {
                pg_sys::expression_tree_walker(node, Some(walk_node), context)
            }
            _ if !reaches_out(node) => {
                if !shippable(node) {
                    walk.fail("an expression in it cannot run on the worker nodes".into());
                    return true;
                }
                false
            }
            _ => {
                if !shippable_itself(node) {
                    walk.fail("an expression in it cannot run on the worker nodes".into());
                    return true;
                }
                if (*node).type_ == pg_sys::NodeTag::T_SubLink {
                    walk.sublink_equalities(node.cast());
                }
                pg_sys::expression_tree_walker(node, Some(walk_node), context)
            }
        }
    }
}

/// `query` as SQL with every name schema-qualified (as with an empty search_path), so that it
/// means the same in any session. AcquireRewriteLocks may adjust the query: pass a copy.
pub unsafe fn qualified_sql(query: *mut pg_sys::Query) -> String {
    // SAFETY: search_path is set for the deparse only (a GUC nest level undone right after,
    // or by the abort if deparsing fails).
    unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let text = crate::planner::partitioned::with_parents_read_whole(query, || {
            pg_sys::pg_get_querydef(query, false)
        });
        pg_sys::AtEOXact_GUC(true, level);
        one_line(&CStr::from_ptr(text).to_string_lossy())
    }
}

/// Deparsed SQL on one line: each line break the deparser put between words, with the
/// indentation after it, becomes one space (breaks inside quoted literals and identifiers
/// stay).
fn one_line(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(open), _) if c == open => quote = None,
            (None, '\n') => {
                while chars.peek() == Some(&' ') {
                    chars.next();
                }
                if !out.ends_with(' ') {
                    out.push(' ');
                }
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// `parse` as SQL with a placeholder for the shard of each of `relations` (each named
/// `pgdist_t<k>` by [`set_alias`]).
pub(crate) unsafe fn deparse_with_shards(
    parse: *mut pg_sys::Query,
    relations: &[(u32, pg_sys::Oid)],
) -> Result<String, String> {
    // SAFETY: as for deparse.
    unsafe { deparse(parse, relations, &[]) }
}

/// The statement as SQL with a placeholder for each relation's shard.
unsafe fn deparse(
    parse: *mut pg_sys::Query,
    relations: &[(u32, pg_sys::Oid)],
    broadcasts: &[Broadcast],
) -> Result<String, String> {
    // SAFETY: the query is ours: its data-modifying WITH queries run on their own, their rows
    // travel as arrays.
    let mut sql = unsafe {
        let ctes = PgList::<pg_sys::CommonTableExpr>::from_pg((*parse).cteList);
        let mut plain = PgList::<pg_sys::CommonTableExpr>::new();
        for cte in ctes.iter_ptr() {
            if (*(*cte).ctequery.cast::<pg_sys::Query>()).commandType == pg_sys::CmdType::CMD_SELECT
            {
                plain.push(cte);
            }
        }
        (*parse).cteList = plain.into_pg();
        qualified_sql(parse)
    };
    let mut next_array = BROADCAST_BASE;
    for broadcast in broadcasts {
        let mut written = match &broadcast.cte {
            Some(cte) => format!(
                "{} pgdist_t{}",
                ruleutils_identifier(&cte.name),
                broadcast.k
            ),
            None => format!(
                "{} pgdist_t{}",
                qualified_name(broadcast.relid),
                broadcast.k
            ),
        };
        if sql.contains(&format!("ONLY {written}")) {
            written = format!("ONLY {written}");
        }
        let arrays: Vec<String> = broadcast
            .columns
            .iter()
            .zip(next_array..)
            .map(|(_, param)| format!("${param}"))
            .collect();
        next_array += arrays.len() as i32;
        let names: Vec<String> = broadcast
            .columns
            .iter()
            .map(|attno| match &broadcast.cte {
                Some(cte) => quote_identifier(&cte.columns[*attno as usize - 1].0),
                None => {
                    // SAFETY: a catalog lookup of an existing column.
                    let name = unsafe {
                        CStr::from_ptr(pg_sys::get_attname(broadcast.relid, *attno, false))
                    };
                    quote_identifier(&name.to_string_lossy())
                }
            })
            .collect();
        let unnest = format!(
            "unnest({}) AS pgdist_t{}({})",
            arrays.join(", "),
            broadcast.k,
            names.join(", ")
        );
        if sql.matches(written.as_str()).count() != 1 {
            return Err("pgdist could not write it as SQL for the shards".into());
        }
        sql = sql.replacen(written.as_str(), &unnest, 1);
    }
    for (k, relid) in relations {
        let qualified = qualified_name(*relid);
        // The UPDATE's own table is written `name AS alias`, the others `name alias`.
        let forms = [" AS ", " "].map(|between| {
            (
                format!("{qualified}{between}pgdist_t{k}"),
                format!("${}{between}pgdist_t{k}", RELATION_BASE + *k as i32),
            )
        });
        let found: Vec<_> = forms
            .iter()
            .filter(|(written, _)| sql.contains(written))
            .collect();
        match found.as_slice() {
            [(written, placeholder)] if sql.matches(written.as_str()).count() == 1 => {
                sql = sql.replacen(written.as_str(), placeholder, 1);
            }
            _ => return Err("pgdist could not write it as SQL for the shards".into()),
        }
    }
    Ok(sql)
}

/// An identifier as ruleutils writes it: quoted only where needed.
fn ruleutils_identifier(name: &str) -> String {
    let name = CString::new(name).unwrap_or_default();
    // SAFETY: quote_identifier returns its argument or a palloc'd quoted copy, read at once.
    unsafe {
        CStr::from_ptr(pg_sys::quote_identifier(name.as_ptr()))
            .to_string_lossy()
            .into_owned()
    }
}

/// The table's schema-qualified name as ruleutils writes it: quoted only where needed.
/// (A temporary table of the session is visible without its schema, so it goes without.)
fn qualified_name(relid: pg_sys::Oid) -> String {
    // SAFETY: catalog lookups of a table the statement reads; the C strings are copied at once.
    unsafe {
        let namespace = pg_sys::get_rel_namespace(relid);
        let schema = match pg_sys::isTempNamespace(namespace) {
            true => std::ptr::null(),
            false => pg_sys::get_namespace_name(namespace).cast_const(),
        };
        let name = pg_sys::get_rel_name(relid);
        CStr::from_ptr(pg_sys::quote_qualified_identifier(schema, name))
            .to_string_lossy()
            .into_owned()
    }
}

/// Replaces references to the statement's plain WITH queries (SELECTs without volatile
/// functions, not RECURSIVE or MATERIALIZED, naming no other WITH query) by the queries
/// themselves, as the planner would; they then follow the rules of any subquery.
pub unsafe fn inline_with_queries(query: *mut pg_sys::Query) {
    struct Inline {
        depth: u32,
        ctes: Vec<(String, *mut pg_sys::Query)>,
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
        if node.is_null() {
            return false;
        }
        // SAFETY: node is part of the statement; context is the Inline we passed.
        unsafe {
            let inline = &mut *context.cast::<Inline>();
            match (*node).type_ {
                pg_sys::NodeTag::T_Query => {
                    inline.depth += 1;
                    let flags = pg_sys::QTW_EXAMINE_RTES_BEFORE as i32;
                    pg_sys::query_tree_walker(node.cast(), Some(walk), context, flags);
                    inline.depth -= 1;
                    false
                }
                pg_sys::NodeTag::T_RangeTblEntry => {
                    let rte = node.cast::<pg_sys::RangeTblEntry>();
                    if (*rte).rtekind == pg_sys::RTEKind::RTE_CTE
                        && (*rte).ctelevelsup == inline.depth
                    {
                        let name = CStr::from_ptr((*rte).ctename).to_string_lossy();
                        if let Some((_, cte)) = inline.ctes.iter().find(|(n, _)| *n == name) {
                            (*rte).rtekind = pg_sys::RTEKind::RTE_SUBQUERY;
                            (*rte).subquery =
                                pg_sys::copyObjectImpl(cte.cast()).cast::<pg_sys::Query>();
                            (*rte).ctename = std::ptr::null_mut();
                            (*rte).ctelevelsup = 0;
                        }
                    }
                    false
                }
                _ => pg_sys::expression_tree_walker(node, Some(walk), context),
            }
        }
    }
    // SAFETY: query is a private copy of the statement.
    unsafe {
        let mut inline = Inline {
            depth: 0,
            ctes: Vec::new(),
        };
        let mut kept = PgList::<pg_sys::CommonTableExpr>::new();
        for cte in PgList::<pg_sys::CommonTableExpr>::from_pg((*query).cteList).iter_ptr() {
            let body = (*cte).ctequery.cast::<pg_sys::Query>();
            let plain = !(*query).hasRecursive
                && (*cte).ctematerialized != pg_sys::CTEMaterialize::CTEMaterializeAlways
                && (*body).commandType == pg_sys::CmdType::CMD_SELECT
                && (*body).cteList.is_null()
                && !pg_sys::contain_volatile_functions(body.cast())
                && !names_with_query(body);
            if plain {
                let name = CStr::from_ptr((*cte).ctename)
                    .to_string_lossy()
                    .into_owned();
                inline.ctes.push((name, body));
            } else {
                kept.push(cte);
            }
        }
        if inline.ctes.is_empty() {
            return;
        }
        let flags = pg_sys::QTW_EXAMINE_RTES_BEFORE as i32;
        pg_sys::query_tree_walker(query, Some(walk), (&raw mut inline).cast(), flags);
        (*query).cteList = kept.into_pg();
    }
}

/// True when `query` (or a subquery of it) reads a WITH query of an outer level.
unsafe fn names_with_query(query: *mut pg_sys::Query) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
        if node.is_null() {
            return false;
        }
        // SAFETY: node is part of the query; casts follow tags.
        unsafe {
            match (*node).type_ {
                pg_sys::NodeTag::T_Query => pg_sys::query_tree_walker(
                    node.cast(),
                    Some(walk),
                    context,
                    pg_sys::QTW_EXAMINE_RTES_BEFORE as i32,
                ),
                pg_sys::NodeTag::T_RangeTblEntry => {
                    (*node.cast::<pg_sys::RangeTblEntry>()).rtekind == pg_sys::RTEKind::RTE_CTE
                }
                _ => pg_sys::expression_tree_walker(node, Some(walk), context),
            }
        }
    }
    // SAFETY: the walker only reads the tree.
    unsafe {
        pg_sys::query_tree_walker(
            query,
            Some(walk),
            std::ptr::null_mut(),
            pg_sys::QTW_EXAMINE_RTES_BEFORE as i32,
        )
    }
}

#[cfg(test)]
mod unit {
    use super::one_line;

    #[test]
    fn line_breaks_become_spaces_outside_quotes() {
        assert_eq!(
            one_line(" SELECT a,\n    b\n   FROM t\n  WHERE (b = 'x\n  y''\n z')"),
            "SELECT a, b FROM t WHERE (b = 'x\n  y''\n z')"
        );
        assert_eq!(
            one_line("SELECT \"a\n  b\"\n  FROM t"),
            "SELECT \"a\n  b\" FROM t"
        );
    }
}
