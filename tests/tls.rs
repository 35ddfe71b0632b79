//! TLS to Redis (`rediss://`, `LOCKSTEP_REDIS_TLS_*`) and to Postgres (`sslmode` in the URL),
//! against a real TLS-only `redis-server` and a real Postgres with `ssl = on` and `hostssl`
//! lines only, each with a CA the test makes. Start-up failures must say which side failed
//! and why.

mod common;

use std::path::Path;
use std::time::Duration;

use common::certs::TestCa;
use common::postgres::PostgresServer;
use common::redis::{TlsRedisCluster, TlsRedisServer, TlsSentinel};
use lockstep::config::{Config, LockReplicas, RedisTls};
use serde_json::json;

/// Starts a node with `f` applied to a test config; the start-up error as text.
async fn try_start(
    f: impl FnOnce(&mut Config),
) -> Result<(lockstep::Running, tempfile::TempDir), String> {
    let _ = lockstep::logging::init(lockstep::config::LogFormat::Text, "test");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::for_tests(dir.path().to_owned());
    config.drain_timeout = Duration::from_secs(3);
    f(&mut config);
    match tokio::time::timeout(Duration::from_secs(60), lockstep::start(config)).await {
        Ok(Ok(running)) => Ok((running, dir)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => panic!("start-up neither succeeded nor failed within 60s"),
    }
}

fn trusting(ca: &Path) -> RedisTls {
    RedisTls {
        ca: Some(ca.to_owned()),
        ..RedisTls::default()
    }
}

/// A WebSocket client on `running` joins a room and is granted a lock: the whole path works.
async fn a_lock_is_granted(running: &lockstep::Running) -> u64 {
    a_lock_is_granted_on(running, "segment:1").await
}

async fn a_lock_is_granted_on(running: &lockstep::Running, resource: &str) -> u64 {
    let http = reqwest::Client::new();
    let r: serde_json::Value = http
        .post(format!("http://{}/v1/dev/token", running.addr))
        .json(&json!({"sub": "alice", "name": "Alice"}))
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token json");
    let token = r["token"].as_str().expect("token");
    let mut alice = common::Client::connect(running.addr, token, common::Codec::Json, None).await;
    alice.join("doc:tls").await;
    let g = alice
        .request(json!({"type": "lock.acquire", "room": "doc:tls", "resource": resource, "action": "edit"}))
        .await;
    g["token"]
        .as_u64()
        .unwrap_or_else(|| panic!("no grant: {g}"))
}

async fn start_err(url: &str, tls: RedisTls) -> String {
    let url = url.to_owned();
    match try_start(move |c| {
        c.redis_url = Some(url);
        c.redis_tls = tls;
    })
    .await
    {
        Ok((running, _dir)) => {
            running.shutdown().await;
            panic!("the node started")
        }
        Err(e) => e,
    }
}

fn assert_says(e: &str, parts: &[&str]) {
    eprintln!("start-up error: {e}");
    for p in parts {
        assert!(e.contains(p), "expected {p:?} in the start-up error: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_verifies_the_server_and_says_why_it_refuses() {
    let ca = TestCa::new("redis");
    let cert = ca.server("redis-server", &["localhost", "127.0.0.1"]);
    let redis = TlsRedisServer::start(&cert, &ca.ca_pem, false);

    // The right CA, host name checked (`localhost` is in the certificate): locks work.
    let url = redis.url("localhost");
    let (running, _dir) = try_start(|c| {
        c.redis_url = Some(url.clone());
        c.redis_tls = trusting(&ca.ca_pem);
    })
    .await
    .expect("the node starts over TLS");
    assert!(a_lock_is_granted(&running).await > 0);
    running.shutdown().await;

    // Another CA: not trusted, and the error names the setting.
    let other = TestCa::new("other");
    let e = start_err(&url, trusting(&other.ca_pem)).await;
    assert_says(
        &e,
        &[
            "redis TLS: certificate not trusted (UnknownIssuer)",
            "LOCKSTEP_REDIS_TLS_CA",
        ],
    );
    assert!(!e.contains("connection reset"), "{e}");

    // No CA setting: the system roots do not know a test CA either.
    let e = start_err(&url, RedisTls::default()).await;
    assert_says(&e, &["UnknownIssuer"]);

    // Verification off, explicitly: the untrusted server is accepted.
    let insecure = RedisTls {
        ca: Some(other.ca_pem.clone()),
        insecure: true,
        ..RedisTls::default()
    };
    let (running, _dir) = try_start(|c| {
        c.redis_url = Some(url.clone());
        c.redis_tls = insecure;
    })
    .await
    .expect("insecure mode accepts any certificate");
    running.shutdown().await;

    // A missing CA file: start-up fails before any connection, naming the file.
    let e = start_err(&url, trusting(Path::new("/nonexistent/ca.pem"))).await;
    assert_says(
        &e,
        &["redis TLS", "/nonexistent/ca.pem", "LOCKSTEP_REDIS_TLS_CA"],
    );

    // A plaintext URL to the TLS port: no silent fallback.
    let plain = format!("redis://127.0.0.1:{}", redis.port);
    let e = tokio::time::timeout(Duration::from_secs(60), async {
        try_start(|c| c.redis_url = Some(plain)).await.err()
    })
    .await
    .expect("ends");
    eprintln!("plaintext to the TLS port: {e:?}");
    assert!(e.is_some(), "a plaintext client must not get through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_host_is_refused() {
    let ca = TestCa::new("names");
    // Valid for `localhost` only; the URL says 127.0.0.1.
    let cert = ca.server("redis-server", &["localhost"]);
    let redis = TlsRedisServer::start(&cert, &ca.ca_pem, false);
    let e = start_err(&redis.url("127.0.0.1"), trusting(&ca.ca_pem)).await;
    assert_says(&e, &["redis TLS", "NotValidForName"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mutual_tls_needs_a_client_certificate_from_the_trusted_ca() {
    let ca = TestCa::new("mtls");
    let cert = ca.server("redis-server", &["localhost", "127.0.0.1"]);
    let redis = TlsRedisServer::start(&cert, &ca.ca_pem, true);
    let url = redis.url("localhost");

    let e = start_err(&url, trusting(&ca.ca_pem)).await;
    assert_says(
        &e,
        &[
            "redis TLS",
            "requires a client certificate",
            "LOCKSTEP_REDIS_TLS_CERT",
        ],
    );

    let stranger_ca = TestCa::new("stranger");
    let stranger = stranger_ca.client("lockstep");
    let e = start_err(
        &url,
        RedisTls {
            ca: Some(ca.ca_pem.clone()),
            cert: Some(stranger.cert),
            key: Some(stranger.key),
            insecure: false,
        },
    )
    .await;
    assert_says(&e, &["redis TLS", "rejected our client certificate"]);

    let client = ca.client("lockstep");
    let tls = RedisTls {
        ca: Some(ca.ca_pem.clone()),
        cert: Some(client.cert),
        key: Some(client.key),
        insecure: false,
    };
    let (running, _dir) = try_start(|c| {
        c.redis_url = Some(url.clone());
        c.redis_tls = tls;
    })
    .await
    .expect("the node starts with its client certificate");
    assert!(a_lock_is_granted(&running).await > 0);
    running.shutdown().await;
}

fn pg_url(host: &str, port: u16, params: &str) -> String {
    format!("postgres://postgres@{host}:{port}/postgres?{params}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sslmodes_against_a_tls_only_server() {
    let ca = TestCa::new("pg");
    // Valid for `localhost` only, so 127.0.0.1 is "another host name".
    let cert = ca.server("pg-server", &["localhost"]);
    let pg = PostgresServer::start_tls(&cert);
    let root = ca.ca_pem.display().to_string();

    // verify-full: the node migrates, registers fences and writes audit over TLS.
    let url = pg_url(
        "localhost",
        pg.port,
        &format!("sslmode=verify-full&sslrootcert={root}"),
    );
    let (running, _dir) = try_start(|c| c.database_url = Some(url))
        .await
        .expect("the node starts with verify-full");
    let token = a_lock_is_granted(&running).await;
    assert_eq!(
        pg.psql("SELECT token FROM lockstep.fences WHERE room = 'doc:tls'"),
        token.to_string(),
        "the grant's fence was registered over TLS"
    );
    let mut written = 0;
    for _ in 0..200 {
        written = pg
            .psql("SELECT count(*) FROM lockstep.audit_events")
            .parse::<u64>()
            .expect("count");
        if written > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(written > 0, "audit records reached Postgres");
    let plain = pg.psql(
        "SELECT count(*) FROM pg_stat_activity a LEFT JOIN pg_stat_ssl s USING (pid) \
         WHERE a.backend_type = 'client backend' AND a.client_addr IS NOT NULL \
         AND a.pid <> pg_backend_pid() AND NOT coalesce(s.ssl, false)",
    );
    assert_eq!(plain, "0", "every connection of the node is encrypted");
    running.shutdown().await;

    // verify-full to a name the certificate does not carry.
    let e = lockstep::db::migrate(&pg_url(
        "127.0.0.1",
        pg.port,
        &format!("sslmode=verify-full&sslrootcert={root}"),
    ))
    .await
    .expect_err("the host name is checked")
    .to_string();
    assert_says(&e, &["postgres TLS", "NotValidForName"]);

    // verify-ca checks the chain only: the same connection passes.
    lockstep::db::migrate(&pg_url(
        "127.0.0.1",
        pg.port,
        &format!("sslmode=verify-ca&sslrootcert={root}"),
    ))
    .await
    .expect("verify-ca ignores the host name");

    // A root that did not sign the server's certificate.
    let other = TestCa::new("pg-other");
    let e = lockstep::db::migrate(&pg_url(
        "localhost",
        pg.port,
        &format!("sslmode=verify-ca&sslrootcert={}", other.ca_pem.display()),
    ))
    .await
    .expect_err("the chain is checked")
    .to_string();
    assert_says(
        &e,
        &[
            "postgres TLS: certificate not trusted (UnknownIssuer)",
            "sslrootcert",
        ],
    );
    // require with that root behaves as verify-ca (libpq).
    let e = lockstep::db::migrate(&pg_url(
        "localhost",
        pg.port,
        &format!("sslmode=require&sslrootcert={}", other.ca_pem.display()),
    ))
    .await
    .expect_err("require + sslrootcert checks the chain")
    .to_string();
    assert_says(&e, &["UnknownIssuer"]);

    // require without a root: encrypted, nothing checked.
    lockstep::db::migrate(&pg_url("127.0.0.1", pg.port, "sslmode=require"))
        .await
        .expect("require without sslrootcert connects");

    // disable: the server has no plaintext entry in pg_hba.conf.
    let e = lockstep::db::migrate(&pg_url("127.0.0.1", pg.port, "sslmode=disable"))
        .await
        .expect_err("plaintext is refused")
        .to_string();
    assert_says(
        &e,
        &[
            "postgres TLS",
            "refuses connections without TLS",
            "sslmode=require",
        ],
    );
}

/// A TLS Cluster announces its nodes by IP (127.0.0.1) while the certificate names only
/// `localhost`: every node is checked against the URL's host name, so the node works; and a
/// lock is granted through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_over_tls_checks_announced_nodes_against_the_url_host() {
    let ca = TestCa::new("cluster");
    let cert = ca.peer("redis-node", &["localhost"]);
    let cluster = TlsRedisCluster::start(&cert, &ca.ca_pem);
    assert_eq!(cluster.node_count(), 3);
    let url = cluster.url("localhost");
    let (running, _dir) = try_start(|c| {
        c.redis_url = Some(url.clone());
        c.redis_tls = trusting(&ca.ca_pem);
        // No replicas here (TLS is under test; tests/redis_failover.rs covers replication),
        // and `auto` wants one on a Sentinel or Cluster URL.
        c.lock_replicas = LockReplicas::Count(0);
    })
    .await
    .expect("the node starts on a TLS cluster");
    // Several resources, so keys land on more than one node.
    for i in 0..3 {
        assert!(a_lock_is_granted_on(&running, &format!("segment:{i}")).await > 0);
    }
    running.shutdown().await;

    // Addressed by IP, the certificate (no IP in it) does not match: refused, clearly.
    let e = start_err(&cluster.url("127.0.0.1"), trusting(&ca.ca_pem)).await;
    assert_says(&e, &["redis TLS", "NotValidForName"]);
}

/// Sentinel over TLS: the node asks a TLS Sentinel for the primary, then connects to the
/// address it reports (127.0.0.1, which the certificate carries) over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_over_tls_finds_and_verifies_the_primary() {
    let ca = TestCa::new("sentinel");
    let cert = ca.peer("redis", &["localhost", "127.0.0.1"]);
    let primary = TlsRedisServer::start(&cert, &ca.ca_pem, false);
    let sentinel = TlsSentinel::start(&cert, &ca.ca_pem, &primary, "main");
    let url = sentinel.url("localhost", "main");
    let (running, _dir) = try_start(|c| {
        c.redis_url = Some(url.clone());
        c.redis_tls = trusting(&ca.ca_pem);
        // No replicas here (TLS is under test; tests/redis_failover.rs covers replication),
        // and `auto` wants one on a Sentinel or Cluster URL.
        c.lock_replicas = LockReplicas::Count(0);
    })
    .await
    .expect("the node starts through a TLS Sentinel");
    assert!(a_lock_is_granted(&running).await > 0);
    running.shutdown().await;

    let other = TestCa::new("sentinel-other");
    let e = start_err(&url, trusting(&other.ca_pem)).await;
    assert_says(&e, &["redis TLS", "UnknownIssuer"]);
}
