//! A private `redis-server` per test, on a free port, that the test may kill, pause and restart.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::free_port;

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Extra `redis-server` arguments (a replica's `--replicaof`).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server` (no persistence) and waits until it answers PING.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedisServer {
            port: free_port(),
            child: None,
            dir,
            extra: Vec::new(),
        };
        s.spawn();
        s
    }

    /// Starts a replica of `primary` and waits until its replication link is up (initial sync
    /// done) and the primary's stream reaches it: a write on the primary is acknowledged by
    /// `WAIT`. Until the replica's first `REPLCONF ACK` (up to a second after the sync) the
    /// primary holds its stream back, and a `WAIT` with a short timeout would count nobody.
    pub fn start_replica_of(primary: &RedisServer) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedisServer {
            port: free_port(),
            child: None,
            dir,
            extra: vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary.port.to_string(),
            ],
        };
        s.spawn();
        s.wait_link_up();
        s.wait_acknowledging(primary);
        s
    }

    /// Waits until this replica acknowledges a write made on `primary` (`SET` then `WAIT 1`
    /// on one connection: `WAIT` counts its own connection's writes only).
    fn wait_acknowledging(&self, primary: &RedisServer) {
        use std::io::Write;
        for _ in 0..50 {
            let mut cli = Command::new("redis-cli")
                .args(["-p", &primary.port.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("redis-cli");
            cli.stdin
                .take()
                .expect("stdin")
                .write_all(b"SET lockstep-test-synced 1\nWAIT 1 200\n")
                .expect("write to redis-cli");
            let out = cli.wait_with_output().expect("redis-cli");
            if String::from_utf8_lossy(&out.stdout).lines().last() == Some("1") {
                return;
            }
        }
        panic!("replica on {} never acknowledged a write", self.port);
    }

    /// Waits until this replica's link to its primary is up.
    pub fn wait_link_up(&self) {
        for _ in 0..1200 {
            if self
                .cli(&["info", "replication"])
                .contains("master_link_status:up")
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("replica on {} never synced", self.port);
    }

    /// `master` or `slave`, as `INFO replication` says.
    pub fn role(&self) -> String {
        let info = self.cli(&["info", "replication"]);
        info.lines()
            .find_map(|l| l.strip_prefix("role:"))
            .unwrap_or("")
            .trim()
            .to_owned()
    }

    /// `SET key <bytes of ballast>`: written to a primary whose replica is paused, it fills the
    /// replication socket's kernel buffers, so every later write stays in the primary's own
    /// output buffer and is lost with it when it is killed — as it would be on a congested or
    /// partitioned link. (Without it, a SIGSTOPped replica still receives the stream into its
    /// socket buffer and applies it on SIGCONT.)
    pub fn ballast(&self, key: &str, bytes: usize) {
        ballast_port(self.port, key, bytes);
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
            .args([
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
            ])
            .arg(self.dir.path())
            .args(&self.extra)
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

    pub fn pid(&self) -> u32 {
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

    /// Starts again, empty, on the same port, as a replica of the server on `primary` (a
    /// failed primary rejoining after a failover), and waits until it has synced.
    pub fn restart_as_replica_of(&mut self, primary: u16) {
        self.kill();
        self.extra = vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.to_string(),
        ];
        self.spawn();
        self.wait_link_up();
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

/// `SET key <bytes × 'x'>` over a raw connection to `port` (redis-cli would need the value in
/// argv); see [`RedisServer::ballast`].
pub fn ballast_port(port: u16, key: &str, bytes: usize) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect for ballast");
    let head = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${bytes}\r\n", key.len());
    s.write_all(head.as_bytes()).expect("ballast");
    s.write_all(&vec![b'x'; bytes]).expect("ballast");
    s.write_all(b"\r\n").expect("ballast");
    let mut buf = [0u8; 64];
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let n = s.read(&mut buf).expect("ballast reply");
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    // A cluster node answers -MOVED for a key it does not own: the caller picked the wrong node.
    assert!(reply.starts_with("+OK"), "ballast on {port}: {reply}");
}

/// Runs `redis-cli -p port args…` and returns its output.
pub fn cli_port(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One line of `CLUSTER NODES`.
struct ClusterNode {
    port: u16,
    flags: String,
    /// The primary's id for a replica, `-` for a primary.
    primary_id: String,
    id: String,
    slots: Vec<(u16, u16)>,
}

/// One cluster-enabled `redis-server` on `port`, its files in `<dir>/<port>`.
fn spawn_cluster_node(port: u16, dir: &std::path::Path) -> Child {
    let node_dir = dir.join(port.to_string());
    std::fs::create_dir_all(&node_dir).expect("node dir");
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--cluster-enabled", "yes"])
        .args(["--repl-diskless-sync-delay", "0"])
        .args(["--cluster-node-timeout", "2000"])
        .args(["--cluster-replica-validity-factor", "0", "--dir"])
        .arg(&node_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server")
}

/// A Redis Sentinel watching one primary (service name [`Sentinel::SERVICE`]) with a short
/// `down-after-milliseconds`, so a killed primary is failed over in a few seconds.
pub struct Sentinel {
    pub port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    pub const SERVICE: &str = "lockstep-test";

    /// Starts a Sentinel (quorum 1) for `primary` and waits until it has found `replica`.
    pub fn start(primary: &RedisServer, replica: &RedisServer) -> Sentinel {
        let port = free_port();
        let m = Sentinel::SERVICE;
        let s = Sentinel::spawn(port, |dir| {
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {m} 127.0.0.1 {p} 1\n\
                 sentinel down-after-milliseconds {m} 500\n\
                 sentinel failover-timeout {m} 5000\n\
                 sentinel parallel-syncs {m} 1\n",
                dir = dir.display(),
                p = primary.port,
            )
        });
        let want = format!("{}", replica.port);
        for _ in 0..600 {
            let replicas = cli_port(port, &["sentinel", "replicas", m]);
            if replicas.lines().any(|l| l.trim() == want) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sentinel never discovered the replica on {}", replica.port);
    }

    /// fred's Sentinel URL for the service.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={}",
            self.port,
            Sentinel::SERVICE
        )
    }

    /// The port of the primary the Sentinel names now.
    pub fn primary_port(&self) -> Option<u16> {
        let out = cli_port(
            self.port,
            &["sentinel", "get-master-addr-by-name", Sentinel::SERVICE],
        );
        out.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }

    /// Waits (up to `within`) until the Sentinel names `port` as the primary and that server
    /// says it is one.
    pub fn wait_promoted(&self, port: u16, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if self.primary_port() == Some(port)
                && cli_port(port, &["info", "replication"]).contains("role:master")
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sentinel did not promote {port} within {within:?}");
    }
}

impl Sentinel {
    /// Runs `redis-server --sentinel` on `port` with the configuration `conf` makes for its
    /// temp dir, and waits until it listens (plain or TLS: only the TCP port is checked).
    fn spawn(port: u16, conf: impl FnOnce(&std::path::Path) -> String) -> Sentinel {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sentinel.conf");
        std::fs::write(&file, conf(dir.path())).expect("sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&file)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        let s = Sentinel {
            port,
            child: Some(child),
            _dir: dir,
        };
        wait_listening(port);
        s
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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

/// A private Redis Cluster on free ports: 3 primaries, and with
/// [`start_with_replicas`](RedisCluster::start_with_replicas) one replica each.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// 3 primaries, no replicas.
    pub fn start() -> RedisCluster {
        RedisCluster::start_nodes(0)
    }

    /// 3 primaries and 3 replicas (`--cluster-replicas 1`). Replicas may take over whatever
    /// their lag (`cluster-replica-validity-factor 0`): the failover tests promote a replica
    /// that was paused.
    pub fn start_with_replicas() -> RedisCluster {
        RedisCluster::start_nodes(1)
    }

    fn start_nodes(replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..3 * (1 + replicas)).map(|_| free_port()).collect();
        let mut children = Vec::new();
        for p in &ports {
            children.push(spawn_cluster_node(*p, dir.path()));
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
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
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
            if ok && cluster.replicas_synced(replicas) {
                return cluster;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis cluster did not converge");
    }

    /// Whether `per_primary` replicas per primary have their link up.
    fn replicas_synced(&self, per_primary: usize) -> bool {
        let up = self
            .ports
            .iter()
            .filter(|p| cli_port(**p, &["info", "replication"]).contains("master_link_status:up"))
            .count();
        up >= 3 * per_primary
    }

    /// `CLUSTER NODES` as seen from `port`.
    fn nodes(&self, port: u16) -> Vec<ClusterNode> {
        cli_port(port, &["cluster", "nodes"])
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let slots = f
                    .iter()
                    .skip(8)
                    .filter_map(|r| {
                        let (a, b) = r.split_once('-').unwrap_or((r, r));
                        Some((a.parse().ok()?, b.parse().ok()?))
                    })
                    .collect();
                Some(ClusterNode {
                    port: f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?,
                    flags: f.get(2)?.to_string(),
                    primary_id: f.get(3)?.to_string(),
                    id: f.first()?.to_string(),
                    slots,
                })
            })
            .collect()
    }

    /// The port of the primary that owns `slot` now, as `via` sees the cluster.
    pub fn primary_of_slot(&self, via: u16, slot: u16) -> Option<u16> {
        self.nodes(via)
            .into_iter()
            .find(|n| {
                n.flags.contains("master")
                    && !n.flags.contains("fail")
                    && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })
            .map(|n| n.port)
    }

    /// The port of a replica of the primary on `primary` (waiting up to 10 s for the cluster
    /// bus to tell the primary about it).
    pub fn replica_of(&self, primary: u16) -> Option<u16> {
        for _ in 0..100 {
            for via in &self.ports {
                let nodes = self.nodes(*via);
                let Some(id) = nodes
                    .iter()
                    .find(|n| n.port == primary)
                    .map(|n| n.id.clone())
                else {
                    continue;
                };
                if let Some(n) = nodes
                    .iter()
                    .find(|n| n.flags.contains("slave") && n.primary_id == id)
                {
                    return Some(n.port);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// The hash slot of `key`.
    pub fn keyslot(&self, key: &str) -> u16 {
        cli_port(self.ports[0], &["cluster", "keyslot", key])
            .parse()
            .expect("keyslot")
    }

    fn child(&mut self, port: u16) -> &mut Child {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        &mut self.children[i]
    }

    /// Starts the node on `port` again (after [`kill`](Self::kill)) with its cluster state
    /// (`nodes.conf`) but no data: a failed primary coming back rejoins as a replica of the node
    /// that took its slots.
    pub fn restart(&mut self, port: u16) {
        self.kill(port);
        let dir = self._dir.path().to_owned();
        *self.child(port) = spawn_cluster_node(port, &dir);
        RedisServer::wait_port(port);
    }

    /// `kill -9` the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let c = self.child(port);
        let _ = c.kill();
        let _ = c.wait();
    }

    pub fn pause(&mut self, port: u16) {
        let pid = self.child(port).id();
        signal(pid, "STOP");
    }

    pub fn resume(&mut self, port: u16) {
        let pid = self.child(port).id();
        signal(pid, "CONT");
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
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
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
    panic!("redis-server on port {port} did not start");
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
pub struct TlsSentinel(Sentinel);

impl TlsSentinel {
    pub fn start(
        server: &super::certs::CertFiles,
        ca: &std::path::Path,
        primary: &TlsRedisServer,
        name: &str,
    ) -> TlsSentinel {
        let port = free_port();
        TlsSentinel(Sentinel::spawn(port, |dir| {
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n\
                 tls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor {name} 127.0.0.1 {primary} 1\n",
                dir = dir.display(),
                cert = server.cert.display(),
                key = server.key.display(),
                ca = ca.display(),
                primary = primary.port,
            )
        }))
    }

    /// fred's TLS Sentinel URL for service `name`, the Sentinel addressed as `host`.
    pub fn url(&self, host: &str, name: &str) -> String {
        format!(
            "rediss-sentinel://{host}:{}/0?sentinelServiceName={name}",
            self.0.port
        )
    }
}
