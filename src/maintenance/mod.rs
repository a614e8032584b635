//! The maintenance daemon: one background worker per database with pgdist that resolves
//! in-doubt two-phase commits and breaks distributed deadlocks.
//!
//! Nothing needs configuring. When the server starts, the launcher ([`pgdist_launcher_main`], a
//! background worker registered by `_PG_init`) starts a daemon in every database that accepts
//! connections; a daemon whose database has no pgdist exits at once. Later, the first
//! transaction of a backend that loads pgdist's catalog ([`ensure_running`]) checks at its
//! commit ([`at_transaction_end`]; earlier, a `CREATE EXTENSION` in progress would not be
//! visible to the daemon yet) whether the database's daemon runs — the daemon holds a
//! session-level advisory lock for its database, so "runs" means "the lock is taken" — and
//! registers it if not. The daemon connects as the bootstrap superuser, which therefore
//! needs to be able to connect to every node like the users do. It exits when pgdist is dropped
//! from its database, and `DROP DATABASE` stops it first ([`stop_for_database`]). An ERROR in a
//! round ends the process; PostgreSQL starts it again after [`RESTART_AFTER`].
//!
//! Every round, each task runs when its interval has passed: 2PC recovery every
//! `pgdist.recovery_interval`, deadlock detection every `pgdist.deadlock_detection_interval`.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use crate::transaction::{deadlock, recovery};

/// The daemon's backend type, as `pg_stat_activity.backend_type` shows it.
pub const BACKEND_TYPE: &str = "pgdist maintenance";
/// How soon PostgreSQL restarts a daemon that failed.
const RESTART_AFTER: Duration = Duration::from_secs(5);
/// The advisory lock key (classid, objid) the daemon holds in its database.
const LOCK_KEY: (u32, u32) = (0x7067_6469, 1);

thread_local! {
    /// This backend made sure the daemon runs.
    static CHECKED: Cell<bool> = const { Cell::new(false) };
    /// The current transaction loaded pgdist's catalog: check at commit (in this database).
    static WANTED: RefCell<Option<String>> = const { RefCell::new(None) };
}

pub fn init() {
    deadlock::init_shared_memory();
    BackgroundWorkerBuilder::new("pgdist maintenance launcher")
        .set_type("pgdist maintenance launcher")
        .set_library("pgdist")
        .set_function("pgdist_launcher_main")
        .enable_spi_access()
        .set_restart_time(None)
        .load();
}

fn daemon_lock() -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        // SAFETY: MyDatabaseId is set once the backend is connected to a database.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: LOCK_KEY.0,
        locktag_field3: LOCK_KEY.1,
        // Like pg_advisory_lock(int4, int4).
        locktag_field4: 2,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

/// Takes the daemon lock for the session without waiting; false when someone holds it.
fn try_take_daemon_lock() -> bool {
    let tag = daemon_lock();
    // SAFETY: a session-level advisory lock on a tag we own; dontWait never sleeps.
    let result = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, true, true) };
    result != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Asks for this database's daemon to be started at commit unless it runs already. Called when
/// a backend loads pgdist's catalog; cheap once the backend has checked.
pub fn ensure_running() {
    if !CHECKED.get() && WANTED.with_borrow(Option::is_none) {
        WANTED.set(Some(crate::cluster::current_database_name()));
    }
}

/// At the end of a transaction: start the daemon if [`ensure_running`] asked for it and the
/// transaction committed.
pub fn at_transaction_end(committed: bool) {
    if let (Some(database), true) = (WANTED.take(), committed) {
        CHECKED.set(true);
        start_unless_running(&database);
    }
}

fn start_unless_running(database: &str) {
    // SAFETY: plain reads of backend state.
    let (standby, is_worker) = unsafe {
        (
            pg_sys::RecoveryInProgress(),
            !pg_sys::MyBgworkerEntry.is_null(),
        )
    };
    if standby || is_worker || !try_take_daemon_lock() {
        return;
    }
    let tag = daemon_lock();
    // SAFETY: releases the session lock taken just above.
    unsafe { pg_sys::LockRelease(&tag, pg_sys::ExclusiveLock as i32, true) };
    // SAFETY: MyDatabaseId is set once the backend is connected to a database.
    let started = daemon(unsafe { pg_sys::MyDatabaseId }).load_dynamic();
    if started.is_err() {
        pgrx::log!(
            "pgdist: could not start the maintenance daemon for database {database}; \
             raise max_worker_processes"
        );
    }
}

/// The daemon of one database, ready to be registered.
fn daemon(database: pg_sys::Oid) -> BackgroundWorkerBuilder {
    BackgroundWorkerBuilder::new(&format!(
        "pgdist maintenance daemon (database {})",
        database.to_u32()
    ))
    .set_type(BACKEND_TYPE)
    .set_library("pgdist")
    .set_function("pgdist_maintenance_main")
    .enable_spi_access()
    .set_argument(Some(pg_sys::Datum::from(database.to_u32())))
    .set_restart_time(Some(RESTART_AFTER))
}

