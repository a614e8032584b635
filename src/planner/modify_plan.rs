//! Plans INSERT, UPDATE and DELETE on distributed and reference tables.
//!
//! PostgreSQL plans the statement as usual; its ModifyTable node (which would change the empty
//! shell) is then replaced by a Distributed Modify CustomScan over the same result relation
//! (`modify_node`, also used for writes inside WITH: `with_writes.rs`):
//! - INSERT keeps ModifyTable's input plan as its child: the rows arrive with every DEFAULT,
//!   sequence and expression already evaluated on the coordinator, exactly once, and are routed
//!   to their shards (`executor/shard_writer.rs`); `ON CONFLICT` travels with each shard's
//!   INSERT. An INSERT … SELECT whose rows all come from a Distributed Scan over co-located
//!   tables, each row from the shard it belongs in, is pushed down instead: every fragment of
//!   the scan becomes `INSERT INTO <co-located shard> SELECT … FROM (<fragment>)`.
//! - UPDATE and DELETE become one statement per shard, `UPDATE <shard> SET … WHERE …`, when
//!   their SET expressions and WHERE clause can run on the workers (see `shippable.rs`); shards
//!   are pruned like reads (constants at plan time, `$n` at execution).
//!
//! RETURNING rows come back from the shards as whole rows (followed by the other tables'
//! columns RETURNING uses) and are projected on the coordinator by the CustomScan's own target
//! list, so any RETURNING expression works.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::PgList;

use crate::distribution::foreign_keys;
use crate::executor::triggers::{self, Event};
use crate::metadata::cache;
use crate::metadata::tables::{DistTable, Method};
use crate::planner::modify_pushdown::{ExtraColumn, ROW_TAG_SQL};
use crate::planner::scan_path::{
    decode_broadcasts, encode_broadcasts, from_list, to_list, ScanPlan,
};
use crate::planner::shippable::{
    as_mutator, deparse, shippable, with_coordinator_values, RELATION_BASE,
};
use crate::planner::{each_plan_node, PlannerError};
use crate::planner::{security_quals, shippable};
use crate::remote::quote::quote_identifier;

pub const MODIFY_NAME: &CStr = c"pgdist Distributed Modify";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModifyKind {
    Insert,
    Update,
    Delete,
    /// MERGE: `statement` holds it; its shards need source rows to do anything.
    Merge,
}

/// What the executor needs, kept in the plan (`custom_private`) as strings.
#[derive(Debug, PartialEq)]
pub struct ModifyPlan {
    pub kind: ModifyKind,
    pub relid: pg_sys::Oid,
    /// INSERT: the name rows of the shard are called by in `on_conflict`.
    pub alias: String,
    /// INSERT: `ON CONFLICT …` (empty: none); `{constraint}` stands for the shard's constraint.
    pub on_conflict: String,
    /// INSERT: the constraint named by `ON CONFLICT ON CONSTRAINT`.
    pub conflict_constraint: String,
    /// UPDATE: `column = expression, …`.
    pub set_sql: String,
    /// UPDATE / DELETE: the WHERE clause (empty: none); may contain `$n`.
    pub where_sql: String,
    /// UPDATE / DELETE: shards left after plan-time pruning.
    pub shard_ids: Vec<i64>,
    /// UPDATE / DELETE: `$n` whose value picks the shard at execution (0: none; negative: an
    /// array, as `ScanPlan::prune_param`).
    pub prune_param: i32,
    pub returning: bool,
    /// False for a write inside WITH: its rows do not count as the statement's, and it runs to
    /// completion even when nothing reads its RETURNING rows (as ModifyTable's `canSetTag`).
    pub can_set_tag: bool,
    /// INSERT … SELECT pushed down (empty: rows go through the coordinator): the statement
    /// each fragment of the child scan becomes, `{fragment}` standing for the fragment's SQL
    /// and `$<RELATION_BASE + INSERT_TARGET_RTI>` for the co-located shard of the table.
    pub insert_select: String,
    /// UPDATE / DELETE reading other tables (`modify_pushdown.rs`): the whole statement for
    /// every shard (empty: `set_sql` / `where_sql` are used).
    pub statement: String,
    /// The relations of `statement`: `$<RELATION_BASE + k>` stands for the shard of k.
    pub relations: Vec<(u32, pg_sys::Oid)>,
    /// The alias of the target in `statement`.
    pub target_alias: String,
    /// The columns of other tables of `statement` that RETURNING uses: each shard returns them
    /// after the target's columns (`returning_extra_sql`), and the node's scan row has them
    /// there too (see [`returning_over_extra_columns`]).
    pub returning_extra: Vec<ExtraColumn>,
    pub returning_extra_sql: String,
    /// UPDATE / DELETE of a table with row triggers (empty: none), run row by row
    /// (`executor/row_by_row.rs`): each shard's statement that locks and reads the rows,
    /// `SELECT <ROW_TAG_SQL>, ctid, tableoid, <every column>, <the new value of each SET
    /// column> FROM $<RELATION_BASE> … WHERE … FOR [NO KEY] UPDATE`, with the relations of
    /// `statement` when there is one.
    pub row_source: String,
    /// The columns the SET values of `row_source` are for (`upsert_source`'s too).
    pub set_attnos: Vec<i16>,
    /// `INSERT … ON CONFLICT DO UPDATE` of a table with row triggers (empty: none), run row by
    /// row (`executor/upsert.rs`): the statement that locks and returns the existing rows the
    /// proposed rows conflict with, `SELECT <ROW_TAG_SQL>, <alias>.ctid, <alias's columns>,
    /// excluded.pgdist_n, <SET values>, <DO UPDATE WHERE> FROM $<RELATION_BASE> AS <alias>
    /// JOIN (VALUES {rows}) AS excluded (pgdist_n, <columns>) ON <arbiter columns equal> FOR
    /// UPDATE OF <alias>`.
    pub upsert_source: String,
    /// With `upsert_source`: the conflict target, as `ON CONFLICT <target> DO NOTHING` takes it.
    pub conflict_target: String,
    /// MERGE: the events of its actions (INSERT, UPDATE, DELETE), whose statement triggers fire.
    pub merge_events: Vec<Event>,
    /// MERGE into a table with row triggers (`row_source` set): what each action does, as a
    /// letter (`u`pdate, `d`elete, `i`nsert, `n`othing), by the action index `row_source`
    /// returns.
    pub merge_actions: String,
    /// Tables `statement` reads that are not co-located with the target: read first, their
    /// columns stand in it as arrays (`$<BROADCAST_BASE + i>`, as in a scan).
    pub broadcasts: Vec<ScanPlan>,
    /// A write inside WITH: the tables into which another part of the statement inserts
    /// blindly after reading this write's rows; that insert runs this write first
    /// (`with_writes.rs`).
    pub runs_before_writes_to: Vec<pg_sys::Oid>,
}

/// The range-table index that stands for the INSERT's table in a pushed-down INSERT … SELECT.
pub const INSERT_TARGET_RTI: u32 = 65_000;

impl ModifyPlan {
    pub fn encode(&self) -> Vec<String> {
        let mut parts = vec![
            match self.kind {
                ModifyKind::Insert => "insert",
                ModifyKind::Update => "update",
                ModifyKind::Delete => "delete",
                ModifyKind::Merge => "merge",
            }
            .into(),
            u32::from(self.relid).to_string(),
            self.alias.clone(),
            self.on_conflict.clone(),
            self.conflict_constraint.clone(),
            self.set_sql.clone(),
            self.where_sql.clone(),
            self.shard_ids
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            self.prune_param.to_string(),
            self.returning.to_string(),
            self.can_set_tag.to_string(),
            self.insert_select.clone(),
            self.statement.clone(),
            self.relations
                .iter()
                .map(|(k, oid)| format!("{k}:{}", u32::from(*oid)))
                .collect::<Vec<_>>()
                .join(","),
            self.target_alias.clone(),
            self.returning_extra
                .iter()
                .map(|c| {
                    format!(
                        "{}:{}:{}:{}",
                        c.rti,
                        c.attno,
                        u32::from(c.type_oid),
                        c.typmod
                    )
                })
                .collect::<Vec<_>>()
                .join(","),
            self.returning_extra_sql.clone(),
            self.row_source.clone(),
            self.set_attnos
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            self.upsert_source.clone(),
            self.conflict_target.clone(),
            self.merge_events
                .iter()
                .map(|event| event.letter())
                .collect(),
            self.merge_actions.clone(),
            self.runs_before_writes_to
                .iter()
                .map(|oid| u32::from(*oid).to_string())
                .collect::<Vec<_>>()
                .join(","),
        ];
        parts.extend(encode_broadcasts(&self.broadcasts));
        parts
    }

