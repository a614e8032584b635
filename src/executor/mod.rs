//! Executing distributed plans: the CustomScan that reads shards (`scan.rs`) and the async
//! fragment streams behind it (`fragments.rs`); the node that writes them (`modify.rs`) and
//! the row router it and COPY (`copy.rs`) use (`shard_writer.rs`).

pub mod copy;
pub mod fragments;
pub mod modify;
pub mod scan;
pub mod shard_writer;

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
