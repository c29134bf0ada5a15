//! Issue 11, scale-out: caseledger over one 3-node JetStream cluster, several writers on one
//! project space's stream (each caseledger server has its own `JetStreamLog` on it).
//!
//! Without a `nats-server` (`scripts/nats-server.sh`) they print `SKIP:`, or fail under
//! `CASELEDGER_REQUIRE_SERVICES=1`. They run one at a time (each starts 3 nats-servers).

use std::time::{Duration, Instant};

use caseledger::domain::{
    CommandId, DomainName, Event, Position, Timestamp, UserCreatedV1, UserId,
};
use caseledger::eventlog::{AppendOutcome, AppendRequest, EventStore, Expected, LogError};
use jetstream::cluster::{nats_server, require_services, Cluster};
use jetstream::{JetStreamConfig, JetStreamLog};

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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match JetStreamLog::open(
            JetStreamConfig::new(cluster.urls()),
            &DomainName::new(DOMAIN),
        )
        .await
        {
            Ok(log) => return log,
            Err(e) if Instant::now() < deadline => {
                eprintln!("opening the JetStream log: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("cannot open the JetStream log: {e}"),
        }
    }
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
