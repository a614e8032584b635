//! A pgdist cluster for tests: a coordinator and N workers with pgdist preloaded, plus a plain
//! reference server, all in one temporary directory that is removed when the cluster is dropped
//! (also when a test panics).

use std::path::PathBuf;

use crate::server::{free_ports, Server};

/// The temporary directory of a cluster; removed after every server in it has stopped.
struct TempRoot(PathBuf);

impl Drop for TempRoot {
    fn drop(&mut self) {
        // PGDIST_TEST_KEEP=1 keeps data directories and logs for a post-mortem.
        if std::env::var_os("PGDIST_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub struct Cluster {
    pub coordinator: Server,
    pub workers: Vec<Server>,
    /// A plain PostgreSQL without pgdist, for differential tests.
    pub reference: Server,
    /// Servers a test added later (standbys); stopped with the cluster.
    pub extra: std::sync::Mutex<Vec<Server>>,
    // Declared last: dropped after the servers have stopped.
    root: TempRoot,
}

impl Cluster {
    /// Starts a coordinator, `worker_count` workers and a reference server, creates pgdist on the
    /// coordinator and adds the workers.
    pub fn start(worker_count: usize) -> Cluster {
        let root = TempRoot(std::env::temp_dir().join(format!(
            "pgdist-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or_default()
        )));
        std::fs::create_dir_all(&root.0).expect("create cluster directory");
        let ports = free_ports(worker_count + 2);
        let mut names = vec!["coordinator".to_string(), "reference".to_string()];
        names.extend((1..=worker_count).map(|i| format!("worker{i}")));
        // initdb is the slow part: run them side by side.
        let mut servers: Vec<Server> = std::thread::scope(|scope| {
            let handles: Vec<_> = names
                .iter()
                .zip(&ports)
                .map(|(name, port)| {
                    let root = &root.0;
                    scope.spawn(move || {
                        let mut server = Server::create(root, name, *port, name != "reference");
                        server.start();
                        server
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("server start-up panicked"))
                .collect()
        });
        let workers = servers.split_off(2);
        let reference = servers.pop().expect("reference server");
        let coordinator = servers.pop().expect("coordinator server");
        let cluster = Cluster {
            coordinator,
            workers,
            reference,
            extra: Default::default(),
            root,
        };
        let mut client = cluster.coordinator.connect();
        client
            .batch_execute("CREATE EXTENSION pgdist")
            .expect("CREATE EXTENSION pgdist");
        for worker in &cluster.workers {
            client
                .execute(
                    "SELECT pgdist.add_node('127.0.0.1', $1)",
                    &[&(worker.port as i32)],
                )
                .unwrap_or_else(|err| panic!("add_node {}: {err:?}", worker.name));
        }
        cluster
    }

    pub fn root(&self) -> &std::path::Path {
        &self.root.0
    }

    pub fn coordinator_client(&self) -> postgres::Client {
        self.coordinator.connect()
    }

    /// The worker listening on `port`.
    pub fn worker_on(&self, port: u16) -> &Server {
        self.workers
            .iter()
            .find(|w| w.port == port)
            .unwrap_or_else(|| panic!("no worker on port {port}"))
    }
}
