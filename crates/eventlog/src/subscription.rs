//! [`Subscription`]: durable events from a position on, catch-up then live.
//!
//! A subscription reads from a [`SledLog`] directly, or from any other backend through a
//! [`SubscriptionSource`] (the JetStream log, `crates/jetstream`): [`EventStore::subscribe`]
//! returns this one type whatever the store, so the trait stays object-safe and callers need no
//! generic parameter.
//!
//! [`EventStore::subscribe`]: crate::EventStore::subscribe
//!
//! What must hold: events come out in position order with no gaps and no repeats, and only once
//! they are durable; [`Subscription::next`] is cancel-safe (dropping its future loses nothing), so
//! it can sit in a `tokio::select!`.

use std::collections::VecDeque;

use domain::{Position, RecordedEvent};

use crate::sled_log::SUBSCRIPTION_PAGE;
use crate::{LogError, SledLog};

/// Where a [`Subscription`] over a store other than [`SledLog`] gets its events.
///
/// An extension of the store contract for backends outside this crate: the subscription keeps
/// the cursor and the buffer, the source only answers "the durable events from here on".
#[async_trait::async_trait]
pub trait SubscriptionSource: Send + Sync + std::fmt::Debug {
    /// Durable events with positions `from, from + 1, …` (gapless, at most `limit`, at least
    /// one), waiting until there is one. Must be cancel-safe: a dropped call loses nothing,
    /// because the subscription only moves its cursor on a returned page.
    ///
    /// # Errors
    /// Whatever the store's reads return; the subscription stays where it was.
    async fn next_page(
        &mut self,
        from: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError>;
}

#[derive(Debug)]
enum Source {
    Sled {
        log: SledLog,
        durable: tokio::sync::watch::Receiver<u64>,
    },
    Other(Box<dyn SubscriptionSource>),
}

/// A cursor over the durable log that waits for new events at the end.
///
/// Catch-up reads pages of 256 events from sled; at the head it waits on the log's flush
/// notifications, so a live event arrives right after the group commit that made it durable.
/// To resume after a restart, store [`Subscription::position`] and subscribe from the one after.
#[derive(Debug)]
pub struct Subscription {
    source: Source,
    /// Next position to read from the store.
    next: Position,
    /// Last position handed out.
    delivered: Position,
    buffer: VecDeque<RecordedEvent>,
}

impl Subscription {
    pub(crate) fn new(log: SledLog, from: Position) -> Subscription {
        let durable = log.watch_durable();
        Subscription::with_source(Source::Sled { log, durable }, from)
    }

    /// A subscription from `from` (0 and 1 both mean the start) over another store's
    /// [`SubscriptionSource`].
    pub fn from_source(source: Box<dyn SubscriptionSource>, from: Position) -> Subscription {
        Subscription::with_source(Source::Other(source), from)
    }

    fn with_source(source: Source, from: Position) -> Subscription {
        let next = from.max(Position(1));
        Subscription {
            source,
            next,
            delivered: Position(next.0 - 1),
            buffer: VecDeque::new(),
        }
    }

    /// The next durable event, waiting for one if the subscription is at the head.
    ///
    /// # Errors
    /// [`LogError::Poisoned`] once the log is poisoned; [`LogError::Corrupt`] and the other read
    /// errors of [`crate::EventStore::read`]. After an error the subscription stays where it was,
    /// so calling again retries.
    pub async fn next(&mut self) -> Result<RecordedEvent, LogError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.delivered = event.position;
                return Ok(event);
            }
            let (log, durable) = match &mut self.source {
                Source::Sled { log, durable } => (log, durable),
                Source::Other(source) => {
                    let page = source.next_page(self.next, SUBSCRIPTION_PAGE).await?;
                    self.accept(page)?;
                    continue;
                }
            };
            log.check_poison()?;
            if self.next <= log.durable_head() {
                let page = log.read_durable(self.next, SUBSCRIPTION_PAGE).await?;
                self.accept(page)?;
                continue;
            }
            let want = self.next.0;
            durable
                .wait_for(|durable| *durable >= want || log.is_poisoned())
                .await
                // The sender lives as long as the log, which this subscription holds.
                .map_err(|_| LogError::Poisoned)?;
        }
    }

    /// Takes a page that must start at `next` and be gapless.
    fn accept(&mut self, page: Vec<RecordedEvent>) -> Result<(), LogError> {
        let mut expect = self.next;
        for event in &page {
            if event.position != expect {
                return Err(LogError::corrupt(
                    expect,
                    format!("missing: the store answered position {}", event.position),
                ));
            }
            expect = expect.next();
        }
        if page.is_empty() {
            return Err(LogError::corrupt(
                self.next,
                "missing below the durable head",
            ));
        }
        self.next = expect;
        self.buffer.extend(page);
        Ok(())
    }

    /// The last position delivered ([`Position::ZERO`]-based: `from - 1` before the first).
    pub fn position(&self) -> Position {
        self.delivered
    }
}
