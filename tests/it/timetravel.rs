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
            reader_log.read_at(p)
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
        // With their raw submissions, to be appended to the prefix's log.
        let log = engine.log();
        let events: Vec<RecordedEvent> = log
            .iter_from(Position(1))
            .map(|e| log.with_raw(e?))
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
        // The live fold's rows are the bulk rebuild's, byte for byte (replay --verify), and so
        // is every case's history.
        let differences = engine.verify(&mut |_, _| {}).expect("verify");
        prop_assert!(differences.is_empty(), "{:?}", differences);
        let histories = |engine: &Engine| -> Vec<Value> {
            CASES
                .iter()
                .map(|c| {
                    json!(engine
                        .projections()
                        .case_history(&CaseId::new(*c))
                        .expect("history"))
                })
                .collect()
        };
        let live_histories = histories(&engine);
        engine.replay(&mut |_, _| {}).expect("replay");
        prop_assert_eq!(histories(&engine), live_histories);
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

fn conformance_file(scenario: &str, file: &str) -> Vec<u8> {
    std::fs::read(support::conformance_dir().join(scenario).join(file)).expect("scenario file")
}

const MONICA: &str = "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10";

/// The seed's two nurses (FAQ 3): Maria and David both edit Monica offline; Maria's edit is made
/// later on her phone but received first. One conflict, on `risk`, shown three-way: base (unset),
/// theirs (Maria's, overwritten), mine (David's), result (received order wins, R70).
fn offline_nurses() -> support::World {
    let w = support::World::empty();
    w.user("u-david", "david");
    w.user("u-maria", "maria");
    w.group("g-team", "Kibera CHW team", &["u-david", "u-maria"]);
    w.app("app-anc", true, &["pregnancy"]);
    for f in ["01-register.xml", "02-maria-day4.xml", "03-david-day3.xml"] {
        let outcome = w.submit("app-anc", conformance_file("10-offline-received-order", f));
        assert_eq!(outcome.outcome, caseledger::SubmitStatus::Accepted, "{f}");
    }
    w
}

#[test]
fn seed_offline_nurses_make_one_conflict_shown_three_way() {
    let w = offline_nurses();
    let p = w.engine.projections();
    let all = p.conflicts(None).expect("conflicts");
    assert_eq!(all.len(), 1, "{all:#?}");
    let c = &all[0].conflict;
    assert_eq!((c.case_id.as_str(), c.property.as_str()), (MONICA, "risk"));
    assert_eq!(c.base, None, "registration did not set risk");
    assert_eq!(
        (c.theirs.value.as_str(), c.theirs.user.as_str()),
        ("low", "u-maria")
    );
    assert_eq!(
        (c.mine.value.as_str(), c.mine.user.as_str()),
        ("high", "u-david")
    );
    assert_eq!(c.result, "high", "received order wins (R70)");
    assert!(c.mine.phone_time < c.theirs.phone_time);
    assert!(c.base_position < c.theirs.position && c.theirs.position < c.mine.position);
    // The positions are the ones to time-travel to: each side's value is in force there.
    let risk_at = |at: Position| match p.case_at(&CaseId::new(MONICA), at).expect("at") {
        CaseAt::Exists(case) => case.properties.get("risk").cloned(),
        other => panic!("case missing at {at}: {other:?}"),
    };
    assert_eq!(risk_at(c.base_position), None);
    assert_eq!(risk_at(c.theirs.position).as_deref(), Some("low"));
    assert_eq!(risk_at(c.mine.position).as_deref(), Some("high"));
    // Filters: by case and by either side's user.
    assert_eq!(p.case_conflicts(&CaseId::new(MONICA)).expect("case"), all);
    assert_eq!(p.conflicts(Some("u-maria")).expect("maria"), all);
    assert!(p.conflicts(Some("u-ana")).expect("ana").is_empty());
}

/// Issue 10: a form sent with the phone's last sync token (`X-CommCareHQ-LastSyncToken`) is
/// judged by what that restore held. David restores, Maria then sets `risk`, and David, who
/// never synced her change, overwrites it from a phone whose clock is later than hers: the
/// clocks alone see no conflict; the token shows David had not seen Maria's value.
#[test]
fn a_sync_token_shows_the_change_a_phone_had_not_seen() {
    let (without, _) = late_overwrite(false);
    assert!(
        without.is_empty(),
        "without a token the phone clocks say David's change came after Maria's: {without:#?}"
    );
    let (found, base) = late_overwrite(true);
    assert_eq!(found.len(), 1, "{found:#?}");
    let c = &found[0].conflict;
    assert_eq!(c.property, "risk");
    assert_eq!(
        (c.theirs.value.as_str(), c.theirs.user.as_str()),
        ("low", "u-maria")
    );
    assert_eq!(
        (c.mine.value.as_str(), c.mine.user.as_str()),
        ("high", "u-david")
    );
    assert!(
        c.mine.phone_time > c.theirs.phone_time,
        "the clocks were in order"
    );
    assert!(
        base < c.theirs.position,
        "Maria's change came after David's restore"
    );
}