    pub fn decode(parts: &[String]) -> ModifyPlan {
        let part = |i: usize| parts.get(i).cloned().unwrap_or_default();
        ModifyPlan {
            kind: match part(0).as_str() {
                "insert" => ModifyKind::Insert,
                "update" => ModifyKind::Update,
                "merge" => ModifyKind::Merge,
                _ => ModifyKind::Delete,
            },
            relid: pg_sys::Oid::from(part(1).parse::<u32>().unwrap_or_default()),
            alias: part(2),
            on_conflict: part(3),
            conflict_constraint: part(4),
            set_sql: part(5),
            where_sql: part(6),
            shard_ids: part(7).split(',').filter_map(|s| s.parse().ok()).collect(),
            prune_param: part(8).parse().unwrap_or_default(),
            returning: part(9) == "true",
            can_set_tag: part(10) == "true",
            insert_select: part(11),
            statement: part(12),
            relations: part(13)
                .split(',')
                .filter_map(|pair| {
                    let (k, oid) = pair.split_once(':')?;
                    Some((k.parse().ok()?, pg_sys::Oid::from(oid.parse::<u32>().ok()?)))
                })
                .collect(),
            target_alias: part(14),
            returning_extra: part(15)
                .split(',')
                .filter_map(|column| {
                    let mut fields = column.split(':');
                    Some(ExtraColumn {
                        rti: fields.next()?.parse().ok()?,
                        attno: fields.next()?.parse().ok()?,
                        type_oid: pg_sys::Oid::from(fields.next()?.parse::<u32>().ok()?),
                        typmod: fields.next()?.parse().ok()?,
                    })
                })
                .collect(),
            returning_extra_sql: part(16),
            row_source: part(17),
            set_attnos: part(18).split(',').filter_map(|s| s.parse().ok()).collect(),
            upsert_source: part(19),
            conflict_target: part(20),
            merge_events: part(21).chars().filter_map(Event::from_letter).collect(),
            merge_actions: part(22),
            runs_before_writes_to: part(23)
                .split(',')
                .filter_map(|oid| Some(pg_sys::Oid::from(oid.parse::<u32>().ok()?)))
                .collect(),
            broadcasts: decode_broadcasts(parts.get(24..).unwrap_or_default()),
        }
    }
}

/// Plans a write to distributed table `table` (the result relation of `parse`): checks what
/// the workers can do, lets `plan_rest` (the standard planner) plan the statement, then puts a
/// Distributed Modify node in the place of ModifyTable.
pub unsafe fn plan(
    parse: *mut pg_sys::Query,
    table: &DistTable,
    plan_rest: impl FnOnce() -> *mut pg_sys::PlannedStmt,
) -> Result<*mut pg_sys::PlannedStmt, PlannerError> {
    // SAFETY: parse is the analysed statement being planned; the planned statement is ours to
    // rearrange before anyone else sees it.
    unsafe {
        let write = analyse(parse, table)?;
        let stmt = plan_rest();
        let top = (*stmt).planTree;
        if top.is_null() || (*top).type_ != pg_sys::NodeTag::T_ModifyTable {
            return Err(PlannerError::Writes(table_name(table)));
        }
        (*stmt).planTree = modify_node(stmt, top.cast(), write, table).cast();
        Ok(stmt)
    }
}

/// A write analysed before planning: what the workers run, and the expressions the
/// coordinator computes for it at execution (`$<COORDINATOR_VALUE_BASE + i>`).
pub struct AnalysedWrite {
    modify: ModifyPlan,
    values: PgList<pg_sys::Node>,
    /// The statement's RETURNING list as it was before planning (when it uses other tables),
    /// and the range-table index of the target there.
    returning: *mut pg_sys::List,
    result_rti: i32,
}

impl AnalysedWrite {
    /// See [`ModifyPlan::runs_before_writes_to`].
    pub fn run_before_writes_to(&mut self, tables: Vec<pg_sys::Oid>) {
        self.modify.runs_before_writes_to = tables;
    }
}

/// The Distributed Modify node that does the work of `mt` (a ModifyTable of `stmt` writing
/// `table`, at the top of the plan or of a WITH query's subplan).
pub unsafe fn modify_node(
    stmt: *mut pg_sys::PlannedStmt,
    mt: *mut pg_sys::ModifyTable,
    write: AnalysedWrite,
    table: &DistTable,
) -> *mut pg_sys::CustomScan {
    // SAFETY: mt is a finished ModifyTable of stmt; the new node takes over its parts.
    unsafe {
        let AnalysedWrite {
            mut modify,
            values,
            returning,
            result_rti,
        } = write;
        modify.can_set_tag = (*mt).canSetTag;
        let scan =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::CustomScan>()).cast::<pg_sys::CustomScan>();
        (*scan).scan.plan.type_ = pg_sys::NodeTag::T_CustomScan;
        (*scan).scan.plan.startup_cost = (*mt).plan.startup_cost;
        (*scan).scan.plan.total_cost = (*mt).plan.total_cost;
        (*scan).scan.plan.plan_rows = (*mt).plan.plan_rows;
        (*scan).scan.plan.plan_width = (*mt).plan.plan_width;
        (*scan).scan.plan.initPlan = (*mt).plan.initPlan;
        (*scan).scan.plan.extParam = (*mt).plan.extParam;
        (*scan).scan.plan.allParam = (*mt).plan.allParam;
        (*scan).scan.scanrelid = pg_sys::list_nth_int((*mt).resultRelations, 0) as u32;
        if !modify.returning_extra.is_empty() {
            let (scan_row, targetlist) = returning_over_extra_columns(
                table.oid,
                returning,
                result_rti,
                &modify.returning_extra,
                (*scan).scan.scanrelid,
            );
            (*scan).custom_scan_tlist = scan_row;
            (*scan).scan.plan.targetlist = targetlist;
        } else if modify.returning {
            (*scan).scan.plan.targetlist =
                pg_sys::list_nth((*mt).returningLists, 0).cast::<pg_sys::List>();
        }
        // Check options (policies' WITH CHECK, views' CHECK OPTION) are tested on the
        // coordinator, on every new row: they travel after the values the coordinator computes.
        // (A MERGE's shards test its policies themselves, unless it runs row by row:
        // `merge_plan.rs`.)
        let merge = (*mt).operation == pg_sys::CmdType::CMD_MERGE;
        let on_shards = merge && modify.row_source.is_empty();
        let checks = match (*mt).withCheckOptionLists.is_null() || on_shards {
            true => std::ptr::null_mut(),
            false => pg_sys::list_nth((*mt).withCheckOptionLists, 0).cast::<pg_sys::List>(),
        };
        if modify.kind == ModifyKind::Insert {
            let child = (*mt).plan.lefttree;
            // SAFETY: the table is locked by the statement being planned.
            let row_triggers = triggers::find(table.oid, Event::Insert).rows;
            if modify.on_conflict.is_empty()
                && !modify.returning
                && checks.is_null()
                && !row_triggers
            {
                modify.insert_select = pushed_down_insert(stmt, child, table).unwrap_or_default();
            }
            (*scan).custom_plans = pg_sys::lappend(std::ptr::null_mut(), child.cast());
        }
        for read in modify
            .broadcasts
            .iter()
            .filter(|b| !b.with_query.is_empty())
        {
            let child = with_query_scan(stmt, &read.with_query, &read.column_types);
            (*scan).custom_plans = pg_sys::lappend((*scan).custom_plans, child.cast());
        }
        (*scan).custom_private = to_list(modify.encode());
        (*scan).custom_exprs = pg_sys::list_concat(values.into_pg(), checks);
        (*scan).methods = crate::executor::modify::scan_methods();
        scan
    }
}

