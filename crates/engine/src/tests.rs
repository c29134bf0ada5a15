//! Engine tests: end-to-end command handling over a temporary store.

use super::*;

#[test]
fn an_engine_releases_its_store_when_dropped() {
    let dir = tempfile::tempdir().expect("tmp");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    {
        let engine = Engine::open(dir.path(), &"d".into(), EngineConfig::default()).expect("open");
        let cmd = Command::CreateUser {
            id: "u1".into(),
            username: "u1".into(),
        };
        rt.block_on(engine.execute(Request::new(cmd)))
            .expect("execute");
    }
    let reopened = Engine::open(dir.path(), &"d".into(), EngineConfig::default()).expect("reopen");
    assert_eq!(reopened.log().written_head(), Position(1));
    assert_eq!(reopened.projections().checkpoint(), Position(1));
}

#[test]
fn a_store_held_by_a_live_engine_cannot_be_opened_twice() {
    let dir = tempfile::tempdir().expect("tmp");
    let _held = Engine::open(dir.path(), &"d".into(), EngineConfig::default()).expect("open");
    let started = std::time::Instant::now();
    let second = Engine::open(dir.path(), &"d".into(), EngineConfig::default());
    assert!(matches!(second, Err(EngineError::Storage(_))));
    assert!(
        started.elapsed() >= LOCK_WAIT,
        "waited for the lock before failing"
    );
}

#[test]
fn reopening_right_after_a_drop_waits_for_sleds_background_writes() {
    let dir = tempfile::tempdir().expect("tmp");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    for round in 0..20u64 {
        let engine = Engine::open(dir.path(), &"d".into(), EngineConfig::default()).expect("open");
        let cmd = Command::CreateUser {
            id: format!("u{round}").as_str().into(),
            username: "u".into(),
        };
        rt.block_on(engine.execute(Request::new(cmd)))
            .expect("execute");
        assert_eq!(engine.log().written_head(), Position(round + 1));
    }
}
