//! The form receiver (API.md §1): `POST /a/{domain}/receiver/[secure/][{app_id}/]`.
//!
//! The body is the form XML, or multipart with the XML in the file part
//! `xml_submission_file` and every other file part an attachment kept with the form. The
//! answer is OpenRosa XML with `X-CommCareHQ-FormID`, `Location` and `X-Caseledger-Position`
//! (the last log position the submission wrote, for reading one's own writes); its status
//! follows API.md §1.5 and `X-OpenRosa-Version`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use domain::{AppId, AttachmentFile, Command};
use engine::{SubmitOutcome, SubmitStatus};

use crate::error::openrosa;
use crate::{Principal, ServerError};

/// The header a phone names its last sync token in (HQ's `SyncTokenMiddleware`).
const LAST_SYNC_TOKEN: &str = "x-commcarehq-lastsynctoken";

/// The header every write answers with: the last log position it wrote.
pub const POSITION_HEADER: &str = "x-caseledger-position";

/// HQ's message for a form it processed (`openrosa_response.py`).
const SUCCESS: &str = "   √   ";

pub(crate) async fn receive(
    principal: Principal,
    State(state): State<crate::AppState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ServerError> {
    // Before a byte of the body is read.
    principal.require_submit()?;
    let (xml, attachments) = read_body(request).await?;
    let app = params.get("app_id").map(|a| AppId::new(a.as_str()));
    let engine = &principal.engine;
    let mut submission = engine.prepare_submission_with(xml, app, attachments);
    submission.last_sync_token = headers
        .get(LAST_SYNC_TOKEN)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    // A mobile worker submits only as itself. A form whose meta cannot be read is stored as
    // rejected (I7): it can change no case, whoever sent it.
    if let Ok(form) = &submission.parsed {
        principal.require_user(form.user_id.as_deref().unwrap_or_default())?;
    }
    let request = engine::Request::new(Command::SubmitForm(Box::new(submission)));
    let started = std::time::Instant::now();
    let outcome = engine.execute(request).await?;
    state.inner.metrics.observe_append(started.elapsed());
    let last = outcome.events.last().map(|e| e.position);
    let submitted = SubmitOutcome::from_events(&outcome.events)?;
    tracing::info!(
        domain = %principal.domain,
        user = %principal.user_id,
        form = %submitted.instance_id,
        outcome = ?submitted.outcome,
        position = submitted.position.0,
        "form received"
    );
    let mut response = answer(&submitted, openrosa_3(&headers));
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(submitted.instance_id.as_str()) {
        h.insert("x-commcarehq-formid", v);
    }
    let location = format!(
        "/a/{}/api/v0.5/form/{}/",
        principal.domain, submitted.instance_id
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Some(p) = last {
        h.insert(POSITION_HEADER, HeaderValue::from(p.0));
    }
    Ok(response)
}

/// True under OpenRosa 3.0 or later (`X-OpenRosa-Version`), which changes two statuses.
fn openrosa_3(headers: &HeaderMap) -> bool {
    headers
        .get("x-openrosa-version")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split('.').next()?.parse::<u32>().ok())
        .is_some_and(|major| major >= 3)
}

/// API.md §1.5. One deviation: HQ answers 500 to XML it cannot parse, which it keeps only in
/// its error log; caseledger stores the form as rejected (I7), so it answers as for any
/// rejection, and the phone does not resend it forever.
fn answer(outcome: &SubmitOutcome, v3: bool) -> Response {
    match (outcome.outcome, v3) {
        (SubmitStatus::Accepted | SubmitStatus::Edited, _) | (SubmitStatus::Duplicate, true) => {
            openrosa(StatusCode::CREATED, "submit_success", SUCCESS)
        }
        (SubmitStatus::Duplicate, false) => openrosa(
            StatusCode::CREATED,
            "submit_error",
            &format!(
                "Form {} is a duplicate of a form received earlier",
                outcome.instance_id
            ),
        ),
        (SubmitStatus::Rejected, _) => {
            let (code, message) = outcome
                .error
                .as_ref()
                .map_or(("", ""), |e| (e.code.as_str(), e.message.as_str()));
            let text = format!("{code}: {message}");
            if v3 {
                openrosa(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "processing_failure",
                    &text,
                )
            } else {
                openrosa(StatusCode::CREATED, "submit_error", &text)
            }
        }
    }
}

/// The form XML and the attachments (API.md §1.3).
async fn read_body(request: Request) -> Result<(Vec<u8>, Vec<AttachmentFile>), ServerError> {
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    if !multipart {
        let body = Bytes::from_request(request, &())
            .await
            .map_err(|r| ServerError::Body(r.status(), r.body_text()))?;
        if body.is_empty() {
            return Err(ServerError::BadRequest("empty submission".into()));
        }
        return Ok((body.to_vec(), Vec::new()));
    }
    let mut parts = Multipart::from_request(request, &())
        .await
        .map_err(|r| ServerError::Body(r.status(), r.body_text()))?;
    let mut xml = None;
    let mut attachments = Vec::new();
    while let Some(field) = parts
        .next_field()
        .await
        .map_err(|e| ServerError::Body(e.status(), e.body_text()))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        let file_name = field.file_name().map(str::to_owned);
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ServerError::Body(e.status(), e.body_text()))?;
        if name == "xml_submission_file" {
            xml = Some(bytes.to_vec());
        } else if let Some(file_name) = file_name {
            // HQ keys attachments by part name; phones name the part after the file.
            let name = if name.is_empty() { file_name } else { name };
            attachments.push(AttachmentFile {
                name,
                bytes: bytes.to_vec(),
            });
        } else {
            // HQ's MultimediaBug: plain fields mean the phone sent something else than a form.
            return Err(ServerError::BadRequest(format!(
                "Received a submission with POST.keys() [{name:?}]"
            )));
        }
    }
    match xml {
        Some(x) if !x.is_empty() => Ok((x, attachments)),
        Some(_) => Err(ServerError::BadRequest(
            "xml_submission_file is empty".into(),
        )),
        None => Err(ServerError::BadRequest(
            "multipart submission without an xml_submission_file part".into(),
        )),
    }
}
