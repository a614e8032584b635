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

use bytes::Bytes;
use pgrx::pg_sys;
use pgrx::prelude::*;
use tokio_postgres::SimpleQueryMessage;

use crate::cluster::target_for;
use crate::distribution::data_move::push_copy_row;
use crate::distribution::hashing;
use crate::distribution::shell::with_suffix;
use crate::error::{raise, PgError};
use crate::executor::fragments::TextRow;
use crate::metadata::cache;
use crate::metadata::tables::Method;
use crate::planner::range_pruning::RangeMap;
use crate::remote::quote::{quote_identifier, quote_literal, quote_qualified};
use crate::remote::{runtime, NodeAddress};
use crate::transaction::remote_xact;

/// A shard's buffer is flushed with the others once any buffer holds this many rows …
const FLUSH_ROWS: u64 = 1_000;
/// … or all buffers together this many bytes.
const FLUSH_BYTES: usize = 8 << 20;

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
}

impl PgError for WriteError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            WriteError::NullDistributionValue { .. } => PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
            WriteError::NoShard { .. } => PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,
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
    table_name: String,
    schema: String,
    name: String,
    /// Stored columns (not dropped, not generated), in attribute order.
    columns: Vec<OutputColumn>,
    column_list: String,
    /// Every non-dropped column, for RETURNING.
    all_columns: String,
    distribution: Option<(usize, String)>,
    router: Router,
    /// Nodes of each shard's placements, the first serving reads and RETURNING.
    placements: BTreeMap<i64, Vec<NodeAddress>>,
    buffers: BTreeMap<i64, (Vec<u8>, u64)>,
    buffered_bytes: usize,
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
                table_name: name.clone(),
                schema,
                name,
                columns,
                column_list: names.join(", "),
                all_columns: all_names.join(", "),
                distribution,
                router,
                placements,
                buffers: BTreeMap::new(),
                buffered_bytes: 0,
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

    /// The shard row `values`/`nulls` (the table's attribute layout) belongs to.
    unsafe fn shard_of(&mut self, values: &[pg_sys::Datum], nulls: &[bool]) -> i64 {
        let Some((index, column)) = self.distribution.clone() else {
            if let Router::Single(id) = self.router {
                return id;
            }
            pgrx::error!("pgdist: table without distribution column");
        };
        if nulls[index] {
            raise(WriteError::NullDistributionValue {
                table: self.table_name.clone(),
                column,
            });
        }
        let value = values[index];
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

    /// Buffers one row (the table's attribute layout); flushes when the buffers are full.
    pub unsafe fn add(&mut self, values: &[pg_sys::Datum], nulls: &[bool]) {
        // SAFETY: values/nulls describe one row of the table; see text_of.
        unsafe {
            let shard_id = self.shard_of(values, nulls);
            let texts: Vec<Option<String>> = self
                .columns
                .iter_mut()
                .map(|c| (!nulls[c.index]).then(|| Self::text_of(c, values[c.index])))
                .collect();
            let insert = matches!(self.kind, WriteKind::Insert { .. });
            let (buffer, rows) = self.buffers.entry(shard_id).or_default();
            let before = buffer.len();
            if insert {
                if *rows > 0 {
                    buffer.push(b',');
                }
                buffer.push(b'(');
                for (i, text) in texts.iter().enumerate() {
                    if i > 0 {
                        buffer.push(b',');
                    }
                    match text {
                        Some(text) => buffer.extend_from_slice(quote_literal(text).as_bytes()),
                        None => buffer.extend_from_slice(b"NULL"),
                    }
                }
                buffer.push(b')');
            } else {
                push_copy_row(
                    buffer,
                    texts.iter().map(|t| t.as_deref().map(str::as_bytes)),
                );
            }
            *rows += 1;
            let full = *rows >= FLUSH_ROWS;
            self.buffered_bytes += buffer.len() - before;
            if full || self.buffered_bytes >= FLUSH_BYTES {
                self.flush();
            }
        }
    }

    /// Sends every buffered row to its shard.
    pub fn flush(&mut self) {
        let buffers = std::mem::take(&mut self.buffers);
        self.buffered_bytes = 0;
        if buffers.is_empty() {
            return;
        }
        let mut per_node: BTreeMap<i32, (NodeAddress, Vec<(Job, bool)>)> = BTreeMap::new();
        for (shard_id, (data, _)) in buffers {
            let relation = self.shard_relation(shard_id);
            let data = Bytes::from(data);
            let nodes = self.placements.get(&shard_id).cloned().unwrap_or_default();
            for (i, node) in nodes.into_iter().enumerate() {
                let primary = i == 0;
                let job = match &self.kind {
                    WriteKind::Copy => Job::Copy {
                        sql: format!("COPY {relation} ({}) FROM STDIN", self.column_list),
                        data: data.clone(),
                    },
                    WriteKind::Insert {
                        alias,
                        on_conflict,
                        conflict_constraint,
                        returning,
                    } => {
                        let alias = if alias.is_empty() {
                            String::new()
                        } else {
                            format!(" AS {alias}")
                        };
                        let mut sql = format!(
                            "INSERT INTO {relation}{alias} ({}) OVERRIDING SYSTEM VALUE VALUES {}",
                            self.column_list,
                            String::from_utf8_lossy(&data)
                        );
                        if !on_conflict.is_empty() {
                            sql.push(' ');
                            let constraint = quote_identifier(&with_suffix(
                                conflict_constraint,
                                &shard_id.to_string(),
                            ));
                            sql.push_str(&on_conflict.replace("{constraint}", &constraint));
                        }
                        if *returning && primary {
                            sql.push_str(&format!(" RETURNING {}", self.all_columns));
                        }
                        Job::Statement(sql)
                    }
                };
                per_node
                    .entry(node.node_id)
                    .or_insert_with(|| (node.clone(), Vec::new()))
                    .1
                    .push((job, primary));
            }
        }
        let (count, rows) = run_jobs(per_node.into_values().collect());
        self.processed += count;
        self.returned.extend(rows);
    }
}

