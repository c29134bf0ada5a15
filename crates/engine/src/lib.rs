//! The command side of caseledger: parse → decide → append → project, in one place.
//!
//! [`Engine`] owns a project space's sled database: the event log ([`eventlog::SledLog`]) and
//! the projections ([`projections::Projections`]) live in the same `sled::Db`, so sled's single
//! internal log orders their writes and a crash can never keep a projection write while losing the
//! log write it was derived from.
//!
//! Write path of one command (or one group of commands, [`Engine::execute_many`]):
//! 1. parse form bytes (outside any lock; CPU only);
//! 2. read the form entries and cases the submissions name (outside the lock,
//!    [`projections::Prefetched`]);
//! 3. take the writer lock; drop what the batches sealed since may have changed; read through
//!    the overlay of the projection batch still being written, or catch the projections up to
//!    the log if a batch failed;
//! 4. `domain::decide` against [`projections::Pending`] (projections plus this group's effects)
//!    and fold each decision into it;
//! 5. write the group's events to the log (one atomic sled batch, not yet durable);
//! 6. seal the projection batch with its checkpoint (one atomic batch, I4), wait for the batch
//!    before it, hand it to the committer thread, release the lock;
//! 7. wait for group-committed durability of the log (I5) and for the batch to be written, then
//!    acknowledge.
//!
//! Queries read projections; they may observe an effect a few microseconds before it is durable,
//! never one that is not in the log.
//!
//! Projections this build cannot read (another layout, or damaged) are rebuilt inside
//! [`Engine::open`]; projections folded by other rules keep answering, and
//! [`Engine::upgrade`] (or [`Engine::upgrade_in_background`]) rebuilds them beside the live
//! generation and swaps the rebuild in ([`UpgradeStatus`]).

mod combine;
mod committer;
mod error;
mod outcome;
mod pipeline;
mod replica;
mod store;
mod upgrade;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests_replica;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use committer::{Committer, Done, Inflight};
use domain::{
    AppId, AttachmentFile, Command, CommandError, CommandId, DomainName, Event, FormId, Position,
    RawBytes, RecordedEvent, Submission, Timestamp,
};
use eventlog::raw::raw_dir;
use eventlog::{AppendOutcome, AppendRequest, Expected, LogConfig, SledLog};
use projections::{
    Damage, Difference, Overlay, Prefetched, ProjectionError, Projections, Touched, RULES_VERSION,
};
use upgrade::Upgrade;

pub use error::EngineError;
pub use outcome::{Outcome, SubmitOutcome, SubmitStatus};
pub use upgrade::UpgradeStatus;

/// How an engine is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Parser limits (size, depth, block count).
    pub limits: casexml::Limits,
    /// Group-commit knobs of the log.
    pub log: LogConfig,
    /// Events per projection batch during catch-up and replay; bounds replay memory.
    pub replay_chunk: usize,
    /// Bytes each sorter of a replay's bulk rebuild holds in memory before it spills a sorted
    /// run to the scratch directory (three sorters at most are filling at once).
    pub replay_sort_budget: usize,
    /// Directory for a replay's sorted runs; `None` = `<store>/replay-scratch` for a store
    /// opened with [`Engine::open`], else a directory under the system temp dir.
    pub scratch_dir: Option<std::path::PathBuf>,
    /// On open, projections that have folded nothing are rebuilt in bulk (as `replay` does) when
    /// the log holds at least this many events, instead of folded in chunks.
    pub bulk_catch_up_from: u64,
    /// sled page cache size in bytes.
    pub cache_capacity: u64,
    /// End every group commit with `fdatasync` of sled's data file, so acknowledgements survive
    /// power loss, not only a process crash (`docs/DURABILITY.md`). On by default.
    pub fsync: bool,
    /// Store raw submissions out of line, beside sled (`eventlog::raw`), so the log holds only
    /// the facts. On by default. Off keeps them inline in new events, for side-by-side
    /// measurements on a fresh store: the bytes of events written with it on cannot be read
    /// then ([`SledLog::raw_bytes`] says so).
    pub raw_out_of_line: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            limits: casexml::Limits::default(),
            log: LogConfig::default(),
            replay_chunk: 1024,
            replay_sort_budget: 16 << 20,
            scratch_dir: None,
            bulk_catch_up_from: 10_000,
            cache_capacity: 64 * 1024 * 1024,
            fsync: true,
            raw_out_of_line: true,
        }
    }
}

/// One command to execute, with its identity and server received time.
#[derive(Debug, Clone)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// The command's id, recorded in every event it produces.
    pub command_id: CommandId,
    /// Server received time; `None` = now.
    pub received_at: Option<Timestamp>,
    /// True when the caller may retry with the same `command_id` (an HTTP client's
    /// idempotency key): the log then records the id as an idempotency key, and a retry is
    /// answered with the first attempt's events instead of being applied twice. A fresh id
    /// nobody can repeat needs no such entry, which saves a sled insert per command.
    pub idempotent: bool,
}

