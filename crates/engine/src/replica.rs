//! The engine over a log kept somewhere else (NATS JetStream): a replica with its projections.
//!
//! The log of record is the upstream [`EventStore`]; the engine talks to it only through that
//! boundary: append with an expected position and an idempotency key, read stored entries from
//! a position, head, subscribe. Its local sled store holds a *replica*: a verbatim copy of the
//! upstream's entries (checked against the hash chain as they arrive, so its head hash is the
//! upstream's), with every command id indexed, and the projections folded from that copy and
//! checkpointed beside it. Both are derived state: delete the directory and they are copied and
//! folded again. That is why the copy is neither flushed per group nor `fsync`ed (sled's
//! background flush writes it): what counts as acknowledged is what the upstream acknowledged
//! (on a quorum's disks for JetStream), and a crash that loses the copy's tail here is made
//! good by copying it again.
//!
//! Concurrent [`Engine::execute`] calls take the pipelined path of `pipeline.rs`: a leader
//! decides the next group on the group in flight and writes each landed group's sealed batch.
//! [`Engine::execute_many`], and any group that does not land as decided, take the
//! round-by-round path here ([`Engine::execute_replicated`]):
//! 1. decide each command against the projections, positions counted from the copy's head
//!    (kept close to the upstream's by the previous group's pull and the follower); a command
//!    whose fold reads its own forms back (an edit, an archive) ends the round, the rest waits
//!    for the next one;
//! 2. append the decided commands as one chain, each with `Expected::Head` of the one before
//!    and its command id as idempotency key ([`EventStore::append_all`]: once one is not
//!    appended, the rest of the chain is refused);
//! 3. a command refused because another writer got there first (`WrongExpectedPosition`) is
//!    decided again in the next round, after a pull, against the new head: a decision made on
//!    a stale position is never appended;
//! 4. pull, and answer each command with its events as the replica holds them, so the
//!    writer reads its own writes.
//!
//! Between writes, [`Engine::follow`] keeps the replica up with what other processes append.

use std::sync::Arc;
use std::time::Duration;

use domain::{Position, Timestamp};
use eventlog::raw::raw_dir;
use eventlog::{AppendOutcome, AppendRequest, EventStore, Expected, LogError};
use projections::Pending;

use crate::{blocking, Engine, EngineConfig, EngineError, Outcome, Outcomes, Request, Writer};

/// Entries copied per upstream read.
const PULL_PAGE: usize = 1024;
/// Rounds a group may be refused by other writers before its remaining commands fail.
const MAX_ROUNDS: usize = 64;

/// The log of record of a replica engine.
pub(crate) struct Upstream {
    pub(crate) store: Arc<dyn EventStore>,
    /// One pull at a time: the replica is appended to in position order.
    pull: tokio::sync::Mutex<()>,
    /// Appends refused because another writer moved the head first, each decided again.
    pub(crate) refused: std::sync::atomic::AtomicU64,
    /// Groups decided while the group before them was being appended (`pipeline.rs`).
    pub(crate) overlapped: std::sync::atomic::AtomicU64,
    /// The highest upstream position the follower has seen announced, copied or not.
    pub(crate) seen: std::sync::atomic::AtomicU64,
}

