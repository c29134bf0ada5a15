//! [`SledLog`]: the event log of one project space in one sled tree; opening, writing, reading.
//!
//! Tree `log/<domain>` holds two kinds of keys, so that one `sled::Batch` can write an append's
//! events and its idempotency entry atomically:
//!
//! - `position.to_be_bytes()` (8 bytes) → envelope ([`crate::encode_envelope`]); big-endian so
//!   sled's byte order is position order;
//! - `0xFF 'i' <key bytes>` → `first.to_be_bytes() ++ last.to_be_bytes()` for idempotency keys.
//!
//! Event keys therefore must stay below `0xFF00…`, which caps positions at about 1.8e19.
//! Group commit (the durable half) lives in `commit.rs`.
//!
//! What must hold: positions are gapless from 1; `written_head >= durable_head`; everything at or
//! below `durable_head` has been through a successful `Db::flush` that started after it was
//! written; after a failed write or flush nothing more is written (poisoned); the writer's head
//! hash is always the chain hash of the written head (`chain.rs`).
//!
//! One file past 600 lines: opening, staging (with its chaining), verbatim import and reading
//! all work on the private `Writer` and `Inner` state; the chain's reading side is in `chain.rs`.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use domain::{DomainName, Event, FormRecord, Position, RawBytes, RecordedEvent, Timestamp};
use sled::IVec;
use tokio::sync::watch;

use crate::chain::{chain_hash, Hash, HeadFile, GENESIS};
use crate::commit::CommitQueue;
use crate::envelope::{decode_envelope, decode_header, encode_into};
use crate::raw::{RawFiles, RawRef, RawTail};
use crate::{AppendOutcome, AppendRequest, EventStore, Expected, LogError, Subscription};

/// First byte of every non-event key; event keys sort below it.
pub(crate) const META: u8 = 0xFF;
/// Prefix of idempotency entries.
const IDEMPOTENCY: [u8; 2] = [META, b'i'];
/// The largest position whose key still sorts below [`META`].
const MAX_POSITION: u64 = ((META as u64) << 56) - 1;
/// How many positions at the tail `open` checks for gaps.
const TAIL_CHECK: usize = 64;
/// Events a subscription reads per catch-up step.
pub(crate) const SUBSCRIPTION_PAGE: usize = 256;

/// Group-commit knobs.
///
/// The committer behind [`EventStore::append`] takes queued appends up to `max_batch` events
/// (always at least one append), writes them as one sled batch and flushes once. With
/// `max_delay` zero (the default) it starts at once, so groups form only from appends that arrive
/// while the previous group is being written and flushed. With a non-zero `max_delay` it (and a
/// [`SledLog::wait_durable`] leader) first waits until `max_batch` events are pending or
/// `max_delay` has passed, trading latency for fewer flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Most events one group commit takes from the queue; also the pending count at which a
    /// waiting committer stops waiting.
    pub max_batch: usize,
    /// How long the committer may wait for more events before it writes and flushes.
    pub max_delay: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            max_batch: 1024,
            max_delay: Duration::ZERO,
        }
    }
}

/// The append-only log of one project space on a shared sled `Db`.
///
/// Cheap to clone: clones share one writer, one head and one group commit.
///
/// Durability: [`SledLog::write`] makes an append visible to [`SledLog::iter_from`] and to later
/// writes but not durable. [`EventStore::append`], [`SledLog::wait_durable`] and
/// [`SledLog::flush_blocking`] return only after `sled::Db::flush` succeeded; from then on the
/// append survives a crash of this process. On Linux sled 0.34.7 reaches the disk with
/// `sync_file_range`, not `fsync`, so surviving power loss also needs a disk whose write cache is
/// non-volatile (see `docs/DURABILITY.md`).
#[derive(Clone)]
pub struct SledLog {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) db: sled::Db,
    pub(crate) tree: sled::Tree,
    pub(crate) domain: DomainName,
    pub(crate) config: LogConfig,
    /// Sequencing: held while positions are assigned and the batch is applied.
    writer: Mutex<Writer>,
    /// Last position applied to sled.
    written: AtomicU64,
    /// The written head with its chain hash, updated together with `written`.
    mark: Mutex<(Position, Hash)>,
    /// Where flushes record the acknowledged head (see [`SledLog::pin_head_file`]).
    pub(crate) head_file: Mutex<Option<HeadFile>>,
    /// Last position known flushed.
    pub(crate) durable: AtomicU64,
    /// Notified on every flush and on poisoning; subscriptions wait on it.
    pub(crate) durable_tx: watch::Sender<u64>,
    pub(crate) poisoned: AtomicBool,
    pub(crate) flushes: AtomicU64,
    /// Appends waiting for the committer; shared with it without keeping the `Db` open.
    pub(crate) commit: Arc<CommitQueue>,
    /// Bumped on every enqueue and sync write when `max_delay` is non-zero.
    pub(crate) activity: watch::Sender<()>,
    /// Whoever holds it flushes for the `wait_durable` callers queued behind it.
    pub(crate) leader: tokio::sync::Mutex<()>,
    /// sled's data file, fsynced after every flush when set (see [`SledLog::sync_data_file`]).
    pub(crate) data_file: Mutex<Option<std::fs::File>>,
    /// Where raw submissions are stored out of line, once [`SledLog::store_raw_in`] was called.
    pub(crate) raw: OnceLock<RawFiles>,
}

