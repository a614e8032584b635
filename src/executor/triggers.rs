//! Fires the triggers of a distributed or reference table on the coordinator, with PostgreSQL's
//! own trigger code, around the writes the shards make.
//!
//! Triggers are defined on the coordinator's shell table, as on any table; the shards have none.
//! A write fires them where PostgreSQL's ModifyTable would — statement triggers before the first
//! and after the last row, BEFORE ROW triggers on each row before it is sent (they may change it
//! or skip it), AFTER ROW triggers and transition tables queued for the end of the statement —
//! as the user who writes, so a trigger function never runs on a worker. Foreign-key triggers
//! stay out: the shards check their own keys.
//!
//! AFTER ROW events need care: PostgreSQL queues them by the row's ctid and fetches the row
//! from the table when it fires them at the end of the statement, which the empty shell cannot
//! serve. For foreign tables it keeps the rows themselves in the query's tuplestore instead. So
//! the result relation the triggers see is a private copy of the shell's relation entry that
//! says it is a foreign table (the shared entry is left alone, so the trigger functions' own
//! queries see the table as it is); PostgreSQL finds that result relation again when it fires
//! the events.
//!
//! A partitioned table's row triggers are its leaf partitions' (PostgreSQL clones the parent's
//! onto each): the coordinator finds each row's partition and fires that partition's triggers
//! on the row in the partition's layout (`docs/triggers.md` "Partitioned tables").

use pgrx::pg_sys;

use crate::executor::shard_writer::WriteError;

/// A write's event, as PostgreSQL's trigger code names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Insert,
    Update,
    Delete,
}

impl Event {
    /// The event as one letter, for plans kept as text.
    pub fn letter(self) -> char {
        match self {
            Event::Insert => 'i',
            Event::Update => 'u',
            Event::Delete => 'd',
        }
    }

    pub fn from_letter(letter: char) -> Option<Event> {
        [Event::Insert, Event::Update, Event::Delete]
            .into_iter()
            .find(|event| event.letter() == letter)
    }

    fn type_bit(self) -> u32 {
        match self {
            Event::Insert => pg_sys::TRIGGER_TYPE_INSERT,
            Event::Update => pg_sys::TRIGGER_TYPE_UPDATE,
            Event::Delete => pg_sys::TRIGGER_TYPE_DELETE,
        }
    }
}

/// The user triggers of a table for one event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub statement: bool,
    /// BEFORE or AFTER ROW triggers, or statement triggers with transition tables: they need
    /// the rows themselves.
    pub rows: bool,
}

impl Found {
    pub fn any(self) -> bool {
        self.statement || self.rows
    }
}

/// The user triggers (not foreign-key triggers) that a write of `event` to `relid` fires: its
/// own, and for a partitioned table the row triggers of its leaf partitions (which fire for the
/// rows routed to them).
pub unsafe fn find(relid: pg_sys::Oid, event: Event) -> Found {
    // SAFETY: as triggers_of.
    unsafe {
        let mut found = triggers_of(relid, event);
        for leaf in crate::metadata::leaf_partitions(relid) {
            found.rows |= triggers_of(leaf, event).row;
        }
        Found {
            statement: found.statement,
            rows: found.rows,
        }
    }
}

/// What user triggers of one table an event has.
#[derive(Default)]
struct Kinds {
    statement: bool,
    row: bool,
    /// Row triggers or statement triggers with transition tables.
    rows: bool,
}

unsafe fn triggers_of(relid: pg_sys::Oid, event: Event) -> Kinds {
    // SAFETY: the relation is locked by the statement being planned or run; its trigger
    // descriptor is read while we hold our reference.
    unsafe {
        let relation = pg_sys::RelationIdGetRelation(relid);
        let mut found = Kinds::default();
        for trigger in user_triggers((*relation).trigdesc) {
            let tgtype = trigger.tgtype as u32;
            if tgtype & event.type_bit() == 0 {
                continue;
            }
            let row = tgtype & pg_sys::TRIGGER_TYPE_ROW != 0;
            let transition = !trigger.tgoldtable.is_null() || !trigger.tgnewtable.is_null();
            found.row |= row;
            found.rows |= row || transition;
            found.statement |= !row;
        }
        pg_sys::RelationClose(relation);
        found
    }
}

