//! Per-backend cache of which relations are distributed or reference tables.
//!
//! Planning must not read the catalog for every query, so the set is loaded once and dropped
//! when a relcache invalidation names the catalog table `pgdist.dist_table` (every change pgdist
//! makes to it sends one, see [`invalidate`]), one of the cached tables, or everything.
//! Databases without pgdist pay one syscache lookup per planned query. The catalog is read in
//! the latest snapshot (`read_latest`), not the statement's.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::prelude::*;

use crate::metadata::tables::{self, DistTable, Placement};
use crate::metadata::MetadataError;

struct Loaded {
    catalog_relid: pg_sys::Oid,
    tables: HashMap<pg_sys::Oid, DistTable>,
    /// Placements per table, read on first use.
    placements: HashMap<pg_sys::Oid, Rc<[Placement]>>,
}

thread_local! {
    static CACHE: RefCell<Option<Loaded>> = const { RefCell::new(None) };
    static LOADING: Cell<bool> = const { Cell::new(false) };
}

pub fn init() {
    // SAFETY: registering a plain function once, from _PG_init.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        )
    };
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    CACHE.with_borrow_mut(|cache| {
        let stale = match cache {
            None => false,
            Some(loaded) => {
                relid == pg_sys::InvalidOid
                    || relid == loaded.catalog_relid
                    || loaded.tables.contains_key(&relid)
            }
        };
        if stale {
            *cache = None;
        }
    });
}

/// The oid of `pgdist.dist_table`, or None where pgdist is not installed.
/// The catalog table whose invalidation means pgdist's metadata changed.
pub fn catalog_relid() -> Option<pg_sys::Oid> {
    // SAFETY: syscache lookups by name; both return InvalidOid when nothing matches.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"pgdist".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return None;
        }
        let relid = pg_sys::get_relname_relid(c"dist_table".as_ptr(), namespace);
        (relid != pg_sys::InvalidOid).then_some(relid)
    }
}

/// Runs `f` on the cached set of distributed tables (empty where pgdist is not installed).
pub fn with_tables<R>(f: impl FnOnce(&HashMap<pg_sys::Oid, DistTable>) -> R) -> R {
    let empty = HashMap::new();
    // SAFETY: a plain getter of backend state.
    if LOADING.get() || !unsafe { pg_sys::IsTransactionState() } {
        return f(&empty);
    }
    let loaded = CACHE.with_borrow(|cache| cache.is_some());
    if !loaded {
        let Some(catalog_relid) = catalog_relid() else {
            return f(&empty);
        };
        crate::maintenance::ensure_running();
        let result = {
            // Reset also when loading fails (a cancel, an error): a flag left set would make
            // every later query of this backend see no distributed table at all.
            struct Loading;
            impl Drop for Loading {
                fn drop(&mut self) {
                    LOADING.set(false);
                }
            }
            LOADING.set(true);
            let _loading = Loading;
            read_latest(tables::all_tables)
        };
        let tables = result.unwrap_or_else(|err: MetadataError| crate::error::raise(err));
        CACHE.with_borrow_mut(|cache| {
            *cache = Some(Loaded {
                catalog_relid,
                tables: tables.into_iter().map(|t| (t.oid, t)).collect(),
                placements: HashMap::new(),
            })
        });
    }
    CACHE.with_borrow(|cache| f(cache.as_ref().map_or(&empty, |loaded| &loaded.tables)))
}

/// Runs `f` — reads of pgdist's catalog for the cache — as the catalog owner, in the latest
/// snapshot rather than the statement's. The statement's snapshot may predate a change whose
/// invalidation this backend has already processed (taken before the statement waited for a
/// lock that the change held: a shard move, a DDL statement); loading in it would cache the
/// old metadata until the next invalidation, as PostgreSQL's own caches avoid with catalog
/// snapshots.
fn read_latest<T>(f: impl FnOnce() -> T) -> T {
    // A parallel worker may not take a new snapshot (and has no lock of its own to wait for).
    // SAFETY: a plain read of backend state.
    if unsafe { pg_sys::IsInParallelMode() } {
        return crate::metadata::as_catalog_owner(f);
    }
    // SAFETY: inside a transaction (the callers check); the snapshot pushed here is popped
    // below, or by the abort's cleanup of the snapshot stack when `f` fails.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let result = crate::metadata::as_catalog_owner(f);
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    result
}

/// The distributed table `oid`, if it is one.
pub fn lookup(oid: pg_sys::Oid) -> Option<DistTable> {
    with_tables(|tables| tables.get(&oid).cloned())
}

/// Every placement of distributed table `oid`, by shard index then node (cached; shared, not
/// copied: routing a query reads it several times).
pub fn placements(oid: pg_sys::Oid) -> Rc<[Placement]> {
    if lookup(oid).is_none() {
        return Rc::from(Vec::new());
    }
    let cached =
        CACHE.with_borrow(|cache| cache.as_ref().and_then(|l| l.placements.get(&oid).cloned()));
    if let Some(placements) = cached {
        return placements;
    }
    let placements: Rc<[Placement]> = read_latest(|| tables::placements(oid))
        .unwrap_or_else(|err| crate::error::raise(err))
        .into();
    CACHE.with_borrow_mut(|cache| {
        if let Some(loaded) = cache.as_mut() {
            loaded.placements.insert(oid, placements.clone());
        }
    });
    placements
}

/// True when `shard_id` is a shard of a table whose placements this backend has loaded (never
/// reads the catalog: errors are reported with it, whatever the transaction's state).
pub fn is_loaded_shard(shard_id: i64) -> bool {
    CACHE
        .try_with(|cache| {
            cache.try_borrow().is_ok_and(|cache| {
                cache.as_ref().is_some_and(|loaded| {
                    loaded
                        .placements
                        .values()
                        .any(|placements| placements.iter().any(|p| p.shard_id == shard_id))
                })
            })
        })
        .unwrap_or(false)
}

/// `(shard_id, shard_index)` of every shard of `oid`, by index (cached).
pub fn shards(oid: pg_sys::Oid) -> Vec<(i64, i32)> {
    let mut shards: Vec<(i64, i32)> = placements(oid)
        .iter()
        .map(|p| (p.shard_id, p.shard_index))
        .collect();
    shards.dedup();
    shards
}

/// Tells every backend (at commit; this one at the next command) that tables, shards or
/// placements changed.
pub fn invalidate() {
    if let Some(relid) = catalog_relid() {
        // SAFETY: queues a relcache invalidation message for an existing relation.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
    }
}
