//! `verify`, `export` and `import`: the auditor's view of the log (docs/AUDIT.md).
//!
//! - [`verify`] walks the log's hash chain from a position and checks the acknowledged head;
//!   [`verify_replica`] checks a replica's copy and that it holds its upstream's head.
//! - [`export`] writes one JSON line per event ([`export_line`]), deterministic bytes;
//!   [`export_log`] does it for an open log (a replica's).
//! - [`import`] rebuilds an empty data dir from an export, checking every line against the
//!   chain and against its own envelope ([`ImportBatches`] hands the checked lines to the
//!   sink), in a scratch directory renamed into place at the end.
//!
//! What must hold: an export line is a pure function of (position, previous hash, envelope
//! bytes), so export → import → export gives the same bytes; import takes a line only if it is
//! byte for byte the line the envelope it carries renders to.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use domain::{DomainName, Position, RecordedEvent};
use eventlog::chain::{parse_hex, to_hex};
use eventlog::raw::{raw_dir, RawRef};
use eventlog::{
    chain_hash, decode_header, read_head_file, AcknowledgedHead, ChainEntry, Hash, LogConfig,
    LogError, SledLog, VerbatimEntry, GENESIS,
};
use serde_json::{json, Map, Value};

use crate::{Engine, EngineConfig, EngineError};

/// Everything `verify`, `export` and `import` can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The store is damaged at `position` (0 when no position applies, e.g. the head file).
    #[error("damaged at position {position}: {reason}")]
    Damaged {
        /// The first bad position.
        position: u64,
        /// What failed.
        reason: String,
    },
    /// An import line failed a check; nothing was imported.
    #[error("line {line} (position {position}): {reason}; nothing was imported")]
    Refused {
        /// 1-based line number in the export file.
        line: usize,
        /// The position the line claims, or the one expected if it names none.
        position: u64,
        /// What failed.
        reason: String,
    },
    /// `import` needs an empty (or missing) data directory.
    #[error("{0} is not empty: import only rebuilds an empty data dir")]
    NotEmpty(PathBuf),
    /// `import` into a JetStream cluster needs the project space's stream to be empty.
    #[error("the stream {stream} already holds {head} events: import only fills a new project space's stream")]
    StreamNotEmpty {
        /// The stream's name.
        stream: String,
        /// Its last position.
        head: u64,
    },
    /// There is no store in the data directory.
    #[error("no store in {0}")]
    NoStore(PathBuf),
    /// sled found a bad checksum in its own files (data, blobs, snapshot, config).
    #[error("the store is damaged: sled found a bad checksum in its files ({0})")]
    StorageDamaged(String),
    /// sled panicked while reading the store: damage sled did not report as an error.
    #[error("storage damaged: sled panicked: {0}")]
    Panicked(String),
    /// Reading or writing a file failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The log failed other than by damage.
    #[error(transparent)]
    Log(LogError),
    /// Opening the imported store failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<LogError> for AuditError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Corrupt { position, reason } => AuditError::Damaged {
                position: position.0,
                reason,
            },
            LogError::UnsupportedEnvelope { position, version } => AuditError::Damaged {
                position: position.0,
                reason: format!("unknown envelope format {version}"),
            },
            LogError::Storage(e @ sled::Error::Corruption { .. }) => {
                AuditError::StorageDamaged(e.to_string())
            }
            other => AuditError::Log(other),
        }
    }
}

impl AuditError {
    /// Whether the error is damage or tampering (exit status 3) rather than usage or IO.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            AuditError::Damaged { .. }
                | AuditError::Refused { .. }
                | AuditError::StorageDamaged(_)
                | AuditError::Panicked(_)
        )
    }
}

/// What [`verify`] found on a clean store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The checked range, its head hash and counts.
    pub verified: eventlog::Verified,
    /// The acknowledged head in the head file, checked; `None` when there is no head file.
    pub acknowledged: Option<AcknowledgedHead>,
}

