//! Turning each layer's error enum into a PostgreSQL error with a real SQLSTATE.
//!
//! Every layer defines its own `thiserror` enum and implements [`PgError`] for it; SQL-facing
//! functions call [`raise`] (or `.or_raise()`) at the boundary. Nothing returns `Result<_, String>`
//! to PostgreSQL.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// An error that knows its SQLSTATE, and optionally a detail and a hint.
pub trait PgError: std::fmt::Display {
    fn sqlstate(&self) -> PgSqlErrorCode;
    fn detail(&self) -> Option<String> {
        None
    }
    fn hint(&self) -> Option<String> {
        None
    }
}

/// Raises `err` as a PostgreSQL ERROR; never returns.
#[track_caller]
pub fn raise<E: PgError>(err: E) -> ! {
    let message = coordinator_names(&err.to_string());
    let mut report = ErrorReport::new(err.sqlstate(), message, "pgdist");
    if let Some(detail) = err.detail() {
        report = report.set_detail(coordinator_names(&detail));
    }
    if let Some(hint) = err.hint() {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// `result.or_raise()`: the value, or the error raised as a PostgreSQL ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T, E: PgError> OrRaise<T> for Result<T, E> {
    #[track_caller]
    fn or_raise(self) -> T {
        match self {
            Ok(value) => value,
            Err(err) => raise(err),
        }
    }
}

/// Maps a five-character SQLSTATE (as a worker reports it) to pgrx's error code.
pub fn sqlstate_from_code(code: &str) -> PgSqlErrorCode {
    let bytes = code.as_bytes();
    if bytes.len() != 5 {
        return PgSqlErrorCode::ERRCODE_INTERNAL_ERROR;
    }
    // PostgreSQL's MAKE_SQLSTATE: six bits per character, first character lowest.
    let packed = bytes.iter().enumerate().fold(0i32, |acc, (i, ch)| {
        acc + ((((*ch as i32) - ('0' as i32)) & 0x3F) << (6 * i))
    });
    PgSqlErrorCode::from(packed)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn worker_sqlstates_keep_their_code() {
        assert_eq!(
            sqlstate_from_code("57014"),
            PgSqlErrorCode::ERRCODE_QUERY_CANCELED
        );
        assert_eq!(
            sqlstate_from_code("42P01"),
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE
        );
        assert_eq!(
            sqlstate_from_code("bad"),
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR
        );
    }
}

/// `text` with each quoted name of a shard, or of a shard's constraint or index
/// (`"orders_pkey_102008"`), written as the coordinator's table names it (`"orders_pkey"`):
/// what a worker reports reads as PostgreSQL would report it for the table.
pub fn coordinator_names(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('"') {
        let Some(length) = rest[open + 1..].find('"') else {
            break;
        };
        let name = &rest[open + 1..open + 1 + length];
        out.push_str(&rest[..=open]);
        let shard_suffix = name.rsplit_once('_').filter(|(base, id)| {
            !base.is_empty()
                && id
                    .parse::<i64>()
                    .is_ok_and(crate::metadata::cache::is_loaded_shard)
        });
        out.push_str(shard_suffix.map_or(name, |(base, _)| base));
        out.push('"');
        rest = &rest[open + length + 2..];
    }
    out.push_str(rest);
    out
}