/// A scan of every row of data-modifying WITH query `name` (columns of `types`) of `stmt`:
/// a copy of a scan of it that the planner made, without its filters and projection. Reading
/// it runs the WITH query, as PostgreSQL's own scan would.
unsafe fn with_query_scan(
    stmt: *mut pg_sys::PlannedStmt,
    name: &str,
    types: &[pg_sys::Oid],
) -> *mut pg_sys::Plan {
    // SAFETY: stmt is the finished plan; the scan found is a CteScan of its range table,
    // copied before it is changed.
    unsafe {
        let mut found: *mut pg_sys::CteScan = std::ptr::null_mut();
        let mut plans = vec![(*stmt).planTree];
        plans.extend(PgList::<pg_sys::Plan>::from_pg((*stmt).subplans).iter_ptr());
        for plan in plans {
            each_plan_node(plan, &mut |node| {
                if found.is_null() && (*node).type_ == pg_sys::NodeTag::T_CteScan {
                    let scan = node.cast::<pg_sys::CteScan>();
                    let rte = pg_sys::list_nth((*stmt).rtable, (*scan).scan.scanrelid as i32 - 1)
                        .cast::<pg_sys::RangeTblEntry>();
                    if CStr::from_ptr((*rte).ctename).to_bytes() == name.as_bytes() {
                        found = scan;
                    }
                }
            });
        }
        if found.is_null() {
            crate::error::raise(PlannerError::Writes(format!(
                "(reading WITH query {name}, which the plan does not scan)"
            )));
        }
        let scan = pg_sys::copyObjectImpl(found.cast()).cast::<pg_sys::CteScan>();
        (*scan).scan.plan.qual = std::ptr::null_mut();
        (*scan).scan.plan.lefttree = std::ptr::null_mut();
        (*scan).scan.plan.righttree = std::ptr::null_mut();
        (*scan).scan.plan.initPlan = std::ptr::null_mut();
        let mut targets = PgList::<pg_sys::TargetEntry>::new();
        for (attno, type_oid) in (1..).zip(types) {
            let var = pg_sys::makeVar(
                (*scan).scan.scanrelid as _,
                attno,
                *type_oid,
                -1,
                pg_sys::get_typcollation(*type_oid),
                0,
            );
            targets.push(pg_sys::makeTargetEntry(
                var.cast(),
                attno,
                std::ptr::null_mut(),
                false,
            ));
        }
        (*scan).scan.plan.targetlist = targets.into_pg();
        scan.cast()
    }
}

/// The scan row and RETURNING list of a write to `relid` whose RETURNING uses `extra` columns
/// of other tables. Each shard returns the target's columns and then those (`returning_extra_sql`);
/// the scan row (`custom_scan_tlist`) describes that row, and RETURNING list `returning` (as
/// analysed before planning, the target at range-table index `result_rti`) is made to read
/// it (`INDEX_VAR`). The target is `scanrelid` in the finished plan, the other tables are as
/// many places further.
unsafe fn returning_over_extra_columns(
    relid: pg_sys::Oid,
    returning: *mut pg_sys::List,
    result_rti: i32,
    extra: &[ExtraColumn],
    scanrelid: u32,
) -> (*mut pg_sys::List, *mut pg_sys::List) {
    struct Remap {
        result_rti: i32,
        /// (range-table index, attribute number) of each scan row column, in order.
        columns: Vec<(i32, i16)>,
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn mutate(
        node: *mut pg_sys::Node,
        context: *mut std::ffi::c_void,
    ) -> *mut pg_sys::Node {
        if node.is_null() {
            return node;
        }
        // SAFETY: node is an expression of a private copy of the RETURNING list; context is
        // the Remap.
        unsafe {
            let remap = &*context.cast::<Remap>();
            if (*node).type_ == pg_sys::NodeTag::T_Var {
                let var = pg_sys::copyObjectImpl(node.cast()).cast::<pg_sys::Var>();
                let rti = match (*var).varno {
                    rti if rti == remap.result_rti => 0,
                    rti => rti,
                };
                if let Some(i) = remap
                    .columns
                    .iter()
                    .position(|c| *c == (rti, (*var).varattno))
                {
                    (*var).varno = pg_sys::INDEX_VAR;
                    (*var).varattno = i as i16 + 1;
                }
                return var.cast();
            }
            pg_sys::expression_tree_mutator(node, Some(as_mutator(mutate)), context)
        }
    }
    // SAFETY: the target is locked for the statement; `returning` is a private copy; the
    // lists are new, in the planner's memory, their operators' functions filled in as the
    // planner does.
    unsafe {
        let offset = scanrelid as i32 - result_rti;
        let mut scan_row = PgList::<pg_sys::TargetEntry>::new();
        let mut columns = Vec::new();
        let mut add = |key: (i32, i16), var: *mut pg_sys::Var| {
            columns.push(key);
            let resno = columns.len() as i16;
            scan_row.push(pg_sys::makeTargetEntry(
                var.cast(),
                resno,
                std::ptr::null_mut(),
                false,
            ));
        };
        let relation = pg_sys::RelationIdGetRelation(relid);
        let tupdesc = (*relation).rd_att;
        for i in 0..(*tupdesc).natts as usize {
            let attribute = (*tupdesc).attrs.as_ptr().add(i);
            if !(*attribute).attisdropped {
                let var = pg_sys::makeVar(
                    scanrelid as i32,
                    (*attribute).attnum,
                    (*attribute).atttypid,
                    (*attribute).atttypmod,
                    (*attribute).attcollation,
                    0,
                );
                add((0, (*attribute).attnum), var);
            }
        }
        pg_sys::RelationClose(relation);
        for column in extra {
            let var = pg_sys::makeVar(
                column.rti + offset,
                column.attno,
                column.type_oid,
                column.typmod,
                pg_sys::get_typcollation(column.type_oid),
                0,
            );
            add((column.rti, column.attno), var);
        }
        let remap = Remap {
            result_rti,
            columns,
        };
        let list = mutate(returning.cast(), (&raw const remap).cast_mut().cast());
        pg_sys::fix_opfuncids(list);
        (scan_row.into_pg(), list.cast())
    }
}

/// INSERT … SELECT whose rows are all produced by the fragments of a Distributed Scan over
/// tables co-located with `target` (possibly under projections and subquery scans), each row
/// in the fragment of its own shard: the target's distribution column comes straight from the
/// distribution column it is read from. The statement every fragment becomes (see
/// [`ModifyPlan::insert_select`]); None when the rows must go through the coordinator.
unsafe fn pushed_down_insert(
    stmt: *mut pg_sys::PlannedStmt,
    child: *mut pg_sys::Plan,
    target: &DistTable,
) -> Option<String> {
    // SAFETY: reads the finished plan; catalog lookups of the tables involved.
    unsafe {
        let scan = distributed_scan_below(child)?;
        let source =
            crate::planner::scan_path::ScanPlan::decode(&from_list((*scan).custom_private));
        let anchor = cache::lookup(source.relid)?;
        if !source.limit.is_empty()
            || !source.row_lock.is_empty()
            || target.method != Method::Hash
            || anchor.method != Method::Hash
            || anchor.colocation_id != target.colocation_id
        {
            return None;
        }
        let target_attno = target.distribution_attno()?;
        let lineage = Lineage {
            stmt,
            scan,
            source: &source,
            colocation_id: target.colocation_id,
        };
        let relation = pg_sys::RelationIdGetRelation(target.oid);
        let tupdesc = (*relation).rd_att;
        let mut columns = Vec::new();
        let mut select = Vec::new();
        let mut routed = false;
        let mut complete = true;
        for entry in PgList::<pg_sys::TargetEntry>::from_pg((*child).targetlist).iter_ptr() {
            if (*entry).resjunk {
                continue;
            }
            let attribute = (*tupdesc).attrs.as_ptr().add((*entry).resno as usize - 1);
            if (*attribute).attisdropped || (*attribute).attgenerated != 0 {
                continue;
            }
            let value = match lineage.origin(child, (*entry).expr.cast()) {
                Some(Origin::Column { position, key }) => {
                    routed |= key && (*entry).resno == target_attno;
                    format!("s.c{position}")
                }
                Some(Origin::Constant(text)) => text,
                None => {
                    complete = false;
                    break;
                }
            };
            columns.push(quote_identifier(
                &CStr::from_ptr((*attribute).attname.data.as_ptr()).to_string_lossy(),
            ));
            select.push(value);
        }
        pg_sys::RelationClose(relation);
        if !complete || !routed {
            return None;
        }
        let width = match (*scan).scan.scanrelid {
            0 => pg_sys::list_length((*scan).custom_scan_tlist) as usize,
            _ => source.columns.len(),
        };
        let names: Vec<String> = (1..=width).map(|i| format!("c{i}")).collect();
        Some(format!(
            "INSERT INTO ${} ({}) SELECT {} FROM ({{fragment}}) AS s({})",
            crate::planner::shippable::RELATION_BASE + INSERT_TARGET_RTI as i32,
            columns.join(", "),
            select.join(", "),
            names.join(", ")
        ))
    }
}

/// The Distributed Scan under `plan` when only filter-free projections and subquery scans
/// stand between them.
unsafe fn distributed_scan_below(mut plan: *mut pg_sys::Plan) -> Option<*mut pg_sys::CustomScan> {
    // SAFETY: walks a finished plan tree.
    unsafe {
        loop {
            if plan.is_null() || !(*plan).qual.is_null() {
                return None;
            }
            plan = match (*plan).type_ {
                pg_sys::NodeTag::T_CustomScan => {
                    let scan = plan.cast::<pg_sys::CustomScan>();
                    let name = CStr::from_ptr((*(*scan).methods).CustomName);
                    return (name == crate::planner::scan_path::SCAN_NAME).then_some(scan);
                }
                pg_sys::NodeTag::T_Result
                    if (*plan.cast::<pg_sys::Result>()).resconstantqual.is_null() =>
                {
                    (*plan).lefttree
                }
                pg_sys::NodeTag::T_SubqueryScan => (*plan.cast::<pg_sys::SubqueryScan>()).subplan,
                _ => return None,
            };
        }
    }
}

/// Where a value of a pushed-down INSERT … SELECT comes from.
enum Origin {
    /// Fragment column `position` (1-based); `key` when it is the distribution column of a
    /// table co-located with the INSERT's.
    Column { position: usize, key: bool },
    /// A constant, as SQL.
    Constant(String),
}

/// Follows expressions down the plan from the INSERT's child to its Distributed Scan.
struct Lineage<'a> {
    stmt: *mut pg_sys::PlannedStmt,
    scan: *mut pg_sys::CustomScan,
    source: &'a crate::planner::scan_path::ScanPlan,
    colocation_id: i32,
}

