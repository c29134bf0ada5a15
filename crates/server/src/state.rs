//! What every request shares: the data dir's sled database, one engine per project space over
//! it, the login throttles, the cache of verified credentials, the metrics and the shutdown
//! signal that ends SSE streams.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use domain::DomainName;
use engine::Engine;
use eventlog::SledLog;

use crate::limit::Limiter;
use crate::{ServerConfig, ServerError};

/// Shared by every handler (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    db: sled::Db,
    pub(crate) config: ServerConfig,
    engines: RwLock<HashMap<DomainName, Arc<Engine>>>,
    /// Held while a project space's engine is opened, so it is opened once.
    opening: Mutex<()>,
    /// The JetStream cluster's streams, when the logs of record are there
    /// ([`ServerConfig::store`]); the engines are then replicas.
    streams: Option<jetstream::Streams>,
    /// [`Inner::opening`] for replicas, which open asynchronously.
    opening_replica: tokio::sync::Mutex<()>,
    /// The tasks keeping each replica up with its stream.
    followers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Failed logins by client address.
    pub(crate) by_address: Limiter,
    /// Failed logins by project space and login.
    pub(crate) by_login: Limiter,
    /// SHA-256 of (project space, scheme, login, secret) → the stored hash it verified against:
    /// a client presenting the same credentials again skips argon2 while that hash is still the
    /// one on record (a new password or a revocation changes or removes it).
    pub(crate) verified: Mutex<HashMap<[u8; 32], String>>,
    /// Request, append and subscriber figures for `/metrics`.
    pub(crate) metrics: crate::metrics::Metrics,
    /// Turns true when the server begins to shut down: SSE streams end cleanly on it, so the
    /// graceful shutdown does not wait for them forever.
    pub(crate) shutdown: tokio::sync::watch::Sender<bool>,
}

/// Entries of [`Inner::verified`] beyond which it is cleared.
pub(crate) const VERIFIED_MAX: usize = 10_000;

impl AppState {
    /// Opens the sled database of `dir` and the engine of every project space that has a log.
    pub(crate) fn open(dir: &Path, config: ServerConfig) -> Result<Self, ServerError> {
        let db = Engine::open_db(dir, &config.engine)?;
        let state = Self::with_db(dir, db, config, None);
        for domain in SledLog::domains(&state.inner.db) {
            state.open_engine(&domain)?;
        }
        Ok(state)
    }

    /// Connects to the JetStream cluster of [`ServerConfig::store`] and opens the replica of
    /// every project space the data dir already holds one of, each caught up from its
    /// checkpoint; others open on first use.
    pub(crate) async fn open_replicas(
        dir: &Path,
        config: ServerConfig,
        store: &jetstream::JetStreamConfig,
    ) -> Result<Self, ServerError> {
        let streams = jetstream::Streams::connect(store)
            .await
            .map_err(|e| ServerError::Engine(e.into()))?;
        let owned = dir.to_path_buf();
        let engine_config = config.engine.clone();
        let db = tokio::task::spawn_blocking(move || Engine::open_db(&owned, &engine_config))
            .await
            .map_err(|e| ServerError::Internal(format!("opening the store: {e}")))??;
        let state = Self::with_db(dir, db, config, Some(streams));
        for domain in SledLog::domains(&state.inner.db) {
            state.open_replica(&domain).await?;
        }
        Ok(state)
    }

