//! A private `redis-server` per test, on a free port, that the test may kill, pause and restart.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::free_port;

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` (no persistence) and waits until it answers PING.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedisServer {
            port: free_port(),
            child: None,
            dir,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install -y redis-server)");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        RedisServer::wait_port(self.port);
    }

    /// Waits until a redis-server on `port` answers PING.
    pub fn wait_port(port: u16) {
        for _ in 0..200 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                if s.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 7];
                    if s.read(&mut buf).is_ok_and(|n| n > 0) && buf.starts_with(b"+PONG") {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on port {port} did not start");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`: the data is gone (no persistence).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again, empty, on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// Runs a redis-cli command against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private 3-master Redis Cluster (no replicas) on free ports.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut children = Vec::new();
        for p in &ports {
            let node_dir = dir.path().join(p.to_string());
            std::fs::create_dir_all(&node_dir).expect("node dir");
            children.push(
                Command::new("redis-server")
                    .args([
                        "--port",
                        &p.to_string(),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                    ])
                    .args(["--appendonly", "no", "--cluster-enabled", "yes"])
                    .args(["--cluster-node-timeout", "2000", "--dir"])
                    .arg(&node_dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server"),
            );
        }
        let cluster = RedisCluster {
            ports,
            children,
            _dir: dir,
        };
        for p in &cluster.ports {
            RedisServer::wait_port(*p);
        }
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Wait until every node agrees the cluster is up.
        for _ in 0..100 {
            let ok = cluster.ports.iter().all(|p| {
                let o = Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok")
            });
            if ok {
                return cluster;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis cluster did not converge");
    }

    /// fred's cluster URL: one seed node plus the others as `node=` parameters.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.ports[0]);
        for (i, p) in self.ports[1..].iter().enumerate() {
            url.push_str(if i == 0 { "?" } else { "&" });
            url.push_str(&format!("node=127.0.0.1:{p}"));
        }
        url
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- TLS servers (issue 12, item 3) ----

/// A `redis-server` that speaks TLS only (`--port 0 --tls-port P`), serving `server`'s
/// certificate; with `auth_clients` it requires a client certificate signed by `ca`.
pub struct TlsRedisServer {
    pub port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl TlsRedisServer {
    pub fn start(
        server: &super::certs::CertFiles,
        ca: &std::path::Path,
        auth_clients: bool,
    ) -> TlsRedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(&server.cert)
            .arg("--tls-key-file")
            .arg(&server.key)
            .arg("--tls-ca-cert-file")
            .arg(ca)
            .args([
                "--tls-auth-clients",
                if auth_clients { "yes" } else { "no" },
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install -y redis-server)");
        let s = TlsRedisServer {
            port,
            child: Some(child),
            _dir: dir,
        };
        wait_listening(port);
        s
    }

    /// `rediss://host:port`; `host` must be a name the server certificate carries for a
    /// verifying client.
    pub fn url(&self, host: &str) -> String {
        format!("rediss://{host}:{}", self.port)
    }
}

impl Drop for TlsRedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until something accepts TCP connections on `port` (a TLS server cannot be PINGed
/// in plaintext).
fn wait_listening(port: u16) {
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("TLS redis-server on port {port} did not start");
}

/// A 3-master Redis Cluster that speaks TLS only, between nodes too (`--tls-cluster yes
/// --tls-replication yes`), every node serving `server`'s certificate.
pub struct TlsRedisCluster {
    pub ports: Vec<u16>,
    nodes: Vec<TlsRedisServer>,
}

impl TlsRedisCluster {
    pub fn start(server: &super::certs::CertFiles, ca: &std::path::Path) -> TlsRedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let child = Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .arg("--tls-cert-file")
                .arg(&server.cert)
                .arg("--tls-key-file")
                .arg(&server.key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no", "--dir"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server");
            nodes.push(TlsRedisServer {
                port,
                child: Some(child),
                _dir: dir,
            });
        }
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        for p in &ports {
            wait_listening(*p);
        }
        // `timeout`: `--cluster create` waits forever for nodes that cannot meet on the bus.
        let cli = |args: &[&str]| {
            Command::new("timeout")
                .args(["60", "redis-cli", "--tls", "--cacert"])
                .arg(ca)
                .args(args)
                .output()
                .expect("redis-cli")
        };
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addrs.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cli(&create);
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..200 {
            let ok = ports.iter().all(|p| {
                let o = cli(&["-h", "127.0.0.1", "-p", &p.to_string(), "cluster", "info"]);
                String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok")
            });
            if ok {
                return TlsRedisCluster { ports, nodes };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("TLS redis cluster did not converge");
    }

    /// fred's TLS cluster URL with every node addressed as `host`.
    pub fn url(&self, host: &str) -> String {
        let mut url = format!("rediss-cluster://{host}:{}", self.ports[0]);
        for (i, p) in self.ports[1..].iter().enumerate() {
            url.push_str(if i == 0 { "?" } else { "&" });
            url.push_str(&format!("node={host}:{p}"));
        }
        url
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

/// One Sentinel that speaks TLS only (`--tls-replication yes`: it talks TLS to the primary
/// too), monitoring `primary` as service `name` with quorum 1.
pub struct TlsSentinel {
    pub port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl TlsSentinel {
    pub fn start(
        server: &super::certs::CertFiles,
        ca: &std::path::Path,
        primary: &TlsRedisServer,
        name: &str,
    ) -> TlsSentinel {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n\
                 tls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor {name} 127.0.0.1 {primary} 1\n",
                dir = dir.path().display(),
                cert = server.cert.display(),
                key = server.key.display(),
                ca = ca.display(),
                primary = primary.port,
            ),
        )
        .expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        let s = TlsSentinel {
            port,
            child: Some(child),
            _dir: dir,
        };
        wait_listening(port);
        s
    }

    /// fred's TLS Sentinel URL for service `name`, the Sentinel addressed as `host`.
    pub fn url(&self, host: &str, name: &str) -> String {
        format!(
            "rediss-sentinel://{host}:{}/0?sentinelServiceName={name}",
            self.port
        )
    }
}

impl Drop for TlsSentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