/// One piece of work on one node.
pub enum Job {
    Copy { sql: String, data: Bytes },
    Statement(String),
}

/// Runs each node's jobs on its participant connection (nodes in parallel; statements of a node
/// in one round trip) and returns the row count and RETURNING rows of the jobs marked primary
/// (the first placement of their shard).
pub fn run_jobs(work: Vec<(NodeAddress, Vec<(Job, bool)>)>) -> (u64, Vec<TextRow>) {
    let targets = work
        .iter()
        .map(|(node, _)| target_for(node.clone()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|err| raise(err));
    // SAFETY: reads GUC values of this backend.
    let settings = unsafe { crate::executor::scan::session_settings() };
    let mut checkout = remote_xact::checkout(&targets).unwrap_or_else(|err| raise(err));
    let mut plans = Vec::with_capacity(work.len());
    for (i, (_, jobs)) in work.into_iter().enumerate() {
        let mut prefix = checkout.take_prefix(i);
        let conn = &mut checkout.conns[i];
        if conn.session_settings != settings {
            prefix.push_str(&settings);
            conn.session_settings = settings.clone();
        }
        plans.push((prefix, jobs));
    }
    if crate::gucs::log_remote_commands() {
        for ((prefix, jobs), conn) in plans.iter().zip(&checkout.conns) {
            for (job, _) in jobs {
                let sql = match job {
                    Job::Copy { sql, .. } => sql,
                    Job::Statement(sql) => sql,
                };
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
            let mut rows = Vec::new();
            let mut statements = prefix;
            let mut primaries = Vec::new();
            for (job, primary) in jobs {
                match job {
                    Job::Copy { sql, data } => {
                        if !statements.is_empty() {
                            conn.simple_query(&statements).await?;
                            statements.clear();
                        }
                        let copied = conn.copy_in(&sql, vec![data]).await?;
                        if primary {
                            count += copied;
                        }
                    }
                    Job::Statement(sql) => {
                        statements.push_str(&sql);
                        statements.push(';');
                        primaries.push(primary);
                    }
                }
            }
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
                    let primary = usize::try_from(statement)
                        .ok()
                        .and_then(|i| primaries.get(i).copied())
                        .unwrap_or(false);
                    match message {
                        SimpleQueryMessage::Row(row) if primary => rows.push(
                            (0..row.len())
                                .map(|i| row.get(i).map(str::to_string))
                                .collect::<TextRow>(),
                        ),
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
                let mut input = pg_sys::InvalidOid;
                let mut io_param = pg_sys::InvalidOid;
                pg_sys::getTypeInputInfo((*attribute).atttypid, &mut input, &mut io_param);
                let mut finfo = Box::new(pg_sys::FmgrInfo::default());
                pg_sys::fmgr_info(input, &mut *finfo);
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
