//! The hash chain over the log, its verification, and the acknowledged-head file.
//!
//! Every position `n` has a chain hash
//!
//! ```text
//! hash(0) = 32 zero bytes (GENESIS)
//! hash(n) = SHA-256( hash(n-1) ‖ n as u64 big-endian ‖ the stored envelope bytes of n )
//! ```
//!
//! where the envelope bytes are the value stored under key `n`, exactly as written: format byte,
//! crc32, header and body (which holds the raw submission). A format-3 envelope stores
//! `hash(n-1)` in its header, so each entry pins everything before it; the head hash is pinned by
//! the acknowledged-head file (below) and, for an auditor, by publishing it.
//!
//! Legacy entries (formats 1 and 2, written before the chain) store no previous hash: the formula
//! still runs through their bytes, so the first format-3 entry after them pins them all, but a
//! change inside a run of legacy entries is reported at that first chained entry (or at the
//! acknowledged head), not at the changed position. [`Verified::unchained`] counts them.
//!
//! The acknowledged-head file (`<data dir>/log-head.<domain>`, [`head_file_name`]) holds the
//! last flushed position and its hash, rewritten in place after every successful flush once
//! [`SledLog::pin_head_file`] was called. sled 0.34.7 truncates its recovery at the first bad
//! checksum in its own log, silently dropping every later write; the file outlives that, so
//! opening (or `verify`) finds a log that ends before the acknowledged head and says so.
//!
//! What must hold: the writer's head hash is always `hash(written head)`; every flush that
//! succeeds leaves the file at a position and hash that the log then had durably.

use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use domain::{DomainName, Position, RecordedEvent};
use sha2::{Digest, Sha256};
use sled::IVec;

use crate::envelope::{decode_envelope, decode_header};
use crate::sled_log::key_position;
use crate::{LogError, SledLog};

/// Entries the reader thread of [`SledLog::verify`] hands over at a time.
const VERIFY_CHUNK: usize = 256;

/// A SHA-256 chain hash.
pub type Hash = [u8; 32];

/// The chain hash of position 0, before the first entry.
pub const GENESIS: Hash = [0; 32];

/// `SHA-256(prev ‖ position as u64 big-endian ‖ envelope)`: the chain hash of `position`.
pub fn chain_hash(prev: &Hash, position: Position, envelope: &[u8]) -> Hash {
    let mut sha = Sha256::new();
    sha.update(prev);
    sha.update(position.0.to_be_bytes());
    sha.update(envelope);
    sha.finalize().into()
}

/// Lower-case hex of a hash.
pub fn to_hex(hash: &Hash) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in hash {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xF)]));
    }
    out
}

/// Parses 64 hex digits (either case) into a hash.
pub fn parse_hex(text: &str) -> Option<Hash> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = GENESIS;
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *slot = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// One stored entry with its place in the chain, its envelope checked (crc32, format, header).
#[derive(Debug, Clone)]
pub struct ChainEntry {
    /// The entry's position (its key).
    pub position: Position,
    /// `hash(position - 1)`.
    pub prev: Hash,
    /// `hash(position)`.
    pub hash: Hash,
    /// Whether the envelope stores `prev` (format 3) rather than being a legacy entry.
    pub chained: bool,
    /// The stored envelope bytes.
    pub envelope: sled::IVec,
}

impl ChainEntry {
    /// Decodes the envelope and checks that it says the position it is stored at.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] naming the position when the body does not decode or disagrees.
    pub fn decode(&self) -> Result<RecordedEvent, LogError> {
        let event = decode_envelope(&self.envelope).map_err(|e| e.at(self.position))?;
        if event.position != self.position {
            return Err(LogError::corrupt(
                self.position,
                format!(
                    "stored under key {} but the envelope says {}",
                    self.position, event.position
                ),
            ));
        }
        Ok(event)
    }
}

/// Entries of a position range in order, each checked against the chain; the first gap, bad
/// envelope or broken link yields one `Err` naming its position and ends the iteration.
pub struct Chain {
    /// `None` once [`SledLog::verify`] has handed it to its reader thread.
    iter: Option<sled::Iter>,
    expect: u64,
    end: u64,
    prev: Hash,
    failed: bool,
    /// The written head and its hash when the range was taken (what `verify` must arrive at).
    head: AcknowledgedHead,
}

impl Chain {
    /// The hash of the last entry returned (or the starting hash before the first).
    pub fn last_hash(&self) -> Hash {
        self.prev
    }

