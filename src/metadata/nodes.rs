//! The `pgdist.node` catalog table: which servers are in the cluster.

use pgrx::prelude::*;

use crate::metadata::MetadataError;
use crate::remote::NodeAddress;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeRole {
    Primary,
    Replica,
}

impl NodeRole {
    pub fn parse(text: &str) -> Option<NodeRole> {
        match text {
            "primary" => Some(NodeRole::Primary),
            "replica" => Some(NodeRole::Replica),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            NodeRole::Primary => "primary",
            NodeRole::Replica => "replica",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub address: NodeAddress,
    pub role: NodeRole,
    pub system_identifier: i64,
}

/// What `add_node` records for a new node.
pub struct NewNode<'a> {
    pub host: &'a str,
    pub port: u16,
    pub role: NodeRole,
    pub primary_node_id: Option<i32>,
    pub system_identifier: i64,
}

const NODE_COLUMNS: &str = "node_id, host, port, role, system_identifier";

fn node_from_row(row: pgrx::spi::SpiHeapTupleData) -> Result<Node, MetadataError> {
    let role: String = row.get(4)?.unwrap_or_default();
    Ok(Node {
        address: NodeAddress {
            node_id: row.get(1)?.unwrap_or_default(),
            host: row.get(2)?.unwrap_or_default(),
            port: row.get::<i32>(3)?.unwrap_or_default() as u16,
        },
        role: NodeRole::parse(&role).unwrap_or(NodeRole::Primary),
        system_identifier: row.get(5)?.unwrap_or_default(),
    })
}

fn select_nodes(
    filter: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Vec<Node>, MetadataError> {
    let query = format!("SELECT {NODE_COLUMNS} FROM pgdist.node {filter} ORDER BY node_id");
    super::as_catalog_owner(|| {
        Spi::connect(|client| {
            client
                .select(query.as_str(), None, args)?
                .map(node_from_row)
                .collect()
        })
    })
}

/// Every node, in node_id order.
pub fn all_nodes() -> Result<Vec<Node>, MetadataError> {
    select_nodes("", &[])
}

/// The primaries: the nodes that hold placements and take writes.
pub fn primary_nodes() -> Result<Vec<Node>, MetadataError> {
    select_nodes("WHERE role = 'primary'", &[])
}

pub fn node_by_id(node_id: i32) -> Result<Option<Node>, MetadataError> {
    Ok(select_nodes("WHERE node_id = $1", &[node_id.into()])?.pop())
}

pub fn node_by_address(host: &str, port: u16) -> Result<Option<Node>, MetadataError> {
    Ok(select_nodes(
        "WHERE host = $1 AND port = $2",
        &[host.into(), (port as i32).into()],
    )?
    .pop())
}

/// Serialises node membership changes against each other.
pub fn lock_membership() -> Result<(), MetadataError> {
    Ok(Spi::run(
        "LOCK TABLE pgdist.node IN SHARE ROW EXCLUSIVE MODE",
    )?)
}

pub fn insert_node(node: &NewNode) -> Result<i32, MetadataError> {
    let node_id = Spi::get_one_with_args::<i32>(
        "INSERT INTO pgdist.node (host, port, role, primary_node_id, system_identifier, status, last_heartbeat)
         VALUES ($1, $2, $3, $4, $5, 'up', now()) RETURNING node_id",
        &[
            node.host.into(),
            (node.port as i32).into(),
            node.role.as_str().into(),
            node.primary_node_id.into(),
            node.system_identifier.into(),
        ],
    )?;
    Ok(node_id.unwrap_or_default())
}

/// Replicas registered for `primary_node_id`.
pub fn replicas_of(primary_node_id: i32) -> Result<Vec<Node>, MetadataError> {
    select_nodes("WHERE primary_node_id = $1", &[primary_node_id.into()])
}

pub fn delete_node(node_id: i32) -> Result<(), MetadataError> {
    Ok(Spi::run_with_args(
        "DELETE FROM pgdist.node WHERE node_id = $1",
        &[node_id.into()],
    )?)
}
