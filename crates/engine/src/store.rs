//! Opening sled's files without letting their damage panic the process.
//!
//! sled 0.34.7 trusts its files: a data file cut short (a killed copy, a full disk) can make its
//! recovery index out of bounds or serialize an uninitialised page, and a damaged `conf` file is
//! reported as "created by a sled version earlier than 0.29". Here the `conf` file is checked
//! before sled reads it, sled's open runs under `catch_unwind` with its panic message kept off
//! stderr, and both come back as [`EngineError::DamagedFile`] naming the file and what to do.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::sync::Once;

use crate::EngineError;

/// What sled's `conf` records for every store caseledger creates: sled's defaults, which
/// `Engine::open` never changes.
const EXPECTED_CONF: &str = "segment_size: 524288\nuse_compression: false\nversion: 0.34\n";

/// Checks sled's `conf` file in `dir`, if there is one: text lines `key: value` followed by a
/// little-endian CRC-32 of them (sled's `config.rs`). sled itself only warns on a bad CRC and
/// reads a garbled file as one from before sled 0.29.
pub(crate) fn check_conf(dir: &Path) -> Result<(), EngineError> {
    let path = dir.join("conf");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        // A new store: sled writes it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(EngineError::DamagedFile {
                path,
                reason: format!("cannot be read: {e}"),
            })
        }
    };
    let damaged = |what: String| EngineError::DamagedFile {
        path: path.clone(),
        reason: format!(
            "{what}. This file records sled's segment size, compression and format version; \
             for a store caseledger created it holds exactly {EXPECTED_CONF:?} followed by the \
             4-byte little-endian CRC-32 of those bytes. Restore the store from a backup, or \
             move the damaged file aside (sled then writes that content afresh) and run \
             `caseledger replay --verify`"
        ),
    };
    let Some(split) = bytes.len().checked_sub(4) else {
        return Err(damaged(format!("it is {} bytes long", bytes.len())));
    };
    let (text, crc) = bytes.split_at(split);
    let stored = crc
        .try_into()
        .map(u32::from_le_bytes)
        .map_err(|_| damaged("it has no checksum".into()))?;
    if crc32fast::hash(text) != stored {
        return Err(damaged("its checksum does not match its contents".into()));
    }
    let Ok(text) = std::str::from_utf8(text) else {
        return Err(damaged("it is not text".into()));
    };
    for key in ["segment_size", "use_compression", "version"] {
        let found = text
            .lines()
            .any(|l| l.split_once(": ").is_some_and(|(k, _)| k == key));
        if !found {
            return Err(damaged(format!("it lacks the `{key}` line")));
        }
    }
    Ok(())
}

thread_local! {
    /// Set while this thread runs sled's open: a panic then is recorded, not printed.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    /// The message of the last panic recorded while [`QUIET`].
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// Installs, once per process, a panic hook that records a panic raised inside [`open_sled`] on
/// its thread and passes every other panic to the hook that was there before.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                CAUGHT.with(|c| *c.borrow_mut() = Some(format!("{payload}{at}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// Opens sled in `dir`; a panic inside sled (damaged files) comes back as
/// [`EngineError::DamagedFile`] naming the data file, and sled's corruption error too.
pub(crate) fn open_sled(
    config: &sled::Config,
    dir: &Path,
) -> Result<sled::Result<sled::Db>, EngineError> {
    guard(dir, || config.open())
}

/// Runs `open` (sled's open of the store in `dir`) under `catch_unwind`, its panic message
/// recorded instead of printed.
pub(crate) fn guard(
    dir: &Path,
    open: impl FnOnce() -> sled::Result<sled::Db>,
) -> Result<sled::Result<sled::Db>, EngineError> {
    install_hook();
    let data = dir.join("db");
    let size = std::fs::metadata(&data)
        .map_or_else(|_| String::new(), |m| format!(" ({} bytes)", m.len()));
    QUIET.with(|q| q.set(true));
    // sled's state is dropped with the unwinding; nothing of it is used after a panic.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(open));
    QUIET.with(|q| q.set(false));
    match opened {
        Ok(Err(sled::Error::Corruption { .. })) => Err(EngineError::DamagedFile {
            path: data,
            reason: format!("sled found corrupted data in it while recovering. {REMEDY}"),
        }),
        Ok(other) => Ok(other),
        Err(_) => {
            let message = CAUGHT
                .with(|c| c.borrow_mut().take())
                .unwrap_or_else(|| "no message".into());
            tracing::debug!(path = %data.display(), panic = %message, "sled panicked while opening the store");
            Err(EngineError::DamagedFile {
                path: data,
                reason: format!(
                    "sled could not recover it{size} and panicked ({message}); the file is \
                     damaged: cut short (a full disk, an interrupted copy) or changed on disk. \
                     {REMEDY}"
                ),
            })
        }
    }
}

/// What to do about a damaged data file.
const REMEDY: &str = "Restore the store directory from a backup (or import an export of its \
                      log); keep the damaged copy, and do not write to it";

/// Fails when the log ends before, or hashes differently at, the acknowledged head that the
/// log keeps outside sled after every flush (`eventlog::read_head_file`, docs/AUDIT.md): sled's
/// recovery stops quietly at the first message that fails its checksum and takes what comes
/// before it as the whole store (one flipped byte in the data file lost 20 of 24 events in a
/// test, with no error), and this record is what tells that apart from a sound store.
pub(crate) fn check_head(dir: &Path, log: &eventlog::SledLog) -> Result<(), EngineError> {
    let damaged = |e: eventlog::LogError| EngineError::DamagedFile {
        path: dir.join("db"),
        reason: format!(
            "{e}: sled recovered only the part of its data file before a damaged or missing \
             stretch, and has dropped the rest ({}). {REMEDY}. If the data file is an older \
             backup put back on purpose, delete {} first",
            dir.join(eventlog::head_file_name(log.domain())).display(),
            dir.join(eventlog::head_file_name(log.domain())).display()
        ),
    };
    match eventlog::read_head_file(dir, log.domain()) {
        Ok(Some(acked)) => log.check_acknowledged(acked).map_err(damaged),
        Ok(None) => Ok(()),
        Err(e) => Err(damaged(e)),
    }
}
