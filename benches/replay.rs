//! Replay throughput and memory of every projection against a raw read + decode + fold baseline
//! measured in the same run, over the same log.
//!
//! 1. Generate: a directory (200 users, 40 case-sharing groups, one membership per user, 2 apps),
//!    then `FormAccepted` commands carrying a real CommCare form (`demo::form` plus question
//!    data, about 1.3 KB) with one or two `BlockApplied` over a pool of cases (N / 5, at most
//!    200 000): creates owned by the submitter's group, updates, some closes, a
//!    `DiagnosticRaised` when a closed case is updated, and a `FormRejected` plus its diagnostic
//!    every 997th form. Ids are random-looking UUIDs, as CommCare's are. Each command is one
//!    append with its idempotency key, as the engine writes it, handed to sled 64 at a time
//!    through `SledLog::write_group`; `flush_blocking` every 4096 events. Not timed.
//! 2. Replay (`Engine::replay`): every projection into a fresh generation, then the swap. Peak
//!    RSS is the `VmHWM` of this phase alone (reset through `/proc/self/clear_refs` first), so
//!    it includes what generation left resident (printed as "RSS before").
//! 3. Raw baseline: `SledLog::iter_from` (read, crc, decode) folded into `HashMap`s with
//!    `domain::apply_block` and `Directory::apply`; nothing written.
//! 4. Check, untimed: case lists, open cases, diagnostics and users agree, and 2000 sampled
//!    cases are equal whole, with one history entry per form, between replay and the raw fold.
//!
//! Replay runs before the baseline so that memory the baseline's maps leave with the allocator
//! cannot count against replay's peak. Both read a log that was just written, so both read
//! through the OS page cache. A phase that stops progressing ends the run (see `watchdog`).
//!
//! `cargo bench --bench replay`; `CASELEDGER_BENCH_EVENTS=n` sets N (default 1 000 000),
//! `CASELEDGER_BENCH_REPLAY_CHUNK` and `CASELEDGER_BENCH_CACHE_MB` the engine knobs,
//! `CASELEDGER_BENCH_TRAVEL=0` skips the time-travel timings that follow the check;
//! `CASELEDGER_BENCH_TRAVEL_ONLY=<dir>` runs only them, on a store kept by
//! `CASELEDGER_BENCH_KEEP=1`; `CASELEDGER_BENCH_RAW=inline` keeps raw submissions in the log
//! (`EngineConfig::raw_out_of_line`).
//!
//! Then, each in a fresh process on the same store: `Engine::open` + `Engine::replay` (as
//! `caseledger replay` runs); a bare sled open and read of the log; and the floor of the
//! rebuild's writes, sled writing the rows of the generation just rebuilt into a new tree beside
//! the live one (key order, the rebuild's batches of 512, its final flush; only the writes are
//! timed).
//! Targets (issue 9 §7): fresh replay >= 0.5 of the raw rate, its peak RSS <= 1.1 times the bare
//! read's. The write floor bounds the first: raw seconds / write seconds is the most any replay
//! that writes these rows to sled can reach.

// The binary's allocator, so the figures are the ones `caseledger` gets (glibc malloc's
// arena locks were the top cost of replay in a profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{
    child_fields, dir_size, env_or, group, machine, memory_kb, mix, raw_out_of_line, reset_peak,
    thread_cpu_seconds, user, uuid_like, BenchResult, GROUPS, USERS,
};

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caseledger::demo::{form, Block};
use caseledger::domain::{
    apply_block, Actions, AppCreatedV1, AppId, BlockApplied, Case, CaseId, CommandId, Create,
    Diagnostic, DiagnosticCode, DiagnosticRaisedV1, Directory, DomainName, ErrorCode, Event,
    FormAcceptedV1, FormId, FormRecord, FormRejectedV1, GroupCreatedV1, GroupId, MembershipV1,
    Position, RecordedEvent, Rejection, Timestamp, UserCreatedV1, UserId,
};
use caseledger::eventlog::{encode_envelope, AppendRequest, Expected, SledLog};
use caseledger::{Engine, EngineConfig};

const MAX_CASES: u64 = 200_000;
const FLUSH_EVERY: u64 = 4096;
/// Cases the check compares whole between the raw fold and replay.
const SAMPLE: usize = 2000;
/// Commands per `write_group` while generating.
const GROUP: usize = 64;
/// A phase that makes no progress for this long is reported as stalled and the run ends.
const STALL: Duration = Duration::from_secs(180);
const XMLNS: &str = "http://openrosa.org/formdesigner/DEMO-FORM";
/// 2026-03-02T06:15:22.104Z.
const BASE_TIME: i64 = 1_772_432_122_104;

/// The engine knobs replay runs with unless `CASELEDGER_BENCH_REPLAY_CHUNK` (events) or
/// `CASELEDGER_BENCH_CACHE_MB` say otherwise; the output reports what was used. sled keeps every
/// node version an atomic batch replaces until the batch ends, so replay memory grows with the
/// chunk: the engine's default of 8192 peaks near 340 MB at 200 000 events, 1024 near 225 MB at
/// 1 000 000 (docs/PERFORMANCE.md). The cache is the engine's default.
const REPLAY_CHUNK: usize = 1024;
const CACHE_MB: u64 = 64;

/// Every this many forms one updates the hot case (case 0), never closing it.
const HOT_EVERY: u64 = 997;
/// The hot case.
const HOT_CASE: u64 = 0;
/// Random (case or user, position) pairs per time-travel query kind, unless
/// `CASELEDGER_BENCH_TRAVEL_QUERIES` says otherwise (fewer, while iterating).
const TRAVEL_QUERIES: usize = 1000;

/// splitmix64: a deterministic workload without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn case_id(k: u64) -> String {
    uuid_like(0x3f9b_6a52, k)
}

