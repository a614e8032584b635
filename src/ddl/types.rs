//! DDL on user-defined types reaches the workers: `ALTER TYPE` of an enum (`ADD VALUE`,
//! `RENAME VALUE`) or a composite type (attributes), `ALTER DOMAIN` (constraints, NOT NULL),
//! renaming a type, a domain or a domain constraint, moving either to another schema.
//!
//! The workers have these types because distributing a table created them there
//! (`distribution::create::type_statements`); a type the coordinator changes alone would make the
//! workers reject values the coordinator accepts (a new enum label) or accept values it rejects
//! (a new domain constraint). The statement is sent as written to every worker that has a type of
//! that name, in the coordinator's transaction, under the session's `search_path`.

use std::ffi::CStr;

use pgrx::{pg_sys, PgList};

use crate::cluster::target_for;
use crate::distribution::DistributionError;
use crate::remote::quote::quote_literal;
use crate::transaction::remote_xact;

/// A statement that changes a user-defined type the workers may have.
pub struct TypeChange {
    /// The type's qualified name before the statement (how a worker finds its copy).
    type_name: String,
    statement: String,
    search_path: String,
}

/// The change `pstmt` makes to an enum, domain or composite type, if it is one.
pub unsafe fn plan(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
) -> Option<TypeChange> {
    // SAFETY: pstmt is the statement being run; each node is cast after checking its tag.
    unsafe {
        let node = (*pstmt).utilityStmt;
        let names = match (*node).type_ {
            pg_sys::NodeTag::T_AlterEnumStmt => (*node.cast::<pg_sys::AlterEnumStmt>()).typeName,
            pg_sys::NodeTag::T_AlterDomainStmt => {
                let stmt = node.cast::<pg_sys::AlterDomainStmt>();
                // A domain's default is not on the workers: the coordinator computes defaults.
                if (*stmt).subtype == b'T' as std::ffi::c_char {
                    return None;
                }
                (*stmt).typeName
            }
            pg_sys::NodeTag::T_RenameStmt => {
                let stmt = node.cast::<pg_sys::RenameStmt>();
                match (*stmt).renameType {
                    pg_sys::ObjectType::OBJECT_TYPE
                    | pg_sys::ObjectType::OBJECT_DOMAIN
                    | pg_sys::ObjectType::OBJECT_DOMCONSTRAINT => (*stmt).object.cast(),
                    pg_sys::ObjectType::OBJECT_ATTRIBUTE => range_var_names((*stmt).relation),
                    _ => return None,
                }
            }
            pg_sys::NodeTag::T_AlterTableStmt => {
                let stmt = node.cast::<pg_sys::AlterTableStmt>();
                if (*stmt).objtype != pg_sys::ObjectType::OBJECT_TYPE {
                    return None;
                }
                range_var_names((*stmt).relation)
            }
            pg_sys::NodeTag::T_AlterObjectSchemaStmt => {
                let stmt = node.cast::<pg_sys::AlterObjectSchemaStmt>();
                match (*stmt).objectType {
                    pg_sys::ObjectType::OBJECT_TYPE | pg_sys::ObjectType::OBJECT_DOMAIN => {
                        (*stmt).object.cast()
                    }
                    _ => return None,
                }
            }
            _ => return None,
        };
        let type_name = pg_sys::makeTypeNameFromNameList(names);
        let type_oid = pg_sys::LookupTypeNameOid(std::ptr::null_mut(), type_name, true);
        if u32::from(type_oid) < pg_sys::FirstNormalObjectId {
            return None; // missing (PostgreSQL says so) or built in
        }
        let qualified = CStr::from_ptr(pg_sys::format_type_be_qualified(type_oid))
            .to_string_lossy()
            .into_owned();
        Some(TypeChange {
            type_name: qualified,
            statement: statement_text(pstmt, query_string),
            search_path: crate::executor::session::search_path(),
        })
    }
}

/// Sends the change to every worker that has the type.
pub fn propagate(change: TypeChange) -> Result<(), DistributionError> {
    let sql = format!(
        "DO $pgdist$ DECLARE saved text := pg_catalog.current_setting('search_path'); BEGIN
         IF pg_catalog.to_regtype({}) IS NOT NULL THEN
           PERFORM pg_catalog.set_config('search_path', {}, true);
           EXECUTE {};
           PERFORM pg_catalog.set_config('search_path', saved, true);
         END IF; END $pgdist$",
        quote_literal(&change.type_name),
        quote_literal(&change.search_path),
        quote_literal(&change.statement)
    );
    let work = crate::metadata::nodes::primary_nodes()?
        .into_iter()
        .map(|node| Ok((target_for(node.address)?, sql.clone())))
        .collect::<Result<Vec<_>, DistributionError>>()?;
    if !work.is_empty() {
        remote_xact::run_batches(&work);
    }
    Ok(())
}

/// The text of `pstmt` alone within `query_string` (which may hold several statements).
unsafe fn statement_text(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
) -> String {
    // SAFETY: query_string is the statement's source text; location and length are byte
    // offsets into it.
    let text = unsafe { CStr::from_ptr(query_string) }.to_bytes();
    let (location, length) = unsafe { ((*pstmt).stmt_location, (*pstmt).stmt_len) };
    let start = usize::try_from(location).unwrap_or(0).min(text.len());
    let end = match usize::try_from(length) {
        Ok(length) if length > 0 => (start + length).min(text.len()),
        _ => text.len(),
    };
    String::from_utf8_lossy(&text[start..end])
        .trim()
        .to_string()
}

/// The name list of the type `relation` names (a composite type's name parses as a relation).
unsafe fn range_var_names(relation: *mut pg_sys::RangeVar) -> *mut pg_sys::List {
    // SAFETY: relation is a RangeVar of the statement; the strings are copied into a new list.
    unsafe {
        let mut names = PgList::<pg_sys::Node>::new();
        if !(*relation).schemaname.is_null() {
            names.push(pg_sys::makeString((*relation).schemaname).cast());
        }
        names.push(pg_sys::makeString((*relation).relname).cast());
        names.into_pg()
    }
}
