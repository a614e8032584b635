//! Writes rows into the shards of one distributed or reference table.
//!
//! Each row goes to the shard its distribution column picks (hash, range, or the single shard
//! of a reference table) and is buffered per shard — as COPY text, or as an `INSERT … VALUES`
//! list when the statement has `ON CONFLICT` or `RETURNING`. Full buffers are flushed on the
//! participant connections of the coordinator transaction: one round trip per node, all nodes at
//! once, every placement of each shard. Values travel as the text of their output functions,
//! with the session settings that shape that text.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::sync::Arc;

use bytes::Bytes;
use pgrx::pg_sys;
use pgrx::prelude::*;
use tokio_postgres::SimpleQueryMessage;

use crate::cluster::target_for;
use crate::distribution::data_move::{push_copy_row, push_copy_value};
use crate::distribution::hashing;
use crate::distribution::shell::with_suffix;
use crate::error::{raise, PgError};
use crate::executor::copy_stream::{Batch, CopyStreams, LaneFailure};
use crate::executor::fragments::{note_prepared, statement_text, FragmentSql, TextRow};
use crate::metadata::cache;
use crate::metadata::tables::Method;
use crate::planner::range_pruning::RangeMap;
use crate::remote::quote::{quote_identifier, quote_literal, quote_qualified};
use crate::remote::{runtime, NodeAddress};
use crate::transaction::remote_xact;

/// INSERT: a shard's buffer is flushed with the others once any buffer holds this many rows …
const FLUSH_ROWS: u64 = 1_000;
/// … or all buffers together this many bytes (COPY: every buffer is sent then).
const FLUSH_BYTES: usize = 8 << 20;
/// COPY: a shard's buffer is sent on its own once it holds this many bytes. Big batches keep
/// the number of `COPY` statements low, each of which has a fixed cost on the worker.
const COPY_BATCH_BYTES: usize = 512 << 10;
/// COPY: the lanes are pumped every this many rows.
const PUMP_ROWS: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("null value in distribution column \"{column}\" of relation \"{table}\"")]
    NullDistributionValue { table: String, column: String },
    #[error("no shard of \"{table}\" holds the value {value} of column \"{column}\"")]
    NoShard {
        table: String,
        column: String,
        value: String,
    },
    /// PostgreSQL's own error for a MERGE whose actions change a target row twice.
    #[error("MERGE command cannot affect row a second time")]
    MergeRowTwice,
    /// PostgreSQL's own error for an upsert whose new row belongs in another partition.
    #[error("invalid ON UPDATE specification")]
    UpsertChangesPartition,
}

impl PgError for WriteError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            WriteError::NullDistributionValue { .. } => PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
            WriteError::NoShard { .. } => PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,
            WriteError::UpsertChangesPartition => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            WriteError::MergeRowTwice => PgSqlErrorCode::ERRCODE_CARDINALITY_VIOLATION,
        }
    }
    fn detail(&self) -> Option<String> {
        match self {
            WriteError::UpsertChangesPartition => Some(
                "The result tuple would appear in a different partition than the original tuple."
                    .into(),
            ),
            _ => None,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            WriteError::NullDistributionValue { .. } => {
                Some("Every row needs a value in the distribution column.".into())
            }
            WriteError::NoShard { .. } => {
                Some("The table's range shards do not cover this value.".into())
            }
            WriteError::UpsertChangesPartition => Some(
                "An upsert may not move a row to another partition; change the partition key \
                 with an UPDATE."
                    .into(),
            ),
            WriteError::MergeRowTwice => {
                Some("Ensure that not more than one source row matches any one target row.".into())
            }
        }
    }
}

/// How rows are sent.
pub enum WriteKind {
    /// `COPY … FROM STDIN` into each shard.
    Copy,
    /// `INSERT INTO <shard> AS <alias> (…) VALUES … <on_conflict> [RETURNING every column]`;
    /// `{constraint}` in `on_conflict` becomes the shard's copy of `conflict_constraint`.
    Insert {
        alias: String,
        on_conflict: String,
        conflict_constraint: String,
        returning: bool,
    },
}

/// How one field is parsed in [`ShardWriter::add_fields`].
struct FieldInput {
    input: Box<pg_sys::FmgrInfo>,
    io_param: pg_sys::Oid,
    typmod: i32,
}

