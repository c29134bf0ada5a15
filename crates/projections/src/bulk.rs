//! Bulk rebuild: replay into an empty generation by sorting instead of by random writes.
//!
//! sled 0.34.7 pays about 20 µs for an insert at a random key once a tree outgrows its cache, and
//! a chunked fold ([`crate::Pending`]) writes every touched case and every form at random keys:
//! that was nearly all of replay's time at 1 000 000 events (docs/PERFORMANCE.md). Inserts in key
//! order cost a few µs. So a full replay folds in three sorted passes, with memory bounded by the
//! sorters' budget whatever the size of the log:
//!
//! 1. Scan the log once. Directory events fold in memory, diagnostics are written as they come
//!    (their keys are positions, already in order), and every case block and every form fact goes
//!    to an external sorter keyed by case id or form id.
//! 2. Merge the form facts: each form's entry is folded exactly as [`crate::Pending`] folds it and
//!    written in form-id order. Edits and archives also yield history marks for the cases they
//!    touched, and the forms whose blocks are not simply all in force (edited, archived, accepted
//!    twice) are remembered.
//! 3. Merge the case blocks with the marks: each case is folded from its blocks, and its owner
//!    entry written in case-id order. A case touched by a remembered form is folded from its live
//!    forms only, in received order of their first version, with the version in force (R58),
//!    which is what the incremental fold's rebuilds leave. The cases with their history (keyed
//!    by owner) and the reverse-index entries go through one more sorter and are written in key
//!    order.
//!
//! 4. The `indexed_on` clocks (module `indexed`) run in position order: the case clock over the
//!    version rows as they are gathered (one part per event and case, in case-id order), the
//!    form clock over the versions in force that phase 2 sorted by position; each case's and
//!    form's last value is written as its index row.
//!
//! The generation gets its checkpoint last; until then it is not installed, and a crash leaves a
//! tree that the next open reclaims (I4).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use domain::{
    apply_block, BlockApplied, Case, CaseChange, CaseId, CaseTimeline, Directory, Event, FormEntry,
    FormFact, FormId, Position, RecordedEvent, Timestamp,
};
use serde::{Deserialize, Serialize};

use crate::asof::{departures, encode_part, push_len, Action, VersionMeta};
use crate::indexed::{self, Clocks};
use crate::pending::stored_of;
use crate::sorter::{Record, Sorter};
use crate::{codec, keys, past, DiagnosticRow, Generation, ProjectionError};

/// Entries per sled batch while writing sorted keys.
const WRITE_BATCH: usize = 512;

/// A case fact of phase 1 or 2, in the case sorters.
#[derive(Serialize, Deserialize)]
enum CaseFact {
    /// A block of the form version recorded at the record's position (`meta.form`).
    Block {
        meta: Box<VersionMeta>,
        block: Box<BlockApplied>,
    },
    /// An edit (`edit`) or an archive or unarchive of `form` at the record's position touched
    /// the case; `archived` is the form's flag after it.
    Mark {
        meta: Box<VersionMeta>,
        edit: bool,
        archived: bool,
    },
}

/// What phase 3 needs to know of a form whose blocks are not all in force.
struct Special {
    original: Position,
}

/// Figures of a bulk rebuild, for logs and benches.
#[derive(Debug, Clone, Copy, Default)]
pub struct BulkStats {
    /// Events scanned.
    pub events: u64,
    /// Cases written (tombstones included).
    pub cases: u64,
    /// Form entries written.
    pub forms: u64,
    /// Sorted runs spilled to scratch files.
    pub runs: usize,
}

/// Sequential writer of sorted keys into a generation's tree, in batches.
struct Writer<'g> {
    tree: &'g sled::Tree,
    batch: sled::Batch,
    n: usize,
}

impl<'g> Writer<'g> {
    fn new(tree: &'g sled::Tree) -> Self {
        Writer {
            tree,
            batch: sled::Batch::default(),
            n: 0,
        }
    }

    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), ProjectionError> {
        self.batch.insert(key, value);
        self.n += 1;
        if self.n >= WRITE_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ProjectionError> {
        if self.n > 0 {
            self.tree.apply_batch(std::mem::take(&mut self.batch))?;
            self.n = 0;
        }
        Ok(())
    }
}