/// The triggers of `trigdesc` that PostgreSQL did not create for a constraint itself.
unsafe fn user_triggers<'a>(
    trigdesc: *const pg_sys::TriggerDesc,
) -> impl Iterator<Item = &'a pg_sys::Trigger> {
    // SAFETY: trigdesc (or null) is a valid descriptor that outlives the iteration.
    unsafe {
        let triggers: &[pg_sys::Trigger] = match trigdesc.is_null() {
            true => &[],
            false => {
                std::slice::from_raw_parts((*trigdesc).triggers, (*trigdesc).numtriggers as usize)
            }
        };
        triggers.iter().filter(|t| !t.tgisinternal)
    }
}

/// What the BEFORE ROW triggers of an UPDATE make of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Write the (possibly changed) new row.
    Write,
    /// Leave the row alone.
    Skip,
    /// The row moves to another partition whose BEFORE INSERT triggers skipped it: delete it.
    Delete,
}

impl UpdateOutcome {
    fn from_kept(kept: bool) -> UpdateOutcome {
        match kept {
            true => UpdateOutcome::Write,
            false => UpdateOutcome::Skip,
        }
    }
}

/// A result relation set up to fire the user triggers of one write.
pub struct Triggers {
    pub(crate) estate: *mut pg_sys::EState,
    pub(crate) info: *mut pg_sys::ResultRelInfo,
    event: Event,
    /// The transition tables' capture (null: none).
    capture: *mut pg_sys::TransitionCaptureState,
    /// `ON CONFLICT DO UPDATE`: the capture of the rows updated (null: none).
    update_capture: *mut pg_sys::TransitionCaptureState,
    /// `INSERT … ON CONFLICT DO UPDATE`: UPDATE's statement triggers fire too.
    also_update: bool,
    /// The events whose statement triggers fire, in the order of the BEFORE ones.
    statement_events: Vec<Event>,
    /// The table is partitioned: its leaf partitions' row triggers fire for its rows, not its
    /// own.
    partitioned: bool,
    /// Those partitions (none when nothing fires for rows).
    partitions: Vec<Partition>,
    /// Whether a partition has row triggers of any event.
    partition_row_triggers: bool,
    /// A MERGE: `capture` holds the rows of every event.
    merge: bool,
    /// The partition the last row went to, tried first for the next one.
    last_partition: std::cell::Cell<usize>,
    /// Slots of the table's layout: an old row being routed, a new row being converted back.
    table_old: *mut pg_sys::TupleTableSlot,
    table_new: *mut pg_sys::TupleTableSlot,
}

/// A leaf partition of the partitioned table a write names: PostgreSQL fires the row triggers
/// of the partition a row is routed to (its own and its clones of its ancestors'), with the row
/// in the partition's layout.
struct Partition {
    info: *mut pg_sys::ResultRelInfo,
    /// The relation as opened (`info` holds a private copy), closed by [`Triggers::close`].
    opened: pg_sys::Relation,
    /// Slots of the partition's layout for a row's old and new version.
    old: *mut pg_sys::TupleTableSlot,
    new: *mut pg_sys::TupleTableSlot,
    /// From the named table's layout to the partition's, and back (null: the same layout).
    to_partition: *mut pg_sys::TupleConversionMap,
    to_table: *mut pg_sys::TupleConversionMap,
}

