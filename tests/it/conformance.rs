//! Data-driven runner for the CommCare conformance suite (`tests/data/conformance`, a copy of
//! `shared/commcare/conformance` kept identical by `conformance_copy_is_in_sync`).
//!
//! Each folder is one scenario (format in its README): setup ops and steps run through the
//! facade, then the final expectations are checked. Rules cited by a scenario are printed with
//! its result. The project's additions (scenarios 35–41, SEMANTICS §12) also use step
//! expectations the shared format lacks: `instance_id`, `diagnostics`, `absent_diagnostics`.

use std::collections::BTreeSet;
use std::path::Path;

use caseledger::domain::{AppId, CaseId, Command, Event, GroupId, RecordedEvent, UserId};
use caseledger::{view, Engine, Request, SubmitOutcome};
use serde_json::Value;

use crate::support;

/// Scenarios whose rules belong to the conformance issue (#4) and are not implemented yet.
/// Each must still be *run*; the test fails if one of them starts passing while listed here.
const PENDING: &[&str] = &[];

/// Runs one op step; the events it recorded.
fn op(engine: &Engine, step: &Value) -> Result<Vec<RecordedEvent>, String> {
    let s = |k: &str| {
        step.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let b = |k: &str| step.get(k).and_then(Value::as_bool).unwrap_or(false);
    let cmd = match s("op").as_str() {
        "create_user" => Command::CreateUser {
            id: UserId::new(s("id")),
            username: s("username"),
        },
        "create_group" => Command::CreateGroup {
            id: GroupId::new(s("id")),
            name: s("name"),
            case_sharing: b("case_sharing"),
        },
        "add_member" => Command::AddMember {
            group: GroupId::new(s("group")),
            user: UserId::new(s("user")),
        },
        "remove_member" => Command::RemoveMember {
            group: GroupId::new(s("group")),
            user: UserId::new(s("user")),
        },
        "set_group_case_sharing" => Command::SetGroupCaseSharing {
            group: GroupId::new(s("group")),
            on: b("case_sharing"),
        },
        "create_app" => Command::CreateApp {
            id: AppId::new(s("id")),
            name: s("name"),
            case_sharing: b("case_sharing"),
            case_types: step
                .get("case_types")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
        },
        "set_app_case_sharing" => Command::SetAppCaseSharing {
            app: AppId::new(s("app")),
            on: b("case_sharing"),
        },
        other => return Err(format!("unknown op {other}")),
    };
    support::rt()
        .block_on(engine.execute(Request::new(cmd)))
        .map(|o| o.events)
        .map_err(|e| format!("op {step}: {e}"))
}

/// Project extension (tests/data/conformance/README.md, "Project additions"): a step's
/// `expect.diagnostics` must each be raised by that step, and no diagnostic raised by the step
/// may match an entry of `expect.absent_diagnostics` (an entry without `subject` matches any).
fn check_step_diagnostics(
    what: &str,
    want: &Value,
    events: &[RecordedEvent],
    errors: &mut Vec<String>,
) {
    let raised: Vec<(&str, &str)> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::DiagnosticRaisedV1(d) => {
                Some((d.diagnostic.code.as_str(), d.diagnostic.subject.as_str()))
            }
            _ => None,
        })
        .collect();
    let field = |d: &Value, k: &str| d.get(k).and_then(Value::as_str).map(str::to_owned);
    for d in want
        .get("diagnostics")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (code, subject) = (field(d, "code"), field(d, "subject"));
        if !raised
            .iter()
            .any(|(c, s)| Some(*c) == code.as_deref() && Some(*s) == subject.as_deref())
        {
            errors.push(format!(
                "{what}: did not raise {} {}; raised {raised:?}",
                code.unwrap_or_default(),
                subject.unwrap_or_default()
            ));
        }
    }
    for d in want
        .get("absent_diagnostics")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (code, subject) = (field(d, "code"), field(d, "subject"));
        for (c, s) in &raised {
            if Some(*c) == code.as_deref() && subject.as_deref().is_none_or(|x| x == *s) {
                errors.push(format!("{what}: raised {c} {s}, which it must not"));
            }
        }
    }
}

/// Subset match: only keys in `expected` are compared; `null` means absent or null.
fn matches(path: &str, expected: &Value, actual: Option<&Value>, errors: &mut Vec<String>) {
    match expected {
        Value::Null => {
            if !matches!(actual, None | Some(Value::Null)) {
                errors.push(format!(
                    "{path}: expected absent, got {}",
                    actual.unwrap_or(&Value::Null)
                ));
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                matches(
                    &format!("{path}.{k}"),
                    v,
                    actual.and_then(|a| a.get(k)),
                    errors,
                );
            }
        }
        _ => {
            if actual != Some(expected) {
                errors.push(format!(
                    "{path}: expected {expected}, got {}",
                    actual.map_or("absent".to_owned(), Value::to_string)
                ));
            }
        }
    }
}

/// The rules a scenario cites (`"rules"` in its scenario.json), for the report.
fn rules_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("scenario.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| {
            v.get("rules").and_then(Value::as_array).map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
        })
        .unwrap_or_default()
}

