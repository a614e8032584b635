//! One remote transaction per node for the current coordinator transaction.
//!
//! Work borrows the participant connections it needs with [`checkout`], sends `BEGIN` and the
//! savepoints its subtransaction level needs in the same round trip as its first command, and
//! hands them back with [`Checkout::finish`]. Rolled-back savepoints roll back on the nodes too.
//! At pre-commit the participants are prepared (two-phase commit) or committed (one participant,
//! no local writes); after the local commit prepared ones get `COMMIT PREPARED`; at abort
//! everything is rolled back. A decision record in `pgdist.transaction_decision`, written in the
//! same local transaction as the commit, tells recovery what to do with a transaction left
//! prepared by a crash.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};

use crate::error::{raise, PgError};
use crate::remote::connection::{self, NodeConnection};
use crate::remote::runtime;
use crate::remote::{NodeTarget, RemoteError};

struct Participant {
    /// None while the connection is lent out to running work ([`Checkout`]).
    conn: Option<NodeConnection>,
    /// How to take the connection back from the work it is lent to, if that work allows it.
    reclaim: Option<Reclaim>,
    /// Set once `PREPARE TRANSACTION` succeeded on the node.
    prepared_gid: Option<String>,
    /// How far the remote transaction has been opened: 0 nothing sent yet, 1 `BEGIN` sent,
    /// n > 1 also `SAVEPOINT pgdist_2` … `pgdist_n`, one per open local subtransaction level.
    sent_level: i32,
    /// It may have written or locked rows; false while it only read (in a REPEATABLE READ or
    /// SERIALIZABLE transaction), when it commits alone, without being prepared.
    writes: bool,
}

#[derive(Default)]
struct XactState {
    /// Keyed by node id (a transaction never talks to one node as two users).
    participants: HashMap<i32, Participant>,
    /// Remote work was lost mid-transaction (an interrupted command, a savepoint that could not
    /// be rolled back on a node): the transaction may not commit.
    poisoned: bool,
    /// `SET CONSTRAINTS ALL …` run in this transaction, with the subtransaction level it ran
    /// at: nodes that join the transaction later run them after the matching savepoint.
    constraint_modes: Vec<(i32, &'static str)>,
    /// REPEATABLE READ: per node, a connection whose read-only transaction exported the
    /// snapshot the transaction reads the node with (`read_snapshot`).
    holders: HashMap<i32, SnapshotHolder>,
}

/// A remote transaction that only holds a snapshot for others to import. (The participant
/// cannot export it: PostgreSQL refuses to prepare a transaction that exported a snapshot.)
struct SnapshotHolder {
    conn: NodeConnection,
    snapshot: String,
}

fn with_state<R>(f: impl FnOnce(&mut XactState) -> R) -> R {
    XACT.with(|state| f(&mut state.borrow_mut()))
}

fn nest_level() -> i32 {
    // SAFETY: a plain getter of the current transaction nesting level.
    unsafe { pg_sys::GetCurrentTransactionNestLevel() }
}

thread_local! {
    /// Never dropped (see remote::runtime): at process exit the sockets just close.
    static XACT: std::mem::ManuallyDrop<RefCell<XactState>> =
        std::mem::ManuallyDrop::new(RefCell::new(XactState::default()));
}

#[derive(Debug, thiserror::Error)]
pub enum XactError {
    #[error("cannot commit: remote work of this transaction was lost")]
    Poisoned,
    #[error(
        "PREPARE TRANSACTION is not supported in transactions that changed data on worker nodes"
    )]
    PrepareNotSupported,
    #[error("the connection to {0} is busy with another part of this statement")]
    Busy(crate::remote::NodeAddress),
    #[error("the outcome of this transaction's commit is unknown: {0}")]
    OutcomeUnknown(RemoteError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

impl PgError for XactError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            XactError::Poisoned => PgSqlErrorCode::ERRCODE_TRANSACTION_ROLLBACK,
            XactError::PrepareNotSupported | XactError::Busy(_) => {
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
            }
            XactError::Remote(err) => err.sqlstate(),
            XactError::OutcomeUnknown(_) => PgSqlErrorCode::ERRCODE_TRANSACTION_RESOLUTION_UNKNOWN,
        }
    }
    fn detail(&self) -> Option<String> {
        match self {
            XactError::Remote(err) => err.detail(),
            _ => None,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            XactError::Poisoned => Some(
                "A remote command was interrupted or a node could not roll back to a savepoint; \
                 roll back the whole transaction and retry."
                    .into(),
            ),
            XactError::PrepareNotSupported => {
                Some("Commit the transaction instead of preparing it.".into())
            }
            XactError::OutcomeUnknown(_) => Some(
                "The only node that changed data lost the connection after COMMIT was sent \
                 (one-phase commit), as a client can lose its server: look whether the \
                 changes are there before running the transaction again."
                    .into(),
            ),
            XactError::Busy(_) => Some(
                "A statement that reads and writes shards on the same node inside a transaction \
                 that already changed data there is not supported yet; run it in its own \
                 transaction."
                    .into(),
            ),
            XactError::Remote(err) => err.hint(),
        }
    }
}

