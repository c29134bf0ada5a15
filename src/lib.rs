//! caseledger: an event-sourced CommCare case store with case sharing and CQRS projections.
//!
//! This facade re-exports the crates under `crates/` (OpenRosa restore payloads are the
//! `restore` crate) and adds what the binary and the integration tests share: JSON views of
//! cases ([`view`]) and the seed-story demo ([`demo`]).
//!
//! ```ignore
//! let engine = caseledger::Engine::open(dir, &"demo".into(), Default::default())?;
//! let outcome = engine.submit(xml_bytes, Some("app-anc".into()), None).await?;
//! ```

pub mod audit;
pub mod demo;
pub mod view;

pub use casexml;
pub use domain;
pub use engine::{
    AsOf, Engine, EngineConfig, EngineError, Outcome, ReplayStats, Request, SubmitOutcome,
    SubmitStatus, UpgradeStatus,
};
pub use eventlog;
pub use projections;
pub use restore;
