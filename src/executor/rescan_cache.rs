//! The rows of a Distributed Scan kept for its rescans within one statement.
//!
//! A nested loop rescans its inner side for every outer row, and PostgreSQL's planner puts a
//! Material node above it only when its estimates say so; a rescanned Distributed Scan would
//! send its fragments to every node again each time (a round trip per outer row). Where the
//! executor says it will rescan (`EXEC_FLAG_REWIND`: a nested loop's inner side that takes no
//! parameters from the outer one, a subplan run again) a scan whose fragments read the same rows
//! every time — no correlated values, no volatile values computed on the coordinator — keeps
//! the rows of its first pass in a tuplestore (in memory up to `work_mem`, then in a temporary
//! file) and replays them on a rescan. After a rescan before the first pass ended (a semi join
//! that stopped at its first match), the kept rows come first and the fragments then go on,
//! each new row kept too, as a Material node reads its input. Replayed rows are also what
//! PostgreSQL would return: within one statement a rescan sees the rows of the same snapshot.

use pgrx::pg_sys;

pub struct RescanCache {
    store: *mut pg_sys::Tuplestorestate,
    /// A slot for the tuplestore's minimal tuples, copied into the scan's slot.
    replay_slot: *mut pg_sys::TupleTableSlot,
    /// The first pass has returned every row.
    complete: bool,
    /// Rows come from the store (after a rescan).
    replaying: bool,
}

impl RescanCache {
    /// An empty cache for rows of `tupdesc`, living as long as the query.
    pub unsafe fn new(estate: *mut pg_sys::EState, tupdesc: pg_sys::TupleDesc) -> RescanCache {
        // SAFETY: created in the query's memory (the tuplestore keeps its rows in the context
        // current at its creation), freed by end().
        unsafe {
            let old = pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
            let store = pg_sys::tuplestore_begin_heap(false, false, pg_sys::work_mem);
            let replay_slot =
                pg_sys::ExecInitExtraTupleSlot(estate, tupdesc, &pg_sys::TTSOpsMinimalTuple);
            pg_sys::MemoryContextSwitchTo(old);
            RescanCache {
                store,
                replay_slot,
                complete: false,
                replaying: false,
            }
        }
    }

    /// Whether rows come from the cache now.
    pub fn replaying(&self) -> bool {
        self.replaying
    }

    /// Whether the first pass has returned every row.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// Keeps a row read from the fragments (an empty slot: the first pass is over).
    pub unsafe fn keep(&mut self, slot: *mut pg_sys::TupleTableSlot) {
        // SAFETY: slot holds a row of the cache's descriptor, or nothing.
        unsafe {
            if (*slot).tts_flags & pg_sys::TTS_FLAG_EMPTY as u16 != 0 {
                self.complete = true;
            } else {
                pg_sys::tuplestore_puttupleslot(self.store, slot);
            }
        }
    }

    /// Replays the rows from the first one.
    pub unsafe fn rewind(&mut self) {
        // SAFETY: the store is open; its read pointer may rewind.
        unsafe { pg_sys::tuplestore_rescan(self.store) };
        self.replaying = true;
    }

    /// The next kept row, in `slot`; None past the last one (a row kept then is read past,
    /// as the store is at its end).
    pub unsafe fn next(
        &mut self,
        slot: *mut pg_sys::TupleTableSlot,
    ) -> Option<*mut pg_sys::TupleTableSlot> {
        // SAFETY: the replay slot has the store's descriptor, as `slot` has.
        unsafe {
            pg_sys::tuplestore_gettupleslot(self.store, true, false, self.replay_slot)
                .then(|| pg_sys::ExecCopySlot(slot, self.replay_slot))
        }
    }

    /// Frees the rows.
    pub unsafe fn end(self) {
        // SAFETY: nothing reads the store after this.
        unsafe { pg_sys::tuplestore_end(self.store) };
    }
}
