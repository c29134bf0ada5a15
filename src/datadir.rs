//! The data dir before the store is opened: is there a store, and is another process holding it?
//!
//! A command that only reads never creates a store: on a missing one it says so (`no_store`).
//! sled takes an exclusive `flock` on `DIR/db` for as long as a process has the store open, so a
//! second process cannot open it; this module probes that lock before sled's open and names the
//! holder: `caseledger serve` through the `DIR/server.json` it writes while it serves
//! (`{"pid", "addr", "started_at"}`), else the pid `/proc/locks` gives (Linux, best effort).
//! The server's own lock keeps a stale `server.json` (a killed server) from being believed: the
//! file counts only while the store is locked, and not by another pid.

use std::path::Path;
use std::time::{Duration, Instant};

use fs2::FileExt;

use crate::fail::{fail, Code};

/// The file `caseledger serve` keeps in the data dir while it serves.
pub(crate) const SERVER_FILE: &str = "server.json";

/// Fails with `no_store` unless `dir` holds a store (sled's `conf` or `db` file).
pub(crate) fn require_store(dir: &Path) -> anyhow::Result<()> {
    if dir.join("db").exists() || dir.join("conf").exists() {
        return Ok(());
    }
    let what = if dir.exists() {
        "holds no caseledger store"
    } else {
        "does not exist"
    };
    Err(fail(
        Code::NoStore,
        format!(
            "the data dir {} {what}; point --data (or $CASELEDGER_DATA) at a store, or create \
             one with a command that writes (user create, submit, import)",
            dir.display()
        ),
    ))
}

/// How long [`require_free`] waits for a lock that no server holds: a process that just ended
/// (or a store just dropped in the same process) releases it a moment after its last write, as
/// `Engine::open` waits for too.
const LOCK_WAIT: Duration = Duration::from_secs(2);
const LOCK_POLL: Duration = Duration::from_millis(10);

/// Fails with `store_locked`, naming the holder, when another process holds the store in `dir`:
/// at once when it is `caseledger serve`, else after waiting up to [`LOCK_WAIT`] for it to go.
/// A store that does not exist yet is free.
pub(crate) fn require_free(dir: &Path) -> anyhow::Result<()> {
    let Ok(file) = std::fs::File::open(dir.join("db")) else {
        return Ok(());
    };
    let started = Instant::now();
    loop {
        match file.try_lock_exclusive() {
            // Closing `file` releases the probe's lock; sled takes its own when it opens.
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == fs2::lock_contended_error().kind() => {
                if holder(dir).is_server() || started.elapsed() >= LOCK_WAIT {
                    return Err(held(dir));
                }
                std::thread::sleep(LOCK_POLL);
            }
            // A file system without locks: sled's own open decides.
            Err(_) => return Ok(()),
        }
    }
}

/// Who holds the store.
enum Holder {
    /// `caseledger serve`, by its `server.json`.
    Server(Server),
    /// Another process, by the pid `/proc/locks` gives.
    Pid(u32),
    Unknown,
}

impl Holder {
    fn is_server(&self) -> bool {
        matches!(self, Holder::Server(_))
    }
}

fn holder(dir: &Path) -> Holder {
    let pid = lock_holder(&dir.join("db"));
    match (server(dir), pid) {
        // A server.json left by a server that was killed names a pid that no longer holds it.
        (Some(s), pid) if pid.is_none_or(|pid| pid == s.pid) => Holder::Server(s),
        (_, Some(pid)) => Holder::Pid(pid),
        (_, None) => Holder::Unknown,
    }
}

/// The `store_locked` failure for `dir`: who holds it, and what to do.
pub(crate) fn held(dir: &Path) -> anyhow::Error {
    let message = match holder(dir) {
        Holder::Server(s) => format!(
            "the data dir {} is held by caseledger serve (pid {}, http://{}); stop it, or send \
             the command to it over HTTP",
            dir.display(),
            s.pid,
            s.addr
        ),
        Holder::Pid(pid) => format!(
            "the data dir {} is held by another process (pid {pid}{}); wait for it to finish, \
             or stop it",
            dir.display(),
            command_line(pid).map_or(String::new(), |c| format!(": {c}"))
        ),
        Holder::Unknown => format!(
            "the data dir {} is held by another process; wait for it to finish, or stop it",
            dir.display()
        ),
    };
    fail(Code::StoreLocked, message)
}

/// What `DIR/server.json` says, when it is there and reads.
struct Server {
    pid: u32,
    addr: String,
}

fn server(dir: &Path) -> Option<Server> {
    let text = std::fs::read_to_string(dir.join(SERVER_FILE)).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(Server {
        pid: u32::try_from(value.get("pid")?.as_u64()?).ok()?,
        addr: value.get("addr")?.as_str()?.to_owned(),
    })
}

/// The pid holding a `flock` on `file`, from `/proc/locks` (Linux): the line whose device and
/// inode are the file's. `None` elsewhere, or when the kernel does not say (pid 0 across pid
/// namespaces).
#[cfg(target_os = "linux")]
fn lock_holder(file: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file).ok()?;
    let dev = meta.dev();
    // glibc's major()/minor() of a dev_t, as the kernel prints them in /proc/locks.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // `1: FLOCK  ADVISORY  WRITE 11139 fe:00:10035364 0 EOF`; waiters have `->` after `1:`.
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, id, ..] if *id == want => {
                pid.parse().ok().filter(|p: &u32| *p != 0)
            }
            _ => None,
        }
    })
}

#[cfg(not(target_os = "linux"))]
fn lock_holder(_file: &Path) -> Option<u32> {
    None
}

/// The command line of `pid`, for the message (Linux), at most 80 characters.
fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text: String = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let short: String = text.chars().take(80).collect();
    (!short.is_empty()).then_some(short)
}
