//! Cluster membership and operator tools: `add_node`, `remove_node`, `run_on_workers`.

pub mod membership;
pub mod run_on_workers;

use std::ffi::CStr;

use pgrx::{pg_sys, PgSqlErrorCode};

use crate::error::PgError;
use crate::metadata::MetadataError;
use crate::remote::{NodeAddress, NodeTarget, RemoteError};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("role must be 'primary' or 'replica', not \"{0}\"")]
    BadRole(String),
    #[error("port {0} is out of range")]
    BadPort(i32),
    #[error("{host}:{port} is already in the cluster as node {node_id}")]
    AlreadyAdded {
        host: String,
        port: u16,
        node_id: i32,
    },
    #[error("{node} is the same server as node {existing} (same system identifier)")]
    SameServer { node: NodeAddress, existing: i32 },
    #[error("{0} is this coordinator itself")]
    IsCoordinator(NodeAddress),
    #[error("{node} runs PostgreSQL {found}, the coordinator runs PostgreSQL {expected}")]
    VersionMismatch {
        node: NodeAddress,
        found: i32,
        expected: i32,
    },
    #[error("pgdist is not available on {0}")]
    ExtensionMissing(NodeAddress),
    #[error("{node} has pgdist {found}, the coordinator has pgdist {expected}")]
    ExtensionVersionMismatch {
        node: NodeAddress,
        found: String,
        expected: String,
    },
    #[error("{node} is {actual}, so it cannot be added as a {role}")]
    WrongRecoveryState {
        node: NodeAddress,
        role: &'static str,
        actual: &'static str,
    },
    #[error("{0} is a standby of no node in the cluster")]
    UnknownPrimary(NodeAddress),
    #[error("node {0} does not exist")]
    NoSuchNode(i32),
    #[error("node {node_id} still has replicas registered: {replicas}")]
    HasReplicas { node_id: i32, replicas: String },
    #[error("unexpected answer from {0} while checking it")]
    BadAnswer(NodeAddress),
    #[error("node {node_id} still holds {count} shard placement(s)")]
    HasPlacements { node_id: i32, count: i64 },
    #[error("node {0} holds the last copy of the reference tables")]
    LastReferenceCopy(i32),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Distribution(#[from] crate::distribution::DistributionError),
}

impl PgError for ClusterError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use ClusterError::*;
        match self {
            BadRole(_) | BadPort(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            AlreadyAdded { .. } | SameServer { .. } => PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            IsCoordinator(_) | WrongRecoveryState { .. } | UnknownPrimary(_) => {
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
            }
            VersionMismatch { .. } | ExtensionMissing(_) | ExtensionVersionMismatch { .. } => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            NoSuchNode(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            HasReplicas { .. } | HasPlacements { .. } | LastReferenceCopy(_) => {
                PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST
            }
            BadAnswer(_) => PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
            Remote(err) => err.sqlstate(),
            Metadata(err) => err.sqlstate(),
            Distribution(err) => err.sqlstate(),
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            ClusterError::Remote(err) => err.detail(),
            ClusterError::Distribution(err) => err.detail(),
            _ => None,
        }
    }

    fn hint(&self) -> Option<String> {
        use ClusterError::*;
        match self {
            AlreadyAdded { .. } | SameServer { .. } => {
                Some("See SELECT * FROM pgdist.nodes; to add a node again, remove it first.".into())
            }
            IsCoordinator(_) => Some("Add worker servers, not the coordinator.".into()),
            ExtensionMissing(_) => Some(
                "Install the pgdist package on that server and add pgdist to its \
                 shared_preload_libraries."
                    .into(),
            ),
            ExtensionVersionMismatch { .. } => Some(
                "Install the same pgdist version on every node, then run ALTER EXTENSION pgdist \
                 UPDATE where it is older."
                    .into(),
            ),
            WrongRecoveryState { .. } => Some(
                "Add primaries with role => 'primary' and streaming standbys with \
                 role => 'replica'."
                    .into(),
            ),
            UnknownPrimary(_) => Some("Add the standby's primary first.".into()),
            HasReplicas { .. } => Some("Remove the replicas first.".into()),
            HasPlacements { .. } => Some(
                "Move its shards to other nodes first, or undistribute the tables that use it."
                    .into(),
            ),
            LastReferenceCopy(_) => {
                Some("Add another worker first, or undistribute the reference tables.".into())
            }
            Remote(err) => err.hint(),
            Distribution(err) => err.hint(),
            _ => None,
        }
    }
}

