//! Crash test (I4, I5): a child process submits forms as fast as it can and prints every
//! acknowledged position; the parent kills it with SIGKILL mid-stream, then checks on the
//! reopened store that
//! - every acknowledged position is in the log and decodes (I5: acknowledged ⇒ durable);
//! - the projection checkpoint is not ahead of the log (I4), before any catch-up;
//! - after catch-up, the projections equal a full replay (I3).
//!
//! Then a child replays the store over and over and is killed mid-replay; on reopen the sorted
//! runs of the bulk rebuild are gone, only one projection generation is left, it is caught up to
//! the log, and it answers as before the replays (I2, I4).
//!
//! `harness = false`: the binary is both parent and child (env `CASELEDGER_CRASH_CHILD`).
//! The child reports on stdout, which is its protocol, hence `print_stdout` is allowed here.

#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caseledger::demo::{form, Block};
use caseledger::domain::{AppId, Command as Cmd, DomainName, GroupId, Position, UserId};
use caseledger::{view, Engine, EngineConfig, Request};

fn child(dir: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let engine = std::sync::Arc::new(
        Engine::open(dir.as_ref(), &"crash".into(), EngineConfig::default()).expect("open"),
    );
    rt.block_on(async {
        for c in [
            Cmd::CreateUser {
                id: UserId::new("u1"),
                username: "u1".into(),
            },
            Cmd::CreateGroup {
                id: GroupId::new("g1"),
                name: "g1".into(),
                case_sharing: true,
            },
            Cmd::AddMember {
                group: GroupId::new("g1"),
                user: UserId::new("u1"),
            },
            Cmd::CreateApp {
                id: AppId::new("a"),
                name: "a".into(),
                case_sharing: true,
                case_types: vec!["t".into()],
            },
        ] {
            // Later rounds find the setup done already; that refusal is expected.
            let _ = engine.execute(Request::new(c)).await;
        }
        let round = std::env::var("CASELEDGER_CRASH_ROUND").unwrap_or_default();
        let mut n = 0u64;
        loop {
            // Eight concurrent submitters so acknowledgements come from group commits.
            let batch = (0..8).map(|i| {
                let engine = std::sync::Arc::clone(&engine);
                let id = format!("r{round}-f{n}-{i}");
                let case = format!("c{}", (n * 8 + i) % 500);
                async move {
                    let xml = form(
                        &id,
                        "u1",
                        &[Block {
                            case_id: &case,
                            user: "u1",
                            date: "2026-03-02T10:00:00Z",
                            create: Some(("t", "name", None)),
                            update: &[("n", &id)],
                            close: false,
                        }],
                    );
                    engine.submit(xml, Some(AppId::new("a")), None).await
                }
            });
            for outcome in futures_join(batch).await {
                let o = outcome.expect("submit");
                println!("{}", o.position.0);
            }
            n += 1;
        }
    });
}

/// Joins futures without pulling in the `futures` crate.
async fn futures_join<F: std::future::Future + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// Replays the store again and again, announcing each start, with a sort budget small enough
/// that the bulk rebuild spills sorted runs to its scratch directory.
fn replay_child(dir: &str) {
    let config = EngineConfig {
        replay_sort_budget: 4096,
        ..EngineConfig::default()
    };
    let engine = Engine::open(dir.as_ref(), &"crash".into(), config).expect("open");
    loop {
        println!("replay");
        engine.replay(&mut |_, _| {}).expect("replay");
    }
}

/// Every case the submitters may have written, as JSON.
fn snapshot(e: &Engine) -> Vec<String> {
    (0..500)
        .filter_map(|i| {
            e.projections()
                .case(&format!("c{i}").as_str().into())
                .ok()
                .flatten()
        })
        .map(|c| view::case_json(&c).to_string())
        .collect()
}

