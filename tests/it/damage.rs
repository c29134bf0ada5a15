//! Damaged stores (issue 9 §5): a damaged projection never locks anyone out of the log, a
//! damaged sled file is a typed error naming the file, never a panic, and `replay --verify`
//! names every difference between the live projections and a rebuild (I2).

use std::path::Path;
use std::process::Output;

use caseledger::demo::{form, Block};
use caseledger::domain::{AppId, CaseId, Command, GroupId, Position, UserId};
use caseledger::projections::{Damage, KeyKind, ProjectionVersion, LAYOUT_VERSION};
use caseledger::UpgradeStatus;
use caseledger::{Engine, EngineConfig, Request};

use crate::support::copy_dir;

/// Writes a store in `dir` with a user, a case-sharing group and app, and `forms` forms over
/// `forms / 2` cases (every other form updates a case created before), in groups of 64.
pub fn write_store(dir: &Path, forms: usize, killed_copy: Option<&Path>) {
    let rt = crate::support::rt();
    let engine = Engine::open(dir, &"demo".into(), EngineConfig::default()).expect("open");
    for c in [
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
            id: AppId::new("a"),
            name: "a".into(),
            case_sharing: true,
            case_types: vec!["t".into()],
        },
    ] {
        rt.block_on(engine.execute(Request::new(c))).expect("setup");
    }
    let ids: Vec<usize> = (0..forms).collect();
    for chunk in ids.chunks(64) {
        let requests = chunk
            .iter()
            .map(|&n| {
                let id = format!("f{n:06}");
                let case = format!("c{:06}", n / 2);
                let xml = form(
                    &id,
                    "u1",
                    &[Block {
                        case_id: &case,
                        user: "u1",
                        date: "2026-03-02T10:00:00Z",
                        create: (n % 2 == 0).then_some(("t", "name", None)),
                        update: &[("n", &id)],
                        close: false,
                    }],
                );
                let sub = engine.prepare_submission(xml, Some(AppId::new("a")));
                Request::new(Command::SubmitForm(Box::new(sub)))
            })
            .collect();
        for r in rt.block_on(engine.execute_many(requests)).expect("submit") {
            r.expect("accepted");
        }
    }
    engine.flush().expect("flush");
    if let Some(copy) = killed_copy {
        // A copy taken while the engine is open is what a killed process leaves: no
        // shutdown snapshot, so the next open recovers by reading sled's segments.
        copy_dir(dir, copy);
    }
}

pub(crate) fn open(dir: &Path) -> Engine {
    Engine::open(dir, &"demo".into(), EngineConfig::default()).expect("open")
}

/// Runs the CLI binary on the store in `dir`.
pub(crate) fn cli(dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
        .arg("--data")
        .arg(dir)
        .args(args)
        .env_remove("CASELEDGER_DATA")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run caseledger")
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Opens the store's sled database directly (waiting for the lock a dropped engine's IO threads
/// hold for a moment) and hands `edit` the active projection generation's tree.
fn tamper(dir: &Path, edit: impl FnOnce(&sled::Tree)) {
    let db = (0..200)
        .find_map(|_| match sled::open(dir) {
            Ok(db) => Some(db),
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
                None
            }
        })
        .expect("sled open");
    let meta = db.open_tree("projmeta/demo").expect("meta");
    let active = meta
        .get("active")
        .expect("read")
        .map(|v| u64::from_be_bytes(v.as_ref().try_into().expect("8 bytes")))
        .expect("an active generation");
    let tree = db
        .open_tree(format!("proj/demo/{active}"))
        .expect("generation tree");
    edit(&tree);
    db.flush().expect("flush");
}

/// The key of a case's row: `c`, its owner (length-prefixed, read from the case's `o` row),
/// the case id (`projections` keys).
fn case_key(t: &sled::Tree, id: &str) -> Vec<u8> {
    let mut locator = vec![b'o'];
    locator.extend_from_slice(id.as_bytes());
    let owner = t.get(locator).expect("read").expect("an owner row");
    let mut k = vec![b'c'];
    k.extend_from_slice(&u32::try_from(owner.len()).expect("short").to_be_bytes());
    k.extend_from_slice(&owner);
    k.extend_from_slice(id.as_bytes());
    k
}

/// What the queries answer: a case, the user's case list, an owner's cases, diagnostics, and
/// how many events the log holds.
pub(crate) fn answers(engine: &Engine) -> (String, Vec<String>, usize, usize, usize) {
    let p = engine.projections();
    let case = format!("{:?}", p.case(&CaseId::new("c000010")).expect("case"));
    let list = p
        .cases_for_user("u1", true)
        .expect("list")
        .into_iter()
        .map(|c| c.case_id.0)
        .collect();
    let owned = p.cases_by_owner("g1", true).expect("owner").len();
    let diagnostics = p.diagnostics().expect("diagnostics").len();
    let events = engine.log().iter_from(Position(1)).count();
    (case, list, owned, diagnostics, events)
}

