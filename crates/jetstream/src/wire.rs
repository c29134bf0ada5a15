//! What caseledger puts on the wire and reads back: stream and subject names, headers, publish
//! acknowledgements (through one reply subscription, so publishes pipeline), and batched
//! direct gets.
//!
//! What must hold: a name built from a project space is a valid stream name and subject token,
//! and two project spaces never share one; an ack is matched to its publish by its reply
//! subject alone, never by arrival order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use domain::DomainName;
use eventlog::LogError;
use futures_util::StreamExt;
use tokio::sync::oneshot;

/// JetStream's deduplication id; caseledger sends the idempotency key (or a fresh id).
pub(crate) const MSG_ID: &str = "Nats-Msg-Id";
/// Optimistic concurrency: stored only if the stream's last sequence is this.
pub(crate) const EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";
/// Stored only if the stream's last message carries this `Nats-Msg-Id`: chains pipelined
/// publishes to each other (see `log.rs`).
pub(crate) const EXPECTED_LAST_MSG_ID: &str = "Nats-Expected-Last-Msg-Id";
/// Atomic batch publish (ADR-50, nats-server 2.12+).
pub(crate) const BATCH_ID: &str = "Nats-Batch-Id";
pub(crate) const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
pub(crate) const BATCH_COMMIT: &str = "Nats-Batch-Commit";
/// On the first message of an append: its idempotency key, so the key index can be rebuilt
/// from the stream alone (an atomic batch cannot carry `Nats-Msg-Id`).
pub(crate) const KEY: &str = "Caseledger-Key";
/// On the first message of an append: how many events (messages) it has.
pub(crate) const COUNT: &str = "Caseledger-Count";

/// The stream of a project space: `CASELEDGER_<token>`.
pub(crate) fn stream_name(domain: &DomainName) -> String {
    format!("CASELEDGER_{}", token(domain.as_str()))
}

/// The one subject of a project space's stream: `caseledger.<token>.log`.
pub(crate) fn subject(domain: &DomainName) -> String {
    format!("caseledger.{}.log", token(domain.as_str()))
}

/// ASCII letters, digits and `-` as they are; every other byte as `_` and two hex digits, so
/// the token is valid in stream names and subjects and the mapping is one to one.
fn token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

/// What the stream answered to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ack {
    /// Stored (by the quorum) at `seq`; `duplicate` when JetStream recognised the
    /// `Nats-Msg-Id` and stored nothing new (`seq` is the original's).
    Stored { seq: u64, duplicate: bool },
    /// Refused by an expected-last-sequence or expected-last-msg-id check: nothing stored.
    Refused(String),
    /// No answer, an error answer, or a lost connection: maybe stored, maybe not.
    Unknown(String),
}

#[derive(serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(serde::Deserialize)]
struct PubAck {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    error: Option<ApiError>,
}

/// JetStream's error codes for a failed expectation (`JSStreamWrongLastSequenceErrF`,
/// `JSStreamWrongLastMsgIDErrF`); atomic batches report the same ones.
const WRONG_LAST_SEQUENCE: u64 = 10071;
const WRONG_LAST_MSG_ID: u64 = 10070;

fn parse_ack(message: &async_nats::Message) -> Ack {
    if let Some(status) = message.status {
        if message.payload.is_empty() {
            // 503: no responders (no stream leader yet); the message reached no stream.
            return Ack::Unknown(format!("status {}", status.as_u16()));
        }
    }
    match serde_json::from_slice::<PubAck>(&message.payload) {
        Ok(PubAck {
            error: Some(error), ..
        }) => {
            if error.err_code == WRONG_LAST_SEQUENCE
                || error.err_code == WRONG_LAST_MSG_ID
                || error.description.contains("wrong last")
            {
                Ack::Refused(error.description)
            } else {
                Ack::Unknown(format!("{} ({})", error.description, error.err_code))
            }
        }
        Ok(PubAck {
            seq: Some(seq),
            duplicate,
            error: None,
        }) => Ack::Stored { seq, duplicate },
        Ok(_) => Ack::Unknown("an ack without a sequence".into()),
        Err(e) => Ack::Unknown(format!("an ack that does not parse: {e}")),
    }
}

/// Routes publish acks from one wildcard reply subscription to their waiters.
pub(crate) struct Acks {
    prefix: String,
    next: AtomicU64,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<Ack>>>>,
}

