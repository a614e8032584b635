//! Executing distributed plans: the CustomScan that reads shards (`scan.rs`) and the async
//! fragment streams behind it (`fragments.rs`); the node that writes them (`modify.rs`) and
//! the row router it and COPY (`copy.rs`) use (`shard_writer.rs`); rows set aside for a reader
//! that is not ready for them (`spill.rs`); the session settings every node's connection
//! takes on (`session.rs`).

pub mod copy;
pub mod copy_stream;
pub mod fragments;
pub mod merge;
pub mod modify;
pub mod rescan_cache;
pub mod row_by_row;
pub mod scan;
pub mod session;
pub mod shard_writer;
pub mod spill;
pub mod triggers;
pub mod upsert;
pub mod write_locks;

pub fn init() {
    scan::init();
    modify::init();
}

/// The schema and name of relation `relid`.
pub fn schema_and_name(relid: pgrx::pg_sys::Oid) -> (String, String) {
    use pgrx::pg_sys;
    use std::ffi::CStr;
    // SAFETY: syscache lookups of an existing relation; the C strings are copied at once.
    unsafe {
        let schema = CStr::from_ptr(pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid)));
        let name = CStr::from_ptr(pg_sys::get_rel_name(relid));
        (
            schema.to_string_lossy().into_owned(),
            name.to_string_lossy().into_owned(),
        )
    }
}

/// Moves `value` to the heap and frees it when the current memory context is reset or deleted
/// (the query's memory: also when the query fails). The custom scan states keep their Rust
/// runtime this way.
///
/// # Safety
/// Call inside a live memory context; the pointer must not be used after that context is gone.
pub unsafe fn alloc_for_context<T: 'static>(value: T) -> *mut T {
    use pgrx::pg_sys;
    let boxed: Box<Box<dyn std::any::Any>> = Box::new(Box::new(value));
    let owner = Box::into_raw(boxed);
    // SAFETY: owner is a live Box whose inner Box holds a T; the fat-to-thin cast keeps its
    // address. The callback struct is palloc'd in the same context it watches.
    unsafe {
        let value = (&mut **owner as *mut dyn std::any::Any).cast::<T>();
        let callback = pg_sys::palloc0(std::mem::size_of::<pg_sys::MemoryContextCallback>())
            .cast::<pg_sys::MemoryContextCallback>();
        (*callback).func = Some(free_boxed);
        (*callback).arg = owner.cast();
        pg_sys::MemoryContextRegisterResetCallback(pg_sys::CurrentMemoryContext, callback);
        value
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn free_boxed(arg: *mut std::ffi::c_void) {
    // SAFETY: arg is the Box leaked in alloc_for_context; this callback runs exactly once.
    drop(unsafe { Box::from_raw(arg.cast::<Box<dyn std::any::Any>>()) });
}

/// The input function of type `type_oid`, ready to call, and its I/O parameter.
pub unsafe fn input_function(
    type_oid: pgrx::pg_sys::Oid,
) -> (Box<pgrx::pg_sys::FmgrInfo>, pgrx::pg_sys::Oid) {
    // SAFETY: catalog lookups; the FmgrInfo is owned by the caller.
    unsafe {
        let mut input = pgrx::pg_sys::InvalidOid;
        let mut io_param = pgrx::pg_sys::InvalidOid;
        pgrx::pg_sys::getTypeInputInfo(type_oid, &mut input, &mut io_param);
        let mut finfo = Box::new(pgrx::pg_sys::FmgrInfo::default());
        pgrx::pg_sys::fmgr_info(input, &mut *finfo);
        (finfo, io_param)
    }
}