/// Takes a lent connection back from the work holding it, which first finishes what it sent on
/// it (a stream of rows keeps the rest aside for its reader). Returns the connection (None if
/// it was lost) and the error that work ran into on the node, if any (its reader gets it too).
pub type Reclaim = Box<dyn FnOnce() -> (Option<NodeConnection>, Option<RemoteError>)>;

/// Lets a later [`checkout`] in the same statement take node `node_id`'s connection back from
/// the work it is lent to now, instead of failing as busy. Cleared when the connection returns.
pub fn allow_reclaim(node_id: i32, reclaim: Reclaim) {
    with_state(|state| {
        if let Some(participant) = state.participants.get_mut(&node_id) {
            participant.reclaim = Some(reclaim);
        }
    });
}

/// Participant connections lent to a piece of work, one per node in the order asked for.
///
/// Each connection comes with a *prefix* — `BEGIN` and the `SAVEPOINT`s the remote transaction
/// still lacks — that the work sends in the same round trip as its first command
/// ([`Checkout::take_prefix`]). [`Checkout::finish`] hands the connections back, also after a
/// command failed on the node (the remote transaction then aborts with the local one, or rolls
/// back to the savepoint). Dropping a checkout without finishing it (an interrupt) loses the
/// connections, and with them the remote work: the transaction can then only roll back.
pub struct Checkout {
    pub conns: Vec<NodeConnection>,
    /// Per node id: the prefix not yet taken, and the participant's sent_level before this
    /// checkout (restored when the prefix goes unused).
    openings: HashMap<i32, (String, i32)>,
    /// Node ids in the order asked for.
    order: Vec<i32>,
    finished: bool,
}

impl Checkout {
    /// The statements that must precede the next command on connection `i` (then empty).
    pub fn take_prefix(&mut self, i: usize) -> String {
        self.order
            .get(i)
            .and_then(|id| self.openings.get_mut(id))
            .map(|(prefix, _)| std::mem::take(prefix))
            .unwrap_or_default()
    }

    /// `sql` preceded by connection `i`'s prefix.
    pub fn with_prefix(&mut self, i: usize, sql: &str) -> String {
        let mut prefix = self.take_prefix(i);
        prefix.push_str(sql);
        prefix
    }

    /// Hands the connections in `conns` back to the transaction.
    pub fn finish(mut self) {
        self.finished = true;
        let conns = std::mem::take(&mut self.conns);
        let openings = std::mem::take(&mut self.openings);
        with_state(|state| {
            for conn in conns {
                if conn.is_closed() {
                    state.poisoned = true;
                }
                let node_id = conn.node.node_id;
                if let Some(participant) = state.participants.get_mut(&node_id) {
                    if let Some((prefix, previous)) = openings.get(&node_id) {
                        if !prefix.is_empty() {
                            participant.sent_level = *previous;
                        }
                    }
                    participant.conn = Some(conn);
                    participant.reclaim = None;
                }
            }
        });
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if !self.finished {
            // try_with: at process exit the state may already be gone.
            let _ = XACT.try_with(|state| state.borrow_mut().poisoned = true);
        }
    }
}

/// `begin` (if not sent yet) and the savepoints for subtransaction levels above `from` up to
/// `to`, as one SQL prefix. A remote transaction that begins here also gets the constraint
/// modes `SET CONSTRAINTS` gave the transaction (the nodes already in it got them then).
fn opening_statements(begin: &str, from: i32, to: i32, modes: &[(i32, &str)]) -> String {
    let mut sql = String::new();
    let with_modes = from < 1;
    if with_modes {
        sql.push_str(begin);
        sql.push(';');
    }
    for level in from.max(0) + 1..=to {
        if level > 1 {
            sql.push_str(&format!("SAVEPOINT pgdist_{level};"));
        }
        for (_, mode) in modes.iter().filter(|(at, _)| with_modes && *at == level) {
            sql.push_str(mode);
            sql.push(';');
        }
    }
    sql
}

