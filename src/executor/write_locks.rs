//! Keeps concurrent writes from deadlocking where one server would not.
//!
//! One server changes a statement's rows one after the other, so two statements that change
//! the same rows take their locks in the same order and the second simply waits. pgdist runs a
//! statement's shards on all nodes at once: two UPDATEs of the same rows on two nodes can each
//! win on one node and wait for the other there — a distributed deadlock that the detector
//! must break by cancelling one. Two rules prevent that, as Citus's do:
//!
//! - An UPDATE, DELETE, MERGE or `INSERT … ON CONFLICT DO UPDATE` that writes shards on more
//!   than one node first takes a coordinator lock on each of those shards, in shard order, in
//!   a mode that conflicts with itself: such statements on the same shards run one after the
//!   other, each to the end of its transaction. Writes to one node take no lock; the node
//!   orders them itself (a node runs a statement's shards one after the other, in shard order).
//! - A shard with several placements (a reference table's copies, replicated shards) is written
//!   on its first placement before its copies (`shard_writer::run_statements`), so the first
//!   placement's row locks order concurrent writes of the same rows on every copy.
//!
//! The locks are advisory locks in a class of pgdist's own (`pg_locks.objid` holds the shard id's
//! low 32 bits, `classid` the high ones, `objsubid` is 28772), held to the end of the
//! transaction; a wait for one is a lock wait like any other (cancel, `lock_timeout`, deadlock
//! detection, local and distributed).

use pgrx::pg_sys;

/// The `locktag_field4` of pgdist's shard locks (user advisory locks use 1 and 2).
const SHARD_LOCK_CLASS: u16 = 28_772;

/// Takes the shard locks of a write to `shards` on `nodes` distinct nodes (see the module).
pub fn lock_for_multi_node_write(mut shards: Vec<i64>, nodes: usize) {
    if nodes < 2 {
        return;
    }
    shards.sort_unstable();
    shards.dedup();
    if shards.len() < 2 {
        return;
    }
    for shard_id in shards {
        let tag = pg_sys::LOCKTAG {
            // SAFETY: MyDatabaseId is set once the backend is connected.
            locktag_field1: u32::from(unsafe { pg_sys::MyDatabaseId }),
            locktag_field2: (shard_id >> 32) as u32,
            locktag_field3: shard_id as u32,
            locktag_field4: SHARD_LOCK_CLASS,
            locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
            locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
        };
        // A wait the distributed deadlock detector cancels ends with its error, not a plain
        // cancel.
        pgrx::PgTryBuilder::new(|| {
            // SAFETY: a transaction-level lock, released by PostgreSQL at commit or abort.
            unsafe {
                pg_sys::LockAcquire(
                    &tag,
                    pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE,
                    false,
                    false,
                );
            }
        })
        .catch_when(pgrx::PgSqlErrorCode::ERRCODE_QUERY_CANCELED, |cancel| {
            if crate::transaction::deadlock::take_victim_mark() {
                crate::error::raise(crate::transaction::deadlock::DeadlockError::Victim);
            }
            cancel.rethrow()
        })
        .execute();
    }
}
