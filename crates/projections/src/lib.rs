//! Projections: deterministic folds of the event log, checkpointed, rebuilt by replay.
//!
//! - [`Projections`] owns the active *generation*: one sled tree holding case state, the case
//!   list per owner, forms, case history, diagnostics, the directory (memberships) and the
//!   checkpoint. Queries read it; [`Pending`] folds events over it and commits them in one atomic
//!   batch with the checkpoint, so a crash never leaves a projection ahead of, or inconsistent
//!   with, its checkpoint (I4).
//!   [`Pending::seal`] splits a commit into the batch and an [`Overlay`] the next batch reads
//!   through while the first is written; [`Prefetched`] is state read ahead of the writer.
//! - [`Rebuild`] replays the log into a fresh generation (in bulk, by external sort:
//!   [`Rebuild::bulk_load`]) and swaps it in when done, so readers always have answers (no empty
//!   window).
//! - The case list of a user is computed at query time from the cases of each of the user's
//!   owner ids *now* (R35, R44), one range of the tree each (`keys`): a membership change takes
//!   effect at once and rewrites nothing.
//!
//! - The meta tree records the active generation and what it was written by
//!   ([`ProjectionVersion`]: a [`LAYOUT_VERSION`] this code can read or not, and the
//!   [`RULES_VERSION`] of the fold); [`Projections::open`] reports damaged or unreadable
//!   projections ([`Damage`]) instead of failing, [`Projections::active_version`] says whether
//!   they were folded by other rules, and [`Rebuild::compare`] diffs a rebuild with the live
//!   generation ([`Difference`]).
//!
//! Projections hold no truth of their own (I2): deleting every tree of this crate and replaying
//! gives the same answers (I3).

mod asof;
mod bulk;
mod codec;
mod compare;
mod damage;
mod error;
mod indexed;
mod keys;
mod past;
mod pending;
mod prefetch;
mod reclaim;
mod sorter;
mod version;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use domain::{
    Case, CaseId, Diagnostic, Directory, DomainName, FormId, GroupId, Position, RecordedEvent,
};
use serde::{Deserialize, Serialize};

pub use asof::{CaseAt, Change, ConflictRow, HistoryEntry, Viewer};
pub use bulk::BulkStats;
pub use compare::{Difference, KeyKind};
pub use damage::Damage;
pub use error::ProjectionError;
pub use indexed::{Indexed, IndexedPage, IndexedQuery};
pub use pending::{Overlay, Pending, Sealed};
pub use prefetch::{Prefetched, Touched};
pub use version::{ProjectionVersion, LAYOUT_VERSION, RULES_VERSION};

pub use domain::FormEntry;

/// A diagnostic with the position of the event that raised it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagnosticRow {
    /// Where it was raised.
    pub position: Position,
    /// The finding.
    pub diagnostic: Diagnostic,
}

/// A group as the `groups` query reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupView {
    /// Id.
    pub id: GroupId,
    /// Name.
    pub name: String,
    /// Case sharing on.
    pub case_sharing: bool,
    /// Member user ids, sorted.
    pub members: Vec<String>,
}

/// A user's case list (R44) from the cases of each of the user's owner ids: each case once,
/// sorted by case id.
pub(crate) fn union_of_owners(
    owners: Vec<String>,
    mut cases_of: impl FnMut(&str) -> Result<Vec<Case>, ProjectionError>,
) -> Result<Vec<Case>, ProjectionError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for owner in owners {
        for case in cases_of(&owner)? {
            if seen.insert(case.case_id.clone()) {
                out.push(case);
            }
        }
    }
    out.sort_by(|a, b| a.case_id.cmp(&b.case_id));
    Ok(out)
}

/// Groups of `dir` (all, or those listing `user`), sorted by id.
pub(crate) fn group_views(dir: &Directory, user: Option<&str>) -> Vec<GroupView> {
    dir.groups
        .iter()
        .filter(|(_, g)| user.is_none_or(|u| g.members.iter().any(|m| m.as_str() == u)))
        .map(|(id, g)| GroupView {
            id: id.clone(),
            name: g.name.clone(),
            case_sharing: g.case_sharing,
            members: g.members.iter().map(|m| m.0.clone()).collect(),
        })
        .collect()
}