struct Writer {
    head: Position,
    /// The chain hash of `head`.
    hash: Hash,
    /// Reused encode buffer.
    scratch: Vec<u8>,
    /// Reused list of staged key/value pairs.
    staged: Vec<(IVec, IVec)>,
    /// The raw files' end and staged records, once raw submissions are stored out of line.
    raw: Option<RawTail>,
}

impl fmt::Debug for SledLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledLog")
            .field("domain", &self.inner.domain)
            .field("written", &self.written_head())
            .field("durable", &self.durable_head())
            .field("poisoned", &self.is_poisoned())
            .finish_non_exhaustive()
    }
}

/// Tree `log/<domain>` holds the log of one project space.
const LOG_TREE_PREFIX: &str = "log/";

impl SledLog {
    /// The project spaces that have a log in `db`, sorted; opening none of them.
    pub fn domains(db: &sled::Db) -> Vec<DomainName> {
        let mut found: Vec<DomainName> = db
            .tree_names()
            .iter()
            .filter_map(|name| {
                let name = std::str::from_utf8(name).ok()?;
                name.strip_prefix(LOG_TREE_PREFIX).map(DomainName::new)
            })
            .collect();
        found.sort();
        found
    }

    /// Opens (or creates) the log of `domain` in tree `log/<domain>` of `db`.
    ///
    /// Finds the head from the last event key, checks that position 1 exists, that the last 64
    /// positions have no gap and that the last envelope verifies, then flushes the `Db` so that
    /// what recovery found counts as durable.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] if the tail has a gap or the last event does not verify,
    /// [`LogError::Storage`] if sled fails.
    pub fn open(db: &sled::Db, domain: &DomainName, config: LogConfig) -> Result<Self, LogError> {
        let tree = db.open_tree(format!("{LOG_TREE_PREFIX}{domain}"))?;
        let (head, hash) = recover_head(&tree)?;
        db.flush()?;
        tracing::info!(domain = %domain, head = head.0, "opened event log");
        let (durable_tx, _) = watch::channel(head.0);
        let (activity, _) = watch::channel(());
        Ok(SledLog {
            inner: Arc::new(Inner {
                db: db.clone(),
                tree,
                domain: domain.clone(),
                config,
                writer: Mutex::new(Writer {
                    head,
                    hash,
                    scratch: Vec::with_capacity(4096),
                    staged: Vec::new(),
                    raw: None,
                }),
                written: AtomicU64::new(head.0),
                mark: Mutex::new((head, hash)),
                head_file: Mutex::new(None),
                durable: AtomicU64::new(head.0),
                durable_tx,
                poisoned: AtomicBool::new(false),
                flushes: AtomicU64::new(0),
                commit: Arc::default(),
                activity,
                leader: tokio::sync::Mutex::new(()),
                data_file: Mutex::new(None),
                raw: OnceLock::new(),
            }),
        })
    }

    /// Stores raw submissions out of line from now on, in `dir` ([`crate::raw`]): form events
    /// are written as format-4 envelopes naming their bytes by length and SHA-256, and the
    /// bytes go to `dir/<domain>.dat`, written (and with `sync`, fdatasynced) before the sled
    /// batch of their events. Events read back hold [`domain::RawBytes::Detached`]; use
    /// [`SledLog::raw_bytes`] or [`SledLog::read_at_with_raw`] for the bytes. Opening the files
    /// fits them to the log (see [`crate::raw`]); call it once, before the first write.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] when an event names bytes the files do not hold;
    /// [`LogError::Storage`] on IO errors; [`LogError::Encode`] when called twice.
    pub fn store_raw_in(&self, dir: &std::path::Path, sync: bool) -> Result<(), LogError> {
        let inner = &*self.inner;
        let mut writer = inner.writer.lock().map_err(|_| LogError::Poisoned)?;
        if inner.raw.get().is_some() {
            return Err(LogError::Encode(
                "raw submissions are already stored out of line".into(),
            ));
        }
        let detached = |p: Position| -> Result<bool, LogError> {
            let value = inner
                .tree
                .get(p.to_be_bytes())?
                .ok_or_else(|| LogError::corrupt(p, "missing below the written head"))?;
            Ok(decode_header(&value).map_err(|e| e.at(p))?.raw.is_some())
        };
        let (files, tail) = RawFiles::open(dir, &inner.domain, writer.head, sync, detached)?;
        writer.raw = Some(tail);
        inner
            .raw
            .set(files)
            .map_err(|_| LogError::Encode("raw submissions are already stored out of line".into()))
    }

