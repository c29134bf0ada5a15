//! The cluster seen as a set of project spaces: which have a stream, asked without creating
//! one (a name in a URL or on a read-only command must never create a project space).

use async_nats::jetstream::{self, context::GetStreamErrorKind, ErrorCode};
use domain::DomainName;
use eventlog::LogError;

use crate::wire::{self, unavailable};
use crate::JetStreamConfig;

/// One connection to the cluster, for questions about its streams.
#[derive(Clone)]
pub struct Streams {
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
    /// [`LogError::Unavailable`] when the cluster cannot be reached.
    pub async fn connect(config: &JetStreamConfig) -> Result<Streams, LogError> {
        let servers: Vec<&str> = config
            .servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let client = async_nats::ConnectOptions::new()
            .request_timeout(Some(config.timeout))
            .connection_timeout(config.timeout)
            .connect(servers)
            .await
            .map_err(unavailable)?;
        Ok(Streams {
            js: jetstream::ContextBuilder::new()
                .timeout(config.timeout)
                .build(client),
        })
    }

    /// Whether `domain` has a stream (a log) on the cluster.
    ///
    /// # Errors
    /// [`LogError::Unavailable`] when the cluster does not answer.
    pub async fn exists(&self, domain: &DomainName) -> Result<bool, LogError> {
        match self.js.get_stream(wire::stream_name(domain)).await {
            Ok(_) => Ok(true),
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(false)
                }
                _ => Err(unavailable(e)),
            },
        }
    }
}
