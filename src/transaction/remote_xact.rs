//! One remote transaction per node for the current coordinator transaction.
//!
//! Work takes the participant connections it needs with [`checkout`] (opening them and sending
//! `BEGIN` on first use), runs its commands, and hands them back with [`Checkout::finish`].
//! At pre-commit the participants are prepared (two-phase commit) or committed (one participant,
//! no local writes); after the local commit prepared ones get `COMMIT PREPARED`; at abort
//! everything is rolled back. A decision record in `pgdist.transaction_decision`, written in the
//! same local transaction as the commit, tells recovery what to do with a transaction left
//! prepared by a crash.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::prelude::*;

use crate::error::{raise, PgError};
use crate::remote::connection::{self, NodeConnection};
use crate::remote::runtime;
use crate::remote::{NodeTarget, RemoteError};

struct Participant {
    conn: NodeConnection,
    /// Set once `PREPARE TRANSACTION` succeeded on the node.
    prepared_gid: Option<String>,
}

#[derive(Default)]
struct XactState {
    /// Keyed by node id (a transaction never talks to one node as two users).
    participants: HashMap<i32, Participant>,
    /// Remote work was lost mid-transaction (a rolled-back savepoint, an interrupted command):
    /// the transaction may not commit.
    poisoned: bool,
    /// The deepest subtransaction level that did remote work not yet merged into its parent.
    work_level: i32,
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
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

impl PgError for XactError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            XactError::Poisoned => PgSqlErrorCode::ERRCODE_TRANSACTION_ROLLBACK,
            XactError::PrepareNotSupported => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            XactError::Remote(err) => err.sqlstate(),
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
                "A savepoint or exception block that did remote work was rolled back, or a remote \
                 command was interrupted; roll back the whole transaction and retry."
                    .into(),
            ),
            XactError::PrepareNotSupported => {
                Some("Commit the transaction instead of preparing it.".into())
            }
            XactError::Remote(err) => err.hint(),
        }
    }
}

/// Participant connections taken for a piece of work. Dropping it without [`Checkout::finish`]
/// (an error, an interrupt) closes the connections, which rolls their remote transactions back,
/// and marks the coordinator transaction as unable to commit.
pub struct Checkout {
    pub conns: Vec<NodeConnection>,
    prepared: Vec<Option<String>>,
    finished: bool,
}

