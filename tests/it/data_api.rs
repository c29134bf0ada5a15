//! Issue 10: the data APIs `commcare-export` reads (`/a/{domain}/api/v0.5/{case,form,user,group}/`),
//! over a store loaded with the seed stories: the real client from PyPI, and the paging edges
//! it depends on (commcare/API.md §4.2).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use caseledger::demo::{form, Block};
use caseledger::domain::{Command, Role, UserId};
use caseledger::{Engine, EngineConfig, SubmitStatus};
use serde_json::Value;
use server::ServerConfig;

use crate::server::{apikey, basic, http, key, run, start};
use crate::stories::{play_all, Played};
use crate::support::World;

/// The pinned client.
const COMMCARE_EXPORT: &str = "commcare-export==1.16.0";

/// A store with the seed stories, an auditor key and a mobile worker with a password in `demo`,
/// and an admin key of project space `other`.
struct Store {
    dir: tempfile::TempDir,
    played: Played,
    auditor: String,
    other_admin: String,
}

const DAVID_PW: &str = "david-pw-123";

fn store(extra: impl FnOnce(&World)) -> Store {
    let w = World::stories();
    let played = play_all(&w);
    extra(&w);
    w.cmd(Command::CreateUser {
        id: UserId::new("u-export"),
        username: "exporter".into(),
    });
    w.cmd(Command::SetPassword {
        user: UserId::new("u-david"),
        hash: server::secret::hash(DAVID_PW).expect("hash"),
    });
    let (_, auditor) = w.rt.block_on(key(&w.engine, "u-export", Role::Auditor));
    let rt = crate::support::rt();
    let dir = w.into_dir();
    let other_admin = rt.block_on(async {
        let other =
            Engine::open(dir.path(), &"other".into(), EngineConfig::default()).expect("open");
        run(
            &other,
            vec![Command::CreateUser {
                id: UserId::new("u-export"),
                username: "exporter".into(),
            }],
        )
        .await;
        let (_, k) = key(&other, "u-export", Role::Admin).await;
        other.flush().expect("flush");
        k
    });
    Store {
        dir,
        played,
        auditor,
        other_admin,
    }
}

fn server_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn get_json(addr: std::net::SocketAddr, path: &str, auth: &str) -> (u16, Value, String) {
    let r = http(addr, "GET", path, &[("Authorization", auth)], b"").await;
    let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, v, r.body)
}

/// `indexed_on` as commcare-export sends it back: dateutil's naive `isoformat()`, no `Z`, no
/// fraction when the microseconds are 0 (API.md §4.2 item 4).
fn as_client_sends(indexed_on: &str) -> String {
    let naive = indexed_on.trim_end_matches('Z');
    match naive.split_once('.') {
        Some((s, "000000")) => s.to_owned(),
        _ => naive.to_owned(),
    }
}

/// Pages through a list as commcare-export's date paginator does, returning every object id
/// in order; fails on a page that brings nothing new (the client's "export is stuck").
async fn export_like_the_client(
    addr: std::net::SocketAddr,
    resource: &str,
    auth: &str,
    limit: usize,
) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    let mut previous: BTreeSet<String> = BTreeSet::new();
    let mut start: Option<String> = None;
    for _ in 0..1000 {
        let mut path = format!("/a/demo/api/v0.5/{resource}/?limit={limit}&order_by=indexed_on");
        if let Some(s) = &start {
            path.push_str(&format!("&indexed_on_start={}", s.replace(':', "%3A")));
        }
        let (status, page, body) = get_json(addr, &path, auth).await;
        assert_eq!(status, 200, "{path}: {body}");
        let objects = page["objects"].as_array().expect("objects").clone();
        let fresh: Vec<String> = objects
            .iter()
            .map(|o| o["id"].as_str().expect("id").to_owned())
            .filter(|id| !previous.contains(id))
            .collect();
        assert!(
            !fresh.is_empty() || objects.is_empty(),
            "{path} repeated the previous page"
        );
        ids.extend(fresh);
        previous = objects
            .iter()
            .map(|o| o["id"].as_str().expect("id").to_owned())
            .collect();
        if objects.is_empty() || page["meta"]["next"].is_null() {
            return ids;
        }
        let last = objects.last().expect("a last object");
        start = Some(as_client_sends(
            last["indexed_on"].as_str().expect("indexed_on"),
        ));
    }
    panic!("{resource}: more than 1000 pages");
}

