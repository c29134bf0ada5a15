//! The time-travel and forensics commands of the CLI: `case show --at`, `case history`,
//! `case who-could-see`, `cases/groups/diagnostics --at`, `conflicts`.
//!
//! Exit status as everywhere: 0 answered, 1 for an unknown id, a case that did not exist yet, or
//! a point outside the log.

use anyhow::{Context, Result};
use caseledger::domain::{CaseId, Position, Timestamp, UserId};
use caseledger::projections::{CaseAt, ConflictRow, HistoryEntry};
use caseledger::{view, AsOf, Engine};
use clap::Args;
use serde_json::{json, Value};

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
            (None, Some(t)) => AsOf::Time(Timestamp::parse_rfc3339(t).context("--as-of")?),
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
        CaseAt::NotYet => {
            eprintln!("error: case {id} did not exist yet at position {p}");
            Ok(1)
        }
        CaseAt::Deleted { since } => {
            eprintln!(
                "error: case {id} was deleted at position {since} (every form that touched it was archived or edited away), before {p}"
            );
            Ok(1)
        }
    }
}

/// `case history ID`.
pub fn case_history(engine: &Engine, json: bool, id: &str) -> Result<u8> {
    let entries = engine.query(|p| p.case_history(&CaseId::new(id)))?;
    if entries.is_empty() {
        eprintln!("error: no case {id}");
        return Ok(1);
    }
    if json {
        out(&serde_json::to_value(&entries)?)?;
        return Ok(0);
    }
    for e in &entries {
        print_history_entry(e)?;
    }
    Ok(0)
}

fn print_history_entry(e: &HistoryEntry) -> Result<()> {
    let replaces = e
        .replaces
        .map(|p| format!(" (replaces @{p})"))
        .unwrap_or_default();
    print_line(&format!(
        "@{:<7} {}  {:<10} form {}{}  user {}  app {}",
        e.position,
        e.received_at,
        e.action,
        e.form_id,
        replaces,
        e.user.as_deref().unwrap_or("-"),
        e.app.as_deref().unwrap_or("-"),
    ))?;
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
        print_line(&format!("           {line}"))?;
    }
    Ok(())
}

/// `case who-could-see ID [--at]`.
pub fn who_could_see(engine: &Engine, json: bool, id: &str, at: &At) -> Result<u8> {
    let p = at.resolve(engine)?;
    let case = CaseId::new(id);
    let state = engine.query(|proj| proj.case_at(&case, p))?;
    if state == CaseAt::NotYet {
        eprintln!("error: case {id} did not exist yet at position {p}");
        return Ok(1);
    }
    let viewers = engine.query(|proj| proj.who_could_see(&case, p))?;
    if json {
        out(&json!({"case_id": id, "at": p, "viewers": viewers}))?;
    } else {
        print_line(&format!("case {id} as of @{p}"))?;
        print_line(&format!("{:<24} {:<10} VIA", "USER", "SINCE"))?;
        for v in &viewers {
            print_line(&format!("{:<24} @{:<9} {}", v.user, v.since, v.via))?;
        }
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
        (None, None) => anyhow::bail!("give --user or --owner"),
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
    print_line(&format!(
        "{:<13} {:<38} {:<16} {:<12} {:<12} {:<12} RESULT",
        "ID", "CASE", "PROPERTY", "BASE", "THEIRS", "MINE"
    ))?;
    for r in &rows {
        let c = &r.conflict;
        print_line(&format!(
            "{:<13} {:<38} {:<16} {:<12} {:<12} {:<12} {}",
            r.id,
            c.case_id,
            c.property,
            c.base.as_deref().unwrap_or("∅"),
            c.theirs.value,
            c.mine.value,
            c.result
        ))?;
    }
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
        eprintln!("error: no conflict {id}");
        return Ok(1);
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
