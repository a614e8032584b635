//! `pgdist.run_on_workers(command)`: one command on every primary node, in parallel.

use pgrx::prelude::*;
use tokio_postgres::SimpleQueryMessage;

use crate::cluster::{target_for, ClusterError};
use crate::error::OrRaise;
use crate::metadata::nodes;
use crate::remote::{self, NodeOutcome};

/// The `result` column for one node: the first column of the first row of the last statement
/// that returned rows, or for a statement without rows `OK` / `OK <n rows affected>`; on failure
/// the error text.
fn describe(outcome: NodeOutcome) -> (bool, Option<String>) {
    let messages = match outcome {
        Ok(messages) => messages,
        Err(err) => return (false, Some(err.to_string())),
    };
    let mut result = Some("OK".to_string());
    let mut returns_rows = false;
    let mut first_value: Option<Option<String>> = None;
    for message in &messages {
        match message {
            SimpleQueryMessage::RowDescription(_) => {
                returns_rows = true;
                first_value = None;
            }
            SimpleQueryMessage::Row(row) if first_value.is_none() => {
                first_value = Some(row.get(0).map(str::to_string));
            }
            SimpleQueryMessage::CommandComplete(count) => {
                result = match (returns_rows, first_value.take()) {
                    (true, value) => value.flatten(),
                    (false, _) if *count > 0 => Some(format!("OK {count}")),
                    (false, _) => Some("OK".to_string()),
                };
                returns_rows = false;
            }
            _ => {}
        }
    }
    (true, result)
}

fn run_impl(command: &str) -> Result<Vec<(i32, bool, Option<String>)>, ClusterError> {
    let workers = nodes::primary_nodes()?;
    let targets = workers
        .iter()
        .map(|node| target_for(node.address.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let outcomes = remote::run_on_each(&targets, command);
    Ok(workers
        .iter()
        .zip(outcomes)
        .map(|(node, outcome)| {
            let (success, result) = describe(outcome);
            (node.address.node_id, success, result)
        })
        .collect())
}

/// Runs `command` on every worker at once, each in its own autocommit session.
#[pg_extern]
fn run_on_workers(
    command: &str,
) -> TableIterator<
    'static,
    (
        name!(node_id, i32),
        name!(success, bool),
        name!(result, Option<String>),
    ),
> {
    crate::cluster::require_superuser("run commands on the worker nodes");
    TableIterator::new(run_impl(command).or_raise())
}
