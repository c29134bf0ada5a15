//! Issue 9 §5, "a log an auditor can check", through the real binary: `verify`, `export`,
//! `import` (docs/AUDIT.md). Damage is made on copies of a data dir, and every command runs as
//! a subprocess so that a panic (exit 101) fails the assertion instead of the harness.

use std::path::{Path, PathBuf};
use std::process::Output;

use caseledger::audit::{base64, unbase64};
use serde_json::Value;

use crate::support::{self, copy_dir};

/// Exit status of `verify`, `export` and `import` for damage or a refused export.
const DAMAGE: i32 = 3;

fn run(data: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
        .arg("--data")
        .arg(data)
        .args(args)
        .env_remove("CASELEDGER_DATA")
        .env_remove("CASELEDGER_LOG")
        .output()
        .expect("run caseledger")
}

fn ok(data: &Path, args: &[&str]) -> Vec<u8> {
    let out = run(data, args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn json(data: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_slice(&ok(data, &all)).expect("JSON output")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A form body that LZ4 cannot shrink (~300 KB): a large record of the raw-submission files (it
/// went to a sled blob file when raw submissions were stored in the log).
fn incompressible_form() -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut body = b"<data>".to_vec();
    for _ in 0..300_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        body.push(b"abcdefghijklmnopqrstuvwxyz0123456789"[(state % 36) as usize]);
    }
    body.extend_from_slice(b"</data>");
    body
}

/// A store made through the CLI: users, a case-sharing group, an app, the shared-team
/// conformance forms (one accepted, one rejected) and one large form, their raw submissions
/// stored out of line in `raw/`.
fn store() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    for args in [
        &["user", "create", "--id", "u-david", "--username", "david"][..],
        &["user", "create", "--id", "u-maria", "--username", "maria"],
        &[
            "group",
            "create",
            "--id",
            "g-team",
            "--name",
            "team",
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
        ok(&data, args);
    }
    let forms = support::conformance_dir().join("01-shared-team");
    for form in ["01-register.xml", "02-maria-visit.xml"] {
        let path = forms.join(form);
        let out = run(&data, &["submit", path.to_str().expect("utf-8 path")]);
        assert!(matches!(out.status.code(), Some(0 | 2)), "{}", stderr(&out));
    }
    let big = dir.path().join("big.xml");
    std::fs::write(&big, incompressible_form()).expect("write form");
    let out = run(&data, &["submit", big.to_str().expect("utf-8 path")]);
    assert!(matches!(out.status.code(), Some(0 | 2)), "{}", stderr(&out));
    (dir, data)
}

/// No import leaves its scratch directory behind next to the target.
fn assert_no_scratch(parent: &Path) {
    let left: Vec<_> = std::fs::read_dir(parent)
        .expect("read dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".importing-"))
        .collect();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
}

#[test]
fn verify_is_clean_on_an_untouched_store_and_names_its_head() {
    let (_dir, data) = store();
    let log = json(&data, &["log", "--limit", "1000"]);
    let events = log.as_array().map_or(0, Vec::len) as u64;
    assert!(events >= 9, "{events} events");
    let report = json(&data, &["verify"]);
    assert_eq!(report["ok"], true);
    assert_eq!(report["head"], events);
    assert_eq!(report["entries"], events);
    assert_eq!(report["unchained"], 0);
    // The head hash is the last export line's hash, and the acknowledged head file agrees.
    let export = ok(&data, &["export"]);
    let last: Value = serde_json::from_slice(
        export
            .split(|b| *b == b'\n')
            .rfind(|l| !l.is_empty())
            .expect("a line"),
    )
    .expect("JSON line");
    assert_eq!(report["head_hash"], last["hash"]);
    assert_eq!(report["acknowledged"]["position"], events);
    assert_eq!(report["acknowledged"]["hash"], last["hash"]);
    let text = String::from_utf8(ok(&data, &["verify"])).expect("utf-8");
    assert!(
        text.contains(&format!(
            "head {events} {}",
            last["hash"].as_str().expect("hex")
        )),
        "{text}"
    );
}

#[test]
fn verify_from_checks_from_that_position_to_the_head() {
    let (_dir, data) = store();
    let all = json(&data, &["verify"]);
    let head = all["head"].as_u64().expect("head");
    let from = json(&data, &["verify", "--from", "4"]);
    assert_eq!(from["from"], 4);
    assert_eq!(from["entries"], head - 3);
    assert_eq!(from["head_hash"], all["head_hash"]);
    let past = json(&data, &["verify", "--from", &(head + 5).to_string()]);
    assert_eq!(past["entries"], 0);
}

#[test]
fn export_then_import_then_export_gives_identical_bytes_and_working_queries() {
    let (dir, data) = store();
    let first = ok(&data, &["export", "--format", "jsonl"]);
    let file = dir.path().join("export.jsonl");
    std::fs::write(&file, &first).expect("write export");
    let copy = dir.path().join("imported");
    let report = json(&copy, &["import", file.to_str().expect("utf-8")]);
    let verified = json(&copy, &["verify"]);
    assert_eq!(report["head_hash"], verified["head_hash"]);
    assert_eq!(verified["head_hash"], json(&data, &["verify"])["head_hash"]);
    assert_eq!(ok(&copy, &["export"]), first, "export → import → export");
    // Projections were rebuilt from the imported log.
    for query in [
        &["cases", "--user", "u-maria"][..],
        &["groups"],
        &["diagnostics"],
    ] {
        assert_eq!(json(&copy, query), json(&data, query), "{query:?}");
    }
    // Twice the same export is the same bytes; a range is a slice of the lines.
    assert_eq!(ok(&data, &["export"]), first);
    let lines: Vec<&[u8]> = first.split_inclusive(|b| *b == b'\n').collect();
    let slice = ok(&data, &["export", "--from", "3", "--to", "5"]);
    assert_eq!(slice, lines[2..5].concat());
    assert_no_scratch(dir.path());
}

#[test]
fn import_refuses_a_non_empty_data_dir() {
    let (dir, data) = store();
    let file = dir.path().join("export.jsonl");
    std::fs::write(&file, ok(&data, &["export"])).expect("write export");
    let out = run(&data, &["import", file.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
}

/// Rewrites line `n` (1-based) of an export.
fn edit_line(
    export: &[u8],
    n: usize,
    change: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = export
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let mut fields: serde_json::Map<String, Value> =
        serde_json::from_slice(&lines[n - 1]).expect("JSON line");
    change(&mut fields);
    lines[n - 1] = Value::Object(fields).to_string().into_bytes();
    let mut out = lines.join(&b'\n');
    out.push(b'\n');
    out
}

#[test]
fn a_tampered_export_is_refused_naming_line_and_position_and_nothing_is_left() {
    let (dir, data) = store();
    let export = ok(&data, &["export"]);
    let good_head = json(&data, &["verify"])["head_hash"]
        .as_str()
        .expect("hex")
        .to_owned();
    // Each tampering, the line it must be refused at, and what the message must name.
    let changed_payload = edit_line(&export, 3, |f| {
        f["payload"]["user_id"] = Value::String("u-mallory".into());
    });
    let changed_raw = edit_line(&export, 7, |f| {
        let raw = unbase64(f["raw"].as_str().expect("raw")).expect("base64");
        let edited = String::from_utf8_lossy(&raw).replace("Monica", "Monika");
        f["raw"] = Value::String(base64(edited.as_bytes()));
    });
    // The envelope itself changed, with its crc32 recomputed: only the chain can tell.
    let changed_envelope = edit_line(&export, 5, |f| {
        let mut bytes = unbase64(f["envelope"].as_str().expect("envelope")).expect("base64");
        let at = bytes
            .iter()
            .rposition(|b| *b == b'g')
            .expect("a letter g in the event");
        bytes[at] = b'G';
        let crc = crc32fast::hash(&bytes[5..]);
        bytes[1..5].copy_from_slice(&crc.to_le_bytes());
        f["envelope"] = Value::String(base64(&bytes));
    });
    let changed_hash = edit_line(&export, 2, |f| {
        f["hash"] = Value::String("00".repeat(32));
    });
    let mut dropped_line: Vec<&[u8]> = export.split_inclusive(|b| *b == b'\n').collect();
    dropped_line.remove(3);
    let dropped_line = dropped_line.concat();
    let cases: [(&str, Vec<u8>, usize, &str); 5] = [
        ("payload", changed_payload, 3, "payload"),
        ("raw", changed_raw, 7, "raw"),
        ("envelope", changed_envelope, 5, "hash"),
        ("hash", changed_hash, 2, "hash"),
        ("dropped line", dropped_line, 4, "expected position 4"),
    ];
    for (what, bytes, line, names) in cases {
        let file = dir.path().join(format!("tampered-{line}.jsonl"));
        std::fs::write(&file, &bytes).expect("write");
        let target = dir.path().join(format!("import-{line}"));
        let out = run(&target, &["import", file.to_str().expect("utf-8")]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(DAMAGE), "{what}: {err}");
        let position = if what == "dropped line" {
            line + 1
        } else {
            line
        };
        assert!(
            err.contains(&format!("line {line} (position {position})")) && err.contains(names),
            "{what}: {err}"
        );
        assert!(!target.exists(), "{what}: nothing half-imported");
    }
    // A consistent export that is not the one published: refused against the pinned head.
    let file = dir.path().join("export.jsonl");
    std::fs::write(&file, &export).expect("write");
    let target = dir.path().join("import-pinned");
    let wrong = "ab".repeat(32);
    let out = run(
        &target,
        &["import", file.to_str().expect("utf-8"), "--head", &wrong],
    );
    assert_eq!(out.status.code(), Some(DAMAGE), "{}", stderr(&out));
    assert!(stderr(&out).contains("expected head"), "{}", stderr(&out));
    assert!(!target.exists());
    ok(
        &target,
        &[
            "import",
            file.to_str().expect("utf-8"),
            "--head",
            &good_head,
        ],
    );
    assert_no_scratch(dir.path());
}

/// Offsets to damage in a file: both ends, and evenly spread over its non-zero bytes (the
/// zero-filled rest of sled's preallocated segments holds nothing).
fn offsets(bytes: &[u8], count: usize) -> Vec<usize> {
    let used: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] != 0).collect();
    let mut out = vec![0, bytes.len().saturating_sub(1)];
    if let Some(&last) = used.last() {
        out.push((last + 1).min(bytes.len() - 1));
    }
    let step = (used.len() / count).max(1);
    out.extend(used.iter().step_by(step).copied());
    out.sort_unstable();
    out.dedup();
    out
}

fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(Result::ok)
    {
        let path = entry.path();
        if path.is_dir() {
            files(root, &path, out);
        } else {
            out.push(path.strip_prefix(root).expect("under root").to_owned());
        }
    }
}

#[test]
fn flipped_bytes_in_any_store_file_are_reported_or_change_nothing() {
    let (dir, data) = store();
    let commands: [&[&str]; 3] = [
        &["--json", "verify"],
        &["export"],
        &["--json", "cases", "--user", "u-david"],
    ];
    let baseline: Vec<Vec<u8>> = commands.iter().map(|c| ok(&data, c)).collect();
    let mut stored = Vec::new();
    files(&data, &data, &mut stored);
    let names: Vec<String> = stored.iter().map(|p| p.display().to_string()).collect();
    for expected in [
        "db",
        "conf",
        "snap.",
        "raw/demo.dat",
        "raw/demo.idx",
        "log-head.demo",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(expected)),
            "{expected} in {names:?}"
        );
    }
    let (mut reported, mut harmless) = (0, 0);
    for file in &stored {
        let bytes = std::fs::read(data.join(file)).expect("read");
        for offset in offsets(&bytes, 8) {
            for (command, expected) in commands.iter().zip(&baseline) {
                // A fresh damaged copy per command: opening may let sled rewrite its files.
                let copy = dir.path().join("damaged");
                let _ = std::fs::remove_dir_all(&copy);
                copy_dir(&data, &copy);
                let mut damaged = bytes.clone();
                damaged[offset] ^= 0x40;
                std::fs::write(copy.join(file), &damaged).expect("damage");
                let out = run(&copy, command);
                let at = format!("{} at {offset}, {command:?}", file.display());
                let err = stderr(&out);
                assert_ne!(out.status.code(), Some(101), "panic: {at}: {err}");
                match out.status.code() {
                    Some(0) => {
                        assert_eq!(&out.stdout, expected, "changed answer: {at}");
                        harmless += 1;
                    }
                    Some(code) => {
                        // One sentence, or under --json one error object (docs/CLI.md).
                        let clear = if command.contains(&"--json") {
                            serde_json::from_str::<Value>(err.lines().last().unwrap_or_default())
                                .is_ok_and(|v| v["error"]["code"].is_string())
                        } else {
                            err.starts_with("error:")
                        };
                        assert!(clear, "{at}: unclear error {err}");
                        if command.contains(&"verify") || command.contains(&"export") {
                            assert_eq!(code, DAMAGE, "{at}: {err}");
                        }
                        reported += 1;
                    }
                    None => panic!("killed by a signal: {at}"),
                }
            }
        }
    }
    assert!(
        reported > 0 && harmless > 0,
        "{reported} reported, {harmless} harmless"
    );
}

