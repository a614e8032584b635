//! Catalog access: the coordinator's own tables in schema `pgdist`, read and written via SPI.

pub mod cache;
pub mod nodes;
pub mod tables;

use pgrx::PgSqlErrorCode;

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
