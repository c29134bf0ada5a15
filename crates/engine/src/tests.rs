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
