//! [`Pending`]: a batch of events folded in memory over one projection generation, committed as
//! one atomic `sled::Batch` together with the new checkpoint (I4).
//!
//! It is also the [`domain::State`] that `decide` reads while a group of commands is being
//! decided, so the second command of a batch sees the first one's effects before anything is
//! written.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use domain::{
    apply_block, Case, CaseId, Directory, Event, FormFact, FormId, FormStatus, Position,
    RecordedEvent, Relationship, State, Timestamp,
};

use crate::asof::{departures, encode_version, RowCases, VersionMeta};
use crate::indexed::{self, Clocks};
use crate::{
    codec, keys, past, DiagnosticRow, FormEntry, Generation, LogReader, Prefetched,
    ProjectionError, StoredCase, Touched,
};

/// Where a case's row is (its owner) and its reverse-index entries.
pub(crate) struct Stored {
    pub(crate) owner: String,
    /// Target case id → extension; the last index naming a target wins, as in `commit`.
    pub(crate) targets: BTreeMap<String, bool>,
}

pub(crate) fn stored_of(case: &Case) -> Stored {
    Stored {
        owner: case.owner_id.clone(),
        targets: case
            .indices
            .values()
            .map(|ix| {
                (
                    ix.case_id.0.clone(),
                    ix.relationship == Relationship::Extension,
                )
            })
            .collect(),
    }
}

struct CaseSlot {
    /// The index entries stored before this batch, to move or skip them on commit.
    stored: Option<Stored>,
    /// The case before this batch, and its past (`past`), which this batch's versions extend.
    base: Option<Case>,
    past: Vec<u8>,
    current: Option<Case>,
    /// Positions of the events that touched the case, stored ones included, ascending.
    history: Vec<Position>,
    /// The generation held a tombstone for it when it was loaded.
    tombstone: bool,
    /// The position of its `indexed_on` row when it was loaded (its last change, if it existed).
    stored_last: Option<Position>,
    /// Its last change in this batch: position, `indexed_on`, received time.
    indexed: Option<(Position, u64, Timestamp)>,
    dirty: bool,
    /// The case after each event of this batch that touched it, with what the event was (time
    /// travel's version rows).
    versions: Vec<(Position, Arc<VersionMeta>, Option<Case>)>,
}

/// The effects of a sealed batch whose sled write may still be running: the next batch reads
/// through it, so deciding the next group need not wait for the write (see [`Pending::seal`]).
pub struct Overlay {
    generation_id: u64,
    from: Position,
    cases: HashMap<CaseId, StoredCase>,
    forms: HashMap<FormId, FormEntry>,
    directory: Arc<Directory>,
    checkpoint: Position,
    clocks: Clocks,
}

impl Overlay {
    /// Position of the last event the overlay holds.
    pub fn checkpoint(&self) -> Position {
        self.checkpoint
    }

    /// The ids this batch read or changed, for [`Prefetched::validate`].
    pub fn touched(&self) -> Touched {
        Touched::new(
            self.generation_id,
            self.from,
            self.checkpoint,
            self.cases.keys().cloned().collect(),
            self.forms.keys().cloned().collect(),
        )
    }
}

/// A batch ready to be written: one atomic sled batch with the checkpoint (I4).
pub struct Sealed {
    generation: Arc<Generation>,
    batch: sled::Batch,
    directory: Arc<Directory>,
    checkpoint: Position,
    clocks: Clocks,
}

impl Sealed {
    /// Writes the batch and publishes its checkpoint and directory to readers.
    pub fn apply(self) -> Result<Arc<Generation>, ProjectionError> {
        self.generation.tree.apply_batch(self.batch)?;
        self.generation
            .published(self.directory, self.checkpoint, self.clocks);
        Ok(self.generation)
    }

    /// Position of the last event in the batch.
    pub fn checkpoint(&self) -> Position {
        self.checkpoint
    }
}

