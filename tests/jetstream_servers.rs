//! Issue 11, scale-out: caseledger servers over one 3-node JetStream cluster. Two servers in this
//! process (each with its own data dir: its replicas and projections), or one of them and a
//! `caseledger serve` process, write the same project space's stream:
//!
//! - two writers on one stream (each server has its own `JetStreamLog`): one behind the stream
//!   appends on the head its caller read; two pipelining groups decided on the same head leave
//!   the stream gapless and writable;
//! - a node (a follower, then the stream leader) is killed with `kill -9` during a 64-client
//!   submission storm spread over two servers and restarted: every acknowledged form is in the
//!   stream exactly once, positions are gapless, both servers' projections equal a fresh replay;
//! - two servers updating one case concurrently lose no update and keep the received order;
//! - a `caseledger serve --store nats://…` killed with `kill -9` and restarted catches up from
//!   its checkpoint.
//!
//! Without a `nats-server` (`scripts/nats-server.sh`) they print `SKIP:`, or fail under
//! `CASELEDGER_REQUIRE_SERVICES=1`. They run one at a time (each starts 3 nats-servers).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caseledger::domain::{
    Command, CommandId, DomainName, Event, Position, Role, Timestamp, UserCreatedV1, UserId,
};
use caseledger::eventlog::{AppendOutcome, AppendRequest, EventStore, Expected, LogError};
use caseledger::{Engine, EngineConfig, Request};
use jetstream::cluster::{nats_server, open_when_ready, require_services, Cluster};
use jetstream::{JetStreamConfig, JetStreamLog};
use server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One cluster at a time: 2 cores are shared by everything.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The project space every test writes.
const DOMAIN: &str = "demo";

// ---------------------------------------------------------------------------------------------
// The cluster and the stream.

/// A started 3-node cluster, or `None` after a `SKIP:` line.
fn cluster(test: &str) -> Option<Cluster> {
    // `CASELEDGER_LOG=debug` (a tracing filter) shows what the servers and the log do.
    if let Ok(filter) = std::env::var("CASELEDGER_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let binary = match nats_server() {
        Ok(binary) => binary,
        Err(reason) => {
            assert!(
                !require_services(),
                "nats-server is required (CASELEDGER_REQUIRE_SERVICES=1) but {reason}"
            );
            eprintln!("SKIP: {test}: no nats-server: {reason}");
            return None;
        }
    };
    Some(Cluster::start(&binary, 3).expect("start a 3-node cluster"))
}

/// Prints the last lines of every node's log (for a failure's report).
fn dump_logs(cluster: &Cluster) {
    for node in cluster.nodes() {
        let log = std::fs::read_to_string(cluster.dir().join(format!("{}.log", node.name)))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("--- {} (last 40 lines)", node.name);
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{line}");
        }
    }
}