impl Triggers {
    /// The triggers of a write of `event` to result relation `info` (keeping only the user
    /// triggers of its descriptor, a copy InitResultRelInfo made); `also_update` for an
    /// `INSERT … ON CONFLICT DO UPDATE`, `merge_events` the events of a MERGE's actions (whose
    /// statement triggers fire; `event` is the first).
    pub unsafe fn new(
        estate: *mut pg_sys::EState,
        info: *mut pg_sys::ResultRelInfo,
        event: Event,
        also_update: bool,
        merge_events: &[Event],
    ) -> Triggers {
        // SAFETY: info was set up by InitResultRelInfo for this estate.
        unsafe {
            let statement_events = match (merge_events.is_empty(), also_update) {
                (false, _) => merge_events.to_vec(),
                (true, true) => vec![event, Event::Update],
                (true, false) => vec![event],
            };
            let tupdesc = (*(*info).ri_RelationDesc).rd_att;
            let relid = (*(*info).ri_RelationDesc).rd_id;
            keep_event_rows(estate, info);
            let trigdesc = (*info).ri_TrigDesc;
            let command = match event {
                Event::Insert => pg_sys::CmdType::CMD_INSERT,
                Event::Update => pg_sys::CmdType::CMD_UPDATE,
                Event::Delete => pg_sys::CmdType::CMD_DELETE,
            };
            let capture_of = |command| match trigdesc.is_null() {
                true => std::ptr::null_mut(),
                false => pg_sys::MakeTransitionCaptureState(trigdesc, relid, command),
            };
            let slot = || pg_sys::ExecInitExtraTupleSlot(estate, tupdesc, &pg_sys::TTSOpsVirtual);
            // A MERGE captures the rows of all its actions in one state, as PostgreSQL does.
            let merge = !merge_events.is_empty();
            let capture = capture_of(match merge {
                true => pg_sys::CmdType::CMD_MERGE,
                false => command,
            });
            let update_capture = match also_update {
                true => capture_of(pg_sys::CmdType::CMD_UPDATE),
                false => std::ptr::null_mut(),
            };
            // The partitions' row triggers of any event (an UPDATE that moves a row would fire
            // DELETE and INSERT triggers).
            let leaves = crate::metadata::leaf_partitions(relid);
            let partition_row_triggers = leaves.iter().any(|oid| {
                [Event::Insert, Event::Update, Event::Delete]
                    .into_iter()
                    .any(|event| triggers_of(*oid, event).row)
            });
            // Rows are routed to their partitions only when something fires for them.
            let routed = partition_row_triggers || !capture.is_null() || !update_capture.is_null();
            Triggers {
                estate,
                info,
                event,
                capture,
                update_capture,
                also_update,
                statement_events,
                partitioned: pg_sys::get_rel_relkind(relid)
                    == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char,
                partitions: match routed {
                    true => leaves
                        .iter()
                        .map(|oid| Partition::open(*oid, estate, info))
                        .collect(),
                    false => Vec::new(),
                },
                partition_row_triggers,
                merge,
                last_partition: std::cell::Cell::new(0),
                table_old: slot(),
                table_new: slot(),
            }
        }
    }

    /// Closes the partitions opened for their triggers, once the statement's AFTER events
    /// have fired.
    pub fn close(&mut self) {
        for partition in self.partitions.drain(..) {
            // SAFETY: opened by Partition::open; the lock stays until the transaction ends.
            unsafe { pg_sys::table_close(partition.opened, pg_sys::NoLock as i32) };
        }
    }

    /// BEFORE STATEMENT triggers.
    pub fn before_statement(&self) {
        // SAFETY: info and estate belong to the running statement.
        unsafe {
            for event in &self.statement_events {
                match event {
                    Event::Insert => pg_sys::ExecBSInsertTriggers(self.estate, self.info),
                    Event::Update => pg_sys::ExecBSUpdateTriggers(self.estate, self.info),
                    Event::Delete => pg_sys::ExecBSDeleteTriggers(self.estate, self.info),
                }
            }
        }
    }

    /// AFTER STATEMENT triggers (queued for the end of the statement, with the transition
    /// tables), in the reverse order of the BEFORE ones, as PostgreSQL fires them. Nothing is
    /// queued after them: the partitions leave their root, as PostgreSQL looks up the result
    /// relation of each AFTER event at the end of the statement by a null root.
    pub fn after_statement(&self) {
        // SAFETY: as before_statement.
        unsafe {
            for partition in &self.partitions {
                (*partition.info).ri_RootResultRelInfo = std::ptr::null_mut();
            }
            for event in self.statement_events.iter().rev() {
                let capture = self.capture_of(*event);
                match event {
                    Event::Insert => pg_sys::ExecASInsertTriggers(self.estate, self.info, capture),
                    Event::Update => pg_sys::ExecASUpdateTriggers(self.estate, self.info, capture),
                    Event::Delete => pg_sys::ExecASDeleteTriggers(self.estate, self.info, capture),
                }
            }
        }
    }

    /// The transition capture of `event`'s rows (null: none).
    fn capture_of(&self, event: Event) -> *mut pg_sys::TransitionCaptureState {
        match event {
            _ if event == self.event || self.merge => self.capture,
            Event::Update if self.also_update => self.update_capture,
            _ => std::ptr::null_mut(),
        }
    }

    /// BEFORE ROW triggers of a row to write: false when one of them skips it. `old` is the
    /// row an UPDATE changes or a DELETE removes; `new` the row an INSERT or UPDATE writes,
    /// which the triggers may change in place (both in the layout of the table written).
    pub unsafe fn before_row(
        &self,
        old: pg_sys::HeapTuple,
        new: *mut pg_sys::TupleTableSlot,
    ) -> bool {
        // SAFETY: as before_row_of.
        unsafe { self.before_row_of(self.event, old, new) }
    }