    /// Checks the next item read from the range (`None`: the range ended) and advances.
    fn check(&mut self, item: Option<sled::Result<(IVec, IVec)>>) -> Result<ChainEntry, LogError> {
        let position = Position(self.expect);
        let (key, envelope) = match item {
            None => {
                return Err(LogError::corrupt(
                    position,
                    "missing: the log ends before its head",
                ))
            }
            Some(item) => item?,
        };
        let found = key_position(&key).map_err(|e| e.at(position))?;
        if found != position {
            return Err(LogError::corrupt(
                position,
                format!("missing: the next stored event is at {found}"),
            ));
        }
        let header = decode_header(&envelope).map_err(|e| e.at(position))?;
        if let Some(stored) = header.prev {
            if *stored != self.prev {
                return Err(LogError::corrupt(
                    position,
                    format!(
                        "hash chain broken: the entry stores previous hash {}, the entries before it hash to {}",
                        to_hex(stored),
                        to_hex(&self.prev)
                    ),
                ));
            }
        }
        let hash = chain_hash(&self.prev, position, &envelope);
        self.expect += 1;
        Ok(ChainEntry {
            position,
            prev: std::mem::replace(&mut self.prev, hash),
            hash,
            chained: header.prev.is_some(),
            envelope,
        })
    }
}

impl Iterator for Chain {
    type Item = Result<ChainEntry, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.expect > self.end {
            return None;
        }
        let next = self.iter.as_mut().and_then(Iterator::next);
        let item = self.check(next);
        self.failed = item.is_err();
        Some(item)
    }
}

/// What [`SledLog::verify`] checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The first position checked.
    pub from: Position,
    /// The last position checked: the written head.
    pub head: Position,
    /// `hash(head)`.
    pub head_hash: Hash,
    /// Entries checked.
    pub entries: u64,
    /// Of those, legacy entries that store no previous hash (formats 1 and 2).
    pub unchained: u64,
    /// Bytes hashed: envelopes, and raw submissions stored out of line.
    pub bytes: u64,
}

/// The acknowledged head as recorded in the head file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcknowledgedHead {
    /// The last position a flush made durable.
    pub position: Position,
    /// Its chain hash.
    pub hash: Hash,
}

/// The open head file and the position last written to it.
pub(crate) struct HeadFile {
    file: std::fs::File,
    written: Position,
    /// When the file was last synced.
    synced: std::time::Instant,
}

/// How often a flush that syncs the data file also syncs the head file: after a power loss the
/// file can lag the log by the appends of about this long, and costs one extra sync that often.
pub const HEAD_SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes of one head record: `{position:020} {hash hex}\n`.
const HEAD_RECORD: usize = 20 + 1 + 64 + 1;

/// The file name of a project space's acknowledged head, inside the data directory.
///
/// Letters, digits, `-` and `_` of the domain are kept; any other byte is written `%XX`.
pub fn head_file_name(domain: &DomainName) -> String {
    let mut name = String::from("log-head.");
    for b in domain.as_str().bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name
}

fn head_record(head: AcknowledgedHead) -> String {
    format!("{:020} {}\n", head.position.0, to_hex(&head.hash))
}

/// Reads the acknowledged head of `domain` from data directory `dir`; `None` when there is no
/// head file (a store written before it existed, or one never pinned).
///
/// # Errors
/// [`LogError::Corrupt`] (position 0) when the file does not hold a head record;
/// [`LogError::Storage`] when it cannot be read.
pub fn read_head_file(
    dir: &Path,
    domain: &DomainName,
) -> Result<Option<AcknowledgedHead>, LogError> {
    let path = dir.join(head_file_name(domain));
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::Storage(sled::Error::Io(e))),
    };
    parse_head_record(&text).map(Some).ok_or_else(|| {
        LogError::corrupt(
            Position::ZERO,
            format!("acknowledged-head file {} is damaged", path.display()),
        )
    })
}

fn parse_head_record(bytes: &[u8]) -> Option<AcknowledgedHead> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (position, hash) = text.strip_suffix('\n')?.split_once(' ')?;
    if position.len() != 20 {
        return None;
    }
    Some(AcknowledgedHead {
        position: Position(position.parse().ok()?),
        hash: parse_hex(hash)?,
    })
}

impl SledLog {
    /// The written head and its chain hash, read together.
    pub fn head_hash(&self) -> AcknowledgedHead {
        let (position, hash) = self.written_mark();
        AcknowledgedHead { position, hash }
    }