struct OutputColumn {
    /// 0-based position in the row (attno - 1).
    index: usize,
    output: Box<pg_sys::FmgrInfo>,
}

enum Router {
    Hash {
        type_oid: pg_sys::Oid,
        /// Shard ids by shard index.
        shards: Vec<i64>,
    },
    Range(RangeMap),
    Single(i64),
}

pub struct ShardWriter {
    kind: WriteKind,
    relid: pg_sys::Oid,
    table_name: String,
    schema: String,
    name: String,
    /// Stored columns (not dropped, not generated), in attribute order.
    columns: Vec<OutputColumn>,
    column_list: String,
    /// Every non-dropped column, for RETURNING.
    all_columns: String,
    distribution: Option<(usize, String)>,
    /// Set by [`ShardWriter::expect_fields`]: every field's input, and which field holds the
    /// distribution column.
    field_inputs: Vec<FieldInput>,
    field_names: Vec<String>,
    distribution_field: Option<usize>,
    router: Router,
    /// Nodes of each shard's placements, the first serving reads and RETURNING.
    placements: BTreeMap<i64, Vec<NodeAddress>>,
    /// Per shard: the rows buffered for it, and their numbers in the input (1-based).
    buffers: BTreeMap<i64, (Vec<u8>, Vec<u64>)>,
    buffered_bytes: usize,
    /// COPY: the batches on their way to the nodes.
    streams: CopyStreams,
    rows_added: u64,
    /// Rows written (counted on the first placement of each shard).
    pub processed: u64,
    /// RETURNING rows: every non-dropped column as text.
    pub returned: Vec<TextRow>,
}

