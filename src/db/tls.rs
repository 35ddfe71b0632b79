//! Postgres TLS from the URL, with libpq's names and meanings: `sslmode`, `sslrootcert`,
//! `sslcert`, `sslkey`.
//!
//! tokio-postgres itself knows only `sslmode` `disable`, `prefer` and `require`, and refuses
//! the other parameters, so they are taken out of the URL here; the rest of the URL goes to
//! tokio-postgres unchanged (`verify-ca`/`verify-full` as `require`), and the checks are done by
//! the rustls config handed to it:
//!
//! | sslmode       | encrypted          | server certificate checked                          |
//! |---------------|--------------------|-----------------------------------------------------|
//! | `disable`     | no                 | —                                                   |
//! | `prefer` (default) | if the server offers it | no                                     |
//! | `require`     | yes                | no; with `sslrootcert`, the chain (as libpq)        |
//! | `verify-ca`   | yes                | chain to `sslrootcert` (default: system roots)      |
//! | `verify-full` | yes                | chain and host name                                 |
//!
//! `sslrootcert=system` means the system's roots, as in libpq 16. Only the URL form
//! (`postgres://…?sslmode=…`) is read this way; a key/value connection string goes to
//! tokio-postgres as it is.

use std::path::PathBuf;

use tokio_postgres_rustls::MakeRustlsConnect;

use super::DbError;
use crate::tls::{ClientTls, Failure, Verify, client_config};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<SslMode, DbError> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // `allow` (plaintext first) has no tokio-postgres equivalent.
            other => {
                return Err(DbError::Url(format!(
                    "sslmode={other} is not supported (use disable, prefer, require, verify-ca \
                     or verify-full)"
                )));
            }
        })
    }

    /// What tokio-postgres is told; the verification is ours.
    fn for_tokio_postgres(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
        }
    }
}

/// A parsed database URL: the tokio-postgres config and the TLS connector for it.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub mode: SslMode,
}

/// Parses `url`, reading the certificate files it names now (a missing file fails start-up).
/// Errors never contain the URL itself (it may carry a password).
pub fn target(url: &str) -> Result<Target, DbError> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let (rest, mode, root, cert, key) = if is_url {
        split_tls_params(url)?
    } else {
        (url.to_owned(), SslMode::Prefer, None, None, None)
    };
    let config: tokio_postgres::Config = rest.parse().map_err(|e| DbError::Url(format!("{e}")))?;
    // Key/value strings keep tokio-postgres' own reading of sslmode.
    let mode = if is_url {
        mode
    } else {
        match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        }
    };
    let system = root.as_deref() == Some(std::path::Path::new("system"));
    let verify = match mode {
        SslMode::VerifyFull => Verify::Full,
        SslMode::VerifyCa => Verify::ChainOnly,
        // libpq: "if a root CA file exists, require behaves as verify-ca".
        SslMode::Require if root.is_some() => Verify::ChainOnly,
        _ => Verify::Nothing,
    };
    let client_cert = match (&cert, &key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => {
            return Err(DbError::Url(
                "sslcert and sslkey must be given together".into(),
            ));
        }
    };
    let rustls = client_config(&ClientTls {
        ca: root.as_deref().filter(|_| !system),
        ca_setting: "sslrootcert in LOCKSTEP_DATABASE_URL",
        verify,
        client_cert,
        cert_setting: "sslcert/sslkey in LOCKSTEP_DATABASE_URL",
    })
    .map_err(|e| DbError::Tls(e.to_string()))?;
    Ok(Target {
        config,
        tls: MakeRustlsConnect::new(rustls),
        mode,
    })
}

type Split = (
    String,
    SslMode,
    Option<PathBuf>,
    Option<PathBuf>,
    Option<PathBuf>,
);

/// Takes the libpq TLS parameters out of a URL.
fn split_tls_params(url: &str) -> Result<Split, DbError> {
    let mut u =
        url::Url::parse(url).map_err(|e| DbError::Url(format!("not a postgres URL: {e}")))?;
    let (mut mode, mut root, mut cert, mut key) = (SslMode::Prefer, None, None, None);
    let mut kept = Vec::new();
    for (k, v) in u.query_pairs() {
        match &*k {
            "sslmode" => mode = SslMode::parse(&v)?,
            "sslrootcert" => root = Some(PathBuf::from(&*v)),
            "sslcert" => cert = Some(PathBuf::from(&*v)),
            "sslkey" => key = Some(PathBuf::from(&*v)),
            _ => kept.push((k.into_owned(), v.into_owned())),
        }
    }
    kept.push(("sslmode".into(), mode.for_tokio_postgres().into()));
    u.query_pairs_mut().clear().extend_pairs(kept);
    Ok((u.into(), mode, root, cert, key))
}

/// A failed connection, explained when TLS is why: which setting to fix.
pub fn connect_error(e: &tokio_postgres::Error, mode: SslMode) -> DbError {
    if let Some(failure) = Failure::in_chain(e) {
        let hint = match failure {
            Failure::Untrusted => "check sslrootcert in LOCKSTEP_DATABASE_URL",
            Failure::WrongName => {
                "the certificate must name the URL's host (or use sslmode=verify-ca)"
            }
            Failure::Expired => "renew the server certificate",
            Failure::ClientCertRequired | Failure::ClientCertRejected => {
                "check sslcert/sslkey in LOCKSTEP_DATABASE_URL"
            }
            Failure::NotTls => "is this a Postgres port?",
        };
        return DbError::Tls(format!("{} — {hint}", failure.describe()));
    }
    let text = e.to_string();
    if let Some(db) = e.as_db_error() {
        // pg_hba.conf with `hostssl` lines only: a plaintext connection has no entry.
        if mode == SslMode::Disable && db.message().contains("no encryption") {
            return DbError::Tls(format!(
                "the server refuses connections without TLS ({}) — use sslmode=require or \
                 stronger",
                db.message()
            ));
        }
    }
    if text.contains("server does not support TLS") {
        return DbError::Tls(format!(
            "the server does not support TLS but sslmode={mode:?} requires it"
        ));
    }
    DbError::Unavailable(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_are_taken_out_of_the_url() {
        let (rest, mode, root, cert, key) = split_tls_params(
            "postgres://u:pw@db.internal:5432/app?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(root, Some(PathBuf::from("/ca.pem")));
        assert_eq!((cert, key), (None, None));
        assert_eq!(
            rest,
            "postgres://u:pw@db.internal:5432/app?application_name=x&sslmode=require"
        );
        let c: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn the_default_is_prefer_and_unknown_modes_are_refused() {
        let t = target("postgres://u@h/db").unwrap();
        assert_eq!(t.mode, SslMode::Prefer);
        assert!(target("postgres://u:secret@h/db?sslmode=allow").is_err());
        let kv = target("host=h user=u sslmode=require").unwrap();
        assert_eq!(kv.mode, SslMode::Require);
    }

    #[test]
    fn errors_name_the_file_but_never_the_password() {
        let e = target(
            "postgres://u:hunter2@h/db?sslmode=verify-full&sslrootcert=/nonexistent/root.pem",
        )
        .err()
        .expect("a missing root file fails")
        .to_string();
        assert!(e.contains("/nonexistent/root.pem"), "{e}");
        assert!(e.contains("sslrootcert"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = target("postgres://u:hunter2@h/db?sslcert=/c.pem")
            .err()
            .expect("a cert without a key fails")
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
