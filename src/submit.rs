//! `submit`: read every input with a bound before the store is opened, then submit them in order.
//!
//! What must hold: nothing is opened or appended unless every form and attachment was read
//! whole and within the transport cap, so a slow, endless or oversized input never holds the
//! store's lock and never leaves half a submission behind (`docs/CLI.md`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use caseledger::domain::{AppId, AttachmentFile, Command, Timestamp};
use caseledger::{Engine, EngineConfig, Request, SubmitOutcome, SubmitStatus};
use serde_json::json;

use crate::fail::{fail, Code};
use crate::table::Table;
use crate::{out, Cli, Cmd};

/// Bodies up to this many times `Limits::max_bytes` are stored even when rejected as too large.
const TRANSPORT_FACTOR: u64 = 4;

/// What `submit` read before the store was opened.
pub(crate) struct Inputs {
    /// Each form file and its bytes, in order.
    forms: Vec<(PathBuf, Vec<u8>)>,
    /// The files sent with the (one) form.
    attachments: Vec<AttachmentFile>,
}

/// Reads every form and attachment of `submit`, each up to the transport cap, before the store
/// is opened: an unreadable or oversized file means nothing is opened or appended. A body over
/// the parser's size limit is still stored (rejected as InvalidXml, R50) up to the cap, beyond
/// which it is refused, as an HTTP server answers 413: storing gigabytes because someone sent
/// them is not "keeping the submission", it is a denial of service.
///
/// A FIFO blocks in `open` until a writer comes; no lock is held then, so another command or the
/// writer itself can still use the store (an interrupt ends the wait).
pub(crate) fn read_inputs(
    files: &[PathBuf],
    attachments: &[PathBuf],
    config: &EngineConfig,
) -> Result<Inputs> {
    if !attachments.is_empty() && files.len() != 1 {
        return Err(fail(
            Code::Usage,
            "--attachment goes with exactly one form FILE",
        ));
    }
    let cap = (config.limits.max_bytes as u64).saturating_mul(TRANSPORT_FACTOR);
    let mut forms = Vec::with_capacity(files.len());
    for f in files {
        forms.push((f.clone(), read_capped(f, cap)?));
    }
    let mut sent = Vec::with_capacity(attachments.len());
    for a in attachments {
        let name = a
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| fail(Code::Usage, format!("{} has no file name", a.display())))?;
        sent.push(AttachmentFile {
            name,
            bytes: read_capped(a, cap)?,
        });
    }
    Ok(Inputs {
        forms,
        attachments: sent,
    })
}

/// The bytes of `path`, refused past `cap` bytes: a regular file by its size, unread; anything
/// else (a pipe, a device such as /dev/zero) after reading one byte more than `cap`.
fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let too_large = |size: String| {
        fail(
            Code::TooLarge,
            format!(
                "{} {size}, over the {cap}-byte transport limit ({TRANSPORT_FACTOR} x \
                 max_bytes); nothing was stored",
                path.display()
            ),
        )
    };
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if meta.is_file() && meta.len() > cap {
        return Err(too_large(format!("is {} bytes", meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > cap {
        return Err(too_large(format!("holds more than {cap} bytes")));
    }
    Ok(bytes)
}

pub(crate) async fn submit(engine: &Engine, cli: &Cli, inputs: Inputs) -> Result<u8> {
    let Cmd::Submit {
        app, received_at, ..
    } = &cli.command
    else {
        return Err(fail(Code::Internal, "submit called for another command"));
    };
    let received_at = received_at
        .as_deref()
        .map(|t| {
            Timestamp::parse_rfc3339(t)
                .map_err(|e| fail(Code::InvalidInput, format!("--received-at: {e}")))
        })
        .transpose()?;
    let app = app.as_deref().map(AppId::new);
    if let Some(a) = &app {
        if !engine.projections().directory().apps.contains_key(a) {
            return Err(fail(Code::NotFound, format!("unknown app {a}")));
        }
    }
    let mut files_sent = inputs.attachments;
    let mut names = Vec::with_capacity(inputs.forms.len());
    let mut requests = Vec::with_capacity(inputs.forms.len());
    for (file, raw) in inputs.forms {
        names.push(file.display().to_string());
        let sub = engine.prepare_submission_with(raw, app.clone(), std::mem::take(&mut files_sent));
        let mut r = Request::new(Command::SubmitForm(Box::new(sub)));
        r.received_at = received_at;
        requests.push(r);
    }
    let results = engine.execute_many(requests).await?;
    let mut code = 0;
    let mut outcomes = Vec::with_capacity(names.len());
    for (file, result) in names.into_iter().zip(results) {
        let outcome = SubmitOutcome::from_events(&result?.events)?;
        if outcome.outcome == SubmitStatus::Rejected {
            code = 2;
        }
        outcomes.push((file, outcome));
    }
    print_outcomes(cli.json, &outcomes)?;
    Ok(code)
}

/// Submission outcomes: one JSON object per line, or a table.
pub(crate) fn print_outcomes(json: bool, outcomes: &[(String, SubmitOutcome)]) -> Result<()> {
    if json {
        for (file, outcome) in outcomes {
            out(&json!({
                "file": file,
                "instance_id": outcome.instance_id,
                "outcome": outcome.outcome,
                "error": outcome.error.as_ref().map(|e| json!({"code": e.code.as_str(), "message": e.message})),
                "position": outcome.position.0,
                "cases": outcome.cases,
            }))?;
        }
        return Ok(());
    }
    let mut table = Table::new(&["FILE", "OUTCOME", "INSTANCE_ID", "POSITION", "DETAIL"]).right(3);
    for (file, outcome) in outcomes {
        let detail = match &outcome.error {
            Some(e) => format!("{}: {}", e.code, e.message),
            None => outcome
                .cases
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        };
        table.row(vec![
            file.clone(),
            format!("{:?}", outcome.outcome),
            outcome.instance_id.to_string(),
            outcome.position.to_string(),
            detail,
        ]);
    }
    table.print()
}