/// Uncommitted projection changes over a generation.
pub struct Pending {
    generation: Arc<Generation>,
    directory: Arc<Directory>,
    directory_dirty: bool,
    cases: HashMap<CaseId, CaseSlot>,
    /// Cases `decide` read from the generation, kept so that folding the decision does not read
    /// them again (a form's case is read by `case` and `is_deleted`, then by the fold).
    loaded: RefCell<HashMap<CaseId, StoredCase>>,
    forms: HashMap<FormId, FormEntry>,
    diagnostics: Vec<DiagnosticRow>,
    /// Directory events of this batch, kept for time travel.
    directory_events: Vec<RecordedEvent>,
    checkpoint: Position,
    /// The checkpoint this batch started from.
    from: Position,
    error: RefCell<Option<ProjectionError>>,
    reader: Option<LogReader>,
    overlay: Option<Arc<Overlay>>,
    /// Form entries read ahead (`None`: no such form), validated by the caller.
    prefetched_forms: HashMap<FormId, Option<FormEntry>>,
    /// The `indexed_on` clocks after the events folded so far.
    clocks: Clocks,
    /// Changes to the forms' `indexed_on` rows, in event order (`None` removes).
    form_rows: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Pending {
    pub(crate) fn new(generation: Arc<Generation>, reader: Option<LogReader>) -> Self {
        Self::over(generation, reader, None, None)
    }

    /// A batch over `generation` as it will be once `overlay`'s batch is written. An overlay of
    /// another generation (replaced by a replay since) is ignored.
    pub(crate) fn over(
        generation: Arc<Generation>,
        reader: Option<LogReader>,
        overlay: Option<Arc<Overlay>>,
        prefetched: Option<Prefetched>,
    ) -> Self {
        let overlay = overlay.filter(|o| o.generation_id == generation.id);
        let prefetched = prefetched.filter(|p| p.generation_id == generation.id);
        let (loaded, prefetched_forms) = match prefetched {
            Some(p) => (p.cases, p.forms),
            None => (HashMap::new(), HashMap::new()),
        };
        let (directory, checkpoint, clocks) = match &overlay {
            Some(o) => (Arc::clone(&o.directory), o.checkpoint, o.clocks),
            None => (
                generation.directory(),
                generation.checkpoint(),
                generation.clocks(),
            ),
        };
        Pending {
            generation,
            directory,
            directory_dirty: false,
            cases: HashMap::new(),
            loaded: RefCell::new(loaded),
            forms: HashMap::new(),
            diagnostics: Vec::new(),
            directory_events: Vec::new(),
            checkpoint,
            from: checkpoint,
            error: RefCell::new(None),
            reader,
            overlay,
            prefetched_forms,
            clocks,
            form_rows: Vec::new(),
        }
    }

    /// Records a storage error met while `decide` read through this batch. `decide` then saw
    /// "absent", so the caller must check [`Pending::failed`] before appending what it decided.
    fn fail<T>(&self, e: ProjectionError) -> Option<T> {
        self.error.borrow_mut().get_or_insert(e);
        None
    }

    /// True when a read through this batch failed; its decisions must be discarded.
    pub fn failed(&self) -> bool {
        self.error.borrow().is_some()
    }

    /// The read error [`Pending::failed`] reports, taken out.
    pub fn take_error(&self) -> Option<ProjectionError> {
        self.error.borrow_mut().take()
    }

    /// The position of the last event folded.
    pub fn checkpoint(&self) -> Position {
        self.checkpoint
    }

    /// Number of cases and forms held in memory (replay uses it to bound memory).
    pub fn len(&self) -> usize {
        self.cases.len() + self.forms.len()
    }

    /// True when nothing was folded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0 && !self.directory_dirty
    }

