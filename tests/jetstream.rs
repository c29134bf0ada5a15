//! The JetStream log (`crates/jetstream`) against the `EventStore` contract the sled log keeps,
//! on a 3-node cluster these tests start themselves (issue 11): positions gapless from 1,
//! expected-position conflicts refused, idempotent retries answered `AlreadyAppended`, the same
//! hash chain as sled for the same appends, nothing acknowledged lost or doubled when a node
//! or the stream leader is killed with `kill -9` during a 64-task append storm, a store moved
//! between sled and JetStream by verbatim imports keeping its head hash, and the CLI on
//! `--store nats://…`, two data dirs sharing one stream.
//!
//! Without a `nats-server` 2.12+ (`scripts/nats-server.sh`) they print `SKIP:`, or fail under
//! `CASELEDGER_REQUIRE_SERVICES=1`. They run one at a time (each starts 3 servers).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caseledger::domain::{
    CommandId, DomainName, Event, FormAcceptedV1, FormId, FormRecord, Position, RawBytes,
    Timestamp, UserCreatedV1, UserId,
};
use caseledger::eventlog::{
    decode_envelope, encode_envelope_chained, AppendOutcome, AppendRequest, EventStore, Expected,
    LogConfig, LogError, SledLog, VerbatimEntry, GENESIS,
};
use jetstream::cluster::{nats_server, open_when_ready, require_services, Cluster};
use jetstream::{JetStreamConfig, JetStreamLog};
use sha2::{Digest, Sha256};