impl ShardWriter {
    /// A writer for distributed table `relid`, whose rows have the table's attribute layout.
    pub unsafe fn new(relid: pg_sys::Oid, kind: WriteKind) -> ShardWriter {
        let Some(table) = cache::lookup(relid) else {
            pgrx::error!("pgdist: relation {relid:?} is not distributed");
        };
        // SAFETY: catalog lookups for an open relation; the FmgrInfos are owned by the writer.
        unsafe {
            let relation = pg_sys::RelationIdGetRelation(relid);
            let tupdesc = (*relation).rd_att;
            let mut columns = Vec::new();
            let mut names = Vec::new();
            let mut all_names = Vec::new();
            let mut distribution = None;
            for i in 0..(*tupdesc).natts as usize {
                let attribute = (*tupdesc).attrs.as_ptr().add(i);
                if (*attribute).attisdropped {
                    continue;
                }
                let name = CStr::from_ptr((*attribute).attname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                all_names.push(quote_identifier(&name));
                if table.distribution_column.as_deref() == Some(name.as_str()) {
                    distribution = Some((i, name.clone()));
                }
                if (*attribute).attgenerated != 0 {
                    continue;
                }
                let mut output = pg_sys::InvalidOid;
                let mut varlena = false;
                pg_sys::getTypeOutputInfo((*attribute).atttypid, &mut output, &mut varlena);
                let mut finfo = Box::new(pg_sys::FmgrInfo::default());
                pg_sys::fmgr_info(output, &mut *finfo);
                columns.push(OutputColumn {
                    index: i,
                    output: finfo,
                });
                names.push(quote_identifier(&name));
            }
            let distribution_type = distribution
                .as_ref()
                .map(|(i, _)| (*(*tupdesc).attrs.as_ptr().add(*i)).atttypid);
            pg_sys::RelationClose(relation);
            let placements_list = cache::placements(relid);
            let mut placements: BTreeMap<i64, Vec<NodeAddress>> = BTreeMap::new();
            for placement in placements_list.iter() {
                placements
                    .entry(placement.shard_id)
                    .or_default()
                    .push(placement.node.clone());
            }
            let router = match (table.method, distribution_type) {
                (Method::Hash, Some(type_oid)) => Router::Hash {
                    type_oid,
                    shards: cache::shards(relid).into_iter().map(|(id, _)| id).collect(),
                },
                (Method::Range, Some(_)) => match RangeMap::new(&table, &placements_list) {
                    Some(map) => Router::Range(map),
                    None => pgrx::error!("pgdist: range table without an ordered column type"),
                },
                _ => Router::Single(placements.keys().next().copied().unwrap_or_default()),
            };
            let (schema, name) = crate::executor::schema_and_name(relid);
            ShardWriter {
                kind,
                relid,
                table_name: name.clone(),
                schema,
                name,
                columns,
                column_list: names.join(", "),
                all_columns: all_names.join(", "),
                distribution,
                field_inputs: Vec::new(),
                field_names: Vec::new(),
                distribution_field: None,
                router,
                placements,
                buffers: BTreeMap::new(),
                buffered_bytes: 0,
                streams: CopyStreams::default(),
                rows_added: 0,
                processed: 0,
                returned: Vec::new(),
            }
        }
    }

    fn shard_relation(&self, shard_id: i64) -> String {
        quote_qualified(
            &self.schema,
            &with_suffix(&self.name, &shard_id.to_string()),
        )
    }

    /// The text of value `datum` of column `column` (its output function).
    unsafe fn text_of(column: &mut OutputColumn, datum: pg_sys::Datum) -> String {
        // SAFETY: the column's own output function on a non-NULL value of its type; the C
        // string is copied and freed at once.
        unsafe {
            let text = pg_sys::OutputFunctionCall(&mut *column.output, datum);
            let owned = CStr::from_ptr(text).to_string_lossy().into_owned();
            pg_sys::pfree(text.cast());
            owned
        }
    }

    /// The shard whose distribution column holds `value` (None: NULL).
    unsafe fn shard_of(&mut self, value: Option<pg_sys::Datum>) -> i64 {
        let Some((index, column)) = self.distribution.clone() else {
            if let Router::Single(id) = self.router {
                return id;
            }
            pgrx::error!("pgdist: table without distribution column");
        };
        let Some(value) = value else {
            raise(WriteError::NullDistributionValue {
                table: self.table_name.clone(),
                column,
            });
        };
        let found = match &self.router {
            Router::Hash { type_oid, shards } => hashing::hash_datum(*type_oid, value)
                .map(|hash| hashing::hash_shard_index(hash, shards.len() as i32))
                .and_then(|i| shards.get(i as usize).copied()),
            Router::Range(map) => map.shard_for(value),
            Router::Single(id) => Some(*id),
        };
        found.unwrap_or_else(|| {
            let text = self
                .columns
                .iter_mut()
                .find(|c| c.index == index)
                // SAFETY: a non-NULL value of that column.
                .map(|c| unsafe { Self::text_of(c, value) })
                .unwrap_or_default();
            raise(WriteError::NoShard {
                table: self.table_name.clone(),
                column,
                value: text,
            })
        })
    }

    /// Runs `f`, which reads the next row to be added, naming that row in its errors.
    pub fn reading_next_row<R>(&self, f: impl FnOnce() -> R) -> R {
        let row = self.rows_added + 1;
        in_row(|| format!("COPY {}, row {row}", self.table_name), f)
    }

    /// The shard of one row (the table's attribute layout).
    pub unsafe fn shard_for(&mut self, values: &[pg_sys::Datum], nulls: &[bool]) -> i64 {
        // SAFETY: as in add.
        unsafe {
            let distribution = self.distribution.as_ref().map(|(i, _)| *i);
            self.shard_of(distribution.and_then(|i| (!nulls[i]).then(|| values[i])))
        }
    }

    /// Buffers one row (the table's attribute layout); flushes when the buffers are full.
    pub unsafe fn add(&mut self, values: &[pg_sys::Datum], nulls: &[bool]) {
        // SAFETY: values/nulls describe one row of the table; see text_of.
        unsafe {
            let distribution = self.distribution.as_ref().map(|(i, _)| *i);
            let value = distribution.and_then(|i| (!nulls[i]).then(|| values[i]));
            let shard_id = self.shard_of(value);
            let (buffer, rows) = self.buffers.entry(shard_id).or_default();
            let before = buffer.len();
            if matches!(self.kind, WriteKind::Insert { .. }) {
                if !rows.is_empty() {
                    buffer.push(b',');
                }
                buffer.push(b'(');
                for (i, column) in self.columns.iter_mut().enumerate() {
                    if i > 0 {
                        buffer.push(b',');
                    }
                    if nulls[column.index] {
                        buffer.extend_from_slice(b"NULL");
                    } else {
                        let text = Self::text_of(column, values[column.index]);
                        buffer.extend_from_slice(quote_literal(&text).as_bytes());
                    }
                }
                buffer.push(b')');
            } else {
                for (i, column) in self.columns.iter_mut().enumerate() {
                    if i > 0 {
                        buffer.push(b'\t');
                    }
                    if nulls[column.index] {
                        push_copy_value(buffer, None);
                    } else {
                        let text =
                            pg_sys::OutputFunctionCall(&mut *column.output, values[column.index]);
                        push_copy_value(buffer, Some(CStr::from_ptr(text).to_bytes()));
                        pg_sys::pfree(text.cast());
                    }
                }
                buffer.push(b'\n');
            }
            rows.push(self.rows_added + 1);
            let added = buffer.len() - before;
            self.row_buffered(shard_id, added);
        }
    }

    /// COPY from text: rows will come as fields in the order of `attnums` (1-based attribute
    /// numbers of every stored column), see [`ShardWriter::add_fields`].
    pub unsafe fn expect_fields(&mut self, attnums: &[i16]) {
        // SAFETY: catalog lookups for the open relation; the FmgrInfo is owned by the writer.
        unsafe {
            let relation = pg_sys::RelationIdGetRelation(self.relid);
            let tupdesc = (*relation).rd_att;
            let mut names = Vec::new();
            self.field_inputs.clear();
            self.field_names.clear();
            for &attnum in attnums {
                let attribute = (*tupdesc).attrs.as_ptr().add(attnum as usize - 1);
                let name = CStr::from_ptr((*attribute).attname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                names.push(quote_identifier(&name));
                self.field_names.push(name);
                let (finfo, io_param) = crate::executor::input_function((*attribute).atttypid);
                self.field_inputs.push(FieldInput {
                    input: finfo,
                    io_param,
                    typmod: (*attribute).atttypmod,
                });
            }
            pg_sys::RelationClose(relation);
            self.column_list = names.join(", ");
            self.distribution_field = self.distribution.as_ref().and_then(|(index, _)| {
                attnums
                    .iter()
                    .position(|&attnum| attnum as usize - 1 == *index)
            });
        }
    }

    /// COPY from text: buffers one row given as the text of its fields (NULL pointers for
    /// NULLs), in the order set by [`ShardWriter::expect_fields`]. Only the distribution
    /// column is parsed here; the row travels as the text it came in and the workers parse
    /// the rest (when one cannot, [`ShardWriter::fail`] finds the row).
    pub unsafe fn add_fields(&mut self, fields: &[*mut std::ffi::c_char]) {
        // SAFETY: the fields are NUL-terminated strings (or NULL) that live while this runs.
        unsafe {
            let row = self.rows_added + 1;
            let value = self.parse_fields(row, fields, false);
            let shard_id = self.shard_of(value);
            let (buffer, rows) = self.buffers.entry(shard_id).or_default();
            let before = buffer.len();
            push_copy_row(
                buffer,
                fields
                    .iter()
                    .map(|&field| (!field.is_null()).then(|| CStr::from_ptr(field).to_bytes())),
            );
            rows.push(row);
            let added = buffer.len() - before;
            self.row_buffered(shard_id, added);
        }
    }

    /// Runs the input functions of row `row`'s fields — all of them, or only the distribution
    /// column's — raising PostgreSQL's error for a value that does not parse, with the row
    /// and column as detail. The distribution column's value (None: NULL or no such column).
    unsafe fn parse_fields(
        &mut self,
        row: u64,
        fields: &[*mut std::ffi::c_char],
        all: bool,
    ) -> Option<pg_sys::Datum> {
        let field = std::cell::Cell::new(0);
        let (table, names) = (&self.table_name, &self.field_names);
        let place = || {
            let name = names.get(field.get()).map_or("", String::as_str);
            format!("COPY {table}, row {row}, column {name}")
        };
        let inputs = &mut self.field_inputs;
        let distribution_field = self.distribution_field;
        in_row(place, || {
            let mut value = None;
            for (i, (input, &text)) in inputs.iter_mut().zip(fields).enumerate() {
                let distribution = Some(i) == distribution_field;
                if !all && !distribution {
                    continue;
                }
                field.set(i);
                // SAFETY: the column's input function on its text (or NULL, which domain
                // input functions check too, as COPY does).
                let datum = unsafe {
                    pg_sys::InputFunctionCall(&mut *input.input, text, input.io_param, input.typmod)
                };
                if distribution && !text.is_null() {
                    value = Some(datum);
                }
            }
            value
        })
    }

    /// Raises a lane's error. When the rows of its batch travelled as their input text, looks
    /// first for a value the node could not read, to name its row and column as PostgreSQL's
    /// own COPY would.
    fn fail(&mut self, failure: Box<LaneFailure>) -> ! {
        if let (Some(batch), false) = (&failure.batch, self.field_inputs.is_empty()) {
            let lines = batch.data.split(|byte| *byte == b'\n');
            for (line, &row) in lines.zip(batch.input_rows.iter()) {
                let texts = copy_text_fields(line);
                let mut fields: Vec<*mut std::ffi::c_char> = texts
                    .iter()
                    .map(|t| {
                        t.as_ref()
                            .map_or(std::ptr::null_mut(), |t| t.as_ptr().cast_mut())
                    })
                    .collect();
                fields.resize(self.field_inputs.len(), std::ptr::null_mut());
                // SAFETY: the fields point into `texts`, alive during the call.
                unsafe { self.parse_fields(row, &fields, true) };
            }
        }
        raise(failure.error)
    }

    /// Sends buffers that are full after a row of `added` bytes went into `shard_id`'s.
    fn row_buffered(&mut self, shard_id: i64, added: usize) {
        self.buffered_bytes += added;
        self.rows_added += 1;
        if matches!(self.kind, WriteKind::Insert { .. }) {
            let shard_rows = self
                .buffers
                .get(&shard_id)
                .map_or(0, |(_, rows)| rows.len());
            if shard_rows as u64 >= FLUSH_ROWS || self.buffered_bytes >= FLUSH_BYTES {
                self.flush_inserts();
            }
        } else if self.buffered_bytes >= FLUSH_BYTES {
            self.send_copies();
        } else if self
            .buffers
            .get(&shard_id)
            .is_some_and(|(buffer, _)| buffer.len() >= COPY_BATCH_BYTES)
        {
            self.send_copy(shard_id);
        } else if self.rows_added.is_multiple_of(PUMP_ROWS) {
            if let Err(failure) = self.streams.pump() {
                self.fail(failure);
            }
        }
    }

    /// Sends what is still buffered and waits until every row is written.
    pub fn finish(&mut self) {
        match self.kind {
            WriteKind::Copy => {
                self.send_copies();
                match self.streams.finish() {
                    Ok(rows) => self.processed += rows,
                    Err(failure) => self.fail(failure),
                }
            }
            WriteKind::Insert { .. } => self.flush_inserts(),
        }
    }

    /// COPY: queues every buffered shard.
    fn send_copies(&mut self) {
        let shard_ids: Vec<i64> = self.buffers.keys().copied().collect();
        for shard_id in shard_ids {
            self.send_copy(shard_id);
        }
    }

    /// COPY: queues shard `shard_id`'s buffer for each of its placements.
    fn send_copy(&mut self, shard_id: i64) {
        let Some((data, rows)) = self.buffers.remove(&shard_id) else {
            return;
        };
        self.buffered_bytes -= data.len();
        let data = Bytes::from(data);
        let rows: Arc<[u64]> = rows.into();
        let sql = format!(
            "COPY {} ({}) FROM STDIN",
            self.shard_relation(shard_id),
            self.column_list
        );
        let nodes = self.placements.get(&shard_id).cloned().unwrap_or_default();
        for (i, node) in nodes.iter().enumerate() {
            let batch = Batch {
                sql: sql.clone(),
                data: data.clone(),
                input_rows: rows.clone(),
                counted: i == 0,
            };
            if let Err(failure) = self.streams.send(node, batch) {
                self.fail(failure);
            }
        }
    }

    /// INSERT: sends every buffered row to its shard and waits for the nodes.
    fn flush_inserts(&mut self) {
        let buffers = std::mem::take(&mut self.buffers);
        self.buffered_bytes = 0;
        if buffers.is_empty() {
            return;
        }
        let WriteKind::Insert {
            alias,
            on_conflict,
            conflict_constraint,
            returning,
        } = &self.kind
        else {
            return;
        };
        let alias = if alias.is_empty() {
            String::new()
        } else {
            format!(" AS {alias}")
        };
        let mut per_node: BTreeMap<i32, (NodeAddress, Vec<(FragmentSql, bool)>)> = BTreeMap::new();
        // Per node, the shards of its statements that return rows, in the order sent.
        let mut returning_shards: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        let mut input_rows: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
        let flushed: Vec<i64> = buffers.keys().copied().collect();
        for (shard_id, (data, rows)) in buffers {
            input_rows.insert(shard_id, rows);
            let mut sql = format!(
                "INSERT INTO {}{alias} ({}) OVERRIDING SYSTEM VALUE VALUES {}",
                self.shard_relation(shard_id),
                self.column_list,
                String::from_utf8_lossy(&data)
            );
            if !on_conflict.is_empty() {
                sql.push(' ');
                let constraint =
                    quote_identifier(&with_suffix(conflict_constraint, &shard_id.to_string()));
                sql.push_str(&on_conflict.replace("{constraint}", &constraint));
            }
            let nodes = self.placements.get(&shard_id).cloned().unwrap_or_default();
            for (i, node) in nodes.into_iter().enumerate() {
                let primary = i == 0;
                let statement = if *returning && primary {
                    returning_shards
                        .entry(node.node_id)
                        .or_default()
                        .push(shard_id);
                    format!("{sql} RETURNING {}", self.all_columns)
                } else {
                    sql.clone()
                };
                per_node
                    .entry(node.node_id)
                    .or_insert_with(|| (node.clone(), Vec::new()))
                    .1
                    .push((FragmentSql::plain(statement), primary));
            }
        }
        if crate::planner::modify_plan::is_conflict_update(on_conflict) {
            crate::executor::write_locks::lock_for_multi_node_write(flushed, per_node.len());
        }
        let (count, rows) = run_statements_by_statement(per_node.into_values().collect());
        self.processed += count;
        let rows_by_shard = returning_shards.into_values().flatten().zip(rows);
        self.returned
            .extend(in_input_order(rows_by_shard, &input_rows));
    }
}

/// RETURNING rows in the order their rows came in, as PostgreSQL returns them (applications
/// pair a multi-row INSERT's generated keys with their rows by position). Each shard's
/// statement returns its rows in the order of its VALUES, one per row sent; where it returned
/// fewer (`ON CONFLICT DO NOTHING`, `DO UPDATE … WHERE`) which rows are missing is unknown, and
/// its rows stay together, at the place of the shard's first row.
fn in_input_order(
    rows_by_shard: impl Iterator<Item = (i64, Vec<TextRow>)>,
    input_rows: &BTreeMap<i64, Vec<u64>>,
) -> Vec<TextRow> {
    let mut numbered = Vec::new();
    for (shard_id, rows) in rows_by_shard {
        let numbers = input_rows.get(&shard_id).map_or(&[][..], Vec::as_slice);
        let first = numbers.first().copied().unwrap_or(0);
        let every_row_returned = rows.len() == numbers.len();
        for (i, row) in rows.into_iter().enumerate() {
            let number = if every_row_returned {
                numbers[i]
            } else {
                first
            };
            numbered.push((number, row));
        }
    }
    numbered.sort_by_key(|(number, _)| *number);
    numbered.into_iter().map(|(_, row)| row).collect()
}

/// Runs each node's statements on its participant connection (nodes in parallel; statements of
/// a node in one round trip, those with parameters as prepared statements) and returns the row
/// count and RETURNING rows of the statements marked primary (the first placement of their
/// shard). The statements for other placements run once those are done: the first placement's
/// row locks order concurrent writes on every copy (`write_locks.rs`).
pub fn run_statements(work: Vec<(NodeAddress, Vec<(FragmentSql, bool)>)>) -> (u64, Vec<TextRow>) {
    let (count, rows) = run_statements_by_statement(work);
    (count, rows.into_iter().flatten().collect())
}

/// As [`run_statements`], with the rows of each statement marked primary apart, in the order of
/// the nodes and of each node's statements.
fn run_statements_by_statement(work: NodeWork) -> (u64, Vec<Vec<TextRow>>) {
    let (first, copies) = by_placement(work);
    let result = run_round(first, false);
    if !copies.is_empty() {
        run_round(copies, false);
    }
    result
}

/// As [`run_statements`], returning the rows of every statement (the first placements' first).
pub fn run_statements_all_rows(work: Vec<(NodeAddress, Vec<(FragmentSql, bool)>)>) -> Vec<TextRow> {
    let (first, copies) = by_placement(work);
    let mut rows = run_round(first, true).1;
    if !copies.is_empty() {
        rows.extend(run_round(copies, true).1);
    }
    rows.into_iter().flatten().collect()
}

type NodeWork = Vec<(NodeAddress, Vec<(FragmentSql, bool)>)>;

/// `work` split into the statements marked primary and the others.
fn by_placement(work: NodeWork) -> (NodeWork, NodeWork) {
    let mut first = Vec::with_capacity(work.len());
    let mut copies = Vec::new();
    for (node, jobs) in work {
        let (primary, other): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|(_, p)| *p);
        if !primary.is_empty() {
            first.push((node.clone(), primary));
        }
        if !other.is_empty() {
            copies.push((node, other));
        }
    }
    (first, copies)
}

/// One round trip per node, all nodes at once: the row count and rows of the statements marked
/// primary (of all statements with `all_rows`), one list per statement.
fn run_round(work: NodeWork, all_rows: bool) -> (u64, Vec<Vec<TextRow>>) {
    let targets = work
        .iter()
        .map(|(node, _)| target_for(node.clone()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|err| raise(err));
    // SAFETY: reads GUC values of this backend.
    let settings = unsafe { crate::executor::session::settings() };
    let mut checkout = remote_xact::checkout(&targets).unwrap_or_else(|err| raise(err));
    let mut plans = Vec::with_capacity(work.len());
    // Per node, how each statement went (prepared statements to remember once they worked).
    let mut sent_as = Vec::with_capacity(work.len());
    for (i, (_, jobs)) in work.into_iter().enumerate() {
        let mut prefix = checkout.take_prefix(i);
        let conn = &mut checkout.conns[i];
        if conn.session_settings != settings {
            prefix.push_str(&settings);
            conn.session_settings = settings.clone();
        }
        // PREPAREs go with the prefix: the statements' own results are counted from the end.
        let mut runs = Vec::with_capacity(jobs.len());
        let mut node_sent = Vec::with_capacity(jobs.len());
        for (job, primary) in jobs {
            let (prepare, run, sent) = statement_text(conn, &job);
            prefix.push_str(&prepare);
            runs.push((run, primary));
            node_sent.push(sent);
        }
        plans.push((prefix, runs));
        sent_as.push(node_sent);
    }
    if crate::gucs::log_remote_commands() {
        for ((prefix, jobs), conn) in plans.iter().zip(&checkout.conns) {
            for (sql, _) in jobs {
                pgrx::log!("pgdist: issuing on {}: {prefix}{sql}", conn.node);
            }
        }
    }
    let runs = checkout
        .conns
        .iter()
        .zip(plans)
        .map(|(conn, (prefix, jobs))| async move {
            let mut count = 0u64;
            let mut statements = prefix;
            let mut primaries = Vec::new();
            for (sql, primary) in jobs {
                statements.push_str(&sql);
                statements.push(';');
                primaries.push(primary);
            }
            let mut rows: Vec<Vec<TextRow>> = vec![Vec::new(); primaries.len()];
            if !statements.is_empty() {
                let messages = conn.simple_query(&statements).await?;
                // Rows and counts come statement by statement; the prefix's statements
                // (BEGIN, SAVEPOINT, SET) report counts too, so count from the end.
                let completes = messages
                    .iter()
                    .filter(|m| matches!(m, SimpleQueryMessage::CommandComplete(_)))
                    .count();
                let mut statement = primaries.len() as isize - completes as isize;
                for message in messages {
                    let index = usize::try_from(statement).ok();
                    let primary = index
                        .and_then(|i| primaries.get(i).copied())
                        .unwrap_or(false);
                    match message {
                        SimpleQueryMessage::Row(row) if primary || all_rows => {
                            if let Some(rows) = index.and_then(|i| rows.get_mut(i)) {
                                rows.push(
                                    (0..row.len())
                                        .map(|i| row.get(i).map(str::to_string))
                                        .collect::<TextRow>(),
                                );
                            }
                        }
                        SimpleQueryMessage::CommandComplete(n) => {
                            if primary {
                                count += n;
                            }
                            statement += 1;
                        }
                        _ => {}
                    }
                }
            }
            Ok::<_, crate::remote::RemoteError>((count, rows))
        });
    let results = match runtime::block_on(futures_util::future::join_all(runs)) {
        Ok(results) => results,
        Err(_) => runtime::raise_interrupt(),
    };
    for ((conn, node_sent), result) in checkout.conns.iter_mut().zip(sent_as).zip(&results) {
        for sent in node_sent {
            note_prepared(conn, sent, result.is_ok());
        }
    }
    checkout.finish();
    let mut count = 0;
    let mut rows = Vec::new();
    for result in results {
        match result {
            Ok((n, r)) => {
                count += n;
                rows.extend(r);
            }
            Err(err) => raise(err),
        }
    }
    (count, rows)
}

/// The fields of one line of COPY text as written by [`push_copy_row`] (None for `\\N`).
fn copy_text_fields(line: &[u8]) -> Vec<Option<CString>> {
    line.split(|byte| *byte == b'\t')
        .map(|field| {
            if field == b"\\N" {
                return None;
            }
            let mut text = Vec::with_capacity(field.len());
            let mut bytes = field.iter();
            while let Some(&byte) = bytes.next() {
                text.push(match (byte, bytes.clone().next()) {
                    (b'\\', Some(&escaped)) => {
                        bytes.next();
                        match escaped {
                            b't' => b'\t',
                            b'n' => b'\n',
                            b'r' => b'\r',
                            other => other,
                        }
                    }
                    _ => byte,
                });
            }
            CString::new(text).ok()
        })
        .collect()
}

/// Runs `f`, which works on one row of the input; a PostgreSQL error it raises gets `place()`
/// as detail (`COPY orders, row 1234, column amount`), since PostgreSQL's own COPY context
/// does not survive pgrx's error handling.
fn in_row<R>(place: impl Fn() -> String, f: impl FnOnce() -> R) -> R {
    use pg_sys::panic::{CaughtError, ErrorReport, ErrorReportWithLevel};
    let payload = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => return result,
        Err(payload) => payload,
    };
    let report = match payload.downcast_ref::<CaughtError>() {
        Some(CaughtError::PostgresError(report) | CaughtError::ErrorReport(report)) => report,
        _ => match payload.downcast_ref::<ErrorReportWithLevel>() {
            Some(report) => report,
            None => std::panic::resume_unwind(payload),
        },
    };
    if report.level() < PgLogLevel::ERROR {
        std::panic::resume_unwind(payload);
    }
    let detail = match report.detail() {
        Some(detail) => format!("{detail}\n{}", place()),
        None => place(),
    };
    let mut rethrown = ErrorReport::new(
        report.sql_error_code(),
        report.message().to_string(),
        "pgdist",
    )
    .set_detail(detail);
    if let Some(hint) = report.hint() {
        rethrown = rethrown.set_hint(hint);
    }
    rethrown.report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// Input functions for turning RETURNING text back into the table's Datums.
pub struct RowInput {
    columns: Vec<(usize, Box<pg_sys::FmgrInfo>, pg_sys::Oid, i32)>,
}

impl RowInput {
    /// For every non-dropped column of `tupdesc`, in order (what `all_columns` returns).
    pub unsafe fn new(tupdesc: pg_sys::TupleDesc) -> RowInput {
        let mut columns = Vec::new();
        // SAFETY: tupdesc is a valid descriptor; the FmgrInfos are owned here.
        unsafe {
            for i in 0..(*tupdesc).natts as usize {
                let attribute = (*tupdesc).attrs.as_ptr().add(i);
                if (*attribute).attisdropped {
                    continue;
                }
                let (finfo, io_param) = crate::executor::input_function((*attribute).atttypid);
                columns.push((i, finfo, io_param, (*attribute).atttypmod));
            }
        }
        RowInput { columns }
    }

    /// Stores `row` into `slot` as a virtual tuple.
    pub unsafe fn store(
        &mut self,
        row: &TextRow,
        slot: *mut pg_sys::TupleTableSlot,
    ) -> *mut pg_sys::TupleTableSlot {
        // SAFETY: slot has the table's descriptor; input functions of the column types.
        unsafe {
            pg_sys::ExecClearTuple(slot);
            let natts = (*(*slot).tts_tupleDescriptor).natts as usize;
            let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
            nulls.fill(true);
            for ((index, finfo, io_param, typmod), value) in self.columns.iter_mut().zip(row) {
                if let Some(text) = value {
                    let text = CString::new(text.as_str()).unwrap_or_default();
                    values[*index] = pg_sys::InputFunctionCall(
                        &mut **finfo,
                        text.as_ptr().cast_mut(),
                        *io_param,
                        *typmod,
                    );
                    nulls[*index] = false;
                }
            }
            pg_sys::ExecStoreVirtualTuple(slot)
        }
    }
}