/// The coordinator transaction's isolation level is REPEATABLE READ or SERIALIZABLE: every
/// statement of a transaction block must see, on each node, the snapshot the node's remote
/// transaction took first, so reads go through the transaction's connections too.
pub fn snapshot_per_transaction() -> bool {
    // SAFETY: plain reads of backend state.
    unsafe {
        pg_sys::IsTransactionBlock() && pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32
    }
}

/// What opens a remote transaction: `BEGIN` with the coordinator transaction's isolation level
/// (READ UNCOMMITTED is READ COMMITTED in PostgreSQL).
fn begin_statement() -> &'static str {
    // SAFETY: a plain read of backend state.
    match unsafe { pg_sys::XactIsoLevel } as u32 {
        pg_sys::XACT_SERIALIZABLE => "BEGIN ISOLATION LEVEL SERIALIZABLE",
        pg_sys::XACT_REPEATABLE_READ => "BEGIN ISOLATION LEVEL REPEATABLE READ",
        _ => "BEGIN",
    }
}

/// `SET CONSTRAINTS ALL DEFERRED` (or `IMMEDIATE`) ran on the coordinator: the nodes in the
/// transaction run it now (so IMMEDIATE checks what they deferred, with its error), and nodes
/// that join later when their remote transaction begins.
pub fn set_constraint_mode(deferred: bool) {
    let mode = if deferred {
        "SET CONSTRAINTS ALL DEFERRED"
    } else {
        "SET CONSTRAINTS ALL IMMEDIATE"
    };
    let level = nest_level();
    let nodes: Vec<crate::remote::NodeAddress> = with_state(|state| {
        state.constraint_modes.push((level, mode));
        state
            .participants
            .values()
            .filter(|p| p.sent_level > 0)
            .filter_map(|p| p.conn.as_ref().map(|conn| conn.node.clone()))
            .collect()
    });
    let work: Vec<(NodeTarget, String)> = nodes
        .into_iter()
        .map(|node| crate::cluster::target_for(node).map(|target| (target, mode.to_string())))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|err| raise(err));
    if !work.is_empty() {
        run_batches(&work);
    }
}

/// Lends the participant connections for `targets` (one per node, in the same order), opening
/// connections for nodes new to the transaction. Nothing is sent yet: see [`Checkout`].
pub fn checkout(targets: &[NodeTarget]) -> Result<Checkout, RemoteError> {
    checkout_for(targets, true)
}

/// As [`checkout`], for work that only reads without locking: a node that only ever does such
/// work commits without two-phase commit.
pub fn checkout_for_reads(targets: &[NodeTarget]) -> Result<Checkout, RemoteError> {
    checkout_for(targets, false)
}

