//! The shard DDL that turns a shard of the table as it was (`before`) into the table as it is
//! now (`after`): the shell has already been changed by PostgreSQL itself, so the catalog says
//! exactly what the statement did, including names PostgreSQL chose.

use std::collections::HashMap;

use crate::distribution::shell::{
    column_sql, constraint_sql, index_sql, shard_name, with_suffix, Constraint, TableDefinition,
};
use crate::remote::quote::{quote_identifier, quote_qualified};

/// Statements for shard `shard_id`. `using` maps a column name to the text of the USING
/// expression of its ALTER COLUMN … TYPE; `foreign_key` gives a new foreign key's shard DDL.
pub fn shard_statements(
    before: &TableDefinition,
    after: &TableDefinition,
    shard_id: i64,
    using: &HashMap<String, String>,
    foreign_key: impl Fn(&Constraint) -> Option<String>,
) -> Vec<String> {
    let suffix = shard_id.to_string();
    let shard = |name: &str| quote_identifier(&with_suffix(name, &suffix));
    let mut out = Vec::new();
    if before.name != after.name {
        out.push(format!(
            "ALTER TABLE {} RENAME TO {}",
            before.shard_relation(shard_id),
            quote_identifier(&shard_name(&after.name, shard_id))
        ));
    }
    let relation = after.shard_relation(shard_id);

    // Constraints and indexes: renamed (same oid), dropped, added. One that was rebuilt with the
    // same name and definition (ALTER COLUMN TYPE does that) is rebuilt on the shard by itself.
    let on_shard = |kind: &str| matches!(kind, "p" | "u" | "c" | "x" | "f");
    let unchanged_constraint = |c: &Constraint, others: &[Constraint]| {
        others
            .iter()
            .any(|o| o.oid == c.oid || (o.name == c.name && o.definition == c.definition))
    };
    for old in before.constraints.iter().filter(|c| on_shard(&c.kind)) {
        match after.constraints.iter().find(|c| c.oid == old.oid) {
            Some(new) if new.name != old.name => out.push(format!(
                "ALTER TABLE {relation} RENAME CONSTRAINT {} TO {}",
                shard(&old.name),
                shard(&new.name)
            )),
            Some(_) => {}
            None if unchanged_constraint(old, &after.constraints) => {}
            None => out.push(format!(
                "ALTER TABLE {relation} DROP CONSTRAINT IF EXISTS {}",
                shard(&old.name)
            )),
        }
    }
    let index_relation = |name: &str| quote_qualified(&after.schema, &with_suffix(name, &suffix));
    let same_index = |a: &crate::distribution::shell::Index,
                      b: &crate::distribution::shell::Index| {
        a.oid == b.oid
            || (a.name == b.name && a.definition.replace(&before.name, &after.name) == b.definition)
    };
    for old in &before.indexes {
        match after.indexes.iter().find(|i| i.oid == old.oid) {
            Some(new) if new.name != old.name => out.push(format!(
                "ALTER INDEX {} RENAME TO {}",
                index_relation(&old.name),
                shard(&new.name)
            )),
            Some(_) => {}
            None if after.indexes.iter().any(|i| same_index(old, i)) => {}
            None => out.push(format!(
                "DROP INDEX IF EXISTS {}",
                index_relation(&old.name)
            )),
        }
    }

    // Columns, matched by attribute number.
    for old in &before.columns {
        let Some(new) = after.column_by_attnum(old.attnum) else {
            out.push(format!(
                "ALTER TABLE {relation} DROP COLUMN IF EXISTS {}",
                quote_identifier(&old.name)
            ));
            continue;
        };
        let column = quote_identifier(&new.name);
        if new.name != old.name {
            out.push(format!(
                "ALTER TABLE {relation} RENAME COLUMN {} TO {column}",
                quote_identifier(&old.name)
            ));
        }
        if new.type_sql != old.type_sql || new.collation != old.collation {
            let mut sql = format!(
                "ALTER TABLE {relation} ALTER COLUMN {column} TYPE {}",
                new.type_sql
            );
            if let Some(collation) = &new.collation {
                sql.push_str(&format!(" COLLATE {collation}"));
            }
            if let Some(expr) = using.get(&new.name).or_else(|| using.get(&old.name)) {
                sql.push_str(&format!(" USING {expr}"));
            }
            out.push(sql);
        }
        // Compare what the shard gets (sequence defaults stay on the coordinator).
        let shard_default = |c: &crate::distribution::shell::Column| {
            c.default
                .clone()
                .filter(|d| !c.generated && !c.identity && !d.contains("nextval("))
        };
        if shard_default(new) != shard_default(old) {
            out.push(match shard_default(new) {
                Some(expr) => {
                    format!("ALTER TABLE {relation} ALTER COLUMN {column} SET DEFAULT {expr}")
                }
                None => format!("ALTER TABLE {relation} ALTER COLUMN {column} DROP DEFAULT"),
            });
        }
        if new.not_null != old.not_null {
            let action = if new.not_null { "SET" } else { "DROP" };
            out.push(format!(
                "ALTER TABLE {relation} ALTER COLUMN {column} {action} NOT NULL"
            ));
        }
    }
    for new in after
        .columns
        .iter()
        .filter(|c| before.column_by_attnum(c.attnum).is_none())
    {
        out.push(format!(
            "ALTER TABLE {relation} ADD COLUMN {}",
            column_sql(new)
        ));
    }

    for new in after.constraints.iter().filter(|c| on_shard(&c.kind)) {
        if !unchanged_constraint(new, &before.constraints) {
            out.extend(constraint_sql(after, new, shard_id).or_else(|| foreign_key(new)));
        }
    }
    for new in &after.indexes {
        if !before.indexes.iter().any(|i| same_index(i, new)) {
            out.push(index_sql(after, new, shard_id));
        }
    }
    out
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::distribution::shell::Column;
    use pgrx::pg_sys::Oid;

    fn column(attnum: i16, name: &str, type_sql: &str) -> Column {
        Column {
            attnum,
            name: name.into(),
            type_oid: Oid::INVALID,
            type_sql: type_sql.into(),
            collation: None,
            not_null: false,
            default: None,
            generated: false,
            identity: false,
        }
    }

    fn table(columns: Vec<Column>, constraints: Vec<Constraint>) -> TableDefinition {
        TableDefinition {
            oid: Oid::INVALID,
            schema: "public".into(),
            name: "t".into(),
            columns,
            constraints,
            indexes: vec![],
            partition_key: None,
            partition_of: None,
        }
    }

    #[test]
    fn column_changes_become_shard_statements() {
        let before = table(
            vec![column(1, "a", "integer"), column(2, "b", "text")],
            vec![],
        );
        let mut renamed = column(1, "a2", "bigint");
        renamed.not_null = true;
        let after = table(vec![renamed, column(3, "c", "date")], vec![]);
        let using = HashMap::from([("a2".to_string(), "a2::bigint * 2".to_string())]);
        let statements = shard_statements(&before, &after, 7, &using, |_| None);
        assert_eq!(
            statements,
            vec![
                "ALTER TABLE \"public\".\"t_7\" RENAME COLUMN \"a\" TO \"a2\"",
                "ALTER TABLE \"public\".\"t_7\" ALTER COLUMN \"a2\" TYPE bigint USING a2::bigint * 2",
                "ALTER TABLE \"public\".\"t_7\" ALTER COLUMN \"a2\" SET NOT NULL",
                "ALTER TABLE \"public\".\"t_7\" DROP COLUMN IF EXISTS \"b\"",
                "ALTER TABLE \"public\".\"t_7\" ADD COLUMN \"c\" date",
            ]
        );
    }

    #[test]
    fn constraints_get_shard_suffixed_names() {
        let check = Constraint {
            oid: Oid::from(5u32),
            name: "positive".into(),
            kind: "c".into(),
            definition: "CHECK ((a > 0))".into(),
            columns: vec![1],
            foreign_key: None,
            inherited: false,
        };
        let before = table(vec![column(1, "a", "integer")], vec![]);
        let after = table(vec![column(1, "a", "integer")], vec![check.clone()]);
        assert_eq!(
            shard_statements(&before, &after, 9, &HashMap::new(), |_| None),
            vec!["ALTER TABLE \"public\".\"t_9\" ADD CONSTRAINT \"positive_9\" CHECK ((a > 0))"]
        );
        assert_eq!(
            shard_statements(&after, &before, 9, &HashMap::new(), |_| None),
            vec!["ALTER TABLE \"public\".\"t_9\" DROP CONSTRAINT IF EXISTS \"positive_9\""]
        );
    }
}
