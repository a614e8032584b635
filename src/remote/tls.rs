//! TLS to the nodes, set up the libpq way: `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in
//! `pgdist.node_conninfo`, with OpenSSL.
//!
//! The modes mean what they mean for libpq: `disable` never encrypts; `allow` and `prefer`
//! (the default) encrypt when the node offers it, without checking its certificate; `require`
//! insists on encryption and checks the certificate only when `sslrootcert` is given;
//! `verify-ca` checks that a trusted authority signed it; `verify-full` also that it names the
//! node's host. The trusted authorities come from `sslrootcert` (a PEM file, or `system` for
//! the system's store), or else from `~/.postgresql/root.crt` of the server's OS user, as for
//! libpq. A client certificate is sent when `sslcert` and `sslkey` are given.

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode as WireMode;
use tokio_postgres::{CancelToken, NoTls};

use crate::remote::RemoteError;

/// The connection parameters this module takes out of `pgdist.node_conninfo`.
pub const TLS_KEYS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: Mode,
    pub root_cert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl TlsSettings {
    /// Takes one `key=value` of `TLS_KEYS`.
    pub fn set(&mut self, key: &str, value: String) -> Result<(), RemoteError> {
        match key {
            "sslmode" => {
                self.mode = match value.as_str() {
                    "disable" => Mode::Disable,
                    "allow" => Mode::Allow,
                    "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(RemoteError::BadConninfo(format!(
                            "invalid sslmode \"{other}\": use disable, allow, prefer, require, \
                             verify-ca or verify-full"
                        )))
                    }
                }
            }
            "sslrootcert" => self.root_cert = Some(value),
            "sslcert" => self.cert = Some(value),
            "sslkey" => self.key = Some(value),
            _ => {}
        }
        Ok(())
    }

    /// What tokio-postgres asks the node for.
    pub fn wire_mode(&self) -> WireMode {
        match self.mode {
            Mode::Disable => WireMode::Disable,
            Mode::Allow | Mode::Prefer => WireMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => WireMode::Require,
        }
    }

    /// The connector for these settings; None when TLS is disabled. Reads the certificate files.
    pub fn connector(&self) -> Result<Option<MakeTlsConnector>, String> {
        if self.mode == Mode::Disable {
            return Ok(None);
        }
        let mut builder = SslConnector::builder(SslMethod::tls()).map_err(|e| e.to_string())?;
        let roots = self.root_cert.clone().or_else(|| {
            let default = format!("{}/.postgresql/root.crt", std::env::var("HOME").ok()?);
            std::path::Path::new(&default).exists().then_some(default)
        });
        let verify = match (self.mode, &roots) {
            (Mode::VerifyCa | Mode::VerifyFull, None) => {
                return Err(format!(
                    "sslmode={} needs the certificates of the authorities to trust: set \
                     sslrootcert in pgdist.node_conninfo (a PEM file, or system)",
                    if self.mode == Mode::VerifyCa {
                        "verify-ca"
                    } else {
                        "verify-full"
                    }
                ))
            }
            (Mode::VerifyCa | Mode::VerifyFull | Mode::Require, Some(_)) => true,
            _ => false,
        };
        if verify {
            match roots.as_deref() {
                Some("system") => builder.set_default_verify_paths(),
                Some(file) => builder.set_ca_file(file),
                None => Ok(()),
            }
            .map_err(|e| format!("could not read sslrootcert: {e}"))?;
            builder.set_verify(SslVerifyMode::PEER);
        } else {
            builder.set_verify(SslVerifyMode::NONE);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            builder
                .set_certificate_chain_file(cert)
                .map_err(|e| format!("could not read sslcert \"{cert}\": {e}"))?;
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(|e| format!("could not read sslkey \"{key}\": {e}"))?;
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        let check_host = verify && self.mode == Mode::VerifyFull;
        connector.set_callback(move |config, _host| {
            config.set_verify_hostname(check_host);
            Ok(())
        });
        Ok(Some(connector))
    }
}

/// How to cancel the command running on one connection: over TLS when the connection uses it.
#[derive(Clone)]
pub struct Canceller {
    pub token: CancelToken,
    pub tls: Option<MakeTlsConnector>,
}

impl Canceller {
    pub async fn cancel(&self) {
        let _ = match &self.tls {
            Some(tls) => self.token.cancel_query(tls.clone()).await,
            None => self.token.cancel_query(NoTls).await,
        };
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn modes_are_parsed_and_mapped_like_libpq() {
        let mut settings = TlsSettings::default();
        assert_eq!(settings.wire_mode(), WireMode::Prefer);
        settings.set("sslmode", "verify-full".into()).unwrap();
        assert_eq!(settings.wire_mode(), WireMode::Require);
        assert!(settings.set("sslmode", "sometimes".into()).is_err());
        // Verification without authorities to trust is refused up front.
        let err = settings.connector().err().unwrap_or_default();
        assert!(err.contains("sslrootcert"), "{err}");
        settings.set("sslmode", "disable".into()).unwrap();
        assert!(settings.connector().unwrap().is_none());
        settings.set("sslmode", "require".into()).unwrap();
        assert!(settings.connector().unwrap().is_some());
    }
}