    fn slot(&mut self, id: &CaseId) -> Result<&mut CaseSlot, ProjectionError> {
        if !self.cases.contains_key(id) {
            let loaded = self.loaded.get_mut().remove(id);
            let StoredCase {
                case: current,
                history,
                past,
                tombstone,
            } = match loaded {
                Some(s) => s,
                None => match self.overlay.as_ref().and_then(|o| o.cases.get(id)) {
                    Some(s) => s.clone(),
                    None => self.generation.load_stored(id)?,
                },
            };
            let stored = current.as_ref().map(stored_of);
            let stored_last = current.as_ref().and(history.last().copied());
            self.cases.insert(
                id.clone(),
                CaseSlot {
                    stored,
                    base: current.clone(),
                    past,
                    current,
                    history,
                    tombstone,
                    stored_last,
                    indexed: None,
                    dirty: false,
                    versions: Vec::new(),
                },
            );
        }
        self.cases
            .get_mut(id)
            .ok_or_else(|| ProjectionError::Decode {
                key: id.0.clone(),
                reason: "case slot vanished".into(),
            })
    }

    fn form_entry(&self, id: &FormId) -> Result<Option<FormEntry>, ProjectionError> {
        if let Some(f) = self.forms.get(id) {
            return Ok(Some(f.clone()));
        }
        if let Some(f) = self.overlay.as_ref().and_then(|o| o.forms.get(id)) {
            return Ok(Some(f.clone()));
        }
        if let Some(f) = self.prefetched_forms.get(id) {
            return Ok(f.clone());
        }
        self.generation.load_form(id)
    }

    /// Folds one event. Events must come in position order, starting right after the checkpoint.
    pub fn apply(&mut self, ev: &RecordedEvent) -> Result<(), ProjectionError> {
        let expected = self.checkpoint.next();
        if ev.position != expected {
            return Err(ProjectionError::OutOfOrder {
                expected,
                got: ev.position,
            });
        }
        if let Some((form_id, fact)) = FormFact::of(&ev.event, ev.position) {
            // A first acceptance does not depend on the entry before it: skip the read.
            let prev = match fact {
                FormFact::Accepted(_) => None,
                _ => self.form_entry(form_id)?,
            };
            let step = FormEntry::fold(prev.as_ref(), fact, ev.position);
            if let Some(entry) = step.entry {
                if entry.accepted && entry.position == ev.position {
                    // A version came in force: the form's `indexed_on` row moves here.
                    if let Some(old) = prev.as_ref().filter(|p| p.accepted) {
                        let key = indexed::key(keys::FORM_INDEXED, old.position, form_id.as_str());
                        self.form_rows.push((key, None));
                    }
                    self.clocks.form = indexed::next(self.clocks.form, ev.recorded_at);
                    let key = indexed::key(keys::FORM_INDEXED, ev.position, form_id.as_str());
                    let value = indexed::value(self.clocks.form, ev.recorded_at);
                    self.form_rows.push((key, Some(value)));
                }
                self.forms.insert(form_id.clone(), entry);
            }
            // Each case the event touched gets the case clock's next value, in case-id order.
            let mut in_order: Vec<&CaseId> = step.touched.iter().collect();
            in_order.sort();
            for c in in_order {
                self.clocks.case = indexed::next(self.clocks.case, ev.recorded_at);
                let stamp = self.clocks.case;
                self.slot(c)?.indexed = Some((ev.position, stamp, ev.recorded_at));
            }
            for c in &step.touched {
                self.slot(c)?.history.push(ev.position);
            }
            if step.rebuild {
                for c in &step.touched {
                    self.rebuild(c)?;
                }
            } else if let Some((form_id, blocks)) = ev.event.form_blocks() {
                for block in blocks {
                    let slot = self.slot(&block.case_id)?;
                    slot.current = Some(apply_block(slot.current.take(), block, form_id));
                    slot.dirty = true;
                }
            }
            if !step.touched.is_empty() {
                let meta = VersionMeta::of(ev, self.forms.get(form_id)).ok_or_else(|| {
                    ProjectionError::Decode {
                        key: form_id.0.clone(),
                        reason: format!(
                            "event at {} touched cases but is no form event",
                            ev.position
                        ),
                    }
                })?;
                let meta = Arc::new(meta);
                for c in &step.touched {
                    let slot = self.slot(c)?;
                    let version = slot.current.clone();
                    slot.versions
                        .push((ev.position, Arc::clone(&meta), version));
                }
            }
        } else {
            match &ev.event {
                Event::DiagnosticRaisedV1(d) => self.diagnostics.push(DiagnosticRow {
                    position: ev.position,
                    diagnostic: d.diagnostic.clone(),
                }),
                Event::FormDuplicateV1(_)
                | Event::FormAttachmentsV1(_)
                | Event::FormLastSyncTokenV1(_) => {}
                _ => {
                    // Directory events: copy on write, they are rare next to forms.
                    Arc::make_mut(&mut self.directory).apply_recorded(ev);
                    self.directory_dirty = true;
                    self.directory_events.push(ev.clone());
                }
            }
        }
        self.checkpoint = ev.position;
        Ok(())
    }

