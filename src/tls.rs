//! rustls client configurations for every connection that leaves the pod: Redis (through fred,
//! [`crate::engine::redis::tls`]) and Postgres ([`crate::db::tls`]).
//!
//! One crypto provider, ring, named in every config this module builds (never rustls' process
//! default): rustls panics at first use when two providers are compiled in and none was
//! installed, and a config that names its provider also works in tests that never ran the
//! binary's start-up. ring rather than aws-lc-rs: no cmake or C toolchain beyond `cc` to build.
//!
//! Three levels of checking, as libpq names them: the whole chain and the host name
//! ([`Verify::Full`]), the chain only ([`Verify::ChainOnly`], Postgres `verify-ca`), or nothing
//! ([`Verify::Nothing`]: Postgres `require`/`prefer`, `LOCKSTEP_REDIS_TLS_INSECURE`). Even with
//! nothing checked, the handshake signatures are, so the connection is at least encrypted to
//! whoever holds the presented certificate's key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};

/// What of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Chain to a trusted root and the host name (or IP) we connected to.
    Full,
    /// Chain to a trusted root; any host name.
    ChainOnly,
    /// Nothing but the handshake signatures.
    Nothing,
}

/// Where the trusted roots, and our own certificate, come from. The `*_setting` names go into
/// error messages, so an operator reads which setting to fix.
#[derive(Debug, Clone)]
pub struct ClientTls<'a> {
    /// PEM file of CA certificates; `None`: the system's roots.
    pub ca: Option<&'a Path>,
    pub ca_setting: &'static str,
    pub verify: Verify,
    /// Certificate chain and private key (PEM files) for mutual TLS.
    pub client_cert: Option<(&'a Path, &'a Path)>,
    pub cert_setting: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path} ({setting}): {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        setting: &'static str,
        reason: String,
    },
    #[error("no system CA certificates found; set {setting} to a PEM file of CA certificates")]
    NoSystemRoots { setting: &'static str },
    #[error("bad TLS configuration ({setting}): {reason}")]
    Config {
        setting: &'static str,
        reason: String,
    },
}

/// The provider every config uses. rustls 0.23.48 deprecates ring's provider because it has no
/// post-quantum key exchange; the connections here are to Redis and Postgres inside one
/// network, and aws-lc-rs (the provider that has one) costs a C build of aws-lc on every CI
/// machine. Revisit when ring gains ML-KEM or the threat model changes.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client config for `tls`; reads (and checks) the PEM files now, so a missing or
/// unreadable file fails start-up rather than the first connection.
pub fn client_config(tls: &ClientTls<'_>) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            setting: tls.ca_setting,
            reason: e.to_string(),
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = match tls.verify {
        Verify::Nothing => Arc::new(NoVerification(provider.clone())),
        verify => {
            let roots = Arc::new(roots(tls)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::Config {
                    setting: tls.ca_setting,
                    reason: e.to_string(),
                })?;
            if verify == Verify::ChainOnly {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match tls.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = certs(cert, "client certificate", tls.cert_setting)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
                what: "client private key",
                path: key.to_owned(),
                setting: tls.cert_setting,
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config {
                    setting: tls.cert_setting,
                    reason: format!("client certificate and key: {e}"),
                })
        }
    }
}

/// Every certificate in a PEM file (at least one).
fn certs(
    path: &Path,
    what: &'static str,
    setting: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |reason: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        setting,
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no CERTIFICATE section in the file".into()));
    }
    Ok(certs)
}

fn roots(tls: &ClientTls<'_>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match tls.ca {
        Some(path) => {
            for cert in certs(path, "CA certificates", tls.ca_setting)? {
                store.add(cert).map_err(|e| TlsError::Pem {
                    what: "CA certificates",
                    path: path.to_owned(),
                    setting: tls.ca_setting,
                    reason: e.to_string(),
                })?;
            }
        }
        None => {
            // Unreadable entries in the system store are skipped, as browsers do: one bad
            // file there should not stop a node whose server chains to another root.
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::NoSystemRoots {
                    setting: tls.ca_setting,
                });
            }
        }
    }
    Ok(store)
}

/// Why a TLS connection failed, in the terms an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server's chain does not lead to a trusted root.
    Untrusted,
    /// The certificate is not valid for the host name we connected to.
    WrongName,
    /// Expired or not yet valid.
    Expired,
    /// The server asked for a client certificate and we sent none.
    ClientCertRequired,
    /// The server refused the client certificate we sent.
    ClientCertRejected,
    /// The other end does not speak TLS (a plaintext port).
    NotTls,
}