/// Question data outside the case blocks, about 450 bytes, as a real ANC visit form has.
fn questions(i: u64) -> String {
    format!(
        "  <visit_type>anc</visit_type><visit_number>{}</visit_number>\n  \
         <vitals><hb_level>11.{}</hb_level><bp_systolic>1{:02}</bp_systolic><bp_diastolic>{}</bp_diastolic><weight_kg>6{}.5</weight_kg></vitals>\n  \
         <danger_signs>none</danger_signs><counselling><nutrition>yes</nutrition><birth_plan>yes</birth_plan><hiv_test>declined</hiv_test></counselling>\n  \
         <next_visit>2026-04-{:02}</next_visit><gps>-1.3133 36.7892 1650.0 12.0</gps>\n  \
         <chw_notes>Client reports feeling well; reminded about the clinic visit and iron tablets.</chw_notes>\n",
        1 + i % 8,
        i % 10,
        i % 40,
        70 + i % 20,
        i % 10,
        1 + i % 28
    )
}

/// `demo::form` with question data after the root element.
fn raw_form(i: u64, instance_id: &str, submitter: &str, blocks: &[Block<'_>]) -> Vec<u8> {
    let mut raw = form(instance_id, submitter, blocks);
    let at = raw.iter().position(|b| *b == b'\n').map_or(0, |p| p + 1);
    raw.splice(at..at, questions(i).into_bytes());
    raw
}

/// One generated block: what the XML says and what the recorded event says.
struct Planned {
    case: u64,
    create: bool,
    close: bool,
    updates: Vec<(String, String)>,
}

fn updates(rng: &mut Rng, create: bool) -> Vec<(String, String)> {
    let mut u = vec![
        ("anc_visits".to_owned(), (1 + rng.below(8)).to_string()),
        ("last_visit_hb".to_owned(), format!("11.{}", rng.below(10))),
        ("danger_signs".to_owned(), "none".to_owned()),
        (
            "next_visit".to_owned(),
            format!("2026-04-{:02}", 1 + rng.below(28)),
        ),
    ];
    if create {
        u.push(("edd".to_owned(), "2026-09-01".to_owned()));
        u.push(("lmp".to_owned(), "2025-11-25".to_owned()));
        u.push(("village".to_owned(), format!("Kibera {}", rng.below(12))));
    }
    u
}

/// Builds the events of form command `i` and advances the workload state.
struct Workload {
    rng: Rng,
    cases: u64,
    created: u64,
    closed: Vec<bool>,
}

impl Workload {
    fn new(n: u64) -> Self {
        let cases = (n / 5).clamp(1, MAX_CASES);
        Workload {
            rng: Rng(0x5eed),
            cases,
            created: 0,
            closed: vec![false; usize::try_from(cases).unwrap_or(0)],
        }
    }

    fn is_closed(&self, k: u64) -> bool {
        usize::try_from(k)
            .ok()
            .and_then(|k| self.closed.get(k))
            .copied()
            .unwrap_or(false)
    }

    fn set_closed(&mut self, k: u64) {
        if let Some(c) = usize::try_from(k).ok().and_then(|k| self.closed.get_mut(k)) {
            *c = true;
        }
    }

    /// Workers mostly visit open cases; a few tries, then whatever came up (R63 diagnostics).
    fn pick_open(&mut self) -> u64 {
        let mut k = self.rng.below(self.created);
        for _ in 0..3 {
            if !self.is_closed(k) {
                break;
            }
            k = self.rng.below(self.created);
        }
        k
    }

    fn plan(&mut self, i: u64) -> Vec<Planned> {
        if i % HOT_EVERY == HOT_EVERY / 2 && self.created > 0 {
            // The hot case: one update every HOT_EVERY forms, a case of about 1 000 changes
            // at 1 000 000 events for the case-history timing.
            return vec![Planned {
                case: HOT_CASE,
                create: false,
                close: false,
                updates: updates(&mut self.rng, false),
            }];
        }
        let create = self.created == 0 || (i % 5 == 0 && self.created < self.cases);
        let first = if create {
            self.created += 1;
            self.created - 1
        } else {
            self.pick_open()
        };
        let close = !create && self.rng.below(100) < 4;
        let mut out = vec![Planned {
            case: first,
            create,
            close,
            updates: updates(&mut self.rng, create),
        }];
        if self.rng.below(100) < 30 && self.created > 1 {
            let mut second = self.pick_open();
            if second == first {
                second = (second + 1) % self.created;
            }
            out.push(Planned {
                case: second,
                create: false,
                close: false,
                updates: updates(&mut self.rng, false),
            });
        }
        out
    }

    fn form_events(&mut self, i: u64, recorded_at: Timestamp) -> Vec<Event> {
        let instance_id = uuid_like(0x3d30_7d25, i);
        let u = self.rng.below(USERS);
        let (submitter, owner) = (user(u), group(u));
        let phone = Timestamp(recorded_at.0 - 3_600_000);
        let phone_text = phone.to_string();
        if i % 997 == 996 {
            // An unknown user: stored whole with its typed error, plus its diagnostic.
            let raw = raw_form(i, &instance_id, "u-ghost", &[]);
            let form_id = FormId::new(instance_id);
            return vec![
                Event::FormRejectedV1(FormRejectedV1 {
                    form: FormRecord {
                        form_id: form_id.clone(),
                        xmlns: XMLNS.into(),
                        app_id: Some(AppId::new("app-anc")),
                        user_id: Some("u-ghost".into()),
                        content_hash: caseledger::casexml::content_hash(&raw),
                        raw: raw.into(),
                    },
                    error: Rejection {
                        code: ErrorCode::UnknownUser,
                        message: "meta/userID \"u-ghost\" is not a user of this project space"
                            .into(),
                    },
                }),
                Event::DiagnosticRaisedV1(DiagnosticRaisedV1 {
                    diagnostic: Diagnostic {
                        code: DiagnosticCode::RejectedSubmission,
                        subject: form_id.0,
                        detail: "UnknownUser: meta/userID \"u-ghost\" is not a user".into(),
                    },
                }),
            ];
        }
        let planned = self.plan(i);
        let ids: Vec<String> = planned.iter().map(|p| case_id(p.case)).collect();
        let names: Vec<String> = planned
            .iter()
            .map(|p| format!("Client {}", p.case))
            .collect();
        let update_refs: Vec<Vec<(&str, &str)>> = planned
            .iter()
            .map(|p| {
                p.updates
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect()
            })
            .collect();
        let blocks: Vec<Block<'_>> = planned
            .iter()
            .zip(&ids)
            .zip(&names)
            .zip(&update_refs)
            .map(|(((p, id), name), update)| Block {
                case_id: id,
                user: &submitter,
                date: &phone_text,
                create: p.create.then_some(("pregnancy", name.as_str(), None)),
                update,
                close: p.close,
            })
            .collect();
        let raw = raw_form(i, &instance_id, &submitter, &blocks);
        let mut diagnostics = Vec::new();
        let applied = planned
            .iter()
            .zip(&ids)
            .zip(&names)
            .map(|((p, id), name)| {
                if self.is_closed(p.case) {
                    diagnostics.push(Event::DiagnosticRaisedV1(DiagnosticRaisedV1 {
                        diagnostic: Diagnostic {
                            code: DiagnosticCode::ClosedCaseUpdated,
                            subject: id.clone(),
                            detail: format!(
                                "form {instance_id} changed the case after it was closed"
                            ),
                        },
                    }));
                }
                BlockApplied {
                    case_id: CaseId::new(id.as_str()),
                    date: phone,
                    user: submitter.clone(),
                    actions: Actions {
                        create: p.create.then(|| Create {
                            case_type: "pregnancy".into(),
                            case_name: name.clone(),
                            owner_id: Some(owner.clone()),
                            external_id: None,
                            date_opened: None,
                        }),
                        update: p.updates.clone(),
                        close: p.close,
                        ..Actions::default()
                    },
                }
            })
            .collect();
        for p in &planned {
            if p.close {
                self.set_closed(p.case);
            }
        }
        let mut events = vec![Event::FormAcceptedV1(FormAcceptedV1 {
            form: FormRecord {
                form_id: FormId::new(instance_id),
                xmlns: XMLNS.into(),
                app_id: Some(AppId::new(if u % 4 == 0 {
                    "app-clinic"
                } else {
                    "app-anc"
                })),
                user_id: Some(submitter.clone()),
                content_hash: caseledger::casexml::content_hash(&raw),
                raw: raw.into(),
            },
            blocks: applied,
        })];
        events.extend(diagnostics);
        events
    }
}

fn directory_events() -> Vec<Event> {
    let mut out = Vec::new();
    for u in 0..USERS {
        out.push(Event::UserCreatedV1(UserCreatedV1 {
            user_id: UserId::new(user(u)),
            username: format!("worker{u}"),
        }));
    }
    for g in 0..GROUPS {
        out.push(Event::GroupCreatedV1(GroupCreatedV1 {
            group_id: GroupId::new(group(g)),
            name: format!("CHW team {g}"),
            case_sharing: true,
        }));
    }
    for u in 0..USERS {
        out.push(Event::MemberAddedV1(MembershipV1 {
            group_id: GroupId::new(group(u)),
            user_id: UserId::new(user(u)),
        }));
    }
    for (id, types) in [
        (
            "app-anc",
            vec!["pregnancy".to_owned(), "referral".to_owned()],
        ),
        ("app-clinic", vec!["pregnancy".to_owned()]),
    ] {
        out.push(Event::AppCreatedV1(AppCreatedV1 {
            app_id: AppId::new(id),
            name: id.into(),
            case_sharing: true,
            case_types: types,
        }));
    }
    out
}

/// What generation wrote.
struct Generated {
    events: u64,
    forms: u64,
    envelope_bytes: u64,
    raw_form_bytes: u64,
    cases: u64,
    seconds: f64,
}

/// Appends commands the way the engine does, one append per command with its idempotency key,
/// handing them to sled `GROUP` at a time through `write_group` (one sled batch per group).
struct Writer<'l> {
    log: &'l SledLog,
    command: u64,
    events: u64,
    envelope_bytes: u64,
    since_flush: u64,
    staged: Vec<AppendRequest>,
    progress: &'l AtomicU64,
}

