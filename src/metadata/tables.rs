//! Catalog of distributed and reference tables: `pgdist.dist_table`, `pgdist.colocation_group`,
//! `pgdist.shard` and `pgdist.placement`.

use pgrx::prelude::*;

use crate::metadata::MetadataError;
use crate::remote::NodeAddress;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Hash,
    Range,
    Reference,
}

impl Method {
    pub fn parse(text: &str) -> Option<Method> {
        match text {
            "hash" => Some(Method::Hash),
            "range" => Some(Method::Range),
            "reference" => Some(Method::Reference),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Hash => "hash",
            Method::Range => "range",
            Method::Reference => "reference",
        }
    }
}

#[derive(Clone, Debug)]
pub struct DistTable {
    pub oid: pg_sys::Oid,
    pub method: Method,
    pub distribution_column: Option<String>,
    pub colocation_id: i32,
    /// Rows in all its shards when last asked (`statistics::refresh_row_estimates`).
    pub row_estimate: Option<f64>,
}

impl DistTable {
    /// The attribute number of the distribution column (None for reference tables).
    pub fn distribution_attno(&self) -> Option<i16> {
        let column = std::ffi::CString::new(self.distribution_column.as_deref()?).ok()?;
        // SAFETY: a catalog lookup by name.
        let attno = unsafe { pg_sys::get_attnum(self.oid, column.as_ptr()) };
        (attno > 0).then_some(attno)
    }
}

/// One placement of one shard.
#[derive(Clone, Debug)]
pub struct Placement {
    pub shard_id: i64,
    pub shard_index: i32,
    pub min_value: Option<String>,
    pub max_value: Option<String>,
    pub node: NodeAddress,
}

#[derive(Clone, Debug)]
pub struct ColocationGroup {
    pub colocation_id: i32,
    pub method: Method,
    pub shard_count: i32,
    pub distribution_type: Option<pg_sys::Oid>,
    pub replication_factor: i32,
}

pub fn dist_table(oid: pg_sys::Oid) -> Result<Option<DistTable>, MetadataError> {
    Ok(select_tables("WHERE table_oid = $1", &[oid.into()])?.pop())
}

/// The distributed partitions of partitioned table `oid`, at every level.
pub fn distributed_partitions(oid: pg_sys::Oid) -> Result<Vec<pg_sys::Oid>, MetadataError> {
    super::oids(
        "SELECT t.relid FROM pg_catalog.pg_partition_tree($1) t
         JOIN pgdist.dist_table d ON d.table_oid = t.relid
         WHERE t.relid <> $1 ORDER BY t.level, t.relid",
        oid,
    )
}

/// Every distributed and reference table (what the planner's cache holds).
pub fn all_tables() -> Result<Vec<DistTable>, MetadataError> {
    select_tables("", &[])
}

fn select_tables(
    filter: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Vec<DistTable>, MetadataError> {
    let query = format!(
        "SELECT table_oid::oid, method, distribution_column, colocation_id, row_estimate FROM pgdist.dist_table {filter}"
    );
    Spi::connect(|client| {
        client
            .select(query.as_str(), None, args)?
            .map(|row| {
                let method: String = row.get(2)?.unwrap_or_default();
                Ok(DistTable {
                    oid: row.get(1)?.unwrap_or(pg_sys::InvalidOid),
                    method: Method::parse(&method).unwrap_or(Method::Hash),
                    distribution_column: row.get(3)?,
                    colocation_id: row.get(4)?.unwrap_or_default(),
                    row_estimate: row.get(5)?,
                })
            })
            .collect()
    })
}

/// Every placement of every shard of `oid`, by shard index then node.
pub fn placements(oid: pg_sys::Oid) -> Result<Vec<Placement>, MetadataError> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT s.shard_id, s.shard_index, s.min_value, s.max_value, n.node_id, n.host, n.port
                 FROM pgdist.shard s JOIN pgdist.placement p USING (shard_id) JOIN pgdist.node n USING (node_id)
                 WHERE s.table_oid = $1 ORDER BY s.shard_index, n.node_id",
                None,
                &[oid.into()],
            )?
            .map(|row| {
                Ok(Placement {
                    shard_id: row.get(1)?.unwrap_or_default(),
                    shard_index: row.get(2)?.unwrap_or_default(),
                    min_value: row.get(3)?,
                    max_value: row.get(4)?,
                    node: NodeAddress {
                        node_id: row.get(5)?.unwrap_or_default(),
                        host: row.get(6)?.unwrap_or_default(),
                        port: row.get::<i32>(7)?.unwrap_or_default() as u16,
                    },
                })
            })
            .collect()
    })
}

