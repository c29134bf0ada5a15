//! Questions about a cluster that must not change it: does a project space's stream exist?
//!
//! [`crate::JetStreamLog::open`] creates the stream it does not find, which is right for a
//! command that writes; a command that only reads, and a server asked about a name in a URL,
//! ask first ([`stream_exists`], [`Streams::exists`]), so that they never leave an empty stream
//! behind (as they never leave an empty sled store behind).

use async_nats::jetstream::{self, context::GetStreamErrorKind, ErrorCode};
use domain::DomainName;
use eventlog::LogError;

use crate::wire::{self, unavailable};
use crate::JetStreamConfig;

/// One connection to the cluster, for questions about its streams (a server keeps one).
#[derive(Clone)]
pub struct Streams {
    client: async_nats::Client,
    js: jetstream::Context,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams").finish_non_exhaustive()
    }
}

impl Streams {
    /// Connects to the servers `config` names.
    ///
    /// # Errors
    /// [`LogError::Unavailable`] when no URL is given or the cluster cannot be reached.
    pub async fn connect(config: &JetStreamConfig) -> Result<Streams, LogError> {
        let (client, js) = crate::log::connect(config).await?;
        Ok(Streams { client, js })
    }

    /// Whether `domain` has a stream (a log) on the cluster; creates nothing.
    ///
    /// # Errors
    /// [`LogError::Unavailable`] when the cluster does not answer (no meta leader yet, a
    /// timeout), or answers with another error than "stream not found".
    pub async fn exists(&self, domain: &DomainName) -> Result<bool, LogError> {
        match self.js.get_stream(wire::stream_name(domain)).await {
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

    /// Closes the connection, letting what is in flight finish (best effort).
    pub async fn close(self) {
        let _ = self.client.drain().await;
    }
}

/// Whether the stream of `domain` exists on the cluster `config` names. Connects, asks for the
/// stream's info and disconnects; creates nothing.
///
/// # Errors
/// As [`Streams::connect`] and [`Streams::exists`].
pub async fn stream_exists(
    config: &JetStreamConfig,
    domain: &DomainName,
) -> Result<bool, LogError> {
    let streams = Streams::connect(config).await?;
    let answer = streams.exists(domain).await;
    // The answer is known whether or not the goodbye gets through.
    streams.close().await;
    answer
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