    /// The raw submission of the form event `event` read at `position`: inline, or from the raw
    /// files, checked against the length and hash the event names.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] naming `position` when the bytes are missing or differ, or the raw
    /// files are not open ([`SledLog::store_raw_in`]) for a detached submission.
    pub fn raw_bytes(&self, position: Position, form: &FormRecord) -> Result<Vec<u8>, LogError> {
        match &form.raw {
            RawBytes::Inline(bytes) => Ok(bytes.clone()),
            RawBytes::Detached { len } => {
                let files = self.inner.raw.get().ok_or_else(|| {
                    LogError::corrupt(
                        position,
                        "its raw submission is stored out of line, but the raw files are not open",
                    )
                })?;
                files.read(
                    position,
                    RawRef {
                        len: *len,
                        hash: form.content_hash,
                    },
                )
            }
        }
    }

    /// [`SledLog::read_at`] with a form's raw submission reattached ([`RawBytes::Inline`]).
    ///
    /// # Errors
    /// As [`SledLog::read_at`] and [`SledLog::raw_bytes`].
    pub fn read_at_with_raw(&self, position: Position) -> Result<Option<RecordedEvent>, LogError> {
        self.read_at(position)?
            .map(|event| self.with_raw(event))
            .transpose()
    }

    /// An event read from this log with its form's raw submission reattached
    /// ([`RawBytes::Inline`]), e.g. to append it to another log.
    ///
    /// # Errors
    /// As [`SledLog::raw_bytes`].
    pub fn with_raw(&self, mut event: RecordedEvent) -> Result<RecordedEvent, LogError> {
        let position = event.position;
        if let Some(form) = event.event.form_record_mut() {
            if form.raw.is_detached() {
                form.raw = RawBytes::Inline(self.raw_bytes(position, form)?);
            }
        }
        Ok(event)
    }

    /// Makes every flush end with `fdatasync` of sled's data file `<dir>/db`, so that an
    /// acknowledged append also survives power loss and kernel crashes, not only a process
    /// crash. `Db::flush` in sled 0.34.7 ends with `sync_file_range` on Linux, which neither
    /// flushes the disk's write cache nor the file's size (spacejam/sled#1452); an `fdatasync`
    /// on any descriptor of the file covers what sled wrote through its own. Costs one real
    /// sync per group commit. Blob files (values over ~128 KiB) are still not synced; see
    /// `docs/DURABILITY.md`.
    ///
    /// # Errors
    /// [`LogError::Storage`] if the file cannot be opened.
    pub fn sync_data_file(&self, db_dir: &std::path::Path) -> Result<(), LogError> {
        let file = std::fs::File::open(db_dir.join("db"))
            .map_err(|e| LogError::Storage(sled::Error::Io(e)))?;
        let mut slot = self
            .inner
            .data_file
            .lock()
            .map_err(|_| LogError::Poisoned)?;
        *slot = Some(file);
        Ok(())
    }

    /// Assigns positions and applies the events and the idempotency entry atomically, as one
    /// `sled::Batch` (a single entry is written with `insert`, which is atomic on its own).
    ///
    /// Not durable when it returns: follow with [`SledLog::wait_durable`] or
    /// [`SledLog::flush_blocking`] before acknowledging. The idempotency check comes first (a
    /// retry of a done append returns [`AppendOutcome::AlreadyAppended`], whatever `expected`
    /// says), then the `expected` check, both under the writer lock.
    ///
    /// # Errors
    /// [`LogError::WrongExpectedPosition`], [`LogError::Encode`] (nothing written);
    /// [`LogError::Storage`] (the log is poisoned from then on); [`LogError::Poisoned`].
    pub fn write(&self, req: AppendRequest) -> Result<AppendOutcome, LogError> {
        let outcome = self
            .write_group(std::iter::once(req))?
            .pop()
            .unwrap_or(Err(LogError::Poisoned));
        self.bump_activity();
        outcome
    }