/// The offline nurses, with David's overwrite made on his phone after Maria's (so the clocks
/// are in order), sent with or without the token of the restore he made before her change.
/// Returns Monica's conflicts and the token's position.
fn late_overwrite(with_token: bool) -> (Vec<caseledger::projections::ConflictRow>, Position) {
    let w = support::World::empty();
    w.user("u-david", "david");
    w.user("u-maria", "maria");
    w.group("g-team", "Kibera CHW team", &["u-david", "u-maria"]);
    w.app("app-anc", true, &["pregnancy"]);
    let dir = "10-offline-received-order";
    w.submit("app-anc", conformance_file(dir, "01-register.xml"));
    let restored = caseledger::restore::restore(&w.engine, "u-david", None).expect("restore");
    let base = restored
        .token
        .split('-')
        .next()
        .and_then(|p| p.parse().ok())
        .map(Position)
        .expect("token position");
    w.submit("app-anc", conformance_file(dir, "02-maria-day4.xml"));
    // David's day-3 visit, made on day 5 on his phone: after Maria's phone time.
    let late = String::from_utf8(conformance_file(dir, "03-david-day3.xml"))
        .expect("utf-8")
        .replace(
            "2026-03-03T11:40:05.870+03:00",
            "2026-03-05T09:00:00.000+03:00",
        );
    let mut sub = w
        .engine
        .prepare_submission(late.into_bytes(), Some("app-anc".into()));
    sub.last_sync_token = with_token.then(|| restored.token.clone());
    let request = caseledger::Request::new(caseledger::domain::Command::SubmitForm(Box::new(sub)));
    w.rt.block_on(w.engine.execute(request)).expect("submit");
    let found = w
        .engine
        .projections()
        .case_conflicts(&CaseId::new(MONICA))
        .expect("conflicts");
    (found, base)
}

/// R35, R41, R44 looked at back in time: Maria sees the team's case while she is in the group,
/// not after she leaves; a query as of before the removal still shows it, with the membership
/// of then, and who-could-see says since when.
#[test]
fn a_users_case_list_before_and_after_a_membership_change() {
    let w = offline_nurses();
    let before = w.engine.projections().checkpoint();
    assert_eq!(w.sees("u-maria"), vec![MONICA.to_owned()]);
    w.cmd(caseledger::domain::Command::RemoveMember {
        group: "g-team".into(),
        user: "u-maria".into(),
    });
    let after = w.engine.projections().checkpoint();
    let p = w.engine.projections();
    let list = |at: Position| -> Vec<String> {
        p.cases_for_user_at("u-maria", false, at)
            .expect("list")
            .into_iter()
            .map(|c| c.case_id.0)
            .collect()
    };
    assert!(w.sees("u-maria").is_empty(), "R41: she no longer sees it");
    assert!(list(after).is_empty());
    assert_eq!(list(before), vec![MONICA.to_owned()]);
    let members_then = p.groups_at(None, before).expect("groups");
    assert_eq!(members_then[0].members, vec!["u-david", "u-maria"]);
    // Who could see Monica: both nurses then, only David now; since the case's creation.
    let created = p.history(&CaseId::new(MONICA)).expect("history")[0];
    let viewers = |at: Position| -> Vec<(String, Position)> {
        p.who_could_see(&CaseId::new(MONICA), at)
            .expect("who")
            .into_iter()
            .map(|v| (v.user, v.since))
            .collect()
    };
    assert_eq!(
        viewers(before),
        vec![
            ("u-david".to_owned(), created),
            ("u-maria".to_owned(), created)
        ]
    );
    assert_eq!(viewers(after), vec![("u-david".to_owned(), created)]);
    // She rejoins: her "since" restarts at the rejoin, David's does not move.
    w.add("g-team", "u-maria");
    let rejoined = w.engine.projections().checkpoint();
    assert_eq!(
        viewers(rejoined),
        vec![
            ("u-david".to_owned(), created),
            ("u-maria".to_owned(), rejoined)
        ]
    );
}

/// Issue 9 §3: every change, oldest first, with the form that caused it; an archive (R57) and an
/// edit (R54) show up with what they changed.
#[test]
fn case_history_lists_every_change_with_its_form() {
    use caseledger::projections::Change;
    let w = offline_nurses();
    let case = CaseId::new(MONICA);
    let history = w.engine.projections().case_history(&case).expect("history");
    let actions: Vec<&str> = history.iter().map(|e| e.action).collect();
    assert_eq!(actions, ["accepted", "accepted", "accepted"]);
    assert!(history.windows(2).all(|w| w[0].position < w[1].position));
    assert!(history[0].changes.contains(&Change::Created));
    assert!(history[0].changes.contains(&Change::Owner {
        old: String::new(),
        new: "g-team".into()
    }));
    assert_eq!(history[1].user.as_deref(), Some("u-maria"));
    assert_eq!(
        history[2].changes,
        vec![Change::Property {
            name: "risk".into(),
            old: Some("low".into()),
            new: Some("high".into())
        }]
    );
    // Archive David's form: risk goes back to Maria's value; unarchive: back to David's.
    let david = history[2].form_id.clone();
    w.cmd(caseledger::domain::Command::ArchiveForm {
        form: david.as_str().into(),
    });
    w.cmd(caseledger::domain::Command::UnarchiveForm {
        form: david.as_str().into(),
    });
    let history = w.engine.projections().case_history(&case).expect("history");
    let tail: Vec<(&str, &[Change])> = history[3..]
        .iter()
        .map(|e| (e.action, e.changes.as_slice()))
        .collect();
    let risk = |old: &str, new: &str| Change::Property {
        name: "risk".into(),
        old: Some(old.into()),
        new: Some(new.into()),
    };
    assert_eq!(tail.len(), 2);
    assert_eq!(tail[0].0, "archived");
    assert!(tail[0].1.contains(&risk("high", "low")), "{:?}", tail[0].1);
    assert_eq!(tail[1].0, "unarchived");
    assert!(tail[1].1.contains(&risk("low", "high")), "{:?}", tail[1].1);
    assert_eq!(history[3].form_id, david);
}
