//! Time travel (issue 9 §2): every as-of query answers what a replay of the log up to that
//! position answers, on random streams of commands (memberships, sharing flags, forms, edits,
//! archives), before and after a bulk replay; and the seed's stories looked at back in time.

use caseledger::domain::{CaseId, Position, RecordedEvent};
use caseledger::eventlog::{AppendRequest, Expected, SledLog};
use caseledger::projections::{CaseAt, Projections};
use caseledger::{view, AsOf, Engine, EngineConfig, EngineError};
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::replay::{apply, step, CASES, GROUPS, USERS};
use crate::support;

fn ids(cases: Vec<caseledger::domain::Case>) -> Vec<Value> {
    cases.iter().map(view::case_json).collect()
}

/// Everything a query can say, read from a store at its head.
fn at_head(p: &Projections) -> Vec<Value> {
    let mut out = Vec::new();
    for c in CASES {
        let id = CaseId::new(c);
        let case = p.case(&id).expect("case");
        let deleted = p.is_deleted(&id).expect("deleted");
        out.push(json!([case.as_ref().map(view::case_json), deleted]));
        out.push(json!(p.history(&id).expect("history")));
    }
    for u in USERS {
        for closed in [false, true] {
            out.push(Value::Array(ids(p
                .cases_for_user(u, closed)
                .expect("list"))));
        }
    }
    for o in USERS.iter().chain(GROUPS.iter()) {
        out.push(Value::Array(ids(p.cases_by_owner(o, true).expect("owner"))));
    }
    out.push(json!(p
        .groups(None)
        .iter()
        .map(view::group_json)
        .collect::<Vec<_>>()));
    out.push(json!(p
        .diagnostics()
        .expect("diagnostics")
        .iter()
        .map(view::diagnostic_json)
        .collect::<Vec<_>>()));
    out
}

/// The same, asked of a store as of position `at`.
fn as_of(p: &Projections, at: Position) -> Vec<Value> {
    let mut out = Vec::new();
    for c in CASES {
        let id = CaseId::new(c);
        let (case, deleted) = match p.case_at(&id, at).expect("case_at") {
            CaseAt::Exists(case) => (Some(view::case_json(&case)), false),
            CaseAt::Deleted { .. } => (None, true),
            CaseAt::NotYet => (None, false),
        };
        out.push(json!([case, deleted]));
        let history: Vec<Position> = p
            .case_versions(&id, at)
            .expect("versions")
            .into_iter()
            .map(|(q, _)| q)
            .collect();
        out.push(json!(history));
    }
    for u in USERS {
        for closed in [false, true] {
            out.push(Value::Array(ids(p
                .cases_for_user_at(u, closed, at)
                .expect("list at"))));
        }
    }
    for o in USERS.iter().chain(GROUPS.iter()) {
        out.push(Value::Array(ids(p
            .cases_by_owner_at(o, true, at)
            .expect("owner at"))));
    }
    out.push(json!(p
        .groups_at(None, at)
        .expect("groups at")
        .iter()
        .map(view::group_json)
        .collect::<Vec<_>>()));
    out.push(json!(p
        .diagnostics_at(at)
        .expect("diagnostics at")
        .iter()
        .map(view::diagnostic_json)
        .collect::<Vec<_>>()));
    out
}

/// A store of its own that is fed the log one event at a time, folding each as it comes: the
/// "replay of the log up to p" that as-of(p) must equal.
struct Prefix {
    _dir: tempfile::TempDir,
    log: SledLog,
    projections: Projections,
}

impl Prefix {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let log = SledLog::open(&db, &"p".into(), Default::default()).expect("log");
        let projections = Projections::open(&db, &"p".into()).expect("projections");
        let reader_log = log.clone();
        projections.set_log_reader(std::sync::Arc::new(move |p: Position| {
            match reader_log.iter_from(p).next() {
                Some(Ok(e)) if e.position == p => Ok(Some(e)),
                Some(Ok(_)) | None => Ok(None),
                Some(Err(e)) => Err(e),
            }
        }));
        Prefix {
            _dir: dir,
            log,
            projections,
        }
    }

    fn push(&self, e: &RecordedEvent) {
        let req = AppendRequest {
            expected: Expected::Any,
            idempotency_key: None,
            command_id: e.command_id.clone(),
            recorded_at: e.recorded_at,
            events: vec![e.event.clone()],
        };
        for outcome in self.log.write_group(std::iter::once(&req)).expect("write") {
            outcome.expect("append");
        }
        self.projections
            .catch_up(std::iter::once(Ok(e.clone())), 1)
            .expect("fold");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Issue 9 §2: as-of(p) == replay of the log up to p, for every p, with the rows written by
    /// the live fold and again with those written by a bulk replay.
    #[test]
    fn as_of_equals_prefix_replay(steps in prop::collection::vec(step(), 1..30)) {
        let rt = support::rt();
        let dir = tempfile::tempdir().expect("tmp");
        let config = EngineConfig {
            replay_sort_budget: 2048,
            ..EngineConfig::default()
        };
        let engine = Engine::open(dir.path(), &"p".into(), config).expect("open");
        apply(&engine, &rt, &steps);
        let events: Vec<RecordedEvent> = engine
            .log()
            .iter_from(Position(1))
            .collect::<Result<_, _>>()
            .expect("log");
        let prefix = Prefix::new();
        let mut expected = Vec::with_capacity(events.len());
        for e in &events {
            prefix.push(e);
            let want = at_head(&prefix.projections);
            prop_assert_eq!(
                &as_of(engine.projections(), e.position),
                &want,
                "live fold's rows at {}", e.position
            );
            expected.push(want);
        }
        engine.replay(&mut |_, _| {}).expect("replay");
        for (e, want) in events.iter().zip(&expected) {
            prop_assert_eq!(
                &as_of(engine.projections(), e.position),
                want,
                "bulk replay's rows at {}", e.position
            );
        }
    }
}

/// A point outside the log is an error, not an empty answer (issue 9 §2).
#[test]
fn positions_beyond_the_head_and_times_before_the_first_event_are_refused() {
    let w = support::World::empty();
    w.user("u-david", "david");
    let head = w.engine.projections().checkpoint();
    assert_eq!(w.engine.resolve(AsOf::Head).expect("head"), head);
    assert_eq!(w.engine.resolve(AsOf::Position(head)).expect("head"), head);
    for bad in [Position(0), head.next()] {
        assert!(matches!(
            w.engine.resolve(AsOf::Position(bad)),
            Err(EngineError::OutOfRange(_))
        ));
    }
    let first = w
        .engine
        .log()
        .iter_from(Position(1))
        .next()
        .expect("one event")
        .expect("read")
        .recorded_at;
    assert!(matches!(
        w.engine
            .resolve(AsOf::Time(caseledger::domain::Timestamp(first.0 - 1))),
        Err(EngineError::OutOfRange(_))
    ));
    assert_eq!(w.engine.resolve(AsOf::Time(first)).expect("at"), head);
}