    /// Chain-checked entries from `from` (0 or 1: the start) to the written head at the time of
    /// the call.
    ///
    /// From position 1 the chain starts at [`GENESIS`]. From a later format-3 entry it starts at
    /// the previous hash that entry stores, which is taken on trust: nothing before `from` is
    /// read. From a later legacy entry, which stores none, the entries before it are hashed
    /// (and checked) first.
    ///
    /// Past the head the range is empty.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] when the entry at `from` (or, for a legacy one, an entry before
    /// it) is missing or damaged, [`LogError::Storage`] if sled fails; later errors come from
    /// the iterator.
    pub fn chain_from(&self, from: Position) -> Result<Chain, LogError> {
        let from = from.max(Position(1));
        let head = self.head_hash();
        let start = if from == Position(1) || from > head.position {
            GENESIS
        } else {
            let envelope = self
                .inner
                .tree
                .get(from.to_be_bytes())?
                .ok_or_else(|| LogError::corrupt(from, "missing below the written head"))?;
            match decode_header(&envelope).map_err(|e| e.at(from))?.prev {
                Some(prev) => *prev,
                None => {
                    let mut before = self.range(Position(1), Position(from.0 - 1), GENESIS, head);
                    for entry in &mut before {
                        entry?;
                    }
                    before.last_hash()
                }
            }
        };
        Ok(self.range(from, head.position, start, head))
    }

    fn range(&self, from: Position, to: Position, prev: Hash, head: AcknowledgedHead) -> Chain {
        let tree = &self.inner.tree;
        let iter = if from <= to {
            tree.range(from.to_be_bytes()..=to.to_be_bytes())
        } else {
            // Empty: sled's `range` panics on a reversed range.
            tree.range(from.to_be_bytes()..from.to_be_bytes())
        };
        Chain {
            iter: Some(iter),
            expect: from.0,
            end: to.0,
            prev,
            failed: false,
            head,
        }
    }

