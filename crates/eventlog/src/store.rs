//! The storage-neutral log contract: [`EventStore`] and the request/outcome types of an append.
//!
//! What must hold for every implementation (sled now, JetStream later): positions are gapless
//! from 1, an acknowledged append is durable, reads and subscriptions return only durable events
//! in position order, and an idempotency key is honoured forever.

use domain::{CommandId, Event, Position, RecordedEvent, Timestamp};

use crate::{LogError, Subscription, VerbatimEntry};

/// Optimistic concurrency for an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Append wherever the head is.
    Any,
    /// Append only if the head (last written position) equals this position; otherwise
    /// [`LogError::WrongExpectedPosition`] and nothing is written.
    Head(Position),
}

/// One atomic append: all of `events` get consecutive positions, or none do.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    /// The concurrency check, evaluated after the idempotency check.
    pub expected: Expected,
    /// If set and already used by an earlier append, the append is a no-op that returns
    /// [`AppendOutcome::AlreadyAppended`] with the original positions.
    pub idempotency_key: Option<String>,
    /// The command that produced the events; stored with each event.
    pub command_id: CommandId,
    /// Server received time of the command; stored with each event. Keep it non-decreasing
    /// along the log if you want [`crate::SledLog::first_at_or_after`] to be exact.
    pub recorded_at: Timestamp,
    /// The events, in order.
    pub events: Vec<Event>,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The events now sit at `first..=last`. For an empty `events`, `first = head + 1` and
    /// `last = head` (an empty range).
    Appended {
        /// Position of the first event.
        first: Position,
        /// Position of the last event.
        last: Position,
    },
    /// The idempotency key was used before; these are the positions that append got.
    AlreadyAppended {
        /// Position of the first event of the original append.
        first: Position,
        /// Position of the last event of the original append.
        last: Position,
    },
}

impl AppendOutcome {
    /// The last position of the append (original or new), what a caller waits on.
    pub fn last(&self) -> Position {
        match *self {
            AppendOutcome::Appended { last, .. } | AppendOutcome::AlreadyAppended { last, .. } => {
                last
            }
        }
    }
}

/// The append-only event log of one project space.
#[async_trait::async_trait]
pub trait EventStore: Send + Sync {
    /// Appends atomically and returns once the events are durable (I5).
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome, LogError>;

    /// Appends several requests in order, each as [`EventStore::append`] would (each with its
    /// own expected position and key), and answers each. A store that can pipelines them, so
    /// that a group costs about one round trip; the default awaits one after the other.
    ///
    /// The requests are a *chain*: each was decided on the ones before it. Once one of them is
    /// not `Appended` (refused, already appended elsewhere, failed), every later one that
    /// expects a head ([`Expected::Head`]) is refused with [`LogError::WrongExpectedPosition`]
    /// without being tried: its expected position was computed with the earlier one in place,
    /// and another writer's entries of the same length must not make it fit.
    async fn append_all(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Vec<Result<AppendOutcome, LogError>> {
        let mut out = Vec::with_capacity(requests.len());
        // Once broken: the head the refusals report (what the log holds, not what was expected).
        let mut broken: Option<Position> = None;
        for req in requests {
            let result = match (req.expected, broken) {
                (Expected::Head(expected), Some(actual)) => {
                    Err(LogError::WrongExpectedPosition { expected, actual })
                }
                _ => self.append(req).await,
            };
            if broken.is_none() && !matches!(result, Ok(AppendOutcome::Appended { .. })) {
                broken = Some(match &result {
                    Err(LogError::WrongExpectedPosition { actual, .. }) => *actual,
                    _ => self.head().await.unwrap_or(Position::ZERO),
                });
            }
            out.push(result);
        }
        out
    }

    /// Durable events with position `>= from` (0 and 1 both mean "from the start"), at most
    /// `limit` of them, in position order.
    async fn read(&self, from: Position, limit: usize) -> Result<Vec<RecordedEvent>, LogError>;

    /// The last durable position ([`Position::ZERO`] for an empty log).
    async fn head(&self) -> Result<Position, LogError>;

    /// Durable entries with position `>= from`, at most `limit` of them, in position order,
    /// exactly as stored: the envelope bytes (which the hash chain covers) and, for an envelope
    /// that stores its raw submission out of line (format 4), those bytes. What a replica
    /// ([`crate::SledLog::append_verbatim`]) or an export copies so that its chain, and so its
    /// head hash, is the original's.
    async fn read_entries(
        &self,
        from: Position,
        limit: usize,
    ) -> Result<Vec<VerbatimEntry>, LogError>;

    /// The entries `from..=last` exactly as [`EventStore::read_entries`] would answer them,
    /// when this process appended them itself and still holds their bytes; `None` when any of
    /// them is not at hand (the default). Asks nothing of the store: a replica copies its own
    /// acknowledged appends from here instead of reading them back.
    fn recent_entries(&self, from: Position, last: Position) -> Option<Vec<VerbatimEntry>> {
        let _ = (from, last);
        None
    }

    /// Durable events from `from` on: first those already in the log, then new ones as they
    /// become durable.
    async fn subscribe(&self, from: Position) -> Result<Subscription, LogError>;
}

#[cfg(test)]
mod tests {
    use domain::{CommandId, Event, Position, Timestamp, UserCreatedV1, UserId};

    use crate::tests::open;
    use crate::{AppendOutcome, AppendRequest, EventStore, Expected, LogError};

    fn create(user: &str, expected: Expected) -> AppendRequest {
        AppendRequest {
            expected,
            idempotency_key: None,
            command_id: CommandId::new(user),
            recorded_at: Timestamp(1),
            events: vec![Event::UserCreatedV1(UserCreatedV1 {
                user_id: UserId::new(user),
                username: user.into(),
            })],
        }
    }

    // Issue 11 ("a decision made on a stale position is retried against the new head, never
    // appended"): the second append of a chain was decided with the first in place. Another
    // writer's single event makes its expected head fit; it must be refused all the same.
    #[tokio::test]
    async fn append_all_refuses_the_rest_of_a_chain_after_a_refused_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_db, log) = open(&dir);
        log.append(create("u-other", Expected::Any))
            .await
            .expect("the other writer");
        let answers = log
            .append_all(vec![
                create("u-a", Expected::Head(Position::ZERO)),
                create("u-b", Expected::Head(Position(1))),
                create("u-c", Expected::Any),
            ])
            .await;
        assert!(
            matches!(
                answers[0],
                Err(LogError::WrongExpectedPosition {
                    expected: Position(0),
                    actual: Position(1)
                })
            ),
            "{answers:?}"
        );
        assert!(
            matches!(
                answers[1],
                Err(LogError::WrongExpectedPosition {
                    expected: Position(1),
                    actual: Position(1)
                })
            ),
            "decided on u-a, which is not there: {answers:?}"
        );
        // An append that expects no head does not depend on the ones before it.
        assert_eq!(
            answers[2].as_ref().ok(),
            Some(&AppendOutcome::Appended {
                first: Position(2),
                last: Position(2),
            })
        );
        assert_eq!(log.written_head(), Position(2));
    }
}
