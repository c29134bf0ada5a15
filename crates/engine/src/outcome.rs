//! What a command produced, and the submission outcome the CLI and API report.

use domain::{CaseId, Event, FormId, Position, RecordedEvent, Rejection};
use serde::Serialize;

use crate::EngineError;

/// The events a command appended (empty when it changed nothing).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Recorded events with their positions.
    pub events: Vec<RecordedEvent>,
}

/// Outcome of a submission, in its wire spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SubmitStatus {
    /// Applied to cases.
    Accepted,
    /// Stored with its error; no case effect (R49).
    Rejected,
    /// Identical resend; no case effect (R53).
    Duplicate,
    /// Same instanceID, new content (R54).
    Edited,
}

/// The result of one submission.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitOutcome {
    /// The id the form was filed under.
    pub instance_id: FormId,
    /// What happened.
    pub outcome: SubmitStatus,
    /// Why it was rejected.
    pub error: Option<Rejection>,
    /// Position of the form event.
    pub position: Position,
    /// Cases the form touched.
    pub cases: Vec<CaseId>,
}

impl SubmitOutcome {
    /// Reads the outcome off the events a submission recorded.
    pub fn from_events(events: &[RecordedEvent]) -> Result<Self, EngineError> {
        for ev in events {
            let (instance_id, outcome, error, cases) = match &ev.event {
                Event::FormAcceptedV1(f) => (
                    f.form.form_id.clone(),
                    SubmitStatus::Accepted,
                    None,
                    f.case_ids(),
                ),
                Event::FormRejectedV1(f) => (
                    f.form.form_id.clone(),
                    SubmitStatus::Rejected,
                    Some(f.error.clone()),
                    Vec::new(),
                ),
                Event::FormEditedV1(f) => (
                    f.form.form_id.clone(),
                    SubmitStatus::Edited,
                    None,
                    domain::case_ids_of(&f.blocks),
                ),
                Event::FormDuplicateV1(f) => (
                    f.form.form_id.clone(),
                    SubmitStatus::Duplicate,
                    None,
                    Vec::new(),
                ),
                _ => continue,
            };
            return Ok(SubmitOutcome {
                instance_id,
                outcome,
                error,
                position: ev.position,
                cases,
            });
        }
        Err(EngineError::Internal(
            "a submission recorded no form event".into(),
        ))
    }
}
