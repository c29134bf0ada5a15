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
            raw: b"<data/>".to_vec().into(),
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
    // The retired generation is deleted in the background.
    p.wait_reclaimed();
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

// A store written before the rules record existed holds only the layout record: it reads as this
// layout with rules 1, is not damaged, and gets the rules record.
#[test]
fn a_store_without_a_rules_record_reads_as_rules_1_and_is_not_damaged() {
    let (_d, db) = db();
    let p = Projections::open(&db, &"d".into()).expect("open");
    p.catch_up(
        [rec(1, accepted("f1", "c1", Some("u1"), &[], false))].map(Ok),
        10,
    )
    .expect("catch up");
    drop(p);
    let meta = db.open_tree("projmeta/d").expect("meta");
    meta.remove(version::RULES_KEY).expect("remove");
    let p = Projections::open(&db, &"d".into()).expect("reopen");
    assert_eq!(p.damage(), &[]);
    let before_split = ProjectionVersion {
        layout: LAYOUT_VERSION,
        rules: 1,
    };
    assert_eq!(p.active_version(), before_split);
    assert_eq!(
        meta.get(version::RULES_KEY).expect("read"),
        Some(sled::IVec::from(&1u64.to_be_bytes()[..]))
    );
    assert_eq!(p.generation_id(), 1);
    assert!(p.case(&"c1".into()).expect("read").is_some());
}

// Other rules are not damage: the generation opens and answers, and an installed rebuild carries
// this code's rules, in the store and in memory.
#[test]
fn other_rules_answer_until_a_rebuild_installs_this_codes_rules() {
    let (_d, db) = db();
    let p = Projections::open(&db, &"d".into()).expect("open");
    let events = vec![rec(1, accepted("f1", "c1", Some("u1"), &[], false))];
    p.catch_up(events.clone().into_iter().map(Ok), 10)
        .expect("catch up");
    let older = ProjectionVersion {
        layout: LAYOUT_VERSION,
        rules: RULES_VERSION - 1,
    };
    p.set_stored_version(older).expect("set version");
    drop(p);
    let p = Projections::open(&db, &"d".into()).expect("reopen");
    assert_eq!(p.damage(), &[]);
    assert_eq!(p.active_version(), older);
    assert_eq!(p.stored_version(), Some(older));
    assert!(p.case(&"c1".into()).expect("read").is_some());
    let mut rebuild = p.begin_rebuild().expect("begin");
    rebuild
        .feed(events.into_iter().map(Ok), 10, &mut |_| {})
        .expect("feed");
    assert_eq!(p.active_version(), older, "not installed yet");
    rebuild.install().expect("install");
    assert_eq!(p.active_version(), ProjectionVersion::CURRENT);
    assert_eq!(p.stored_version(), Some(ProjectionVersion::CURRENT));
    assert_eq!(p.generation_id(), 2);
}

// Another layout does not read: it is damage, and the caller rebuilds before answering.
#[test]
fn another_layout_is_damage() {
    let (_d, db) = db();
    let p = Projections::open(&db, &"d".into()).expect("open");
    let newer = ProjectionVersion {
        layout: LAYOUT_VERSION + 1,
        rules: RULES_VERSION,
    };
    p.set_stored_version(newer).expect("set version");
    drop(p);
    let p = Projections::open(&db, &"d".into()).expect("reopen");
    assert_eq!(
        p.damage(),
        &[Damage::Layout {
            stored: LAYOUT_VERSION + 1,
            current: LAYOUT_VERSION
        }]
    );
    assert_eq!(p.stored_version(), Some(newer), "nothing recorded over it");
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

mod sorter {
    use crate::sorter::{Record, Sorter};
    use crate::ProjectionError;

    fn record(key: &str, position: u64, seq: u32) -> Record {
        Record {
            key: key.as_bytes().to_vec(),
            position,
            seq,
            payload: format!("{key}@{position}.{seq}").into_bytes(),
        }
    }

    /// Records in a scrambled order that only a stable total order on (key, position, seq) sorts.
    fn scrambled() -> Vec<Record> {
        let mut out = Vec::new();
        for i in 0..500u64 {
            let key = format!("k{}", (i * 7919) % 37);
            out.push(record(&key, (i * 104_729) % 211, (i % 3) as u32));
        }
        out
    }

    #[test]
    fn spilled_runs_merge_into_the_same_order_as_an_in_memory_sort() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut expected = scrambled();
        expected.sort();
        for budget in [1, 300, 5_000, usize::MAX] {
            let mut sorter = Sorter::new(dir.path(), "t", budget);
            for r in scrambled() {
                sorter.push(r).expect("push");
            }
            let merge = sorter.finish().expect("finish");
            let spilled = merge.runs();
            let got: Vec<Record> = merge.collect::<Result<_, _>>().expect("merge");
            assert_eq!(got, expected, "budget {budget}");
            assert_eq!(
                spilled > 0,
                budget != usize::MAX,
                "budget {budget} spilled {spilled} runs"
            );
            // The merge removed its run files when it was dropped.
            let left = std::fs::read_dir(dir.path()).expect("dir").count();
            assert_eq!(left, 0, "budget {budget} left {left} run files");
        }
    }

    #[test]
    fn a_truncated_run_is_a_scratch_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut sorter = Sorter::new(dir.path(), "t", 1);
        for r in scrambled().into_iter().take(3) {
            sorter.push(r).expect("push");
        }
        let run = dir.path().join("t-0.run");
        let bytes = std::fs::read(&run).expect("run file");
        std::fs::write(&run, &bytes[..bytes.len() - 3]).expect("truncate");
        // The damaged record is met when the merge opens the run or while it reads on.
        let results: Vec<Result<Record, ProjectionError>> = match sorter.finish() {
            Ok(merge) => merge.collect(),
            Err(e) => vec![Err(e)],
        };
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(ProjectionError::Scratch { path, .. }) if path.ends_with("t-0.run"))),
            "{results:?}"
        );
    }
}
