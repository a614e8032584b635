//! Reading what the server said about an error.

/// The SQLSTATE of a server error ("" for errors that are not from the server).
pub fn sqlstate(err: &postgres::Error) -> String {
    err.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// The server's message and detail (postgres::Error itself only displays "db error").
pub fn message(err: &postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} {}", db.message(), db.detail().unwrap_or_default()),
        None => err.to_string(),
    }
}
