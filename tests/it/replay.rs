//! Replay == live (I3), replay twice == once, and a restart catches up: properties over random
//! command streams (users, groups, memberships, flags, apps and forms with random case blocks).

use caseledger::demo::{form, Block};
use caseledger::domain::{AppId, Command, GroupId, UserId};
use caseledger::projections::IndexedQuery;
use caseledger::{view, Engine, EngineConfig, Request};
use proptest::prelude::*;
use serde_json::Value;

use crate::support;

pub(crate) const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];
pub(crate) const GROUPS: [&str; 2] = ["g0", "g1"];
pub(crate) const CASES: [&str; 5] = ["c0", "c1", "c2", "c3", "c4"];

#[derive(Debug, Clone)]
pub(crate) enum Step {
    Join(usize, usize),
    Leave(usize, usize),
    GroupSharing(usize, bool),
    AppSharing(bool),
    Form {
        user: usize,
        blocks: Vec<(usize, u8, u8)>,
    },
    Archive(usize, bool),
    /// Resubmit an earlier form's id with other content (R54 edit).
    Edit(usize, usize),
}

pub(crate) fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..4usize, 0..2usize).prop_map(|(u, g)| Step::Join(u, g)),
        (0..4usize, 0..2usize).prop_map(|(u, g)| Step::Leave(u, g)),
        (0..2usize, any::<bool>()).prop_map(|(g, on)| Step::GroupSharing(g, on)),
        any::<bool>().prop_map(Step::AppSharing),
        (
            0..4usize,
            prop::collection::vec((0..5usize, 0..4u8, 0..28u8), 1..4)
        )
            .prop_map(|(user, blocks)| Step::Form { user, blocks }),
        (0..30usize, any::<bool>()).prop_map(|(n, on)| Step::Archive(n, on)),
        (0..30usize, 0..5usize).prop_map(|(n, c)| Step::Edit(n, c)),
    ]
}

pub(crate) fn apply(engine: &Engine, rt: &tokio::runtime::Runtime, steps: &[Step]) {
    let mut setup = Vec::new();
    for u in USERS {
        setup.push(Command::CreateUser {
            id: UserId::new(u),
            username: u.into(),
        });
    }
    for g in GROUPS {
        setup.push(Command::CreateGroup {
            id: GroupId::new(g),
            name: g.into(),
            case_sharing: true,
        });
    }
    setup.push(Command::CreateApp {
        id: AppId::new("app"),
        name: "app".into(),
        case_sharing: true,
        case_types: vec!["t0".into()],
    });
    for c in setup {
        rt.block_on(engine.execute(Request::new(c))).expect("setup");
    }
    for (n, s) in steps.iter().enumerate() {
        let cmd = match s {
            Step::Join(u, g) => Command::AddMember {
                group: GroupId::new(GROUPS[*g]),
                user: UserId::new(USERS[*u]),
            },
            Step::Leave(u, g) => Command::RemoveMember {
                group: GroupId::new(GROUPS[*g]),
                user: UserId::new(USERS[*u]),
            },
            Step::GroupSharing(g, on) => Command::SetGroupCaseSharing {
                group: GroupId::new(GROUPS[*g]),
                on: *on,
            },
            Step::AppSharing(on) => Command::SetAppCaseSharing {
                app: AppId::new("app"),
                on: *on,
            },
            Step::Form { user, blocks } => {
                let dates: Vec<String> = blocks
                    .iter()
                    .map(|(_, _, d)| format!("2026-03-{:02}T10:00:00Z", d + 1))
                    .collect();
                let blocks: Vec<Block<'_>> = blocks
                    .iter()
                    .zip(&dates)
                    .map(|((c, kind, _), date)| Block {
                        case_id: CASES[*c],
                        user: USERS[*user],
                        date,
                        create: (*kind == 0).then_some(("t0", "name", None)),
                        update: if *kind == 1 {
                            &[("p", "v1")]
                        } else if *kind == 3 {
                            &[("p", "v3")]
                        } else {
                            &[]
                        },
                        close: *kind == 2,
                    })
                    .collect();
                let xml = form(&format!("f{n}"), USERS[*user], &blocks);
                let sub = engine.prepare_submission(xml, Some(AppId::new("app")));
                Command::SubmitForm(Box::new(sub))
            }
            Step::Archive(k, true) => Command::ArchiveForm {
                form: format!("f{k}").as_str().into(),
            },
            Step::Archive(k, false) => Command::UnarchiveForm {
                form: format!("f{k}").as_str().into(),
            },
            Step::Edit(k, c) => {
                let xml = form(
                    &format!("f{k}"),
                    USERS[0],
                    &[Block {
                        case_id: CASES[*c],
                        user: USERS[0],
                        date: "2026-03-15T10:00:00Z",
                        create: None,
                        update: &[("edited", "yes")],
                        close: false,
                    }],
                );
                Command::SubmitForm(Box::new(
                    engine.prepare_submission(xml, Some(AppId::new("app"))),
                ))
            }
        };
        // Refused commands (e.g. leaving a group one is not in) append nothing; that is fine.
        let _ = rt.block_on(engine.execute(Request::new(cmd)));
    }
}

