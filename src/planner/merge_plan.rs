//! MERGE into a distributed or reference table, run as one MERGE per shard.
//!
//! Each shard can do its part alone when the source rows that can match a target row live
//! beside it: the source is a distributed table co-located with the target and the ON
//! condition equates the two distribution columns, or the source is a reference table (a
//! copy on every node) and nothing is inserted. Any other source whose column of the target's
//! distribution type the ON condition equates with the target's distribution column is
//! *repartitioned*: read first — a distributed or reference table from the workers, anything
//! else (a subquery, a view, VALUES, a function, a table of the coordinator or one with
//! policies) by the coordinator with SQL of its own (`merge_source.rs`) — each shard's MERGE
//! gets, as arrays (`unnest(…) AS pgdist_t2(…)`), the source rows whose value hashes to it,
//! and a shard without any gets no statement. A row that WHEN NOT MATCHED inserts belongs to
//! the shard whose MERGE inserts it only if its distribution value is that source column, so
//! INSERT must set the distribution column to it. UPDATE may not change the distribution
//! column. Into a reference table, every copy gets every source row.
//!
//! PostgreSQL 15 cannot write a MERGE back as SQL, so the statement is written in parts: the
//! ON condition and every expression of the actions are deparsed as one SELECT over the
//! target and the source (ruleutils, names qualified, each table under its `pgdist_t<k>`
//! alias with a placeholder for its shard), split at the top level, and put together as
//! `MERGE INTO … USING … ON … WHEN …`. Values the coordinator computes (parameters, stable
//! functions) are taken out first, as for UPDATE.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::PgList;

use crate::metadata::cache;
use crate::metadata::tables::{DistTable, Method};
use crate::planner::merge_source;
use crate::planner::modify_pushdown::{deparse_with_shards, repartitioned_read, set_alias};
use crate::planner::shippable::{
    shippable, travels_in_array, with_coordinator_values, RELATION_BASE,
};
use crate::planner::PlannerError;
use crate::remote::quote::{quote_identifier, quote_literal};

/// The alias numbers of the target and the source in the shards' MERGE.
const TARGET_K: u32 = 1;
pub(crate) const SOURCE_K: u32 = 2;

/// What the shards run for a MERGE: the statement (`$<RELATION_BASE + k>` for the shard of
/// relation k), its relations and the target's alias.
pub struct MergeForShards {
    pub statement: String,
    pub relations: Vec<(u32, pg_sys::Oid)>,
    pub target_alias: String,
    /// The repartitioned source's read (`ModifyPlan::broadcasts`), if any.
    pub broadcasts: Vec<crate::planner::scan_path::ScanPlan>,
    /// With row triggers: the statement that locks the rows the MERGE changes and returns the
    /// rows it inserts ([`row_source`]), the columns of its SET values and the kind of each
    /// action (empty without row triggers).
    pub row_source: String,
    pub set_attnos: Vec<i16>,
    pub actions: String,
}

/// One action of a MERGE, with its parts' indexes among the deparsed expressions.
struct Action {
    matched: bool,
    command: pg_sys::CmdType::Type,
    overriding: pg_sys::OverridingKind::Type,
    qual: Option<usize>,
    /// (column, expression) of UPDATE SET or INSERT.
    columns: Vec<(i16, usize)>,
    /// Row-level security checks: (expression, option).
    checks: Vec<(usize, *mut pg_sys::WithCheckOption)>,
}

impl Action {
    /// The action's kind as one letter (`ModifyPlan::merge_actions`).
    fn letter(&self) -> char {
        match self.command {
            pg_sys::CmdType::CMD_UPDATE => 'u',
            pg_sys::CmdType::CMD_DELETE => 'd',
            pg_sys::CmdType::CMD_INSERT => 'i',
            _ => 'n',
        }
    }
}

