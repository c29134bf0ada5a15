//! Group commit: many appends, one sled batch, one `Db::flush`.
//!
//! [`crate::EventStore::append`] puts the append in a queue and awaits its answer. One committer
//! task per log (spawned by the first append that finds none running, ended when the queue is
//! empty) runs groups back to back: it takes queued appends up to `max_batch` events and, on the
//! blocking pool, writes them as one sled batch ([`SledLog::write_group`]), flushes once,
//! advances the durable head and answers every append it took. Appenders never hand a lock to
//! each other, so the next group starts as soon as the previous flush returns.
//! [`SledLog::wait_durable`] serves callers of the sync `write`: waiters line up on a leader lock
//! and the one at the front flushes for all of them.
//!
//! Why one batch per group rather than one per append: sled 0.34.7's `apply_batch` rolls its IO
//! buffer twice and takes a process-wide write lock, which costs tens of microseconds no matter
//! how small the batch is. Why write and flush on the blocking pool: `Db::flush` blocks for the
//! disk and holds sled's process-wide lock in read mode, so an `apply_batch` on a runtime thread
//! would block that thread for a whole flush.
//!
//! What must hold: an append is answered `Ok` only after a flush that started after its batch
//! was applied; a group, once taken from the queue, is written, flushed and answered even if the
//! committer task is dropped (it all happens inside one blocking closure); while the queue is
//! non-empty exactly one committer is running or about to start.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use domain::Position;
use tokio::sync::oneshot;

use crate::sled_log::Inner;
use crate::{AppendOutcome, AppendRequest, LogError, SledLog};

type Reply = oneshot::Sender<Result<AppendOutcome, LogError>>;

/// An append waiting for the committer.
struct Pending {
    req: AppendRequest,
    events: usize,
    reply: Reply,
}

/// The appends waiting for the committer, and whether one is running.
///
/// Kept apart from the rest of the log so that a committer can watch it without holding the
/// sled `Db` open.
#[derive(Default)]
pub(crate) struct CommitQueue {
    queue: Mutex<VecDeque<Pending>>,
    /// Events in `queue`.
    events: AtomicUsize,
    /// Set while a committer task runs the queue.
    committing: AtomicBool,
}

impl CommitQueue {
    fn is_empty(&self) -> bool {
        self.queue.lock().map_or(true, |queue| queue.is_empty())
    }

    /// Events queued and not yet taken.
    pub(crate) fn queued_events(&self) -> usize {
        self.events.load(Ordering::Acquire)
    }
}

impl SledLog {
    /// The group-committed append behind [`crate::EventStore::append`].
    pub(crate) async fn append_grouped(
        &self,
        req: AppendRequest,
    ) -> Result<AppendOutcome, LogError> {
        self.check_poison()?;
        let (reply, answer) = oneshot::channel();
        let events = req.events.len();
        let commit = &self.inner.commit;
        {
            let mut queue = commit.queue.lock().map_err(|_| LogError::Poisoned)?;
            queue.push_back(Pending { req, events, reply });
            commit.events.fetch_add(events, Ordering::AcqRel);
        }
        self.bump_activity();
        if !commit.committing.swap(true, Ordering::AcqRel) {
            tokio::spawn(run_committer(
                Arc::clone(commit),
                Arc::downgrade(&self.inner),
            ));
        }
        match answer.await {
            Ok(outcome) => outcome,
            // The committer went away without answering: a panic (poisoned) or runtime shutdown.
            Err(_) => Err(if self.is_poisoned() {
                LogError::Poisoned
            } else {
                LogError::Shutdown
            }),
        }
    }

