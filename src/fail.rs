//! How the CLI fails: one sentence on stderr, or under `--json` one line
//! `{"error":{"code":"…","message":"…"}}` on stderr, with a stable code (`docs/CLI.md`).
//!
//! What must hold: the exit status is the documented one whatever the code (1 for usage, IO,
//! unknown ids, a store that is missing or held and a JetStream cluster that does not answer; 3 for damage or a refused export found by
//! `verify`, `export` or `import`), and a closed stdout (`caseledger log | head -1`) is not a
//! failure: the command ends quietly with status 0.

use caseledger::audit::AuditError;
use caseledger::domain::CommandError;
use caseledger::eventlog::LogError;
use caseledger::restore::RestoreError;
use caseledger::EngineError;
use serde_json::json;

/// The stable error codes of `--json` (their spelling is the contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Code {
    /// The arguments do not parse (clap), or do not go together.
    Usage,
    /// A value or file the command cannot use (a bad time, a bad `--head`).
    InvalidInput,
    /// The id names nothing: case, user, group, app, form, conflict.
    NotFound,
    /// A user, group or app with that id exists already.
    AlreadyExists,
    /// The form is not in a state the command applies to.
    InvalidState,
    /// A time-travel point beyond the head or before the first event.
    OutOfRange,
    /// An input over the transport limit; nothing was stored.
    TooLarge,
    /// The data dir holds no store (a read-only command never creates one).
    NoStore,
    /// Another process holds the store.
    StoreLocked,
    /// The JetStream cluster of `--store` cannot be reached, or did not answer in time.
    Unavailable,
    /// The store or the export is damaged.
    Damaged,
    /// `import` refused an export line, or an export that does not end at `--head`.
    Refused,
    /// Reading or writing a file failed.
    Io,
    /// Anything else: a bug report.
    Internal,
}

impl Code {
    /// The wire spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Code::Usage => "usage",
            Code::InvalidInput => "invalid_input",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::InvalidState => "invalid_state",
            Code::OutOfRange => "out_of_range",
            Code::TooLarge => "too_large",
            Code::NoStore => "no_store",
            Code::StoreLocked => "store_locked",
            Code::Unavailable => "unavailable",
            Code::Damaged => "damaged",
            Code::Refused => "refused",
            Code::Io => "io",
            Code::Internal => "internal",
        }
    }
}

/// A failure the CLI itself found, with its code and exit status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Failure {
    pub(crate) code: Code,
    pub(crate) message: String,
    pub(crate) exit: u8,
}

/// A failure with exit status 1, as an `anyhow::Error` to return.
pub(crate) fn fail(code: Code, message: impl Into<String>) -> anyhow::Error {
    Failure {
        code,
        message: message.into(),
        exit: 1,
    }
    .into()
}

impl Failure {
    /// What `err` is to the user: its code, exit status and message (the whole chain of
    /// context); `None` when it is a closed stdout, which ends the command quietly.
    pub(crate) fn of(err: &anyhow::Error) -> Option<Failure> {
        let mut found = None;
        for cause in err.chain() {
            if is_closed_pipe(cause) {
                return None;
            }
            if found.is_none() {
                found = classify(cause);
            }
        }
        let (code, exit) = found.unwrap_or((Code::Internal, 1));
        Some(Failure {
            code,
            message: format!("{err:#}"),
            exit,
        })
    }

    /// Prints the failure on stderr: `error: …`, or the JSON object under `--json`.
    pub(crate) fn report(&self, json: bool) {
        if json {
            let value = json!({"error": {"code": self.code.as_str(), "message": self.message}});
            eprintln!("{value}");
        } else {
            eprintln!("error: {}", self.message);
        }
    }
}