impl VerifyReport {
    /// The report as the `--json` object.
    pub fn to_json(&self) -> Value {
        let v = &self.verified;
        json!({
            "ok": true,
            "from": v.from.0,
            "head": v.head.0,
            "head_hash": to_hex(&v.head_hash),
            "entries": v.entries,
            "unchained": v.unchained,
            "bytes": v.bytes,
            "acknowledged": self.acknowledged.map(|a| json!({
                "position": a.position.0,
                "hash": to_hex(&a.hash),
            })),
        })
    }
}

/// Runs `f` on the store's log in `dir`, turning a sled panic into [`AuditError::Panicked`].
fn with_log<T>(
    dir: &Path,
    domain: &DomainName,
    f: impl FnOnce(&SledLog) -> Result<T, AuditError>,
) -> Result<T, AuditError> {
    if !dir.join("conf").exists() && !dir.join("db").exists() {
        return Err(AuditError::NoStore(dir.to_owned()));
    }
    let run = std::panic::AssertUnwindSafe(|| {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| AuditError::from(LogError::Storage(e)))?;
        let log = SledLog::open(&db, domain, LogConfig::default())?;
        log.store_raw_in(&raw_dir(dir), false)?;
        f(&log)
    });
    std::panic::catch_unwind(run).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "no message".into());
        Err(AuditError::Panicked(message))
    })
}

/// Checks the log of `domain` in `dir` from `from` to its head (envelopes and chain), then the
/// acknowledged head recorded next to it.
///
/// # Errors
/// [`AuditError::Damaged`] naming the first bad position (or a lost tail, at the acknowledged
/// position); [`AuditError::NoStore`]; [`AuditError::Panicked`] if sled panics on the damage.
pub fn verify(dir: &Path, domain: &DomainName, from: Position) -> Result<VerifyReport, AuditError> {
    with_log(dir, domain, |log| {
        let verified = log.verify(from)?;
        let acknowledged = read_head_file(dir, domain)?;
        if let Some(acked) = acknowledged {
            log.check_acknowledged(acked)?;
        }
        Ok(VerifyReport {
            verified,
            acknowledged,
        })
    })
}

/// `verify` of a replica (`Engine::open_replica`) against its upstream log: checks the replica's
/// log from `from` to its head as [`verify`] does, then that it holds the upstream's verified
/// head with the same hash. The replica is pulled after the upstream was verified, so it may be
/// ahead (another process appended since); it is compared at the upstream's head then.
///
/// # Errors
/// [`AuditError::Damaged`] at the first bad position of the replica, or at the upstream's head
/// when the replica does not reach it or hashes it differently.
pub fn verify_replica(
    log: &SledLog,
    from: Position,
    upstream: &eventlog::Verified,
) -> Result<VerifyReport, AuditError> {
    let verified = log.verify(from)?;
    let at = upstream.head;
    if verified.head < at {
        return Err(AuditError::Damaged {
            position: at.0,
            reason: format!(
                "the local replica ends at position {}, before the stream's head {at}",
                verified.head
            ),
        });
    }
    let ours = if verified.head == at {
        verified.head_hash
    } else {
        hash_at(log, at)?
    };
    if ours != upstream.head_hash {
        return Err(AuditError::Damaged {
            position: at.0,
            reason: format!(
                "the local replica hashes position {at} to {}, the stream to {}",
                to_hex(&ours),
                to_hex(&upstream.head_hash)
            ),
        });
    }
    Ok(VerifyReport {
        verified,
        acknowledged: None,
    })
}

/// The chain hash of `log` at `at` (its stored previous hash taken on trust).
fn hash_at(log: &SledLog, at: Position) -> Result<Hash, AuditError> {
    if at == Position::ZERO {
        return Ok(GENESIS);
    }
    match log.chain_from(at)?.next() {
        Some(entry) => {
            let entry = entry?;
            if entry.position == at {
                return Ok(entry.hash);
            }
            Err(AuditError::Damaged {
                position: at.0,
                reason: format!("the log holds position {} there", entry.position),
            })
        }
        None => Err(AuditError::Damaged {
            position: at.0,
            reason: "missing from the local replica".into(),
        }),
    }
}

