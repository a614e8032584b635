//! The definition of a table as the coordinator's catalog has it (columns, constraints,
//! indexes), and the DDL that creates the same table as a shard on a worker.
//!
//! Definitions are read with `search_path = pg_catalog`, so that `format_type`,
//! `pg_get_expr`, `pg_get_constraintdef` and `pg_get_indexdef` qualify every name the way
//! pg_dump does and the text means the same on any node.

use pgrx::prelude::*;

use crate::metadata::MetadataError;
use crate::remote::quote::{quote_identifier, quote_qualified};

#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    pub attnum: i16,
    pub name: String,
    pub type_oid: pg_sys::Oid,
    pub type_sql: String,
    pub collation: Option<String>,
    pub not_null: bool,
    pub default: Option<String>,
    pub generated: bool,
    pub identity: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Constraint {
    pub oid: pg_sys::Oid,
    pub name: String,
    /// `p` primary key, `u` unique, `c` check, `x` exclusion, `f` foreign key, `t` trigger.
    pub kind: String,
    pub definition: String,
    pub columns: Vec<i16>,
    /// What a foreign key (`kind` `f`) references.
    pub foreign_key: Option<ForeignKey>,
    /// A partition's copy of its parent's constraint (`CREATE TABLE … PARTITION OF` makes it).
    pub inherited: bool,
}

/// The referenced side of a foreign key.
#[derive(Clone, Debug, PartialEq)]
pub struct ForeignKey {
    pub table: pg_sys::Oid,
    /// Referenced columns, pairing with the constraint's `columns`.
    pub columns: Vec<i16>,
    /// `a` no action, `r` restrict, `c` cascade, `n` set null, `d` set default.
    pub on_update: String,
    pub on_delete: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Index {
    pub oid: pg_sys::Oid,
    pub name: String,
    pub definition: String,
    pub unique: bool,
    /// Key and INCLUDE columns; 0 stands for an expression.
    pub columns: Vec<i16>,
    /// A partition's index of its parent's partitioned index.
    pub inherited: bool,
    /// An index made `ON ONLY` a partitioned table that not every partition has attached an
    /// index to yet (invalid until then): the shards' copies are made the same way.
    pub on_only: bool,
}

/// Where a partition hangs in its parent.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionOf {
    pub parent: pg_sys::Oid,
    /// `FOR VALUES …` or `DEFAULT`.
    pub bound: String,
}

#[derive(Clone, Debug)]
pub struct TableDefinition {
    pub oid: pg_sys::Oid,
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
    pub constraints: Vec<Constraint>,
    /// Indexes that do not belong to a constraint.
    pub indexes: Vec<Index>,
    /// A partitioned table's key (`RANGE (day)`).
    pub partition_key: Option<String>,
    /// A partition's parent and bound.
    pub partition_of: Option<PartitionOf>,
}

impl TableDefinition {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn column_by_attnum(&self, attnum: i16) -> Option<&Column> {
        self.columns.iter().find(|c| c.attnum == attnum)
    }

    /// Columns whose values are stored (generated columns are computed by each shard).
    pub fn stored_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().filter(|c| !c.generated)
    }

    /// The shard table's qualified name.
    pub fn shard_relation(&self, shard_id: i64) -> String {
        quote_qualified(&self.schema, &shard_name(&self.name, shard_id))
    }
}

/// Runs `f` with `search_path = pg_catalog` for the rest of the call (restored afterwards; an
/// error aborts the transaction, which restores it too).
fn with_catalog_search_path<T>(
    f: impl FnOnce() -> Result<T, MetadataError>,
) -> Result<T, MetadataError> {
    let old = Spi::get_one::<String>("SELECT pg_catalog.current_setting('search_path')")?
        .unwrap_or_default();
    Spi::run("SELECT pg_catalog.set_config('search_path', 'pg_catalog', true)")?;
    let result = f();
    Spi::run_with_args(
        "SELECT pg_catalog.set_config('search_path', $1, true)",
        &[old.into()],
    )?;
    result
}

