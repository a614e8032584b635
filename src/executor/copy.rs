//! COPY into and out of distributed and reference tables.
//!
//! `COPY … FROM` runs PostgreSQL's own COPY parser on the coordinator and hands each row to a
//! [`ShardWriter`], which streams it to its shard with `COPY` in bounded batches. Text and CSV
//! input that lists every stored column travels as the text it came in: only the distribution
//! column is parsed here, the workers parse the rest. Anything else (binary input, columns
//! left to their defaults — sequences are evaluated here —, FORCE_NULL / FORCE_NOT_NULL) goes
//! through PostgreSQL's full row parsing first. `COPY <table> TO` becomes
//! `COPY (SELECT <columns> FROM <table>) TO`, which reads the shards like any query.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::PgList;

use crate::executor::shard_writer::{ShardWriter, WriteKind};
use crate::executor::triggers::{self, CopyTriggers, Event};
use crate::remote::quote::{quote_identifier, quote_qualified};

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("COPY … FROM … WHERE into distributed table {0} is not supported yet")]
    Where(String),
    /// As PostgreSQL: COPY FROM would bypass the policies' WITH CHECK.
    #[error("COPY FROM not supported with row-level security")]
    RowSecurity,
}

impl crate::error::PgError for CopyError {
    fn sqlstate(&self) -> pgrx::PgSqlErrorCode {
        pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            CopyError::Where(_) => "COPY into a staging table, then INSERT … SELECT … WHERE.",
            CopyError::RowSecurity => "Use INSERT statements instead.",
        })
        .map(String::from)
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
        crate::distribution::foreign_keys::load_related_placements(relid);
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
        let econtext = pg_sys::CreateStandaloneExprContext();
        // Triggers fire on the coordinator (`triggers.rs`); row triggers need every row parsed
        // here, and a trigger function's queries run between the writer's flushes (INSERT
        // statements: a COPY would keep the connections busy across rows).
        let found = triggers::find(relid, Event::Insert);
        let fired = found.any().then(|| CopyTriggers::begin(relation));
        let row_triggers = fired.as_ref().filter(|_| found.rows);
        let kind = match row_triggers {
            Some(_) => WriteKind::Insert {
                alias: String::new(),
                on_conflict: String::new(),
                conflict_constraint: String::new(),
                returning: false,
            },
            None => WriteKind::Copy,
        };
        let mut writer = ShardWriter::new(relid, kind);
        match text_field_order(stmt, relation).filter(|_| row_triggers.is_none()) {
            Some(attnums) => {
                writer.expect_fields(&attnums);
                read_fields(cstate, econtext, relation, &attnums, &mut writer);
            }
            None => read_rows(cstate, econtext, relation, &mut writer, row_triggers),
        }
        writer.finish();
        if let Some(fired) = fired {
            fired.end();
        }
        pg_sys::EndCopyFrom(cstate);
        pg_sys::FreeExprContext(econtext, true);
        pg_sys::table_close(relation, pg_sys::NoLock as i32);
        writer.processed
    }
}

/// The attribute numbers of the fields of each input line, when the rows can travel as the
/// text they came in: text or CSV input listing every stored column (so no default has to be
/// computed here) and no FORCE_NULL / FORCE_NOT_NULL. Otherwise None.
unsafe fn text_field_order(
    stmt: *mut pg_sys::CopyStmt,
    relation: pg_sys::Relation,
) -> Option<Vec<i16>> {
    // SAFETY: the statement's option list and the open relation's descriptor.
    unsafe {
        for option in PgList::<pg_sys::DefElem>::from_pg((*stmt).options).iter_ptr() {
            let name = CStr::from_ptr((*option).defname).to_bytes();
            let binary = name == b"format"
                && CStr::from_ptr(pg_sys::defGetString(option)).to_bytes() == b"binary";
            if binary || name == b"force_null" || name == b"force_not_null" {
                return None;
            }
        }
        let tupdesc = (*relation).rd_att;
        let listed = PgList::<std::ffi::c_void>::from_pg(pg_sys::CopyGetAttnums(
            tupdesc,
            relation,
            (*stmt).attlist,
        ));
        let attnums: Vec<i16> = (0..listed.len())
            .map(|i| pg_sys::list_nth_int(listed.as_ptr(), i as i32) as i16)
            .collect();
        let stored = (0..(*tupdesc).natts as usize)
            .map(|i| &*(*tupdesc).attrs.as_ptr().add(i))
            .filter(|a| !a.attisdropped && a.attgenerated == 0)
            .count();
        (attnums.len() == stored).then_some(attnums)
    }
}

