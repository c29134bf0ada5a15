//! The time-travel and forensics commands of the CLI: `case show --at`, `case history`,
//! `case who-could-see`, `cases/groups/diagnostics --at`, `conflicts`.
//!
//! Exit status as everywhere: 0 answered, 1 for an unknown id, a case that did not exist yet, or
//! a point outside the log.

use anyhow::Result;
use caseledger::domain::{CaseId, Position, Timestamp, UserId};
use caseledger::projections::{CaseAt, ConflictRow, HistoryEntry};
use caseledger::{view, AsOf, Engine};
use clap::Args;
use serde_json::{json, Value};

use crate::fail::{fail, Code};
use crate::table::Table;
use crate::{out, print_case, print_line};

/// Where to look: `--at POSITION` or `--as-of RFC3339` (server received time); now by default.
#[derive(Args, Debug, Clone, Default)]
pub struct At {
    /// As of this log position (after its event).
    #[arg(long, conflicts_with = "as_of")]
    pub at: Option<u64>,
    /// As of this server received time (RFC 3339): after the last event received then or before.
    #[arg(long)]
    pub as_of: Option<String>,
}

impl At {
    /// True when the query asks for the past.
    pub fn is_set(&self) -> bool {
        self.at.is_some() || self.as_of.is_some()
    }

    /// The position to query, checked against the log.
    pub fn resolve(&self, engine: &Engine) -> Result<Position> {
        let at = match (&self.at, &self.as_of) {
            (Some(p), _) => AsOf::Position(Position(*p)),
            (None, Some(t)) => AsOf::Time(
                Timestamp::parse_rfc3339(t)
                    .map_err(|e| fail(Code::InvalidInput, format!("--as-of: {e}")))?,
            ),
            (None, None) => AsOf::Head,
        };
        Ok(engine.resolve(at)?)
    }
}

/// `case show ID --at`: the case as it was, or exit 1.
pub fn case_show(engine: &Engine, json: bool, id: &str, at: &At) -> Result<u8> {
    let p = at.resolve(engine)?;
    match engine.query(|proj| proj.case_at(&CaseId::new(id), p))? {
        CaseAt::Exists(case) => {
            if json {
                out(&view::case_json(&case))?;
            } else {
                print_case(&case)?;
            }
            Ok(0)
        }
        CaseAt::NotYet => Err(fail(
            Code::NotFound,
            format!("case {id} did not exist yet at position {p}"),
        )),
        CaseAt::Deleted { since } => Err(fail(
            Code::NotFound,
            format!(
                "case {id} was deleted at position {since} (every form that touched it was archived or edited away), before {p}"
            ),
        )),
    }
}

/// `case history ID`.
pub fn case_history(engine: &Engine, json: bool, id: &str) -> Result<u8> {
    let entries = engine.query(|p| p.case_history(&CaseId::new(id)))?;
    if entries.is_empty() {
        return Err(fail(Code::NotFound, format!("no case {id}")));
    }
    if json {
        out(&serde_json::to_value(&entries)?)?;
        return Ok(0);
    }
    let mut table = Table::new(&[
        "POSITION", "RECEIVED", "ACTION", "FORM", "USER", "APP", "CHANGE",
    ])
    .right(0);
    for e in &entries {
        history_rows(&mut table, e)?;
    }
    table.print()?;
    Ok(0)
}

/// One row per change of the entry; the entry's own columns only on its first row.
fn history_rows(table: &mut Table, e: &HistoryEntry) -> Result<()> {
    let replaces = e
        .replaces
        .map(|p| format!(" (replaces @{p})"))
        .unwrap_or_default();
    let mut head = vec![
        e.position.to_string(),
        e.received_at.to_string(),
        e.action.to_string(),
        format!("{}{replaces}", e.form_id),
        e.user.as_deref().unwrap_or("-").to_owned(),
        e.app.as_deref().unwrap_or("-").to_owned(),
    ];
    let mut changes = Vec::with_capacity(e.changes.len());
    for c in &e.changes {
        let line = match serde_json::to_value(c)? {
            Value::Object(map) => {
                let kind = map.get("change").and_then(Value::as_str).unwrap_or("?");
                let text = |k: &str| match map.get(k) {
                    Some(Value::String(s)) => s.clone(),
                    _ => "∅".to_owned(),
                };
                match kind {
                    "property" | "index" | "attachment" => {
                        format!("{kind} {}: {} → {}", text("name"), text("old"), text("new"))
                    }
                    "owner" => format!("owner: {} → {}", text("old"), text("new")),
                    other => other.to_owned(),
                }
            }
            other => other.to_string(),
        };
        changes.push(line);
    }
    if changes.is_empty() {
        head.push(String::new());
        table.row(head);
        return Ok(());
    }
    for (i, change) in changes.into_iter().enumerate() {
        let mut row = if i == 0 {
            std::mem::take(&mut head)
        } else {
            vec![String::new(); 6]
        };
        row.push(change);
        table.row(row);
    }
    Ok(())
}

