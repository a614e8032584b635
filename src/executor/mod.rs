//! Executing distributed plans: the CustomScan that reads shards (`scan.rs`) and the async
//! fragment streams behind it (`fragments.rs`).

pub mod fragments;
pub mod scan;

pub fn init() {
    scan::init();
}
