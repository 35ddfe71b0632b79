//! TLS for `rediss://` (standalone), `rediss-sentinel://` and `rediss-cluster://` URLs: the
//! rustls config every fred client of a node gets, and start-up errors that say what to fix.
//!
//! The node's settings (`LOCKSTEP_REDIS_TLS_*`) are turned into one TLS config at start
//! ([`build`], PEM files read once), carried by the node's [`RedisTarget`](super::RedisTarget)
//! to every fred client it builds (command pools, pub/sub subscribers, the revocation
//! listener). A target made from a URL alone (a tool, a test) gets the defaults: the system's
//! roots, full verification.
//!
//! Host names. A standalone server is checked against the URL's host. A Cluster announces its
//! nodes by IP (`CLUSTER SLOTS`), while managed services issue certificates for DNS names;
//! when the URL's host is a DNS name, every announced IP is checked against that name (fred's
//! `TlsHostMapping`; see docs/deployment.md). With an IP in the URL, announced IPs are checked
//! as themselves. Sentinel hands out the primary's announced address, which fred checks as is:
//! the primary's certificate must carry it (or Sentinel must announce host names).
//!
//! Errors. fred flattens TLS failures into text ([`explain`] reads it) and reports an
//! unreachable Sentinel without any cause; then one handshake of our own ([`probe`]) finds it.

use std::net::IpAddr;
use std::sync::Arc;

use fred::types::config::{HostMapping, TlsConfig, TlsConnector, TlsHostMapping};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use crate::config::RedisTls;
use crate::tls::{ClientTls, Failure, TlsError, Verify, client_config};

/// fred's TLS config, and the rustls config inside it (for [`probe`]).
#[derive(Clone)]
pub struct Tls {
    pub(super) fred: TlsConfig,
    rustls: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { .. }")
    }
}

/// Whether `url` asks for TLS (`rediss…` or `valkeys…` schemes).
pub fn uses_tls(url: &str) -> bool {
    url.starts_with("rediss") || url.starts_with("valkeys")
}

/// `url` with its TLS scheme made plain (`rediss-cluster://` → `redis-cluster://`), for fred's
/// URL parser: with a TLS scheme it would build its own rustls config from the process-default
/// crypto provider, which is what [`crate::tls`] avoids.
pub(super) fn plain_scheme(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("rediss") {
        format!("redis{rest}")
    } else if let Some(rest) = url.strip_prefix("valkeys") {
        format!("valkey{rest}")
    } else {
        url.to_owned()
    }
}

/// Builds the TLS config for `url` from `settings` (reading the PEM files now); `None` for a
/// plaintext URL (config validation already refused TLS settings with one).
pub fn build(url: &str, settings: &RedisTls) -> Result<Option<Tls>, TlsError> {
    if !uses_tls(url) {
        return Ok(None);
    }
    if settings.insecure {
        tracing::warn!(
            "LOCKSTEP_REDIS_TLS_INSECURE is on: the Redis server's certificate is NOT verified; \
             anyone on the network path can impersonate Redis. For tests only."
        );
    }
    configure(url, settings).map(Some)
}

fn configure(url: &str, settings: &RedisTls) -> Result<Tls, TlsError> {
    let verify = if settings.insecure {
        Verify::Nothing
    } else {
        Verify::Full
    };
    let client_cert = match (&settings.cert, &settings.key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    let rustls = client_config(&ClientTls {
        ca: settings.ca.as_deref(),
        ca_setting: "LOCKSTEP_REDIS_TLS_CA",
        verify,
        client_cert,
        cert_setting: "LOCKSTEP_REDIS_TLS_CERT/_KEY",
    })?;
    let rustls = Arc::new(rustls);
    let fred = TlsConfig {
        connector: TlsConnector::Rustls(tokio_rustls::TlsConnector::from(rustls.clone())),
        hostnames: host_mapping(url),
    };
    Ok(Tls { fred, rustls })
}

/// Cluster URLs whose host is a DNS name check every node against that name (see the module
/// docs); everything else checks each server as addressed.
fn host_mapping(url: &str) -> TlsHostMapping {
    let clustered = url
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.ends_with("-cluster"));
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()));
    match host {
        Some(h) if clustered && h.parse::<IpAddr>().is_err() => {
            TlsHostMapping::Custom(Arc::new(SeedHostName(h)))
        }
        _ => TlsHostMapping::None,
    }
}

