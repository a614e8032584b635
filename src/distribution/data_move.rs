//! Moving rows between the coordinator's local table and shards, in bounded batches.
//!
//! Into shards: an SPI cursor over the local table yields each value through its type's output
//! function (exactly what COPY would write); rows are appended to a per-shard buffer in COPY
//! text format and flushed with `COPY … FROM STDIN` on the participant connections of the
//! shard's placements once the buffers reach a few MiB. Out of shards: a cursor on the worker
//! is fetched in batches and inserted locally. Memory stays bounded either way.

use std::ffi::CStr;

use bytes::Bytes;
use pgrx::prelude::*;

use crate::distribution::shell::TableDefinition;
use crate::distribution::DistributionError;
use crate::remote::connection::NodeConnection;
use crate::remote::quote::{quote_identifier, quote_qualified};
use crate::remote::runtime;

const FETCH_ROWS: i64 = 5_000;
const FLUSH_SHARD_BYTES: usize = 1 << 20;
const FLUSH_TOTAL_BYTES: usize = 16 << 20;
const PROGRESS_EVERY: u64 = 250_000;

/// Appends one value in COPY text format (NULL as `\N`).
pub fn push_copy_value(buffer: &mut Vec<u8>, value: Option<&[u8]>) {
    let Some(value) = value else {
        buffer.extend_from_slice(b"\\N");
        return;
    };
    let mut plain_from = 0;
    for (i, &byte) in value.iter().enumerate() {
        let escaped: &[u8] = match byte {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        buffer.extend_from_slice(&value[plain_from..i]);
        buffer.extend_from_slice(escaped);
        plain_from = i + 1;
    }
    buffer.extend_from_slice(&value[plain_from..]);
}

/// Appends a whole row in COPY text format.
pub fn push_copy_row<'a>(buffer: &mut Vec<u8>, values: impl IntoIterator<Item = Option<&'a [u8]>>) {
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            buffer.push(b'\t');
        }
        push_copy_value(buffer, value);
    }
    buffer.push(b'\n');
}

