//! Cluster membership, run_on_workers and cancellation, on a real coordinator + 2 workers.

use std::time::{Duration, Instant};

use pgdist_pg_test::compare::{compare, query_text, run_on_both, Comparison};
use pgdist_pg_test::errors::{message, sqlstate};
use pgdist_pg_test::server::{free_ports, pg_bin, Server};
use pgdist_pg_test::{harness, tests, Cluster};

fn main() {
    harness::run(
        || Cluster::start(2),
        tests![
            nodes_lists_the_workers,
            add_node_twice_is_refused,
            add_node_of_a_closed_port_records_nothing,
            add_node_of_the_coordinator_is_refused,
            add_node_without_preloaded_pgdist_records_nothing,
            remove_node_and_add_it_again,
            run_on_workers_runs_everywhere,
            run_on_workers_reports_errors_per_node,
            run_on_workers_survives_a_worker_restart,
            run_on_workers_with_a_worker_down,
            statement_timeout_cancels_remote_work,
            pg_cancel_backend_cancels_remote_work,
            replica_is_matched_to_its_primary,
            differential_helper_catches_differences,
            connections_to_nodes_use_tls_as_node_conninfo_asks,
        ],
    )
}

fn node_count(cluster: &Cluster) -> i64 {
    cluster
        .coordinator_client()
        .query_one("SELECT count(*) FROM pgdist.nodes", &[])
        .unwrap()
        .get(0)
}

fn nodes_lists_the_workers(cluster: &Cluster) {
    let rows = query_text(
        &mut cluster.coordinator_client(),
        "SELECT host, port, role, status, shard_count, last_heartbeat IS NOT NULL, consecutive_failures \
         FROM pgdist.nodes ORDER BY port",
    )
    .unwrap();
    let mut ports: Vec<u16> = cluster.workers.iter().map(|w| w.port).collect();
    ports.sort();
    let expected: Vec<Vec<Option<String>>> = ports
        .iter()
        .map(|port| {
            [
                "127.0.0.1",
                &port.to_string(),
                "primary",
                "up",
                "0",
                "t",
                "0",
            ]
            .iter()
            .map(|v| Some(v.to_string()))
            .collect()
        })
        .collect();
    assert_eq!(rows, expected);
    // add_node created the extension on each worker.
    for worker in &cluster.workers {
        let version: String = worker
            .connect()
            .query_one(
                "SELECT extversion FROM pg_extension WHERE extname = 'pgdist'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(version, "0.1.0");
    }
}

fn add_node_twice_is_refused(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    let port = cluster.workers[0].port as i32;
    let err = client
        .execute("SELECT pgdist.add_node('127.0.0.1', $1)", &[&port])
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42710", "{err:?}");
    assert!(
        message(&err).contains("already in the cluster"),
        "{}",
        message(&err)
    );
    // The same server under another name is recognised by its system identifier.
    let err = client
        .execute("SELECT pgdist.add_node('localhost', $1)", &[&port])
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42710", "{err:?}");
    assert!(
        message(&err).contains("same server as node"),
        "{}",
        message(&err)
    );
    assert_eq!(node_count(cluster), 2);
}

fn add_node_of_a_closed_port_records_nothing(cluster: &Cluster) {
    let port = free_ports(1)[0];
    let err = cluster
        .coordinator_client()
        .execute("SELECT pgdist.add_node('127.0.0.1', $1)", &[&(port as i32)])
        .unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err:?}");
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(message.contains("Connection refused"), "{message}");
    assert_eq!(node_count(cluster), 2);
}

fn add_node_of_the_coordinator_is_refused(cluster: &Cluster) {
    let port = cluster.coordinator.port as i32;
    let err = cluster
        .coordinator_client()
        .execute("SELECT pgdist.add_node('127.0.0.1', $1)", &[&port])
        .unwrap_err();
    assert!(
        message(&err).contains("is this coordinator itself"),
        "{}",
        message(&err)
    );
    assert_eq!(node_count(cluster), 2);
}