    /// [`Triggers::before_row`] of `event` (an `ON CONFLICT DO UPDATE` fires UPDATE's too).
    pub unsafe fn before_row_of(
        &self,
        event: Event,
        old: pg_sys::HeapTuple,
        new: *mut pg_sys::TupleTableSlot,
    ) -> bool {
        // SAFETY: the slots hold rows of the result relation; a partition's rows are converted
        // to its layout and the new row back.
        unsafe {
            if !self.partitioned {
                return fire_before(self.estate, self.info, event, old, new);
            }
            // A row no partition takes goes on: its shard refuses it as PostgreSQL would.
            let Some((partition, old, partition_new)) = self.in_partition(event, old, new) else {
                return true;
            };
            let keep = fire_before(self.estate, partition.info, event, old, partition_new);
            if keep && !new.is_null() {
                // A trigger may not move an inserted row to another partition, and an upsert
                // no row at all, as in PostgreSQL (an UPDATE goes through before_update).
                let moved =
                    !pg_sys::ExecPartitionCheck(partition.info, partition_new, self.estate, false);
                if moved && self.also_update && event == Event::Update {
                    crate::error::raise(WriteError::UpsertChangesPartition);
                }
                if moved && event == Event::Insert {
                    pg_sys::ExecPartitionCheck(partition.info, partition_new, self.estate, true);
                }
                let back = convert(partition.to_table, partition_new, self.table_new);
                pg_sys::ExecCopySlot(new, back);
            }
            keep
        }
    }

    /// BEFORE ROW triggers of a row an UPDATE changes from `old` to `new` (which they may
    /// change in place). A row of a partitioned table that the new values move to another
    /// partition becomes, as in PostgreSQL, a DELETE from its partition and an INSERT into the
    /// other when the partitions have row triggers: the first one's BEFORE DELETE and the other
    /// one's BEFORE INSERT triggers fire too, and when the INSERT ones skip the row it is only
    /// deleted.
    pub unsafe fn before_update(
        &self,
        old: pg_sys::HeapTuple,
        new: *mut pg_sys::TupleTableSlot,
    ) -> UpdateOutcome {
        // SAFETY: as before_row_of.
        unsafe {
            if !self.partitioned {
                return UpdateOutcome::from_kept(fire_before(
                    self.estate,
                    self.info,
                    Event::Update,
                    old,
                    new,
                ));
            }
            // A row no partition takes goes on: its shard refuses it as PostgreSQL would.
            let Some((source, old, source_new)) = self.in_partition(Event::Update, old, new) else {
                return UpdateOutcome::Write;
            };
            if !fire_before(self.estate, source.info, Event::Update, old, source_new) {
                return UpdateOutcome::Skip;
            }
            let table_new = convert(source.to_table, source_new, self.table_new);
            let moved = !pg_sys::ExecPartitionCheck(source.info, source_new, self.estate, false);
            let target = match moved && self.partition_row_triggers {
                true => self.partition_of(table_new, |p| p.new, Some(source)),
                false => None,
            };
            let Some(target) = target else {
                pg_sys::ExecCopySlot(new, table_new);
                return UpdateOutcome::Write;
            };
            if !fire_before(
                self.estate,
                source.info,
                Event::Delete,
                old,
                std::ptr::null_mut(),
            ) {
                return UpdateOutcome::Skip;
            }
            let target_new = convert(target.to_partition, table_new, target.new);
            if !fire_before(
                self.estate,
                target.info,
                Event::Insert,
                std::ptr::null_mut(),
                target_new,
            ) {
                return UpdateOutcome::Delete;
            }
            // A trigger of the partition's own may not move the row on (a cloned one has
            // raised PostgreSQL's error already).
            pg_sys::ExecPartitionCheck(target.info, target_new, self.estate, true);
            let back = convert(target.to_table, target_new, self.table_new);
            pg_sys::ExecCopySlot(new, back);
            UpdateOutcome::Write
        }
    }