impl Writer<'_> {
    fn write(&mut self, recorded_at: Timestamp, batch: Vec<Event>) -> BenchResult<()> {
        let command_id = CommandId::new(uuid_like(0xc0de_0000, self.command));
        for (k, event) in (1u64..).zip(&batch) {
            self.envelope_bytes += encode_envelope(&RecordedEvent {
                position: Position(self.events + k),
                recorded_at,
                command_id: command_id.clone(),
                event: event.clone(),
            })?
            .len() as u64;
        }
        self.command += 1;
        self.events += batch.len() as u64;
        self.since_flush += batch.len() as u64;
        self.staged.push(AppendRequest {
            expected: Expected::Any,
            // As the engine writes submissions (`Request::new`): no idempotency entry.
            idempotency_key: None,
            command_id,
            recorded_at,
            events: batch,
        });
        if self.staged.len() >= GROUP {
            self.drain()?;
        }
        if self.since_flush >= FLUSH_EVERY {
            self.drain()?;
            self.log.flush_blocking()?;
            self.since_flush = 0;
        }
        Ok(())
    }

    fn drain(&mut self) -> BenchResult<()> {
        for outcome in self.log.write_group(self.staged.drain(..))? {
            outcome?;
        }
        self.progress.store(self.events, Ordering::Relaxed);
        Ok(())
    }
}

