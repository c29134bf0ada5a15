//! The command-line contract of issue 3, through the real binary: JSON shapes, exit codes
//! (0 ok, 2 rejected-but-stored, 1 usage/IO/unknown id with nothing appended).

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use crate::support;

fn run(data: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
        .arg("--data")
        .arg(data)
        .arg("--json")
        .args(args)
        .env_remove("CASELEDGER_DATA")
        .output()
        .expect("run caseledger")
}

fn ok(data: &Path, args: &[&str]) -> Value {
    let out = run(data, args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().next().unwrap_or("null")).expect("JSON output")
}

fn head(data: &Path) -> usize {
    ok(data, &["log", "--limit", "100000"])
        .as_array()
        .map_or(0, Vec::len)
}

fn setup(data: &Path) {
    for args in [
        &["user", "create", "--id", "u-david", "--username", "david"][..],
        &["user", "create", "--id", "u-maria", "--username", "maria"],
        &["user", "create", "--id", "u-ana", "--username", "ana"],
        &[
            "group",
            "create",
            "--id",
            "g-team",
            "--name",
            "Kibera CHW team",
            "--case-sharing",
        ],
        &[
            "group",
            "create",
            "--id",
            "g-other",
            "--name",
            "Mathare",
            "--case-sharing",
        ],
        &["group", "add-member", "g-team", "u-david"],
        &["group", "add-member", "g-team", "u-maria"],
        &["group", "add-member", "g-other", "u-ana"],
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
        ok(data, args);
    }
}

#[test]
fn seed_use_case_1_through_the_cli() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    setup(data);
    let dir = support::conformance_dir().join("01-shared-team");
    let reg = dir.join("01-register.xml");
    let visit = dir.join("02-maria-visit.xml");
    let out = run(
        data,
        &[
            "submit",
            reg.to_str().unwrap_or_default(),
            visit.to_str().unwrap_or_default(),
            "--app",
            "app-anc",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per file"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["outcome"], "accepted");
    assert_eq!(lines[0]["error"], Value::Null);
    assert_eq!(
        lines[0]["instance_id"],
        "3d307d25-cc07-51c3-bfcb-fcd7d6a6807c"
    );
    assert_eq!(lines[0]["cases"][0], "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10");
    assert!(lines[1]["position"].as_u64() > lines[0]["position"].as_u64());

    let case = ok(
        data,
        &["case", "show", "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10"],
    );
    assert_eq!(case["owner_id"], "g-team");
    assert_eq!(case["user_id"], "u-maria");
    assert_eq!(case["xform_ids"].as_array().map(Vec::len), Some(2));
    for key in [
        "case_id",
        "case_type",
        "case_name",
        "opened_on",
        "opened_by",
        "modified_on",
        "closed",
        "closed_on",
        "closed_by",
        "properties",
        "indices",
    ] {
        assert!(case.get(key).is_some(), "case show lacks {key}");
    }
    let maria = ok(data, &["cases", "--user", "u-maria"]);
    assert_eq!(maria.as_array().map(Vec::len), Some(1));
    let ana = ok(data, &["cases", "--user", "u-ana"]);
    assert_eq!(ana, Value::Array(vec![]));
    let groups = ok(data, &["groups", "--user", "u-maria"]);
    assert_eq!(groups[0]["id"], "g-team");
    assert_eq!(
        groups[0]["members"],
        serde_json::json!(["u-david", "u-maria"])
    );

    // Resending is a duplicate: exit 0, no case change (R53).
    let again = run(
        data,
        &[
            "submit",
            reg.to_str().unwrap_or_default(),
            "--app",
            "app-anc",
        ],
    );
    assert_eq!(again.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&again.stdout).contains("\"duplicate\""));
}

