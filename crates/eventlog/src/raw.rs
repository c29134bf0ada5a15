//! Raw submissions out of line: the verbatim bytes of each form, in two append-only files beside
//! sled, so that the log's events carry only the facts (and the bytes' SHA-256).
//!
//! A CommCare form's XML is most of its event (1.3 KB of a 1.1 KB compressed envelope in the
//! replay bench), and sled 0.34.7 pays for every byte any of its trees holds: at open (it reads
//! its whole page table), in its cache, and in every rewrite of a page. Replay, time travel and
//! the live fold never read the bytes; only export, `verify` and reprocessing do.
//!
//! # Files (`<data dir>/raw/<domain>.dat` and `.idx`)
//!
//! - `.dat`: records in position order, `[position u64 LE][len u32 LE][SHA-256, 32 bytes][bytes]`.
//! - `.idx`: one u64 LE per log position `p` at offset `8 × (p − 1)`: the offset of `p`'s record
//!   in `.dat` plus one, or 0 when the event at `p` carries no raw submission.
//!
//! An envelope of format 4 names its record by length and SHA-256 (content-addressed: the bytes
//! are whatever hashes to that, wherever they lie), so the chain covers the bytes through their
//! hash and a store moved by export and import hashes to the same head.
//!
//! # What must hold
//!
//! - A raw record is written, and synced when the log syncs, *before* the sled batch holding its
//!   event is applied ([`crate::SledLog::write_group`]): an event in sled always has its bytes on
//!   disk, whatever sled flushes on its own. Records past the log's head are what a crash left
//!   of appends never acknowledged; opening cuts them off.
//! - The index is derived from the records (each says its position): it is synced with them,
//!   and opening still checks its tail and rebuilds what it lost from the records. Once open it
//!   has exactly one entry per log position; entries are checked on every read (the record must say the same position, length
//!   and hash, and the bytes must hash to it), so a damaged file gives a clear error naming the
//!   position, never other bytes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use domain::{DomainName, Position};
use sha2::{Digest, Sha256};

use crate::chain::Hash;
use crate::LogError;

/// Bytes of a record's header: position, length, SHA-256.
const RECORD_HEADER: u64 = 8 + 4 + 32;

/// Bytes of one index entry.
const ENTRY: u64 = 8;

/// The length and SHA-256 an envelope of format 4 names its raw submission by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRef {
    /// Length in bytes.
    pub len: u64,
    /// SHA-256 of the bytes (the form's `content_hash`).
    pub hash: Hash,
}

impl RawRef {
    /// The length and SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> RawRef {
        RawRef {
            len: bytes.len() as u64,
            hash: Sha256::digest(bytes).into(),
        }
    }
}

/// The directory of the raw files inside a data directory.
pub fn raw_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("raw")
}

/// The raw files of one project space, open for reading and appending.
pub(crate) struct RawFiles {
    data: File,
    index: File,
    data_path: PathBuf,
    index_path: PathBuf,
    /// fdatasync both files before the sled batch of their events is applied.
    sync: bool,
}

/// The writer's end of the raw files: where the next record and entry go, and what is staged
/// for the group being written. Lives in the log's writer, under its lock.
#[derive(Debug, Default)]
pub(crate) struct RawTail {
    /// Length of `.dat` as written.
    data_len: u64,
    /// Entries in `.idx` as written: the log's written head.
    entries: u64,
    staged_data: Vec<u8>,
    staged_index: Vec<u8>,
}

/// Where staging stood, to undo an append that failed half-staged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawMark {
    data: usize,
    index: usize,
}

impl RawTail {
    /// Stages the index entry of the next position, and its record when it has bytes.
    /// `record` is the bytes and their SHA-256, checked by the caller.
    pub(crate) fn stage(&mut self, position: Position, record: Option<(&[u8], &Hash)>) {
        let entry = match record {
            Some((bytes, hash)) => {
                let offset = self.data_len + self.staged_data.len() as u64;
                self.staged_data
                    .extend_from_slice(&position.0.to_le_bytes());
                // Forms are capped far below 4 GiB (casexml::Limits); the log refuses larger.
                self.staged_data
                    .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                self.staged_data.extend_from_slice(hash);
                self.staged_data.extend_from_slice(bytes);
                offset + 1
            }
            None => 0,
        };
        self.staged_index.extend_from_slice(&entry.to_le_bytes());
    }

