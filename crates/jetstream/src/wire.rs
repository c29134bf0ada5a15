//! What caseledger puts on the wire and reads back: stream and subject names, headers, publish
//! acknowledgements, and batched direct gets.
//!
//! What must hold: a name built from a project space is a valid stream name and subject token,
//! and two project spaces never share one.

use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use domain::DomainName;
use eventlog::LogError;
use futures_util::StreamExt;

/// JetStream's deduplication id; caseledger sends the idempotency key (or a fresh id).
pub(crate) const MSG_ID: &str = "Nats-Msg-Id";
/// Optimistic concurrency: stored only if the stream's last sequence is this.
pub(crate) const EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";
/// Atomic batch publish (ADR-50, nats-server 2.12+).
pub(crate) const BATCH_ID: &str = "Nats-Batch-Id";
pub(crate) const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
pub(crate) const BATCH_COMMIT: &str = "Nats-Batch-Commit";
/// On the first message of an append: its idempotency key, so the key index can be rebuilt
/// from the stream alone (an atomic batch cannot carry `Nats-Msg-Id`).
pub(crate) const KEY: &str = "Caseledger-Key";
/// On the first message of an append: how many events (messages) it has.
pub(crate) const COUNT: &str = "Caseledger-Count";
/// On a message that carries a form's raw submission after its envelope (an imported format-4
/// entry, `JetStreamLog::append_verbatim`): the length of the envelope, where the raw bytes
/// start. The hash chain covers the envelope only.
pub(crate) const ENVELOPE_LEN: &str = "Caseledger-Envelope-Len";

/// What every stream name of caseledger starts with.
const STREAM_PREFIX: &str = "CASELEDGER_";

/// The stream of a project space: `CASELEDGER_<token>`.
pub(crate) fn stream_name(domain: &DomainName) -> String {
    format!("{STREAM_PREFIX}{}", token(domain.as_str()))
}

/// The project space whose stream is `stream` ([`stream_name`] undone), `None` for a stream
/// caseledger did not name.
pub(crate) fn domain_of(stream: &str) -> Option<DomainName> {
    let token = stream.strip_prefix(STREAM_PREFIX)?;
    let mut bytes = Vec::with_capacity(token.len());
    let mut rest = token.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'_' {
            let (hex, tail) = tail.split_first_chunk::<2>()?;
            let hex = std::str::from_utf8(hex).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = tail;
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    let domain = DomainName::new(String::from_utf8(bytes).ok()?);
    // Only the one spelling `token` gives (upper-case hex, no escaped letters).
    (stream_name(&domain) == stream).then_some(domain)
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
    /// Refused by an expected-last-sequence or expected-last-msg-id check, or delivered to no
    /// stream at all (no responders: right after the stream was created its subject's
    /// interest may not have reached the server this connection goes through yet): nothing
    /// stored.
    Refused(String),
    /// No answer, an error answer, or a lost connection: maybe stored, maybe not.
    Unknown(String),
}

/// Waits for the ack of one publish (async-nats's own request machinery, through the same
/// connection as every other publish, so publishes stay in order and pipeline).
pub(crate) async fn ack(wait: PublishAckFuture) -> Ack {
    match wait.await {
        Ok(ack) => Ack::Stored {
            seq: ack.sequence,
            duplicate: ack.duplicate,
        },
        Err(e) => match e.kind() {
            PublishErrorKind::WrongLastSequence
            | PublishErrorKind::WrongLastMessageId
            | PublishErrorKind::StreamNotFound => Ack::Refused(e.to_string()),
            _ => Ack::Unknown(e.to_string()),
        },
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

    #[test]
    fn a_stream_name_gives_back_its_domain() {
        for name in ["demo", "demo.space", "demo_2Espace", "a b/ü", "x-1", ""] {
            let domain = DomainName::new(name);
            assert_eq!(domain_of(&stream_name(&domain)), Some(domain));
        }
        // Not caseledger's, or not a spelling `stream_name` makes.
        for stream in [
            "KV_config",
            "CASELEDGER_a_2",
            "CASELEDGER_a_zz",
            "CASELEDGER_a_2e",
            "CASELEDGER__61",
        ] {
            assert_eq!(domain_of(stream), None, "{stream}");
        }
    }
}