/// The event at `p`, read for `case` through `reader`: a typed error when no reader is set or
/// the log does not hold it.
pub(crate) fn read_logged(
    reader: Option<&LogReader>,
    case: &CaseId,
    p: Position,
) -> Result<RecordedEvent, ProjectionError> {
    let rebuild = |reason: String| ProjectionError::Rebuild {
        case: case.0.clone(),
        reason,
    };
    let reader = reader.ok_or_else(|| rebuild("no log reader configured".into()))?;
    reader(p)?.ok_or_else(|| rebuild(format!("event {p} is not in the log")))
}

/// Reads one event of the log by position; projections use it to rebuild cases (R58).
pub type LogReader =
    Arc<dyn Fn(Position) -> Result<Option<RecordedEvent>, eventlog::LogError> + Send + Sync>;

/// One generation of every projection, in one sled tree.
pub struct Generation {
    id: u64,
    /// What its fold was written by: as recorded for the active generation at open, this
    /// code's for a rebuild.
    version: ProjectionVersion,
    tree: sled::Tree,
    directory: RwLock<Arc<Directory>>,
    checkpoint: AtomicU64,
    /// The `indexed_on` clocks as of the checkpoint (`indexed`).
    clocks: std::sync::Mutex<indexed::Clocks>,
}

impl Generation {
    fn open(
        db: &sled::Db,
        domain: &DomainName,
        id: u64,
        version: ProjectionVersion,
    ) -> Result<Self, ProjectionError> {
        let tree = db.open_tree(tree_name(domain, id))?;
        let directory = match tree.get(keys::DIRECTORY)? {
            Some(bytes) => codec::decode(keys::DIRECTORY, &bytes)?,
            None => Directory::default(),
        };
        let checkpoint = match tree.get(keys::CHECKPOINT)? {
            Some(bytes) => keys::trailing_u64(&bytes).ok_or_else(|| ProjectionError::Decode {
                key: "checkpoint".into(),
                reason: format!("{} bytes, expected 8", bytes.len()),
            })?,
            None => 0,
        };
        let clocks = indexed::Clocks {
            case: indexed::read_clock(&tree, keys::CASE_CLOCK)?,
            form: indexed::read_clock(&tree, keys::FORM_CLOCK)?,
        };
        Ok(Generation {
            id,
            version,
            tree,
            directory: RwLock::new(Arc::new(directory)),
            checkpoint: AtomicU64::new(checkpoint),
            clocks: std::sync::Mutex::new(clocks),
        })
    }

    /// A generation that answers nothing, standing in for a damaged one until a rebuild
    /// replaces it. It uses a tree of its own, so nothing folded into it touches the damaged one.
    fn blank(
        db: &sled::Db,
        domain: &DomainName,
        id: u64,
        version: ProjectionVersion,
    ) -> Result<Self, ProjectionError> {
        let tree = db.open_tree(format!("projblank/{}", domain.as_str()))?;
        tree.clear()?;
        Ok(Generation {
            id,
            version,
            tree,
            directory: RwLock::new(Arc::new(Directory::default())),
            checkpoint: AtomicU64::new(0),
            clocks: std::sync::Mutex::new(indexed::Clocks::default()),
        })
    }

