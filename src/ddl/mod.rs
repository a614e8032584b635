//! DDL on distributed and reference tables, propagated to their shards (ProcessUtility hook).
//!
//! For a statement that touches such a table the hook (1) refuses what cannot be propagated yet
//! with 0A000, (2) snapshots the shell table's definition, (3) lets PostgreSQL run the statement
//! on the shell, (4) snapshots again and sends the difference to every shard placement inside
//! the coordinator's transaction (see `diff.rs`). Remote work commits with the local
//! transaction (two-phase when needed) or not at all, so a statement that one worker rejects
//! changes nothing anywhere.
//!
//! Handled: CREATE INDEX, DROP INDEX, ALTER TABLE (ADD / DROP / ALTER COLUMN TYPE, SET / DROP
//! DEFAULT, SET / DROP NOT NULL, ADD / DROP CONSTRAINT, foreign keys included — see
//! `distribution::foreign_keys`; storage parameters, statistics targets and the replica
//! identity, which the definition does not show, go as the subcommand itself; OWNER TO and row
//! security only change the shell), RENAME of tables, columns, constraints and indexes, DROP
//! TABLE (also through DROP SCHEMA … CASCADE), TRUNCATE, SET CONSTRAINTS ALL, VACUUM and ANALYZE
//! (`vacuum.rs`). CREATE INDEX
//! CONCURRENTLY runs outside any transaction, so it is not propagated in one: once PostgreSQL
//! has built the index on the shell, each shard's index is built concurrently over a
//! connection of its own (nodes in parallel); if one fails the shell's index is marked INVALID,
//! as PostgreSQL leaves a failed concurrent build. CREATE TRIGGER and ENABLE / DISABLE TRIGGER
//! change only the shell: triggers fire on the coordinator (`executor/triggers.rs`). Refused:
//! constraint triggers, local tables inheriting from distributed or reference tables. ALTER TABLE …
//! SET SCHEMA moves the shards to the new schema, ALTER SCHEMA … RENAME renames it on every
//! worker. DROP INDEX CONCURRENTLY drops the shards' indexes concurrently too.

pub mod diff;
mod types;
mod vacuum;

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::PgList;

use crate::cluster::target_for;
use crate::distribution::create::relation_name;
use crate::distribution::shell::{self, with_suffix, TableDefinition};
use crate::distribution::{foreign_keys, partition_names, run_on_placements, DistributionError};
use crate::error::OrRaise;
use crate::metadata::tables::{self, DistTable, Method, Placement};
use crate::remote::connection::NodeConnection;
use crate::remote::quote::{quote_identifier, quote_literal, quote_qualified};
use crate::remote::{runtime, NodeAddress, RemoteError};
use crate::transaction::remote_xact;

