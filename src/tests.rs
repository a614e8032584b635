//! In-server tests (`cargo pgrx test pg15`): what can be checked inside one PostgreSQL server.
//! Multi-node behaviour is tested against real clusters in `pg_test/`.

use pgrx::prelude::*;

#[pg_test]
fn create_extension_makes_the_catalog() {
    let nodes = Spi::get_one::<i64>("SELECT count(*) FROM pgdist.nodes").unwrap();
    assert_eq!(nodes, Some(0));
    let schema = Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgdist')",
    )
    .unwrap();
    assert_eq!(schema, Some(true));
}

#[pg_test]
fn settings_are_registered() {
    let timeout = Spi::get_one::<String>("SHOW pgdist.node_connect_timeout").unwrap();
    assert_eq!(timeout.as_deref(), Some("5s"));
    let conninfo = Spi::get_one::<String>("SHOW pgdist.node_conninfo").unwrap();
    assert_eq!(conninfo.as_deref(), Some(""));
}

#[pg_test(error = "could not connect to 127.0.0.1:1: error connecting to server: Connection refused (os error 111)")]
fn add_node_of_a_closed_port_fails_clearly() {
    Spi::run("SELECT pgdist.add_node('127.0.0.1', 1)").unwrap();
}

#[pg_test(error = "role must be 'primary' or 'replica', not \"leader\"")]
fn add_node_rejects_unknown_roles() {
    Spi::run("SELECT pgdist.add_node('127.0.0.1', 5432, 'leader')").unwrap();
}

#[pg_test(error = "node 42 does not exist")]
fn remove_node_of_an_unknown_node_fails() {
    Spi::run("SELECT pgdist.remove_node(42)").unwrap();
}

#[pg_test]
fn run_on_workers_without_workers_returns_nothing() {
    let rows = Spi::get_one::<i64>("SELECT count(*) FROM pgdist.run_on_workers('SELECT 1')").unwrap();
    assert_eq!(rows, Some(0));
}