impl Failure {
    /// Classifies a rustls error.
    pub fn of(e: &rustls::Error) -> Option<Failure> {
        use rustls::Error as E;
        Some(match e {
            E::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    Failure::Untrusted
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Failure::WrongName,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Failure::Expired,
                _ => return None,
            },
            E::AlertReceived(AlertDescription::CertificateRequired) => Failure::ClientCertRequired,
            E::AlertReceived(
                AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied,
            ) => Failure::ClientCertRejected,
            E::InvalidMessage(_) | E::InappropriateMessage { .. } => Failure::NotTls,
            _ => return None,
        })
    }

    /// Classifies an error that reached us only as text (fred flattens its causes into a
    /// string). rustls' `Debug` names are stable API (they are the enum variants).
    pub fn of_text(text: &str) -> Option<Failure> {
        const TABLE: &[(&str, Failure)] = &[
            ("UnknownIssuer", Failure::Untrusted),
            ("BadSignature", Failure::Untrusted),
            ("NotValidForName", Failure::WrongName),
            ("not valid for name", Failure::WrongName),
            ("NotValidYet", Failure::Expired),
            ("Expired", Failure::Expired),
            ("CertificateRequired", Failure::ClientCertRequired),
            ("UnknownCA", Failure::ClientCertRejected),
            ("BadCertificate", Failure::ClientCertRejected),
            ("CertificateUnknown", Failure::ClientCertRejected),
            ("InvalidContentType", Failure::NotTls),
            ("corrupt message", Failure::NotTls),
            ("InvalidMessage", Failure::NotTls),
        ];
        TABLE
            .iter()
            .find(|(needle, _)| text.contains(needle))
            .map(|(_, f)| *f)
    }

    /// Finds a rustls error anywhere in `e`'s chain of causes (through `io::Error`s, whose
    /// `source()` skips the wrapped error itself).
    pub fn in_chain(e: &(dyn std::error::Error + 'static)) -> Option<Failure> {
        let mut next = Some(e);
        while let Some(err) = next {
            if let Some(r) = err.downcast_ref::<rustls::Error>() {
                return Failure::of(r);
            }
            if let Some(r) = err
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return Failure::of(r);
            }
            next = err.source();
        }
        None
    }

    /// What happened, e.g. "certificate not trusted (UnknownIssuer)".
    pub fn describe(self) -> &'static str {
        match self {
            Failure::Untrusted => "certificate not trusted (UnknownIssuer)",
            Failure::WrongName => {
                "certificate is not valid for the host name connected to (NotValidForName)"
            }
            Failure::Expired => "certificate expired or not yet valid",
            Failure::ClientCertRequired => {
                "the server requires a client certificate and none was sent (CertificateRequired)"
            }
            Failure::ClientCertRejected => "the server rejected our client certificate",
            Failure::NotTls => "the server did not answer in TLS (a plaintext port?)",
        }
    }
}

/// `Verify::Nothing`: any certificate, but the handshake signatures still checked.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `Verify::ChainOnly` (libpq's `verify-ca`): webpki's checks, except that a certificate
/// valid for another name passes. webpki checks the chain before the name, so a name error
/// means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(e) if Failure::of(&e) == Some(Failure::WrongName) => {
                Ok(ServerCertVerified::assertion())
            }
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_pem_file_names_the_file_and_the_setting() {
        let tls = ClientTls {
            ca: Some(Path::new("/nonexistent/ca.pem")),
            ca_setting: "LOCKSTEP_REDIS_TLS_CA",
            verify: Verify::Full,
            client_cert: None,
            cert_setting: "LOCKSTEP_REDIS_TLS_CERT",
        };
        let e = client_config(&tls).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        assert!(e.contains("LOCKSTEP_REDIS_TLS_CA"), "{e}");
    }

    #[test]
    fn a_pem_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let tls = ClientTls {
            ca: Some(&path),
            ca_setting: "sslrootcert",
            verify: Verify::ChainOnly,
            client_cert: None,
            cert_setting: "sslcert",
        };
        let e = client_config(&tls).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
    }

    #[test]
    fn nothing_to_verify_needs_no_roots() {
        let tls = ClientTls {
            ca: None,
            ca_setting: "x",
            verify: Verify::Nothing,
            client_cert: None,
            cert_setting: "y",
        };
        assert!(client_config(&tls).is_ok());
    }

    #[test]
    fn failures_are_classified_from_errors_and_from_text() {
        let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(Failure::of(&e), Some(Failure::Untrusted));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e.clone());
        assert_eq!(Failure::in_chain(&io), Some(Failure::Untrusted));
        assert_eq!(
            Failure::of_text(&format!("IO Error: {io:?}")),
            Some(Failure::Untrusted)
        );
        let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        assert_eq!(Failure::of(&alert), Some(Failure::ClientCertRequired));
        assert_eq!(
            Failure::of_text(&format!("{alert:?}")),
            Some(Failure::ClientCertRequired)
        );
        assert_eq!(Failure::of_text("connection refused"), None);
    }
}
