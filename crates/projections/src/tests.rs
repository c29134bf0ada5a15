//! Fold tests over hand-built events: order, checkpoint, owner index, generations.

use domain::{
    Actions, BlockApplied, CommandId, Create, Event, FormAcceptedV1, FormRecord, GroupCreatedV1,
    Position, RecordedEvent, Timestamp, UserCreatedV1,
};

use super::*;

fn db() -> (tempfile::TempDir, sled::Db) {
    let dir = tempfile::tempdir().expect("tmp");
    let db = sled::open(dir.path()).expect("sled");
    (dir, db)
}

fn rec(p: u64, event: Event) -> RecordedEvent {
    RecordedEvent {
        position: Position(p),
        recorded_at: Timestamp(p as i64),
        command_id: CommandId::new(format!("cmd{p}")),
        event,
    }
}

fn accepted(
    form: &str,
    case: &str,
    owner: Option<&str>,
    update: &[(&str, &str)],
    close: bool,
) -> Event {
    Event::FormAcceptedV1(FormAcceptedV1 {
        form: FormRecord {
            form_id: form.into(),
            xmlns: "x".into(),
            app_id: None,
            user_id: Some("u1".into()),
            content_hash: [0; 32],
            raw: b"<data/>".to_vec(),
        },
        blocks: vec![BlockApplied {
            case_id: case.into(),
            date: Timestamp(10),
            user: "u1".into(),
            actions: Actions {
                create: owner.map(|o| Create {
                    case_type: "t".into(),
                    case_name: "n".into(),
                    owner_id: Some(o.into()),
                    ..Create::default()
                }),
                update: update
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
                close,
                ..Actions::default()
            },
        }],
    })
}

fn ids(cases: Vec<Case>) -> Vec<String> {
    cases.into_iter().map(|c| c.case_id.0).collect()
}

#[test]
fn i3_events_out_of_position_order_are_refused() {
    let (_d, db) = db();
    let p = Projections::open(&db, &"d".into()).expect("open");
    let mut pending = p.pending();
    let err = pending.apply(&rec(2, accepted("f", "c", Some("u1"), &[], false)));
    assert!(matches!(
        err,
        Err(ProjectionError::OutOfOrder {
            expected: Position(1),
            got: Position(2)
        })
    ));
}

#[test]
fn i4_uncommitted_folds_are_invisible_and_a_commit_moves_state_and_checkpoint_together() {
    let (_d, db) = db();
    let p = Projections::open(&db, &"d".into()).expect("open");
    let mut pending = p.pending();
    pending
        .apply(&rec(
            1,
            accepted("f1", "c1", Some("u1"), &[("a", "1")], false),
        ))
        .expect("apply");
    assert_eq!(p.checkpoint(), Position(0));
    assert!(p.case(&"c1".into()).expect("read").is_none());
    pending.commit().expect("commit");
    assert_eq!(p.checkpoint(), Position(1));
    assert_eq!(
        p.case(&"c1".into())
            .expect("read")
            .map(|c| c.properties["a"].clone()),
        Some("1".into())
    );
    drop(p);
    let reopened = Projections::open(&db, &"d".into()).expect("reopen");
    assert_eq!(reopened.checkpoint(), Position(1));
}

#[test]
fn r44_owner_index_follows_reassignment_and_closing() {
    let (_d, db) = db();
    let p = Projections::open(&db, &"d".into()).expect("open");
    let events = [
        rec(
            1,
            Event::UserCreatedV1(UserCreatedV1 {
                user_id: "u1".into(),
                username: "u1".into(),
            }),
        ),
        rec(
            2,
            Event::GroupCreatedV1(GroupCreatedV1 {
                group_id: "g1".into(),
                name: "g".into(),
                case_sharing: true,
            }),
        ),
        rec(3, accepted("f1", "c1", Some("g1"), &[], false)),
        rec(4, accepted("f2", "c2", Some("g1"), &[], false)),
        rec(5, accepted("f3", "c1", None, &[("owner_id", "u1")], false)),
        rec(6, accepted("f4", "c2", None, &[], true)),
    ];
    p.catch_up(events.into_iter().map(Ok), 2).expect("catch up");
    assert_eq!(
        ids(p.cases_by_owner("g1", false).expect("g1")),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(p.cases_by_owner("g1", true).expect("g1 all")),
        vec!["c2"]
    );
    assert_eq!(ids(p.cases_by_owner("u1", false).expect("u1")), vec!["c1"]);
    assert_eq!(
        p.history(&"c1".into()).expect("history"),
        vec![Position(3), Position(5)]
    );
}

#[test]
fn a_rebuild_answers_from_the_old_generation_until_installed() {
    let (_d, db) = db();
    let p = Projections::open(&db, &"d".into()).expect("open");
    let events = vec![rec(1, accepted("f1", "c1", Some("u1"), &[], false))];
    p.catch_up(events.clone().into_iter().map(Ok), 10)
        .expect("catch up");
    let mut rebuild = p.begin_rebuild().expect("begin");
    rebuild
        .feed(events.into_iter().map(Ok), 10, &mut |_| {})
        .expect("feed");
    assert!(
        p.case(&"c1".into()).expect("read").is_some(),
        "old generation still answers"
    );
    rebuild.install().expect("install");
    assert!(p.case(&"c1".into()).expect("read").is_some());
    assert_eq!(p.checkpoint(), Position(1));
    let names: Vec<_> = db
        .tree_names()
        .into_iter()
        .filter(|n| n.starts_with(b"proj/d/"))
        .collect();
    assert_eq!(
        names,
        vec![sled::IVec::from("proj/d/2")],
        "the old generation is dropped"
    );
    drop(p);
    assert_eq!(
        Projections::open(&db, &"d".into())
            .expect("reopen")
            .checkpoint(),
        Position(1)
    );
}

#[test]
fn r57_archive_deletes_a_case_keeping_its_history_and_unarchive_revives_it() {
    let (_d, db) = db();
    let p = Projections::open(&db, &"d".into()).expect("open");
    let events = vec![
        rec(1, accepted("f1", "c1", Some("u1"), &[("a", "1")], false)),
        rec(
            2,
            Event::FormArchivedV1(domain::FormArchiveV1 {
                form_id: "f1".into(),
            }),
        ),
        rec(
            3,
            Event::FormUnarchivedV1(domain::FormArchiveV1 {
                form_id: "f1".into(),
            }),
        ),
    ];
    let log = events.clone();
    p.set_log_reader(std::sync::Arc::new(move |pos: Position| {
        Ok(log.iter().find(|e| e.position == pos).cloned())
    }));
    p.catch_up(events[..2].iter().cloned().map(Ok), 10)
        .expect("archive");
    assert!(
        p.case(&"c1".into()).expect("read").is_none(),
        "R57: no live form left"
    );
    assert!(p.is_deleted(&"c1".into()).expect("tombstone"));
    assert!(ids(p.cases_by_owner("u1", true).expect("owner")).is_empty());
    assert_eq!(
        p.history(&"c1".into()).expect("history"),
        vec![Position(1), Position(2)]
    );
    p.catch_up(events[2..].iter().cloned().map(Ok), 10)
        .expect("unarchive");
    let c = p.case(&"c1".into()).expect("read").expect("revived");
    assert_eq!(c.properties["a"], "1");
    assert!(!p.is_deleted(&"c1".into()).expect("tombstone"));
    assert_eq!(
        ids(p.cases_by_owner("u1", false).expect("owner")),
        vec!["c1"]
    );
    assert_eq!(
        p.history(&"c1".into()).expect("history"),
        vec![Position(1), Position(2), Position(3)]
    );
}
