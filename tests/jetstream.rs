//! The JetStream log (`crates/jetstream`) against the `EventStore` contract the sled log keeps,
//! on a 3-node cluster these tests start themselves (issue 11): positions gapless from 1,
//! expected-position conflicts refused, idempotent retries answered `AlreadyAppended`, the same
//! hash chain as sled for the same appends, and nothing acknowledged lost or doubled when a node
//! or the stream leader is killed with `kill -9` during a 64-task append storm; and the CLI on
//! `--store nats://…`, two data dirs sharing one stream.
//!
//! Without a `nats-server` 2.12+ (`scripts/nats-server.sh`) they print `SKIP:`, or fail under
//! `CASELEDGER_REQUIRE_SERVICES=1`. They run one at a time (each starts 3 servers).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caseledger::domain::{
    CommandId, DomainName, Event, FormAcceptedV1, FormId, FormRecord, Position, Timestamp,
    UserCreatedV1, UserId,
};
use caseledger::eventlog::{
    AppendOutcome, AppendRequest, EventStore, Expected, LogConfig, LogError, SledLog,
};
use jetstream::cluster::{nats_server, require_services, Cluster};
use jetstream::{JetStreamConfig, JetStreamLog};

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
    // The meta leader may still be in election right after start.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match JetStreamLog::open(
            JetStreamConfig::new(cluster.urls()),
            &DomainName::new(domain),
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
    assert_eq!(verified.head, Position(88));
    assert_eq!(log.head().await.expect("head"), Position(88));

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
async fn storm(victim: Victim) {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = cluster(&format!("jetstream kill -9 {victim:?}")) else {
        return;
    };
    let log = open(&cluster, "storm").await;
    let leader = log.leader().await.expect("leader").expect("a leader");
    let leader = cluster.index_of(&leader).expect("leader is a node");
    let target = match victim {
        Victim::Leader => leader,
        Victim::Follower => (leader + 1) % 3,
    };
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
    // The restarted node caught up: a log opened on it alone reads the same head.
    let node = &cluster.nodes()[target];
    let direct = JetStreamLog::open(
        JetStreamConfig::new(format!("nats://127.0.0.1:{}", node.client_port)),
        &DomainName::new("storm"),
    )
    .await
    .expect("open through the restarted node");
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