    /// Queues the AFTER ROW triggers and transition-table rows of a row an UPDATE changed from
    /// `old` to `new` (null: [`UpdateOutcome::Delete`]). A row moved to another partition fires
    /// its first partition's AFTER DELETE and the other one's AFTER INSERT triggers, and goes to
    /// the UPDATE's transition tables, as in PostgreSQL.
    pub unsafe fn after_update(&self, old: pg_sys::HeapTuple, new: *mut pg_sys::TupleTableSlot) {
        // SAFETY: as after_row_of.
        unsafe {
            if !self.partitioned {
                return fire_after(
                    self.estate,
                    self.info,
                    self.capture,
                    Event::Update,
                    old,
                    new,
                );
            }
            let Some((source, old, source_new)) = self.in_partition(Event::Update, old, new) else {
                return;
            };
            let moved = new.is_null()
                || !pg_sys::ExecPartitionCheck(source.info, source_new, self.estate, false);
            if !moved {
                return fire_after(
                    self.estate,
                    source.info,
                    self.capture,
                    Event::Update,
                    old,
                    source_new,
                );
            }
            // An UPDATE puts the moved row into its transition tables; PostgreSQL 15's MERGE
            // into its DELETE and INSERT ones.
            let capture = self.capture;
            let halves = match self.merge {
                true => capture,
                false => std::ptr::null_mut(),
            };
            // With one row missing and a capture, the UPDATE's trigger code only captures the
            // other, as PostgreSQL does for the DELETE and INSERT halves of a move.
            if !capture.is_null() && !self.merge && (*capture).tcs_update_old_table {
                let (estate, info, none) = (self.estate, source.info, std::ptr::null_mut());
                fire_after(estate, info, capture, Event::Update, old, none);
            }
            fire_after(
                self.estate,
                source.info,
                halves,
                Event::Delete,
                old,
                std::ptr::null_mut(),
            );
            if new.is_null() {
                return;
            }
            let Some(target) = self.partition_of(new, |p| p.new, Some(source)) else {
                return;
            };
            let target_new = convert(target.to_partition, new, target.new);
            if !capture.is_null() && !self.merge && (*capture).tcs_update_new_table {
                let (estate, info, none) = (self.estate, target.info, std::ptr::null_mut());
                fire_after(estate, info, capture, Event::Update, none, target_new);
            }
            fire_after(
                self.estate,
                target.info,
                halves,
                Event::Insert,
                std::ptr::null_mut(),
                target_new,
            );
        }
    }

    /// Queues the AFTER ROW triggers and transition-table rows of a row written (`old` and
    /// `new` as for [`Triggers::before_row`]).
    pub unsafe fn after_row(&self, old: pg_sys::HeapTuple, new: *mut pg_sys::TupleTableSlot) {
        // SAFETY: as after_row_of.
        unsafe { self.after_row_of(self.event, old, new) }
    }

    /// [`Triggers::after_row`] of `event`.
    pub unsafe fn after_row_of(
        &self,
        event: Event,
        old: pg_sys::HeapTuple,
        new: *mut pg_sys::TupleTableSlot,
    ) {
        // SAFETY: as before_row_of; the trigger code copies the rows into the query's
        // tuplestore (a partition's transition rows in the table's layout).
        unsafe {
            let capture = self.capture_of(event);
            if !self.partitioned {
                return fire_after(self.estate, self.info, capture, event, old, new);
            }
            if let Some((partition, old, new)) = self.in_partition(event, old, new) {
                fire_after(self.estate, partition.info, capture, event, old, new);
            }
        }
    }

    /// The partition a row belongs in — an INSERT's new row, the old row of an UPDATE or
    /// DELETE —, with the old and new row in its layout.
    unsafe fn in_partition(
        &self,
        event: Event,
        old: pg_sys::HeapTuple,
        new: *mut pg_sys::TupleTableSlot,
    ) -> Option<(&Partition, pg_sys::HeapTuple, *mut pg_sys::TupleTableSlot)> {
        // SAFETY: the rows are in the table's layout; the copies are made in the current
        // (per-row) memory.
        unsafe {
            let routed = match event {
                Event::Insert => new,
                _ => {
                    pg_sys::ExecForceStoreHeapTuple(old, self.table_old, false);
                    self.table_old
                }
            };
            let slot_of = |partition: &Partition| match event {
                Event::Insert => partition.new,
                _ => partition.old,
            };
            let partition = self.partition_of(routed, slot_of, None)?;
            let old = match old.is_null() {
                true => std::ptr::null_mut(),
                false => pg_sys::ExecCopySlotHeapTuple(partition.old),
            };
            let new = match (new.is_null(), event) {
                (true, _) => std::ptr::null_mut(),
                (false, Event::Insert) => partition.new,
                (false, _) => convert(partition.to_partition, new, partition.new),
            };
            Some((partition, old, new))
        }
    }

    /// The partition whose constraint the row in `row` (the table's layout) meets, other than
    /// `except`, trying the last one found first; the row is converted into the partition's
    /// `slot_of` to be checked.
    unsafe fn partition_of(
        &self,
        row: *mut pg_sys::TupleTableSlot,
        slot_of: impl Fn(&Partition) -> *mut pg_sys::TupleTableSlot,
        except: Option<&Partition>,
    ) -> Option<&Partition> {
        // SAFETY: as in_partition.
        unsafe {
            let count = self.partitions.len();
            let first = self.last_partition.get();
            let index = (0..count).map(|k| (first + k) % count).find(|i| {
                let partition = &self.partitions[*i];
                if except.is_some_and(|e| std::ptr::eq(e, partition)) {
                    return false;
                }
                let slot = convert(partition.to_partition, row, slot_of(partition));
                pg_sys::ExecPartitionCheck(partition.info, slot, self.estate, false)
            })?;
            self.last_partition.set(index);
            Some(&self.partitions[index])
        }
    }
}

