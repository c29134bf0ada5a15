//! Upgrades (issue 9 §5): projections folded by other rules keep answering, and folding new
//! appends, while a rebuild by this build's rules is built beside them and swapped in; a crash
//! meanwhile leaves them active. (Another layout is rebuilt before the first answer:
//! `damage::projections_of_another_layout_are_rebuilt_before_the_first_answer`.)

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use caseledger::demo::{form, Block};
use caseledger::domain::{AppId, CaseId, Position};
use caseledger::projections::{ProjectionVersion, RULES_VERSION};
use caseledger::{Engine, UpgradeStatus};

use crate::damage::{answers, cli, open, text, write_store};
use crate::support::copy_dir;

/// Rules older than this build's, as a store written by an earlier build records them.
const OLDER: ProjectionVersion = ProjectionVersion {
    layout: ProjectionVersion::CURRENT.layout,
    rules: RULES_VERSION - 1,
};

/// Records older rules in the store in `dir`, as if an earlier build had folded it; returns the
/// answers and the generation id before.
fn fold_by_older_rules(dir: &Path) -> ((String, Vec<String>, usize, usize, usize), u64) {
    let engine = open(dir);
    let before = (answers(&engine), engine.projections().generation_id());
    engine
        .projections()
        .set_stored_version(OLDER)
        .expect("set version");
    before
}

/// Submits form `id`: creates `case` when `create`, else updates it with `n = id`.
fn submit(engine: &Engine, rt: &tokio::runtime::Runtime, id: &str, case: &str, create: bool) {
    let xml = form(
        id,
        "u1",
        &[Block {
            case_id: case,
            user: "u1",
            date: "2026-03-04T10:00:00Z",
            create: create.then_some(("t", "name", None)),
            update: &[("n", id)],
            close: false,
        }],
    );
    rt.block_on(engine.submit(xml, Some(AppId::new("a")), None))
        .expect("submit");
}

// A store folded by older rules answers from its generation as soon as it is open, with the same
// answers; the background upgrade installs a new generation by this build's rules whose answers
// equal a fresh replay, and the next open finds nothing to do.
#[test]
fn other_rules_answer_at_once_and_the_background_upgrade_installs_a_replay() {
    let dir = tempfile::tempdir().expect("tmp");
    write_store(dir.path(), 300, None);
    let (before, generation) = fold_by_older_rules(dir.path());
    let engine = Arc::new(open(dir.path()));
    assert_eq!(engine.repaired(), Vec::new());
    assert_eq!(engine.projections().generation_id(), generation);
    assert_eq!(engine.projections().generation_trees(), 1);
    assert_eq!(engine.projections().active_version(), OLDER);
    assert_eq!(
        engine.upgrade_status(),
        UpgradeStatus::Needed {
            stored: OLDER.rules,
            current: RULES_VERSION
        }
    );
    assert_eq!(answers(&engine), before);

    let upgrade = engine.upgrade_in_background().expect("spawn");
    // Writes go on meanwhile, each answered at once, whichever generation is active.
    let rt = crate::support::rt();
    let mut racing = Vec::new();
    // At least one write, even on a machine that finishes the rebuild before the first.
    while racing.is_empty() || (!upgrade.is_finished() && racing.len() < 400) {
        let case = format!("r{:04}", racing.len());
        submit(
            &engine,
            &rt,
            &format!("racing-{}", racing.len()),
            &case,
            true,
        );
        assert!(
            engine
                .projections()
                .case(&CaseId::new(case.as_str()))
                .expect("read")
                .is_some(),
            "{case} answered at once"
        );
        racing.push(case);
    }
    let stats = upgrade
        .join()
        .expect("upgrade thread")
        .expect("upgrade")
        .expect("an upgrade was needed");
    assert!(stats.events <= engine.log().written_head().0);
    assert!(engine.projections().generation_id() > generation);
    for case in &racing {
        let history = engine.projections().history(&CaseId::new(case.as_str()));
        assert_eq!(history.expect("history").len(), 1, "{case} once");
    }
    assert_eq!(engine.projections().generation_trees(), 1);
    assert_eq!(
        engine.projections().stored_version(),
        Some(ProjectionVersion::CURRENT)
    );
    assert_eq!(
        engine.upgrade_status(),
        UpgradeStatus::Done {
            stored: OLDER.rules,
            current: RULES_VERSION
        }
    );
    let (case, list, owned, diagnostics, events) = answers(&engine);
    assert_eq!((case, diagnostics), (before.0.clone(), before.3));
    assert_eq!(list.len(), before.1.len() + racing.len());
    assert_eq!(owned, before.2 + racing.len());
    assert_eq!(events, before.4 + racing.len());
    assert_eq!(engine.verify(&mut |_, _| {}).expect("verify"), Vec::new());
    assert!(engine.upgrade(&mut |_, _| {}).expect("upgrade").is_none());

    let upgraded = engine.projections().generation_id();
    drop(engine);
    let engine = open(dir.path());
    assert_eq!(engine.upgrade_status(), UpgradeStatus::Current);
    assert_eq!(engine.projections().generation_id(), upgraded);
}