fn checkout_for(targets: &[NodeTarget], writes: bool) -> Result<Checkout, RemoteError> {
    connection::notice_closed_connections();
    let level = nest_level();
    let node_ids: Vec<i32> = targets.iter().map(|t| t.node.node_id).collect();
    // The statement fails with the error a reclaimed stream met on its node.
    if let Some(err) = reclaim_lent(&node_ids) {
        raise(err);
    }
    // A node whose connection is still lent out fails the checkout before anything is taken
    // or opened, so the transaction's state stays as it was.
    let busy = with_state(|state| {
        targets.iter().find(|target| {
            state
                .participants
                .get(&target.node.node_id)
                .is_some_and(|p| p.conn.is_none())
        })
    });
    if let Some(target) = busy {
        raise(XactError::Busy(target.node.clone()));
    }
    // Take the existing participants' connections; register new nodes (without a connection
    // yet, so that a failure below leaves the transaction unable to commit).
    let existing: Vec<Option<(NodeConnection, i32)>> = with_state(|state| {
        targets
            .iter()
            .map(|target| {
                let participant = state
                    .participants
                    .entry(target.node.node_id)
                    .or_insert_with(|| Participant {
                        conn: None,
                        reclaim: None,
                        prepared_gid: None,
                        sent_level: 0,
                        writes,
                    });
                participant.writes |= writes;
                let level = participant.sent_level;
                participant.conn.take().map(|conn| (conn, level))
            })
            .collect()
    });
    let mut previous_levels = Vec::with_capacity(targets.len());
    let mut work = Vec::with_capacity(targets.len());
    for (target, existing) in targets.iter().zip(existing) {
        previous_levels.push(existing.as_ref().map_or(0, |(_, level)| *level));
        work.push(async move {
            match existing {
                Some((conn, _)) => Ok(conn),
                None => match connection::take_cached(target) {
                    Some(conn) => Ok(conn),
                    None => NodeConnection::open(target).await,
                },
            }
        });
    }
    let opened = match runtime::block_on(futures_util::future::join_all(work)) {
        Ok(opened) => opened,
        Err(_) => {
            with_state(|state| state.poisoned = true);
            runtime::raise_interrupt()
        }
    };
    let mut conns = Vec::with_capacity(opened.len());
    let mut first_error = None;
    for result in opened {
        match result {
            Ok(conn) => conns.push(conn),
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    let order: Vec<i32> = targets.iter().map(|t| t.node.node_id).collect();
    let openings = order
        .iter()
        .zip(&previous_levels)
        .map(|(id, from)| {
            (
                *id,
                (
                    with_state(|state| {
                        let begin = match state.holders.get(id) {
                            Some(holder) => format!(
                                "{}; SET TRANSACTION SNAPSHOT {}",
                                begin_statement(),
                                crate::remote::quote::quote_literal(&holder.snapshot)
                            ),
                            None => begin_statement().to_string(),
                        };
                        opening_statements(&begin, *from, level, &state.constraint_modes)
                    }),
                    *from,
                ),
            )
        })
        .collect();
    with_state(|state| {
        for conn in &conns {
            if let Some(participant) = state.participants.get_mut(&conn.node.node_id) {
                participant.sent_level = participant.sent_level.max(level);
            }
        }
    });
    let checkout = Checkout {
        conns,
        openings,
        order,
        finished: false,
    };
    match first_error {
        Some(err) => Err(err), // dropping `checkout` poisons the transaction
        None => Ok(checkout),
    }
}

/// Takes back the connections of nodes `node_ids` that are lent to work allowing it
/// ([`allow_reclaim`]); returns the first error that work ran into on a node.
fn reclaim_lent(node_ids: &[i32]) -> Option<RemoteError> {
    let reclaims: Vec<(i32, Reclaim)> = with_state(|state| {
        node_ids
            .iter()
            .filter_map(|node_id| {
                let participant = state.participants.get_mut(node_id)?;
                if participant.conn.is_some() {
                    return None;
                }
                Some((*node_id, participant.reclaim.take()?))
            })
            .collect()
    });
    let mut failure = None;
    for (node_id, reclaim) in reclaims {
        let (conn, error) = reclaim();
        with_state(|state| match (conn, state.participants.get_mut(&node_id)) {
            (Some(conn), Some(participant)) => participant.conn = Some(conn),
            _ => state.poisoned = true,
        });
        failure = failure.or(error);
    }
    failure
}

/// Like [`checkout`], with every remote transaction opened before it returns.
pub fn checkout_begun(targets: &[NodeTarget]) -> Result<Checkout, RemoteError> {
    let mut checkout = checkout(targets)?;
    let prefixes: Vec<String> = (0..checkout.conns.len())
        .map(|i| checkout.take_prefix(i))
        .collect();
    let opens = checkout
        .conns
        .iter()
        .zip(&prefixes)
        .filter(|(_, prefix)| !prefix.is_empty())
        .map(|(conn, prefix)| conn.simple_query(prefix));
    let results = match runtime::block_on(futures_util::future::join_all(opens)) {
        Ok(results) => results,
        Err(_) => runtime::raise_interrupt(),
    };
    let failure = results.into_iter().find_map(Result::err);
    match failure {
        Some(err) => {
            checkout.finish();
            Err(err)
        }
        None => Ok(checkout),
    }
}

/// Runs one batch of SQL per node (nodes in parallel, each batch in one round trip) inside the
/// coordinator's transaction. The first failure is raised as an ERROR.
pub fn run_batches(work: &[(NodeTarget, String)]) {
    let targets: Vec<NodeTarget> = work.iter().map(|(t, _)| t.clone()).collect();
    if crate::gucs::log_remote_commands() {
        for (target, sql) in work {
            pgrx::log!("pgdist: issuing on {}: {}", target.node, sql);
        }
    }
    let mut checkout = checkout(&targets).unwrap_or_else(|err| raise(err));
    let batches: Vec<String> = work
        .iter()
        .enumerate()
        .map(|(i, (_, sql))| checkout.with_prefix(i, sql))
        .collect();
    let runs = checkout
        .conns
        .iter()
        .zip(&batches)
        .map(|(conn, sql)| conn.simple_query(sql));
    let results = match runtime::block_on(futures_util::future::join_all(runs)) {
        Ok(results) => results,
        Err(_) => runtime::raise_interrupt(),
    };
    checkout.finish();
    if let Some(err) = results.into_iter().find_map(Result::err) {
        raise(err);
    }
}

/// True when node `node_id` has a remote transaction open for this transaction.
pub fn is_participant(node_id: i32) -> bool {
    with_state(|state| {
        state
            .participants
            .get(&node_id)
            .is_some_and(|p| p.sent_level > 0)
    })
}

/// True when the transaction may have written or locked rows on node `node_id`: its reads there
/// must see that through the transaction's own connection.
pub fn writes_on(node_id: i32) -> bool {
    with_state(|state| {
        state
            .participants
            .get(&node_id)
            .is_some_and(|p| p.sent_level > 0 && p.writes)
    })
}

/// The snapshot the transaction reads node `target` with, exported for other connections to
/// import (`SET TRANSACTION SNAPSHOT`), when the transaction is REPEATABLE READ and has not begun
/// its remote transaction there yet (which then imports it too): taken by a connection of its
/// own that holds it until the transaction ends. None otherwise — SERIALIZABLE, whose reads must
/// be the remote transaction's own; a remote transaction that began with a snapshot of its own —
/// and the node is then read through the transaction's connection.
pub fn read_snapshot(target: &NodeTarget) -> Option<String> {
    // SAFETY: a plain read of backend state.
    if unsafe { pg_sys::XactIsoLevel } != pg_sys::XACT_REPEATABLE_READ as i32 {
        return None;
    }
    let node_id = target.node.node_id;
    let known = with_state(|state| {
        let begun = state
            .participants
            .get(&node_id)
            .is_some_and(|p| p.sent_level > 0);
        let held = state.holders.get(&node_id).map(|h| h.snapshot.clone());
        (begun, held)
    });
    match known {
        (_, Some(snapshot)) => return Some(snapshot),
        (true, None) => return None,
        (false, None) => {}
    }
    let opened = runtime::block_on(async {
        let conn = match connection::take_cached(target) {
            Some(conn) => conn,
            None => NodeConnection::open(target).await?,
        };
        let messages = conn
            .simple_query(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT pg_catalog.pg_export_snapshot()",
            )
            .await?;
        Ok::<_, RemoteError>((conn, messages))
    });
    let (conn, messages) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(err)) => raise(err),
        Err(_) => runtime::raise_interrupt(),
    };
    let snapshot = crate::remote::rows_as_text(&messages)
        .into_iter()
        .next()
        .and_then(|row| row.into_iter().next().flatten())?;
    with_state(|state| {
        state.holders.insert(
            node_id,
            SnapshotHolder {
                conn,
                snapshot: snapshot.clone(),
            },
        )
    });
    Some(snapshot)
}