/// Whether the error is a write to a closed pipe (the reader went away: `| head`).
fn is_closed_pipe(cause: &(dyn std::error::Error + 'static)) -> bool {
    let broken = |kind: std::io::ErrorKind| kind == std::io::ErrorKind::BrokenPipe;
    if let Some(e) = cause.downcast_ref::<std::io::Error>() {
        return broken(e.kind());
    }
    if let Some(e) = cause.downcast_ref::<serde_json::Error>() {
        return e.io_error_kind().is_some_and(broken);
    }
    // `export` writes through `AuditError::Io`, which keeps the IO error without a source.
    matches!(cause.downcast_ref::<AuditError>(), Some(AuditError::Io(_, e)) if broken(e.kind()))
}

/// The code and exit status of one error of the chain, if it is of a type the CLI knows.
fn classify(cause: &(dyn std::error::Error + 'static)) -> Option<(Code, u8)> {
    if let Some(f) = cause.downcast_ref::<Failure>() {
        return Some((f.code, f.exit));
    }
    if let Some(e) = cause.downcast_ref::<EngineError>() {
        return Some((engine(e), 1));
    }
    if let Some(e) = cause.downcast_ref::<AuditError>() {
        return Some(audit(e));
    }
    if let Some(e) = cause.downcast_ref::<RestoreError>() {
        return Some((
            match e {
                RestoreError::UnknownUser(_) => Code::NotFound,
                RestoreError::BadToken(_) => Code::InvalidInput,
                RestoreError::Log(l) => log(l),
                RestoreError::Projection(p) if p.is_damage() => Code::Damaged,
                RestoreError::Write(_) => Code::Io,
                _ => Code::Internal,
            },
            1,
        ));
    }
    if let Some(e) = cause.downcast_ref::<CommandError>() {
        return Some((command(e), 1));
    }
    // The JetStream log's own errors (`--store nats://…`): reaching the cluster, or its stream.
    if let Some(e) = cause.downcast_ref::<LogError>() {
        return Some((log(e), 1));
    }
    if cause.downcast_ref::<std::io::Error>().is_some() {
        return Some((Code::Io, 1));
    }
    None
}

fn engine(e: &EngineError) -> Code {
    match e {
        EngineError::Command(c) => command(c),
        EngineError::Locked { .. } => Code::StoreLocked,
        EngineError::DamagedFile { .. } => Code::Damaged,
        EngineError::OutOfRange(_) => Code::OutOfRange,
        EngineError::Log(l) => log(l),
        EngineError::Projection(p) if p.is_damage() => Code::Damaged,
        EngineError::Storage(sled::Error::Io(_)) => Code::Io,
        EngineError::Storage(sled::Error::Corruption { .. }) => Code::Damaged,
        _ => Code::Internal,
    }
}

fn command(e: &CommandError) -> Code {
    match e {
        CommandError::UnknownUser(_)
        | CommandError::UnknownGroup(_)
        | CommandError::UnknownApp(_)
        | CommandError::UnknownForm(_) => Code::NotFound,
        CommandError::AlreadyExists { .. } => Code::AlreadyExists,
        CommandError::FormState { .. } => Code::InvalidState,
        CommandError::Invalid { .. } => Code::InvalidInput,
        _ => Code::Internal,
    }
}

fn log(e: &LogError) -> Code {
    match e {
        LogError::Corrupt { .. } | LogError::UnsupportedEnvelope { .. } => Code::Damaged,
        LogError::Storage(sled::Error::Corruption { .. }) => Code::Damaged,
        LogError::Storage(sled::Error::Io(_)) => Code::Io,
        LogError::Unavailable(_) => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// `verify`, `export`, `import`: damage and refusals exit 3 (the audit contract).
fn audit(e: &AuditError) -> (Code, u8) {
    match e {
        AuditError::Damaged { .. } | AuditError::StorageDamaged(_) | AuditError::Panicked(_) => {
            (Code::Damaged, 3)
        }
        AuditError::Refused { .. } => (Code::Refused, 3),
        AuditError::NotEmpty(_) | AuditError::StreamNotEmpty { .. } => (Code::InvalidInput, 1),
        AuditError::NoStore(_) => (Code::NoStore, 1),
        AuditError::Io(..) => (Code::Io, 1),
        AuditError::Log(l) => (log(l), 1),
        AuditError::Engine(e) => (engine(e), 1),
        _ => (Code::Internal, 1),
    }
}
