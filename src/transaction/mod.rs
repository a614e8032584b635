//! Transaction callbacks: what must happen at commit and abort for remote work.

use pgrx::pg_sys;

pub fn init() {
    // SAFETY: called once from _PG_init in the postmaster (preload); the callback is a plain
    // function with 'static lifetime and takes no argument.
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::XactEvent::XACT_EVENT_ABORT {
        crate::remote::on_abort();
    }
}