/// Ends the transactions that hold snapshots (they only read), all at once.
fn end_snapshot_holders() {
    let holders: Vec<SnapshotHolder> =
        with_state(|state| state.holders.drain().map(|(_, holder)| holder).collect());
    if holders.is_empty() {
        return;
    }
    let ends = holders.iter().map(|h| h.conn.simple_query("ROLLBACK"));
    if let Ok(results) = runtime::block_on(futures_util::future::join_all(ends)) {
        for (holder, result) in holders.into_iter().zip(results) {
            if result.is_ok() {
                connection::give_back(holder.conn);
            }
        }
    }
}

/// True when this transaction has remote participants.
pub fn has_participants() -> bool {
    with_state(|state| state.participants.values().any(|p| p.sent_level > 0))
}

/// What every pgdist GID of this coordinator starts with: `pgdist_<system identifier>_`.
pub fn coordinator_gid_prefix() -> String {
    // SAFETY: GetSystemIdentifier reads a value fixed at initdb from shared memory.
    format!("pgdist_{}_", unsafe { pg_sys::GetSystemIdentifier() }
        as i64)
}

// SAFETY: the name is unique to pgdist's shared memory.
static SERVER_LIFETIME: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pgdist_server_lifetime") };

/// Shared memory for [`server_lifetime`]; called from _PG_init.
#[allow(unexpected_cfgs)] // pg_shmem_init! tests features of every PostgreSQL version
pub fn init_shared_memory() {
    // Evaluated each time shared memory is created: at start-up and after every crash restart.
    pg_shmem_init!(
        SERVER_LIFETIME = AtomicU64::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as u64)
        )
    );
}

