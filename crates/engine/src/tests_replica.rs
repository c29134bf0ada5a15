//! Replica engines (issue 11): two engines, each with its own local store, over one upstream
//! log (here a sled log in a directory of its own, through the same `EventStore` boundary the
//! JetStream log implements).

use std::sync::Arc;

use super::*;
use domain::CaseId;
use eventlog::EventStore;

struct Upstream {
    _dir: tempfile::TempDir,
    log: SledLog,
}

fn upstream() -> Upstream {
    let dir = tempfile::tempdir().expect("tmp");
    let db = sled::Config::new().path(dir.path()).open().expect("sled");
    let log = SledLog::open(&db, &"d".into(), LogConfig::default()).expect("log");
    Upstream { _dir: dir, log }
}

async fn replica(dir: &Path, up: &Upstream) -> Engine {
    let store: Arc<dyn EventStore> = Arc::new(up.log.clone());
    Engine::open_replica(dir, &"d".into(), EngineConfig::default(), store)
        .await
        .expect("open replica")
}

/// A registration (`create`) or follow-up (`update`) of case `case` by `u1`.
fn form(instance: &str, case: &str, create: bool, value: &str) -> Vec<u8> {
    let action = if create {
        "<create><case_type>patient</case_type><case_name>P</case_name><owner_id>u1</owner_id></create>"
    } else {
        ""
    };
    format!(
        "<?xml version='1.0' ?><data xmlns=\"http://openrosa.org/formdesigner/F1\">\
         <case xmlns=\"http://commcarehq.org/case/transaction/v2\" case_id=\"{case}\" \
         date_modified=\"2026-03-02T09:15:22.104+03:00\" user_id=\"u1\">{action}\
         <update><visit>{value}</visit></update></case>\
         <meta xmlns=\"http://openrosa.org/jr/xforms\"><instanceID>{instance}</instanceID>\
         <userID>u1</userID><username>u1</username></meta></data>"
    )
    .into_bytes()
}

