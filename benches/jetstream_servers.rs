//! Scaling (issue 11): one caseledger server against two, over 8 project spaces whose logs are
//! JetStream streams (R3), HTTP clients submitting forms, in the same run; with the CPU each
//! process used and the NATS cluster's own rate measured in the same run, which together say
//! what bounds the ratio on the machine the bench runs on.
//!
//! Setup: a 3-node cluster of nats-server from `deploy/nats/cluster.conf` (`sync_interval:
//! always`). Each phase has 8 fresh project spaces, seeded untimed through a replica engine:
//! the app of the server bench and, in space `k`, the users of clients `c` with `c % 8 == k`
//! (password hashes with argon2id, as the server bench's).
//!
//! Servers are processes: this bench binary run again as a child
//! (`CASELEDGER_BENCH_SERVER_CHILD=<data dir>`) that serves `server::Server` with
//! `ServerConfig::store` naming the cluster, on a two-worker tokio runtime as `caseledger serve`
//! uses on this machine, with its own empty data dir: its replicas open on first use (the server
//! `caseledger --store nats://… serve` runs). The clients run in this process,
//! on their own two-worker runtime.
//!
//! Phases, each `CASELEDGER_BENCH_SECONDS` (default 10) after a warm-up in which every client
//! logs in and submits one form (argon2id verification and the replicas' first copy are not
//! timed):
//! 1. one server, all 8 spaces, 64 clients;
//! 2. two servers, each taking 4 of the 8 spaces: the 32 clients of spaces 0–3 talk to one,
//!    the 32 of spaces 4–7 to the other, so no stream has two writers (the way to scale
//!    writes: a project space's writes are decided one group at a time against its head);
//! 3. two servers both serving all 8 spaces (each space's clients split between them), so
//!    every stream has two writers whose appends refuse each other's stale decisions; for
//!    comparison, not for the target (`CASELEDGER_BENCH_SHARED=0` skips it);
//! 4. the NATS cluster alone: 64 tasks publishing bare (publish, await ack) into 8 fresh R3
//!    streams for the same time, messages the size of phase 1's stored envelopes: what the
//!    cluster stores per second on this machine when nothing of caseledger runs.
//!
//! Client `c` submits the server bench's ~1.6 KB registration forms (`common/http.rs`) as
//! user `c` on one keep-alive connection, one at a time; a connection error retries the same
//! form on a new connection. Each phase prints forms/s, the CPU seconds of the clients (this
//! process), each server and each nats-server, how many of the machine's cores were busy, who
//! else used CPU, and the CPU per form, from which the ceiling of this machine follows:
//! cores / CPU per form.
//!
//! `cargo bench --bench jetstream_servers`; `CASELEDGER_BENCH_SECONDS`, `CASELEDGER_BENCH_CLIENTS`
//! (default 64), `CASELEDGER_BENCH_SHARED=0`. Target: 2 servers >= 1.6 x one.
//! Without a nats-server (`scripts/nats-server.sh`) it prints `SKIP:`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use caseledger::domain::{Command as Cmd, DomainName, UserId};
use caseledger::eventlog::EventStore;
use caseledger::{Engine, EngineConfig, Request};
use common::http::{form, password, Conn};
use common::{env_or, load_average, machine, user, BenchResult, CpuUse, CpuWatch};
use jetstream::cluster::{nats_server, open_when_ready, Cluster};
use jetstream::{JetStreamConfig, JetStreamLog};
use server::{Server, ServerConfig};
use tokio::sync::Barrier;

const SERVER_CHILD: &str = "CASELEDGER_BENCH_SERVER_CHILD";
const SERVER_NATS: &str = "CASELEDGER_BENCH_SERVER_NATS";
const SPACES: usize = 8;
const APP: &str = "app-bench";

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// The child: serves the data dir `dir` over the cluster at `$SERVER_NATS` until its stdin
/// closes; prints `addr <address>` once it listens.
fn server_child(dir: &str) -> BenchResult<()> {
    let urls = std::env::var(SERVER_NATS)?;
    let rt = runtime()?;
    rt.block_on(async {
        let server = Server::bind(
            Path::new(dir),
            "127.0.0.1:0".parse()?,
            ServerConfig {
                store: Some(JetStreamConfig::new(urls)),
                ..Default::default()
            },
        )
        .await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "addr {}", server.local_addr()?)?;
        out.flush()?;
        drop(out);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            let _ = stop.send(());
        });
        server
            .run(async {
                let _ = stopped.await;
            })
            .await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}

