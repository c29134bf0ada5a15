//! `verify` throughput against a raw SHA-256 loop over the same bytes, in the same run.
//!
//! A log of N events (mostly `FormAccepted` with a ~1.3 KB CommCare form, every 50th a
//! directory event) is written with `SledLog::write` in groups of 1024 and flushed. Then:
//!
//! 1. raw SHA-256: the stored envelopes, read into memory beforehand, hashed by the chain
//!    formula `SHA-256(prev ‖ position ‖ envelope)` with `sha2` directly, in a plain loop;
//! 2. `SledLog::verify(1)`: read every entry from sled, check key, format, crc32, header, the
//!    stored previous hash, and hash it — what `caseledger verify` does after opening.
//!
//! Each contender runs `ROUNDS` times; the best round counts. The figure of merit is verify's
//! rate as a fraction of the raw rate (target: at least 50 %).
//!
//! `cargo bench --bench verify`; `CASELEDGER_BENCH_EVENTS=n` sets N (default 200 000);
//! `CASELEDGER_BENCH_QUICK=1` (or `--quick`) runs N = 20 000.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{machine, uuid_like, BenchResult};

use std::io::Write;
use std::time::Instant;

use domain::{
    Actions, BlockApplied, CaseId, CommandId, Create, DomainName, Event, FormAcceptedV1, FormId,
    FormRecord, Position, Timestamp, UserCreatedV1, UserId,
};
use eventlog::{AppendRequest, Expected, LogConfig, SledLog, GENESIS};
use sha2::{Digest, Sha256};

const REGISTER_FORM: &str = r#"<?xml version='1.0' ?><data xmlns:jrm="http://dev.commcarehq.org/jr/xforms" xmlns="http://openrosa.org/formdesigner/7A1C2F4E-3B9D-4E0A-8C51-2D6F0B9E4A13" uiVersion="1" version="31" name="Register Pregnancy">
  <mother_name>Monica Achieng</mother_name>
  <edd>2026-09-01</edd>
  <n0:case xmlns:n0="http://commcarehq.org/case/transaction/v2" case_id="{case_id}" date_modified="2026-03-02T09:15:22.104+03:00" user_id="u-david">
    <n0:create>
      <n0:case_name>Monica Achieng</n0:case_name>
      <n0:case_type>pregnancy</n0:case_type>
    </n0:create>
    <n0:update>
      <n0:edd>2026-09-01</n0:edd>
      <n0:lmp>2025-11-25</n0:lmp>
    </n0:update>
  </n0:case>
  <n1:meta xmlns:n1="http://openrosa.org/jr/xforms">
    <n1:deviceID>351971163701891</n1:deviceID>
    <n1:timeStart>2026-03-02T09:15:22.104+03:00</n1:timeStart>
    <n1:timeEnd>2026-03-02T09:15:22.104+03:00</n1:timeEnd>
    <n1:username>david</n1:username>
    <n1:userID>u-david</n1:userID>
    <n1:instanceID>{instance_id}</n1:instanceID>
    <n2:appVersion xmlns:n2="http://commcarehq.org/xforms">CommCare Android, version "2.53.1"(465091). App v31. CommCare Version 2.53.1. Build 465091, built on: 2024-02-20</n2:appVersion>
  </n1:meta>
</data>
"#;

const BASE_TIME: i64 = 1_772_432_122_104;
const GROUP: u64 = 1024;
const ROUNDS: usize = 3;

