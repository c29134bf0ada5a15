//! Forms/s and replay through the replica engine on JetStream (issue 11), against the sled
//! engine and against bare JetStream, in the same run, on the same forms.
//!
//! Workload: N ANC visit forms of the forms bench (`common/anc.rs`: ~3 KB, two case blocks,
//! 200 users in 40 case-sharing groups), built before any timing, on a 3-node cluster of
//! nats-server the bench starts from `deploy/nats/cluster.conf` (`sync_interval: always`).
//!
//! 1. Forms/s. 64 tokio tasks, each submitting its forms one after another through
//!    `Engine::submit` (parse, decide, durable append, fold; concurrent calls grouped):
//!    - the replica engine (`Engine::open_replica` over a `JetStreamLog` of a fresh stream at
//!      R1, then R3; the replica's own sled store is never synced);
//!    - bare publish at the same replication, right after: the same 64 tasks each publish one
//!      message and await its `PubAck` before the next, N messages that are the envelopes the
//!      replica just stored (read back untimed), into a plain stream: as many messages in
//!      flight at most as the replica's groups have, no headers, no decide, no fold;
//!    - the floor of a conditional writer, bare: the same messages as atomic batches of the
//!      replica's mean group size, each conditional on `Nats-Expected-Last-Sequence`, one batch
//!      at a time (a conditional append cannot send the next batch before the last one's ack:
//!      its expected sequence is what that ack confirms), no decide, no hash, no copy;
//!    - the sled engine (`Engine::open`, default config: `fdatasync` per group commit).
//!
//!    Ratios: replica forms/s ÷ bare msgs/s at the same replication (target ≥ 0.7), the
//!    conditional batches ÷ bare publish (the floor that target meets), replica ÷ conditional
//!    batches, replica ÷ sled engine. Then, for comparison, two replica engines writing one R3 stream (32 tasks
//!    each, the first N/4 forms): how much refused appends cost.
//! 2. Replay of those streams (directory + N forms), at R1 and R3:
//!    - bare: an async-nats ordered consumer reading every message of the stream;
//!    - the replica's copy alone: `JetStreamLog::open` (it reads the stream once to rebuild its
//!      key index) plus `EventStore::read_entries` of every entry, stored nowhere;
//!    - a fresh replica: `JetStreamLog::open` + `Engine::open_replica` on an empty data dir,
//!      which copies every entry into its sled replica and folds the projections;
//!    - the sled engine's `Engine::replay` of the same forms (a bulk rebuild of every
//!      projection from its own log).
//!
//!    Ratios: fresh replica entries/s ÷ bare read, ÷ sled replay.
//!
//! Each phase also prints the CPU seconds of this process and of each nats-server, how many
//! of the machine's cores were busy, and who else used CPU meanwhile (other people's builds).
//!
//! `cargo bench --bench jetstream_engine`; `CASELEDGER_BENCH_FORMS=n` sets N (default 20 000),
//! `CASELEDGER_BENCH_TWO_WRITERS=n` the forms of the two-writer run (default N/4; 0 skips it).
//! `CASELEDGER_BENCH_RECENT=0` makes the replica read its own appends back instead of copying
//! them from what the log published (`EventStore::recent_entries`), for before/after pairs.
//! Without a nats-server (`scripts/nats-server.sh`) it prints `SKIP:`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use caseledger::domain::{AppId, DomainName, Position, RecordedEvent};
use caseledger::eventlog::{
    AppendOutcome, AppendRequest, EventStore, LogError, Subscription, VerbatimEntry,
};
use caseledger::{Engine, EngineConfig, SubmitStatus};
use common::anc::{directory, raw_form, APP};
use common::{env_or, load_average, machine, BenchResult, CpuUse, CpuWatch};
use futures_util::StreamExt;
use jetstream::cluster::{nats_server, open_when_ready, Cluster};
use jetstream::{JetStreamConfig, JetStreamLog};

const TASKS: usize = 64;
/// Entries per `read_entries` call, as the replica pulls them.
const PAGE: usize = 1024;

/// One timed contender.
struct Run {
    name: String,
    /// Forms, messages or entries.
    count: u64,
    unit: &'static str,
    seconds: f64,
    note: String,
    /// A second line, when there is more to say.
    detail: String,
    cpu: CpuUse,
}