fn snapshot(engine: &Engine) -> Vec<Value> {
    let p = engine.projections();
    let mut out = Vec::new();
    for c in CASES {
        out.push(
            p.case(&c.into())
                .expect("read")
                .map_or(Value::Null, |c| view::case_json(&c)),
        );
        let history: Vec<u64> = p
            .history(&c.into())
            .expect("history")
            .iter()
            .map(|p| p.0)
            .collect();
        out.push(serde_json::json!(history));
        out.push(serde_json::json!(p.is_deleted(&c.into()).expect("deleted")));
        let indexed_by: Vec<String> = p
            .indexed_by(&c.into())
            .expect("reverse index")
            .into_iter()
            .map(|(id, ext)| format!("{}:{ext}", id.0))
            .collect();
        out.push(serde_json::json!(indexed_by));
    }
    // Forms f0..f29 as the forms projection knows them (status, version in force, cases).
    for n in 0..30 {
        let entry = p.form(&format!("f{n}").as_str().into()).expect("form");
        out.push(Value::String(format!("{entry:?}")));
    }
    for u in USERS {
        let ids: Vec<String> = p
            .cases_for_user(u, true)
            .expect("list")
            .into_iter()
            .map(|c| c.case_id.0)
            .collect();
        out.push(serde_json::json!(ids));
    }
    out.push(Value::Array(
        p.diagnostics()
            .expect("diags")
            .iter()
            .map(view::diagnostic_json)
            .collect(),
    ));
    out.push(Value::Array(
        p.groups(None).iter().map(view::group_json).collect(),
    ));
    // The data APIs' indexes: ids, places and `indexed_on` values (issue 10).
    let all = IndexedQuery {
        limit: usize::MAX,
        include_archived: true,
        ..IndexedQuery::default()
    };
    let cases = p.cases_by_indexed_on(&all).expect("cases by indexed_on");
    let forms = p.forms_by_indexed_on(&all).expect("forms by indexed_on");
    out.push(serde_json::json!([
        cases.total,
        cases
            .items
            .iter()
            .map(|i| format!("{}@{}:{}", i.item.case_id.0, i.position.0, i.indexed_on))
            .collect::<Vec<_>>(),
        forms.total,
        forms
            .items
            .iter()
            .map(|i| format!("{}@{}:{}", i.item.0 .0, i.position.0, i.indexed_on))
            .collect::<Vec<_>>(),
    ]));
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// I3: replay == live; replaying twice == once; reopening (catch-up) == live. The replay's
    /// bulk rebuild gets a sort budget of a few records, so its sorters spill and merge runs.
    #[test]
    fn replay_equals_live(steps in prop::collection::vec(step(), 1..30)) {
        let rt = support::rt();
        let dir = tempfile::tempdir().expect("tmp");
        let live = {
            let config = EngineConfig {
                replay_chunk: 7,
                replay_sort_budget: 2048,
                ..EngineConfig::default()
            };
            let engine = Engine::open(dir.path(), &"p".into(), config).expect("open");
            apply(&engine, &rt, &steps);
            let live = snapshot(&engine);
            engine.replay(&mut |_, _| {}).expect("replay");
            prop_assert_eq!(&snapshot(&engine), &live);
            engine.replay(&mut |_, _| {}).expect("replay again");
            prop_assert_eq!(&snapshot(&engine), &live);
            let scratch = dir.path().join("replay-scratch");
            prop_assert!(!scratch.exists(), "replay left its scratch directory behind");
            live
        };
        let reopened = Engine::open(dir.path(), &"p".into(), EngineConfig::default()).expect("reopen");
        prop_assert_eq!(snapshot(&reopened), live);
    }
}

