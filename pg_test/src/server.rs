//! One PostgreSQL server: initdb, configure, start, stop, kill, connect.
//!
//! When the tests run as root the server runs as the unprivileged `postgres` OS user
//! (PostgreSQL refuses to run as root); its directory is made theirs.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Where the PostgreSQL 15 server binaries are (override with PGDIST_PG_BIN).
pub fn pg_bin(tool: &str) -> PathBuf {
    let dir =
        std::env::var("PGDIST_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    Path::new(&dir).join(tool)
}

/// The OS user servers run as: None for "whoever we are", Some((uid, gid)) when we are root.
fn server_os_user() -> Option<(u32, u32)> {
    let id = |flag: &str, user: Option<&str>| -> Option<u32> {
        let out = Command::new("id").arg(flag).args(user).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u", None)? != 0 {
        return None;
    }
    let user = std::env::var("PGDIST_TEST_OS_USER").unwrap_or_else(|_| "postgres".into());
    Some((
        id("-u", Some(&user)).expect("running as root needs an unprivileged OS user 'postgres'"),
        id("-g", Some(&user)).expect("no group for the postgres OS user"),
    ))
}

/// Free loopback ports, chosen by the kernel, all distinct.
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("no free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("bound socket has an address").port())
        .collect()
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|err| panic!("{what}: could not run: {err}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub struct Server {
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
    os_user: Option<(u32, u32)>,
    running: bool,
}

impl Server {
    /// initdb a new server in `root/name`, listening on `port`; `preload_pgdist` puts pgdist in
    /// shared_preload_libraries (a plain reference server has no pgdist at all).
    pub fn create(root: &Path, name: &str, port: u16, preload_pgdist: bool) -> Server {
        let dir = root.join(name);
        let os_user = server_os_user();
        std::fs::create_dir_all(&dir).expect("create server directory");
        let server = Server {
            name: name.into(),
            port,
            dir,
            os_user,
            running: false,
        };
        server.chown(&server.dir);
        check(
            &format!("initdb {name}"),
            server
                .command(pg_bin("initdb"))
                .arg("-D")
                .arg(server.data())
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
                .args(["--locale=C.UTF-8", "--no-sync"])
                .output(),
        );
        // fsync = off is safe for the crash tests, which kill processes, not the machine; a
        // commit must still reach the OS before it is acknowledged (synchronous_commit = on),
        // or a killed server would lose commits it reported done.
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_connections = 100\nmax_prepared_transactions = 20\nwal_level = logical\n\
             max_wal_senders = 10\nmax_replication_slots = 10\nfsync = off\n\
             full_page_writes = off\nsynchronous_commit = on\nshared_buffers = 64MB\n\
             log_min_messages = warning\nlog_line_prefix = '%m [%p] %q%a '\n",
            server.dir.display()
        );
        if preload_pgdist {
            conf.push_str("shared_preload_libraries = 'pgdist'\n");
        }
        let conf_path = server.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        server
    }

    /// A server whose data directory already exists (e.g. made by pg_basebackup).
    pub fn existing(root: &Path, name: &str, port: u16) -> Server {
        let server = Server {
            name: name.into(),
            port,
            dir: root.join(name),
            os_user: server_os_user(),
            running: false,
        };
        server.chown(&server.dir);
        server
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// A command that runs as the server's OS user.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        if let Some((uid, gid)) = self.os_user {
            cmd.uid(uid).gid(gid);
        }
        // Keep Rust backtraces out of the servers' error messages.
        cmd.env_remove("PGDATA")
            .env_remove("RUST_BACKTRACE")
            .env("HOME", &self.dir);
        cmd
    }

    /// Makes `path` (recursively) owned by the server's OS user.
    pub fn chown(&self, path: &Path) {
        if let Some((uid, gid)) = self.os_user {
            check(
                "chown",
                Command::new("chown")
                    .arg("-R")
                    .arg(format!("{uid}:{gid}"))
                    .arg(path)
                    .output(),
            );
        }
    }

    pub fn start(&mut self) {
        let out = self
            .command(pg_bin("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "start"])
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            panic!(
                "could not start {}: {:?}\n--- server log ---\n{log}",
                self.name, out
            );
        }
        self.running = true;
    }

    /// Stops the server (fast shutdown: active sessions are ended).
    pub fn stop(&mut self) {
        self.pg_ctl_stop("fast");
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        if self.running {
            let _ = self
                .command(pg_bin("pg_ctl"))
                .arg("-D")
                .arg(self.data())
                .args(["-m", mode, "-w", "-t", "60", "stop"])
                .output();
            self.running = false;
        }
    }

    /// `pg_ctl stop|start|restart` (fast mode, waiting), for tests that take a node down and
    /// bring it back; panics if pg_ctl fails.
    pub fn ctl(&self, action: &str) {
        let out = self
            .command(pg_bin("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "fast", "-l"])
            .arg(self.log_path())
            .arg(action)
            .output();
        assert!(
            matches!(&out, Ok(o) if o.status.success()),
            "pg_ctl {action} {}: {out:?}",
            self.name
        );
    }

    /// The postmaster's pid, from postmaster.pid.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Kills the postmaster with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
        }
        // Children notice their postmaster is gone; wait until the port is free again.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.running = false;
    }

    /// Kills the postmaster and every process it started with SIGKILL, as a machine crash
    /// would, and waits until they are all gone (so the server can start again at once).
    pub fn crash(&self) {
        let Some(postmaster) = self.postmaster_pid() else {
            return;
        };
        let mut pids = vec![postmaster];
        pids.extend(children_of(postmaster));
        for pid in &pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && pids
                .iter()
                .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    pub fn connect(&self) -> postgres::Client {
        postgres::Client::connect(&self.conninfo(), postgres::NoTls)
            .unwrap_or_else(|err| panic!("connect to {}: {err}", self.name))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.pg_ctl_stop("immediate");
    }
}

/// The pids whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // "pid (comm) state ppid ...": comm may contain spaces, so skip past ')'.
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}