#[test]
fn a_lost_tail_is_reported_by_verify_export_and_open() {
    let (dir, data) = store();
    let head = json(&data, &["verify"])["head"].as_u64().expect("head");
    let copy = dir.path().join("truncated");
    copy_dir(&data, &copy);
    {
        // What sled's recovery does when it stops at a bad checksum in its last segment: the
        // later writes are gone, and the store looks whole.
        let db = sled::open(&copy).expect("open copy");
        let tree = db.open_tree("log/demo").expect("log tree");
        for p in [head - 1, head] {
            tree.remove(p.to_be_bytes()).expect("remove");
        }
        db.flush().expect("flush");
    }
    for command in [
        &["verify"][..],
        &["export"],
        &["cases", "--user", "u-david"],
    ] {
        let out = run(&copy, command);
        let err = stderr(&out);
        assert_ne!(out.status.code(), Some(0), "{command:?}");
        assert_ne!(out.status.code(), Some(101), "{command:?}: {err}");
        assert!(
            err.contains("lost tail") && err.contains(&format!("position {head}")),
            "{command:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{command:?} printed nothing");
    }
}

/// The checked-in format-1/2 envelopes of `tests/data/fixtures/events-v1.bin` (I6), as stored
/// before the chain: length-prefixed, positions 1 to 15. The fixture goes on with envelopes of
/// event types added since (credentials, sync tokens), which `fixtures.rs` reads; a store
/// written before the chain held only these fifteen.
fn legacy_envelopes() -> Vec<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixtures/events-v1.bin");
    let stored = std::fs::read(path).expect("fixture present");
    let mut rest = stored.as_slice();
    let mut out = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<4>().filter(|_| out.len() < 15) {
        let (one, tail) = tail.split_at(u32::from_le_bytes(*len) as usize);
        if matches!(one.first(), Some(1 | 2)) {
            out.push(one.to_vec());
        }
        rest = tail;
    }
    out.truncate(15);
    out
}