    /// Writes several appends in order as one `sled::Batch`; one outcome per append, in order.
    ///
    /// Each append is checked as [`SledLog::write`] would check it, against the head left by the
    /// appends before it in the group (so `Expected::Head` chains, and a key used earlier in the
    /// group answers [`AppendOutcome::AlreadyAppended`]), and is staged whole or refused whole.
    /// All staged appends then go to sled in one atomic batch. Use it to write a group of
    /// commands for the price of one batch: sled 0.34.7 charges tens of microseconds per batch
    /// however small. Not durable when it returns, like `write`.
    ///
    /// # Errors
    /// The outer `Err` is [`LogError::Poisoned`]: nothing was tried. Inner errors are per append;
    /// a sled failure turns every staged append into [`LogError::Storage`] and poisons the log.
    pub fn write_group<R: std::borrow::Borrow<AppendRequest>>(
        &self,
        requests: impl IntoIterator<Item = R>,
    ) -> Result<Vec<Result<AppendOutcome, LogError>>, LogError> {
        let inner = &*self.inner;
        self.check_poison()?;
        let mut writer = inner.writer.lock().map_err(|_| LogError::Poisoned)?;
        self.check_poison()?;
        let writer = &mut *writer;
        let mut head = (writer.head, writer.hash);
        let mut keys_in_group = HashMap::new();
        writer.staged.clear();
        let outcomes: Vec<_> = requests
            .into_iter()
            .map(|req| self.stage(writer, &mut head, &mut keys_in_group, req.borrow()))
            .collect();
        let (head, hash) = head;
        // The raw submissions reach their files (synced, when syncing) before their events
        // reach sled: an event in sled always has its bytes on disk.
        if let (Some(tail), Some(files)) = (writer.raw.as_mut(), inner.raw.get()) {
            if let Err(e) = files.write(tail) {
                self.poison("raw submissions", &e);
                writer.staged.clear();
                return Ok(outcomes
                    .into_iter()
                    .map(|o| o.and(Err(LogError::Poisoned)))
                    .collect());
            }
        }
        let applied = match writer.staged.len() {
            0 => Ok(()),
            1 => {
                let (key, value) = writer.staged.swap_remove(0);
                inner.tree.insert(key, value).map(|_| ())
            }
            _ => {
                let mut batch = sled::Batch::default();
                for (key, value) in writer.staged.drain(..) {
                    batch.insert(key, value);
                }
                inner.tree.apply_batch(batch)
            }
        };
        if let Err(e) = applied {
            // sled may have applied part of the batch in memory; we no longer know the head.
            self.poison("apply_batch", &e);
            return Ok(outcomes
                .into_iter()
                .map(|o| o.and(Err(LogError::Storage(e.clone()))))
                .collect());
        }
        if head != writer.head {
            tracing::debug!(
                domain = %inner.domain,
                first = writer.head.next().0,
                last = head.0,
                appends = outcomes.len(),
                "written"
            );
            self.advance(writer, head, hash);
        }
        Ok(outcomes)
    }

    /// Appends stored envelopes verbatim, as one batch (an import of an export): each must be
    /// at the next position, decode, say that position, and, when it stores a previous hash
    /// (formats 3 and 4), store the hash of the entries before it. A format-4 entry comes with
    /// its raw submission, which must have the length and SHA-256 the envelope names and goes
    /// to the raw files ([`SledLog::store_raw_in`] first). Legacy envelopes are taken as they
    /// are and chained by their bytes like any other. Not durable when it returns, like `write`.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] naming the first entry that fails a check (nothing is written);
    /// [`LogError::Storage`] (the log is poisoned from then on); [`LogError::Poisoned`].
    pub fn append_verbatim(
        &self,
        entries: &[VerbatimEntry],
    ) -> Result<crate::AcknowledgedHead, LogError> {
        self.append_copied(entries, false)
    }

    /// [`SledLog::append_verbatim`] for a replica of a log kept elsewhere (an engine over
    /// JetStream): besides the entries, each command's id is recorded as an idempotency key
    /// naming the positions of its events (in the same batch), so that a retried command is
    /// found here as it would be in the log it copies. Consecutive entries of one command are
    /// one append.
    ///
    /// # Errors
    /// As [`SledLog::append_verbatim`].
    pub fn append_replicated(
        &self,
        entries: &[VerbatimEntry],
    ) -> Result<crate::AcknowledgedHead, LogError> {
        self.append_copied(entries, true)
    }