/// Kills a replaying child mid-replay, then checks what the next open finds.
fn kill_mid_replay(dir: &str) -> Result<(), String> {
    let before = {
        let engine = Engine::open(dir.as_ref(), &"crash".into(), EngineConfig::default())
            .map_err(|e| e.to_string())?;
        snapshot(&engine)
    };
    for (round, delay_ms) in [30u64, 120, 250].into_iter().enumerate() {
        let mut proc = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .env("CASELEDGER_CRASH_REPLAY_CHILD", dir)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = proc.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        // Wait until the first replay has started, then let it (and maybe more) run a while.
        lines
            .next()
            .ok_or("replay child said nothing")?
            .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(delay_ms));
        proc.kill().map_err(|e| e.to_string())?;
        let _ = proc.wait();
        let scratch = std::path::Path::new(dir).join("replay-scratch");
        let left_runs = scratch.exists();

        let engine = Engine::open(dir.as_ref(), &"crash".into(), EngineConfig::default())
            .map_err(|e| e.to_string())?;
        if scratch.exists() {
            return Err(format!(
                "replay round {round}: open left {}",
                scratch.display()
            ));
        }
        let generations = engine.projections().generation_trees();
        if generations != 1 {
            return Err(format!(
                "replay round {round}: {generations} projection generations after open"
            ));
        }
        if engine.projections().checkpoint() != engine.log().written_head() {
            return Err(format!("replay round {round}: projections not caught up"));
        }
        if snapshot(&engine) != before {
            return Err(format!(
                "replay round {round}: answers changed by a killed replay"
            ));
        }
        eprintln!(
            "replay round {round}: killed after {delay_ms} ms (scratch runs left behind: {left_runs}); reopened clean"
        );
    }
    Ok(())
}

fn parent() -> Result<(), String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = tmp.path().to_str().ok_or("tmp path")?.to_owned();
    for round in 0..3 {
        let mut proc = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .env("CASELEDGER_CRASH_CHILD", &dir)
            .env("CASELEDGER_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = proc.stdout.take().ok_or("no stdout")?;
        let mut acked = Vec::new();
        let started = Instant::now();
        let kill_after = Duration::from_millis(400 + 300 * round);
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(|e| e.to_string())?;
            acked.push(
                line.trim()
                    .parse::<u64>()
                    .map_err(|e| format!("{line:?}: {e}"))?,
            );
            if started.elapsed() > kill_after {
                break;
            }
        }
        proc.kill().map_err(|e| e.to_string())?;
        let _ = proc.wait();
        let max_acked = acked.iter().copied().max().unwrap_or(0);

        // Before any catch-up: the projection checkpoint is not ahead of the log (I4).
        {
            let db = sled::open(&dir).map_err(|e| e.to_string())?;
            let domain: DomainName = "crash".into();
            let log = caseledger::eventlog::SledLog::open(&db, &domain, Default::default())
                .map_err(|e| e.to_string())?;
            let proj = caseledger::projections::Projections::open(&db, &domain)
                .map_err(|e| e.to_string())?;
            let head = log.written_head();
            if proj.checkpoint() > head {
                return Err(format!(
                    "round {round}: projection checkpoint {} ahead of log head {head}",
                    proj.checkpoint()
                ));
            }
            // I5: everything acknowledged survived, gapless, and decodes.
            if head.0 < max_acked {
                return Err(format!(
                    "round {round}: acknowledged {max_acked} but log head is {head}"
                ));
            }
            for (expected, ev) in (1u64..).zip(log.iter_from(Position(1))) {
                let ev = ev.map_err(|e| format!("round {round}: {e}"))?;
                if ev.position.0 != expected {
                    return Err(format!(
                        "round {round}: gap at {expected}, found {}",
                        ev.position
                    ));
                }
            }
            eprintln!(
                "round {round}: {} acknowledged (max {max_acked}), log head {head}, checkpoint {}",
                acked.len(),
                proj.checkpoint()
            );
        }

        // After catch-up, projections equal a full replay (I3).
        let engine = Engine::open(dir.as_ref(), &"crash".into(), EngineConfig::default())
            .map_err(|e| e.to_string())?;
        if engine.projections().checkpoint() != engine.log().written_head() {
            return Err("catch-up did not reach the log head".into());
        }
        let live = snapshot(&engine);
        engine.replay(&mut |_, _| {}).map_err(|e| e.to_string())?;
        if snapshot(&engine) != live {
            return Err(format!(
                "round {round}: caught-up projections differ from a replay"
            ));
        }
    }
    kill_mid_replay(&dir)
}

fn main() {
    if let Ok(dir) = std::env::var("CASELEDGER_CRASH_CHILD") {
        child(&dir);
        return;
    }
    if let Ok(dir) = std::env::var("CASELEDGER_CRASH_REPLAY_CHILD") {
        replay_child(&dir);
        return;
    }
    match parent() {
        Ok(()) => println!("crash: 1 passed, 0 failed"),
        Err(e) => {
            eprintln!("crash test failed: {e}");
            println!("crash: 0 passed, 1 failed");
            std::process::exit(1);
        }
    }
}