    pub(crate) fn reader(&self) -> Option<LogReader> {
        self.reader.clone()
    }

    fn read(&self, case: &CaseId, p: Position) -> Result<RecordedEvent, ProjectionError> {
        crate::read_logged(self.reader.as_ref(), case, p)
    }

    /// R58: rebuilds a case from its live forms — each non-archived form that touched it, in the
    /// received order of its first version, with the version in force. No live form: deleted.
    fn rebuild(&mut self, id: &CaseId) -> Result<(), ProjectionError> {
        let history = self.slot(id)?.history.clone();
        let case = self.fold_live_forms(id, &history, |_, _| true)?;
        let slot = self.slot(id)?;
        slot.current = case;
        slot.dirty = true;
        Ok(())
    }

    /// The case folded from the live forms among those recorded at `history` that `keep` keeps,
    /// in received order of their first versions, each with its version in force (R58).
    fn fold_live_forms(
        &self,
        id: &CaseId,
        history: &[Position],
        keep: impl Fn(&FormId, &FormEntry) -> bool,
    ) -> Result<Option<Case>, ProjectionError> {
        let mut positions = history.to_vec();
        positions.sort_unstable();
        positions.dedup();
        let mut forms: Vec<FormId> = Vec::new();
        for p in positions {
            let ev = self.read(id, p)?;
            if let Some((form_id, _)) = ev.event.form_blocks() {
                if !forms.contains(form_id) {
                    forms.push(form_id.clone());
                }
            }
        }
        let mut live: Vec<FormEntry> = Vec::new();
        for f in &forms {
            if let Some(entry) = self.form_entry(f)? {
                if entry.is_live() && keep(f, &entry) {
                    live.push(entry);
                }
            }
        }
        live.sort_by_key(|e| e.original);
        let mut versions = Vec::with_capacity(live.len());
        for entry in &live {
            versions.push(self.read(id, entry.position)?);
        }
        Ok(domain::fold_live(
            id,
            versions.iter().filter_map(|ev| ev.event.form_blocks()),
        ))
    }

    /// The positions of the events that touched a case so far, this batch's included.
    fn history_of(&self, id: &CaseId) -> Option<Vec<Position>> {
        match self.cases.get(id) {
            Some(slot) => Some(slot.history.clone()),
            None => self.stored(id).map(|s| s.history),
        }
    }

    /// What the generation stores about a case not folded in this batch, read once and kept.
    /// `None` after a storage error, which [`Pending::failed`] then reports.
    fn stored(&self, id: &CaseId) -> Option<StoredCase> {
        if let Some(s) = self.loaded.borrow().get(id) {
            return Some(s.clone());
        }
        if let Some(s) = self.overlay.as_ref().and_then(|o| o.cases.get(id)) {
            return Some(s.clone());
        }
        match self.generation.load_stored(id) {
            Ok(s) => {
                self.loaded.borrow_mut().insert(id.clone(), s.clone());
                Some(s)
            }
            Err(e) => self.fail(e),
        }
    }

    /// Writes everything folded so far, and the checkpoint, in one atomic batch.
    pub fn commit(self) -> Result<Arc<Generation>, ProjectionError> {
        self.seal()?.0.apply()
    }