    pub(crate) fn mark(&self) -> RawMark {
        RawMark {
            data: self.staged_data.len(),
            index: self.staged_index.len(),
        }
    }

    pub(crate) fn undo(&mut self, mark: RawMark) {
        self.staged_data.truncate(mark.data);
        self.staged_index.truncate(mark.index);
    }

    pub(crate) fn clear(&mut self) {
        self.staged_data.clear();
        self.staged_index.clear();
    }
}

fn io_error(path: &Path, e: io::Error) -> LogError {
    LogError::Storage(sled::Error::Io(io::Error::new(
        e.kind(),
        format!("{}: {e}", path.display()),
    )))
}

impl RawFiles {
    /// Opens (creating) the raw files of `domain` under `dir` and fits them to a log whose head
    /// is `head`: records and entries past it are cut off (appends a crash left unacknowledged);
    /// missing entries of positions that carry no raw submission are filled in. `detached(p)`
    /// says whether the envelope at `p` names a raw record.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] when an event at or below `head` names a record the files do not
    /// hold (the files were cut short or replaced); [`LogError::Storage`] on IO errors.
    pub(crate) fn open(
        dir: &Path,
        domain: &DomainName,
        head: Position,
        sync: bool,
        detached: impl Fn(Position) -> Result<bool, LogError>,
    ) -> Result<(RawFiles, RawTail), LogError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let data_path = dir.join(format!("{}.dat", domain.as_str()));
        let index_path = dir.join(format!("{}.idx", domain.as_str()));
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| io_error(path, e))
        };
        let files = RawFiles {
            data: open(&data_path)?,
            index: open(&index_path)?,
            data_path,
            index_path,
            sync,
        };
        let tail = files.fit(head, detached)?;
        Ok((files, tail))
    }

    fn fit(
        &self,
        head: Position,
        detached: impl Fn(Position) -> Result<bool, LogError>,
    ) -> Result<RawTail, LogError> {
        let len_of = |file: &File, path: &Path| {
            file.metadata()
                .map(|m| m.len())
                .map_err(|e| io_error(path, e))
        };
        let index_len = len_of(&self.index, &self.index_path)?;
        let data_len = len_of(&self.data, &self.data_path)?;
        // Entries past the head belong to appends never acknowledged. The index is derived
        // from the records, so its tail is checked back to the last entry naming its record:
        // an entry that names another record, or none for an event that has one, drops the
        // index from there, and the records rebuild it below.
        let mut kept = (index_len / ENTRY).min(head.0);
        let mut end = 0;
        let mut p = kept;
        while p > 0 {
            let entry = self.entry(Position(p))?;
            if entry != 0 {
                match self.record_header(Position(p), entry - 1, data_len) {
                    Ok((len, _)) => {
                        end = entry - 1 + RECORD_HEADER + len;
                        break;
                    }
                    Err(_) => kept = p - 1,
                }
            } else if detached(Position(p))? {
                kept = p - 1;
            }
            p -= 1;
        }
        // Positions past the kept entries: their records follow the last kept one in order.
        let mut rebuilt = Vec::new();
        for p in kept + 1..=head.0 {
            let position = Position(p);
            let mut entry = 0;
            if detached(position)? {
                let (len, _) = self.record_header(position, end, data_len).map_err(|e| {
                    LogError::corrupt(
                        position,
                        format!("its raw submission is missing from the raw files: {e}"),
                    )
                })?;
                entry = end + 1;
                end += RECORD_HEADER + len;
            }
            rebuilt.extend_from_slice(&entry.to_le_bytes());
        }
        if index_len != kept * ENTRY || !rebuilt.is_empty() {
            self.index
                .set_len(kept * ENTRY)
                .and_then(|()| self.index.write_all_at(&rebuilt, kept * ENTRY))
                .map_err(|e| io_error(&self.index_path, e))?;
        }
        if data_len != end {
            tracing::info!(
                file = %self.data_path.display(),
                cut = data_len.saturating_sub(end),
                "raw submissions of unacknowledged appends cut off"
            );
            self.data
                .set_len(end)
                .map_err(|e| io_error(&self.data_path, e))?;
        }
        Ok(RawTail {
            data_len: end,
            entries: head.0,
            staged_data: Vec::new(),
            staged_index: Vec::new(),
        })
    }

    /// The index entry of `p` (0: no record).
    fn entry(&self, p: Position) -> Result<u64, LogError> {
        let mut buf = [0u8; 8];
        self.index
            .read_exact_at(&mut buf, (p.0 - 1) * ENTRY)
            .map_err(|e| {
                LogError::corrupt(
                    p,
                    format!("{}: no index entry: {e}", self.index_path.display()),
                )
            })?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Reads and checks the header of `p`'s record at `offset`: it must say `p` and end within
    /// `data_len`. Returns the length and hash.
    fn record_header(
        &self,
        p: Position,
        offset: u64,
        data_len: u64,
    ) -> Result<(u64, Hash), LogError> {
        let bad = |reason: String| {
            LogError::corrupt(
                p,
                format!(
                    "raw submission record in {}: {reason}",
                    self.data_path.display()
                ),
            )
        };
        let mut header = [0u8; RECORD_HEADER as usize];
        self.data
            .read_exact_at(&mut header, offset)
            .map_err(|e| bad(format!("header at offset {offset} unreadable: {e}")))?;
        let (stored, rest) = header.split_at(8);
        let (len, hash) = rest.split_at(4);
        let stored = u64::from_le_bytes(stored.try_into().unwrap_or_default());
        let len = u64::from(u32::from_le_bytes(len.try_into().unwrap_or_default()));
        if stored != p.0 {
            return Err(bad(format!(
                "the record at offset {offset} is position {stored}'s"
            )));
        }
        if offset + RECORD_HEADER + len > data_len {
            return Err(bad(format!(
                "{len} bytes at offset {offset} run past the file's end ({data_len})"
            )));
        }
        Ok((len, hash.try_into().unwrap_or_default()))
    }

    /// The raw submission of `p`, checked against what its envelope says (`expect`): the index
    /// entry, the record's position, length and SHA-256, and the SHA-256 of the bytes read.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] naming `p` on any mismatch or a short read.
    pub(crate) fn read(&self, p: Position, expect: RawRef) -> Result<Vec<u8>, LogError> {
        let entry = self.entry(p)?;
        if entry == 0 {
            return Err(LogError::corrupt(
                p,
                format!(
                    "{} names no raw submission for it",
                    self.index_path.display()
                ),
            ));
        }
        let data_len = self
            .data
            .metadata()
            .map_err(|e| io_error(&self.data_path, e))?
            .len();
        let (len, hash) = self.record_header(p, entry - 1, data_len)?;
        if len != expect.len || hash != expect.hash {
            return Err(LogError::corrupt(
                p,
                format!(
                    "the raw submission record holds {len} bytes hashing to {}, the event names {} bytes hashing to {}",
                    crate::chain::to_hex(&hash),
                    expect.len,
                    crate::chain::to_hex(&expect.hash)
                ),
            ));
        }
        let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        self.data
            .read_exact_at(&mut bytes, entry - 1 + RECORD_HEADER)
            .map_err(|e| LogError::corrupt(p, format!("{}: {e}", self.data_path.display())))?;
        let actual: Hash = Sha256::digest(&bytes).into();
        if actual != expect.hash {
            return Err(LogError::corrupt(
                p,
                format!(
                    "the raw submission's bytes hash to {}, the event names {}",
                    crate::chain::to_hex(&actual),
                    crate::chain::to_hex(&expect.hash)
                ),
            ));
        }
        Ok(bytes)
    }

    /// Writes what `tail` staged and, when syncing, makes it durable; then the staged
    /// entries count as written.
    ///
    /// # Errors
    /// The IO error; the caller poisons the log (what reached the files is unknown, and
    /// reopening cuts it back to the log's head).
    pub(crate) fn write(&self, tail: &mut RawTail) -> Result<(), LogError> {
        if tail.staged_index.is_empty() {
            return Ok(());
        }
        if !tail.staged_data.is_empty() {
            self.data
                .write_all_at(&tail.staged_data, tail.data_len)
                .map_err(|e| io_error(&self.data_path, e))?;
        }
        self.index
            .write_all_at(&tail.staged_index, tail.entries * ENTRY)
            .map_err(|e| io_error(&self.index_path, e))?;
        if self.sync {
            if !tail.staged_data.is_empty() {
                self.data
                    .sync_data()
                    .map_err(|e| io_error(&self.data_path, e))?;
            }
            self.index
                .sync_data()
                .map_err(|e| io_error(&self.index_path, e))?;
        }
        tail.data_len += tail.staged_data.len() as u64;
        tail.entries += tail.staged_index.len() as u64 / ENTRY;
        tail.clear();
        Ok(())
    }
}
