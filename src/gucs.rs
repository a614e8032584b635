//! Every `pgdist.*` setting: private statics, registration in `init()`, typed accessors.

use std::ffi::CString;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

static NODE_CONNINFO: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static LOG_REMOTE_COMMANDS: GucSetting<bool> = GucSetting::<bool>::new(false);
static CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);
static ENABLE_DDL_PROPAGATION: GucSetting<bool> = GucSetting::<bool>::new(true);
static MAX_CONNECTIONS_PER_NODE: GucSetting<i32> = GucSetting::<i32>::new(4);
static SHARD_COUNT: GucSetting<i32> = GucSetting::<i32>::new(32);
static REPLICATION_FACTOR: GucSetting<i32> = GucSetting::<i32>::new(1);
static RECOVERY_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
static DEADLOCK_DETECTION_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
static STATISTICS_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
static DEBUG_PAUSE_AT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn init() {
    GucRegistry::define_int_guc(
        c"pgdist.max_connections_per_node",
        c"Connections one query may use per node to run its fragments in parallel.",
        c"",
        &MAX_CONNECTIONS_PER_NODE,
        1,
        1000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pgdist.enable_ddl_propagation",
        c"Applies DDL on distributed tables to their shards too.",
        c"Turn off only while restoring a coordinator dump whose shards already exist on the workers.",
        &ENABLE_DDL_PROPAGATION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgdist.shard_count",
        c"Number of shards of a new hash-distributed table when shard_count is not given.",
        c"",
        &SHARD_COUNT,
        1,
        64_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgdist.replication_factor",
        c"Number of placements of each shard of a new distributed table when not given.",
        c"",
        &REPLICATION_FACTOR,
        1,
        100,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pgdist.node_conninfo",
        c"Extra libpq-style parameters for connections to worker nodes.",
        c"Space-separated key=value pairs (for example 'sslmode=disable passfile=/etc/pgdist/pgpass') \
          added to every connection the coordinator opens to a node. host, port, dbname and user \
          are set by pgdist.",
        &NODE_CONNINFO,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pgdist.log_remote_commands",
        c"Logs every command sent to a worker node (at LOG level).",
        c"",
        &LOG_REMOTE_COMMANDS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgdist.recovery_interval",
        c"How often the maintenance daemon resolves two-phase commits left in doubt by a crash.",
        c"-1 turns automatic recovery off (pgdist.recover_prepared_transactions() still works).",
        &RECOVERY_INTERVAL_MS,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pgdist.statistics_interval",
        c"How often the maintenance daemon asks the nodes how many rows each distributed table has.",
        c"The planner sizes scans and joins by these numbers. -1 turns it off (pgdist.refresh_row_estimates() still works).",
        &STATISTICS_INTERVAL_MS,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pgdist.deadlock_detection_interval",
        c"How often the maintenance daemon looks for deadlocks that span nodes.",
        c"Waits shorter than deadlock_timeout are not considered. -1 turns detection off.",
        &DEADLOCK_DETECTION_INTERVAL_MS,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"pgdist.debug_pause_at",
        c"Fault injection for tests: pause a committing transaction at this point.",
        c"'after_prepare' (participants prepared, decision not yet committed) or \
          'before_commit_prepared' (committed locally, COMMIT PREPARED not yet sent); \
          append ':<ms>' to pause that long instead of 60 s.",
        &DEBUG_PAUSE_AT,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_int_guc(
        c"pgdist.node_connect_timeout",
        c"How long to wait for a connection to a node to be established.",
        c"",
        &CONNECT_TIMEOUT_MS,
        100,
        600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
}

/// Pauses when `pgdist.debug_pause_at` names `point` — for 60 s, or `point:<ms>` for that long
/// (crash tests kill a process meanwhile).
pub fn debug_pause(point: &str) {
    let Some(value) = DEBUG_PAUSE_AT.get() else {
        return;
    };
    let value = value.to_string_lossy();
    let (name, ms) = value.split_once(':').unwrap_or((&value, "60000"));
    if name == point {
        pgrx::log!("pgdist: pausing at {point} (pgdist.debug_pause_at)");
        std::thread::sleep(std::time::Duration::from_millis(
            ms.parse().unwrap_or(60_000),
        ));
    }
}

/// The `pgdist.node_conninfo` setting, or an empty string.
pub fn node_conninfo() -> String {
    NODE_CONNINFO
        .get()
        .map(|value| value.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn enable_ddl_propagation() -> bool {
    ENABLE_DDL_PROPAGATION.get()
}

pub fn max_connections_per_node() -> i32 {
    MAX_CONNECTIONS_PER_NODE.get()
}

pub fn shard_count() -> i32 {
    SHARD_COUNT.get()
}

pub fn replication_factor() -> i32 {
    REPLICATION_FACTOR.get()
}

pub fn log_remote_commands() -> bool {
    LOG_REMOTE_COMMANDS.get()
}

/// A `-1 = off` millisecond interval setting.
fn interval(setting: &GucSetting<i32>) -> Option<std::time::Duration> {
    let ms = setting.get();
    (ms >= 0).then(|| std::time::Duration::from_millis(ms as u64))
}

pub fn recovery_interval() -> Option<std::time::Duration> {
    interval(&RECOVERY_INTERVAL_MS)
}

pub fn statistics_interval() -> Option<std::time::Duration> {
    interval(&STATISTICS_INTERVAL_MS)
}

pub fn deadlock_detection_interval() -> Option<std::time::Duration> {
    interval(&DEADLOCK_DETECTION_INTERVAL_MS)
}

pub fn node_connect_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(CONNECT_TIMEOUT_MS.get().max(1) as u64)
}

/// In-server tests of the settings.
#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn settings_are_registered() {
        let timeout = Spi::get_one::<String>("SHOW pgdist.node_connect_timeout").unwrap();
        assert_eq!(timeout.as_deref(), Some("5s"));
        let conninfo = Spi::get_one::<String>("SHOW pgdist.node_conninfo").unwrap();
        assert_eq!(conninfo.as_deref(), Some(""));
    }
}
