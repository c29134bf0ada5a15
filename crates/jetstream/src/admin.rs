//! Questions about a cluster that must not change it: does a project space's stream exist?
//!
//! [`crate::JetStreamLog::open`] creates the stream it does not find, which is right for a
//! command that writes; a command that only reads asks [`stream_exists`] first, so that it never
//! leaves an empty stream behind (as it never leaves an empty sled store behind).

use async_nats::jetstream::{self, context::GetStreamErrorKind, ErrorCode};
use domain::DomainName;
use eventlog::LogError;

use crate::wire::{self, unavailable};
use crate::JetStreamConfig;

/// Whether the stream of `domain` exists on the cluster `config` names. Connects, asks for the
/// stream's info and disconnects; creates nothing.
///
/// # Errors
/// [`LogError::Unavailable`] when the cluster cannot be reached or does not answer (no meta
/// leader yet, a timeout), or answers with another error than "stream not found".
pub async fn stream_exists(
    config: &JetStreamConfig,
    domain: &DomainName,
) -> Result<bool, LogError> {
    let servers = config.server_list();
    if servers.is_empty() {
        return Err(LogError::Unavailable("no server URL given".into()));
    }
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(config.timeout))
        .connection_timeout(config.timeout)
        .connect(servers)
        .await
        .map_err(unavailable)?;
    let js = jetstream::ContextBuilder::new()
        .timeout(config.timeout)
        .build(client.clone());
    let answer = js.get_stream(wire::stream_name(domain)).await;
    // Best effort: the answer is known whether or not the goodbye gets through.
    let _ = client.drain().await;
    match answer {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(api)
                if api.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(false)
            }
            _ => Err(unavailable(e)),
        },
    }
}

impl JetStreamConfig {
    /// The server URLs of [`JetStreamConfig::servers`], trimmed, empty ones left out.
    pub fn server_list(&self) -> Vec<&str> {
        self.servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
}