/// Writes the events `from..=to` (to the head when `to` is `None`) as JSON lines to `out`, each
/// checked against the chain as it is read. Refuses a log that lost acknowledged entries before
/// writing anything. Returns how many lines were written.
///
/// # Errors
/// [`AuditError::Damaged`] at the first bad position (lines before it are written already);
/// [`AuditError::Io`] when `out` fails.
pub fn export(
    dir: &Path,
    domain: &DomainName,
    from: Position,
    to: Option<Position>,
    out: &mut dyn Write,
) -> Result<u64, AuditError> {
    with_log(dir, domain, |log| {
        if let Some(acked) = read_head_file(dir, domain)? {
            log.check_acknowledged(acked)?;
        }
        export_log(log, from, to, out)
    })
}

/// [`export`] of an open log (a replica's, which keeps no acknowledged head of its own): the
/// events `from..=to` as JSON lines, each checked against the chain as it is read.
///
/// # Errors
/// As [`export`].
pub fn export_log(
    log: &SledLog,
    from: Position,
    to: Option<Position>,
    out: &mut dyn Write,
) -> Result<u64, AuditError> {
    let to = to.unwrap_or(Position(u64::MAX));
    let mut lines = 0;
    for entry in log.chain_from(from)? {
        let entry = entry?;
        if entry.position > to {
            break;
        }
        let event = entry.decode()?;
        let raw = match event.event.form_record() {
            Some(form) if form.raw.is_detached() => Some(log.raw_bytes(entry.position, form)?),
            _ => None,
        };
        let mut line = export_line(&entry, &event, raw.as_deref());
        line.push('\n');
        out.write_all(line.as_bytes())
            .map_err(|e| AuditError::Io("writing the export".into(), e))?;
        lines += 1;
    }
    out.flush()
        .map_err(|e| AuditError::Io("writing the export".into(), e))?;
    Ok(lines)
}

/// One export line (without its newline): a JSON object with sorted keys,
/// `command_id`, `envelope` (base64 of the stored bytes), `format`, `hash`, `payload` (the event
/// as JSON, byte fields as base64, the form's raw bytes moved out), `position`, `prev`, `raw`
/// (base64 of the submission for form events, else null), `received_at` (RFC 3339), `type`,
/// `version`. `detached` is the raw submission of a form event whose bytes the log stores out
/// of line (envelope format 4), read and checked by the caller.
pub fn export_line(entry: &ChainEntry, event: &RecordedEvent, detached: Option<&[u8]>) -> String {
    let mut raw = None;
    let payload = match serde_json::to_value(&event.event) {
        // Externally tagged: `{"FormAcceptedV1": {...}}`; the type is its own field.
        Ok(Value::Object(map)) if map.len() == 1 => {
            let mut inner = map.into_iter().next().map_or(Value::Null, |(_, v)| v);
            bytes_as_base64(&mut inner, &mut raw);
            inner
        }
        Ok(other) => other,
        Err(e) => json!({"unserialisable": e.to_string()}),
    };
    if let Some(bytes) = detached {
        raw = Some(base64(bytes));
    }
    let format = entry.envelope.first().copied().unwrap_or(0);
    json!({
        "position": entry.position.0,
        "received_at": event.recorded_at.to_string(),
        "type": event.event.type_name(),
        "version": event.event.type_version(),
        "command_id": event.command_id,
        "hash": to_hex(&entry.hash),
        "prev": to_hex(&entry.prev),
        "format": format,
        "payload": payload,
        "raw": raw,
        "envelope": base64(&entry.envelope),
    })
    .to_string()
}

/// Rewrites byte fields of an event's JSON: the form's `raw` is taken out (into `raw`), other
/// byte arrays (`bytes` of attachments, `content_hash`) become base64 / hex strings.
fn bytes_as_base64(value: &mut Value, raw: &mut Option<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(bytes)) = map.remove("raw") {
                *raw = Some(base64(&as_bytes(&bytes)));
            }
            if let Some(Value::Array(bytes)) = map.get("content_hash") {
                let hash: Vec<u8> = as_bytes(bytes);
                let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
                map.insert("content_hash".into(), Value::String(hex));
            }
            if let Some(Value::Array(bytes)) = map.get("bytes") {
                let encoded = base64(&as_bytes(bytes));
                map.insert("bytes".into(), Value::String(encoded));
            }
            for (_, v) in map.iter_mut() {
                bytes_as_base64(v, raw);
            }
        }
        Value::Array(items) => {
            for v in items {
                bytes_as_base64(v, raw);
            }
        }
        _ => {}
    }
}