impl Checkout {
    pub fn finish(mut self) {
        self.finished = true;
        let conns = std::mem::take(&mut self.conns);
        let prepared = std::mem::take(&mut self.prepared);
        let level = nest_level();
        with_state(|state| {
            state.work_level = state.work_level.max(level);
            for (conn, prepared_gid) in conns.into_iter().zip(prepared) {
                state
                    .participants
                    .insert(conn.node.node_id, Participant { conn, prepared_gid });
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

/// The participant connections for `targets` (one per node, in the same order), each with an
/// open remote transaction.
pub fn checkout(targets: &[NodeTarget]) -> Result<Checkout, RemoteError> {
    let mut existing: Vec<Option<Participant>> = with_state(|state| {
        targets
            .iter()
            .map(|t| state.participants.remove(&t.node.node_id))
            .collect()
    });
    let prepared = existing
        .iter()
        .map(|p| p.as_ref().and_then(|p| p.prepared_gid.clone()))
        .collect();
    let work = targets
        .iter()
        .zip(existing.iter_mut().map(Option::take))
        .map(|(target, existing)| async move {
            match existing {
                Some(participant) => Ok(participant.conn),
                None => {
                    let conn = match connection::take_cached(target) {
                        Some(conn) => conn,
                        None => NodeConnection::open(target).await?,
                    };
                    conn.simple_query("BEGIN").await?;
                    Ok(conn)
                }
            }
        });
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
    let checkout = Checkout {
        conns,
        prepared,
        finished: false,
    };
    match first_error {
        Some(err) => Err(err), // dropping `checkout` poisons the transaction
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
    let checkout = checkout(&targets).unwrap_or_else(|err| raise(err));
    let runs = checkout
        .conns
        .iter()
        .zip(work)
        .map(|(conn, (_, sql))| conn.simple_query(sql));
    let results = match runtime::block_on(futures_util::future::join_all(runs)) {
        Ok(results) => results,
        Err(_) => runtime::raise_interrupt(),
    };
    if let Some(err) = results.into_iter().find_map(Result::err) {
        raise(err);
    }
    checkout.finish();
}

/// True when this transaction has remote participants.
pub fn has_participants() -> bool {
    with_state(|state| !state.participants.is_empty())
}

/// What every pgdist GID of this coordinator starts with: `pgdist_<system identifier>_`.
pub fn coordinator_gid_prefix() -> String {
    // SAFETY: GetSystemIdentifier reads a value fixed at initdb from shared memory.
    format!("pgdist_{}_", unsafe { pg_sys::GetSystemIdentifier() }
        as i64)
}

/// The global transaction id for the current local transaction on `node_id`.
fn gid_for(node_id: i32) -> String {
    // SAFETY: called at pre-commit inside a live transaction; assigning an xid is allowed there.
    let xid = unsafe { pg_sys::GetTopTransactionId() };
    format!("{}{}_{}", coordinator_gid_prefix(), u32::from(xid), node_id)
}

/// XACT_EVENT_PRE_COMMIT: prepare or commit the participants; errors abort the transaction.
pub fn pre_commit() {
    let poisoned = with_state(|state| state.poisoned);
    if poisoned {
        raise(XactError::Poisoned);
    }
    let mut participants: Vec<Participant> =
        with_state(|state| state.participants.drain().map(|(_, p)| p).collect());
    if participants.is_empty() {
        return;
    }
    // SAFETY: reads whether this local transaction has an xid (i.e. wrote something locally).
    let local_writes =
        unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
    if participants.len() == 1 && !local_writes {
        let participant = participants.remove(0);
        let result = runtime::block_on(participant.conn.simple_query("COMMIT"));
        match result {
            Ok(Ok(_)) => connection::give_back(participant.conn),
            Ok(Err(err)) => raise(err),
            Err(_) => runtime::raise_interrupt(),
        }
        return;
    }
    let gids: Vec<String> = participants
        .iter()
        .map(|p| gid_for(p.conn.node.node_id))
        .collect();
    let prepares = participants.iter().zip(&gids).map(|(p, gid)| {
        p.conn.simple_query_owned(format!(
            "PREPARE TRANSACTION {}",
            crate::remote::quote::quote_literal(gid)
        ))
    });
    let results = runtime::block_on(futures_util::future::join_all(prepares));
    let mut first_error = None;
    if let Ok(results) = &results {
        for ((participant, gid), result) in participants.iter_mut().zip(&gids).zip(results) {
            match result {
                Ok(_) => participant.prepared_gid = Some(gid.clone()),
                Err(err) => {
                    first_error.get_or_insert_with(|| err.to_string());
                }
            }
        }
    }
    // Keep them registered so that the abort callback rolls back what was prepared.
    with_state(|state| {
        for participant in participants {
            state
                .participants
                .insert(participant.conn.node.node_id, participant);
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
    record_commit_decision(&gids);
}

fn record_commit_decision(gids: &[String]) {
    let node_ids: Vec<i32> = gids
        .iter()
        .filter_map(|gid| gid.rsplit('_').next().and_then(|id| id.parse().ok()))
        .collect();
    // Pre-commit runs without an active snapshot; SPI needs one.
    // SAFETY: we are inside a live transaction; the pushed snapshot is popped right after.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let result = Spi::run_with_args(
        "INSERT INTO pgdist.transaction_decision (gid, node_id) SELECT * FROM unnest($1::text[], $2::int[])",
        &[gids.to_vec().into(), node_ids.into()],
    );
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    if let Err(err) = result {
        pgrx::error!("pgdist could not record the commit decision: {err}");
    }
}

/// XACT_EVENT_COMMIT: the local commit is durable; finish the prepared participants. Failures
/// are left to recovery (the decision record says "commit").
pub fn after_commit() {
    let participants: Vec<Participant> = take_all();
    let commits = participants.iter().filter_map(|p| {
        let gid = p.prepared_gid.as_ref()?;
        Some(p.conn.simple_query_owned(format!(
            "COMMIT PREPARED {}",
            crate::remote::quote::quote_literal(gid)
        )))
    });
    let outcome = runtime::block_on(futures_util::future::join_all(commits));
    let failed = match outcome {
        Ok(results) => results
            .into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect(),
        Err(_) => vec!["interrupted".to_string()],
    };
    for err in &failed {
        pgrx::warning!("pgdist: COMMIT PREPARED failed, recovery will finish it: {err}");
    }
    release(participants);
}

/// XACT_EVENT_ABORT: roll back every participant (prepared or not). Never raises.
pub fn after_abort() {
    let participants: Vec<Participant> = take_all();
    if participants.is_empty() {
        return;
    }
    let rollbacks = participants.iter().map(|p| {
        let sql = match &p.prepared_gid {
            Some(gid) => format!(
                "ROLLBACK PREPARED {}",
                crate::remote::quote::quote_literal(gid)
            ),
            None => "ROLLBACK".to_string(),
        };
        p.conn.simple_query_owned(sql)
    });
    let outcome = runtime::block_on(futures_util::future::join_all(rollbacks));
    if let Ok(results) = outcome {
        for (participant, result) in participants.into_iter().zip(results) {
            if result.is_ok() {
                connection::give_back(participant.conn);
            }
        }
    }
}

fn take_all() -> Vec<Participant> {
    with_state(|state| {
        state.poisoned = false;
        state.work_level = 0;
        state.participants.drain().map(|(_, p)| p).collect()
    })
}

fn release(participants: Vec<Participant>) {
    for participant in participants {
        connection::give_back(participant.conn);
    }
}

/// A savepoint or exception block was rolled back: remote work inside it cannot be undone
/// separately yet, so if it did any, the transaction may no longer commit.
pub fn subtransaction_aborted() {
    let level = nest_level();
    with_state(|state| {
        if state.work_level >= level {
            state.poisoned = true;
        }
    });
}

/// A savepoint was released: its remote work now belongs to the parent level.
pub fn subtransaction_committed() {
    let level = nest_level();
    with_state(|state| {
        if state.work_level >= level {
            state.work_level = level - 1;
        }
    });
}

/// XACT_EVENT_PRE_PREPARE: a user's PREPARE TRANSACTION cannot include remote work.
pub fn refuse_prepare() {
    if has_participants() {
        raise(XactError::PrepareNotSupported);
    }
}
