//! `pgdist.add_node` and `pgdist.remove_node`.
//!
//! `add_node` talks to the server before recording anything: it must answer, run the same
//! PostgreSQL major version, not be the coordinator or a node already added under another
//! address (compared by system identifier), and have pgdist at the coordinator's version —
//! `CREATE EXTENSION pgdist` is run there when the package is installed but the extension is
//! not created yet. A replica is matched to its primary by system identifier.

use pgrx::prelude::*;

use crate::cluster::{target_for, ClusterError};
use crate::distribution::create::{relation_name, replicate_reference_table};
use crate::distribution::{foreign_keys, shell};
use crate::error::OrRaise;
use crate::metadata::nodes::{self, NewNode, NodeRole};
use crate::metadata::tables;
use crate::remote::{self, NodeAddress};
use crate::EXTENSION_VERSION;

/// What a server says about itself when we probe it.
struct ServerFacts {
    major_version: i32,
    in_recovery: bool,
    system_identifier: i64,
    installed_version: Option<String>,
    available_version: Option<String>,
}

const PROBE_SQL: &str = "SELECT current_setting('server_version_num')::int / 10000, \
     pg_catalog.pg_is_in_recovery(), \
     (SELECT system_identifier FROM pg_catalog.pg_control_system()), \
     (SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pgdist'), \
     (SELECT default_version FROM pg_catalog.pg_available_extensions WHERE name = 'pgdist')";

fn run_one(node: &NodeAddress, sql: &str) -> Result<Vec<Vec<Option<String>>>, ClusterError> {
    let target = target_for(node.clone())?;
    let outcome = remote::run_on_each(std::slice::from_ref(&target), sql).pop();
    let messages = outcome.ok_or_else(|| ClusterError::BadAnswer(node.clone()))??;
    Ok(remote::rows_as_text(&messages))
}

fn probe(node: &NodeAddress) -> Result<ServerFacts, ClusterError> {
    let rows = run_one(node, PROBE_SQL)?;
    let bad = || ClusterError::BadAnswer(node.clone());
    let row = rows.into_iter().next().ok_or_else(bad)?;
    let [major, recovery, sysid, installed, available] =
        <[Option<String>; 5]>::try_from(row).map_err(|_| bad())?;
    Ok(ServerFacts {
        major_version: major.and_then(|v| v.parse().ok()).ok_or_else(bad)?,
        in_recovery: recovery.as_deref() == Some("t"),
        system_identifier: sysid.and_then(|v| v.parse().ok()).ok_or_else(bad)?,
        installed_version: installed,
        available_version: available,
    })
}

fn coordinator_system_identifier() -> i64 {
    // SAFETY: GetSystemIdentifier reads a value fixed at initdb from shared memory.
    unsafe { pg_sys::GetSystemIdentifier() as i64 }
}

fn check_and_install(node: &NodeAddress, role: &NodeRole) -> Result<ServerFacts, ClusterError> {
    let facts = probe(node)?;
    let expected_major = (pg_sys::PG_VERSION_NUM / 10000) as i32;
    if facts.major_version != expected_major {
        return Err(ClusterError::VersionMismatch {
            node: node.clone(),
            found: facts.major_version,
            expected: expected_major,
        });
    }
    let (wanted_recovery, actual) = match role {
        NodeRole::Primary => (false, "a standby (in recovery)"),
        NodeRole::Replica => (true, "not a standby"),
    };
    if facts.in_recovery != wanted_recovery {
        return Err(ClusterError::WrongRecoveryState {
            node: node.clone(),
            role: role.as_str(),
            actual,
        });
    }
    if *role == NodeRole::Primary && facts.system_identifier == coordinator_system_identifier() {
        return Err(ClusterError::IsCoordinator(node.clone()));
    }
    let version_mismatch = |found: &str| ClusterError::ExtensionVersionMismatch {
        node: node.clone(),
        found: found.to_string(),
        expected: EXTENSION_VERSION.to_string(),
    };
    match (&facts.installed_version, &facts.available_version) {
        (Some(installed), _) if installed != EXTENSION_VERSION => {
            return Err(version_mismatch(installed))
        }
        (Some(_), _) => {}
        (None, _) if *role == NodeRole::Replica => {
            return Err(ClusterError::ExtensionMissing(node.clone()))
        }
        (None, None) => return Err(ClusterError::ExtensionMissing(node.clone())),
        (None, Some(available)) if available != EXTENSION_VERSION => {
            return Err(version_mismatch(available))
        }
        (None, Some(_)) => {
            pgrx::notice!("creating extension pgdist on {node}");
            run_one(node, "CREATE EXTENSION IF NOT EXISTS pgdist")?;
        }
    }
    Ok(facts)
}