/// Reads every line as text fields and hands them to `writer` unparsed (but for the
/// distribution column).
unsafe fn read_fields(
    cstate: pg_sys::CopyFromState,
    econtext: *mut pg_sys::ExprContext,
    relation: pg_sys::Relation,
    attnums: &[i16],
    writer: &mut ShardWriter,
) {
    // SAFETY: NextCopyFromRawFields returns `count` field pointers valid until the next call.
    unsafe {
        each_row(econtext, || {
            let mut fields = std::ptr::null_mut();
            let mut count = 0;
            let more = writer.reading_next_row(|| {
                let more = pg_sys::NextCopyFromRawFields(cstate, &mut fields, &mut count);
                if more {
                    check_field_count(count.max(0) as usize, relation, attnums);
                }
                more
            });
            if more {
                writer.add_fields(std::slice::from_raw_parts(fields, count as usize));
            }
            more
        })
    }
}

/// Calls `row` in fresh per-row memory until it returns false, stopping for interrupts.
unsafe fn each_row(econtext: *mut pg_sys::ExprContext, mut row: impl FnMut() -> bool) {
    // SAFETY: the per-tuple memory of a live expression context, reset before each row.
    unsafe {
        loop {
            pgrx::check_for_interrupts!();
            pg_sys::MemoryContextReset((*econtext).ecxt_per_tuple_memory);
            let old = pg_sys::MemoryContextSwitchTo((*econtext).ecxt_per_tuple_memory);
            let more = row();
            pg_sys::MemoryContextSwitchTo(old);
            if !more {
                break;
            }
        }
    }
}

/// PostgreSQL's own errors for a line with too many or too few fields.
unsafe fn check_field_count(found: usize, relation: pg_sys::Relation, attnums: &[i16]) {
    if found > attnums.len() {
        pgrx::ereport!(
            ERROR,
            pgrx::PgSqlErrorCode::ERRCODE_BAD_COPY_FILE_FORMAT,
            "extra data after last expected column"
        );
    }
    if let Some(&attnum) = attnums.get(found) {
        // SAFETY: attnum is a column of the open relation.
        let name = unsafe {
            let attribute = (*(*relation).rd_att)
                .attrs
                .as_ptr()
                .add(attnum as usize - 1);
            CStr::from_ptr((*attribute).attname.data.as_ptr()).to_string_lossy()
        };
        pgrx::ereport!(
            ERROR,
            pgrx::PgSqlErrorCode::ERRCODE_BAD_COPY_FILE_FORMAT,
            format!("missing data for column \"{name}\"")
        );
    }
}

/// Reads every row through PostgreSQL's full COPY parsing (defaults, binary input, FORCE
/// options) and hands its values to `writer`, through the table's row triggers if any.
unsafe fn read_rows(
    cstate: pg_sys::CopyFromState,
    econtext: *mut pg_sys::ExprContext,
    relation: pg_sys::Relation,
    writer: &mut ShardWriter,
    row_triggers: Option<&CopyTriggers>,
) {
    // SAFETY: NextCopyFrom fills arrays sized for the relation's descriptor; with triggers,
    // they are the values of the trigger slot, materialized after the BEFORE triggers.
    unsafe {
        let natts = (*(*relation).rd_att).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        let generated = row_triggers.is_some()
            && crate::planner::modify_plan::has_generated_columns((*relation).rd_id);
        each_row(econtext, || {
            let more = writer.reading_next_row(|| {
                pg_sys::NextCopyFrom(cstate, econtext, values.as_mut_ptr(), nulls.as_mut_ptr())
            });
            if !more {
                return false;
            }
            let Some(fired) = row_triggers else {
                writer.add(&values, &nulls);
                return true;
            };
            fired.next_row();
            let slot = fired.slot;
            pg_sys::ExecClearTuple(slot);
            std::ptr::copy_nonoverlapping(values.as_ptr(), (*slot).tts_values, natts);
            std::ptr::copy_nonoverlapping(nulls.as_ptr(), (*slot).tts_isnull, natts);
            pg_sys::ExecStoreVirtualTuple(slot);
            if !fired.triggers.before_row(std::ptr::null_mut(), slot) {
                return true;
            }
            if generated {
                crate::executor::modify::compute_generated_columns(
                    fired.triggers.info,
                    fired.triggers.estate,
                    slot,
                    pg_sys::CmdType::CMD_INSERT,
                );
            }
            pg_sys::slot_getallattrs(slot);
            writer.add(
                std::slice::from_raw_parts((*slot).tts_values, natts),
                std::slice::from_raw_parts((*slot).tts_isnull, natts),
            );
            fired.triggers.after_row(std::ptr::null_mut(), slot);
            true
        })
    }
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
        let rls = pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, false);
        if rls == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
            crate::error::raise(CopyError::RowSecurity);
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
