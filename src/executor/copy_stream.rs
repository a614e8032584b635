//! Streams COPY batches to the nodes while the coordinator keeps reading its input.
//!
//! Each node gets a *lane*: a task on the backend's runtime that owns the node's participant
//! connection for the statement and runs the batches queued for it, one `COPY <shard> FROM
//! STDIN` each, in order. Sending a batch only queues it; the lanes make progress whenever the
//! coordinator [pumps](CopyStreams::pump) the runtime (every few hundred rows), so parsing the
//! next rows here overlaps with the workers ingesting the previous ones. Memory stays bounded:
//! a node with more than [`MAX_IN_FLIGHT`] bytes queued makes the sender wait.
//!
//! A lane stops at its first error. The next call that notices lets the other lanes run what
//! they were given, hands every connection back to the transaction (so a savepoint can still
//! roll the statement back) and returns the error with the batch that failed, for the caller
//! to explain. Dropped without finishing (an error elsewhere), the streams drain quietly; only
//! an interrupt makes them abort the lanes and lose their connections.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::cluster::target_for;
use crate::error::raise;
use crate::remote::connection::NodeConnection;
use crate::remote::{runtime, NodeAddress, RemoteError};
use crate::transaction::remote_xact::{self, Checkout};

/// Bytes queued for one node beyond which the sender waits for the node to catch up.
const MAX_IN_FLIGHT: usize = 16 << 20;

/// One `COPY … FROM STDIN` and its data.
pub struct Batch {
    pub sql: String,
    pub data: Bytes,
    /// The number in the statement's input of each row of `data`, for error messages.
    pub input_rows: Arc<[u64]>,
    /// Whether its row count counts (the first placement of its shard).
    pub counted: bool,
}

/// A lane's error, with the batch it was running.
pub struct LaneFailure {
    pub error: RemoteError,
    pub batch: Option<Batch>,
}

type LaneResult = (NodeConnection, Result<u64, Box<LaneFailure>>);

struct Lane {
    /// The node's participant connection is in the task until the lane is drained.
    checkout: Checkout,
    sender: Option<mpsc::UnboundedSender<Batch>>,
    task: Option<JoinHandle<LaneResult>>,
    in_flight: Arc<AtomicUsize>,
}

/// The lanes of one statement, opened on first use per node.
#[derive(Default)]
pub struct CopyStreams {
    lanes: BTreeMap<i32, Lane>,
}

impl CopyStreams {
    /// Queues `batch` for `node`.
    pub fn send(&mut self, node: &NodeAddress, batch: Batch) -> Result<(), Box<LaneFailure>> {
        if crate::gucs::log_remote_commands() {
            pgrx::log!("pgdist: issuing on {node}: {}", batch.sql);
        }
        let lane = self
            .lanes
            .entry(node.node_id)
            .or_insert_with(|| open_lane(node));
        lane.in_flight
            .fetch_add(batch.data.len(), Ordering::Relaxed);
        if let Some(sender) = &lane.sender {
            // A lane that stopped has dropped its queue; its error is returned just below.
            let _ = sender.send(batch);
        }
        self.check_failures()?;
        self.wait_below(node.node_id, MAX_IN_FLIGHT)
    }

    /// Lets the lanes move their data along, without waiting.
    pub fn pump(&mut self) -> Result<(), Box<LaneFailure>> {
        if self.lanes.is_empty() {
            return Ok(());
        }
        runtime::pump();
        self.check_failures()
    }

    /// Waits until every queued batch ran; the rows the counted batches wrote.
    pub fn finish(&mut self) -> Result<u64, Box<LaneFailure>> {
        let mut rows = 0;
        for result in self.drain().unwrap_or_else(|| runtime::raise_interrupt()) {
            rows += result?;
        }
        Ok(rows)
    }

    /// When a lane stopped with an error: drains every lane and returns the error.
    fn check_failures(&mut self) -> Result<(), Box<LaneFailure>> {
        let failed = self
            .lanes
            .values()
            .any(|lane| lane.task.as_ref().is_some_and(JoinHandle::is_finished));
        if failed {
            for result in self.drain().unwrap_or_else(|| runtime::raise_interrupt()) {
                result?;
            }
        }
        Ok(())
    }

