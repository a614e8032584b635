//! Errors of the remote layer: connecting to nodes and running commands on them.

use pgrx::PgSqlErrorCode;

use crate::error::{sqlstate_from_code, PgError};
use crate::remote::NodeAddress;

#[derive(Clone, Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("could not connect to {node}: {cause}")]
    Connect { node: NodeAddress, cause: String },

    /// The node ran the command and reported an error; its SQLSTATE and text are kept.
    #[error("{message}")]
    Worker {
        node: NodeAddress,
        sqlstate: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
        /// Where on the node it happened (the node's CONTEXT lines).
        context: Option<String>,
    },

    #[error("lost the connection to {node}: {cause}")]
    ConnectionLost { node: NodeAddress, cause: String },

    /// The statement was cancelled (cancel request, statement_timeout, termination) while
    /// waiting on nodes; the remote work was cancelled too.
    #[error("canceling statement: the remote commands were cancelled")]
    Interrupted,

    #[error("invalid pgdist.node_conninfo: {0}")]
    BadConninfo(String),

    /// Rows received from a node could not be set aside in a temporary file.
    #[error("could not keep rows received from the nodes in a temporary file: {0}")]
    SpillFile(String),
}

impl RemoteError {
    /// True when the node's session is gone (connection lost, or the node shut down or
    /// crashed, SQLSTATE class 57P): the command it was running may or may not have finished.
    pub fn ended_the_session(&self) -> bool {
        match self {
            RemoteError::ConnectionLost { .. } => true,
            RemoteError::Worker { sqlstate, .. } => sqlstate.starts_with("57P"),
            _ => false,
        }
    }

    /// Builds the error for a failed call on an open connection.
    pub fn from_postgres(node: &NodeAddress, err: tokio_postgres::Error) -> Self {
        match err.as_db_error() {
            Some(db) => RemoteError::Worker {
                node: node.clone(),
                sqlstate: db.code().code().to_string(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
                context: db.where_().map(str::to_string),
            },
            None => RemoteError::ConnectionLost {
                node: node.clone(),
                cause: error_chain(&err),
            },
        }
    }

    /// True when the connection itself failed (so a fresh connection may succeed): it broke, or
    /// the server ended the session because it shut down or crashed (SQLSTATE class 57P).
    pub fn is_connection_failure(&self) -> bool {
        match self {
            RemoteError::ConnectionLost { .. } | RemoteError::Connect { .. } => true,
            RemoteError::Worker { sqlstate, .. } => sqlstate.starts_with("57P"),
            _ => false,
        }
    }
}

/// The error and all its sources in one line ("error connecting to server: Connection refused").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

impl PgError for RemoteError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            RemoteError::Connect { .. } => PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            RemoteError::Worker { sqlstate, .. } => sqlstate_from_code(sqlstate),
            RemoteError::ConnectionLost { .. } => PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            RemoteError::Interrupted => PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
            RemoteError::BadConninfo(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            RemoteError::SpillFile(_) => PgSqlErrorCode::ERRCODE_IO_ERROR,
        }
    }

    fn detail(&self) -> Option<String> {
        let RemoteError::Worker {
            node,
            detail,
            context,
            ..
        } = self
        else {
            return None;
        };
        let parts: Vec<&str> = [detail, context]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        Some(match parts.is_empty() {
            true => format!("on {node}"),
            false => format!("on {node}: {}", parts.join("; ")),
        })
    }

    fn hint(&self) -> Option<String> {
        match self {
            RemoteError::Worker { hint, .. } => hint.clone(),
            RemoteError::Connect { .. } | RemoteError::ConnectionLost { .. } => Some(
                "Check that the node is running and accepts connections from the coordinator \
                 (listen_addresses, pg_hba.conf, pgdist.node_conninfo)."
                    .into(),
            ),
            RemoteError::BadConninfo(_) => {
                Some("pgdist.node_conninfo takes libpq key=value pairs.".into())
            }
            RemoteError::SpillFile(_) => {
                Some("Check the free space of the data directory's base/pgsql_tmp.".into())
            }
            RemoteError::Interrupted => None,
        }
    }
}
