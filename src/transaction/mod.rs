//! Remote work inside the coordinator's transaction, and how it ends.
//!
//! `remote_xact` keeps one connection per node with an open remote transaction for everything
//! the current coordinator transaction does on that node (DDL on shards, data movement, later
//! DML). The transaction callbacks below end those remote transactions with the local one:
//! one-phase when a single node took part and nothing changed locally, otherwise two-phase (see
//! `docs/two-phase-commit.md`).

pub mod activity;
pub mod deadlock;
pub mod recovery;
pub mod remote_xact;

use pgrx::pg_sys;

pub fn init() {
    remote_xact::init_shared_memory();
    // SAFETY: called once from _PG_init in the postmaster (preload); the callbacks are plain
    // functions with 'static lifetime and take no argument.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT => remote_xact::pre_commit(),
        pg_sys::XactEvent::XACT_EVENT_COMMIT => {
            remote_xact::after_commit();
            crate::maintenance::at_transaction_end(true);
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT => {
            crate::remote::on_abort();
            remote_xact::after_abort();
            crate::maintenance::at_transaction_end(false);
        }
        pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => remote_xact::refuse_prepare(),
        _ => {}
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    _my_subid: pg_sys::SubTransactionId,
    _parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => remote_xact::subtransaction_aborted(),
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => remote_xact::subtransaction_committed(),
        _ => {}
    }
}
