//! [`JetStreamLog`]: the log of one project space on one JetStream stream; appending (group
//! commit by atomic batches), importing stored entries verbatim, reading, subscribing,
//! verifying.
//!
//! # Messages
//!
//! A message is one envelope, chained as sled chains it. An imported format-4 envelope (a form
//! whose raw submission sled stores out of line) is followed, in the same message, by those raw
//! bytes (`message.rs`). Every reader splits such a message and checks the bytes against the
//! envelope: `read` returns the form with its bytes inline, `read_entries` the envelope and the
//! bytes apart, as sled does.
//!
//! # Appending
//!
//! One committer task owns the writer state: the head the log last confirmed, its chain hash
//! and the idempotency index. It takes queued appends, up to `max_batch` events, and for each
//! in order checks the key (index, then earlier appends of the group), then `Expected::Head`
//! against the running head (refusing outright an append of an `append_all` chain one of whose
//! earlier appends was not appended: it was decided with that one in place), and encodes the
//! envelopes chained to the running hash. Then it
//! publishes the round without waiting in between: one message for a lone single-event append,
//! otherwise one atomic batch (ADR-50) of every message of the round, all stored or none; and
//! answers each append from the round's one ack.
//!
//! This stays correct with other writers on the stream because the round's first message
//! carries `Nats-Expected-Last-Sequence` = the confirmed head, and the rest is stored with it
//! or not at all. If the round is refused, its appends are tried again in a new round after the
//! writer caught up with the stream, which re-checks their key and expected head against what
//! is really there. An append expecting a head beyond the writer's (its caller read the stream
//! after another process appended) makes the writer catch up first. (Rounds used to be
//! pipelined single publishes chained by `Nats-Expected-Last-Msg-Id`; nats-server 2.15.1 halts a
//! stream on that header under two concurrent writers: see `commit_round`.)
//!
//! What must hold: a message is stored only right after the message whose chain hash it
//! carries; the writer's head, hash and index describe a prefix of the stream; after an ack
//! that did not come (timeout, lost connection), the writer catches up from the stream before
//! it publishes again.
//!
//! One file past 600 lines: the committer, the import, the catch-up that feeds them and the
//! readers share the writer's state (what a stored message holds is `message.rs`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use domain::{DomainName, Position, RecordedEvent};
use eventlog::{
    chain_hash, encode_event_chained, AcknowledgedHead, AppendOutcome, AppendRequest, EventStore,
    Expected, Hash, LogError, Subscription, SubscriptionSource, VerbatimEntry, Verified, GENESIS,
};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::message::{check_chained, decode_stored, parts, verbatim_messages, Message, Parts};
use crate::wire::{self, unavailable, Ack, Stored};

/// How a [`JetStreamLog`] reaches its cluster and sets up its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    /// Server URLs, comma-separated: `nats://127.0.0.1:4222,nats://127.0.0.1:4223`.
    pub servers: String,
    /// Replicas of a newly created stream (1, 3 or 5); 3 in a cluster.
    pub replicas: usize,
    /// Most events one round of the group commit publishes (as one atomic batch).
    pub max_batch: usize,
    /// How long an ack or a read may take before the append or read is
    /// [`LogError::Unavailable`].
    pub timeout: Duration,
    /// JetStream's deduplication window of a newly created stream (its default: 2 minutes).
    /// caseledger's own key index does not depend on it (`docs/DURABILITY.md`).
    pub duplicate_window: Duration,
}