pub fn colocation_group(colocation_id: i32) -> Result<Option<ColocationGroup>, MetadataError> {
    find_groups("WHERE colocation_id = $1", &[colocation_id.into()]).map(|mut g| g.pop())
}

/// The default group for new tables of this shape (the lowest id, so the choice is stable).
pub fn matching_group(
    method: Method,
    shard_count: i32,
    distribution_type: Option<pg_sys::Oid>,
    replication_factor: i32,
) -> Result<Option<ColocationGroup>, MetadataError> {
    let groups = find_groups(
        "WHERE method = $1 AND shard_count = $2 AND distribution_type IS NOT DISTINCT FROM $3
           AND replication_factor = $4
           AND EXISTS (SELECT 1 FROM pgdist.dist_table t WHERE t.colocation_id = g.colocation_id)",
        &[
            method.as_str().into(),
            shard_count.into(),
            distribution_type.into(),
            replication_factor.into(),
        ],
    )?;
    Ok(groups.into_iter().next())
}

fn find_groups(
    filter: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Vec<ColocationGroup>, MetadataError> {
    let query = format!(
        "SELECT colocation_id, method, shard_count, distribution_type::oid, replication_factor
         FROM pgdist.colocation_group g {filter} ORDER BY colocation_id"
    );
    Spi::connect(|client| {
        client
            .select(query.as_str(), None, args)?
            .map(|row| {
                let method: String = row.get(2)?.unwrap_or_default();
                Ok(ColocationGroup {
                    colocation_id: row.get(1)?.unwrap_or_default(),
                    method: Method::parse(&method).unwrap_or(Method::Hash),
                    shard_count: row.get(3)?.unwrap_or_default(),
                    distribution_type: row.get(4)?,
                    replication_factor: row.get(5)?.unwrap_or_default(),
                })
            })
            .collect()
    })
}

pub fn insert_group(
    method: Method,
    shard_count: i32,
    distribution_type: Option<pg_sys::Oid>,
    replication_factor: i32,
) -> Result<i32, MetadataError> {
    let id = Spi::get_one_with_args::<i32>(
        "INSERT INTO pgdist.colocation_group (method, shard_count, distribution_type, replication_factor)
         VALUES ($1, $2, $3::oid::regtype, $4) RETURNING colocation_id",
        &[method.as_str().into(), shard_count.into(), distribution_type.into(), replication_factor.into()],
    )?;
    Ok(id.unwrap_or_default())
}

/// A table of the group, whose placements new tables of the group copy.
pub fn group_member(colocation_id: i32) -> Result<Option<pg_sys::Oid>, MetadataError> {
    Ok(Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT table_oid::oid FROM pgdist.dist_table WHERE colocation_id = $1 ORDER BY table_oid::oid LIMIT 1",
        &[colocation_id.into()],
    )?)
}

pub fn next_shard_id() -> Result<i64, MetadataError> {
    Ok(Spi::get_one::<i64>("SELECT nextval('pgdist.shard_id_seq')")?.unwrap_or_default())
}

pub fn insert_table(table: &DistTable) -> Result<(), MetadataError> {
    crate::metadata::cache::invalidate();
    Ok(Spi::run_with_args(
        "INSERT INTO pgdist.dist_table (table_oid, method, distribution_column, colocation_id, row_estimate)
         VALUES ($1::oid::regclass, $2, $3, $4, $5)",
        &[
            table.oid.into(),
            table.method.as_str().into(),
            table.distribution_column.clone().into(),
            table.colocation_id.into(),
            table.row_estimate.into(),
        ],
    )?)
}

pub fn insert_placement(placement: &Placement, table: pg_sys::Oid) -> Result<(), MetadataError> {
    crate::metadata::cache::invalidate();
    Spi::run_with_args(
        "INSERT INTO pgdist.shard (shard_id, table_oid, shard_index, min_value, max_value)
         VALUES ($1, $2::oid::regclass, $3, $4, $5) ON CONFLICT (shard_id) DO NOTHING",
        &[
            placement.shard_id.into(),
            table.into(),
            placement.shard_index.into(),
            placement.min_value.clone().into(),
            placement.max_value.clone().into(),
        ],
    )?;
    Ok(Spi::run_with_args(
        "INSERT INTO pgdist.placement (shard_id, node_id) VALUES ($1, $2)",
        &[placement.shard_id.into(), placement.node.node_id.into()],
    )?)
}