/// Runs one scenario folder; `Err` lists every mismatch.
pub fn run_scenario(dir: &Path) -> Result<(), Vec<String>> {
    let text =
        std::fs::read_to_string(dir.join("scenario.json")).map_err(|e| vec![e.to_string()])?;
    let scenario: Value = serde_json::from_str(&text).map_err(|e| vec![e.to_string()])?;
    let (_tmp, engine) = support::engine();
    let rt = support::rt();
    let mut errors = Vec::new();
    let empty = Vec::new();
    let list = |k: &str| {
        scenario
            .get(k)
            .and_then(Value::as_array)
            .unwrap_or(&empty)
            .clone()
    };
    for step in list("setup").iter().chain(list("steps").iter()) {
        let want = step.get("expect").cloned().unwrap_or(Value::Null);
        if step.get("op").is_some() {
            match op(&engine, step) {
                Ok(events) => {
                    check_step_diagnostics(&step.to_string(), &want, &events, &mut errors)
                }
                Err(e) => errors.push(e),
            }
            continue;
        }
        let file = step
            .get("submit")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let raw = std::fs::read(dir.join(file)).map_err(|e| vec![format!("{file}: {e}")])?;
        let app = step.get("app").and_then(Value::as_str).map(AppId::new);
        let sub = engine.prepare_submission(raw, app);
        let mut request = Request::new(Command::SubmitForm(Box::new(sub)));
        // Project extension: the server received time of the step (R9, R85).
        if let Some(t) = step.get("received_at").and_then(Value::as_str) {
            match caseledger::domain::Timestamp::parse_rfc3339(t) {
                Ok(t) => request.received_at = Some(t),
                Err(e) => errors.push(format!("{file}: received_at {t:?}: {e}")),
            }
        }
        let recorded = rt
            .block_on(engine.execute(request))
            .and_then(|o| SubmitOutcome::from_events(&o.events).map(|s| (s, o.events)));
        let (outcome, events) = match recorded {
            Ok(o) => o,
            Err(e) => {
                errors.push(format!("{file}: submit failed: {e}"));
                continue;
            }
        };
        check_step_diagnostics(file, &want, &events, &mut errors);
        // Project extension: the id the form was filed under (R55, R81).
        if let Some(id) = want.get("instance_id").and_then(Value::as_str) {
            if outcome.instance_id.as_str() != id {
                errors.push(format!(
                    "{file}: filed under {}, expected {id}",
                    outcome.instance_id
                ));
            }
        }
        let got_outcome = serde_json::to_value(outcome.outcome).unwrap_or(Value::Null);
        if want.get("outcome") != Some(&got_outcome) {
            errors.push(format!(
                "{file}: outcome {got_outcome}, expected {}",
                want.get("outcome").unwrap_or(&Value::Null)
            ));
        }
        let got_error = outcome.error.as_ref().map(|e| e.code.as_str());
        let want_error = want.get("error").and_then(Value::as_str);
        if got_error != want_error {
            errors.push(format!(
                "{file}: error {got_error:?}, expected {want_error:?} ({})",
                outcome.error.as_ref().map_or("", |e| e.message.as_str())
            ));
        }
    }
    let expect = scenario.get("expect").cloned().unwrap_or(Value::Null);
    let proj = engine.projections();
    if let Some(cases) = expect.get("cases").and_then(Value::as_object) {
        for (id, fields) in cases {
            match proj.case(&CaseId::new(id.as_str())) {
                Ok(Some(case)) => {
                    let actual = view::case_json(&case);
                    matches(id, fields, Some(&actual), &mut errors);
                }
                Ok(None) => errors.push(format!("case {id}: missing")),
                Err(e) => errors.push(format!("case {id}: {e}")),
            }
        }
    }
    for id in expect
        .get("absent_cases")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
    {
        let id = id.as_str().unwrap_or_default();
        if let Ok(Some(_)) = proj.case(&CaseId::new(id)) {
            errors.push(format!("case {id}: should be absent"));
        }
    }
    if let Some(lists) = expect.get("case_lists").and_then(Value::as_object) {
        for (user, ids) in lists {
            let want: BTreeSet<&str> = ids
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let got: BTreeSet<String> = proj
                .cases_for_user(user, false)
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.case_id.0)
                .collect();
            let got: BTreeSet<&str> = got.iter().map(String::as_str).collect();
            if want != got {
                errors.push(format!("case list of {user}: {got:?}, expected {want:?}"));
            }
        }
    }
    if let Some(diags) = expect.get("diagnostics").and_then(Value::as_array) {
        let rows = proj.diagnostics().unwrap_or_default();
        for d in diags {
            let code = d.get("code").and_then(Value::as_str).unwrap_or_default();
            let subject = d.get("subject").and_then(Value::as_str).unwrap_or_default();
            if !rows
                .iter()
                .any(|r| r.diagnostic.code.as_str() == code && r.diagnostic.subject == subject)
            {
                errors.push(format!("diagnostic {code} {subject}: missing"));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[test]
fn conformance_suite() {
    let root = support::conformance_dir();
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("tests/data/conformance")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("scenario.json").is_file())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 34,
        "suite incomplete: {} scenarios",
        dirs.len()
    );
    let mut failed = Vec::new();
    let mut report = String::new();
    for dir in &dirs {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let pending = PENDING.contains(&name.as_str());
        let rules = rules_of(dir);
        match run_scenario(dir) {
            Ok(()) => {
                report.push_str(&format!("PASS {name} [{rules}]\n"));
                if pending {
                    failed.push(format!("{name}: passes but is still listed as PENDING"));
                }
            }
            Err(errors) => {
                report.push_str(&format!(
                    "{} {name} [{rules}]\n    {}\n",
                    if pending { "PENDING" } else { "FAIL" },
                    errors.join("\n    ")
                ));
                if !pending {
                    failed.push(format!("{name}: {}", errors.join("; ")));
                }
            }
        }
    }
    eprintln!("{report}");
    assert!(
        failed.is_empty(),
        "conformance failures:\n{}",
        failed.join("\n")
    );
}

/// R79: the scenario format reads `null` as "absent or null", so it cannot tell a missing key
/// from a null one; the case JSON (R32) must carry `external_id` as `null`.
#[test]
fn r79_an_external_id_never_set_is_null_in_the_case_json() {
    use caseledger::demo::{form, Block};
    let w = support::World::empty();
    w.user("u-david", "david");
    w.app("app-anc", false, &["pregnancy"]);
    let block = Block {
        case_id: "c-1",
        user: "u-david",
        date: "2026-03-02T09:15:22.104+03:00",
        create: Some(("pregnancy", "Monica", None)),
        update: &[("edd", "2026-09-01")],
        close: false,
    };
    w.submit("app-anc", form("f-1", "u-david", &[block]));
    let json = view::case_json(&w.case("c-1"));
    assert_eq!(json.get("external_id"), Some(&Value::Null), "{json}");
}

/// The copy must match `../shared/commcare/conformance` when that folder is present
/// (a fresh clone without `../shared` runs from the copy alone). Scenario files changed on
/// purpose carry a `"caseledger_change"` note and are compared on their other fields. Project
/// additions (a folder whose scenario.json carries `"caseledger_addition"`, and the README's
/// section from [`ADDITIONS_HEADING`] on) exist only in the copy.
#[test]
fn conformance_copy_is_in_sync() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/commcare/conformance");
    if !shared.is_dir() {
        eprintln!("SKIP: ../shared/commcare/conformance not present; running from the copy");
        return;
    }
    let ours = support::conformance_dir();
    let mut differences = Vec::new();
    compare_dirs(&shared, &ours, &mut differences);
    compare_dirs(&ours, &shared, &mut differences);
    assert!(
        differences.is_empty(),
        "conformance copy out of sync:\n{}",
        differences.join("\n")
    );
}