    /// Checks every entry from `from` to the written head: gapless keys, format, crc32, and the
    /// hash chain (each format-3 or 4 entry's stored previous hash against the hash of the
    /// entries before it), and each raw submission stored out of line against the SHA-256 its
    /// envelope names. Bodies are not decoded: the crc32 covers them and the chain covers the
    /// crc. The result's head hash is also compared with the hash the writer holds.
    ///
    /// # Errors
    /// The first problem, as [`LogError::Corrupt`] or [`LogError::UnsupportedEnvelope`] naming
    /// its position; [`LogError::Storage`] if sled fails.
    pub fn verify(&self, from: Position) -> Result<Verified, LogError> {
        let from = from.max(Position(1));
        let mut chain = self.chain_from(from)?;
        let (mut entries, mut unchained, mut bytes) = (0u64, 0u64, 0u64);
        let mut count = |entry: ChainEntry| -> Result<(), LogError> {
            entries += 1;
            unchained += u64::from(!entry.chained);
            bytes += entry.envelope.len() as u64;
            // A raw submission stored out of line is covered by its hash in the envelope: read
            // it and check it hashes to that.
            if let Some(raw) = decode_header(&entry.envelope)?.raw {
                let files = self.inner.raw.get().ok_or_else(|| {
                    LogError::corrupt(
                        entry.position,
                        "its raw submission is stored out of line, but the raw files are not open",
                    )
                })?;
                bytes += files.read(entry.position, raw)?.len() as u64;
            }
            Ok(())
        };
        // sled's tree walk costs about as much as the hashing: one thread reads, this one checks.
        let iter = chain.iter.take();
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<sled::Result<(IVec, IVec)>>>(8);
            scope.spawn(move || {
                let mut chunk = Vec::with_capacity(VERIFY_CHUNK);
                for item in iter.into_iter().flatten() {
                    let failed = item.is_err();
                    chunk.push(item);
                    if chunk.len() == VERIFY_CHUNK || failed {
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(VERIFY_CHUNK));
                        // A send fails when the checker stopped at an error.
                        if tx.send(full).is_err() || failed {
                            return;
                        }
                    }
                }
                let _ = tx.send(chunk);
            });
            for item in rx.iter().flatten() {
                count(chain.check(Some(item))?)?;
            }
            Ok::<_, LogError>(())
        })?;
        if chain.expect <= chain.end {
            count(chain.check(None)?)?;
        }
        let head = chain.head;
        let head_hash = chain.last_hash();
        if entries > 0 && head_hash != head.hash {
            return Err(LogError::corrupt(
                head.position,
                format!(
                    "the log hashes to {} but the writer holds {}: changed under the open log",
                    to_hex(&head_hash),
                    to_hex(&head.hash)
                ),
            ));
        }
        Ok(Verified {
            from,
            head: head.position,
            head_hash: head.hash,
            entries,
            unchained,
            bytes,
        })
    }

    /// `hash(position)` for a position at or below the written head: from the next entry's
    /// stored previous hash when it has one, else by hashing the log from the start.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] when `position` is past the written head or an entry read is bad.
    pub fn hash_at(&self, position: Position) -> Result<Hash, LogError> {
        let head = self.head_hash();
        if position == Position::ZERO {
            return Ok(GENESIS);
        }
        if position == head.position {
            return Ok(head.hash);
        }
        if position > head.position {
            return Err(LogError::corrupt(
                position,
                format!("missing: the log ends at {}", head.position),
            ));
        }
        let next = position.next();
        if let Some(envelope) = self.inner.tree.get(next.to_be_bytes())? {
            if let Some(prev) = decode_header(&envelope).map_err(|e| e.at(next))?.prev {
                return Ok(*prev);
            }
        }
        let mut chain = self.range(Position(1), position, GENESIS, head);
        for entry in &mut chain {
            entry?;
        }
        Ok(chain.last_hash())
    }

    /// Checks an acknowledged head against the log: the log must reach its position, with the
    /// same hash there.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] naming the acknowledged position when the log lost its tail or
    /// hashes differently there.
    pub fn check_acknowledged(&self, acked: AcknowledgedHead) -> Result<(), LogError> {
        let head = self.written_head();
        if acked.position > head {
            return Err(LogError::corrupt(
                acked.position,
                format!(
                    "missing: the log ends at {head} but position {} was acknowledged (lost tail)",
                    acked.position
                ),
            ));
        }
        let hash = self.hash_at(acked.position)?;
        if hash != acked.hash {
            return Err(LogError::corrupt(
                acked.position,
                format!(
                    "the log hashes to {} at the acknowledged head, which recorded {}",
                    to_hex(&hash),
                    to_hex(&acked.hash)
                ),
            ));
        }
        Ok(())
    }

    /// Keeps the acknowledged head in `dir`/[`head_file_name`]: checks the one already there
    /// against the log ([`SledLog::check_acknowledged`]), then rewrites it in place after every
    /// successful flush from now on. The file is created (and synced) if missing; later
    /// rewrites are synced at most every [`HEAD_SYNC_EVERY`], and only when the log syncs its
    /// data file ([`SledLog::sync_data_file`]), so a power loss can leave it behind the log,
    /// never ahead of what was flushed.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] when the recorded head is lost or differs, [`LogError::Storage`]
    /// when the file cannot be read or written.
    pub fn pin_head_file(&self, dir: &Path) -> Result<(), LogError> {
        let io = |e: std::io::Error| LogError::Storage(sled::Error::Io(e));
        if let Some(acked) = read_head_file(dir, &self.inner.domain)? {
            self.check_acknowledged(acked)?;
        }
        let path: PathBuf = dir.join(head_file_name(&self.inner.domain));
        let created = !path.exists();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let head = self.durable_head();
        let mut head_file = HeadFile {
            file: file.try_clone().map_err(io)?,
            written: Position::ZERO,
            synced: std::time::Instant::now(),
        };
        write_head(&mut head_file, self.acknowledged(head)?).map_err(io)?;
        file.set_len(HEAD_RECORD as u64).map_err(io)?;
        if created {
            file.sync_all().map_err(io)?;
            if let Ok(d) = std::fs::File::open(dir) {
                d.sync_all().map_err(io)?;
            }
        }
        let mut slot = self
            .inner
            .head_file
            .lock()
            .map_err(|_| LogError::Poisoned)?;
        *slot = Some(head_file);
        tracing::debug!(path = %path.display(), head = head.0, "acknowledged head pinned");
        Ok(())
    }

    /// The acknowledged head for a durable position.
    fn acknowledged(&self, position: Position) -> Result<AcknowledgedHead, LogError> {
        Ok(AcknowledgedHead {
            position,
            hash: self.hash_at(position)?,
        })
    }

    /// After a successful flush up to `head`: records it in the head file, if one is pinned,
    /// and with `sync` (the log syncs its data file) `fdatasync`s it at most every
    /// [`HEAD_SYNC_EVERY`].
    pub(crate) fn record_acknowledged(
        &self,
        head: AcknowledgedHead,
        sync: bool,
    ) -> std::io::Result<()> {
        let mut slot = self
            .inner
            .head_file
            .lock()
            .map_err(|_| std::io::Error::other("head file lock poisoned"))?;
        let Some(file) = slot.as_mut() else {
            return Ok(());
        };
        write_head(file, head)?;
        if sync && file.synced.elapsed() >= HEAD_SYNC_EVERY {
            file.file.sync_data()?;
            file.synced = std::time::Instant::now();
        }
        Ok(())
    }
}

/// Rewrites the record in place, unless a later head was written already (flushes can race).
fn write_head(file: &mut HeadFile, head: AcknowledgedHead) -> std::io::Result<()> {
    if file.written > Position::ZERO && head.position <= file.written {
        return Ok(());
    }
    let record = head_record(head);
    file.file.seek(std::io::SeekFrom::Start(0))?;
    file.file.write_all(record.as_bytes())?;
    file.written = head.position;
    Ok(())
}
