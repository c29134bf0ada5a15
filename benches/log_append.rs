//! Append throughput of the event log against two baselines measured in the same run.
//!
//! Same events, same envelope bytes, same batch size B (events per flush) for every contender:
//!
//! 1. raw file: length-prefixed envelopes through a `BufWriter`, `File::sync_data` every B;
//! 2. bare sled: `Tree::insert` under big-endian position keys, `Db::flush` every B; and the
//!    same bytes as one `sled::Batch` per B (the ratio uses whichever of the two is faster);
//! 3. `SledLog`: one `write` of B events, then `flush_blocking`;
//! 4. `SledLog`: B `write`s of one event with an idempotency key each (one command at a time on
//!    the sync API), then `flush_blocking`;
//! 5. `SledLog` group commit: 64 tokio tasks, each `append`ing one event and awaiting durability.
//!
//! Events: mostly `FormAccepted` carrying a ~1.3 KB CommCare form (the conformance register
//! form with unique ids) and one `BlockApplied`; every 50th is a directory event.
//! Every contender builds and encodes its events inside the timed loop, so the ratios compare
//! storage paths, not event construction.
//!
//! `cargo bench --bench log_append`; `CASELEDGER_BENCH_EVENTS=n` sets N (default 1 000 000);
//! `CASELEDGER_BENCH_QUICK=1` (or `--quick`) runs N = 20 000 with B = 256 only;
//! `CASELEDGER_BENCH_ONLY=batches|group` runs one half. B = 1 runs on at most 5 000 events, and
//! contender 4 on at most 20 000 (one sled batch per command deadlocked sled 0.34.7 at scale).
//! The group-commit line is compared with bare sled batches of its average group. A watchdog
//! aborts the run if no event is built for 120 s.
//! Note: sled's `Db::flush` uses `sync_file_range` on Linux, which is cheaper and weaker than the
//! raw file's `sync_data` (docs/DURABILITY.md); the log/raw-file ratio is not like for like.

// The binary's allocator, so the figures are the ones `caseledger` gets (glibc malloc's
// arena locks were the top cost of replay in a profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{dir_size, machine, uuid_like, BenchResult};

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use domain::{
    Actions, BlockApplied, CaseId, CommandId, Create, DomainName, Event, FormAcceptedV1, FormId,
    FormRecord, GroupCreatedV1, GroupId, MembershipV1, Position, RecordedEvent, Timestamp,
    UserCreatedV1, UserId,
};
use eventlog::{encode_envelope, AppendRequest, EventStore, Expected, LogConfig, SledLog};

/// `/work/shared/commcare/conformance/01-shared-team/01-register.xml`; the two ids are replaced.
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
const TASKS: usize = 64;
/// Most events for the one-batch-per-command contender (see `main`).
const PER_COMMAND_MAX: u64 = 20_000;

/// Events built so far by any contender; the watchdog checks that it moves.
static PROGRESS: AtomicU64 = AtomicU64::new(0);
/// The contender running now, for the watchdog's message.
static CURRENT: Mutex<&str> = Mutex::new("start");

/// Event `i` of the workload (deterministic).
fn event(i: u64) -> Event {
    PROGRESS.fetch_add(1, Ordering::Relaxed);
    if i % 50 == 49 {
        let n = i / 50;
        return match n % 3 {
            0 => Event::UserCreatedV1(UserCreatedV1 {
                user_id: UserId::new(format!("u-{n}")),
                username: format!("worker{n}"),
            }),
            1 => Event::GroupCreatedV1(GroupCreatedV1 {
                group_id: GroupId::new(format!("g-{n}")),
                name: format!("Team {n}"),
                case_sharing: true,
            }),
            _ => Event::MemberAddedV1(MembershipV1 {
                group_id: GroupId::new(format!("g-{}", n - 1)),
                user_id: UserId::new(format!("u-{}", n - 2)),
            }),
        };
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
                update: vec![
                    ("edd".into(), "2026-09-01".into()),
                    ("lmp".into(), "2025-11-25".into()),
                ],
                ..Actions::default()
            },
        }],
    })
}