fn as_bytes(values: &[Value]) -> Vec<u8> {
    values
        .iter()
        .filter_map(|v| v.as_u64().and_then(|n| u8::try_from(n).ok()))
        .collect()
}

/// What [`import`] built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportReport {
    /// Events imported.
    pub events: u64,
    /// The head of the imported log and its hash.
    pub head: AcknowledgedHead,
}

/// Lines checked before they are written to the scratch store, per batch.
const IMPORT_BATCH: usize = 1024;

/// Rebuilds the empty (or missing) data dir `target` from the export `file`: every line must be
/// the next position, chain to the line before, and be exactly the line its envelope renders
/// to; with `expect_head`, the last hash must equal it. Builds in a scratch directory next to
/// `target`, rebuilds the projections there (opening the engine), and renames it into place
/// only when everything passed; on failure the scratch directory is removed.
///
/// # Errors
/// [`AuditError::Refused`] naming the line and position of the first bad line;
/// [`AuditError::NotEmpty`]; [`AuditError::Io`]; [`AuditError::Engine`].
pub fn import(
    file: &Path,
    target: &Path,
    domain: &DomainName,
    expect_head: Option<Hash>,
) -> Result<ImportReport, AuditError> {
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| AuditError::Io(what, e)
    };
    if target.exists() {
        let mut entries = std::fs::read_dir(target).map_err(io(target))?;
        if entries.next().is_some() {
            return Err(AuditError::NotEmpty(target.to_owned()));
        }
    }
    let input = std::fs::File::open(file).map_err(io(file))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let scratch = parent.join(format!(".{name}.importing-{}", std::process::id()));
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).map_err(io(&scratch))?;
    }
    let built = build(
        std::io::BufReader::new(input),
        &scratch,
        domain,
        expect_head,
    );
    let report = match built {
        Ok(report) => report,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
    };
    if target.exists() {
        // An empty directory, checked above; rename(2) cannot replace it on every platform.
        std::fs::remove_dir(target).map_err(io(target))?;
    }
    std::fs::rename(&scratch, target).map_err(io(target))?;
    Ok(report)
}

/// Imports the export in `file` into `stream`, which must be empty: reads the whole export once
/// to check every line and the expected head (a stream cannot take back what it stored, and
/// denies deletes), then again to append it verbatim, in atomic batches each conditional on the
/// stream's head. Returns the head, the stream's now.
///
/// # Errors
/// [`AuditError::StreamNotEmpty`] (nothing is read); [`AuditError::Refused`] naming the first
/// bad line, or an export that does not end at `expect_head` (nothing is appended);
/// [`AuditError::Io`]; [`AuditError::Log`] when the cluster refuses or is unavailable (batches
/// before it are in the stream: the stream then holds a prefix of the export, which `verify`
/// shows and a second import refuses).
pub async fn import_into_stream(
    file: &Path,
    stream: &jetstream::JetStreamLog,
    expect_head: Option<Hash>,
) -> Result<ImportReport, AuditError> {
    use eventlog::EventStore;
    let head = stream.head().await.map_err(AuditError::Log)?;
    if head != Position::ZERO {
        return Err(AuditError::StreamNotEmpty {
            stream: stream.stream_name().to_owned(),
            head: head.0,
        });
    }
    let open = || -> Result<ImportBatches<std::io::BufReader<std::fs::File>>, AuditError> {
        let input =
            std::fs::File::open(file).map_err(|e| AuditError::Io(file.display().to_string(), e))?;
        Ok(ImportBatches::new(std::io::BufReader::new(input)))
    };
    let mut checking = open()?;
    while checking.next_batch()?.is_some() {}
    let checked = checking.finish(expect_head)?;
    let mut batches = open()?;
    while let Some(batch) = batches.next_batch()? {
        for chunk in batch.chunks(STREAM_BATCH) {
            stream
                .append_verbatim(chunk)
                .await
                .map_err(AuditError::Log)?;
        }
    }
    let head = batches.finish(expect_head)?;
    if head != checked {
        return Err(AuditError::Refused {
            line: usize::try_from(head.position.0).unwrap_or(usize::MAX),
            position: head.position.0,
            reason: "the export changed while it was imported".into(),
        });
    }
    Ok(ImportReport {
        events: head.position.0,
        head,
    })
}