impl Lineage<'_> {
    /// The origin of `expr`, evaluated in `plan`'s target list; None when it is computed on
    /// the way (which the coordinator must do).
    unsafe fn origin(&self, plan: *mut pg_sys::Plan, expr: *mut pg_sys::Node) -> Option<Origin> {
        // SAFETY: expressions and target lists of a finished plan.
        unsafe {
            match (*expr).type_ {
                pg_sys::NodeTag::T_Const => {
                    return Some(Origin::Constant(constant_text(expr.cast())));
                }
                pg_sys::NodeTag::T_Var => {}
                _ => return None,
            }
            let var = expr.cast::<pg_sys::Var>();
            if (*var).varlevelsup != 0 {
                return None;
            }
            let entry_of = |plan: *mut pg_sys::Plan| {
                let list = (*plan).targetlist;
                let entry = (*var).varattno as i32 - 1;
                (entry >= 0 && entry < pg_sys::list_length(list))
                    .then(|| (*pg_sys::list_nth(list, entry).cast::<pg_sys::TargetEntry>()).expr)
            };
            match (*plan).type_ {
                pg_sys::NodeTag::T_Result if (*var).varno == pg_sys::OUTER_VAR => {
                    let lower = (*plan).lefttree;
                    self.origin(lower, entry_of(lower)?.cast())
                }
                pg_sys::NodeTag::T_SubqueryScan
                    if (*var).varno == (*plan.cast::<pg_sys::Scan>()).scanrelid as i32 =>
                {
                    let lower = (*plan.cast::<pg_sys::SubqueryScan>()).subplan;
                    self.origin(lower, entry_of(lower)?.cast())
                }
                pg_sys::NodeTag::T_CustomScan if plan == self.scan.cast() => {
                    self.fragment_column(var)
                }
                _ => None,
            }
        }
    }

    /// The fragment column a Var of the Distributed Scan's target list reads.
    unsafe fn fragment_column(&self, var: *mut pg_sys::Var) -> Option<Origin> {
        // SAFETY: the scan's target lists and the statement's range table.
        unsafe {
            let scanrelid = (*self.scan).scan.scanrelid;
            if scanrelid == 0 && (*var).varno == pg_sys::INDEX_VAR {
                let tlist = (*self.scan).custom_scan_tlist;
                let position = (*var).varattno as usize;
                if position == 0 || position > pg_sys::list_length(tlist) as usize {
                    return None;
                }
                let entry =
                    pg_sys::list_nth(tlist, position as i32 - 1).cast::<pg_sys::TargetEntry>();
                let inner = (*entry).expr.cast::<pg_sys::Node>();
                let key = (*inner).type_ == pg_sys::NodeTag::T_Var && self.is_key(inner.cast());
                Some(Origin::Column { position, key })
            } else if scanrelid != 0 && (*var).varno == scanrelid as i32 {
                let index = self
                    .source
                    .columns
                    .iter()
                    .position(|a| *a == (*var).varattno)?;
                Some(Origin::Column {
                    position: index + 1,
                    key: self.is_key(var),
                })
            } else {
                None
            }
        }
    }

    /// Whether `var` is the distribution column of a table co-located with the INSERT's.
    unsafe fn is_key(&self, var: *mut pg_sys::Var) -> bool {
        // SAFETY: varno indexes the statement's range table.
        unsafe {
            if (*var).varno < 1 || (*var).varno > pg_sys::list_length((*self.stmt).rtable) {
                return false;
            }
            let entry = pg_sys::list_nth((*self.stmt).rtable, (*var).varno - 1)
                .cast::<pg_sys::RangeTblEntry>();
            cache::lookup((*entry).relid).is_some_and(|table| {
                table.method == Method::Hash
                    && table.colocation_id == self.colocation_id
                    && table.distribution_attno() == Some((*var).varattno)
            })
        }
    }
}

/// A constant as SQL: `NULL`, or its text cast to its type.
unsafe fn constant_text(constant: *mut pg_sys::Const) -> String {
    use crate::executor::scan::{datum_text, typed_literal};
    // SAFETY: the constant's own type output function on its non-NULL value.
    let value = unsafe {
        (!(*constant).constisnull)
            .then(|| datum_text((*constant).consttype, (*constant).constvalue))
    };
    typed_literal(value)
}

fn table_name(table: &DistTable) -> String {
    crate::distribution::create::relation_name(table.oid)
}

/// The name of column `attno` of `relid`, quoted.
unsafe fn column_name(relid: pg_sys::Oid, attno: i16) -> String {
    // SAFETY: attno is a column of relid.
    unsafe {
        quote_identifier(
            &CStr::from_ptr(pg_sys::get_attname(relid, attno, false)).to_string_lossy(),
        )
    }
}

/// True when `expr` is just column `attno` of the table itself.
unsafe fn is_same_column(expr: *mut pg_sys::Node, attno: i16) -> bool {
    // SAFETY: expr is a valid expression; the cast follows the tag.
    unsafe {
        (*expr).type_ == pg_sys::NodeTag::T_Var && (*expr.cast::<pg_sys::Var>()).varattno == attno
    }
}