// Commands appended while the upgrade builds the next generation are folded into the old one
// (which answers them at once) and into the new one, each exactly once. The upgrade is held at
// its first progress report (mid-scan of the bulk load), then at the first report of its
// catch-up without the writer lock (`head` past the bulk load's): what is appended there is
// folded by the last catch-up, under the lock. Nothing is appended after the swap, so no later
// write's catch-up can mend a generation swapped in behind the log.
#[test]
fn appends_during_an_upgrade_rebuild_are_neither_lost_nor_doubled() {
    let dir = tempfile::tempdir().expect("tmp");
    // More than 1024 events, so that the bulk load reports progress before its scan is done.
    write_store(dir.path(), 2500, None);
    let (before, generation) = fold_by_older_rules(dir.path());
    let engine = open(dir.path());
    let rt = crate::support::rt();
    let updated = CaseId::new("c000010");
    let history_before = engine.projections().history(&updated).expect("history");
    let head_before = engine.log().written_head();
    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let mut new_cases = Vec::new();
    let mut updates = 0;
    let upgrading = &engine;
    std::thread::scope(|s| {
        let upgrade = s.spawn(move || {
            let mut holds = 0;
            let mut bulk_head = None;
            upgrading.upgrade(&mut |done, head| {
                let bulk_head = *bulk_head.get_or_insert(head);
                if holds == 0 || (holds == 1 && head > bulk_head) {
                    holds += 1;
                    let _ = held_tx.send((done, head));
                    let _ = go_rx.recv();
                }
            })
        });
        let (done, head) = held_rx.recv().expect("the upgrade reports progress");
        assert!(done < head, "held mid-scan: {done} of {head}");
        assert!(matches!(
            engine.upgrade_status(),
            UpgradeStatus::Running { stored, .. } if stored == OLDER.rules
        ));
        // The old generation answers, and folds what is appended now.
        assert_eq!(engine.projections().generation_id(), generation);
        assert_eq!(answers(&engine), before);
        for n in 0..20 {
            let case = format!("n{n:04}");
            submit(&engine, &rt, &format!("during-{n}"), &case, true);
            new_cases.push(case);
            submit(
                &engine,
                &rt,
                &format!("update-{n}"),
                updated.as_str(),
                false,
            );
            updates += 1;
        }
        assert_eq!(engine.projections().generation_id(), generation);
        assert!(engine
            .projections()
            .case(&CaseId::new("n0019"))
            .expect("read")
            .is_some());
        go_tx.send(()).expect("release the upgrade");
        let (done, head) = held_rx.recv().expect("the catch-up reports progress");
        assert_eq!(done, head, "caught up without the lock");
        for n in 0..10 {
            let case = format!("l{n:04}");
            submit(&engine, &rt, &format!("late-{n}"), &case, true);
            new_cases.push(case);
        }
        assert_eq!(engine.projections().generation_id(), generation);
        go_tx.send(()).expect("release the upgrade");
        upgrade
            .join()
            .expect("upgrade thread")
            .expect("upgrade")
            .expect("an upgrade was needed");
    });
    let appended = u64::try_from(new_cases.len() + updates).expect("count");
    let head = engine.log().written_head();
    assert_eq!(head, Position(head_before.0 + appended));
    assert!(engine.projections().generation_id() > generation);
    assert_eq!(engine.projections().checkpoint(), head);
    assert_eq!(
        engine.upgrade_status(),
        UpgradeStatus::Done {
            stored: OLDER.rules,
            current: RULES_VERSION
        }
    );
    let p = engine.projections();
    for case in &new_cases {
        let history = p.history(&CaseId::new(case.as_str())).expect("history");
        assert_eq!(history.len(), 1, "{case}: {history:?}");
    }
    let history = p.history(&updated).expect("history");
    assert_eq!(history.len(), history_before.len() + updates, "{history:?}");
    assert!(history.windows(2).all(|w| w[0] < w[1]), "{history:?}");
    let listed = p.cases_for_user("u1", true).expect("list").len();
    assert_eq!(listed, before.1.len() + new_cases.len());
    // The swapped-in generation is what a replay of the whole log gives.
    assert_eq!(engine.verify(&mut |_, _| {}).expect("verify"), Vec::new());
}