/// The MERGE `parse` into `table` as a statement for every shard, its coordinator values
/// appended to `values`; or why it cannot run that way.
/// With `row_triggers`, also the row-by-row form ([`row_source`]).
pub unsafe fn plan(
    parse: *mut pg_sys::Query,
    table: &DistTable,
    values: &mut Vec<*mut pg_sys::Node>,
    row_triggers: bool,
) -> Result<MergeForShards, PlannerError> {
    let refuse = |why: &str| {
        Err(PlannerError::MergeNotPushable(
            crate::distribution::create::relation_name(table.oid),
            why.into(),
        ))
    };
    // SAFETY: parse is a valid MERGE; its copy is changed, never the statement itself.
    unsafe {
        let modifying_cte = PgList::<pg_sys::CommonTableExpr>::from_pg((*parse).cteList)
            .iter_ptr()
            .any(|cte| {
                let query = (*cte).ctequery.cast::<pg_sys::Query>();
                (*query).commandType != pg_sys::CmdType::CMD_SELECT
            });
        if modifying_cte {
            return refuse("a data-modifying WITH query");
        }
        // A join as the source is read as the subquery it amounts to.
        let parse = merge_source::join_as_subquery(parse);
        let result_rti = (*parse).resultRelation;
        let from = PgList::<pg_sys::Node>::from_pg((*(*parse).jointree).fromlist);
        let source_rti = match from.get_ptr(0) {
            Some(item) if from.len() == 1 && (*item).type_ == pg_sys::NodeTag::T_RangeTblRef => {
                (*item.cast::<pg_sys::RangeTblRef>()).rtindex
            }
            _ => return refuse("a source of several FROM items"),
        };
        let source_rte = range_entry((*parse).rtable, source_rti);
        // A distributed or reference table the shards read (the source's rows stay on the
        // workers, or go from one worker to another); anything else — a subquery, a view,
        // VALUES, a function, a WITH query, a table of the coordinator, a table with policies,
        // the target itself (read before any shard changes it, as PostgreSQL reads it in the
        // statement's snapshot) — is rows the coordinator reads first with SQL of its own
        // (policies applied there), then sends to the shards (`source_query`).
        let source = match (*source_rte).rtekind {
            pg_sys::RTEKind::RTE_RELATION
                if (*source_rte).securityQuals.is_null() && (*source_rte).relid != table.oid =>
            {
                cache::lookup((*source_rte).relid)
            }
            pg_sys::RTEKind::RTE_RELATION
            | pg_sys::RTEKind::RTE_SUBQUERY
            | pg_sys::RTEKind::RTE_VALUES
            | pg_sys::RTEKind::RTE_FUNCTION
            | pg_sys::RTEKind::RTE_CTE => None,
            _ => return refuse("a source that is not a table, a subquery, VALUES or a function"),
        };
        let source_oid = source.as_ref().map_or(pg_sys::InvalidOid, |s| s.oid);
        let source_method = source.as_ref().map(|s| s.method);
        let source_dist_attno = source.as_ref().and_then(DistTable::distribution_attno);
        let on = (*(*parse).jointree).quals;
        let dist_attno = table.distribution_attno();
        let key =
            dist_attno.and_then(|attno| equated_source_column(on, result_rti, attno, source_rti));
        let inserts = PgList::<pg_sys::MergeAction>::from_pg((*parse).mergeActionList)
            .iter_ptr()
            .any(|action| (*action).commandType == pg_sys::CmdType::CMD_INSERT);
        let co_located = table.method == Method::Hash
            && source_method == Some(Method::Hash)
            && source
                .as_ref()
                .is_some_and(|s| s.colocation_id == table.colocation_id)
            && key.is_some()
            && key == source_dist_attno;
        let replicated = source_method == Some(Method::Reference)
            && (table.method == Method::Reference || !inserts);
        // A reference target's copies each get every source row.
        let to_every_copy = table.method == Method::Reference && !replicated;
        let source_query = source.is_none() || to_every_copy;
        let repartition_by =
            match (co_located || replicated || to_every_copy, key) {
                (true, _) => None,
                (false, Some(attno)) if table.method == Method::Hash => Some(attno),
                _ => return refuse(
                    "an ON condition that does not equate the target's distribution column with \
                     a column of the source of the same type (or another integer type)",
                ),
            };
        // A repartitioned source row with a NULL key goes to the first shard. A NOT NULL
        // column fails there as in PostgreSQL; into a column that allows NULL the shard's INSERT
        // checks the value (`pgdist.distribution_value_present`): a NULL a shard stored would
        // break the distribution.
        let guard_null_key = repartition_by.is_some()
            && inserts
            && !dist_attno.is_some_and(|a| not_null(table.oid, a));
        // The source column each shard's rows are tied to: INSERT must take it.
        let shard_key = if co_located {
            source_dist_attno
        } else {
            repartition_by
        };
        // Every expression to deparse, in order: ON, then per action its condition, values and
        // row-level security checks.
        let target_rte = range_entry((*parse).rtable, result_rti);
        let mut exprs: Vec<*mut pg_sys::Node> = vec![with_target_policies(on, target_rte)];
        let mut shapes = Vec::new();
        for action in PgList::<pg_sys::MergeAction>::from_pg((*parse).mergeActionList).iter_ptr() {
            let qual = (*action).qual;
            let qual_index = (!qual.is_null()).then(|| {
                exprs.push(qual);
                exprs.len() - 1
            });
            let mut columns = Vec::new();
            for entry in PgList::<pg_sys::TargetEntry>::from_pg((*action).targetList).iter_ptr() {
                if (*entry).resjunk {
                    continue;
                }
                let attno = (*entry).resno;
                let expr = (*entry).expr.cast::<pg_sys::Node>();
                if Some(attno) == dist_attno {
                    let keeps = match (*action).commandType {
                        pg_sys::CmdType::CMD_UPDATE => is_column(expr, result_rti, attno),
                        _ => shard_key.is_some_and(|attno| is_column(expr, source_rti, attno)),
                    };
                    if !keeps {
                        return refuse(match (*action).commandType {
                            pg_sys::CmdType::CMD_UPDATE => "UPDATE of the distribution column",
                            _ => "INSERT whose distribution column is not the source column the ON condition equates with it",
                        });
                    }
                }
                exprs.push(expr);
                columns.push((attno, exprs.len() - 1));
            }
            if (*action).commandType == pg_sys::CmdType::CMD_INSERT
                && dist_attno.is_some()
                && !columns.iter().any(|(attno, _)| Some(*attno) == dist_attno)
            {
                return refuse("INSERT without the distribution column");
            }
            let mut checks = Vec::new();
            for (option, condition) in action_checks(parse, action, target_rte) {
                if condition.is_null() {
                    return refuse("a row-level security policy on a stored generated column");
                }
                exprs.push(condition);
                checks.push((exprs.len() - 1, option));
            }
            shapes.push(Action {
                matched: (*action).matched,
                command: (*action).commandType,
                overriding: (*action).override_,
                qual: qual_index,
                columns,
                checks,
            });
        }
        for expr in exprs.iter_mut() {
            let folded = pg_sys::eval_const_expressions(
                std::ptr::null_mut(),
                pg_sys::copyObjectImpl(expr.cast()).cast(),
            );
            *expr = with_coordinator_values(folded, values);
            if pg_sys::checkExprHasSubLink(*expr) || !shippable(*expr) {
                return refuse("an expression the worker nodes cannot compute the same way (a subquery, a sequence, a function that is not a built-in)");
            }
        }
        let read_first = match source_query {
            true => match merge_source::read_first(parse, source_rti, repartition_by, table.oid) {
                Some(read) => Some(read),
                None => return refuse("a source column that cannot travel in an array"),
            },
            false => None,
        };
        let relations = match (&read_first, repartition_by) {
            (None, None) => vec![(TARGET_K, table.oid), (SOURCE_K, source_oid)],
            _ => vec![(TARGET_K, table.oid)],
        };
        let renamed = read_first.as_ref().and_then(|r| r.renamed.as_deref());
        let Some(mut texts) =
            deparse_parts(parse, result_rti, source_rti, &relations, renamed, &exprs)
        else {
            return refuse("an expression pgdist could not write as SQL for the shards");
        };
        if guard_null_key {
            let column = table.distribution_column.clone().unwrap_or_default();
            let inserted_keys = shapes
                .iter()
                .filter(|action| action.command == pg_sys::CmdType::CMD_INSERT)
                .flat_map(|action| action.columns.iter())
                .filter(|(attno, _)| Some(*attno) == dist_attno);
            for (_, i) in inserted_keys {
                texts[*i] = format!(
                    "CASE WHEN pgdist.distribution_value_present(({}) IS NOT NULL, {}, {}) THEN {} END",
                    texts[*i],
                    quote_literal(&crate::distribution::create::relation_name(table.oid)),
                    quote_literal(&column),
                    texts[*i]
                );
            }
        }
        let (using, broadcasts) = match (read_first, repartition_by) {
            (Some(read), _) => (read.using, vec![read.read]),
            (None, None) => (
                format!("${} pgdist_t{SOURCE_K}", RELATION_BASE + SOURCE_K as i32),
                Vec::new(),
            ),
            (None, Some(attno)) => {
                let Some((using, columns)) = source_as_arrays(source_oid) else {
                    return refuse("a source column that cannot travel in an array");
                };
                let read = repartitioned_read(source_oid, columns, attno, table.oid);
                (using, vec![read])
            }
        };
        let mut sql = format!(
            "MERGE INTO ${} pgdist_t{TARGET_K} USING {using} ON {}",
            RELATION_BASE + TARGET_K as i32,
            texts[0]
        );
        for action in &shapes {
            sql.push_str(if action.matched {
                " WHEN MATCHED"
            } else {
                " WHEN NOT MATCHED"
            });
            // As in PostgreSQL: the action's checks once its condition chose it.
            let checks: Vec<String> = action
                .checks
                .iter()
                .map(|(i, option)| crate::planner::security_quals::check_call(&texts[*i], *option))
                .collect();
            match (action.qual, checks.is_empty()) {
                (Some(i), true) => sql.push_str(&format!(" AND {}", texts[i])),
                (Some(i), false) => sql.push_str(&format!(
                    " AND CASE WHEN {} THEN {} ELSE false END",
                    texts[i],
                    checks.join(" AND ")
                )),
                (None, false) => sql.push_str(&format!(" AND {}", checks.join(" AND "))),
                (None, true) => {}
            }
            sql.push_str(" THEN ");
            let names: Vec<String> = action
                .columns
                .iter()
                .map(|(attno, _)| column_name(table.oid, *attno))
                .collect();
            let exprs: Vec<&str> = action
                .columns
                .iter()
                .map(|(_, i)| texts[*i].as_str())
                .collect();
            match action.command {
                pg_sys::CmdType::CMD_UPDATE => {
                    let sets: Vec<String> = names
                        .iter()
                        .zip(&exprs)
                        .map(|(name, expr)| format!("{name} = {expr}"))
                        .collect();
                    sql.push_str(&format!("UPDATE SET {}", sets.join(", ")));
                }
                pg_sys::CmdType::CMD_DELETE => sql.push_str("DELETE"),
                pg_sys::CmdType::CMD_INSERT => {
                    let overriding = match action.overriding {
                        pg_sys::OverridingKind::OVERRIDING_SYSTEM_VALUE => {
                            " OVERRIDING SYSTEM VALUE"
                        }
                        pg_sys::OverridingKind::OVERRIDING_USER_VALUE => " OVERRIDING USER VALUE",
                        _ => "",
                    };
                    sql.push_str(&format!(
                        "INSERT ({}){overriding} VALUES ({})",
                        names.join(", "),
                        exprs.join(", ")
                    ));
                }
                _ => sql.push_str("DO NOTHING"),
            }
        }
        let (row_source, set_attnos) = match row_triggers {
            false => (String::new(), Vec::new()),
            true => row_source(table.oid, &shapes, &texts, &using),
        };
        let actions = match row_triggers {
            true => shapes.iter().map(Action::letter).collect(),
            false => String::new(),
        };
        Ok(MergeForShards {
            statement: sql,
            relations,
            target_alias: format!("pgdist_t{TARGET_K}"),
            broadcasts,
            row_source,
            set_attnos,
            actions,
        })
    }
}