impl JetStreamConfig {
    /// Defaults: 3 replicas, groups of up to 256 events, 10 s timeout, 2 min dedupe window.
    pub fn new(servers: impl Into<String>) -> JetStreamConfig {
        JetStreamConfig {
            servers: servers.into(),
            replicas: 3,
            max_batch: 256,
            timeout: Duration::from_secs(10),
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// Rounds one group may take (refused publishes re-tried after a catch-up) before its
/// remaining appends are answered [`LogError::Unavailable`]; the group also stops retrying
/// after the configured timeout.
const MAX_ROUNDS: u32 = 1000;
/// The longest pause between two rounds. Writers that keep refusing each other back off by a
/// random pause that doubles each round up to this, so one of them wins the next head.
const MAX_BACKOFF: Duration = Duration::from_millis(200);
/// The server's limit on messages in one atomic batch.
const MAX_ATOMIC: usize = 1000;

/// How long [`JetStreamLog::open`] keeps asking for its stream, in configured timeouts. A new
/// R3 stream answers its creation only once its own group has elected a leader, and an election
/// that splits its vote takes another 4 to 9 s: one timeout is not always enough on a loaded
/// machine (a CI run saw the creation time out after 10 s).
const CREATE_TIMEOUTS: u32 = 3;

/// Looks the stream up and creates it when it is missing, asking again while the answer is a
/// timeout or "JetStream unavailable" (an election in progress) until [`CREATE_TIMEOUTS`]
/// timeouts have passed. Both requests are idempotent: a creation that timed out on the caller's
/// side but went through is found by the next lookup.
async fn get_or_create(
    js: &jetstream::Context,
    wanted: stream::Config,
    config: &JetStreamConfig,
) -> Result<(), LogError> {
    use async_nats::jetstream::context::CreateStreamErrorKind as Kind;
    let deadline = tokio::time::Instant::now() + config.timeout * CREATE_TIMEOUTS;
    loop {
        let error = match js.get_or_create_stream(wanted.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let passing = match error.kind() {
            Kind::TimedOut | Kind::JetStreamUnavailable => true,
            Kind::JetStream(e) => e.code() == 503,
            _ => false,
        };
        if !passing || tokio::time::Instant::now() >= deadline {
            return Err(unavailable(error));
        }
        tracing::warn!(stream = %wanted.name, %error, "the stream did not answer yet; asking again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The append-only log of one project space on a JetStream stream.
///
/// Cheap to clone: clones share one connection and one committer.
///
/// Durability: an append is answered `Ok` only after JetStream's publish ack, which the stream
/// leader sends once a quorum of the stream's replicas stored the message; with the shipped
/// server config (`sync_interval: always`) stored means fsynced. Reads, `head` and
/// subscriptions show only such messages.
#[derive(Clone)]
pub struct JetStreamLog {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<Queued>,
    /// The next [`Job::chain`] id.
    chains: std::sync::atomic::AtomicU64,
}

/// What the committer and the readers both use.
struct Shared {
    client: Client,
    js: jetstream::Context,
    stream: String,
    subject: String,
    domain: DomainName,
    config: JetStreamConfig,
    /// The payloads of this process's last acknowledged appends not yet taken by
    /// [`EventStore::recent_entries`], by position, oldest first.
    recent: std::sync::Mutex<Recent>,
}

/// [`Shared::recent`]: at most [`RECENT`] entries and [`RECENT_BYTES`] of payload, the oldest
/// dropped first. A replica takes each landed group at once, so it holds a group or two; a
/// process that never takes them (an import, a CLI command) holds at most the bounds.
#[derive(Default)]
struct Recent {
    entries: std::collections::VecDeque<(Position, Bytes)>,
    bytes: usize,
}

/// How many acknowledged entries [`Recent`] keeps at most: several of a replica's groups.
const RECENT: usize = 2048;
/// How many payload bytes [`Recent`] keeps at most, per project space served.
const RECENT_BYTES: usize = 4 << 20;

/// What the committer takes from its queue, in order.
enum Queued {
    /// One append, or the chain of one `append_all`, queued at once so that it is never split
    /// between the committer's groups.
    Append(Vec<Job>),
    Verbatim(VerbatimJob),
}

struct Job {
    req: AppendRequest,
    answer: oneshot::Sender<Result<AppendOutcome, LogError>>,
    /// The [`EventStore::append_all`] call this append is part of, if any: once one append of
    /// a chain is not appended, its later appends that expect a head are refused.
    chain: Option<u64>,
}

/// An import ([`JetStreamLog::append_verbatim`]).
struct VerbatimJob {
    entries: Vec<VerbatimEntry>,
    answer: oneshot::Sender<Result<AcknowledgedHead, LogError>>,
}

/// The committer's state.
struct Writer {
    /// The last position known to be in the stream, with everything before it.
    head: Position,
    /// The chain hash of `head`.
    hash: Hash,
    /// Every idempotency key in the stream up to `head`, with the positions of its append.
    keys: HashMap<String, (Position, Position)>,
    /// Keys whose publish got no answer: their next publish uses a fresh `Nats-Msg-Id` (see
    /// `Shared::publish`).
    uncertain: std::collections::HashSet<String>,
    /// Set when an ack did not come or a publish was refused: the stream may hold more than
    /// `head`, so catch up before the next publish.
    stale: bool,
    scratch: Vec<u8>,
    /// Chains ([`Job::chain`]) one of whose appends was not appended, until their last append
    /// is answered.
    broken: std::collections::HashSet<u64>,
}

impl fmt::Debug for JetStreamLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamLog")
            .field("domain", &self.inner.shared.domain)
            .field("stream", &self.inner.shared.stream)
            .finish_non_exhaustive()
    }
}

impl JetStreamLog {
    /// Connects, creates the project space's stream if it does not exist (file storage,
    /// `config.replicas`, direct gets and atomic batches allowed, deletes and purges denied so
    /// positions stay gapless), reads it once to rebuild the key index and the head's chain
    /// hash, and starts the committer. Needs a tokio runtime. While the cluster or the new
    /// stream's group elects a leader, the stream is asked for (and read) again, for up to
    /// three timeouts.
    ///
    /// # Errors
    /// [`LogError::Unavailable`] when the cluster cannot be reached or refuses the stream;
    /// [`LogError::Corrupt`] when a stored message does not verify.
    pub async fn open(config: JetStreamConfig, domain: &DomainName) -> Result<Self, LogError> {
        let (client, js) = connect(&config).await?;
        let stream = wire::stream_name(domain);
        let subject = wire::subject(domain);
        let wanted = stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            duplicate_window: config.duplicate_window,
            allow_direct: true,
            allow_atomic_publish: true,
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        };
        get_or_create(&js, wanted, &config).await?;
        let shared = Arc::new(Shared {
            client,
            js,
            stream,
            subject,
            domain: domain.clone(),
            config,
            recent: std::sync::Mutex::new(Recent::default()),
        });
        let mut writer = Writer {
            head: Position::ZERO,
            hash: GENESIS,
            keys: HashMap::new(),
            uncertain: std::collections::HashSet::new(),
            stale: true,
            scratch: Vec::with_capacity(4096),
            broken: std::collections::HashSet::new(),
        };
        // A stream just created (or just after an election) may answer direct gets 503 for a
        // moment: read on while that passes, within the same bound as its creation.
        let deadline = tokio::time::Instant::now() + shared.config.timeout * CREATE_TIMEOUTS;
        loop {
            match shared.catch_up(&mut writer).await {
                Ok(()) => break,
                Err(LogError::Unavailable(reason)) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(stream = %shared.stream, %reason, "the stream cannot be read yet; reading again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(domain = %domain, head = writer.head.0, stream = %shared.stream, "opened JetStream log");
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(commit_loop(Arc::clone(&shared), writer, queue));
        Ok(JetStreamLog {
            inner: Arc::new(Inner {
                shared,
                jobs,
                chains: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// The project spaces that have a log on the cluster `config` names: every stream named as
    /// [`JetStreamLog::open`] names one (`CASELEDGER_<space>`, a one-to-one spelling), sorted.
    /// Other streams on the cluster are left out.
    ///
    /// # Errors
    /// [`LogError::Unavailable`] when the cluster cannot be reached or does not list its
    /// streams.
    pub async fn domains(config: &JetStreamConfig) -> Result<Vec<DomainName>, LogError> {
        let (_client, js) = connect(config).await?;
        let mut names = js.stream_names();
        let mut out = Vec::new();
        while let Some(name) = names.next().await {
            if let Some(domain) = wire::domain_of(&name.map_err(unavailable)?) {
                out.push(domain);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Appends stored entries exactly as they are (an import of another log's
    /// [`EventStore::read_entries`], e.g. a sled log's): each must be at the next position,
    /// decode, say that position, store the chain hash of the entries before it, and, for a
    /// format-4 envelope, come with the raw submission of the length and SHA-256 it names. That
    /// raw submission is stored in the same message, after the envelope
    /// (`Caseledger-Envelope-Len` says where it ends); the chain covers the envelope only, so
    /// the head hash is the source's. Legacy (unchained) envelopes are refused: a JetStream log
    /// holds chained ones only.
    ///
    /// Goes through the committer like [`EventStore::append`], as one atomic batch conditional
    /// on the stream's last sequence, and returns once the stream's quorum stored it. The
    /// imported entries carry no idempotency keys (as with `SledLog::append_verbatim`).
    ///
    /// # Errors
    /// [`LogError::Corrupt`] naming the first entry that fails a check, or the first entry when
    /// the stream's next position is not its own (nothing is appended);
    /// [`LogError::Encode`] for more than 1000 entries (JetStream's limit per atomic batch) or
    /// an entry over the server's `max_payload`; [`LogError::Unavailable`] when the ack did not
    /// come (the import may be in the stream: compare [`EventStore::head`]).
    pub async fn append_verbatim(
        &self,
        entries: &[VerbatimEntry],
    ) -> Result<AcknowledgedHead, LogError> {
        let (answer, rx) = oneshot::channel();
        self.inner
            .jobs
            .send(Queued::Verbatim(VerbatimJob {
                entries: entries.to_vec(),
                answer,
            }))
            .map_err(|_| LogError::Shutdown)?;
        rx.await.map_err(|_| LogError::Shutdown)?
    }

    /// The project space this log belongs to.
    pub fn domain(&self) -> &DomainName {
        &self.inner.shared.domain
    }

    /// The JetStream stream that holds this log.
    pub fn stream_name(&self) -> &str {
        &self.inner.shared.stream
    }

    /// The subject every message of this log is published on.
    pub fn subject(&self) -> &str {
        &self.inner.shared.subject
    }

    /// The `server_name` of the node this log's connection goes through now (it moves when
    /// that node goes away).
    pub fn connected_server(&self) -> String {
        self.inner.shared.client.server_info().server_name
    }

    /// The server name of the stream's leader now (`None` during an election).
    ///
    /// # Errors
    /// [`LogError::Unavailable`] when the stream info cannot be read.
    pub async fn leader(&self) -> Result<Option<String>, LogError> {
        let shared = &self.inner.shared;
        let stream = shared
            .js
            .get_stream(&shared.stream)
            .await
            .map_err(unavailable)?;
        Ok(stream
            .cached_info()
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone()))
    }

    /// Reads the whole stream and checks it as `SledLog::verify` checks a sled log: positions
    /// gapless from 1, each envelope's crc and stored previous hash, the chain up to the head.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] naming the first position that fails; [`LogError::Unavailable`].
    pub async fn verify(&self) -> Result<Verified, LogError> {
        let shared = &self.inner.shared;
        let head = shared.last_sequence().await?;
        let (mut hash, mut next, mut bytes) = (GENESIS, 1u64, 0u64);
        while next <= head {
            let page = shared.page(next, head).await?;
            for message in &page {
                hash = check_chained(message, Position(next), &hash)?;
                bytes += message.payload.len() as u64;
                next += 1;
            }
        }
        Ok(Verified {
            from: Position(1),
            head: Position(head),
            head_hash: hash,
            entries: head,
            unchained: 0,
            bytes,
        })
    }

    async fn append_queued(&self, req: AppendRequest) -> Result<AppendOutcome, LogError> {
        let (answer, rx) = oneshot::channel();
        self.inner
            .jobs
            .send(Queued::Append(vec![Job {
                req,
                answer,
                chain: None,
            }]))
            .map_err(|_| LogError::Shutdown)?;
        rx.await.map_err(|_| LogError::Shutdown)?
    }
}

#[async_trait::async_trait]
impl EventStore for JetStreamLog {
    /// Queues the append for the committer and returns once its publish ack came: the events
    /// are on a quorum of the stream's replicas.
    ///
    /// [`LogError::Unavailable`] means the ack did not come: the append may or may not be in
    /// the log; retry with the same idempotency key. Dropping the future does not withdraw a
    /// queued append.
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome, LogError> {
        self.append_queued(req).await
    }

    /// Queues every append as one chain before awaiting any, so the committer takes them in
    /// one group (one atomic batch where they fit), each expecting the head the one before
    /// leaves; once one is not appended, the later ones that expect a head are refused (the
    /// trait's contract).
    async fn append_all(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Vec<Result<AppendOutcome, LogError>> {
        let chain = Some(
            self.inner
                .chains
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        let mut jobs = Vec::with_capacity(requests.len());
        let mut waiting = Vec::with_capacity(requests.len());
        for req in requests {
            let (answer, rx) = oneshot::channel();
            jobs.push(Job { req, answer, chain });
            waiting.push(rx);
        }
        if self.inner.jobs.send(Queued::Append(jobs)).is_err() {
            return waiting.iter().map(|_| Err(LogError::Shutdown)).collect();
        }
        let mut out = Vec::with_capacity(waiting.len());
        for rx in waiting {
            out.push(rx.await.unwrap_or(Err(LogError::Shutdown)));
        }
        out
    }

    async fn read(&self, from: Position, limit: usize) -> Result<Vec<RecordedEvent>, LogError> {
        self.inner.shared.read(from, limit).await
    }

    async fn head(&self) -> Result<Position, LogError> {
        Ok(Position(self.inner.shared.last_sequence().await?))
    }

    async fn read_entries(
        &self,
        from: Position,
        limit: usize,
    ) -> Result<Vec<VerbatimEntry>, LogError> {
        self.inner.shared.read_entries(from, limit).await
    }

    fn recent_entries(&self, from: Position, last: Position) -> Option<Vec<VerbatimEntry>> {
        self.inner.shared.recent_entries(from, last)
    }

    async fn subscribe(&self, from: Position) -> Result<Subscription, LogError> {
        let source = Source {
            shared: Arc::clone(&self.inner.shared),
            wake: None,
        };
        Ok(Subscription::from_source(Box::new(source), from))
    }
}

/// A connection to the servers `config` names, and its JetStream context.
/// Connects to the servers `config` names, with its timeouts for requests and acks.
///
/// # Errors
/// [`LogError::Unavailable`] when no URL is given or the cluster cannot be reached.
pub(crate) async fn connect(
    config: &JetStreamConfig,
) -> Result<(Client, jetstream::Context), LogError> {
    let servers = config.server_list();
    if servers.is_empty() {
        return Err(LogError::Unavailable("no server URL given".into()));
    }
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(config.timeout))
        .connection_timeout(config.timeout)
        .connect(servers)
        .await
        .map_err(unavailable)?;
    let js = jetstream::ContextBuilder::new()
        .timeout(config.timeout)
        .ack_timeout(config.timeout)
        .build(client.clone());
    Ok((client, js))
}

impl Shared {
    /// The stream's last sequence, from the stream leader's info.
    ///
    /// While the stream has no leader (an election after its leader went away), a replica
    /// answers with its own state, which may not have applied the last messages the leader
    /// acknowledged; its answer names no leader. That is [`LogError::Unavailable`] here, never
    /// a shorter stream: `catch_up` would take it for a lost tail.
    async fn last_sequence(&self) -> Result<u64, LogError> {
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(unavailable)?;
        let info = stream.cached_info();
        if let Some(cluster) = &info.cluster {
            if cluster.leader.as_deref().unwrap_or_default().is_empty() {
                return Err(LogError::Unavailable(format!(
                    "stream {} has no leader (an election); its replicas' state may be behind",
                    self.stream
                )));
            }
        }
        Ok(info.state.last_sequence)
    }

    /// Messages `from..=to` as one or more direct gets; at least one message unless a replica
    /// keeps answering with none (then [`LogError::Unavailable`]).
    async fn page(&self, from: u64, to: u64) -> Result<Vec<Stored>, LogError> {
        let want = usize::try_from(to - from + 1)
            .unwrap_or(usize::MAX)
            .min(wire::DIRECT_BATCH);
        for attempt in 0..50u64 {
            let mut page =
                wire::direct_batch(&self.client, &self.stream, from, want, self.config.timeout)
                    .await?;
            page.retain(|m| m.seq <= to);
            if let Some(first) = page.first() {
                if first.seq != from {
                    return Err(LogError::corrupt(
                        Position(from),
                        format!("missing: the stream's next message is {}", first.seq),
                    ));
                }
                return Ok(page);
            }
            // A replica that has not applied `from` yet answered; ask again.
            tokio::time::sleep(Duration::from_millis(10 * (attempt + 1))).await;
        }
        Err(LogError::Unavailable(format!(
            "no replica returned position {from} of {}",
            self.stream
        )))
    }

    /// Stored messages `from..` (at most `limit`), each checked to be at its sequence, as the
    /// envelopes they carry.
    async fn read_entries(
        &self,
        from: Position,
        limit: usize,
    ) -> Result<Vec<VerbatimEntry>, LogError> {
        self.read_with(from, limit, |message, position| {
            let Parts { envelope, raw, .. } = parts(message, position)?;
            Ok(VerbatimEntry {
                position,
                envelope: envelope.to_vec(),
                raw: raw.map(<[u8]>::to_vec),
            })
        })
        .await
    }

    async fn read(&self, from: Position, limit: usize) -> Result<Vec<RecordedEvent>, LogError> {
        self.read_with(from, limit, decode_stored).await
    }

    /// Messages `from..` (at most `limit`, up to the head now), each made into a `T` by `each`
    /// with the position it must be at.
    async fn read_with<T>(
        &self,
        from: Position,
        limit: usize,
        each: impl Fn(&Stored, Position) -> Result<T, LogError>,
    ) -> Result<Vec<T>, LogError> {
        let from = from.max(Position(1)).0;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let head = self.last_sequence().await?;
        if from > head {
            return Ok(Vec::new());
        }
        let to = head.min(from.saturating_add(limit as u64 - 1));
        let mut out = Vec::with_capacity((to - from + 1) as usize);
        let mut next = from;
        while next <= to {
            for message in self.page(next, to).await? {
                out.push(each(&message, Position(next))?);
                next += 1;
            }
        }
        Ok(out)
    }

    /// Reads the stream from the writer's head to its end: checks the chain, indexes the keys,
    /// and leaves the writer at the stream's last sequence.
    async fn catch_up(&self, writer: &mut Writer) -> Result<(), LogError> {
        let head = self.last_sequence().await?;
        if head < writer.head.0 {
            // Acknowledged messages are gone: a stream recreated, or a quorum that lost its
            // files (docs/DURABILITY.md). Never write over that.
            return Err(LogError::corrupt(
                writer.head,
                format!(
                    "lost tail: the stream ends at {head}, before the head {} this process \
                     saw acknowledged",
                    writer.head
                ),
            ));
        }
        let mut next = writer.head.0 + 1;
        while next <= head {
            for message in self.page(next, head).await? {
                let position = Position(next);
                writer.hash = check_chained(&message, position, &writer.hash)?;
                if let Some(key) = message.headers.get(wire::KEY) {
                    let count = message
                        .headers
                        .get(wire::COUNT)
                        .and_then(|c| c.as_str().parse::<u64>().ok())
                        .unwrap_or(1)
                        .max(1);
                    writer.uncertain.remove(key.as_str());
                    writer.keys.insert(
                        key.as_str().to_owned(),
                        (position, Position(next + count - 1)),
                    );
                }
                writer.head = position;
                next += 1;
            }
        }
        writer.stale = false;
        tracing::debug!(stream = %self.stream, head = writer.head.0, "caught up");
        Ok(())
    }

    /// Encodes `req`'s events chained after `head`/`hash` into `round` (nothing is sent yet).
    fn stage(
        writer: &mut Writer,
        round: &mut Round,
        slot: usize,
        req: &AppendRequest,
    ) -> Result<(), LogError> {
        if req.events.len() > MAX_ATOMIC {
            return Err(LogError::Encode(format!(
                "an append of {} events is over JetStream's {MAX_ATOMIC} per atomic batch",
                req.events.len()
            )));
        }
        // Encode every event before staging any, so an encode error stages nothing.
        let mut payloads = Vec::with_capacity(req.events.len());
        let (mut position, mut running) = (round.head, round.hash);
        for event in &req.events {
            position = position.next();
            encode_event_chained(
                &mut writer.scratch,
                &running,
                position,
                req.recorded_at,
                &req.command_id,
                event,
            )?;
            running = chain_hash(&running, position, &writer.scratch);
            payloads.push(Bytes::copy_from_slice(&writer.scratch));
        }
        round.appends.push(Staged {
            slot,
            first: round.head.next(),
            last: position,
            key: req.idempotency_key.clone(),
            command_id: req.command_id.0.clone(),
            payloads,
        });
        round.head = position;
        round.hash = running;
        Ok(())
    }

    /// Publishes a round without awaiting its ack: one message for a lone single-event append,
    /// one atomic batch (ADR-50) for anything more ([`Shared::send`]). Only the first message
    /// is conditional, on the head the round is chained to.
    async fn publish(
        &self,
        writer: &Writer,
        round: &Round,
    ) -> Result<jetstream::context::PublishAckFuture, LogError> {
        let batch = round.messages() > 1;
        let mut messages: Vec<Message> = Vec::with_capacity(round.messages());
        for append in &round.appends {
            for (i, payload) in append.payloads.iter().enumerate() {
                let mut headers = HeaderMap::new();
                if i == 0 {
                    if let Some(key) = &append.key {
                        headers.insert(wire::KEY, key.as_str());
                    }
                    headers.insert(wire::COUNT, append.payloads.len().to_string().as_str());
                }
                if !batch {
                    // The key is the message id, except after an attempt that got no answer:
                    // JetStream silently drops a publish whose id matches one it still holds
                    // as "in process" (seen after a stream leader change: retries unanswered
                    // for over a minute). The key index and the conditional publish keep the
                    // append exactly-once without the server's dedupe.
                    let msg_id = match &append.key {
                        Some(key) if !writer.uncertain.contains(key) => key.clone(),
                        Some(key) => format!("{key}~{}", uuid::Uuid::new_v4().simple()),
                        None => format!("{}~{}", append.command_id, uuid::Uuid::new_v4().simple()),
                    };
                    headers.insert(wire::MSG_ID, msg_id.as_str());
                }
                messages.push((headers, payload.clone()));
            }
        }
        self.send(round.base, messages).await
    }
}

impl Shared {
    /// Keeps the payloads of a round stored as chained, at their positions.
    fn remember(&self, round: &Round) {
        let mut recent = self.recent();
        for append in &round.appends {
            for (position, payload) in (append.first.0..).zip(&append.payloads) {
                recent.bytes += payload.len();
                recent
                    .entries
                    .push_back((Position(position), payload.clone()));
            }
        }
        while recent.entries.len() > RECENT || recent.bytes > RECENT_BYTES {
            match recent.entries.pop_front() {
                Some((_, payload)) => recent.bytes -= payload.len(),
                None => break,
            }
        }
    }

    /// [`EventStore::recent_entries`]: a live append's message is its envelope alone (no
    /// `Caseledger-Envelope-Len` header), so the entry is the payload, as `read_entries` reads
    /// it. Entries handed out, and any before them, are dropped: a replica takes each once.
    fn recent_entries(&self, from: Position, last: Position) -> Option<Vec<VerbatimEntry>> {
        if last < from {
            return Some(Vec::new());
        }
        let mut recent = self.recent();
        let start = recent
            .entries
            .binary_search_by_key(&from, |(p, _)| *p)
            .ok()?;
        let wanted = usize::try_from(last.0 - from.0 + 1).ok()?;
        let mut out = Vec::with_capacity(wanted.min(RECENT));
        for (expected, (position, payload)) in
            (from.0..).zip(recent.entries.range(start..).take(wanted))
        {
            if position.0 != expected {
                // Another writer's entries sit between two of ours.
                return None;
            }
            out.push(VerbatimEntry {
                position: *position,
                envelope: payload.to_vec(),
                raw: None,
            });
        }
        if out.len() != wanted {
            return None;
        }
        let taken: usize = recent
            .entries
            .drain(..start + wanted)
            .map(|(_, payload)| payload.len())
            .sum();
        recent.bytes -= taken;
        Some(out)
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        match self.recent.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Publishes `messages` (headers and payload each) right after `head`: one message, or one
    /// atomic batch for several, the first conditional on `Nats-Expected-Last-Sequence` = `head`
    /// (a round of appends, an import). Returns the ack of the last message, not awaited.
    async fn send(
        &self,
        head: Position,
        messages: Vec<Message>,
    ) -> Result<PublishAckFuture, LogError> {
        let batch = messages.len() > 1;
        let batch_id = uuid::Uuid::new_v4().simple().to_string();
        let last_index = messages.len().saturating_sub(1);
        let mut wait = None;
        for (i, (mut headers, payload)) in messages.into_iter().enumerate() {
            if i == 0 {
                headers.insert(wire::EXPECTED_LAST_SEQUENCE, head.0.to_string().as_str());
            }
            if batch {
                headers.insert(wire::BATCH_ID, batch_id.as_str());
                headers.insert(wire::BATCH_SEQUENCE, (i + 1).to_string().as_str());
            }
            let subject = self.subject.clone();
            if i == last_index {
                if batch {
                    headers.insert(wire::BATCH_COMMIT, "1");
                }
                let message = jetstream::message::PublishMessage::build()
                    .headers(headers)
                    .payload(payload);
                let ack = self
                    .js
                    .send_publish(subject, message)
                    .await
                    .map_err(unavailable)?;
                wait = Some(ack);
            } else {
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(unavailable)?;
            }
        }
        wait.ok_or_else(|| LogError::Encode("nothing to publish".into()))
    }
}

/// What one round publishes: appends chained after `base`, as one message or one atomic batch.
struct Round {
    /// The confirmed head the round is chained to (its only condition).
    base: Position,
    /// The head and chain hash after the appends staged so far.
    head: Position,
    hash: Hash,
    appends: Vec<Staged>,
}

/// One append of a round, encoded.
struct Staged {
    /// Its index in the round's jobs.
    slot: usize,
    first: Position,
    last: Position,
    key: Option<String>,
    command_id: String,
    payloads: Vec<Bytes>,
}

impl Round {
    fn messages(&self) -> usize {
        self.appends.iter().map(|a| a.payloads.len()).sum()
    }
}

async fn commit_loop(
    shared: Arc<Shared>,
    mut writer: Writer,
    mut queue: mpsc::UnboundedReceiver<Queued>,
) {
    // An import queued behind a group of appends, taken off the queue while grouping.
    let mut next: Option<Queued> = None;
    loop {
        let queued = match next.take() {
            Some(queued) => queued,
            None => match queue.recv().await {
                Some(queued) => queued,
                None => return,
            },
        };
        let first = match queued {
            Queued::Append(jobs) => jobs,
            Queued::Verbatim(job) => {
                let result = import(&shared, &mut writer, &job.entries).await;
                let _ = job.answer.send(result);
                continue;
            }
        };
        let mut events: usize = first.iter().map(|j| j.req.events.len().max(1)).sum();
        let mut group = first;
        while events < shared.config.max_batch {
            match queue.try_recv() {
                Ok(Queued::Append(jobs)) => {
                    events += jobs
                        .iter()
                        .map(|j| j.req.events.len().max(1))
                        .sum::<usize>();
                    group.extend(jobs);
                }
                Ok(verbatim) => {
                    next = Some(verbatim);
                    break;
                }
                Err(_) => break,
            }
        }
        commit_group(&shared, &mut writer, group).await;
    }
}

/// Publishes `entries` verbatim right after the writer's head, as one atomic batch, and awaits
/// its ack ([`JetStreamLog::append_verbatim`]). A refused publish (another writer moved the
/// stream) is checked again after a catch-up, where it no longer fits and is refused.
async fn import(
    shared: &Shared,
    writer: &mut Writer,
    entries: &[VerbatimEntry],
) -> Result<AcknowledgedHead, LogError> {
    if entries.len() > MAX_ATOMIC {
        return Err(LogError::Encode(format!(
            "an import of {} entries is over JetStream's {MAX_ATOMIC} per atomic batch",
            entries.len()
        )));
    }
    let max_payload = shared.client.server_info().max_payload;
    let deadline = tokio::time::Instant::now() + shared.config.timeout;
    for round in 0..MAX_ROUNDS {
        if round > 0 {
            if tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(backoff(round)).await;
        }
        if writer.stale {
            shared.catch_up(writer).await?;
        }
        let (messages, last, hash) =
            verbatim_messages(writer.head, writer.hash, entries, max_payload)?;
        if messages.is_empty() {
            return Ok(AcknowledgedHead {
                position: writer.head,
                hash: writer.hash,
            });
        }
        let wait = match shared.send(writer.head, messages).await {
            Ok(wait) => wait,
            Err(e) => {
                // Maybe partly sent (an atomic batch never committed stores nothing).
                writer.stale = true;
                return Err(e);
            }
        };
        match wire::ack(wait).await {
            Ack::Stored {
                seq,
                duplicate: false,
            } if seq == last.0 => {
                writer.head = last;
                writer.hash = hash;
                return Ok(AcknowledgedHead {
                    position: last,
                    hash,
                });
            }
            Ack::Stored { seq, .. } => {
                writer.stale = true;
                return Err(LogError::Unavailable(format!(
                    "import stored at {seq}, expected {last}"
                )));
            }
            Ack::Refused(reason) => {
                tracing::debug!(stream = %shared.stream, %reason, "import refused; catching up");
                writer.stale = true;
            }
            Ack::Unknown(reason) => {
                writer.stale = true;
                return Err(LogError::Unavailable(reason));
            }
        }
    }
    Err(LogError::Unavailable(format!(
        "import still refused after {:?} of catching up with other writers",
        shared.config.timeout
    )))
}

/// What became of one append in a round.
enum Fate {
    Done(Result<AppendOutcome, LogError>),
    /// Its key was first used by append `n` of this round: answer as that one is answered.
    SameKeyAs(usize),
    /// Not stored (refused, or never sent): try again next round.
    Retry,
}

async fn commit_group(shared: &Shared, writer: &mut Writer, mut todo: Vec<Job>) {
    // A chain is queued whole, so it never outlives its group.
    writer.broken.clear();
    let deadline = tokio::time::Instant::now() + shared.config.timeout;
    for round in 0..MAX_ROUNDS {
        if round > 0 {
            if tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(backoff(round)).await;
        }
        // Caught up in this round: the writer knows every message the stream held when the
        // round began, so an expected head beyond its own is not the stream's.
        let fresh = writer.stale;
        if writer.stale {
            if let Err(e) = shared.catch_up(writer).await {
                tracing::warn!(stream = %shared.stream, error = %e, "catch-up failed");
                let reason = e.to_string();
                let corrupt = match e {
                    LogError::Corrupt { position, .. } => Some(position),
                    _ => None,
                };
                for job in todo {
                    let error = match corrupt {
                        Some(position) => LogError::corrupt(position, reason.clone()),
                        None => LogError::Unavailable(reason.clone()),
                    };
                    let _ = job.answer.send(Err(error));
                }
                return;
            }
        }
        let fates = commit_round(shared, writer, &todo, fresh).await;
        let mut retry = Vec::new();
        let resolved: Vec<Option<AppendOutcome>> = fates
            .iter()
            .map(|fate| match fate {
                Fate::Done(Ok(outcome)) => Some(*outcome),
                _ => None,
            })
            .collect();
        for (job, fate) in todo.into_iter().zip(fates) {
            let answer = match fate {
                Fate::Done(result) => Some(result),
                Fate::SameKeyAs(n) => resolved.get(n).copied().flatten().map(|outcome| {
                    Ok(AppendOutcome::AlreadyAppended {
                        first: first_of(&outcome),
                        last: outcome.last(),
                    })
                }),
                Fate::Retry => None,
            };
            match answer {
                Some(result) => {
                    let _ = job.answer.send(result);
                }
                None => retry.push(job),
            }
        }
        if retry.is_empty() {
            return;
        }
        todo = retry;
    }
    for job in todo {
        let _ = job.answer.send(Err(LogError::Unavailable(format!(
            "still refused after {:?} of catching up with other writers",
            shared.config.timeout
        ))));
    }
}

/// A random pause in `0..min(2^round ms, MAX_BACKOFF)`.
fn backoff(round: u32) -> Duration {
    let cap = Duration::from_millis(1u64 << round.min(16)).min(MAX_BACKOFF);
    let cap_us = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX).max(1);
    let random = (uuid::Uuid::new_v4().as_u128() & u128::from(u64::MAX)) as u64;
    Duration::from_micros(random % cap_us)
}

fn first_of(outcome: &AppendOutcome) -> Position {
    match *outcome {
        AppendOutcome::Appended { first, .. } | AppendOutcome::AlreadyAppended { first, .. } => {
            first
        }
    }
}

/// Publishes what it can of `todo` as one round chained after the writer's head (one message,
/// or one atomic batch), awaits its ack and advances the writer over it. `fresh`: the writer
/// caught up with the stream just before this round.
///
/// Never `Nats-Expected-Last-Msg-Id`: with two writers pipelining publishes chained by it from
/// the same head, nats-server 2.15.1 accepted a publish whose expected message id no longer
/// matched when the message was applied; every replica logged "critical write error: last
/// msgid mismatch" and the stream answered no publish again (`tests/jetstream_servers.rs`).
/// One condition per round, on its first message, and an atomic batch for the rest keep a
/// message stored only right after the one whose chain hash it carries.
async fn commit_round(
    shared: &Shared,
    writer: &mut Writer,
    todo: &[Job],
    fresh: bool,
) -> Vec<Fate> {
    let mut fates: Vec<Fate> = Vec::with_capacity(todo.len());
    let mut in_round: HashMap<&str, usize> = HashMap::new();
    let mut round = Round {
        base: writer.head,
        head: writer.head,
        hash: writer.hash,
        appends: Vec::new(),
    };
    let mut sending = true;
    for (i, job) in todo.iter().enumerate() {
        let req = &job.req;
        let fate = 'fate: {
            if !sending {
                break 'fate Fate::Retry;
            }
            if let (Some(chain), Expected::Head(expected)) = (job.chain, req.expected) {
                if writer.broken.contains(&chain) {
                    // Decided on an earlier append of its chain that was not appended.
                    break 'fate Fate::Done(Err(LogError::WrongExpectedPosition {
                        expected,
                        actual: round.head,
                    }));
                }
            }
            if let Some(key) = req.idempotency_key.as_deref() {
                if let Some(&(first, last)) = writer.keys.get(key) {
                    break 'fate Fate::Done(Ok(AppendOutcome::AlreadyAppended { first, last }));
                }
                if let Some(&n) = in_round.get(key) {
                    break 'fate Fate::SameKeyAs(n);
                }
            }
            let head = round.head;
            if let Expected::Head(expected) = req.expected {
                if expected > head && !fresh {
                    // The caller read a later head than this writer knows: another process
                    // appended since this writer last caught up. The writer is behind, not the
                    // caller: catch up and compare again next round (refusing here would refuse
                    // every retry of the caller's decision too, since nothing else makes this
                    // writer catch up).
                    writer.stale = true;
                    sending = false;
                    break 'fate Fate::Retry;
                }
                if expected != head {
                    break 'fate Fate::Done(Err(LogError::WrongExpectedPosition {
                        expected,
                        actual: head,
                    }));
                }
            }
            if req.events.is_empty() {
                break 'fate Fate::Done(Ok(AppendOutcome::Appended {
                    first: head.next(),
                    last: head,
                }));
            }
            // A round is at most one atomic batch: the rest waits for the next round.
            if !round.appends.is_empty() && round.messages() + req.events.len() > MAX_ATOMIC {
                sending = false;
                break 'fate Fate::Retry;
            }
            match Shared::stage(writer, &mut round, i, req) {
                Ok(()) => {
                    if let Some(key) = req.idempotency_key.as_deref() {
                        in_round.insert(key, i);
                    }
                    Fate::Retry
                }
                Err(e) => Fate::Done(Err(e)),
            }
        };
        if let Some(chain) = job.chain {
            if !matches!(
                fate,
                Fate::Retry | Fate::Done(Ok(AppendOutcome::Appended { .. }))
            ) {
                writer.broken.insert(chain);
            }
        }
        fates.push(fate);
    }
    if round.appends.is_empty() {
        return fates;
    }
    let answer = match shared.publish(writer, &round).await {
        Ok(wait) => wire::ack(wait).await,
        // Maybe partly sent: an atomic batch without its commit stores nothing, a lone message
        // may be stored. Catch up before the next round.
        Err(e) => Ack::Unknown(e.to_string()),
    };
    let single_key = match round.appends.as_slice() {
        [only] if only.payloads.len() == 1 => only.key.clone(),
        _ => None,
    };
    match answer {
        Ack::Stored {
            seq,
            duplicate: false,
        } if seq == round.head.0 => {
            // The round's first message was conditional on `base` and the rest is one atomic
            // batch with it: stored right after the writer's head, as chained.
            writer.head = round.head;
            writer.hash = round.hash;
            shared.remember(&round);
            for append in &round.appends {
                if let Some(key) = &append.key {
                    writer.uncertain.remove(key);
                    writer.keys.insert(key.clone(), (append.first, append.last));
                }
                fates[append.slot] = Fate::Done(Ok(AppendOutcome::Appended {
                    first: append.first,
                    last: append.last,
                }));
            }
        }
        Ack::Stored {
            seq,
            duplicate: true,
        } => {
            // A lone message whose key another writer used within the dedupe window; the index
            // will see it.
            writer.stale = true;
            for append in &round.appends {
                let count = append.payloads.len() as u64;
                fates[append.slot] = Fate::Done(Ok(AppendOutcome::AlreadyAppended {
                    first: Position(seq + 1 - count.min(seq)),
                    last: Position(seq),
                }));
            }
        }
        Ack::Stored { seq, .. } => {
            writer.stale = true;
            for append in &round.appends {
                fates[append.slot] = Fate::Done(Err(LogError::Unavailable(format!(
                    "stored at {seq}, expected {}",
                    round.head
                ))));
            }
        }
        Ack::Refused(reason) => {
            tracing::debug!(stream = %shared.stream, %reason, "publish refused; catching up");
            writer.stale = true;
        }
        Ack::Unknown(reason) => {
            writer.stale = true;
            if let Some(key) = single_key {
                writer.uncertain.insert(key);
            }
            for append in &round.appends {
                fates[append.slot] = Fate::Done(Err(LogError::Unavailable(reason.clone())));
            }
        }
    }
    for (job, fate) in todo.iter().zip(&fates) {
        if let Some(chain) = job.chain {
            if matches!(
                fate,
                Fate::Done(Ok(AppendOutcome::AlreadyAppended { .. })) | Fate::Done(Err(_))
            ) {
                writer.broken.insert(chain);
            }
        }
    }
    fates
}

/// Feeds a [`Subscription`]: pages of direct gets, then waits for the next message on the
/// subject (a core subscription, as a wake-up only) or a short poll.
struct Source {
    shared: Arc<Shared>,
    wake: Option<async_nats::Subscriber>,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("stream", &self.shared.stream)
            .finish_non_exhaustive()
    }
}

/// How long a live subscription waits before it asks the stream again without a wake-up.
const POLL: Duration = Duration::from_millis(250);

#[async_trait::async_trait]
impl SubscriptionSource for Source {
    async fn next_page(
        &mut self,
        from: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        loop {
            if self.wake.is_none() {
                // Subscribed before the read, so nothing stored after the read is missed.
                self.wake = self
                    .shared
                    .client
                    .subscribe(self.shared.subject.clone())
                    .await
                    .ok();
            }
            let page = self.shared.read(from, limit).await?;
            if !page.is_empty() {
                return Ok(page);
            }
            match self.wake.as_mut() {
                Some(wake) => {
                    // Published is not yet stored: the poll catches an ack that comes later.
                    let _ = tokio::time::timeout(POLL, wake.next()).await;
                }
                None => tokio::time::sleep(POLL).await,
            }
        }
    }
}