// I2: an undecodable directory used to fail `Projections::open`, so no command could open the
// store, `log` included. Now the store opens, says what was damaged, and rebuilds.
#[test]
fn i2_damaged_directory_no_longer_locks_anyone_out_of_the_log() {
    let dir = tempfile::tempdir().expect("tmp");
    write_store(dir.path(), 200, None);
    let before = answers(&open(dir.path()));
    tamper(dir.path(), |t| {
        t.insert("D", &[0xff, 0xfe, 0xfd][..]).expect("insert");
    });
    let engine = open(dir.path());
    let repaired = engine.repaired();
    assert!(
        matches!(repaired.as_slice(), [Damage::Generation { .. }]),
        "{repaired:?}"
    );
    assert_eq!(answers(&engine), before);
    drop(engine);
    // The rebuild was installed: the next open finds nothing wrong.
    assert_eq!(open(dir.path()).repaired(), Vec::new());
}

// I2: a value a query meets damaged is rebuilt from the log, and the query answers as before.
#[test]
fn i2_damaged_case_value_is_rebuilt_by_the_query_that_meets_it() {
    let dir = tempfile::tempdir().expect("tmp");
    write_store(dir.path(), 200, None);
    let before = answers(&open(dir.path()));
    tamper(dir.path(), |t| {
        t.insert(case_key(t, "c000010"), &[0xff; 9][..])
            .expect("insert");
    });
    let engine = open(dir.path());
    let generation = engine.projections().generation_id();
    let case = engine
        .query(|p| p.case(&CaseId::new("c000010")))
        .expect("query rebuilds")
        .expect("case exists");
    assert_eq!(case.case_id.0, "c000010");
    let repaired = engine.repaired();
    assert!(
        matches!(repaired.as_slice(), [Damage::Value { .. }]),
        "{repaired:?}"
    );
    assert!(engine.projections().generation_id() > generation);
    assert_eq!(answers(&engine), before);
}

// I2, through the CLI: `log` reads a store with a damaged projection value, `case show`
// rebuilds and answers, and says on stderr what it found.
#[test]
fn i2_cli_log_and_case_show_work_over_a_damaged_case_value() {
    let dir = tempfile::tempdir().expect("tmp");
    write_store(dir.path(), 200, None);
    let shown = cli(dir.path(), &["--json", "case", "show", "c000010"]);
    assert_eq!(shown.status.code(), Some(0), "{}", text(&shown.stderr));
    tamper(dir.path(), |t| {
        t.insert(case_key(t, "c000010"), &[0xff; 9][..])
            .expect("insert");
    });
    let log = cli(dir.path(), &["log", "--limit", "100000"]);
    assert_eq!(log.status.code(), Some(0), "{}", text(&log.stderr));
    // A header row, then every event.
    assert_eq!(text(&log.stdout).lines().count(), 1 + 204);
    let again = cli(dir.path(), &["--json", "case", "show", "c000010"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout), text(&shown.stdout));
    let stderr = text(&again.stderr);
    assert!(
        stderr.contains("damaged projections rebuilt from the log") && stderr.contains("c000010"),
        "{stderr}"
    );
}

// Projections of another layout do not read: they are rebuilt inside `Engine::open`, so the
// first answer already comes from the rebuild, and the answers stay the same.
#[test]
fn projections_of_another_layout_are_rebuilt_before_the_first_answer() {
    let dir = tempfile::tempdir().expect("tmp");
    write_store(dir.path(), 200, None);
    let engine = open(dir.path());
    assert_eq!(
        engine.projections().stored_version(),
        Some(ProjectionVersion::CURRENT)
    );
    let before = answers(&engine);
    let generation = engine.projections().generation_id();
    engine
        .projections()
        .set_stored_version(ProjectionVersion {
            layout: LAYOUT_VERSION + 1,
            ..ProjectionVersion::CURRENT
        })
        .expect("tamper version");
    drop(engine);
    let engine = open(dir.path());
    // Rebuilt before `open` returned: nothing of the old generation is left to answer from.
    assert!(engine.projections().generation_id() > generation);
    assert_eq!(engine.projections().generation_trees(), 1);
    assert_eq!(
        engine.repaired(),
        vec![Damage::Layout {
            stored: LAYOUT_VERSION + 1,
            current: LAYOUT_VERSION
        }]
    );
    assert_eq!(engine.upgrade_status(), UpgradeStatus::Current);
    assert_eq!(
        engine.projections().stored_version(),
        Some(ProjectionVersion::CURRENT)
    );
    assert_eq!(answers(&engine), before);
}