/// The name of column `attno` of `relid`, quoted.
unsafe fn column_name(relid: pg_sys::Oid, attno: i16) -> String {
    // SAFETY: a catalog lookup of a column of a table the statement has locked.
    unsafe {
        quote_identifier(
            &CStr::from_ptr(pg_sys::get_attname(relid, attno, false)).to_string_lossy(),
        )
    }
}

/// The MERGE as the statement of a row-by-row write (`executor/row_by_row.rs`), for a table
/// with row triggers, and the columns of its SET values: every row it would update or delete,
/// locked, with the index of the action it takes and the new values of the columns any UPDATE
/// action sets, then every row it would insert, with its values in the target's columns and
/// no ctid —
///
/// ```text
/// WITH pgdist_matched AS MATERIALIZED (SELECT <tag>, t.ctid, t.tableoid, t.<columns>,
///     <SET values>, a.pgdist_action FROM <target> t JOIN <source> ON <on>
///     CROSS JOIN LATERAL (SELECT CASE WHEN <condition> THEN <action> … END) a (pgdist_action)
///     WHERE a.pgdist_action IN (<UPDATE and DELETE actions>) FOR [NO KEY] UPDATE OF t)
/// SELECT * FROM pgdist_matched UNION ALL SELECT <tag>, NULL, NULL, <INSERT values>, NULL …,
///     a.pgdist_action FROM <source> CROSS JOIN LATERAL (…) a (pgdist_action)
///     WHERE a.pgdist_action IN (<INSERT actions>) AND NOT EXISTS (SELECT FROM <target> t WHERE <on>)
/// ```
///
/// — in one statement, so that both parts read the same snapshot.
unsafe fn row_source(
    relid: pg_sys::Oid,
    actions: &[Action],
    texts: &[String],
    using: &str,
) -> (String, Vec<i16>) {
    use crate::executor::row_by_row::live_columns;
    use crate::planner::modify_pushdown::ROW_TAG_SQL;
    // SAFETY: the relation is locked by the statement being planned.
    let columns = unsafe {
        let relation = pg_sys::RelationIdGetRelation(relid);
        let columns = live_columns((*relation).rd_att);
        pg_sys::RelationClose(relation);
        columns
    };
    let target = format!("${} pgdist_t{TARGET_K}", RELATION_BASE + TARGET_K as i32);
    let on = &texts[0];
    let mut set_attnos: Vec<i16> = actions
        .iter()
        .filter(|a| a.command == pg_sys::CmdType::CMD_UPDATE)
        .flat_map(|a| a.columns.iter().map(|(attno, _)| *attno))
        .collect();
    set_attnos.sort_unstable();
    set_attnos.dedup();
    // The first action whose condition holds, of the matched or the not matched ones; once
    // chosen, its policies' USING checks on the target row (the WITH CHECK ones are tested on
    // the coordinator, on the row the BEFORE triggers leave).
    let chosen = |matched: bool| {
        let branches: Vec<String> = actions
            .iter()
            .enumerate()
            .filter(|(_, a)| a.matched == matched)
            .map(|(i, a)| {
                let condition = a.qual.map_or("true", |q| texts[q].as_str());
                let checks: Vec<String> = a
                    .checks
                    .iter()
                    .filter(|(_, option)| on_target_row(*option))
                    // SAFETY: the options are the statement's.
                    .map(|(e, option)| unsafe {
                        crate::planner::security_quals::check_call(&texts[*e], *option)
                    })
                    .collect();
                match checks.is_empty() {
                    true => format!("WHEN {condition} THEN {i}"),
                    false => format!(
                        "WHEN CASE WHEN {condition} THEN {} ELSE false END THEN {i}",
                        checks.join(" AND ")
                    ),
                }
            })
            .collect();
        let case = match branches.is_empty() {
            true => "NULL::int".to_string(),
            false => format!("CASE {} END", branches.join(" ")),
        };
        format!("CROSS JOIN LATERAL (SELECT {case}) AS pgdist_a (pgdist_action)")
    };
    let taken = |commands: &[pg_sys::CmdType::Type]| {
        let indexes: Vec<String> = actions
            .iter()
            .enumerate()
            .filter(|(_, a)| commands.contains(&a.command))
            .map(|(i, _)| i.to_string())
            .collect();
        match indexes.is_empty() {
            true => "false".to_string(),
            false => format!("pgdist_a.pgdist_action IN ({})", indexes.join(", ")),
        }
    };
    // A column's value under each action that sets it, else `otherwise`.
    let value = |attno: i16, command, otherwise: &str| {
        let branches: Vec<String> = actions
            .iter()
            .enumerate()
            .filter(|(_, a)| a.command == command)
            .filter_map(|(i, a)| {
                let (_, expr) = a.columns.iter().find(|(c, _)| *c == attno)?;
                Some(format!("WHEN {i} THEN {}", texts[*expr]))
            })
            .collect();
        match branches.is_empty() {
            true => otherwise.to_string(),
            false => format!(
                "CASE pgdist_a.pgdist_action {} ELSE {otherwise} END",
                branches.join(" ")
            ),
        }
    };
    let null_of = |attno: i16| {
        let column = columns.iter().find(|c| c.attno == attno);
        format!("NULL::{}", column.map_or("text", |c| c.type_name.as_str()))
    };
    let old_columns: Vec<String> = columns
        .iter()
        .map(|c| format!("pgdist_t{TARGET_K}.{}", quote_identifier(&c.name)))
        .collect();
    let set_values: Vec<String> = set_attnos
        .iter()
        .map(|attno| {
            let column = columns.iter().find(|c| c.attno == *attno);
            let old = column.map_or("NULL".into(), |c| {
                format!("pgdist_t{TARGET_K}.{}", quote_identifier(&c.name))
            });
            value(*attno, pg_sys::CmdType::CMD_UPDATE, &old)
        })
        .collect();
    let deletes = actions
        .iter()
        .any(|a| a.command == pg_sys::CmdType::CMD_DELETE);
    let lock = if deletes { "UPDATE" } else { "NO KEY UPDATE" };
    let mut sql = format!(
        "WITH pgdist_matched AS MATERIALIZED (SELECT {ROW_TAG_SQL}, pgdist_t{TARGET_K}.ctid, \
         pgdist_t{TARGET_K}.tableoid, {}{}, pgdist_a.pgdist_action FROM {target} JOIN {using} \
         ON {on} {} WHERE {} FOR {lock} OF pgdist_t{TARGET_K}) SELECT * FROM pgdist_matched",
        old_columns.join(", "),
        set_values
            .iter()
            .map(|v| format!(", {v}"))
            .collect::<String>(),
        chosen(true),
        taken(&[pg_sys::CmdType::CMD_UPDATE, pg_sys::CmdType::CMD_DELETE]),
    );
    if actions
        .iter()
        .any(|a| a.command == pg_sys::CmdType::CMD_INSERT)
    {
        let inserted: Vec<String> = columns
            .iter()
            .map(|c| value(c.attno, pg_sys::CmdType::CMD_INSERT, &null_of(c.attno)))
            .collect();
        let no_sets: Vec<String> = set_attnos
            .iter()
            .map(|a| format!(", {}", null_of(*a)))
            .collect();
        sql.push_str(&format!(
            " UNION ALL SELECT {ROW_TAG_SQL}, NULL::tid, NULL::oid, {}{}, pgdist_a.pgdist_action \
             FROM {using} {} WHERE {} AND NOT EXISTS (SELECT FROM {target} WHERE {on})",
            inserted.join(", "),
            no_sets.concat(),
            chosen(false),
            taken(&[pg_sys::CmdType::CMD_INSERT]),
        ));
    }
    (sql, set_attnos)
}