fn create_user(id: &str) -> Request {
    Request::new(Command::CreateUser {
        id: id.into(),
        username: id.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_writing_one_case_lose_no_update_and_keep_received_order() {
    let up = upstream();
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let a = Arc::new(replica(da.path(), &up).await);
    let b = Arc::new(replica(db.path(), &up).await);
    let _follow_a = a.follow();
    let _follow_b = b.follow();
    a.execute(create_user("u1")).await.expect("user");
    let reg = a
        .submit(form("f-0", "c1", true, "0"), None, None)
        .await
        .expect("registration");
    assert_eq!(reg.outcome, SubmitStatus::Accepted);
    // 2 × 20 follow-ups of the same case, from both replicas at once.
    let mut tasks = Vec::new();
    for (name, engine) in [("a", Arc::clone(&a)), ("b", Arc::clone(&b))] {
        for i in 0..20 {
            let engine = Arc::clone(&engine);
            tasks.push(tokio::spawn(async move {
                let value = format!("{name}{i}");
                engine
                    .submit(
                        form(&format!("f-{name}-{i}"), "c1", false, &value),
                        None,
                        None,
                    )
                    .await
                    .map(|o| (o, value))
            }));
        }
    }
    let mut acked = Vec::new();
    for t in tasks {
        let (outcome, value) = t.await.expect("task").expect("submit");
        assert_eq!(outcome.outcome, SubmitStatus::Accepted, "{outcome:?}");
        acked.push((outcome.position, value));
    }
    let head = up.log.durable_head();
    assert_eq!(head, Position(2 + 40), "every form appended once");
    acked.sort();
    let positions: Vec<u64> = acked.iter().map(|(p, _)| p.0).collect();
    assert_eq!(
        positions,
        (3..=42).collect::<Vec<_>>(),
        "gapless, no duplicate"
    );
    // Received order wins: the case holds the value of the last position.
    let last = acked.last().map(|(_, v)| v.clone()).expect("one");
    for engine in [&a, &b] {
        assert_eq!(engine.pull().await.expect("pull"), head);
        let case = engine
            .projections()
            .case(&CaseId::from("c1"))
            .expect("read")
            .expect("case");
        assert_eq!(case.properties.get("visit"), Some(&last));
        assert_eq!(
            engine.log().verify(Position(1)).expect("verify").head_hash,
            up.log.verify(Position(1)).expect("verify").head_hash,
            "the replica is the upstream's log, entry for entry"
        );
        let differences = engine.verify(&mut |_, _| {}).expect("verify projections");
        assert!(differences.is_empty(), "{differences:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_on_a_stale_head_is_decided_again_not_appended() {
    let up = upstream();
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let a = replica(da.path(), &up).await;
    let b = replica(db.path(), &up).await;
    a.execute(create_user("u1")).await.expect("user");
    // b has not seen u1 (no follower): its decision is made after catching up, so the second
    // creation is refused instead of appended.
    let again = b.execute(create_user("u1")).await;
    assert!(
        matches!(again, Err(EngineError::Command(_))),
        "decided against the upstream head: {again:?}"
    );
    assert_eq!(up.log.durable_head(), Position(1));
    // The same form from both: the second is a duplicate (R-seed: instanceID is the identity).
    a.submit(form("f-1", "c1", true, "x"), None, None)
        .await
        .expect("first");
    let dup = b
        .submit(form("f-1", "c1", true, "x"), None, None)
        .await
        .expect("second");
    assert_eq!(dup.outcome, SubmitStatus::Duplicate);
    let after = up.log.durable_head();
    let retried = Request::idempotent(
        Command::CreateUser {
            id: "u2".into(),
            username: "u2".into(),
        },
        CommandId::new("key-1"),
    );
    let first = a.execute(retried.clone()).await.expect("first attempt");
    let second = b
        .execute(retried)
        .await
        .expect("retry on the other replica");
    assert_eq!(
        first.events, second.events,
        "a retry is answered, not applied"
    );
    assert_eq!(up.log.durable_head(), Position(after.0 + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_catches_up_and_one_of_another_store_is_refused() {
    let up = upstream();
    let da = tempfile::tempdir().expect("a");
    {
        let a = replica(da.path(), &up).await;
        a.execute(create_user("u1")).await.expect("user");
        a.flush().expect("flush");
    }
    // Written while the replica was down.
    let other = tempfile::tempdir().expect("b");
    let b = replica(other.path(), &up).await;
    b.execute(create_user("u2")).await.expect("user");
    drop(b);
    let a = replica(da.path(), &up).await;
    assert_eq!(a.projections().checkpoint(), Position(2));
    assert!(a.projections().directory().user_by_login("u2").is_some());
    drop(a);
    // The same data dir against another log: refused, named.
    let elsewhere = upstream();
    elsewhere
        .log
        .append(eventlog::AppendRequest {
            expected: Expected::Any,
            idempotency_key: None,
            command_id: CommandId::new("x"),
            recorded_at: Timestamp(1),
            events: vec![Event::UserCreatedV1(domain::UserCreatedV1 {
                user_id: "someone".into(),
                username: "someone".into(),
            })],
        })
        .await
        .expect("append");
    let store: Arc<dyn EventStore> = Arc::new(elsewhere.log.clone());
    let refused =
        Engine::open_replica(da.path(), &"d".into(), EngineConfig::default(), store).await;
    assert!(
        matches!(
            &refused,
            Err(EngineError::Log(eventlog::LogError::Corrupt { .. }))
        ),
        "{:?}",
        refused.err()
    );
}

// Issue 11: "a decision made on a stale position is retried against the new head, never
// appended". The other writer creates u1 between this replica's catch-up and its append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_refused_for_a_moved_head_is_decided_again_on_the_new_head() {
    let up = upstream();
    let racing = Slow::over(&up, 0, 1, "u1");
    let dir = tempfile::tempdir().expect("tmp");
    let a = Engine::open_replica(dir.path(), &"d".into(), EngineConfig::default(), racing)
        .await
        .expect("open");
    let created = a.execute(create_user("u1")).await;
    assert!(
        matches!(created, Err(EngineError::Command(_))),
        "decided again after the other writer's user: {created:?}"
    );
    assert_eq!(a.refused_appends(), 1);
    assert_eq!(
        up.log.durable_head(),
        Position(1),
        "only the other writer's event"
    );
    assert_eq!(a.projections().checkpoint(), Position(1));
}

// Issue 11: a fresh replica over a long stream copies it, then folds it in bulk as `replay`
// does (not in chunks), and answers as a replay of the same log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_replica_of_a_long_stream_answers_as_a_replay_of_it() {
    let up = upstream();
    let writer_dir = tempfile::tempdir().expect("w");
    let writer = replica(writer_dir.path(), &up).await;
    writer.execute(create_user("u1")).await.expect("user");
    for i in 0..12 {
        writer
            .submit(
                form(&format!("f{i}"), &format!("c{i}"), true, "v"),
                None,
                None,
            )
            .await
            .expect("form");
    }
    let fresh_dir = tempfile::tempdir().expect("f");
    let store: Arc<dyn EventStore> = Arc::new(up.log.clone());
    let config = EngineConfig {
        bulk_catch_up_from: 5,
        ..EngineConfig::default()
    };
    let fresh = Engine::open_replica(fresh_dir.path(), &"d".into(), config, store)
        .await
        .expect("open");
    assert_eq!(fresh.projections().checkpoint(), Position(13));
    assert!(fresh
        .projections()
        .case(&CaseId::from("c11"))
        .expect("read")
        .is_some());
    let differences = fresh.verify(&mut |_, _| {}).expect("verify");
    assert!(differences.is_empty(), "{differences:?}");
}

/// An upstream whose every append takes `delay` (a quorum's round trip), and where another
/// writer creates user `other` just before the `race_at`-th append (0: never).
struct Slow {
    log: SledLog,
    delay: std::time::Duration,
    appends: std::sync::atomic::AtomicUsize,
    race_at: usize,
    other: &'static str,
}

impl Slow {
    fn over(
        up: &Upstream,
        delay_ms: u64,
        race_at: usize,
        other: &'static str,
    ) -> Arc<dyn EventStore> {
        Arc::new(Slow {
            log: up.log.clone(),
            delay: std::time::Duration::from_millis(delay_ms),
            appends: std::sync::atomic::AtomicUsize::new(0),
            race_at,
            other,
        })
    }
}

#[async_trait::async_trait]
impl EventStore for Slow {
    async fn append(
        &self,
        req: eventlog::AppendRequest,
    ) -> Result<eventlog::AppendOutcome, eventlog::LogError> {
        let n = self
            .appends
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        tokio::time::sleep(self.delay).await;
        if n == self.race_at {
            self.log
                .append(eventlog::AppendRequest {
                    expected: Expected::Any,
                    idempotency_key: None,
                    command_id: CommandId::new("other-server"),
                    recorded_at: Timestamp(1),
                    events: vec![Event::UserCreatedV1(domain::UserCreatedV1 {
                        user_id: self.other.into(),
                        username: self.other.into(),
                    })],
                })
                .await?;
        }
        self.log.append(req).await
    }
    async fn read(
        &self,
        from: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, eventlog::LogError> {
        self.log.read(from, limit).await
    }
    async fn head(&self) -> Result<Position, eventlog::LogError> {
        self.log.head().await
    }
    async fn read_entries(
        &self,
        from: Position,
        limit: usize,
    ) -> Result<Vec<eventlog::VerbatimEntry>, eventlog::LogError> {
        self.log.read_entries(from, limit).await
    }
    async fn subscribe(
        &self,
        from: Position,
    ) -> Result<eventlog::Subscription, eventlog::LogError> {
        self.log.subscribe(from).await
    }
}

const CASES: usize = 6;

/// Registers cases `c0..c5`, then 64 tasks submit 2 follow-ups each at once, spread over
/// those cases; every form must be accepted. Returns each form's (position, instance, case,
/// value).
async fn storm(engine: &Arc<Engine>) -> Vec<(Position, String, String, String)> {
    engine.execute(create_user("u1")).await.expect("user");
    for c in 0..CASES {
        let reg = engine
            .submit(
                form(&format!("reg-{c}"), &format!("c{c}"), true, "0"),
                None,
                None,
            )
            .await
            .expect("registration");
        assert_eq!(reg.outcome, SubmitStatus::Accepted);
    }
    let mut tasks = Vec::new();
    for t in 0..64 {
        let engine = Arc::clone(engine);
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for j in 0..2 {
                let (instance, case) = (format!("f-{t}-{j}"), format!("c{}", (t + j) % CASES));
                let value = format!("{t}.{j}");
                let out = engine
                    .submit(form(&instance, &case, false, &value), None, None)
                    .await
                    .expect("submit");
                assert_eq!(out.outcome, SubmitStatus::Accepted, "{out:?}");
                mine.push((out.position, instance, case, value));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort();
    all
}

/// What a storm must leave: every form once, at the position it was answered with; each case
/// holding the value of its last form in received order; the replica entry for entry the
/// upstream's, and its projections equal to a replay of it.
async fn check_storm(engine: &Engine, up: &Upstream, forms: &[(Position, String, String, String)]) {
    assert_eq!(forms.len(), 128);
    let head = up.log.durable_head();
    assert_eq!(engine.pull().await.expect("pull"), head);
    let mut seen = std::collections::HashSet::new();
    for (position, instance, _, _) in forms {
        assert!(seen.insert(*position), "two forms answered with {position}");
        let stored = engine
            .log()
            .read_at(*position)
            .expect("read")
            .expect("event");
        match stored.event {
            Event::FormAcceptedV1(accepted) => {
                assert_eq!(accepted.form.form_id.as_str(), instance, "at {position}");
            }
            other => panic!("{instance} answered with {position}, which holds {other:?}"),
        }
    }
    for c in 0..CASES {
        let case = format!("c{c}");
        let last = forms
            .iter()
            .filter(|f| f.2 == case)
            .max_by_key(|f| f.0)
            .map(|f| f.3.clone());
        let stored = engine
            .projections()
            .case(&CaseId::from(case.as_str()))
            .expect("read")
            .expect("case");
        assert_eq!(stored.properties.get("visit"), last.as_ref(), "{case}");
    }
    assert_eq!(
        engine.log().verify(Position(1)).expect("verify").head_hash,
        up.log.verify(Position(1)).expect("verify").head_hash
    );
    let differences = engine.verify(&mut |_, _| {}).expect("verify projections");
    assert!(differences.is_empty(), "{differences:?}");
}

// Issue 11 (the replica's write path): while a group is appended upstream, the next one is
// decided on the projections plus the group in flight, and its sealed batch is written instead
// of folding the copy again; a storm through it answers as a replay of the log (R-seed: forms
// on shared cases, received order wins).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_group_is_decided_while_one_is_appended_and_answers_as_a_replay() {
    let up = upstream();
    let dir = tempfile::tempdir().expect("tmp");
    let engine = Arc::new(
        Engine::open_replica(
            dir.path(),
            &"d".into(),
            EngineConfig::default(),
            Slow::over(&up, 1, 0, "u-other"),
        )
        .await
        .expect("open"),
    );
    let _follow = engine.follow();
    let forms = storm(&engine).await;
    assert!(
        engine.overlapped_groups() > 0,
        "no group was decided while another was appended"
    );
    assert_eq!(engine.refused_appends(), 0);
    assert_eq!(up.log.durable_head(), Position(1 + CASES as u64 + 128));
    check_storm(&engine, &up, &forms).await;
}

// Issue 11 ("a decision made on a stale position is retried against the new head, never
// appended"): another writer appends in the middle of a streak; the group it lands in, and
// the group decided on that one, are decided again on the new head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streak_refused_midway_decides_its_groups_again_on_the_new_head() {
    let up = upstream();
    let dir = tempfile::tempdir().expect("tmp");
    let race_at = 1 + CASES + 40;
    let engine = Arc::new(
        Engine::open_replica(
            dir.path(),
            &"d".into(),
            EngineConfig::default(),
            Slow::over(&up, 1, race_at, "u-other"),
        )
        .await
        .expect("open"),
    );
    let _follow = engine.follow();
    let forms = storm(&engine).await;
    assert!(engine.refused_appends() >= 1, "the race refused nothing");
    assert_eq!(
        up.log.durable_head(),
        Position(1 + CASES as u64 + 128 + 1),
        "every form once, and the other writer's user"
    );
    check_storm(&engine, &up, &forms).await;
}
