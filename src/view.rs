//! JSON shapes of the CLI contract (issue 3): cases, groups, diagnostics, log entries.

use std::collections::BTreeMap;

use domain::{Case, Event, RecordedEvent};
use projections::{DiagnosticRow, GroupView};
use serde::Serialize;
use serde_json::{json, Value};

fn ts(t: Option<domain::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// A case as `case show` prints it (R32).
pub fn case_json(case: &Case) -> Value {
    let indices: BTreeMap<&str, Value> = case
        .indices
        .iter()
        .map(|(name, ix)| {
            (
                name.as_str(),
                json!({
                    "case_id": ix.case_id,
                    "case_type": ix.case_type,
                    "relationship": ix.relationship.as_str(),
                }),
            )
        })
        .collect();
    let attachments: BTreeMap<&str, Value> = case
        .attachments
        .iter()
        .map(|(name, a)| {
            (
                name.as_str(),
                json!({"src": a.src, "from": a.from, "name": a.name}),
            )
        })
        .collect();
    json!({
        "case_id": case.case_id,
        "case_type": case.case_type,
        "case_name": case.case_name,
        "owner_id": case.owner_id,
        "user_id": case.user_id,
        "external_id": case.external_id,
        "opened_on": ts(case.opened_on),
        "opened_by": case.opened_by,
        "modified_on": ts(case.modified_on),
        "closed": case.closed,
        "closed_on": ts(case.closed_on),
        "closed_by": case.closed_by,
        "properties": case.properties,
        "indices": indices,
        "attachments": attachments,
        "xform_ids": case.xform_ids,
    })
}

/// A group as `groups` prints it.
pub fn group_json(g: &GroupView) -> Value {
    json!({"id": g.id, "name": g.name, "case_sharing": g.case_sharing, "members": g.members})
}

/// A diagnostic as `diagnostics` prints it.
pub fn diagnostic_json(d: &DiagnosticRow) -> Value {
    json!({
        "code": d.diagnostic.code.as_str(),
        "subject": d.diagnostic.subject,
        "detail": d.diagnostic.detail,
        "position": d.position.0,
    })
}

/// One log entry: envelope fields and a summary of the event (raw bytes are not printed).
#[derive(Debug, Serialize)]
pub struct LogEntry {
    /// Position.
    pub position: u64,
    /// Server received time.
    pub recorded_at: String,
    /// Command id.
    pub command_id: String,
    /// Event type name.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Event type version.
    pub version: u16,
    /// One-line description.
    pub summary: String,
}

/// Summarises a recorded event for `log`.
pub fn log_entry(ev: &RecordedEvent) -> LogEntry {
    let summary = match &ev.event {
        Event::UserCreatedV1(e) => format!("user {} ({})", e.user_id, e.username),
        Event::GroupCreatedV1(e) => format!(
            "group {} {:?} case_sharing={}",
            e.group_id, e.name, e.case_sharing
        ),
        Event::GroupCaseSharingSetV1(e) => {
            format!("group {} case_sharing={}", e.group_id, e.case_sharing)
        }
        Event::MemberAddedV1(e) => format!("{} joins {}", e.user_id, e.group_id),
        Event::MemberRemovedV1(e) => format!("{} leaves {}", e.user_id, e.group_id),
        Event::AppCreatedV1(e) => format!(
            "app {} {:?} case_sharing={} case_types=[{}]",
            e.app_id,
            e.name,
            e.case_sharing,
            e.case_types.join(",")
        ),
        Event::AppCaseSharingSetV1(e) => {
            format!("app {} case_sharing={}", e.app_id, e.case_sharing)
        }
        Event::FormAcceptedV1(e) => format!(
            "form {} accepted, {} bytes, cases [{}]",
            e.form.form_id,
            e.form.raw.len(),
            e.case_ids()
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ),
        Event::FormRejectedV1(e) => format!(
            "form {} rejected {}: {}",
            e.form.form_id, e.error.code, e.error.message
        ),
        Event::FormDuplicateV1(e) => {
            format!("form {} duplicate of @{}", e.form.form_id, e.original)
        }
        Event::FormEditedV1(e) => format!(
            "form {} edited (replaces @{}), {} bytes",
            e.form.form_id,
            e.replaces,
            e.form.raw.len()
        ),
        Event::FormArchivedV1(e) => format!("form {} archived", e.form_id),
        Event::FormAttachmentsV1(e) => format!(
            "form {} attachments: {}",
            e.form_id,
            e.files
                .iter()
                .map(|f| format!("{} ({} bytes)", f.name, f.bytes.len()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Event::FormUnarchivedV1(e) => format!("form {} unarchived", e.form_id),
        // Hashes only; still not worth a line of their bytes.
        Event::UserPasswordSetV1(e) => format!("user {} password set", e.user_id),
        Event::ApiKeyCreatedV1(e) => format!(
            "API key {} created for {} ({})",
            e.key_id, e.user_id, e.role
        ),
        Event::ApiKeyRevokedV1(e) => format!("API key {} revoked", e.key_id),
        Event::FormLastSyncTokenV1(e) => {
            format!("form {} based on sync token {}", e.form_id, e.token)
        }
        Event::DiagnosticRaisedV1(e) => format!(
            "{} {}: {}",
            e.diagnostic.code, e.diagnostic.subject, e.diagnostic.detail
        ),
        _ => String::new(),
    };
    LogEntry {
        position: ev.position.0,
        recorded_at: ev.recorded_at.to_string(),
        command_id: ev.command_id.0.clone(),
        kind: ev.event.type_name(),
        version: ev.event.type_version(),
        summary,
    }
}