/// Reads the definition of table `oid`.
pub fn read_definition(oid: pg_sys::Oid) -> Result<TableDefinition, MetadataError> {
    with_catalog_search_path(|| {
        let (schema, name) = Spi::get_two_with_args::<String, String>(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = $1",
            &[oid.into()],
        )?;
        let (partition_key, parent, bound) =
            Spi::get_three_with_args::<String, pg_sys::Oid, String>(
                "SELECT CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
                        i.inhparent, CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END
                 FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid AND c.relispartition
                 WHERE c.oid = $1",
                &[oid.into()],
            )?;
        let partition_of = parent
            .zip(bound)
            .map(|(parent, bound)| PartitionOf { parent, bound });
        Spi::connect(|client| {
            let columns = client
                .select(
                    "SELECT a.attnum, a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod),
                            CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                                 THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END,
                            a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attgenerated <> '', a.attidentity <> ''
                     FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                     LEFT JOIN pg_collation co ON co.oid = a.attcollation
                     LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
                     LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    None,
                    &[oid.into()],
                )?
                .map(|row| {
                    Ok(Column {
                        attnum: row.get(1)?.unwrap_or_default(),
                        name: row.get(2)?.unwrap_or_default(),
                        type_oid: row.get(3)?.unwrap_or(pg_sys::InvalidOid),
                        type_sql: row.get(4)?.unwrap_or_default(),
                        collation: row.get(5)?,
                        not_null: row.get(6)?.unwrap_or_default(),
                        default: row.get(7)?,
                        generated: row.get(8)?.unwrap_or_default(),
                        identity: row.get(9)?.unwrap_or_default(),
                    })
                })
                .collect::<Result<Vec<_>, MetadataError>>()?;
            let constraints = client
                .select(
                    "SELECT oid, conname::text, contype::text, pg_get_constraintdef(oid), coalesce(conkey, '{}'),
                            confrelid, confkey, confupdtype::text, confdeltype::text,
                            conparentid <> 0 OR coninhcount > 0
                     FROM pg_constraint WHERE conrelid = $1 ORDER BY oid",
                    None,
                    &[oid.into()],
                )?
                .map(|row| {
                    Ok(Constraint {
                        oid: row.get(1)?.unwrap_or(pg_sys::InvalidOid),
                        name: row.get(2)?.unwrap_or_default(),
                        kind: row.get(3)?.unwrap_or_default(),
                        definition: row.get(4)?.unwrap_or_default(),
                        columns: row.get(5)?.unwrap_or_default(),
                        foreign_key: match row.get::<pg_sys::Oid>(6)? {
                            Some(table) if table != pg_sys::InvalidOid => Some(ForeignKey {
                                table,
                                columns: row.get(7)?.unwrap_or_default(),
                                on_update: row.get(8)?.unwrap_or_default(),
                                on_delete: row.get(9)?.unwrap_or_default(),
                            }),
                            _ => None,
                        },
                        inherited: row.get(10)?.unwrap_or_default(),
                    })
                })
                .collect::<Result<Vec<_>, MetadataError>>()?;
            let indexes = client
                .select(
                    "SELECT i.indexrelid, c.relname::text, pg_get_indexdef(i.indexrelid), i.indisunique, i.indkey::int2[],
                            EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid),
                            c.relkind = 'I' AND NOT i.indisvalid
                     FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                     WHERE i.indrelid = $1
                       AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid)
                     ORDER BY i.indexrelid",
                    None,
                    &[oid.into()],
                )?
                .map(|row| {
                    Ok(Index {
                        oid: row.get(1)?.unwrap_or(pg_sys::InvalidOid),
                        name: row.get(2)?.unwrap_or_default(),
                        definition: row.get(3)?.unwrap_or_default(),
                        unique: row.get(4)?.unwrap_or_default(),
                        columns: row.get(5)?.unwrap_or_default(),
                        inherited: row.get(6)?.unwrap_or_default(),
                        on_only: row.get(7)?.unwrap_or_default(),
                    })
                })
                .collect::<Result<Vec<_>, MetadataError>>()?;
            Ok(TableDefinition {
                oid,
                schema: schema.unwrap_or_default(),
                name: name.unwrap_or_default(),
                columns,
                constraints,
                indexes,
                partition_key,
                partition_of,
            })
        })
    })
}

/// PostgreSQL's limit on identifier length (NAMEDATALEN - 1).
const MAX_IDENTIFIER_BYTES: usize = 63;

/// `name_suffix`, with `name` shortened (at a character boundary) so the result fits in an
/// identifier.
pub fn with_suffix(name: &str, suffix: &str) -> String {
    let room = MAX_IDENTIFIER_BYTES.saturating_sub(suffix.len() + 1);
    let mut end = name.len().min(room);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}_{suffix}", &name[..end])
}