/// Entries per verbatim append into a stream (JetStream's atomic batches hold 1000 at most).
const STREAM_BATCH: usize = 500;

/// Writes the checked lines into a fresh store in `scratch`, then opens the engine there once so
/// that the projections are rebuilt and the acknowledged head is recorded.
fn build(
    input: impl BufRead,
    scratch: &Path,
    domain: &DomainName,
    expect_head: Option<Hash>,
) -> Result<ImportReport, AuditError> {
    let head = {
        let db = sled::Config::new()
            .path(scratch)
            .open()
            .map_err(|e| AuditError::Log(LogError::Storage(e)))?;
        let log = SledLog::open(&db, domain, LogConfig::default())?;
        log.store_raw_in(&raw_dir(scratch), true)?;
        let mut batches = ImportBatches::new(input);
        while let Some(batch) = batches.next_batch()? {
            log.append_verbatim(&batch)?;
        }
        // The scratch store is thrown away when the export does not end at the expected head.
        batches.finish(expect_head)?;
        log.flush_blocking()?;
        log.head_hash()
    };
    let engine = Engine::open(scratch, domain, EngineConfig::default())?;
    engine.flush()?;
    drop(engine);
    Ok(ImportReport {
        events: head.position.0,
        head,
    })
}

/// The lines of an export, checked (each against the chain and its own envelope) and handed out in batches of verbatim
/// entries, in position order: what `import` writes to its sink (the scratch sled log; a
/// JetStream stream's verbatim append once it has one).
///
/// A sink that cannot throw its writes away (a stream) should read the export once without
/// writing, so that a refused line or a wrong head is found before anything is stored.
pub struct ImportBatches<R> {
    input: R,
    checker: LineChecker,
    /// Lines read so far.
    lines: usize,
    /// The line number of an empty line, refused unless it is the last.
    blank: Option<usize>,
}

impl<R: BufRead> ImportBatches<R> {
    /// Reads the export `input` from its first line.
    pub fn new(input: R) -> Self {
        ImportBatches {
            input,
            checker: LineChecker {
                position: Position::ZERO,
                hash: GENESIS,
            },
            lines: 0,
            blank: None,
        }
    }

    /// The next checked entries, at most 1024 of them; `None` after the last line.
    ///
    /// # Errors
    /// [`AuditError::Refused`] naming the first bad line (nothing of its batch is handed out);
    /// [`AuditError::Io`] when reading fails.
    pub fn next_batch(&mut self) -> Result<Option<Vec<VerbatimEntry>>, AuditError> {
        let mut batch = Vec::with_capacity(IMPORT_BATCH);
        while batch.len() < IMPORT_BATCH {
            let line = next_line(&mut self.input, MAX_LINE).map_err(|e| match e {
                LineError::Io(e) => AuditError::Io("reading the export".into(), e),
                LineError::TooLong => AuditError::Refused {
                    line: self.lines + 1,
                    position: self.checker.position.0 + 1,
                    reason: format!("a line over {MAX_LINE} bytes: not an export line"),
                },
            })?;
            let Some(line) = line else {
                break;
            };
            self.lines += 1;
            if let Some(at) = self.blank {
                return Err(AuditError::Refused {
                    line: at,
                    position: self.checker.position.0 + 1,
                    reason: "empty line".into(),
                });
            }
            if line.is_empty() {
                // Only the end of the file may be empty (after the last newline).
                self.blank = Some(self.lines);
                continue;
            }
            let (envelope, raw) = self.checker.check(self.lines, &line)?;
            batch.push(VerbatimEntry {
                position: self.checker.position,
                envelope,
                raw,
            });
        }
        Ok((!batch.is_empty()).then_some(batch))
    }

