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
        .env_remove("CASELEDGER_STORE")
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

/// Runs the binary without `--json`.
fn run_text(data: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
        .arg("--data")
        .arg(data)
        .args(args)
        .env_remove("CASELEDGER_DATA")
        .env_remove("CASELEDGER_STORE")
        .output()
        .expect("run caseledger")
}

/// The `{"error":{"code","message"}}` object a failed `--json` command ends stderr with; fails
/// the test unless it has exactly that shape.
fn json_error(out: &Output) -> (String, String) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let value: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("stderr does not end with JSON ({e}): {stderr}"));
    let error = value["error"].as_object().expect("an error object");
    assert_eq!(value.as_object().map(|o| o.len()), Some(1), "{value}");
    assert_eq!(error.len(), 2, "{value}");
    let text = |k: &str| error[k].as_str().expect("a string").to_owned();
    (text("code"), text("message"))
}

/// Issue 10: a read-only command on a data dir without a store says so and creates nothing.
#[test]
fn read_only_commands_on_a_missing_data_dir_say_so_and_create_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("nowhere");
    for args in [
        &["case", "show", "c1"][..],
        &["case", "history", "c1"],
        &["case", "who-could-see", "c1"],
        &["cases", "--user", "u1"],
        &["groups"],
        &["diagnostics"],
        &["conflicts"],
        &["log"],
        &["verify"],
        &["export"],
        &["restore", "--user", "u1"],
        &["replay"],
        &["reprocess", "f1"],
        &["form", "archive", "f1"],
        &["group", "add-member", "g1", "u1"],
        &["app", "set-case-sharing", "a1", "on"],
    ] {
        let out = run(&data, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let (code, message) = json_error(&out);
        assert_eq!(code, "no_store", "{args:?}: {message}");
        assert!(message.contains("does not exist"), "{args:?}: {message}");
        assert!(!data.exists(), "{args:?} created the data dir");
        let text = run_text(&data, args);
        assert_eq!(text.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&text.stderr);
        assert_eq!(stderr.lines().count(), 1, "one sentence: {stderr}");
        assert!(stderr.starts_with("error: the data dir"), "{stderr}");
    }
    // An empty directory is no store either.
    std::fs::create_dir(&data).expect("mkdir");
    let (code, message) = json_error(&run(&data, &["groups"]));
    assert_eq!(code, "no_store");
    assert!(message.contains("holds no caseledger store"), "{message}");
    // A command that writes creates it.
    ok(
        &data,
        &["user", "create", "--id", "u1", "--username", "one"],
    );
    assert_eq!(ok(&data, &["groups"]), Value::Array(vec![]));
}

/// Issue 10: `submit /dev/zero` stops at the transport limit (4 x `Limits::max_bytes`) with a
/// clear error and appends nothing.
#[test]
fn submit_of_an_endless_input_stops_at_the_limit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    setup(data);
    let before = head(data);
    let out = run(data, &["submit", "/dev/zero", "--app", "app-anc"]);
    assert_eq!(out.status.code(), Some(1));
    let (code, message) = json_error(&out);
    assert_eq!(code, "too_large");
    assert!(
        message.contains("/dev/zero holds more than 67108864 bytes"),
        "{message}"
    );
    assert!(message.contains("nothing was stored"), "{message}");
    // An attachment is bounded the same way.
    let form = support::conformance_dir().join("01-shared-team/01-register.xml");
    let out = run(
        data,
        &[
            "submit",
            form.to_str().unwrap_or_default(),
            "--attachment",
            "/dev/zero",
        ],
    );
    assert_eq!(json_error(&out).0, "too_large");
    assert_eq!(head(data), before);
}

/// Issue 10: `submit` of a FIFO reads it before opening the store, so while it waits for a
/// writer the store stays free for other commands.
#[test]
fn submit_of_a_fifo_waits_without_holding_the_store() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    setup(&data);
    let fifo = tmp.path().join("form.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo (coreutils)");
    assert!(made.success(), "mkfifo {}", fifo.display());
    let mut waiting = std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
        .arg("--data")
        .arg(&data)
        .args(["--json", "submit", "--app", "app-anc"])
        .arg(&fifo)
        .env_remove("CASELEDGER_DATA")
        .env_remove("CASELEDGER_STORE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        waiting.try_wait().expect("poll").is_none(),
        "submit waits for a writer"
    );
    // The store is free meanwhile.
    ok(
        &data,
        &["user", "create", "--id", "u-late", "--username", "late"],
    );
    let form = std::fs::read(support::conformance_dir().join("01-shared-team/01-register.xml"))
        .expect("form");
    std::fs::write(&fifo, form).expect("write the fifo");
    let out = waiting.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"accepted\""));
}