/// The project space's stream (created if need be), once the meta leader is elected.
async fn open(cluster: &Cluster) -> JetStreamLog {
    open_when_ready(
        JetStreamConfig::new(cluster.urls()),
        &DomainName::new(DOMAIN),
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot open the JetStream log: {e}"))
}

/// Everything the stream holds, checked: the chain verifies and positions run gapless from 1
/// to the head. Returns the events and the verified head's hash.
async fn stream_contents(
    log: &JetStreamLog,
) -> (
    Vec<caseledger::domain::RecordedEvent>,
    Position,
    caseledger::eventlog::Hash,
) {
    let verified = log.verify().await.expect("the stream's chain verifies");
    let all = log.read(Position(1), usize::MAX).await.expect("read all");
    let positions: Vec<u64> = all.iter().map(|e| e.position.0).collect();
    assert_eq!(
        positions,
        (1..=verified.head.0).collect::<Vec<_>>(),
        "positions gapless from 1 to the head"
    );
    (all, verified.head, verified.head_hash)
}

/// instanceID → the positions of its `FormAccepted` events.
fn accepted_forms(events: &[caseledger::domain::RecordedEvent]) -> HashMap<String, Vec<Position>> {
    let mut out: HashMap<String, Vec<Position>> = HashMap::new();
    for e in events {
        if let Event::FormAcceptedV1(f) = &e.event {
            out.entry(f.form.form_id.as_str().to_owned())
                .or_default()
                .push(e.position);
        }
    }
    out
}

fn count(events: &[caseledger::domain::RecordedEvent], kind: &str) -> usize {
    events
        .iter()
        .filter(|e| e.event.type_name() == kind)
        .count()
}

// ---------------------------------------------------------------------------------------------
// 0. The log under every server: two writers on one stream.

fn user_request(key: &str, expected: Expected) -> AppendRequest {
    AppendRequest {
        expected,
        idempotency_key: Some(key.to_owned()),
        command_id: CommandId::new(key),
        recorded_at: Timestamp(1_767_225_600_000),
        events: vec![Event::UserCreatedV1(UserCreatedV1 {
            user_id: UserId::new(key),
            username: key.to_owned(),
        })],
    }
}

// Issue 11: optimistic concurrency on the stream: "append with an expected position … a
// decision made on a stale position is retried against the new head, never appended". A
// replica decides on the head it *read* from the stream, which its own `JetStreamLog` (whose
// last append was before another server's) has not seen: that append must land, not be
// refused against the writer's own stale head. (Before the fix every such append was refused
// without reaching the stream, so a second server could never write after the first had:
// "refused 64 times: other writers kept moving the head".) An expected head that the stream
// does not have stays refused, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue11_a_writer_behind_the_stream_appends_on_the_head_its_caller_read() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster("a writer behind the stream") else {
        return;
    };
    let behind = open(&cluster).await;
    let other = open(&cluster).await;
    other
        .append(user_request("o1", Expected::Head(Position(0))))
        .await
        .expect("the other writer appends 1");
    // What a replica over `behind` does: read the head, decide, append expecting it.
    let read = behind.head().await.expect("head");
    assert_eq!(read, Position(1));
    let outcome = behind
        .append(user_request("b2", Expected::Head(read)))
        .await
        .expect("appended on the head the caller read");
    assert_eq!(
        outcome,
        AppendOutcome::Appended {
            first: Position(2),
            last: Position(2)
        }
    );
    // A head the stream has moved past is refused, as on sled.
    let stale = behind
        .append(user_request("b3", Expected::Head(Position(1))))
        .await;
    assert!(
        matches!(
            stale,
            Err(LogError::WrongExpectedPosition {
                expected: Position(1),
                actual: Position(2)
            })
        ),
        "{stale:?}"
    );
    // A head the stream never had is refused too, after one catch-up, not retried until the
    // timeout.
    let started = Instant::now();
    let beyond = other
        .append(user_request("o9", Expected::Head(Position(9))))
        .await;
    assert!(
        matches!(
            beyond,
            Err(LogError::WrongExpectedPosition {
                expected: Position(9),
                actual: Position(2)
            })
        ),
        "{beyond:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let (events, head, _) = stream_contents(&behind).await;
    assert_eq!(head, Position(2));
    let keys: Vec<&str> = events.iter().map(|e| e.command_id.as_str()).collect();
    assert_eq!(keys, vec!["o1", "b2"]);
}

// Issue 11: "a decision made on a stale position is retried against the new head, never
// appended", with two writers (two caseledger servers) each pipelining a group decided on the
// same head: one group lands, the other is refused where its expected head was taken and lands
// where it still holds; the stream stays gapless, verifies, and keeps answering. (Before the
// fix the second group's pipelined publishes, chained by `Nats-Expected-Last-Msg-Id`, made
// nats-server 2.15.1 log "critical write error: last msgid mismatch" on every replica and stop
// answering publishes for good: the two-server storm hung after its first few dozen forms.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue11_two_writers_pipelining_from_one_head_leave_the_stream_writable() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster("two writers pipelining from one head") else {
        return;
    };
    let x = open(&cluster).await;
    let y = open(&cluster).await;
    let mut landed = 0usize;
    for attempt in 0..3 {
        let head = x.head().await.expect("head");
        let chain = |name: &str, n: u64| -> Vec<AppendRequest> {
            (0..n)
                .map(|i| {
                    user_request(
                        &format!("{name}-{attempt}-{i}"),
                        Expected::Head(Position(head.0 + i)),
                    )
                })
                .collect()
        };
        let (xs, ys) = (chain("x", 43), chain("y", 10));
        let mut expected: Vec<Position> = xs.iter().chain(ys.iter()).map(expected_head).collect();
        let (x2, y2) = (x.clone(), y.clone());
        let left = tokio::spawn(async move { x2.append_all(xs).await });
        let right = tokio::spawn(async move { y2.append_all(ys).await });
        let mut answers = tokio::time::timeout(Duration::from_secs(30), left)
            .await
            .expect("x answered within 30 s")
            .expect("join");
        answers.extend(
            tokio::time::timeout(Duration::from_secs(30), right)
                .await
                .expect("y answered within 30 s")
                .expect("join"),
        );
        for (answer, expected) in answers.iter().zip(expected.drain(..)) {
            match answer {
                Ok(AppendOutcome::Appended { first, last }) => {
                    assert_eq!((*first, *last), (expected.next(), expected.next()));
                    landed += 1;
                }
                Err(LogError::WrongExpectedPosition { .. }) => {}
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        // Still writable, by either writer.
        let probe = tokio::time::timeout(
            Duration::from_secs(15),
            y.append(user_request(&format!("probe-{attempt}"), Expected::Any)),
        )
        .await;
        if !matches!(probe, Ok(Ok(_))) {
            dump_logs(&cluster);
            panic!("attempt {attempt}: the stream stopped answering: {probe:?}");
        }
        landed += 1;
    }
    let (events, head, _) = stream_contents(&x).await;
    assert_eq!(
        head.0 as usize, landed,
        "every answered append is there, once"
    );
    let mut keys: Vec<&str> = events.iter().map(|e| e.command_id.as_str()).collect();
    keys.sort_unstable();
    let before = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), before, "no key twice");
}

