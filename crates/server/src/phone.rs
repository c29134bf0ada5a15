//! OTA restore (API.md §2): `GET /a/{domain}/phone/restore/[{app_id}/]?version=2.0&since=…`.
//!
//! The payload is the one `caseledger restore` prints. A token the store did not issue to this
//! user of this project space is 412 `ota_restore_error`, after which a phone restores in full.
//! A mobile worker restores only itself; an API key may name the user with `user_id` (or
//! HQ's `as`).

use axum::extract::Query;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::{Principal, ServerError};

#[derive(Debug, Deserialize)]
pub(crate) struct RestoreParams {
    version: Option<String>,
    since: Option<String>,
    #[allow(dead_code)]
    device_id: Option<String>,
    user_id: Option<String>,
    #[serde(rename = "as")]
    as_user: Option<String>,
}

pub(crate) async fn restore(
    principal: Principal,
    Query(params): Query<RestoreParams>,
) -> Result<Response, ServerError> {
    if let Some(v) = params.version.as_deref() {
        if v != "2.0" {
            return Err(ServerError::BadRequest(format!(
                "restore version {v:?} is not served; use version=2.0 (CaseXML v2)"
            )));
        }
    }
    let user = params
        .user_id
        .or(params.as_user)
        .unwrap_or_else(|| principal.user_id.0.clone());
    principal.require_user(&user)?;
    let engine = std::sync::Arc::clone(&principal.engine);
    let since = params.since.filter(|s| !s.is_empty());
    let payload =
        tokio::task::spawn_blocking(move || restore::restore(&engine, &user, since.as_deref()))
            .await
            .map_err(|e| ServerError::Internal(format!("restore task: {e}")))??;
    tracing::info!(
        domain = %principal.domain,
        user = %principal.user_id,
        cases = payload.cases.len(),
        "restore"
    );
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        payload.xml,
    )
        .into_response())
}
