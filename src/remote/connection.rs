//! One open connection to a node, and the backend's cache of idle ones.
//!
//! A connection is *taken* out of the cache for a piece of work and *given back* when the work
//! succeeded. Work that fails or is interrupted simply drops its connection, which closes it, so
//! no half-finished remote state can leak into the next statement.

use std::cell::RefCell;
use std::collections::HashMap;

use postgres_openssl::MakeTlsConnector;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::remote::conninfo::ConnectParams;
use crate::remote::runtime::InFlight;
use crate::remote::tls::{Canceller, TlsSettings};
use crate::remote::{NodeAddress, RemoteError};

/// How many idle connections per node and user the cache keeps.
const MAX_IDLE_PER_NODE: usize = 8;

/// Everything needed to reach a node, prepared on the backend's thread.
#[derive(Clone, Debug)]
pub struct NodeTarget {
    pub node: NodeAddress,
    pub config: tokio_postgres::Config,
    pub tls: TlsSettings,
}

impl NodeTarget {
    pub fn new(node: NodeAddress, dbname: String, user: String) -> Result<Self, RemoteError> {
        let params = ConnectParams {
            host: node.host.clone(),
            port: node.port,
            dbname,
            user,
            application_name: crate::transaction::activity::application_name(),
        };
        let (config, tls) = params.to_config(
            &crate::gucs::node_conninfo(),
            crate::gucs::node_connect_timeout(),
        )?;
        Ok(NodeTarget { node, config, tls })
    }

    fn cache_key(&self) -> CacheKey {
        CacheKey {
            host: self.node.host.clone(),
            port: self.node.port,
            user: self.config.get_user().unwrap_or_default().to_string(),
        }
    }
}

pub struct NodeConnection {
    pub node: NodeAddress,
    client: Client,
    driver: JoinHandle<()>,
    /// The TLS connector the connection was made with (cancel requests use it too).
    tls: Option<MakeTlsConnector>,
    key: CacheKey,
    /// True when this connection came from the cache (it may have died since).
    pub reused: bool,
    /// The SET statements this session last received (fragments send them only on change).
    pub session_settings: String,
    /// Statements prepared in this session (`executor::fragments`), by parameter types and
    /// text: the number in their name.
    pub prepared: HashMap<String, u64>,
    /// The number the next prepared statement's name gets (never reused, also after a failure).
    pub next_statement: u64,
}

impl NodeConnection {
    /// Opens a new connection (runs on the runtime; touches nothing of PostgreSQL's).
    pub async fn open(target: &NodeTarget) -> Result<NodeConnection, RemoteError> {
        let failed = |cause: String| RemoteError::Connect {
            node: target.node.clone(),
            cause,
        };
        let tls = target.tls.connector().map_err(failed)?;
        let chain = |err: tokio_postgres::Error| failed(super::error::error_chain(&err));
        let (client, driver) = match &tls {
            Some(connector) => {
                let (client, connection) = target
                    .config
                    .connect(connector.clone())
                    .await
                    .map_err(chain)?;
                let driver = tokio::spawn(async move {
                    let _ = connection.await;
                });
                (client, driver)
            }
            None => {
                let (client, connection) = target.config.connect(NoTls).await.map_err(chain)?;
                let driver = tokio::spawn(async move {
                    let _ = connection.await;
                });
                (client, driver)
            }
        };
        Ok(NodeConnection {
            node: target.node.clone(),
            client,
            driver,
            tls,
            key: target.cache_key(),
            reused: false,
            session_settings: String::new(),
            prepared: HashMap::new(),
            next_statement: 1,
        })
    }