impl Run {
    fn rate(&self) -> f64 {
        self.count as f64 / self.seconds.max(1e-9)
    }

    fn print(&self) {
        eprintln!(
            "  {:<54} {:>7} {:<7} {:>9.0} /s {:>7.2} s  {}",
            self.name,
            self.count,
            self.unit,
            self.rate(),
            self.seconds,
            self.note
        );
        if !self.detail.is_empty() {
            eprintln!("  {:<54} {}", "", self.detail);
        }
        eprintln!("  {:<54} {}", "", self.cpu.line("bench process"));
    }
}

/// The replica's calls to its upstream, counted and timed (a pass-through [`EventStore`]): where
/// a group's time goes.
struct Counted {
    inner: JetStreamLog,
    stats: Arc<Calls>,
}

#[derive(Default)]
struct Calls {
    append_calls: AtomicU64,
    appended: AtomicU64,
    append_ns: AtomicU64,
    read_calls: AtomicU64,
    read_entries: AtomicU64,
    read_ns: AtomicU64,
    /// Groups copied from the log's own acknowledged appends (`recent_entries`), not read back.
    recent_copies: AtomicU64,
}

impl Calls {
    fn reset(&self) {
        for a in [
            &self.append_calls,
            &self.appended,
            &self.append_ns,
            &self.read_calls,
            &self.read_entries,
            &self.read_ns,
            &self.recent_copies,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }

    fn summary(&self, forms: u64, seconds: f64) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (appends, reads) = (get(&self.append_calls), get(&self.read_calls));
        let ms = |ns: u64, calls: u64| ns as f64 / 1e6 / calls.max(1) as f64;
        format!(
            "upstream calls: {appends} append_all ({:.1} appends each, {:.2} ms each, {:.0}% of the time), {reads} read_entries ({:.1} entries each, {:.2} ms each, {:.0}% of the time); {:.2} read_entries per group; {} groups copied from the log's own appends; {:.1} forms per group",
            get(&self.appended) as f64 / appends.max(1) as f64,
            ms(get(&self.append_ns), appends),
            get(&self.append_ns) as f64 / 1e7 / seconds,
            get(&self.read_entries) as f64 / reads.max(1) as f64,
            ms(get(&self.read_ns), reads),
            get(&self.read_ns) as f64 / 1e7 / seconds,
            reads as f64 / appends.max(1) as f64,
            get(&self.recent_copies),
            forms as f64 / appends.max(1) as f64,
        )
    }
}

fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[async_trait::async_trait]
impl EventStore for Counted {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome, LogError> {
        self.inner.append(req).await
    }

