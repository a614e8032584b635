//! Merging sorted streams: the next row of a merged Distributed Scan is the first, in the
//! query's ORDER BY, of the streams' current rows, compared as PostgreSQL's Sort compares
//! (SortSupport of each key's ordering operator, collation and NULLS FIRST / LAST).

use std::cmp::Ordering;

use pgrx::pg_sys;

use crate::planner::scan_path::MergeKey;

type Comparator =
    unsafe extern "C-unwind" fn(pg_sys::Datum, pg_sys::Datum, pg_sys::SortSupport) -> i32;

struct SortKey {
    /// The key's column in the scan tuple (0-based).
    slot_index: usize,
    support: *mut pg_sys::SortSupportData,
    comparator: Comparator,
}

pub struct SortedMerge {
    keys: Vec<SortKey>,
    /// The shape of the rows (a copy: slots made with it hold no reference count).
    tupdesc: pg_sys::TupleDesc,
    /// The current row of each stream (an empty slot once the stream has ended); slots beyond
    /// `streams` are left over from an earlier scan with more streams.
    heads: Vec<*mut pg_sys::TupleTableSlot>,
    streams: usize,
    started: bool,
    /// The stream whose row was returned last: it moves on at the next call, once the caller
    /// is done with that row.
    taken: Option<usize>,
}

impl SortedMerge {
    /// A merge of `streams` streams of rows shaped as `tupdesc`, in the current memory
    /// context (the query's).
    pub unsafe fn new(
        keys: &[MergeKey],
        tupdesc: pg_sys::TupleDesc,
        streams: usize,
    ) -> SortedMerge {
        // SAFETY: palloc'd sort support and slots live as long as the query's memory; the
        // slots use a copy of the descriptor, so they hold no reference count to release.
        unsafe {
            let keys = keys
                .iter()
                .map(|key| {
                    let support = pg_sys::palloc0(std::mem::size_of::<pg_sys::SortSupportData>())
                        .cast::<pg_sys::SortSupportData>();
                    (*support).ssup_cxt = pg_sys::CurrentMemoryContext;
                    (*support).ssup_collation = key.collation;
                    (*support).ssup_nulls_first = key.nulls_first;
                    (*support).ssup_attno = (key.slot_index + 1) as i16;
                    pg_sys::PrepareSortSupportFromOrderingOp(key.sort_operator, support);
                    // PostgreSQL raises an error itself when the operator has no comparison.
                    let Some(comparator) = (*support).comparator else {
                        pgrx::error!(
                            "pgdist: no comparison for sort operator {}",
                            u32::from(key.sort_operator)
                        );
                    };
                    SortKey {
                        slot_index: key.slot_index,
                        support,
                        comparator,
                    }
                })
                .collect();
            let mut merge = SortedMerge {
                keys,
                tupdesc: pg_sys::CreateTupleDescCopy(tupdesc),
                heads: Vec::new(),
                streams: 0,
                started: false,
                taken: None,
            };
            merge.restart(streams);
            merge
        }
    }

    /// Starts over (a rescan) with `streams` streams, reusing the slots.
    pub unsafe fn restart(&mut self, streams: usize) {
        // SAFETY: new slots are made in the current memory context, which must be the query's.
        unsafe {
            while self.heads.len() < streams {
                self.heads.push(pg_sys::MakeSingleTupleTableSlot(
                    self.tupdesc,
                    &raw const pg_sys::TTSOpsVirtual,
                ));
            }
            for slot in &self.heads {
                pg_sys::ExecClearTuple(*slot);
            }
        }
        self.streams = streams;
        self.started = false;
        self.taken = None;
    }

    /// The next row in order, None at the end. `fetch(stream, slot)` stores the stream's next
    /// row in `slot` (materialized: it must outlive per-tuple memory) or returns false at the
    /// stream's end.
    pub unsafe fn next(
        &mut self,
        mut fetch: impl FnMut(usize, *mut pg_sys::TupleTableSlot) -> bool,
    ) -> Option<*mut pg_sys::TupleTableSlot> {
        // SAFETY: the heads are our slots; fetch fills them.
        unsafe {
            let mut advance = |index: usize, slot: *mut pg_sys::TupleTableSlot| {
                if !fetch(index, slot) {
                    pg_sys::ExecClearTuple(slot);
                }
            };
            if !self.started {
                self.started = true;
                for (index, slot) in self.heads[..self.streams].iter().enumerate() {
                    advance(index, *slot);
                }
            } else if let Some(index) = self.taken.take() {
                advance(index, self.heads[index]);
            }
            let mut first: Option<usize> = None;
            for (index, slot) in self.heads[..self.streams].iter().enumerate() {
                if (**slot).tts_flags & pg_sys::TTS_FLAG_EMPTY as u16 != 0 {
                    continue;
                }
                first = match first {
                    Some(best) if self.compare(self.heads[best], *slot) != Ordering::Greater => {
                        Some(best)
                    }
                    _ => Some(index),
                };
            }
            self.taken = first;
            first.map(|index| self.heads[index])
        }
    }

    /// `a` against `b` in the merge order.
    unsafe fn compare(
        &self,
        a: *mut pg_sys::TupleTableSlot,
        b: *mut pg_sys::TupleTableSlot,
    ) -> Ordering {
        // SAFETY: both slots hold a stored virtual tuple of the scan's shape.
        unsafe {
            for key in &self.keys {
                let i = key.slot_index;
                let (a_value, a_null) = (*(*a).tts_values.add(i), *(*a).tts_isnull.add(i));
                let (b_value, b_null) = (*(*b).tts_values.add(i), *(*b).tts_isnull.add(i));
                let support = key.support;
                let order = match (a_null, b_null) {
                    (true, true) => Ordering::Equal,
                    (true, false) if (*support).ssup_nulls_first => Ordering::Less,
                    (true, false) => Ordering::Greater,
                    (false, true) if (*support).ssup_nulls_first => Ordering::Greater,
                    (false, true) => Ordering::Less,
                    (false, false) => {
                        let order = (key.comparator)(a_value, b_value, support).cmp(&0);
                        if (*support).ssup_reverse {
                            order.reverse()
                        } else {
                            order
                        }
                    }
                };
                if order != Ordering::Equal {
                    return order;
                }
            }
            Ordering::Equal
        }
    }
}
