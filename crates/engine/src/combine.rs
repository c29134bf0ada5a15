//! Concurrent [`Engine::execute`] calls, decided and written as groups.
//!
//! A server hands the engine one command per request, from many requests at once. Deciding,
//! appending and projecting each on its own costs one sled batch of the log and one of the
//! projections per command (sled 0.34.7 charges tens of microseconds per batch, however small,
//! and a flush per group), which caps one form per request at about a thousand a second on
//! two cores. [`Engine::execute_many`] already takes a group for the price of one; this module
//! makes groups out of concurrent single calls:
//!
//! - every call queues its request, then either waits for its answer or, if no other call is
//!   deciding, becomes the *leader*: it takes everything queued (up to [`MAX_GROUP`]), decides
//!   and writes it as one group (as `execute_many` does), and gives up the lead;
//! - waiting for the group to be durable and projected runs on a spawned task, which answers
//!   every request of the group; so the next leader decides the next group while this one is
//!   being flushed (decisions see the groups before them: I9), and a caller that stops waiting
//!   (a closed connection) never leaves another caller without its answer.
//!
//! What must hold: requests are decided in the order they were queued; each is answered with
//! exactly its own outcome, only once it is durable and visible to queries, as a lone
//! `execute_many` would answer it.

use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::{Engine, EngineError, Outcome, Request};

/// Requests decided as one group at most.
pub const MAX_GROUP: usize = 256;

pub(crate) type Answer = oneshot::Sender<Result<Outcome, EngineError>>;

/// The queue of requests waiting to be decided, and the lead.
#[derive(Default)]
pub(crate) struct Combiner {
    queue: Mutex<Vec<(Request, Answer)>>,
    pub(crate) lead: tokio::sync::Mutex<()>,
    /// Woken by each push: a replica's leader waiting on an append decides what arrives
    /// meanwhile (`pipeline.rs`).
    pub(crate) arrived: tokio::sync::Notify,
}

impl Combiner {
    fn push(&self, job: (Request, Answer)) {
        match self.queue.lock() {
            Ok(mut q) => q.push(job),
            Err(poisoned) => poisoned.into_inner().push(job),
        }
        self.arrived.notify_one();
    }

    pub(crate) fn take(&self) -> Vec<(Request, Answer)> {
        let mut q = match self.queue.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        let n = q.len().min(MAX_GROUP);
        q.drain(..n).collect()
    }
}

impl Engine {
    /// Executes one command: decided, appended, durable (group commit) and visible to queries
    /// when it returns. Concurrent calls are decided and written together as groups (see
    /// `combine.rs`), each answered with its own outcome.
    pub async fn execute(&self, request: Request) -> Result<Outcome, EngineError> {
        let (tx, mut rx) = oneshot::channel();
        self.combiner.push((request, tx));
        tokio::select! {
            biased;
            answer = &mut rx => return received(answer),
            lead = self.combiner.lead.lock() => {
                // Empty: a leader before took this request along; its group answers it.
                let group = self.combiner.take();
                if !group.is_empty() {
                    if let Some(up) = &self.upstream {
                        // A replica's leader appends its group upstream and, while that is in
                        // flight, decides the next one on the head it leaves (`replica.rs`).
                        self.lead_replicated(up, group).await;
                        drop(lead);
                        return received(rx.await);
                    }
                    let (requests, answers): (Vec<_>, Vec<_>) = group.into_iter().unzip();
                    let begun = self.begin(&requests);
                    drop(lead);
                    match begun {
                        Ok((outcomes, last, written)) => {
                            let finish = self.finish(last, written);
                            tokio::spawn(async move {
                                let finished = finish.await;
                                answer_all(answers, outcomes, finished);
                            });
                        }
                        Err(e) => answer_failed(answers, &e),
                    }
                }
            }
        }
        received(rx.await)
    }
}

fn received(
    answer: Result<Result<Outcome, EngineError>, oneshot::error::RecvError>,
) -> Result<Outcome, EngineError> {
    answer.unwrap_or_else(|_| {
        Err(EngineError::Internal(
            "the group deciding this command was dropped before it answered".into(),
        ))
    })
}

/// Every request of a group failed together (before anything was appended, or with the log).
pub(crate) fn answer_failed(answers: Vec<Answer>, e: &EngineError) {
    for answer in answers {
        // An unreachable log stays what it is (callers retry it); other failures of the
        // group are internal to each of its commands.
        let each = match e {
            EngineError::Log(eventlog::LogError::Unavailable(reason)) => {
                EngineError::Log(eventlog::LogError::Unavailable(reason.clone()))
            }
            _ => EngineError::Internal(e.to_string()),
        };
        let _ = answer.send(Err(each));
    }
}

pub(crate) fn answer_all(
    answers: Vec<Answer>,
    outcomes: crate::Outcomes,
    finished: Result<(), EngineError>,
) {
    match finished {
        Ok(()) => {
            for (answer, outcome) in answers.into_iter().zip(outcomes) {
                let _ = answer.send(outcome);
            }
        }
        Err(e) => answer_failed(answers, &e),
    }
}