    /// After the last batch: the export's head (its last position and hash), refused unless it
    /// is `expect_head` when one is given.
    ///
    /// # Errors
    /// [`AuditError::Refused`] when the head is not the expected one.
    pub fn finish(self, expect_head: Option<Hash>) -> Result<AcknowledgedHead, AuditError> {
        let LineChecker { position, hash } = self.checker;
        if let Some(expected) = expect_head {
            if expected != hash {
                return Err(AuditError::Refused {
                    line: usize::try_from(position.0).unwrap_or(usize::MAX),
                    position: position.0,
                    reason: format!(
                        "the export ends at hash {}, not the expected head {}",
                        to_hex(&hash),
                        to_hex(&expected)
                    ),
                });
            }
        }
        Ok(AcknowledgedHead { position, hash })
    }
}

/// The longest export line `import` reads: a form's raw bytes are capped at 64 MiB on input
/// (4 × `casexml::Limits::max_bytes`), base64 makes that 86 MiB, and the envelope and payload
/// add as much again at most. A longer line (or a file with no newline, `/dev/zero`) is refused
/// before it fills memory.
const MAX_LINE: usize = 256 << 20;

enum LineError {
    Io(std::io::Error),
    TooLong,
}

/// The next line of `input` without its `\n` (`None` at the end), at most `max` bytes.
fn next_line(input: &mut impl BufRead, max: usize) -> Result<Option<Vec<u8>>, LineError> {
    let mut line = Vec::new();
    loop {
        let available = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Io(e)),
        };
        if available.is_empty() {
            return Ok((!line.is_empty()).then_some(line));
        }
        let (chunk, done) = match available.iter().position(|b| *b == b'\n') {
            Some(at) => (&available[..at], true),
            None => (available, false),
        };
        if line.len() + chunk.len() > max {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(chunk);
        let used = chunk.len() + usize::from(done);
        input.consume(used);
        if done {
            return Ok(Some(line));
        }
    }
}

/// The running state of an import: the last position taken and its hash.
struct LineChecker {
    position: Position,
    hash: Hash,
}

