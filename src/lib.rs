//! pgdist: a PostgreSQL extension that turns stock PostgreSQL servers into one sharded database.
//!
//! `_PG_init` only checks that the library is preloaded and then calls each module's `init()`;
//! everything else lives in the modules below (see `docs/architecture.md`).

use pgrx::prelude::*;

pub mod cluster;
pub mod ddl;
pub mod distribution;
pub mod error;
pub mod executor;
pub mod gucs;
pub mod maintenance;
pub mod metadata;
pub mod placement;
pub mod planner;
pub mod remote;
pub mod transaction;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/views.sql", name = "views", finalize);
pgrx::extension_sql_file!(
    "../sql/subqueries.sql",
    name = "subqueries",
    requires = ["bootstrap"]
);
pgrx::extension_sql_file!(
    "../sql/partial_aggregates.sql",
    name = "partial_aggregates",
    requires = ["bootstrap"]
);

/// The version this library implements; `add_node` requires the same version on every worker.
pub const EXTENSION_VERSION: &str = env!("CARGO_PKG_VERSION");

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a global that the postmaster sets while loading preload libraries.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if !preloading {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pgdist must be loaded via shared_preload_libraries",
            "_PG_init",
        )
        .set_hint(
            "Add 'pgdist' to shared_preload_libraries in postgresql.conf and restart the server.",
        )
        .report(PgLogLevel::ERROR);
    }
    gucs::init();
    transaction::init();
    ddl::init();
    metadata::cache::init();
    planner::init();
    executor::init();
    maintenance::init();
}

/// Required by `cargo pgrx test`: the server it starts must preload pgdist like every real node.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pgdist'",
            "max_prepared_transactions = 10",
        ]
    }
}
