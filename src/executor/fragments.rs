//! Fragments in flight: SQL for shards running on their nodes, rows streaming back.
//!
//! Each node gets up to `pgdist.max_connections_per_node` connections; each connection runs its
//! share of the node's fragments one after another, all connections at once. Rows (as text)
//! arrive through one bounded channel, so memory stays bounded however large the result is, and
//! the executor takes them one at a time on the backend's thread. Each finished fragment also
//! reports its row count and time (for EXPLAIN ANALYZE).

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{CancelToken, NoTls, SimpleQueryMessage};

use crate::remote::connection::{self, NodeConnection};
use crate::remote::{runtime, NodeTarget, RemoteError};

/// Rows buffered between the nodes and the executor.
const CHANNEL_ROWS: usize = 1024;

pub type TextRow = Vec<Option<String>>;

/// What one fragment did.
#[derive(Clone, Debug)]
pub struct FragmentStats {
    pub node_id: i32,
    pub rows: u64,
    pub elapsed: std::time::Duration,
}

enum Message {
    Row(TextRow),
    Done(FragmentStats),
}

type Sender = mpsc::Sender<Result<Message, RemoteError>>;

pub struct FragmentStream {
    messages: mpsc::Receiver<Result<Message, RemoteError>>,
    /// The fragments finished so far.
    pub stats: Vec<FragmentStats>,
    tasks: Vec<JoinHandle<Option<NodeConnection>>>,
    cancel_tokens: Vec<CancelToken>,
    finished: bool,
}

impl FragmentStream {
    /// Starts every fragment. `work` is one entry per node: its target and its fragments;
    /// `settings` (SET statements) go first on connections that do not have them yet.
    pub fn start(
        work: Vec<(NodeTarget, Vec<String>)>,
        settings: String,
        connections_per_node: usize,
    ) -> FragmentStream {
        let (sender, messages) = mpsc::channel(CHANNEL_ROWS);
        let mut tasks = Vec::new();
        let mut cancel_tokens = Vec::new();
        for (target, fragments) in work {
            let lanes = connections_per_node.clamp(1, fragments.len().max(1));
            let mut shares: Vec<Vec<String>> = vec![Vec::new(); lanes];
            for (i, fragment) in fragments.into_iter().enumerate() {
                shares[i % lanes].push(fragment);
            }
            for share in shares.into_iter().filter(|s| !s.is_empty()) {
                let cached = connection::take_cached(&target);
                if let Some(conn) = &cached {
                    cancel_tokens.push(conn.cancel_token());
                }
                let share = run_share(
                    target.clone(),
                    cached,
                    share,
                    settings.clone(),
                    sender.clone(),
                );
                tasks.push(runtime::spawn(share));
            }
        }
        FragmentStream {
            messages,
            stats: Vec::new(),
            tasks,
            cancel_tokens,
            finished: false,
        }
    }

    /// The next row from any node, None when every fragment is done.
    pub fn next(&mut self) -> Result<Option<TextRow>, RemoteError> {
        loop {
            if self.finished {
                return Ok(None);
            }
            match runtime::block_on(self.messages.recv()) {
                Ok(Some(Ok(Message::Row(row)))) => return Ok(Some(row)),
                Ok(Some(Ok(Message::Done(stats)))) => self.stats.push(stats),
                Ok(Some(Err(err))) => return Err(err),
                Ok(None) => {
                    self.finished = true;
                    let tasks = std::mem::take(&mut self.tasks);
                    if let Ok(results) = runtime::block_on(futures_util::future::join_all(tasks)) {
                        for conn in results.into_iter().flatten().flatten() {
                            connection::give_back(conn);
                        }
                    }
                }
                Err(_) => runtime::raise_interrupt(),
            }
        }
    }
}

impl Drop for FragmentStream {
    /// A scan that ends early (LIMIT, an error, an abort) cancels what still runs and closes
    /// those connections.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        for task in &self.tasks {
            task.abort();
        }
        let tokens = std::mem::take(&mut self.cancel_tokens);
        let _ = runtime::block_on(async move {
            let cancels = tokens.iter().map(|t| t.cancel_query(NoTls));
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                futures_util::future::join_all(cancels),
            )
            .await;
        });
    }
}

async fn run_share(
    target: NodeTarget,
    cached: Option<NodeConnection>,
    fragments: Vec<String>,
    settings: String,
    sender: Sender,
) -> Option<NodeConnection> {
    let mut conn = match cached {
        Some(conn) => conn,
        None => match NodeConnection::open(&target).await {
            Ok(conn) => conn,
            Err(err) => {
                let _ = sender.send(Err(err)).await;
                return None;
            }
        },
    };
    // Registered for the whole share, so an interrupt while rows stream cancels it on the node.
    let _in_flight = runtime::InFlight::register(conn.cancel_token());
    for mut fragment in fragments {
        if conn.session_settings != settings {
            fragment.insert_str(0, &settings);
            conn.session_settings = settings.clone();
        }
        let started = std::time::Instant::now();
        match run_fragment(&conn, &fragment, &sender).await {
            Ok(Some(rows)) => {
                let stats = FragmentStats {
                    node_id: conn.node.node_id,
                    rows,
                    elapsed: started.elapsed(),
                };
                if sender.send(Ok(Message::Done(stats))).await.is_err() {
                    return None;
                }
            }
            Ok(None) => return None, // the scan is gone
            Err(err) => {
                let _ = sender.send(Err(err)).await;
                return None;
            }
        }
    }
    Some(conn)
}

/// Streams one fragment's rows into `sender`; the row count, or None when the receiver is gone.
async fn run_fragment(
    conn: &NodeConnection,
    fragment: &str,
    sender: &Sender,
) -> Result<Option<u64>, RemoteError> {
    let stream = conn.stream_query(fragment).await?;
    let mut stream = std::pin::pin!(stream);
    let mut rows = 0u64;
    while let Some(message) = stream.next().await {
        if let SimpleQueryMessage::Row(row) =
            message.map_err(|err| RemoteError::from_postgres(&conn.node, err))?
        {
            rows += 1;
            let values = (0..row.len())
                .map(|i| row.get(i).map(str::to_string))
                .collect();
            if sender.send(Ok(Message::Row(values))).await.is_err() {
                return Ok(None);
            }
        }
    }
    Ok(Some(rows))
}
