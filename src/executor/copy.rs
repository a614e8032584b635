//! COPY into and out of distributed and reference tables.
//!
//! `COPY … FROM` runs PostgreSQL's own COPY parser on the coordinator (every format and option,
//! defaults and sequences evaluated there) and hands each row to a [`ShardWriter`], which
//! streams it to its shard with `COPY` in bounded batches. `COPY <table> TO` becomes
//! `COPY (SELECT <columns> FROM <table>) TO`, which reads the shards like any query.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::PgList;

use crate::executor::shard_writer::{ShardWriter, WriteKind};
use crate::remote::quote::{quote_identifier, quote_qualified};

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("COPY … FROM … WHERE into distributed table {0} is not supported yet")]
    Where(String),
}

impl crate::error::PgError for CopyError {
    fn sqlstate(&self) -> pgrx::PgSqlErrorCode {
        pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
    }
    fn hint(&self) -> Option<String> {
        Some("COPY into a staging table, then INSERT … SELECT … WHERE.".into())
    }
}

/// Runs `COPY <distributed table> FROM …`; the number of rows written.
pub unsafe fn copy_from(
    stmt: *mut pg_sys::CopyStmt,
    relid: pg_sys::Oid,
    query_string: *const std::ffi::c_char,
) -> u64 {
    // SAFETY: stmt is the statement being run; the relation is opened (and locked for writing)
    // for the duration of the COPY; NextCopyFrom fills arrays sized for its descriptor.
    unsafe {
        if !(*stmt).whereClause.is_null() {
            crate::error::raise(CopyError::Where(
                crate::distribution::create::relation_name(relid),
            ));
        }
        check_privileges(stmt, relid);
        let relation = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as i32);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        (*pstate).p_sourcetext = query_string;
        let cstate = pg_sys::BeginCopyFrom(
            pstate,
            relation,
            std::ptr::null_mut(),
            (*stmt).filename,
            (*stmt).is_program,
            None,
            (*stmt).attlist,
            (*stmt).options,
        );
        // Errors name the COPY and the line, as PostgreSQL's own COPY does.
        let context = ErrorContext::push(cstate.cast());
        let natts = (*(*relation).rd_att).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        let econtext = pg_sys::CreateStandaloneExprContext();
        let mut writer = ShardWriter::new(relid, WriteKind::Copy);
        loop {
            pg_sys::MemoryContextReset((*econtext).ecxt_per_tuple_memory);
            let old = pg_sys::MemoryContextSwitchTo((*econtext).ecxt_per_tuple_memory);
            let more =
                pg_sys::NextCopyFrom(cstate, econtext, values.as_mut_ptr(), nulls.as_mut_ptr());
            if more {
                writer.add(&values, &nulls);
            }
            pg_sys::MemoryContextSwitchTo(old);
            if !more {
                break;
            }
        }
        drop(context);
        writer.flush();
        pg_sys::EndCopyFrom(cstate);
        pg_sys::FreeExprContext(econtext, true);
        pg_sys::table_close(relation, pg_sys::NoLock as i32);
        writer.processed
    }
}

/// An error context callback registered for as long as this value lives — also when an error
/// unwinds through it, so the stack never points at a callback that is gone.
struct ErrorContext(*mut pg_sys::ErrorContextCallback);

impl ErrorContext {
    unsafe fn push(arg: *mut std::ffi::c_void) -> ErrorContext {
        // SAFETY: the callback lives in the current memory context, longer than this guard.
        unsafe {
            let callback = pg_sys::palloc0(std::mem::size_of::<pg_sys::ErrorContextCallback>())
                .cast::<pg_sys::ErrorContextCallback>();
            (*callback).previous = pg_sys::error_context_stack;
            (*callback).callback = Some(copy_error_context);
            (*callback).arg = arg;
            pg_sys::error_context_stack = callback;
            ErrorContext(callback)
        }
    }
}

impl Drop for ErrorContext {
    fn drop(&mut self) {
        // SAFETY: restores the stack as it was before push().
        unsafe { pg_sys::error_context_stack = (*self.0).previous };
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn copy_error_context(arg: *mut std::ffi::c_void) {
    // SAFETY: arg is the CopyFromState registered with this callback.
    unsafe { pg_sys::CopyFromErrorCallback(arg) }
}

/// What PostgreSQL's COPY checks before reading: INSERT on the table, and the right to read
/// server files or run programs.
unsafe fn check_privileges(stmt: *mut pg_sys::CopyStmt, relid: pg_sys::Oid) {
    // SAFETY: catalog and role lookups for the current user.
    unsafe {
        let user = pg_sys::GetUserId();
        let result = pg_sys::pg_class_aclcheck(relid, user, pg_sys::ACL_INSERT);
        if result != pg_sys::AclResult::ACLCHECK_OK {
            pg_sys::aclcheck_error(
                result,
                pg_sys::get_relkind_objtype(pg_sys::get_rel_relkind(relid)),
                pg_sys::get_rel_name(relid),
            );
        }
        if (*stmt).filename.is_null() {
            return;
        }
        let (role, what) = if (*stmt).is_program {
            (pg_sys::ROLE_PG_EXECUTE_SERVER_PROGRAM, "run a program")
        } else {
            (pg_sys::ROLE_PG_READ_SERVER_FILES, "read a file")
        };
        if !pg_sys::has_privs_of_role(user, pg_sys::Oid::from(role)) {
            pgrx::ereport!(
                ERROR,
                pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied to COPY from a file or program (to {what})"),
                "Only superusers and members of pg_read_server_files / pg_execute_server_program may do that; COPY FROM STDIN works for everyone."
            );
        }
    }
}

/// `COPY <distributed table> [(columns)] TO …` as `COPY (SELECT columns FROM table) TO …`.
pub unsafe fn copy_to_as_query(
    stmt: *mut pg_sys::CopyStmt,
    relid: pg_sys::Oid,
) -> *mut pg_sys::CopyStmt {
    // SAFETY: builds a modified copy of the statement; the SELECT is parsed by PostgreSQL's raw
    // parser from text whose names are all quoted.
    unsafe {
        let copy = pg_sys::copyObjectImpl(stmt.cast()).cast::<pg_sys::CopyStmt>();
        let columns: Vec<String> = if (*stmt).attlist.is_null() {
            let relation = pg_sys::RelationIdGetRelation(relid);
            let tupdesc = (*relation).rd_att;
            let names = (0..(*tupdesc).natts as usize)
                .map(|i| (*tupdesc).attrs.as_ptr().add(i))
                .filter(|a| !(**a).attisdropped)
                .map(|a| {
                    CStr::from_ptr((*a).attname.data.as_ptr())
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            pg_sys::RelationClose(relation);
            names
        } else {
            PgList::<pg_sys::String>::from_pg((*stmt).attlist)
                .iter_ptr()
                .map(|s| CStr::from_ptr((*s).sval).to_string_lossy().into_owned())
                .collect()
        };
        let (schema, name) = crate::executor::schema_and_name(relid);
        let sql = format!(
            "SELECT {} FROM {}",
            columns
                .iter()
                .map(|c| quote_identifier(c))
                .collect::<Vec<_>>()
                .join(", "),
            quote_qualified(&schema, &name)
        );
        let text = CString::new(sql).unwrap_or_default();
        let parsed = pg_sys::raw_parser(text.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        let raw = pg_sys::list_nth(parsed, 0).cast::<pg_sys::RawStmt>();
        (*copy).relation = std::ptr::null_mut();
        (*copy).attlist = std::ptr::null_mut();
        (*copy).query = (*raw).stmt;
        copy
    }
}