/// Writes about `n` events (a command is never split, so a few more at most).
fn generate(log: &SledLog, n: u64, progress: &AtomicU64) -> BenchResult<Generated> {
    let started = Instant::now();
    let mut workload = Workload::new(n);
    let mut w = Writer {
        log,
        command: 0,
        events: 0,
        envelope_bytes: 0,
        since_flush: 0,
        staged: Vec::with_capacity(GROUP),
        progress,
    };
    let (mut forms, mut raw_form_bytes) = (0u64, 0u64);
    for event in directory_events() {
        w.write(Timestamp(BASE_TIME), vec![event])?;
    }
    let mut i = 0u64;
    while w.events < n {
        let recorded_at = Timestamp(BASE_TIME + 1000 * i64::try_from(i)?);
        let batch = workload.form_events(i, recorded_at);
        for e in &batch {
            if let Event::FormAcceptedV1(FormAcceptedV1 { form, .. })
            | Event::FormRejectedV1(FormRejectedV1 { form, .. }) = e
            {
                forms += 1;
                raw_form_bytes += form.raw.len();
            }
        }
        w.write(recorded_at, batch)?;
        i += 1;
    }
    w.drain()?;
    log.flush_blocking()?;
    Ok(Generated {
        events: w.events,
        forms,
        envelope_bytes: w.envelope_bytes,
        raw_form_bytes,
        cases: workload.created,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What the raw fold ends with; checked against replay's answers.
struct RawFold {
    events: u64,
    seconds: f64,
    cases: usize,
    open_cases: usize,
    forms: usize,
    history: u64,
    diagnostics: usize,
    users: usize,
    /// Some folded cases, compared whole with what replay stored.
    sample: Vec<Case>,
}

/// Reads, verifies, decodes and folds every event into memory; writes nothing.
fn raw_fold(log: &SledLog, progress: &AtomicU64) -> BenchResult<RawFold> {
    let started = Instant::now();
    let mut cases: HashMap<CaseId, Case> = HashMap::new();
    let mut forms: HashMap<FormId, Position> = HashMap::new();
    let mut directory = Directory::default();
    let mut diagnostics = Vec::new();
    let (mut events, mut history) = (0u64, 0u64);
    for ev in log.iter_from(Position(1)) {
        let ev = ev?;
        events += 1;
        if events % 4096 == 0 {
            progress.store(events, Ordering::Relaxed);
        }
        match &ev.event {
            Event::FormAcceptedV1(f) => {
                let mut touched: Vec<&CaseId> = Vec::new();
                for b in &f.blocks {
                    let case = apply_block(cases.remove(&b.case_id), b, &f.form.form_id);
                    cases.insert(b.case_id.clone(), case);
                    if !touched.contains(&&b.case_id) {
                        touched.push(&b.case_id);
                    }
                }
                history += touched.len() as u64;
                forms.insert(f.form.form_id.clone(), ev.position);
            }
            Event::FormRejectedV1(f) => {
                forms.entry(f.form.form_id.clone()).or_insert(ev.position);
            }
            Event::DiagnosticRaisedV1(d) => diagnostics.push((ev.position, d.diagnostic.clone())),
            other => directory.apply(other),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(RawFold {
        events,
        seconds,
        cases: cases.len(),
        open_cases: cases.values().filter(|c| !c.closed).count(),
        forms: forms.len(),
        history,
        diagnostics: diagnostics.len(),
        users: directory.users.len(),
        sample: cases.into_values().take(SAMPLE).collect(),
    })
}

/// Progress of the running phase, for the watchdog.
struct Watch {
    phase: Mutex<&'static str>,
    progress: AtomicU64,
}

impl Watch {
    fn enter(&self, phase: &'static str) {
        match self.phase.lock() {
            Ok(mut p) => *p = phase,
            Err(poisoned) => *poisoned.into_inner() = phase,
        }
        self.progress.store(0, Ordering::Relaxed);
    }

    fn phase(&self) -> &'static str {
        match self.phase.lock() {
            Ok(p) => *p,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }
}

/// Ends the process when a phase stops making progress, instead of hanging the bench forever.
/// sled 0.34.7 can deadlock under sustained writes: `SegmentAccountant::bump_tip` waits, holding
/// the segment accountant's mutex, for a file truncation queued on sled's thread pool, whose
/// threads are all blocked on that mutex (seen here; see docs/PERFORMANCE.md).
/// How long a phase may show no progress: a fresh-process phase reports none until its child
/// exits, which takes minutes at several million events.
fn stall_of(phase: &str) -> Duration {
    if phase.starts_with("fresh process") {
        Duration::from_secs(1800)
    } else if phase == "replay" {
        // The sorted passes after the scan report no progress either: minutes at 3M events.
        Duration::from_secs(900)
    } else {
        STALL
    }
}

fn watchdog(watch: Arc<Watch>) {
    std::thread::spawn(move || {
        let mut last = (watch.phase(), u64::MAX);
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = (watch.phase(), watch.progress.load(Ordering::Relaxed));
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= stall_of(now.0) {
                eprintln!(
                    "replay bench: no progress for {} s in phase {:?} at {} events; sled 0.34.7 \
                     deadlocks like this (bump_tip waiting on a truncation its blocked thread \
                     pool never runs). Giving up; rerun.",
                    stall_of(now.0).as_secs(),
                    now.0,
                    now.1
                );
                std::process::exit(3);
            }
        }
    });
}

fn main() -> BenchResult<()> {
    if let Ok(dir) = std::env::var(CHILD) {
        return replay_child(&dir);
    }
    if let Ok(dir) = std::env::var(FLOOR_CHILD) {
        return floor_child(&dir);
    }
    if let Ok(dir) = std::env::var(WRITE_FLOOR_CHILD) {
        return write_floor_child(&dir);
    }
    if let Ok(dir) = std::env::var(TRAVEL_ONLY) {
        return travel_only(&dir);
    }
    let n: u64 = match std::env::var("CASELEDGER_BENCH_EVENTS") {
        Ok(v) => v.parse()?,
        Err(_) => 1_000_000,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "replay: {}", machine())?;
    let dir = tempfile::tempdir()?;
    // CASELEDGER_BENCH_KEEP=1 keeps the generated store (its path is printed) for reruns of the
    // fresh-process replay: `CASELEDGER_BENCH_REPLAY_CHILD=<path> target/release/deps/replay-…`.
    let dir = if std::env::var_os("CASELEDGER_BENCH_KEEP").is_some() {
        let kept = dir.keep();
        eprintln!("keeping the store in {}", kept.display());
        Kept::Path(kept)
    } else {
        Kept::Temp(dir)
    };
    let replay_chunk: usize = match std::env::var("CASELEDGER_BENCH_REPLAY_CHUNK") {
        Ok(v) => v.parse()?,
        Err(_) => REPLAY_CHUNK,
    };
    let cache_mb: u64 = match std::env::var("CASELEDGER_BENCH_CACHE_MB") {
        Ok(v) => v.parse()?,
        Err(_) => CACHE_MB,
    };
    let sort_mb: usize = match std::env::var("CASELEDGER_BENCH_SORT_MB") {
        Ok(v) => v.parse()?,
        Err(_) => EngineConfig::default().replay_sort_budget >> 20,
    };
    let config = EngineConfig {
        replay_chunk,
        cache_capacity: cache_mb << 20,
        replay_sort_budget: sort_mb << 20,
        raw_out_of_line: raw_out_of_line(),
        ..EngineConfig::default()
    };
    let engine = Engine::open(dir.path(), &DomainName::new("bench"), config)?;

    let watch = Arc::new(Watch {
        phase: Mutex::new("generate"),
        progress: AtomicU64::new(0),
    });
    watchdog(Arc::clone(&watch));
    let generated = generate(engine.log(), n, &watch.progress)?;
    writeln!(
        out,
        "log: N = {} events ({} forms, avg raw form {} B, {} cases, {} users, {} groups), \
         envelopes with raw inline {:.1} MB (avg {} B/event), on disk {:.1} MB (raw submissions {}: {:.1} MB), generated in {:.1} s",
        generated.events,
        generated.forms,
        generated.raw_form_bytes / generated.forms.max(1),
        generated.cases,
        USERS,
        GROUPS,
        generated.envelope_bytes as f64 / 1e6,
        generated.envelope_bytes / generated.events.max(1),
        dir_size(dir.path()) as f64 / 1e6,
        if raw_out_of_line() { "out of line" } else { "inline" },
        dir_size(&dir.path().join("raw")) as f64 / 1e6,
        generated.seconds
    )?;
    writeln!(
        out,
        "replay config: replay_chunk = {replay_chunk} events, cache_capacity = {cache_mb} MB, \
         replay_sort_budget = {sort_mb} MB per sorter"
    )?;
    out.flush()?;

    let (rss_before, _) = memory_kb();
    let reset = reset_peak();
    watch.enter("replay");
    let cpu_before = thread_cpu_seconds();
    let stats = engine.replay(&mut |done, _| watch.progress.store(done.0, Ordering::Relaxed))?;
    let replay_cpu = thread_cpu_seconds() - cpu_before;
    let (rss_after, peak) = memory_kb();
    let replay_rate = stats.events as f64 / stats.seconds;
    writeln!(
        out,
        "  {:<44} {:>9} ev {:>9.0} ev/s {:>8.2} s (replay thread on CPU {:.2} s)",
        "Engine::replay (all projections + swap)",
        stats.events,
        replay_rate,
        stats.seconds,
        replay_cpu
    )?;
    writeln!(
        out,
        "  {:<44} RSS before {:.1} MB, after {:.1} MB, peak (VmHWM{}) {:.1} MB",
        "",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        if reset { ", reset" } else { ", NOT reset" },
        peak as f64 / 1024.0
    )?;
    out.flush()?;

    watch.enter("raw fold");
    let raw = raw_fold(engine.log(), &watch.progress)?;
    let raw_rate = raw.events as f64 / raw.seconds;
    writeln!(
        out,
        "  {:<44} {:>9} ev {:>9.0} ev/s {:>8.2} s",
        "raw: iter_from + decode + fold in HashMaps", raw.events, raw_rate, raw.seconds
    )?;

    // Replay must agree with the raw fold, or its speed means nothing.
    let p = engine.projections();
    let open_in_lists: usize = (0..GROUPS)
        .map(|g| p.cases_by_owner(&group(g), false).map(|c| c.len()))
        .sum::<Result<usize, _>>()?;
    let all_in_lists: usize = (0..GROUPS)
        .map(|g| p.cases_by_owner(&group(g), true).map(|c| c.len()))
        .sum::<Result<usize, _>>()?;
    let diagnostics = p.diagnostics()?.len();
    // No edits or archives in this log: a case's history is one event per form that touched it.
    let mut sample_agrees = 0;
    for case in &raw.sample {
        let history = p.history(&case.case_id)?;
        let ascending = history.windows(2).all(|w| w[0] < w[1]);
        if p.case(&case.case_id)?.as_ref() == Some(case)
            && history.len() == case.xform_ids.len()
            && ascending
        {
            sample_agrees += 1;
        }
    }
    let agree = stats.events == raw.events
        && all_in_lists == raw.cases
        && open_in_lists == raw.open_cases
        && diagnostics == raw.diagnostics
        && p.directory().users.len() == raw.users
        && sample_agrees == raw.sample.len();
    writeln!(
        out,
        "  check: cases {} (open {}) raw {} (open {}), forms {}, history rows {}, diagnostics {} raw {}, \
         sampled cases equal with their history {}/{}: {}",
        all_in_lists,
        open_in_lists,
        raw.cases,
        raw.open_cases,
        raw.forms,
        raw.history,
        diagnostics,
        raw.diagnostics,
        sample_agrees,
        raw.sample.len(),
        if agree { "agree" } else { "DISAGREE" }
    )?;
    if !agree {
        return Err("replay and the raw fold disagree".into());
    }
    let _ = peak;
    // CASELEDGER_BENCH_TRAVEL=0 skips the time-travel timings (long at several million events).
    if std::env::var("CASELEDGER_BENCH_TRAVEL").as_deref() != Ok("0") {
        watch.enter("time travel");
        time_travel(&engine, &mut out, generated.cases, &watch.progress)?;
    }
    drop(engine);

    // The memory figure that matters is a process that opens a 1M-event store and replays it,
    // as `caseledger replay` does; this process still holds what generating the log cost.
    watch.enter("fresh process: replay");
    let child = std::process::Command::new(std::env::current_exe()?)
        .arg("--bench")
        .env(CHILD, dir.path())
        .env("CASELEDGER_BENCH_REPLAY_CHUNK", replay_chunk.to_string())
        .env("CASELEDGER_BENCH_CACHE_MB", cache_mb.to_string())
        .env("CASELEDGER_BENCH_SORT_MB", sort_mb.to_string())
        .output()?;
    let report = String::from_utf8_lossy(&child.stdout);
    let fields = child_fields(&report, "child");
    let [events, seconds, peak_kb] = fields[..] else {
        return Err(format!(
            "replay child failed: {}{}",
            report,
            String::from_utf8_lossy(&child.stderr)
        )
        .into());
    };
    let child_err = String::from_utf8_lossy(&child.stderr);
    if let Some(line) = child_err.lines().find(|l| l.starts_with("rss trace")) {
        writeln!(out, "  {:<44} {line}", "")?;
    }
    if let Some(line) = report.lines().find(|l| l.starts_with("opened:")) {
        writeln!(
            out,
            "  {:<44} after Engine::open {}",
            "",
            line.trim_start_matches("opened: ")
        )?;
    }
    let fresh_rate = events / seconds;
    let peak_mb = peak_kb / 1024.0;
    writeln!(
        out,
        "  {:<44} {:>9} ev {:>9.0} ev/s {:>8.2} s, process peak RSS (VmHWM) {:.1} MB",
        "fresh process: Engine::open + Engine::replay", events, fresh_rate, seconds, peak_mb
    )?;
    if let [reclaimed] = child_fields(&report, "reclaimed")[..] {
        writeln!(
            out,
            "  {:<44} {:>8.2} s after the replay returned (the peak above includes it)",
            "then the retired generation deleted", reclaimed
        )?;
    }
    // What sled 0.34.7 holds while it merely reads this log once: a fresh process that opens the
    // same store with the same cache and iterates the log tree, decoding and writing nothing.
    // (Not a hard floor: a replay that interleaves writes with the read has peaked lower.)
    watch.enter("fresh process: bare sled read");
    let floor = std::process::Command::new(std::env::current_exe()?)
        .arg("--bench")
        .env(FLOOR_CHILD, dir.path())
        .env("CASELEDGER_BENCH_CACHE_MB", cache_mb.to_string())
        .output()?;
    let floor_report = String::from_utf8_lossy(&floor.stdout);
    let floor_fields = child_fields(&floor_report, "floor");
    let [floor_entries, floor_seconds, floor_open_kb, floor_peak_kb] = floor_fields[..] else {
        return Err(format!(
            "bare sled child failed: {}{}",
            floor_report,
            String::from_utf8_lossy(&floor.stderr)
        )
        .into());
    };
    let floor_mb = floor_peak_kb / 1024.0;
    writeln!(
        out,
        "  {:<44} {:>9} ev {:>9.0} ev/s {:>8.2} s, RSS after open {:.1} MB, process peak RSS (VmHWM) {floor_mb:.1} MB",
        "fresh process: bare sled open + log iteration",
        floor_entries,
        floor_entries / floor_seconds,
        floor_seconds,
        floor_open_kb / 1024.0
    )?;
    // The floor of the rebuild's writes: a fresh process that opens the same store with the same
    // cache and writes the rows of the generation just rebuilt into a new tree beside it, in key
    // order, in the rebuild's batches, with its final flush; reading them from the old tree is
    // not timed. No replay can take less than sled needs to absorb the rows it must write.
    watch.enter("fresh process: sled writing the rebuilt rows");
    let writes = std::process::Command::new(std::env::current_exe()?)
        .arg("--bench")
        .env(WRITE_FLOOR_CHILD, dir.path())
        .env("CASELEDGER_BENCH_CACHE_MB", cache_mb.to_string())
        .output()?;
    let writes_report = String::from_utf8_lossy(&writes.stdout);
    let [rows, row_bytes, write_seconds, writes_peak_kb] =
        child_fields(&writes_report, "writes")[..]
    else {
        return Err(format!(
            "sled write child failed: {}{}",
            writes_report,
            String::from_utf8_lossy(&writes.stderr)
        )
        .into());
    };
    writeln!(
        out,
        "  {:<44} {:>9} rows {:>8.1} MB {:>8.2} s, process peak RSS (VmHWM) {:.1} MB",
        "fresh process: sled writing the rebuilt rows",
        rows,
        row_bytes / 1e6,
        write_seconds,
        writes_peak_kb / 1024.0
    )?;
    // Issue 9 §7: a fresh replay >= 0.5 of the raw read + decode + fold rate, and its peak RSS
    // <= 1.1 times the bare read's. The write floor caps the first: a replay that overlapped its
    // read, decode and fold entirely with sled's writes would still take `write_seconds`.
    let fresh_ratio = fresh_rate / raw_rate;
    let write_cap = raw.seconds / write_seconds;
    let rss_ratio = peak_mb / floor_mb;
    writeln!(
        out,
        "ratio replay/raw {:.2} in this process, {fresh_ratio:.2} fresh (target >= 0.50: {}); sled writing the same rows alone allows at most {write_cap:.2}",
        replay_rate / raw_rate,
        if fresh_ratio >= 0.5 {
            "met"
        } else if write_cap < 0.5 {
            "MISSED, below what sled's writes of the rows allow"
        } else {
            "MISSED"
        }
    )?;
    writeln!(
        out,
        "peak RSS: fresh replay {peak_mb:.1} MB / bare sled read {floor_mb:.1} MB = {rss_ratio:.2} (target <= 1.10: {}); sled writing the rows beside the live ones peaks at {:.2} of the bare read",
        if rss_ratio <= 1.1 { "met" } else { "MISSED" },
        writes_peak_kb / 1024.0 / floor_mb
    )?;
    Ok(())
}

/// Latency percentiles of a list of durations, in milliseconds.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    (at(0.5), at(0.99), at(1.0))
}

/// Issue 9 §6: time-travel queries through the library on this log, beside the same queries at
/// the head: `case_at` and `cases_for_user_at` over random (case or user, position) pairs, and
/// the history of the hot case (about 1 000 changes).
fn time_travel(
    engine: &Engine,
    out: &mut impl Write,
    cases: u64,
    progress: &AtomicU64,
) -> BenchResult<()> {
    let p = engine.projections();
    let head = p.checkpoint().0;
    let queries: usize = env_or("CASELEDGER_BENCH_TRAVEL_QUERIES", TRAVEL_QUERIES)?;
    let mut rng = Rng(0x71ae);
    let timed = |f: &mut dyn FnMut() -> BenchResult<usize>| -> BenchResult<(Vec<Duration>, usize)> {
        let mut samples = Vec::with_capacity(queries);
        let mut total = 0;
        for _ in 0..queries {
            let t = Instant::now();
            total += f()?;
            samples.push(t.elapsed());
            progress.fetch_add(1, Ordering::Relaxed);
        }
        Ok((samples, total))
    };
    let mut lines = Vec::new();
    let (now, found) = timed(&mut || {
        let id = CaseId::new(case_id(rng.below(cases)));
        Ok(usize::from(p.case(&id)?.is_some()))
    })?;
    lines.push((
        "case (at the head)",
        percentiles(now),
        format!("{found} found"),
    ));
    let (at, found) = timed(&mut || {
        let id = CaseId::new(case_id(rng.below(cases)));
        let pos = Position(1 + rng.below(head));
        Ok(usize::from(matches!(
            p.case_at(&id, pos)?,
            caseledger::projections::CaseAt::Exists(_)
        )))
    })?;
    let case_at = percentiles(at);
    lines.push((
        "case_at (random position)",
        case_at,
        format!("{found} existed then"),
    ));
    let (now, listed) = timed(&mut || Ok(p.cases_for_user(&user(rng.below(USERS)), false)?.len()))?;
    lines.push((
        "cases_for_user (at the head)",
        percentiles(now),
        format!("{} cases per list on average", listed / queries),
    ));
    let (at, listed) = timed(&mut || {
        let pos = Position(1 + rng.below(head));
        Ok(p.cases_for_user_at(&user(rng.below(USERS)), false, pos)?
            .len())
    })?;
    let list_at = percentiles(at);
    lines.push((
        "cases_for_user_at (random position)",
        list_at,
        format!("{} cases per list on average", listed / queries),
    ));
    let hot = CaseId::new(case_id(HOT_CASE));
    let mut history = Vec::new();
    let mut changes = 0;
    for _ in 0..20 {
        let t = Instant::now();
        changes = p.case_history(&hot)?.len();
        history.push(t.elapsed());
    }
    let history = percentiles(history);
    lines.push((
        "case_history (hot case, 20 runs)",
        history,
        format!("{changes} changes"),
    ));
    // A floor for the history: the same number of random point reads, of the hot case's own
    // events from the log tree (read, crc, decode), doing nothing else.
    let positions = p.history(&hot)?;
    let mut floor = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        for q in &positions {
            let _ = engine.log().read_at(*q)?;
        }
        floor.push(t.elapsed());
    }
    lines.push((
        "floor: the hot case's events read from the log",
        percentiles(floor),
        format!("{} random reads", positions.len()),
    ));
    for (name, (p50, p99, max), note) in &lines {
        writeln!(
            out,
            "  {name:<44} p50 {p50:>8.3} ms  p99 {p99:>8.3} ms  max {max:>8.3} ms  ({note})"
        )?;
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    writeln!(
        out,
        "time travel: case_at p99 {:.3} ms (target <= 10 ms: {}), cases_for_user_at p99 {:.3} ms (target <= 50 ms: {}), history of {changes} changes p50 {:.3} ms (target <= 20 ms: {})",
        case_at.1,
        verdict(case_at.1 <= 10.0),
        list_at.1,
        verdict(list_at.1 <= 50.0),
        history.0,
        verdict(history.0 <= 20.0 && changes >= 1000)
    )?;
    out.flush()?;
    Ok(())
}

/// Env var that runs only the time-travel timings, on a store kept by `CASELEDGER_BENCH_KEEP`
/// (opened, and rebuilt first if its projection layout is of another version).
const TRAVEL_ONLY: &str = "CASELEDGER_BENCH_TRAVEL_ONLY";

/// The time-travel timings on a kept store: its case count is read back from the projections.
fn travel_only(dir: &str) -> BenchResult<()> {
    let cache_mb: u64 = env_or("CASELEDGER_BENCH_CACHE_MB", CACHE_MB)?;
    let config = EngineConfig {
        cache_capacity: cache_mb << 20,
        ..EngineConfig::default()
    };
    let engine = Engine::open(Path::new(dir), &DomainName::new("bench"), config)?;
    let p = engine.projections();
    let cases = (0..GROUPS)
        .map(|g| p.cases_by_owner(&group(g), true).map(|c| c.len() as u64))
        .sum::<Result<u64, _>>()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "replay (time travel only): {}", machine())?;
    writeln!(
        out,
        "store {dir}: head {}, {cases} cases, cache_capacity = {cache_mb} MB",
        p.checkpoint()
    )?;
    time_travel(&engine, &mut out, cases, &AtomicU64::new(0))
}

/// Env var that turns this binary into the bare sled reader of the store at its value.
const FLOOR_CHILD: &str = "CASELEDGER_BENCH_FLOOR_CHILD";

/// The bare read: open the store with sled alone, iterate the log tree once, print
/// `floor <entries> <seconds> <RSS after open kB> <VmHWM kB>`.
fn floor_child(dir: &str) -> BenchResult<()> {
    let cache_mb: u64 = std::env::var("CASELEDGER_BENCH_CACHE_MB")?.parse()?;
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_mb << 20)
        .open()?;
    let (open_rss, _) = memory_kb();
    let started = Instant::now();
    let tree = db.open_tree("log/bench")?;
    let mut entries = 0u64;
    let mut bytes = 0usize;
    // Event entries only: the log's own meta keys start with 0xFF (eventlog's key layout).
    for kv in tree.range(..[0xFFu8].as_slice()) {
        let (_, v) = kv?;
        bytes += v.len();
        entries += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (_, peak) = memory_kb();
    eprintln!("bare sled read {bytes} value bytes");
    writeln!(
        std::io::stdout().lock(),
        "floor {entries} {seconds} {open_rss} {peak}"
    )?;
    Ok(())
}

/// Env var that turns this binary into the sled writer of the store at its value.
const WRITE_FLOOR_CHILD: &str = "CASELEDGER_BENCH_WRITE_FLOOR_CHILD";

/// The rows of the live generation (the newest `proj/bench/<n>` tree) written into a new tree,
/// in key order and in batches of 512 (the rebuild's), then flushed; only the writes and the
/// flush are timed. The new tree is dropped afterwards, untimed. Prints
/// `writes <rows> <bytes> <seconds> <VmHWM kB>`.
fn write_floor_child(dir: &str) -> BenchResult<()> {
    const BATCH: usize = 512;
    let cache_mb: u64 = std::env::var("CASELEDGER_BENCH_CACHE_MB")?.parse()?;
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_mb << 20)
        .open()?;
    let live = db
        .tree_names()
        .into_iter()
        .filter_map(|name| {
            let name = String::from_utf8(name.to_vec()).ok()?;
            let generation: u64 = name.strip_prefix("proj/bench/")?.parse().ok()?;
            Some((generation, name))
        })
        .max()
        .ok_or("no projection generation in the store")?
        .1;
    let from = db.open_tree(&live)?;
    let name = "proj/bench-write-floor";
    let into = db.open_tree(name)?;
    let (mut rows, mut bytes, mut timed) = (0u64, 0usize, Duration::ZERO);
    let mut batch = sled::Batch::default();
    let mut n = 0;
    for kv in from.iter() {
        let (k, v) = kv?;
        rows += 1;
        bytes += k.len() + v.len();
        batch.insert(k, v);
        n += 1;
        if n == BATCH {
            let t = Instant::now();
            into.apply_batch(std::mem::take(&mut batch))?;
            timed += t.elapsed();
            n = 0;
        }
    }
    let t = Instant::now();
    into.apply_batch(batch)?;
    db.flush()?;
    timed += t.elapsed();
    let (_, peak) = memory_kb();
    drop(into);
    db.drop_tree(name)?;
    db.flush()?;
    writeln!(
        std::io::stdout().lock(),
        "writes {rows} {bytes} {} {peak}",
        timed.as_secs_f64()
    )?;
    Ok(())
}

/// The bench's store directory: removed at the end unless kept.
enum Kept {
    Temp(tempfile::TempDir),
    Path(std::path::PathBuf),
}

impl Kept {
    fn path(&self) -> &Path {
        match self {
            Kept::Temp(d) => d.path(),
            Kept::Path(p) => p,
        }
    }
}

/// Env var that turns this binary into the fresh replay process for the store at its value.
const CHILD: &str = "CASELEDGER_BENCH_REPLAY_CHILD";

/// The fresh process: open the store, replay it, print `child <events> <seconds> <VmHWM kB>`.
fn replay_child(dir: &str) -> BenchResult<()> {
    let chunk: usize = std::env::var("CASELEDGER_BENCH_REPLAY_CHUNK")?.parse()?;
    let cache_mb: u64 = std::env::var("CASELEDGER_BENCH_CACHE_MB")?.parse()?;
    let sort_mb: usize = std::env::var("CASELEDGER_BENCH_SORT_MB")?.parse()?;
    let config = EngineConfig {
        replay_chunk: chunk,
        cache_capacity: cache_mb << 20,
        replay_sort_budget: sort_mb << 20,
        raw_out_of_line: raw_out_of_line(),
        ..EngineConfig::default()
    };
    let engine = Engine::open(Path::new(dir), &DomainName::new("bench"), config)?;
    let (open_rss, open_peak) = memory_kb();
    // Where in the replay memory peaks: sample RSS against the replay's progress.
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (done, finished) = (Arc::clone(&done), Arc::clone(&finished));
        std::thread::spawn(move || {
            let mut worst = (0u64, 0u64);
            let mut trace = Vec::new();
            let mut tick = 0u32;
            while !finished.load(Ordering::Relaxed) {
                let (rss, _) = memory_kb();
                let at = done.load(Ordering::Relaxed);
                if rss > worst.0 {
                    worst = (rss, at);
                }
                if tick % 20 == 0 {
                    trace.push(format!("{at}:{}", rss / 1024));
                }
                tick += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            eprintln!("rss trace (event:MB): {}", trace.join(" "));
            worst
        })
    };
    let stats = engine.replay(&mut |p, _| done.store(p.0, Ordering::Relaxed))?;
    finished.store(true, Ordering::Relaxed);
    let (worst_rss, worst_at) = sampler.join().unwrap_or_default();
    // The retired generation is deleted in the background once the new one answers: timed on
    // its own, and the process peak is taken after it.
    let reclaim_started = Instant::now();
    engine.projections().wait_reclaimed();
    let reclaim_seconds = reclaim_started.elapsed().as_secs_f64();
    let (_, peak) = memory_kb();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "opened: RSS {open_rss} kB, peak {open_peak} kB; highest sampled RSS {worst_rss} kB at event {worst_at}"
    )?;
    writeln!(out, "reclaimed {reclaim_seconds}")?;
    writeln!(out, "child {} {} {}", stats.events, stats.seconds, peak)?;
    Ok(())
}