#[test]
fn rejected_forms_exit_2_and_are_stored_unknown_ids_exit_1_and_append_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    setup(data);
    let bad = data.join("bad.xml");
    std::fs::write(&bad, b"<data><unclosed></data>").expect("write");
    let out = run(
        data,
        &[
            "submit",
            bad.to_str().unwrap_or_default(),
            "--app",
            "app-anc",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "R49: rejected but stored");
    let line: Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap_or_default())
            .expect("json");
    assert_eq!(line["outcome"], "rejected");
    assert_eq!(line["error"]["code"], "InvalidXml");
    let stored = ok(data, &["log", "--from", &line["position"].to_string()]);
    assert_eq!(stored[0]["type"], "FormRejected");

    let before = head(data);
    for args in [
        &[
            "submit",
            bad.to_str().unwrap_or_default(),
            "--app",
            "app-nope",
        ][..],
        &["submit", "/nonexistent/form.xml", "--app", "app-anc"],
        &["group", "add-member", "g-nope", "u-david"],
        &["group", "add-member", "g-team", "u-nope"],
        &["user", "create", "--id", "u-david", "--username", "again"],
        &["case", "show", "no-such-case"],
        &["cases", "--user", "u-nope"],
        &["no-such-command"],
    ] {
        let out = run(data, args);
        assert_eq!(out.status.code(), Some(1), "{args:?} should exit 1");
        assert!(
            !out.stderr.is_empty(),
            "{args:?} should explain itself on stderr"
        );
    }
    assert_eq!(head(data), before, "nothing appended by failed commands");
    let diags = ok(data, &["diagnostics"]);
    assert!(diags
        .as_array()
        .is_some_and(|d| d.iter().any(|d| d["code"] == "rejected_submission")));
}

#[test]
fn replay_rebuilds_the_same_answers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    setup(data);
    let dir = support::conformance_dir().join("11-update-after-close");
    for f in ["01-register.xml", "02-maria-close.xml", "03-david-late.xml"] {
        ok(
            data,
            &[
                "submit",
                dir.join(f).to_str().unwrap_or_default(),
                "--app",
                "app-anc",
            ],
        );
    }
    let before = ok(
        data,
        &["case", "show", "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10"],
    );
    let diags_before = ok(data, &["diagnostics"]);
    let stats = ok(data, &["replay"]);
    assert_eq!(stats["events"].as_u64(), Some(head(data) as u64));
    assert_eq!(
        ok(
            data,
            &["case", "show", "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10"]
        ),
        before
    );
    assert_eq!(ok(data, &["diagnostics"]), diags_before);
}

#[test]
fn demo_runs_the_seed_stories() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
        .arg("--data")
        .arg(tmp.path())
        .arg("demo")
        .output()
        .expect("run demo");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("REJECTED NoCaseSharingGroup"), "{text}");
    assert!(
        text.contains("REJECTED MultipleCaseSharingGroups"),
        "{text}"
    );
    assert!(text.contains("u-ana      sees (nothing)"), "{text}");
    assert!(text.contains("closed=true"), "{text}");
}