    /// Turns everything folded so far into the batch to write and the overlay the next batch
    /// reads through until that write is done. Write sealed batches in the order sealed, each
    /// after the one before it.
    pub fn seal(self) -> Result<(Sealed, Overlay), ProjectionError> {
        if let Some(e) = self.error.into_inner() {
            return Err(e);
        }
        let mut batch = sled::Batch::default();
        let mut diag_seq: HashMap<Position, u32> = HashMap::new();
        let mut pasts: HashMap<CaseId, Vec<u8>> = HashMap::new();
        // Time travel: one version row per event, every case it touched in it (sorted by id).
        let mut rows: BTreeMap<Position, (&VersionMeta, RowCases<'_>)> = BTreeMap::new();
        for (id, slot) in &self.cases {
            for (p, meta, version) in &slot.versions {
                rows.entry(*p)
                    .or_insert_with(|| (meta, Vec::new()))
                    .1
                    .push((id.as_str(), version.as_ref()));
            }
            if let Some((p, stamp, at)) = slot.indexed {
                if let Some(old) = slot.stored_last.filter(|_| slot.stored.is_some()) {
                    batch.remove(indexed::key(keys::CASE_INDEXED, old, id.as_str()));
                }
                if slot.current.is_some() {
                    batch.insert(
                        indexed::key(keys::CASE_INDEXED, p, id.as_str()),
                        indexed::value(stamp, at),
                    );
                }
            }
            let stored = slot.stored.as_ref().map(|s| s.owner.as_str());
            let versions = slot.versions.iter().map(|(p, _, v)| (*p, v.as_ref()));
            for (owner, p) in departures(stored, versions) {
                batch.insert(keys::departed(owner, id.as_str(), p.0), Vec::new());
            }
            if !slot.dirty {
                continue;
            }
            let new = slot.current.as_ref().map(stored_of);
            if let Some(old) = &slot.stored {
                if new.as_ref().is_none_or(|n| n.owner != old.owner) {
                    batch.remove(keys::case(old.owner.as_bytes(), id.as_str()));
                }
                for t in old.targets.keys() {
                    if new.as_ref().is_none_or(|n| !n.targets.contains_key(t)) {
                        batch.remove(keys::reverse(t, id.as_str()));
                    }
                }
            }
            match (&slot.current, new) {
                (Some(case), Some(new)) => {
                    if slot.stored.is_none() {
                        // Revived by an unarchive (R57), or new: no tombstone any more.
                        batch.remove(keys::tombstone(id.as_str()));
                    }
                    let past = if slot.versions.is_empty() {
                        slot.past.clone()
                    } else {
                        let states: Vec<Option<&Case>> =
                            slot.versions.iter().map(|(_, _, v)| v.as_ref()).collect();
                        past::extend(
                            id.as_str().as_bytes(),
                            slot.base.as_ref(),
                            &slot.past,
                            &states,
                        )?
                    };
                    batch.insert(
                        keys::case(new.owner.as_bytes(), id.as_str()),
                        codec::encode_case(case, &slot.history, &past),
                    );
                    pasts.insert(id.clone(), past);
                    // Most visits change neither owner nor indices; rewriting their entries
                    // anyway costs sled a tree descent each.
                    let old = slot.stored.as_ref();
                    if old.is_none_or(|o| o.owner != new.owner) {
                        batch.insert(keys::owner(id.as_str()), new.owner.as_bytes().to_vec());
                    }
                    for (target, extension) in &new.targets {
                        if old.is_none_or(|o| o.targets.get(target) != Some(extension)) {
                            batch.insert(
                                keys::reverse(target, id.as_str()),
                                vec![u8::from(*extension)],
                            );
                        }
                    }
                }
                _ => {
                    // R54/R57: a case left with no live form is deleted; the tombstone makes a
                    // later block naming it an IllegalCaseId (R50) and keeps its history.
                    batch.remove(keys::owner(id.as_str()));
                    let mut history = Vec::with_capacity(8 * slot.history.len());
                    codec::encode_history_into(&mut history, &slot.history);
                    batch.insert(keys::tombstone(id.as_str()), history);
                }
            }
        }
        for (p, (meta, mut cases)) in rows {
            cases.sort_by(|a, b| a.0.cmp(b.0));
            batch.insert(keys::version(p.0), encode_version(meta, &cases));
        }
        for (id, form) in &self.forms {
            batch.insert(keys::form(id.as_str()), codec::encode(form));
        }
        for (key, value) in &self.form_rows {
            match value {
                Some(v) => batch.insert(key.clone(), v.clone()),
                None => batch.remove(key.clone()),
            }
        }
        self.clocks.record(&mut batch);
        for row in &self.diagnostics {
            let n = diag_seq.entry(row.position).or_insert(0);
            batch.insert(keys::diagnostic(row.position.0, *n), codec::encode(row));
            *n += 1;
        }
        if self.directory_dirty {
            batch.insert(keys::DIRECTORY, codec::encode(self.directory.as_ref()));
        }
        for ev in &self.directory_events {
            batch.insert(keys::directory_event(ev.position.0), codec::encode(ev));
        }
        batch.insert(keys::CHECKPOINT, self.checkpoint.to_be_bytes().to_vec());
        let cases = self
            .cases
            .into_iter()
            .map(|(id, slot)| {
                let tombstone = if slot.dirty {
                    slot.current.is_none()
                } else {
                    slot.tombstone
                };
                let past = match &slot.current {
                    Some(_) => pasts.remove(&id).unwrap_or(slot.past),
                    None => Vec::new(),
                };
                let stored = StoredCase {
                    case: slot.current,
                    history: slot.history,
                    past,
                    tombstone,
                };
                (id, stored)
            })
            .collect();
        let overlay = Overlay {
            generation_id: self.generation.id,
            from: self.from,
            cases,
            forms: self.forms,
            directory: Arc::clone(&self.directory),
            checkpoint: self.checkpoint,
            clocks: self.clocks,
        };
        let sealed = Sealed {
            generation: self.generation,
            batch,
            directory: self.directory,
            checkpoint: self.checkpoint,
            clocks: self.clocks,
        };
        Ok((sealed, overlay))
    }
}

impl State for Pending {
    fn directory(&self) -> &Directory {
        &self.directory
    }