fn add_node_without_preloaded_pgdist_records_nothing(cluster: &Cluster) {
    // The reference server has the package installed but does not preload it.
    let port = cluster.reference.port as i32;
    let err = cluster
        .coordinator_client()
        .execute("SELECT pgdist.add_node('127.0.0.1', $1)", &[&port])
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert!(db.message().contains("shared_preload_libraries"), "{err:?}");
    assert!(
        db.detail()
            .unwrap_or_default()
            .contains(&format!("127.0.0.1:{port}")),
        "{err:?}"
    );
    assert_eq!(node_count(cluster), 2);
    let installed: i64 = cluster
        .reference
        .connect()
        .query_one(
            "SELECT count(*) FROM pg_extension WHERE extname = 'pgdist'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(installed, 0);
}

fn remove_node_and_add_it_again(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    let port = cluster.workers[1].port as i32;
    let node_id: i32 = client
        .query_one("SELECT node_id FROM pgdist.nodes WHERE port = $1", &[&port])
        .unwrap()
        .get(0);
    client
        .execute("SELECT pgdist.remove_node($1)", &[&node_id])
        .unwrap();
    assert_eq!(node_count(cluster), 1);
    let on_workers: i64 = client
        .query_one(
            "SELECT count(*) FROM pgdist.run_on_workers('SELECT 1')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(on_workers, 1);
    let new_id: i32 = client
        .query_one("SELECT pgdist.add_node('127.0.0.1', $1)", &[&port])
        .unwrap()
        .get(0);
    assert!(new_id > node_id);
    assert_eq!(node_count(cluster), 2);
}

fn run_on_workers_runs_everywhere(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    let rows = query_text(
        &mut client,
        "SELECT n.port::text = r.result, r.success FROM pgdist.run_on_workers('SHOW port') r \
         JOIN pgdist.nodes n USING (node_id)",
    )
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|row| row == &[Some("t".into()), Some("t".into())]),
        "{rows:?}"
    );

    let rows = query_text(
        &mut client,
        "SELECT success, result FROM pgdist.run_on_workers(\
         'CREATE TABLE rw_made_here (a int); INSERT INTO rw_made_here VALUES (1), (2)')",
    )
    .unwrap();
    assert_eq!(rows, vec![vec![Some("t".into()), Some("OK 2".into())]; 2]);
    for worker in &cluster.workers {
        let count: i64 = worker
            .connect()
            .query_one("SELECT count(*) FROM rw_made_here", &[])
            .unwrap()
            .get(0);
        assert_eq!(count, 2);
    }
    client
        .batch_execute("SELECT * FROM pgdist.run_on_workers('DROP TABLE rw_made_here')")
        .unwrap();
}

fn run_on_workers_reports_errors_per_node(cluster: &Cluster) {
    let rows = query_text(
        &mut cluster.coordinator_client(),
        "SELECT success, result FROM pgdist.run_on_workers('SELECT * FROM no_such_table')",
    )
    .unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(row[0].as_deref(), Some("f"));
        assert!(
            row[1]
                .as_deref()
                .unwrap_or_default()
                .contains("does not exist"),
            "{row:?}"
        );
    }
}

fn run_on_workers_survives_a_worker_restart(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    let all_ok = "SELECT bool_and(success) FROM pgdist.run_on_workers('SELECT 1')";
    assert_eq!(
        query_text(&mut client, all_ok).unwrap(),
        vec![vec![Some("t".into())]]
    );
    // The same session's cached connection to worker 1 dies with the restart.
    cluster.workers[0].ctl("restart");
    let rows = query_text(
        &mut client,
        "SELECT success, result FROM pgdist.run_on_workers('SELECT 1')",
    )
    .unwrap();
    assert_eq!(rows, vec![vec![Some("t".into()), Some("1".into())]; 2]);
}

fn run_on_workers_with_a_worker_down(cluster: &Cluster) {
    let down = &cluster.workers[1];
    down.ctl("stop");
    let started = Instant::now();
    let rows = query_text(
        &mut cluster.coordinator_client(),
        "SELECT n.port, r.success, r.result FROM pgdist.run_on_workers('SELECT 1') r \
         JOIN pgdist.nodes n USING (node_id) ORDER BY n.port = 0",
    );
    down.ctl("start");
    let rows = rows.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    for row in rows {
        if row[0].as_deref() == Some(&down.port.to_string()) {
            assert_eq!(row[1].as_deref(), Some("f"));
            let text = row[2].clone().unwrap_or_default();
            assert!(
                text.contains("could not connect") && text.contains(&down.port.to_string()),
                "{text}"
            );
        } else {
            assert_eq!(row[1..], [Some("t".into()), Some("1".into())]);
        }
    }
}

/// Sessions on `server` running pg_sleep on behalf of pgdist.
fn remote_sleepers(server: &Server) -> i64 {
    server
        .connect()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' \
             AND state = 'active' AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0)
}

fn assert_no_remote_sleepers(cluster: &Cluster) {
    for worker in &cluster.workers {
        assert_eq!(
            remote_sleepers(worker),
            0,
            "pg_sleep still running on {}",
            worker.name
        );
    }
}