#[test]
fn issue10_cases_sharing_a_millisecond_page_without_repeats_and_start_is_inclusive() {
    // One form with 12 case blocks: 12 cases changed at one position, in one millisecond.
    let s = store(|w| {
        let ids: Vec<String> = (0..12).map(|n| format!("c-many-{n:02}")).collect();
        let blocks: Vec<Block<'_>> = ids
            .iter()
            .map(|id| crate::stories::register(id, "u-david", None))
            .collect();
        let o = w.submit("app-anc", form("f-many", "u-david", &blocks));
        assert_eq!(o.outcome, SubmitStatus::Accepted);
    });
    let auth = apikey("exporter", &s.auditor);
    server_rt().block_on(async {
        let srv = start(s.dir.path(), ServerConfig::default()).await;
        let ids = export_like_the_client(srv.addr, "case", &auth, 5).await;
        let mut expected: Vec<String> = s.played.cases.iter().map(|c| c.id.to_owned()).collect();
        expected.extend((0..12).map(|n| format!("c-many-{n:02}")));
        assert_eq!(ids, expected, "every case once, in order of last change");

        // Every indexed_on unique and strictly increasing in listing order.
        let (_, all, _) = get_json(srv.addr, "/a/demo/api/v0.5/case/?limit=100", &auth).await;
        let stamps: Vec<String> = all["objects"]
            .as_array()
            .expect("objects")
            .iter()
            .map(|o| o["indexed_on"].as_str().expect("indexed_on").to_owned())
            .collect();
        assert_eq!(all["meta"]["total_count"], 20);
        assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");

        // indexed_on_start is inclusive, with or without the fraction.
        let tenth = &all["objects"][9];
        for start in [
            as_client_sends(tenth["indexed_on"].as_str().expect("indexed_on")),
            tenth["indexed_on"]
                .as_str()
                .expect("indexed_on")
                .trim_end_matches('Z')
                .to_owned(),
        ] {
            let path = format!(
                "/a/demo/api/v0.5/case/?limit=2&order_by=indexed_on&indexed_on_start={start}"
            );
            let (status, page, body) = get_json(srv.addr, &path, &auth).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                page["objects"][0]["id"], tenth["id"],
                "{start} is inclusive"
            );
            assert_eq!(page["meta"]["total_count"], 11);
            assert_eq!(
                page["meta"]["next"]
                    .as_str()
                    .map(|n| n.contains("offset=2")),
                Some(true),
                "{}",
                page["meta"]
            );
        }
        // indexed_on_end is inclusive too.
        let end = as_client_sends(tenth["indexed_on"].as_str().expect("indexed_on"));
        let (_, page, _) = get_json(
            srv.addr,
            &format!("/a/demo/api/v0.5/case/?limit=100&indexed_on_end={end}"),
            &auth,
        )
        .await;
        assert_eq!(page["meta"]["total_count"], 10);
        assert!(page["meta"]["next"].is_null());
        srv.stop().await;
    });
}