impl Upstream {
    pub(crate) fn new(store: Arc<dyn EventStore>) -> Self {
        Upstream {
            store,
            pull: tokio::sync::Mutex::new(()),
            refused: std::sync::atomic::AtomicU64::new(0),
            overlapped: std::sync::atomic::AtomicU64::new(0),
            seen: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// Decided appends: request slot, append, its events as recorded.
pub(crate) type Decided = Vec<(usize, AppendRequest, Vec<domain::RecordedEvent>)>;

/// What one round made of a command of the group.
pub(crate) enum Fate {
    /// Answered: an error, nothing to append, or a retry already in the log.
    Answered(Result<Outcome, EngineError>),
    /// In the log at `first..=last` (appended now or by an earlier attempt).
    At(Position, Position),
    /// Same idempotency key as an earlier command of the group: answered as that one is.
    SameAs(usize),
}

impl Engine {
    /// Opens the replica of `domain`'s upstream log in `dir` (created if need be), copies and
    /// folds what the upstream holds beyond it, and returns the engine; writes go to the
    /// upstream. Needs a tokio runtime.
    ///
    /// # Errors
    /// [`EngineError::Log`] when the upstream cannot be read, or when the replica is not a
    /// prefix of the upstream log (a data dir of another store: its hash chain differs);
    /// everything [`Engine::open`] can fail with.
    pub async fn open_replica(
        dir: &std::path::Path,
        domain: &domain::DomainName,
        config: EngineConfig,
        upstream: Arc<dyn EventStore>,
    ) -> Result<Engine, EngineError> {
        let db = blocking(|| Self::open_db(dir, &config))?;
        let mut config = config;
        config
            .scratch_dir
            .get_or_insert_with(|| dir.join("replay-scratch"));
        Self::open_replica_in(db, dir, domain, config, upstream).await
    }

    /// [`Engine::open_replica`] over `db`, the sled database of the store in `dir`, which the
    /// replicas of other project spaces may share (a server).
    ///
    /// # Errors
    /// As [`Engine::open_replica`].
    pub async fn open_replica_in(
        db: sled::Db,
        dir: &std::path::Path,
        domain: &domain::DomainName,
        config: EngineConfig,
        upstream: Arc<dyn EventStore>,
    ) -> Result<Engine, EngineError> {
        let mut config = config;
        // Derived state: flushed to the OS, never synced (the upstream holds the truth).
        config.fsync = false;
        let engine = blocking(|| -> Result<Engine, EngineError> {
            let scratch = config.scratch_dir.get_or_insert_with(|| {
                dir.join("replay-scratch").join(crate::file_name_of(domain))
            });
            if scratch.exists() {
                std::fs::remove_dir_all(&*scratch)
                    .map_err(|e| EngineError::Internal(format!("{}: {e}", scratch.display())))?;
            }
            let mut engine = Self::with_db(db, domain, config)?;
            engine.dir = Some(dir.to_path_buf());
            // Entries imported with their raw submissions out of line keep them there.
            engine.log.store_raw_in(&raw_dir(dir), false)?;
            engine.upstream = Some(Upstream::new(upstream));
            Ok(engine)
        })?;
        engine.check_prefix().await?;
        // Copy first; projections that have folded nothing over a long copy are rebuilt in
        // bulk, as `Engine::open` does for a long log.
        let head = engine.copy().await?;
        if engine.projections.checkpoint() == Position::ZERO
            && head.0 >= engine.config.bulk_catch_up_from
        {
            tracing::info!(events = head.0, "replica projections empty: bulk rebuild");
            blocking(|| engine.replay(&mut |_, _| {}))?;
        }
        engine.pull().await?;
        Ok(engine)
    }

    /// The log of record when this engine is a replica ([`Engine::open_replica`]).
    pub fn upstream(&self) -> Option<&Arc<dyn EventStore>> {
        self.upstream.as_ref().map(|u| &u.store)
    }

    /// How many of this replica's appends the upstream refused because another writer had
    /// moved its head first (each was decided again on the new head); 0 for an engine that is
    /// not a replica.
    pub fn refused_appends(&self) -> u64 {
        self.upstream
            .as_ref()
            .map_or(0, |u| u.refused.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// How many of this replica's groups were decided while the group before them was still
    /// being appended upstream (the pipelined write path); 0 for an engine that is not a
    /// replica.
    pub fn overlapped_groups(&self) -> u64 {
        self.upstream.as_ref().map_or(0, |u| {
            u.overlapped.load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// Refuses a replica that is not a prefix of its upstream: longer than it, or with another
    /// entry at its head.
    async fn check_prefix(&self) -> Result<(), EngineError> {
        let Some(up) = &self.upstream else {
            return Ok(());
        };
        let (head, hash) = self.log.written_mark();
        if head == Position::ZERO {
            return Ok(());
        }
        let theirs = up.store.read_entries(head, 1).await?;
        let same = theirs.first().is_some_and(|entry| {
            entry.position == head
                && eventlog::decode_header(&entry.envelope)
                    .ok()
                    .and_then(|h| h.prev.copied())
                    .is_some_and(|prev| eventlog::chain_hash(&prev, head, &entry.envelope) == hash)
        });
        if same {
            Ok(())
        } else {
            Err(EngineError::Log(LogError::corrupt(
                head,
                "the local replica is not a copy of this store's log (its entry at this \
                 position is missing upstream or differs): the data dir belongs to another \
                 store; use another --data, or delete this one to copy the log afresh",
            )))
        }
    }

    /// Copies what the upstream holds beyond the replica's head, flushes it, and folds it into
    /// the projections. Returns the replica's head. A no-op on an engine that is not a replica.
    ///
    /// # Errors
    /// [`EngineError::Log`] when the upstream cannot be read or an entry does not chain.
    pub async fn pull(&self) -> Result<Position, EngineError> {
        let Some(up) = &self.upstream else {
            return Ok(self.log.written_head());
        };
        let _one = up.pull.lock().await;
        let before = self.projections.checkpoint();
        let head = self.copy_locked(up).await?;
        if head > before {
            let last = self
                .log
                .read_at(head)?
                .map_or(Timestamp::EPOCH, |e| e.recorded_at);
            blocking(|| -> Result<(), EngineError> {
                let mut writer = self.lock();
                // The next command's received time follows the upstream's last one.
                writer.last = writer.last.max(last);
                if writer.leading {
                    // A leader's groups are landing: it folds what it copied when it is done.
                    return Ok(());
                }
                Self::settle(&mut writer);
                self.catch_up()
            })?;
        }
        Ok(head)
    }

    /// Copies what the upstream holds beyond the replica's head, without folding it.
    pub(crate) async fn copy(&self) -> Result<Position, EngineError> {
        let Some(up) = &self.upstream else {
            return Ok(self.log.written_head());
        };
        let _one = up.pull.lock().await;
        self.copy_locked(up).await
    }

    /// Copies the upstream's entries up to `last` from what this process appended itself
    /// ([`EventStore::recent_entries`]), without reading them back. Returns `false` when they
    /// are not all at hand (another writer's entries come first, or they are gone from the
    /// store's memory): the caller copies by reading then.
    pub(crate) async fn copy_recent(&self, last: Position) -> Result<bool, EngineError> {
        let Some(up) = &self.upstream else {
            return Ok(false);
        };
        let _one = up.pull.lock().await;
        let from = self.log.written_head().next();
        if from > last {
            return Ok(true);
        }
        let Some(entries) = up.store.recent_entries(from, last) else {
            return Ok(false);
        };
        // The replica checks the chain as for any copy: the entries must follow its head.
        blocking(|| self.log.append_replicated(&entries))?;
        self.log.mark_copied_durable();
        Ok(true)
    }

    /// [`Engine::copy`] for a caller holding the pull lock: copies and flushes.
    async fn copy_locked(&self, up: &Upstream) -> Result<Position, EngineError> {
        let before = self.log.written_head();
        loop {
            let from = self.log.written_head().next();
            let entries = up.store.read_entries(from, PULL_PAGE).await?;
            if entries.is_empty() {
                break;
            }
            let full = entries.len() >= PULL_PAGE;
            blocking(|| self.log.append_replicated(&entries))?;
            if !full {
                break;
            }
        }
        let head = self.log.written_head();
        if head > before {
            // Durable in the replica's sense: the upstream holds it, and a crash that loses it
            // here is made good by copying it again. Subscriptions see it now.
            self.log.mark_copied_durable();
        }
        Ok(head)
    }

    /// Keeps the replica up with what other processes append: waits on an upstream
    /// subscription and pulls whenever it moves, until the engine is dropped. Errors are logged
    /// and retried after a pause.
    pub fn follow(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(this) = engine.upgrade() else {
                    return;
                };
                let Some(up) = this.upstream() else {
                    return;
                };
                let from = this.log.written_head().next();
                let subscribed = up.subscribe(from).await;
                drop(this);
                let mut sub = match subscribed {
                    Ok(sub) => sub,
                    Err(e) => {
                        tracing::warn!(error = %e, "replica: cannot subscribe upstream; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                loop {
                    let next = sub.next().await;
                    let Some(this) = engine.upgrade() else {
                        return;
                    };
                    match next {
                        Ok(event) if event.position <= this.log.written_head() => {}
                        // A streak copies its own groups, and pulls when it ends if the
                        // follower saw more than it copied (`seen` first, `leading` after).
                        Ok(event) if this.seen_while_leading(event.position) => {}
                        Ok(_) => {
                            if let Err(e) = this.pull().await {
                                tracing::warn!(error = %e, "replica: pull failed; retrying");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "replica: upstream subscription failed; resubscribing");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            break;
                        }
                    }
                }
            }
        })
    }

    /// Notes that the upstream holds `position`; true when a streak is leading, which then
    /// copies it (`seen` is set before `leading` is read, and a streak clears `leading` before
    /// it reads `seen`, so one of the two pulls).
    fn seen_while_leading(&self, position: Position) -> bool {
        if let Some(up) = &self.upstream {
            up.seen
                .fetch_max(position.0, std::sync::atomic::Ordering::SeqCst);
        }
        self.lock().leading
    }

    /// Decides and appends a group of commands on the upstream log, round by round (see the
    /// module docs).
    pub(crate) async fn execute_replicated(
        &self,
        up: &Upstream,
        requests: &[Request],
    ) -> Result<Outcomes, EngineError> {
        let fates = requests.iter().map(|_| None).collect();
        self.execute_rounds(up, requests, fates, false).await
    }

    /// [`Engine::execute_replicated`] for requests of which some already have their fate; the
    /// others are decided in rounds, the first after a pull when `pull_first`.
    pub(crate) async fn execute_rounds(
        &self,
        up: &Upstream,
        requests: &[Request],
        mut fates: Vec<Option<Fate>>,
        pull_first: bool,
    ) -> Result<Outcomes, EngineError> {
        for round in 0..MAX_ROUNDS {
            let todo: Vec<usize> = (0..requests.len())
                .filter(|&i| fates[i].is_none())
                .collect();
            if todo.is_empty() {
                break;
            }
            // The first round decides on the copy as it is (the last group's pull and the
            // follower keep it close to the stream): a stale decision is refused by its
            // expected position, never appended, and decided again after a pull.
            if round > 0 || pull_first {
                self.pull().await?;
            }
            let decided = blocking(|| self.decide_round(requests, &todo, &mut fates))?;
            if decided.is_empty() {
                continue;
            }
            let (slots, appends): (Vec<usize>, Vec<AppendRequest>) = decided.into_iter().unzip();
            let answers = up.store.append_all(appends).await;
            for (slot, answer) in slots.into_iter().zip(answers) {
                fates[slot] = match answer {
                    Ok(AppendOutcome::Appended { first, last })
                    | Ok(AppendOutcome::AlreadyAppended { first, last }) => {
                        Some(Fate::At(first, last))
                    }
                    // Decided on a head that moved: decide again on the new one.
                    Err(LogError::WrongExpectedPosition { .. }) => {
                        up.refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        None
                    }
                    Err(e) => Some(Fate::Answered(Err(e.into()))),
                };
            }
        }
        self.pull().await?;
        let positions: Vec<Option<(Position, Position)>> = fates
            .iter()
            .map(|f| match f {
                Some(Fate::At(first, last)) => Some((*first, *last)),
                _ => None,
            })
            .collect();
        Ok(fates
            .into_iter()
            .map(|fate| match fate {
                Some(Fate::Answered(result)) => result,
                Some(Fate::At(first, last)) => self.events_between(first, last),
                Some(Fate::SameAs(earlier)) => match positions.get(earlier).copied().flatten() {
                    Some((first, last)) => self.events_between(first, last),
                    None => Err(EngineError::Internal(
                        "the command this one repeats was not appended".into(),
                    )),
                },
                None => Err(EngineError::Log(LogError::Unavailable(format!(
                    "refused {MAX_ROUNDS} times: other writers kept moving the head"
                )))),
            })
            .collect())
    }

    /// Decides the commands `todo` (in order) against the projections at the replica's head;
    /// files the fate of those answered without an append, and returns the appends of the
    /// others, each expecting the head the one before it leaves. Stops after a command whose
    /// fold reads its own forms back from the log.
    fn decide_round(
        &self,
        requests: &[Request],
        todo: &[usize],
        fates: &mut [Option<Fate>],
    ) -> Result<Vec<(usize, AppendRequest)>, EngineError> {
        let mut clock = self.lock();
        Self::settle(&mut clock);
        self.catch_up()?;
        // The head the decisions see: what the projections folded, not the copy's written head,
        // which the follower's copy may have moved past since `catch_up` (it appends without
        // the writer lock). Expecting the copy's head would let a decision that did not see
        // those entries be appended after them: a form accepted twice under a kill -9 storm.
        let mut pending = self.projections.pending_over(None, None);
        let (decided, _) = self.decide_in_order(
            &mut clock,
            &mut pending,
            requests,
            todo.iter().copied(),
            fates,
        )?;
        Ok(decided
            .into_iter()
            .map(|(slot, append, _)| (slot, append))
            .collect())
    }

    /// Decides the requests at `slots`, in order, on `pending`, each on the ones before it:
    /// files the fate of those answered without an append (an error, nothing to do, a retry
    /// already in the log, a key repeated in the group) and returns the others' appends,
    /// chained from `pending`'s checkpoint, with their events as recorded and folded into
    /// `pending`. Stops after a command whose fold reads its own forms back from the log (an
    /// edit, an archive), which is not folded; the flag says so.
    pub(crate) fn decide_in_order(
        &self,
        clock: &mut Writer,
        pending: &mut Pending,
        requests: &[Request],
        slots: impl IntoIterator<Item = usize>,
        fates: &mut [Option<Fate>],
    ) -> Result<(Decided, bool), EngineError> {
        let mut head = pending.checkpoint();
        let mut keys: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        let mut out = Vec::new();
        for slot in slots {
            let request = &requests[slot];
            let key = request.idempotent.then_some(request.command_id.0.as_str());
            if let Some(k) = key {
                if let Some((first, last)) = self.log.lookup_idempotency(k)? {
                    fates[slot] = Some(Fate::At(first, last));
                    continue;
                }
                if let Some(&earlier) = keys.get(k) {
                    fates[slot] = Some(Fate::SameAs(earlier));
                    continue;
                }
            }
            let received_at = clock.received_at(request);
            let events = match domain::decide(&*pending, &request.command, received_at) {
                Ok(events) => events,
                Err(e) => {
                    fates[slot] = Some(Fate::Answered(Err(EngineError::Command(e))));
                    continue;
                }
            };
            if let Some(e) = pending.take_error() {
                return Err(EngineError::Projection(e));
            }
            if events.is_empty() {
                fates[slot] = Some(Fate::Answered(Ok(Outcome { events: Vec::new() })));
                continue;
            }
            let rebuilds = events.iter().any(crate::rebuilds_cases);
            let recorded = crate::recorded_after(head, request, received_at, &events);
            let append = AppendRequest {
                expected: Expected::Head(head),
                // Always keyed: an append whose answer was lost is retried without doubling.
                idempotency_key: Some(request.command_id.0.clone()),
                command_id: request.command_id.clone(),
                recorded_at: received_at,
                events,
            };
            if let Some(k) = key {
                keys.insert(k, slot);
            }
            head = recorded.last().map_or(head, |e| e.position);
            if rebuilds {
                // Its fold reads this form back from the log: decide the rest after it is there.
                out.push((slot, append, recorded));
                return Ok((out, true));
            }
            for ev in &recorded {
                pending.apply(ev)?;
            }
            out.push((slot, append, recorded));
        }
        Ok((out, false))
    }
}
