//! Differential testing: run the same SQL on the cluster's coordinator and on the plain
//! reference server and require identical result sets.

use postgres::{Client, SimpleQueryMessage};

/// Rows with every value as PostgreSQL's text output (NULL as None).
pub type Rows = Vec<Vec<Option<String>>>;

/// The rows of the last statement of `sql` that returned rows, as text.
pub fn query_text(client: &mut Client, sql: &str) -> Result<Rows, postgres::Error> {
    let mut rows = Vec::new();
    for message in client.simple_query(sql)? {
        match message {
            SimpleQueryMessage::RowDescription(_) => rows.clear(),
            SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => {}
        }
    }
    Ok(rows)
}

/// True when `sql` has an ORDER BY outside any parentheses, so row order is part of the answer.
pub fn is_ordered(sql: &str) -> bool {
    let upper = sql.to_uppercase();
    let mut depth = 0i32;
    let bytes = upper.as_bytes();
    for (i, ch) in bytes.iter().enumerate() {
        match ch {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b'O' if depth == 0 && upper[i..].starts_with("ORDER BY") => return true,
            _ => {}
        }
    }
    false
}

/// How a differential comparison came out (anything else panics).
#[derive(Debug, PartialEq, Eq)]
pub enum Comparison {
    /// Same rows (or the same SQLSTATE error) on both.
    Same,
    /// The cluster refused with 0A000 feature_not_supported; the message is kept for reports.
    Unsupported(String),
}

fn sqlstate(err: &postgres::Error) -> String {
    err.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {err}"))
}

/// Runs `sql` on both servers and panics with both answers if they differ.
pub fn compare(cluster: &mut Client, reference: &mut Client, sql: &str) -> Comparison {
    let got = query_text(cluster, sql);
    let want = query_text(reference, sql);
    match (got, want) {
        (Ok(mut got), Ok(mut want)) => {
            if !is_ordered(sql) {
                got.sort();
                want.sort();
            }
            assert!(
                got == want,
                "different results for\n  {sql}\ncluster:   {got:?}\nreference: {want:?}"
            );
            Comparison::Same
        }
        (Err(err), _) if sqlstate(&err) == "0A000" => {
            let db = err.as_db_error();
            assert!(
                db.and_then(|d| d.hint()).is_some(),
                "0A000 without a hint for\n  {sql}\n{err:?}"
            );
            Comparison::Unsupported(db.map(|d| d.message().to_string()).unwrap_or_default())
        }
        (Err(got), Err(want)) => {
            assert_eq!(
                sqlstate(&got),
                sqlstate(&want),
                "different errors for\n  {sql}\ncluster: {got:?}\nreference: {want:?}"
            );
            Comparison::Same
        }
        (got, want) => {
            panic!("different outcomes for\n  {sql}\ncluster:   {got:?}\nreference: {want:?}")
        }
    }
}

/// Runs each statement on both servers and requires the same answer (an 0A000 refusal fails).
pub fn assert_same(cluster: &mut Client, reference: &mut Client, statements: &[&str]) {
    for sql in statements {
        let comparison = compare(cluster, reference, sql);
        assert_eq!(comparison, Comparison::Same, "{sql}");
    }
}

/// Runs setup SQL (DDL, data) on both servers.
pub fn run_on_both(cluster: &mut Client, reference: &mut Client, sql: &str) {
    cluster
        .batch_execute(sql)
        .unwrap_or_else(|err| panic!("on the cluster: {sql}\n{err:?}"));
    reference
        .batch_execute(sql)
        .unwrap_or_else(|err| panic!("on the reference: {sql}\n{err:?}"));
}

#[cfg(test)]
mod unit {
    use super::is_ordered;

    #[test]
    fn order_by_only_counts_at_the_top_level() {
        assert!(is_ordered("SELECT a FROM t ORDER BY a"));
        assert!(!is_ordered("SELECT a FROM (SELECT a FROM t ORDER BY a) s"));
        assert!(!is_ordered("SELECT array_agg(a ORDER BY a) FROM t"));
    }
}