impl Partition {
    /// Opens leaf partition `oid` of the table written (`table_info`) for its triggers.
    unsafe fn open(
        oid: pg_sys::Oid,
        estate: *mut pg_sys::EState,
        table_info: *mut pg_sys::ResultRelInfo,
    ) -> Partition {
        // SAFETY: locked as PostgreSQL locks a partition it routes rows to; the result
        // relation lives in the query's memory.
        unsafe {
            let opened = pg_sys::table_open(oid, pg_sys::RowExclusiveLock as i32);
            let info = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
                .cast::<pg_sys::ResultRelInfo>();
            // The table's result relation is the partition's root, as for a row PostgreSQL
            // routes: the columns an UPDATE sets (for `UPDATE OF` triggers) and the transition
            // tables' rows go through the maps between their layouts.
            pg_sys::InitResultRelInfo(info, opened, 0, table_info, 0);
            let tupdesc = (*opened).rd_att;
            let table_tupdesc = (*(*table_info).ri_RelationDesc).rd_att;
            let to_partition = pg_sys::convert_tuples_by_name(table_tupdesc, tupdesc);
            let to_table = pg_sys::convert_tuples_by_name(tupdesc, table_tupdesc);
            (*info).ri_RootToPartitionMap = to_partition;
            (*info).ri_ChildToRootMap = to_table;
            (*info).ri_ChildToRootMapValid = true;
            let slot = || pg_sys::ExecInitExtraTupleSlot(estate, tupdesc, &pg_sys::TTSOpsVirtual);
            let (old, new) = (slot(), slot());
            // The partition constraint is built (and cached in the relation cache's entry)
            // before the private copy below, which would keep it where nothing frees it.
            pg_sys::ExecStoreAllNullTuple(new);
            pg_sys::ExecPartitionCheck(info, new, estate, false);
            pg_sys::ExecClearTuple(new);
            keep_event_rows(estate, info);
            Partition {
                info,
                opened,
                old,
                new,
                to_partition,
                to_table,
            }
        }
    }
}

/// `from`'s row in `to` through `map` (null: the same layout); returns `to`.
unsafe fn convert(
    map: *mut pg_sys::TupleConversionMap,
    from: *mut pg_sys::TupleTableSlot,
    to: *mut pg_sys::TupleTableSlot,
) -> *mut pg_sys::TupleTableSlot {
    // SAFETY: the slots have the map's layouts (or one layout when it is null).
    unsafe {
        match map.is_null() {
            true => pg_sys::ExecCopySlot(to, from),
            false => {
                pg_sys::execute_attr_map_slot((*map).attrMap, from, to);
                pg_sys::ExecMaterializeSlot(to);
                to
            }
        }
    }
}

/// Makes result relation `info` keep the rows of its AFTER ROW events and fire only user
/// triggers: it gets a private copy of its relation entry that says it is a foreign table (see
/// the module comment), and is registered where PostgreSQL finds it when it fires the events.
unsafe fn keep_event_rows(estate: *mut pg_sys::EState, info: *mut pg_sys::ResultRelInfo) {
    // SAFETY: info was set up by InitResultRelInfo for this estate; its descriptor is its
    // own copy, changed here before anything reads it. The relation copy lives in the
    // query's memory, as long as the events queued with it; its pointers are the open
    // relation's, which the statement keeps open and locked.
    unsafe {
        let memory = (*estate).es_query_cxt;
        let relation =
            pg_sys::MemoryContextAlloc(memory, std::mem::size_of::<pg_sys::RelationData>())
                .cast::<pg_sys::RelationData>();
        *relation = *(*info).ri_RelationDesc;
        let form =
            pg_sys::MemoryContextAlloc(memory, std::mem::size_of::<pg_sys::FormData_pg_class>())
                .cast::<pg_sys::FormData_pg_class>();
        *form = *(*relation).rd_rel;
        (*form).relkind = pg_sys::RELKIND_FOREIGN_TABLE as std::ffi::c_char;
        (*relation).rd_rel = form;
        (*info).ri_RelationDesc = relation;
        (*estate).es_opened_result_relations =
            pg_sys::lappend((*estate).es_opened_result_relations, info.cast());
        let trigdesc = (*info).ri_TrigDesc;
        if !trigdesc.is_null() {
            keep_user_triggers(trigdesc);
        }
    }
}