/// One cluster at a time: 2 cores are shared by everything.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A started 3-node cluster, or `None` after a `SKIP:` line.
fn cluster(test: &str) -> Option<Cluster> {
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

async fn open(cluster: &Cluster, domain: &str) -> JetStreamLog {
    open_at(&cluster.urls(), domain).await
}

/// A log through the servers `urls`, retried for 30 s: opening needs the stream's leader, which
/// may be in election (after a start, a restart, a kill).
async fn open_at(urls: &str, domain: &str) -> JetStreamLog {
    open_when_ready(
        JetStreamConfig::new(urls),
        &DomainName::new(domain),
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot open the JetStream log: {e}"))
}

fn user(i: u64) -> Event {
    Event::UserCreatedV1(UserCreatedV1 {
        user_id: UserId::new(format!("u-{i}")),
        username: format!("worker{i}"),
    })
}

fn form(i: u64) -> Event {
    Event::FormAcceptedV1(FormAcceptedV1 {
        form: FormRecord {
            form_id: FormId::new(format!("f-{i}")),
            xmlns: "http://openrosa.org/formdesigner/F".into(),
            app_id: Some("app".into()),
            user_id: Some("u1".into()),
            content_hash: [7; 32],
            raw: format!("<data>form {i} {}</data>", "x".repeat(600))
                .into_bytes()
                .into(),
        },
        blocks: Vec::new(),
    })
}

fn request(key: &str, expected: Expected, events: Vec<Event>) -> AppendRequest {
    AppendRequest {
        expected,
        idempotency_key: Some(key.to_owned()),
        command_id: CommandId::new(key),
        recorded_at: Timestamp(1_767_225_600_000),
        events,
    }
}

/// The contract script, run against any `EventStore`; returns what it appended.
async fn contract(log: &dyn EventStore) {
    assert_eq!(log.head().await.expect("head"), Position::ZERO);
    for i in 1..=3u64 {
        let outcome = log
            .append(request(
                &format!("k{i}"),
                Expected::Head(Position(i - 1)),
                vec![form(i)],
            ))
            .await
            .expect("append");
        assert_eq!(
            outcome,
            AppendOutcome::Appended {
                first: Position(i),
                last: Position(i)
            }
        );
    }
    // A decision made on a stale head is refused and writes nothing.
    let stale = log
        .append(request("stale", Expected::Head(Position(1)), vec![user(9)]))
        .await;
    assert!(
        matches!(
            stale,
            Err(LogError::WrongExpectedPosition {
                expected: Position(1),
                actual: Position(3)
            })
        ),
        "{stale:?}"
    );
    assert_eq!(log.head().await.expect("head"), Position(3));
    // A retry is answered with the original positions, whatever it expects.
    let retry = log
        .append(request("k2", Expected::Head(Position(0)), vec![form(2)]))
        .await
        .expect("retry");
    assert_eq!(
        retry,
        AppendOutcome::AlreadyAppended {
            first: Position(2),
            last: Position(2)
        }
    );
    // Several events: consecutive positions, all or none.
    let many = log
        .append(request(
            "many",
            Expected::Any,
            vec![user(4), form(5), user(6)],
        ))
        .await
        .expect("append many");
    assert_eq!(
        many,
        AppendOutcome::Appended {
            first: Position(4),
            last: Position(6)
        }
    );
    let again = log
        .append(request("many", Expected::Any, vec![user(4)]))
        .await
        .expect("retry many");
    assert_eq!(
        again,
        AppendOutcome::AlreadyAppended {
            first: Position(4),
            last: Position(6)
        }
    );
    let all = log.read(Position(0), 100).await.expect("read");
    let positions: Vec<u64> = all.iter().map(|e| e.position.0).collect();
    assert_eq!(positions, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(all[4].event, form(5));
    assert_eq!(all[4].command_id, CommandId::new("many"));
    let one = log.read(Position(5), 1).await.expect("read one");
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].position, Position(5));
    assert!(log.read(Position(7), 10).await.expect("past").is_empty());
    // Subscribe: catch up from 5, then live.
    let mut sub = log.subscribe(Position(5)).await.expect("subscribe");
    assert_eq!(sub.next().await.expect("5").position, Position(5));
    assert_eq!(sub.next().await.expect("6").position, Position(6));
    let waiter = tokio::spawn(async move {
        let event = sub.next().await;
        (event, sub.position())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    log.append(request("k7", Expected::Head(Position(6)), vec![user(7)]))
        .await
        .expect("append 7");
    let (live, at) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("live event within 10 s")
        .expect("join");
    assert_eq!(live.expect("live").position, Position(7));
    assert_eq!(at, Position(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_log_keeps_the_sled_contract_and_its_hash_chain() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster("jetstream contract") else {
        return;
    };
    let log = open(&cluster, "contract").await;
    contract(&log).await;

    // The same appends to sled give the same chain, so the same `verify` head.
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::open(dir.path()).expect("sled");
    let sled_log =
        SledLog::open(&db, &DomainName::new("contract"), LogConfig::default()).expect("sled log");
    contract(&sled_log).await;
    let on_sled = sled_log.verify(Position(1)).expect("verify sled");
    let on_nats = log.verify().await.expect("verify jetstream");
    assert_eq!(on_nats.head, Position(7));
    assert_eq!(on_nats.head, on_sled.head);
    assert_eq!(on_nats.head_hash, on_sled.head_hash);
    assert_eq!(on_nats.bytes, on_sled.bytes);

    // A second writer (another caseledger server) on the same stream.
    let other = open(&cluster, "contract").await;
    assert_eq!(
        other
            .append(request("k2", Expected::Any, vec![form(2)]))
            .await
            .expect("retry on the other"),
        AppendOutcome::AlreadyAppended {
            first: Position(2),
            last: Position(2)
        }
    );
    let by_other = other
        .append(request("o8", Expected::Head(Position(7)), vec![user(8)]))
        .await
        .expect("append on the other");
    assert_eq!(by_other.last(), Position(8));
    // The first writer's head is stale now: `Head(7)` is refused, `Any` lands after 8, and the
    // other's key is known to it.
    let refused = log
        .append(request("s", Expected::Head(Position(7)), vec![user(9)]))
        .await;
    assert!(
        matches!(
            refused,
            Err(LogError::WrongExpectedPosition {
                expected: Position(7),
                actual: Position(8)
            })
        ),
        "{refused:?}"
    );
    assert_eq!(
        log.append(request("o8", Expected::Any, vec![user(8)]))
            .await
            .expect("retry o8"),
        AppendOutcome::AlreadyAppended {
            first: Position(8),
            last: Position(8)
        }
    );
    // An `append_all` chain is decided in order: once its first append is refused, the
    // second is refused too, although the other writer's one event made its head fit.
    other
        .append(request("o9", Expected::Head(Position(8)), vec![user(9)]))
        .await
        .expect("the other writer's 9");
    let chain = log
        .append_all(vec![
            request("x1", Expected::Head(Position(8)), vec![user(10)]),
            request("x2", Expected::Head(Position(9)), vec![user(11)]),
            request("x3", Expected::Any, vec![user(12)]),
        ])
        .await;
    assert!(
        matches!(
            chain[0],
            Err(LogError::WrongExpectedPosition {
                expected: Position(8),
                actual: Position(9)
            })
        ),
        "{chain:?}"
    );
    assert!(
        matches!(
            chain[1],
            Err(LogError::WrongExpectedPosition {
                expected: Position(9),
                ..
            })
        ),
        "decided with x1 in place, which is not there: {chain:?}"
    );
    assert_eq!(
        chain[2].as_ref().ok(),
        Some(&AppendOutcome::Appended {
            first: Position(10),
            last: Position(10)
        }),
        "an append expecting no head does not depend on the chain"
    );
    // Both writers pipelining at once still leave one gapless chain.
    let (a, b) = (log.clone(), other.clone());
    let left = tokio::spawn(async move {
        for i in 0..40u64 {
            a.append(request(&format!("a{i}"), Expected::Any, vec![user(i)]))
                .await
                .expect("a");
        }
    });
    let right = tokio::spawn(async move {
        for i in 0..40u64 {
            b.append(request(&format!("b{i}"), Expected::Any, vec![user(i)]))
                .await
                .expect("b");
        }
    });
    left.await.expect("join");
    right.await.expect("join");
    let verified = log.verify().await.expect("verify after two writers");
    assert_eq!(verified.head, Position(90));
    assert_eq!(log.head().await.expect("head"), Position(90));
    // A range with another writer's entries in it is not at hand.
    assert!(log.recent_entries(Position(11), Position(90)).is_none());
    // A writer's own acknowledged appends are at hand exactly as the stream holds them (a
    // replica copies them from there); another writer's never are.
    let stored = log
        .read_entries(Position(1), 90)
        .await
        .expect("read the stream back");
    let (mut own, mut theirs) = (0, 0);
    for entry in &stored {
        let p = entry.position;
        match (log.recent_entries(p, p), other.recent_entries(p, p)) {
            (Some(mine), None) => {
                assert_eq!(mine, vec![entry.clone()], "log's own entry at {p}");
                own += 1;
            }
            (None, Some(its)) => {
                assert_eq!(its, vec![entry.clone()], "other's own entry at {p}");
                theirs += 1;
            }
            (None, None) => {}
            (a, b) => panic!("position {p} at hand in both writers: {a:?} {b:?}"),
        }
    }
    assert!(own >= 40 && theirs >= 40, "own {own}, theirs {theirs}");
    assert!(
        log.recent_entries(Position(90), Position(90)).is_none()
            && other.recent_entries(Position(90), Position(90)).is_none(),
        "an entry is handed out once"
    );

    // A stream that lost acknowledged messages (here: deleted and created again) is never
    // written over: the writer that saw them acknowledged reports the lost tail.
    let lost = open(&cluster, "lost").await;
    for i in 1..=3u64 {
        lost.append(request(&format!("l{i}"), Expected::Any, vec![user(i)]))
            .await
            .expect("append");
    }
    let client = async_nats::connect(cluster.url_list())
        .await
        .expect("connect");
    async_nats::jetstream::new(client)
        .delete_stream(lost.stream_name())
        .await
        .expect("delete the stream");
    let fresh = open(&cluster, "lost").await;
    fresh
        .append(request("new", Expected::Any, vec![user(1)]))
        .await
        .expect("append to the new stream");
    let _ = lost
        .append(request("x", Expected::Any, vec![user(9)]))
        .await;
    let after = lost
        .append(request("y", Expected::Any, vec![user(9)]))
        .await;
    assert!(
        matches!(&after, Err(LogError::Corrupt { reason, .. }) if reason.contains("lost tail")),
        "{after:?}"
    );
    assert_eq!(fresh.head().await.expect("head"), Position(1));
}

#[derive(Debug, Clone, Copy)]
enum Victim {
    Follower,
    Leader,
}

const TASKS: usize = 64;
const PER_TASK: usize = 25;

/// 64 tasks append `PER_TASK` events each (keys `t<task>-<n>`, retried with the same key until
/// answered); after 300 acknowledgements the victim gets `kill -9`, and is restarted 2 s later.
///
/// The log's connection goes through the victim, so the acks of the appends in flight are lost
/// with it and the client fails over to another node: the case that failed CI, when the client
/// happened to be connected to the killed follower (a connection elsewhere loses nothing).
async fn storm(victim: Victim) {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = cluster(&format!("jetstream kill -9 {victim:?}")) else {
        return;
    };
    let mut log = open(&cluster, "storm").await;
    let leader = log.leader().await.expect("leader").expect("a leader");
    let leader = cluster.index_of(&leader).expect("leader is a node");
    let target = match victim {
        Victim::Leader => leader,
        Victim::Follower => (leader + 1) % 3,
    };
    // The client picks one of the servers at random: open again until it picked the victim.
    let mut opened = 1;
    while cluster.index_of(&log.connected_server()) != Some(target) {
        assert!(
            opened < 50,
            "50 connections, none through node {}",
            target + 1
        );
        log = open(&cluster, "storm").await;
        opened += 1;
    }
    let acked: Arc<std::sync::Mutex<HashMap<String, (Position, Position)>>> = Arc::default();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let log = log.clone();
        let acked = Arc::clone(&acked);
        tasks.push(tokio::spawn(async move {
            let mut errors = 0u64;
            for n in 0..PER_TASK {
                let key = format!("t{t}-{n}");
                let deadline = Instant::now() + Duration::from_secs(90);
                loop {
                    match log
                        .append(request(&key, Expected::Any, vec![user(n as u64)]))
                        .await
                    {
                        Ok(outcome) => {
                            let (first, last) = match outcome {
                                AppendOutcome::Appended { first, last }
                                | AppendOutcome::AlreadyAppended { first, last } => (first, last),
                            };
                            acked.lock().expect("lock").insert(key, (first, last));
                            break;
                        }
                        Err(LogError::Unavailable(reason)) if Instant::now() < deadline => {
                            errors += 1;
                            if errors % 50 == 1 {
                                eprintln!("task {t}: {reason}; retrying");
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => return Err(format!("task {t} append {n}: {e:?}")),
                    }
                }
            }
            Ok(errors)
        }));
    }
    while acked.lock().expect("lock").len() < 300 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let at_kill = acked.lock().expect("lock").len();
    cluster.kill(target).expect("kill -9");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(target).expect("restart");
    let mut retries = 0;
    let mut failed = Vec::new();
    for task in tasks {
        match task.await.expect("task") {
            Ok(n) => retries += n,
            Err(e) => failed.push(e),
        }
    }
    if !failed.is_empty() {
        for node in cluster.nodes() {
            let log = std::fs::read_to_string(cluster.dir().join(format!("{}.log", node.name)))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- {} (last 40 lines, newest first)", node.name);
            for line in tail {
                eprintln!("{line}");
            }
        }
        panic!("{} appends never acknowledged: {failed:?}", failed.len());
    }
    let acked = acked.lock().expect("lock").clone();
    assert_eq!(acked.len(), TASKS * PER_TASK);

    let verified = log.verify().await.expect("chain verifies after the kill");
    let all = log.read(Position(1), usize::MAX).await.expect("read all");
    assert_eq!(all.len() as u64, verified.head.0, "positions gapless");
    let mut seen: HashMap<String, Vec<Position>> = HashMap::new();
    for event in &all {
        seen.entry(event.command_id.as_str().to_owned())
            .or_default()
            .push(event.position);
    }
    for (key, (first, _)) in &acked {
        assert_eq!(
            seen.get(key.as_str()),
            Some(&vec![*first]),
            "acknowledged append {key} present exactly once, at its acknowledged position"
        );
    }
    assert_eq!(
        verified.head.0 as usize,
        TASKS * PER_TASK,
        "nothing doubled"
    );
    eprintln!(
        "kill -9 {victim:?} (node {} of 3) after {at_kill} acks: {} appends acknowledged, \
         {retries} retries, head {}, chain verified",
        target + 1,
        acked.len(),
        verified.head
    );
    // The restarted node catches up (its /healthz says its replica is current), and then a log
    // opened on it alone reads the same head.
    cluster
        .wait_healthy(target, Duration::from_secs(120))
        .expect("the restarted node catches up");
    let node = &cluster.nodes()[target];
    let direct = open_at(&format!("nats://127.0.0.1:{}", node.client_port), "storm").await;
    assert_eq!(
        direct.verify().await.expect("verify").head_hash,
        verified.head_hash
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_follower_during_a_storm_loses_and_doubles_nothing() {
    storm(Victim::Follower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_stream_leader_during_a_storm_loses_and_doubles_nothing() {
    storm(Victim::Leader).await;
}

/// A form whose `content_hash` is its bytes' SHA-256, as the engine writes it, so a sled log
/// with raw files stores the bytes out of line (envelope format 4).
fn hashed_form(i: u64, size: usize) -> Event {
    let raw = format!("<data><n>{i}</n>{}</data>", "r".repeat(size)).into_bytes();
    Event::FormAcceptedV1(FormAcceptedV1 {
        form: FormRecord {
            form_id: FormId::new(format!("f-{i}")),
            xmlns: "http://openrosa.org/formdesigner/F".into(),
            app_id: Some("app".into()),
            user_id: Some("u1".into()),
            content_hash: Sha256::digest(&raw).into(),
            raw: raw.into(),
        },
        blocks: Vec::new(),
    })
}

/// A sled log that stores raw submissions out of line, with users and forms (one of 300 KB),
/// single and multi-event appends: 12 positions, 7 of them forms. Returns what was appended.
async fn sled_with_forms(dir: &tempfile::TempDir, domain: &str) -> (SledLog, Vec<Event>) {
    let db = sled::open(dir.path().join("db")).expect("sled");
    let log = SledLog::open(&db, &DomainName::new(domain), LogConfig::default()).expect("log");
    log.store_raw_in(&dir.path().join("raw"), true)
        .expect("raw files");
    let appends = vec![
        vec![user(1)],
        vec![hashed_form(2, 600)],
        vec![hashed_form(3, 300_000), user(4), hashed_form(5, 40)],
        vec![user(6)],
        vec![hashed_form(7, 2_000), hashed_form(8, 10)],
        vec![user(9), user(10)],
        vec![hashed_form(11, 700)],
        vec![hashed_form(12, 0)],
    ];
    let mut all = Vec::new();
    for (n, events) in appends.into_iter().enumerate() {
        all.extend(events.iter().cloned());
        log.append(request(&format!("s{n}"), Expected::Any, events))
            .await
            .expect("append to sled");
    }
    (log, all)
}

/// Asserts `result` is `LogError::Corrupt` naming position `at`.
#[track_caller]
fn corrupt_at<T: std::fmt::Debug>(result: Result<T, LogError>, at: u64, what: &str) {
    match result {
        Err(LogError::Corrupt { position, reason }) => {
            assert_eq!(position, Position(at), "{what}: {reason}");
        }
        other => panic!("{what}: expected Corrupt at {at}, got {other:?}"),
    }
}

/// The stored entries of `log`, all of them.
async fn entries_of(log: &dyn EventStore) -> Vec<VerbatimEntry> {
    log.read_entries(Position(1), usize::MAX)
        .await
        .expect("read entries")
}

/// A store moves from sled to JetStream and back with `read_entries` and `append_verbatim`
/// (issue 11): the forms' raw submissions, stored out of line on sled (format 4), travel in the
/// same JetStream message after their envelope; JetStream's `verify` gives sled's head, head
/// hash and bytes; `read` returns each form with its bytes inline, and `read_entries` the
/// entries exactly as sled stores them; appends after the import chain on (the writer's head
/// and hash are the import's); the entries imported into a fresh sled log give the same head
/// hash again. `domains` lists the project spaces with a stream, and no other stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_moves_between_sled_and_jetstream_with_the_same_head() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster("jetstream verbatim import") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (sled_log, events) = sled_with_forms(&dir, "moved.space").await;
    let on_sled = sled_log.verify(Position(1)).expect("verify sled");
    assert_eq!(on_sled.head, Position(12));
    let exported = entries_of(&sled_log).await;
    assert_eq!(exported.len(), 12);
    assert_eq!(
        exported.iter().filter(|e| e.raw.is_some()).count(),
        7,
        "every form's bytes are out of line on sled"
    );

    let log = open(&cluster, "moved.space").await;
    // In several imports, one of a single entry.
    let mut last = None;
    for chunk in [&exported[..1], &exported[1..5], &exported[5..]] {
        last = Some(log.append_verbatim(chunk).await.expect("import"));
    }
    let last = last.expect("imported");
    assert_eq!(last.position, on_sled.head);
    assert_eq!(last.hash, on_sled.head_hash);
    let on_nats = log.verify().await.expect("verify jetstream");
    assert_eq!(on_nats.head, on_sled.head);
    assert_eq!(on_nats.head_hash, on_sled.head_hash);
    assert_eq!(
        on_nats.bytes, on_sled.bytes,
        "envelopes and raw submissions"
    );
    assert_eq!(
        entries_of(&log).await,
        exported,
        "stored as sled stores them"
    );
    let read = log.read(Position(1), usize::MAX).await.expect("read");
    let read: Vec<Event> = read.into_iter().map(|e| e.event).collect();
    assert_eq!(read, events, "each form with its own bytes, inline");
    assert!(read
        .iter()
        .filter_map(Event::form_record)
        .all(|f| matches!(f.raw, RawBytes::Inline(_))));
    let mut sub = log.subscribe(Position(3)).await.expect("subscribe");
    assert_eq!(sub.next().await.expect("3").event, events[2]);

    // The writer goes on from the imported head; a second writer opened on the stream reads it.
    let after = log
        .append(request(
            "after",
            Expected::Head(Position(12)),
            vec![user(13)],
        ))
        .await
        .expect("append after the import");
    assert_eq!(after.last(), Position(13));
    let other = open(&cluster, "moved.space").await;
    let by_other = other
        .append(request(
            "other",
            Expected::Head(Position(13)),
            vec![hashed_form(14, 5)],
        ))
        .await
        .expect("append on a second writer");
    assert_eq!(by_other.last(), Position(14));
    let on_nats = log.verify().await.expect("verify after appends");
    assert_eq!(on_nats.head, Position(14));

    // And back: into a fresh sled log with raw files, the same head hash.
    let back_dir = tempfile::tempdir().expect("tempdir");
    let back_db = sled::open(back_dir.path().join("db")).expect("sled");
    let back = SledLog::open(
        &back_db,
        &DomainName::new("moved.space"),
        LogConfig::default(),
    )
    .expect("log");
    back.store_raw_in(&back_dir.path().join("raw"), true)
        .expect("raw files");
    let entries = entries_of(&log).await;
    assert_eq!(entries[..12], exported[..]);
    let head = back.append_verbatim(&entries).expect("import into sled");
    back.flush_blocking().expect("flush");
    assert_eq!(head.position, Position(14));
    assert_eq!(head.hash, on_nats.head_hash);
    let on_back = back.verify(Position(1)).expect("verify the copy");
    assert_eq!(on_back.head_hash, on_nats.head_hash);
    assert_eq!(on_back.bytes, on_nats.bytes);

    // `domains`: the project spaces with a stream, not other streams on the cluster.
    let config = JetStreamConfig::new(cluster.urls());
    let _second = open(&cluster, "second_space").await;
    let client = async_nats::connect(cluster.url_list())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    // A loaded machine may take longer than one request's 5 s to place a stream.
    let mut tries = 0;
    while let Err(e) = js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "NOT_CASELEDGER".into(),
            subjects: vec!["elsewhere".into()],
            ..Default::default()
        })
        .await
    {
        tries += 1;
        assert!(tries < 6, "another stream: {e}");
    }
    assert_eq!(
        JetStreamLog::domains(&config).await.expect("domains"),
        vec![
            DomainName::new("moved.space"),
            DomainName::new("second_space")
        ]
    );
}

/// `append_verbatim` refuses, with `LogError::Corrupt` naming the entry and appending nothing,
/// an entry with a changed byte, one at the wrong position, one whose previous hash is not the
/// chain's, or a raw submission that is not the one its envelope names (changed, missing, or
/// sent with an envelope that holds its own); the good entries are then imported whole. A message stored in the
/// stream whose raw bytes do not match its envelope is `Corrupt` on `read`, `read_entries` and
/// `verify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_verbatim_refuses_tampered_entries_and_appends_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster("jetstream verbatim refusals") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (sled_log, _) = sled_with_forms(&dir, "refusing").await;
    let good = entries_of(&sled_log).await;
    let log = open(&cluster, "refusing").await;
    let mut changed = good.clone();
    let last = changed[5].envelope.len() - 1;
    changed[5].envelope[last] ^= 1;
    corrupt_at(log.append_verbatim(&changed).await, 6, "a changed byte");
    corrupt_at(
        log.append_verbatim(&good[1..]).await,
        2,
        "a gap at the start",
    );
    let mut reordered = good.clone();
    reordered.swap(3, 4);
    corrupt_at(log.append_verbatim(&reordered).await, 5, "out of order");
    // Position 4 (a user, format 3) re-encoded with a valid crc but chained to the wrong hash.
    let mut rechained = good.clone();
    let event = decode_envelope(&rechained[3].envelope).expect("decode");
    rechained[3].envelope = encode_envelope_chained(&event, &GENESIS).expect("encode");
    corrupt_at(
        log.append_verbatim(&rechained).await,
        4,
        "a wrong previous hash",
    );
    let mut wrong_raw = good.clone();
    let raw = wrong_raw[2]
        .raw
        .as_mut()
        .expect("position 3 is a form out of line");
    raw[100] ^= 1;
    corrupt_at(
        log.append_verbatim(&wrong_raw).await,
        3,
        "a changed raw byte",
    );
    let mut missing_raw = good.clone();
    missing_raw[1].raw = None;
    corrupt_at(log.append_verbatim(&missing_raw).await, 2, "a missing raw");
    let mut extra_raw = good.clone();
    extra_raw[0].raw = Some(b"<data/>".to_vec());
    corrupt_at(log.append_verbatim(&extra_raw).await, 1, "a raw for a user");
    assert_eq!(
        log.head().await.expect("head"),
        Position::ZERO,
        "nothing appended"
    );

    // The good entries go in whole after all that; importing them again is out of order.
    let head = log.append_verbatim(&good).await.expect("import");
    assert_eq!(head, sled_log.head_hash());
    corrupt_at(log.append_verbatim(&good[..1]).await, 1, "imported twice");
    assert_eq!(log.head().await.expect("head"), Position(12));

    // A message in the stream whose raw bytes are not the ones its envelope names: published
    // past JetStreamLog (the stream takes any message on its subject).
    sled_log
        .append(request(
            "13",
            Expected::Head(Position(12)),
            vec![hashed_form(13, 50)],
        ))
        .await
        .expect("append 13 on sled");
    let thirteen = sled_log
        .read_entries(Position(13), 1)
        .await
        .expect("entry 13")
        .remove(0);
    let mut bad_raw = thirteen.raw.clone().expect("a form out of line");
    bad_raw[0] ^= 1;
    let mut payload = thirteen.envelope.clone();
    payload.extend_from_slice(&bad_raw);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Caseledger-Envelope-Len",
        thirteen.envelope.len().to_string().as_str(),
    );
    let client = async_nats::connect(cluster.url_list())
        .await
        .expect("connect");
    async_nats::jetstream::new(client)
        .publish_with_headers(log.subject().to_owned(), headers, payload.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    corrupt_at(log.verify().await, 13, "verify");
    corrupt_at(log.read(Position(13), 1).await, 13, "read");
    corrupt_at(log.read_entries(Position(13), 1).await, 13, "read_entries");
}

/// Runs the built binary with `--store STORE --data DATA --domain DOMAIN --json ARGS`, off the
/// runtime's worker (it blocks until the process ends).
fn cli(store: &str, data: &std::path::Path, domain: &str, args: &[&str]) -> std::process::Output {
    tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
            .arg("--store")
            .arg(store)
            .arg("--data")
            .arg(data)
            .args(["--domain", domain, "--json"])
            .args(args)
            .env_remove("CASELEDGER_DATA")
            .env_remove("CASELEDGER_STORE")
            .output()
            .expect("run caseledger")
    })
}

/// [`cli`] that must exit 0; its first stdout line as JSON.
fn cli_ok(store: &str, data: &std::path::Path, domain: &str, args: &[&str]) -> serde_json::Value {
    let out = cli(store, data, domain, args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().next().unwrap_or("null")).expect("JSON output")
}

/// Issue 11 ("a global option `--store nats://…` puts every command on JetStream; `--data` then
/// holds only that process's local projection state"): two data dirs on one stream see each
/// other's writes, verify to the stream's head hash, export the same bytes; a read-only command
/// on a project space without a stream fails `no_store` and creates neither stream nor data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_on_a_nats_store_shares_one_log_between_data_dirs() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster("cli on --store nats") else {
        return;
    };
    // Right after start the meta leader may still be in election: wait for a stream to open.
    drop(open(&cluster, "warm-up").await);
    let store = cluster.urls();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));

    // A read-only command for a project space that has no stream.
    let out = cli(&store, &b, "ghost", &["cases", "--user", "u-maria"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error: serde_json::Value =
        serde_json::from_str(stderr.lines().last().unwrap_or_default()).expect("JSON error");
    assert_eq!(error["error"]["code"], "no_store", "{stderr}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("the project space ghost has no stream")),
        "{stderr}"
    );
    let config = JetStreamConfig::new(store.clone());
    assert!(
        !jetstream::stream_exists(&config, &DomainName::new("ghost"))
            .await
            .expect("ask for the stream")
    );
    assert!(!b.exists(), "the failed command created its data dir");

    // Writes through data dir A.
    for args in [
        &["user", "create", "--id", "u-david", "--username", "david"][..],
        &["user", "create", "--id", "u-maria", "--username", "maria"],
        &[
            "group",
            "create",
            "--id",
            "g-team",
            "--name",
            "Kibera",
            "--case-sharing",
        ],
        &["group", "add-member", "g-team", "u-david"],
        &["group", "add-member", "g-team", "u-maria"],
        &[
            "app",
            "create",
            "--id",
            "app-anc",
            "--name",
            "ANC",
            "--case-sharing",
            "--case-type",
            "pregnancy",
        ],
    ] {
        cli_ok(&store, &a, "cli", args);
    }
    let forms = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/conformance/01-shared-team");
    let register = forms.join("01-register.xml");
    let submitted = cli_ok(
        &store,
        &a,
        "cli",
        &[
            "submit",
            register.to_str().expect("utf-8"),
            "--app",
            "app-anc",
        ],
    );
    assert_eq!(submitted["outcome"], "accepted", "{submitted}");
    let case_id = "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10";
    assert_eq!(submitted["cases"][0], case_id);
    assert!(jetstream::stream_exists(&config, &DomainName::new("cli"))
        .await
        .expect("ask for the stream"));

    // Reads through data dir B, which starts empty: its replica pulls the stream.
    let cases = cli_ok(&store, &b, "cli", &["cases", "--user", "u-maria"]);
    let ids: Vec<&str> = cases
        .as_array()
        .expect("a case list")
        .iter()
        .filter_map(|c| c["case_id"].as_str())
        .collect();
    assert_eq!(ids, vec![case_id], "{cases}");
    let case = cli_ok(&store, &b, "cli", &["case", "show", case_id]);
    assert_eq!(case["owner_id"], "g-team", "{case}");
    assert_eq!(case["user_id"], "u-david", "{case}");

    // A write through B is read through A.
    let visit = forms.join("02-maria-visit.xml");
    let second = cli_ok(
        &store,
        &b,
        "cli",
        &["submit", visit.to_str().expect("utf-8"), "--app", "app-anc"],
    );
    assert_eq!(second["outcome"], "accepted", "{second}");
    let case = cli_ok(&store, &a, "cli", &["case", "show", case_id]);
    assert_eq!(case["user_id"], "u-maria", "{case}");

    // Both replicas verify to the stream's head and hash, and export the same bytes.
    let stream = open(&cluster, "cli")
        .await
        .verify()
        .await
        .expect("verify the stream");
    let hex: String = stream
        .head_hash
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for data in [&a, &b] {
        let verified = cli_ok(&store, data, "cli", &["verify"]);
        assert_eq!(verified["ok"], true, "{verified}");
        assert_eq!(verified["head"], stream.head.0, "{verified}");
        assert_eq!(verified["head_hash"], hex.as_str(), "{verified}");
        assert_eq!(verified["stream"]["name"], "CASELEDGER_cli", "{verified}");
        assert_eq!(verified["stream"]["head"], stream.head.0, "{verified}");
        assert_eq!(verified["stream"]["head_hash"], hex.as_str(), "{verified}");
        let log = cli_ok(&store, data, "cli", &["log", "--limit", "1000"]);
        assert_eq!(
            log.as_array().map(|l| l.len() as u64),
            Some(stream.head.0),
            "{log}"
        );
    }
    let exported: Vec<Vec<u8>> = [&a, &b]
        .iter()
        .map(|data| {
            let out = cli(&store, data, "cli", &["export"]);
            assert_eq!(out.status.code(), Some(0));
            out.stdout
        })
        .collect();
    assert_eq!(
        exported[0]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64,
        stream.head.0
    );
    assert_eq!(exported[0], exported[1]);

    // Issue 11, "moving a store: `export` from sled and `import` into JetStream (and back) give
    // the same `verify` head": the stream's export into a sled data dir, that store's export
    // into a new project space's stream.
    let from_stream = tmp.path().join("from-stream.jsonl");
    std::fs::write(&from_stream, &exported[0]).expect("write the export");
    let on_sled = tmp.path().join("sled");
    let from = from_stream.to_str().expect("utf-8");
    cli_ok("sled", &on_sled, "cli", &["import", from]);
    let verified = cli_ok("sled", &on_sled, "cli", &["verify"]);
    assert_eq!(verified["head"], stream.head.0, "{verified}");
    assert_eq!(verified["head_hash"], hex.as_str(), "{verified}");
    let out = cli("sled", &on_sled, "cli", &["export"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        out.stdout, exported[0],
        "sled exports the lines it imported"
    );
    let from_sled = tmp.path().join("from-sled.jsonl");
    std::fs::write(&from_sled, &out.stdout).expect("write the export");
    let from = from_sled.to_str().expect("utf-8");
    let moved = tmp.path().join("moved");
    let imported = cli_ok(&store, &moved, "moved", &["import", from]);
    assert_eq!(imported["head_hash"], hex.as_str(), "{imported}");
    let verified = cli_ok(&store, &moved, "moved", &["verify"]);
    assert_eq!(verified["stream"]["name"], "CASELEDGER_moved", "{verified}");
    assert_eq!(verified["stream"]["head"], stream.head.0, "{verified}");
    assert_eq!(verified["stream"]["head_hash"], hex.as_str(), "{verified}");
    assert_eq!(verified["head_hash"], hex.as_str(), "{verified}");
    let case = cli_ok(&store, &moved, "moved", &["case", "show", case_id]);
    assert_eq!(case["user_id"], "u-maria", "{case}");
    // A stream cannot take an import over what it holds.
    let again = cli(&store, &moved, "moved", &["import", from]);
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already holds"), "{stderr}");

    // The stream deleted and created again with other entries: the replica in A is not a copy
    // of it, which `verify` reports as damage (exit 3), naming the position.
    let client = async_nats::connect(cluster.url_list())
        .await
        .expect("connect");
    async_nats::jetstream::new(client)
        .delete_stream("CASELEDGER_cli")
        .await
        .expect("delete the stream");
    let c = tmp.path().join("c");
    cli_ok(
        &store,
        &c,
        "cli",
        &["user", "create", "--id", "u-new", "--username", "new"],
    );
    let out = cli(&store, &a, "cli", &["verify"]);
    assert_eq!(out.status.code(), Some(3));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["position"], stream.head.0, "{report}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(r#""code":"damaged""#), "{stderr}");
}