fn event(i: u64) -> Event {
    if i % 50 == 49 {
        return Event::UserCreatedV1(UserCreatedV1 {
            user_id: UserId::new(format!("u-{i}")),
            username: format!("worker{i}"),
        });
    }
    let case_id = uuid_like(0x3f9b_6a52, i);
    let instance_id = uuid_like(0x3d30_7d25, i);
    let raw = REGISTER_FORM
        .replace("{case_id}", &case_id)
        .replace("{instance_id}", &instance_id);
    let mut content_hash = [0u8; 32];
    content_hash[..8].copy_from_slice(&i.to_le_bytes());
    Event::FormAcceptedV1(FormAcceptedV1 {
        form: FormRecord {
            form_id: FormId::new(instance_id),
            xmlns: "http://openrosa.org/formdesigner/7A1C2F4E-3B9D-4E0A-8C51-2D6F0B9E4A13".into(),
            app_id: None,
            user_id: Some("u-david".into()),
            content_hash,
            raw: raw.into_bytes().into(),
        },
        blocks: vec![BlockApplied {
            case_id: CaseId::new(case_id),
            date: Timestamp(BASE_TIME),
            user: "u-david".into(),
            actions: Actions {
                create: Some(Create {
                    case_type: "pregnancy".into(),
                    case_name: "Monica Achieng".into(),
                    owner_id: Some("g-team".into()),
                    external_id: None,
                    date_opened: None,
                }),
                ..Actions::default()
            },
        }],
    })
}

/// Seconds of the best of `ROUNDS` runs of `f`, and its last result.
fn best<T>(mut f: impl FnMut() -> BenchResult<T>) -> BenchResult<(f64, T)> {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let out = f()?;
        best = best.min(start.elapsed().as_secs_f64());
        last = Some(out);
    }
    let last = last.ok_or("no rounds")?;
    Ok((best, last))
}

fn main() -> BenchResult<()> {
    let quick = std::env::var_os("CASELEDGER_BENCH_QUICK").is_some()
        || std::env::args().any(|a| a == "--quick");
    let n: u64 = match std::env::var("CASELEDGER_BENCH_EVENTS") {
        Ok(v) => v.parse()?,
        Err(_) if quick => 20_000,
        Err(_) => 200_000,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "verify: {}", machine())?;
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new().path(dir.path()).open()?;
    let log = SledLog::open(&db, &DomainName::new("bench"), LogConfig::default())?;
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let events: Vec<Event> = (i..n.min(i + GROUP)).map(event).collect();
        i += events.len() as u64;
        log.write(AppendRequest {
            expected: Expected::Any,
            idempotency_key: None,
            command_id: CommandId::new(format!("cmd-{i}")),
            recorded_at: Timestamp(BASE_TIME + i as i64),
            events,
        })?;
    }
    log.flush_blocking()?;
    writeln!(
        out,
        "wrote N = {n} events in {:.2}s",
        start.elapsed().as_secs_f64()
    )?;

    // The same bytes, in memory, for the raw loop.
    let envelopes: Vec<(Position, Vec<u8>)> = log
        .chain_from(Position(1))?
        .map(|e| e.map(|e| (e.position, e.envelope.to_vec())))
        .collect::<Result<_, _>>()?;
    let bytes: u64 = envelopes.iter().map(|(_, e)| e.len() as u64).sum();
    writeln!(
        out,
        "envelopes: {:.1} MB, avg {} B/event",
        bytes as f64 / 1e6,
        bytes / n.max(1)
    )?;

    let (raw_s, raw_head) = best(|| {
        let mut prev = GENESIS;
        for (position, envelope) in &envelopes {
            let mut sha = Sha256::new();
            sha.update(prev);
            sha.update(position.0.to_be_bytes());
            sha.update(envelope);
            prev = sha.finalize().into();
        }
        Ok(prev)
    })?;
    let (verify_s, verified) = best(|| Ok(log.verify(Position(1))?))?;
    if verified.head_hash != raw_head || verified.entries != n {
        return Err("verify and the raw loop disagree on the head hash".into());
    }
    let rate = |s: f64| (n as f64 / s, bytes as f64 / s / 1e6);
    let (raw_eps, raw_mbs) = rate(raw_s);
    let (ver_eps, ver_mbs) = rate(verify_s);
    writeln!(
        out,
        "raw SHA-256 loop (memory): {raw_s:.3}s  {raw_eps:>10.0} events/s  {raw_mbs:>7.1} MB/s"
    )?;
    writeln!(
        out,
        "SledLog::verify (sled):    {verify_s:.3}s  {ver_eps:>10.0} events/s  {ver_mbs:>7.1} MB/s"
    )?;
    writeln!(
        out,
        "verify / raw = {:.0} % (target >= 50 %)",
        100.0 * raw_s / verify_s
    )?;
    Ok(())
}