/// The stored columns of `table`, quoted and comma-separated.
pub fn column_list(table: &TableDefinition) -> String {
    table
        .stored_columns()
        .map(|c| quote_identifier(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where one shard's rows go: its COPY command and the connections of its placements.
pub struct ShardSink {
    pub copy_sql: String,
    /// Indexes into the connection list passed to [`copy_local_rows`].
    pub connections: Vec<usize>,
}

impl ShardSink {
    pub fn new(table: &TableDefinition, shard_id: i64, connections: Vec<usize>) -> ShardSink {
        ShardSink {
            copy_sql: format!(
                "COPY {} ({}) FROM STDIN",
                table.shard_relation(shard_id),
                column_list(table)
            ),
            connections,
        }
    }
}

/// Sends the buffered rows to their shards: one COPY per shard and placement, nodes in parallel.
fn flush(
    buffers: &mut [Vec<u8>],
    sinks: &[ShardSink],
    conns: &[NodeConnection],
) -> Result<(), DistributionError> {
    let mut jobs: Vec<Vec<(&str, Bytes)>> = vec![Vec::new(); conns.len()];
    for (buffer, sink) in buffers.iter_mut().zip(sinks) {
        if buffer.is_empty() {
            continue;
        }
        let data = Bytes::from(std::mem::take(buffer));
        for &conn in &sink.connections {
            jobs[conn].push((sink.copy_sql.as_str(), data.clone()));
        }
    }
    let work = conns.iter().zip(jobs).map(|(conn, jobs)| async move {
        for (sql, data) in jobs {
            conn.copy_in(sql, vec![data]).await?;
        }
        Ok::<(), crate::remote::RemoteError>(())
    });
    match runtime::block_on(futures_util::future::join_all(work)) {
        Ok(results) => results
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map(|_| ())
            .map_err(Into::into),
        Err(_) => runtime::raise_interrupt(),
    }
}

/// Copies every row of the local table into its shard. `shard_index_sql` computes the shard
/// index (0-based, into `sinks`) of a row; returns the number of rows copied.
pub fn copy_local_rows(
    table: &TableDefinition,
    shard_index_sql: &str,
    sinks: &[ShardSink],
    conns: &[NodeConnection],
) -> Result<u64, DistributionError> {
    let estimate = Spi::get_one_with_args::<f32>(
        "SELECT reltuples FROM pg_catalog.pg_class WHERE oid = $1",
        &[table.oid.into()],
    )?
    .unwrap_or_default()
    .max(0.0) as u64;
    let columns: Vec<String> = table
        .stored_columns()
        .map(|c| quote_identifier(&c.name))
        .collect();
    let query = format!(
        "SELECT {shard_index_sql}{}{} FROM ONLY {}",
        if columns.is_empty() { "" } else { ", " },
        columns.join(", "),
        quote_qualified(&table.schema, &table.name)
    );
    let mut buffers: Vec<Vec<u8>> = vec![Vec::new(); sinks.len()];
    let mut buffered = 0usize;
    let mut copied = 0u64;
    Spi::connect(|client| -> Result<(), DistributionError> {
        let mut cursor = client.try_open_cursor(query.as_str(), &[])?;
        loop {
            let fetched = cursor.fetch(FETCH_ROWS)?;
            if fetched.is_empty() {
                break;
            }
            // SAFETY: while `fetched` is alive, SPI_tuptable/SPI_processed describe the rows
            // just fetched (valid until the next SPI call); SPI_getvalue returns a palloc'd copy
            // of the output function's text, or NULL, which we copy and free at once.
            unsafe {
                let tuptable = pg_sys::SPI_tuptable;
                let tupdesc = (*tuptable).tupdesc;
                let natts = (*tupdesc).natts;
                for row in 0..pg_sys::SPI_processed as usize {
                    let tuple = *(*tuptable).vals.add(row);
                    let index_text = pg_sys::SPI_getvalue(tuple, tupdesc, 1);
                    let index = if index_text.is_null() {
                        return Err(DistributionError::NullDistributionValue);
                    } else {
                        let index = CStr::from_ptr(index_text)
                            .to_str()
                            .ok()
                            .and_then(|s| s.parse::<usize>().ok());
                        pg_sys::pfree(index_text.cast());
                        index
                            .filter(|i| *i < sinks.len())
                            .ok_or(DistributionError::NullDistributionValue)?
                    };
                    let buffer = &mut buffers[index];
                    let before = buffer.len();
                    for att in 2..=natts {
                        if att > 2 {
                            buffer.push(b'\t');
                        }
                        let value = pg_sys::SPI_getvalue(tuple, tupdesc, att);
                        if value.is_null() {
                            push_copy_value(buffer, None);
                        } else {
                            push_copy_value(buffer, Some(CStr::from_ptr(value).to_bytes()));
                            pg_sys::pfree(value.cast());
                        }
                    }
                    buffer.push(b'\n');
                    buffered += buffer.len() - before;
                    copied += 1;
                    if copied % PROGRESS_EVERY == 0 && estimate >= PROGRESS_EVERY {
                        pgrx::notice!(
                            "pgdist: copied {copied} of about {estimate} rows of {}",
                            table.name
                        );
                    }
                }
            }
            drop(fetched);
            pgrx::check_for_interrupts!();
            if buffered >= FLUSH_TOTAL_BYTES || buffers.iter().any(|b| b.len() >= FLUSH_SHARD_BYTES)
            {
                flush(&mut buffers, sinks, conns)?;
                buffered = 0;
            }
        }
        Ok(())
    })?;
    flush(&mut buffers, sinks, conns)?;
    Ok(copied)
}

/// Streams every row of `source_relation` on `source` into `sink` on other connections, in
/// batches through a cursor in the source's remote transaction.
pub fn copy_between_nodes(
    source: &NodeConnection,
    source_relation: &str,
    columns: &str,
    sink: &ShardSink,
    conns: &[NodeConnection],
) -> Result<u64, DistributionError> {
    let mut copied = 0u64;
    let declare =
        format!("DECLARE pgdist_copy NO SCROLL CURSOR FOR SELECT {columns} FROM {source_relation}");
    wait(source.simple_query_owned(declare))?;
    loop {
        let messages =
            wait(source.simple_query_owned(format!("FETCH {FETCH_ROWS} FROM pgdist_copy")))?;
        let rows = crate::remote::rows_as_text(&messages);
        if rows.is_empty() {
            break;
        }
        let mut buffer = Vec::new();
        for row in &rows {
            push_copy_row(
                &mut buffer,
                row.iter().map(|v| v.as_deref().map(str::as_bytes)),
            );
        }
        copied += rows.len() as u64;
        flush(
            std::slice::from_mut(&mut buffer),
            std::slice::from_ref(sink),
            conns,
        )?;
    }
    wait(source.simple_query_owned("CLOSE pgdist_copy".into()))?;
    Ok(copied)
}

/// Inserts every row of the shard on `source` into the local table.
pub fn copy_shard_rows_to_local(
    table: &TableDefinition,
    source: &NodeConnection,
    shard_relation: &str,
) -> Result<u64, DistributionError> {
    let stored: Vec<_> = table.stored_columns().collect();
    let names: Vec<String> = stored.iter().map(|c| quote_identifier(&c.name)).collect();
    let casts: Vec<String> = stored
        .iter()
        .enumerate()
        .map(|(i, c)| format!("u.c{i}::{}", c.type_sql))
        .collect();
    let params: Vec<String> = (1..=stored.len())
        .map(|i| format!("${i}::text[]"))
        .collect();
    let aliases: Vec<String> = (0..stored.len()).map(|i| format!("c{i}")).collect();
    let insert = format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM unnest({}) AS u({})",
        quote_qualified(&table.schema, &table.name),
        names.join(", "),
        casts.join(", "),
        params.join(", "),
        aliases.join(", ")
    );
    let declare = format!(
        "DECLARE pgdist_back NO SCROLL CURSOR FOR SELECT {} FROM {shard_relation}",
        names.join(", ")
    );
    wait(source.simple_query_owned(declare))?;
    let mut copied = 0u64;
    loop {
        let messages =
            wait(source.simple_query_owned(format!("FETCH {FETCH_ROWS} FROM pgdist_back")))?;
        let rows = crate::remote::rows_as_text(&messages);
        if rows.is_empty() {
            break;
        }
        let mut columns: Vec<Vec<Option<String>>> =
            vec![Vec::with_capacity(rows.len()); stored.len()];
        for row in &rows {
            for (column, value) in columns.iter_mut().zip(row) {
                column.push(value.clone());
            }
        }
        copied += rows.len() as u64;
        let args: Vec<pgrx::datum::DatumWithOid> = columns.into_iter().map(Into::into).collect();
        Spi::run_with_args(&insert, &args)?;
    }
    wait(source.simple_query_owned("CLOSE pgdist_back".into()))?;
    Ok(copied)
}

/// The result of a remote command, waited for (a cancel of the statement raises at once).
pub fn wait<T>(
    future: impl std::future::Future<Output = Result<T, crate::remote::RemoteError>>,
) -> Result<T, DistributionError> {
    match runtime::block_on(future) {
        Ok(result) => result.map_err(Into::into),
        Err(_) => runtime::raise_interrupt(),
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_needs() {
        let mut buffer = Vec::new();
        push_copy_row(
            &mut buffer,
            [Some(&b"a\tb\\c\nd\re"[..]), None, Some(&b""[..])],
        );
        assert_eq!(buffer, b"a\\tb\\\\c\\nd\\re\t\\N\t\n");
    }
}
