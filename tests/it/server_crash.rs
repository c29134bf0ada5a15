//! Issue 10 "Load": SIGKILL the server 10 times during a storm of 64 submitting clients that
//! retry every unacknowledged form, as phones do; restart it each time. Every acknowledged form
//! must be in the log exactly once, and the projections must equal a fresh replay (I4, I5).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use caseledger::domain::{Command, Event, Position, UserId};
use caseledger::{Engine, EngineConfig, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENTS: usize = 64;
const KILLS: usize = 10;
/// Each storm runs until this many more forms were acknowledged, then the server is killed
/// (after a restart every phone logs in again: 64 argon2id verifications come first).
const STORM_ACKS: usize = 2 * CLIENTS;

fn password(c: usize) -> String {
    format!("pw-{c:02}-correct-horse")
}

fn form(c: usize, n: u64) -> (String, Vec<u8>) {
    let id = format!("crash-{c:02}-{n:06}");
    let user = format!("u-{c:02}");
    let xml = format!(
        r#"<?xml version="1.0"?>
<data xmlns="http://openrosa.org/formdesigner/CRASH">
  <case xmlns="http://commcarehq.org/case/transaction/v2" case_id="case-{id}" date_modified="2026-03-01T10:00:00Z" user_id="{user}">
    <create><case_type>patient</case_type><case_name>{id}</case_name><owner_id>{user}</owner_id></create>
  </case>
  <meta xmlns="http://openrosa.org/jr/xforms"><instanceID>{id}</instanceID><userID>{user}</userID></meta>
</data>"#
    );
    (id, xml.into_bytes())
}

fn seed(dir: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let engine = Engine::open(dir, &"demo".into(), EngineConfig::default()).expect("open");
    rt.block_on(async {
        for c in 0..CLIENTS {
            let user = UserId::new(format!("u-{c:02}"));
            for command in [
                Command::CreateUser {
                    id: user.clone(),
                    username: format!("user{c:02}"),
                },
                Command::SetPassword {
                    user,
                    hash: server::secret::hash(&password(c)).expect("hash"),
                },
            ] {
                engine.execute(Request::new(command)).await.expect("seed");
            }
        }
    });
    engine.flush().expect("flush");
}

/// Starts `caseledger serve` on a free port and waits until its `server.json` names it.
// The caller kills or stops the child and waits for it; the lint cannot see past the return.
#[allow(clippy::zombie_processes)]
fn start(dir: &Path) -> (Child, SocketAddr) {
    let file = dir.join("server.json");
    let _ = std::fs::remove_file(&file);
    let mut child = Process::new(env!("CARGO_BIN_EXE_caseledger"))
        .args([
            "--data",
            dir.to_str().expect("utf-8"),
            "serve",
            "--addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let started = Instant::now();
    loop {
        let named = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(|v| v["pid"].as_u64() == Some(u64::from(child.id())))
            .and_then(|v| v["addr"].as_str().and_then(|a| a.parse().ok()));
        if let Some(addr) = named {
            return (child, addr);
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve did not start in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One POST on a fresh connection; the status, or `None` if no response came.
async fn post(addr: SocketAddr, auth: &str, body: &[u8]) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let head = format!(
        "POST /a/demo/receiver/secure/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {auth}\r\nX-OpenRosa-Version: 3.0\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.ok()?;
    stream.write_all(body).await.ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw);
    text.split(' ').nth(1).and_then(|s| s.parse().ok())
}

/// A phone: submits its forms in order, each until it is acknowledged.
struct Phone {
    next: u64,
    acked: Vec<String>,
}

/// Runs every phone against `addr` until `stop`, counting acknowledgements in `acks`; a form
/// without a 201 is sent again.
async fn storm(
    addr: SocketAddr,
    phones: &[Arc<Mutex<Phone>>],
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
) {
    let tasks: Vec<_> = phones
        .iter()
        .enumerate()
        .map(|(c, phone)| {
            let phone = Arc::clone(phone);
            let stop = Arc::clone(&stop);
            let acks = Arc::clone(&acks);
            tokio::spawn(async move {
                let auth = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("user{c:02}:{}", password(c)))
                );
                while !stop.load(Ordering::Relaxed) {
                    let n = phone.lock().expect("phone").next;
                    let (id, body) = form(c, n);
                    match post(addr, &auth, &body).await {
                        Some(201) => {
                            let mut p = phone.lock().expect("phone");
                            p.acked.push(id);
                            p.next += 1;
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(status) => panic!("form {id}: status {status}"),
                        // No answer: the server died; the same form again after a pause.
                        None => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("phone task");
    }
}

fn accepted(dir: &Path) -> HashMap<String, u32> {
    let engine = Engine::open(dir, &"demo".into(), EngineConfig::default()).expect("reopen");
    let mut out: HashMap<String, u32> = HashMap::new();
    for e in engine.log().iter_from(Position(1)) {
        if let Event::FormAcceptedV1(f) = e.expect("event").event {
            *out.entry(f.form.form_id.as_str().to_owned()).or_default() += 1;
        }
    }
    out
}

#[test]
fn issue10_sigkill_during_a_storm_loses_and_doubles_no_acknowledged_form() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    seed(&dir);
    let phones: Vec<Arc<Mutex<Phone>>> = (0..CLIENTS)
        .map(|_| {
            Arc::new(Mutex::new(Phone {
                next: 0,
                acked: Vec::new(),
            }))
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for round in 0..=KILLS {
        let (mut child, addr) = start(&dir);
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicUsize::new(0));
        let storming = {
            let (stop, acks) = (Arc::clone(&stop), Arc::clone(&acks));
            let phones = phones.clone();
            rt.spawn(async move { storm(addr, &phones, stop, acks).await })
        };
        let started = Instant::now();
        while acks.load(Ordering::Relaxed) < STORM_ACKS {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "round {round}: only {} forms acknowledged in 120 s",
                acks.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if round < KILLS {
            // SIGKILL mid-storm: appends in flight are lost unacknowledged, never half-done.
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
            stop.store(true, Ordering::Relaxed);
            rt.block_on(storming).expect("storm");
        } else {
            stop.store(true, Ordering::Relaxed);
            rt.block_on(storming).expect("storm");
            let pid = child.id().to_string();
            let killed = Process::new("kill")
                .args(["-TERM", &pid])
                .status()
                .expect("kill -TERM");
            assert!(killed.success());
            let status = child.wait().expect("exit");
            assert!(status.success(), "serve ends cleanly on SIGTERM: {status}");
        }
    }
    let accepted = accepted(&dir);
    let mut acked = std::collections::HashSet::new();
    for phone in &phones {
        for id in &phone.lock().expect("phone").acked {
            acked.insert(id.clone());
            assert_eq!(
                accepted.get(id),
                Some(&1),
                "acknowledged form {id} is in the log exactly once"
            );
        }
    }
    assert!(
        acked.len() >= STORM_ACKS * (KILLS + 1),
        "every storm got its forms through: {}",
        acked.len()
    );
    // A form accepted but never acknowledged (a kill between the flush and the answer) is
    // fine: the phone sent it again and got a duplicate's 201. None is accepted unsent.
    assert!(accepted.keys().all(|id| id.starts_with("crash-")));
    assert!(accepted.len() >= acked.len());
    // The projections equal a fresh replay of the log.
    let out = Process::new(env!("CARGO_BIN_EXE_caseledger"))
        .args(["--data", dir.to_str().expect("utf-8"), "replay", "--verify"])
        .output()
        .expect("replay --verify");
    assert!(
        out.status.success(),
        "replay --verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