fn form_len() -> usize {
    match event(0) {
        Event::FormAcceptedV1(f) => f.form.raw.len() as usize,
        _ => 0,
    }
}

fn command_id(i: u64) -> CommandId {
    CommandId::new(format!("cmd-{i}"))
}

/// The envelope `SledLog` stores for event `i` (position `i + 1`).
fn envelope(i: u64) -> BenchResult<Vec<u8>> {
    Ok(encode_envelope(&RecordedEvent {
        position: Position(i + 1),
        recorded_at: Timestamp(BASE_TIME + i as i64),
        command_id: command_id(i),
        event: event(i),
    })?)
}

struct Run {
    name: String,
    events: u64,
    bytes: u64,
    elapsed: Duration,
    flushes: u64,
}

impl Run {
    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
    fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }
    fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "  {:<52} {:>9} ev {:>9.0} ev/s {:>8.1} MB/s {:>8.2} s {:>8} flushes",
            self.name,
            self.events,
            self.events_per_sec(),
            self.mb_per_sec(),
            self.elapsed.as_secs_f64(),
            self.flushes
        )
    }
}

fn raw_file(dir: &Path, n: u64, batch: u64) -> BenchResult<Run> {
    let file = File::create(dir.join("events.log"))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let (mut bytes, mut flushes) = (0u64, 0u64);
    let start = Instant::now();
    for i in 0..n {
        let env = envelope(i)?;
        out.write_all(&u32::try_from(env.len())?.to_le_bytes())?;
        out.write_all(&env)?;
        bytes += env.len() as u64;
        if (i + 1) % batch == 0 || i + 1 == n {
            out.flush()?;
            out.get_ref().sync_data()?;
            flushes += 1;
        }
    }
    Ok(Run {
        name: format!("raw file (write + sync_data every {batch})"),
        events: n,
        bytes,
        elapsed: start.elapsed(),
        flushes,
    })
}

fn bare_sled(dir: &Path, n: u64, batch: u64) -> BenchResult<Run> {
    let db = sled::open(dir)?;
    let tree = db.open_tree("bare")?;
    let (mut bytes, mut flushes) = (0u64, 0u64);
    let start = Instant::now();
    for i in 0..n {
        let env = envelope(i)?;
        bytes += env.len() as u64;
        tree.insert((i + 1).to_be_bytes(), env)?;
        if (i + 1) % batch == 0 || i + 1 == n {
            db.flush()?;
            flushes += 1;
        }
    }
    Ok(Run {
        name: format!("bare sled (insert + Db::flush every {batch})"),
        events: n,
        bytes,
        elapsed: start.elapsed(),
        flushes,
    })
}

fn bare_sled_batch(dir: &Path, n: u64, batch: u64) -> BenchResult<Run> {
    let db = sled::open(dir)?;
    let tree = db.open_tree("bare")?;
    let (mut bytes, mut flushes) = (0u64, 0u64);
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + batch).min(n);
        let mut writes = sled::Batch::default();
        for j in i..end {
            let env = envelope(j)?;
            bytes += env.len() as u64;
            writes.insert(&(j + 1).to_be_bytes()[..], env);
        }
        tree.apply_batch(writes)?;
        db.flush()?;
        flushes += 1;
        i = end;
    }
    Ok(Run {
        name: format!("bare sled (1 Batch of {batch} + Db::flush)"),
        events: n,
        bytes,
        elapsed: start.elapsed(),
        flushes,
    })
}

fn open_log(dir: &Path) -> BenchResult<(sled::Db, SledLog)> {
    let db = sled::open(dir)?;
    let log = SledLog::open(&db, &DomainName::new("bench"), LogConfig::default())?;
    Ok((db, log))
}

