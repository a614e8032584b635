//! Connection parameters for a node: `pgdist.node_conninfo` parsed the libpq way, plus the
//! host, port, database and user that pgdist chooses, plus a password from a passfile.
//!
//! Passwords never live in the catalog: they come from `passfile=` in `pgdist.node_conninfo`,
//! `PGPASSFILE`, or `~/.pgpass` of the server's OS user, in the format libpq uses.

use std::str::FromStr;

use crate::remote::quote::quote_conninfo_value;
use crate::remote::tls::{TlsSettings, TLS_KEYS};
use crate::remote::RemoteError;

/// Keys pgdist sets itself; `pgdist.node_conninfo` may not override them.
const RESERVED_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
];

/// Splits a libpq `key=value key2='quoted value'` string into pairs.
pub fn parse_conninfo(text: &str) -> Result<Vec<(String, String)>, RemoteError> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(RemoteError::BadConninfo(format!(
                "missing \"=\" after \"{key}\""
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(RemoteError::BadConninfo(format!(
                            "unterminated quoted value for \"{key}\""
                        )))
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// Everything needed to open a connection to one node, computed on the backend's thread.
#[derive(Clone, Debug)]
pub struct ConnectParams {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub application_name: String,
}

impl ConnectParams {
    /// The tokio-postgres configuration for these parameters plus `extra` (node_conninfo), and
    /// the TLS settings `extra` asks for.
    pub fn to_config(
        &self,
        extra: &str,
        default_connect_timeout: std::time::Duration,
    ) -> Result<(tokio_postgres::Config, TlsSettings), RemoteError> {
        let mut passfile = std::env::var("PGPASSFILE").ok();
        let mut tls = TlsSettings::default();
        let mut text = String::new();
        let mut has_timeout = false;
        for (key, value) in parse_conninfo(extra)? {
            if RESERVED_KEYS.contains(&key.as_str()) {
                return Err(RemoteError::BadConninfo(format!(
                    "\"{key}\" is set by pgdist for each node{}",
                    if key == "password" {
                        "; put passwords in a passfile"
                    } else {
                        ""
                    }
                )));
            }
            match key.as_str() {
                "passfile" => passfile = Some(value),
                tls_key if TLS_KEYS.contains(&tls_key) => tls.set(tls_key, value)?,
                _ => {
                    has_timeout |= key == "connect_timeout";
                    text.push_str(&format!("{key}={} ", quote_conninfo_value(&value)));
                }
            }
        }
        let mut config = tokio_postgres::Config::from_str(&text)
            .map_err(|err| RemoteError::BadConninfo(err.to_string()))?;
        config
            .host(&self.host)
            .port(self.port)
            .dbname(&self.dbname)
            .user(&self.user)
            .ssl_mode(tls.wire_mode());
        // Tells the nodes which coordinator backend each of their sessions works for.
        config.application_name(&self.application_name);
        if !has_timeout {
            config.connect_timeout(default_connect_timeout);
        }
        let passfile = passfile.or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|home| format!("{home}/.pgpass"))
        });
        if let Some(password) = passfile.and_then(|path| self.password_from_file(&path)) {
            config.password(password);
        }
        Ok((config, tls))
    }

    /// The password for this host/port/database/user in a libpq passfile, if any.
    fn password_from_file(&self, path: &str) -> Option<String> {
        let content = std::fs::read_to_string(path).ok()?;
        let port = self.port.to_string();
        let wanted = [
            self.host.as_str(),
            port.as_str(),
            self.dbname.as_str(),
            self.user.as_str(),
        ];
        content
            .lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| {
                let fields = split_passfile_line(line);
                if fields.len() != 5 {
                    return None;
                }
                let matches = fields[..4]
                    .iter()
                    .zip(wanted)
                    .all(|(f, w)| f == "*" || f == w);
                matches.then(|| fields[4].clone())
            })
    }
}

/// Splits `a:b\:c:d` on unescaped colons, undoing `\:` and `\\`.
fn split_passfile_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields
                .last_mut()
                .into_iter()
                .for_each(|f| f.extend(chars.next())),
            ':' if fields.len() < 5 => fields.push(String::new()),
            _ => fields.last_mut().into_iter().for_each(|f| f.push(c)),
        }
    }
    fields
}

#[cfg(test)]
mod unit {
    use super::*;

    fn params() -> ConnectParams {
        ConnectParams {
            host: "10.0.0.1".into(),
            port: 5433,
            dbname: "app".into(),
            user: "alice".into(),
            application_name: "pgdist:1:2".into(),
        }
    }

    #[test]
    fn parses_plain_and_quoted_values() {
        let pairs =
            parse_conninfo(" sslmode=disable  application_name = 'my app' x='a\\'b'").unwrap();
        assert_eq!(
            pairs,
            vec![
                ("sslmode".into(), "disable".into()),
                ("application_name".into(), "my app".into()),
                ("x".into(), "a'b".into())
            ]
        );
        assert!(parse_conninfo("sslmode").is_err());
        assert!(parse_conninfo("a='open").is_err());
    }

    #[test]
    fn reserved_keys_are_refused() {
        let err = params().to_config("password=secret", std::time::Duration::from_secs(1));
        assert!(err.unwrap_err().to_string().contains("passfile"));
    }

    #[test]
    fn password_comes_from_the_passfile() {
        let path = std::env::temp_dir().join(format!("pgdist-pass-{}", std::process::id()));
        std::fs::write(
            &path,
            "# comment\nother:5433:app:alice:nope\n10.0.0.1:*:app:alice:p\\:w\n",
        )
        .unwrap();
        let extra = format!("passfile={} connect_timeout=3", path.display());
        let (config, tls) = params()
            .to_config(
                &format!("{extra} sslmode=require"),
                std::time::Duration::from_secs(1),
            )
            .unwrap();
        assert_eq!(tls.mode, crate::remote::tls::Mode::Require);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(config.get_password(), Some(&b"p:w"[..]));
        assert_eq!(
            config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        assert_eq!(config.get_application_name(), Some("pgdist:1:2"));
    }
}