/// Whether check option `option` tests the target row as it is (a MERGE action's USING), not
/// the new row.
fn on_target_row(option: *mut pg_sys::WithCheckOption) -> bool {
    use pg_sys::WCOKind::{WCO_RLS_MERGE_DELETE_CHECK, WCO_RLS_MERGE_UPDATE_CHECK};
    // SAFETY: option is one of the statement's check options.
    let kind = unsafe { (*option).kind };
    kind == WCO_RLS_MERGE_UPDATE_CHECK || kind == WCO_RLS_MERGE_DELETE_CHECK
}

/// The ON condition `on` with the target's row-level security conditions (`securityQuals`)
/// ANDed in front — a target row they hide matches no source row, as when PostgreSQL filters
/// the target before the join — and each of `on`'s conditions that is not leakproof behind
/// them.
unsafe fn with_target_policies(
    on: *mut pg_sys::Node,
    target: *mut pg_sys::RangeTblEntry,
) -> *mut pg_sys::Node {
    use crate::planner::security_quals::{conjuncts, only_after};
    // SAFETY: target is the MERGE's target entry; its conditions are copied before use.
    unsafe {
        if (*target).securityQuals.is_null() {
            return on;
        }
        let policies: Vec<*mut pg_sys::Node> =
            PgList::<pg_sys::Node>::from_pg((*target).securityQuals)
                .iter_ptr()
                .flat_map(|level| {
                    let level = crate::planner::coordinator_subqueries::computed_first_in(
                        pg_sys::copyObjectImpl(level.cast()).cast(),
                    );
                    conjuncts(level)
                })
                .collect();
        let mut all = PgList::<pg_sys::Node>::new();
        for policy in &policies {
            all.push(*policy);
        }
        for clause in conjuncts(on) {
            all.push(match pg_sys::contain_leaked_vars(clause) {
                true => only_after(&policies, clause),
                false => clause,
            });
        }
        pg_sys::make_ands_explicit(all.into_pg()).cast()
    }
}