/// Encoded size of events `from..to`, computed outside the timed loop.
fn bytes_of(from: u64, to: u64) -> BenchResult<u64> {
    let mut total = 0;
    for i in from..to {
        total += envelope(i)?.len() as u64;
    }
    Ok(total)
}

fn sled_log_batched(dir: &Path, n: u64, batch: u64, bytes: u64) -> BenchResult<Run> {
    let (_db, log) = open_log(dir)?;
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + batch).min(n);
        log.write(AppendRequest {
            expected: Expected::Any,
            idempotency_key: None,
            command_id: command_id(i),
            recorded_at: Timestamp(BASE_TIME + i as i64),
            events: (i..end).map(event).collect(),
        })?;
        log.flush_blocking()?;
        i = end;
    }
    let elapsed = start.elapsed();
    Ok(Run {
        name: format!("SledLog (1 write of {batch} events + flush)"),
        events: n,
        bytes,
        elapsed,
        flushes: log.flush_count(),
    })
}

fn sled_log_per_command(dir: &Path, n: u64, batch: u64, bytes: u64) -> BenchResult<Run> {
    let (_db, log) = open_log(dir)?;
    let start = Instant::now();
    for i in 0..n {
        let id = command_id(i);
        log.write(AppendRequest {
            expected: Expected::Any,
            idempotency_key: Some(id.0.clone()),
            command_id: id,
            recorded_at: Timestamp(BASE_TIME + i as i64),
            events: vec![event(i)],
        })?;
        if (i + 1) % batch == 0 || i + 1 == n {
            log.flush_blocking()?;
        }
    }
    let elapsed = start.elapsed();
    Ok(Run {
        name: format!("SledLog ({batch} writes of 1 event + key, flush)"),
        events: n,
        bytes,
        elapsed,
        flushes: log.flush_count(),
    })
}

fn sled_log_group_commit(dir: &Path, n: u64, bytes: u64) -> BenchResult<Run> {
    let (_db, log) = open_log(dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().build()?;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..TASKS {
            let log = log.clone();
            let next = Arc::clone(&next);
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<_, eventlog::LogError>(());
                    }
                    let id = command_id(i);
                    log.append(AppendRequest {
                        expected: Expected::Any,
                        idempotency_key: Some(id.0.clone()),
                        command_id: id,
                        recorded_at: Timestamp(BASE_TIME + i as i64),
                        events: vec![event(i)],
                    })
                    .await?;
                }
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    let elapsed = start.elapsed();
    Ok(Run {
        name: format!("SledLog group commit ({TASKS} tasks x append 1 event)"),
        events: n,
        bytes,
        elapsed,
        flushes: log.flush_count(),
    })
}

/// Runs one contender in a fresh directory, printing its line and the on-disk size.
fn measure(
    out: &mut impl Write,
    label: &'static str,
    f: impl FnOnce(&Path) -> BenchResult<Run>,
) -> BenchResult<Run> {
    if let Ok(mut current) = CURRENT.lock() {
        *current = label;
    }
    let dir = tempfile::tempdir()?;
    let run = f(dir.path())?;
    run.print(out)?;
    writeln!(
        out,
        "  {:<52} on disk {:.1} MB",
        "",
        dir_size(dir.path()) as f64 / 1e6
    )?;
    out.flush()?;
    Ok(run)
}

/// Exits with a diagnostic when no event has been built for `STALL` (a sled 0.34.7 deadlock,
/// spacejam/sled#1412, has hung this bench), instead of hanging the run forever.
fn watchdog() {
    const STALL: Duration = Duration::from_secs(120);
    std::thread::spawn(|| {
        let mut last = PROGRESS.load(Ordering::Relaxed);
        loop {
            std::thread::sleep(STALL);
            let now = PROGRESS.load(Ordering::Relaxed);
            if now == last {
                let current = CURRENT.lock().map_or("?", |c| *c);
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "log_append: no progress for {} s in {current} after {now} events; \
                     sled 0.34.7 deadlock (spacejam/sled#1412)? aborting",
                    STALL.as_secs()
                );
                std::process::exit(2);
            }
            last = now;
        }
    });
}