fn expected_head(req: &AppendRequest) -> Position {
    match req.expected {
        Expected::Head(p) => p,
        Expected::Any => Position::ZERO,
    }
}

// ---------------------------------------------------------------------------------------------
// The project space's users and key.

/// Creates the stream with mobile worker `u1` (who owns every case) and a service user `svc`
/// with a service API key, through a replica engine of its own; returns the `Authorization`
/// value of the key (a service submits as anyone and reads everything).
async fn bootstrap(log: &JetStreamLog) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open_replica(
        dir.path(),
        &DomainName::new(DOMAIN),
        EngineConfig::default(),
        Arc::new(log.clone()),
    )
    .await
    .expect("open a bootstrap replica");
    let key = server::secret::new_api_key().expect("key");
    let commands = vec![
        Command::CreateUser {
            id: UserId::new("u1"),
            username: "worker1".into(),
        },
        Command::CreateUser {
            id: UserId::new("u-svc"),
            username: "svc".into(),
        },
        Command::CreateApiKey {
            key_id: key.key_id.clone(),
            user: UserId::new("u-svc"),
            role: Role::Service,
            hash: key.hash,
        },
    ];
    for c in commands {
        engine.execute(Request::new(c)).await.expect("bootstrap");
    }
    format!("ApiKey svc:{}", key.key)
}

/// A form by `u1` creating case `case-{id}` with instance id `id`.
fn creating(id: &str) -> Vec<u8> {
    format!(
        r#"<?xml version="1.0"?>
<data xmlns="http://openrosa.org/formdesigner/STORM">
  <case xmlns="http://commcarehq.org/case/transaction/v2" case_id="case-{id}" date_modified="2026-03-01T10:00:00Z" user_id="u1">
    <create><case_type>patient</case_type><case_name>{id}</case_name><owner_id>u1</owner_id></create>
  </case>
  <meta xmlns="http://openrosa.org/jr/xforms"><instanceID>{id}</instanceID><userID>u1</userID></meta>
</data>"#
    )
    .into_bytes()
}

