//! Distributed and reference tables: creating them (shards, placements, moving existing rows),
//! and turning them back into local tables.

pub mod create;
pub mod data_move;
pub mod foreign_keys;
pub mod hashing;
pub mod partition_names;
pub mod shell;
pub mod statistics;
pub mod undistribute;
pub mod user_types;

use std::collections::BTreeMap;

use pgrx::{pg_sys, PgSqlErrorCode};

use crate::cluster::target_for;
use crate::error::PgError;
use crate::metadata::tables::Placement;
use crate::metadata::MetadataError;
use crate::remote::{NodeAddress, RemoteError};
use crate::transaction::remote_xact;

#[derive(Debug, thiserror::Error)]
pub enum DistributionError {
    #[error("table \"{0}\" is already distributed")]
    AlreadyDistributed(String),
    #[error("table \"{0}\" is not a distributed or reference table")]
    NotDistributed(String),
    #[error("\"{0}\" is not an ordinary table")]
    NotATable(String),
    #[error("{what} are not supported for distributed tables yet (table \"{table}\")")]
    Unsupported {
        table: String,
        what: String,
        hint: String,
    },
    #[error("{what} is not supported on distributed tables yet")]
    UnsupportedStatement { what: String, hint: String },
    #[error("cannot drop extension pgdist while {0} distributed or reference table(s) exist")]
    StillDistributed(i64),
    #[error("column \"{column}\" of relation \"{table}\" does not exist")]
    NoSuchColumn { table: String, column: String },
    #[error("could not identify a hash function for type {0}")]
    NoHashFunction(String),
    #[error("type {0} has no default btree ordering, so it cannot be range-distributed")]
    NoOrdering(String),
    #[error("constraint \"{constraint}\" on \"{table}\" does not include the distribution column \"{column}\"")]
    UniqueWithoutDistributionColumn {
        table: String,
        constraint: String,
        column: String,
    },
    #[error("foreign key \"{constraint}\" of {table} is not supported: {why}")]
    ForeignKey {
        constraint: String,
        table: String,
        why: String,
        hint: String,
    },
    #[error("{0}")]
    Move(String),
    #[error("the distribution column contains NULL values")]
    NullDistributionValue,
    #[error("method must be 'hash' or 'range', not \"{0}\"")]
    BadMethod(String),
    #[error("{0}")]
    BadArgument(String),
    #[error("there are no worker nodes to place shards on")]
    NoWorkers,
    #[error("cannot co-locate with \"{other}\": {why}")]
    CannotColocate { other: String, why: String },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("could not build index \"{index}\" concurrently on every shard: {cause}")]
    ConcurrentIndex { index: String, cause: RemoteError },
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

impl From<pgrx::spi::Error> for DistributionError {
    fn from(err: pgrx::spi::Error) -> Self {
        DistributionError::Metadata(MetadataError::Spi(err))
    }
}

impl PgError for DistributionError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use DistributionError::*;
        match self {
            AlreadyDistributed(_) => PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            NotDistributed(_) | NotATable(_) => PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            Unsupported { .. }
            | UnsupportedStatement { .. }
            | ForeignKey { .. }
            | UniqueWithoutDistributionColumn { .. } => {
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
            }
            NoSuchColumn { .. } => PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            NoHashFunction(_) | NoOrdering(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
            NullDistributionValue => PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
            BadMethod(_) | BadArgument(_) | Move(_) => {
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
            }
            NoWorkers => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            StillDistributed(_) => PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            CannotColocate { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Remote(err) | ConcurrentIndex { cause: err, .. } => err.sqlstate(),
            Metadata(err) => err.sqlstate(),
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            DistributionError::Remote(err)
            | DistributionError::ConcurrentIndex { cause: err, .. } => err.detail(),
            _ => None,
        }
    }

    fn hint(&self) -> Option<String> {
        use DistributionError::*;
        match self {
            AlreadyDistributed(_) => Some("See SELECT * FROM pgdist.tables.".into()),
            NotDistributed(_) => Some("See SELECT * FROM pgdist.tables.".into()),
            Unsupported { hint, .. } | UnsupportedStatement { hint, .. } | ForeignKey { hint, .. } => {
                Some(hint.clone())
            }
            StillDistributed(_) => Some(
                "Undistribute them first: SELECT pgdist.undistribute_table(table_name) FROM pgdist.tables;".into(),
            ),
            NoHashFunction(_) => Some(
                "Choose a column whose type has a default hash operator class, or use method => 'range'."
                    .into(),
            ),
            UniqueWithoutDistributionColumn { .. } => Some(
                "Uniqueness can only be enforced per shard: add the distribution column to the \
                 constraint, or distribute by one of its columns."
                    .into(),
            ),
            NullDistributionValue => Some(
                "Every row needs a value in the distribution column: fill or delete the NULL rows \
                 (and consider a NOT NULL constraint)."
                    .into(),
            ),
            NoWorkers => Some("Add workers with SELECT pgdist.add_node(host, port).".into()),
            BadArgument(_) => Some("See the arguments of pgdist.create_distributed_table in the README.".into()),
            BadMethod(_) => Some("Use method => 'hash' (the default) or method => 'range'.".into()),
            Move(_) => Some(
                "pgdist.shards shows where each shard is (shard_id, node_id), pgdist.nodes the \
                 workers."
                    .into(),
            ),
            Remote(err) => err.hint(),
            ConcurrentIndex { .. } => Some(
                "The index is left INVALID, as PostgreSQL leaves an index whose CREATE INDEX \
                 CONCURRENTLY failed: DROP INDEX it (on the coordinator; the shards follow), \
                 fix the cause and run the statement again."
                    .into(),
            ),
            _ => None,
        }
    }
}