fn statement_timeout_cancels_remote_work(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    client
        .batch_execute("SET statement_timeout = '1s'")
        .unwrap();
    let started = Instant::now();
    let err = client
        .batch_execute("SELECT * FROM pgdist.run_on_workers('SELECT pg_sleep(30)')")
        .unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(sqlstate(&err), "57014", "{err:?}");
    assert!(
        message(&err).contains("statement timeout"),
        "{}",
        message(&err)
    );
    assert!(elapsed < Duration::from_millis(2500), "took {elapsed:?}");
    assert_no_remote_sleepers(cluster);
    // The session is still usable, and so are its remote connections.
    client.batch_execute("RESET statement_timeout").unwrap();
    let ok: bool = client
        .query_one(
            "SELECT bool_and(success) FROM pgdist.run_on_workers('SELECT 1')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ok);
}

fn pg_cancel_backend_cancels_remote_work(cluster: &Cluster) {
    let mut client = cluster.coordinator_client();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let runner = std::thread::spawn(move || {
        let started = Instant::now();
        let result =
            client.batch_execute("SELECT * FROM pgdist.run_on_workers('SELECT pg_sleep(30)')");
        (result, started.elapsed())
    });
    // Wait until the sleeps really run on both workers, then cancel from another session.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.workers.iter().any(|w| remote_sleepers(w) == 0) {
        assert!(
            Instant::now() < deadline,
            "the remote pg_sleep never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let cancelled_at = Instant::now();
    cluster
        .coordinator_client()
        .execute("SELECT pg_cancel_backend($1)", &[&pid])
        .unwrap();
    let (result, _) = runner.join().unwrap();
    let err = result.unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{err:?}");
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(2),
        "took {:?}",
        cancelled_at.elapsed()
    );
    assert_no_remote_sleepers(cluster);
}

fn replica_is_matched_to_its_primary(cluster: &Cluster) {
    let primary = &cluster.workers[0];
    let port = free_ports(1)[0];
    let standby_dir = cluster.root().join("standby1");
    std::fs::create_dir_all(&standby_dir).unwrap();
    primary.chown(&standby_dir);
    let out = primary
        .command(pg_bin("pg_basebackup"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "-D",
        ])
        .arg(standby_dir.join("data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let conf = standby_dir.join("data/postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(&format!(
        "port = {port}\nunix_socket_directories = '{}'\n",
        standby_dir.display()
    ));
    std::fs::write(&conf, text).unwrap();
    let mut standby = Server::existing(cluster.root(), "standby1", port);
    standby.start();
    let mut client = cluster.coordinator_client();
    let replica_id: i32 = client
        .query_one(
            "SELECT pgdist.add_node('127.0.0.1', $1, 'replica')",
            &[&(port as i32)],
        )
        .unwrap()
        .get(0);
    let rows = query_text(
        &mut client,
        &format!(
            "SELECT n.role, p.port FROM pgdist.node n JOIN pgdist.node p ON p.node_id = n.primary_node_id \
             WHERE n.node_id = {replica_id}"
        ),
    )
    .unwrap();
    assert_eq!(
        rows,
        vec![vec![Some("replica".into()), Some(primary.port.to_string())]]
    );
    // A standby cannot be added as a primary, a primary cannot be removed while it has replicas.
    let err = client
        .execute("SELECT pgdist.add_node('localhost', $1)", &[&(port as i32)])
        .unwrap_err();
    assert!(message(&err).contains("standby"), "{}", message(&err));
    let primary_id: i32 = client
        .query_one(
            "SELECT node_id FROM pgdist.nodes WHERE port = $1",
            &[&(primary.port as i32)],
        )
        .unwrap()
        .get(0);
    let err = client
        .execute("SELECT pgdist.remove_node($1)", &[&primary_id])
        .unwrap_err();
    assert_eq!(sqlstate(&err), "2BP01", "{err:?}");
    // Replicas do not run operator commands meant for the primaries.
    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM pgdist.run_on_workers('SELECT 1')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
    client
        .execute("SELECT pgdist.remove_node($1)", &[&replica_id])
        .unwrap();
    cluster.extra.lock().unwrap().push(standby);
}

fn differential_helper_catches_differences(cluster: &Cluster) {
    let mut coordinator = cluster.coordinator_client();
    let mut reference = cluster.reference.connect();
    run_on_both(
        &mut coordinator,
        &mut reference,
        "CREATE TABLE diff_check (a int, b text); INSERT INTO diff_check SELECT i, md5(i::text) FROM generate_series(1, 100) i",
    );
    assert_eq!(
        compare(&mut coordinator, &mut reference, "SELECT * FROM diff_check"),
        Comparison::Same
    );
    assert_eq!(
        compare(
            &mut coordinator,
            &mut reference,
            "SELECT a FROM diff_check ORDER BY b LIMIT 5"
        ),
        Comparison::Same
    );
    assert_eq!(
        compare(&mut coordinator, &mut reference, "SELECT 1/0"),
        Comparison::Same
    );
    coordinator
        .batch_execute("DELETE FROM diff_check WHERE a = 7")
        .unwrap();
    // The expected panic is caught here; keep its message out of the test output.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        compare(
            &mut coordinator,
            &mut reference,
            "SELECT count(*) FROM diff_check",
        )
    }));
    std::panic::set_hook(hook);
    assert!(
        caught.is_err(),
        "a differing count must fail the comparison"
    );
    run_on_both(&mut coordinator, &mut reference, "DROP TABLE diff_check");
}

