//! Which cases a restore sends: the user's footprint (R45) and, for an incremental restore, what
//! changed in it since the token (R48).
//!
//! What must hold: a case is read from the projections at most once per restore ([`Graph`]
//! caches it), and an incremental restore never sends a case outside the footprint except an
//! owned case that changed and left it (so the phone learns of the close).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::rc::Rc;

use domain::{Case, CaseId, Directory, Event, FormEntry, FormFact, Position, Relationship, UserId};
use engine::Engine;
use projections::{ProjectionError, Projections};

use crate::RestoreError;

/// R45 treats a case with both a child and an extension index as a child.
fn is_extension(case: &Case) -> bool {
    let mut extension = false;
    for ix in case.indices.values() {
        match ix.relationship {
            Relationship::Child => return false,
            Relationship::Extension => extension = true,
        }
    }
    extension
}

/// The case graph as far as one restore has looked at it; each case is read at most once.
pub(crate) struct Graph<'p> {
    projections: &'p Projections,
    cases: HashMap<CaseId, Option<Rc<Case>>>,
}

impl<'p> Graph<'p> {
    pub(crate) fn new(projections: &'p Projections) -> Self {
        Graph {
            projections,
            cases: HashMap::new(),
        }
    }

    /// A case; `None` when it never existed or was deleted (R54, R57).
    pub(crate) fn get(&mut self, id: &CaseId) -> Result<Option<Rc<Case>>, ProjectionError> {
        if let Some(c) = self.cases.get(id) {
            return Ok(c.clone());
        }
        let c = self.projections.case(id)?.map(Rc::new);
        self.cases.insert(id.clone(), c.clone());
        Ok(c)
    }

    /// R45, following HQ's livequery (`casexml/apps/phone/data_providers/case/livequery.py`)
    /// and its relationship corpus (`casexml/apps/phone/tests/data/case_relationship_tests.json`,
    /// which disagrees with the last example of livequery's docstring; the corpus and the code
    /// agree, and this follows them). Written as a fixed point rather than HQ's batched walk:
    /// - owned: open cases whose owner is one of the user's owner ids;
    /// - available: open and not an extension, or open and an extension of an available case;
    /// - live: owned and available, then closed under "a live case pulls in every case it
    ///   indexes (parents even when closed, hosts) and every open extension of itself".
    pub(crate) fn footprint(
        &mut self,
        owner_ids: &BTreeSet<String>,
    ) -> Result<BTreeSet<CaseId>, ProjectionError> {
        let mut owned = BTreeSet::new();
        for owner in owner_ids {
            for case in self.projections.cases_by_owner(owner, false)? {
                if !case.closed {
                    owned.insert(case.case_id.clone());
                    self.cases.insert(case.case_id.clone(), Some(Rc::new(case)));
                }
            }
        }
        let available = self.available(&owned)?;
        let seed: Vec<CaseId> = owned
            .into_iter()
            .filter(|c| available.contains(c))
            .collect();
        self.closure(seed)
    }

