//! DDL on user-defined types reaches the workers: `ALTER TYPE` of an enum (`ADD VALUE`,
//! `RENAME VALUE`) or a composite type (attributes), `ALTER DOMAIN` (constraints, NOT NULL),
//! renaming a type, a domain or a domain constraint, moving either to another schema, dropping
//! them (a type created again under the same name must not find the old one on a worker).
//!
//! The workers have these types because distributing a table created them there
//! (`distribution::create::type_statements`); a type the coordinator changes alone would make the
//! workers reject values the coordinator accepts (a new enum label) or accept values it rejects
//! (a new domain constraint). The statement is sent as written to every worker that has a type of
//! that name, in the coordinator's transaction, under the session's `search_path`.

use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::PgList;

use crate::distribution::DistributionError;
use crate::remote::quote::quote_literal;

/// A statement that changes a user-defined type the workers may have.
pub struct TypeChange {
    /// The type's qualified name before the statement (how a worker finds its copy); None: run
    /// the statement everywhere.
    type_name: Option<String>,
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
        Some(TypeChange {
            type_name: Some(user_type(pg_sys::makeTypeNameFromNameList(names))?.1),
            statement: statement_text(pstmt, query_string),
            search_path: crate::executor::session::search_path(),
        })
    }
}

/// `DROP TYPE` / `DROP DOMAIN` of user-defined types: dropped on the workers too (`IF EXISTS`:
/// a worker has only the types of the tables it was given).
pub unsafe fn plan_drop(
    stmt: *mut pg_sys::DropStmt,
) -> Result<Option<TypeChange>, DistributionError> {
    // SAFETY: a DROP TYPE / DROP DOMAIN statement, whose objects are TypeNames.
    unsafe {
        let types: Vec<(pg_sys::Oid, String)> =
            PgList::<pg_sys::TypeName>::from_pg((*stmt).objects)
                .iter_ptr()
                .filter_map(|name| user_type(name))
                .collect();
        if types.is_empty() {
            return Ok(None);
        }
        if (*stmt).behavior == pg_sys::DropBehavior::DROP_CASCADE {
            let oids: Vec<pg_sys::Oid> = types.iter().map(|(oid, _)| *oid).collect();
            if let Some(table) = distribution_column_of_type(oids)? {
                return Err(super::unsupported(
                    &format!("DROP … CASCADE of the type of the distribution column of {table}"),
                    "Undistribute the table first.",
                ));
            }
        }
        let names: Vec<String> = types.into_iter().map(|(_, name)| name).collect();
        let kind = match (*stmt).removeType {
            pg_sys::ObjectType::OBJECT_DOMAIN => "DOMAIN",
            _ => "TYPE",
        };
        let cascade = match (*stmt).behavior {
            pg_sys::DropBehavior::DROP_CASCADE => " CASCADE",
            _ => "",
        };
        Ok(Some(TypeChange {
            type_name: None,
            statement: format!("DROP {kind} IF EXISTS {}{cascade}", names.join(", ")),
            search_path: crate::executor::session::search_path(),
        }))
    }
}

/// A distributed table whose distribution column has one of `types` (or an array of one, or a
/// domain over one), which dropping them with CASCADE would drop.
fn distribution_column_of_type(
    types: Vec<pg_sys::Oid>,
) -> Result<Option<String>, DistributionError> {
    Ok(Spi::get_one_with_args::<String>(
        "WITH RECURSIVE dependent(t) AS (
           SELECT unnest($1::oid[])
           UNION
           SELECT ty.oid FROM pg_catalog.pg_type ty JOIN dependent ON ty.typbasetype = dependent.t OR ty.typelem = dependent.t)
         SELECT (SELECT d.table_oid::regclass::text FROM pgdist.dist_table d
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = d.table_oid AND a.attname = d.distribution_column
                 JOIN dependent ON a.atttypid = dependent.t LIMIT 1)",
        &[types.into()],
    )?)
}

/// The oid and qualified name of user-defined type `name`; None for a built-in or missing one.
unsafe fn user_type(name: *mut pg_sys::TypeName) -> Option<(pg_sys::Oid, String)> {
    // SAFETY: a TypeName of the statement; the lookup does not raise for a missing type.
    unsafe {
        let type_oid = pg_sys::LookupTypeNameOid(std::ptr::null_mut(), name, true);
        if u32::from(type_oid) < pg_sys::FirstNormalObjectId {
            return None; // missing (PostgreSQL says so) or built in
        }
        let qualified = CStr::from_ptr(pg_sys::format_type_be_qualified(type_oid))
            .to_string_lossy()
            .into_owned();
        Some((type_oid, qualified))
    }
}

/// Sends the change to every worker that has the type.
pub fn propagate(change: TypeChange) -> Result<(), DistributionError> {
    let guard = match &change.type_name {
        Some(name) => format!("pg_catalog.to_regtype({}) IS NOT NULL", quote_literal(name)),
        None => "true".to_string(),
    };
    let sql = format!(
        "DO $pgdist$ DECLARE saved text := pg_catalog.current_setting('search_path'); BEGIN
         IF {guard} THEN
           PERFORM pg_catalog.set_config('search_path', {}, true);
           EXECUTE {};
           PERFORM pg_catalog.set_config('search_path', saved, true);
         END IF; END $pgdist$",
        quote_literal(&change.search_path),
        quote_literal(&change.statement)
    );
    crate::distribution::run_on_every_worker(&sql)
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
