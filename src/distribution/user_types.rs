//! The user-defined types of a distributed table's columns, created on the workers with its
//! shards: enums, domains, composite and range types, each after the types it is made of.

use pgrx::prelude::*;

use crate::distribution::DistributionError;
use crate::remote::quote::{quote_identifier, quote_literal, quote_qualified};

/// Statements that create, on a worker that lacks them, the user-defined types the columns of
/// table `oid` use: enums, domains (their base type, NOT NULL and CHECK constraints), composite
/// types and range types (with their multirange), each after the types it is made of. Other
/// user types (base types, a table's row type, a range with a canonical function or a
/// difference function of the user's) must be created by hand; the worker then says so.
pub fn type_statements(oid: pg_sys::Oid) -> Result<Vec<String>, DistributionError> {
    let column_types = crate::metadata::oids(
        "SELECT DISTINCT a.atttypid FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
        oid,
    )?;
    let mut statements = Vec::new();
    let mut seen = Vec::new();
    for type_oid in column_types {
        user_type_statements(type_oid, &mut seen, &mut statements)?;
    }
    Ok(statements)
}

/// The statements for user type `type_oid` (an array: its element type) and what it is made
/// of, unless `seen` already has it.
fn user_type_statements(
    type_oid: pg_sys::Oid,
    seen: &mut Vec<pg_sys::Oid>,
    statements: &mut Vec<String>,
) -> Result<(), DistributionError> {
    if u32::from(type_oid) < pg_sys::FirstNormalObjectId || seen.contains(&type_oid) {
        return Ok(());
    }
    seen.push(type_oid);
    let Some(row) = Spi::connect(|client| {
        let mut rows = client.select(
            &format!(
                "SELECT n.nspname::text, t.typname::text, t.typtype::text,
                        CASE WHEN t.typelem <> 0 AND t.typlen = -1 THEN t.typelem END,
                        t.typbasetype, pg_catalog.format_type(t.typbasetype, t.typtypmod), t.typnotnull,
                        CASE WHEN t.typcollation <> 0 AND t.typcollation <> b.typcollation THEN
                             {} END,
                        (SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder) FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid),
                        (SELECT array_agg(pg_catalog.quote_ident(k.conname) || ' ' || pg_catalog.pg_get_constraintdef(k.oid) ORDER BY k.oid)
                         FROM pg_catalog.pg_constraint k WHERE k.contypid = t.oid),
                        (SELECT r.relkind = 'c' FROM pg_catalog.pg_class r WHERE r.oid = t.typrelid),
                        t.typrelid
                 FROM pg_catalog.pg_type t
                 JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
                 LEFT JOIN pg_catalog.pg_type b ON b.oid = t.typbasetype
                 WHERE t.oid = $1",
                qualified_collation("t.typcollation")
            ),
            None,
            &[type_oid.into()],
        )?;
        Ok::<_, pgrx::spi::Error>(rows.next().map(|row| UserType {
            schema: row.get(1).ok().flatten().unwrap_or_default(),
            name: row.get(2).ok().flatten().unwrap_or_default(),
            kind: row.get(3).ok().flatten().unwrap_or_default(),
            element: row.get(4).ok().flatten(),
            base: row.get(5).ok().flatten().unwrap_or(pg_sys::InvalidOid),
            base_sql: row.get(6).ok().flatten().unwrap_or_default(),
            not_null: row.get(7).ok().flatten().unwrap_or_default(),
            collation: row.get(8).ok().flatten(),
            labels: row.get(9).ok().flatten(),
            checks: row.get(10).ok().flatten().unwrap_or_default(),
            composite: row.get(11).ok().flatten().unwrap_or_default(),
            relation: row.get(12).ok().flatten().unwrap_or(pg_sys::InvalidOid),
        }))
    })?
    else {
        return Ok(());
    };
    if let Some(element) = row.element {
        return user_type_statements(element, seen, statements);
    }
    if row.kind == "m" {
        // A multirange comes with its range type.
        let range = crate::metadata::oids(
            "SELECT rngtypid FROM pg_catalog.pg_range WHERE rngmultitypid = $1",
            type_oid,
        )?;
        for range in range {
            user_type_statements(range, seen, statements)?;
        }
        return Ok(());
    }
    let name = quote_qualified(&row.schema, &row.name);
    let create = match row.kind.as_str() {
        "e" => format!(
            "CREATE TYPE {name} AS ENUM ({})",
            row.labels
                .unwrap_or_default()
                .iter()
                .map(|l| quote_literal(l))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "d" => {
            user_type_statements(row.base, seen, statements)?;
            let mut sql = format!("CREATE DOMAIN {name} AS {}", row.base_sql);
            if let Some(collation) = &row.collation {
                sql.push_str(&format!(" COLLATE {collation}"));
            }
            if row.not_null {
                sql.push_str(" NOT NULL");
            }
            for check in &row.checks {
                sql.push_str(&format!(" CONSTRAINT {check}"));
            }
            sql
        }
        "c" if row.composite => {
            let attributes = composite_attributes(row.relation)?;
            let mut columns = Vec::new();
            for (attribute, attribute_type, type_sql) in attributes {
                user_type_statements(attribute_type, seen, statements)?;
                columns.push(format!("{} {type_sql}", quote_identifier(&attribute)));
            }
            format!("CREATE TYPE {name} AS ({})", columns.join(", "))
        }
        "r" => match range_definition(type_oid)? {
            Some(range) => {
                user_type_statements(range.subtype, seen, statements)?;
                format!("CREATE TYPE {name} AS RANGE ({})", range.options)
            }
            None => cannot_create(&name),
        },
        _ => cannot_create(&name),
    };
    statements.push(format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        quote_identifier(&row.schema)
    ));
    statements.push(format!(
        "DO $pgdist$ BEGIN IF pg_catalog.to_regtype({}) IS NULL THEN {create}; END IF; END $pgdist$",
        quote_literal(&name)
    ));
    Ok(())
}

