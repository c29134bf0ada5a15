//! [`Subscription`]: durable events from a position on, catch-up then live.
//!
//! What must hold: events come out in position order with no gaps and no repeats, and only once
//! they are durable; [`Subscription::next`] is cancel-safe (dropping its future loses nothing), so
//! it can sit in a `tokio::select!`.

use std::collections::VecDeque;

use domain::{Position, RecordedEvent};

use crate::sled_log::SUBSCRIPTION_PAGE;
use crate::{LogError, SledLog};

/// A cursor over the durable log that waits for new events at the end.
///
/// Catch-up reads pages of 256 events from sled; at the head it waits on the log's flush
/// notifications, so a live event arrives right after the group commit that made it durable.
/// To resume after a restart, store [`Subscription::position`] and subscribe from the one after.
#[derive(Debug)]
pub struct Subscription {
    log: SledLog,
    /// Next position to read from sled.
    next: Position,
    /// Last position handed out.
    delivered: Position,
    buffer: VecDeque<RecordedEvent>,
    durable: tokio::sync::watch::Receiver<u64>,
}

impl Subscription {
    pub(crate) fn new(log: SledLog, from: Position) -> Subscription {
        let next = from.max(Position(1));
        let durable = log.watch_durable();
        Subscription {
            log,
            next,
            delivered: Position(next.0 - 1),
            buffer: VecDeque::new(),
            durable,
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
            self.log.check_poison()?;
            if self.next <= self.log.durable_head() {
                let page = self.log.read_durable(self.next, SUBSCRIPTION_PAGE).await?;
                let Some(last) = page.last() else {
                    return Err(LogError::corrupt(
                        self.next,
                        "missing below the durable head",
                    ));
                };
                self.next = last.position.next();
                self.buffer.extend(page);
                continue;
            }
            let want = self.next.0;
            let log = &self.log;
            self.durable
                .wait_for(|durable| *durable >= want || log.is_poisoned())
                .await
                // The sender lives as long as the log, which this subscription holds.
                .map_err(|_| LogError::Poisoned)?;
        }
    }

    /// The last position delivered ([`Position::ZERO`]-based: `from - 1` before the first).
    pub fn position(&self) -> Position {
        self.delivered
    }
}
