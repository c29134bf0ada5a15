//! Issue 10: the HTTP server, door by door. Each test starts a server in-process on
//! 127.0.0.1:0 over a temporary data dir and speaks HTTP/1.1 to it over a plain socket.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use caseledger::domain::{ApiKeyId, Command, Event, Role, UserId};
use caseledger::{Engine, EngineConfig, Request};
use server::{LoginLimit, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response as read off the socket.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) body: String,
}

impl Response {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// One request on a fresh connection (`Connection: close`), the response read to its end.
pub(crate) async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_http(addr, method, path, headers, body)
        .await
        .expect("a response")
}

/// [`http`], `None` when the connection fails or ends before a response head.
pub(crate) async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Response> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    stream.write_all(body).await.ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

pub(crate) fn basic(login: &str, password: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{login}:{password}"));
    format!("Basic {b}")
}

/// A form by `user` creating case `case`, with instance id `id`.
pub(crate) fn form(id: &str, user: &str, case: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<data xmlns="http://openrosa.org/formdesigner/F1">
  <case xmlns="http://commcarehq.org/case/transaction/v2" case_id="{case}" date_modified="2026-01-01T10:00:00Z" user_id="{user}">
    <create><case_type>patient</case_type><case_name>{case}</case_name><owner_id>{user}</owner_id></create>
  </case>
  <meta xmlns="http://openrosa.org/jr/xforms"><instanceID>{id}</instanceID><userID>{user}</userID><timeEnd>2026-01-01T10:00:00Z</timeEnd></meta>
</data>"#
    )
}

pub(crate) const DAVID_PW: &str = "david-correct-horse";
pub(crate) const MARIA_PW: &str = "maria-battery-staple";

/// Keys made in `seed`, as (key id, full key).
pub(crate) struct Keys {
    pub(crate) admin: String,
    pub(crate) service: String,
    pub(crate) auditor: String,
    revoked: String,
    pub(crate) other_admin: String,
}

pub(crate) async fn run(engine: &Engine, commands: Vec<Command>) {
    for c in commands {
        engine.execute(Request::new(c)).await.expect("command");
    }
}

pub(crate) async fn key(engine: &Engine, user: &str, role: Role) -> (ApiKeyId, String) {
    let k = server::secret::new_api_key().expect("key");
    run(
        engine,
        vec![Command::CreateApiKey {
            key_id: k.key_id.clone(),
            user: UserId::new(user),
            role,
            hash: k.hash,
        }],
    )
    .await;
    (k.key_id, k.key)
}

/// Project space `demo` with mobile workers david and maria (passwords) and a service user
/// with keys of every role (one revoked); project space `other` with an admin key of its own.
pub(crate) async fn seed(dir: &Path) -> Keys {
    let engine = Engine::open(dir, &"demo".into(), EngineConfig::default()).expect("open");
    let mut commands = Vec::new();
    for (id, name, pw) in [
        ("u-david", "david", DAVID_PW),
        ("u-maria", "maria", MARIA_PW),
    ] {
        commands.push(Command::CreateUser {
            id: UserId::new(id),
            username: name.into(),
        });
        commands.push(Command::SetPassword {
            user: UserId::new(id),
            hash: server::secret::hash(pw).expect("hash"),
        });
    }
    commands.push(Command::CreateUser {
        id: UserId::new("u-svc"),
        username: "svc".into(),
    });
    commands.push(Command::CreateApp {
        id: "app-x".into(),
        name: "X".into(),
        case_sharing: false,
        case_types: vec!["patient".into()],
    });
    run(&engine, commands).await;
    let (_, admin) = key(&engine, "u-svc", Role::Admin).await;
    let (_, service) = key(&engine, "u-svc", Role::Service).await;
    let (_, auditor) = key(&engine, "u-svc", Role::Auditor).await;
    let (revoked_id, revoked) = key(&engine, "u-svc", Role::Admin).await;
    run(&engine, vec![Command::RevokeApiKey { key_id: revoked_id }]).await;
    engine.flush().expect("flush");
    drop(engine);
    let other = Engine::open(dir, &"other".into(), EngineConfig::default()).expect("open");
    run(
        &other,
        vec![Command::CreateUser {
            id: UserId::new("u-svc"),
            username: "svc".into(),
        }],
    )
    .await;
    let (_, other_admin) = key(&other, "u-svc", Role::Admin).await;
    other.flush().expect("flush");
    Keys {
        admin,
        service,
        auditor,
        revoked,
        other_admin,
    }
}

