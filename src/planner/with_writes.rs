//! Data-modifying WITH queries on distributed and reference tables:
//! `WITH moved AS (DELETE FROM orders WHERE … RETURNING *) INSERT INTO archive SELECT * FROM moved`.
//!
//! PostgreSQL plans each such WITH query as a subplan topped by a ModifyTable. pgdist analyses
//! the query before planning, as it does a write of its own (`modify_plan::analyse`), and puts a
//! Distributed Modify node in the place of that ModifyTable afterwards. The node writes when
//! the statement first reads its RETURNING rows, or at the end of the statement when nothing
//! reads them, as PostgreSQL does.
//!
//! In PostgreSQL all parts of such a statement see the data as it was when the statement
//! started: no part sees another's changes. pgdist runs the parts on the workers one after the
//! other, over the transaction's connections, so a later part would see an earlier part's
//! changes. A statement in which a table written by one part (a WITH query or the statement
//! itself; or, through the ON DELETE / ON UPDATE action of a foreign key, a table referencing
//! one it writes) is read or written by another is therefore refused with 0A000 rather than
//! answered differently; the rows a write returns may be read anywhere. A part is a WITH query or the
//! statement's own body, with the plain WITH queries it reads.
//!
//! One sharing is exact all the same: a *blind insert* — an INSERT without ON CONFLICT into a
//! distributed or reference table without triggers or row security, reading nothing of that
//! table — shares its table with another part that is over before the insert writes. Another
//! blind insert into the table qualifies (neither sees anything of the table); so does a WITH
//! query whose rows the insert reads, directly or through other parts
//! (`WITH old AS (DELETE FROM t WHERE id = 1 RETURNING *) INSERT INTO t SELECT 2, … FROM old`,
//! how a row gets a new distribution column value), which its node runs to its end first
//! (`ModifyPlan::runs_before_writes_to`, in case the insert never needed its rows); and so does
//! the statement's body when the insert is a WITH query the body does not read (it runs at the
//! end of the statement, after the body, in PostgreSQL too).

use std::collections::HashSet;
use std::ffi::{c_void, CStr};

use pgrx::{pg_sys, PgList};

use crate::distribution::create::relation_name;
use crate::executor::triggers::{self, Event};
use crate::metadata::cache;
use crate::metadata::tables::DistTable;
use crate::planner::modify_plan::{self, AnalysedWrite};
use crate::planner::PlannerError;

/// A data-modifying WITH query, analysed when it writes a distributed or reference table.
pub struct WithWrite(Option<(DistTable, AnalysedWrite)>);

/// A WITH query of the statement.
struct Cte {
    name: String,
    node: *mut pg_sys::CommonTableExpr,
    query: *mut pg_sys::Query,
}

impl Cte {
    fn writes(&self) -> bool {
        // SAFETY: query is the WITH query's valid Query.
        unsafe { (*self.query).commandType != pg_sys::CmdType::CMD_SELECT }
    }
}

/// The data-modifying WITH queries of `parse`, in order, checked and analysed.
pub unsafe fn analyse(parse: *mut pg_sys::Query) -> Result<Vec<WithWrite>, PlannerError> {
    // SAFETY: parse is the analysed statement being planned; its WITH queries are only read
    // (the distributed ones through private copies).
    unsafe {
        if !(*parse).hasModifyingCTE {
            return Ok(Vec::new());
        }
        let ctes = top_level_ctes(parse);
        let mut run_first = check_parts(parse, &ctes)?;
        let mut writes = Vec::new();
        for (index, cte) in ctes.iter().enumerate().filter(|(_, cte)| cte.writes()) {
            let Some(table) = target(cte.query).and_then(cache::lookup) else {
                writes.push(WithWrite(None));
                continue;
            };
            let standalone = match (*cte.query).commandType {
                pg_sys::CmdType::CMD_INSERT => cte.query,
                _ => standalone_copy(parse, &ctes, index, &table)?,
            };
            let mut analysed = modify_plan::analyse(standalone, &table)?;
            analysed.run_before_writes_to(std::mem::take(&mut run_first[index]));
            writes.push(WithWrite(Some((table, analysed))));
        }
        Ok(writes)
    }
}