// A store written before the version was recorded has layout 1: rebuilt on open, both records
// written.
#[test]
fn projections_without_a_version_record_are_layout_1() {
    let dir = tempfile::tempdir().expect("tmp");
    write_store(dir.path(), 20, None);
    let generation = open(dir.path()).projections().generation_id();
    {
        let db = (0..200)
            .find_map(|_| {
                sled::open(dir.path()).ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    None
                })
            })
            .expect("sled open");
        let meta = db.open_tree("projmeta/demo").expect("meta");
        meta.remove("version").expect("remove");
        meta.remove("rules").expect("remove");
        db.flush().expect("flush");
    }
    // Layout 1 had no time-travel rows: this code (a later layout) rebuilds it on open.
    let engine = open(dir.path());
    assert_eq!(
        engine.repaired(),
        vec![Damage::Layout {
            stored: 1,
            current: LAYOUT_VERSION
        }]
    );
    assert!(engine.projections().generation_id() > generation);
    assert_eq!(
        engine.projections().stored_version(),
        Some(ProjectionVersion::CURRENT)
    );
}

// A data file of a killed store cut short by 512 KiB or more used to panic sled (exit 101) at
// some cuts, depending on where sled's segments fall, and to open as a shorter or empty log
// without a word at others. Every cut is tried, 128 KiB apart (the file is smaller since raw
// submissions are stored out of line; at least 20 cuts are required): none panics, none opens a
// shorter log, and a store that does not open names its directory, or its `db` file when sled
// could not recover it (`engine::store` catches the panic; its unit test covers that path).
#[test]
fn truncated_data_file_is_an_error_naming_the_file_never_a_panic() {
    let dir = tempfile::tempdir().expect("tmp");
    let killed = dir.path().join("killed");
    write_store(&dir.path().join("store"), 4000, Some(&killed));
    let size = std::fs::metadata(killed.join("db")).expect("db").len();
    let mut outcomes = Vec::new();
    let mut cut = 512u64 << 10;
    while cut < size {
        let copy = dir.path().join(format!("cut-{cut}"));
        copy_dir(&killed, &copy);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(copy.join("db"))
            .expect("open db");
        file.set_len(size - cut).expect("truncate");
        drop(file);
        let out = cli(&copy, &["log", "--limit", "100000"]);
        let stderr = text(&out.stderr);
        assert_ne!(out.status.code(), Some(101), "cut {cut}: {stderr}");
        assert!(!stderr.contains("panicked at"), "cut {cut}: {stderr}");
        if out.status.code() == Some(0) {
            // Never a shorter log without a word (the head recorded at the last flush).
            assert_eq!(text(&out.stdout).lines().count(), 1 + 4004, "cut {cut}");
        } else {
            assert!(
                stderr.contains(&copy.display().to_string()),
                "cut {cut}: {stderr}"
            );
        }
        if stderr.contains(&format!("{} is damaged", copy.join("db").display())) {
            assert!(stderr.contains("backup"), "cut {cut}: {stderr}");
        }
        outcomes.push((cut, out.status.code()));
        std::fs::remove_dir_all(&copy).expect("rm copy");
        cut += 128 << 10;
    }
    assert!(outcomes.len() >= 20, "{outcomes:?}");
}