/// The row-level security check options of MERGE `parse` that its action `action` must pass,
/// each with its condition for the shards: the action's USING on the target row, then the
/// WITH CHECK on the new row it makes (the target's columns replaced by the action's values).
/// A null condition: the check would read a stored generated column, not known before the row
/// is written.
unsafe fn action_checks(
    parse: *mut pg_sys::Query,
    action: *mut pg_sys::MergeAction,
    target: *mut pg_sys::RangeTblEntry,
) -> Vec<(*mut pg_sys::WithCheckOption, *mut pg_sys::Node)> {
    use crate::planner::security_quals::on_new_row;
    use pg_sys::WCOKind::{
        WCO_RLS_INSERT_CHECK, WCO_RLS_MERGE_DELETE_CHECK, WCO_RLS_MERGE_UPDATE_CHECK,
        WCO_RLS_UPDATE_CHECK,
    };
    // SAFETY: parse is a valid MERGE and action one of its actions.
    unsafe {
        let kinds: &[pg_sys::WCOKind::Type] = match (*action).commandType {
            pg_sys::CmdType::CMD_UPDATE => &[WCO_RLS_MERGE_UPDATE_CHECK, WCO_RLS_UPDATE_CHECK],
            pg_sys::CmdType::CMD_DELETE => &[WCO_RLS_MERGE_DELETE_CHECK],
            pg_sys::CmdType::CMD_INSERT => &[WCO_RLS_INSERT_CHECK],
            _ => &[],
        };
        let generated = crate::planner::modify_plan::has_generated_columns((*target).relid);
        let result_rti = (*parse).resultRelation;
        let options = PgList::<pg_sys::WithCheckOption>::from_pg((*parse).withCheckOptions);
        let mut checks = Vec::new();
        for kind in kinds {
            for option in options.iter_ptr().filter(|o| (**o).kind == *kind) {
                let on_new = matches!(*kind, WCO_RLS_UPDATE_CHECK | WCO_RLS_INSERT_CHECK);
                let condition = match (on_new, generated) {
                    (true, true) => std::ptr::null_mut(),
                    (true, false) => on_new_row(
                        option,
                        result_rti,
                        target,
                        (*action).targetList,
                        *kind == WCO_RLS_UPDATE_CHECK,
                    ),
                    (false, _) => crate::planner::coordinator_subqueries::computed_first_in(
                        pg_sys::copyObjectImpl((*option).qual.cast()).cast(),
                    ),
                };
                checks.push((option, condition));
            }
        }
        checks
    }
}

