//! The settings of the coordinator's session that every node's connection takes on before it
//! runs a fragment, so that values are written and read there as here: time zone, date and
//! interval styles, time zone abbreviations, search path, float digits.
//!
//! Values cross between nodes as text. A `timestamptz` written in a DateStyle other than ISO
//! carries its zone's abbreviation (`31/03/2024 07:37:00 IST`), which the reading side resolves
//! through its abbreviation table — where `IST` is Israel's, not India's, and `CST` the US's,
//! not China's. In such a session (checked once per combination of settings) the fragments
//! would read back other instants, so pgdist refuses to run them and says how to avoid it.

use std::cell::RefCell;
use std::ffi::{CStr, CString};

use pgrx::{pg_sys, PgSqlErrorCode};

use crate::error::{raise, PgError};
use crate::remote::quote::quote_literal;

#[derive(Clone, Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "pgdist cannot pass timestamps between nodes under DateStyle \"{style}\" in time zone \
         \"{zone}\": a value written as \"{written}\" reads back as \"{read}\""
    )]
    AmbiguousTimestamps {
        style: String,
        zone: String,
        written: String,
        read: String,
    },
}

impl PgError for SessionError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
    }

    fn hint(&self) -> Option<String> {
        Some(
            "Use an ISO DateStyle (SET DateStyle = 'ISO, DMY' keeps day-month input), and \
             format timestamps for display with to_char()."
                .into(),
        )
    }
}

thread_local! {
    /// The settings last checked for round trips of timestamps, and whether they failed.
    static CHECKED: RefCell<Option<(String, Option<SessionError>)>> = const { RefCell::new(None) };
}

/// The current value of setting `name` (empty when unknown).
fn setting(name: &CStr) -> String {
    // SAFETY: GetConfigOption returns a pointer to the current value (NULL if unknown), a C
    // string owned by the GUC machinery, copied at once.
    unsafe {
        let value = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        if value.is_null() {
            return String::new();
        }
        CStr::from_ptr(value).to_string_lossy().into_owned()
    }
}

/// The session's `search_path`, as SQL for `SET` or `set_config`.
pub fn search_path() -> String {
    setting(c"search_path")
}

/// The commands that give a node's connection this session's settings; raises
/// `SessionError` when timestamps would not survive the trip as text.
///
/// # Safety
/// Reads GUC values of this backend; runs type input and output functions.
pub unsafe fn settings() -> String {
    let zone = setting(c"TimeZone");
    let style = setting(c"DateStyle");
    let abbreviations = setting(c"timezone_abbreviations");
    if !style.starts_with("ISO") {
        let key = format!("{zone}\n{style}\n{abbreviations}");
        let failure = CHECKED.with_borrow_mut(|checked| {
            if checked.as_ref().map(|(known, _)| known) != Some(&key) {
                // SAFETY: see round_trip_failure.
                *checked = Some((key, unsafe { round_trip_failure(&zone, &style) }));
            }
            checked.as_ref().and_then(|(_, failure)| failure.clone())
        });
        if let Some(err) = failure {
            raise(err);
        }
    }
    format!(
        "SET TimeZone TO {}; SET DateStyle TO {}; SET IntervalStyle TO {}; \
         SET timezone_abbreviations TO {}; SET extra_float_digits TO 3; SET search_path TO {}; ",
        quote_literal(&zone),
        quote_literal(&style),
        quote_literal(&setting(c"IntervalStyle")),
        quote_literal(&abbreviations),
        // search_path is a list: its text is already valid SQL for SET.
        search_path(),
    )
}

/// Why a `timestamptz` in winter and one in summer do not read back as themselves when
/// written in the current settings; None when they do.
unsafe fn round_trip_failure(zone: &str, style: &str) -> Option<SessionError> {
    const MICROS_PER_DAY: i64 = 86_400_000_000;
    // 2024-01-15 and 2024-07-15 at 12:00 UTC, in microseconds since 2000-01-01.
    let samples = [8780, 8962].map(|days: i64| days * MICROS_PER_DAY + MICROS_PER_DAY / 2);
    // SAFETY: timestamptz's own output and input functions on valid values; an input that
    // fails (an abbreviation the table does not know) is caught and counts as a failure.
    unsafe {
        let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
        pg_sys::getTypeOutputInfo(pg_sys::TIMESTAMPTZOID, &mut output, &mut varlena);
        let (mut input, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
        pg_sys::getTypeInputInfo(pg_sys::TIMESTAMPTZOID, &mut input, &mut ioparam);
        for micros in samples {
            let text = pg_sys::OidOutputFunctionCall(output, pg_sys::Datum::from(micros));
            let written = CStr::from_ptr(text).to_string_lossy().into_owned();
            let copy = CString::new(written.clone()).unwrap_or_default();
            let read = pgrx::PgTryBuilder::new(|| {
                let datum =
                    pg_sys::OidInputFunctionCall(input, copy.as_ptr().cast_mut(), ioparam, -1);
                Some(datum.value() as i64)
            })
            .catch_others(|_| None)
            .execute();
            if read != Some(micros) {
                let read = match read {
                    Some(value) => {
                        let text =
                            pg_sys::OidOutputFunctionCall(output, pg_sys::Datum::from(value));
                        CStr::from_ptr(text).to_string_lossy().into_owned()
                    }
                    None => "an error".into(),
                };
                return Some(SessionError::AmbiguousTimestamps {
                    style: style.into(),
                    zone: zone.into(),
                    written,
                    read,
                });
            }
        }
        None
    }
}