    fn append_copied(
        &self,
        entries: &[VerbatimEntry],
        index_commands: bool,
    ) -> Result<crate::AcknowledgedHead, LogError> {
        let inner = &*self.inner;
        self.check_poison()?;
        let mut writer = inner.writer.lock().map_err(|_| LogError::Poisoned)?;
        let writer = &mut *writer;
        let (mut head, mut hash) = (writer.head, writer.hash);
        let mut batch = sled::Batch::default();
        let raw_mark = writer.raw.as_ref().map(RawTail::mark);
        // The command of the entries just checked, with its first and last position.
        let mut commands: Vec<(String, Position, Position)> = Vec::new();
        let checked = (|| {
            for entry in entries {
                let position = entry.position;
                let envelope = &entry.envelope;
                if position != head.next() {
                    return Err(LogError::corrupt(
                        position,
                        format!("out of order: the log's next position is {}", head.next()),
                    ));
                }
                let header = decode_header(envelope).map_err(|e| e.at(position))?;
                if let Some(prev) = header.prev {
                    if *prev != hash {
                        return Err(LogError::corrupt(
                            position,
                            format!(
                                "hash chain broken: the entry stores previous hash {}, the entries before it hash to {}",
                                crate::chain::to_hex(prev),
                                crate::chain::to_hex(&hash)
                            ),
                        ));
                    }
                }
                let event = decode_envelope(envelope).map_err(|e| e.at(position))?;
                if event.position != position {
                    return Err(LogError::corrupt(
                        position,
                        format!("the envelope says position {}", event.position),
                    ));
                }
                let raw = match (header.raw, &entry.raw) {
                    (Some(named), Some(bytes)) => {
                        if RawRef::of(bytes) != named {
                            return Err(LogError::corrupt(
                                position,
                                "the raw submission differs from the one its envelope names",
                            ));
                        }
                        Some(bytes.as_slice())
                    }
                    (Some(_), None) => {
                        return Err(LogError::corrupt(
                            position,
                            "the envelope names a raw submission stored out of line, and none came with it",
                        ))
                    }
                    (None, Some(_)) => {
                        return Err(LogError::corrupt(
                            position,
                            "a raw submission came with an envelope that holds its own",
                        ))
                    }
                    (None, None) => None,
                };
                match writer.raw.as_mut() {
                    Some(tail) => {
                        tail.stage(position, raw.zip(header.raw.as_ref().map(|r| &r.hash)))
                    }
                    None if raw.is_some() => return Err(LogError::corrupt(
                        position,
                        "its raw submission is stored out of line, but the raw files are not open",
                    )),
                    None => {}
                }
                hash = chain_hash(&hash, position, envelope);
                head = position;
                batch.insert(&position.to_be_bytes()[..], &envelope[..]);
                if index_commands {
                    match commands.last_mut() {
                        Some((id, _, last)) if *id == event.command_id.0 => *last = position,
                        _ => commands.push((event.command_id.0.clone(), position, position)),
                    }
                }
            }
            Ok(())
        })();
        for (id, first, last) in &commands {
            let mut value = [0u8; 16];
            value[..8].copy_from_slice(&first.to_be_bytes());
            value[8..].copy_from_slice(&last.to_be_bytes());
            batch.insert(idempotency_key(id), &value[..]);
        }
        if let Err(e) = checked {
            if let (Some(tail), Some(mark)) = (writer.raw.as_mut(), raw_mark) {
                tail.undo(mark);
            }
            return Err(e);
        }
        if let (Some(tail), Some(files)) = (writer.raw.as_mut(), inner.raw.get()) {
            if let Err(e) = files.write(tail) {
                self.poison("raw submissions", &e);
                return Err(e);
            }
        }
        if let Err(e) = inner.tree.apply_batch(batch) {
            self.poison("apply_batch", &e);
            return Err(e.into());
        }
        self.advance(writer, head, hash);
        Ok(crate::AcknowledgedHead {
            position: head,
            hash,
        })
    }

    /// Moves the written head (and its hash) after a batch was applied, under the writer lock.
    fn advance(&self, writer: &mut Writer, head: Position, hash: Hash) {
        writer.head = head;
        writer.hash = hash;
        match self.inner.mark.lock() {
            Ok(mut mark) => *mark = (head, hash),
            Err(poisoned) => *poisoned.into_inner() = (head, hash),
        }
        self.inner.written.store(head.0, Ordering::Release);
    }