/// Name of the login pgdist uses on every node: the coordinator's bootstrap superuser (the role
/// that ran initdb, `postgres` on Debian). Fragments run under it whatever role the user is:
/// the coordinator checks privileges first (docs/security.md).
pub fn service_login_name() -> String {
    // SAFETY: GetUserNameFromId(.., false) raises an ERROR rather than returning NULL, and
    // returns a palloc'd C string we copy at once.
    unsafe {
        let name =
            pg_sys::GetUserNameFromId(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), false);
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

/// Raises 42501 unless the current role is a superuser: `what` (cluster administration runs
/// on the workers under pgdist's superuser login).
pub fn require_superuser(what: &str) {
    // SAFETY: a role lookup for the current user.
    if !unsafe { pg_sys::superuser() } {
        pgrx::ereport!(
            ERROR,
            pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied: only a superuser may {what}")
        );
    }
}

/// Raises 42501 unless the current role owns table `oid` (or is a superuser), like ALTER TABLE.
pub fn require_owner(oid: pg_sys::Oid) {
    // SAFETY: catalog lookups of a relation that exists (the caller opened it); aclcheck_error
    // raises the standard "must be owner of table" error.
    unsafe {
        if !pg_sys::pg_class_ownercheck(oid, pg_sys::GetUserId()) {
            pg_sys::aclcheck_error(
                pg_sys::AclResult::ACLCHECK_NOT_OWNER,
                pg_sys::get_relkind_objtype(pg_sys::get_rel_relkind(oid)),
                pg_sys::get_rel_name(oid),
            );
        }
    }
}

/// Name of the current database; every node uses a database of the same name.
pub fn current_database_name() -> String {
    // SAFETY: MyDatabaseId is set for every backend connected to a database, which is the only
    // place SQL functions run; get_database_name returns a palloc'd copy (or NULL if dropped).
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            String::new()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

thread_local! {
    /// Connection parameters per node, user and `pgdist.node_conninfo` value: parsing them (and
    /// reading the passfile) once per backend keeps that off every query.
    static TARGETS: std::cell::RefCell<std::collections::HashMap<(NodeAddress, String, String), NodeTarget>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// How to reach `node` as pgdist's login in the current database.
pub fn target_for(node: NodeAddress) -> Result<NodeTarget, RemoteError> {
    let user = service_login_name();
    let key = (node, user, crate::gucs::node_conninfo());
    if let Some(target) = TARGETS.with_borrow(|targets| targets.get(&key).cloned()) {
        return Ok(target);
    }
    let target = NodeTarget::new(key.0.clone(), current_database_name(), key.1.clone())?;
    TARGETS.with_borrow_mut(|targets| targets.insert(key, target.clone()));
    Ok(target)
}

/// How to reach every primary node; raises on a catalog or conninfo error.
pub fn primary_targets() -> Vec<NodeTarget> {
    let nodes =
        crate::metadata::nodes::primary_nodes().unwrap_or_else(|err| crate::error::raise(err));
    nodes
        .iter()
        .map(|n| target_for(n.address.clone()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|err| crate::error::raise(err))
}

/// In-server tests; the multi-node behaviour is tested on real clusters in `pg_test/`.
#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn create_extension_makes_the_catalog() {
        let nodes = Spi::get_one::<i64>("SELECT count(*) FROM pgdist.nodes").unwrap();
        assert_eq!(nodes, Some(0));
        let schema = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgdist')",
        )
        .unwrap();
        assert_eq!(schema, Some(true));
    }

    #[pg_test(
        error = "could not connect to 127.0.0.1:1: error connecting to server: Connection refused (os error 111)"
    )]
    fn add_node_of_a_closed_port_fails_clearly() {
        Spi::run("SELECT pgdist.add_node('127.0.0.1', 1)").unwrap();
    }

    #[pg_test(error = "role must be 'primary' or 'replica', not \"leader\"")]
    fn add_node_rejects_unknown_roles() {
        Spi::run("SELECT pgdist.add_node('127.0.0.1', 5432, 'leader')").unwrap();
    }

    #[pg_test(error = "node 42 does not exist")]
    fn remove_node_of_an_unknown_node_fails() {
        Spi::run("SELECT pgdist.remove_node(42)").unwrap();
    }

    #[pg_test]
    fn run_on_workers_without_workers_returns_nothing() {
        let rows =
            Spi::get_one::<i64>("SELECT count(*) FROM pgdist.run_on_workers('SELECT 1')").unwrap();
        assert_eq!(rows, Some(0));
    }
}