#[test]
fn r31_attachment_bytes_sent_with_a_form_are_kept_in_the_log() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    setup(data);
    let photo = data.join("1741330001001.jpg");
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    std::fs::write(&photo, &bytes).expect("write photo");
    let form = support::conformance_dir().join("29-attachments/01-register-photo.xml");
    let out = run(
        data,
        &[
            "submit",
            form.to_str().unwrap_or_default(),
            "--app",
            "app-anc",
            "--attachment",
            photo.to_str().unwrap_or_default(),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let case = ok(
        data,
        &["case", "show", "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10"],
    );
    assert_eq!(
        case["attachments"]["mother_photo"]["src"], "1741330001001.jpg",
        "R31 metadata"
    );
    let log = ok(data, &["log", "--limit", "1000"]);
    let entry = log
        .as_array()
        .and_then(|l| l.iter().find(|e| e["type"] == "FormAttachments"))
        .expect("a FormAttachments event");
    assert!(
        entry["summary"]
            .as_str()
            .is_some_and(|s| s.contains("1741330001001.jpg (70000 bytes)")),
        "{entry}"
    );

    // The bytes themselves, read back through the library.
    let engine = caseledger::Engine::open(data, &"demo".into(), Default::default()).expect("open");
    let position = entry["position"].as_u64().expect("position");
    let ev = engine
        .log()
        .iter_from(caseledger::domain::Position(position))
        .next()
        .expect("event")
        .expect("decodes");
    match ev.event {
        caseledger::domain::Event::FormAttachmentsV1(a) => assert_eq!(a.files[0].bytes, bytes),
        other => panic!("expected FormAttachments, got {other:?}"),
    }
    let two = run(
        data,
        &[
            "submit",
            form.to_str().unwrap_or_default(),
            form.to_str().unwrap_or_default(),
            "--attachment",
            photo.to_str().unwrap_or_default(),
        ],
    );
    assert_eq!(
        two.status.code(),
        Some(1),
        "attachments go with exactly one form"
    );
}

#[test]
fn r50_an_oversized_body_is_stored_as_invalid_xml_and_a_hostile_one_is_refused_unread() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    setup(data);
    // 17 MiB: over the parser's 16 MiB limit, under the transport cap: stored, rejected.
    let big = data.join("big.xml");
    let mut body = b"<data>".to_vec();
    body.resize(17 << 20, b'a');
    std::fs::write(&big, &body).expect("write");
    let out = run(
        data,
        &[
            "submit",
            big.to_str().unwrap_or_default(),
            "--app",
            "app-anc",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("InvalidXml"));
    // 65 MiB: over the 64 MiB transport cap: refused, nothing appended.
    let before = head(data);
    let hostile = data.join("hostile.xml");
    let file = std::fs::File::create(&hostile).expect("create");
    file.set_len(65 << 20).expect("sparse file");
    let out = run(
        data,
        &[
            "submit",
            hostile.to_str().unwrap_or_default(),
            "--app",
            "app-anc",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("transport limit"));
    assert_eq!(head(data), before);
}

/// Issue 9 §2–§4 through the binary: `--at`/`--as-of`, `case history --json`, `who-could-see`,
/// `conflicts` and `conflicts show`, with the exit codes of the contract (seed FAQ 3, R70).
#[test]
fn time_travel_history_and_conflicts_through_the_cli() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    setup(data);
    let dir = support::conformance_dir().join("10-offline-received-order");
    let files: Vec<String> = ["01-register.xml", "02-maria-day4.xml", "03-david-day3.xml"]
        .iter()
        .map(|f| dir.join(f).display().to_string())
        .collect();
    let mut args = vec!["submit"];
    args.extend(files.iter().map(String::as_str));
    args.extend(["--app", "app-anc"]);
    let out = run(data, &args);
    assert_eq!(out.status.code(), Some(0));
    let positions: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json");
            v["position"].as_u64().expect("position")
        })
        .collect();
    let case = "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10";

    // As of Maria's form: her value; before the registration: did not exist yet (exit 1).
    let at = positions[1].to_string();
    let then = ok(data, &["case", "show", case, "--at", &at]);
    assert_eq!(then["properties"]["risk"], "low");
    let now = ok(data, &["case", "show", case]);
    assert_eq!(now["properties"]["risk"], "high");
    let before = (positions[0] - 1).to_string();
    let out = run(data, &["case", "show", case, "--at", &before]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not exist yet"));
    // Beyond the head, or a time before the first event: a clear error, exit 1.
    let out = run(data, &["case", "show", case, "--at", "999999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the log"));
    let out = run(
        data,
        &[
            "cases",
            "--user",
            "u-maria",
            "--as-of",
            "2000-01-01T00:00:00Z",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("before the first event"));
    // --as-of now answers like the head.
    let list = ok(
        data,
        &[
            "cases",
            "--user",
            "u-maria",
            "--as-of",
            "2100-01-01T00:00:00Z",
        ],
    );
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    // History: a JSON array of objects with a position, oldest first.
    let history = ok(data, &["case", "history", case]);
    let entries = history.as_array().expect("array");
    let got: Vec<u64> = entries
        .iter()
        .map(|e| e["position"].as_u64().expect("position"))
        .collect();
    assert_eq!(got, positions);
    assert_eq!(entries[2]["user"], "u-david");
    assert_eq!(entries[2]["changes"][0]["change"], "property");
    assert_eq!(entries[2]["changes"][0]["old"], "low");
    assert_eq!(entries[2]["changes"][0]["new"], "high");

    // Who could see it: the team.
    let who = ok(data, &["case", "who-could-see", case]);
    let users: Vec<&str> = who["viewers"]
        .as_array()
        .expect("viewers")
        .iter()
        .filter_map(|v| v["user"].as_str())
        .collect();
    assert_eq!(users, ["u-david", "u-maria"]);

    // One conflict, three-way, and `conflicts show` of its id.
    let conflicts = ok(data, &["conflicts"]);
    let list = conflicts.as_array().expect("array");
    assert_eq!(list.len(), 1);
    let c = &list[0];
    for (key, want) in [
        ("case_id", Value::from(case)),
        ("property", "risk".into()),
        ("base", Value::Null),
        ("theirs", "low".into()),
        ("mine", "high".into()),
        ("result", "high".into()),
    ] {
        assert_eq!(c[key], want, "{key}");
    }
    assert_eq!(c["positions"]["theirs"], positions[1]);
    assert_eq!(c["positions"]["mine"], positions[2]);
    let id = c["id"].as_str().expect("id");
    let shown = ok(data, &["conflicts", "show", id]);
    assert_eq!(&shown, c);
    assert_eq!(
        ok(data, &["conflicts", "--user", "u-ana"]),
        Value::Array(vec![])
    );
    let out = run(data, &["conflicts", "show", "nope"]);
    assert_eq!(out.status.code(), Some(1));
}

/// The help of `path` (`-h`, the one-line-per-option layout).
fn help(path: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
        .args(path)
        .arg("--help")
        .env_remove("CASELEDGER_DATA")
        .output()
        .expect("run caseledger");
    assert_eq!(out.status.code(), Some(0), "{path:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The entries of a help section (`Commands:`, `Arguments:`, `Options:`): the name or spec, and
/// its description (from the same line, or the next one in the long layout).
fn section(text: &str, title: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines.iter().position(|l| *l == title) else {
        return Vec::new();
    };
    let mut entries = Vec::new();
    let mut i = start + 1;
    while i < lines.len() && (lines[i].starts_with(' ') || lines[i].is_empty()) {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        if !line.trim().is_empty() && indent <= 6 {
            let body = line.trim_start();
            let (spec, description) = match body.find("  ") {
                Some(at) => (&body[..at], body[at..].trim()),
                None => (body, ""),
            };
            let description = if description.is_empty() {
                lines
                    .get(i + 1)
                    .filter(|next| next.len() - next.trim_start().len() > 6)
                    .map_or("", |next| next.trim())
            } else {
                description
            };
            entries.push((spec.to_owned(), description.to_owned()));
        }
        i += 1;
    }
    entries
}

/// Issue 10: every command's `--help` describes every argument and option and shows an example.
#[test]
fn every_help_documents_every_option_and_shows_an_example() {
    let mut pending: Vec<Vec<String>> = vec![Vec::new()];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&args);
        seen += 1;
        assert!(
            text.contains("\nExamples:\n  caseledger "),
            "{args:?} --help shows no example:\n{text}"
        );
        for title in ["Arguments:", "Options:"] {
            for (spec, description) in section(&text, title) {
                assert!(
                    !description.is_empty(),
                    "{args:?} --help leaves {spec} undocumented:\n{text}"
                );
            }
        }
        for (name, description) in section(&text, "Commands:") {
            if name == "help" {
                continue;
            }
            assert!(!description.is_empty(), "{args:?} {name} has no summary");
            let mut sub = path.clone();
            sub.push(name);
            pending.push(sub);
        }
    }
    assert!(seen > 25, "walked only {seen} commands");
}
