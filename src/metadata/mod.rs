//! Catalog access: the coordinator's own tables in schema `pgdist`, read and written via SPI.

pub mod cache;
pub mod nodes;
pub mod tables;

use pgrx::{pg_sys, PgSqlErrorCode};

use crate::error::PgError;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("pgdist catalog access failed: {0}")]
    Spi(#[from] pgrx::spi::Error),
}

impl PgError for MetadataError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR
    }
}

/// The oids a catalog query with one oid parameter (`$1`) returns in its first column.
pub fn oids(sql: &str, oid: pg_sys::Oid) -> Result<Vec<pg_sys::Oid>, MetadataError> {
    Ok(pgrx::spi::Spi::connect(|client| {
        client
            .select(sql, None, &[oid.into()])?
            .map(|row| row.get::<pg_sys::Oid>(1))
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })?
    .into_iter()
    .flatten()
    .collect())
}

/// The leaf partitions of `relid` when it is a partitioned table (none otherwise).
pub fn leaf_partitions(relid: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    // SAFETY: a catalog lookup of a table the statement has locked.
    let partitioned = unsafe { pg_sys::get_rel_relkind(relid) }
        == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char;
    if !partitioned {
        return Vec::new();
    }
    oids(
        "SELECT relid FROM pg_catalog.pg_partition_tree($1) WHERE isleaf ORDER BY relid",
        relid,
    )
    .unwrap_or_else(|err| crate::error::raise(err))
}

/// Runs `f` — reads or writes of pgdist's own catalog — as the bootstrap superuser.
///
/// The catalog is pgdist's bookkeeping, not user data: every role's queries are planned and
/// committed with it (which tables are distributed, where their shards are, the commit
/// decisions of two-phase commit), whatever that role may read itself. The user id is switched
/// back when `f` returns or fails (an abort would restore it too).
pub fn as_catalog_owner<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores the user id and security context saved below.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
        }
    }
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: plain getters and setters of backend state; the local-userid flag keeps SET ROLE
    // and the like out while it is in force, as for SECURITY DEFINER functions.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let _restore = Restore(user, context);
    f()
}