/// Issue 10: while another process holds the store, a command fails at once with one sentence
/// naming it: `caseledger serve` by its `server.json`, else the pid that holds sled's lock.
#[test]
fn a_store_held_by_another_process_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    setup(data);
    let engine = caseledger::Engine::open(data, &"demo".into(), Default::default()).expect("open");
    let me = std::process::id();
    let proc_locks = std::path::Path::new("/proc/locks").exists();
    for args in [
        &["cases", "--user", "u-maria"][..],
        &["log"],
        &["verify"],
        &["user", "create", "--id", "u-new", "--username", "new"],
    ] {
        let out = run(data, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let (code, message) = json_error(&out);
        assert_eq!(code, "store_locked", "{args:?}: {message}");
        assert!(
            message.contains("is held by another process"),
            "{args:?}: {message}"
        );
        if proc_locks {
            assert!(
                message.contains(&format!("(pid {me}")),
                "{args:?}: {message}"
            );
        }
        assert!(!message.contains("could not acquire lock"), "{message}");
    }
    // The server's file names it and its address; the server answers at once.
    let server = serde_json::json!({
        "pid": me,
        "addr": "127.0.0.1:48123",
        "started_at": "2025-03-07T12:00:00Z",
    });
    std::fs::write(data.join("server.json"), server.to_string()).expect("server.json");
    let started = std::time::Instant::now();
    let out = run_text(data, &["groups"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: the data dir {} is held by caseledger serve (pid {me}, \
             http://127.0.0.1:48123); stop it, or send the command to it over HTTP",
            data.display()
        )
    );
    // Once the holder is gone, a server.json left behind does not matter.
    drop(engine);
    ok(data, &["groups"]);
}

/// Issue 10: under `--json` every error is one object with a stable code; exit codes are those of
/// the contract.
#[test]
fn errors_under_json_have_stable_codes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    setup(data);
    let reg = support::conformance_dir().join("01-shared-team/01-register.xml");
    ok(
        data,
        &[
            "submit",
            reg.to_str().unwrap_or_default(),
            "--app",
            "app-anc",
        ],
    );
    let case = "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10";
    for (args, want) in [
        (&["case", "show", "no-such-case"][..], "not_found"),
        (&["case", "history", "no-such-case"], "not_found"),
        (&["cases", "--user", "u-nope"], "not_found"),
        (&["group", "add-member", "g-nope", "u-david"], "not_found"),
        (&["conflicts", "show", "nope"], "not_found"),
        (&["restore", "--user", "u-nope"], "not_found"),
        (&["form", "archive", "no-such-form"], "not_found"),
        (
            &[
                "submit",
                reg.to_str().unwrap_or_default(),
                "--app",
                "app-nope",
            ],
            "not_found",
        ),
        (
            &["user", "create", "--id", "u-david", "--username", "again"],
            "already_exists",
        ),
        (&["case", "show", case, "--at", "999999"], "out_of_range"),
        (
            &["case", "show", case, "--as-of", "yesterday"],
            "invalid_input",
        ),
        (
            &["restore", "--user", "u-maria", "--since", "garbage"],
            "invalid_input",
        ),
        (&["submit", "/nonexistent/form.xml"], "io"),
        (&["no-such-command"], "usage"),
        (&["cases"], "usage"),
    ] {
        let out = run(data, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let (code, message) = json_error(&out);
        assert_eq!(code, want, "{args:?}: {message}");
        assert!(!message.is_empty());
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}

/// Checks that every line of a table lines up with its header row: each column after the first
/// starts where its header does, two spaces after the previous one.
fn assert_aligned(what: &str, stdout: &[u8]) {
    let text = String::from_utf8_lossy(stdout);
    let mut lines = text.lines();
    let header: Vec<char> = lines.next().unwrap_or_default().chars().collect();
    assert!(
        header
            .iter()
            .all(|c| c.is_ascii_uppercase() || *c == '_' || *c == ' '),
        "{what}: the first line is a header row: {text}"
    );
    let starts: Vec<usize> = (2..header.len())
        .filter(|&i| header[i] != ' ' && header[i - 1] == ' ' && header[i - 2] == ' ')
        .collect();
    assert!(!starts.is_empty(), "{what}: {text}");
    let mut rows = 0;
    for line in lines.filter(|l| !l.ends_with("(s)")) {
        let chars: Vec<char> = line.chars().collect();
        for &s in &starts {
            if chars.len() > s {
                assert_eq!(
                    chars[s - 1],
                    ' ',
                    "{what}: misaligned at column {s}:\n{text}"
                );
            }
        }
        rows += 1;
    }
    assert!(rows > 0, "{what}: no rows: {text}");
}

/// Issue 10: every table has a header row and aligned columns, whatever the widths of the values.
#[test]
fn tables_are_aligned_under_a_header_row() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    setup(data);
    ok(
        data,
        &[
            "group",
            "create",
            "--id",
            "g-a-much-longer-group-id-than-usual",
            "--name",
            "X",
        ],
    );
    let dir = support::conformance_dir().join("10-offline-received-order");
    let files: Vec<String> = ["01-register.xml", "02-maria-day4.xml", "03-david-day3.xml"]
        .iter()
        .map(|f| dir.join(f).display().to_string())
        .collect();
    let mut args = vec!["submit"];
    args.extend(files.iter().map(String::as_str));
    args.extend(["--app", "app-anc"]);
    let out = run_text(data, &args);
    assert_eq!(out.status.code(), Some(0));
    assert_aligned("submit", &out.stdout);
    let bad = data.join("bad.xml");
    std::fs::write(&bad, b"<data><unclosed></data>").expect("write");
    let out = run_text(data, &["submit", bad.to_str().unwrap_or_default()]);
    assert_eq!(out.status.code(), Some(2));
    assert_aligned("submit rejected", &out.stdout);
    let case = "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10";
    for args in [
        &["cases", "--user", "u-maria"][..],
        &["cases", "--owner", "g-team", "--at", "12"],
        &["groups"],
        &["diagnostics"],
        &["conflicts"],
        &["log"],
        &["case", "history", case],
    ] {
        let out = run_text(data, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert_aligned(&format!("{args:?}"), &out.stdout);
    }
    // who-could-see opens with a title line, then its table.
    let out = run_text(data, &["case", "who-could-see", case]);
    let text = String::from_utf8_lossy(&out.stdout);
    let table: Vec<&str> = text.lines().skip(1).collect();
    assert_aligned("who-could-see", table.join("\n").as_bytes());
}

/// Issue 10: a reader that goes away (`caseledger log | head -1`) ends the command quietly.
#[test]
fn a_closed_pipe_ends_quietly() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    {
        let engine =
            caseledger::Engine::open(data, &"demo".into(), Default::default()).expect("open");
        let requests = (0..1500)
            .map(|i| {
                caseledger::Request::new(caseledger::domain::Command::CreateUser {
                    id: format!("u-{i:05}").as_str().into(),
                    username: format!("worker number {i} of a long list"),
                })
            })
            .collect();
        let results = support::rt()
            .block_on(engine.execute_many(requests))
            .expect("execute");
        assert!(results.iter().all(Result::is_ok));
    }
    for args in [
        &["log", "--limit", "100000"][..],
        &["--json", "log", "--limit", "100000"],
        &["export"],
    ] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
            .arg("--data")
            .arg(data)
            .args(args)
            .env_remove("CASELEDGER_DATA")
            .env_remove("CASELEDGER_STORE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let mut first = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .expect("a line");
        assert!(!first.is_empty(), "{args:?}");
        // The reader is gone (dropped with the BufReader); the writer must end quietly.
        let out = child.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{args:?}");
    }
}

/// The help of `path` (`-h`, the one-line-per-option layout).
fn help(path: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
        .args(path)
        .arg("--help")
        .env_remove("CASELEDGER_DATA")
        .env_remove("CASELEDGER_STORE")
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

/// Runs the binary with `--json` and `envs` set (`CASELEDGER_STORE` is not inherited).
fn run_env(data: &Path, envs: &[(&str, &str)], args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
        .arg("--data")
        .arg(data)
        .arg("--json")
        .args(args)
        .env_remove("CASELEDGER_DATA")
        .env_remove("CASELEDGER_STORE")
        .envs(envs.iter().copied())
        .output()
        .expect("run caseledger")
}

/// Issue 11: a `--store` (or `$CASELEDGER_STORE`) that is neither `sled` nor
/// `nats://HOST:PORT[,HOST:PORT…]` is a usage error saying what is wrong, and nothing is opened.
#[test]
fn a_malformed_store_is_a_usage_error_naming_what_is_wrong() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    for (value, says) in [
        ("bogus", "neither sled nor a nats:// URL"),
        ("nats://db.example", "has no port"),
        ("nats://h:4222,", "an empty entry"),
        ("nats://h:4222,tls://h:4223", "a tls:// URL"),
        ("nats://h:99999", "not a number from 1 to 65535"),
        ("nats://user:secret@h:4222", "is not HOST:PORT"),
    ] {
        for out in [
            run(
                &data,
                &[
                    "--store",
                    value,
                    "user",
                    "create",
                    "--id",
                    "u1",
                    "--username",
                    "one",
                ],
            ),
            run_env(
                &data,
                &[("CASELEDGER_STORE", value)],
                &["user", "create", "--id", "u1", "--username", "one"],
            ),
        ] {
            assert_eq!(out.status.code(), Some(1), "{value}");
            let (code, message) = json_error(&out);
            assert_eq!(code, "usage", "{value}: {message}");
            assert!(message.contains(says), "{value}: {message}");
            assert!(
                message.contains("--store takes sled or nats://HOST:PORT[,HOST:PORT...]"),
                "{value}: {message}"
            );
            assert!(out.stdout.is_empty(), "{value}");
            assert!(!data.exists(), "{value}: the data dir was created");
        }
    }
    let text = run_text(&data, &["--store", "bogus", "groups"]);
    assert_eq!(text.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(
        stderr.starts_with("error: invalid value 'bogus' for '--store <STORE>'"),
        "{stderr}"
    );
}

/// Issue 11: `sled` is the default store, and naming it (flag or environment) changes nothing.
#[test]
fn sled_is_the_default_store_by_flag_or_environment() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    ok(
        data,
        &["user", "create", "--id", "u-maria", "--username", "maria"],
    );
    ok(
        data,
        &[
            "--store",
            "sled",
            "user",
            "create",
            "--id",
            "u-ana",
            "--username",
            "ana",
        ],
    );
    let out = run_env(data, &[("CASELEDGER_STORE", "sled")], &["log"]);
    assert_eq!(out.status.code(), Some(0));
    let log: Value = serde_json::from_slice(&out.stdout).expect("JSON log");
    assert_eq!(log.as_array().map(Vec::len), Some(2));
    assert_eq!(head(data), 2);
}

/// A loopback address where nothing listens: a port the kernel handed out, closed again.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Issue 11: a JetStream cluster that cannot be reached fails every command with
/// `unavailable` (exit 1), one sentence naming the cluster, and leaves no data dir behind.
#[test]
fn an_unreachable_cluster_is_unavailable_and_nothing_is_created() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("replica");
    let store = format!("nats://127.0.0.1:{}", closed_port());
    for args in [
        &["groups"][..],
        &["log"],
        &["verify"],
        &["export"],
        &["user", "create", "--id", "u1", "--username", "one"],
    ] {
        let mut all = vec!["--store", store.as_str()];
        all.extend_from_slice(args);
        let out = run(&data, &all);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let (code, message) = json_error(&out);
        assert_eq!(code, "unavailable", "{args:?}: {message}");
        assert!(
            message.contains(&format!("the JetStream cluster {store}")),
            "{args:?}: {message}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!data.exists(), "{args:?} created the data dir");
    }
}

/// Issue 11: `demo` runs on sled only; `import` into a JetStream store needs the cluster (it
/// checks the stream is empty before reading the export), and creates nothing without it.
#[test]
fn demo_refuses_a_nats_store_and_import_needs_its_cluster() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let store = format!("nats://127.0.0.1:{}", closed_port());
    let (code, message) = json_error(&run(&data, &["--store", &store, "demo"]));
    assert_eq!(code, "usage");
    assert!(
        message.contains("demo runs in a fresh sled data dir only"),
        "{message}"
    );
    let out = run(
        &data,
        &["--store", &store, "import", "/nonexistent/log.jsonl"],
    );
    assert_eq!(out.status.code(), Some(1));
    let (code, _) = json_error(&out);
    assert_eq!(code, "unavailable");
    assert!(!data.exists());
}
