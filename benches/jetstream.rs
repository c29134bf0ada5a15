//! Durable append through the JetStream log against bare JetStream publish and against the
//! sled log, measured in the same run on the same workload (issue 11).
//!
//! Workload: N events, each a `FormAcceptedV1` carrying a ~1.3 KB form (an envelope of about
//! 1 KB after LZ4), appended by 64 tokio tasks, each awaiting one append before the next, so
//! every contender sees the same concurrency and forms its groups from it:
//!
//! 1. bare publish: async-nats `publish` of the same envelope bytes (encoded in the loop, as the
//!    log encodes them), then await the `PubAck`; no headers;
//! 2. `JetStreamLog::append` (`Expected::Any`, an idempotency key per append): conditional,
//!    pipelined publishes with `Nats-Msg-Id`;
//! 3. `SledLog::append` with `sync_data_file` (fdatasync per group commit), the embedded default.
//!
//! 1 and 2 run at R1 and R3 on a 3-node cluster started from `deploy/nats/cluster.conf`
//! (`sync_interval: always`: every stored message is fsynced on each replica), in temporary
//! directories on the same disk as sled's. Target: 2 ≥ 0.7 × 1 at the same replication.
//!
//! `cargo bench --bench jetstream`; `CASELEDGER_BENCH_EVENTS=n` sets N (default 20 000).
//! Without a nats-server (`scripts/nats-server.sh`) it prints `SKIP:`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_or, machine, uuid_like, BenchResult};
use domain::{
    CommandId, DomainName, Event, FormAcceptedV1, FormId, FormRecord, Position, RecordedEvent,
    Timestamp,
};
use eventlog::{
    encode_envelope_chained, AppendRequest, EventStore, Expected, LogConfig, SledLog, GENESIS,
};
use jetstream::cluster::{nats_server, open_when_ready, Cluster};
use jetstream::{JetStreamConfig, JetStreamLog};

const TASKS: u64 = 64;
const BASE_TIME: i64 = 1_772_432_122_104;

fn event(i: u64) -> Event {
    let case_id = uuid_like(0x3f9b_6a52, i);
    let instance_id = uuid_like(0x3d30_7d25, i);
    let raw = format!(
        "<?xml version='1.0' ?><data xmlns=\"http://openrosa.org/formdesigner/7A1C\" \
         name=\"Register Pregnancy\"><mother_name>Monica Achieng</mother_name>\
         <n0:case xmlns:n0=\"http://commcarehq.org/case/transaction/v2\" case_id=\"{case_id}\" \
         date_modified=\"2026-03-02T09:15:22.104+03:00\" user_id=\"u-david\"><n0:create>\
         <n0:case_name>Monica Achieng</n0:case_name><n0:case_type>pregnancy</n0:case_type>\
         </n0:create><n0:update><n0:edd>2026-09-01</n0:edd></n0:update></n0:case>\
         <n1:meta xmlns:n1=\"http://openrosa.org/jr/xforms\"><n1:instanceID>{instance_id}\
         </n1:instanceID><n1:username>david</n1:username>{}</n1:meta></data>",
        "<n1:note>padding to a typical form size</n1:note>".repeat(16)
    );
    Event::FormAcceptedV1(FormAcceptedV1 {
        form: FormRecord {
            form_id: FormId::new(instance_id),
            xmlns: "http://openrosa.org/formdesigner/7A1C".into(),
            app_id: None,
            user_id: Some("u-david".into()),
            content_hash: [0; 32],
            raw: raw.into_bytes().into(),
        },
        blocks: Vec::new(),
    })
}

fn request(i: u64) -> AppendRequest {
    AppendRequest {
        expected: Expected::Any,
        idempotency_key: Some(format!("cmd-{i}")),
        command_id: CommandId::new(format!("cmd-{i}")),
        recorded_at: Timestamp(BASE_TIME + i as i64),
        events: vec![event(i)],
    }
}

struct Run {
    name: String,
    events: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Run {
    fn per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
    fn print(&self) {
        // Only the bare contender sees its bytes; the logs encode the same envelopes.
        let bytes = if self.bytes == 0 {
            "-".to_owned()
        } else {
            format!("{} B/ev", self.bytes / self.events.max(1))
        };
        eprintln!(
            "  {:<44} {:>7} ev {:>9.0} ev/s {:>7.2} s {:>10}",
            self.name,
            self.events,
            self.per_sec(),
            self.elapsed.as_secs_f64(),
            bytes
        );
    }
}

/// Runs `append(i)` for i in 0..n from 64 tasks, each awaiting its own appends in turn.
async fn storm<F, Fut>(name: String, n: u64, append: F) -> BenchResult<Run>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64, String>> + Send,
{
    let append = Arc::new(append);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let append = Arc::clone(&append);
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0u64;
            let mut i = t;
            while i < n {
                bytes += append(i).await?;
                i += TASKS;
            }
            Ok::<u64, String>(bytes)
        }));
    }
    let mut bytes = 0;
    for task in tasks {
        bytes += task.await??;
    }
    Ok(Run {
        name,
        events: n,
        bytes,
        elapsed: start.elapsed(),
    })
}