#[test]
fn i6_a_legacy_log_verifies_unchained_and_chains_on_from_its_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("legacy");
    let legacy = legacy_envelopes();
    assert_eq!(legacy.len(), 15);
    {
        // A store written before format 3: only legacy envelopes, no head file.
        let db = sled::open(&data).expect("open");
        let tree = db.open_tree("log/demo").expect("log tree");
        for (p, envelope) in (1u64..).zip(&legacy) {
            assert!(matches!(envelope[0], 1 | 2), "legacy format");
            tree.insert(p.to_be_bytes(), envelope.as_slice())
                .expect("insert");
        }
        db.flush().expect("flush");
    }
    let before = json(&data, &["verify"]);
    assert_eq!(
        (before["entries"].clone(), before["unchained"].clone()),
        (15.into(), 15.into())
    );
    assert_eq!(before["acknowledged"], Value::Null, "no head file yet");
    // The first command through the engine writes the head file and a chained entry.
    ok(
        &data,
        &["user", "create", "--id", "u-new", "--username", "new"],
    );
    let after = json(&data, &["verify"]);
    assert_eq!(after["head"], 16);
    assert_eq!(after["unchained"], 15);
    assert_eq!(after["acknowledged"]["hash"], after["head_hash"]);
    let export = ok(&data, &["export"]);
    let line16: Value =
        serde_json::from_slice(export.split(|b| *b == b'\n').nth(15).expect("line 16"))
            .expect("JSON");
    assert_eq!(line16["format"], 3);
    assert_eq!(line16["prev"], {
        let line15: Value =
            serde_json::from_slice(export.split(|b| *b == b'\n').nth(14).expect("line 15"))
                .expect("JSON");
        line15["hash"].clone()
    });
    // Legacy lines import as they are and export to the same bytes.
    let file = dir.path().join("legacy.jsonl");
    std::fs::write(&file, &export).expect("write");
    let copy = dir.path().join("copy");
    ok(&copy, &["import", file.to_str().expect("utf-8")]);
    assert_eq!(ok(&copy, &["export"]), export);
    assert_eq!(json(&copy, &["verify"])["head_hash"], after["head_hash"]);
}