/// A server child process, killed if still running when dropped.
struct ServerProc {
    name: String,
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ServerProc {
    fn start(name: &str, urls: &str) -> BenchResult<ServerProc> {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new(std::env::current_exe()?)
            .env(SERVER_CHILD, dir.path())
            .env(SERVER_NATS, urls)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            std::io::BufReader::new(stdout).read_line(&mut line)?;
        }
        let Some(addr) = line
            .trim()
            .strip_prefix("addr ")
            .and_then(|a| a.parse().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("server {name} did not start: {line:?}").into());
        };
        Ok(ServerProc {
            name: name.to_owned(),
            child,
            addr,
            _dir: dir,
        })
    }

    fn pid(&self) -> (String, u32) {
        (self.name.clone(), self.child.id())
    }

    /// Closes its stdin (it shuts down) and waits up to 20 s for it to exit.
    fn stop(mut self) -> BenchResult<()> {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                return Err(format!("server {} did not stop within 20 s", self.name).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn js_config(urls: &str) -> JetStreamConfig {
    JetStreamConfig::new(urls)
}

/// Creates the streams of `spaces` with the app and, in space `k`, the users of clients `c`
/// with `c % SPACES == k`, through a replica engine.
async fn seed(urls: &str, spaces: &[String], hashes: &[String]) -> BenchResult<()> {
    for (k, space) in spaces.iter().enumerate() {
        let domain = DomainName::new(space.as_str());
        let log = JetStreamLog::open(js_config(urls), &domain).await?;
        let dir = tempfile::tempdir()?;
        let engine =
            Engine::open_replica(dir.path(), &domain, EngineConfig::default(), Arc::new(log))
                .await?;
        let mut commands = vec![Cmd::CreateApp {
            id: APP.into(),
            name: "Bench".into(),
            case_sharing: false,
            case_types: vec!["pregnancy".into()],
        }];
        for (c, hash) in hashes.iter().enumerate().skip(k).step_by(SPACES) {
            commands.push(Cmd::CreateUser {
                id: UserId::new(user(c as u64)),
                username: format!("user{c}"),
            });
            commands.push(Cmd::SetPassword {
                user: UserId::new(user(c as u64)),
                hash: hash.clone(),
            });
        }
        for outcome in engine
            .execute_many(commands.into_iter().map(Request::new).collect())
            .await?
        {
            outcome?;
        }
    }
    Ok(())
}

/// What one client did in the timed window.
#[derive(Default)]
struct Client {
    acked: u64,
    other: u64,
    statuses: Vec<u16>,
    retries: u64,
    latencies: Vec<Duration>,
    warmup_failed: Option<String>,
    /// The first answer that was not 201.
    first_other: Option<String>,
}

/// The start of a response body, on one line.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect()
}

/// When the timed window ends, set once every client has warmed up.
type Deadline = Arc<OnceLock<Instant>>;

/// Client `c`: one form untimed (login, the replica's first open), then forms until the
/// deadline.
async fn client(
    addr: SocketAddr,
    space: String,
    c: usize,
    barriers: (Arc<Barrier>, Arc<Barrier>),
    deadline: Deadline,
) -> Client {
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("user{c}:{}", password(c)))
    );
    let path = format!("/a/{space}/receiver/secure/{APP}/");
    let mut out = Client::default();
    let mut conn: Option<Conn> = None;
    let mut n = 0u64;
    let mut warm = false;
    for _ in 0..100 {
        let (_, body) = form(c, n);
        let result = match conn.as_mut() {
            Some(conn) => conn.post_read(&path, &auth, &body).await,
            None => match Conn::open(addr).await {
                Ok(new) => conn.insert(new).post_read(&path, &auth, &body).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok((201, _, _)) => {
                warm = true;
                n += 1;
                break;
            }
            Ok((status, _, answer)) => {
                out.warmup_failed = Some(format!("status {status}: {}", excerpt(&answer)));
            }
            Err(e) => {
                out.warmup_failed = Some(e.to_string());
                conn = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if warm {
        out.warmup_failed = None;
    }
    barriers.0.wait().await;
    barriers.1.wait().await;
    let Some(deadline) = deadline.get().copied() else {
        return out;
    };
    if !warm {
        return out;
    }
    while Instant::now() < deadline {
        let (_, body) = form(c, n);
        let started = Instant::now();
        let result = match conn.as_mut() {
            Some(conn) => conn.post_read(&path, &auth, &body).await,
            None => match Conn::open(addr).await {
                Ok(new) => conn.insert(new).post_read(&path, &auth, &body).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok((201, _, _)) => {
                out.latencies.push(started.elapsed());
                out.acked += 1;
                n += 1;
            }
            Ok((status, _, answer)) => {
                out.other += 1;
                if !out.statuses.contains(&status) {
                    out.statuses.push(status);
                }
                out.first_other
                    .get_or_insert_with(|| format!("status {status}: {}", excerpt(&answer)));
                n += 1;
            }
            Err(_) => {
                out.retries += 1;
                conn = None;
            }
        }
    }
    out
}

/// One timed phase's result.
struct Phase {
    name: String,
    acked: u64,
    seconds: f64,
    note: String,
    cpu: CpuUse,
    /// Names of the server processes in `cpu`.
    servers: Vec<String>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.acked as f64 / self.seconds.max(1e-9)
    }

    fn print(&self) {
        eprintln!(
            "  {:<48} {:>8.0} forms/s {:>6.1} s; {}",
            self.name,
            self.rate(),
            self.seconds,
            self.note
        );
        eprintln!("  {:<48} {}", "", self.cpu.line("clients (bench process)"));
        let per = |s: f64| s * 1e6 / self.acked.max(1) as f64;
        let servers: f64 = self.servers.iter().map(|s| self.cpu.of(s)).sum();
        let nats = self.cpu.of("n");
        let all = servers + nats + self.cpu.own;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        eprintln!(
            "  {:<48} CPU per form: servers {:.0} µs, nats {:.0} µs, clients {:.0} µs; all {:.0} µs -> this machine's {cores} cores at most {:.0} forms/s",
            "",
            per(servers),
            per(nats),
            per(self.cpu.own),
            per(all),
            cores * 1e6 / per(all).max(1e-9)
        );
    }
}

/// Runs `clients` clients, client `c` on space `c % SPACES` through `route(c)`, for `seconds`.
fn run_phase(
    name: String,
    servers: &[ServerProc],
    spaces: &[String],
    clients: usize,
    seconds: u64,
    route: impl Fn(usize) -> usize,
    nats: &[(String, u32)],
) -> BenchResult<Phase> {
    let mut pids: Vec<(String, u32)> = servers.iter().map(ServerProc::pid).collect();
    pids.extend_from_slice(nats);
    let rt = runtime()?;
    let warmed = Arc::new(Barrier::new(clients + 1));
    let go = Arc::new(Barrier::new(clients + 1));
    let deadline: Deadline = Arc::new(OnceLock::new());
    let (results, seconds, cpu) = rt.block_on(async {
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let addr = servers[route(c) % servers.len()].addr;
                tokio::spawn(client(
                    addr,
                    spaces[c % SPACES].clone(),
                    c,
                    (Arc::clone(&warmed), Arc::clone(&go)),
                    Arc::clone(&deadline),
                ))
            })
            .collect();
        warmed.wait().await;
        let watch = CpuWatch::start(&pids);
        let started = Instant::now();
        let _ = deadline.set(started + Duration::from_secs(seconds));
        go.wait().await;
        let mut results = Vec::with_capacity(clients);
        for t in tasks {
            results.push(t.await.unwrap_or_default());
        }
        (results, started.elapsed().as_secs_f64(), watch.stop())
    });
    let acked: u64 = results.iter().map(|r| r.acked).sum();
    let other: u64 = results.iter().map(|r| r.other).sum();
    let retries: u64 = results.iter().map(|r| r.retries).sum();
    let mut statuses: Vec<u16> = results.iter().flat_map(|r| r.statuses.clone()).collect();
    statuses.sort_unstable();
    statuses.dedup();
    let cold: Vec<&String> = results
        .iter()
        .filter_map(|r| r.warmup_failed.as_ref())
        .collect();
    let mut latencies: Vec<Duration> = results.iter().flat_map(|r| r.latencies.clone()).collect();
    latencies.sort_unstable();
    let pct = |p: f64| {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1e3
    };
    let mut note = format!(
        "{acked} acknowledged (201), {other} other {statuses:?}, {retries} retried; p50 {:.1} ms, p99 {:.1} ms",
        pct(0.5),
        pct(0.99)
    );
    if let Some(first) = results.iter().find_map(|r| r.first_other.as_ref()) {
        note.push_str(&format!("; first other answer: {first}"));
    }
    if let Some(first) = cold.first() {
        note.push_str(&format!(
            "; {} clients never warmed up (first: {first})",
            cold.len()
        ));
    }
    Ok(Phase {
        name,
        acked,
        seconds,
        note,
        cpu,
        servers: servers.iter().map(|s| s.name.clone()).collect(),
    })
}

/// The cluster alone: `tasks` tasks publishing bare into 8 fresh R3 streams for `seconds`,
/// messages of `size` bytes.
async fn nats_alone(
    urls: &[String],
    tasks: usize,
    size: usize,
    seconds: u64,
    nats: &[(String, u32)],
) -> BenchResult<(u64, f64, CpuUse)> {
    let client = async_nats::connect(urls.to_vec()).await?;
    let js = async_nats::jetstream::new(client);
    for k in 0..SPACES {
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: format!("BENCH_ALONE_{k}"),
            subjects: vec![format!("bench.alone.{k}")],
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: 3,
            ..Default::default()
        })
        .await?;
    }
    let payload: Vec<u8> = (0..size).map(|i| (i * 131 % 251) as u8).collect();
    let watch = CpuWatch::start(nats);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (js, payload) = (js.clone(), payload.clone());
        handles.push(tokio::spawn(async move {
            let subject = format!("bench.alone.{}", t % SPACES);
            let mut sent = 0u64;
            while Instant::now() < deadline {
                js.publish(subject.clone(), payload.clone().into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                sent += 1;
            }
            Ok::<u64, String>(sent)
        }));
    }
    let mut sent = 0;
    for h in handles {
        sent += h.await??;
    }
    Ok((sent, started.elapsed().as_secs_f64(), watch.stop()))
}