/// Where the copy's README starts describing the project's additions.
const ADDITIONS_HEADING: &str = "\n## Project additions";

/// A scenario folder that exists only in the project's copy.
fn is_addition(dir: &Path) -> bool {
    std::fs::read(dir.join("scenario.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| v.get("caseledger_addition").is_some())
}

fn compare_dirs(a: &Path, b: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(a) else {
        out.push(format!("cannot read {}", a.display()));
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let pa = entry.path();
        let pb = b.join(entry.file_name());
        if pa.is_dir() {
            if !pb.exists() && is_addition(&pa) {
                continue;
            }
            compare_dirs(&pa, &pb, out);
            continue;
        }
        let readme = |bytes: Vec<u8>| -> Vec<u8> {
            match String::from_utf8(bytes) {
                Ok(mut t) => {
                    if let Some(at) = t.find(ADDITIONS_HEADING) {
                        t.truncate(at);
                    }
                    t.into_bytes()
                }
                Err(e) => e.into_bytes(),
            }
        };
        let is_readme = pa.file_name().is_some_and(|n| n == "README.md");
        let read = |p: &Path| std::fs::read(p).map(|b| if is_readme { readme(b) } else { b });
        match (read(&pa), read(&pb)) {
            (Ok(x), Ok(y)) if x == y => {}
            (Ok(x), Ok(y)) if pa.extension().is_some_and(|e| e == "json") => {
                let strip = |bytes: &[u8]| -> Option<Value> {
                    let mut v: Value = serde_json::from_slice(bytes).ok()?;
                    let changed = v.as_object_mut()?.remove("caseledger_change").is_some();
                    Some(if changed { Value::Null } else { v })
                };
                // A marked change is allowed to differ; an unmarked one is not.
                let (sx, sy) = (strip(&x), strip(&y));
                if sx != Some(Value::Null) && sy != Some(Value::Null) {
                    out.push(format!("{} differs", pb.display()));
                }
            }
            (Ok(_), Ok(_)) => out.push(format!("{} differs", pb.display())),
            _ => out.push(format!("{} missing", pb.display())),
        }
    }
}