/// Identifies this run of the server: it changes at every start and crash restart (when xids
/// not yet flushed to WAL may be handed out again).
pub fn server_lifetime() -> u64 {
    SERVER_LIFETIME.get().load(Ordering::Relaxed)
}

/// The global transaction id for the current local transaction on `node_id`:
/// `pgdist_<system id>_<local xid>_<server lifetime>_<node id>`. The lifetime keeps an xid that a
/// crash let the server hand out again from ever naming an older transaction.
fn gid_for(node_id: i32) -> String {
    // SAFETY: called at pre-commit inside a live transaction; assigning an xid is allowed there.
    let xid = unsafe { pg_sys::GetTopTransactionId() };
    format!(
        "{}{}_{}_{}",
        coordinator_gid_prefix(),
        u32::from(xid),
        server_lifetime(),
        node_id
    )
}

/// XACT_EVENT_PRE_COMMIT: prepare or commit the participants; errors abort the transaction.
pub fn pre_commit() {
    // Every remote transaction that imports a held snapshot has begun by now.
    end_snapshot_holders();
    let lost =
        with_state(|state| state.poisoned || state.participants.values().any(|p| p.conn.is_none()));
    if lost {
        raise(XactError::Poisoned);
    }
    // Nodes that were lent but never sent anything have no remote transaction.
    let mut participants: Vec<Participant> = Vec::new();
    for participant in with_state(|state| {
        state
            .participants
            .drain()
            .map(|(_, p)| p)
            .collect::<Vec<_>>()
    }) {
        match (participant.sent_level, participant.conn) {
            (0, Some(conn)) => connection::give_back(conn),
            (sent_level, conn) => participants.push(Participant {
                conn,
                reclaim: None,
                sent_level,
                prepared_gid: None,
                writes: participant.writes,
            }),
        }
    }
    // Nodes that only read have nothing to make atomic: they commit now. If one fails, the
    // others go back to the transaction, for the abort to roll them back.
    let (writing, reading): (Vec<Participant>, Vec<Participant>) =
        participants.into_iter().partition(|p| p.writes);
    if let Some(err) = commit_reading(reading) {
        with_state(|state| {
            for participant in writing {
                if let Some(node_id) = participant.conn.as_ref().map(|c| c.node.node_id) {
                    state.participants.insert(node_id, participant);
                }
            }
        });
        raise(err);
    }
    let mut participants = writing;
    if participants.is_empty() {
        return;
    }
    // SAFETY: reads whether this local transaction has an xid (i.e. wrote something locally).
    let local_writes =
        unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
    if participants.len() == 1 && !local_writes {
        let participant = participants.remove(0);
        let Some(conn) = participant.conn else {
            raise(XactError::Poisoned)
        };
        match runtime::block_on(conn.simple_query("COMMIT")) {
            Ok(Ok(_)) => connection::give_back(conn),
            // The node may have committed before its session ended.
            Ok(Err(err)) if err.ended_the_session() => raise(XactError::OutcomeUnknown(err)),
            Ok(Err(err)) => raise(err),
            Err(_) => runtime::raise_interrupt(),
        }
        return;
    }
    let gids: Vec<String> = participants
        .iter()
        .filter_map(|p| p.conn.as_ref())
        .map(|conn| gid_for(conn.node.node_id))
        .collect();
    // The decision rows go in first, and the WAL that carries this transaction's xid is
    // flushed before any node prepares: after a crash the xid is then known to have ended (and
    // is never handed out again), so recovery can tell "never committed" from "still running".
    record_commit_decision(&gids);
    let prepares = participants
        .iter()
        .filter_map(|p| p.conn.as_ref())
        .zip(&gids)
        .map(|(conn, gid)| {
            conn.simple_query_owned(format!(
                "PREPARE TRANSACTION {}",
                crate::remote::quote::quote_literal(gid)
            ))
        });
    let results = runtime::block_on(futures_util::future::join_all(prepares));
    if let Ok(results) = &results {
        for ((participant, gid), result) in participants.iter_mut().zip(&gids).zip(results) {
            if result.is_ok() {
                participant.prepared_gid = Some(gid.clone());
            }
        }
    }
    // Keep them registered so that the abort callback rolls back what was prepared.
    with_state(|state| {
        for participant in participants {
            if let Some(node_id) = participant.conn.as_ref().map(|c| c.node.node_id) {
                state.participants.insert(node_id, participant);
            }
        }
    });
    match results {
        Err(_) => runtime::raise_interrupt(),
        Ok(results) => {
            if let Some(err) = results.into_iter().find_map(Result::err) {
                raise(err);
            }
        }
    }
    crate::gucs::debug_pause("after_prepare");
}

