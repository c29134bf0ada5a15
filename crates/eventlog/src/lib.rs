//! The durable, append-only event log of caseledger, on sled 0.34.7.
//!
//! - [`EventStore`] is the contract the engine and projections use: [`EventStore::append`]
//!   (durable before it returns, I5), [`EventStore::read`], [`EventStore::head`] and
//!   [`EventStore::subscribe`] (catch-up, then live, as a [`Subscription`]).
//! - [`SledLog`] implements it for one project space in tree `log/<domain>` of a sled `Db` shared
//!   with the projections. `append` is group-committed: a committer task writes queued appends
//!   as one sled batch and flushes once per group. The synchronous half ([`SledLog::write`],
//!   [`SledLog::write_group`], [`SledLog::flush_blocking`], [`SledLog::iter_from`]) serves the
//!   engine, replay and tools, with [`SledLog::wait_durable`] as their group commit.
//! - [`encode_envelope`] / [`decode_envelope`] are the stored form of one event.
//! - [`chain`]: every entry is chained by SHA-256 to the one before ([`chain_hash`]);
//!   [`SledLog::verify`] checks it, [`SledLog::pin_head_file`] keeps the acknowledged head outside
//!   sled so that a lost tail is found (`docs/AUDIT.md`).
//!
//! The log *is*: the single source of truth (I2), gapless positions from 1, one atomic sled batch
//! per append (events plus idempotency entry), crc32 on every event, a hash chain over every
//! entry, poisoned after a failed write or flush. It is *not*: a place for snapshots or
//! projection state, proof against someone who rewrites the whole store and its head file, or
//! proof against power loss on a disk with a volatile write cache (`docs/DURABILITY.md`).
//!
//! # Envelope formats 3 and 4
//!
//! `[format u8 = 3][crc32 u32 LE of the rest][previous chain hash, 32 bytes][body encoding u8]
//! [type name len u8][type name][type version u16 LE][recorded_at i64 LE][body]`, the body being
//! bincode 2 standard(RecordedEvent), LZ4-compressed from 256 bytes. Format 4 is a form event
//! whose raw submission is stored out of line ([`raw`], [`SledLog::store_raw_in`]): format 3
//! with `[raw length u64 LE][raw SHA-256, 32 bytes]` after the body encoding, and the form's
//! bytes left out of the body. Formats 1 and 2 (no previous hash) stay readable. The header lets an audit tool see type and version
//! ([`decode_header`]) without decoding the body; a crc mismatch is [`LogError::Corrupt`] naming
//! the position. The full table is in `envelope.rs`.
//!
//! # Example
//!
//! ```ignore
//! let db = sled::open(path)?;
//! let log = SledLog::open(&db, &DomainName::new("demo"), LogConfig::default())?;
//! let outcome = log
//!     .append(AppendRequest {
//!         expected: Expected::Head(Position::ZERO),
//!         idempotency_key: Some(command_id.to_string()),
//!         command_id,
//!         recorded_at,
//!         events,
//!     })
//!     .await?; // durable here
//! let mut sub = log.subscribe(Position(1)).await?;
//! let first = sub.next().await?;
//! ```

pub mod chain;
mod commit;
mod envelope;
mod error;
pub mod raw;
mod sled_log;
mod store;
mod subscription;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_chain;
#[cfg(test)]
mod tests_raw;

pub use chain::{
    chain_hash, head_file_name, read_head_file, AcknowledgedHead, Chain, ChainEntry, Hash,
    Verified, GENESIS,
};
pub use envelope::{
    decode_envelope, decode_header, encode_envelope, encode_envelope_chained, encode_event_chained,
    EnvelopeHeader, COMPRESS_FROM, DETACHED_FORMAT, ENVELOPE_FORMAT, LZ4_FORMAT, MAX_BODY,
    PLAIN_FORMAT,
};
pub use error::LogError;
pub use sled_log::{LogConfig, SledLog, VerbatimEntry};
pub use store::{AppendOutcome, AppendRequest, EventStore, Expected};
pub use subscription::{Subscription, SubscriptionSource};