static mut PREVIOUS_HOOK: pg_sys::ProcessUtility_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster before any backend exists; we chain to the
    // hook that was installed before us.
    unsafe {
        PREVIOUS_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// What to do on the shards once PostgreSQL has run the statement on the shell.
enum Propagation {
    /// ALTER TABLE, RENAME, CREATE INDEX: send the definition difference.
    Change {
        table: DistTable,
        before: TableDefinition,
        using: HashMap<String, String>,
        /// Subcommands the definition does not show (storage parameters, statistics targets,
        /// replica identity, VALIDATE CONSTRAINT), for each shard after `ALTER TABLE <shard>`.
        settings: Vec<Subcommand>,
    },
    /// DROP TABLE / DROP SCHEMA CASCADE: drop the shards, forget the table.
    Drop {
        drops: Vec<(DistTable, TableDefinition, Vec<Placement>)>,
        cascade: bool,
    },
    /// DROP INDEX: drop the shard indexes (CONCURRENTLY: each outside a transaction).
    DropIndexes {
        /// (table, its schema, index name)
        indexes: Vec<(pg_sys::Oid, String, String)>,
        concurrently: bool,
    },
    Truncate {
        definitions: Vec<TableDefinition>,
        cascade: bool,
    },
    /// ALTER TABLE … SET SCHEMA: the shards move to the new schema too.
    SetSchema {
        table: DistTable,
        before: TableDefinition,
    },
    /// ALTER SCHEMA … RENAME of a schema with distributed tables: renamed on every worker.
    RenameSchema { old: String, new: String },
    /// VACUUM / ANALYZE of distributed tables: the same on every shard.
    Vacuum(vacuum::ShardVacuum),
    /// SET CONSTRAINTS ALL DEFERRED / IMMEDIATE: the nodes' deferrable constraints (foreign
    /// keys) follow.
    ConstraintMode { deferred: bool },
    /// CREATE INDEX CONCURRENTLY: build the new index on every shard, concurrently.
    IndexConcurrently {
        table: DistTable,
        before: TableDefinition,
    },
    /// CREATE TABLE … PARTITION OF a distributed table: distribute the new partition with it.
    NewPartition {
        parent: DistTable,
        relation: *mut pg_sys::RangeVar,
    },
    /// ALTER TABLE … ATTACH PARTITION: distribute the partition with its parent, or attach the
    /// shards of a co-located one.
    AttachPartition {
        parent: DistTable,
        partition: pg_sys::Oid,
    },
    /// ALTER TABLE … DETACH PARTITION: detach the shards too; the partition stays distributed.
    DetachPartition {
        parent: DistTable,
        partition: DistTable,
    },
    /// ALTER INDEX … ATTACH PARTITION: each partition shard's index attached to the parent
    /// shard's.
    AttachIndex {
        parent: DistTable,
        partition: DistTable,
        /// (schema, name) of the parent's index and of the partition's.
        parent_index: (String, String),
        index: (String, String),
    },
    /// ALTER TYPE / ALTER DOMAIN and renames of user-defined types: the same on the workers.
    Type(types::TypeChange),
    /// ALTER INDEX … SET / RESET (storage parameters), ALTER COLUMN n SET STATISTICS: the same
    /// on each shard's copy of index `index` (schema, name).
    IndexSettings {
        table: DistTable,
        index: (String, String),
        subcommands: Vec<String>,
    },
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: as below; COPY FROM into a distributed table is run here instead of on the shell.
    let mut pstmt = pstmt;
    unsafe {
        match distributed_copy(pstmt) {
            Some((stmt, relid)) if (*stmt).is_from => {
                let rows = crate::executor::copy::copy_from(stmt, relid, query_string);
                if !qc.is_null() {
                    (*qc).commandTag = pg_sys::CommandTag::CMDTAG_COPY;
                    (*qc).nprocessed = rows;
                }
                return;
            }
            Some((stmt, relid)) => {
                let planned = pg_sys::copyObjectImpl(pstmt.cast()).cast::<pg_sys::PlannedStmt>();
                (*planned).utilityStmt =
                    crate::executor::copy::copy_to_as_query(stmt, relid).cast();
                pstmt = planned;
            }
            None => {}
        }
    }
    // SAFETY: as above; the database name is copied before the statement runs.
    unsafe {
        let node = (*pstmt).utilityStmt;
        if !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_DropdbStmt {
            let name = std::ffi::CStr::from_ptr((*node.cast::<pg_sys::DropdbStmt>()).dbname);
            crate::maintenance::stop_for_database(&name.to_string_lossy());
        }
    }
    // SAFETY: pstmt and query_string are valid for the duration of the call (PostgreSQL's
    // contract for this hook); everything we read from them is copied before the statement runs.
    // PostgreSQL checks the user's rights on the shell; pgdist's catalog is read and written
    // as its owner (`metadata::as_catalog_owner`), whoever runs the statement.
    // SAFETY: a plain getter of the current user.
    let user = unsafe { pg_sys::GetUserId() };
    // Transaction control and settings are PostgreSQL's alone, and must not find a snapshot
    // taken (reading pgdist's catalog takes one): `BEGIN ISOLATION LEVEL …` and `SET
    // TRANSACTION …` must come before any query. (The COPY, DROP DATABASE and ALTER TABLE
    // checks look at the statement's type first.)
    let propagation = unsafe {
        if !is_transaction_control(pstmt) && pgdist_is_active() {
            crate::metadata::as_catalog_owner(|| plan(pstmt, query_string, user)).or_raise()
        } else {
            None
        }
    };
    // SAFETY: pstmt is the statement being run.
    let _shells_only =
        unsafe { alters_distributed_table(pstmt) }.then(crate::planner::ShellsOnly::enter);
    // SAFETY: chaining to the previous hook or the standard implementation with the arguments
    // we were given, unchanged.
    unsafe {
        match PREVIOUS_HOOK {
            Some(previous) => previous(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }
    if let Some(propagation) = propagation {
        crate::metadata::as_catalog_owner(|| propagate(propagation)).or_raise();
    }
}

/// `pstmt` is a transaction control statement (BEGIN, COMMIT, SAVEPOINT, …) or a `SET` /
/// `SHOW` of a setting.
unsafe fn is_transaction_control(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: pstmt is the statement being run.
    unsafe {
        let node = (*pstmt).utilityStmt;
        !node.is_null()
            && matches!(
                (*node).type_,
                pg_sys::NodeTag::T_TransactionStmt
                    | pg_sys::NodeTag::T_VariableSetStmt
                    | pg_sys::NodeTag::T_VariableShowStmt
            )
    }
}

/// The COPY statement and distributed table of `pstmt`, when it copies into or out of one
/// (pg_dump's COPY reads the empty shell: the dump keeps the catalog, not the shards' rows).
unsafe fn distributed_copy(
    pstmt: *mut pg_sys::PlannedStmt,
) -> Option<(*mut pg_sys::CopyStmt, pg_sys::Oid)> {
    // SAFETY: pstmt is the statement being run; casts follow node tags.
    unsafe {
        let node = (*pstmt).utilityStmt;
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_CopyStmt || !pgdist_is_active() {
            return None;
        }
        let stmt = node.cast::<pg_sys::CopyStmt>();
        if (*stmt).relation.is_null() {
            return None;
        }
        let table = distributed((*stmt).relation).ok().flatten()?;
        let from_pg_dump = !pg_sys::application_name.is_null()
            && CStr::from_ptr(pg_sys::application_name).to_bytes() == b"pg_dump";
        (!from_pg_dump || (*stmt).is_from).then_some((stmt, table.oid))
    }
}

/// `pstmt` is an ALTER TABLE of a distributed or reference table (whatever
/// `pgdist.enable_ddl_propagation` says: pg_restore adds the keys of tables it restored).
unsafe fn alters_distributed_table(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: pstmt is the statement being run; the cast follows the node tag.
    unsafe {
        let node = (*pstmt).utilityStmt;
        if node.is_null()
            || (*node).type_ != pg_sys::NodeTag::T_AlterTableStmt
            || !pg_sys::IsTransactionState()
            || crate::metadata::cache::with_tables(|tables| tables.is_empty())
        {
            return false;
        }
        let relation = (*node.cast::<pg_sys::AlterTableStmt>()).relation;
        !relation.is_null() && matches!(distributed(relation), Ok(Some(_)))
    }
}

/// pgdist has distributed tables in this database and we may read its catalog.
unsafe fn pgdist_is_active() -> bool {
    // SAFETY: plain reads of backend globals; get_extension_oid only runs inside a transaction.
    unsafe {
        pg_sys::IsTransactionState()
            && !pg_sys::creating_extension
            && crate::gucs::enable_ddl_propagation()
            && crate::metadata::cache::with_tables(|tables| !tables.is_empty())
    }
}

fn unsupported(what: &str, hint: &str) -> DistributionError {
    DistributionError::UnsupportedStatement {
        what: what.into(),
        hint: hint.into(),
    }
}

/// The relation a RangeVar names (InvalidOid when there is none).
unsafe fn relation_oid(rv: *mut pg_sys::RangeVar) -> pg_sys::Oid {
    // SAFETY: rv is a valid RangeVar from the parse tree; missing relations give InvalidOid.
    unsafe {
        pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::NoLock as _,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    }
}

/// The distributed table a RangeVar names, if any.
unsafe fn distributed(rv: *mut pg_sys::RangeVar) -> Result<Option<DistTable>, DistributionError> {
    // SAFETY: see relation_oid.
    let oid = unsafe { relation_oid(rv) };
    if oid == pg_sys::InvalidOid {
        return Ok(None);
    }
    Ok(crate::metadata::cache::lookup(oid))
}

fn change(table: DistTable) -> Result<Option<Propagation>, DistributionError> {
    let before = shell::read_definition(table.oid)?;
    Ok(Some(Propagation::Change {
        table,
        before,
        using: HashMap::new(),
        settings: Vec::new(),
    }))
}

/// An ALTER TABLE subcommand sent to every shard as the statement said it.
enum Subcommand {
    /// The same text for every shard.
    Verbatim(String),
    /// `VALIDATE CONSTRAINT` of the shell's constraint with this name: the shards check their rows.
    ValidateConstraint(String),
}

impl Subcommand {
    fn sql(&self, shard_id: i64) -> String {
        match self {
            Subcommand::Verbatim(sql) => sql.clone(),
            Subcommand::ValidateConstraint(name) => format!(
                "VALIDATE CONSTRAINT {}",
                quote_identifier(&with_suffix(name, &shard_id.to_string()))
            ),
        }
    }
}

/// Decides, before the statement runs, what it means for distributed tables.
unsafe fn plan(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    user: pg_sys::Oid,
) -> Result<Option<Propagation>, DistributionError> {
    // SAFETY: see process_utility; node types are checked before each cast.
    unsafe {
        let node = (*pstmt).utilityStmt;
        if node.is_null() {
            return Ok(None);
        }
        if let Some(change) = types::plan(pstmt, query_string) {
            return Ok(Some(Propagation::Type(change)));
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_IndexStmt => {
                let stmt = node.cast::<pg_sys::IndexStmt>();
                let Some(table) = distributed((*stmt).relation)? else {
                    return Ok(None);
                };
                if !(*stmt).concurrent {
                    return change(table);
                }
                require_distribution_column_in_unique_index(&table, stmt)?;
                let before = shell::read_definition(table.oid)?;
                Ok(Some(Propagation::IndexConcurrently { table, before }))
            }
            pg_sys::NodeTag::T_CreateStmt => {
                let stmt = node.cast::<pg_sys::CreateStmt>();
                let parents = PgList::<pg_sys::RangeVar>::from_pg((*stmt).inhRelations);
                if !(*stmt).partbound.is_null() {
                    if let Some(parent) = parents.get_ptr(0) {
                        if let Some(parent) = distributed(parent)? {
                            return Ok(Some(Propagation::NewPartition {
                                parent,
                                relation: (*stmt).relation,
                            }));
                        }
                    }
                }
                refuse_children_of_distributed(parents.iter_ptr())?;
                Ok(None)
            }
            pg_sys::NodeTag::T_AlterTableStmt => {
                let stmt = node.cast::<pg_sys::AlterTableStmt>();
                if (*stmt).objtype == pg_sys::ObjectType::OBJECT_INDEX {
                    return plan_alter_index(stmt);
                }
                if (*stmt).objtype != pg_sys::ObjectType::OBJECT_TABLE {
                    return Ok(None);
                }
                let cmds = PgList::<pg_sys::AlterTableCmd>::from_pg((*stmt).cmds);
                let Some(table) = distributed((*stmt).relation)? else {
                    refuse_children_of_distributed(
                        cmds.iter_ptr()
                            .filter(|cmd| (**cmd).subtype == pg_sys::AlterTableType::AT_AddInherit)
                            .map(|cmd| (*cmd).def.cast()),
                    )?;
                    refuse_distributed_partitions_of_local(&cmds)?;
                    return Ok(None);
                };
                if let Some(cmd) = cmds.get_ptr(0).filter(|cmd| partition_command(*cmd)) {
                    return plan_partition_command(&table, cmd);
                }
                let text = CStr::from_ptr(query_string).to_string_lossy().into_owned();
                let mut using = HashMap::new();
                let mut settings = Vec::new();
                for cmd in PgList::<pg_sys::AlterTableCmd>::from_pg((*stmt).cmds).iter_ptr() {
                    check_alter_command(&table, cmd, &text, &mut using, &mut settings)?;
                }
                let before = shell::read_definition(table.oid)?;
                Ok(Some(Propagation::Change {
                    table,
                    before,
                    using,
                    settings,
                }))
            }
            pg_sys::NodeTag::T_RenameStmt => {
                let stmt = node.cast::<pg_sys::RenameStmt>();
                match (*stmt).renameType {
                    pg_sys::ObjectType::OBJECT_TABLE
                    | pg_sys::ObjectType::OBJECT_COLUMN
                    | pg_sys::ObjectType::OBJECT_TABCONSTRAINT => distributed((*stmt).relation)?
                        .map(change)
                        .transpose()
                        .map(Option::flatten),
                    pg_sys::ObjectType::OBJECT_INDEX => {
                        let index = relation_oid((*stmt).relation);
                        let table = if index == pg_sys::InvalidOid {
                            None
                        } else {
                            tables::dist_table(pg_sys::IndexGetRelation(index, true))?
                        };
                        table.map(change).transpose().map(Option::flatten)
                    }
                    pg_sys::ObjectType::OBJECT_SCHEMA => {
                        let schema = pg_sys::get_namespace_oid((*stmt).subname, true);
                        if schema == pg_sys::InvalidOid
                            || tables::tables_in_schemas(&[schema])?.is_empty()
                        {
                            return Ok(None);
                        }
                        Ok(Some(Propagation::RenameSchema {
                            old: CStr::from_ptr((*stmt).subname)
                                .to_string_lossy()
                                .into_owned(),
                            new: CStr::from_ptr((*stmt).newname)
                                .to_string_lossy()
                                .into_owned(),
                        }))
                    }
                    _ => Ok(None),
                }
            }
            pg_sys::NodeTag::T_AlterObjectSchemaStmt => {
                let stmt = node.cast::<pg_sys::AlterObjectSchemaStmt>();
                if (*stmt).relation.is_null() {
                    return Ok(None);
                }
                let Some(table) = distributed((*stmt).relation)? else {
                    return Ok(None);
                };
                let before = shell::read_definition(table.oid)?;
                Ok(Some(Propagation::SetSchema { table, before }))
            }
            pg_sys::NodeTag::T_CreateTrigStmt => {
                // Triggers stay on the shell and fire on the coordinator; deferred ones would
                // fire after the statement's rows are gone from its memory.
                let stmt = node.cast::<pg_sys::CreateTrigStmt>();
                if distributed((*stmt).relation)?.is_none() {
                    return Ok(None);
                }
                if (*stmt).isconstraint {
                    return Err(unsupported(
                        "CREATE CONSTRAINT TRIGGER",
                        "Use a plain AFTER trigger (it fires at the end of the statement), or \
                         a deferrable foreign key.",
                    ));
                }
                Ok(None)
            }
            pg_sys::NodeTag::T_DropStmt => plan_drop(node.cast::<pg_sys::DropStmt>()),
            pg_sys::NodeTag::T_VacuumStmt => {
                Ok(vacuum::plan(node.cast(), user).map(Propagation::Vacuum))
            }
            pg_sys::NodeTag::T_ConstraintsSetStmt => {
                let stmt = node.cast::<pg_sys::ConstraintsSetStmt>();
                let names: Vec<String> = PgList::<pg_sys::RangeVar>::from_pg((*stmt).constraints)
                    .iter_ptr()
                    .map(|rv| CStr::from_ptr((*rv).relname).to_string_lossy().into_owned())
                    .collect();
                if names.is_empty() {
                    return Ok(Some(Propagation::ConstraintMode {
                        deferred: (*stmt).deferred,
                    }));
                }
                let distributed = crate::metadata::as_catalog_owner(|| {
                    pgrx::Spi::get_one_with_args::<bool>(
                        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
                           JOIN pgdist.dist_table d ON d.table_oid = c.conrelid
                          WHERE c.conname = ANY ($1) AND c.condeferrable)",
                        &[names.into()],
                    )
                })?;
                if distributed == Some(true) {
                    return Err(unsupported(
                        "SET CONSTRAINTS with the names of constraints of distributed tables",
                        "Use SET CONSTRAINTS ALL DEFERRED (or IMMEDIATE): it reaches the shards.",
                    ));
                }
                Ok(None)
            }
            pg_sys::NodeTag::T_TruncateStmt => {
                let stmt = node.cast::<pg_sys::TruncateStmt>();
                let mut targets = Vec::new();
                for rv in PgList::<pg_sys::RangeVar>::from_pg((*stmt).relations).iter_ptr() {
                    if let Some(table) = distributed(rv)? {
                        targets.push(shell::read_definition(table.oid)?);
                    }
                }
                Ok((!targets.is_empty()).then_some(Propagation::Truncate {
                    definitions: targets,
                    cascade: (*stmt).behavior == pg_sys::DropBehavior::DROP_CASCADE,
                }))
            }
            _ => Ok(None),
        }
    }
}

/// Refuses making a local table a child of one of `parents` that is a distributed or
/// reference table: reading the parent reads its shards, never the child's rows.
unsafe fn refuse_children_of_distributed(
    parents: impl Iterator<Item = *mut pg_sys::RangeVar>,
) -> Result<(), DistributionError> {
    for parent in parents {
        // SAFETY: a RangeVar of the statement's parse tree.
        if unsafe { distributed(parent)? }.is_some() {
            return Err(unsupported(
                "inheriting from a distributed or reference table",
                "Reads of the parent would not include the child's rows; keep the child a \
                 table of its own.",
            ));
        }
    }
    Ok(())
}

/// Refuses attaching a distributed table as a partition of a local one: reading the parent
/// would read the partition's empty shell.
unsafe fn refuse_distributed_partitions_of_local(
    cmds: &PgList<pg_sys::AlterTableCmd>,
) -> Result<(), DistributionError> {
    for cmd in cmds.iter_ptr() {
        // SAFETY: the statement's subcommands; ATTACH PARTITION's definition is a PartitionCmd.
        unsafe {
            if (*cmd).subtype == pg_sys::AlterTableType::AT_AttachPartition
                && distributed((*(*cmd).def.cast::<pg_sys::PartitionCmd>()).name)?.is_some()
            {
                return Err(unsupported(
                    "attaching a distributed table as a partition of a local table",
                    "Distribute the partitioned table instead (its partitions follow), or \
                     undistribute the partition first.",
                ));
            }
        }
    }
    Ok(())
}

/// True for ATTACH / DETACH PARTITION (PostgreSQL allows no other subcommand with them).
unsafe fn partition_command(cmd: *mut pg_sys::AlterTableCmd) -> bool {
    use pg_sys::AlterTableType::{
        AT_AttachPartition, AT_DetachPartition, AT_DetachPartitionFinalize,
    };
    // SAFETY: a subcommand of the statement.
    let subtype = unsafe { (*cmd).subtype };
    subtype == AT_AttachPartition
        || subtype == AT_DetachPartition
        || subtype == AT_DetachPartitionFinalize
}

/// ATTACH / DETACH PARTITION `cmd` of distributed partitioned table `table`.
unsafe fn plan_partition_command(
    table: &DistTable,
    cmd: *mut pg_sys::AlterTableCmd,
) -> Result<Option<Propagation>, DistributionError> {
    // SAFETY: a partition subcommand of the statement, which carries a PartitionCmd.
    unsafe {
        let subtype = (*cmd).subtype;
        let command = (*cmd).def.cast::<pg_sys::PartitionCmd>();
        let partition = relation_oid((*command).name);
        if partition == pg_sys::InvalidOid {
            return Ok(None); // PostgreSQL reports the missing table
        }
        if subtype == pg_sys::AlterTableType::AT_AttachPartition {
            return Ok(Some(Propagation::AttachPartition {
                parent: table.clone(),
                partition,
            }));
        }
        if (*command).concurrent || subtype == pg_sys::AlterTableType::AT_DetachPartitionFinalize {
            return Err(unsupported(
                "DETACH PARTITION CONCURRENTLY on a distributed table",
                "Detach without CONCURRENTLY (it runs in the coordinator's transaction on \
                 every node).",
            ));
        }
        Ok(crate::metadata::cache::lookup(partition).map(|partition| {
            Propagation::DetachPartition {
                parent: table.clone(),
                partition,
            }
        }))
    }
}

/// A shard on one node: its qualified relation and its id.
struct ShardOf<'a> {
    relation: &'a str,
    id: i64,
}

/// Runs `statement(parent shard, partition shard)` for each shard index, where both live.
fn on_partition_shards(
    parent: &DistTable,
    partition: &DistTable,
    statement: impl Fn(ShardOf, ShardOf) -> String,
) -> Result<(), DistributionError> {
    let parent_definition = shell::read_definition(parent.oid)?;
    let definition = shell::read_definition(partition.oid)?;
    let partition_placements = tables::placements(partition.oid)?;
    run_on_placements(&tables::placements(parent.oid)?, |placement| {
        partition_placements
            .iter()
            .filter(|p| p.shard_index == placement.shard_index && p.node == placement.node)
            .map(|p| {
                statement(
                    ShardOf {
                        relation: &parent_definition.shard_relation(placement.shard_id),
                        id: placement.shard_id,
                    },
                    ShardOf {
                        relation: &definition.shard_relation(p.shard_id),
                        id: p.shard_id,
                    },
                )
            })
            .collect()
    })
}

/// The oids of a table's indexes and of its constraints that have one.
fn keys_and_indexes(definition: &TableDefinition) -> Vec<pg_sys::Oid> {
    let keys = definition
        .constraints
        .iter()
        .filter(|c| matches!(c.kind.as_str(), "p" | "u" | "x"))
        .map(|c| c.oid);
    keys.chain(definition.indexes.iter().map(|i| i.oid))
        .collect()
}

/// The text of one expression starting at byte `start` of `text`: up to the first comma or
/// semicolon outside parentheses and quotes.
fn expression_at(text: &str, start: usize) -> String {
    let bytes = text.as_bytes();
    let (mut depth, mut quote) = (0i32, None::<u8>);
    let mut end = start;
    while end < bytes.len() {
        let byte = bytes[end];
        match quote {
            Some(q) if byte == q => quote = None,
            Some(_) => {}
            None => match byte {
                b'\'' | b'"' => quote = Some(byte),
                b'(' => depth += 1,
                b')' if depth == 0 => break,
                b')' => depth -= 1,
                b',' | b';' if depth == 0 => break,
                _ => {}
            },
        }
        end += 1;
    }
    text.get(start..end).unwrap_or_default().trim().to_string()
}

/// Refuses ALTER TABLE subcommands that cannot be propagated; collects USING expressions.
#[allow(non_upper_case_globals)]
unsafe fn check_alter_command(
    table: &DistTable,
    cmd: *mut pg_sys::AlterTableCmd,
    query: &str,
    using: &mut HashMap<String, String>,
    settings: &mut Vec<Subcommand>,
) -> Result<(), DistributionError> {
    use pg_sys::AlterTableType::*;
    // SAFETY: cmd comes from the statement's parse tree; name may be NULL.
    unsafe {
        let name = if (*cmd).name.is_null() {
            None
        } else {
            Some(CStr::from_ptr((*cmd).name).to_string_lossy().into_owned())
        };
        let on_distribution_column = name.is_some() && name == table.distribution_column;
        match (*cmd).subtype {
            AT_AddColumn | AT_ColumnDefault | AT_DropNotNull | AT_SetNotNull | AT_AddConstraint
            | AT_DropConstraint => Ok(()),
            AT_DropColumn if on_distribution_column => Err(unsupported(
                "dropping the distribution column",
                "Undistribute the table first.",
            )),
            AT_DropColumn => Ok(()),
            AT_AlterColumnType if on_distribution_column => Err(unsupported(
                "changing the type of the distribution column",
                "Undistribute the table, change the type, and distribute it again.",
            )),
            AT_AlterColumnType => {
                let def = (*cmd).def.cast::<pg_sys::ColumnDef>();
                if !def.is_null() && !(*def).raw_default.is_null() {
                    // Parse locations are byte offsets into the whole query string.
                    let location = pg_sys::exprLocation((*def).raw_default);
                    if let (Ok(location), Some(name)) = (usize::try_from(location), name) {
                        using.insert(name, expression_at(query, location));
                    }
                }
                Ok(())
            }
            // Who owns the table and whether policies apply are the coordinator's business
            // (it checks every statement); the shards belong to the service login.
            AT_ChangeOwner | AT_EnableRowSecurity | AT_DisableRowSecurity | AT_ForceRowSecurity
            | AT_NoForceRowSecurity => Ok(()),
            // Triggers fire on the coordinator (`executor/triggers.rs`); foreign keys are
            // enforced by the shards, which ALL would not reach.
            AT_EnableTrigAll | AT_DisableTrigAll => Err(unsupported(
                "ENABLE / DISABLE TRIGGER ALL",
                "Use ENABLE / DISABLE TRIGGER USER or name the trigger: the shards enforce the \
                 table's foreign keys.",
            )),
            AT_EnableTrig | AT_EnableAlwaysTrig | AT_EnableReplicaTrig | AT_DisableTrig
            | AT_EnableTrigUser | AT_DisableTrigUser => Ok(()),
            AT_SetRelOptions | AT_ResetRelOptions => {
                let options: Vec<String> = PgList::<pg_sys::DefElem>::from_pg((*cmd).def.cast())
                    .iter_ptr()
                    .map(|option| storage_option(option, (*cmd).subtype == AT_SetRelOptions))
                    .collect();
                let verb = if (*cmd).subtype == AT_SetRelOptions { "SET" } else { "RESET" };
                settings.push(Subcommand::Verbatim(format!("{verb} ({})", options.join(", "))));
                Ok(())
            }
            AT_ValidateConstraint => {
                settings.push(Subcommand::ValidateConstraint(name.unwrap_or_default()));
                Ok(())
            }
            AT_SetStatistics if name.is_some() && !(*cmd).def.is_null() => {
                let target = (*(*cmd).def.cast::<pg_sys::Integer>()).ival;
                let column = quote_identifier(name.as_deref().unwrap_or_default());
                settings.push(Subcommand::Verbatim(format!(
                    "ALTER COLUMN {column} SET STATISTICS {target}"
                )));
                Ok(())
            }
            AT_ReplicaIdentity => {
                let identity = (*cmd).def.cast::<pg_sys::ReplicaIdentityStmt>();
                let form = match (*identity).identity_type as u8 {
                    b'd' => "DEFAULT",
                    b'f' => "FULL",
                    b'n' => "NOTHING",
                    _ => {
                        return Err(unsupported(
                            "REPLICA IDENTITY USING INDEX",
                            "Use REPLICA IDENTITY DEFAULT (the primary key) or FULL.",
                        ))
                    }
                };
                settings.push(Subcommand::Verbatim(format!("REPLICA IDENTITY {form}")));
                Ok(())
            }
            _ => Err(unsupported(
                "this ALTER TABLE subcommand",
                "Supported on distributed tables: ADD / DROP COLUMN, ALTER COLUMN TYPE, SET / DROP DEFAULT, \
                 SET / DROP NOT NULL, ADD / DROP / VALIDATE CONSTRAINT, RENAME, OWNER TO, SET / RESET (storage \
                 parameters), ALTER COLUMN SET STATISTICS, REPLICA IDENTITY, ENABLE / DISABLE ROW \
                 LEVEL SECURITY, ENABLE / DISABLE TRIGGER.",
            )),
        }
    }
}

/// ALTER INDEX of an index of a distributed table: its settings reach the shards' copies.
#[allow(non_upper_case_globals)]
unsafe fn plan_alter_index(
    stmt: *mut pg_sys::AlterTableStmt,
) -> Result<Option<Propagation>, DistributionError> {
    use pg_sys::AlterTableType::*;
    // SAFETY: an ALTER INDEX statement of the parse tree; its subcommands are AlterTableCmds.
    unsafe {
        let index = relation_oid((*stmt).relation);
        if index == pg_sys::InvalidOid {
            return Ok(None);
        }
        let Some(table) = tables::dist_table(pg_sys::IndexGetRelation(index, true))? else {
            return Ok(None);
        };
        let (schema, name) = crate::executor::schema_and_name(index);
        let mut subcommands = Vec::new();
        for cmd in PgList::<pg_sys::AlterTableCmd>::from_pg((*stmt).cmds).iter_ptr() {
            let subtype = (*cmd).subtype;
            match subtype {
                AT_AttachPartition => {
                    let command = (*cmd).def.cast::<pg_sys::PartitionCmd>();
                    let child = relation_oid((*command).name);
                    if child == pg_sys::InvalidOid {
                        return Ok(None); // PostgreSQL reports the missing index
                    }
                    let Some(partition) =
                        tables::dist_table(pg_sys::IndexGetRelation(child, true))?
                    else {
                        return Ok(None); // PostgreSQL refuses: not an index of a partition
                    };
                    return Ok(Some(Propagation::AttachIndex {
                        parent: table,
                        partition,
                        parent_index: (schema, name),
                        index: crate::executor::schema_and_name(child),
                    }));
                }
                AT_SetRelOptions | AT_ResetRelOptions => {
                    let set = subtype == AT_SetRelOptions;
                    let options: Vec<String> =
                        PgList::<pg_sys::DefElem>::from_pg((*cmd).def.cast())
                            .iter_ptr()
                            .map(|option| storage_option(option, set))
                            .collect();
                    let verb = if set { "SET" } else { "RESET" };
                    subcommands.push(format!("{verb} ({})", options.join(", ")));
                }
                AT_SetStatistics if (*cmd).num > 0 && !(*cmd).def.is_null() => {
                    let target = (*(*cmd).def.cast::<pg_sys::Integer>()).ival;
                    subcommands.push(format!(
                        "ALTER COLUMN {} SET STATISTICS {target}",
                        (*cmd).num
                    ));
                }
                _ => {
                    return Err(unsupported(
                        "this ALTER INDEX subcommand on an index of a distributed table",
                        "Supported: SET / RESET (storage parameters), ALTER COLUMN n SET \
                         STATISTICS, ATTACH PARTITION, RENAME.",
                    ))
                }
            }
        }
        Ok(Some(Propagation::IndexSettings {
            table,
            index: (schema, name),
            subcommands,
        }))
    }
}

/// One storage parameter of `SET (…)` / `RESET (…)` as SQL: `fillfactor = '70'`,
/// `toast.autovacuum_enabled = 'false'`, or just the name to reset.
unsafe fn storage_option(option: *mut pg_sys::DefElem, with_value: bool) -> String {
    // SAFETY: option is a DefElem of the statement's parse tree; defGetString copies its value.
    unsafe {
        let mut name = quote_identifier(&CStr::from_ptr((*option).defname).to_string_lossy());
        if !(*option).defnamespace.is_null() {
            let namespace = CStr::from_ptr((*option).defnamespace).to_string_lossy();
            name = format!("{}.{name}", quote_identifier(&namespace));
        }
        if !with_value || (*option).arg.is_null() {
            return name;
        }
        let value = CStr::from_ptr(pg_sys::defGetString(option)).to_string_lossy();
        format!("{name} = {}", quote_literal(&value))
    }
}

unsafe fn plan_drop(stmt: *mut pg_sys::DropStmt) -> Result<Option<Propagation>, DistributionError> {
    // SAFETY: stmt is a DropStmt from the parse tree; its objects are lists of name lists.
    unsafe {
        let cascade = (*stmt).behavior == pg_sys::DropBehavior::DROP_CASCADE;
        match (*stmt).removeType {
            pg_sys::ObjectType::OBJECT_TABLE => {
                let mut drops = Vec::new();
                for names in PgList::<pg_sys::List>::from_pg((*stmt).objects).iter_ptr() {
                    if let Some(table) = distributed(pg_sys::makeRangeVarFromNameList(names))? {
                        // Dropping a partitioned table drops its partitions.
                        let partitions = tables::distributed_partitions(table.oid)?;
                        drops.push(table);
                        for partition in partitions {
                            drops.extend(tables::dist_table(partition)?);
                        }
                    }
                }
                plan_table_drops(drops, cascade)
            }
            pg_sys::ObjectType::OBJECT_SCHEMA => {
                let mut schemas = Vec::new();
                for name in PgList::<pg_sys::String>::from_pg((*stmt).objects).iter_ptr() {
                    let oid = pg_sys::get_namespace_oid((*name).sval, true);
                    if oid != pg_sys::InvalidOid {
                        schemas.push(oid);
                    }
                }
                let mut drops = Vec::new();
                for oid in tables::tables_in_schemas(&schemas)? {
                    drops.extend(tables::dist_table(oid)?);
                }
                plan_table_drops(drops, cascade)
            }
            pg_sys::ObjectType::OBJECT_INDEX => {
                let mut indexes = Vec::new();
                for names in PgList::<pg_sys::List>::from_pg((*stmt).objects).iter_ptr() {
                    let rv = pg_sys::makeRangeVarFromNameList(names);
                    let index = relation_oid(rv);
                    if index == pg_sys::InvalidOid {
                        continue;
                    }
                    // Catalog caches only, no SPI: DROP INDEX CONCURRENTLY must stay the
                    // transaction's first action (the SPI reads made it fail that check).
                    let table = pg_sys::IndexGetRelation(index, true);
                    if crate::metadata::cache::lookup(table).is_some() {
                        let (schema, _) = crate::executor::schema_and_name(table);
                        let name = CStr::from_ptr((*rv).relname).to_string_lossy().into_owned();
                        indexes.push((table, schema, name));
                    }
                }
                Ok((!indexes.is_empty()).then_some(Propagation::DropIndexes {
                    indexes,
                    concurrently: (*stmt).concurrent,
                }))
            }
            pg_sys::ObjectType::OBJECT_EXTENSION => {
                for name in PgList::<pg_sys::String>::from_pg((*stmt).objects).iter_ptr() {
                    if CStr::from_ptr((*name).sval).to_bytes() == b"pgdist" {
                        let count =
                            pgrx::Spi::get_one::<i64>("SELECT count(*) FROM pgdist.dist_table")?
                                .unwrap_or_default();
                        if count > 0 {
                            return Err(DistributionError::StillDistributed(count));
                        }
                    }
                }
                Ok(None)
            }
            pg_sys::ObjectType::OBJECT_TYPE | pg_sys::ObjectType::OBJECT_DOMAIN => {
                Ok(types::plan_drop(stmt)?.map(Propagation::Type))
            }
            _ => Ok(None),
        }
    }
}

fn plan_table_drops(
    drops: Vec<DistTable>,
    cascade: bool,
) -> Result<Option<Propagation>, DistributionError> {
    let mut planned = Vec::new();
    for table in drops {
        let definition = shell::read_definition(table.oid)?;
        let placements = tables::placements(table.oid)?;
        planned.push((table, definition, placements));
    }
    Ok((!planned.is_empty()).then_some(Propagation::Drop {
        drops: planned,
        cascade,
    }))
}

fn propagate(propagation: Propagation) -> Result<(), DistributionError> {
    match propagation {
        Propagation::Change {
            table,
            before,
            using,
            settings,
        } => {
            let after = shell::read_definition(table.oid)?;
            if table.method != Method::Reference {
                check_uniqueness(&table, &after)?;
            }
            let name = relation_name(table.oid);
            let referencing = foreign_keys::Referencing::of(&table, &name);
            for added in after
                .constraints
                .iter()
                .filter(|c| !before.constraints.iter().any(|b| b.oid == c.oid))
            {
                foreign_keys::check(&referencing, added)?;
            }
            if let Some(column) = &table.distribution_column {
                if let Some(old) = before.column(column) {
                    if let Some(new) = after.column_by_attnum(old.attnum) {
                        if new.name != *column {
                            tables::set_distribution_column(table.oid, &new.name)?;
                        }
                    }
                }
            }
            let placements = tables::placements(table.oid)?;
            let targets = foreign_keys::Targets::of(&after)?;
            // A column added or changed to a user-defined type: the workers get the type first.
            let column_types =
                |d: &TableDefinition| d.columns.iter().map(|c| c.type_oid).collect::<Vec<_>>();
            let types = match column_types(&after) == column_types(&before) {
                true => Vec::new(),
                false => crate::distribution::user_types::type_statements(table.oid)?,
            };
            run_on_placements(&placements, |placement| {
                let shard_id = placement.shard_id;
                let foreign_key = |constraint: &shell::Constraint| {
                    targets.shard_sql(&after, constraint, shard_id, placement.shard_index)
                };
                let mut statements =
                    diff::shard_statements(&before, &after, shard_id, &using, foreign_key);
                if !statements.is_empty() {
                    statements.splice(0..0, types.iter().cloned());
                }
                let shard = after.shard_relation(shard_id);
                statements.extend(
                    settings
                        .iter()
                        .map(|s| format!("ALTER TABLE {shard} {}", s.sql(shard_id))),
                );
                statements
            })?;
            // An index or key added to a partitioned table reached the partitions' shards
            // under names PostgreSQL chose there.
            if after.partition_key.is_some()
                && keys_and_indexes(&after) != keys_and_indexes(&before)
            {
                partition_names::align_index_names(table.oid)?;
            }
            Ok(())
        }
        Propagation::Drop { drops, cascade } => {
            // CASCADE drops the shards' foreign keys that reference these shards, as PostgreSQL
            // dropped the shells' ones.
            let behaviour = if cascade { " CASCADE" } else { "" };
            for (table, definition, placements) in drops {
                run_on_placements(&placements, |placement| {
                    vec![format!(
                        "DROP TABLE IF EXISTS {}{behaviour}",
                        definition.shard_relation(placement.shard_id)
                    )]
                })?;
                tables::delete_table(table.oid, table.colocation_id)?;
            }
            Ok(())
        }
        Propagation::Vacuum(work) => vacuum::run(work),
        Propagation::SetSchema { table, before } => {
            let (schema, _) = crate::executor::schema_and_name(table.oid);
            let schema = quote_identifier(&schema);
            run_on_placements(&tables::placements(table.oid)?, |placement| {
                vec![
                    format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
                    format!(
                        "ALTER TABLE {} SET SCHEMA {schema}",
                        before.shard_relation(placement.shard_id)
                    ),
                ]
            })
        }
        Propagation::RenameSchema { old, new } => {
            // Only workers with shards have the schema.
            let sql = format!(
                "DO $pgdist$ BEGIN IF pg_catalog.to_regnamespace({}) IS NOT NULL THEN \
                 ALTER SCHEMA {} RENAME TO {}; END IF; END $pgdist$",
                quote_literal(&quote_identifier(&old)),
                quote_identifier(&old),
                quote_identifier(&new)
            );
            crate::distribution::run_on_every_worker(&sql)
        }
        Propagation::ConstraintMode { deferred } => {
            // SAFETY: a plain read of the transaction state.
            if unsafe { pg_sys::IsTransactionBlock() } {
                remote_xact::set_constraint_mode(deferred);
            }
            Ok(())
        }
        Propagation::IndexConcurrently { table, before } => {
            build_index_concurrently(&table, &before)
        }
        Propagation::NewPartition { parent, relation } => {
            // SAFETY: the statement's RangeVar; PostgreSQL has just created the table.
            let partition = unsafe { relation_oid(relation) };
            crate::distribution::create::distribute_partition(partition, &parent)
        }
        Propagation::AttachPartition { parent, partition } => {
            match tables::dist_table(partition)? {
                None => crate::distribution::create::distribute_partition(partition, &parent),
                Some(child)
                    if child.colocation_id == parent.colocation_id
                        && child.distribution_column == parent.distribution_column =>
                {
                    let bound = shell::read_definition(partition)?
                        .partition_of
                        .map(|p| p.bound)
                        .unwrap_or_default();
                    on_partition_shards(&parent, &child, |parent_shard, shard| {
                        format!(
                            "ALTER TABLE {} ATTACH PARTITION {} {bound}",
                            parent_shard.relation, shard.relation
                        )
                    })?;
                    partition_names::align_index_names(child.oid)
                }
                Some(_) => Err(unsupported(
                    "attaching a distributed table that is not co-located with the partitioned \
                     table, or distributed by another column",
                    "Undistribute the table first: attached, it is distributed with its parent.",
                )),
            }
        }
        Propagation::DetachPartition { parent, partition } => {
            on_partition_shards(&parent, &partition, |parent_shard, shard| {
                format!(
                    "ALTER TABLE {} DETACH PARTITION {}",
                    parent_shard.relation, shard.relation
                )
            })?;
            partition_names::rename_detached_constraints(&parent, &partition)
        }
        Propagation::Type(change) => types::propagate(change),
        Propagation::AttachIndex {
            parent,
            partition,
            parent_index: (parent_schema, parent_name),
            index: (schema, name),
        } => on_partition_shards(&parent, &partition, |parent_shard, shard| {
            format!(
                "ALTER INDEX {} ATTACH PARTITION {}",
                quote_qualified(
                    &parent_schema,
                    &with_suffix(&parent_name, &parent_shard.id.to_string())
                ),
                quote_qualified(&schema, &with_suffix(&name, &shard.id.to_string()))
            )
        }),
        Propagation::IndexSettings {
            table,
            index: (schema, name),
            subcommands,
        } => run_on_placements(&tables::placements(table.oid)?, |placement| {
            let shard_index = quote_qualified(
                &schema,
                &with_suffix(&name, &placement.shard_id.to_string()),
            );
            vec![format!(
                "ALTER INDEX {shard_index} {}",
                subcommands.join(", ")
            )]
        }),
        Propagation::DropIndexes {
            indexes,
            concurrently,
        } => {
            for (table, schema, index) in indexes {
                let placements = tables::placements(table)?;
                let shard_index = |shard_id: i64| {
                    quote_qualified(&schema, &with_suffix(&index, &shard_id.to_string()))
                };
                if !concurrently {
                    run_on_placements(&placements, |placement| {
                        vec![format!(
                            "DROP INDEX IF EXISTS {}",
                            shard_index(placement.shard_id)
                        )]
                    })?;
                    continue;
                }
                let mut per_node: BTreeMap<i32, (NodeAddress, Vec<String>)> = BTreeMap::new();
                for placement in &placements {
                    per_node
                        .entry(placement.node.node_id)
                        .or_insert_with(|| (placement.node.clone(), Vec::new()))
                        .1
                        .push(format!(
                            "DROP INDEX CONCURRENTLY IF EXISTS {}",
                            shard_index(placement.shard_id)
                        ));
                }
                // The coordinator's index is gone for good by now: a shard that kept its copy
                // only takes space, so this is a warning, with what to run.
                if let Err(err) = run_outside_transactions(per_node)? {
                    pgrx::warning!(
                        "pgdist: index {index} was dropped, but not on every shard ({err}); \
                         its copies are named {index}_<shard id>: drop the ones left on the \
                         nodes of pgdist.shards"
                    );
                }
            }
            Ok(())
        }
        Propagation::Truncate {
            definitions,
            cascade,
        } => {
            // One TRUNCATE per node naming every shard, so that shards referencing each other
            // go together; CASCADE also empties the shards that reference them, as PostgreSQL
            // emptied the shells.
            let mut shards = Vec::new();
            for definition in &definitions {
                for placement in tables::placements(definition.oid)? {
                    shards.push((
                        placement.node,
                        definition.shard_relation(placement.shard_id),
                    ));
                }
            }
            let behaviour = if cascade { " CASCADE" } else { "" };
            crate::distribution::run_naming_shards(shards, |list| {
                format!("TRUNCATE {list}{behaviour}")
            })
        }
    }
}

/// A unique index built concurrently must include the distribution column: checked before
/// the shell's index is built (and committed).
unsafe fn require_distribution_column_in_unique_index(
    table: &DistTable,
    stmt: *mut pg_sys::IndexStmt,
) -> Result<(), DistributionError> {
    // SAFETY: stmt is the statement being run; its index elements are IndexElem nodes.
    unsafe {
        let Some(column) = table.distribution_column.as_deref() else {
            return Ok(());
        };
        if !(*stmt).unique {
            return Ok(());
        }
        let includes = PgList::<pg_sys::IndexElem>::from_pg((*stmt).indexParams)
            .iter_ptr()
            .any(|elem| {
                !(*elem).name.is_null()
                    && CStr::from_ptr((*elem).name).to_bytes() == column.as_bytes()
            });
        if includes {
            return Ok(());
        }
        let index = if (*stmt).idxname.is_null() {
            "(new index)".to_string()
        } else {
            CStr::from_ptr((*stmt).idxname)
                .to_string_lossy()
                .into_owned()
        };
        Err(DistributionError::UniqueWithoutDistributionColumn {
            table: relation_name(table.oid),
            constraint: index,
            column: column.to_string(),
        })
    }
}

/// Builds the indexes CREATE INDEX CONCURRENTLY added to the shell on every shard placement,
/// each with its own `CREATE INDEX CONCURRENTLY` outside any transaction: one connection per
/// node, nodes in parallel, a NOTICE per node done. A failure marks the shell's index INVALID.
fn build_index_concurrently(
    table: &DistTable,
    before: &TableDefinition,
) -> Result<(), DistributionError> {
    let after = shell::read_definition(table.oid)?;
    let placements = tables::placements(table.oid)?;
    for index in after
        .indexes
        .iter()
        .filter(|i| !before.indexes.iter().any(|b| b.oid == i.oid))
    {
        let mut per_node: BTreeMap<i32, (NodeAddress, Vec<String>)> = BTreeMap::new();
        for placement in &placements {
            let sql = shell::index_sql(&after, index, placement.shard_id).replacen(
                "INDEX ",
                "INDEX CONCURRENTLY ",
                1,
            );
            per_node
                .entry(placement.node.node_id)
                .or_insert_with(|| (placement.node.clone(), Vec::new()))
                .1
                .push(sql);
        }
        let failure = match run_outside_transactions(per_node)? {
            Ok(done) => {
                for (node, shards) in done {
                    pgrx::notice!(
                        "pgdist: index {} built on {shards} shards of {node}",
                        index.name
                    );
                }
                None
            }
            Err(err) => Some(err),
        };
        if let Some(cause) = failure {
            // SAFETY: clears indisvalid of the index this statement just built (an in-place
            // update, so it stays when the error aborts the transaction).
            unsafe {
                pg_sys::index_set_state_flags(
                    index.oid,
                    pg_sys::IndexStateFlagsAction::INDEX_DROP_CLEAR_VALID,
                );
            }
            return Err(DistributionError::ConcurrentIndex {
                index: index.name.clone(),
                cause,
            });
        }
    }
    Ok(())
}

/// Runs each node's statements one by one, each in its own transaction, over a fresh
/// connection per node (nodes in parallel): for the statements that refuse to run in a
/// transaction block. Returns how many statements each node ran, or the first failure.
fn run_outside_transactions(
    per_node: BTreeMap<i32, (NodeAddress, Vec<String>)>,
) -> Result<Result<Vec<(NodeAddress, usize)>, RemoteError>, DistributionError> {
    let work = per_node
        .into_values()
        .map(|(node, statements)| Ok((target_for(node)?, statements)))
        .collect::<Result<Vec<_>, DistributionError>>()?;
    let runs = work.into_iter().map(|(target, statements)| async move {
        let conn = NodeConnection::open(&target).await?;
        let _in_flight = runtime::InFlight::register(conn.canceller());
        for sql in &statements {
            conn.simple_query(sql).await?;
        }
        Ok::<_, RemoteError>((target.node, statements.len()))
    });
    Ok(runtime::block_on(futures_util::future::join_all(runs))
        .and_then(|results| results.into_iter().collect()))
}

/// A new UNIQUE / PRIMARY KEY / EXCLUDE constraint or unique index must include the
/// distribution column (uniqueness is enforced per shard).
fn check_uniqueness(table: &DistTable, after: &TableDefinition) -> Result<(), DistributionError> {
    match table
        .distribution_column
        .as_deref()
        .and_then(|c| after.column(c))
    {
        Some(column) => crate::distribution::create::require_column_in_unique_keys(
            after,
            &relation_name(table.oid),
            column,
        ),
        None => Ok(()),
    }
}