    /// Returns once every event up to `upto` has been flushed (group commit for `write` callers).
    ///
    /// Waiters line up on a leader lock. The one at the front checks whether an earlier flush
    /// already covered `upto`; if not, it leads: it reads the written head and runs `Db::flush`
    /// on the blocking pool, which covers every write that finished before the flush started,
    /// so the waiters behind it usually find their position durable and return at once.
    ///
    /// # Errors
    /// [`LogError::NotWritten`] if `upto` is beyond the written head; [`LogError::Storage`] if
    /// the flush fails (the log is poisoned from then on); [`LogError::Poisoned`];
    /// [`LogError::Shutdown`].
    pub async fn wait_durable(&self, upto: Position) -> Result<(), LogError> {
        loop {
            self.check_poison()?;
            if self.durable_head() >= upto {
                return Ok(());
            }
            let written = self.written_head();
            if upto > written {
                return Err(LogError::NotWritten {
                    requested: upto,
                    written,
                });
            }
            let _leader = self.inner.leader.lock().await;
            self.check_poison()?;
            if self.durable_head() >= upto {
                return Ok(());
            }
            self.gather().await;
            let log = self.clone();
            // The flush runs to the end even if this future is dropped.
            let joined = tokio::task::spawn_blocking(move || {
                log.check_poison()?;
                Ok::<_, LogError>(log.flush_to().map(|_| ())?)
            })
            .await;
            match joined {
                Ok(flushed) => flushed?,
                Err(e) => {
                    self.poison("flush task", &e);
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                    return Err(LogError::Shutdown);
                }
            }
        }
    }