/// What the workers run for `parse`, a write to `table`.
pub unsafe fn analyse(
    parse: *mut pg_sys::Query,
    table: &DistTable,
) -> Result<AnalysedWrite, PlannerError> {
    // SAFETY: parse is a valid analysed statement; everything read belongs to it.
    unsafe {
        let (deletes, sets) = changed_rows(parse);
        if deletes || !sets.is_empty() {
            let assigned = (!deletes).then_some(sets.as_slice());
            if let Some(referencing) = foreign_keys::local_reference_blocking(table.oid, assigned) {
                return Err(PlannerError::LocalReference(table_name(table), referencing));
            }
            if let Some(child) = foreign_keys::cascade_into_row_triggers(table.oid, deletes, &sets)
            {
                return Err(PlannerError::CascadeSkipsTriggers(table_name(table), child));
            }
        }
        let quals = (*(*parse).jointree).quals;
        if shippable::has_node(quals, &[pg_sys::NodeTag::T_CurrentOfExpr]) {
            return Err(PlannerError::CurrentOf(table_name(table)));
        }
        let returning_list = (*parse).returningList;
        if pg_sys::checkExprHasSubLink(returning_list.cast()) {
            return Err(PlannerError::ModifyExpression(
                table_name(table),
                "a subquery in RETURNING".into(),
            ));
        }
        let mut coordinator_values = Vec::new();
        let mut modify = ModifyPlan {
            kind: ModifyKind::Insert,
            relid: table.oid,
            alias: String::new(),
            on_conflict: String::new(),
            conflict_constraint: String::new(),
            set_sql: String::new(),
            where_sql: String::new(),
            shard_ids: Vec::new(),
            prune_param: 0,
            returning: !returning_list.is_null(),
            can_set_tag: true,
            insert_select: String::new(),
            statement: String::new(),
            relations: Vec::new(),
            target_alias: String::new(),
            returning_extra: Vec::new(),
            returning_extra_sql: String::new(),
            row_source: String::new(),
            set_attnos: Vec::new(),
            upsert_source: String::new(),
            conflict_target: String::new(),
            merge_events: Vec::new(),
            merge_actions: String::new(),
            runs_before_writes_to: Vec::new(),
            broadcasts: Vec::new(),
        };
        match (*parse).commandType {
            pg_sys::CmdType::CMD_INSERT => {
                if !(*parse).onConflict.is_null() {
                    on_conflict(parse, table, &mut modify, &mut coordinator_values)?;
                }
            }
            pg_sys::CmdType::CMD_UPDATE | pg_sys::CmdType::CMD_DELETE => {
                modify.kind = if (*parse).commandType == pg_sys::CmdType::CMD_UPDATE {
                    ModifyKind::Update
                } else {
                    ModifyKind::Delete
                };
                // The target's policies become conditions of the statement itself.
                let parse = crate::planner::security_quals::in_where_clause(parse);
                update_or_delete(parse, table, &mut modify, &mut coordinator_values)?;
            }
            pg_sys::CmdType::CMD_MERGE => {
                modify.kind = ModifyKind::Merge;
                modify.merge_events = merge_events(parse);
                let row_triggers = modify
                    .merge_events
                    .iter()
                    .any(|event| triggers::find(table.oid, *event).rows);
                let merge = crate::planner::merge_plan::plan(
                    parse,
                    table,
                    &mut coordinator_values,
                    row_triggers,
                )?;
                modify.statement = merge.statement;
                modify.relations = merge.relations;
                modify.target_alias = merge.target_alias;
                modify.broadcasts = merge.broadcasts;
                modify.row_source = merge.row_source;
                modify.set_attnos = merge.set_attnos;
                modify.merge_actions = merge.actions;
                modify.shard_ids = cache::shards(table.oid).iter().map(|(id, _)| *id).collect();
            }
            _ => return Err(PlannerError::Writes(table_name(table))),
        }
        let mut values = PgList::new();
        for value in coordinator_values {
            values.push(value);
        }
        let returning = match modify.returning_extra.is_empty() {
            true => std::ptr::null_mut(),
            false => pg_sys::copyObjectImpl(returning_list.cast()).cast(),
        };
        Ok(AnalysedWrite {
            modify,
            values,
            returning,
            result_rti: (*parse).resultRelation,
        })
    }
}

/// The events of MERGE `parse`'s actions, in PostgreSQL's order for BEFORE STATEMENT triggers.
unsafe fn merge_events(parse: *mut pg_sys::Query) -> Vec<Event> {
    // SAFETY: parse is a valid analysed MERGE.
    let actions: Vec<pg_sys::CmdType::Type> = unsafe {
        PgList::<pg_sys::MergeAction>::from_pg((*parse).mergeActionList)
            .iter_ptr()
            .map(|action| (*action).commandType)
            .collect()
    };
    [
        (pg_sys::CmdType::CMD_INSERT, Event::Insert),
        (pg_sys::CmdType::CMD_UPDATE, Event::Update),
        (pg_sys::CmdType::CMD_DELETE, Event::Delete),
    ]
    .into_iter()
    .filter(|(command, _)| actions.contains(command))
    .map(|(_, event)| event)
    .collect()
}

/// True when `on_conflict` (`ModifyPlan::on_conflict`) is `ON CONFLICT … DO UPDATE …`.
pub fn is_conflict_update(on_conflict: &str) -> bool {
    !on_conflict.is_empty() && !on_conflict.ends_with(" DO NOTHING")
}