/// A follow-up form by `u1` setting property `visit` of case `case` to `value`.
fn updating(id: &str, case: &str, value: &str) -> Vec<u8> {
    format!(
        r#"<?xml version="1.0"?>
<data xmlns="http://openrosa.org/formdesigner/VISIT">
  <case xmlns="http://commcarehq.org/case/transaction/v2" case_id="{case}" date_modified="2026-03-01T10:00:00Z" user_id="u1">
    <update><visit>{value}</visit></update>
  </case>
  <meta xmlns="http://openrosa.org/jr/xforms"><instanceID>{id}</instanceID><userID>u1</userID></meta>
</data>"#
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// HTTP.

#[derive(Debug)]
struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// One request on a fresh connection (`Connection: close`), read to its end; `None` when the
/// connection fails, ends before a response head, or takes over 60 s.
async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Response> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.ok()?;
        stream.write_all(body).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        Some(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .ok()??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

/// What a phone gets back for a form it submitted until it was acknowledged.
#[derive(Debug, Clone)]
struct Ack {
    /// The server that acknowledged it (index into the server list).
    server: usize,
    /// Its `X-Caseledger-Position`.
    position: u64,
    /// Attempts that got a 503 or no answer before the acknowledgement.
    retries: u64,
    /// Why each of those attempts failed (`503: <message>` or `no answer`).
    failures: Vec<String>,
}

/// Submits `body` to the receiver as a phone does, until it is acknowledged (201): a 503 or a
/// connection that fails is answered by sending the same form again (same instanceID), to the
/// next server of `servers` (a load balancer's failover), until `deadline`. Any other status is
/// an error.
async fn submit_until_acked(
    servers: &[SocketAddr],
    first: usize,
    auth: &str,
    id: &str,
    body: &[u8],
    deadline: Instant,
) -> Result<Ack, String> {
    let path = format!("/a/{DOMAIN}/receiver/secure/");
    let mut retries = 0u64;
    let mut failures = Vec::new();
    for attempt in 0.. {
        let server = (first + attempt) % servers.len();
        let answer = try_http(
            servers[server],
            "POST",
            &path,
            &[("Authorization", auth), ("X-OpenRosa-Version", "3.0")],
            body,
        )
        .await;
        match answer {
            Some(r) if r.status == 201 => {
                let position = r
                    .headers
                    .get(server::POSITION_HEADER)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("form {id}: 201 without a position: {r:?}"))?;
                return Ok(Ack {
                    server,
                    position,
                    retries,
                    failures,
                });
            }
            Some(r) if r.status == 503 => failures.push(format!("503: {}", r.body)),
            None => failures.push("no answer".to_owned()),
            Some(r) => return Err(format!("form {id}: status {}: {}", r.status, r.body)),
        }
        retries += 1;
        if Instant::now() > deadline {
            return Err(format!(
                "form {id}: not acknowledged after {retries} attempts"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("form {id}: no attempt"))
}

/// A GET with the service key that must answer 200; its body as JSON.
async fn get_json(addr: SocketAddr, auth: &str, path: &str) -> serde_json::Value {
    let r = try_http(addr, "GET", path, &[("Authorization", auth)], b"")
        .await
        .unwrap_or_else(|| panic!("GET {path} on {addr}: no answer"));
    assert_eq!(r.status, 200, "GET {path} on {addr}: {}", r.body);
    serde_json::from_str(&r.body).expect("a JSON body")
}

// ---------------------------------------------------------------------------------------------
// Servers.

/// A caseledger server running in this process over the cluster.
struct Running {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), server::ServerError>>,
}

fn store(cluster: &Cluster) -> JetStreamConfig {
    JetStreamConfig::new(cluster.urls())
}

async fn start(dir: &Path, cluster: &Cluster) -> Running {
    let config = ServerConfig {
        store: Some(store(cluster)),
        ..ServerConfig::default()
    };
    let server = Server::bind(dir, "127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("bind");
    let addr = server.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("server task")
            .expect("clean shutdown");
    }
}

/// Two caseledger servers over the cluster, each with a data dir of its own, on a project
/// space bootstrapped through `log`.
struct TwoServers {
    log: JetStreamLog,
    auth: String,
    dirs: [tempfile::TempDir; 2],
    running: [Running; 2],
}

impl TwoServers {
    async fn start(cluster: &Cluster) -> TwoServers {
        let log = open(cluster).await;
        let auth = bootstrap(&log).await;
        let dirs = [
            tempfile::tempdir().expect("a"),
            tempfile::tempdir().expect("b"),
        ];
        let running = [
            start(dirs[0].path(), cluster).await,
            start(dirs[1].path(), cluster).await,
        ];
        TwoServers {
            log,
            auth,
            dirs,
            running,
        }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.running.iter().map(|r| r.addr).collect()
    }

    /// Stops both servers, then checks each one's replica against the stream
    /// ([`check_replica`]).
    async fn stop_and_check(self, head: Position, hash: caseledger::eventlog::Hash) {
        let TwoServers {
            log, dirs, running, ..
        } = self;
        for server in running {
            server.stop().await;
        }
        for dir in &dirs {
            check_replica(dir.path(), &log, head, hash).await;
        }
    }
}

/// Opens the replica in `dir` (a stopped server's data dir) and checks it against the stream:
/// its log is the stream's entry for entry (same head, same head hash), and its projections are
/// at the head and equal a fresh replay of its log (`Engine::verify` rebuilds and compares).
async fn check_replica(
    dir: &Path,
    log: &JetStreamLog,
    head: Position,
    hash: caseledger::eventlog::Hash,
) {
    let engine = Engine::open_replica(
        dir,
        &DomainName::new(DOMAIN),
        EngineConfig::default(),
        Arc::new(log.clone()),
    )
    .await
    .expect("open the server's replica");
    assert_eq!(engine.log().written_head(), head, "{}", dir.display());
    assert_eq!(engine.projections().checkpoint(), head, "{}", dir.display());
    let verified = engine
        .log()
        .verify(Position(1))
        .expect("verify the replica");
    assert_eq!(verified.head, head);
    assert_eq!(
        verified.head_hash,
        hash,
        "the replica in {} is the stream, entry for entry",
        dir.display()
    );
    let differences = engine.verify(&mut |_, _| {}).expect("verify projections");
    assert!(
        differences.is_empty(),
        "projections in {} differ from a fresh replay: {differences:?}",
        dir.display()
    );
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 of a NATS node during a storm over two servers.

#[derive(Debug, Clone, Copy)]
enum Victim {
    Follower,
    Leader,
}

const CLIENTS: usize = 64;
const PER_CLIENT: usize = 8;

/// 64 phones submit 8 forms each, alternating between two servers over the same cluster
/// (retrying a 503 or a dropped connection with the same form on the other server); after a
/// third of the acknowledgements the victim node gets `kill -9`, and is restarted 2 s later.
async fn storm(victim: Victim) {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = cluster(&format!("two servers, kill -9 of the {victim:?}")) else {
        return;
    };
    let started = Instant::now();
    let pair = TwoServers::start(&cluster).await;
    let (log, auth, servers) = (pair.log.clone(), pair.auth.clone(), pair.addrs());

    let leader = log.leader().await.expect("leader").expect("a leader");
    let leader = cluster.index_of(&leader).expect("the leader is a node");
    let target = match victim {
        Victim::Leader => leader,
        Victim::Follower => (leader + 1) % 3,
    };

    let acked: Arc<Mutex<HashMap<String, Ack>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (servers, auth, acked) = (servers.clone(), auth.clone(), Arc::clone(&acked));
        clients.push(tokio::spawn(async move {
            for n in 0..PER_CLIENT {
                let id = format!("storm-{c:02}-{n}");
                let deadline = Instant::now() + Duration::from_secs(90);
                let ack = submit_until_acked(&servers, c + n, &auth, &id, &creating(&id), deadline)
                    .await?;
                acked.lock().expect("lock").insert(id, ack);
            }
            Ok::<(), String>(())
        }));
    }
    let total = CLIENTS * PER_CLIENT;
    let until = Instant::now() + Duration::from_secs(60);
    while acked.lock().expect("lock").len() < total / 3 {
        if Instant::now() >= until {
            dump_logs(&cluster);
        }
        assert!(
            Instant::now() < until,
            "only {} forms acknowledged in 60 s before the kill",
            acked.lock().expect("lock").len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let at_kill = acked.lock().expect("lock").len();
    cluster.kill(target).expect("kill -9");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(target).expect("restart");
    let mut failed = Vec::new();
    for client in clients {
        if let Err(e) = client.await.expect("client task") {
            failed.push(e);
        }
    }
    if !failed.is_empty() {
        dump_logs(&cluster);
    }
    assert!(
        failed.is_empty(),
        "{} phones stopped: {failed:?}",
        failed.len()
    );
    let acked = acked.lock().expect("lock").clone();
    assert_eq!(acked.len(), total, "every form acknowledged");

    // The stream: gapless, every acknowledged form accepted exactly once, nothing else.
    let (events, head, hash) = stream_contents(&log).await;
    let accepted = accepted_forms(&events);
    for (id, ack) in &acked {
        let at = accepted.get(id).cloned().unwrap_or_default();
        assert_eq!(
            at.len(),
            1,
            "acknowledged form {id} accepted exactly once: {at:?}"
        );
        assert!(
            at[0].0 <= ack.position && ack.position <= head.0,
            "{id} accepted at {} before its acknowledgement's position {}",
            at[0],
            ack.position
        );
    }
    assert_eq!(accepted.len(), total, "no form accepted that was not sent");
    assert_eq!(count(&events, "FormRejected"), 0);

    // Both servers answer at the head with the same projections: every case, once.
    let mut lists = Vec::new();
    for addr in &servers {
        let list = get_json(
            *addr,
            &auth,
            &format!(
                "/api/v1/{DOMAIN}/cases?owner=u1&min_position={}&wait_ms=30000",
                head.0
            ),
        )
        .await;
        let mut ids: Vec<String> = list
            .as_array()
            .expect("a list")
            .iter()
            .map(|c| c["case_id"].as_str().expect("case_id").to_owned())
            .collect();
        ids.sort();
        let mut expected: Vec<String> = acked.keys().map(|id| format!("case-{id}")).collect();
        expected.sort();
        assert_eq!(
            ids, expected,
            "server {addr}: one case per acknowledged form"
        );
        lists.push(list);
    }
    assert_eq!(lists[0], lists[1], "both servers' case lists are equal");

    pair.stop_and_check(head, hash).await;

    let retries: u64 = acked.values().map(|a| a.retries).sum();
    let by_a = acked.values().filter(|a| a.server == 0).count();
    eprintln!(
        "kill -9 of the {victim:?} (node {} of 3) after {at_kill} acks: {total} forms \
         acknowledged ({by_a} by server A, {} by B), {retries} retries, {} duplicates \
         recorded, head {head}, replicas verified; {:.1} s",
        target + 1,
        total - by_a,
        count(&events, "FormDuplicate"),
        started.elapsed().as_secs_f64()
    );
}

// Issue 11: "Kill -9 one NATS node during a 64-client submission storm spread over two
// caseledger servers; restart it: every acknowledged form present exactly once, positions
// gapless, projections on both servers equal to a fresh replay."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue11_kill_9_of_a_follower_under_two_servers_loses_and_doubles_no_form() {
    storm(Victim::Follower).await;
}

// Issue 11: the same, "Repeat with the stream leader as the victim."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue11_kill_9_of_the_stream_leader_under_two_servers_loses_and_doubles_no_form() {
    storm(Victim::Leader).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Two servers writing the same case.

const UPDATES_PER_SERVER: usize = 24;

// Issue 11: "Two servers writing the same case concurrently: no lost update, received order
// preserved." Follow-ups of one case through both servers at once: each accepted once, the
// case holds the value of the form at the highest position, and its history lists every form
// in position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue11_two_servers_updating_one_case_lose_no_update_and_keep_received_order() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster("two servers writing one case") else {
        return;
    };
    let started = Instant::now();
    let pair = TwoServers::start(&cluster).await;
    let (log, auth, servers) = (pair.log.clone(), pair.auth.clone(), pair.addrs());
    let deadline = Instant::now() + Duration::from_secs(60);
    let registration = submit_until_acked(
        &servers,
        0,
        &auth,
        "reg-c1",
        &updating_create("reg-c1", "c1"),
        deadline,
    )
    .await
    .expect("registration");

    let mut tasks = Vec::new();
    for (s, name) in ["a", "b"].into_iter().enumerate() {
        for i in 0..UPDATES_PER_SERVER {
            let (servers, auth) = (servers.clone(), auth.clone());
            tasks.push(tokio::spawn(async move {
                let id = format!("visit-{name}-{i:02}");
                let value = format!("{name}{i}");
                // Only through this task's server (retries too): both servers decide at once,
                // and each must get its own forms in.
                let ack = submit_until_acked(
                    &servers[s..=s],
                    0,
                    &auth,
                    &id,
                    &updating(&id, "c1", &value),
                    Instant::now() + Duration::from_secs(90),
                )
                .await?;
                Ok::<_, String>((s, id, value, ack))
            }));
        }
    }
    let mut values = HashMap::new();
    let mut retries = [0u64; 2];
    for t in tasks {
        let (s, id, value, ack) = t.await.expect("task").expect("acknowledged");
        retries[s] += ack.retries;
        for f in &ack.failures {
            eprintln!("{id}: {f}");
        }
        values.insert(id, value);
    }

    let (events, head, hash) = stream_contents(&log).await;
    let accepted = accepted_forms(&events);
    assert_eq!(accepted.len(), 1 + 2 * UPDATES_PER_SERVER, "no form lost");
    for id in values.keys().chain(std::iter::once(&"reg-c1".to_owned())) {
        assert_eq!(
            accepted.get(id).map(Vec::len),
            Some(1),
            "form {id} accepted exactly once"
        );
    }
    // The forms of case c1 in received (position) order, and the last one's value.
    let mut in_order: Vec<(Position, String)> = accepted
        .iter()
        .map(|(id, at)| (at[0], id.clone()))
        .collect();
    in_order.sort();
    let last = &in_order.last().expect("forms").1;
    let expected_value = values.get(last).expect("the last form is a follow-up");
    assert!(registration.position <= in_order[0].0 .0);

    for addr in &servers {
        let case = get_json(
            *addr,
            &auth,
            &format!(
                "/api/v1/{DOMAIN}/cases/c1?min_position={}&wait_ms=30000",
                head.0
            ),
        )
        .await;
        assert_eq!(
            case["properties"]["visit"].as_str(),
            Some(expected_value.as_str()),
            "server {addr}: the value of the form at the highest position ({last})"
        );
        let history = get_json(
            *addr,
            &auth,
            &format!(
                "/api/v1/{DOMAIN}/cases/c1/history?min_position={}&wait_ms=30000",
                head.0
            ),
        )
        .await;
        let listed: Vec<(Position, String)> = history
            .as_array()
            .expect("a list")
            .iter()
            .map(|e| {
                (
                    Position(e["position"].as_u64().expect("position")),
                    e["form_id"].as_str().expect("form_id").to_owned(),
                )
            })
            .collect();
        assert_eq!(
            listed, in_order,
            "server {addr}: the history lists every form of c1 in position order"
        );
    }
    pair.stop_and_check(head, hash).await;
    eprintln!(
        "two servers, one case: {} follow-ups accepted once each (retries: {} on A, {} on \
         B), head {head}, final value {expected_value} of {last}; {:.1} s",
        2 * UPDATES_PER_SERVER,
        retries[0],
        retries[1],
        started.elapsed().as_secs_f64()
    );
}

/// A registration of case `case` by `u1` that also sets `visit` to `0`.
fn updating_create(id: &str, case: &str) -> Vec<u8> {
    format!(
        r#"<?xml version="1.0"?>
<data xmlns="http://openrosa.org/formdesigner/REG">
  <case xmlns="http://commcarehq.org/case/transaction/v2" case_id="{case}" date_modified="2026-03-01T10:00:00Z" user_id="u1">
    <create><case_type>patient</case_type><case_name>{case}</case_name><owner_id>u1</owner_id></create>
    <update><visit>0</visit></update>
  </case>
  <meta xmlns="http://openrosa.org/jr/xforms"><instanceID>{id}</instanceID><userID>u1</userID></meta>
</data>"#
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// 3. A `caseledger serve` process killed and restarted.

/// Starts `caseledger --data DIR --store nats://… serve` on a free port with info logging to
/// `log`, and waits until its `server.json` names it.
// The caller kills or stops the child and waits for it; the lint cannot see past the return.
#[allow(clippy::zombie_processes)]
fn spawn_serve(dir: &Path, cluster: &Cluster, log: &Path) -> (Child, SocketAddr) {
    let file = dir.join("server.json");
    let _ = std::fs::remove_file(&file);
    let stderr = std::fs::File::create(log).expect("log file");
    let mut child = Process::new(env!("CARGO_BIN_EXE_caseledger"))
        .args([
            "--data",
            dir.to_str().expect("utf-8"),
            "--store",
            &cluster.urls(),
            "serve",
            "--addr",
            "127.0.0.1:0",
        ])
        .env("CASELEDGER_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn serve");
    let started = Instant::now();
    loop {
        let named = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(|v| v["pid"].as_u64() == Some(u64::from(child.id())))
            .and_then(|v| v["addr"].as_str().and_then(|a| a.parse().ok()));
        if let Some(addr) = named {
            return (child, addr);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "serve exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve did not start in 60 s: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The text of a log file without terminal colour sequences.
fn plain(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ … final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `from` of every "projection catch-up" line of a server's log, in order.
fn catch_ups(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("projection catch-up"))
        .filter_map(|l| {
            let rest = &l[l.find("from=")? + 5..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// The replica head and projection checkpoint stored in a copy of `dir`, read without
/// catching anything up.
fn stored_marks(dir: &Path, copy: &Path) -> (Position, Position) {
    copy_dir(dir, copy);
    let db = Engine::open_db(copy, &EngineConfig::default()).expect("open the copy");
    let domain = DomainName::new(DOMAIN);
    let log = caseledger::eventlog::SledLog::open(
        &db,
        &domain,
        caseledger::eventlog::LogConfig::default(),
    )
    .expect("the replica's log");
    let projections =
        caseledger::projections::Projections::open(&db, &domain).expect("the projections");
    (log.written_head(), projections.checkpoint())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target: PathBuf = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Submits `ids` through `addr` (each until acknowledged).
async fn submit_all(addr: SocketAddr, auth: &str, ids: &[String]) -> u64 {
    let mut last = 0;
    for id in ids {
        let ack = submit_until_acked(
            &[addr],
            0,
            auth,
            id,
            &creating(id),
            Instant::now() + Duration::from_secs(60),
        )
        .await
        .expect("acknowledged");
        last = last.max(ack.position);
    }
    last
}

// Issue 11: "A caseledger server killed and restarted catches up from its checkpoint." A
// `caseledger serve --store nats://…` writes, is killed with kill -9 while the other server
// writes on, and is restarted on the same data dir: it answers at the stream's head, having
// folded only what it had not (its stored checkpoint was not zero, and its catch-up starts
// there, not at 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue11_a_server_killed_and_restarted_catches_up_from_its_checkpoint() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster("a server killed and restarted") else {
        return;
    };
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir_p, dir_b) = (tmp.path().join("p"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_b).expect("mkdir");
    let log = open(&cluster).await;
    let auth = bootstrap(&log).await;
    let b = start(&dir_b, &cluster).await;

    let first_log = tmp.path().join("serve-1.log");
    let (mut p, p_addr) = spawn_serve(&dir_p, &cluster, &first_log);
    let ids = |prefix: &str, n: usize| -> Vec<String> {
        (0..n).map(|i| format!("{prefix}-{i:02}")).collect()
    };
    submit_all(p_addr, &auth, &ids("before-p", 16)).await;
    submit_all(b.addr, &auth, &ids("before-b", 8)).await;
    let head = log.head().await.expect("head");
    // The process folded everything up to the head, its own writes and the other server's.
    get_json(
        p_addr,
        &auth,
        &format!(
            "/api/v1/{DOMAIN}/cases?owner=u1&min_position={}&wait_ms=30000",
            head.0
        ),
    )
    .await;
    // sled writes its buffers out every 500 ms; what it had not is lost to the kill, and
    // copied or folded again on restart.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    p.kill().expect("kill -9");
    p.wait().expect("reaped");
    let (stored_head, stored_checkpoint) = stored_marks(&dir_p, &tmp.path().join("copy"));
    assert!(
        stored_checkpoint > Position::ZERO && stored_checkpoint <= stored_head,
        "the killed server's data dir holds a checkpoint: head {stored_head}, checkpoint \
         {stored_checkpoint}"
    );

    // Written while it is down.
    submit_all(b.addr, &auth, &ids("while-down", 16)).await;
    let head = log.head().await.expect("head");
    assert!(head > stored_head);

    let second_log = tmp.path().join("serve-2.log");
    let (mut p, p_addr) = spawn_serve(&dir_p, &cluster, &second_log);
    let on_p = get_json(
        p_addr,
        &auth,
        &format!(
            "/api/v1/{DOMAIN}/cases?owner=u1&min_position={}&wait_ms=30000",
            head.0
        ),
    )
    .await;
    let on_b = get_json(
        b.addr,
        &auth,
        &format!(
            "/api/v1/{DOMAIN}/cases?owner=u1&min_position={}&wait_ms=30000",
            head.0
        ),
    )
    .await;
    assert_eq!(on_p.as_array().map(Vec::len), Some(16 + 8 + 16));
    assert_eq!(on_p, on_b, "the restarted server answers as the other one");

    // What it printed on the way: folds from its stored checkpoint, never from the start.
    let printed = plain(&second_log);
    assert!(
        !printed.contains("bulk rebuild") && !printed.contains("rebuilding the projections"),
        "the restarted server rebuilt its projections: {printed}"
    );
    let froms = catch_ups(&printed);
    assert_eq!(
        froms.first().copied(),
        Some(stored_checkpoint.0),
        "the restarted server's first catch-up starts at its stored checkpoint: {printed}"
    );
    assert!(froms.iter().all(|&f| f >= stored_checkpoint.0), "{froms:?}");

    // A clean stop, then the replica checked against the stream.
    let status = Process::new("kill")
        .args(["-TERM", &p.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exit = p.wait().expect("exit");
    assert!(exit.success(), "serve ends cleanly on SIGTERM: {exit}");
    b.stop().await;
    let (_, head_now, hash) = stream_contents(&log).await;
    assert_eq!(head_now, head);
    check_replica(&dir_p, &log, head, hash).await;
    eprintln!(
        "serve killed at replica head {stored_head} (checkpoint {stored_checkpoint}), restarted \
         after the stream reached {head}: caught up from {froms:?}; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