    /// With a non-zero `max_delay`, waits until `max_batch` events are pending or the delay ends.
    async fn gather(&self) {
        let config = self.inner.config;
        if config.max_delay.is_zero() {
            return;
        }
        let deadline = tokio::time::Instant::now() + config.max_delay;
        let mut activity = self.inner.activity.subscribe();
        loop {
            let unflushed = self.written_head().0 - self.durable_head().0;
            let queued = self.inner.commit.queued_events() as u64;
            if queued + unflushed >= config.max_batch as u64 {
                return;
            }
            match tokio::time::timeout_at(deadline, activity.changed()).await {
                Ok(Ok(())) => {}
                // The deadline passed (the normal way out), or the log is gone.
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }

    /// Takes queued appends up to `max_batch` events (at least one append; all once poisoned).
    fn take_queued(&self) -> Vec<Pending> {
        let commit = &self.inner.commit;
        let Ok(mut queue) = commit.queue.lock() else {
            return Vec::new();
        };
        let limit = if self.is_poisoned() {
            usize::MAX
        } else {
            self.inner.config.max_batch.max(1)
        };
        let (mut taken, mut events) = (Vec::new(), 0usize);
        while let Some(front) = queue.front() {
            if !taken.is_empty() && events.saturating_add(front.events) > limit {
                break;
            }
            events = events.saturating_add(front.events);
            taken.extend(queue.pop_front());
        }
        commit.events.fetch_sub(events, Ordering::AcqRel);
        taken
    }

    /// Runs on the blocking pool: one batch, one flush; returns the answer for every append.
    ///
    /// Failures poison the log and reach each append as its answer.
    fn commit_group(&self, taken: Vec<Pending>) -> Vec<(Reply, Result<AppendOutcome, LogError>)> {
        let (requests, replies): (Vec<_>, Vec<_>) =
            taken.into_iter().map(|p| (p.req, p.reply)).unzip();
        let outcomes = match self.write_group(requests) {
            Ok(outcomes) => outcomes,
            Err(_) => {
                return replies
                    .into_iter()
                    .map(|reply| (reply, Err(LogError::Poisoned)))
                    .collect()
            }
        };
        let mut target = self.written_head();
        let flushed = if target > self.durable_head() {
            self.flush_to().map(|flushed| target = flushed)
        } else {
            Ok(())
        };
        tracing::Span::current().record("to", target.0);
        replies
            .into_iter()
            .zip(outcomes)
            .map(|(reply, outcome)| match &flushed {
                Ok(()) => (reply, outcome),
                Err(e) => (reply, outcome.and(Err(LogError::Storage(e.clone())))),
            })
            .collect()
    }

    /// Flushes everything written so far, on the calling thread (for sync callers and replay
    /// tools). Does not join the async group commit; concurrent flushes are safe, just wasteful.
    ///
    /// # Errors
    /// [`LogError::Storage`] if the flush fails (the log is poisoned from then on);
    /// [`LogError::Poisoned`].
    pub fn flush_blocking(&self) -> Result<(), LogError> {
        self.check_poison()?;
        self.flush_to()?;
        Ok(())
    }

    /// `Db::flush`, then the durable head moves to the written head read before the flush
    /// started (returned), which is recorded in the acknowledged-head file if one is pinned.
    fn flush_to(&self) -> Result<Position, sled::Error> {
        let inner = &*self.inner;
        let (target, hash) = self.written_mark();
        let flushed = inner.db.flush().and_then(|bytes| {
            // The real sync that sled's flush does not do on Linux (sled#1452).
            let file = inner.data_file.lock().map_err(|_| {
                sled::Error::Io(std::io::Error::other("data file handle lock poisoned"))
            })?;
            if let Some(file) = file.as_ref() {
                file.sync_data().map_err(sled::Error::Io)?;
            }
            let head = crate::AcknowledgedHead {
                position: target,
                hash,
            };
            self.record_acknowledged(head, file.is_some())
                .map_err(sled::Error::Io)?;
            Ok(bytes)
        });
        match flushed {
            Ok(bytes) => {
                inner.flushes.fetch_add(1, Ordering::Relaxed);
                inner.durable.fetch_max(target.0, Ordering::AcqRel);
                inner.durable_tx.send_modify(|d| *d = (*d).max(target.0));
                tracing::info!(to = target.0, bytes, "flushed");
                Ok(target)
            }
            Err(e) => {
                self.poison("flush", &e);
                Err(e)
            }
        }
    }

    /// Counts everything written so far as durable, without a flush: for a replica's copy,
    /// whose entries are durable in the log of record it copies, where they are copied again
    /// if a crash loses them here (sled's own background flush writes them within
    /// `flush_every_ms`). Returns the new durable head.
    pub fn mark_copied_durable(&self) -> Position {
        let inner = &*self.inner;
        let target = self.written_head();
        inner.durable.fetch_max(target.0, Ordering::AcqRel);
        inner.durable_tx.send_modify(|d| *d = (*d).max(target.0));
        target
    }

    /// Stops all further writes: we no longer know what reached the disk (fjall's approach).
    pub(crate) fn poison(&self, what: &str, error: &dyn std::fmt::Display) {
        let inner = &*self.inner;
        inner.poisoned.store(true, Ordering::Release);
        tracing::error!(domain = %inner.domain, what, %error, "event log poisoned; reopen it to recover");
        // Wake subscriptions so they see the poison instead of waiting forever.
        inner.durable_tx.send_modify(|_| {});
    }
}

/// Runs groups until the queue is empty; the caller has set `committing`.
///
/// Watches the queue without holding the log, takes the log only while a group is queued, and
/// the blocking closure drops it before answering, so once the last append is answered nothing
/// of the committer keeps the sled `Db` (and its file lock) open.
async fn run_committer(commit: Arc<CommitQueue>, weak: Weak<Inner>) {
    let mut owner = CommitterOwner {
        commit: Arc::clone(&commit),
        log: weak.clone(),
        owns: true,
    };
    loop {
        if commit.is_empty() {
            commit.committing.store(false, Ordering::Release);
            owner.owns = false;
            // An append that came in after the check saw `committing` still set and spawned no
            // one: pick it up unless a new committer already did.
            if commit.is_empty() || commit.committing.swap(true, Ordering::AcqRel) {
                return;
            }
            owner.owns = true;
        }
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let log = SledLog { inner };
        log.gather().await;
        let taken = log.take_queued();
        let span = tracing::info_span!(
            "group_commit",
            domain = %log.inner.domain,
            appends = taken.len(),
            from = log.durable_head().0,
            to = tracing::field::Empty,
        );
        let joined = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let answers = log.commit_group(taken);
            drop(log);
            // A receiver that is gone belongs to a dropped append; its events are written.
            for (reply, outcome) in answers {
                let _ = reply.send(outcome);
            }
        })
        .await;
        if let Err(e) = joined {
            if let Some(inner) = weak.upgrade() {
                SledLog { inner }.poison("group commit task", &e);
            }
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
            return;
        }
    }
}

/// Clears `committing` if the committer task ends while owning it (cancelled or panicking), so
/// the next append starts a new one; a panic also poisons the log.
struct CommitterOwner {
    commit: Arc<CommitQueue>,
    log: Weak<Inner>,
    owns: bool,
}

impl Drop for CommitterOwner {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(inner) = self.log.upgrade() {
                SledLog { inner }.poison("group committer", &"panicked");
            }
        }
        if self.owns {
            self.commit.committing.store(false, Ordering::Release);
        }
    }
}
