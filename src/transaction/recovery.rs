//! Resolving two-phase commits left in doubt by a crash.
//!
//! Every prepared transaction this coordinator started is named
//! `pgdist_<coordinator system id>_<local xid>_<server lifetime>_<node id>`. For each one still
//! prepared on a node: if its decision row exists in `pgdist.transaction_decision` the
//! coordinator committed, so it is committed. Otherwise, if it was prepared before the server's
//! last (crash) restart it never committed and is rolled back; if it is from the current run, a
//! transaction still running is left alone, one the commit log shows committed (after the
//! decision rows were read) is committed, and the rest are rolled back. Decision rows whose
//! transaction is no longer prepared anywhere are deleted — read before listing the nodes'
//! prepared transactions, so a row is never deleted while its transaction could still be
//! waiting for `COMMIT PREPARED`.

use std::collections::HashSet;

use pgrx::prelude::*;

use crate::cluster::primary_targets;
use crate::remote::quote::quote_literal;
use crate::remote::{rows_as_text, run_each};
use crate::transaction::activity::like_prefix;
use crate::transaction::remote_xact::{coordinator_gid_prefix, server_lifetime};

/// The local xid and server lifetime encoded in one of our GIDs
/// (`<prefix><xid>_<lifetime>_<node id>`).
fn xid_and_lifetime_of(gid: &str, prefix: &str) -> Option<(u32, Option<u64>)> {
    let mut parts = gid.strip_prefix(prefix)?.split('_');
    let xid = parts.next()?.parse().ok()?;
    let lifetime = parts.next().and_then(|l| l.parse().ok());
    Some((xid, lifetime))
}

/// Resolves every in-doubt transaction on every reachable primary node; the number resolved.
pub fn recover() -> i64 {
    // One recovery at a time (the daemon and a manual call could otherwise race).
    Spi::run("SELECT pg_catalog.pg_advisory_xact_lock(1886741609, 2)")
        .unwrap_or_else(|err| pgrx::error!("pgdist: locking recovery: {err}"));
    let prefix = coordinator_gid_prefix();
    let decided: HashSet<(String, i32)> = Spi::connect(|client| {
        client
            .select(
                "SELECT gid, node_id FROM pgdist.transaction_decision",
                None,
                &[],
            )?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<i32>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<HashSet<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|err| pgrx::error!("pgdist: reading transaction decisions: {err}"));
    let targets = primary_targets();
    let list = format!(
        "SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE {} AND database = current_database()",
        like_prefix(&prefix)
    );
    let listings = run_each(
        &targets
            .iter()
            .map(|t| (t.clone(), list.clone()))
            .collect::<Vec<_>>(),
    );
    let mut work = Vec::new();
    let mut still_prepared: HashSet<String> = HashSet::new();
    let mut unreachable: HashSet<i32> = HashSet::new();
    for (target, listing) in targets.iter().zip(listings) {
        let messages = match listing {
            Ok(messages) => messages,
            Err(err) => {
                pgrx::warning!(
                    "pgdist: cannot recover transactions on {}: {err}",
                    target.node
                );
                unreachable.insert(target.node.node_id);
                continue;
            }
        };
        for gid in rows_as_text(&messages)
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
        {
            let Some((xid, lifetime)) = xid_and_lifetime_of(&gid, &prefix) else {
                continue;
            };
            let command = if decided.contains(&(gid.clone(), target.node.node_id)) {
                "COMMIT PREPARED"
            } else if lifetime != Some(server_lifetime()) {
                // Prepared before the last (crash) restart and never decided: its xid may have
                // been handed out again since, so only the decision counts.
                "ROLLBACK PREPARED"
            } else {
                match local_outcome(xid) {
                    LocalOutcome::Running => {
                        still_prepared.insert(gid);
                        continue;
                    }
                    // Committed after the decisions were read: the decision row exists now.
                    LocalOutcome::Committed => "COMMIT PREPARED",
                    LocalOutcome::NotCommitted => "ROLLBACK PREPARED",
                }
            };
            work.push((target.clone(), format!("{command} {}", quote_literal(&gid))));
            still_prepared.insert(gid);
        }
    }
    let mut resolved = 0;
    for ((target, sql), outcome) in work.iter().zip(run_each(&work)) {
        match outcome {
            Ok(_) => resolved += 1,
            // The coordinator backend finished it itself meanwhile.
            Err(err) if finished_elsewhere(&err) => {}
            Err(err) => pgrx::warning!("pgdist: {sql} on {} failed: {err}", target.node),
        }
    }
    // Decisions are needed only while their transaction is still prepared somewhere.
    let finished: Vec<String> = decided
        .into_iter()
        .filter(|(gid, node_id)| !still_prepared.contains(gid) && !unreachable.contains(node_id))
        .map(|(gid, _)| gid)
        .collect();
    if !finished.is_empty() {
        Spi::run_with_args(
            "DELETE FROM pgdist.transaction_decision WHERE gid = ANY($1)",
            &[finished.into()],
        )
        .unwrap_or_else(|err| pgrx::error!("pgdist: cleaning transaction decisions: {err}"));
    }
    resolved
}

enum LocalOutcome {
    /// Still running: it may yet commit and record its decision.
    Running,
    Committed,
    /// Rolled back, or ended by a crash before it committed.
    NotCommitted,
}

/// What became of local transaction `xid`.
fn local_outcome(xid: u32) -> LocalOutcome {
    let xid = pg_sys::TransactionId::from(xid);
    // SAFETY: lookups in the shared proc array and the commit log; xids older than the commit
    // log's horizon are not looked up (they are long finished, and the decision table covers
    // the committed ones).
    unsafe {
        if pg_sys::TransactionIdIsInProgress(xid) {
            LocalOutcome::Running
        } else if !pg_sys::TransactionIdPrecedes(xid, (*pg_sys::ShmemVariableCache).oldestClogXid)
            && pg_sys::TransactionIdDidCommit(xid)
        {
            LocalOutcome::Committed
        } else {
            LocalOutcome::NotCommitted
        }
    }
}

/// True for the errors of `COMMIT PREPARED` / `ROLLBACK PREPARED` on a transaction another
/// session finished (or is finishing) first.
pub fn finished_elsewhere(err: &crate::remote::RemoteError) -> bool {
    matches!(err, crate::remote::RemoteError::Worker { sqlstate, .. }
        if sqlstate == "42704" || sqlstate == "55000")
}

/// Commits or rolls back the two-phase transactions a crash left in doubt on the nodes, and
/// forgets decisions no longer needed. Returns how many transactions it resolved.
#[pg_extern]
fn recover_prepared_transactions() -> i64 {
    crate::cluster::require_superuser("recover prepared transactions");
    recover()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn gids_give_their_xid_and_lifetime() {
        let prefix = "pgdist_7_";
        assert_eq!(
            xid_and_lifetime_of("pgdist_7_123_456_2", prefix),
            Some((123, Some(456)))
        );
        // A GID from before lifetimes were recorded only counts through its decision.
        assert_eq!(
            xid_and_lifetime_of("pgdist_7_123", prefix),
            Some((123, None))
        );
        assert_eq!(xid_and_lifetime_of("pgdist_8_123_456_2", prefix), None);
    }
}
