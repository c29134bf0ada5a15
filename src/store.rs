//! `--store` (`$CASELEDGER_STORE`): where the log of record is (issue 11).
//!
//! `sled` (the default) is the store in the data dir. `nats://HOST:PORT[,HOST:PORT…]` is a
//! JetStream cluster: each project space's stream is its log, and the data dir holds only this
//! process's replica of it with the projections (`Engine::open_replica`), so every command runs
//! the same code on the replica after it pulled what the stream holds.
//!
//! What must hold: a malformed value is a usage error naming what is wrong, before anything is
//! opened; a command that only reads never creates a stream ([`require_stream`]), as it never
//! creates a sled store.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use caseledger::domain::DomainName;
use jetstream::{JetStreamConfig, JetStreamLog};

use crate::fail::{fail, Code};

/// Where the log of record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Store {
    /// The sled store in the data dir.
    Sled,
    /// A JetStream cluster, by its client URLs (`nats://HOST:PORT` each, at least one).
    Nats(Vec<String>),
}

/// What `--store` takes, for error messages.
const FORMS: &str = "--store takes sled or nats://HOST:PORT[,HOST:PORT...]";

/// Parses a `--store` value (clap's value parser): `sled`, or `nats://` followed by a
/// comma-separated list of `HOST:PORT`, each of which may repeat the `nats://` prefix.
pub(crate) fn parse(text: &str) -> Result<Store, String> {
    if text == "sled" {
        return Ok(Store::Sled);
    }
    let Some(list) = text.strip_prefix("nats://") else {
        return Err(format!(
            "{text:?} is neither sled nor a nats:// URL; {FORMS}"
        ));
    };
    let mut servers = Vec::new();
    for item in list.split(',') {
        let item = item.trim();
        let address = item.strip_prefix("nats://").unwrap_or(item);
        servers.push(format!("nats://{}", address_of(address)?));
    }
    Ok(Store::Nats(servers))
}

/// Checks one `HOST:PORT` of the list and returns it as it is.
fn address_of(item: &str) -> Result<&str, String> {
    if item.is_empty() {
        return Err(format!("the server list has an empty entry; {FORMS}"));
    }
    if let Some((scheme, _)) = item.split_once("://") {
        return Err(format!(
            "{item:?} is a {scheme}:// URL, but every server is nats://; {FORMS}"
        ));
    }
    let Some((host, port)) = item.rsplit_once(':') else {
        return Err(format!("{item:?} has no port; {FORMS}"));
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // An IPv6 address in brackets: [::1]:4222.
        Some(v6) => !v6.is_empty() && v6.chars().all(|c| c.is_ascii_hexdigit() || c == ':'),
        None => {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        }
    };
    if !host_ok {
        return Err(format!(
            "{item:?} is not HOST:PORT (a host name or address, then a port); {FORMS}"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(item),
        _ => Err(format!(
            "{item:?} has port {port:?}, not a number from 1 to 65535; {FORMS}"
        )),
    }
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Store::Sled => f.write_str("sled"),
            Store::Nats(servers) => f.write_str(&servers.join(",")),
        }
    }
}

impl Store {
    /// The JetStream cluster to use, or `None` for the sled store in the data dir.
    pub(crate) fn jetstream(&self) -> Option<JetStreamConfig> {
        match self {
            Store::Sled => None,
            Store::Nats(servers) => Some(JetStreamConfig::new(servers.join(","))),
        }
    }
}

/// Fails with `no_store` unless the stream of `domain` exists on the cluster: what a command
/// that only reads checks instead of a store in the data dir. Creates nothing.
pub(crate) async fn require_stream(config: &JetStreamConfig, domain: &DomainName) -> Result<()> {
    let exists = jetstream::stream_exists(config, domain)
        .await
        .with_context(|| {
            format!(
                "asking the JetStream cluster {} for the stream of {domain}",
                config.servers
            )
        })?;
    if exists {
        return Ok(());
    }
    Err(fail(
        Code::NoStore,
        format!(
            "the project space {domain} has no stream on {}; check --domain and --store, or \
             create it with a command that writes (user create, submit)",
            config.servers
        ),
    ))
}

/// Opens the stream of `domain` on the cluster (creating it if it does not exist: only for a
/// command that writes, or after [`require_stream`]).
pub(crate) async fn connect(
    config: &JetStreamConfig,
    domain: &DomainName,
) -> Result<Arc<JetStreamLog>> {
    JetStreamLog::open(config.clone(), domain)
        .await
        .map(Arc::new)
        .with_context(|| {
            format!(
                "opening the stream of {domain} on the JetStream cluster {}",
                config.servers
            )
        })
}

/// Creates the data dir that holds the replica, if it is missing.
pub(crate) fn data_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data dir {} for the replica", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats(servers: &[&str]) -> Store {
        Store::Nats(servers.iter().map(|s| (*s).to_owned()).collect())
    }

    /// Issue 11: `--store sled` or `nats://HOST:PORT[,HOST:PORT…]`, each server with or without
    /// its own `nats://`.
    #[test]
    fn parses_sled_and_lists_of_nats_servers() {
        assert_eq!(parse("sled"), Ok(Store::Sled));
        assert_eq!(
            parse("nats://127.0.0.1:4222"),
            Ok(nats(&["nats://127.0.0.1:4222"]))
        );
        assert_eq!(
            parse("nats://a.example:4222,nats://b.example:4223, c-3:4224"),
            Ok(nats(&[
                "nats://a.example:4222",
                "nats://b.example:4223",
                "nats://c-3:4224"
            ]))
        );
        assert_eq!(parse("nats://[::1]:4222"), Ok(nats(&["nats://[::1]:4222"])));
        let store = parse("nats://n1:1,n2:2").expect("parses");
        assert_eq!(store.to_string(), "nats://n1:1,nats://n2:2");
        assert_eq!(
            store.jetstream().map(|c| c.servers),
            Some("nats://n1:1,nats://n2:2".to_owned())
        );
        assert_eq!(Store::Sled.jetstream(), None);
    }

    /// Issue 11: a malformed value is refused with one sentence saying what is wrong and what
    /// `--store` takes.
    #[test]
    fn refuses_malformed_values_saying_why() {
        for (value, says) in [
            ("", "neither sled nor a nats:// URL"),
            ("SLED", "neither sled nor a nats:// URL"),
            ("redis://h:1", "neither sled nor a nats:// URL"),
            ("nats://", "an empty entry"),
            ("nats://h:1,", "an empty entry"),
            ("nats://h:1,,h:2", "an empty entry"),
            ("nats://host", "has no port"),
            ("nats://h:1,tls://h:2", "a tls:// URL"),
            ("nats://:4222", "is not HOST:PORT"),
            ("nats://user:pw@h:4222", "is not HOST:PORT"),
            ("nats://h/x:4222", "is not HOST:PORT"),
            ("nats://[]:4222", "is not HOST:PORT"),
            ("nats://h:0", "not a number from 1 to 65535"),
            ("nats://h:65536", "not a number from 1 to 65535"),
            ("nats://h:42x", "not a number from 1 to 65535"),
            ("nats://h:", "not a number from 1 to 65535"),
        ] {
            let err = parse(value).expect_err(value);
            assert!(err.contains(says), "{value:?}: {err}");
            assert!(err.ends_with(FORMS), "{value:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{value:?}: {err}");
        }
    }
}