// A process that dies while the upgrade builds the next generation (a copy of the files taken
// then) leaves the old generation active: the next open answers from it as before, reclaims the
// rebuild's tree, and still reports the upgrade as needed.
#[test]
fn a_crash_during_an_upgrade_rebuild_leaves_the_old_generation_active() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = dir.path().join("store");
    let killed = dir.path().join("killed");
    write_store(&store, 2500, None);
    let (before, generation) = fold_by_older_rules(&store);
    let engine = open(&store);
    let mut copied = false;
    engine
        .upgrade(&mut |_, _| {
            if !copied {
                assert_eq!(engine.projections().generation_trees(), 2);
                engine.flush().expect("flush");
                copy_dir(&store, &killed);
                copied = true;
            }
        })
        .expect("upgrade")
        .expect("an upgrade was needed");
    assert!(copied);
    {
        let db = sled::open(&killed).expect("sled open");
        let trees = db
            .tree_names()
            .iter()
            .filter(|n| n.starts_with(b"proj/demo/"))
            .count();
        assert_eq!(trees, 2, "the copy holds the rebuild's tree");
    }
    let engine = open(&killed);
    assert_eq!(engine.projections().generation_id(), generation);
    assert_eq!(engine.projections().generation_trees(), 1);
    assert_eq!(
        engine.upgrade_status(),
        UpgradeStatus::Needed {
            stored: OLDER.rules,
            current: RULES_VERSION
        }
    );
    assert_eq!(answers(&engine), before);
}

// A one-shot command answers from projections of other rules as they are and says on stderr
// that `caseledger replay` rebuilds them; after that replay it answers the same, without the
// warning.
#[test]
fn cli_answers_from_other_rules_with_a_warning_until_replay() {
    let dir = tempfile::tempdir().expect("tmp");
    write_store(dir.path(), 50, None);
    let show = ["--json", "case", "show", "c000010"];
    let first = cli(dir.path(), &show);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    assert!(!text(&first.stderr).contains("other rules"));
    fold_by_older_rules(dir.path());
    let outdated = cli(dir.path(), &show);
    let stderr = text(&outdated.stderr);
    assert_eq!(outdated.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&outdated.stdout), text(&first.stdout));
    assert!(
        stderr.contains("built by other rules") && stderr.contains("caseledger replay"),
        "{stderr}"
    );
    let replay = cli(dir.path(), &["replay"]);
    assert_eq!(replay.status.code(), Some(0), "{}", text(&replay.stderr));
    assert!(!text(&replay.stderr).contains("other rules"));
    let after = cli(dir.path(), &show);
    assert_eq!(after.status.code(), Some(0), "{}", text(&after.stderr));
    assert_eq!(text(&after.stdout), text(&first.stdout));
    assert!(!text(&after.stderr).contains("other rules"));
}