fn payload<T: Serialize>(value: &T) -> Vec<u8> {
    codec::encode(value)
}

/// Replays `events` (positions 1, 2, … in order) into `generation`, which must be empty.
/// `scratch` is a directory for sorted runs; `budget` bounds each sorter's memory in bytes.
pub(crate) fn load<I>(
    generation: &Generation,
    events: I,
    scratch: &Path,
    budget: usize,
    progress: &mut dyn FnMut(Position),
) -> Result<BulkStats, ProjectionError>
where
    I: IntoIterator<Item = Result<RecordedEvent, eventlog::LogError>>,
{
    if generation.checkpoint() != Position(0) {
        return Err(ProjectionError::OutOfOrder {
            expected: generation.checkpoint().next(),
            got: Position(1),
        });
    }
    std::fs::create_dir_all(scratch).map_err(|e| ProjectionError::Scratch {
        path: scratch.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut stats = BulkStats::default();
    let mut cases = Sorter::new(scratch, "cases", budget);
    let mut forms = Sorter::new(scratch, "forms", budget);
    let mut directory = Directory::default();
    let mut writer = Writer::new(&generation.tree);
    let mut checkpoint = Position(0);

    // Phase 1: scan.
    for ev in events {
        let ev = ev?;
        let expected = checkpoint.next();
        if ev.position != expected {
            return Err(ProjectionError::OutOfOrder {
                expected,
                got: ev.position,
            });
        }
        let p = ev.position.0;
        if let Some((form_id, fact)) = FormFact::of(&ev.event, ev.position) {
            if let Some((_, blocks)) = ev.event.form_blocks() {
                if let Some(meta) = VersionMeta::of(&ev, None) {
                    push_blocks(&mut cases, &meta, blocks, p)?;
                }
            }
            let replaces = match &ev.event {
                Event::FormEditedV1(f) => Some(f.replaces),
                _ => None,
            };
            push_form(&mut forms, form_id, p, &(fact, ev.recorded_at, replaces))?;
        } else {
            match &ev.event {
                Event::DiagnosticRaisedV1(d) => {
                    let row = DiagnosticRow {
                        position: ev.position,
                        diagnostic: d.diagnostic.clone(),
                    };
                    writer.insert(keys::diagnostic(p, 0), codec::encode(&row))?;
                }
                Event::FormDuplicateV1(_)
                | Event::FormAttachmentsV1(_)
                | Event::FormLastSyncTokenV1(_) => {}
                _ => {
                    directory.apply_recorded(&ev);
                    writer.insert(keys::directory_event(p), codec::encode(&ev))?;
                }
            }
        }
        checkpoint = ev.position;
        stats.events += 1;
        if p % 1024 == 0 {
            progress(checkpoint);
        }
    }
    writer.flush()?;

    // Phase 2: forms, in form-id order; marks for the cases edits and archives touched.
    let mut marks = Sorter::new(scratch, "marks", budget);
    let mut in_force = Sorter::new(scratch, "in-force", budget);
    let mut special: HashMap<FormId, Special> = HashMap::new();
    let mut group: Vec<(u64, FormRecordFact)> = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    let forms = forms.finish()?;
    stats.runs += forms.runs();
    for record in forms {
        let record = record?;
        if current.as_ref().is_some_and(|k| *k != record.key) {
            if let Some(key) = current.take() {
                stats.forms += fold_form(
                    &key,
                    &mut group,
                    &mut writer,
                    &mut marks,
                    &mut in_force,
                    &mut special,
                )?;
            }
        }
        let fact = codec::decode(&record.key, &record.payload)?;
        group.push((record.position, fact));
        current = Some(record.key);
    }
    if let Some(key) = current.take() {
        stats.forms += fold_form(
            &key,
            &mut group,
            &mut writer,
            &mut marks,
            &mut in_force,
            &mut special,
        )?;
    }
    writer.flush()?;

    // The form clock over the versions in force, in position order (one form per position).
    let mut clocks = Clocks::default();
    let in_force = in_force.finish()?;
    stats.runs += in_force.runs();
    for record in in_force {
        let record = record?;
        let (form, at, last): (FormId, Timestamp, bool) =
            codec::decode(&record.key, &record.payload)?;
        clocks.form = indexed::next(clocks.form, at);
        if last {
            writer.insert(
                indexed::key(keys::FORM_INDEXED, Position(record.position), form.as_str()),
                indexed::value(clocks.form, at),
            )?;
        }
    }
    writer.flush()?;

    // Phase 3: cases, in case-id order, blocks and marks merged.
    let mut index = Sorter::new(scratch, "index", budget);
    let mut rows = Sorter::new(scratch, "versions", budget);
    let mut latest = Sorter::new(scratch, "latest", budget);
    let (cases, marks) = (cases.finish()?, marks.finish()?);
    stats.runs += cases.runs() + marks.runs();
    let mut case_records = cases.peekable();
    let mut mark_records = marks.peekable();
    loop {
        // The smaller next key of the two streams, then every record of that key from both.
        let next_key = match (case_records.peek(), mark_records.peek()) {
            (Some(Err(_)), _) => return Err(take_err(&mut case_records)),
            (_, Some(Err(_))) => return Err(take_err(&mut mark_records)),
            (Some(Ok(a)), Some(Ok(b))) => a.key.clone().min(b.key.clone()),
            (Some(Ok(a)), None) => a.key.clone(),
            (None, Some(Ok(b))) => b.key.clone(),
            (None, None) => break,
        };
        let mut blocks: Vec<(u64, u32, VersionMeta, BlockApplied)> = Vec::new();
        let mut marks: Vec<(u64, VersionMeta, bool, bool)> = Vec::new();
        let mut history: BTreeSet<u64> = BTreeSet::new();
        while let Some(r) = case_records.next_if(|r| r.as_ref().is_ok_and(|r| r.key == next_key)) {
            let r = r?;
            history.insert(r.position);
            if let CaseFact::Block { meta, block } = codec::decode(&r.key, &r.payload)? {
                blocks.push((r.position, r.seq, *meta, *block));
            }
        }
        while let Some(r) = mark_records.next_if(|r| r.as_ref().is_ok_and(|r| r.key == next_key)) {
            let r = r?;
            history.insert(r.position);
            if let CaseFact::Mark {
                meta,
                edit,
                archived,
            } = codec::decode(&r.key, &r.payload)?
            {
                marks.push((r.position, *meta, edit, archived));
            }
        }
        let id = String::from_utf8_lossy(&next_key).into_owned();
        let history: Vec<Position> = history.into_iter().map(Position).collect();
        let case_id = domain::CaseId::new(id.clone());
        let (case, versions) = fold_case(&case_id, blocks, marks, &special);
        for (owner, p) in departures(
            None,
            versions.iter().map(|(p, _, v)| (Position(*p), v.as_ref())),
        ) {
            index.push(Record {
                key: keys::departed(owner, &id, p.0),
                position: 0,
                seq: 0,
                payload: Vec::new(),
            })?;
        }
        // The case's past: from every version, as the live fold extends it version by version.
        let states: Vec<Option<&Case>> = versions.iter().map(|(_, _, v)| v.as_ref()).collect();
        let past = past::extend(&next_key, None, &[], &states)?;
        for (p, meta, version) in versions {
            // Version rows are keyed by position: they go through a sorter of their own, keyed
            // by position then case id, each record already encoded as its part of the row.
            let mut key = keys::version(p);
            key.extend_from_slice(id.as_bytes());
            let meta = codec::encode(&meta);
            let mut part = Vec::with_capacity(4 + meta.len() + 512);
            push_len(&mut part, meta.len());
            part.extend_from_slice(&meta);
            part.extend_from_slice(&encode_part(&id, version.as_ref()));
            rows.push(Record {
                key,
                position: 0,
                seq: 0,
                payload: part,
            })?;
        }
        match case {
            Some(case) => {
                if let Some(last) = history.last() {
                    // Its `indexed_on` row, at its last change; the value comes with the clock.
                    latest.push(Record {
                        key: indexed::key(keys::CASE_INDEXED, *last, &id),
                        position: 0,
                        seq: 0,
                        payload: Vec::new(),
                    })?;
                }
                let stored = stored_of(&case);
                writer.insert(keys::owner(&id), stored.owner.as_bytes().to_vec())?;
                // Cases are keyed by owner: they are written after this pass, in key order.
                index.push(Record {
                    key: keys::case(stored.owner.as_bytes(), &id),
                    position: 0,
                    seq: 0,
                    payload: codec::encode_case(&case, &history, &past),
                })?;
                for (target, extension) in &stored.targets {
                    index.push(Record {
                        key: keys::reverse(target, &id),
                        position: 0,
                        seq: 0,
                        payload: vec![u8::from(*extension)],
                    })?;
                }
            }
            None => {
                let mut value = Vec::with_capacity(8 * history.len());
                codec::encode_history_into(&mut value, &history);
                writer.insert(keys::tombstone(&id), value)?;
            }
        }
        stats.cases += 1;
    }
    writer.flush()?;
    let index = index.finish()?;
    stats.runs += index.runs();
    for record in index {
        let record = record?;
        writer.insert(record.key, record.payload)?;
    }
    // Version rows: the cases of one event gathered, in position order (I11).
    let rows = rows.finish()?;
    stats.runs += rows.runs();
    // Each record is its meta's length and bytes, then its case's part of the row: a row is the
    // meta once, the count, then the parts in case-id order (`asof::encode_version`), so nothing
    // is decoded again here.
    // The case clock runs over the same parts, (position, case id) in order; a case's row is
    // written at the part of its last change, which `latest` lists in the same order.
    let latest = latest.finish()?;
    stats.runs += latest.runs();
    let mut latest = latest.peekable();
    let mut row = RowBuilder::default();
    for record in rows {
        let record = record?;
        let at = part_recorded_at(&record.key, &record.payload)?;
        clocks.case = indexed::next(clocks.case, at);
        let rest = record.key.get(1..).unwrap_or_default();
        if let Some(l) = latest.next_if(|l| l.as_ref().is_ok_and(|l| l.key.get(1..) == Some(rest)))
        {
            writer.insert(l?.key, indexed::value(clocks.case, at))?;
        }
        let position = record.key.get(..9).unwrap_or_default().to_vec();
        if row.key != position {
            row.write(&mut writer)?;
            row.key = position;
        }
        row.push(&record.key, &record.payload)?;
    }
    row.write(&mut writer)?;
    if let Some(l) = latest.next() {
        let key = l?.key;
        return Err(ProjectionError::Scratch {
            path: String::from_utf8_lossy(&key).into_owned(),
            reason: "a case's last change has no version part".into(),
        });
    }
    writer.insert(
        keys::CASE_CLOCK.to_vec(),
        clocks.case.to_be_bytes().to_vec(),
    )?;
    writer.insert(
        keys::FORM_CLOCK.to_vec(),
        clocks.form.to_be_bytes().to_vec(),
    )?;
    writer.insert(keys::DIRECTORY.to_vec(), codec::encode(&directory))?;
    writer.insert(keys::CHECKPOINT.to_vec(), checkpoint.to_be_bytes().to_vec())?;
    writer.flush()?;
    generation.published(Arc::new(directory), checkpoint, clocks);
    progress(checkpoint);
    Ok(stats)
}

/// A version row gathered from the sorted parts of its cases.
#[derive(Default)]
struct RowBuilder {
    key: Vec<u8>,
    meta: Vec<u8>,
    parts: Vec<u8>,
    count: u64,
}

impl RowBuilder {
    fn push(&mut self, key: &[u8], record: &[u8]) -> Result<(), ProjectionError> {
        let bad = || ProjectionError::Scratch {
            path: String::from_utf8_lossy(key).into_owned(),
            reason: "version part without its meta".into(),
        };
        let len = record
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(bad)?;
        let meta = record.get(4..4 + len).ok_or_else(bad)?;
        if self.count == 0 {
            self.meta = meta.to_vec();
        }
        self.parts
            .extend_from_slice(record.get(4 + len..).unwrap_or_default());
        self.count += 1;
        Ok(())
    }

    fn write(&mut self, writer: &mut Writer<'_>) -> Result<(), ProjectionError> {
        if self.count == 0 {
            return Ok(());
        }
        let mut value = Vec::with_capacity(8 + self.meta.len() + self.parts.len());
        push_len(&mut value, self.meta.len());
        value.extend_from_slice(&self.meta);
        push_len(
            &mut value,
            usize::try_from(self.count).unwrap_or(usize::MAX),
        );
        value.extend_from_slice(&self.parts);
        self.parts.clear();
        self.count = 0;
        writer.insert(std::mem::take(&mut self.key), value)
    }
}

/// The received time in a version part's meta (`RowBuilder::push` reads the same layout).
fn part_recorded_at(key: &[u8], record: &[u8]) -> Result<Timestamp, ProjectionError> {
    let len = record
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(usize::MAX);
    let meta =
        record
            .get(4..4usize.saturating_add(len))
            .ok_or_else(|| ProjectionError::Scratch {
                path: String::from_utf8_lossy(key).into_owned(),
                reason: "version part without its meta".into(),
            })?;
    let meta: VersionMeta = codec::decode(key, meta)?;
    Ok(meta.recorded_at)
}

fn take_err(records: &mut std::iter::Peekable<crate::sorter::Merge>) -> ProjectionError {
    match records.next() {
        Some(Err(e)) => e,
        _ => ProjectionError::Scratch {
            path: String::new(),
            reason: "sorted run ended in an error".into(),
        },
    }
}

fn push_blocks(
    cases: &mut Sorter,
    meta: &VersionMeta,
    blocks: &[BlockApplied],
    position: u64,
) -> Result<(), ProjectionError> {
    for (seq, block) in blocks.iter().enumerate() {
        cases.push(Record {
            key: block.case_id.as_str().as_bytes().to_vec(),
            position,
            seq: u32::try_from(seq).unwrap_or(u32::MAX),
            payload: payload(&CaseFact::Block {
                meta: Box::new(meta.clone()),
                block: Box::new(block.clone()),
            }),
        })?;
    }
    Ok(())
}

/// A form fact with the received time of its event and, for an edit, the version it replaced:
/// what the marks of edits and archives need for their version rows.
type FormRecordFact = (FormFact, Timestamp, Option<Position>);

fn push_form(
    forms: &mut Sorter,
    form: &FormId,
    position: u64,
    fact: &FormRecordFact,
) -> Result<(), ProjectionError> {
    forms.push(Record {
        key: form.as_str().as_bytes().to_vec(),
        position,
        seq: 0,
        payload: payload(fact),
    })
}

/// Folds one form's facts (position order) as [`crate::Pending::apply`] does, writes its entry,
/// and marks the cases its edits and archives touched. Returns 1 when an entry was written.
fn fold_form(
    key: &[u8],
    facts: &mut Vec<(u64, FormRecordFact)>,
    writer: &mut Writer<'_>,
    marks: &mut Sorter,
    in_force: &mut Sorter,
    special: &mut HashMap<FormId, Special>,
) -> Result<u64, ProjectionError> {
    let mut entry: Option<FormEntry> = None;
    // Positions where a version came in force, with their received times (the form clock).
    let mut versions: Vec<(u64, Timestamp)> = Vec::new();
    let mut rewritten = false;
    let id = FormId::new(String::from_utf8_lossy(key).into_owned());
    for (p, (fact, recorded_at, replaces)) in facts.drain(..) {
        let edit = matches!(fact, FormFact::Edited(_));
        let step = FormEntry::fold(entry.as_ref(), fact, Position(p));
        if step.rebuild {
            rewritten = true;
            let after = step.entry.as_ref();
            let archived = after.is_some_and(|e| e.archived);
            let meta = VersionMeta {
                recorded_at,
                action: match (edit, archived) {
                    (true, _) => Action::Edited,
                    (false, true) => Action::Archived,
                    (false, false) => Action::Unarchived,
                },
                form: id.clone(),
                user: after.and_then(|e| e.user_id.clone()),
                app: after.and_then(|e| e.app_id.clone()),
                replaces,
            };
            let mark = payload(&CaseFact::Mark {
                meta: Box::new(meta),
                edit,
                archived,
            });
            for c in &step.touched {
                marks.push(Record {
                    key: c.as_str().as_bytes().to_vec(),
                    position: p,
                    seq: 0,
                    payload: mark.clone(),
                })?;
            }
        }
        if let Some(e) = step.entry {
            if e.accepted && e.position == Position(p) {
                versions.push((p, recorded_at));
            }
            entry = Some(e);
        }
    }
    let Some(entry) = entry else { return Ok(0) };
    for (p, at) in versions {
        let last = entry.accepted && entry.position == Position(p);
        in_force.push(Record {
            key: Vec::new(),
            position: p,
            seq: 0,
            payload: payload(&(&id, at, last)),
        })?;
    }
    if rewritten {
        special.insert(
            id.clone(),
            Special {
                original: entry.original,
            },
        );
    }
    writer.insert(keys::form(id.as_str()), codec::encode(&entry))?;
    Ok(1)
}

/// A case from its blocks, `(position, seq, form, block)` in position order, and from the marks
/// edits and archives left on it, `(position, form, edit, archived after)`: the case at the end and after
/// each position that touched it (time travel's version rows).
///
/// When no form that touched it was edited or archived, every block is in force in received
/// order and folds forward. Otherwise the case goes through [`domain::CaseTimeline`], change by
/// change, which rebuilds it from its live forms at each edit or archive (R58) exactly as the
/// incremental fold does.
#[allow(clippy::type_complexity)]
fn fold_case(
    id: &CaseId,
    blocks: Vec<(u64, u32, VersionMeta, BlockApplied)>,
    marks: Vec<(u64, VersionMeta, bool, bool)>,
    special: &HashMap<FormId, Special>,
) -> (Option<Case>, Vec<(u64, VersionMeta, Option<Case>)>) {
    let mut versions: Vec<(u64, VersionMeta, Option<Case>)> = Vec::new();
    let rebuilt = !marks.is_empty()
        || blocks
            .iter()
            .any(|(_, _, m, _)| special.contains_key(&m.form));
    if !rebuilt {
        let mut case: Option<Case> = None;
        for (p, _, meta, block) in blocks {
            case = Some(apply_block(case, &block, &meta.form));
            match versions.last_mut() {
                Some((last, _, v)) if *last == p => *v = case.clone(),
                _ => versions.push((p, meta, case.clone())),
            }
        }
        return (case, versions);
    }
    // Changes in position order: the blocks of one form version at a position, an edit whose
    // new version has no block for this case, or an archive; each with its event's metadata.
    let mut changes: BTreeMap<u64, (VersionMeta, CaseChange)> = BTreeMap::new();
    for (p, _, meta, block) in blocks {
        match changes.get_mut(&p) {
            Some((_, CaseChange::Version { blocks, .. })) => blocks.push(block),
            _ => {
                let original = special.get(&meta.form).map_or(Position(p), |s| s.original);
                let change = CaseChange::Version {
                    form: meta.form.clone(),
                    original,
                    blocks: vec![block],
                    archived: false,
                };
                changes.insert(p, (meta, change));
            }
        }
    }
    for (p, meta, edit, archived) in marks {
        if !edit {
            let change = CaseChange::Archive {
                form: meta.form.clone(),
                archived,
            };
            changes.insert(p, (meta, change));
            continue;
        }
        // An edit keeps the form's archived flag (R54), which may predate this case's changes.
        match changes.get_mut(&p) {
            Some((_, CaseChange::Version { archived: a, .. })) => *a = archived,
            _ => {
                let original = special.get(&meta.form).map_or(Position(p), |s| s.original);
                let change = CaseChange::Version {
                    form: meta.form.clone(),
                    original,
                    blocks: Vec::new(),
                    archived,
                };
                changes.insert(p, (meta, change));
            }
        }
    }
    let mut timeline = CaseTimeline::new(id.clone());
    for (p, (meta, change)) in changes {
        timeline.apply(Position(p), meta.recorded_at, change);
        versions.push((p, meta, timeline.case().cloned()));
    }
    (timeline.case().cloned(), versions)
}