    /// Runs `sql` with the simple query protocol; cancellable while it runs.
    pub async fn simple_query(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>, RemoteError> {
        let _in_flight = InFlight::register(self.canceller());
        self.client
            .simple_query(sql)
            .await
            .map_err(|err| RemoteError::from_postgres(&self.node, err))
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// How to cancel what this connection runs.
    pub fn canceller(&self) -> Canceller {
        Canceller {
            token: self.client.cancel_token(),
            tls: self.tls.clone(),
        }
    }

    /// Starts `sql` (simple protocol) and returns its messages as they arrive.
    pub async fn stream_query(
        &self,
        sql: &str,
    ) -> Result<tokio_postgres::SimpleQueryStream, RemoteError> {
        self.client
            .simple_query_raw(sql)
            .await
            .map_err(|err| RemoteError::from_postgres(&self.node, err))
    }
}

impl Drop for NodeConnection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    host: String,
    port: u16,
    user: String,
}

thread_local! {
    /// Never dropped (see the runtime): at process exit the sockets just close.
    static IDLE: std::mem::ManuallyDrop<RefCell<HashMap<CacheKey, Vec<NodeConnection>>>> =
        std::mem::ManuallyDrop::new(RefCell::new(HashMap::new()));
}

fn with_idle<R>(f: impl FnOnce(&mut HashMap<CacheKey, Vec<NodeConnection>>) -> R) -> R {
    IDLE.with(|idle| f(&mut idle.borrow_mut()))
}

/// Lets the connections' driver tasks run for a moment, so that cached connections whose node
/// went away since their last use (restart, crash) are seen as closed by [`take_cached`]
/// instead of failing the next command. Call it before taking connections, outside async code.
pub fn notice_closed_connections() {
    let _ = crate::remote::runtime::block_on(async {
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
    });
}

/// An idle cached connection for `target`, if there is a live one.
pub fn take_cached(target: &NodeTarget) -> Option<NodeConnection> {
    let key = target.cache_key();
    with_idle(|idle| {
        let pool = idle.get_mut(&key)?;
        while let Some(mut conn) = pool.pop() {
            if !conn.is_closed() {
                conn.reused = true;
                // The same server may have been cached before it had a node id (add_node).
                conn.node = target.node.clone();
                return Some(conn);
            }
        }
        None
    })
}

/// Returns a connection whose work finished cleanly to the cache.
pub fn give_back(conn: NodeConnection) {
    if conn.is_closed() {
        return;
    }
    with_idle(|idle| {
        let pool = idle.entry(conn.key.clone()).or_default();
        if pool.len() < MAX_IDLE_PER_NODE {
            pool.push(conn);
        }
    });
}

/// Closes every cached connection to `node` (the node was removed or changed).
pub fn forget_node(node: &NodeAddress) {
    with_idle(|idle| idle.retain(|key, _| key.host != node.host || key.port != node.port));
}

/// Runs `sql` on a cached connection or a new one. When a cached connection turns out to be
/// dead (the node restarted since it was last used) the command is sent once more on a fresh
/// connection: a server that has gone away cannot have received it on the old one.
pub async fn run_simple(
    target: &NodeTarget,
    cached: Option<NodeConnection>,
    sql: &str,
) -> (
    Option<NodeConnection>,
    Result<Vec<SimpleQueryMessage>, RemoteError>,
) {
    let conn = match cached {
        Some(conn) => conn,
        None => match NodeConnection::open(target).await {
            Ok(conn) => conn,
            Err(err) => return (None, Err(err)),
        },
    };
    match conn.simple_query(sql).await {
        Err(err) if conn.reused && err.is_connection_failure() => {
            drop(conn);
            match NodeConnection::open(target).await {
                Ok(fresh) => {
                    let result = fresh.simple_query(sql).await;
                    (Some(fresh), result)
                }
                Err(err) => (None, Err(err)),
            }
        }
        result => (Some(conn), result),
    }
}

impl NodeConnection {
    /// Runs `copy_sql` (a `COPY … FROM STDIN`) and streams `chunks` (COPY text format) into it.
    pub async fn copy_in(
        &self,
        copy_sql: &str,
        chunks: Vec<bytes::Bytes>,
    ) -> Result<u64, RemoteError> {
        use futures_util::SinkExt;
        let _in_flight = InFlight::register(self.canceller());
        let fail = |err| RemoteError::from_postgres(&self.node, err);
        let sink = self
            .client
            .copy_in::<_, bytes::Bytes>(copy_sql)
            .await
            .map_err(fail)?;
        let mut sink = std::pin::pin!(sink);
        for chunk in chunks {
            sink.send(chunk).await.map_err(fail)?;
        }
        sink.as_mut().finish().await.map_err(fail)
    }
}

impl NodeConnection {
    /// Like [`NodeConnection::simple_query`] for a command built on the spot.
    pub async fn simple_query_owned(
        &self,
        sql: String,
    ) -> Result<Vec<SimpleQueryMessage>, RemoteError> {
        self.simple_query(&sql).await
    }
}