/// Puts a Distributed Modify node in the place of the ModifyTable of each distributed write
/// among `writes` (the k-th ModifyTable among the subplans of `stmt` is the k-th
/// data-modifying WITH query: PostgreSQL plans them in order).
pub unsafe fn plan(
    stmt: *mut pg_sys::PlannedStmt,
    writes: Vec<WithWrite>,
) -> Result<(), PlannerError> {
    // SAFETY: stmt is the finished plan of the statement `writes` came from; replacing a
    // subplan's pointer in its list is how the planner itself rewrites subplans.
    unsafe {
        let mut writes = writes.into_iter();
        let subplans = (*stmt).subplans;
        for i in 0..pg_sys::list_length(subplans) {
            let cell = (*subplans).elements.add(i as usize);
            let subplan = (*cell).ptr_value.cast::<pg_sys::Plan>();
            if subplan.is_null() || (*subplan).type_ != pg_sys::NodeTag::T_ModifyTable {
                continue;
            }
            let Some(WithWrite(write)) = writes.next() else {
                break;
            };
            let Some((table, analysed)) = write else {
                continue;
            };
            let mt = subplan.cast::<pg_sys::ModifyTable>();
            let rti = pg_sys::list_nth_int((*mt).resultRelations, 0);
            let rte = pg_sys::list_nth((*stmt).rtable, rti - 1).cast::<pg_sys::RangeTblEntry>();
            if (*rte).relid != table.oid {
                return Err(PlannerError::Writes(relation_name(table.oid)));
            }
            (*cell).ptr_value = modify_plan::modify_node(stmt, mt, analysed, &table).cast();
        }
        // A distributed write left unplanned would change the coordinator's empty table.
        match writes.find_map(|WithWrite(write)| write) {
            Some((table, _)) => Err(PlannerError::Writes(relation_name(table.oid))),
            None => Ok(()),
        }
    }
}

/// The WITH queries of the statement.
unsafe fn top_level_ctes(parse: *mut pg_sys::Query) -> Vec<Cte> {
    // SAFETY: parse is a valid Query; its cteList holds CommonTableExpr nodes.
    unsafe {
        PgList::<pg_sys::CommonTableExpr>::from_pg((*parse).cteList)
            .iter_ptr()
            .map(|node| Cte {
                name: CStr::from_ptr((*node).ctename)
                    .to_string_lossy()
                    .into_owned(),
                node,
                query: (*node).ctequery.cast(),
            })
            .collect()
    }
}

/// The table a data-modifying query writes.
unsafe fn target(query: *mut pg_sys::Query) -> Option<pg_sys::Oid> {
    // SAFETY: resultRelation indexes the query's range table.
    unsafe {
        let index = usize::try_from((*query).resultRelation)
            .ok()?
            .checked_sub(1)?;
        let rte = PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable).get_ptr(index)?;
        Some((*rte).relid)
    }
}

/// One part of the statement: the statement's body or a data-modifying WITH query.
struct Part {
    /// The WITH query (None: the statement's body).
    cte: Option<usize>,
    /// The table it writes.
    target: Option<pg_sys::Oid>,
    reads: Reads,
    /// The tables its write changes: its target, and the tables foreign key actions reach.
    writes: Vec<pg_sys::Oid>,
    /// It is a blind insert into its target (see the module's documentation).
    blind: bool,
}

/// Refuses a statement in which a table written by one part is read or written by another
/// (see the module's documentation), when distributed or reference tables are involved. Returns,
/// for each data-modifying WITH query, the tables whose blind inserts it must run before.
unsafe fn check_parts(
    parse: *mut pg_sys::Query,
    ctes: &[Cte],
) -> Result<Vec<Vec<pg_sys::Oid>>, PlannerError> {
    // SAFETY: parse is a valid Query; the walk only reads it.
    unsafe {
        let mut parts = vec![Part::of(parse, None, tables_read(parse, ctes, None))];
        for (index, cte) in ctes.iter().enumerate().filter(|(_, cte)| cte.writes()) {
            let reads = tables_read(parse, ctes, Some(index));
            parts.push(Part::of(cte.query, Some(index), reads));
        }
        let mut run_first = vec![Vec::new(); ctes.len()];
        let distributed = parts
            .iter()
            .flat_map(|part| part.reads.tables.iter().chain(&part.target))
            .any(|oid| cache::lookup(*oid).is_some());
        if !distributed {
            return Ok(run_first);
        }
        for (i, part) in parts.iter().enumerate() {
            for table in &part.writes {
                for (j, other) in parts.iter().enumerate() {
                    if j == i
                        || !(other.reads.tables.contains(table) || other.writes.contains(table))
                    {
                        continue;
                    }
                    // Only a blind insert into this very table sees nothing of it.
                    let blind_into = |p: &Part| p.blind && p.target == Some(*table);
                    let (blind, first) = match (blind_into(part), blind_into(other)) {
                        (true, _) => (part, other),
                        (false, true) => (other, part),
                        (false, false) => {
                            return Err(PlannerError::WrittenAndRead(relation_name(*table)))
                        }
                    };
                    match over_before(&parts, first, blind) {
                        Some(Some(cte)) if !run_first[cte].contains(table) => {
                            run_first[cte].push(*table)
                        }
                        Some(_) => {}
                        None => return Err(PlannerError::WrittenAndRead(relation_name(*table))),
                    }
                }
            }
        }
        Ok(run_first)
    }
}