    /// The written head and its chain hash, read together.
    pub fn written_mark(&self) -> (Position, Hash) {
        match self.inner.mark.lock() {
            Ok(mark) => *mark,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// Checks one append and stages its entries, each chained to the one before; leaves nothing
    /// staged (and `head` unchanged) if it fails.
    fn stage(
        &self,
        writer: &mut Writer,
        head: &mut (Position, Hash),
        keys_in_group: &mut HashMap<String, (Position, Position)>,
        req: &AppendRequest,
    ) -> Result<AppendOutcome, LogError> {
        if let Some(key) = &req.idempotency_key {
            let earlier = match keys_in_group.get(key) {
                Some(&positions) => Some(positions),
                None => match self.inner.tree.get(idempotency_key(key))? {
                    Some(value) => Some(decode_idempotency(&value)?),
                    None => None,
                },
            };
            if let Some((first, last)) = earlier {
                tracing::debug!(first = first.0, last = last.0, "idempotent append repeated");
                return Ok(AppendOutcome::AlreadyAppended { first, last });
            }
        }
        if let Expected::Head(expected) = req.expected {
            if expected != head.0 {
                return Err(LogError::WrongExpectedPosition {
                    expected,
                    actual: head.0,
                });
            }
        }
        let count = u64::try_from(req.events.len())
            .map_err(|_| LogError::Encode("too many events".into()))?;
        let first = head.0.next();
        let last = head
            .0
             .0
            .checked_add(count)
            .filter(|last| *last <= MAX_POSITION)
            .map(Position)
            .ok_or_else(|| LogError::Encode("the position space is exhausted".into()))?;
        let mark = writer.staged.len();
        let raw_mark = writer.raw.as_ref().map(RawTail::mark);
        let mut position = first;
        let mut hash = head.1;
        for event in &req.events {
            let encoded = encode_staging_raw(writer, &hash, position, req, event);
            if let Err(e) = encoded {
                writer.staged.truncate(mark);
                if let (Some(tail), Some(raw_mark)) = (writer.raw.as_mut(), raw_mark) {
                    tail.undo(raw_mark);
                }
                return Err(e);
            }
            hash = chain_hash(&hash, position, &writer.scratch);
            writer.staged.push((
                IVec::from(&position.to_be_bytes()[..]),
                IVec::from(&writer.scratch[..]),
            ));
            position = position.next();
        }
        if let Some(key) = &req.idempotency_key {
            let mut value = [0u8; 16];
            value[..8].copy_from_slice(&first.to_be_bytes());
            value[8..].copy_from_slice(&last.to_be_bytes());
            writer
                .staged
                .push((IVec::from(idempotency_key(key)), IVec::from(&value[..])));
            keys_in_group.insert(key.clone(), (first, last));
        }
        *head = (last, hash);
        Ok(AppendOutcome::Appended { first, last })
    }

    pub(crate) fn bump_activity(&self) {
        if !self.inner.config.max_delay.is_zero() {
            self.inner.activity.send_modify(|()| {});
        }
    }

    pub(crate) fn check_poison(&self) -> Result<(), LogError> {
        if self.is_poisoned() {
            Err(LogError::Poisoned)
        } else {
            Ok(())
        }
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.inner.poisoned.load(Ordering::Acquire)
    }

    /// The positions an idempotency key was appended at, if it was (written, maybe not durable).
    /// Lets a caller that decides before it writes answer a retry without deciding again.
    pub fn lookup_idempotency(&self, key: &str) -> Result<Option<(Position, Position)>, LogError> {
        match self.inner.tree.get(idempotency_key(key))? {
            Some(value) => decode_idempotency(&value).map(Some),
            None => Ok(None),
        }
    }

    /// The last position applied to sled (visible to `iter_from`, maybe not durable).
    pub fn written_head(&self) -> Position {
        Position(self.inner.written.load(Ordering::Acquire))
    }

    /// The last position known to be flushed.
    pub fn durable_head(&self) -> Position {
        Position(self.inner.durable.load(Ordering::Acquire))
    }

    /// How many `Db::flush` calls this log has completed (group-commit effectiveness).
    pub fn flush_count(&self) -> u64 {
        self.inner.flushes.load(Ordering::Relaxed)
    }

    /// The project space this log belongs to.
    pub fn domain(&self) -> &DomainName {
        &self.inner.domain
    }

    /// Written events from `from` (0 or 1: the start) to the written head at the time of the
    /// call, verified one by one; a gap or bad envelope yields one `Err` and ends the iteration.
    pub fn iter_from(
        &self,
        from: Position,
    ) -> impl Iterator<Item = Result<RecordedEvent, LogError>> + '_ {
        self.events(from, self.written_head())
    }

    /// The written event at `position`, verified as iteration verifies it; `None` for position 0
    /// or beyond the written head. One point read, for readers that jump around the log
    /// (projection rebuilds, time travel, restore).
    ///
    /// # Errors
    /// [`LogError::Corrupt`] when the event is missing below the head or fails its checks.
    pub fn read_at(&self, position: Position) -> Result<Option<RecordedEvent>, LogError> {
        if position == Position::ZERO || position > self.written_head() {
            return Ok(None);
        }
        let key = position.to_be_bytes();
        let value = self
            .inner
            .tree
            .get(key)?
            .ok_or_else(|| LogError::corrupt(position, "missing below the written head"))?;
        decode_stored(position, &key, &value).map(Some)
    }

    /// Verified events in `from..=to`.
    fn events(&self, from: Position, to: Position) -> Events {
        let from = from.max(Position(1));
        let iter =
            (from <= to).then(|| self.inner.tree.range(from.to_be_bytes()..=to.to_be_bytes()));
        Events {
            iter,
            expect: from.0,
            end: to.0,
            failed: false,
        }
    }

    /// The first written position whose `recorded_at >= t`, by binary search over envelope
    /// headers (O(log n) reads, no body decoding).
    ///
    /// Exact only while `recorded_at` is non-decreasing along the log, which holds when the
    /// caller stamps commands from one monotonic clock under one writer. If it is not, the
    /// answer is *a* position with `recorded_at >= t` whose predecessor is earlier than `t`.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] if a probed event is missing or fails its crc.
    pub fn first_at_or_after(&self, t: Timestamp) -> Result<Option<Position>, LogError> {
        let head = self.written_head().0;
        let (mut lo, mut hi) = (1u64, head.saturating_add(1));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.recorded_at(Position(mid))? >= t {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok((lo <= head).then_some(Position(lo)))
    }

    fn recorded_at(&self, position: Position) -> Result<Timestamp, LogError> {
        let value = self
            .inner
            .tree
            .get(position.to_be_bytes())?
            .ok_or_else(|| LogError::corrupt(position, "missing below the written head"))?;
        let header = decode_header(&value).map_err(|e| e.at(position))?;
        Ok(header.recorded_at)
    }

    /// Durable events from `from`, at most `limit`, read on the blocking pool.
    pub(crate) async fn read_durable(
        &self,
        from: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let log = self.clone();
        let to = self.durable_head();
        let joined = tokio::task::spawn_blocking(move || {
            log.events(from, to)
                .take(limit)
                .collect::<Result<Vec<_>, _>>()
        })
        .await;
        match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(LogError::Shutdown),
        }
    }

    pub(crate) fn watch_durable(&self) -> watch::Receiver<u64> {
        self.inner.durable_tx.subscribe()
    }
}

#[async_trait::async_trait]
impl EventStore for SledLog {
    /// Queues the append for the group committer and returns once it is durable.
    ///
    /// Dropping the returned future does not withdraw a queued append: it may still be written
    /// by the committer. Retry with the same idempotency key to find out.
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome, LogError> {
        self.append_grouped(req).await
    }