/// Fires the BEFORE ROW triggers of `event` of result relation `info` (rows in its layout).
unsafe fn fire_before(
    estate: *mut pg_sys::EState,
    info: *mut pg_sys::ResultRelInfo,
    event: Event,
    old: pg_sys::HeapTuple,
    new: *mut pg_sys::TupleTableSlot,
) -> bool {
    // SAFETY: without a ctid, the trigger code takes the old row as given (as for a foreign
    // table) instead of reading the table.
    unsafe {
        let trigdesc = (*info).ri_TrigDesc;
        if trigdesc.is_null() {
            return true;
        }
        match event {
            Event::Insert if (*trigdesc).trig_insert_before_row => {
                pg_sys::ExecBRInsertTriggers(estate, info, new)
            }
            Event::Update if (*trigdesc).trig_update_before_row => pg_sys::ExecBRUpdateTriggers(
                estate,
                std::ptr::null_mut(),
                info,
                std::ptr::null_mut(),
                old,
                new,
                std::ptr::null_mut(),
            ),
            Event::Delete if (*trigdesc).trig_delete_before_row => pg_sys::ExecBRDeleteTriggers(
                estate,
                std::ptr::null_mut(),
                info,
                std::ptr::null_mut(),
                old,
                std::ptr::null_mut(),
            ),
            _ => true,
        }
    }
}

/// Queues the AFTER ROW triggers of `event` of result relation `info` and the transition rows
/// of `capture`.
unsafe fn fire_after(
    estate: *mut pg_sys::EState,
    info: *mut pg_sys::ResultRelInfo,
    capture: *mut pg_sys::TransitionCaptureState,
    event: Event,
    old: pg_sys::HeapTuple,
    new: *mut pg_sys::TupleTableSlot,
) {
    // SAFETY: as fire_before.
    unsafe {
        match event {
            Event::Insert => {
                pg_sys::ExecARInsertTriggers(estate, info, new, std::ptr::null_mut(), capture)
            }
            Event::Update => pg_sys::ExecARUpdateTriggers(
                estate,
                info,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                old,
                new,
                std::ptr::null_mut(),
                capture,
                false,
            ),
            Event::Delete => pg_sys::ExecARDeleteTriggers(
                estate,
                info,
                std::ptr::null_mut(),
                old,
                capture,
                false,
            ),
        }
    }
}

/// Drops the foreign-key triggers from `trigdesc` and recomputes its summary flags.
unsafe fn keep_user_triggers(trigdesc: *mut pg_sys::TriggerDesc) {
    // SAFETY: trigdesc is a private copy; its array is shortened in place.
    unsafe {
        let all =
            std::slice::from_raw_parts_mut((*trigdesc).triggers, (*trigdesc).numtriggers as usize);
        let mut kept = 0;
        for i in 0..all.len() {
            if !all[i].tgisinternal {
                all.swap(kept, i);
                kept += 1;
            }
        }
        let desc = &mut *trigdesc;
        desc.numtriggers = kept as i32;
        let flags = [
            &mut desc.trig_insert_before_row,
            &mut desc.trig_insert_after_row,
            &mut desc.trig_insert_instead_row,
            &mut desc.trig_insert_before_statement,
            &mut desc.trig_insert_after_statement,
            &mut desc.trig_update_before_row,
            &mut desc.trig_update_after_row,
            &mut desc.trig_update_instead_row,
            &mut desc.trig_update_before_statement,
            &mut desc.trig_update_after_statement,
            &mut desc.trig_delete_before_row,
            &mut desc.trig_delete_after_row,
            &mut desc.trig_delete_instead_row,
            &mut desc.trig_delete_before_statement,
            &mut desc.trig_delete_after_statement,
            &mut desc.trig_truncate_before_statement,
            &mut desc.trig_truncate_after_statement,
            &mut desc.trig_insert_new_table,
            &mut desc.trig_update_old_table,
            &mut desc.trig_update_new_table,
            &mut desc.trig_delete_old_table,
        ];
        for flag in flags {
            *flag = false;
        }
        for trigger in &all[..kept] {
            let t = trigger.tgtype as u32;
            let row = t & pg_sys::TRIGGER_TYPE_ROW != 0;
            let timing = t & pg_sys::TRIGGER_TYPE_TIMING_MASK;
            let before = timing == pg_sys::TRIGGER_TYPE_BEFORE;
            let after = timing == pg_sys::TRIGGER_TYPE_AFTER;
            let instead = timing == pg_sys::TRIGGER_TYPE_INSTEAD;
            let old_table = !trigger.tgoldtable.is_null();
            let new_table = !trigger.tgnewtable.is_null();
            if t & pg_sys::TRIGGER_TYPE_INSERT != 0 {
                desc.trig_insert_before_row |= row && before;
                desc.trig_insert_after_row |= row && after;
                desc.trig_insert_instead_row |= row && instead;
                desc.trig_insert_before_statement |= !row && before;
                desc.trig_insert_after_statement |= !row && after;
                desc.trig_insert_new_table |= new_table;
            }
            if t & pg_sys::TRIGGER_TYPE_UPDATE != 0 {
                desc.trig_update_before_row |= row && before;
                desc.trig_update_after_row |= row && after;
                desc.trig_update_instead_row |= row && instead;
                desc.trig_update_before_statement |= !row && before;
                desc.trig_update_after_statement |= !row && after;
                desc.trig_update_old_table |= old_table;
                desc.trig_update_new_table |= new_table;
            }
            if t & pg_sys::TRIGGER_TYPE_DELETE != 0 {
                desc.trig_delete_before_row |= row && before;
                desc.trig_delete_after_row |= row && after;
                desc.trig_delete_instead_row |= row && instead;
                desc.trig_delete_before_statement |= !row && before;
                desc.trig_delete_after_statement |= !row && after;
                desc.trig_delete_old_table |= old_table;
            }
            if t & pg_sys::TRIGGER_TYPE_TRUNCATE != 0 {
                desc.trig_truncate_before_statement |= !row && before;
                desc.trig_truncate_after_statement |= !row && after;
            }
        }
    }
}