/// The name of shard `shard_id` of table `table` (in the table's schema on the worker).
pub fn shard_name(table: &str, shard_id: i64) -> String {
    with_suffix(table, &shard_id.to_string())
}

/// `name type [COLLATE c] [GENERATED … | DEFAULT …] [NOT NULL]` for a shard. Defaults that use
/// sequences and identity columns stay on the coordinator, which fills those values in.
pub fn column_sql(column: &Column) -> String {
    let mut sql = format!("{} {}", quote_identifier(&column.name), column.type_sql);
    if let Some(collation) = &column.collation {
        sql.push_str(&format!(" COLLATE {collation}"));
    }
    match &column.default {
        Some(expr) if column.generated => {
            sql.push_str(&format!(" GENERATED ALWAYS AS ({expr}) STORED"))
        }
        Some(expr) if !column.identity && !expr.contains("nextval(") => {
            sql.push_str(&format!(" DEFAULT {expr}"))
        }
        _ => {}
    }
    if column.not_null {
        sql.push_str(" NOT NULL");
    }
    sql
}

/// `CREATE INDEX` for the shard, from the coordinator's `pg_get_indexdef` text.
pub fn index_sql(table: &TableDefinition, index: &Index, shard_id: i64) -> String {
    let suffix = index
        .definition
        .find(" USING ")
        .map(|at| &index.definition[at..])
        .unwrap_or_default();
    format!(
        "CREATE {}INDEX {} ON {}{}{suffix}",
        if index.unique { "UNIQUE " } else { "" },
        quote_identifier(&with_suffix(&index.name, &shard_id.to_string())),
        if index.on_only { "ONLY " } else { "" },
        table.shard_relation(shard_id)
    )
}

/// `ALTER TABLE … ADD CONSTRAINT` for the shard (foreign keys: `foreign_keys::shard_sql`).
pub fn constraint_sql(
    table: &TableDefinition,
    constraint: &Constraint,
    shard_id: i64,
) -> Option<String> {
    matches!(constraint.kind.as_str(), "p" | "u" | "c" | "x").then(|| {
        format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {}",
            table.shard_relation(shard_id),
            quote_identifier(&with_suffix(&constraint.name, &shard_id.to_string())),
            constraint.definition
        )
    })
}

/// Every statement that creates shard `shard_id` of `table` on a worker. A partition's shard
/// becomes a partition of `parent_shard` (its parent's shard of the same index), which gives it
/// the parent's columns, constraints and indexes; only its own are added.
pub fn create_shard_sql(
    table: &TableDefinition,
    shard_id: i64,
    parent_shard: Option<&str>,
) -> Vec<String> {
    let shard = table.shard_relation(shard_id);
    let partition_by = table
        .partition_key
        .as_ref()
        .map(|key| format!(" PARTITION BY {key}"))
        .unwrap_or_default();
    let mut statements = Vec::new();
    let partition = table.partition_of.as_ref().zip(parent_shard);
    if let Some((partition, parent_shard)) = partition {
        statements.push(format!(
            "CREATE TABLE {shard} PARTITION OF {parent_shard} {}{partition_by}",
            partition.bound
        ));
        statements.extend(table.columns.iter().filter(|c| c.not_null).map(|c| {
            format!(
                "ALTER TABLE {shard} ALTER COLUMN {} SET NOT NULL",
                quote_identifier(&c.name)
            )
        }));
    } else {
        let columns: Vec<String> = table.columns.iter().map(column_sql).collect();
        statements.push(format!(
            "CREATE TABLE {shard} ({}){partition_by}",
            columns.join(", ")
        ));
    }
    let own = |inherited: bool| partition.is_none() || !inherited;
    statements.extend(
        table
            .constraints
            .iter()
            .filter(|c| own(c.inherited))
            .filter_map(|c| constraint_sql(table, c, shard_id)),
    );
    statements.extend(
        table
            .indexes
            .iter()
            .filter(|i| own(i.inherited))
            .map(|i| index_sql(table, i, shard_id)),
    );
    statements
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn long_names_are_shortened_to_fit() {
        assert_eq!(shard_name("orders", 102008), "orders_102008");
        let long = "x".repeat(70);
        let name = shard_name(&long, 102008);
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("_102008"));
        let multibyte = "é".repeat(40);
        assert!(shard_name(&multibyte, 1).len() <= 63);
    }
}
