//! Projection batches written off the writer lock.
//!
//! The writer lock covers deciding a group, writing its events to the log and sealing its
//! projection batch ([`projections::Pending::seal`]). The sled write of that batch, the largest
//! single cost of a group, runs on this thread while the next group is decided against the
//! sealed batch's [`projections::Overlay`]. Batches are written one at a time, in the order
//! sealed: the writer waits for the previous batch before it hands over the next, so at most
//! one batch is in flight and the overlay of the newest one is all a reader needs besides the
//! tree. A group is acknowledged once its events are durable *and* its batch is written, so a
//! client reads its own writes.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use projections::{Overlay, Sealed};

/// Outcome of one batch write: `None` while it runs, then `Ok` or the error's message.
#[derive(Default)]
pub(crate) struct Done {
    state: Mutex<Option<Result<(), String>>>,
    ready: Condvar,
    notify: tokio::sync::Notify,
}

impl Done {
    fn finish(&self, result: Result<(), String>) {
        match self.state.lock() {
            Ok(mut s) => *s = Some(result),
            Err(poisoned) => *poisoned.into_inner() = Some(result),
        }
        self.ready.notify_all();
        self.notify.notify_waiters();
    }

    /// True once the write is done, whatever its outcome.
    pub(crate) fn is_finished(&self) -> bool {
        self.peek().is_some()
    }

    fn peek(&self) -> Option<Result<(), String>> {
        match self.state.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Blocks until the write is done.
    pub(crate) fn wait(&self) -> Result<(), String> {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        loop {
            if let Some(r) = state.as_ref() {
                return r.clone();
            }
            state = match self.ready.wait(state) {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }

    /// Waits, without blocking a runtime thread, until the write is done.
    pub(crate) async fn done(&self) -> Result<(), String> {
        loop {
            // Registered before the check, so a finish in between still wakes this waiter.
            let notified = self.notify.notified();
            if let Some(r) = self.peek() {
                return r;
            }
            notified.await;
        }
    }
}

/// The batch in flight: what the next group reads through, and when it is written.
pub(crate) struct Inflight {
    pub(crate) overlay: Arc<Overlay>,
    pub(crate) done: Arc<Done>,
}

struct Job {
    sealed: Sealed,
    done: Arc<Done>,
}

/// The thread that writes sealed projection batches.
pub(crate) struct Committer {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    pub(crate) fn start() -> Result<Self, std::io::Error> {
        let (jobs, rx): (Sender<Job>, Receiver<Job>) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("caseledger-projections".into())
            .spawn(move || {
                for job in rx {
                    let result = job.sealed.apply().map(|_| ()).map_err(|e| e.to_string());
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "projection batch not written; the next group catches up from the log");
                    }
                    job.done.finish(result);
                }
            })?;
        Ok(Committer {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Hands a sealed batch to the thread; returns its completion.
    pub(crate) fn submit(&self, sealed: Sealed) -> Arc<Done> {
        let done = Arc::new(Done::default());
        let job = Job {
            sealed,
            done: Arc::clone(&done),
        };
        let sent = match &self.jobs {
            Some(tx) => tx.send(job).map_err(|mpsc::SendError(job)| job),
            None => Err(job),
        };
        if let Err(job) = sent {
            // The thread is gone (it only ends when the engine drops): write here instead.
            let result = job.sealed.apply().map(|_| ()).map_err(|e| e.to_string());
            job.done.finish(result);
        }
        done
    }
}

impl Drop for Committer {
    /// Lets the thread finish the batch it holds, so the store is released when the engine is.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