#[test]
fn verify_names_the_first_bad_position_of_a_changed_entry() {
    let (dir, data) = store();
    let head = json(&data, &["verify"])["head"].as_u64().expect("head");
    // Two copies: one byte of entry 5 changed as is (the crc32 catches it at 5), and with its
    // crc32 recomputed (only the chain catches it, at 6, whose stored previous hash no longer
    // matches).
    for (name, fix_crc, at) in [("plain", false, 5u64), ("crc-fixed", true, 6)] {
        let copy = dir.path().join(name);
        copy_dir(&data, &copy);
        {
            let db = sled::open(&copy).expect("open copy");
            let tree = db.open_tree("log/demo").expect("log tree");
            let mut value = tree
                .get(5u64.to_be_bytes())
                .expect("get")
                .expect("present")
                .to_vec();
            let last = value.len() - 1;
            value[last] ^= 0x01;
            if fix_crc {
                let crc = crc32fast::hash(&value[5..]);
                value[1..5].copy_from_slice(&crc.to_le_bytes());
            }
            tree.insert(5u64.to_be_bytes(), value).expect("insert");
            db.flush().expect("flush");
        }
        let out = run(&copy, &["--json", "verify"]);
        assert_eq!(out.status.code(), Some(DAMAGE), "{name}: {}", stderr(&out));
        let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(report["ok"], false);
        assert_eq!(report["position"], at, "{name}: {report}");
        assert!(
            stderr(&out).contains(&format!("damaged at position {at}")),
            "{name}: {}",
            stderr(&out)
        );
        // Checking only after the damage passes, and says so by its range.
        let later = json(&copy, &["verify", "--from", &(at + 1).to_string()]);
        assert_eq!(later["entries"], head - at);
    }
}