/// The databases a daemon can connect to: not templates, accepting connections, not left
/// half-dropped. Read from the shared catalog, since the launcher has no database.
fn connectable_databases() -> Vec<pg_sys::Oid> {
    let mut databases = Vec::new();
    // SAFETY: a catalog heap scan inside the caller's transaction, as autovacuum's launcher
    // does; each tuple is read while the scan holds its buffer.
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let relation = pg_sys::table_open(pg_sys::DatabaseRelationId, lock);
        let scan = pg_sys::table_beginscan_catalog(relation, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let database = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            // -2 marks a database whose DROP was interrupted.
            if database.datallowconn && !database.datistemplate && database.datconnlimit != -2 {
                databases.push(database.oid);
            }
        }
        pg_sys::heap_endscan(scan);
        pg_sys::table_close(relation, lock);
    }
    databases
}

/// The launcher's entry point: once the server accepts connections, start the daemon of every
/// database (one at a time, so that a server with many databases does not run out of worker
/// slots), so that in-doubt transactions are resolved after a restart before anyone asks.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pgdist_launcher_main(_argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    let databases = BackgroundWorker::transaction(connectable_databases);
    // SAFETY: a plain read of this process's pid.
    let launcher = unsafe { pg_sys::MyProcPid };
    for database in databases {
        let mut attempts = 0;
        loop {
            match daemon(database).set_notify_pid(launcher).load_dynamic() {
                Ok(started) => {
                    let _ = started.wait_for_startup();
                    break;
                }
                Err(_) if attempts < 60 => {
                    attempts += 1;
                    if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1)))
                        || BackgroundWorker::sigterm_received()
                    {
                        return;
                    }
                }
                Err(_) => {
                    pgrx::log!(
                        "pgdist: could not start the maintenance daemon for database {}; \
                         raise max_worker_processes",
                        database.to_u32()
                    );
                    break;
                }
            }
        }
    }
}

/// `DROP DATABASE` waits for every session of the database to end: stop its daemon first.
pub fn stop_for_database(database: &str) {
    let pids = Spi::connect(|client| {
        client
            .select(
                "SELECT pid FROM pg_catalog.pg_stat_activity WHERE datname = $1 AND backend_type = $2",
                None,
                &[database.into(), BACKEND_TYPE.into()],
            )?
            .map(|row| row.get::<i32>(1))
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_default();
    for pid in pids.into_iter().flatten() {
        // SAFETY: SIGTERM asks a background worker to exit; the pid belongs to one of ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// True when the pgdist extension is installed in the daemon's database.
fn installed() -> bool {
    // SAFETY: a syscache lookup by name inside the round's transaction.
    unsafe { pg_sys::get_extension_oid(c"pgdist".as_ptr(), true) != pg_sys::InvalidOid }
}

/// A task that runs every `interval()` (never when it is None).
struct Periodic {
    interval: fn() -> Option<Duration>,
    next: Instant,
    run: fn(),
}

impl Periodic {
    fn due(&self, now: Instant) -> bool {
        (self.interval)().is_some() && now >= self.next
    }
}

/// The daemon's entry point (`bgw_function_name`); the argument is the database oid.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pgdist_maintenance_main(argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = pg_sys::Oid::from(argument.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    let unique = BackgroundWorker::transaction(try_take_daemon_lock);
    if !unique {
        return;
    }
    let start = Instant::now();
    let mut rounds = 0u64;
    let mut tasks = [
        Periodic {
            interval: crate::gucs::recovery_interval,
            next: start,
            run: || {
                let resolved = recovery::recover();
                if resolved > 0 {
                    pgrx::log!("pgdist: recovered {resolved} prepared transactions");
                }
            },
        },
        Periodic {
            interval: crate::gucs::statistics_interval,
            next: start,
            run: || {
                if let Err(err) = crate::distribution::statistics::refresh_row_estimates() {
                    pgrx::log!("pgdist: could not refresh row estimates: {err}");
                }
            },
        },
        Periodic {
            interval: crate::gucs::deadlock_detection_interval,
            next: start,
            run: || {
                deadlock::detect();
            },
        },
    ];
    loop {
        let now = Instant::now();
        let mut keep_going = true;
        for task in tasks.iter_mut().filter(|t| t.due(now)) {
            let run = task.run;
            keep_going = BackgroundWorker::transaction(move || {
                if !installed() {
                    return false;
                }
                run();
                true
            });
            if !keep_going {
                break;
            }
            task.next = Instant::now() + (task.interval)().unwrap_or_default();
        }
        if !keep_going {
            // The launcher starts a daemon in every database; most have no pgdist.
            if rounds > 0 {
                pgrx::log!("pgdist: extension dropped, maintenance daemon exits");
            }
            return;
        }
        rounds += 1;
        let sleep = tasks
            .iter()
            .filter(|t| (t.interval)().is_some())
            .map(|t| t.next.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(Duration::from_secs(60))
            .max(Duration::from_millis(10));
        if !BackgroundWorker::wait_latch(Some(sleep)) {
            return;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads the configuration files, as every backend does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            // New intervals apply from now on.
            for task in tasks.iter_mut() {
                task.next = task
                    .next
                    .min(Instant::now() + (task.interval)().unwrap_or_default());
            }
        }
    }
}
