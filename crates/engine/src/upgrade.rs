//! Projections folded by other rules ([`projections::RULES_VERSION`]): they still read, so they
//! answer, and fold new appends by this build's rules, while a rebuild by this build's rules is
//! built beside them from the log and swapped in, as [`Engine::replay`] does.
//!
//! [`Engine::open`] returns at once over such projections; [`Engine::upgrade`] runs the rebuild
//! (blocking; [`Engine::upgrade_in_background`] on a thread of its own, for a long-running
//! process), and [`Engine::upgrade_status`] says where it stands. Projections this build cannot
//! read (another [`projections::LAYOUT_VERSION`]) are not here: `Engine::open` rebuilds them
//! before it answers.

use std::sync::Arc;

use domain::Position;
use projections::RULES_VERSION;

use crate::{Engine, EngineError, ReplayStats};

/// Where the rebuild of projections folded by other rules stands ([`Engine::upgrade_status`]).
///
/// Such projections still read (their layout is this build's), so they answer queries, and new
/// appends are folded into them by this build's rules, until a rebuild by this build's rules is
/// installed: [`Engine::upgrade`], [`Engine::upgrade_in_background`], or [`Engine::replay`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpgradeStatus {
    /// The active projections were folded by this build's rules: nothing to do.
    Current,
    /// The active projections were folded by rules `stored`; they answer until a rebuild by
    /// rules `current` replaces them, which nothing has started.
    Needed {
        /// Rules of the active projections.
        stored: u64,
        /// Rules of this build ([`projections::RULES_VERSION`]).
        current: u64,
    },
    /// A rebuild by rules `current` is being built beside the active projections, which answer
    /// meanwhile; it has folded the log up to `done` of `head`.
    Running {
        /// Rules of the active projections.
        stored: u64,
        /// Rules of this build.
        current: u64,
        /// Last position folded into the rebuild.
        done: Position,
        /// Log head the rebuild is heading for (it catches up with later appends at the end).
        head: Position,
    },
    /// This engine installed a rebuild by rules `current` in place of the projections of rules
    /// `stored`.
    Done {
        /// Rules of the projections replaced.
        stored: u64,
        /// Rules of this build, now those of the active projections.
        current: u64,
    },
    /// The last rebuild failed; the projections of rules `stored` are still active and answer,
    /// and the rebuild's tree was dropped (or is reclaimed by the next open). Call
    /// [`Engine::upgrade`] again to retry.
    Failed {
        /// Rules of the active projections.
        stored: u64,
        /// Rules of this build.
        current: u64,
        /// What failed.
        reason: String,
    },
}

/// What this engine did about projections of other rules; [`Engine::upgrade_status`] adds the
/// rules of the active generation.
#[derive(Debug, Clone)]
pub(crate) enum Upgrade {
    Idle,
    Running {
        stored: u64,
        done: Position,
        head: Position,
    },
    Done {
        stored: u64,
    },
    Failed {
        stored: u64,
        reason: String,
    },
}

impl Engine {
    /// Replaces projections folded by other rules with a rebuild by this build's rules
    /// ([`projections::RULES_VERSION`]), as [`Engine::replay`] does: the old generation keeps
    /// answering queries and folding appends while the new one is built beside it from the log;
    /// then, under the writer lock, the new one folds what was appended meanwhile and is swapped
    /// in atomically. Returns `None` when the projections were already folded by these rules (a
    /// replay, or another upgrade, got there first). It blocks for the whole rebuild: run it on
    /// a thread of its own ([`Engine::upgrade_in_background`]); [`Engine::upgrade_status`]
    /// reports its progress meanwhile.
    ///
    /// A crash before the swap leaves the old generation active (it is recorded as such until
    /// the swap's one meta batch) and the rebuild's tree, which the next open reclaims (I4). A
    /// failed rebuild drops its tree and leaves the old generation answering
    /// ([`UpgradeStatus::Failed`]).
    pub fn upgrade(
        &self,
        progress: &mut dyn FnMut(Position, Position),
    ) -> Result<Option<ReplayStats>, EngineError> {
        let _rebuilding = self.rebuilding();
        let stored = self.projections.active_version().rules;
        if stored == RULES_VERSION {
            return Ok(None);
        }
        tracing::info!(
            stored_rules = stored,
            current_rules = RULES_VERSION,
            "upgrade rebuild: building projections by this build's rules beside the live ones"
        );
        let head = self.log.written_head();
        self.set_upgrade(Upgrade::Running {
            stored,
            done: Position::ZERO,
            head,
        });
        let replayed = self.replay_rebuilding(&mut |done, head| {
            self.set_upgrade(Upgrade::Running { stored, done, head });
            progress(done, head);
        });
        match &replayed {
            Ok(stats) => {
                tracing::info!(
                    stored_rules = stored,
                    current_rules = RULES_VERSION,
                    events = stats.events,
                    seconds = stats.seconds,
                    generation = self.projections.generation_id(),
                    "upgrade rebuild installed"
                );
                self.set_upgrade(Upgrade::Done { stored });
            }
            Err(e) => {
                tracing::warn!(
                    stored_rules = stored,
                    error = %e,
                    "upgrade rebuild failed; the projections of the other rules keep answering"
                );
                self.set_upgrade(Upgrade::Failed {
                    stored,
                    reason: e.to_string(),
                });
            }
        }
        replayed.map(Some)
    }

    /// Runs [`Engine::upgrade`] on a thread of its own and returns at once, for a long-running
    /// process (a server): queries and writes go on meanwhile, answered by the old generation
    /// until the swap. The thread holds the engine until the rebuild ends; a process that exits
    /// before leaves the old generation active and a tree the next open reclaims.
    ///
    /// # Errors
    /// [`EngineError::Internal`] when the thread cannot be started.
    pub fn upgrade_in_background(
        self: &Arc<Self>,
    ) -> Result<std::thread::JoinHandle<Result<Option<ReplayStats>, EngineError>>, EngineError>
    {
        let engine = Arc::clone(self);
        std::thread::Builder::new()
            .name("projection-upgrade".into())
            .spawn(move || engine.upgrade(&mut |_, _| {}))
            .map_err(|e| EngineError::Internal(format!("projection upgrade thread: {e}")))
    }

    /// Whether the active projections were folded by this build's rules, and where a rebuild
    /// replacing them stands ([`Engine::upgrade`]).
    pub fn upgrade_status(&self) -> UpgradeStatus {
        let active = self.projections.active_version().rules;
        let current = RULES_VERSION;
        let upgrade = match self.upgrade.lock() {
            Ok(u) => u.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        match upgrade {
            Upgrade::Running { stored, done, head } => UpgradeStatus::Running {
                stored,
                current,
                done,
                head,
            },
            Upgrade::Done { stored } => UpgradeStatus::Done { stored, current },
            Upgrade::Failed { stored, reason } if active != current => UpgradeStatus::Failed {
                stored,
                current,
                reason,
            },
            // A replay installs this build's rules too.
            _ if active != current => UpgradeStatus::Needed {
                stored: active,
                current,
            },
            _ => UpgradeStatus::Current,
        }
    }

    fn set_upgrade(&self, state: Upgrade) {
        match self.upgrade.lock() {
            Ok(mut u) => *u = state,
            Err(poisoned) => *poisoned.into_inner() = state,
        }
    }
}