/// I2, I3: a store whose projections have folded nothing (deleted trees, a new layout) is
/// rebuilt on open: in bulk above `bulk_catch_up_from` events, by the chunked fold below it, and
/// both give the answers of the store that wrote the log.
#[test]
fn projections_folded_from_nothing_on_open_equal_the_writers() {
    let steps = vec![
        Step::Join(0, 0),
        Step::Join(1, 0),
        Step::Join(2, 1),
        Step::Form {
            user: 0,
            blocks: vec![(0, 0, 1), (1, 0, 2)],
        },
        Step::Form {
            user: 1,
            blocks: vec![(0, 1, 3), (2, 0, 4)],
        },
        Step::Form {
            user: 2,
            blocks: vec![(3, 0, 5)],
        },
        Step::Form {
            user: 0,
            blocks: vec![(1, 2, 6), (0, 3, 7)],
        },
        Step::Edit(4, 2),
        Step::Archive(3, true),
        Step::Form {
            user: 1,
            blocks: vec![(4, 0, 8), (1, 1, 9)],
        },
        Step::Archive(3, false),
        Step::Leave(2, 1),
        Step::Form {
            user: 2,
            blocks: vec![(3, 1, 10)],
        },
    ];
    let rt = support::rt();
    let writer_dir = tempfile::tempdir().expect("tmp");
    let (expected, events) = {
        let engine =
            Engine::open(writer_dir.path(), &"p".into(), EngineConfig::default()).expect("open");
        apply(&engine, &rt, &steps);
        // With their raw submissions, to be appended to the other logs below.
        let log = engine.log();
        let events: Vec<_> = log
            .iter_from(caseledger::domain::Position(1))
            .map(|e| log.with_raw(e?))
            .collect::<Result<_, _>>()
            .expect("log");
        (snapshot(&engine), events)
    };
    assert!(events.len() > 20, "the steps write a real log");
    for (bulk_from, bulk) in [(1, true), (u64::MAX, false)] {
        // The same log, written straight to a store with no projections at all.
        let dir = tempfile::tempdir().expect("tmp");
        {
            let db = sled::open(dir.path()).expect("sled");
            let log = caseledger::eventlog::SledLog::open(&db, &"p".into(), Default::default())
                .expect("log");
            let appends: Vec<_> = events
                .iter()
                .map(|e| caseledger::eventlog::AppendRequest {
                    expected: caseledger::eventlog::Expected::Any,
                    idempotency_key: None,
                    command_id: e.command_id.clone(),
                    recorded_at: e.recorded_at,
                    events: vec![e.event.clone()],
                })
                .collect();
            for outcome in log.write_group(appends.iter()).expect("write") {
                outcome.expect("append");
            }
            log.flush_blocking().expect("flush");
        }
        let config = EngineConfig {
            bulk_catch_up_from: bulk_from,
            ..EngineConfig::default()
        };
        let engine = Engine::open(dir.path(), &"p".into(), config).expect("open");
        // A bulk rebuild installs a new generation; the chunked fold keeps the first one.
        assert_eq!(
            engine.projections().generation_id() > 1,
            bulk,
            "bulk from {bulk_from}"
        );
        assert_eq!(snapshot(&engine), expected, "bulk from {bulk_from}");
    }
}

/// R54, R57, I3: a new version of an archived form stays archived, so the cases it names only in
/// that version are deleted; the bulk rebuild must know the flag even for a case the archive
/// itself never touched (found by `replay_equals_live`).
#[test]
fn an_edit_of_an_archived_form_keeps_it_archived_in_a_replay() {
    // Steps are numbered: the form of step 16 reuses the id the edit of step 2 submitted.
    let mut steps = vec![Step::Join(0, 0); 17];
    steps[2] = Step::Edit(16, 0);
    steps[13] = Step::Archive(16, true);
    steps[16] = Step::Form {
        user: 0,
        blocks: vec![(2, 1, 2), (1, 2, 12)],
    };
    let rt = support::rt();
    let dir = tempfile::tempdir().expect("tmp");
    let engine = Engine::open(dir.path(), &"p".into(), EngineConfig::default()).expect("open");
    apply(&engine, &rt, &steps);
    let p = engine.projections();
    for c in ["c0", "c1", "c2"] {
        assert!(p.case(&c.into()).expect("read").is_none(), "{c}");
        assert!(p.is_deleted(&c.into()).expect("read"), "{c}");
    }
    let live = snapshot(&engine);
    engine.replay(&mut |_, _| {}).expect("replay");
    assert_eq!(snapshot(&engine), live);
}