    async fn append_all(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Vec<Result<AppendOutcome, LogError>> {
        let started = Instant::now();
        let n = requests.len() as u64;
        let out = self.inner.append_all(requests).await;
        self.stats.append_calls.fetch_add(1, Ordering::Relaxed);
        self.stats.appended.fetch_add(n, Ordering::Relaxed);
        self.stats
            .append_ns
            .fetch_add(nanos(started), Ordering::Relaxed);
        out
    }

    async fn read(&self, from: Position, limit: usize) -> Result<Vec<RecordedEvent>, LogError> {
        self.inner.read(from, limit).await
    }

    async fn head(&self) -> Result<Position, LogError> {
        self.inner.head().await
    }

    async fn read_entries(
        &self,
        from: Position,
        limit: usize,
    ) -> Result<Vec<VerbatimEntry>, LogError> {
        let started = Instant::now();
        let out = self.inner.read_entries(from, limit).await;
        self.stats.read_calls.fetch_add(1, Ordering::Relaxed);
        if let Ok(entries) = &out {
            self.stats
                .read_entries
                .fetch_add(entries.len() as u64, Ordering::Relaxed);
        }
        self.stats
            .read_ns
            .fetch_add(nanos(started), Ordering::Relaxed);
        out
    }

    fn recent_entries(&self, from: Position, last: Position) -> Option<Vec<VerbatimEntry>> {
        // CASELEDGER_BENCH_RECENT=0: the replica reads its own appends back, as before
        // `recent_entries` existed, for before/after pairs with one binary.
        if std::env::var("CASELEDGER_BENCH_RECENT").as_deref() == Ok("0") {
            return None;
        }
        let out = self.inner.recent_entries(from, last);
        if out.is_some() {
            self.stats.recent_copies.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    async fn subscribe(&self, from: Position) -> Result<Subscription, LogError> {
        self.inner.subscribe(from).await
    }
}

/// Outcomes of a submit storm.
#[derive(Default)]
struct Tally {
    accepted: u64,
    other: u64,
    failed: u64,
    first_error: Option<String>,
}

/// Submits every form through `engine.submit` from `TASKS` tasks (task `t` submits forms `t`,
/// `t + TASKS`, …, each after the one before was answered).
async fn submit_storm(engine: &Arc<Engine>, forms: &Arc<Vec<Vec<u8>>>) -> BenchResult<Tally> {
    submit_storm_with(engine, forms, TASKS).await
}

/// [`submit_storm`] from `tasks` tasks.
async fn submit_storm_with(
    engine: &Arc<Engine>,
    forms: &Arc<Vec<Vec<u8>>>,
    tasks: usize,
) -> BenchResult<Tally> {
    let step = tasks;
    let mut tasks = Vec::new();
    for t in 0..step {
        let (engine, forms) = (Arc::clone(engine), Arc::clone(forms));
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            for raw in forms.iter().skip(t).step_by(step) {
                match engine
                    .submit(raw.clone(), Some(AppId::new(APP)), None)
                    .await
                {
                    Ok(o) if o.outcome == SubmitStatus::Accepted => tally.accepted += 1,
                    Ok(_) => tally.other += 1,
                    Err(e) => {
                        tally.failed += 1;
                        tally.first_error.get_or_insert(e.to_string());
                    }
                }
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for task in tasks {
        let t = task.await?;
        total.accepted += t.accepted;
        total.other += t.other;
        total.failed += t.failed;
        if total.first_error.is_none() {
            total.first_error = t.first_error;
        }
    }
    Ok(total)
}

fn tally_note(t: &Tally) -> String {
    let mut note = format!(
        "{} accepted, {} other, {} failed",
        t.accepted, t.other, t.failed
    );
    if let Some(e) = &t.first_error {
        note.push_str(&format!(" (first: {e})"));
    }
    note
}

fn js_config(cluster: &Cluster, replicas: usize) -> JetStreamConfig {
    let mut config = JetStreamConfig::new(cluster.urls());
    config.replicas = replicas;
    config
}

/// The replica engine over a fresh stream at `replicas`: the directory, then every form.
/// Returns the run, the log, and the position the forms start after.
async fn replica_forms(
    cluster: &Cluster,
    replicas: usize,
    forms: &Arc<Vec<Vec<u8>>>,
    nats: &[(String, u32)],
) -> BenchResult<(Run, JetStreamLog, Position, usize)> {
    let domain = DomainName::new(format!("forms-r{replicas}"));
    let log = JetStreamLog::open(js_config(cluster, replicas), &domain).await?;
    let dir = tempfile::tempdir()?;
    let calls = Arc::new(Calls::default());
    let upstream: Arc<dyn EventStore> = Arc::new(Counted {
        inner: log.clone(),
        stats: Arc::clone(&calls),
    });
    let engine = Arc::new(
        Engine::open_replica(dir.path(), &domain, EngineConfig::default(), upstream).await?,
    );
    for outcome in engine.execute_many(directory()).await? {
        outcome?;
    }
    let before = engine.log().written_head();
    // Only the forms' calls count.
    calls.reset();
    let watch = CpuWatch::start(nats);
    let started = Instant::now();
    let tally = submit_storm(&engine, forms).await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = watch.stop();
    let note = format!(
        "{}; {} appends refused and decided again; {} groups decided while one was appended",
        tally_note(&tally),
        engine.refused_appends(),
        engine.overlapped_groups(),
    );
    let detail = calls.summary(forms.len() as u64, seconds);
    let group = (forms.len() as u64 / calls.append_calls.load(Ordering::Relaxed).max(1)).max(1);
    Ok((
        Run {
            name: format!("replica engine on JetStream, R{replicas}: Engine::submit"),
            count: forms.len() as u64,
            unit: "forms",
            seconds,
            note,
            detail,
            cpu,
        },
        log,
        before,
        group as usize,
    ))
}

/// The envelopes stored at `after + 1 ..= after + count`, as the stream holds them.
async fn envelopes(log: &JetStreamLog, after: Position, count: usize) -> BenchResult<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let from = Position(after.0 + out.len() as u64 + 1);
        let page = log.read_entries(from, PAGE.min(count - out.len())).await?;
        if page.is_empty() {
            return Err(format!("the stream ends before {} forms", count).into());
        }
        out.extend(page.into_iter().map(|e| e.envelope));
    }
    Ok(out)
}

/// Bare async-nats publish of `messages` into a fresh plain stream at `replicas`, from `TASKS`
/// tasks each awaiting its ack before its next publish.
async fn bare_publish(
    cluster: &Cluster,
    replicas: usize,
    messages: Vec<Vec<u8>>,
    nats: &[(String, u32)],
) -> BenchResult<Run> {
    let client = async_nats::connect(cluster.url_list()).await?;
    let js = async_nats::jetstream::new(client);
    let subject = format!("bench.forms-bare{replicas}");
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: format!("BENCH_FORMS_BARE_R{replicas}"),
        subjects: vec![subject.clone()],
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    let count = messages.len() as u64;
    let bytes: usize = messages.iter().map(Vec::len).sum();
    let messages = Arc::new(messages);
    let watch = CpuWatch::start(nats);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (js, subject, messages) = (js.clone(), subject.clone(), Arc::clone(&messages));
        tasks.push(tokio::spawn(async move {
            for m in messages.iter().skip(t).step_by(TASKS) {
                js.publish(subject.clone(), m.clone().into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Run {
        name: format!("bare JetStream publish + ack, R{replicas}, same envelopes"),
        count,
        unit: "msgs",
        seconds,
        note: format!("{} B/msg", bytes / messages.len().max(1)),
        detail: String::new(),
        cpu: watch.stop(),
    })
}

/// The floor of a single writer with optimistic concurrency, bare: `messages` published into
/// a fresh stream at `replicas` as atomic batches of `batch` (ADR-50: `Nats-Batch-Id`,
/// `Nats-Batch-Sequence`, `Nats-Batch-Commit`), each conditional on
/// `Nats-Expected-Last-Sequence` = the sequence the batch before it left, one batch at a time
/// (the next is sent once the last one's ack came, as a conditional append must be). No
/// deciding, no hashing, no copy: what the replica's rounds cost the stream alone.
async fn bare_conditional_batches(
    cluster: &Cluster,
    replicas: usize,
    messages: &[Vec<u8>],
    batch: usize,
    nats: &[(String, u32)],
) -> BenchResult<Run> {
    let client = async_nats::connect(cluster.url_list()).await?;
    let js = async_nats::jetstream::new(client.clone());
    let subject = format!("bench.forms-batches{replicas}");
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: format!("BENCH_FORMS_BATCHES_R{replicas}"),
        subjects: vec![subject.clone()],
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas,
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await?;
    let bytes: usize = messages.iter().map(Vec::len).sum();
    let watch = CpuWatch::start(nats);
    let started = Instant::now();
    let mut head = 0u64;
    for (n, chunk) in messages.chunks(batch.max(1)).enumerate() {
        let id = format!("bench-{replicas}-{n}");
        let last = chunk.len() - 1;
        let mut ack = None;
        for (i, m) in chunk.iter().enumerate() {
            let mut headers = async_nats::HeaderMap::new();
            if i == 0 {
                headers.insert("Nats-Expected-Last-Sequence", head.to_string().as_str());
            }
            if chunk.len() > 1 {
                headers.insert("Nats-Batch-Id", id.as_str());
                headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            }
            if i == last {
                if chunk.len() > 1 {
                    headers.insert("Nats-Batch-Commit", "1");
                }
                let message = async_nats::jetstream::message::PublishMessage::build()
                    .headers(headers)
                    .payload(m.clone().into());
                ack = Some(js.send_publish(subject.clone(), message).await?);
            } else {
                client
                    .publish_with_headers(subject.clone(), headers, m.clone().into())
                    .await?;
            }
        }
        let ack = ack.ok_or("an empty batch")?.await?;
        if ack.sequence != head + chunk.len() as u64 {
            return Err(format!(
                "batch {n} stored at {}, expected {}",
                ack.sequence,
                head + chunk.len() as u64
            )
            .into());
        }
        head = ack.sequence;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Run {
        name: format!("bare conditional atomic batches of {batch}, one at a time, R{replicas}"),
        count: messages.len() as u64,
        unit: "msgs",
        seconds,
        note: format!("{} B/msg", bytes / messages.len().max(1)),
        detail: String::new(),
        cpu: watch.stop(),
    })
}

/// Two replica engines (two data dirs, two connections) on one fresh R3 stream, each submitting
/// half of `forms` from half the tasks: every group is decided against a head the other writer
/// may move first, and a refused append is decided again. For comparison with one writer.
async fn two_writers(
    cluster: &Cluster,
    forms: &[Vec<u8>],
    nats: &[(String, u32)],
) -> BenchResult<Run> {
    let domain = DomainName::new("forms-two-writers");
    let mut engines = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..2 {
        let log = JetStreamLog::open(js_config(cluster, 3), &domain).await?;
        let dir = tempfile::tempdir()?;
        engines.push(Arc::new(
            Engine::open_replica(dir.path(), &domain, EngineConfig::default(), Arc::new(log))
                .await?,
        ));
        dirs.push(dir);
    }
    for outcome in engines[0].execute_many(directory()).await? {
        outcome?;
    }
    engines[1].pull().await?;
    let halves: Vec<Arc<Vec<Vec<u8>>>> = (0..2)
        .map(|w| Arc::new(forms.iter().skip(w).step_by(2).cloned().collect()))
        .collect();
    let watch = CpuWatch::start(nats);
    let started = Instant::now();
    let (a, b) = tokio::join!(
        submit_storm_with(&engines[0], &halves[0], TASKS / 2),
        submit_storm_with(&engines[1], &halves[1], TASKS / 2)
    );
    let seconds = started.elapsed().as_secs_f64();
    let cpu = watch.stop();
    let (a, b) = (a?, b?);
    Ok(Run {
        name: "two replica engines on one R3 stream: Engine::submit".into(),
        count: forms.len() as u64,
        unit: "forms",
        seconds,
        note: format!("writer 1: {}; writer 2: {}", tally_note(&a), tally_note(&b)),
        detail: format!(
            "appends refused and decided again: {} and {}",
            engines[0].refused_appends(),
            engines[1].refused_appends()
        ),
        cpu,
    })
}

/// The sled engine (`Engine::open`, default config) in a fresh directory: the directory, then
/// every form. Returns the run and the engine (replayed later).
async fn sled_forms(
    dir: &std::path::Path,
    forms: &Arc<Vec<Vec<u8>>>,
    nats: &[(String, u32)],
) -> BenchResult<(Run, Arc<Engine>)> {
    let engine = Arc::new(tokio::task::block_in_place(|| {
        Engine::open(dir, &DomainName::new("forms-sled"), EngineConfig::default())
    })?);
    for outcome in engine.execute_many(directory()).await? {
        outcome?;
    }
    let watch = CpuWatch::start(nats);
    let started = Instant::now();
    let tally = submit_storm(&engine, forms).await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = watch.stop();
    Ok((
        Run {
            name: "sled engine (fdatasync per group): Engine::submit".into(),
            count: forms.len() as u64,
            unit: "forms",
            seconds,
            note: format!(
                "{}; {} flushes",
                tally_note(&tally),
                engine.log().flush_count()
            ),
            detail: String::new(),
            cpu,
        },
        engine,
    ))
}

/// Reads every message of `stream` through an async-nats ordered consumer.
async fn bare_read(
    cluster: &Cluster,
    stream: &str,
    head: u64,
    nats: &[(String, u32)],
) -> BenchResult<Run> {
    let client = async_nats::connect(cluster.url_list()).await?;
    let js = async_nats::jetstream::new(client);
    let watch = CpuWatch::start(nats);
    let started = Instant::now();
    let consumer = js
        .get_stream(stream)
        .await?
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let mut messages = consumer.messages().await?;
    let (mut count, mut bytes) = (0u64, 0usize);
    while count < head {
        let Some(message) = messages.next().await else {
            return Err(format!("{stream}: the consumer ended after {count} messages").into());
        };
        bytes += message?.payload.len();
        count += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Run {
        name: format!("bare read, ordered consumer, {stream}"),
        count,
        unit: "msgs",
        seconds,
        note: format!("{} B/msg", bytes / count.max(1) as usize),
        detail: String::new(),
        cpu: watch.stop(),
    })
}

/// What the replica's copy costs alone: `JetStreamLog::open` (a full read that rebuilds the
/// key index) and `read_entries` of every entry, stored nowhere.
async fn copy_alone(
    cluster: &Cluster,
    replicas: usize,
    domain: &DomainName,
    head: u64,
    nats: &[(String, u32)],
) -> BenchResult<Run> {
    let watch = CpuWatch::start(nats);
    let started = Instant::now();
    let log = JetStreamLog::open(js_config(cluster, replicas), domain).await?;
    let opened = started.elapsed().as_secs_f64();
    let mut next = Position(1);
    while next.0 <= head {
        let page = log.read_entries(next, PAGE).await?;
        let Some(last) = page.last() else {
            return Err(format!("{domain}: read_entries ended at {}", next.0).into());
        };
        next = last.position.next();
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Run {
        name: format!("copy alone: JetStreamLog::open + read_entries, R{replicas}"),
        count: head,
        unit: "entries",
        seconds,
        note: format!("of which JetStreamLog::open {opened:.2} s"),
        detail: String::new(),
        cpu: watch.stop(),
    })
}

/// A fresh replica (empty data dir) of `domain`'s stream: `JetStreamLog::open` +
/// `Engine::open_replica`, which copies and folds everything.
async fn fresh_replica(
    cluster: &Cluster,
    replicas: usize,
    domain: &DomainName,
    head: u64,
    nats: &[(String, u32)],
) -> BenchResult<Run> {
    let dir = tempfile::tempdir()?;
    let watch = CpuWatch::start(nats);
    let started = Instant::now();
    let log = JetStreamLog::open(js_config(cluster, replicas), domain).await?;
    let opened = started.elapsed().as_secs_f64();
    let engine =
        Engine::open_replica(dir.path(), domain, EngineConfig::default(), Arc::new(log)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = watch.stop();
    let got = engine.log().written_head().0;
    if got != head || engine.projections().checkpoint().0 != head {
        return Err(format!(
            "{domain}: the fresh replica holds {got} entries, folded to {}, of {head}",
            engine.projections().checkpoint().0
        )
        .into());
    }
    Ok(Run {
        name: format!("fresh replica: copy + fold (Engine::open_replica), R{replicas}"),
        count: head,
        unit: "entries",
        seconds,
        note: format!("of which JetStreamLog::open {opened:.2} s"),
        detail: String::new(),
        cpu,
    })
}

/// Opens a first log so the meta leader exists before anything is timed.
async fn wait_for_jetstream(cluster: &Cluster) -> BenchResult<()> {
    open_when_ready(
        js_config(cluster, 3),
        &DomainName::new("bench-warmup"),
        Duration::from_secs(30),
    )
    .await?;
    Ok(())
}

fn main() -> BenchResult<()> {
    let n: u64 = env_or("CASELEDGER_BENCH_FORMS", 20_000)?;
    let two_writer_forms: usize = env_or("CASELEDGER_BENCH_TWO_WRITERS", n as usize / 4)?;
    let binary = match nats_server() {
        Ok(binary) => binary,
        Err(reason) => {
            eprintln!("SKIP: jetstream_engine bench: no nats-server: {reason}");
            return Ok(());
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    eprintln!("jetstream_engine bench: {}", machine());
    eprintln!("load average at start: {}", load_average());
    let forms: Arc<Vec<Vec<u8>>> = Arc::new((0..n).map(raw_form).collect());
    let bytes: usize = forms.iter().map(Vec::len).sum();
    eprintln!(
        "workload: N = {n} ANC forms (avg {} B, 2 case blocks), {TASKS} tasks, after a directory of {} commands; 3-node cluster (sync_interval: always), nats-server {}",
        bytes / forms.len().max(1),
        directory().len(),
        jetstream::cluster::NATS_SERVER_VERSION
    );
    let cluster = Cluster::start(&binary, 3)?;
    let nats: Vec<(String, u32)> = cluster
        .nodes()
        .iter()
        .filter_map(|node| node.pid().map(|pid| (node.name.clone(), pid)))
        .collect();
    let sled_dir = tempfile::tempdir()?;
    rt.block_on(async {
        wait_for_jetstream(&cluster).await?;

        eprintln!("forms/s:");
        let mut streams = Vec::new();
        let mut rates = Vec::new();
        for replicas in [1, 3] {
            let (run, log, before, group) =
                replica_forms(&cluster, replicas, &forms, &nats).await?;
            run.print();
            let messages = envelopes(&log, before, forms.len()).await?;
            let batches =
                bare_conditional_batches(&cluster, replicas, &messages, group, &nats).await?;
            let bare = bare_publish(&cluster, replicas, messages, &nats).await?;
            bare.print();
            eprintln!(
                "  ratio replica forms/s / bare publish msgs/s at R{replicas}: {:.2} (target >= 0.70: {})",
                run.rate() / bare.rate(),
                if run.rate() >= 0.7 * bare.rate() { "met" } else { "MISSED" }
            );
            batches.print();
            eprintln!(
                "  floor: bare conditional batches / bare publish at R{replicas}: {:.2}; replica / bare conditional batches: {:.2}",
                batches.rate() / bare.rate(),
                run.rate() / batches.rate()
            );
            let head = log.head().await?.0;
            streams.push((replicas, log.domain().clone(), log.stream_name().to_owned(), head));
            rates.push((replicas, run.rate()));
        }
        let (sled, engine) = sled_forms(sled_dir.path(), &forms, &nats).await?;
        sled.print();
        for (replicas, rate) in &rates {
            eprintln!(
                "  ratio replica R{replicas} / sled engine: {:.2}",
                rate / sled.rate()
            );
        }
        if two_writer_forms > 0 {
            let part = &forms[..two_writer_forms.min(forms.len())];
            // Bounded: a livelock between the writers must not hang the bench.
            let limit = Duration::from_secs(120);
            match tokio::time::timeout(limit, two_writers(&cluster, part, &nats)).await {
                Ok(two) => {
                    let two = two?;
                    two.print();
                    if let Some((_, one)) = rates.iter().find(|(r, _)| *r == 3) {
                        eprintln!(
                            "  ratio two writers / one writer at R3: {:.2}",
                            two.rate() / one
                        );
                    }
                }
                Err(_) => eprintln!(
                    "  two replica engines on one R3 stream: {} forms NOT finished within {limit:?}",
                    part.len()
                ),
            }
        }

        eprintln!("replay:");
        let head = engine.log().written_head().0;
        let watch = CpuWatch::start(&nats);
        let started = Instant::now();
        let stats = tokio::task::block_in_place(|| engine.replay(&mut |_, _| {}))?;
        let sled_replay = Run {
            name: "sled engine: Engine::replay (bulk rebuild)".into(),
            count: head,
            unit: "events",
            seconds: started.elapsed().as_secs_f64(),
            note: format!("{} events folded", stats.events),
        detail: String::new(),
            cpu: watch.stop(),
        };
        sled_replay.print();
        for (replicas, domain, stream, head) in &streams {
            let bare = bare_read(&cluster, stream, *head, &nats).await?;
            bare.print();
            let copy = copy_alone(&cluster, *replicas, domain, *head, &nats).await?;
            copy.print();
            let fresh = fresh_replica(&cluster, *replicas, domain, *head, &nats).await?;
            fresh.print();
            eprintln!(
                "  ratio fresh replica R{replicas} / bare read: {:.2}; / copy alone: {:.2}; / sled replay: {:.2}",
                fresh.rate() / bare.rate(),
                fresh.rate() / copy.rate(),
                fresh.rate() / sled_replay.rate()
            );
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    eprintln!("load average at end: {}", load_average());
    drop(cluster);
    Ok(())
}
