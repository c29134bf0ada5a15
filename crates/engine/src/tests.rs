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

#[test]
fn a_retried_command_id_is_answered_with_the_first_attempts_events() {
    let dir = tempfile::tempdir().expect("tmp");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let engine = Engine::open(dir.path(), &"d".into(), EngineConfig::default()).expect("open");
    let request = Request::idempotent(
        Command::CreateUser {
            id: "u1".into(),
            username: "u1".into(),
        },
        CommandId::new("client-key-1"),
    );
    let first = rt.block_on(engine.execute(request.clone())).expect("first");
    // Same id again, alone and twice inside one group: no new event, same positions.
    let again = rt.block_on(engine.execute(request.clone())).expect("retry");
    assert_eq!(again.events, first.events);
    let group = rt
        .block_on(engine.execute_many(vec![
            Request::new(Command::CreateUser {
                id: "u2".into(),
                username: "u2".into(),
            }),
            request,
        ]))
        .expect("group");
    assert_eq!(group.len(), 2);
    assert!(matches!(&group[1], Ok(o) if o.events == first.events));
    assert_eq!(engine.log().written_head(), Position(2));
    // Without the idempotent flag the same id is a new command (refused: the user exists).
    let mut plain = Request::new(Command::CreateUser {
        id: "u1".into(),
        username: "u1".into(),
    });
    plain.command_id = CommandId::new("client-key-1");
    assert!(rt.block_on(engine.execute(plain)).is_err());
    // Without the idempotent flag the same id is a new command (refused: the user exists).
    let mut plain = Request::new(Command::CreateUser {
        id: "u1".into(),
        username: "u1".into(),
    });
    plain.command_id = CommandId::new("client-key-1");
    assert!(rt.block_on(engine.execute(plain)).is_err());
}

#[test]
fn commands_of_one_group_see_each_other_and_share_one_flush() {
    let dir = tempfile::tempdir().expect("tmp");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let engine = Engine::open(dir.path(), &"d".into(), EngineConfig::default()).expect("open");
    let flushes = engine.log().flush_count();
    let results = rt
        .block_on(engine.execute_many(vec![
            Request::new(Command::CreateUser {
                id: "u1".into(),
                username: "u1".into(),
            }),
            Request::new(Command::CreateGroup {
                id: "g1".into(),
                name: "g".into(),
                case_sharing: true,
            }),
            // Sees the user and the group decided just before it, in the same group.
            Request::new(Command::AddMember {
                group: "g1".into(),
                user: "u1".into(),
            }),
            // Refused on its own; the others still go through.
            Request::new(Command::AddMember {
                group: "g-nope".into(),
                user: "u1".into(),
            }),
        ]))
        .expect("group");
    assert!(results[..3].iter().all(Result::is_ok));
    assert!(matches!(
        results[3],
        Err(EngineError::Command(CommandError::UnknownGroup(_)))
    ));
    assert_eq!(engine.log().written_head(), Position(3));
    assert_eq!(engine.log().durable_head(), Position(3));
    assert_eq!(
        engine.log().flush_count(),
        flushes + 1,
        "one flush for the group"
    );
    assert_eq!(engine.projections().groups(Some("u1")).len(), 1);
}