/// Runs the statements `statements` gives for each shard placement, one batch per node (nodes
/// in parallel), in the coordinator's transaction.
pub fn run_on_placements(
    placements: &[Placement],
    statements: impl Fn(&Placement) -> Vec<String>,
) -> Result<(), DistributionError> {
    let mut per_node: BTreeMap<i32, (NodeAddress, Vec<String>)> = BTreeMap::new();
    for placement in placements {
        let entry = per_node
            .entry(placement.node.node_id)
            .or_insert_with(|| (placement.node.clone(), Vec::new()));
        entry.1.extend(statements(placement));
    }
    let work = per_node
        .into_values()
        .filter(|(_, statements)| !statements.is_empty())
        .map(|(node, statements)| Ok((target_for(node)?, statements.join(";\n"))))
        .collect::<Result<Vec<_>, DistributionError>>()?;
    if !work.is_empty() {
        remote_xact::run_batches(&work);
    }
    Ok(())
}

/// Runs `sql` on every primary worker, all at once, in the coordinator's transaction.
pub fn run_on_every_worker(sql: &str) -> Result<(), DistributionError> {
    let work = crate::metadata::nodes::primary_nodes()?
        .into_iter()
        .map(|node| Ok((target_for(node.address)?, sql.to_string())))
        .collect::<Result<Vec<_>, DistributionError>>()?;
    if !work.is_empty() {
        remote_xact::run_batches(&work);
    }
    Ok(())
}

/// Runs one statement per node naming all of that node's `shards` (node, qualified shard
/// relation): `statement("a_1, b_1")` — nodes in parallel, in the coordinator's transaction.
/// For the statements whose shards must go together (foreign keys between them).
pub fn run_naming_shards(
    shards: impl IntoIterator<Item = (NodeAddress, String)>,
    statement: impl Fn(&str) -> String,
) -> Result<(), DistributionError> {
    let mut per_node: BTreeMap<i32, (NodeAddress, Vec<String>)> = BTreeMap::new();
    for (node, relation) in shards {
        per_node
            .entry(node.node_id)
            .or_insert_with(|| (node.clone(), Vec::new()))
            .1
            .push(relation);
    }
    let work = per_node
        .into_values()
        .map(|(node, relations)| Ok((target_for(node)?, statement(&relations.join(", ")))))
        .collect::<Result<Vec<_>, DistributionError>>()?;
    if !work.is_empty() {
        remote_xact::run_batches(&work);
    }
    Ok(())
}

/// Runs `f` with the user triggers of every table switched off (`session_replication_role =
/// replica`, as a restore does): rows that only change place — into the shards when a table is
/// distributed, back when it is undistributed — are not new writes for its triggers.
pub fn without_user_triggers<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the setting is saved in a GUC nest level of its own and restored when it is
    // popped, or by the transaction's abort when f raises an error.
    unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"session_replication_role".as_ptr(),
            c"replica".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let result = f();
        pg_sys::AtEOXact_GUC(true, level);
        result
    }
}