/// A user-defined type as [`user_type_statements`] reads it.
struct UserType {
    schema: String,
    name: String,
    kind: String,
    element: Option<pg_sys::Oid>,
    base: pg_sys::Oid,
    base_sql: String,
    not_null: bool,
    collation: Option<String>,
    labels: Option<Vec<String>>,
    /// Domain constraints as `<name> <definition>`.
    checks: Vec<String>,
    composite: bool,
    relation: pg_sys::Oid,
}

/// The attributes of composite type relation `relation`: name, type and its SQL (with
/// collation when not the type's own).
fn composite_attributes(
    relation: pg_sys::Oid,
) -> Result<Vec<(String, pg_sys::Oid, String)>, DistributionError> {
    Ok(Spi::connect(|client| {
        client
            .select(
                &format!(
                    "SELECT a.attname::text, a.atttypid,
                            pg_catalog.format_type(a.atttypid, a.atttypmod) ||
                            CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation THEN
                                 ' COLLATE ' || {} ELSE '' END
                     FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
                     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    qualified_collation("a.attcollation")
                ),
                None,
                &[relation.into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                    row.get::<String>(3)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })?)
}

/// The statement a worker runs for a type pgdist cannot create: an error saying what to do.
fn cannot_create(name: &str) -> String {
    format!(
        "RAISE EXCEPTION 'type % does not exist on this node', {} USING ERRCODE = \
         'feature_not_supported', HINT = 'Create the type on every worker first, for example \
         with pgdist.run_on_workers().'",
        quote_literal(name)
    )
}

/// A range type as `CREATE TYPE … AS RANGE` options.
struct RangeDefinition {
    subtype: pg_sys::Oid,
    options: String,
}

/// The definition of range type `type_oid`, or None when it has a canonical function (written
/// in C) or a difference function outside `pg_catalog`, which the workers may lack.
fn range_definition(type_oid: pg_sys::Oid) -> Result<Option<RangeDefinition>, DistributionError> {
    let row = Spi::connect(|client| {
        let mut rows = client.select(
            &format!(
                "SELECT r.rngsubtype, 'SUBTYPE = ' || pg_catalog.format_type(r.rngsubtype, NULL)
                        || CASE WHEN NOT oc.opcdefault THEN ', SUBTYPE_OPCLASS = ' || pg_catalog.quote_ident(ocn.nspname)
                                || '.' || pg_catalog.quote_ident(oc.opcname) ELSE '' END
                        || CASE WHEN r.rngcollation <> 0 AND r.rngcollation <> st.typcollation THEN ', COLLATION = '
                                || {} ELSE '' END
                        || CASE WHEN r.rngsubdiff <> 0 THEN ', SUBTYPE_DIFF = pg_catalog.'
                                || pg_catalog.quote_ident(d.proname) ELSE '' END
                        || ', MULTIRANGE_TYPE_NAME = ' || pg_catalog.quote_ident(mn.nspname) || '.'
                        || pg_catalog.quote_ident(m.typname),
                        r.rngcanonical = 0 AND (r.rngsubdiff = 0 OR d.pronamespace = 'pg_catalog'::regnamespace)
                 FROM pg_catalog.pg_range r
                 JOIN pg_catalog.pg_type st ON st.oid = r.rngsubtype
                 JOIN pg_catalog.pg_opclass oc ON oc.oid = r.rngsubopc
                 JOIN pg_catalog.pg_namespace ocn ON ocn.oid = oc.opcnamespace
                 JOIN pg_catalog.pg_type m ON m.oid = r.rngmultitypid
                 JOIN pg_catalog.pg_namespace mn ON mn.oid = m.typnamespace
                 LEFT JOIN pg_catalog.pg_proc d ON d.oid = r.rngsubdiff
                 WHERE r.rngtypid = $1",
                qualified_collation("r.rngcollation")
            ),
            None,
            &[type_oid.into()],
        )?;
        Ok::<_, pgrx::spi::Error>(rows.next().map(|row| {
            (
                row.get::<pg_sys::Oid>(1).ok().flatten(),
                row.get::<String>(2).ok().flatten(),
                row.get::<bool>(3).ok().flatten().unwrap_or(false),
            )
        }))
    })?;
    Ok(match row {
        Some((Some(subtype), Some(options), true)) => Some(RangeDefinition { subtype, options }),
        _ => None,
    })
}

/// SQL for the schema-qualified name of the collation whose oid is `column`.
fn qualified_collation(column: &str) -> String {
    format!(
        "(SELECT pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(c.collname)
          FROM pg_catalog.pg_collation c JOIN pg_catalog.pg_namespace cn ON cn.oid = c.collnamespace
          WHERE c.oid = {column})"
    )
}
