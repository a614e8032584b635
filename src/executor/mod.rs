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
