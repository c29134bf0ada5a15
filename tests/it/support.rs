//! Helpers shared by the integration tests.

use std::path::PathBuf;

use caseledger::{Engine, EngineConfig};

/// A fresh engine in a temporary directory (kept alive by the returned guard).
pub fn engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), &"demo".into(), EngineConfig::default()).expect("open");
    (dir, engine)
}

/// The project's copy of the conformance suite.
pub fn conformance_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance")
}

/// A current-thread runtime for async engine calls.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}