    fn with_db(
        dir: &Path,
        db: sled::Db,
        config: ServerConfig,
        streams: Option<jetstream::Streams>,
    ) -> Self {
        AppState {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                db,
                by_address: Limiter::new(config.login_limit),
                by_login: Limiter::new(config.login_limit),
                config,
                engines: RwLock::new(HashMap::new()),
                opening: Mutex::new(()),
                verified: Mutex::new(HashMap::new()),
                metrics: crate::metrics::Metrics::default(),
                shutdown: tokio::sync::watch::Sender::new(false),
                streams,
                opening_replica: tokio::sync::Mutex::new(()),
                followers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The engine of `domain`, opened on first use; `None` when the store holds no such
    /// project space (nothing is created for a name in a URL).
    pub async fn engine(&self, domain: &DomainName) -> Result<Option<Arc<Engine>>, ServerError> {
        if let Some(e) = self.read_engines().get(domain) {
            return Ok(Some(Arc::clone(e)));
        }
        if let Some(streams) = &self.inner.streams {
            let exists = streams
                .exists(domain)
                .await
                .map_err(|e| ServerError::Engine(e.into()))?;
            return match exists {
                true => Ok(Some(self.open_replica(domain).await?)),
                false => Ok(None),
            };
        }
        if !SledLog::domains(&self.inner.db).contains(domain) {
            return Ok(None);
        }
        // Opening catches projections up: blocking work.
        let engine = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.open_engine(domain))?
            }
            _ => self.open_engine(domain)?,
        };
        Ok(Some(engine))
    }

    /// Every open engine, by project space.
    pub fn engines(&self) -> Vec<(DomainName, Arc<Engine>)> {
        self.read_engines()
            .iter()
            .map(|(d, e)| (d.clone(), Arc::clone(e)))
            .collect()
    }

    fn read_engines(&self) -> std::sync::RwLockReadGuard<'_, HashMap<DomainName, Arc<Engine>>> {
        match self.inner.engines.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Opens the replica of `domain` over its stream (once), catches it up and starts its
    /// follower.
    async fn open_replica(&self, domain: &DomainName) -> Result<Arc<Engine>, ServerError> {
        let _opening = self.inner.opening_replica.lock().await;
        if let Some(e) = self.read_engines().get(domain) {
            return Ok(Arc::clone(e));
        }
        let Some(store) = self.inner.config.store.clone() else {
            return Err(ServerError::Internal(
                "a replica opened without a JetStream store".into(),
            ));
        };
        let log = jetstream::JetStreamLog::open(store, domain)
            .await
            .map_err(|e| ServerError::Engine(e.into()))?;
        let engine = Arc::new(
            Engine::open_replica_in(
                self.inner.db.clone(),
                &self.inner.dir,
                domain,
                self.inner.config.engine.clone(),
                Arc::new(log),
            )
            .await?,
        );
        if matches!(
            engine.upgrade_status(),
            engine::UpgradeStatus::Needed { .. }
        ) {
            drop(engine.upgrade_in_background()?);
        }
        let follower = engine.follow();
        match self.inner.followers.lock() {
            Ok(mut f) => f.push(follower),
            Err(poisoned) => poisoned.into_inner().push(follower),
        }
        tracing::info!(domain = %domain, head = engine.log().written_head().0, "project space replica open");
        let mut engines = match self.inner.engines.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        engines.insert(domain.clone(), Arc::clone(&engine));
        Ok(engine)
    }

    /// Stops the replicas' followers (at shutdown).
    pub(crate) fn stop_followers(&self) {
        let followers = match self.inner.followers.lock() {
            Ok(mut f) => std::mem::take(&mut *f),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for f in followers {
            f.abort();
        }
    }

    fn open_engine(&self, domain: &DomainName) -> Result<Arc<Engine>, ServerError> {
        let _opening = match self.inner.opening.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(e) = self.read_engines().get(domain) {
            return Ok(Arc::clone(e));
        }
        let engine = Arc::new(Engine::open_in(
            self.inner.db.clone(),
            &self.inner.dir,
            domain,
            self.inner.config.engine.clone(),
        )?);
        // Projections of other rules answer meanwhile (I13).
        if matches!(
            engine.upgrade_status(),
            engine::UpgradeStatus::Needed { .. }
        ) {
            drop(engine.upgrade_in_background()?);
        }
        tracing::info!(domain = %domain, "project space open");
        let mut engines = match self.inner.engines.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        engines.insert(domain.clone(), Arc::clone(&engine));
        Ok(engine)
    }
}