/// Range-table entry `rti` (1-based) of `rtable`.
pub(crate) unsafe fn range_entry(
    rtable: *mut pg_sys::List,
    rti: i32,
) -> *mut pg_sys::RangeTblEntry {
    // SAFETY: rti is an index of rtable, as the statement's nodes give it.
    unsafe { pg_sys::list_nth(rtable, rti - 1).cast() }
}

/// A zeroed node of type `T` tagged `tag`, in the current memory context.
pub(crate) unsafe fn new_node<T>(tag: pg_sys::NodeTag) -> *mut T {
    // SAFETY: every node type starts with its NodeTag; palloc0 zeroes the rest.
    unsafe {
        let node = pg_sys::palloc0(std::mem::size_of::<T>());
        (*node.cast::<pg_sys::Node>()).type_ = tag;
        node.cast()
    }
}

/// True when `expr` (under any relabeling, or the implicit cast of one integer type to another
/// that assigning it makes) is column `attno` of range-table entry `rti`.
unsafe fn is_column(expr: *mut pg_sys::Node, rti: i32, attno: i16) -> bool {
    // SAFETY: expr is a valid expression; casts follow the tags.
    unsafe {
        let mut node = expr;
        loop {
            match (*node).type_ {
                pg_sys::NodeTag::T_RelabelType => {
                    node = (*node.cast::<pg_sys::RelabelType>()).arg.cast();
                }
                pg_sys::NodeTag::T_FuncExpr => {
                    let cast = node.cast::<pg_sys::FuncExpr>();
                    let args = PgList::<pg_sys::Node>::from_pg((*cast).args);
                    match args.get_ptr(0) {
                        Some(arg)
                            if args.len() == 1
                                && (*cast).funcformat
                                    == pg_sys::CoercionForm::COERCE_IMPLICIT_CAST
                                && hash_alike((*cast).funcresulttype, pg_sys::exprType(arg)) =>
                        {
                            node = arg
                        }
                        _ => break,
                    }
                }
                _ => break,
            }
        }
        (*node).type_ == pg_sys::NodeTag::T_Var && {
            let var = node.cast::<pg_sys::Var>();
            (*var).varno == rti && (*var).varattno == attno && (*var).varlevelsup == 0
        }
    }
}