/// Whether the write `parse` deletes rows, and the columns it updates (ON CONFLICT DO UPDATE
/// and MERGE actions included).
unsafe fn changed_rows(parse: *mut pg_sys::Query) -> (bool, Vec<i16>) {
    // SAFETY: parse is a valid analysed statement writing relid, which it has locked.
    unsafe {
        let assigned = |targets: *mut pg_sys::List| -> Vec<i16> {
            PgList::<pg_sys::TargetEntry>::from_pg(targets)
                .iter_ptr()
                .filter(|tle| !(**tle).resjunk)
                .map(|tle| (*tle).resno)
                .collect()
        };
        let mut deletes = false;
        let mut sets = Vec::new();
        match (*parse).commandType {
            pg_sys::CmdType::CMD_DELETE => deletes = true,
            pg_sys::CmdType::CMD_UPDATE => sets = assigned((*parse).targetList),
            pg_sys::CmdType::CMD_INSERT if !(*parse).onConflict.is_null() => {
                sets = assigned((*(*parse).onConflict).onConflictSet)
            }
            pg_sys::CmdType::CMD_MERGE => {
                for action in
                    PgList::<pg_sys::MergeAction>::from_pg((*parse).mergeActionList).iter_ptr()
                {
                    match (*action).commandType {
                        pg_sys::CmdType::CMD_DELETE => deletes = true,
                        pg_sys::CmdType::CMD_UPDATE => sets.extend(assigned((*action).targetList)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        (deletes, sets)
    }
}

unsafe fn update_or_delete(
    parse: *mut pg_sys::Query,
    table: &DistTable,
    modify: &mut ModifyPlan,
    values: &mut Vec<*mut pg_sys::Node>,
) -> Result<(), PlannerError> {
    // SAFETY: parse is a valid UPDATE or DELETE; expressions are copied before folding.
    unsafe {
        let result_rti = (*parse).resultRelation;
        let jointree = (*parse).jointree;
        let from = PgList::<pg_sys::Node>::from_pg((*jointree).fromlist);
        let only_target = from.len() == 1
            && from.get_ptr(0).is_some_and(|n| {
                (*n).type_ == pg_sys::NodeTag::T_RangeTblRef
                    && (*n.cast::<pg_sys::RangeTblRef>()).rtindex == result_rti
            });
        let dist_attno = table.distribution_attno();
        if !only_target
            || pg_sys::checkExprHasSubLink((*parse).targetList.cast())
            || pg_sys::checkExprHasSubLink((*jointree).quals)
        {
            return whole_statement(parse, table, modify, values);
        }
        let mut set_values = Vec::new();
        if modify.kind == ModifyKind::Update {
            let mut assignments = Vec::new();
            for entry in PgList::<pg_sys::TargetEntry>::from_pg((*parse).targetList).iter_ptr() {
                if (*entry).resjunk {
                    continue;
                }
                let attno = (*entry).resno;
                let expr = (*entry).expr.cast::<pg_sys::Node>();
                if Some(attno) == dist_attno && !is_same_column(expr, attno) {
                    return Err(PlannerError::DistributionColumnUpdate(
                        table_name(table),
                        table.distribution_column.clone().unwrap_or_default(),
                    ));
                }
                let expr = with_coordinator_values(folded(expr), values);
                if !shippable(expr) {
                    return Err(PlannerError::ModifyExpression(
                        table_name(table),
                        format!("the new value of column {}", column_name(table.oid, attno)),
                    ));
                }
                let (text, exec_params) = deparse(expr, table.oid, result_rti as u32);
                if !exec_params.is_empty() {
                    return Err(PlannerError::ModifyExpression(
                        table_name(table),
                        "a subquery".into(),
                    ));
                }
                assignments.push(format!("{} = {text}", column_name(table.oid, attno)));
                set_values.push(text);
                modify.set_attnos.push(attno);
            }
            modify.set_sql = assignments.join(", ");
        }
        let mut clauses: Vec<*mut pg_sys::Node> = Vec::new();
        if !(*jointree).quals.is_null() {
            let quals = folded((*jointree).quals);
            for clause in
                PgList::<pg_sys::Node>::from_pg(pg_sys::make_ands_implicit(quals.cast())).iter_ptr()
            {
                clauses.push(clause);
            }
        }
        let mut parts = Vec::new();
        for clause in &clauses {
            let clause = &with_coordinator_values(*clause, values);
            if !shippable(*clause) {
                return Err(PlannerError::ModifyExpression(
                    table_name(table),
                    "the WHERE clause".into(),
                ));
            }
            let (text, exec_params) = deparse(*clause, table.oid, result_rti as u32);
            if !exec_params.is_empty() {
                return Err(PlannerError::ModifyExpression(
                    table_name(table),
                    "a subquery".into(),
                ));
            }
            parts.push(format!("({text})"));
        }
        modify.where_sql = parts.join(" AND ");
        let event = match modify.kind {
            ModifyKind::Update => Event::Update,
            _ => Event::Delete,
        };
        if triggers::find(table.oid, event).rows {
            let (columns, _) = crate::executor::modify::returning_columns(table.oid, "");
            let mut source = format!("SELECT {ROW_TAG_SQL}, ctid, tableoid, {columns}");
            for value in &set_values {
                source.push_str(&format!(", {value}"));
            }
            source.push_str(&format!(" FROM ${RELATION_BASE}"));
            if !modify.where_sql.is_empty() {
                source.push_str(&format!(" WHERE {}", modify.where_sql));
            }
            source.push_str(match modify.kind {
                ModifyKind::Update => " FOR NO KEY UPDATE",
                _ => " FOR UPDATE",
            });
            modify.row_source = source;
        }
        let shards = cache::shards(table.oid);
        let all = || shards.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        (modify.shard_ids, modify.prune_param) = match table.method {
            Method::Hash => crate::planner::scan_path::prune(table, &clauses, &shards),
            Method::Range => (
                crate::planner::range_pruning::prune(
                    table,
                    &clauses,
                    &cache::placements(table.oid),
                )
                .unwrap_or_else(all),
                0,
            ),
            Method::Reference => (all(), 0),
        };
        Ok(())
    }
}

/// An UPDATE or DELETE that reads other tables or has subqueries: the whole statement runs on
/// every shard when `modify_pushdown` finds that exact — as it is, or else with its
/// uncorrelated subqueries computed on the coordinator first (`coordinator_subqueries`).
unsafe fn whole_statement(
    parse: *mut pg_sys::Query,
    table: &DistTable,
    modify: &mut ModifyPlan,
    values: &mut Vec<*mut pg_sys::Node>,
) -> Result<(), PlannerError> {
    // SAFETY: parse is a valid UPDATE or DELETE of `table`.
    let (pushdown, own, computed) = unsafe {
        match statement_for_shards(private_copy(parse, false).unwrap_or(parse), table) {
            Ok(done) => done,
            Err(first) => match private_copy(parse, true) {
                Some(copy) => statement_for_shards(copy, table)?,
                // Without subqueries to compute first, the first reason stands.
                None => return Err(first),
            },
        }
    };
    values.extend(computed);
    modify.statement = pushdown.statement;
    modify.relations = pushdown.relations;
    modify.target_alias = pushdown.target_alias;
    modify.broadcasts = pushdown.broadcasts;
    modify.returning_extra = pushdown.returning_extra;
    modify.returning_extra_sql = pushdown.returning_extra_sql;
    modify.row_source = pushdown.row_source;
    modify.set_attnos = pushdown.set_attnos;
    let shards = cache::shards(table.oid);
    // SAFETY: `own` are conditions on the target's columns only.
    (modify.shard_ids, modify.prune_param) = match table.method {
        Method::Hash => unsafe { crate::planner::scan_path::prune(table, &own, &shards) },
        _ => (shards.iter().map(|(id, _)| *id).collect(), 0),
    };
    Ok(())
}

/// A copy of `parse` with its plain WITH queries inlined, the data-modifying ones nobody
/// reads left out (they run as subplans of their own: `with_writes.rs`) and, with
/// `compute_subqueries`, its uncorrelated subqueries turned into values the coordinator
/// computes (None when it has none).
unsafe fn private_copy(
    parse: *mut pg_sys::Query,
    compute_subqueries: bool,
) -> Option<*mut pg_sys::Query> {
    // SAFETY: copies the valid statement `parse` and changes only the copy.
    unsafe {
        let copy = pg_sys::copyObjectImpl(parse.cast()).cast::<pg_sys::Query>();
        let mut kept = PgList::<pg_sys::CommonTableExpr>::new();
        for cte in PgList::<pg_sys::CommonTableExpr>::from_pg((*copy).cteList).iter_ptr() {
            let body = (*cte).ctequery.cast::<pg_sys::Query>();
            if (*body).commandType == pg_sys::CmdType::CMD_SELECT || (*cte).cterefcount > 0 {
                kept.push(cte);
            }
        }
        (*copy).cteList = kept.into_pg();
        crate::planner::modify_pushdown::inline_with_queries(copy);
        (!compute_subqueries || crate::planner::coordinator_subqueries::compute_first(copy))
            .then_some(copy)
    }
}

/// The statement for the shards, the conditions that prune the target's shards, and the
/// values the coordinator computes (numbered from 0: the statement has no others).
type ForShards = (
    crate::planner::modify_pushdown::Pushdown,
    Vec<*mut pg_sys::Node>,
    Vec<*mut pg_sys::Node>,
);

/// `copy` (a private copy of the statement, changed here) made ready for the shards.
unsafe fn statement_for_shards(
    copy: *mut pg_sys::Query,
    table: &DistTable,
) -> Result<ForShards, PlannerError> {
    // SAFETY: copy is a private copy of a valid UPDATE or DELETE of `table`.
    unsafe {
        let mut values = Vec::new();
        let result_rti = (*copy).resultRelation;
        let dist_attno = table.distribution_attno();
        for entry in PgList::<pg_sys::TargetEntry>::from_pg((*copy).targetList).iter_ptr() {
            let attno = (*entry).resno;
            // (A junk entry — the subquery of `SET (a, b) = (SELECT …)` — sets no column.)
            if !(*entry).resjunk
                && Some(attno) == dist_attno
                && !is_same_column((*entry).expr.cast(), attno)
            {
                return Err(PlannerError::DistributionColumnUpdate(
                    table_name(table),
                    table.distribution_column.clone().unwrap_or_default(),
                ));
            }
            (*entry).expr =
                with_coordinator_values(folded((*entry).expr.cast()), &mut values).cast();
        }
        let jointree = (*copy).jointree;
        if !(*jointree).quals.is_null() {
            (*jointree).quals = with_coordinator_values(folded((*jointree).quals), &mut values);
        }
        // Values inside its subqueries (`now()` in a correlated EXISTS) are computed once too.
        crate::planner::each_query(copy.cast(), &mut |level| {
            if level != copy {
                coordinator_values_of_level(level, &mut values);
            }
        });
        // Conditions on the target's own columns prune its shards; the other distributed
        // tables follow (same shard index).
        let own: Vec<*mut pg_sys::Node> =
            PgList::<pg_sys::Node>::from_pg(pg_sys::make_ands_implicit((*jointree).quals.cast()))
                .iter_ptr()
                .filter(|clause| {
                    let varnos = pg_sys::pull_varnos(std::ptr::null_mut(), *clause);
                    !pg_sys::checkExprHasSubLink(*clause)
                        && pg_sys::bms_membership(varnos) == pg_sys::BMS_Membership::BMS_SINGLETON
                        && pg_sys::bms_is_member(result_rti, varnos)
                })
                .collect();
        let event = match (*copy).commandType {
            pg_sys::CmdType::CMD_UPDATE => Event::Update,
            _ => Event::Delete,
        };
        let lock_rows = triggers::find(table.oid, event).rows;
        let pushdown = crate::planner::modify_pushdown::plan(copy, table, lock_rows)?;
        Ok((pushdown, own, values))
    }
}

/// Replaces the values the coordinator can compute in the expressions of subquery `query`
/// (its select list, WHERE, JOIN … ON and HAVING) by placeholders, appending them to `values`.
unsafe fn coordinator_values_of_level(
    query: *mut pg_sys::Query,
    values: &mut Vec<*mut pg_sys::Node>,
) {
    unsafe fn join_conditions(node: *mut pg_sys::Node, values: &mut Vec<*mut pg_sys::Node>) {
        // SAFETY: node is a FROM-list item of a private copy of the statement.
        unsafe {
            match (*node).type_ {
                pg_sys::NodeTag::T_JoinExpr => {
                    let join = node.cast::<pg_sys::JoinExpr>();
                    (*join).quals = with_coordinator_values((*join).quals, values);
                    join_conditions((*join).larg, values);
                    join_conditions((*join).rarg, values);
                }
                pg_sys::NodeTag::T_FromExpr => {
                    let from = node.cast::<pg_sys::FromExpr>();
                    (*from).quals = with_coordinator_values((*from).quals, values);
                    for item in PgList::<pg_sys::Node>::from_pg((*from).fromlist).iter_ptr() {
                        join_conditions(item, values);
                    }
                }
                _ => {}
            }
        }
    }
    // SAFETY: query is a level of a private copy of the statement; nodes are replaced in place.
    unsafe {
        for entry in PgList::<pg_sys::TargetEntry>::from_pg((*query).targetList).iter_ptr() {
            (*entry).expr = with_coordinator_values((*entry).expr.cast(), values).cast();
        }
        join_conditions((*query).jointree.cast(), values);
        (*query).havingQual = with_coordinator_values((*query).havingQual, values);
    }
}

/// A copy of `expr` with constant subexpressions folded (so `id = 2 + 3` prunes like `id = 5`).
unsafe fn folded(expr: *mut pg_sys::Node) -> *mut pg_sys::Node {
    // SAFETY: folds a private copy; without planner state only immutable functions are folded.
    unsafe {
        let copy = pg_sys::copyObjectImpl(expr.cast()).cast::<pg_sys::Node>();
        pg_sys::eval_const_expressions(std::ptr::null_mut(), copy)
    }
}

/// `ON CONFLICT …` of an INSERT as SQL for the shards.
unsafe fn on_conflict(
    parse: *mut pg_sys::Query,
    table: &DistTable,
    modify: &mut ModifyPlan,
    values: &mut Vec<*mut pg_sys::Node>,
) -> Result<(), PlannerError> {
    // SAFETY: parse has an OnConflictExpr; expressions are deparsed against the statement's own
    // range table (target and EXCLUDED), names qualified.
    unsafe {
        let conflict = (*parse).onConflict;
        let result_rti = (*parse).resultRelation;
        let context = Deparser::new(parse, result_rti, (*conflict).exclRelIndex);
        modify.alias = context.name_of(result_rti);
        let mut sql = String::from("ON CONFLICT");
        let mut arbiter: Vec<String> = Vec::new();
        if (*conflict).constraint != pg_sys::InvalidOid {
            modify.conflict_constraint =
                CStr::from_ptr(pg_sys::get_constraint_name((*conflict).constraint))
                    .to_string_lossy()
                    .into_owned();
            sql.push_str(" ON CONSTRAINT {constraint}");
            arbiter = constraint_columns((*conflict).constraint)
                .into_iter()
                .map(|attno| column_name(table.oid, attno))
                .collect();
        } else if !(*conflict).arbiterElems.is_null() {
            let mut columns = Vec::new();
            for elem in
                PgList::<pg_sys::InferenceElem>::from_pg((*conflict).arbiterElems).iter_ptr()
            {
                let expr = (*elem).expr.cast::<pg_sys::Node>();
                if (*expr).type_ != pg_sys::NodeTag::T_Var
                    || (*elem).infercollid != pg_sys::InvalidOid
                    || (*elem).inferopclass != pg_sys::InvalidOid
                {
                    return Err(PlannerError::ModifyExpression(
                        table_name(table),
                        "an ON CONFLICT target other than plain columns".into(),
                    ));
                }
                columns.push(column_name(
                    table.oid,
                    (*expr.cast::<pg_sys::Var>()).varattno,
                ));
            }
            sql.push_str(&format!(" ({})", columns.join(", ")));
            if !(*conflict).arbiterWhere.is_null() {
                sql.push_str(&format!(
                    " WHERE {}",
                    context.shipped(
                        table,
                        (*conflict).arbiterWhere,
                        "the ON CONFLICT WHERE",
                        values
                    )?
                ));
            }
            arbiter = columns;
        }
        let target = sql["ON CONFLICT".len()..].trim_start().to_string();
        if (*conflict).action == pg_sys::OnConflictAction::ONCONFLICT_NOTHING {
            sql.push_str(" DO NOTHING");
        } else {
            let dist_attno = table.distribution_attno();
            let mut assignments = Vec::new();
            let mut set_values = Vec::new();
            for entry in
                PgList::<pg_sys::TargetEntry>::from_pg((*conflict).onConflictSet).iter_ptr()
            {
                if (*entry).resjunk {
                    continue;
                }
                let attno = (*entry).resno;
                let expr = (*entry).expr.cast::<pg_sys::Node>();
                let unchanged = (*expr).type_ == pg_sys::NodeTag::T_Var
                    && (*expr.cast::<pg_sys::Var>()).varattno == attno;
                if Some(attno) == dist_attno && !unchanged {
                    return Err(PlannerError::DistributionColumnUpdate(
                        table_name(table),
                        table.distribution_column.clone().unwrap_or_default(),
                    ));
                }
                let value =
                    context.shipped(table, expr, "an ON CONFLICT DO UPDATE value", values)?;
                assignments.push(format!("{} = {value}", column_name(table.oid, attno)));
                set_values.push((attno, value));
            }
            sql.push_str(&format!(" DO UPDATE SET {}", assignments.join(", ")));
            let condition = match (*conflict).onConflictWhere.is_null() {
                true => None,
                false => Some(context.shipped(
                    table,
                    (*conflict).onConflictWhere,
                    "the DO UPDATE WHERE",
                    values,
                )?),
            };
            // In PostgreSQL's order: the existing row's checks, the DO UPDATE WHERE, the new
            // row's checks (a row the WHERE skips is not updated, so not checked).
            use pg_sys::WCOKind::{WCO_RLS_CONFLICT_CHECK, WCO_RLS_UPDATE_CHECK};
            let existing = policy_checks(parse, table, &context, values, WCO_RLS_CONFLICT_CHECK)?;
            let new = policy_checks(parse, table, &context, values, WCO_RLS_UPDATE_CHECK)?;
            let row_triggers = triggers::find(table.oid, Event::Insert).rows
                || triggers::find(table.oid, Event::Update).rows;
            if row_triggers {
                if existing.is_some() || new.is_some() || arbiter.is_empty() {
                    return Err(PlannerError::Triggers(
                        table_name(table),
                        "INSERT … ON CONFLICT DO UPDATE under row-level security or on an \
                         expression"
                            .into(),
                    ));
                }
                modify.upsert_source = upsert_source(
                    table,
                    &modify.alias,
                    &arbiter,
                    &set_values,
                    condition.as_deref(),
                );
                modify.set_attnos = set_values.iter().map(|(attno, _)| *attno).collect();
                modify.conflict_target = target.clone();
            }
            let only_if = |first: Option<String>, then: Option<String>| match (first, then) {
                (Some(first), Some(then)) => {
                    Some(format!("CASE WHEN {first} THEN {then} ELSE false END"))
                }
                (first, then) => first.or(then),
            };
            if let Some(clause) = only_if(existing, only_if(condition, new)) {
                sql.push_str(&format!(" WHERE {clause}"));
            }
        }
        modify.on_conflict = sql;
        Ok(())
    }
}

/// The locking SELECT of an upsert run row by row (`ModifyPlan::upsert_source`).
unsafe fn upsert_source(
    table: &DistTable,
    alias: &str,
    arbiter: &[String],
    set_values: &[(i16, String)],
    condition: Option<&str>,
) -> String {
    // SAFETY: the table is locked by the statement being planned.
    let (qualified, _) = unsafe { crate::executor::modify::returning_columns(table.oid, alias) };
    let (names, _) = unsafe { crate::executor::modify::returning_columns(table.oid, "") };
    let mut select = format!(
        "SELECT {ROW_TAG_SQL}, {alias}.ctid, {alias}.tableoid, {qualified}, excluded.pgdist_n"
    );
    for (_, value) in set_values {
        select.push_str(&format!(", {value}"));
    }
    select.push_str(&format!(", ({})", condition.unwrap_or("true")));
    let matches: Vec<String> = arbiter
        .iter()
        .map(|column| format!("{alias}.{column} = excluded.{column}"))
        .collect();
    format!(
        "{select} FROM ${RELATION_BASE} AS {alias} JOIN (VALUES {{rows}}) AS excluded (pgdist_n, \
         {names}) ON {} FOR UPDATE OF {alias}",
        matches.join(" AND ")
    )
}

/// The columns of constraint `oid`.
unsafe fn constraint_columns(oid: pg_sys::Oid) -> Vec<i16> {
    pgrx::Spi::get_one_with_args::<Vec<i16>>(
        "SELECT conkey FROM pg_catalog.pg_constraint WHERE oid = $1",
        &[oid.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// The row-level security checks of `kind` that the shards make on a conflicting row of an
/// `INSERT … ON CONFLICT DO UPDATE`, as one condition of calls of `pgdist.policy_check` for
/// its DO UPDATE WHERE (None: no such check): UPDATE's USING conditions on the existing row
/// (`WCO_RLS_CONFLICT_CHECK`), or its WITH CHECK conditions on the new row — the existing row
/// with the DO UPDATE SET values in place of its columns (`WCO_RLS_UPDATE_CHECK`). INSERT's
/// checks are made on the coordinator before the rows are routed.
unsafe fn policy_checks(
    parse: *mut pg_sys::Query,
    table: &DistTable,
    context: &Deparser,
    values: &mut Vec<*mut pg_sys::Node>,
    kind: pg_sys::WCOKind::Type,
) -> Result<Option<String>, PlannerError> {
    use pg_sys::WCOKind::WCO_RLS_UPDATE_CHECK;
    // SAFETY: parse is a valid INSERT … ON CONFLICT DO UPDATE; its check options are rewritten
    // on copies.
    unsafe {
        let result_rti = (*parse).resultRelation;
        // (The statement's own target: always in its range table.)
        let target = crate::planner::merge_plan::range_entry((*parse).rtable, result_rti);
        let mut checks = Vec::new();
        let options = PgList::<pg_sys::WithCheckOption>::from_pg((*parse).withCheckOptions);
        for option in options.iter_ptr().filter(|o| (**o).kind == kind) {
            let condition = match kind {
                WCO_RLS_UPDATE_CHECK => {
                    if has_generated_columns(table.oid) {
                        return Err(PlannerError::RowSecurity(table_name(table)));
                    }
                    let set = (*(*parse).onConflict).onConflictSet;
                    security_quals::on_new_row(option, result_rti, target, set, true)
                }
                // A membership policy's subquery is computed first, as in UPDATE.
                _ => crate::planner::coordinator_subqueries::computed_first_in(
                    pg_sys::copyObjectImpl((*option).qual.cast()).cast(),
                ),
            };
            let text = context.shipped(table, condition, "a row-level security policy", values)?;
            checks.push(security_quals::check_call(&text, option));
        }
        Ok((!checks.is_empty()).then(|| checks.join(" AND ")))
    }
}

/// True when table `relid` has stored generated columns (computed on the shards).
pub(crate) unsafe fn has_generated_columns(relid: pg_sys::Oid) -> bool {
    // SAFETY: the table is locked by the statement being planned.
    unsafe {
        let relation = pg_sys::RelationIdGetRelation(relid);
        let constraints = (*(*relation).rd_att).constr;
        let generated = !constraints.is_null() && (*constraints).has_generated_stored;
        pg_sys::RelationClose(relation);
        generated
    }
}

/// Deparses expressions over several range-table entries of a statement, column names
/// qualified by each entry's name.
struct Deparser {
    context: *mut pg_sys::List,
    names: Vec<String>,
}

impl Deparser {
    unsafe fn new(parse: *mut pg_sys::Query, a: i32, b: i32) -> Deparser {
        // SAFETY: a stand-in PlannedStmt that only carries the range table, which is all
        // ruleutils reads from it to name relations and columns.
        unsafe {
            let stmt = pg_sys::palloc0(std::mem::size_of::<pg_sys::PlannedStmt>())
                .cast::<pg_sys::PlannedStmt>();
            (*stmt).type_ = pg_sys::NodeTag::T_PlannedStmt;
            (*stmt).rtable = (*parse).rtable;
            let mut used: *mut pg_sys::Bitmapset = std::ptr::null_mut();
            used = pg_sys::bms_add_member(used, a);
            used = pg_sys::bms_add_member(used, b);
            let names_list = pg_sys::select_rtable_names_for_explain((*parse).rtable, used);
            let names = PgList::<std::ffi::c_char>::from_pg(names_list)
                .iter_ptr()
                .map(|p| {
                    if p.is_null() {
                        String::new()
                    } else {
                        CStr::from_ptr(p).to_string_lossy().into_owned()
                    }
                })
                .collect();
            Deparser {
                context: pg_sys::deparse_context_for_plan_tree(stmt, names_list),
                names,
            }
        }
    }

    /// The name range-table entry `rti` goes by, quoted.
    fn name_of(&self, rti: i32) -> String {
        quote_identifier(self.names.get(rti as usize - 1).map_or("", String::as_str))
    }

    /// The SQL of `expr` if the workers can evaluate it, given the values the coordinator
    /// computes (appended to `values`).
    unsafe fn shipped(
        &self,
        table: &DistTable,
        expr: *mut pg_sys::Node,
        what: &str,
        values: &mut Vec<*mut pg_sys::Node>,
    ) -> Result<String, PlannerError> {
        // SAFETY: expr belongs to the statement whose range table the context describes.
        unsafe {
            let expr = with_coordinator_values(folded(expr), values);
            if !shippable(expr) || pg_sys::checkExprHasSubLink(expr) {
                return Err(PlannerError::ModifyExpression(
                    table_name(table),
                    what.into(),
                ));
            }
            let text = pg_sys::deparse_expression(expr, self.context, true, false);
            Ok(CStr::from_ptr(text).to_string_lossy().into_owned())
        }
    }
}

pub unsafe fn decode(cscan: *mut pg_sys::CustomScan) -> ModifyPlan {
    // SAFETY: custom_private was built by plan().
    ModifyPlan::decode(&unsafe { from_list((*cscan).custom_private) })
}
