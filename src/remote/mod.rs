//! Talking to nodes: connection parameters, the per-backend connection cache, the async
//! runtime, interruptible waits, TLS and quoting for remote SQL.

pub mod connection;
pub mod conninfo;
pub mod error;
pub mod quote;
pub mod runtime;
pub mod tls;

use std::fmt;

use tokio_postgres::SimpleQueryMessage;

pub use connection::NodeTarget;
pub use error::RemoteError;

/// Which node a connection or an error is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeAddress {
    /// 0 while the node is not (yet) in the catalog.
    pub node_id: i32,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.node_id > 0 {
            write!(f, "node {} ({}:{})", self.node_id, self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The outcome of one command on one node.
pub type NodeOutcome = Result<Vec<SimpleQueryMessage>, RemoteError>;

/// Runs `sql` on every target at once, each on its own connection outside any transaction.
pub fn run_on_each(targets: &[NodeTarget], sql: &str) -> Vec<NodeOutcome> {
    let work: Vec<(NodeTarget, String)> = targets
        .iter()
        .map(|t| (t.clone(), sql.to_string()))
        .collect();
    run_each(&work)
}

/// Runs each target's own SQL at once, each on its own connection outside any transaction, and
/// waits for all of them (interruptibly: a cancel or timeout cancels the commands on the nodes
/// and raises here). Connections that are still usable go back to the cache.
pub fn run_each(work: &[(NodeTarget, String)]) -> Vec<NodeOutcome> {
    if crate::gucs::log_remote_commands() {
        for (target, sql) in work {
            pgrx::log!("pgdist: issuing on {}: {}", target.node, sql);
        }
    }
    connection::notice_closed_connections();
    let cached: Vec<_> = work
        .iter()
        .map(|(target, _)| connection::take_cached(target))
        .collect();
    let runs = work
        .iter()
        .zip(cached)
        .map(|((target, sql), cached)| connection::run_simple(target, cached, sql));
    let finished = match runtime::block_on(futures_util::future::join_all(runs)) {
        Ok(finished) => finished,
        Err(_) => runtime::raise_interrupt(),
    };
    finished
        .into_iter()
        .map(|(conn, outcome)| {
            // After a success or an error the node reported, the connection is idle and reusable.
            if let (Some(mut conn), Ok(_) | Err(RemoteError::Worker { .. })) = (conn, &outcome) {
                // Arbitrary SQL may have changed session settings: assume nothing about them.
                conn.session_settings.clear();
                connection::give_back(conn);
            }
            outcome
        })
        .collect()
}

/// Called at transaction abort: nothing of ours can still be running.
pub fn on_abort() {
    runtime::forget_in_flight();
}

/// The rows of every statement in `messages`, each value as text (NULL as None).
pub fn rows_as_text(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}