impl Part {
    unsafe fn of(query: *mut pg_sys::Query, cte: Option<usize>, reads: Reads) -> Part {
        // SAFETY: query is a valid Query of the statement.
        unsafe {
            let target = target(query);
            let insert = (*query).commandType == pg_sys::CmdType::CMD_INSERT;
            let writes = match (target, insert) {
                (Some(table), true) => vec![table],
                (Some(table), false) => written_through_keys(table),
                (None, _) => Vec::new(),
            };
            let blind = insert
                && (*query).onConflict.is_null()
                && (*query).withCheckOptions.is_null()
                && target.is_some_and(|table| {
                    cache::lookup(table).is_some()
                        && !reads.tables.contains(&table)
                        && !triggers::find(table, Event::Insert).any()
                });
            Part {
                cte,
                target,
                reads,
                writes,
                blind,
            }
        }
    }

    /// The data-modifying WITH queries whose rows this part reads, directly or through others.
    fn reached(&self, parts: &[Part]) -> Vec<usize> {
        let mut reached = Vec::new();
        let mut next = vec![self];
        while let Some(part) = next.pop() {
            for cte in &part.reads.ctes {
                if let Some(read) = parts.iter().find(|p| p.cte == Some(*cte)) {
                    if !reached.contains(cte) {
                        reached.push(*cte);
                        next.push(read);
                    }
                }
            }
        }
        reached
    }
}

/// Whether part `first`, which shares a table with blind insert `blind`, is over before
/// `blind` writes: Some(Some(cte)) when WITH query `cte` must be run to its end first,
/// Some(None) when it is anyway, None when it may not be.
fn over_before(parts: &[Part], first: &Part, blind: &Part) -> Option<Option<usize>> {
    if first.blind {
        return Some(None);
    }
    match first.cte {
        // The body runs to its end before the WITH queries nobody read.
        None => {
            let cte = blind.cte?;
            (!first.reached(parts).contains(&cte)).then_some(None)
        }
        // Only a Distributed Modify node can be run ahead of its readers.
        Some(cte) => {
            let ours = first.target.and_then(cache::lookup).is_some();
            (ours && blind.reached(parts).contains(&cte)).then_some(Some(cte))
        }
    }
}