    /// Waits while node `node_id` has more than `limit` bytes queued.
    fn wait_below(&mut self, node_id: i32, limit: usize) -> Result<(), Box<LaneFailure>> {
        while let Some(lane) = self.lanes.get(&node_id) {
            if lane.in_flight.load(Ordering::Relaxed) <= limit {
                break;
            }
            if runtime::block_on(tokio::time::sleep(Duration::from_millis(1))).is_err() {
                runtime::raise_interrupt();
            }
            self.check_failures()?;
        }
        Ok(())
    }

    /// Closes every lane's queue, waits until each ran what it was given and hands the
    /// connections back to the transaction; each lane's result. On an interrupt the lanes are
    /// aborted instead (None).
    fn drain(&mut self) -> Option<Vec<Result<u64, Box<LaneFailure>>>> {
        let mut lanes: Vec<Lane> = std::mem::take(&mut self.lanes).into_values().collect();
        let tasks: Vec<JoinHandle<LaneResult>> = lanes
            .iter_mut()
            .filter_map(|lane| {
                lane.sender = None;
                lane.task.take()
            })
            .collect();
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        let Ok(joined) = runtime::block_on(futures_util::future::join_all(tasks)) else {
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
            runtime::pump();
            return None;
        };
        let results = lanes
            .into_iter()
            .zip(joined)
            .map(|(lane, joined)| {
                // A task that panicked took its connection, and the remote work, with it:
                // dropping the checkout marks the transaction as unable to commit.
                let (conn, result) = joined.map_err(|_| {
                    Box::new(LaneFailure {
                        error: RemoteError::Interrupted,
                        batch: None,
                    })
                })?;
                let mut checkout = lane.checkout;
                checkout.conns.push(conn);
                checkout.finish();
                result
            })
            .collect();
        Some(results)
    }
}

impl Drop for CopyStreams {
    fn drop(&mut self) {
        if !self.lanes.is_empty() {
            let _ = self.drain();
        }
    }
}

/// Checks out `node`'s participant connection and starts its lane.
fn open_lane(node: &NodeAddress) -> Lane {
    let target = target_for(node.clone()).unwrap_or_else(|err| raise(err));
    let mut checkout = remote_xact::checkout(&[target]).unwrap_or_else(|err| raise(err));
    let mut prefix = checkout.take_prefix(0);
    // A checkout that returns holds one connection per node asked for.
    let mut conn = checkout.conns.pop().expect("checkout of one node");
    // SAFETY: reads GUC values of this backend.
    let settings = unsafe { crate::executor::session::settings() };
    if conn.session_settings != settings {
        prefix.push_str(&settings);
        conn.session_settings = settings;
    }
    let (sender, receiver) = mpsc::unbounded_channel();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let task = runtime::spawn(run_lane(conn, prefix, receiver, in_flight.clone()));
    Lane {
        checkout,
        sender: Some(sender),
        task: Some(task),
        in_flight,
    }
}

/// Runs a lane's batches in order until its queue closes or one fails.
async fn run_lane(
    conn: NodeConnection,
    prefix: String,
    mut receiver: mpsc::UnboundedReceiver<Batch>,
    in_flight: Arc<AtomicUsize>,
) -> LaneResult {
    if !prefix.is_empty() {
        if let Err(error) = conn.simple_query(&prefix).await {
            return (conn, Err(Box::new(LaneFailure { error, batch: None })));
        }
    }
    let mut rows = 0;
    while let Some(batch) = receiver.recv().await {
        let result = conn.copy_in(&batch.sql, vec![batch.data.clone()]).await;
        in_flight.fetch_sub(batch.data.len(), Ordering::Relaxed);
        match result {
            Ok(count) if batch.counted => rows += count,
            Ok(_) => {}
            Err(error) => {
                let batch = Some(batch);
                return (conn, Err(Box::new(LaneFailure { error, batch })));
            }
        }
    }
    (conn, Ok(rows))
}