fn record_commit_decision(gids: &[String]) {
    let node_ids: Vec<i32> = gids
        .iter()
        .filter_map(|gid| gid.rsplit('_').next().and_then(|id| id.parse().ok()))
        .collect();
    // Pre-commit runs without an active snapshot; SPI needs one.
    // SAFETY: we are inside a live transaction; the pushed snapshot is popped right after.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let result = crate::metadata::as_catalog_owner(|| {
        Spi::run_with_args(
            "INSERT INTO pgdist.transaction_decision (gid, node_id) SELECT * FROM unnest($1::text[], $2::int[])",
            &[gids.to_vec().into(), node_ids.into()],
        )
    });
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    if let Err(err) = result {
        pgrx::error!("pgdist could not record the commit decision: {err}");
    }
}

/// XACT_EVENT_COMMIT: the local commit is durable; finish the prepared participants. Failures
/// are left to recovery (the decision record says "commit").
pub fn after_commit() {
    let participants: Vec<(NodeConnection, Option<String>)> = take_all();
    // Most transactions touch no node: they must not pay for the async runtime.
    if participants.is_empty() {
        return;
    }
    if participants.iter().any(|(_, gid)| gid.is_some()) {
        // The commit record must be durable before any node commits its part, also under
        // synchronous_commit = off: otherwise a crash could lose the decision after a node
        // already acted on it.
        // SAFETY: flushes WAL up to this backend's commit record.
        unsafe { pg_sys::XLogFlush(pg_sys::XactLastCommitEnd) };
        crate::gucs::debug_pause("before_commit_prepared");
    }
    let commits = participants.iter().filter_map(|(conn, gid)| {
        let gid = gid.as_ref()?;
        Some(conn.simple_query_owned(format!(
            "COMMIT PREPARED {}",
            crate::remote::quote::quote_literal(gid)
        )))
    });
    let outcome = runtime::block_on(futures_util::future::join_all(commits));
    let failed = match outcome {
        Ok(results) => results
            .into_iter()
            .filter_map(Result::err)
            // Recovery got there first: it commits exactly what we would.
            .filter(|e| !super::recovery::finished_elsewhere(e))
            .map(|e| e.to_string())
            .collect(),
        Err(_) => vec!["interrupted".to_string()],
    };
    for err in &failed {
        pgrx::warning!("pgdist: COMMIT PREPARED failed, recovery will finish it: {err}");
    }
    for (conn, _) in participants {
        connection::give_back(conn);
    }
}

/// XACT_EVENT_ABORT: roll back every participant (prepared or not). Never raises.
pub fn after_abort() {
    end_snapshot_holders();
    let participants = take_all();
    if participants.is_empty() {
        return;
    }
    let rollbacks = participants.iter().map(|(conn, gid)| {
        let sql = match gid {
            Some(gid) => format!(
                "ROLLBACK PREPARED {}",
                crate::remote::quote::quote_literal(gid)
            ),
            None => "ROLLBACK".to_string(),
        };
        conn.simple_query_owned(sql)
    });
    let outcome = runtime::block_on(futures_util::future::join_all(rollbacks));
    if let Ok(results) = outcome {
        for ((mut conn, _), result) in participants.into_iter().zip(results) {
            if result.is_ok() {
                // Settings sent inside the transaction were rolled back with it.
                conn.session_settings.clear();
                connection::give_back(conn);
            }
        }
    }
}

/// Every participant connection that has a remote transaction, with its GID if prepared;
/// the state is reset for the next transaction.
fn take_all() -> Vec<(NodeConnection, Option<String>)> {
    with_state(|state| {
        state.poisoned = false;
        state.constraint_modes.clear();
        state
            .participants
            .drain()
            .filter_map(|(_, p)| match p.conn {
                Some(conn) if p.sent_level == 0 => {
                    connection::give_back(conn);
                    None
                }
                Some(conn) => Some((conn, p.prepared_gid)),
                None => None,
            })
            .collect()
    })
}