    fn directory(&self) -> Arc<Directory> {
        match self.directory.read() {
            Ok(d) => Arc::clone(&d),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn checkpoint(&self) -> Position {
        Position(self.checkpoint.load(Ordering::Acquire))
    }

    fn published(&self, directory: Arc<Directory>, checkpoint: Position, clocks: indexed::Clocks) {
        match self.directory.write() {
            Ok(mut d) => *d = directory,
            Err(poisoned) => *poisoned.into_inner() = directory,
        }
        match self.clocks.lock() {
            Ok(mut c) => *c = clocks,
            Err(poisoned) => *poisoned.into_inner() = clocks,
        }
        self.checkpoint.store(checkpoint.0, Ordering::Release);
    }

    fn clocks(&self) -> indexed::Clocks {
        match self.clocks.lock() {
            Ok(c) => *c,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// The key and value of a case's row, found through its owner row; `None` when the case
    /// does not exist (never did, or deleted). An owner row naming no case row is damage.
    fn case_row(&self, id: &CaseId) -> Result<Option<(Vec<u8>, sled::IVec)>, ProjectionError> {
        let Some(owner) = self.tree.get(keys::owner(id.as_str()))? else {
            return Ok(None);
        };
        let key = keys::case(&owner, id.as_str());
        match self.tree.get(&key)? {
            Some(value) => Ok(Some((key, value))),
            None => Err(ProjectionError::Decode {
                key: String::from_utf8_lossy(&keys::owner(id.as_str())).into_owned(),
                reason: format!(
                    "names owner {:?}, which holds no such case",
                    String::from_utf8_lossy(&owner)
                ),
            }),
        }
    }

    fn load_case(&self, id: &CaseId) -> Result<Option<Case>, ProjectionError> {
        match self.case_row(id)? {
            Some((key, bytes)) => codec::decode_case(&key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Everything stored about a case id: the case, its history, and whether it is a tombstone.
    /// Two point reads either way: the owner row (small, mostly cached) and the case row, or
    /// the tombstone.
    fn load_stored(&self, id: &CaseId) -> Result<StoredCase, ProjectionError> {
        if let Some((key, bytes)) = self.case_row(id)? {
            let (case, history, past) = codec::decode_case_row(&key, &bytes)?;
            return Ok(StoredCase {
                case: Some(case),
                history,
                past: past.to_vec(),
                tombstone: false,
            });
        }
        let key = keys::tombstone(id.as_str());
        match self.tree.get(&key)? {
            Some(bytes) => Ok(StoredCase {
                case: None,
                history: codec::decode_history(&key, &bytes)?,
                past: Vec::new(),
                tombstone: true,
            }),
            None => Ok(StoredCase {
                case: None,
                history: Vec::new(),
                past: Vec::new(),
                tombstone: false,
            }),
        }
    }

    /// The positions of the events that touched a case (deleted or not), without decoding it.
    fn history(&self, id: &CaseId) -> Result<Vec<Position>, ProjectionError> {
        match self.case_row(id)? {
            Some((key, bytes)) => codec::decode_case_history(&key, &bytes),
            None => self.tombstone_history(id),
        }
    }

    /// The history a deleted case keeps in its tombstone; empty when there is none.
    fn tombstone_history(&self, id: &CaseId) -> Result<Vec<Position>, ProjectionError> {
        let key = keys::tombstone(id.as_str());
        match self.tree.get(&key)? {
            Some(bytes) => codec::decode_history(&key, &bytes),
            None => Ok(Vec::new()),
        }
    }

    fn is_deleted(&self, id: &CaseId) -> Result<bool, ProjectionError> {
        Ok(self.tree.contains_key(keys::tombstone(id.as_str()))?)
    }

    fn load_form(&self, id: &FormId) -> Result<Option<FormEntry>, ProjectionError> {
        let key = keys::form(id.as_str());
        match self.tree.get(&key)? {
            Some(bytes) => codec::decode(&key, &bytes).map(Some),
            None => Ok(None),
        }
    }
}

/// A case id as a generation stores it.
#[derive(Clone)]
pub(crate) struct StoredCase {
    pub(crate) case: Option<Case>,
    pub(crate) history: Vec<Position>,
    /// The case's past (`past`), empty when there is no case.
    pub(crate) past: Vec<u8>,
    pub(crate) tombstone: bool,
}

fn tree_name(domain: &DomainName, generation: u64) -> String {
    format!("proj/{}/{generation}", domain.as_str())
}

fn meta_name(domain: &DomainName) -> String {
    format!("projmeta/{}", domain.as_str())
}

const ACTIVE: &[u8] = b"active";
/// The projections of one project space.
pub struct Projections {
    db: sled::Db,
    domain: DomainName,
    meta: sled::Tree,
    current: RwLock<Arc<Generation>>,
    reader: RwLock<Option<LogReader>>,
    /// Generations retired by a replay, deleted in the background.
    reclaimer: reclaim::Reclaimer,
    /// What [`Projections::open`] found wrong; the owner rebuilds when an entry
    /// [`Damage::needs_rebuild`].
    found: Vec<Damage>,
}

impl Projections {
    /// Opens the active generation (creating generation 1 on a fresh store) and drops leftovers
    /// of a replay that crashed before its swap.
    ///
    /// Damage to the projections does not fail the open: a projection is derived from the log
    /// (I2), so nothing stored here may keep anyone from the log. What was found (an unreadable
    /// record of the active generation, an undecodable directory or checkpoint, a leftover tree
    /// that cannot be reclaimed, or projections of another [`LAYOUT_VERSION`]) is listed by
    /// [`Projections::damage`], and the caller rebuilds into a fresh generation
    /// ([`Projections::begin_rebuild`]). Only an error of sled itself fails the open.
    ///
    /// Projections folded by other rules ([`RULES_VERSION`]) are not damage: they read, and they
    /// answer until the caller installs a rebuild ([`Projections::active_version`]).
    pub fn open(db: &sled::Db, domain: &DomainName) -> Result<Self, ProjectionError> {
        let meta = db.open_tree(meta_name(domain))?;
        let mut found = Vec::new();
        let stored_active = version::meta_record(&meta, ACTIVE, "active generation", &mut found);
        let stored = version::stored(&meta, stored_active.is_some(), &mut found);
        let version = stored.version;
        if version.layout != LAYOUT_VERSION && found.is_empty() {
            found.push(Damage::Layout {
                stored: version.layout,
                current: LAYOUT_VERSION,
            });
        }
        let active = stored_active.unwrap_or(1);
        let prefix = format!("proj/{}/", domain.as_str());
        for name in db.tree_names() {
            if let Some(rest) = name.strip_prefix(prefix.as_bytes()) {
                if rest != active.to_string().as_bytes() {
                    if let Err(e) = reclaim::reclaim_now(db, &name) {
                        // The tree is not active, so nothing reads it; a later replay numbers
                        // its generation past it (`begin_rebuild`).
                        found.push(Damage::Leftover {
                            tree: String::from_utf8_lossy(&name).into_owned(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
        }
        let generation = match Generation::open(db, domain, active, version) {
            Ok(g) => g,
            Err(e @ (ProjectionError::Decode { .. } | ProjectionError::Storage(_))) => {
                found.push(Damage::Generation {
                    id: active,
                    reason: e.to_string(),
                });
                // Answers nothing until the rebuild installs a generation in its place.
                Generation::blank(db, domain, active, version)?
            }
            Err(e) => return Err(e),
        };
        if found.is_empty() && (stored_active.is_none() || stored.missing) {
            // A fresh store, or one written before a record existed: record what was read.
            let mut batch = sled::Batch::default();
            batch.insert(ACTIVE, active.to_be_bytes().to_vec());
            version.record(&mut batch);
            meta.apply_batch(batch)?;
        }
        for d in &found {
            tracing::warn!(domain = domain.as_str(), damage = %d, "projections need a rebuild");
        }
        Ok(Projections {
            db: db.clone(),
            domain: domain.clone(),
            meta,
            current: RwLock::new(Arc::new(generation)),
            reader: RwLock::new(None),
            reclaimer: reclaim::Reclaimer::default(),
            found,
        })
    }

    /// What [`Projections::open`] found wrong with the stored projections (empty when they are
    /// sound as far as opening reads them). Each entry is a reason to rebuild from the log.
    pub fn damage(&self) -> &[Damage] {
        &self.found
    }

    /// Waits until the generations retired by earlier replays are deleted. Dropping the
    /// projections instead stops their deletion between two batches; the next open finishes it.
    pub fn wait_reclaimed(&self) {
        self.reclaimer.wait();
    }

    /// The layout and rules versions recorded in the store (`None` before the first open of
    /// this code wrote them, or when a record is unreadable). A store written before the rules
    /// record existed reads as rules 1.
    pub fn stored_version(&self) -> Option<ProjectionVersion> {
        version::recorded(&self.meta)
    }

    /// What the active generation was written by. Its layout is [`LAYOUT_VERSION`] unless
    /// [`Projections::damage`] lists [`Damage::Layout`]; its rules differ from
    /// [`RULES_VERSION`] when it was folded by another build, until a rebuild is installed.
    pub fn active_version(&self) -> ProjectionVersion {
        self.current().version
    }

    /// Records `version` in the store, read by the next [`Projections::open`]; for tests of the
    /// upgrade path and for tools, never needed in normal operation.
    pub fn set_stored_version(&self, version: ProjectionVersion) -> Result<(), ProjectionError> {
        let mut batch = sled::Batch::default();
        version.record(&mut batch);
        self.meta.apply_batch(batch)?;
        self.meta.flush()?;
        Ok(())
    }

    /// Gives the projections read access to the log, needed to rebuild cases after a form edit
    /// or archive (R54, R57, R58).
    pub fn set_log_reader(&self, reader: LogReader) {
        match self.reader.write() {
            Ok(mut r) => *r = Some(reader),
            Err(poisoned) => *poisoned.into_inner() = Some(reader),
        }
    }

    fn reader(&self) -> Option<LogReader> {
        match self.reader.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn current(&self) -> Arc<Generation> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Starts folding a batch over the active generation.
    pub fn pending(&self) -> Pending {
        Pending::new(self.current(), self.reader())
    }

    /// Starts folding a batch over the active generation as it will be once the sealed batch
    /// `overlay` came from is written, using what `prefetched` read ahead (validated by the
    /// caller with [`Prefetched::validate`]).
    pub fn pending_over(
        &self,
        overlay: Option<Arc<Overlay>>,
        prefetched: Option<Prefetched>,
    ) -> Pending {
        Pending::over(self.current(), self.reader(), overlay, prefetched)
    }

    /// Number of projection generation trees of this project space in the store: 1, except
    /// while a replay builds the next one (a crashed replay's tree is reclaimed on open). Waits
    /// first for the background deletion of retired generations ([`Projections::wait_reclaimed`]).
    pub fn generation_trees(&self) -> usize {
        self.wait_reclaimed();
        let prefix = format!("proj/{}/", self.domain.as_str());
        self.db
            .tree_names()
            .iter()
            .filter(|n| n.starts_with(prefix.as_bytes()))
            .count()
    }

    /// Id of the active generation (a replay installs a new one).
    pub fn generation_id(&self) -> u64 {
        self.current().id
    }

    /// Reads the stored state of `cases` and `forms` ahead of deciding (see [`Prefetched`]).
    pub fn prefetch<'a>(
        &self,
        cases: impl IntoIterator<Item = &'a CaseId>,
        forms: impl IntoIterator<Item = &'a FormId>,
    ) -> Result<Prefetched, ProjectionError> {
        let generation = self.current();
        // Read before the values, so that every value is at least this new.
        let checkpoint = generation.checkpoint();
        let mut out = Prefetched {
            generation_id: generation.id,
            checkpoint,
            cases: std::collections::HashMap::new(),
            forms: std::collections::HashMap::new(),
        };
        for id in cases {
            if !out.cases.contains_key(id) {
                out.cases.insert(id.clone(), generation.load_stored(id)?);
            }
        }
        for id in forms {
            if !out.forms.contains_key(id) {
                out.forms.insert(id.clone(), generation.load_form(id)?);
            }
        }
        Ok(out)
    }

    /// Position of the last event folded into the active generation.
    pub fn checkpoint(&self) -> Position {
        self.current().checkpoint()
    }

    /// Folds `events` (position order, starting right after the checkpoint) and commits them in
    /// chunks of `chunk` events, each chunk one atomic batch with its checkpoint.
    pub fn catch_up<I>(&self, events: I, chunk: usize) -> Result<Position, ProjectionError>
    where
        I: IntoIterator<Item = Result<RecordedEvent, eventlog::LogError>>,
    {
        fold_into(self.pending(), events, chunk, &mut |_| {})
    }

    /// The users, groups and apps now.
    pub fn directory(&self) -> Arc<Directory> {
        self.current().directory()
    }

    /// A case as of the checkpoint.
    pub fn case(&self, id: &CaseId) -> Result<Option<Case>, ProjectionError> {
        self.current().load_case(id)
    }

    /// A form's status.
    pub fn form(&self, id: &FormId) -> Result<Option<FormEntry>, ProjectionError> {
        self.current().load_form(id)
    }

    /// Cases owned by `owner`, sorted by case id; closed ones only when asked.
    pub fn cases_by_owner(
        &self,
        owner: &str,
        include_closed: bool,
    ) -> Result<Vec<Case>, ProjectionError> {
        let generation = self.current();
        let mut out = Vec::new();
        // The owner's cases are one range, in case-id order.
        for item in generation
            .tree
            .scan_prefix(keys::case_prefix(owner.as_bytes()))
        {
            let (key, value) = item?;
            if include_closed || !codec::case_closed(&value) {
                out.push(codec::decode_case(&key, &value)?);
            }
        }
        Ok(out)
    }

    /// The user's case list (R44): cases owned by the user or by any of the user's case-sharing
    /// groups now (R35); open only unless asked. Sorted by case id, no duplicates.
    pub fn cases_for_user(
        &self,
        user: &str,
        include_closed: bool,
    ) -> Result<Vec<Case>, ProjectionError> {
        union_of_owners(self.directory().owner_ids(user), |owner| {
            self.cases_by_owner(owner, include_closed)
        })
    }

    /// Groups (all, or those listing `user`), sorted by id.
    pub fn groups(&self, user: Option<&str>) -> Vec<GroupView> {
        group_views(&self.directory(), user)
    }

    /// Cases that index `target`, with `true` for an extension index (reverse index).
    pub fn indexed_by(&self, target: &CaseId) -> Result<Vec<(CaseId, bool)>, ProjectionError> {
        let generation = self.current();
        let prefix = keys::reverse_prefix(target.as_str());
        let mut out = Vec::new();
        for item in generation.tree.scan_prefix(&prefix) {
            let (key, value) = item?;
            let id = String::from_utf8_lossy(key.get(prefix.len()..).unwrap_or_default());
            out.push((CaseId::new(id), value.first() == Some(&1)));
        }
        Ok(out)
    }

    /// True when the case existed and was deleted (every form that touched it is gone).
    pub fn is_deleted(&self, id: &CaseId) -> Result<bool, ProjectionError> {
        self.current().is_deleted(id)
    }

    /// Every diagnostic, in position order.
    pub fn diagnostics(&self) -> Result<Vec<DiagnosticRow>, ProjectionError> {
        let generation = self.current();
        let mut out = Vec::new();
        for item in generation.tree.scan_prefix([keys::DIAGNOSTIC]) {
            let (key, value) = item?;
            out.push(codec::decode(&key, &value)?);
        }
        Ok(out)
    }

    /// Cases in `indexed_on` order (the data APIs' listing): unique, strictly increasing values
    /// derived from the log position of each case's last change (module `indexed`).
    pub fn cases_by_indexed_on(
        &self,
        query: &IndexedQuery,
    ) -> Result<IndexedPage<Case>, ProjectionError> {
        indexed::cases(&self.current(), query)
    }

    /// Accepted forms in `indexed_on` order, archived ones only when the query asks.
    pub fn forms_by_indexed_on(
        &self,
        query: &IndexedQuery,
    ) -> Result<IndexedPage<(FormId, FormEntry)>, ProjectionError> {
        indexed::forms(&self.current(), query)
    }

    /// A case with its `indexed_on` and the received time of its last change; `None` when
    /// there is no such case.
    pub fn case_indexed(&self, id: &CaseId) -> Result<Option<Indexed<Case>>, ProjectionError> {
        let generation = self.current();
        let stored = generation.load_stored(id)?;
        let Some(case) = stored.case else {
            return Ok(None);
        };
        let last = stored.history.last().copied();
        Ok(
            indexed::case_row(&generation, &case, last)?.map(|(stamp, at)| Indexed {
                indexed_on: stamp,
                changed_at: at,
                position: last.unwrap_or_default(),
                item: case,
            }),
        )
    }

    /// An accepted form with its `indexed_on`; `None` when there is none by that id.
    pub fn form_indexed(&self, id: &FormId) -> Result<Option<Indexed<FormEntry>>, ProjectionError> {
        let generation = self.current();
        let Some(entry) = generation.load_form(id)? else {
            return Ok(None);
        };
        Ok(
            indexed::form_row(&generation, id, &entry)?.map(|(stamp, at)| Indexed {
                indexed_on: stamp,
                changed_at: at,
                position: entry.position,
                item: entry,
            }),
        )
    }

    /// Positions of the events that touched a case, ascending (case history).
    pub fn history(&self, id: &CaseId) -> Result<Vec<Position>, ProjectionError> {
        self.current().history(id)
    }

    /// Starts a rebuild into a fresh generation; the active one keeps answering meanwhile.
    pub fn begin_rebuild(&self) -> Result<Rebuild<'_>, ProjectionError> {
        // Past every generation tree in the store: a leftover that could not be reclaimed
        // (damaged) keeps its number.
        let prefix = format!("proj/{}/", self.domain.as_str());
        let highest = self
            .db
            .tree_names()
            .iter()
            .filter_map(|n| n.strip_prefix(prefix.as_bytes()))
            .filter_map(|rest| std::str::from_utf8(rest).ok()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let next = highest.max(self.current().id) + 1;
        // A tree of that number can only be a leftover of a crashed replay.
        reclaim::reclaim_now(&self.db, tree_name(&self.domain, next).as_bytes())?;
        let generation = Arc::new(Generation::open(
            &self.db,
            &self.domain,
            next,
            ProjectionVersion::CURRENT,
        )?);
        Ok(Rebuild {
            owner: self,
            generation,
        })
    }
}

/// A replay in progress into a fresh generation.
pub struct Rebuild<'p> {
    owner: &'p Projections,
    generation: Arc<Generation>,
}

impl Rebuild<'_> {
    /// Folds events into the new generation in chunks; `progress` sees each committed position.
    pub fn feed<I>(
        &mut self,
        events: I,
        chunk: usize,
        progress: &mut dyn FnMut(Position),
    ) -> Result<Position, ProjectionError>
    where
        I: IntoIterator<Item = Result<RecordedEvent, eventlog::LogError>>,
    {
        let pending = Pending::new(Arc::clone(&self.generation), self.owner.reader());
        fold_into(pending, events, chunk, progress)
    }

    /// Replays `events` (from position 1, in order) into the new generation, which must still be
    /// empty, by sorting instead of random writes (see the `bulk` module). `scratch` is a
    /// directory for sorted runs, `budget` the bytes each of its sorters may hold in memory.
    /// Continue with [`Rebuild::feed`] for events appended meanwhile.
    pub fn bulk_load<I>(
        &mut self,
        events: I,
        scratch: &std::path::Path,
        budget: usize,
        progress: &mut dyn FnMut(Position),
    ) -> Result<BulkStats, ProjectionError>
    where
        I: IntoIterator<Item = Result<RecordedEvent, eventlog::LogError>>,
    {
        bulk::load(&self.generation, events, scratch, budget, progress)
    }

    /// Position the new generation has reached.
    pub fn checkpoint(&self) -> Position {
        self.generation.checkpoint()
    }

    /// Every key where the active generation and this rebuild differ (`replay --verify`).
    /// Call it with both at the same checkpoint, while no writer can append (the engine's lock).
    pub fn compare(&self) -> Result<Vec<Difference>, ProjectionError> {
        compare::generations(&self.owner.current(), &self.generation)
    }

    /// Drops the new generation without installing it; the active one stays.
    pub fn discard(self) -> Result<(), ProjectionError> {
        let id = self.generation.id;
        drop(self.generation);
        reclaim::reclaim_now(&self.owner.db, tree_name(&self.owner.domain, id).as_bytes())
    }

    /// Makes the new generation the active one and retires the old tree, which is deleted in
    /// the background ([`Projections::wait_reclaimed`]). Call it with the new
    /// generation caught up to the log head while no writer can append (the engine's lock).
    /// The active generation and its version are recorded in one batch: after a crash the store
    /// names either the old generation with its version or the new one with this code's.
    pub fn install(self) -> Result<(), ProjectionError> {
        let owner = self.owner;
        let old = owner.current();
        let old_id = old.id;
        let mut batch = sled::Batch::default();
        batch.insert(ACTIVE, self.generation.id.to_be_bytes().to_vec());
        self.generation.version.record(&mut batch);
        owner.meta.apply_batch(batch)?;
        owner.meta.flush()?;
        match owner.current.write() {
            Ok(mut g) => *g = Arc::clone(&self.generation),
            Err(poisoned) => *poisoned.into_inner() = Arc::clone(&self.generation),
        }
        drop(old);
        // The new generation is installed; an old tree that cannot be reclaimed (damaged) is
        // left for the next open to try again, never a reason to fail.
        owner
            .reclaimer
            .spawn(&owner.db, tree_name(&owner.domain, old_id));
        let _ = owner
            .db
            .drop_tree(format!("projblank/{}", owner.domain.as_str()));
        Ok(())
    }
}

fn fold_into<I>(
    mut pending: Pending,
    events: I,
    chunk: usize,
    progress: &mut dyn FnMut(Position),
) -> Result<Position, ProjectionError>
where
    I: IntoIterator<Item = Result<RecordedEvent, eventlog::LogError>>,
{
    let chunk = chunk.max(1);
    let mut in_chunk = 0;
    for ev in events {
        let ev = ev?;
        pending.apply(&ev)?;
        in_chunk += 1;
        if in_chunk >= chunk {
            let reader = pending.reader();
            let generation = pending.commit()?;
            progress(generation.checkpoint());
            pending = Pending::new(generation, reader);
            in_chunk = 0;
        }
    }
    let generation = pending.commit()?;
    let at = generation.checkpoint();
    progress(at);
    Ok(at)
}