fn add_node_impl(host: &str, port: i32, role: &str) -> Result<i32, ClusterError> {
    let role = NodeRole::parse(role).ok_or_else(|| ClusterError::BadRole(role.to_string()))?;
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or(ClusterError::BadPort(port))?;
    nodes::lock_membership()?;
    if let Some(existing) = nodes::node_by_address(host, port)? {
        return Err(ClusterError::AlreadyAdded {
            host: host.to_string(),
            port,
            node_id: existing.address.node_id,
        });
    }
    let address = NodeAddress {
        node_id: 0,
        host: host.to_string(),
        port,
    };
    let facts = check_and_install(&address, &role)?;
    let same_server = nodes::all_nodes()?
        .into_iter()
        .filter(|n| n.system_identifier == facts.system_identifier);
    let primary_node_id = match role {
        NodeRole::Primary => {
            if let Some(existing) = same_server.into_iter().next() {
                return Err(ClusterError::SameServer {
                    node: address,
                    existing: existing.address.node_id,
                });
            }
            None
        }
        NodeRole::Replica => Some(
            same_server
                .filter(|n| n.role == NodeRole::Primary)
                .map(|n| n.address.node_id)
                .next()
                .ok_or(ClusterError::UnknownPrimary(address))?,
        ),
    };
    let node_id = nodes::insert_node(&NewNode {
        host,
        port,
        role: role.clone(),
        primary_node_id,
        system_identifier: facts.system_identifier,
    })?;
    if role == NodeRole::Primary {
        let node = NodeAddress {
            node_id,
            host: host.to_string(),
            port,
        };
        let reference_tables = tables::reference_tables()?;
        for &table in &reference_tables {
            pgrx::notice!("copying reference table {} to {node}", relation_name(table));
            replicate_reference_table(table, &node)?;
        }
        // Foreign keys between reference tables, once every copy is there.
        for table in reference_tables {
            let copy: Vec<_> = tables::placements(table)?
                .into_iter()
                .filter(|p| p.node == node)
                .collect();
            foreign_keys::add_to_shards(&shell::read_definition(table)?, &copy)?;
        }
    }
    Ok(node_id)
}

/// Adds a server to the cluster and returns its node_id.
#[pg_extern]
fn add_node(host: &str, port: i32, role: default!(&str, "'primary'")) -> i32 {
    crate::cluster::require_superuser("add nodes");
    add_node_impl(host, port, role).or_raise()
}

fn remove_node_impl(node_id: i32) -> Result<(), ClusterError> {
    nodes::lock_membership()?;
    let node = nodes::node_by_id(node_id)?.ok_or(ClusterError::NoSuchNode(node_id))?;
    let replicas = nodes::replicas_of(node_id)?;
    if !replicas.is_empty() {
        let replicas = replicas
            .iter()
            .map(|n| n.address.to_string())
            .collect::<Vec<_>>();
        return Err(ClusterError::HasReplicas {
            node_id,
            replicas: replicas.join(", "),
        });
    }
    let (all, reference) = tables::placement_counts(node_id)?;
    if all > reference {
        return Err(ClusterError::HasPlacements {
            node_id,
            count: all - reference,
        });
    }
    if reference > 0 {
        if nodes::primary_nodes()?.len() <= 1 {
            return Err(ClusterError::LastReferenceCopy(node_id));
        }
        drop_reference_copies(&node.address)?;
    }
    nodes::delete_node(node_id)?;
    remote::connection::forget_node(&node.address);
    Ok(())
}

/// Drops the node's copies of reference tables (best effort: a node that is down keeps them).
fn drop_reference_copies(node: &NodeAddress) -> Result<(), ClusterError> {
    let mut names = Vec::new();
    for (table, shard_id) in tables::placements_on(node.node_id)? {
        names.push(shell::read_definition(table)?.shard_relation(shard_id));
    }
    let sql = format!("DROP TABLE IF EXISTS {}", names.join(", "));
    let target = target_for(node.clone())?;
    if let Some(Err(err)) = remote::run_on_each(std::slice::from_ref(&target), &sql).pop() {
        pgrx::notice!("could not drop the reference table copies on {node}: {err}");
    }
    tables::delete_placements_on(node.node_id)?;
    Ok(())
}

/// Removes a node from the cluster's catalog (the server itself is left untouched).
#[pg_extern]
fn remove_node(node_id: i32) {
    crate::cluster::require_superuser("remove nodes");
    remove_node_impl(node_id).or_raise()
}
