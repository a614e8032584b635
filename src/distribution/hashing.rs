//! How rows map to shards: the standard hash function of the distribution column's type over
//! the int4 space split evenly into shards (hash), or sorted split points (range).

use pgrx::prelude::*;

/// The hash support function of the type's default hash operator class (as hash indexes use:
/// `hashint4`, `hashint8`, `hashtext`, `uuid_hash`, …).
pub fn hash_function(type_oid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: catalog lookups by oid; GetDefaultOpClass returns InvalidOid when there is none,
    // and the lsyscache getters raise an ERROR for a missing opclass (which we checked exists).
    unsafe {
        let opclass = pg_sys::GetDefaultOpClass(type_oid, pg_sys::HASH_AM_OID);
        if opclass == pg_sys::InvalidOid {
            return None;
        }
        let family = pg_sys::get_opclass_family(opclass);
        let input_type = pg_sys::get_opclass_input_type(opclass);
        let proc = pg_sys::get_opfamily_proc(family, input_type, input_type, HASHSTANDARD_PROC);
        (proc != pg_sys::InvalidOid).then_some(proc)
    }
}

thread_local! {
    /// Hash operator family per type, looked up once per backend (a catalog scan each time
    /// otherwise, on every router query's planning).
    static HASH_FAMILIES: std::cell::RefCell<std::collections::HashMap<pg_sys::Oid, Option<pg_sys::Oid>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The operator family of `type_oid`'s default hash operator class: its hash function is the
/// one that distributes rows, its equality operator the one that routes.
pub fn hash_family(type_oid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    HASH_FAMILIES.with_borrow_mut(|cache| {
        *cache.entry(type_oid).or_insert_with(|| {
            // SAFETY: catalog lookups by oid; GetDefaultOpClass returns InvalidOid when there
            // is none.
            unsafe {
                let opclass = pg_sys::GetDefaultOpClass(type_oid, pg_sys::HASH_AM_OID);
                (opclass != pg_sys::InvalidOid).then(|| pg_sys::get_opclass_family(opclass))
            }
        })
    })
}

/// Support function number of a hash opclass's standard 32-bit hash.
const HASHSTANDARD_PROC: i16 = 1;

/// True when the type has a default btree operator class (needed for range distribution).
pub fn has_btree_ordering(type_oid: pg_sys::Oid) -> bool {
    // SAFETY: a catalog lookup by oid that returns InvalidOid when nothing matches.
    unsafe { pg_sys::GetDefaultOpClass(type_oid, pg_sys::BTREE_AM_OID) != pg_sys::InvalidOid }
}

/// Width of each shard's hash range (the last shard takes the remainder).
fn range_width(shard_count: i32) -> i64 {
    (1i64 << 32) / i64::from(shard_count.max(1))
}

/// The inclusive hash range `[min, max]` of every shard.
pub fn hash_ranges(shard_count: i32) -> Vec<(i32, i32)> {
    let width = range_width(shard_count);
    (0..shard_count)
        .map(|i| {
            let min = i64::from(i32::MIN) + i64::from(i) * width;
            let max = if i == shard_count - 1 {
                i64::from(i32::MAX)
            } else {
                min + width - 1
            };
            (min as i32, max as i32)
        })
        .collect()
}

/// Which shard a hash value belongs to.
pub fn hash_shard_index(hash: i32, shard_count: i32) -> i32 {
    let offset = i64::from(hash) - i64::from(i32::MIN);
    (offset / range_width(shard_count)).min(i64::from(shard_count - 1)) as i32
}

thread_local! {
    /// Hash function and collation per type, looked up once per backend.
    static HASHERS: std::cell::RefCell<std::collections::HashMap<pg_sys::Oid, Option<(pg_sys::Oid, pg_sys::Oid)>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The hash of `datum` (of type `type_oid`) that decides its shard, or None when the type has
/// no hash function. Collatable types hash under the database's default collation.
pub fn hash_datum(type_oid: pg_sys::Oid, datum: pg_sys::Datum) -> Option<i32> {
    let hasher = HASHERS.with_borrow_mut(|cache| {
        *cache.entry(type_oid).or_insert_with(|| {
            hash_function(type_oid).map(|proc| {
                // SAFETY: a catalog lookup by oid.
                let collatable =
                    unsafe { pg_sys::get_typcollation(type_oid) } != pg_sys::InvalidOid;
                (
                    proc,
                    if collatable {
                        pg_sys::DEFAULT_COLLATION_OID
                    } else {
                        pg_sys::InvalidOid
                    },
                )
            })
        })
    })?;
    // SAFETY: `proc` is the type's hash support function, which takes one non-NULL value of
    // this type and returns an int4 Datum.
    let hash = unsafe { pg_sys::OidFunctionCall1Coll(hasher.0, hasher.1, datum) };
    Some(hash.value() as u32 as i32)
}

/// The hash of a value, as pgdist computes it to choose a shard.
#[pg_extern(immutable, parallel_safe, strict)]
fn hash_value(value: pgrx::AnyElement) -> i32 {
    hash_datum(value.oid(), value.datum()).unwrap_or_else(|| {
        crate::error::raise(crate::distribution::DistributionError::NoHashFunction(
            format!("{}", u32::from(value.oid())),
        ))
    })
}

/// SQL that computes the shard index of `column` (already quoted) for a hash-distributed table
/// with `shard_count` shards.
pub fn hash_index_sql(column: &str, shard_count: i32) -> String {
    format!(
        "least(((pgdist.hash_value({column})::int8 + 2147483648) / {width})::int4, {last})",
        width = range_width(shard_count),
        last = shard_count - 1
    )
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn ranges_cover_the_int4_space_without_gaps() {
        for count in [1, 2, 3, 7, 32] {
            let ranges = hash_ranges(count);
            assert_eq!(ranges.len(), count as usize);
            assert_eq!(ranges[0].0, i32::MIN);
            assert_eq!(ranges[count as usize - 1].1, i32::MAX);
            for pair in ranges.windows(2) {
                assert_eq!(i64::from(pair[0].1) + 1, i64::from(pair[1].0));
            }
        }
    }

    #[test]
    fn every_hash_lands_in_the_shard_whose_range_holds_it() {
        for count in [1, 3, 32] {
            let ranges = hash_ranges(count);
            for hash in [i32::MIN, -1, 0, 1, 123_456_789, i32::MAX] {
                let (min, max) = ranges[hash_shard_index(hash, count) as usize];
                assert!(min <= hash && hash <= max, "{hash} not in [{min}, {max}]");
            }
        }
    }
}
