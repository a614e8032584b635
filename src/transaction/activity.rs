//! Which backends on the nodes work for which coordinator backend, and the cluster-wide listing
//! behind `pgdist.distributed_transactions`.
//!
//! Every connection a coordinator backend opens to a node carries the application_name
//! `pgdist:<coordinator system id>:<coordinator pid>`, so a node's `pg_stat_activity` says which
//! coordinator backend — and so which distributed transaction — each of its backends works for.
//! The deadlock detector and the view both rely on that.

use pgrx::prelude::*;

use crate::cluster::primary_targets;
use crate::remote::quote::quote_literal;
use crate::remote::{rows_as_text, run_on_each};
use crate::transaction::remote_xact::coordinator_gid_prefix;

/// This server's system identifier (fixed at initdb).
fn system_identifier() -> i64 {
    // SAFETY: GetSystemIdentifier reads a value fixed at initdb from shared memory.
    unsafe { pg_sys::GetSystemIdentifier() as i64 }
}

/// The application_name prefix of every connection this coordinator opens.
pub fn application_name_prefix() -> String {
    format!("pgdist:{}:", system_identifier())
}

/// The application_name of the current backend's connections to nodes.
pub fn application_name() -> String {
    // SAFETY: MyProcPid is set once at backend start.
    format!("{}{}", application_name_prefix(), unsafe {
        pg_sys::MyProcPid
    })
}

/// The coordinator backend a node's backend works for, read from its application_name.
pub fn coordinator_pid(application_name: &str, prefix: &str) -> Option<i32> {
    application_name.strip_prefix(prefix)?.parse().ok()
}

/// A LIKE pattern matching `prefix` literally, then anything.
pub fn like_prefix(prefix: &str) -> String {
    quote_literal(&format!(
        "{}%",
        prefix
            .replace('\\', "\\\\")
            .replace('_', "\\_")
            .replace('%', "\\%")
    ))
}

/// One row per node backend in a transaction for this coordinator, and per prepared
/// transaction it left on a node.
fn participants_sql() -> String {
    format!(
        "SELECT application_name, pid, state, extract(epoch FROM xact_start)::float8, \
                wait_event_type || ': ' || wait_event, NULL \
         FROM pg_catalog.pg_stat_activity \
         WHERE application_name LIKE {apps} AND xact_start IS NOT NULL \
           AND datname = current_database() AND pid <> pg_catalog.pg_backend_pid() \
         UNION ALL \
         SELECT NULL, NULL, 'prepared', extract(epoch FROM prepared)::float8, NULL, gid \
         FROM pg_catalog.pg_prepared_xacts \
         WHERE gid LIKE {gids} AND database = current_database()",
        apps = like_prefix(&application_name_prefix()),
        gids = like_prefix(&coordinator_gid_prefix()),
    )
}

type ParticipantRow = (
    Option<i32>,
    Option<String>,
    i32,
    Option<i32>,
    Option<String>,
    Option<f64>,
    Option<String>,
    Option<String>,
);

/// The node side of `pgdist.distributed_transactions`: every backend on a node working inside a
/// transaction for a backend of this coordinator, and every prepared transaction of this
/// coordinator still waiting on a node. Unreachable nodes give a WARNING and no rows.
#[pg_extern]
#[allow(clippy::type_complexity)]
fn distributed_transaction_participants() -> TableIterator<
    'static,
    (
        name!(coordinator_pid, Option<i32>),
        name!(local_xid, Option<String>),
        name!(node_id, i32),
        name!(remote_pid, Option<i32>),
        name!(remote_state, Option<String>),
        name!(remote_since, Option<f64>),
        name!(remote_wait_event, Option<String>),
        name!(prepared_gid, Option<String>),
    ),
> {
    let targets = primary_targets();
    let apps = application_name_prefix();
    let gids = coordinator_gid_prefix();
    let mut rows: Vec<ParticipantRow> = Vec::new();
    for (target, outcome) in targets
        .iter()
        .zip(run_on_each(&targets, &participants_sql()))
    {
        let messages = match outcome {
            Ok(messages) => messages,
            Err(err) => {
                pgrx::warning!("pgdist: cannot list transactions on {}: {err}", target.node);
                continue;
            }
        };
        for row in rows_as_text(&messages) {
            let [app, pid, state, since, wait, gid] = <[Option<String>; 6]>::try_from(row)
                .unwrap_or_else(|_| pgrx::error!("pgdist: unexpected activity row"));
            let local_xid = gid
                .as_deref()
                .and_then(|g| g.strip_prefix(&gids))
                .and_then(|rest| rest.split('_').next())
                .map(str::to_string);
            rows.push((
                app.as_deref().and_then(|a| coordinator_pid(a, &apps)),
                local_xid,
                target.node.node_id,
                pid.and_then(|p| p.parse().ok()),
                state,
                since.and_then(|s| s.parse().ok()),
                wait,
                gid,
            ));
        }
    }
    TableIterator::new(rows)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn coordinator_pid_comes_from_our_prefix_only() {
        assert_eq!(coordinator_pid("pgdist:42:1234", "pgdist:42:"), Some(1234));
        assert_eq!(coordinator_pid("pgdist:43:1234", "pgdist:42:"), None);
        assert_eq!(coordinator_pid("psql", "pgdist:42:"), None);
    }
}