/// The source column that one of the ANDed conditions of `on` equates with the target's
/// distribution column (`target_attno`), with an equality operator, when their types hash
/// alike (`hash_alike`).
unsafe fn equated_source_column(
    on: *mut pg_sys::Node,
    target_rti: i32,
    target_attno: i16,
    source_rti: i32,
) -> Option<i16> {
    // SAFETY: on is the statement's ON condition; casts follow the tags.
    unsafe {
        PgList::<pg_sys::Node>::from_pg(pg_sys::make_ands_implicit(on.cast()))
            .iter_ptr()
            .find_map(|clause| {
                if (*clause).type_ != pg_sys::NodeTag::T_OpExpr {
                    return None;
                }
                let op = clause.cast::<pg_sys::OpExpr>();
                let args = PgList::<pg_sys::Node>::from_pg((*op).args);
                let (Some(left), Some(right)) = (args.get_ptr(0), args.get_ptr(1)) else {
                    return None;
                };
                let (target_side, source_side) = if is_column(left, target_rti, target_attno) {
                    (left, right)
                } else if is_column(right, target_rti, target_attno) {
                    (right, left)
                } else {
                    return None;
                };
                if (*source_side).type_ != pg_sys::NodeTag::T_Var {
                    return None;
                }
                let var = source_side.cast::<pg_sys::Var>();
                (args.len() == 2
                    && hash_alike(pg_sys::exprType(target_side), (*var).vartype)
                    && (*var).varno == source_rti
                    && (*var).varlevelsup == 0
                    && (*var).varattno > 0
                    && pg_sys::op_hashjoinable((*op).opno, (*var).vartype))
                .then_some((*var).varattno)
            })
    }
}

/// True when equal values of types `a` and `b` hash to the same shard: the same type, or two
/// integer types (PostgreSQL hashes an int8 or int2 within int4's range as the int4).
fn hash_alike(a: pg_sys::Oid, b: pg_sys::Oid) -> bool {
    let integer = |t| [pg_sys::INT2OID, pg_sys::INT4OID, pg_sys::INT8OID].contains(&t);
    a == b || (integer(a) && integer(b))
}

/// True when column `attno` of table `relid` is NOT NULL.
unsafe fn not_null(relid: pg_sys::Oid, attno: i16) -> bool {
    // SAFETY: reads the descriptor of an open relation.
    unsafe {
        let relation = pg_sys::RelationIdGetRelation(relid);
        let descriptor = (*relation).rd_att;
        let result = (1..=(*descriptor).natts as i16).contains(&attno)
            && (*(*descriptor).attrs.as_ptr().add(attno as usize - 1)).attnotnull;
        pg_sys::RelationClose(relation);
        result
    }
}