/// Sets `pgdist.node_conninfo` on the coordinator (new sessions open new connections with it).
fn set_node_conninfo(cluster: &Cluster, value: &str) {
    set_and_reload(
        &cluster.coordinator,
        &[&format!(
            "ALTER SYSTEM SET pgdist.node_conninfo = '{value}'"
        )],
    );
}

/// Runs each ALTER SYSTEM statement (one per transaction) on `server` and reloads it.
fn set_and_reload(server: &Server, statements: &[&str]) {
    let mut client = server.connect();
    for sql in statements {
        client.batch_execute(sql).unwrap();
    }
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(300));
}

/// Whether the worker's sessions for coordinator backend `pid` are encrypted.
fn sessions_with_ssl(worker: &Server, pid: i32) -> Vec<bool> {
    worker
        .connect()
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name LIKE 'pgdist:%:' || $1",
            &[&pid.to_string()],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// `sslmode` and friends in `pgdist.node_conninfo` work as for libpq: `verify-full` encrypts
/// and checks the node's certificate, a certificate nobody vouches for is refused with a clear
/// error, `require` refuses a node without TLS, and cancel requests still reach the nodes.
fn connections_to_nodes_use_tls_as_node_conninfo_asks(cluster: &Cluster) {
    let worker = &cluster.workers[0];
    // A self-signed certificate for 127.0.0.1: the node's, and the one authority to trust.
    let cert = worker.dir.join("node.crt");
    let key = worker.dir.join("node.key");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    worker.chown(&worker.dir);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let stranger = worker.dir.join("stranger.crt");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=stranger", "-keyout", "/dev/null", "-out"])
        .arg(&stranger)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    set_and_reload(
        worker,
        &[
            "ALTER SYSTEM SET ssl = on",
            &format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()),
            &format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
        ],
    );
    let on_worker = "SELECT count(*) FROM pgdist.run_on_workers('SELECT 1') WHERE success";

    set_node_conninfo(
        cluster,
        &format!("sslmode=verify-full sslrootcert={}", cert.display()),
    );
    let mut client = cluster.coordinator_client();
    assert_eq!(
        query_text(&mut client, on_worker).unwrap(),
        vec![vec![Some("1".into())]],
        "only the worker with TLS answers"
    );
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    assert_eq!(sessions_with_ssl(worker, pid), vec![true]);
    // A cancel request reaches a command running over TLS.
    client
        .batch_execute("SET statement_timeout = '300ms'")
        .unwrap();
    let started = Instant::now();
    let err = client
        .batch_execute("SELECT * FROM pgdist.run_on_workers('SELECT pg_sleep(30)')")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(client);

    set_node_conninfo(
        cluster,
        &format!("sslmode=verify-ca sslrootcert={}", stranger.display()),
    );
    let failures = query_text(
        &mut cluster.coordinator_client(),
        "SELECT result FROM pgdist.run_on_workers('SELECT 1') WHERE NOT success",
    )
    .unwrap();
    assert_eq!(failures.len(), 2, "{failures:?}");
    let text = format!("{failures:?}");
    assert!(text.contains("certificate verify failed"), "{text}");

    set_node_conninfo(cluster, "sslmode=require");
    assert_eq!(
        query_text(&mut cluster.coordinator_client(), on_worker).unwrap(),
        vec![vec![Some("1".into())]],
        "the worker without TLS is refused"
    );
    set_node_conninfo(cluster, "sslmode=prefer");
    assert_eq!(
        query_text(&mut cluster.coordinator_client(), on_worker).unwrap(),
        vec![vec![Some("2".into())]]
    );
    set_node_conninfo(cluster, "");
    set_and_reload(worker, &["ALTER SYSTEM RESET ssl"]);
}
