//! Test support for pgdist: real PostgreSQL 15 servers on loopback ports, a coordinator with
//! workers plus a plain reference server, differential comparison, and a tiny test runner that
//! shares one cluster per test binary and always tears it down.

pub mod cluster;
pub mod compare;
pub mod errors;
pub mod harness;
pub mod server;

pub use cluster::Cluster;
pub use server::Server;
