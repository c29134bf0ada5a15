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
        let state = AppState {
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
            }),
        };
        for domain in SledLog::domains(&state.inner.db) {
            state.open_engine(&domain)?;
        }
        Ok(state)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The engine of `domain`, opened on first use; `None` when the data dir holds no such
    /// project space (nothing is created for a name in a URL).
    pub fn engine(&self, domain: &DomainName) -> Result<Option<Arc<Engine>>, ServerError> {
        if let Some(e) = self.read_engines().get(domain) {
            return Ok(Some(Arc::clone(e)));
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