fn main() -> BenchResult<()> {
    let quick = std::env::var_os("CASELEDGER_BENCH_QUICK").is_some()
        || std::env::args().any(|a| a == "--quick");
    let n: u64 = match std::env::var("CASELEDGER_BENCH_EVENTS") {
        Ok(v) => v.parse()?,
        Err(_) if quick => 20_000,
        Err(_) => 1_000_000,
    };
    let batches: Vec<u64> = if quick { vec![256] } else { vec![256, 4096, 1] };
    watchdog();
    let mut out = std::io::stdout().lock();
    let total_bytes = bytes_of(0, n)?;
    writeln!(out, "log_append: {}", machine())?;
    writeln!(
        out,
        "events: N = {n} (FormAccepted with a {} B form, every 50th a directory event), envelopes {:.1} MB, avg {} B/event",
        form_len(),
        total_bytes as f64 / 1e6,
        total_bytes / n.max(1)
    )?;
    let only = std::env::var("CASELEDGER_BENCH_ONLY").unwrap_or_default();
    for batch in batches.into_iter().filter(|_| only != "group") {
        let n = if batch == 1 { n.min(5_000) } else { n };
        let bytes = if batch == 1 {
            bytes_of(0, n)?
        } else {
            total_bytes
        };
        writeln!(out, "batch B = {batch} events per flush, N = {n}")?;
        let raw = measure(&mut out, "raw file", |dir| raw_file(dir, n, batch))?;
        let bare_inserts = measure(&mut out, "bare sled inserts", |dir| {
            bare_sled(dir, n, batch)
        })?;
        let bare_batch = measure(&mut out, "bare sled batches", |dir| {
            bare_sled_batch(dir, n, batch)
        })?;
        // Compare against the faster way of using sled directly.
        let bare = if bare_batch.events_per_sec() > bare_inserts.events_per_sec() {
            bare_batch
        } else {
            bare_inserts
        };
        let batched = measure(&mut out, "SledLog batched", |dir| {
            sled_log_batched(dir, n, batch, bytes)
        })?;
        // One sled batch per command deadlocked sled 0.34.7 after ~36 000 commands in a 1M run
        // (spacejam/sled#1412, docs/DURABILITY.md), so this contender stays small.
        let n_cmd = n.min(PER_COMMAND_MAX);
        if n_cmd < n {
            writeln!(
                out,
                "  (next line capped at N = {n_cmd}: one sled batch per command can deadlock sled 0.34.7)"
            )?;
        }
        let bytes_cmd = if n_cmd == n {
            bytes
        } else {
            bytes_of(0, n_cmd)?
        };
        let per_command = measure(&mut out, "SledLog per command", |dir| {
            sled_log_per_command(dir, n_cmd, batch, bytes_cmd)
        })?;
        for run in [&batched, &per_command] {
            writeln!(
                out,
                "  ratio {:<46} log/bare-sled {:.2} (target >= 0.80, vs {})  log/raw-file {:.2}",
                run.name,
                run.events_per_sec() / bare.events_per_sec(),
                bare.name,
                run.events_per_sec() / raw.events_per_sec()
            )?;
        }
    }
    if only == "batches" {
        return Ok(());
    }
    writeln!(out, "group commit, N = {n}")?;
    let group = measure(&mut out, "SledLog group commit", |dir| {
        sled_log_group_commit(dir, n, total_bytes)
    })?;
    let per_flush = (group.events / group.flushes.max(1)).max(1);
    writeln!(out, "  {per_flush} events per flush on average")?;
    let bare = measure(&mut out, "bare sled batches", |dir| {
        bare_sled_batch(dir, n, per_flush)
    })?;
    writeln!(
        out,
        "  ratio group commit / bare sled with the same events per flush {:.2}",
        group.events_per_sec() / bare.events_per_sec()
    )?;
    Ok(())
}
