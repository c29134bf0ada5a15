//! Issue 10, caseledger's own API: `/api/v1` commands and queries, read-your-writes, SSE
//! subscriptions and change feeds, the OpenAPI document and `/metrics`. Each test starts a
//! server in-process over the seed of `server.rs` and speaks HTTP/1.1 over a plain socket.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use caseledger::domain::CaseId;
use caseledger::{Engine, EngineConfig};
use serde_json::{json, Value};
use server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server::{apikey, basic, http, seed, start, Response, DAVID_PW, MARIA_PW};

fn body(r: &Response) -> Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {:?}", r.body))
}

fn position_of(r: &Response) -> u64 {
    let header: u64 = r
        .header("x-caseledger-position")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("position header: {r:?}"));
    assert_eq!(body(r)["position"], json!(header), "{r:?}");
    header
}

async fn post_json(addr: SocketAddr, path: &str, auth: &str, value: Value) -> Response {
    http(
        addr,
        "POST",
        path,
        &[
            ("Authorization", auth),
            ("Content-Type", "application/json"),
        ],
        value.to_string().as_bytes(),
    )
    .await
}

async fn put_json(addr: SocketAddr, path: &str, auth: &str, value: Value) -> Response {
    http(
        addr,
        "PUT",
        path,
        &[
            ("Authorization", auth),
            ("Content-Type", "application/json"),
        ],
        value.to_string().as_bytes(),
    )
    .await
}

async fn get(addr: SocketAddr, path: &str, auth: &str) -> Response {
    http(addr, "GET", path, &[("Authorization", auth)], b"").await
}

/// A form by `user` creating case `case` owned by `owner`.
fn form_owned(id: &str, user: &str, case: &str, owner: &str) -> String {
    crate::server::form(id, user, case).replace(
        &format!("<owner_id>{user}</owner_id>"),
        &format!("<owner_id>{owner}</owner_id>"),
    )
}

/// An open SSE stream, read as it comes.
struct Sse {
    stream: tokio::net::TcpStream,
    /// Bytes read and not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked text not yet split into events.
    text: String,
    /// True once the final chunk was read.
    ended: bool,
    /// True once the response head was read.
    in_body: bool,
}

/// One SSE event: its fields.
#[derive(Debug, Clone)]
struct SseEvent {
    event: String,
    id: Option<u64>,
    data: String,
}