#[test]
fn issue10_data_api_doors_dates_and_objects() {
    let s = store(|_| {});
    let auditor = apikey("exporter", &s.auditor);
    server_rt().block_on(async {
        let srv = start(s.dir.path(), ServerConfig::default()).await;
        let a = srv.addr;
        // An auditor reads every resource.
        for resource in ["case", "form", "user", "group"] {
            let (status, v, body) =
                get_json(a, &format!("/a/demo/api/v0.5/{resource}/"), &auditor).await;
            assert_eq!(status, 200, "{resource}: {body}");
            assert!(
                v["meta"]["total_count"].as_u64().expect("total") > 0,
                "{resource}"
            );
            assert_eq!(v["meta"]["limit"], 20);
        }
        // Bad dates and unknown parameters are 400.
        for bad in [
            "indexed_on_start=2026-13-01",
            "indexed_on_start=yesterday",
            "indexed_on_start=2026-03-01T10:00:00Z",
            "indexed_on_end=2026-03-01T10:00:00.1234567",
            "limit=ten",
            "order_by=case_name",
            "case_type=pregnancy",
        ] {
            let (status, _, body) =
                get_json(a, &format!("/a/demo/api/v0.5/case/?{bad}"), &auditor).await;
            assert_eq!(status, 400, "{bad}: {body}");
        }
        for good in [
            "2026-03-01",
            "2026-03-01T10:00:00",
            "2026-03-01T10:00:00.5",
            "2026-03-01T10:00Z",
        ] {
            let (status, _, body) = get_json(
                a,
                &format!("/a/demo/api/v0.5/form/?indexed_on_start={good}"),
                &auditor,
            )
            .await;
            assert_eq!(status, 200, "{good}: {body}");
        }
        // Another project space's key, no key, and a mobile worker are refused.
        let other = apikey("exporter", &s.other_admin);
        let (status, _, _) = get_json(a, "/a/demo/api/v0.5/case/", &other).await;
        assert_eq!(status, 401, "a key of `other` does not open `demo`");
        let (status, v, _) = get_json(a, "/a/other/api/v0.5/case/", &other).await;
        assert_eq!(
            (status, &v["meta"]["total_count"]),
            (200, &Value::from(0)),
            "but its own"
        );
        let r = http(a, "GET", "/a/demo/api/v0.5/case/", &[], b"").await;
        assert_eq!(r.status, 401);
        let (status, _, _) =
            get_json(a, "/a/demo/api/v0.5/case/", &basic("u-david", DAVID_PW)).await;
        assert_eq!(status, 403, "mobile workers have no API access");

        // A case and a form by id, in the shape of API.md §3.3 and §3.4.
        let (status, c, body) = get_json(a, "/a/demo/api/v0.5/case/c-closed/", &auditor).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(c["id"], "c-closed");
        assert_eq!(c["closed"], true);
        assert_eq!(c["closed_by"], "u-maria");
        assert_eq!(c["user_id"], "u-david");
        assert_eq!(c["properties"]["owner_id"], "g-team");
        assert_eq!(c["properties"]["case_type"], "pregnancy");
        assert_eq!(c["properties"]["pnc"], "done");
        assert_eq!(
            c["xform_ids"],
            serde_json::json!(["f-close-1", "f-close-2", "f-close-3"])
        );
        assert_eq!(c["resource_uri"], "/a/demo/api/v0.5/case/c-closed/");
        assert!(
            c["indexed_on"]
                .as_str()
                .is_some_and(|s| s.ends_with('Z') && s.len() == 27),
            "{c}"
        );
        let (status, f, body) = get_json(a, "/a/demo/api/v0.5/form/f-uc2-2/", &auditor).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(f["app_id"], "app-clinic");
        assert_eq!(f["form"]["meta"]["userID"], "u-grace");
        assert_eq!(f["form"]["case"]["@case_id"], "c-uc2");
        assert_eq!(f["archived"], false);
        let (status, _, _) = get_json(a, "/a/demo/api/v0.5/case/c-err/", &auditor).await;
        assert_eq!(status, 404, "a rejected form made no case");

        // Archived forms only when asked; users and groups page by offset through meta.next.
        let (_, forms, _) = get_json(a, "/a/demo/api/v0.5/form/?limit=100", &auditor).await;
        let (_, with, _) = get_json(
            a,
            "/a/demo/api/v0.5/form/?limit=100&include_archived=true",
            &auditor,
        )
        .await;
        assert_eq!(forms["meta"]["total_count"], 14);
        assert_eq!(with["meta"]["total_count"], 15);
        let (_, users, _) = get_json(a, "/a/demo/api/v0.5/user/?limit=4", &auditor).await;
        assert_eq!(users["meta"]["total_count"], 7);
        let next = users["meta"]["next"].as_str().expect("next").to_owned();
        let (_, rest, _) = get_json(a, &next, &auditor).await;
        assert_eq!(rest["objects"].as_array().map(Vec::len), Some(3));
        assert!(rest["meta"]["next"].is_null());
        let (_, groups, _) = get_json(a, "/a/demo/api/v0.5/group/", &auditor).await;
        let team = &groups["objects"][1];
        assert_eq!(
            (&team["id"], &team["case_sharing"]),
            (&Value::from("g-team"), &Value::from(true))
        );
        assert_eq!(team["users"].as_array().map(Vec::len), Some(4));
        srv.stop().await;
    });
}

// ---------------------------------------------------------------------------------------------
// The real client.

/// Where the client's venv lives: `CASELEDGER_COMMCARE_EXPORT_VENV`, else a cache under the
/// target dir, reused across runs.
fn venv_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CASELEDGER_COMMCARE_EXPORT_VENV") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/cache/commcare-export-1.16.0")
}

fn require_services() -> bool {
    std::env::var("CASELEDGER_REQUIRE_SERVICES").as_deref() == Ok("1")
}

/// A SKIP line, or a failure under `CASELEDGER_REQUIRE_SERVICES=1`.
fn skip(reason: &str) -> Option<PathBuf> {
    assert!(
        !require_services(),
        "commcare-export is required (CASELEDGER_REQUIRE_SERVICES=1) but {reason}"
    );
    eprintln!("SKIP: commcare-export test: {reason}");
    None
}