impl Acks {
    /// Subscribes to `<inbox>.*` and starts the task that hands acks to their waiters; the task
    /// ends with the client.
    pub(crate) async fn start(client: &Client) -> Result<Acks, LogError> {
        let prefix = client.new_inbox();
        let mut subscriber = client
            .subscribe(format!("{prefix}.*"))
            .await
            .map_err(unavailable)?;
        let waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<Ack>>>> = Arc::default();
        let routes = Arc::clone(&waiting);
        tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                let Some(id) = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|id| id.parse::<u64>().ok())
                else {
                    continue;
                };
                let waiter = routes.lock().ok().and_then(|mut w| w.remove(&id));
                if let Some(waiter) = waiter {
                    // A waiter that gave up (timeout) dropped its receiver; nothing to do.
                    let _ = waiter.send(parse_ack(&message));
                }
            }
        });
        Ok(Acks {
            prefix,
            next: AtomicU64::new(1),
            waiting,
        })
    }

    /// A fresh reply subject and the receiver its ack will arrive on.
    pub(crate) fn expect(&self) -> (String, AckWait) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(id, tx);
        }
        (
            format!("{}.{id}", self.prefix),
            AckWait {
                id,
                rx,
                waiting: Arc::clone(&self.waiting),
            },
        )
    }
}

/// The ack of one publish, awaited later (pipelining).
pub(crate) struct AckWait {
    id: u64,
    rx: oneshot::Receiver<Ack>,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<Ack>>>>,
}

impl AckWait {
    /// The ack, or [`Ack::Unknown`] after `timeout`.
    pub(crate) async fn wait(self, timeout: Duration) -> Ack {
        let answer = match tokio::time::timeout(timeout, self.rx).await {
            Ok(Ok(ack)) => ack,
            Ok(Err(_)) => Ack::Unknown("the ack router stopped".into()),
            Err(_) => Ack::Unknown(format!("no ack within {timeout:?}")),
        };
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(&self.id);
        }
        answer
    }
}

/// One message read back: its sequence, headers and payload.
pub(crate) struct Stored {
    pub(crate) seq: u64,
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
}

/// The largest page one batched direct get asks for.
pub(crate) const DIRECT_BATCH: usize = 256;
/// The byte budget of one batched direct get (the server still sends at least one message).
const DIRECT_MAX_BYTES: usize = 32 << 20;

/// Messages from `from` on, at most `batch` (≤ [`DIRECT_BATCH`]), by one batched direct get
/// (ADR-31, `allow_direct`). Any replica may answer, so the page can end before the leader's
/// last sequence; it is empty past the end of the stream.
pub(crate) async fn direct_batch(
    client: &Client,
    stream: &str,
    from: u64,
    batch: usize,
    timeout: Duration,
) -> Result<Vec<Stored>, LogError> {
    let inbox = client.new_inbox();
    let mut subscriber = client.subscribe(inbox.clone()).await.map_err(unavailable)?;
    let request = serde_json::json!({
        "seq": from,
        "batch": batch.min(DIRECT_BATCH),
        "max_bytes": DIRECT_MAX_BYTES,
    });
    let payload = Bytes::from(request.to_string());
    client
        .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, payload)
        .await
        .map_err(unavailable)?;
    let mut out = Vec::new();
    loop {
        let message = match tokio::time::timeout(timeout, subscriber.next()).await {
            Ok(Some(message)) => message,
            Ok(None) => return Err(LogError::Unavailable("the connection closed".into())),
            Err(_) => {
                return Err(LogError::Unavailable(format!(
                    "direct get from {from}: no answer within {timeout:?}"
                )))
            }
        };
        let sequence = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
            .map(|v| v.as_str().parse::<u64>());
        match (message.status, sequence) {
            (_, Some(Ok(seq))) => out.push(Stored {
                seq,
                headers: message.headers.unwrap_or_default(),
                payload: message.payload,
            }),
            (_, Some(Err(e))) => {
                return Err(LogError::Unavailable(format!(
                    "direct get: a bad Nats-Sequence: {e}"
                )))
            }
            // 404: nothing at or after `from`; 204 (or no sequence): end of batch.
            (Some(status), None) if status.as_u16() == 404 => return Ok(out),
            (Some(status), None) if status.as_u16() >= 400 && status.as_u16() != 404 => {
                return Err(LogError::Unavailable(format!(
                    "direct get from {from}: status {} {}",
                    status.as_u16(),
                    message.description.unwrap_or_default()
                )))
            }
            (_, None) => return Ok(out),
        }
    }
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_and_one_to_one() {
        let a = DomainName::new("demo.space");
        let b = DomainName::new("demo_2Espace");
        assert_eq!(stream_name(&a), "CASELEDGER_demo_2Espace");
        assert_eq!(subject(&a), "caseledger.demo_2Espace.log");
        assert_ne!(stream_name(&a), stream_name(&b));
    }
}
