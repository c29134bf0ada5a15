//! Form throughput (issue 4): parse + decide + durable append + project of a typical ~3 KB
//! CommCare form with two case blocks, against the raw parse cost measured in the same run.
//!
//! Workload: 200 users in 40 case-sharing groups, a case-sharing app; form `i` is an ANC visit
//! (`demo::form` plus question data) by a random user with two case blocks: the pregnancy case
//! (a create without `owner_id` in one form of four, so the server resolves the owner to the
//! user's group (R38); otherwise an update of a case registered at least 4096 forms earlier, read
//! back from the projections) and a new visit case (`common/anc.rs`). Forms are built before any
//! timing.
//!
//! 1. Raw parse: `casexml::parse` of every form, on one thread and on every CPU.
//! 2. Durable: `TASKS` tokio tasks on a multi-thread runtime with one worker per CPU; each takes
//!    the next `BATCH` forms, runs `Engine::prepare_submission` on each (hash + parse, counted),
//!    and hands the batch to `Engine::execute_many`, which decides, appends, projects and
//!    returns once the log is durable (group commit). Timed from the first batch to the last
//!    acknowledgement. Run in four rounds, each with its own `VmHWM` window, to show memory stays
//!    bounded as the store grows.
//!
//! `cargo bench --bench forms`; `CASELEDGER_BENCH_FORMS=n` sets the form count (default 100 000),
//! `CASELEDGER_BENCH_TASKS` and `CASELEDGER_BENCH_BATCH` the concurrency (default 4 x 256),
//! `CASELEDGER_BENCH_FSYNC=0` turns off the data-file fdatasync (`EngineConfig::fsync`),
//! `CASELEDGER_BENCH_RAW=inline` keeps raw submissions in the log (`EngineConfig::raw_out_of_line`).
//! Target: durable >= 20 000 forms/s on a 2-core machine.

// The binary's allocator, so the figures are the ones `caseledger` gets (glibc malloc's
// arena locks were the top cost of replay in a profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::anc::{directory, raw_form, APP};
use common::{
    env_or, machine, memory_kb, process_cpu_seconds, raw_out_of_line, reset_peak, written_bytes,
    BenchResult, GROUPS, USERS,
};

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use caseledger::domain::{AppId, Command, DomainName};
use caseledger::{Engine, EngineConfig, Request, SubmitOutcome, SubmitStatus};

/// The durable phase runs in this many rounds, each with its own memory window.
const ROUNDS: usize = 4;