/// A savepoint or exception block was rolled back: every node whose remote transaction has
/// the matching savepoint rolls back to it. A node that cannot leaves the transaction unable
/// to commit.
pub fn subtransaction_aborted() {
    let level = nest_level();
    // A cursor of an outer level may still stream rows on a connection that must roll back:
    // its rows are set aside first (an error it met still reaches it).
    let lent: Vec<i32> = with_state(|state| {
        state
            .participants
            .iter()
            .filter(|(_, p)| p.sent_level >= level && p.conn.is_none())
            .map(|(id, _)| *id)
            .collect()
    });
    let _ = reclaim_lent(&lent);
    let mut to_roll_back: Vec<NodeConnection> = Vec::new();
    with_state(|state| {
        state.constraint_modes.retain(|(at, _)| *at < level);
        for participant in state.participants.values_mut() {
            if participant.sent_level < level {
                continue;
            }
            participant.sent_level = level - 1;
            match participant.conn.take() {
                Some(conn) => to_roll_back.push(conn),
                None => state.poisoned = true,
            }
        }
    });
    if to_roll_back.is_empty() {
        return;
    }
    let sql = format!("ROLLBACK TO SAVEPOINT pgdist_{level}");
    let rollbacks = to_roll_back.iter().map(|conn| conn.simple_query(&sql));
    let outcome = runtime::block_on(futures_util::future::join_all(rollbacks));
    let succeeded: Vec<bool> = match outcome {
        Ok(results) => results.iter().map(Result::is_ok).collect(),
        Err(_) => vec![false; to_roll_back.len()],
    };
    with_state(|state| {
        for (mut conn, ok) in to_roll_back.into_iter().zip(succeeded) {
            if !ok {
                state.poisoned = true;
            }
            conn.session_settings.clear();
            if let Some(participant) = state.participants.get_mut(&conn.node.node_id) {
                participant.conn = Some(conn);
            }
        }
    });
}

/// A savepoint was released: its remote work now belongs to the parent level (the remote
/// savepoint stays; a later one at the same level shadows it).
pub fn subtransaction_committed() {
    let level = nest_level();
    with_state(|state| {
        for participant in state.participants.values_mut() {
            participant.sent_level = participant.sent_level.min(level - 1);
        }
        for (at, _) in state.constraint_modes.iter_mut() {
            *at = (*at).min(level - 1);
        }
    });
}

/// Commits the remote transactions of nodes that only read, all at once; the first failure.
fn commit_reading(reading: Vec<Participant>) -> Option<RemoteError> {
    if reading.is_empty() {
        return None;
    }
    let conns: Vec<NodeConnection> = reading.into_iter().filter_map(|p| p.conn).collect();
    let commits = conns.iter().map(|conn| conn.simple_query("COMMIT"));
    let results = match runtime::block_on(futures_util::future::join_all(commits)) {
        Ok(results) => results,
        Err(_) => runtime::raise_interrupt(),
    };
    let mut failure = None;
    for (conn, result) in conns.into_iter().zip(results) {
        match result {
            Ok(_) => connection::give_back(conn),
            Err(err) => failure = failure.or(Some(err)),
        }
    }
    failure
}

/// XACT_EVENT_PRE_PREPARE: a user's PREPARE TRANSACTION cannot include remote work.
pub fn refuse_prepare() {
    if has_participants() {
        raise(XactError::PrepareNotSupported);
    }
}

#[cfg(test)]
mod unit {
    use super::opening_statements;

    #[test]
    fn nodes_joining_later_get_the_constraint_modes_after_their_savepoints() {
        let modes = [
            (1, "SET CONSTRAINTS ALL DEFERRED"),
            (3, "SET CONSTRAINTS ALL IMMEDIATE"),
        ];
        assert_eq!(
            opening_statements("BEGIN", 0, 3, &modes),
            "BEGIN;SET CONSTRAINTS ALL DEFERRED;SAVEPOINT pgdist_2;SAVEPOINT pgdist_3;\
             SET CONSTRAINTS ALL IMMEDIATE;"
        );
        // A node already in the transaction got them when they ran.
        assert_eq!(
            opening_statements("BEGIN", 1, 3, &modes),
            "SAVEPOINT pgdist_2;SAVEPOINT pgdist_3;"
        );
        assert_eq!(
            opening_statements("BEGIN ISOLATION LEVEL SERIALIZABLE", 0, 1, &[]),
            "BEGIN ISOLATION LEVEL SERIALIZABLE;"
        );
    }
}
