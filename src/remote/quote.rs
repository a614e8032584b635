//! The one quoting helper for everything that goes into remote SQL or a connection string.

/// `name` as a double-quoted SQL identifier (always quoted, so case and keywords are safe).
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.name` with both parts quoted.
pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_identifier(schema), quote_identifier(name))
}

/// `value` as an SQL string literal that means the same whatever `standard_conforming_strings` is.
pub fn quote_literal(value: &str) -> String {
    if value.contains('\\') {
        format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

/// `value` as a libpq connection-string value: single-quoted, `\` and `'` escaped.
pub fn quote_conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `sql` with each `$<number>` outside quoted literals and identifiers replaced by what
/// `replacement` returns for that number, or left as it is for None. Deparsed SQL writes
/// parameters, and pgdist its placeholders, this way.
pub fn replace_dollar_refs(sql: &str, replacement: impl Fn(i32) -> Option<String>) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                out.push(c);
                if c == q {
                    quote = None;
                }
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                let mut digits = String::new();
                while let Some(d) = chars.next_if(|d| d.is_ascii_digit()) {
                    digits.push(d);
                }
                match digits.parse().ok().and_then(&replacement) {
                    Some(text) => out.push_str(&text),
                    None => {
                        out.push('$');
                        out.push_str(&digits);
                    }
                }
            }
            None => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_identifier("orders"), "\"orders\"");
        assert_eq!(quote_identifier("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_qualified("public", "Order"), "\"public\".\"Order\"");
    }

    #[test]
    fn literals_survive_quotes_and_backslashes() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'c"), "E'a\\\\b''c'");
    }

    #[test]
    fn conninfo_values_are_escaped() {
        assert_eq!(quote_conninfo_value("p'w\\d"), "'p\\'w\\\\d'");
    }

    #[test]
    fn dollar_refs_are_replaced_outside_quotes_only() {
        let replaced =
            replace_dollar_refs("a = $1 AND b = '$1' AND \"$2\" = $2 AND c = $12", |id| {
                (id != 2).then(|| format!("<{id}>"))
            });
        assert_eq!(
            replaced,
            "a = <1> AND b = '$1' AND \"$2\" = $2 AND c = <12>"
        );
    }
}