/// Removes a table and (by cascade) its shards and placements from the catalog, and its
/// co-location group when it was the last member.
pub fn delete_table(oid: pg_sys::Oid, colocation_id: i32) -> Result<(), MetadataError> {
    crate::metadata::cache::invalidate();
    Spi::run_with_args(
        "DELETE FROM pgdist.dist_table WHERE table_oid = $1::oid::regclass",
        &[oid.into()],
    )?;
    Ok(Spi::run_with_args(
        "DELETE FROM pgdist.colocation_group g WHERE colocation_id = $1
           AND NOT EXISTS (SELECT 1 FROM pgdist.dist_table t WHERE t.colocation_id = g.colocation_id)",
        &[colocation_id.into()],
    )?)
}

pub fn set_distribution_column(oid: pg_sys::Oid, column: &str) -> Result<(), MetadataError> {
    crate::metadata::cache::invalidate();
    Ok(Spi::run_with_args(
        "UPDATE pgdist.dist_table SET distribution_column = $2 WHERE table_oid = $1::oid::regclass",
        &[oid.into(), column.into()],
    )?)
}

/// Every reference table.
pub fn reference_tables() -> Result<Vec<pg_sys::Oid>, MetadataError> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT table_oid::oid FROM pgdist.dist_table WHERE method = 'reference' ORDER BY 1",
                None,
                &[],
            )?
            .map(|row| Ok(row.get(1)?.unwrap_or(pg_sys::InvalidOid)))
            .collect()
    })
}

/// Distributed tables in the given schemas (for DROP SCHEMA).
pub fn tables_in_schemas(schemas: &[pg_sys::Oid]) -> Result<Vec<pg_sys::Oid>, MetadataError> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT t.table_oid::oid FROM pgdist.dist_table t JOIN pg_class c ON c.oid = t.table_oid
                 WHERE c.relnamespace = ANY($1)",
                None,
                &[schemas.to_vec().into()],
            )?
            .map(|row| Ok(row.get(1)?.unwrap_or(pg_sys::InvalidOid)))
            .collect()
    })
}

/// How many placements `node_id` holds, and how many of them are of reference tables.
pub fn placement_counts(node_id: i32) -> Result<(i64, i64), MetadataError> {
    let (all, reference) = Spi::get_two_with_args::<i64, i64>(
        "SELECT count(*), count(*) FILTER (WHERE t.method = 'reference')
         FROM pgdist.placement p JOIN pgdist.shard s USING (shard_id) JOIN pgdist.dist_table t USING (table_oid)
         WHERE p.node_id = $1",
        &[node_id.into()],
    )?;
    Ok((all.unwrap_or_default(), reference.unwrap_or_default()))
}

/// Points the placements of `shard_ids` on node `source` at node `target` (shards moved).
pub fn move_placements(shard_ids: &[i64], source: i32, target: i32) -> Result<(), MetadataError> {
    crate::metadata::cache::invalidate();
    Ok(Spi::run_with_args(
        "UPDATE pgdist.placement SET node_id = $3 WHERE shard_id = ANY ($1) AND node_id = $2",
        &[shard_ids.to_vec().into(), source.into(), target.into()],
    )?)
}

pub fn delete_placements_on(node_id: i32) -> Result<(), MetadataError> {
    crate::metadata::cache::invalidate();
    Ok(Spi::run_with_args(
        "DELETE FROM pgdist.placement WHERE node_id = $1",
        &[node_id.into()],
    )?)
}

/// `(table, shard_id)` of every placement on `node_id`.
pub fn placements_on(node_id: i32) -> Result<Vec<(pg_sys::Oid, i64)>, MetadataError> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT s.table_oid::oid, s.shard_id FROM pgdist.placement p JOIN pgdist.shard s USING (shard_id)
                 WHERE p.node_id = $1",
                None,
                &[node_id.into()],
            )?
            .map(|row| Ok((row.get(1)?.unwrap_or(pg_sys::InvalidOid), row.get(2)?.unwrap_or_default())))
            .collect()
    })
}