/// A running server: its address, the signal that stops it, and its task.
pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), server::ServerError>>,
}

pub(crate) async fn start(dir: &Path, config: ServerConfig) -> Running {
    let server = Server::bind(dir, "127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("bind");
    let addr = server.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

impl Running {
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("server task")
            .expect("clean shutdown");
    }
}

pub(crate) fn apikey(login: &str, key: &str) -> String {
    format!("ApiKey {login}:{key}")
}

const RECEIVER: &str = "/a/demo/receiver/secure/";
const RESTORE: &str = "/a/demo/phone/restore/?version=2.0";

pub(crate) fn events(dir: &Path, domain: &str) -> Vec<Event> {
    let engine = Engine::open(dir, &domain.into(), EngineConfig::default()).expect("reopen");
    engine
        .log()
        .iter_from(caseledger::domain::Position(1))
        .map(|e| e.expect("event").event)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_no_credentials_is_401_with_a_basic_challenge_and_health_reveals_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    for (method, path) in [
        ("GET", RESTORE),
        ("POST", RECEIVER),
        ("POST", "/a/demo/receiver/"),
    ] {
        let r = http(s.addr, method, path, &[], b"<x/>").await;
        assert_eq!(r.status, 401, "{method} {path}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Basic realm=\"caseledger\"")
        );
    }
    let r = http(s.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let r = http(s.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    let running = dir.path().join("server.json");
    let file: server::ServerFile =
        serde_json::from_slice(&std::fs::read(&running).expect("server.json while serving"))
            .expect("server.json");
    assert_eq!(file.addr, s.addr.to_string());
    assert_eq!(file.pid, std::process::id());
    s.stop().await;
    assert!(!running.exists(), "server.json removed on clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_wrong_password_is_401_and_repeated_failures_429_with_retry_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(dir.path()).await;
    let config = ServerConfig {
        login_limit: LoginLimit {
            burst: 3,
            refill: Duration::from_secs(60),
        },
        ..ServerConfig::default()
    };
    let s = start(dir.path(), config).await;
    let wrong = basic("david", "not-the-password");
    for _ in 0..3 {
        let r = http(s.addr, "GET", RESTORE, &[("Authorization", &wrong)], b"").await;
        assert_eq!(r.status, 401);
    }
    // Throttled now, even with the right password: guessing costs time.
    let right = basic("david", DAVID_PW);
    let r = http(s.addr, "GET", RESTORE, &[("Authorization", &right)], b"").await;
    assert_eq!(r.status, 429);
    let wait: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After seconds");
    assert!((1..=60).contains(&wait), "{wait}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_a_mobile_worker_submits_and_restores_only_as_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let david = basic("david", DAVID_PW);
    let r = http(
        s.addr,
        "POST",
        RECEIVER,
        &[("Authorization", &david)],
        form("f-as-maria", "u-maria", "c-1").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 403, "meta userID is maria: {}", r.body);
    let r = http(
        s.addr,
        "GET",
        "/a/demo/phone/restore/?version=2.0&user_id=u-maria",
        &[("Authorization", &david)],
        b"",
    )
    .await;
    assert_eq!(r.status, 403);
    // As itself, both work; the login may be the username or the user id.
    let r = http(
        s.addr,
        "POST",
        RECEIVER,
        &[("Authorization", &basic("u-david", DAVID_PW))],
        form("f-as-david", "u-david", "c-1").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = http(s.addr, "GET", RESTORE, &[("Authorization", &david)], b"").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("case_id=\"c-1\""), "{}", r.body);
    s.stop().await;
    let forms: Vec<String> = events(dir.path(), "demo")
        .iter()
        .filter_map(|e| e.form_record().map(|f| f.form_id.0.clone()))
        .collect();
    assert_eq!(forms, ["f-as-david"], "the refused form was not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_roles_and_project_spaces_bound_every_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let auditor = apikey("svc", &keys.auditor);
    // The auditor reads any user's restore, and writes nothing.
    let r = http(
        s.addr,
        "GET",
        "/a/demo/phone/restore/?version=2.0&user_id=u-david",
        &[("Authorization", &auditor)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(
        s.addr,
        "POST",
        RECEIVER,
        &[("Authorization", &auditor)],
        form("f-aud", "u-david", "c-2").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 403);
    // Service and admin keys submit on behalf of any user; scheme spelled as commcare-export
    // does, and an API key in the Basic password's place (HQ's fallback).
    for (i, header) in [
        format!("apikey svc:{}", keys.service),
        basic("svc", &keys.admin),
    ]
    .iter()
    .enumerate()
    {
        let r = http(
            s.addr,
            "POST",
            RECEIVER,
            &[("Authorization", header)],
            form(&format!("f-svc-{i}"), "u-maria", &format!("c-svc-{i}")).as_bytes(),
        )
        .await;
        assert_eq!(r.status, 201, "{header}: {}", r.body);
    }
    // A key of project space `other` does not reach `demo`, though its login exists in both;
    // it does reach its own.
    let other = apikey("svc", &keys.other_admin);
    let r = http(
        s.addr,
        "GET",
        "/a/demo/phone/restore/?user_id=u-david",
        &[("Authorization", &other)],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    let r = http(
        s.addr,
        "GET",
        "/a/other/phone/restore/?user_id=u-svc",
        &[("Authorization", &other)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A revoked key is refused; a project space that does not exist says what a wrong key does.
    let r = http(
        s.addr,
        "GET",
        RESTORE,
        &[("Authorization", &apikey("svc", &keys.revoked))],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    let r = http(
        s.addr,
        "GET",
        "/a/nowhere/phone/restore/",
        &[("Authorization", &apikey("svc", &keys.admin))],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    // A key presented under another user's login is refused.
    let r = http(
        s.addr,
        "GET",
        RESTORE,
        &[("Authorization", &apikey("david", &keys.admin))],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_passwords_and_keys_are_in_the_log_and_export_only_as_hashes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = seed(dir.path()).await;
    let secrets = [
        DAVID_PW.to_owned(),
        MARIA_PW.to_owned(),
        keys.admin.clone(),
        keys.service.split_once('.').expect("key").1.to_owned(),
        keys.auditor.clone(),
    ];
    let mut export = Vec::new();
    caseledger::audit::export(
        dir.path(),
        &"demo".into(),
        caseledger::domain::Position(1),
        None,
        &mut export,
    )
    .expect("export");
    let export = String::from_utf8(export).expect("utf-8");
    let logged: Vec<String> = events(dir.path(), "demo")
        .iter()
        .map(|e| serde_json::to_string(e).expect("json"))
        .collect();
    assert!(export.contains("$argon2id$"), "hashes are exported");
    for s in &secrets {
        assert!(!export.contains(s.as_str()), "secret in the export");
        assert!(
            logged.iter().all(|e| !e.contains(s.as_str())),
            "secret in the log"
        );
    }
    // Nor anywhere in the store's files.
    let mut files = vec![dir.path().to_path_buf()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(
                std::fs::read_dir(&p)
                    .expect("dir")
                    .map(|e| e.expect("entry").path()),
            );
        } else {
            let bytes = std::fs::read(&p).expect("file");
            for s in &secrets {
                assert!(
                    !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                    "secret in {}",
                    p.display()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_receiver_statuses_follow_api_md_1_5() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let david = basic("david", DAVID_PW);
    let v3 = [
        ("Authorization", david.as_str()),
        ("X-OpenRosa-Version", "3.0"),
    ];
    let v2 = [
        ("Authorization", david.as_str()),
        ("X-OpenRosa-Version", "2.1"),
    ];
    let f = form("f-1", "u-david", "c-1");
    let accepted = http(
        s.addr,
        "POST",
        "/a/demo/receiver/secure/",
        &v3,
        f.as_bytes(),
    )
    .await;
    assert_eq!(accepted.status, 201, "{}", accepted.body);
    assert!(accepted.body.contains("nature=\"submit_success\""));
    assert_eq!(accepted.header("x-commcarehq-formid"), Some("f-1"));
    assert_eq!(
        accepted.header("location"),
        Some("/a/demo/api/v0.5/form/f-1/")
    );
    let at: u64 = accepted
        .header("x-caseledger-position")
        .and_then(|p| p.parse().ok())
        .expect("position header");
    // Duplicate: 201 either way; success under 3.0, submit_error before.
    let dup3 = http(s.addr, "POST", "/a/demo/receiver/", &v3, f.as_bytes()).await;
    assert_eq!(dup3.status, 201);
    assert!(dup3.body.contains("nature=\"submit_success\""));
    let dup2 = http(s.addr, "POST", "/a/demo/receiver/", &v2, f.as_bytes()).await;
    assert_eq!(dup2.status, 201);
    assert!(dup2.body.contains("nature=\"submit_error\""));
    let dup_at: u64 = dup2
        .header("x-caseledger-position")
        .and_then(|p| p.parse().ok())
        .expect("position header");
    assert!(dup_at > at, "a duplicate is stored too, after the form");
    // Rejected (an index to a case that does not exist): 422 under 3.0, 201 before; stored.
    let bad = |id: &str| {
        f.replace("f-1", id).replace(
            "</create>",
            "</create><index><parent case_type=\"x\">no-such-case</parent></index>",
        )
    };
    let r3 = http(
        s.addr,
        "POST",
        "/a/demo/receiver/secure/app-x/",
        &v3,
        bad("f-bad3").as_bytes(),
    )
    .await;
    assert_eq!(r3.status, 422, "{}", r3.body);
    assert!(r3.body.contains("nature=\"processing_failure\""));
    let r2 = http(
        s.addr,
        "POST",
        "/a/demo/receiver/app-x/",
        &v2,
        bad("f-bad2").as_bytes(),
    )
    .await;
    assert_eq!(r2.status, 201, "{}", r2.body);
    assert!(r2.body.contains("nature=\"submit_error\""));
    assert_eq!(r2.header("x-commcarehq-formid"), Some("f-bad2"));
    // GET on the receiver is not a route.
    let get = http(s.addr, "GET", RECEIVER, &[("Authorization", &david)], b"").await;
    assert_eq!(get.status, 405);
    s.stop().await;
    let kinds: Vec<&str> = events(dir.path(), "demo")
        .iter()
        .filter(|e| e.form_record().is_some())
        .map(|e| e.type_name())
        .collect::<Vec<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        kinds,
        [
            "FormAccepted",
            "FormDuplicate",
            "FormDuplicate",
            "FormRejected",
            "FormRejected"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_multipart_keeps_attachments_and_the_last_sync_token_with_the_form() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let david = basic("david", DAVID_PW);
    let boundary = "XyZ123";
    let photo: &[u8] = b"\x89PNG\r\n\x1a\n\x00 not really a photo \xff";
    let mut body = Vec::new();
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"xml_submission_file\"; filename=\"form.xml\"\r\nContent-Type: text/xml\r\n\r\n").as_bytes());
    body.extend_from_slice(form("f-mp", "u-david", "c-mp").as_bytes());
    body.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"1.jpg\"; filename=\"1.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").as_bytes());
    body.extend_from_slice(photo);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let token = "3-0123456789abcdef0123456789abcdef";
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let r = http(
        s.addr,
        "POST",
        "/a/demo/receiver/secure/app-x/",
        &[
            ("Authorization", &david),
            ("Content-Type", &content_type),
            ("X-CommCareHQ-LastSyncToken", token),
        ],
        &body,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Without xml_submission_file: 400, nothing stored.
    let r = http(
        s.addr,
        "POST",
        RECEIVER,
        &[("Authorization", &david), ("Content-Type", &content_type)],
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"x\"; filename=\"x\"\r\n\r\nx\r\n--{boundary}--\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    s.stop().await;
    let all = events(dir.path(), "demo");
    let files: Vec<_> = all
        .iter()
        .filter_map(|e| match e {
            Event::FormAttachmentsV1(a) => Some((a.form_id.0.clone(), a.files.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].0, "f-mp");
    assert_eq!(files[0].1[0].name, "1.jpg");
    assert_eq!(files[0].1[0].bytes, photo);
    let tokens: Vec<_> = all
        .iter()
        .filter_map(|e| match e {
            Event::FormLastSyncTokenV1(t) => Some((t.form_id.0.as_str(), t.token.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(tokens, [("f-mp", token)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_restore_is_the_cli_payload_and_a_foreign_token_is_412() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let david = basic("david", DAVID_PW);
    let maria = basic("maria", MARIA_PW);
    let r = http(
        s.addr,
        "POST",
        RECEIVER,
        &[("Authorization", &david)],
        form("f-1", "u-david", "c-1").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201);
    let first = http(s.addr, "GET", RESTORE, &[("Authorization", &david)], b"").await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("content-type"),
        Some("text/xml; charset=utf-8")
    );
    assert!(first.body.contains("nature=\"ota_restore_success\""));
    let token = first
        .body
        .split("<restore_id>")
        .nth(1)
        .and_then(|t| t.split("</restore_id>").next())
        .expect("restore_id")
        .to_owned();
    // Incremental with david's own token: nothing changed since.
    let again = http(
        s.addr,
        "GET",
        &format!("{RESTORE}&since={token}&device_id=d1"),
        &[("Authorization", &david)],
        b"",
    )
    .await;
    assert_eq!(again.status, 200);
    assert!(!again.body.contains("<case "), "{}", again.body);
    // Maria with david's token, and anyone with a made-up one: 412, ota_restore_error.
    for (who, since) in [(&maria, token.as_str()), (&david, "1-notatoken")] {
        let r = http(
            s.addr,
            "GET",
            &format!("{RESTORE}&since={since}"),
            &[("Authorization", who)],
            b"",
        )
        .await;
        assert_eq!(r.status, 412, "{since}: {}", r.body);
        assert!(r.body.contains("nature=\"ota_restore_error\""));
    }
    s.stop().await;
    // The same payload as the library (and so the CLI) builds, but for the token.
    let engine = Engine::open(dir.path(), &"demo".into(), EngineConfig::default()).expect("open");
    let cli = caseledger::restore::restore(&engine, "u-david", None).expect("restore");
    let strip = |x: &str| {
        x.split("<restore_id>")
            .map(|p| p.split_once("</restore_id>").map_or(p, |(_, rest)| rest))
            .collect::<Vec<_>>()
            .join("")
    };
    assert_eq!(strip(&first.body), strip(&cli.xml));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_graceful_shutdown_loses_no_acknowledged_form() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let addr = s.addr;
    let david = basic("david", DAVID_PW);
    let mut clients = Vec::new();
    for c in 0..4 {
        let auth = david.clone();
        clients.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..25 {
                let id = format!("f-{c}-{i}");
                let xml = form(&id, "u-david", &format!("c-{c}-{i}"));
                let headers = [("Authorization", auth.as_str())];
                // Refused or cut off by the shutdown: not acknowledged, a phone would resend.
                match try_http(addr, "POST", RECEIVER, &headers, xml.as_bytes()).await {
                    Some(r) if r.status == 201 => acked.push(id),
                    _ => {}
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.stop().await;
    let mut acked = Vec::new();
    for c in clients {
        acked.extend(c.await.expect("client"));
    }
    assert!(
        !acked.is_empty(),
        "some forms were acknowledged before the shutdown"
    );
    let stored: std::collections::BTreeSet<String> = events(dir.path(), "demo")
        .iter()
        .filter_map(|e| match e {
            Event::FormAcceptedV1(f) => Some(f.form.form_id.0.clone()),
            _ => None,
        })
        .collect();
    for id in &acked {
        assert!(stored.contains(id), "acknowledged {id} lost");
    }
}

/// Issue 10 "slow clients time out": a client that sends its request head too slowly is
/// disconnected after the header timeout, while a prompt one on another connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_a_client_too_slow_with_its_request_head_is_disconnected() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(dir.path()).await;
    let config = ServerConfig {
        header_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    };
    let s = start(dir.path(), config).await;
    let mut slow = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("part of a head");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the server kept a connection whose request head never came"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "not before the timeout"
    );
    let r = http(s.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(r.status, 200, "a prompt client is served");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_a_body_over_the_cap_is_413_before_it_is_read_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(dir.path()).await;
    let config = ServerConfig {
        max_body_bytes: 2048,
        ..ServerConfig::default()
    };
    let s = start(dir.path(), config).await;
    let david = basic("david", DAVID_PW);
    let big = form("f-big", "u-david", "c-big").replace(
        "</data>",
        &format!("<pad>{}</pad></data>", "x".repeat(4096)),
    );
    let r = http(
        s.addr,
        "POST",
        RECEIVER,
        &[("Authorization", &david)],
        big.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 413);
    s.stop().await;
    assert!(events(dir.path(), "demo")
        .iter()
        .all(|e| e.form_record().is_none()));
}

fn cli(data: &Path, args: &[&str], stdin: &str) -> serde_json::Value {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
        .arg("--data")
        .arg(data)
        .arg("--json")
        .args(args)
        .env_remove("CASELEDGER_DATA")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run caseledger");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_the_cli_makes_credentials_and_serve_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    cli(
        data,
        &[
            "user",
            "create",
            "--id",
            "u-ana",
            "--username",
            "ana",
            "--password-stdin",
        ],
        "ana's password\n",
    );
    cli(
        data,
        &["user", "create", "--id", "u-svc", "--username", "svc"],
        "",
    );
    let created = cli(
        data,
        &["apikey", "create", "--user", "u-svc", "--role", "auditor"],
        "",
    );
    let key = created["key"].as_str().expect("key").to_owned();
    let key_id = created["key_id"].as_str().expect("key_id").to_owned();
    assert!(key.starts_with(&format!("{key_id}.")));
    let listed = cli(data, &["apikey", "list"], "");
    assert_eq!(listed[0]["role"], "auditor");
    assert_eq!(listed[0]["revoked"], false);
    assert!(
        !listed.to_string().contains(&key),
        "list never shows the key"
    );

    let child = std::process::Command::new(env!("CARGO_BIN_EXE_caseledger"))
        .arg("--data")
        .arg(data)
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env_remove("CASELEDGER_DATA")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    let file = data.join("server.json");
    let mut waited = 0;
    while !file.exists() && waited < 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    let running: server::ServerFile =
        serde_json::from_slice(&std::fs::read(&file).expect("server.json")).expect("json");
    assert_eq!(running.pid, child.id());
    let addr: SocketAddr = running.addr.parse().expect("addr");
    let ana = basic("ana", "ana's password");
    let r = http(
        addr,
        "GET",
        "/a/demo/phone/restore/",
        &[("Authorization", &ana)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(
        addr,
        "GET",
        "/a/demo/phone/restore/?user_id=u-ana",
        &[("Authorization", &apikey("svc", &key))],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "a clean exit on SIGTERM");
    assert!(!file.exists(), "server.json removed");
    // The store is free again: the key can be revoked.
    cli(data, &["apikey", "revoke", &key_id], "");
    assert_eq!(cli(data, &["apikey", "list"], "")[0]["revoked"], true);
}