/// `case who-could-see ID [--at]`.
pub fn who_could_see(engine: &Engine, json: bool, id: &str, at: &At) -> Result<u8> {
    let p = at.resolve(engine)?;
    let case = CaseId::new(id);
    let state = engine.query(|proj| proj.case_at(&case, p))?;
    if state == CaseAt::NotYet {
        return Err(fail(
            Code::NotFound,
            format!("case {id} did not exist yet at position {p}"),
        ));
    }
    let viewers = engine.query(|proj| proj.who_could_see(&case, p))?;
    if json {
        out(&json!({"case_id": id, "at": p, "viewers": viewers}))?;
    } else {
        print_line(&format!("case {id} as of @{p}"))?;
        let mut table = Table::new(&["USER", "SINCE", "VIA"]).right(1);
        for v in &viewers {
            table.row(vec![
                v.user.to_string(),
                v.since.to_string(),
                v.via.to_string(),
            ]);
        }
        table.print()?;
        print_line(&format!("{} user(s)", viewers.len()))?;
    }
    Ok(0)
}

/// `cases --user|--owner --at`: the list as it was; `None` when the user was unknown then.
pub fn cases(
    engine: &Engine,
    user: Option<&str>,
    owner: Option<&str>,
    include_closed: bool,
    at: &At,
) -> Result<Option<Vec<caseledger::domain::Case>>> {
    let p = at.resolve(engine)?;
    Ok(match (user, owner) {
        (Some(u), _) => {
            if !engine
                .query(|proj| proj.directory_at(p))?
                .users
                .contains_key(&UserId::new(u))
            {
                return Ok(None);
            }
            Some(engine.query(|proj| proj.cases_for_user_at(u, include_closed, p))?)
        }
        (None, Some(o)) => Some(engine.query(|proj| proj.cases_by_owner_at(o, include_closed, p))?),
        (None, None) => return Err(fail(Code::Usage, "give --user or --owner")),
    })
}

/// `conflicts [--case ID] [--user ID]`.
pub fn conflicts(
    engine: &Engine,
    json: bool,
    case: Option<&str>,
    user: Option<&str>,
) -> Result<u8> {
    let rows = match case {
        Some(c) => {
            let mut rows = engine.query(|p| p.case_conflicts(&CaseId::new(c)))?;
            rows.retain(|r| {
                user.is_none_or(|u| r.conflict.mine.user == u || r.conflict.theirs.user == u)
            });
            rows
        }
        None => engine.query(|p| p.conflicts(user))?,
    };
    if json {
        out(&Value::Array(rows.iter().map(conflict_json).collect()))?;
        return Ok(0);
    }
    let mut table = Table::new(&["ID", "CASE", "PROPERTY", "BASE", "THEIRS", "MINE", "RESULT"]);
    for r in &rows {
        let c = &r.conflict;
        table.row(vec![
            r.id.clone(),
            c.case_id.to_string(),
            c.property.clone(),
            c.base.as_deref().unwrap_or("∅").to_owned(),
            c.theirs.value.clone(),
            c.mine.value.clone(),
            c.result.clone(),
        ]);
    }
    table.print()?;
    print_line(&format!("{} conflict(s)", rows.len()))?;
    Ok(0)
}

/// `conflicts show ID`: one conflict, three-way.
pub fn conflict_show(engine: &Engine, json: bool, id: &str) -> Result<u8> {
    let Some(row) = engine
        .query(|p| p.conflicts(None))?
        .into_iter()
        .find(|r| r.id == id)
    else {
        return Err(fail(Code::NotFound, format!("no conflict {id}")));
    };
    if json {
        out(&conflict_json(&row))?;
        return Ok(0);
    }
    let c = &row.conflict;
    print_line(&format!(
        "conflict {} on case {}, property {}",
        row.id, c.case_id, c.property
    ))?;
    print_line(&format!(
        "  base    {:<16} in force at @{}",
        c.base.as_deref().unwrap_or("∅"),
        c.base_position
    ))?;
    for (label, side) in [("theirs", &c.theirs), ("mine", &c.mine)] {
        print_line(&format!(
            "  {label:<7} {:<16} form {} by {} on the phone at {}, applied at @{}",
            side.value, side.form, side.user, side.phone_time, side.position
        ))?;
    }
    print_line(&format!(
        "  result  {:<16} received order wins (R70); time-travel: case show {} --at {} / --at {} / --at {}",
        c.result, c.case_id, c.base_position, c.theirs.position, c.mine.position
    ))?;
    Ok(0)
}

fn conflict_json(row: &ConflictRow) -> Value {
    let c = &row.conflict;
    let side = |s: &caseledger::domain::ConflictSide| {
        json!({
            "form_id": s.form,
            "position": s.position,
            "user": s.user,
            "phone_time": s.phone_time.to_string(),
            "value": s.value,
        })
    };
    json!({
        "id": row.id,
        "case_id": c.case_id,
        "property": c.property,
        "base": c.base,
        "mine": c.mine.value,
        "theirs": c.theirs.value,
        "result": c.result,
        "positions": {
            "base": c.base_position,
            "theirs": c.theirs.position,
            "mine": c.mine.position,
        },
        "sides": {"theirs": side(&c.theirs), "mine": side(&c.mine)},
    })
}
