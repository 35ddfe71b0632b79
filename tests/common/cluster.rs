//! Real gateway processes (the `lockstep` binary) sharing one Redis, for multi-node tests.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::free_port;

/// The HS256 secret every test node shares, so a token works on any node.
pub const SECRET: &str = "lockstep-test-secret-0123456789abcdef";

pub struct Gateway {
    pub port: u16,
    pub node_id: String,
    child: Option<Child>,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts a node on a free port with short timers; `extra` overrides any setting.
    pub async fn start(redis_url: &str, node_id: &str, extra: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut env: Vec<(String, String)> = [
            ("LOCKSTEP_LISTEN", format!("127.0.0.1:{port}")),
            ("LOCKSTEP_REDIS_URL", redis_url.to_owned()),
            ("LOCKSTEP_NODE_ID", node_id.to_owned()),
            ("LOCKSTEP_JWT_SECRET", SECRET.to_owned()),
            (
                "LOCKSTEP_ADMIN_TOKEN",
                "test-admin-token-0123456789".to_owned(),
            ),
            ("LOCKSTEP_DATA_DIR", dir.path().display().to_string()),
            ("LOCKSTEP_LOCK_LEASE", "1s".to_owned()),
            ("LOCKSTEP_RESUME_GRACE", "5s".to_owned()),
            ("LOCKSTEP_DRAIN_TIMEOUT", "3s".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
            // Tests drive many HTTP requests from one address and user; the throttles have
            // their own tests (tests/http_limits.rs).
            (
                "LOCKSTEP_HTTP_REQUESTS_PER_SECOND_PER_IP",
                "100000".to_owned(),
            ),
            (
                "LOCKSTEP_HTTP_REQUESTS_PER_SECOND_PER_USER",
                "100000".to_owned(),
            ),
            ("LOCKSTEP_HTTP_BURST", "100000".to_owned()),
            ("LOCKSTEP_MAX_HTTP_LOCKS_PER_USER", "100000".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        let mut g = Gateway {
            port,
            node_id: node_id.to_owned(),
            child: None,
            env,
            _dir: dir,
        };
        g.spawn().await;
        g
    }

    async fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn lockstep");
        self.child = Some(child);
        self.wait_ready().await;
    }

    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(r) = client.get(self.url("/readyz")).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("node {} did not become ready", self.node_id);
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// The node's `/metrics` text (read it with [`super::metric_sum`]).
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig}");
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// SIGTERM and wait for the process to exit (drain); returns whether it exited in time.
    pub async fn terminate(&mut self, within: Duration) -> bool {
        self.terminate_status(within).await.is_some()
    }

    /// SIGTERM and wait up to `within` for the process to exit; returns its exit status, or
    /// `None` if it was still running then (it is left running: `Drop` kills it).
    pub async fn terminate_status(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A user token signed with [`SECRET`], valid for an hour, editor everywhere unless `rooms`.
pub fn token(sub: &str, rooms: Option<serde_json::Value>) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let claims = serde_json::json!({
        "sub": sub,
        "name": format!("{sub}-name"),
        "rooms": rooms.unwrap_or_else(|| serde_json::json!({"*": "editor"})),
        "exp": exp,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}