// sled reads a garbled `conf` as "created by a sled version earlier than 0.29"; the message
// says what is really wrong.
#[test]
fn damaged_conf_is_named_as_damaged() {
    let dir = tempfile::tempdir().expect("tmp");
    write_store(dir.path(), 20, None);
    let conf = dir.path().join("conf");
    let mut bytes = std::fs::read(&conf).expect("conf");
    bytes[3] ^= 0x80;
    std::fs::write(&conf, &bytes).expect("write conf");
    let out = cli(dir.path(), &["log"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{} is damaged", conf.display())),
        "{stderr}"
    );
    assert!(stderr.contains("segment size"), "{stderr}");
    assert!(!stderr.contains("0.29"), "{stderr}");
    // A conf cut to nothing: sled would rewrite it silently.
    std::fs::write(&conf, b"seg").expect("write conf");
    let out = cli(dir.path(), &["log"]);
    assert!(
        text(&out.stderr).contains(&format!("{} is damaged", conf.display())),
        "{}",
        text(&out.stderr)
    );
}

// I3: a rebuild beside the live projections equals them on an untouched store; nothing swapped.
#[test]
fn i3_replay_verify_is_clean_on_an_untouched_store() {
    let dir = tempfile::tempdir().expect("tmp");
    write_store(dir.path(), 300, None);
    let out = cli(dir.path(), &["replay", "--verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("0 difference(s)"),
        "{}",
        text(&out.stdout)
    );
    let engine = open(dir.path());
    let generation = engine.projections().generation_id();
    assert_eq!(engine.verify(&mut |_, _| {}).expect("verify"), Vec::new());
    assert_eq!(engine.projections().generation_id(), generation);
    assert_eq!(engine.projections().generation_trees(), 1);
}

// I3: `replay --verify` names each key where the live projections differ from the log, exits
// non-zero, and swaps nothing: the tampered value is still there afterwards.
#[test]
fn i3_replay_verify_names_each_difference_and_swaps_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    write_store(dir.path(), 300, None);
    // Decodable but wrong: another case's value under c000010, and an owner entry for nobody.
    tamper(dir.path(), |t| {
        let other = t
            .get(case_key(t, "c000011"))
            .expect("read")
            .expect("c000011");
        t.insert(case_key(t, "c000010"), other).expect("insert");
        t.insert(b"oc999042", &b"u9"[..]).expect("insert");
    });
    let out = cli(dir.path(), &["replay", "--verify"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout} {}", text(&out.stderr));
    assert!(stdout.contains("case g1/c000010: live "), "{stdout}");
    assert!(
        stdout.contains("owner-index c999042: live owner u9 | rebuilt (absent)"),
        "{stdout}"
    );
    assert!(stdout.contains("2 difference(s)"), "{stdout}");
    let engine = open(dir.path());
    let differences = engine.verify(&mut |_, _| {}).expect("verify");
    let kinds: Vec<(KeyKind, &str)> = differences
        .iter()
        .map(|d| (d.kind, d.id.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![(KeyKind::Case, "g1/c000010"), (KeyKind::Owner, "c999042")]
    );
    // Nothing swapped: the live generation still holds the tampered value.
    let live = engine
        .projections()
        .case(&CaseId::new("c000010"))
        .expect("read")
        .expect("a case");
    assert_eq!(live.case_id.0, "c000011");
    assert_eq!(engine.projections().generation_trees(), 1);
}

// I2: a submission that reads a damaged case value before anything is appended rebuilds the
// projections and is decided on the sound state, once.
#[test]
fn i2_a_write_over_a_damaged_case_value_is_decided_on_rebuilt_projections() {
    let dir = tempfile::tempdir().expect("tmp");
    write_store(dir.path(), 200, None);
    tamper(dir.path(), |t| {
        t.insert(case_key(t, "c000010"), &[0xff; 9][..])
            .expect("insert");
    });
    let engine = open(dir.path());
    let rt = crate::support::rt();
    let head = engine.log().written_head();
    let xml = form(
        "f-after",
        "u1",
        &[Block {
            case_id: "c000010",
            user: "u1",
            date: "2026-03-03T10:00:00Z",
            create: None,
            update: &[("n", "after")],
            close: false,
        }],
    );
    let outcome = rt
        .block_on(engine.submit(xml, Some(AppId::new("a")), None))
        .expect("submit");
    assert_eq!(outcome.position, Position(head.0 + 1));
    assert_eq!(engine.log().written_head(), Position(head.0 + 1));
    assert!(
        matches!(engine.repaired().as_slice(), [Damage::Value { .. }]),
        "{:?}",
        engine.repaired()
    );
    let case = engine
        .projections()
        .case(&CaseId::new("c000010"))
        .expect("read")
        .expect("case");
    assert_eq!(case.properties.get("n").map(String::as_str), Some("after"));
    assert_eq!(case.case_type, "t");
    assert_eq!(engine.verify(&mut |_, _| {}).expect("verify"), Vec::new());
}

// A flipped byte in the data file of a small store (one sled segment): sled's recovery stops at
// the message that fails its checksum and used to open the part before it as the whole store
// (4 of 24 events, exit 0), dropping the rest. Now every command either reads the whole log or
// fails naming the data file (the head recorded at the last flush tells), never panics.
#[test]
fn flipped_byte_in_the_data_file_never_loses_events_silently() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = dir.path().join("store");
    write_store(&store, 20, None);
    let size = std::fs::metadata(store.join("db")).expect("db").len();
    let mut named = 0;
    for eighth in 1..8u64 {
        let copy = dir.path().join(format!("flip-{eighth}"));
        copy_dir(&store, &copy);
        let db = copy.join("db");
        let mut bytes = std::fs::read(&db).expect("read db");
        let at = usize::try_from(size * eighth / 8).expect("offset");
        bytes[at] ^= 0xff;
        std::fs::write(&db, &bytes).expect("write db");
        let out = cli(&copy, &["log", "--limit", "1000"]);
        let stderr = text(&out.stderr);
        match out.status.code() {
            // A header row, then every event.
            Some(0) => assert_eq!(
                text(&out.stdout).lines().count(),
                1 + 24,
                "at {at}: {stderr}"
            ),
            Some(1) => {
                assert!(
                    stderr.contains(&format!("{} is damaged", db.display())),
                    "at {at}: {stderr}"
                );
                named += 1;
            }
            other => panic!("at {at}: exit {other:?}: {stderr}"),
        }
    }
    assert!(named > 0, "no flip was noticed");
}