async fn bare(cluster: &Cluster, replicas: usize, n: u64) -> BenchResult<Run> {
    let client = async_nats::connect(cluster.url_list()).await?;
    let js = async_nats::jetstream::new(client);
    let subject = format!("bench.bare{replicas}");
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: format!("BENCH_BARE_R{replicas}"),
        subjects: vec![subject.clone()],
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    storm(
        format!("bare JetStream publish + ack, R{replicas}"),
        n,
        move |i| {
            let js = js.clone();
            let subject = subject.clone();
            async move {
                // The same bytes the log stores (chained to GENESIS: same size).
                let envelope = encode_envelope_chained(
                    &RecordedEvent {
                        position: Position(i + 1),
                        recorded_at: Timestamp(BASE_TIME + i as i64),
                        command_id: CommandId::new(format!("cmd-{i}")),
                        event: event(i),
                    },
                    &GENESIS,
                )
                .map_err(|e| e.to_string())?;
                let len = envelope.len() as u64;
                js.publish(subject, envelope.into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(len)
            }
        },
    )
    .await
}

async fn log(cluster: &Cluster, replicas: usize, n: u64) -> BenchResult<Run> {
    let mut config = JetStreamConfig::new(cluster.urls());
    config.replicas = replicas;
    let log = JetStreamLog::open(config, &DomainName::new(format!("bench-r{replicas}"))).await?;
    let run = storm(format!("JetStreamLog::append, R{replicas}"), n, move |i| {
        let log = log.clone();
        async move {
            log.append(request(i)).await.map_err(|e| e.to_string())?;
            Ok(0)
        }
    })
    .await?;
    Ok(run)
}

async fn sled_log(n: u64) -> BenchResult<Run> {
    let dir = tempfile::tempdir()?;
    let db = sled::open(dir.path())?;
    let log = SledLog::open(&db, &DomainName::new("bench"), LogConfig::default())?;
    log.sync_data_file(dir.path())?;
    let probe = log.clone();
    let run = storm(
        "SledLog::append (fdatasync per group)".into(),
        n,
        move |i| {
            let log = log.clone();
            async move {
                log.append(request(i)).await.map_err(|e| e.to_string())?;
                Ok(0)
            }
        },
    )
    .await?;
    eprintln!("  (sled: {} flushes)", probe.flush_count());
    Ok(run)
}

/// Opens a first log so the meta leader exists before anything is timed.
async fn wait_for_jetstream(cluster: &Cluster) -> BenchResult<()> {
    open_when_ready(
        JetStreamConfig::new(cluster.urls()),
        &DomainName::new("bench-warmup"),
        Duration::from_secs(30),
    )
    .await?;
    Ok(())
}

fn main() -> BenchResult<()> {
    let n: u64 = env_or("CASELEDGER_BENCH_EVENTS", 20_000)?;
    let binary = match nats_server() {
        Ok(binary) => binary,
        Err(reason) => {
            eprintln!("SKIP: jetstream bench: no nats-server: {reason}");
            return Ok(());
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    eprintln!("jetstream bench: {}", machine());
    eprintln!(
        "N = {n} events, {TASKS} tasks, 3-node cluster (sync_interval: always), nats-server {}",
        jetstream::cluster::NATS_SERVER_VERSION
    );
    let cluster = Cluster::start(&binary, 3)?;
    rt.block_on(async {
        wait_for_jetstream(&cluster).await?;
        let mut runs = Vec::new();
        for replicas in [1, 3] {
            let base = bare(&cluster, replicas, n).await?;
            base.print();
            let ours = log(&cluster, replicas, n).await?;
            ours.print();
            eprintln!(
                "  ratio JetStreamLog / bare publish at R{replicas}: {:.2} (target >= 0.70)",
                ours.per_sec() / base.per_sec()
            );
            runs.push((base, ours));
        }
        let sled = sled_log(n).await?;
        sled.print();
        for (base, ours) in &runs {
            eprintln!(
                "  ratio {} / sled: {:.2}",
                ours.name,
                ours.per_sec() / sled.per_sec()
            );
            let _ = base;
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    drop(cluster);
    Ok(())
}
