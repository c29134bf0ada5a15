//! HTTP load (issue 10): 64 concurrent clients on loopback submit distinct forms through the
//! form receiver for 60 s, with authentication, against the engine's own forms/s in the same run.
//!
//! 1. Store: project space `bench`, 64 mobile workers with passwords (argon2id), a case-sharing
//!    app. Each form (~1.6 KB) registers a case owned by its submitter.
//! 2. HTTP: `server::Server` in this process on 127.0.0.1:0 (a two-worker tokio runtime, as
//!    `caseledger serve` on this machine); 64 client tasks on their own two-worker runtime, each
//!    a mobile worker with HTTP Basic on one keep-alive connection, posting to
//!    `/a/bench/receiver/secure/` one form at a time until the time is up. A connection error
//!    retries the same form on a new connection, as a phone does. Latency is from the request's
//!    first byte to the response's last.
//!    A subscriber (an auditor's API key) follows `/api/v1/bench/events` over Server-Sent
//!    Events from before the first form: each acknowledged form's position (the answer's
//!    `X-Caseledger-Position`) is matched with the moment its event arrived on the stream.
//! 3. Check, untimed: the log is read back; every acknowledged (201) form is accepted exactly
//!    once, nothing is accepted that was not sent, and the subscriber saw every position.
//! 4. Engine baseline: a fresh store with the same users; 64 tasks call `Engine::submit` with
//!    the same kind of forms for the same time (no HTTP, no auth): the ratio is the HTTP cost.
//!
//! `cargo bench --bench server`; `CASELEDGER_BENCH_SECONDS` sets the duration (default 60),
//! `CASELEDGER_BENCH_CLIENTS` the clients (default 64).
//! Targets: >= 5 000 forms/s accepted, p99 submit latency <= 50 ms, zero lost or duplicated,
//! each event on the SSE stream within 20 ms p99 of its acknowledgement.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::http::{form, password, Conn};
use common::{env_or, machine, user, BenchResult};

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use caseledger::domain::{Command, DomainName, Event, Position, Role, UserId};
use caseledger::{Engine, EngineConfig, Request};
use server::{Server, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const DOMAIN: &str = "bench";
const APP: &str = "app-bench";

/// Users with passwords, the app and an auditor's API key (returned with the head position), in
/// a fresh store at `dir`.
fn seed(dir: &Path, clients: usize) -> BenchResult<(u64, String)> {
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let engine = Engine::open(dir, &DomainName::new(DOMAIN), EngineConfig::default())?;
    let key = rt.block_on(async {
        let mut commands = vec![Command::CreateApp {
            id: APP.into(),
            name: "Bench".into(),
            case_sharing: false,
            case_types: vec!["pregnancy".into()],
        }];
        for i in 0..clients {
            commands.push(Command::CreateUser {
                id: UserId::new(user(i as u64)),
                username: format!("user{i}"),
            });
            commands.push(Command::SetPassword {
                user: UserId::new(user(i as u64)),
                hash: server::secret::hash(&password(i)).map_err(|e| e.to_string())?,
            });
        }
        let key = server::secret::new_api_key().map_err(|e| e.to_string())?;
        commands.push(Command::CreateApiKey {
            key_id: key.key_id,
            user: UserId::new(user(0)),
            role: Role::Auditor,
            hash: key.hash,
        });
        for c in commands {
            engine.execute(Request::new(c)).await?;
        }
        Ok::<_, Box<dyn std::error::Error>>(format!("ApiKey {}:{}", user(0), key.key))
    });
    let key = key?;
    engine.flush()?;
    Ok((engine.log().written_head().0, key))
}

/// What one client did.
#[derive(Default)]
struct Client {
    acked: Vec<String>,
    /// Each acknowledgement's last log position and when the answer was read.
    positions: Vec<(u64, Instant)>,
    other: u64,
    retries: u64,
    latencies: Vec<Duration>,
}

async fn client(addr: SocketAddr, c: usize, deadline: Instant) -> Client {
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("user{c}:{}", password(c)))
    );
    let path = format!("/a/{DOMAIN}/receiver/secure/{APP}/");
    let mut out = Client::default();
    let mut conn: Option<Conn> = None;
    let mut n = 0u64;
    while Instant::now() < deadline {
        let (id, body) = form(c, n);
        let started = Instant::now();
        let result = match conn.as_mut() {
            Some(conn) => conn.post(&path, &auth, &body).await,
            None => match Conn::open(addr).await {
                Ok(new) => conn.insert(new).post(&path, &auth, &body).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok((201, position)) => {
                let now = Instant::now();
                out.latencies.push(now - started);
                out.acked.push(id);
                if let Some(p) = position {
                    out.positions.push((p, now));
                }
                n += 1;
            }
            Ok(_) => {
                out.other += 1;
                n += 1;
            }
            Err(_) => {
                // Not acknowledged: the same form again on a new connection, as a phone does.
                out.retries += 1;
                conn = None;
            }
        }
    }
    out
}