/// Maps every announced IP to the URL's host name. fred's own `DefaultHost` maps to the host
/// of whichever node answered `CLUSTER SLOTS`, which after a failover may itself be an IP.
#[derive(Debug)]
struct SeedHostName(String);

impl HostMapping for SeedHostName {
    fn map(&self, _ip: &IpAddr, _default_host: &str) -> Option<String> {
        Some(self.0.clone())
    }
}

/// A fred connection error rewritten for an operator when it is a TLS failure: which side,
/// what happened and which setting to check. `None`: not a TLS failure we recognise.
pub fn explain(e: &fred::error::Error) -> Option<String> {
    let text = format!("{} {:?}", e.details(), e);
    Failure::of_text(&text).map(message)
}

/// Why a TLS connection to the first host of `url` fails, found with one handshake of our
/// own: fred reports a Sentinel it could not reach without the cause ("Failed to connect to all
/// sentinel nodes"). `None`: the handshake worked, or failed for a reason we do not know.
pub async fn probe(url: &str, tls: &Tls) -> Option<String> {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(5);
    let config = tls.rustls.clone();
    let u = url::Url::parse(url).ok()?;
    let host = u.host_str()?.trim_matches(['[', ']']).to_owned();
    let sentinel = u.scheme().ends_with("-sentinel");
    let port = u.port().unwrap_or(if sentinel { 26379 } else { 6379 });
    let tcp = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect((host.as_str(), port)))
        .await
        .ok()?
        .ok()?;
    let name = ServerName::try_from(host).ok()?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(WAIT, connector.connect(name, tcp)).await {
        Ok(Err(e)) => Failure::in_chain(&e).map(message),
        _ => None,
    }
}

fn message(failure: Failure) -> String {
    let hint = match failure {
        Failure::Untrusted => "check LOCKSTEP_REDIS_TLS_CA",
        Failure::WrongName => {
            "the certificate must name the host in LOCKSTEP_REDIS_URL (or check LOCKSTEP_REDIS_TLS_CA)"
        }
        Failure::Expired => "renew the server certificate",
        Failure::ClientCertRequired => "set LOCKSTEP_REDIS_TLS_CERT and LOCKSTEP_REDIS_TLS_KEY",
        Failure::ClientCertRejected => {
            "check LOCKSTEP_REDIS_TLS_CERT: the server does not trust it"
        }
        Failure::NotTls => "is this the server's TLS port? (rediss:// needs one)",
    };
    format!("redis TLS: {} — {hint}", failure.describe())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_schemes_are_recognised_and_made_plain() {
        assert!(uses_tls("rediss://h:6380"));
        assert!(uses_tls("rediss-cluster://h:7000?node=h:7001"));
        assert!(!uses_tls("redis://h:6379"));
        assert_eq!(plain_scheme("rediss://h:6380/0"), "redis://h:6380/0");
        assert_eq!(
            plain_scheme("rediss-sentinel://h:26379/0?sentinelServiceName=m"),
            "redis-sentinel://h:26379/0?sentinelServiceName=m"
        );
        assert_eq!(plain_scheme("valkeys://h"), "valkey://h");
        assert_eq!(plain_scheme("redis://h"), "redis://h");
    }

    #[test]
    fn cluster_nodes_are_checked_against_a_dns_seed_name_only() {
        let mapped = host_mapping("rediss-cluster://cache.example.com:7000");
        let TlsHostMapping::Custom(m) = mapped else {
            panic!("a DNS seed maps announced IPs: {mapped:?}");
        };
        assert_eq!(
            m.map(&"10.0.0.7".parse().unwrap(), "10.0.0.8").as_deref(),
            Some("cache.example.com")
        );
        assert_eq!(
            host_mapping("rediss-cluster://127.0.0.1:7000?node=127.0.0.1:7001"),
            TlsHostMapping::None
        );
        assert_eq!(
            host_mapping("rediss://cache.example.com:6380"),
            TlsHostMapping::None
        );
    }

    #[test]
    fn an_unreadable_ca_fails_registration_with_the_setting_named() {
        let settings = RedisTls {
            ca: Some("/nonexistent/redis-ca.pem".into()),
            ..RedisTls::default()
        };
        let e = build("rediss://127.0.0.1:1", &settings)
            .unwrap_err()
            .to_string();
        assert!(e.contains("LOCKSTEP_REDIS_TLS_CA"), "{e}");
        assert!(e.contains("/nonexistent/redis-ca.pem"), "{e}");
    }
}