impl LineChecker {
    /// Checks one line; returns its envelope bytes (and the raw submission a format-4 envelope
    /// names) and advances.
    #[allow(clippy::type_complexity)]
    fn check(
        &mut self,
        line_no: usize,
        line: &[u8],
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), AuditError> {
        let expected = self.position.next();
        let refuse = |position: u64, reason: String| AuditError::Refused {
            line: line_no,
            position,
            reason,
        };
        let text = std::str::from_utf8(line).map_err(|_| refuse(expected.0, "not UTF-8".into()))?;
        let text = text.strip_suffix('\r').unwrap_or(text);
        let value: Value = serde_json::from_str(text)
            .map_err(|e| refuse(expected.0, format!("not a JSON object: {e}")))?;
        let fields = value
            .as_object()
            .ok_or_else(|| refuse(expected.0, "not a JSON object".into()))?;
        let position = fields
            .get("position")
            .and_then(Value::as_u64)
            .ok_or_else(|| refuse(expected.0, "no position".into()))?;
        let refuse = |reason: String| refuse(position, reason);
        if position != expected.0 {
            return Err(refuse(format!("expected position {expected}")));
        }
        let envelope = fields
            .get("envelope")
            .and_then(Value::as_str)
            .and_then(unbase64)
            .ok_or_else(|| refuse("no base64 envelope".into()))?;
        let header = decode_header(&envelope).map_err(|e| refuse(format!("envelope: {e}")))?;
        if let Some(prev) = header.prev {
            if *prev != self.hash {
                return Err(refuse(format!(
                    "hash chain broken: the envelope stores previous hash {}, the lines before hash to {}",
                    to_hex(prev),
                    to_hex(&self.hash)
                )));
            }
        }
        let hash = chain_hash(&self.hash, expected, &envelope);
        let entry = ChainEntry {
            position: expected,
            prev: self.hash,
            hash,
            chained: header.prev.is_some(),
            envelope: envelope.as_slice().into(),
        };
        let event = entry
            .decode()
            .map_err(|e| refuse(format!("envelope: {e}")))?;
        // A raw submission stored out of line is in the line's `raw`; its hash is in the
        // envelope, which the rendering below and the log's verbatim append both check.
        let detached = match header.raw {
            Some(_) => Some(
                fields
                    .get("raw")
                    .and_then(Value::as_str)
                    .and_then(unbase64)
                    .ok_or_else(|| refuse("no base64 raw submission".into()))?,
            ),
            None => None,
        };
        if let (Some(named), Some(bytes)) = (header.raw, &detached) {
            if RawRef::of(bytes) != named {
                return Err(refuse(
                    "modified line: field(s) raw differ from its envelope".into(),
                ));
            }
        }
        let canonical = export_line(&entry, &event, detached.as_deref());
        if canonical != text {
            let rendered: Map<String, Value> = serde_json::from_str(&canonical)
                .map_err(|e| refuse(format!("cannot render the envelope: {e}")))?;
            let differs: Vec<&str> = rendered
                .keys()
                .chain(fields.keys())
                .filter(|k| rendered.get(*k) != fields.get(*k))
                .map(String::as_str)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let what = if differs.is_empty() {
                "its bytes differ from the export of its envelope".to_owned()
            } else {
                format!("field(s) {} differ from its envelope", differs.join(", "))
            };
            return Err(refuse(format!("modified line: {what}")));
        }
        self.position = expected;
        self.hash = hash;
        Ok((envelope, detached))
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i) & 0x3F) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 with padding; `None` for anything else (including non-canonical
/// trailing bits, so that each byte string has exactly one encoding).
pub fn unbase64(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return None;
    }
    let value = |c: u8| BASE64.iter().position(|&d| d == c).map(|p| p as u32);
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.chunks_exact(4);
    let last = quads.len().saturating_sub(1);
    for (i, quad) in quads.enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i != last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = n << 6 | value(c)?;
        }
        n <<= 6 * pad;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = 3 - pad;
        if decoded[keep..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&decoded[..keep]);
    }
    Some(out)
}

/// Parses a hex head hash given on the command line.
pub fn parse_head(text: &str) -> Option<Hash> {
    parse_hex(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64(plain.as_bytes()), encoded);
            assert_eq!(unbase64(encoded).as_deref(), Some(plain.as_bytes()));
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(unbase64(&base64(&all)), Some(all));
        for bad in ["Zg=", "Zh==", "Z===", "Zg==Zg==", "Zm9v!A==", "===="] {
            assert_eq!(unbase64(bad), None, "{bad}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod line_tests {
    use super::{next_line, LineError};

    fn lines(input: &[u8], max: usize) -> Result<Vec<Vec<u8>>, &'static str> {
        let mut reader = std::io::BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            match next_line(&mut reader, max) {
                Ok(Some(l)) => out.push(l),
                Ok(None) => return Ok(out),
                Err(LineError::TooLong) => return Err("too long"),
                Err(LineError::Io(_)) => return Err("io"),
            }
        }
    }

    /// `import` reads an export line by line, as `split(b'\n')` would, but never more than
    /// the bound: a file without newlines is refused, not read into memory whole.
    #[test]
    fn export_lines_are_read_with_a_bound() {
        assert_eq!(
            lines(b"one\n\ntwo\n", 16).expect("lines"),
            vec![b"one".to_vec(), Vec::new(), b"two".to_vec()]
        );
        assert_eq!(lines(b"last", 16).expect("lines"), vec![b"last".to_vec()]);
        assert_eq!(lines(b"exactly-16-bytes\n", 16).expect("lines").len(), 1);
        assert_eq!(lines(b"seventeen-bytes!!\n", 16), Err("too long"));
        assert_eq!(lines(&[b'0'; 100], 16), Err("too long"));
    }
}