    /// Which of `owned` (and the hosts above them) are available. Walks up from the owned
    /// extensions to their hosts, then marks availability downwards from the open
    /// non-extension cases found. Linear, and an extension cycle with no open non-extension
    /// case above it is simply never available (HQ's outcome too).
    fn available(&mut self, owned: &BTreeSet<CaseId>) -> Result<HashSet<CaseId>, ProjectionError> {
        let mut seen = HashSet::new();
        let mut todo: Vec<CaseId> = owned.iter().cloned().collect();
        let mut waiting: HashMap<CaseId, Vec<CaseId>> = HashMap::new();
        let mut roots = Vec::new();
        while let Some(id) = todo.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            let Some(case) = self.get(&id)? else { continue };
            if case.closed {
                continue;
            }
            if !is_extension(&case) {
                roots.push(id);
                continue;
            }
            for ix in case.indices.values() {
                waiting
                    .entry(ix.case_id.clone())
                    .or_default()
                    .push(id.clone());
                todo.push(ix.case_id.clone());
            }
        }
        let mut available: HashSet<CaseId> = roots.iter().cloned().collect();
        while let Some(host) = roots.pop() {
            for ext in waiting.remove(&host).unwrap_or_default() {
                if available.insert(ext.clone()) {
                    roots.push(ext);
                }
            }
        }
        Ok(available)
    }

    /// `seed` and everything it pulls in (R45 closure).
    fn closure(&mut self, seed: Vec<CaseId>) -> Result<BTreeSet<CaseId>, ProjectionError> {
        let mut live: BTreeSet<CaseId> = seed.iter().cloned().collect();
        let mut todo = seed;
        while let Some(id) = todo.pop() {
            let Some(case) = self.get(&id)? else { continue };
            for ix in case.indices.values() {
                if !live.contains(&ix.case_id) && self.get(&ix.case_id)?.is_some() {
                    live.insert(ix.case_id.clone());
                    todo.push(ix.case_id.clone());
                }
            }
            // The reverse index keeps one relationship per (target, case) pair, so a case with
            // a child and an extension index to the same target may show as a child: read it.
            for (sub, _) in self.projections.indexed_by(&id)? {
                if live.contains(&sub) {
                    continue;
                }
                let Some(s) = self.get(&sub)? else { continue };
                let extension_of_this = s
                    .indices
                    .values()
                    .any(|ix| ix.case_id == id && ix.relationship == Relationship::Extension);
                if !s.closed && extension_of_this {
                    live.insert(sub.clone());
                    todo.push(sub);
                }
            }
        }
        Ok(live)
    }

    /// True when the case's history has an event after `since`.
    fn changed_after(&self, id: &CaseId, since: Position) -> Result<bool, ProjectionError> {
        Ok(self
            .projections
            .history(id)?
            .last()
            .is_some_and(|p| *p > since))
    }

    /// What an incremental restore sends (see [`crate::restore`]).
    // One caller; the arguments are that restore's context and a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn changed(
        &mut self,
        engine: &Engine,
        directory: &Directory,
        user: &str,
        owner_ids: &BTreeSet<String>,
        live: &BTreeSet<CaseId>,
        since: Position,
        at: Position,
    ) -> Result<BTreeSet<CaseId>, RestoreError> {
        let mut owners_changed = false;
        // Cases that events after the token touched; only used to find owned cases that left
        // the footprint.
        let mut touched: BTreeSet<CaseId> = BTreeSet::new();
        let me = UserId::new(user);
        for ev in engine.log().iter_from(since.next()) {
            let ev = ev?;
            if ev.position > at {
                break;
            }
            match &ev.event {
                Event::MemberAddedV1(m) | Event::MemberRemovedV1(m) if m.user_id == me => {
                    owners_changed = true;
                }
                // A case-sharing switch of a group the user is in now. A group the user left
                // after the token needs no check: the membership event sets the flag.
                Event::GroupCaseSharingSetV1(g)
                    if directory
                        .groups
                        .get(&g.group_id)
                        .is_some_and(|g| g.members.contains(&me)) =>
                {
                    owners_changed = true;
                }
                _ => touched_by(engine, self.projections, &ev, &mut touched)?,
            }
        }

        let mut send = if owners_changed {
            live.clone()
        } else {
            let mut changed = Vec::new();
            for id in live {
                if self.changed_after(id, since)? {
                    changed.push(id.clone());
                }
            }
            // Closure edges from a live case only lead to live cases, so this stays inside
            // the footprint.
            self.closure(changed)?
        };
        for id in touched {
            if live.contains(&id) {
                continue;
            }
            let Some(case) = self.get(&id)? else { continue };
            if owner_ids.contains(&case.owner_id) && self.changed_after(&id, since)? {
                send.insert(id);
            }
        }
        Ok(send)
    }
}

/// Adds to `out` the cases an event touched, by the fold the projections use
/// ([`domain::FormEntry::fold`]), given the form's entry before the event: for an edit, the
/// replaced version read back from the log; for an archive, the entry in force.
fn touched_by(
    engine: &Engine,
    projections: &Projections,
    ev: &domain::RecordedEvent,
    out: &mut BTreeSet<CaseId>,
) -> Result<(), RestoreError> {
    let Some((form_id, fact)) = FormFact::of(&ev.event, ev.position) else {
        return Ok(());
    };
    let prev = match (&ev.event, &fact) {
        (Event::FormEditedV1(e), _) => {
            let old = engine.log().read_at(e.replaces)?;
            old.and_then(|o| FormFact::of(&o.event, o.position).map(|(_, f)| f))
                .map(|f| FormEntry::fold(None, f, e.replaces))
                .and_then(|step| step.entry)
        }
        (_, FormFact::Archived(_)) => projections.form(form_id)?,
        _ => None,
    };
    out.extend(FormEntry::fold(prev.as_ref(), fact, ev.position).touched);
    Ok(())
}
