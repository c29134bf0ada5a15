//! Concurrent groups decide as if one at a time.
//!
//! The engine decides a group while the previous group's projection batch is still being
//! written (it reads through that batch's overlay), and it reads a group's form entries and cases
//! before it takes the writer lock (dropping what a batch sealed since may have changed). Both are
//! invisible only if every decision sees every earlier one: here many tasks submit groups at once
//! that share form ids and cases, and the recorded outcomes are checked against the rules.

use std::collections::HashMap;
use std::sync::Arc;

use caseledger::demo::{form, Block};
use caseledger::domain::{AppId, Command, DiagnosticCode, Event, GroupId, UserId};
use caseledger::{Engine, EngineConfig, Request};

const TASKS: usize = 8;
const ROUNDS: usize = 24;
const CASES: [&str; 4] = ["c0", "c1", "c2", "c3"];
const DATE: &str = "2026-03-02T10:00:00Z";

fn update(id: &str, case: &str, key: &str, value: &str) -> Vec<u8> {
    form(
        id,
        "u1",
        &[Block {
            case_id: case,
            user: "u1",
            date: DATE,
            create: None,
            update: &[(key, value)],
            close: false,
        }],
    )
}

fn setup(engine: &Engine, rt: &tokio::runtime::Runtime) {
    let commands = vec![
        Command::CreateUser {
            id: UserId::new("u1"),
            username: "u1".into(),
        },
        Command::CreateGroup {
            id: GroupId::new("g1"),
            name: "g1".into(),
            case_sharing: true,
        },
        Command::AddMember {
            group: GroupId::new("g1"),
            user: UserId::new("u1"),
        },
        Command::CreateApp {
            id: AppId::new("app"),
            name: "app".into(),
            case_sharing: true,
            case_types: vec!["t".into()],
        },
    ];
    for c in commands {
        rt.block_on(engine.execute(Request::new(c))).expect("setup");
    }
    let blocks: Vec<Block<'_>> = CASES
        .iter()
        .map(|c| Block {
            case_id: c,
            user: "u1",
            date: DATE,
            create: Some(("t", "shared", None)),
            update: &[],
            close: false,
        })
        .collect();
    let sub = engine.prepare_submission(form("create", "u1", &blocks), Some(AppId::new("app")));
    rt.block_on(engine.execute(Request::new(Command::SubmitForm(Box::new(sub)))))
        .expect("create the cases");
}

#[test]
fn r53_r63_concurrent_groups_decide_as_if_one_at_a_time() {
    let dir = tempfile::tempdir().expect("tmp");
    let engine =
        Arc::new(Engine::open(dir.path(), &"c".into(), EngineConfig::default()).expect("open"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    setup(&engine, &rt);

    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let engine = Arc::clone(&engine);
            rt.spawn(async move {
                for r in 0..ROUNDS {
                    let case = CASES[(t + r) % CASES.len()];
                    let mut forms = vec![
                        // The same bytes from every task: one is accepted, the rest are
                        // duplicates (R53).
                        update(
                            &format!("dup-{r}"),
                            CASES[r % CASES.len()],
                            "dup",
                            &r.to_string(),
                        ),
                        update(&format!("t{t}-r{r}"), case, "x", &format!("{t}-{r}")),
                    ];
                    if t == 0 && r == ROUNDS / 2 {
                        forms.push(form(
                            "closer",
                            "u1",
                            &[Block {
                                case_id: "c1",
                                user: "u1",
                                date: DATE,
                                create: None,
                                update: &[],
                                close: true,
                            }],
                        ));
                    }
                    let requests = forms
                        .into_iter()
                        .map(|xml| {
                            let sub = engine.prepare_submission(xml, Some(AppId::new("app")));
                            Request::new(Command::SubmitForm(Box::new(sub)))
                        })
                        .collect();
                    for outcome in engine.execute_many(requests).await.expect("group") {
                        outcome.expect("submission");
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        rt.block_on(t).expect("task");
    }

    let events: Vec<_> = engine
        .log()
        .iter_from(caseledger::domain::Position(1))
        .collect::<Result<_, _>>()
        .expect("log");

    // R53: each dup-r accepted exactly once, every other copy a duplicate.
    let mut accepted: HashMap<String, usize> = HashMap::new();
    let mut duplicates: HashMap<String, usize> = HashMap::new();
    for ev in &events {
        match &ev.event {
            Event::FormAcceptedV1(f) => *accepted.entry(f.form.form_id.0.clone()).or_default() += 1,
            Event::FormDuplicateV1(f) => {
                *duplicates.entry(f.form.form_id.0.clone()).or_default() += 1;
            }
            Event::FormEditedV1(f) => panic!("{} recorded as an edit", f.form.form_id),
            _ => {}
        }
    }
    for r in 0..ROUNDS {
        let id = format!("dup-{r}");
        assert_eq!(accepted.get(&id), Some(&1), "{id} accepted");
        assert_eq!(duplicates.get(&id), Some(&(TASKS - 1)), "{id} duplicates");
    }

    // R63: every form that updated c1 after the close raised ClosedCaseUpdated; none before.
    let close = events
        .iter()
        .find_map(|ev| match &ev.event {
            Event::FormAcceptedV1(f) if f.form.form_id.0 == "closer" => Some(ev.position),
            _ => None,
        })
        .expect("the close was accepted");
    let mut updates_after = 0;
    for ev in &events {
        if let Event::FormAcceptedV1(f) = &ev.event {
            let touches_c1 = f.blocks.iter().any(|b| b.case_id.as_str() == "c1");
            if touches_c1 && ev.position > close && f.form.form_id.0 != "closer" {
                updates_after += 1;
            }
        }
    }
    let raised: Vec<_> = events
        .iter()
        .filter_map(|ev| match &ev.event {
            Event::DiagnosticRaisedV1(d)
                if d.diagnostic.code == DiagnosticCode::ClosedCaseUpdated =>
            {
                Some((ev.position, d.diagnostic.subject.clone()))
            }
            _ => None,
        })
        .collect();
    assert!(updates_after > 0, "the workload updates c1 after its close");
    assert_eq!(raised.len(), updates_after, "{raised:?}");
    assert!(raised
        .iter()
        .all(|(p, subject)| *p > close && subject == "c1"));

    // I3: what the concurrent writers left equals a replay of their log.
    let before: Vec<_> = CASES
        .iter()
        .map(|c| engine.projections().case(&(*c).into()).expect("case"))
        .collect();
    engine.replay(&mut |_, _| {}).expect("replay");
    let after: Vec<_> = CASES
        .iter()
        .map(|c| engine.projections().case(&(*c).into()).expect("case"))
        .collect();
    assert_eq!(before, after);
}