/// The average size of the envelopes stored in `space`'s stream.
async fn envelope_size(urls: &str, space: &str) -> BenchResult<usize> {
    let log = JetStreamLog::open(js_config(urls), &DomainName::new(space)).await?;
    let entries = log
        .read_entries(caseledger::domain::Position(1), 1024)
        .await?;
    let bytes: usize = entries.iter().map(|e| e.envelope.len()).sum();
    Ok(bytes / entries.len().max(1))
}

/// Opens a first log so the meta leader exists before anything is timed.
async fn wait_for_jetstream(urls: &str) -> BenchResult<()> {
    open_when_ready(
        js_config(urls),
        &DomainName::new("bench-warmup"),
        Duration::from_secs(30),
    )
    .await?;
    Ok(())
}

fn main() -> BenchResult<()> {
    if let Ok(dir) = std::env::var(SERVER_CHILD) {
        return server_child(&dir);
    }
    let seconds: u64 = env_or("CASELEDGER_BENCH_SECONDS", 10)?;
    let clients: usize = env_or("CASELEDGER_BENCH_CLIENTS", 64)?;
    let shared = env_or("CASELEDGER_BENCH_SHARED", 1)? == 1;
    let binary = match nats_server() {
        Ok(binary) => binary,
        Err(reason) => {
            eprintln!("SKIP: jetstream_servers bench: no nats-server: {reason}");
            return Ok(());
        }
    };
    eprintln!("jetstream_servers bench: {}", machine());
    eprintln!("load average at start: {}", load_average());
    eprintln!(
        "workload: {clients} HTTP clients x ~1.6 KB registration forms over {SPACES} project spaces (R3 streams), {seconds} s per phase after a warm-up; servers are child processes (2 tokio workers each); 3-node cluster (sync_interval: always), nats-server {}",
        jetstream::cluster::NATS_SERVER_VERSION
    );
    let cluster = Cluster::start(&binary, 3)?;
    let urls = cluster.urls();
    let nats: Vec<(String, u32)> = cluster
        .nodes()
        .iter()
        .filter_map(|node| node.pid().map(|pid| (node.name.clone(), pid)))
        .collect();
    let rt = runtime()?;
    let names =
        |prefix: &str| -> Vec<String> { (0..SPACES).map(|k| format!("{prefix}-{k}")).collect() };
    let hashes: Vec<String> = (0..clients)
        .map(|c| server::secret::hash(&password(c)).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    rt.block_on(async {
        wait_for_jetstream(&urls).await?;
        for prefix in ["one", "two", "shared"] {
            seed(&urls, &names(prefix), &hashes).await?;
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;

    let one = {
        let server = ServerProc::start("server-a", &urls)?;
        let servers = [server];
        let phase = run_phase(
            format!("1 server, {SPACES} spaces, {clients} clients"),
            &servers,
            &names("one"),
            clients,
            seconds,
            |_| 0,
            &nats,
        )?;
        let [server] = servers;
        server.stop()?;
        phase
    };
    one.print();

    let two_servers = |prefix: &str, route: fn(usize) -> usize, name: String| {
        let a = ServerProc::start("server-a", &urls)?;
        let b = ServerProc::start("server-b", &urls)?;
        let servers = [a, b];
        let phase = run_phase(
            name,
            &servers,
            &names(prefix),
            clients,
            seconds,
            route,
            &nats,
        )?;
        let [a, b] = servers;
        a.stop()?;
        b.stop()?;
        Ok::<Phase, Box<dyn std::error::Error>>(phase)
    };
    // Spaces 0-3 on server a, 4-7 on server b.
    let two = two_servers(
        "two",
        |c| usize::from(c % SPACES >= SPACES / 2),
        format!("2 servers, 4 of the {SPACES} spaces each"),
    )?;
    two.print();
    eprintln!(
        "ratio 2 servers / 1 server: {:.2} (target >= 1.60: {})",
        two.rate() / one.rate(),
        if two.rate() >= 1.6 * one.rate() {
            "met"
        } else {
            "MISSED"
        }
    );
    if shared {
        // Space k's clients k, k + 8, k + 16, ... alternate between the servers.
        let both = two_servers(
            "shared",
            |c| (c / SPACES) % 2,
            format!("2 servers, both serving all {SPACES} spaces"),
        )?;
        both.print();
        eprintln!(
            "ratio 2 servers sharing every space / 1 server: {:.2}",
            both.rate() / one.rate()
        );
    }

    let (sent, secs, cpu) = rt.block_on(async {
        let size = envelope_size(&urls, "one-0").await?;
        eprintln!("NATS alone: bare publish + ack of {size}-byte messages (phase 1's average envelope) into 8 R3 streams:");
        nats_alone(&cluster.url_list(), clients, size, seconds, &nats).await
    })?;
    let nats_cpu = cpu.of("n");
    eprintln!(
        "  {:<48} {:>8.0} msgs/s  {secs:>6.1} s; {sent} messages; nats CPU {:.0} µs per message",
        format!("NATS alone, {clients} publishers"),
        sent as f64 / secs,
        nats_cpu * 1e6 / sent.max(1) as f64
    );
    eprintln!("  {:<48} {}", "", cpu.line("publishers (bench process)"));
    eprintln!(
        "  ratio 1 server / NATS alone: {:.2}; 2 servers / NATS alone: {:.2}",
        one.rate() / (sent as f64 / secs),
        two.rate() / (sent as f64 / secs)
    );
    eprintln!("load average at end: {}", load_average());
    drop(cluster);
    Ok(())
}