/// Follows `/api/v1/bench/events?from=FROM` until the stream ends; when each position's event
/// arrived. Reads the chunked body by hand: each SSE event ends with a blank line.
async fn subscriber(
    addr: SocketAddr,
    auth: String,
    from: u64,
) -> std::io::Result<Vec<(u64, Instant)>> {
    let mut conn = Conn::open(addr).await?;
    let head = format!(
        "GET /api/v1/{DOMAIN}/events?from={from} HTTP/1.1\r\nHost: bench\r\nAuthorization: {auth}\r\nAccept: text/event-stream\r\n\r\n"
    );
    conn.reader.get_mut().write_all(head.as_bytes()).await?;
    let mut line = String::new();
    loop {
        line.clear();
        if conn.reader.read_line(&mut line).await? == 0 || line.trim_end().is_empty() {
            break;
        }
    }
    let mut seen = Vec::new();
    let mut pending = String::new();
    loop {
        line.clear();
        if conn.reader.read_line(&mut line).await? == 0 {
            break;
        }
        let size = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let mut chunk = vec![0u8; size + 2];
        conn.reader.read_exact(&mut chunk).await?;
        let now = Instant::now();
        pending.push_str(&String::from_utf8_lossy(&chunk[..size]));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            if event.lines().any(|l| l == "event: end" || l == "event:end") {
                return Ok(seen);
            }
            if let Some(id) = event
                .lines()
                .find_map(|l| l.strip_prefix("id:"))
                .and_then(|v| v.trim().parse().ok())
            {
                seen.push((id, now));
            }
        }
    }
    Ok(seen)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn main() -> BenchResult<()> {
    let seconds: u64 = env_or("CASELEDGER_BENCH_SECONDS", 60)?;
    let clients: usize = env_or("CASELEDGER_BENCH_CLIENTS", 64)?.try_into()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "server: {}", machine())?;
    writeln!(
        out,
        "workload: {clients} clients x distinct ~1.6 KB registration forms for {seconds} s, HTTP Basic (argon2id, verified once per connection's login and cached), OpenRosa 3.0"
    )?;

    // HTTP.
    let dir = tempfile::tempdir()?;
    let (head, auditor) = seed(dir.path(), clients)?;
    let server_rt = runtime()?;
    let server = server_rt.block_on(Server::bind(
        dir.path(),
        "127.0.0.1:0".parse()?,
        ServerConfig::default(),
    ))?;
    let addr = server.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = server_rt.spawn(server.run(async {
        let _ = stopped.await;
    }));
    let client_rt = runtime()?;
    let following = client_rt.spawn(subscriber(addr, auditor, head + 1));
    // Until the stream is open (its headers are sent before any event).
    std::thread::sleep(Duration::from_millis(300));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let results: Vec<Client> = client_rt.block_on(async {
        let tasks: Vec<_> = (0..clients)
            .map(|c| tokio::spawn(client(addr, c, deadline)))
            .collect();
        let mut results = Vec::with_capacity(clients);
        for t in tasks {
            results.push(t.await.unwrap_or_default());
        }
        results
    });
    let elapsed = started.elapsed().as_secs_f64();
    // The last events reach the subscriber; then shutdown ends its stream (`event: end`).
    std::thread::sleep(Duration::from_millis(500));
    let _ = stop.send(());
    server_rt.block_on(serving)??;
    drop(server_rt);
    let seen: HashMap<u64, Instant> = client_rt.block_on(following)??.into_iter().collect();
    let mut latencies: Vec<Duration> = results.iter().flat_map(|r| r.latencies.clone()).collect();
    latencies.sort_unstable();
    let acked: u64 = results.iter().map(|r| r.acked.len() as u64).sum();
    let other: u64 = results.iter().map(|r| r.other).sum();
    let retries: u64 = results.iter().map(|r| r.retries).sum();
    let http_rate = acked as f64 / elapsed;
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    writeln!(
        out,
        "  HTTP receiver, durable, with auth            {http_rate:>8.0} forms/s  {elapsed:.1} s; {acked} acknowledged (201), {other} other statuses, {retries} retried; latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {:.2} ms",
        percentile(&latencies, 1.0)
    )?;

    // SSE: each acknowledged position against when the subscriber got it (an event that came
    // before the answer was read counts as 0).
    let mut delays: Vec<Duration> = Vec::new();
    let mut unseen = 0;
    for (p, acked_at) in results.iter().flat_map(|r| r.positions.iter()) {
        match seen.get(p) {
            Some(at) => delays.push(at.saturating_duration_since(*acked_at)),
            None => unseen += 1,
        }
    }
    delays.sort_unstable();
    let sse_p99 = percentile(&delays, 0.99);
    writeln!(
        out,
        "  SSE subscriber: {} events seen; acknowledged positions not seen {unseen}; delay after the acknowledgement p50 {:.2} ms, p99 {sse_p99:.2} ms, max {:.2} ms",
        seen.len(),
        percentile(&delays, 0.5),
        percentile(&delays, 1.0)
    )?;

    // Check: every acknowledged form accepted exactly once, nothing else accepted.
    let engine = Engine::open(
        dir.path(),
        &DomainName::new(DOMAIN),
        EngineConfig::default(),
    )?;
    let mut accepted: HashMap<String, u32> = HashMap::new();
    for e in engine.log().iter_from(Position(1)) {
        if let Event::FormAcceptedV1(f) = e?.event {
            *accepted
                .entry(f.form.form_id.as_str().to_owned())
                .or_default() += 1;
        }
    }
    drop(engine);
    let acked_ids: Vec<&String> = results.iter().flat_map(|r| r.acked.iter()).collect();
    let lost = acked_ids
        .iter()
        .filter(|id| !accepted.contains_key(id.as_str()))
        .count();
    let doubled = accepted.values().filter(|n| **n > 1).count();
    let unsent = accepted.len().saturating_sub(acked_ids.len());
    writeln!(
        out,
        "  check: {} accepted in the log; acknowledged but missing {lost}, accepted more than once {doubled}, accepted but never acknowledged {unsent}",
        accepted.len()
    )?;

    // Engine baseline: the same clients, forms and time, without HTTP.
    let base_dir = tempfile::tempdir()?;
    seed(base_dir.path(), clients)?;
    let engine = Arc::new(Engine::open(
        base_dir.path(),
        &DomainName::new(DOMAIN),
        EngineConfig::default(),
    )?);
    let rt = runtime()?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let base_acked: u64 = rt.block_on(async {
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let engine = Arc::clone(&engine);
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let (_, body) = form(c, n);
                        if engine.submit(body, Some(APP.into()), None).await.is_err() {
                            break;
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap_or(0);
        }
        total
    });
    let base_elapsed = started.elapsed().as_secs_f64();
    let base_rate = base_acked as f64 / base_elapsed;
    writeln!(
        out,
        "  Engine::submit, durable, no HTTP             {base_rate:>8.0} forms/s  {base_elapsed:.1} s; {base_acked} forms"
    )?;
    writeln!(
        out,
        "ratio HTTP/engine {:.2}; HTTP {http_rate:.0} forms/s (target >= 5000: {}), p99 {p99:.2} ms (target <= 50 ms: {}), lost {lost}, duplicated {doubled} (target 0: {}), SSE p99 {sse_p99:.2} ms (target <= 20 ms: {})",
        http_rate / base_rate.max(1.0),
        if http_rate >= 5000.0 { "met" } else { "MISSED" },
        if p99 <= 50.0 { "met" } else { "MISSED" },
        if lost == 0 && doubled == 0 { "met" } else { "MISSED" },
        if sse_p99 <= 20.0 && unseen == 0 { "met" } else { "MISSED" },
    )?;
    if lost > 0 || doubled > 0 || unsent > 0 || unseen > 0 {
        return Err("acknowledged forms lost or duplicated".into());
    }
    Ok(())
}
