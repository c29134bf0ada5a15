//! The event log of caseledger on NATS JetStream: the same [`eventlog::EventStore`] contract as
//! the embedded sled log, on a replicated cluster.
//!
//! - [`JetStreamLog`] is the log of one project space: one stream, its sequence the gapless
//!   position, each message the envelope bytes [`eventlog::SledLog`] would store for the same
//!   append (format 3, raw submission inline), so the hash chain and its head are the same.
//!   [`JetStreamLog::append_verbatim`] imports another log's stored entries as they are (a
//!   format-4 envelope with its raw submission after it in the same message), so a store moves
//!   between sled and JetStream with the same head hash; [`JetStreamLog::domains`] lists the
//!   project spaces a cluster holds.
//! - [`stream_exists`] asks whether a project space has a stream, creating nothing (what a
//!   command that only reads asks before it opens the log).
//! - [`cluster::Cluster`] starts, kills and restarts a local cluster of `nats-server`s from the
//!   shipped config (`deploy/nats/cluster.conf`), for tests and benches.
//!
//! It *is*: optimistic concurrency by `Nats-Expected-Last-Sequence`, idempotency by a key index
//! rebuilt from the stream (with `Nats-Msg-Id` as the server's own guard on a lone message),
//! group commit by atomic batches, acknowledged only after the stream's quorum stored (and,
//! with the shipped `sync_interval: always`, fsynced) the messages. It is *not*: a place to delete or
//! rewrite messages (the stream denies both), nor faster than the cluster's round trip.
//! `docs/DURABILITY.md` ("JetStream") says exactly what is promised.
//!
//! # Example
//!
//! ```ignore
//! let log = JetStreamLog::open(JetStreamConfig::new("nats://127.0.0.1:4222"), &domain).await?;
//! let outcome = log.append(request).await?; // on a quorum's disks here
//! let mut sub = log.subscribe(Position(1)).await?;
//! ```

mod admin;
pub mod cluster;
mod log;
mod message;
mod wire;

pub use admin::{stream_exists, Streams};
pub use log::{JetStreamConfig, JetStreamLog};