    async fn read(&self, from: Position, limit: usize) -> Result<Vec<RecordedEvent>, LogError> {
        self.read_durable(from, limit).await
    }

    async fn head(&self) -> Result<Position, LogError> {
        Ok(self.durable_head())
    }

    async fn read_entries(
        &self,
        from: Position,
        limit: usize,
    ) -> Result<Vec<VerbatimEntry>, LogError> {
        let head = self.durable_head();
        let mut out = Vec::new();
        if limit == 0 || from > head {
            return Ok(out);
        }
        for entry in self.chain_from(from.max(Position(1)))? {
            let entry = entry?;
            if entry.position > head || out.len() >= limit {
                break;
            }
            let event = entry.decode()?;
            let raw = match event.event.form_record() {
                Some(form) if form.raw.is_detached() => Some(self.raw_bytes(entry.position, form)?),
                _ => None,
            };
            out.push(VerbatimEntry {
                position: entry.position,
                envelope: entry.envelope.to_vec(),
                raw,
            });
        }
        Ok(out)
    }

    async fn subscribe(&self, from: Position) -> Result<Subscription, LogError> {
        self.check_poison()?;
        Ok(Subscription::new(self.clone(), from))
    }
}

/// Verified events in a key range; checks gaplessness as it goes.
struct Events {
    iter: Option<sled::Iter>,
    expect: u64,
    end: u64,
    failed: bool,
}

impl Iterator for Events {
    type Item = Result<RecordedEvent, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.expect > self.end {
            return None;
        }
        let position = Position(self.expect);
        let item = match self.iter.as_mut()?.next() {
            None => Err(LogError::corrupt(
                position,
                "missing: the log ends before its head",
            )),
            Some(Err(e)) => Err(e.into()),
            Some(Ok((key, value))) => decode_stored(position, &key, &value),
        };
        match item {
            Ok(_) => self.expect += 1,
            Err(_) => self.failed = true,
        }
        Some(item)
    }
}

/// One stored entry for [`SledLog::append_verbatim`]: its position, its envelope bytes, and the
/// raw submission a format-4 envelope names (`None` for any other).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerbatimEntry {
    /// Position.
    pub position: Position,
    /// The envelope exactly as stored.
    pub envelope: Vec<u8>,
    /// The raw submission stored out of line, for a format-4 envelope.
    pub raw: Option<Vec<u8>>,
}

/// Encodes `event` at `position` into the writer's scratch buffer; when raw submissions are
/// stored out of line, stages the index entry of `position` (and the record of a form's inline
/// bytes) and encodes the event with its bytes detached (format 4).
fn encode_staging_raw(
    writer: &mut Writer,
    prev: &Hash,
    position: Position,
    req: &AppendRequest,
    event: &Event,
) -> Result<(), LogError> {
    if let Some(form) = event.form_record().filter(|f| f.raw.is_detached()) {
        // Its bytes are somewhere else; writing the event would record empty ones.
        return Err(LogError::Encode(format!(
            "form {}: an event is appended with its raw bytes, not a detached reference",
            form.form_id
        )));
    }
    let detached = match writer.raw.as_mut() {
        Some(tail) => stage_raw(tail, position, event)?,
        None => None,
    };
    let (event, raw) = match &detached {
        Some((event, raw)) => (event, Some(raw)),
        None => (event, None),
    };
    encode_into(
        &mut writer.scratch,
        Some(prev),
        raw,
        position,
        req.recorded_at,
        &req.command_id,
        event,
    )
}