/// `table` and the tables a write to it changes through ON DELETE / ON UPDATE actions
/// (CASCADE, SET NULL, SET DEFAULT) of foreign keys, transitively.
fn written_through_keys(table: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    let mut written = vec![table];
    let mut next = 0;
    while next < written.len() {
        let referenced = written[next];
        next += 1;
        let referencing = pgrx::Spi::get_one_with_args::<Vec<pg_sys::Oid>>(
            "SELECT array_agg(DISTINCT conrelid) FROM pg_catalog.pg_constraint
              WHERE confrelid = $1 AND contype = 'f'
                AND (confdeltype IN ('c', 'n', 'd') OR confupdtype IN ('c', 'n', 'd'))",
            &[referenced.into()],
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        for table in referencing {
            if !written.contains(&table) {
                written.push(table);
            }
        }
    }
    written
}

/// What a part of the statement reads: tables, and the statement's WITH queries it names.
#[derive(Default)]
struct Reads {
    tables: HashSet<pg_sys::Oid>,
    /// Indexes of the statement's WITH queries, in the order first named.
    ctes: Vec<usize>,
}

/// What a part of statement `parse` reads — WITH query `cte`, or with None the statement's
/// body — following the plain WITH queries it names into their bodies.
unsafe fn tables_read(parse: *mut pg_sys::Query, ctes: &[Cte], cte: Option<usize>) -> Reads {
    struct Walk<'a> {
        ctes: &'a [Cte],
        /// How many levels below the statement the query being walked is.
        level: u32,
        /// The part's own target, which it writes rather than reads (null: none).
        target: *mut pg_sys::RangeTblEntry,
        reads: Reads,
    }
    impl Walk<'_> {
        unsafe fn query(&mut self, query: *mut pg_sys::Query, level: u32, flags: u32) {
            let outer = std::mem::replace(&mut self.level, level);
            // SAFETY: query is a valid Query; the context is this walk.
            unsafe {
                pg_sys::query_tree_walker(
                    query,
                    Some(walk),
                    (self as *mut Self).cast(),
                    (flags | pg_sys::QTW_EXAMINE_RTES_BEFORE) as i32,
                )
            };
            self.level = outer;
        }
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
        if node.is_null() {
            return false;
        }
        // SAFETY: node is a valid node of the walked query; context is the Walk.
        unsafe {
            let state = &mut *context.cast::<Walk>();
            match (*node).type_ {
                pg_sys::NodeTag::T_Query => {
                    state.query(node.cast(), state.level + 1, 0);
                    false
                }
                pg_sys::NodeTag::T_RangeTblEntry => {
                    let rte = node.cast::<pg_sys::RangeTblEntry>();
                    match (*rte).rtekind {
                        pg_sys::RTEKind::RTE_RELATION if rte != state.target => {
                            state.reads.tables.insert((*rte).relid);
                        }
                        pg_sys::RTEKind::RTE_CTE if (*rte).ctelevelsup == state.level => {
                            let name = CStr::from_ptr((*rte).ctename).to_string_lossy();
                            let found = state.ctes.iter().position(|cte| cte.name == name);
                            if let Some(index) = found.filter(|i| !state.reads.ctes.contains(i)) {
                                state.reads.ctes.push(index);
                                // The rows a write returns are not a read of its table.
                                if !state.ctes[index].writes() {
                                    state.query(state.ctes[index].query, 1, 0);
                                }
                            }
                        }
                        _ => {}
                    }
                    false
                }
                _ => pg_sys::expression_tree_walker(node, Some(walk), context),
            }
        }
    }
    let part = cte.map_or(parse, |index| ctes[index].query);
    // SAFETY: parse and the WITH queries are valid Query nodes; resultRelation indexes the
    // part's range table.
    unsafe {
        let target = match usize::try_from((*part).resultRelation) {
            Ok(rti) if rti > 0 => {
                pg_sys::list_nth((*part).rtable, rti as i32 - 1).cast::<pg_sys::RangeTblEntry>()
            }
            _ => std::ptr::null_mut(),
        };
        let mut walk = Walk {
            ctes,
            level: 0,
            target,
            reads: Reads::default(),
        };
        match cte {
            None => walk.query(parse, 0, pg_sys::QTW_IGNORE_CTE_SUBQUERIES),
            Some(_) => walk.query(part, 1, 0),
        }
        walk.reads
    }
}

/// A private copy of WITH query `index` of `parse` that stands on its own: the statement's
/// WITH queries it reads become its own, so that it can go to the workers as a statement.
unsafe fn standalone_copy(
    parse: *mut pg_sys::Query,
    ctes: &[Cte],
    index: usize,
    table: &DistTable,
) -> Result<*mut pg_sys::Query, PlannerError> {
    // SAFETY: copies valid nodes and changes only the copies.
    unsafe {
        let copy = pg_sys::copyObjectImpl(ctes[index].query.cast()).cast::<pg_sys::Query>();
        let mut named = tables_read(parse, ctes, Some(index)).ctes;
        if named.is_empty() {
            return Ok(copy);
        }
        let not_pushable = |why: &str| {
            Err(PlannerError::ModifyNotPushable(
                relation_name(table.oid),
                why.into(),
            ))
        };
        if !(*copy).cteList.is_null() {
            return not_pushable("it has a WITH clause of its own and reads the statement's");
        }
        // One level up: what named the statement's WITH queries names the copy's own.
        pg_sys::IncrementVarSublevelsUp(copy.cast(), -1, 1);
        named.sort_unstable();
        let mut own = PgList::<pg_sys::CommonTableExpr>::new();
        for i in named {
            own.push(pg_sys::copyObjectImpl(ctes[i].node.cast()).cast());
        }
        (*copy).cteList = own.into_pg();
        (*copy).hasRecursive = (*parse).hasRecursive;
        Ok(copy)
    }
}