fn run_step(program: &Path, args: &[&str]) -> Result<(), String> {
    let out = Process::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{} cannot run: {e}", program.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} {} failed: {}{}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The `commcare-export` executable of the cached venv, installing it from PyPI when absent.
fn commcare_export() -> Option<PathBuf> {
    let dir = venv_dir();
    let exe = dir.join("bin").join("commcare-export");
    let done = dir.join(".installed");
    if exe.exists() && done.exists() {
        return Some(exe);
    }
    let python = std::env::var("CASELEDGER_PYTHON").unwrap_or_else(|_| "python3".into());
    let python = PathBuf::from(python);
    if Process::new(&python).arg("--version").output().is_err() {
        return skip(&format!("{} is not installed", python.display()));
    }
    let dir_text = dir.display().to_string();
    let pip = dir.join("bin").join("pip");
    let installed = run_step(&python, &["-m", "venv", &dir_text])
        .and_then(|()| run_step(&pip, &["install", "--quiet", COMMCARE_EXPORT]))
        .and_then(|()| std::fs::write(&done, COMMCARE_EXPORT).map_err(|e| e.to_string()));
    match installed {
        Ok(()) => Some(exe),
        Err(e) => skip(&format!("its venv could not be made: {e}")),
    }
}

/// API.md §4.6's query: one table of `headings` from `refs` of `resource`'s objects.
fn query(resource: &str, table: &str, headings: &[&str], refs: &[&str]) -> String {
    let headings: Vec<Value> = headings
        .iter()
        .map(|h| serde_json::json!({"Lit": h}))
        .collect();
    let refs: Vec<Value> = refs.iter().map(|r| serde_json::json!({"Ref": r})).collect();
    serde_json::json!({"Bind": {"name": "checkpoint_manager",
        "value": {"Apply": {"fn": {"Ref": "get_checkpoint_manager"},
                            "args": [{"Lit": resource}, {"Lit": [table]}]}},
        "body": {"Emit": {"table": table, "headings": headings,
            "source": {"Map": {
                "source": {"Apply": {"fn": {"Ref": "api_data"},
                                     "args": [{"Lit": resource}, {"Ref": "checkpoint_manager"}]}},
                "body": {"List": refs}}}}}}})
    .to_string()
}

/// The body rows of a markdown table, cells trimmed.
fn markdown_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|cells| {
            !cells
                .iter()
                .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        })
        .skip(1)
        .collect()
}

#[test]
fn issue10_commcare_export_exports_the_seed_stories_cases_and_forms() {
    let Some(exe) = commcare_export() else { return };
    let s = store(|_| {});
    let work = tempfile::tempdir().expect("tmp");
    let cases_q = work.path().join("cases.json");
    let forms_q = work.path().join("forms.json");
    std::fs::write(
        &cases_q,
        query(
            "case",
            "cases",
            &["case_id", "owner_id", "case_type", "closed"],
            &[
                "case_id",
                "properties.owner_id",
                "properties.case_type",
                "closed",
            ],
        ),
    )
    .expect("write");
    std::fs::write(
        &forms_q,
        query("form", "forms", &["form_id", "app_id"], &["id", "app_id"]),
    )
    .expect("write");
    server_rt().block_on(async {
        let srv = start(s.dir.path(), ServerConfig::default()).await;
        let hq = format!("http://{}", srv.addr);
        let mut outputs = Vec::new();
        for q in [&cases_q, &forms_q] {
            let args: Vec<String> = [
                "--project",
                "demo",
                "--commcare-hq",
                &hq,
                "--auth-mode",
                "apikey",
                "--username",
                "exporter",
                "--password",
                &s.auditor,
                "--query",
                &q.display().to_string(),
                "--output-format",
                "markdown",
                "--batch-size",
                "3",
                "--verbose",
            ]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
            let exe = exe.clone();
            // It writes `commcare_export.log` into its working directory: the scratch one.
            let cwd = work.path().to_path_buf();
            let out = tokio::task::spawn_blocking(move || {
                Process::new(exe).args(&args).current_dir(cwd).output()
            })
            .await
            .expect("task")
            .expect("commcare-export runs");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                out.status.success(),
                "commcare-export failed:\n{stdout}\n{stderr}"
            );
            outputs.push((stdout, stderr));
        }
        srv.stop().await;

        let (cases_out, cases_err) = &outputs[0];
        let rows = markdown_rows(cases_out);
        let expected: Vec<Vec<String>> = s
            .played
            .cases
            .iter()
            .map(|c| {
                let closed = if c.closed { "True" } else { "False" };
                vec![
                    c.id.into(),
                    c.owner.into(),
                    c.case_type.into(),
                    closed.into(),
                ]
            })
            .collect();
        assert_eq!(rows, expected, "cases exported:\n{cases_out}\n{cases_err}");
        let (forms_out, forms_err) = &outputs[1];
        let ids: Vec<String> = markdown_rows(forms_out)
            .into_iter()
            .map(|r| r[0].clone())
            .collect();
        assert_eq!(
            ids, s.played.forms,
            "forms exported:\n{forms_out}\n{forms_err}"
        );
        let requests = |err: &str| err.lines().filter(|l| l.starts_with("Fetching")).count();
        assert!(
            requests(cases_err) > 2 && requests(forms_err) > 2,
            "several pages each"
        );
        eprintln!(
            "commcare-export 1.16.0 exported {} cases in {} requests and {} forms in {} requests",
            rows.len(),
            requests(cases_err),
            ids.len(),
            requests(forms_err)
        );
    });
}