impl Sse {
    async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut head =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut sse = Sse {
            stream,
            raw: Vec::new(),
            text: String::new(),
            ended: false,
            in_body: false,
        };
        // The response head.
        loop {
            if let Some(end) = find(&sse.raw, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&sse.raw[..end]).into_owned();
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                assert!(
                    head.to_ascii_lowercase().contains("text/event-stream"),
                    "{head}"
                );
                sse.raw.drain(..end + 4);
                sse.in_body = true;
                sse.dechunk();
                break;
            }
            sse.read_more().await;
        }
        sse
    }

    async fn read_more(&mut self) {
        let mut buf = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf))
            .await
            .expect("SSE data within 10 s")
            .expect("read");
        if n == 0 {
            self.ended = true;
        }
        self.raw.extend_from_slice(&buf[..n]);
        self.dechunk();
    }

    /// Moves whole chunks of the body from `raw` to `text`.
    fn dechunk(&mut self) {
        while self.in_body {
            let Some(line) = find(&self.raw, b"\r\n") else {
                break;
            };
            let size = usize::from_str_radix(String::from_utf8_lossy(&self.raw[..line]).trim(), 16)
                .expect("chunk size");
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                break;
            }
            if self.raw.len() < line + 2 + size + 2 {
                break;
            }
            let chunk = self.raw[line + 2..line + 2 + size].to_vec();
            self.text.push_str(&String::from_utf8_lossy(&chunk));
            self.raw.drain(..line + 2 + size + 2);
        }
    }

    /// The next event (comments, keep-alives, skipped); `None` when the stream ended.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut e = SseEvent {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        e.event = v.trim().to_owned();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        e.id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        e.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        any = true;
                    }
                }
                if any {
                    return Some(e);
                }
            }
            if self.ended {
                return None;
            }
            self.read_more().await;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_every_write_returns_its_position_and_min_position_reads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let admin = apikey("svc", &keys.admin);
    let mut positions = Vec::new();
    let r = post_json(
        s.addr,
        "/api/v1/demo/users",
        &admin,
        json!({"id": "u-zoe", "username": "zoe", "password": "zoe-secret-pw"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(body(&r)["events"], json!(2), "user and password");
    positions.push(position_of(&r));
    let r = post_json(
        s.addr,
        "/api/v1/demo/groups",
        &admin,
        json!({"id": "g-team", "name": "Team", "case_sharing": false}),
    )
    .await;
    positions.push(position_of(&r));
    let r = put_json(
        s.addr,
        "/api/v1/demo/groups/g-team/case-sharing",
        &admin,
        json!({"on": true}),
    )
    .await;
    positions.push(position_of(&r));
    let r = http(
        s.addr,
        "PUT",
        "/api/v1/demo/groups/g-team/members/u-zoe",
        &[("Authorization", &admin)],
        b"",
    )
    .await;
    positions.push(position_of(&r));
    let r = post_json(
        s.addr,
        "/api/v1/demo/apps",
        &admin,
        json!({"id": "app-y", "name": "Y", "case_types": ["patient"]}),
    )
    .await;
    positions.push(position_of(&r));
    let r = put_json(
        s.addr,
        "/api/v1/demo/apps/app-y/case-sharing",
        &admin,
        json!({"on": true}),
    )
    .await;
    positions.push(position_of(&r));
    // The new user's password works at once.
    let zoe = basic("zoe", "zoe-secret-pw");
    let r = http(
        s.addr,
        "POST",
        "/api/v1/demo/submit?app=app-y",
        &[("Authorization", &zoe)],
        form_owned("f-zoe", "u-zoe", "c-zoe", "g-team").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(body(&r)["outcome"], json!("accepted"));
    assert_eq!(body(&r)["cases"], json!(["c-zoe"]));
    let submitted = position_of(&r);
    positions.push(submitted);
    // A duplicate is 200, still positioned.
    let r = http(
        s.addr,
        "POST",
        "/api/v1/demo/submit?app=app-y",
        &[("Authorization", &zoe)],
        form_owned("f-zoe", "u-zoe", "c-zoe", "g-team").as_bytes(),
    )
    .await;
    assert_eq!(
        (r.status, body(&r)["outcome"].clone()),
        (200, json!("duplicate"))
    );
    positions.push(position_of(&r));
    let r = http(
        s.addr,
        "DELETE",
        "/api/v1/demo/groups/g-team/members/u-zoe",
        &[("Authorization", &admin)],
        b"",
    )
    .await;
    let removed = position_of(&r);
    positions.push(removed);
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "every write moves the log on: {positions:?}"
    );
    // Each write's position, as min_position, reads it.
    let r = get(
        s.addr,
        &format!("/api/v1/demo/cases/c-zoe?min_position={submitted}"),
        &admin,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(body(&r)["owner_id"], json!("g-team"));
    let r = get(
        s.addr,
        &format!("/api/v1/demo/groups?min_position={removed}"),
        &admin,
    )
    .await;
    let team = body(&r)
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["id"] == json!("g-team"))
        .cloned()
        .expect("g-team");
    assert_eq!(
        team,
        json!({"id": "g-team", "name": "Team", "case_sharing": true, "members": []})
    );
    // Time travel: before the removal zoe saw the case, after it not.
    let r = get(
        s.addr,
        &format!(
            "/api/v1/demo/cases?user=u-zoe&at={}&min_position={removed}",
            removed - 1
        ),
        &admin,
    )
    .await;
    assert_eq!(body(&r)[0]["case_id"], json!("c-zoe"), "{}", r.body);
    let r = get(s.addr, "/api/v1/demo/cases?user=u-zoe", &admin).await;
    assert_eq!(body(&r), json!([]));
    let r = get(s.addr, "/api/v1/demo/cases/c-zoe?at=999999", &admin).await;
    assert_eq!(
        (r.status, body(&r)["error"]["code"].clone()),
        (400, json!("out_of_range"))
    );
    let r = get(s.addr, "/api/v1/demo/cases/c-zoe?at=1", &admin).await;
    assert_eq!(
        (r.status, body(&r)["error"]["code"].clone()),
        (404, json!("not_found"))
    );
    let r = get(s.addr, "/api/v1/demo/cases/c-zoe/history", &admin).await;
    assert_eq!(body(&r)[0]["position"], json!(submitted), "{}", r.body);
    let r = get(s.addr, "/api/v1/demo/cases/c-zoe/who-could-see", &admin).await;
    assert_eq!(body(&r)["viewers"], json!([]), "{}", r.body);
    let api_case = get(s.addr, "/api/v1/demo/cases/c-zoe", &admin).await;
    let api_groups = get(s.addr, "/api/v1/demo/groups", &admin).await;
    s.stop().await;
    // The same shapes as the CLI's --json (src/view.rs).
    let engine = Engine::open(dir.path(), &"demo".into(), EngineConfig::default()).expect("open");
    let case = engine
        .projections()
        .case(&CaseId::new("c-zoe"))
        .expect("read")
        .expect("case");
    assert_eq!(body(&api_case), caseledger::view::case_json(&case));
    let groups: Vec<Value> = engine
        .projections()
        .groups(None)
        .iter()
        .map(caseledger::view::group_json)
        .collect();
    assert_eq!(body(&api_groups), Value::Array(groups));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_a_min_position_far_ahead_is_503_with_retry_after_within_the_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let auditor = apikey("svc", &keys.auditor);
    let started = Instant::now();
    let r = get(
        s.addr,
        "/api/v1/demo/groups?min_position=1000000&wait_ms=300",
        &auditor,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(body(&r)["error"]["code"], json!("not_caught_up"));
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!(retry >= 1);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "waited {took:?}"
    );
    // The cap holds whatever wait_ms asks.
    assert!(server::MAX_WAIT <= Duration::from_secs(30));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_sse_from_0_then_last_event_id_gives_every_event_once_in_order_and_ends_on_shutdown(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = seed(dir.path()).await;
    let head = Engine::open(dir.path(), &"demo".into(), EngineConfig::default())
        .expect("open")
        .log()
        .written_head()
        .0;
    assert!(head > 6, "the seed has events: {head}");
    let s = start(dir.path(), ServerConfig::default()).await;
    let auditor = apikey("svc", &keys.auditor);
    let headers = [("Authorization", auditor.as_str())];
    let mut seen = Vec::new();
    let mut first = Sse::open(s.addr, "/api/v1/demo/events?from=0", &headers).await;
    for _ in 0..5 {
        let e = first.next().await.expect("event");
        let data: Value = serde_json::from_str(&e.data).expect("json");
        assert_eq!(data["position"], json!(e.id.expect("id")));
        assert_eq!(data["type"], json!(e.event));
        seen.push(e.id.expect("id"));
    }
    drop(first);
    // Resume where the client left off, and see a new write arrive live.
    let last = seen.last().copied().expect("some").to_string();
    let resumed_headers = [
        ("Authorization", auditor.as_str()),
        ("Last-Event-ID", last.as_str()),
    ];
    let mut second = Sse::open(s.addr, "/api/v1/demo/events?from=1", &resumed_headers).await;
    let david = basic("david", DAVID_PW);
    let r = http(
        s.addr,
        "POST",
        "/api/v1/demo/submit",
        &[("Authorization", &david)],
        crate::server::form("f-live", "u-david", "c-live").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let written = position_of(&r);
    let mut live = None;
    while seen.last().copied() < Some(written) {
        let e = second.next().await.expect("event");
        if e.event == "FormAccepted" {
            live = Some(serde_json::from_str::<Value>(&e.data).expect("json"));
        }
        seen.push(e.id.expect("id"));
    }
    assert_eq!(
        seen,
        (1..=written).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    let live = live.expect("the live form");
    assert_eq!(live["event"]["form"]["form_id"], json!("f-live"), "{live}");
    assert!(
        live["event"]["form"]["raw"]["len"].as_u64() > Some(100),
        "{live}"
    );
    // Shutdown ends the stream cleanly: an `end` event, then the end of the body.
    s.stop().await;
    let end = second.next().await.expect("end event");
    assert_eq!(end.event, "end");
    assert!(second.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_a_users_case_list_feed_shows_a_case_entering_after_a_membership_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let admin = apikey("svc", &keys.admin);
    let r = post_json(
        s.addr,
        "/api/v1/demo/groups",
        &admin,
        json!({"id": "g-ward", "name": "Ward", "case_sharing": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(
        s.addr,
        "PUT",
        "/api/v1/demo/groups/g-ward/members/u-maria",
        &[("Authorization", &admin)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let maria = basic("maria", MARIA_PW);
    let r = http(
        s.addr,
        "POST",
        "/api/v1/demo/submit",
        &[("Authorization", &maria)],
        form_owned("f-ward", "u-maria", "c-ward", "g-ward").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // David follows his own list (a mobile worker may), which is empty so far.
    let david = basic("david", DAVID_PW);
    let mut feed = Sse::open(
        s.addr,
        "/api/v1/demo/users/u-david/cases/feed",
        &[("Authorization", &david)],
    )
    .await;
    let snapshot = feed.next().await.expect("snapshot");
    assert_eq!(snapshot.event, "snapshot");
    let data: Value = serde_json::from_str(&snapshot.data).expect("json");
    assert_eq!(data["entered"], json!([]));
    // Nor may he follow maria's.
    let r = get(s.addr, "/api/v1/demo/users/u-maria/cases/feed", &david).await;
    assert_eq!(
        (r.status, body(&r)["error"]["code"].clone()),
        (403, json!("forbidden"))
    );
    let r = http(
        s.addr,
        "PUT",
        "/api/v1/demo/groups/g-ward/members/u-david",
        &[("Authorization", &admin)],
        b"",
    )
    .await;
    let joined = position_of(&r);
    let change = feed.next().await.expect("changes");
    assert_eq!(change.event, "changes");
    assert_eq!(change.id, Some(joined));
    let data: Value = serde_json::from_str(&change.data).expect("json");
    assert_eq!(data["entered"][0]["case_id"], json!("c-ward"), "{data}");
    assert_eq!(data["left"], json!([]));
    // And leaving the group takes it out again.
    let r = http(
        s.addr,
        "DELETE",
        "/api/v1/demo/groups/g-ward/members/u-david",
        &[("Authorization", &admin)],
        b"",
    )
    .await;
    let left = position_of(&r);
    let change = feed.next().await.expect("changes");
    assert_eq!(change.id, Some(left));
    let data: Value = serde_json::from_str(&change.data).expect("json");
    assert_eq!(data["left"][0]["case_id"], json!("c-ward"), "{data}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_api_roles_auditors_read_only_workers_their_own_and_no_key_crosses_project_spaces()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let auditor = apikey("svc", &keys.auditor);
    let service = apikey("svc", &keys.service);
    let david = basic("david", DAVID_PW);
    let group = json!({"id": "g-x", "name": "X"});
    for who in [&auditor, &service, &david] {
        let r = post_json(s.addr, "/api/v1/demo/groups", who, group.clone()).await;
        assert_eq!(r.status, 403, "{who}: {}", r.body);
        assert_eq!(body(&r)["error"]["code"], json!("forbidden"));
    }
    let r = http(
        s.addr,
        "POST",
        "/api/v1/demo/submit",
        &[("Authorization", &auditor)],
        crate::server::form("f-a", "u-david", "c-a").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // The auditor reads everything, the audit queries included.
    for path in [
        "/api/v1/demo/diagnostics",
        "/api/v1/demo/conflicts",
        "/api/v1/demo/groups",
        "/api/v1/demo/cases?user=u-david",
    ] {
        let r = get(s.addr, path, &auditor).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    // A mobile worker reads its own list, not another's, nor the audit queries.
    let r = get(s.addr, "/api/v1/demo/cases", &david).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for path in [
        "/api/v1/demo/cases?user=u-maria",
        "/api/v1/demo/cases?owner=u-maria",
        "/api/v1/demo/diagnostics",
        "/api/v1/demo/conflicts",
        "/api/v1/demo/events",
    ] {
        let r = get(s.addr, path, &david).await;
        assert_eq!(r.status, 403, "{path}: {}", r.body);
    }
    // The admin key of `other` is nobody in `demo`: 401 in JSON with the challenge.
    let other = apikey("svc", &keys.other_admin);
    let r = get(s.addr, "/api/v1/demo/groups", &other).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(body(&r)["error"]["code"], json!("unauthenticated"));
    assert!(r.header("www-authenticate").is_some());
    let r = post_json(s.addr, "/api/v1/demo/groups", &other, group.clone()).await;
    assert_eq!(r.status, 401);
    let r = get(s.addr, "/api/v1/other/groups", &other).await;
    assert_eq!(r.status, 200, "{}", r.body);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_openapi_documents_every_route_and_every_documented_route_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let r = http(s.addr, "GET", "/api/v1/openapi.json", &[], b"").await;
    assert_eq!(r.status, 200);
    let doc = body(&r);
    assert!(doc["openapi"].as_str().expect("version").starts_with("3.1"));
    let paths = doc["paths"].as_object().expect("paths");
    let documented: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .filter(|m| ["get", "post", "put", "delete", "patch"].contains(&m.as_str()))
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    // Every route the server answers besides CommCare's (docs/API.md), by method and path.
    let mut expected = vec![
        ("POST", "/api/v1/{domain}/users"),
        ("POST", "/api/v1/{domain}/groups"),
        ("GET", "/api/v1/{domain}/groups"),
        ("PUT", "/api/v1/{domain}/groups/{group_id}/case-sharing"),
        (
            "PUT",
            "/api/v1/{domain}/groups/{group_id}/members/{user_id}",
        ),
        (
            "DELETE",
            "/api/v1/{domain}/groups/{group_id}/members/{user_id}",
        ),
        ("POST", "/api/v1/{domain}/apps"),
        ("PUT", "/api/v1/{domain}/apps/{app_id}/case-sharing"),
        ("POST", "/api/v1/{domain}/submit"),
        ("GET", "/api/v1/{domain}/cases"),
        ("GET", "/api/v1/{domain}/cases/{case_id}"),
        ("GET", "/api/v1/{domain}/cases/{case_id}/history"),
        ("GET", "/api/v1/{domain}/cases/{case_id}/who-could-see"),
        ("GET", "/api/v1/{domain}/cases/{case_id}/feed"),
        ("GET", "/api/v1/{domain}/users/{user_id}/cases/feed"),
        ("GET", "/api/v1/{domain}/diagnostics"),
        ("GET", "/api/v1/{domain}/diagnostics/feed"),
        ("GET", "/api/v1/{domain}/conflicts"),
        ("GET", "/api/v1/{domain}/conflicts/{conflict_id}"),
        ("GET", "/api/v1/{domain}/events"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
    ];
    expected.sort();
    let mut got: Vec<(&str, &str)> = documented
        .iter()
        .map(|(m, p)| (m.as_str(), p.as_str()))
        .collect();
    got.sort();
    assert_eq!(got, expected);
    // And each documented route is served: without credentials a protected one answers 401
    // in JSON, an open one 200; a path the router does not know is an empty 404.
    for (method, path) in &documented {
        let concrete = path.replace("{domain}", "demo").replace(['{', '}'], "");
        let r = http(s.addr, method, &concrete, &[], b"").await;
        assert!(
            r.status == 200
                || (r.status == 401 && body(&r)["error"]["code"] == json!("unauthenticated")),
            "{method} {path}: {} {}",
            r.status,
            r.body
        );
    }
    let r = http(s.addr, "GET", "/api/v1/demo/nothing-here", &[], b"").await;
    assert_eq!(r.status, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_metrics_expose_request_and_append_latency_projection_lag_and_subscribers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = seed(dir.path()).await;
    let s = start(dir.path(), ServerConfig::default()).await;
    let admin = apikey("svc", &keys.admin);
    let r = post_json(
        s.addr,
        "/api/v1/demo/groups",
        &admin,
        json!({"id": "g-m", "name": "M"}),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = get(s.addr, "/api/v1/demo/groups", &admin).await;
    assert_eq!(r.status, 200);
    let feed = Sse::open(
        s.addr,
        "/api/v1/demo/diagnostics/feed",
        &[("Authorization", &admin)],
    )
    .await;
    let r = http(s.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let text = r.body;
    for series in [
        "# TYPE caseledger_http_request_duration_seconds histogram",
        "caseledger_http_request_duration_seconds_bucket{route=\"/api/v1/{domain}/groups\",method=\"GET\",status=\"200\",le=\"+Inf\"} 1",
        "caseledger_http_request_duration_seconds_count{route=\"/api/v1/{domain}/groups\",method=\"POST\",status=\"200\"} 1",
        "# TYPE caseledger_append_duration_seconds histogram",
        "caseledger_append_duration_seconds_count 1",
        "caseledger_projection_lag_events{domain=\"demo\"} 0",
        "caseledger_projection_lag_events{domain=\"other\"} 0",
        "caseledger_sse_subscribers 1",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    drop(feed);
    s.stop().await;
}
