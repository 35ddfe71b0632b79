//! A throwaway certificate authority per test (rcgen, ECDSA P-256) and the server and client
//! certificates it signs, written as PEM files into a temp dir.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
    /// The CA certificate (what a client trusts).
    pub ca_pem: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");
        let dir = tempfile::tempdir().expect("tempdir");
        // Readable by other users: the Postgres server runs as `postgres`.
        set_mode(dir.path(), 0o755);
        let ca_pem = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca_pem, issuer.pem()).expect("write CA");
        TestCa {
            issuer,
            dir,
            ca_pem,
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, file: &str, names: &[&str]) -> CertFiles {
        self.leaf(file, names, &[ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// A certificate usable both ways, for servers that also connect to each other with it
    /// (Redis Cluster nodes on their TLS bus).
    pub fn peer(&self, file: &str, names: &[&str]) -> CertFiles {
        self.leaf(
            file,
            names,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A client certificate (CN = `file`).
    pub fn client(&self, file: &str) -> CertFiles {
        self.leaf(file, &[], &[ExtendedKeyUsagePurpose::ClientAuth])
    }

    fn leaf(&self, file: &str, names: &[&str], usage: &[ExtendedKeyUsagePurpose]) -> CertFiles {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = usage.to_vec();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        set_mode(&files.key, 0o600);
        files
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