/// The source table `relid` as `unnest($<BROADCAST_BASE>, …) AS pgdist_t2(<columns>)`, and
/// its columns in order; None when a column cannot travel in an array.
unsafe fn source_as_arrays(relid: pg_sys::Oid) -> Option<(String, Vec<i16>)> {
    // SAFETY: the source's descriptor, read while the relation is open; names are copied.
    unsafe {
        let relation = pg_sys::RelationIdGetRelation(relid);
        let descriptor = (*relation).rd_att;
        let mut columns = Vec::new();
        let mut names = Vec::new();
        let mut fits = true;
        for i in 0..(*descriptor).natts as usize {
            let attribute = (*descriptor).attrs.as_ptr().add(i);
            if (*attribute).attisdropped {
                continue;
            }
            fits &= travels_in_array((*attribute).atttypid, (*attribute).attcollation);
            columns.push((*attribute).attnum);
            names.push(quote_identifier(
                &CStr::from_ptr((*attribute).attname.data.as_ptr()).to_string_lossy(),
            ));
        }
        pg_sys::RelationClose(relation);
        if !fits {
            return None;
        }
        Some((merge_source::unnest_source(&names), columns))
    }
}

/// `exprs` as SQL, deparsed as the select list of `SELECT … FROM target, source`, each table
/// under its alias (the source's columns `renamed` when given) and each of `relations` under
/// its shard placeholder; None when the text cannot be split back.
unsafe fn deparse_parts(
    parse: *mut pg_sys::Query,
    target_rti: i32,
    source_rti: i32,
    relations: &[(u32, pg_sys::Oid)],
    renamed: Option<&[String]>,
    exprs: &[*mut pg_sys::Node],
) -> Option<Vec<String>> {
    // SAFETY: builds a SELECT over a private copy of the statement's range table.
    unsafe {
        let select = new_node::<pg_sys::Query>(pg_sys::NodeTag::T_Query);
        (*select).commandType = pg_sys::CmdType::CMD_SELECT;
        (*select).canSetTag = true;
        (*select).rtable = pg_sys::copyObjectImpl((*parse).rtable.cast()).cast();
        // The MERGE's target is not in its FROM list; the SELECT's is.
        let target_entry = range_entry((*select).rtable, target_rti);
        (*target_entry).inFromCl = true;
        set_alias(target_entry, TARGET_K);
        let source_entry = range_entry((*select).rtable, source_rti);
        set_alias(source_entry, SOURCE_K);
        if let Some(names) = renamed {
            let mut colnames = PgList::<pg_sys::String>::new();
            for name in names {
                let name = CString::new(name.as_str()).ok()?;
                colnames.push(pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())));
            }
            (*(*source_entry).alias).colnames = colnames.into_pg();
        }
        let mut from = PgList::<pg_sys::RangeTblRef>::new();
        for rti in [target_rti, source_rti] {
            let reference = new_node::<pg_sys::RangeTblRef>(pg_sys::NodeTag::T_RangeTblRef);
            (*reference).rtindex = rti;
            from.push(reference);
        }
        (*select).jointree = pg_sys::makeFromExpr(from.into_pg(), std::ptr::null_mut());
        let mut targets = PgList::<pg_sys::TargetEntry>::new();
        for (i, expr) in exprs.iter().enumerate() {
            targets.push(pg_sys::makeTargetEntry(
                expr.cast(),
                (i + 1) as i16,
                std::ptr::null_mut(),
                false,
            ));
        }
        (*select).targetList = targets.into_pg();
        let sql = deparse_with_shards(select, relations).ok()?;
        let list = sql.strip_prefix("SELECT ")?;
        let from_at = top_level_find(list, " FROM ")?;
        let parts = split_top_level(&list[..from_at]);
        (parts.len() == exprs.len()).then_some(parts)
    }
}

/// Where `needle` first occurs in `sql` outside quotes, parentheses and brackets.
fn top_level_find(sql: &str, needle: &str) -> Option<usize> {
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    for (at, c) in sql.char_indices() {
        match (quote, c) {
            (Some(open), _) if c == open => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(' | '[') => depth += 1,
            (None, ')' | ']') => depth -= 1,
            (None, _) if depth == 0 && sql[at..].starts_with(needle) => return Some(at),
            _ => {}
        }
    }
    None
}

/// `list` split at its top-level `, `.
fn split_top_level(list: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = list;
    while let Some(at) = top_level_find(rest, ", ") {
        parts.push(rest[..at].to_string());
        rest = &rest[at + 2..];
    }
    parts.push(rest.to_string());
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_only_at_their_top_level() {
        let list = "pgdist_t2.v, f(a, b), 'x, y', ARRAY[1, 2], \"a, b\".c";
        assert_eq!(
            split_top_level(list),
            vec![
                "pgdist_t2.v",
                "f(a, b)",
                "'x, y'",
                "ARRAY[1, 2]",
                "\"a, b\".c"
            ]
        );
        assert_eq!(top_level_find("(a FROM b) FROM c", " FROM "), Some(10));
    }
}