    fn case(&self, id: &CaseId) -> Option<Case> {
        match self.cases.get(id) {
            Some(slot) => slot.current.clone(),
            None => self.stored(id).and_then(|s| s.case),
        }
    }

    fn form(&self, id: &FormId) -> Option<FormStatus> {
        let entry = self.form_entry(id).unwrap_or_else(|e| self.fail(e));
        entry.map(|e| FormStatus {
            accepted: e.accepted,
            xmlns: e.xmlns,
            content_hash: e.content_hash,
            position: e.position,
            archived: e.archived,
        })
    }

    fn case_before_form(&self, id: &CaseId, form: &FormId) -> Option<Case> {
        let entry = self.form_entry(form).unwrap_or_else(|e| self.fail(e))?;
        let history = self.history_of(id)?;
        self.fold_live_forms(id, &history, |f, e| {
            f != form && e.original < entry.original
        })
        .unwrap_or_else(|e| self.fail(e))
    }

    fn original_received_at(&self, form: &FormId) -> Option<Timestamp> {
        let entry = self.form_entry(form).unwrap_or_else(|e| self.fail(e))?;
        let case = CaseId::new(format!("(form {form})"));
        match self.read(&case, entry.original) {
            Ok(ev) => Some(ev.recorded_at),
            Err(e) => self.fail(e),
        }
    }

    fn is_deleted(&self, id: &CaseId) -> bool {
        if let Some(slot) = self.cases.get(id) {
            return slot.current.is_none() && (slot.stored.is_some() || slot.dirty);
        }
        self.stored(id).is_some_and(|s| s.tombstone)
    }
}