/// The triggers of a COPY FROM into a distributed or reference table, which runs outside the
/// executor: an executor state of its own, as PostgreSQL's COPY sets up for its triggers.
pub struct CopyTriggers {
    pub triggers: Triggers,
    /// A slot of the table's layout for the rows the row triggers see.
    pub slot: *mut pg_sys::TupleTableSlot,
}

impl CopyTriggers {
    /// Fires the BEFORE STATEMENT triggers of a COPY into `relation` (open, locked for writing).
    pub unsafe fn begin(relation: pg_sys::Relation) -> CopyTriggers {
        // SAFETY: a fresh executor state with the table as its only range-table entry and
        // result relation, freed by end(); the after-trigger queue gets a query level of its
        // own, as for any statement.
        unsafe {
            let estate = pg_sys::CreateExecutorState();
            let rte = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>())
                .cast::<pg_sys::RangeTblEntry>();
            (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
            (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
            (*rte).relid = (*relation).rd_id;
            (*rte).relkind = (*(*relation).rd_rel).relkind;
            (*rte).rellockmode = pg_sys::RowExclusiveLock as i32;
            (*rte).requiredPerms = pg_sys::ACL_INSERT as pg_sys::AclMode;
            pg_sys::ExecInitRangeTable(estate, pg_sys::lappend(std::ptr::null_mut(), rte.cast()));
            let info = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
                .cast::<pg_sys::ResultRelInfo>();
            pg_sys::InitResultRelInfo(info, relation, 1, std::ptr::null_mut(), 0);
            pg_sys::AfterTriggerBeginQuery();
            let triggers = Triggers::new(estate, info, Event::Insert, false, &[]);
            triggers.before_statement();
            let slot =
                pg_sys::ExecInitExtraTupleSlot(estate, (*relation).rd_att, &pg_sys::TTSOpsVirtual);
            CopyTriggers { triggers, slot }
        }
    }

    /// Frees the memory a row's triggers used.
    pub fn next_row(&self) {
        // SAFETY: the estate's per-tuple memory holds nothing that outlives a row.
        unsafe {
            let per_tuple = (*self.triggers.estate).es_per_tuple_exprcontext;
            if !per_tuple.is_null() {
                pg_sys::MemoryContextReset((*per_tuple).ecxt_per_tuple_memory);
            }
        }
    }

    /// Fires the AFTER STATEMENT triggers and every queued AFTER event, then frees the state.
    pub fn end(mut self) {
        // SAFETY: the state begin() made, used by nothing after this.
        unsafe {
            self.triggers.after_statement();
            let estate = self.triggers.estate;
            pg_sys::AfterTriggerEndQuery(estate);
            self.triggers.close();
            pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(estate);
        }
    }
}