/// Parses every form on `threads` threads; returns forms per second.
fn raw_parse(forms: &[Vec<u8>], threads: usize) -> BenchResult<f64> {
    let limits = caseledger::casexml::Limits::default();
    let per = forms.len().div_ceil(threads.max(1)).max(1);
    let started = Instant::now();
    let parsed: usize = std::thread::scope(|s| {
        let handles: Vec<_> = forms
            .chunks(per)
            .map(|part| {
                let limits = &limits;
                s.spawn(move || {
                    part.iter()
                        .filter(|raw| caseledger::casexml::parse(raw, limits).is_ok())
                        .count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let seconds = started.elapsed().as_secs_f64();
    if parsed != forms.len() {
        return Err(format!(
            "{} of {} forms did not parse",
            forms.len() - parsed,
            forms.len()
        )
        .into());
    }
    Ok(forms.len() as f64 / seconds)
}

/// Tallies of a durable round.
#[derive(Default)]
struct Tally {
    accepted: usize,
    other: usize,
    failed: usize,
}

/// Runs `batches` through the engine from `tasks` concurrent tasks; returns the tally and seconds.
fn durable_round(
    runtime: &tokio::runtime::Runtime,
    engine: &Arc<Engine>,
    batches: Vec<Vec<Vec<u8>>>,
    tasks: usize,
) -> BenchResult<(Tally, f64)> {
    let queue: Arc<Vec<Mutex<Vec<Vec<u8>>>>> =
        Arc::new(batches.into_iter().map(Mutex::new).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tally = runtime.block_on(async {
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let (engine, queue, next) = (Arc::clone(engine), Arc::clone(&queue), Arc::clone(&next));
            handles.push(tokio::spawn(async move {
                let mut tally = Tally::default();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(slot) = queue.get(k) else {
                        return Ok::<_, caseledger::EngineError>(tally);
                    };
                    let raws = match slot.lock() {
                        Ok(mut b) => std::mem::take(&mut *b),
                        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
                    };
                    let requests = raws
                        .into_iter()
                        .map(|raw| {
                            let sub = engine.prepare_submission(raw, Some(AppId::new(APP)));
                            Request::new(Command::SubmitForm(Box::new(sub)))
                        })
                        .collect();
                    for outcome in engine.execute_many(requests).await? {
                        match outcome.and_then(|o| SubmitOutcome::from_events(&o.events)) {
                            Ok(o) if o.outcome == SubmitStatus::Accepted => tally.accepted += 1,
                            Ok(_) => tally.other += 1,
                            Err(_) => tally.failed += 1,
                        }
                    }
                }
            }));
        }
        let mut total = Tally::default();
        for h in handles {
            let t = h.await??;
            total.accepted += t.accepted;
            total.other += t.other;
            total.failed += t.failed;
        }
        Ok::<_, Box<dyn std::error::Error>>(total)
    })?;
    Ok((tally, started.elapsed().as_secs_f64()))
}

fn main() -> BenchResult<()> {
    let n: usize = env_or("CASELEDGER_BENCH_FORMS", 100_000)?;
    let tasks: usize = env_or("CASELEDGER_BENCH_TASKS", 4)?;
    let batch: usize = env_or("CASELEDGER_BENCH_BATCH", 256)?;
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    let mut out = std::io::stdout().lock();
    writeln!(out, "forms: {}", machine())?;

    let forms: Vec<Vec<u8>> = (0..n as u64).map(raw_form).collect();
    let bytes: usize = forms.iter().map(Vec::len).sum();
    let blocks = caseledger::casexml::parse(
        forms.first().map_or(&[][..], Vec::as_slice),
        &Default::default(),
    )
    .map(|f| f.blocks.len())
    .unwrap_or(0);
    writeln!(
        out,
        "workload: {n} forms, avg {} B, {blocks} case blocks each, {USERS} users in {GROUPS} case-sharing groups",
        bytes / n.max(1)
    )?;

    let parse_1 = raw_parse(&forms, 1)?;
    let parse_all = raw_parse(&forms, cpus)?;
    writeln!(
        out,
        "  {:<58} {:>9.0} forms/s",
        "raw casexml::parse, 1 thread", parse_1
    )?;
    writeln!(
        out,
        "  {:<58} {:>9.0} forms/s",
        format!("raw casexml::parse, {cpus} threads"),
        parse_all
    )?;
    out.flush()?;

    let dir = tempfile::tempdir()?;
    let engine = Arc::new(Engine::open(
        dir.path(),
        &DomainName::new("bench"),
        EngineConfig {
            fsync: env_or("CASELEDGER_BENCH_FSYNC", 1)? == 1,
            cache_capacity: env_or("CASELEDGER_BENCH_CACHE_MB", 64)? << 20,
            raw_out_of_line: raw_out_of_line(),
            ..EngineConfig::default()
        },
    )?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus)
        .enable_all()
        .build()?;
    for outcome in runtime.block_on(engine.execute_many(directory()))? {
        outcome?;
    }

    // Several rounds, each with its own VmHWM window: memory that stays put while the store grows
    // is bounded; memory that grows round after round is not.
    let mut batches: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut rest = forms.into_iter().peekable();
    while rest.peek().is_some() {
        batches.push(rest.by_ref().take(batch.max(1)).collect());
    }
    let per_round = batches.len().div_ceil(ROUNDS).max(1);
    let mut rounds: Vec<Vec<Vec<Vec<u8>>>> = Vec::new();
    let mut batches = batches.into_iter().peekable();
    while batches.peek().is_some() {
        rounds.push(batches.by_ref().take(per_round).collect());
    }
    let flushes_before = engine.log().flush_count();
    let mut total = Tally::default();
    let mut seconds = 0.0;
    let mut round_rates = Vec::with_capacity(ROUNDS);
    writeln!(
        out,
        "durable: {tasks} tasks x execute_many of {batch} forms (prepare_submission counted), {cpus} runtime workers, EngineConfig fsync = {}, raw submissions {}",
        env_or("CASELEDGER_BENCH_FSYNC", 1)? == 1,
        if raw_out_of_line() { "out of line" } else { "inline" }
    )?;
    for (round, batches) in (1..).zip(rounds) {
        let forms_in: usize = batches.iter().map(Vec::len).sum();
        let (rss_before, _) = memory_kb();
        let reset = reset_peak();
        let cpu_before = process_cpu_seconds();
        let written_before = written_bytes();
        let (tally, secs) = durable_round(&runtime, &engine, batches, tasks)?;
        let cpu = process_cpu_seconds() - cpu_before;
        let written = written_bytes() - written_before;
        let (_, peak) = memory_kb();
        let delta = peak.saturating_sub(rss_before);
        writeln!(
            out,
            "  {:<58} {:>9.0} forms/s {:>7.2} s; VmHWM{} {:.1} MB over RSS {:.1} MB: +{:.1} MB, {} B per form in flight",
            format!("round {round}/{ROUNDS}: parse+decide+append+project, durable"),
            forms_in as f64 / secs,
            secs,
            if reset { "" } else { " (NOT reset)" },
            peak as f64 / 1024.0,
            rss_before as f64 / 1024.0,
            delta as f64 / 1024.0,
            delta * 1024 / (tasks * batch).max(1) as u64
        )?;
        writeln!(
            out,
            "  {:<58} CPU {cpu:.2} s for {secs:.2} s on {cpus} cores: {:.0} µs of CPU per form; written to disk {:.1} MB, {:.1} KB per form",
            "",
            cpu * 1e6 / forms_in.max(1) as f64,
            written as f64 / 1e6,
            written as f64 / 1e3 / forms_in.max(1) as f64
        )?;
        out.flush()?;
        round_rates.push(forms_in as f64 / secs);
        total.accepted += tally.accepted;
        total.other += tally.other;
        total.failed += tally.failed;
        seconds += secs;
    }
    let durable = n as f64 / seconds;
    let flushes = engine.log().flush_count() - flushes_before;
    writeln!(
        out,
        "  {:<58} {:>9.0} forms/s {:>7.2} s; {} accepted, {} other, {} failed; {} flushes ({} forms/flush); log head {}",
        "all: parse+decide+append+project, durable",
        durable,
        seconds,
        total.accepted,
        total.other,
        total.failed,
        flushes,
        n as u64 / flushes.max(1),
        engine.log().written_head()
    )?;
    writeln!(
        out,
        "ratio durable/raw parse: {:.2} (1 thread), {:.2} ({cpus} threads); durable {durable:.0} forms/s (target >= 20000: {})",
        durable / parse_1,
        durable / parse_all,
        if durable >= 20_000.0 { "met" } else { "MISSED" }
    )?;
    if total.accepted != n {
        return Err(format!("{} of {n} forms were not accepted", n - total.accepted).into());
    }
    let bare = bare_sled_writes(&engine, batch, per_round * batch.max(1))?;
    writeln!(
        out,
        "  {:<58} {:>9.0} forms/s {:>7.2} s; {} log entries, {} random-key entries; CPU {:.0} µs per form",
        "bare sled, the same writes, 1 thread (no parse, no decide)",
        bare.forms as f64 / bare.seconds,
        bare.seconds,
        bare.log_entries,
        bare.random_entries,
        bare.cpu * 1e6 / bare.forms.max(1) as f64
    )?;
    for (round, ((forms_in, secs), durable)) in (1..).zip(bare.rounds.iter().zip(&round_rates)) {
        let rate = *forms_in as f64 / secs;
        writeln!(
            out,
            "  {:<58} {:>9.0} forms/s {:>7.2} s; durable round / bare round {:.2}",
            format!("bare sled round {round}/{}", bare.rounds.len()),
            rate,
            secs,
            durable / rate
        )?;
    }
    writeln!(
        out,
        "ratio durable/bare sled writes: {:.2} (target >= 0.80: {})",
        durable / (bare.forms as f64 / bare.seconds),
        if durable / (bare.forms as f64 / bare.seconds) >= 0.8 {
            "met"
        } else {
            "MISSED"
        }
    )?;
    let last_over_first = |rates: &[f64]| match (rates.first(), rates.last()) {
        (Some(first), Some(last)) if *first > 0.0 => last / first,
        _ => f64::NAN,
    };
    let bare_rates: Vec<f64> = bare.rounds.iter().map(|(f, s)| *f as f64 / s).collect();
    let durable_curve = last_over_first(&round_rates);
    let bare_curve = last_over_first(&bare_rates);
    writeln!(
        out,
        "last round / first round: durable {durable_curve:.2} (target >= 0.70: {}), bare sled doing the same writes {bare_curve:.2}",
        if durable_curve >= 0.7 {
            "met"
        } else if durable_curve >= bare_curve {
            "MISSED, at or above bare sled's own curve"
        } else {
            "MISSED"
        }
    )?;
    Ok(())
}

/// What the bare-sled baseline did.
struct Bare {
    forms: u64,
    log_entries: u64,
    random_entries: u64,
    seconds: f64,
    cpu: f64,
    /// Forms and seconds of each round of the durable phase's size.
    rounds: Vec<(usize, f64)>,
}

/// The sled writes the engine made for the forms, without parsing or deciding: into a fresh
/// store with the engine's cache, each group of `batch` forms as one batch of the exact envelopes
/// the engine logged (sequential keys) and one batch of projection-shaped entries at the engine's
/// keys (the form id, each case under its owner, an owner entry per created case, the form's
/// time-travel version row at its position, and the `indexed_on` rows of the form and its cases
/// with the case's previous one removed; values of typical sizes),
/// then `Db::flush` and `fdatasync` of the data file, as a group commit does. When the engine
/// stores raw submissions out of line, each group first appends its forms' bytes (with a
/// 44-byte record header) to a plain file and 8 bytes per form to another, and `fdatasync`s
/// both, as the log does. One thread, so
/// its rate is what sled alone gives a writer that does nothing else.
fn bare_sled_writes(engine: &Engine, batch: usize, round_forms: usize) -> BenchResult<Bare> {
    use caseledger::domain::{Event, Position};
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(EngineConfig::default().cache_capacity)
        .open()?;
    let data = std::fs::File::open(dir.path().join("db"))?;
    let log = db.open_tree("log")?;
    let proj = db.open_tree("proj")?;
    let events: Vec<_> = engine
        .log()
        .iter_from(Position(1))
        .collect::<Result<_, _>>()?;
    let forms: Vec<_> = events
        .iter()
        .filter(|e| matches!(e.event, Event::FormAcceptedV1(_)))
        .collect();
    let mut bare = Bare {
        forms: forms.len() as u64,
        log_entries: 0,
        random_entries: 0,
        seconds: 0.0,
        cpu: 0.0,
        rounds: Vec::new(),
    };
    // The engine's envelopes: the facts only when raw submissions are out of line (then their
    // bytes are written to the raw file below), else the bytes inline.
    let out_of_line = raw_out_of_line();
    let mut envelopes = Vec::with_capacity(forms.len());
    let mut raws = Vec::with_capacity(forms.len());
    for e in &forms {
        let whole = engine.log().with_raw((*e).clone())?;
        let raw = whole
            .event
            .form_record()
            .and_then(|f| f.raw.bytes())
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        if out_of_line {
            envelopes.push(caseledger::eventlog::encode_envelope(e)?);
            raws.push(raw);
        } else {
            envelopes.push(caseledger::eventlog::encode_envelope(&whole)?);
        }
    }
    let mut raw_file = std::fs::File::create(dir.path().join("raw.dat"))?;
    let mut index_file = std::fs::File::create(dir.path().join("raw.idx"))?;
    let mut last_change: HashMap<caseledger::domain::CaseId, u64> = HashMap::new();
    let cpu_before = process_cpu_seconds();
    let started = std::time::Instant::now();
    let mut round_started = (0usize, 0.0f64);
    for (group, (chunk, envs)) in forms
        .chunks(batch.max(1))
        .zip(envelopes.chunks(batch.max(1)))
        .enumerate()
    {
        if out_of_line {
            let mut records = Vec::new();
            for raw in raws.iter().skip(group * batch.max(1)).take(chunk.len()) {
                records.extend_from_slice(&[0u8; 44]);
                records.extend_from_slice(raw);
            }
            raw_file.write_all(&records)?;
            raw_file.sync_data()?;
            index_file.write_all(&vec![0u8; 8 * chunk.len()])?;
            index_file.sync_data()?;
        }
        let mut log_batch = sled::Batch::default();
        let mut proj_batch = sled::Batch::default();
        for (e, env) in chunk.iter().zip(envs) {
            log_batch.insert(&e.position.0.to_be_bytes(), env.as_slice());
            bare.log_entries += 1;
            let Event::FormAcceptedV1(f) = &e.event else {
                continue;
            };
            proj_batch.insert(format!("f{}", f.form.form_id).as_bytes(), vec![1u8; 160]);
            bare.random_entries += 1;
            for b in &f.blocks {
                // The case row, keyed by its owner; the owner index when it appears.
                proj_batch.insert(
                    format!("c{}{}", b.user, b.case_id).as_bytes(),
                    vec![2u8; 700],
                );
                bare.random_entries += 1;
                if b.actions.create.is_some() {
                    proj_batch.insert(format!("o{}", b.case_id).as_bytes(), b.user.as_bytes());
                    bare.random_entries += 1;
                }
                // Its `indexed_on` row at this position, and the one of its last change removed.
                let mut indexed = b"i".to_vec();
                indexed.extend_from_slice(&e.position.0.to_be_bytes());
                indexed.extend_from_slice(b.case_id.as_str().as_bytes());
                proj_batch.insert(indexed, vec![4u8; 16]);
                if let Some(before) = last_change.insert(b.case_id.clone(), e.position.0) {
                    let mut old = b"i".to_vec();
                    old.extend_from_slice(&before.to_be_bytes());
                    old.extend_from_slice(b.case_id.as_str().as_bytes());
                    proj_batch.remove(old);
                }
            }
            // The form's `indexed_on` row at this position.
            let mut indexed = b"j".to_vec();
            indexed.extend_from_slice(&e.position.0.to_be_bytes());
            indexed.extend_from_slice(f.form.form_id.as_str().as_bytes());
            proj_batch.insert(indexed, vec![4u8; 16]);
            // The form's version row for time travel (issue 9), keyed by position: its cases
            // as it left them.
            let mut version = b"v".to_vec();
            version.extend_from_slice(&e.position.0.to_be_bytes());
            proj_batch.insert(version, vec![3u8; 560 * f.blocks.len()]);
        }
        log.apply_batch(log_batch)?;
        proj.apply_batch(proj_batch)?;
        db.flush()?;
        data.sync_data()?;
        let done = (group + 1) * batch.max(1);
        if done % round_forms.max(1) == 0 || done >= forms.len() {
            let now = started.elapsed().as_secs_f64();
            let forms_in = done.min(forms.len()) - round_started.0;
            bare.rounds.push((forms_in, now - round_started.1));
            round_started = (done.min(forms.len()), now);
        }
    }
    bare.seconds = started.elapsed().as_secs_f64();
    bare.cpu = process_cpu_seconds() - cpu_before;
    Ok(bare)
}
