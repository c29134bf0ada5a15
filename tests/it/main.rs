//! The one integration test binary: everything that crosses crates.
//!
//! Modules: `conformance` (the data-driven CommCare suite), `stories` (the seed page's stories
//! through the facade), `cli` (the command-line contract), `damage` (damaged stores, I10),
//! `replay` (replay == live, I3), `audit` (verify, export, import, I12), `timetravel` (I11),
//! `upgrade` (projections of other rules answer while their rebuild is built beside them),
//! `server` (the HTTP server's doors: authentication, roles, the receiver, restore, shutdown),
//! `server_crash` (SIGKILL during a submission storm loses and doubles nothing).
//! `api` (caseledger's own API: read-your-writes, SSE, OpenAPI, metrics). The JetStream tests
//! are a binary of their own (`tests/jetstream.rs`), so they run alone.

mod api;
mod audit;
mod cli;
mod concurrency;
mod conformance;
mod damage;
mod data_api;
mod errors;
mod fixtures;
mod replay;
mod restore;
mod server;
mod server_crash;
mod stories;
mod support;
mod timetravel;
mod upgrade;
