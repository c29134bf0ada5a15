//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

use caseledger::domain::{AppId, Case, CaseId, Command, GroupId, UserId};
use caseledger::{Engine, EngineConfig, Request, SubmitOutcome};

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

/// A fresh store with a runtime, and the commands the story-style tests need.
pub struct World {
    _dir: tempfile::TempDir,
    /// The engine under test.
    pub engine: Engine,
    /// Runs the engine's async calls.
    pub rt: tokio::runtime::Runtime,
}

impl World {
    /// An empty project space.
    pub fn empty() -> Self {
        let (dir, engine) = engine();
        World {
            _dir: dir,
            engine,
            rt: rt(),
        }
    }

    /// Flushes and closes the engine, handing over its data dir (to start a server on it).
    pub fn into_dir(self) -> tempfile::TempDir {
        self.engine.flush().expect("flush");
        drop(self.engine);
        self._dir
    }

    /// Executes a command that must succeed.
    pub fn cmd(&self, c: Command) {
        self.rt
            .block_on(self.engine.execute(Request::new(c)))
            .expect("command");
    }

    /// Creates a user.
    pub fn user(&self, id: &str, username: &str) {
        self.cmd(Command::CreateUser {
            id: UserId::new(id),
            username: username.into(),
        });
    }

    /// Creates a case-sharing group with these members.
    pub fn group(&self, id: &str, name: &str, members: &[&str]) {
        self.cmd(Command::CreateGroup {
            id: GroupId::new(id),
            name: name.into(),
            case_sharing: true,
        });
        for m in members {
            self.add(id, m);
        }
    }

    /// Adds a user to a group.
    pub fn add(&self, group: &str, user: &str) {
        self.cmd(Command::AddMember {
            group: GroupId::new(group),
            user: UserId::new(user),
        });
    }

    /// Creates an app.
    pub fn app(&self, id: &str, sharing: bool, types: &[&str]) {
        self.cmd(Command::CreateApp {
            id: AppId::new(id),
            name: id.into(),
            case_sharing: sharing,
            case_types: types.iter().map(|t| (*t).to_owned()).collect(),
        });
    }

    /// Submits form bytes through `app` (or none), received now.
    pub fn submit_to(&self, app: Option<&str>, xml: Vec<u8>) -> SubmitOutcome {
        self.rt
            .block_on(self.engine.submit(xml, app.map(AppId::new), None))
            .expect("submit")
    }

    /// Submits form bytes through `app`, received now.
    pub fn submit(&self, app: &str, xml: Vec<u8>) -> SubmitOutcome {
        self.submit_to(Some(app), xml)
    }

    /// The user's case list (R44), case ids sorted.
    pub fn sees(&self, user: &str) -> Vec<String> {
        self.engine
            .projections()
            .cases_for_user(user, false)
            .expect("case list")
            .into_iter()
            .map(|c| c.case_id.0)
            .collect()
    }

    /// A case that must exist.
    pub fn case(&self, id: &str) -> Case {
        self.engine
            .projections()
            .case(&CaseId::new(id))
            .expect("read")
            .expect("case exists")
    }
}

/// Copies a store directory with its subdirectories (as sled lays it out), for tests that damage
/// or inspect a copy.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}