impl Request {
    /// A request with a fresh id, received now.
    pub fn new(command: Command) -> Self {
        Request {
            command,
            command_id: CommandId(uuid::Uuid::new_v4().to_string()),
            received_at: None,
            idempotent: false,
        }
    }

    /// A request the caller identifies, and may retry, with `command_id`.
    pub fn idempotent(command: Command, command_id: CommandId) -> Self {
        Request {
            command,
            command_id,
            received_at: None,
            idempotent: true,
        }
    }
}

/// How long `Engine::open` waits for sled's file lock to be released by a store dropped in the
/// same process.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// A decided command waiting to be written: its slot among the group's results, the append,
/// and its events with the positions the projections were folded with.
type Decided = (usize, AppendRequest, Vec<RecordedEvent>);

/// One result per request of a group, in request order.
pub type Outcomes = Vec<Result<Outcome, EngineError>>;

/// A decided and written group: its outcomes, the last log position to wait durable for, and
/// the projection batch to wait written for.
type Written = (Outcomes, Option<Position>, Option<Arc<Done>>);

/// Figures of a finished replay.
#[derive(Debug, Clone, Copy)]
pub struct ReplayStats {
    /// Events folded.
    pub events: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Where a time-travel query looks (see [`Engine::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// Now: the last folded position.
    Head,
    /// After the event at this position.
    Position(Position),
    /// After the last event received at or before this time.
    Time(Timestamp),
}

/// The caseledger engine for one project space.
pub struct Engine {
    /// First, so that dropping the engine finishes the batch in flight before the store goes.
    committer: Committer,
    db: sled::Db,
    domain: DomainName,
    log: SledLog,
    projections: Projections,
    writer: Mutex<Writer>,
    config: EngineConfig,
    /// Damage found in the projections since open, each rebuilt from the log.
    repaired: Mutex<Vec<Damage>>,
    /// Held by each rebuild (replay, verify, upgrade) from its start to its install or discard:
    /// they share the scratch directory, and a second would only redo the first.
    rebuilding: Mutex<()>,
    /// Concurrent [`Engine::execute`] calls waiting to be decided as a group.
    combiner: combine::Combiner,
    /// What was done about projections of other rules ([`Engine::upgrade_status`]).
    upgrade: Mutex<Upgrade>,
    /// The store directory when opened with [`Engine::open`], where [`Engine::flush`] records
    /// the log head.
    dir: Option<std::path::PathBuf>,
    /// The log of record when this engine is a replica of a log kept elsewhere (`replica`).
    upstream: Option<replica::Upstream>,
}

/// Guarded by the writer lock.
struct Writer {
    /// The last received time handed out, to keep it non-decreasing.
    last: Timestamp,
    /// The projection batch being written, if any (`committer`).
    inflight: Option<Inflight>,
    /// Ids touched by the batches sealed last, oldest first, to validate reads made ahead of
    /// the lock ([`Prefetched::validate`]).
    recent: std::collections::VecDeque<Touched>,
    /// A replica's leader is deciding groups on top of groups still being appended upstream
    /// (`replica.rs`): their projection batches are applied as each lands, so nobody else may
    /// fold the copy meanwhile (it would fold those entries twice).
    leading: bool,
}

impl Writer {
    /// The received time of `request`: its own, or now, never before the last one handed out
    /// (server received time never goes backwards, so a time maps to a log prefix).
    fn received_at(&mut self, request: &Request) -> Timestamp {
        match request.received_at {
            Some(t) => t,
            None => {
                let t = now().max(self.last);
                self.last = t;
                t
            }
        }
    }
}

/// How many sealed batches [`Writer::recent`] remembers; a read made before more batches than
/// this were sealed is dropped and done again under the lock.
const RECENT_BATCHES: usize = 32;

/// The server clock in milliseconds (received times, restore dates).
pub fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp(ms)
}

impl Engine {
    /// Opens (or creates) the store in `dir` for `domain` and catches projections up to the log.
    ///
    /// Projections this build cannot read (damaged, or of another layout) are rebuilt from the
    /// log before it returns ([`Engine::repaired`]). Projections folded by other rules are not:
    /// they answer as soon as it returns, and [`Engine::upgrade_status`] says so.
    pub fn open(
        dir: &Path,
        domain: &DomainName,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let db = Self::open_db(dir, &config)?;
        let mut config = config;
        config
            .scratch_dir
            .get_or_insert_with(|| dir.join("replay-scratch"));
        Self::open_in(db, dir, domain, config)
    }

    /// Opens the engine of `domain` over `db`, the sled database of the store in `dir`
    /// ([`Engine::open_db`]), which the engines of other project spaces may share (a server).
    ///
    /// Does for one project space what [`Engine::open`] does: refuses a log shorter than its
    /// acknowledged head (`DIR/log-head.<domain>`, I10), keeps raw submissions in its own files
    /// under `DIR/raw`, syncs sled's data file on every group commit when `config.fsync`, pins
    /// the head file. Replay scratch defaults to `DIR/replay-scratch/<domain>`, so the rebuilds
    /// of two project spaces never share runs.
    pub fn open_in(
        db: sled::Db,
        dir: &Path,
        domain: &DomainName,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        // Before anything is folded or rebuilt from a log that lost its tail.
        let log = SledLog::open(&db, domain, config.log)?;
        store::check_head(dir, &log)?;
        drop(log);
        let fsync = config.fsync;
        let mut config = config;
        let scratch = config
            .scratch_dir
            .get_or_insert_with(|| dir.join("replay-scratch").join(file_name_of(domain)));
        // Sorted runs of a replay that crashed: scratch derived from the log, never truth (I2).
        if scratch.exists() {
            std::fs::remove_dir_all(&*scratch)
                .map_err(|e| EngineError::Internal(format!("{}: {e}", scratch.display())))?;
        }
        let mut engine = Self::with_db(db, domain, config)?;
        engine.dir = Some(dir.to_path_buf());
        // Raw submissions live beside sled, synced before their events are written (I5).
        if engine.config.raw_out_of_line {
            engine.log.store_raw_in(&raw_dir(dir), fsync)?;
        }
        if fsync {
            engine.log.sync_data_file(dir)?;
        }
        // Refuses a log that lost acknowledged entries (docs/AUDIT.md), then keeps the record.
        engine.log.pin_head_file(dir)?;
        Ok(engine)
    }

    /// Opens only the event log of the store in `dir`, for reading it (`caseledger log`): the
    /// projections are not opened, so nothing derived from the log can keep anyone from it (I10).
    pub fn open_log(
        dir: &Path,
        domain: &DomainName,
        config: &EngineConfig,
    ) -> Result<SledLog, EngineError> {
        let db = Self::open_db(dir, config)?;
        let log = SledLog::open(&db, domain, config.log)?;
        store::check_head(dir, &log)?;
        log.store_raw_in(&raw_dir(dir), config.fsync)?;
        Ok(log)
    }

    /// Opens sled in `dir`: `conf` checked first, damaged files as [`EngineError::DamagedFile`],
    /// and a lock held by a store just dropped in this process waited for. Hand the database to
    /// [`Engine::open_in`] once per project space.
    pub fn open_db(dir: &Path, config: &EngineConfig) -> Result<sled::Db, EngineError> {
        store::check_conf(dir)?;
        let sled_config = sled::Config::new()
            .path(dir)
            .cache_capacity(config.cache_capacity);
        // sled 0.34 writes IO buffers on its own thread pool, and those tasks keep the database
        // file (and its exclusive lock) for a moment after the last `Db` handle is dropped
        // (pagecache/iobuf.rs, `maybe_seal_and_write_iobuf`). Reopening in the same process
        // right after a drop therefore waits briefly for the lock instead of failing; a lock held
        // by another live process still fails after the wait.
        let mut waited = std::time::Duration::ZERO;
        loop {
            match store::open_sled(&sled_config, dir)? {
                Ok(db) => return Ok(db),
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    if waited >= LOCK_WAIT {
                        return Err(EngineError::Locked {
                            dir: dir.to_path_buf(),
                        });
                    }
                    std::thread::sleep(LOCK_POLL);
                    waited += LOCK_POLL;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Builds an engine over an open sled database (shared by several project spaces).
    pub fn with_db(
        db: sled::Db,
        domain: &DomainName,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let log = SledLog::open(&db, domain, config.log)?;
        let projections = Projections::open(&db, domain)?;
        let reader_log = log.clone();
        projections.set_log_reader(std::sync::Arc::new(move |p: Position| {
            reader_log.read_at(p)
        }));
        let committer = Committer::start()
            .map_err(|e| EngineError::Internal(format!("projection writer thread: {e}")))?;
        let engine = Engine {
            committer,
            db,
            domain: domain.clone(),
            log,
            projections,
            writer: Mutex::new(Writer {
                last: Timestamp::EPOCH,
                inflight: None,
                recent: std::collections::VecDeque::new(),
                leading: false,
            }),
            config,
            repaired: Mutex::new(Vec::new()),
            rebuilding: Mutex::new(()),
            combiner: combine::Combiner::default(),
            upgrade: Mutex::new(Upgrade::Idle),
            dir: None,
            upstream: None,
        };
        // Damaged projections never keep anyone from the log (I2): rebuild them, as `replay`
        // does, before answering. The old generation stays active until the new one is
        // installed; nobody can query it meanwhile, since the engine is not returned yet.
        // (`Projections::open` has warned about each finding.)
        let damage: Vec<Damage> = engine
            .projections
            .damage()
            .iter()
            .filter(|d| d.needs_rebuild())
            .cloned()
            .collect();
        if !damage.is_empty() {
            tracing::info!(
                findings = damage.len(),
                "rebuilding the projections from the log before answering"
            );
            engine.replay(&mut |_, _| {})?;
            engine.note_repaired(damage);
        }
        // Projections that have folded nothing over a long log (new store layout, deleted trees):
        // the bulk rebuild is several times faster than folding in chunks.
        let head = engine.log.written_head();
        if engine.projections.checkpoint() == Position::ZERO
            && head.0 >= engine.config.bulk_catch_up_from
        {
            tracing::info!(events = head.0, "projections empty: bulk rebuild on open");
            engine.replay(&mut |_, _| {})?;
        }
        {
            let _guard = engine.lock();
            engine.catch_up()?;
        }
        let stored = engine.projections.active_version().rules;
        if stored != RULES_VERSION {
            tracing::info!(
                stored_rules = stored,
                current_rules = RULES_VERSION,
                "projections folded by other rules answer until an upgrade rebuild replaces them"
            );
        }
        Ok(engine)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        match self.writer.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// What the next group decides against, under the writer lock: the overlay of the batch in
    /// flight while it is being written; otherwise the tree, first caught up to the log if a
    /// batch failed.
    fn overlay(&self, writer: &mut Writer) -> Result<Option<Arc<Overlay>>, EngineError> {
        if let Some(inflight) = &writer.inflight {
            // An overlay that does not reach the log's head (a group failed after writing its
            // events) is settled instead, and the projections caught up from the log.
            let current = inflight.overlay.checkpoint() == self.log.written_head();
            if current && !inflight.done.is_finished() {
                return Ok(Some(Arc::clone(&inflight.overlay)));
            }
            Self::settle(writer);
        }
        self.catch_up()?;
        Ok(None)
    }

    /// Waits for the batch in flight, under the writer lock; true when it was written.
    fn settle(writer: &mut Writer) -> bool {
        match writer.inflight.take() {
            Some(inflight) => inflight.done.wait().is_ok(),
            None => true,
        }
    }

    /// Folds log events the projections have not seen yet (after a crash, or a failed commit).
    fn catch_up(&self) -> Result<(), EngineError> {
        let head = self.log.written_head();
        let from = self.projections.checkpoint();
        if from < head {
            tracing::info!(from = from.0, to = head.0, "projection catch-up");
            let events = self
                .log
                .iter_from(from.next())
                .take_while(move |e| match e {
                    Ok(e) => e.position <= head,
                    Err(_) => true,
                });
            self.projections
                .catch_up(events, self.config.replay_chunk)?;
        }
        Ok(())
    }

    fn note_repaired(&self, damage: impl IntoIterator<Item = Damage>) {
        match self.repaired.lock() {
            Ok(mut r) => r.extend(damage),
            Err(poisoned) => poisoned.into_inner().extend(damage),
        }
    }

    /// What was found wrong with the projections since the engine was opened (on open, or by a
    /// [`Engine::query`]), each rebuilt from the log since. Empty on a sound store.
    pub fn repaired(&self) -> Vec<Damage> {
        match self.repaired.lock() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Runs a query over the projections. If it meets a damaged projection value (it does not
    /// decode, or sled reports corruption), the projections are rebuilt from the log
    /// ([`Engine::replay`]), the damage is noted in [`Engine::repaired`], and the query runs
    /// once more on the rebuilt generation.
    pub fn query<T>(
        &self,
        query: impl Fn(&Projections) -> Result<T, ProjectionError>,
    ) -> Result<T, EngineError> {
        match query(&self.projections) {
            Err(e) if e.is_damage() => {
                tracing::warn!(error = %e, "damaged projection value: rebuilding from the log");
                self.replay(&mut |_, _| {})?;
                self.note_repaired([Damage::Value {
                    reason: e.to_string(),
                }]);
                Ok(query(&self.projections)?)
            }
            other => Ok(other?),
        }
    }

    /// The project space.
    pub fn domain(&self) -> &DomainName {
        &self.domain
    }

    /// The event log.
    pub fn log(&self) -> &SledLog {
        &self.log
    }

    /// The projections (queries).
    pub fn projections(&self) -> &Projections {
        &self.projections
    }

    /// Parser limits in force.
    pub fn limits(&self) -> &casexml::Limits {
        &self.config.limits
    }

    /// Parses submission bytes into a [`Submission`] (no lock; pure CPU).
    pub fn prepare_submission(&self, raw: Vec<u8>, app: Option<AppId>) -> Submission {
        self.prepare_submission_with(raw, app, Vec::new())
    }

    /// Like [`Engine::prepare_submission`], with files sent alongside the form (multipart).
    pub fn prepare_submission_with(
        &self,
        raw: Vec<u8>,
        app: Option<AppId>,
        attachments: Vec<AttachmentFile>,
    ) -> Submission {
        let content_hash = casexml::content_hash(&raw);
        let parsed = casexml::parse(&raw, &self.config.limits).map_err(|e| e.to_string());
        Submission {
            raw,
            content_hash,
            parsed,
            app,
            attachments,
            last_sync_token: None,
        }
    }

    /// Submits one form durably.
    pub async fn submit(
        &self,
        raw: Vec<u8>,
        app: Option<AppId>,
        received_at: Option<Timestamp>,
    ) -> Result<SubmitOutcome, EngineError> {
        let sub = self.prepare_submission(raw, app);
        let mut request = Request::new(Command::SubmitForm(Box::new(sub)));
        request.received_at = received_at;
        let outcome = self.execute(request).await?;
        SubmitOutcome::from_events(&outcome.events)
    }

    /// Re-decides a stored rejected form from its raw bytes, e.g. after its user joined a group
    /// (R56); the new outcome is appended.
    pub async fn reprocess(&self, form: &FormId) -> Result<SubmitOutcome, EngineError> {
        let entry = self
            .projections
            .form(form)?
            .ok_or_else(|| EngineError::Command(CommandError::UnknownForm(form.clone())))?;
        if entry.accepted {
            return Err(EngineError::Command(CommandError::FormState {
                form: form.clone(),
                reason: "is in force; only rejected forms are reprocessed",
            }));
        }
        let stored = self.log.read_at_with_raw(entry.position)?;
        let Some(RecordedEvent {
            event: Event::FormRejectedV1(rejected),
            ..
        }) = stored
        else {
            return Err(EngineError::Internal(format!(
                "form {form}: position {} does not hold its rejection",
                entry.position
            )));
        };
        let raw = match rejected.form.raw {
            RawBytes::Inline(bytes) => bytes,
            RawBytes::Detached { .. } => {
                return Err(EngineError::Internal(format!(
                    "form {form}: its raw submission was not read back"
                )))
            }
        };
        let sub = self.prepare_submission(raw, rejected.form.app_id);
        let outcome = self
            .execute(Request::new(Command::SubmitForm(Box::new(sub))))
            .await?;
        SubmitOutcome::from_events(&outcome.events)
    }

    /// Executes a group of commands in order: decided one after the other (each sees the effects
    /// of the ones before), appended, projected in one batch, and acknowledged after one shared
    /// flush and the projection batch's write. Each command succeeds or fails on its own; a
    /// failed command appends nothing.
    pub async fn execute_many(&self, requests: Vec<Request>) -> Result<Outcomes, EngineError> {
        if let Some(up) = &self.upstream {
            // Under the lead, so that no streak of groups is in flight meanwhile.
            let _lead = self.combiner.lead.lock().await;
            return self.execute_replicated(up, &requests).await;
        }
        let (results, last, written) = self.begin(&requests)?;
        self.finish(last, written).await?;
        Ok(results)
    }

    /// The first half of [`Engine::execute_many`]: decides the requests and writes their events
    /// and projections (not yet durable), rebuilding damaged projections first if it meets
    /// them before anything was appended.
    fn begin(&self, requests: &[Request]) -> Result<Written, EngineError> {
        // Reading ahead and deciding block on sled and on the writer lock: on a multi-thread
        // runtime, hand this worker's other tasks to another worker meanwhile.
        let run = || {
            blocking(|| {
                let prefetched = self.prefetch(requests)?;
                self.decide_and_write(requests, prefetched)
            })
        };
        let before = self.log.written_head();
        let written = match run() {
            // A damaged projection met before anything was appended: rebuild from the log and
            // decide again, as if the projections had been sound.
            Err(EngineError::Projection(e))
                if e.is_damage() && self.log.written_head() == before =>
            {
                tracing::warn!(error = %e, "damaged projection value: rebuilding from the log");
                blocking(|| self.replay(&mut |_, _| {}))?;
                self.note_repaired([Damage::Value {
                    reason: e.to_string(),
                }]);
                run()?
            }
            other => other?,
        };
        Ok(written)
    }

    /// The second half of [`Engine::execute_many`]: waits until the log is durable up to
    /// `last` and the projection batch `written` is written. Owns what it waits on, so it can
    /// run on a task of its own.
    fn finish(
        &self,
        last: Option<Position>,
        written: Option<Arc<Done>>,
    ) -> impl std::future::Future<Output = Result<(), EngineError>> + Send + 'static {
        let log = self.log.clone();
        async move {
            if let Some(last) = last {
                log.wait_durable(last).await?;
            }
            // Acknowledge only what readers can see, so that a client reads its own writes.
            if let Some(written) = written {
                written.done().await.map_err(|e| {
                    EngineError::Internal(format!(
                        "projection write failed ({e}); the log holds the events and the next \
                         command catches the projections up"
                    ))
                })?;
            }
            Ok(())
        }
    }

    /// Reads what deciding the submissions among `requests` will read (their form entries and
    /// the cases their blocks name), before the writer lock; see [`Prefetched`].
    fn prefetch(&self, requests: &[Request]) -> Result<Option<Prefetched>, EngineError> {
        let forms: Vec<&domain::ParsedForm> = requests
            .iter()
            .filter_map(|r| match &r.command {
                Command::SubmitForm(sub) => sub.parsed.as_ref().ok(),
                _ => None,
            })
            .collect();
        if forms.is_empty() {
            return Ok(None);
        }
        let cases = forms
            .iter()
            .flat_map(|f| f.blocks.iter().map(|b| &b.case_id));
        let ids = forms.iter().map(|f| &f.instance_id);
        Ok(Some(self.projections.prefetch(cases, ids)?))
    }

    fn decide_and_write(
        &self,
        requests: &[Request],
        prefetched: Option<Prefetched>,
    ) -> Result<Written, EngineError> {
        let mut clock = self.lock();
        let overlay = self.overlay(&mut clock)?;
        let prefetched = prefetched.map(|mut p| {
            let latest = overlay
                .as_ref()
                .map_or_else(|| self.projections.checkpoint(), |o| o.checkpoint());
            p.validate(self.projections.generation_id(), latest, &clock.recent);
            p
        });
        let mut pending = self.projections.pending_over(overlay, prefetched);
        let start = pending.checkpoint();
        let mut results: Vec<Option<Result<Outcome, EngineError>>> =
            Vec::with_capacity(requests.len());
        // Decided appends, written together below as one sled batch: sled 0.34.7 charges two IO
        // buffer rolls per batch and can deadlock under a stream of small batches
        // (spacejam/sled#1412), so a group costs one batch however many commands it holds.
        let mut appends: Vec<Decided> = Vec::new();
        let mut keys: HashMap<String, usize> = HashMap::new();
        let mut head = self.log.written_head();
        let mut last = None;
        for request in requests {
            let slot = results.len();
            let key = request.idempotent.then(|| request.command_id.0.clone());
            // A retry (same command id) is answered with what the first attempt recorded.
            let done_before = match &key {
                Some(k) => self.log.lookup_idempotency(k)?,
                None => None,
            };
            if let Some((first, end)) = done_before {
                results.push(Some(Ok(self.events_between(first, end)?)));
                // The first attempt may not be durable yet: wait for it too.
                last_max(&mut last, Some(end));
                continue;
            }
            if let Some(&earlier) = key.as_ref().and_then(|k| keys.get(k)) {
                let again = match results.get(earlier) {
                    Some(Some(Ok(o))) => o.events.clone(),
                    _ => appends
                        .iter()
                        .find(|(s, _, _)| *s == earlier)
                        .map(|(_, _, recorded)| recorded.clone())
                        .unwrap_or_default(),
                };
                results.push(Some(Ok(Outcome { events: again })));
                continue;
            }
            let received_at = clock.received_at(request);
            let events = match domain::decide(&pending, &request.command, received_at) {
                Ok(events) => events,
                Err(e) => {
                    results.push(Some(Err(EngineError::Command(e))));
                    continue;
                }
            };
            if let Some(e) = pending.take_error() {
                // A read through the projections failed; nothing decided on it may be appended.
                return Err(EngineError::Projection(e));
            }
            if events.is_empty() {
                results.push(Some(Ok(Outcome { events: Vec::new() })));
                continue;
            }
            // Positions are assigned in order under the writer lock, so they are known now and
            // the next command of the group can be decided against this one's effects.
            let recorded = recorded_after(head, request, received_at, &events);
            // Rebuilding cases (R54, R57) reads the case's forms back from the log, this one
            // included: write what is decided so far before folding such an event.
            let rebuilds = events.iter().any(rebuilds_cases);
            let append = AppendRequest {
                expected: Expected::Head(head),
                idempotency_key: key.clone(),
                command_id: request.command_id.clone(),
                recorded_at: received_at,
                events,
            };
            head = recorded.last().map_or(head, |e| e.position);
            if let Some(k) = key {
                keys.insert(k, slot);
            }
            results.push(None);
            if rebuilds {
                appends.push((slot, append, recorded.clone()));
                self.write_appends(&mut appends, &mut results, &mut last)?;
                for ev in &recorded {
                    pending.apply(ev)?;
                }
            } else {
                for ev in &recorded {
                    pending.apply(ev)?;
                }
                appends.push((slot, append, recorded));
            }
        }
        self.write_appends(&mut appends, &mut results, &mut last)?;
        let results = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(EngineError::Internal("no outcome".into()))))
            .collect();
        if pending.checkpoint() == start {
            return Ok((results, last, None));
        }
        let (sealed, overlay) = pending.seal()?;
        // Batches are written in order: this one goes after the one in flight is done.
        if !Self::settle(&mut clock) {
            // That batch failed, and this one was folded on top of it: drop it and fold both
            // from the log instead.
            drop(sealed);
            self.catch_up()?;
            return Ok((results, last, None));
        }
        let done = self.committer.submit(sealed);
        if clock.recent.len() >= RECENT_BATCHES {
            clock.recent.pop_front();
        }
        clock.recent.push_back(overlay.touched());
        clock.inflight = Some(Inflight {
            overlay: Arc::new(overlay),
            done: Arc::clone(&done),
        });
        Ok((results, last, Some(done)))
    }

    /// The events at `first..=last` as the log holds them (what a retried command is answered).
    fn events_between(&self, first: Position, last: Position) -> Result<Outcome, EngineError> {
        let events: Result<Vec<RecordedEvent>, _> = self
            .log
            .iter_from(first)
            .take_while(|e| e.as_ref().map_or(true, |e| e.position <= last))
            .collect();
        Ok(Outcome { events: events? })
    }

    /// Writes decided appends as one sled batch and files each outcome in its request's slot.
    fn write_appends(
        &self,
        appends: &mut Vec<Decided>,
        results: &mut [Option<Result<Outcome, EngineError>>],
        last: &mut Option<Position>,
    ) -> Result<(), EngineError> {
        if appends.is_empty() {
            return Ok(());
        }
        let outcomes = self.log.write_group(appends.iter().map(|(_, a, _)| a))?;
        for ((slot, append, recorded), outcome) in appends.drain(..).zip(outcomes) {
            let (first, end) = match outcome? {
                AppendOutcome::Appended { first, last } => (first, last),
                other => {
                    // The projections were folded with other positions: leave them
                    // uncommitted; the next command catches them up from the log.
                    return Err(EngineError::Internal(format!(
                        "log answered {other:?} for a new command"
                    )));
                }
            };
            if recorded.first().map(|e| e.position) != Some(first) {
                return Err(EngineError::Internal(format!(
                    "log wrote from {first}, projections folded from {:?}",
                    recorded.first().map(|e| e.position)
                )));
            }
            debug_assert_eq!(append.events.len() as u64, end.0 + 1 - first.0);
            last_max(last, Some(end));
            if let Some(r) = results.get_mut(slot) {
                *r = Some(Ok(Outcome { events: recorded }));
            }
        }
        Ok(())
    }

    /// Rebuilds every projection from position 1 into a fresh generation and swaps it in. Queries
    /// keep answering from the old generation until the swap, and writers fold into it until
    /// the rebuild's last catch-up. `progress(done, head)` is called after each chunk.
    pub fn replay(
        &self,
        progress: &mut dyn FnMut(Position, Position),
    ) -> Result<ReplayStats, EngineError> {
        let _rebuilding = self.rebuilding();
        self.replay_rebuilding(progress)
    }

    /// [`Engine::replay`], for a caller that holds [`Engine::rebuilding`].
    fn replay_rebuilding(
        &self,
        progress: &mut dyn FnMut(Position, Position),
    ) -> Result<ReplayStats, EngineError> {
        let started = Instant::now();
        let (rebuild, _writer) = self.rebuild(progress)?;
        let events = rebuild.checkpoint().0;
        rebuild.install()?;
        Ok(ReplayStats {
            events,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn rebuilding(&self) -> std::sync::MutexGuard<'_, ()> {
        match self.rebuilding.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Rebuilds every projection beside the live ones, exactly as [`Engine::replay`] does, and
    /// compares the two key by key (cases, owner and reverse indexes, forms, diagnostics,
    /// tombstones, directory, checkpoint). Returns every key where they differ (empty when the
    /// live projections are what the log says, I3) and drops the rebuild: nothing is swapped.
    /// Live projections folded by other rules ([`Engine::upgrade_status`]) differ wherever the
    /// rules do.
    pub fn verify(
        &self,
        progress: &mut dyn FnMut(Position, Position),
    ) -> Result<Vec<Difference>, EngineError> {
        let _rebuilding = self.rebuilding();
        let (rebuild, writer) = self.rebuild(progress)?;
        // A live generation behind the log (a failed batch) is caught up first, as the next
        // command would; then both are at the log's head, and the lock keeps writers out.
        let compared = self.catch_up().and_then(|()| Ok(rebuild.compare()?));
        drop(writer);
        let discarded = rebuild.discard();
        let differences = compared?;
        discarded?;
        for d in &differences {
            tracing::warn!(difference = %d, "live projections differ from a rebuild");
        }
        Ok(differences)
    }

    /// Builds a fresh generation from the log up to its head and returns it, not installed,
    /// with the writer lock held and the live generation's batch in flight written. A rebuild
    /// that fails is dropped. The caller holds [`Engine::rebuilding`].
    fn rebuild(
        &self,
        progress: &mut dyn FnMut(Position, Position),
    ) -> Result<(projections::Rebuild<'_>, std::sync::MutexGuard<'_, Writer>), EngineError> {
        let mut rebuild = self.projections.begin_rebuild()?;
        match self.fill(&mut rebuild, progress) {
            Ok(writer) => Ok((rebuild, writer)),
            Err(e) => {
                // Nothing reads the tree; a tree that cannot be dropped now is reclaimed by the
                // next open.
                if let Err(d) = rebuild.discard() {
                    tracing::warn!(error = %d, "failed rebuild not reclaimed");
                }
                Err(e)
            }
        }
    }

    /// Folds the log into `rebuild` up to the head: in bulk, then what was appended meanwhile
    /// without the writer lock, then the rest under it, which it returns held.
    fn fill(
        &self,
        rebuild: &mut projections::Rebuild<'_>,
        progress: &mut dyn FnMut(Position, Position),
    ) -> Result<std::sync::MutexGuard<'_, Writer>, EngineError> {
        let head = self.log.written_head();
        let chunk = self.config.replay_chunk;
        let upto = |head: Position| {
            move |e: &Result<RecordedEvent, eventlog::LogError>| {
                e.as_ref().map_or(true, |e| e.position <= head)
            }
        };
        let scratch = match &self.config.scratch_dir {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join(format!(
                "caseledger-replay-{}-{}",
                std::process::id(),
                now().0
            )),
        };
        let loaded = rebuild.bulk_load(
            self.log.iter_from(Position(1)).take_while(upto(head)),
            &scratch,
            self.config.replay_sort_budget,
            &mut |p| progress(p, head),
        );
        // The runs are gone with their sorters; the directory itself is ours to remove.
        let _ = std::fs::remove_dir_all(&scratch);
        let stats = loaded?;
        tracing::info!(
            events = stats.events,
            cases = stats.cases,
            forms = stats.forms,
            runs = stats.runs,
            "bulk rebuild"
        );
        // What was appended during a long bulk load is folded before writers are kept out, so
        // that they wait only for what is appended during this pass.
        let head = self.log.written_head();
        rebuild.feed(
            self.log
                .iter_from(rebuild.checkpoint().next())
                .take_while(upto(head)),
            chunk,
            &mut |p| progress(p, head),
        )?;
        let mut writer = self.lock();
        // The old generation's last batch must land before that generation is reclaimed (or
        // compared).
        Self::settle(&mut writer);
        writer.recent.clear();
        let head = self.log.written_head();
        let from = rebuild.checkpoint().next();
        rebuild.feed(
            self.log.iter_from(from).take_while(upto(head)),
            chunk,
            &mut |p| progress(p, head),
        )?;
        Ok(writer)
    }

    /// The log position a time-travel query looks at: the head, a position (at most the head),
    /// or the last position received at or before a time (server received time, which the
    /// engine keeps non-decreasing, so a time maps to a prefix of the log).
    ///
    /// # Errors
    /// [`EngineError::OutOfRange`] for a position beyond the head (or 0), or a time before the
    /// first event.
    pub fn resolve(&self, at: AsOf) -> Result<Position, EngineError> {
        let head = self.projections.checkpoint();
        match at {
            AsOf::Head => Ok(head),
            AsOf::Position(p) if p.0 == 0 || p > head => Err(EngineError::OutOfRange(format!(
                "position {p} is not in the log: it holds positions 1 to {head}"
            ))),
            AsOf::Position(p) => Ok(p),
            AsOf::Time(t) => {
                let after = self
                    .log
                    .first_at_or_after(Timestamp(t.0.saturating_add(1)))?
                    .unwrap_or(head.next());
                let p = Position(after.0.saturating_sub(1)).min(head);
                if p.0 == 0 {
                    return Err(EngineError::OutOfRange(format!(
                        "{t} is before the first event of the log"
                    )));
                }
                Ok(p)
            }
        }
    }

    /// Flushes sled (projections included); used before a clean exit.
    pub fn flush(&self) -> Result<(), EngineError> {
        Self::settle(&mut self.lock());
        self.db.flush()?;
        Ok(())
    }
}

/// Runs `f`, which blocks, without stalling the tasks queued on this runtime worker when the
/// runtime has several workers (`block_in_place`); elsewhere it simply runs `f`.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// `domain` as one file name: ASCII letters, digits, `-` and `_` kept, other bytes `%XX`.
fn file_name_of(domain: &DomainName) -> String {
    domain.as_str().bytes().fold(String::new(), |mut name, b| {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
        name
    })
}

/// `events` of `request`, received at `received_at`, at the positions after `head`.
fn recorded_after(
    head: Position,
    request: &Request,
    received_at: Timestamp,
    events: &[Event],
) -> Vec<RecordedEvent> {
    events
        .iter()
        .cloned()
        .zip(head.0 + 1..)
        .map(|(event, p)| RecordedEvent {
            position: Position(p),
            recorded_at: received_at,
            command_id: request.command_id.clone(),
            event,
        })
        .collect()
}

/// Whether folding `event` rebuilds cases from their forms, which it reads back from the log
/// (R54, R57): an edit, an archive, an unarchive.
fn rebuilds_cases(event: &Event) -> bool {
    matches!(
        event,
        Event::FormEditedV1(_) | Event::FormArchivedV1(_) | Event::FormUnarchivedV1(_)
    )
}

fn last_max(acc: &mut Option<Position>, p: Option<Position>) {
    if let Some(p) = p {
        *acc = Some(acc.map_or(p, |a| a.max(p)));
    }
}