/// Stages the index entry of `position`, and the record of a form's inline bytes; for a form,
/// the event to encode instead (its bytes [`RawBytes::Detached`]) and the reference naming them.
fn stage_raw(
    tail: &mut RawTail,
    position: Position,
    event: &Event,
) -> Result<Option<(Event, RawRef)>, LogError> {
    let inline = event
        .form_record()
        .and_then(|f| f.raw.bytes().map(|b| (f, b)));
    let Some((form, bytes)) = inline else {
        tail.stage(position, None);
        return Ok(None);
    };
    if u32::try_from(bytes.len()).is_err() {
        return Err(LogError::Encode(format!(
            "a raw submission of {} bytes is over 4 GiB",
            bytes.len()
        )));
    }
    // The envelope names the bytes by the form's content hash: it must be theirs.
    let raw = RawRef::of(bytes);
    if raw.hash != form.content_hash {
        return Err(LogError::Encode(format!(
            "form {}: its content hash is not the SHA-256 of its raw bytes",
            form.form_id
        )));
    }
    tail.stage(position, Some((bytes, &raw.hash)));
    let mut detached = event.clone();
    if let Some(form) = detached.form_record_mut() {
        form.raw = RawBytes::Detached { len: raw.len };
    }
    Ok(Some((detached, raw)))
}

pub(crate) fn key_position(key: &[u8]) -> Result<Position, LogError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| {
        LogError::corrupt(Position::ZERO, format!("event key {key:?} is not 8 bytes"))
    })?;
    Ok(Position(u64::from_be_bytes(bytes)))
}

fn decode_stored(expect: Position, key: &[u8], value: &[u8]) -> Result<RecordedEvent, LogError> {
    let found = key_position(key).map_err(|e| e.at(expect))?;
    if found != expect {
        return Err(LogError::corrupt(
            expect,
            format!("missing: the next stored event is at {found}"),
        ));
    }
    let event = decode_envelope(value).map_err(|e| e.at(expect))?;
    if event.position != expect {
        return Err(LogError::corrupt(
            expect,
            format!(
                "stored under key {expect} but the envelope says {}",
                event.position
            ),
        ));
    }
    Ok(event)
}

fn idempotency_key(key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(IDEMPOTENCY.len() + key.len());
    out.extend_from_slice(&IDEMPOTENCY);
    out.extend_from_slice(key.as_bytes());
    out
}

fn decode_idempotency(value: &[u8]) -> Result<(Position, Position), LogError> {
    let bad = || LogError::corrupt(Position::ZERO, "idempotency entry is not 16 bytes");
    let (first, last) = value.split_first_chunk::<8>().ok_or_else(bad)?;
    let last: [u8; 8] = last.try_into().map_err(|_| bad())?;
    Ok((
        Position(u64::from_be_bytes(*first)),
        Position(u64::from_be_bytes(last)),
    ))
}

/// Finds the head and its chain hash, and checks the start and the tail of the log.
///
/// The hash comes from the last entry's stored previous hash; only when the last entry is a
/// legacy one (a log last written before format 3) is the whole log hashed.
fn recover_head(tree: &sled::Tree) -> Result<(Position, Hash), LogError> {
    let mut events = tree.range(..[META]);
    let Some(last) = events.next_back().transpose()? else {
        return Ok((Position::ZERO, GENESIS));
    };
    let head = key_position(&last.0)?;
    decode_stored(head, &last.0, &last.1)?;
    for (back, item) in (0u64..).zip(tree.range(..[META]).rev().take(TAIL_CHECK)) {
        let (key, _) = item?;
        let found = key_position(&key)?;
        let expect = Position(head.0.saturating_sub(back));
        if found != expect {
            return Err(LogError::corrupt(
                expect,
                format!("missing: gap at the tail of the log (head {head}, next stored {found})"),
            ));
        }
    }
    let first = tree
        .range(..[META])
        .next()
        .transpose()?
        .map(|(key, _)| key_position(&key))
        .transpose()?;
    if first != Some(Position(1)) {
        return Err(LogError::corrupt(
            Position(1),
            "missing: the log does not start at position 1",
        ));
    }
    let header = decode_header(&last.1).map_err(|e| e.at(head))?;
    let hash = match header.prev {
        Some(prev) => chain_hash(prev, head, &last.1),
        None => {
            tracing::info!(
                head = head.0,
                "last entry is unchained (legacy): hashing the log"
            );
            let mut prev = GENESIS;
            for (expect, item) in (1u64..).zip(tree.range(..[META])) {
                let (key, value) = item?;
                let position = Position(expect);
                if key_position(&key)? != position {
                    return Err(LogError::corrupt(position, "missing: gap in the log"));
                }
                prev = chain_hash(&prev, position, &value);
            }
            prev
        }
    };
    Ok((head, hash))
}
