//! Reading ahead of the writer lock.
//!
//! Deciding a group of submissions reads, for each form, its form entry and the cases its
//! blocks name: a few sled point reads per form, which were most of the time the engine's writer
//! lock was held. [`crate::Projections::prefetch`] does those reads before the lock is taken,
//! while another group is being decided. What it read may be stale by the time the lock is
//! taken: every sealed batch reports the ids it may have changed ([`Touched`]), and
//! [`Prefetched::validate`] forgets every id a batch sealed since the read touched, or
//! everything when it cannot account for all of them. Whatever is forgotten is read again
//! under the lock, as before.

use std::collections::{HashMap, HashSet, VecDeque};

use domain::{CaseId, FormId, Position};

use crate::{FormEntry, StoredCase};

/// Stored state read ahead, and the state of the store it was read at.
pub struct Prefetched {
    pub(crate) generation_id: u64,
    /// Checkpoint of the generation before the reads (each read is at least this new).
    pub(crate) checkpoint: Position,
    pub(crate) cases: HashMap<CaseId, StoredCase>,
    pub(crate) forms: HashMap<FormId, Option<FormEntry>>,
}

/// The ids a sealed batch may have changed: the batch folded positions `from + 1 ..= to`.
pub struct Touched {
    generation_id: u64,
    from: Position,
    to: Position,
    cases: HashSet<CaseId>,
    forms: HashSet<FormId>,
}

impl Touched {
    pub(crate) fn new(
        generation_id: u64,
        from: Position,
        to: Position,
        cases: HashSet<CaseId>,
        forms: HashSet<FormId>,
    ) -> Self {
        Touched {
            generation_id,
            from,
            to,
            cases,
            forms,
        }
    }
}

impl Prefetched {
    /// Number of ids still held.
    pub fn len(&self) -> usize {
        self.cases.len() + self.forms.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn clear(&mut self) {
        self.cases.clear();
        self.forms.clear();
    }

    /// Keeps only what is still current for a batch that starts at `latest` of generation
    /// `generation_id`, given the batches sealed since (`recent`, oldest first). Without an
    /// unbroken chain of batches from the read's checkpoint to `latest` everything is dropped.
    pub fn validate(&mut self, generation_id: u64, latest: Position, recent: &VecDeque<Touched>) {
        if self.generation_id != generation_id {
            self.clear();
            return;
        }
        let mut covered = self.checkpoint;
        for t in recent {
            if t.generation_id != generation_id || t.to <= self.checkpoint {
                continue;
            }
            if t.from != covered {
                self.clear();
                return;
            }
            self.cases.retain(|id, _| !t.cases.contains(id));
            self.forms.retain(|id, _| !t.forms.contains(id));
            covered = t.to;
        }
        if covered != latest {
            self.clear();
        }
    }
}
