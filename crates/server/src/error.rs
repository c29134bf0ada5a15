//! Every failure of a request, and the one place that turns it into an HTTP response.
//!
//! Phone routes answer in OpenRosa's envelope (`<OpenRosaResponse><message nature=…>`); the
//! nature is `ota_restore_error` for restore failures and `submit_error` for the rest.
//! caseledger's own API (`/api/v1`) answers `{"error":{"code","message"}}` through
//! [`ApiError`], with the same statuses and headers; [`ServerError::code`] is the wire code.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Why a request was not carried out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// No credentials, unreadable ones, or ones that do not verify (401 with a Basic
    /// challenge). The caller should send `Authorization: Basic …` or `ApiKey user:key`.
    #[error("authentication required")]
    Unauthenticated,
    /// Too many failed logins from this address or for this login (429 with `Retry-After`).
    /// Wait that long; every further failure lengthens the wait.
    #[error("too many failed logins; retry in {} s", .0.as_secs().max(1))]
    TooManyAttempts(Duration),
    /// The credentials are valid but their role or user may not do this (403).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The request is malformed: a missing multipart part, bad parameters (400).
    #[error("{0}")]
    BadRequest(String),
    /// Reading the body failed with this status (413 over the size cap, 408 too slow, 400).
    #[error("{1}")]
    Body(StatusCode, String),
    /// What the request names does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The restore's `since` token is unknown or was issued to someone else (412); the phone
    /// restores in full.
    #[error("{0}")]
    BadSyncToken(String),
    /// The engine failed (500; a refused command is 400). Nothing unacknowledged counts.
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    /// Building a restore failed (500).
    #[error(transparent)]
    Restore(restore::RestoreError),
    /// A time-travel point outside the log (`at` beyond the head, `as_of` before the first
    /// event) (400). Ask for a point between position 1 and the head.
    #[error("{0}")]
    OutOfRange(String),
    /// The projections had not reached the `min_position` asked for within the wait (503 with
    /// `Retry-After`). Retry after that many seconds; the write it names may be on another
    /// server, or not have happened.
    #[error("the projections are at position {reached}, not yet at {wanted}")]
    NotCaughtUp {
        /// The `min_position` asked for.
        wanted: u64,
        /// Where the projections were when the wait ended.
        reached: u64,
        /// When to try again.
        retry_after: Duration,
    },
    /// Binding, serving or the data dir's files failed.
    #[error("{0}")]
    Io(String),
    /// A broken expectation; a bug report (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<restore::RestoreError> for ServerError {
    fn from(e: restore::RestoreError) -> Self {
        match e {
            restore::RestoreError::BadToken(_) => ServerError::BadSyncToken(e.to_string()),
            restore::RestoreError::UnknownUser(_) => ServerError::NotFound(e.to_string()),
            other => ServerError::Restore(other),
        }
    }
}

impl ServerError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ServerError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ServerError::TooManyAttempts(_) => StatusCode::TOO_MANY_REQUESTS,
            ServerError::Forbidden(_) => StatusCode::FORBIDDEN,
            ServerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServerError::Body(status, _) => *status,
            ServerError::NotFound(_) => StatusCode::NOT_FOUND,
            ServerError::BadSyncToken(_) => StatusCode::PRECONDITION_FAILED,
            ServerError::Engine(engine::EngineError::Command(_)) => StatusCode::BAD_REQUEST,
            ServerError::Engine(engine::EngineError::OutOfRange(_))
            | ServerError::OutOfRange(_) => StatusCode::BAD_REQUEST,
            ServerError::NotCaughtUp { .. }
            | ServerError::Engine(engine::EngineError::Log(eventlog::LogError::Unavailable(_))) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ServerError::Engine(_)
            | ServerError::Restore(_)
            | ServerError::Io(_)
            | ServerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error's code in caseledger's own API (`{"error":{"code",…}}`), one per variant.
    pub fn code(&self) -> &'static str {
        match self {
            ServerError::Unauthenticated => "unauthenticated",
            ServerError::TooManyAttempts(_) => "too_many_attempts",
            ServerError::Forbidden(_) => "forbidden",
            ServerError::BadRequest(_) => "bad_request",
            ServerError::Body(..) => "bad_body",
            ServerError::NotFound(_) => "not_found",
            ServerError::BadSyncToken(_) => "bad_sync_token",
            ServerError::Engine(engine::EngineError::Command(_)) => "command_refused",
            ServerError::Engine(engine::EngineError::OutOfRange(_))
            | ServerError::OutOfRange(_) => "out_of_range",
            ServerError::NotCaughtUp { .. } => "not_caught_up",
            ServerError::Engine(engine::EngineError::Log(eventlog::LogError::Unavailable(_))) => {
                "store_unavailable"
            }
            ServerError::Engine(_)
            | ServerError::Restore(_)
            | ServerError::Io(_)
            | ServerError::Internal(_) => "internal",
        }
    }

    /// The challenge or the wait that goes with the status.
    fn add_headers(&self, headers: &mut axum::http::HeaderMap) {
        let retry = |headers: &mut axum::http::HeaderMap, wait: &Duration| {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        };
        match self {
            ServerError::Unauthenticated => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"caseledger\""),
                );
            }
            ServerError::TooManyAttempts(wait)
            | ServerError::NotCaughtUp {
                retry_after: wait, ..
            } => retry(headers, wait),
            // The cluster is electing a leader or out of reach: the command was not
            // acknowledged; retry it (with the same idempotency key) in a second.
            ServerError::Engine(engine::EngineError::Log(eventlog::LogError::Unavailable(_))) => {
                retry(headers, &Duration::from_secs(1));
            }
            _ => {}
        }
    }

    fn log(&self, status: StatusCode) {
        if status.is_server_error() && !matches!(self, ServerError::NotCaughtUp { .. }) {
            tracing::error!(error = %self, "request failed");
        }
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let status = self.status();
        self.log(status);
        let nature = match self {
            ServerError::BadSyncToken(_) | ServerError::Restore(_) => "ota_restore_error",
            _ => "submit_error",
        };
        let mut response = openrosa(status, nature, &self.to_string());
        self.add_headers(response.headers_mut());
        response
    }
}

/// A [`ServerError`] as caseledger's own API answers it: `{"error":{"code","message"}}`.
#[derive(Debug)]
pub struct ApiError(pub ServerError);

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> Self {
        ApiError(e)
    }
}

impl From<engine::EngineError> for ApiError {
    fn from(e: engine::EngineError) -> Self {
        ApiError(ServerError::Engine(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = self.0;
        let status = error.status();
        error.log(status);
        let body = serde_json::json!({
            "error": {"code": error.code(), "message": error.to_string()}
        });
        let mut response = (status, axum::Json(body)).into_response();
        error.add_headers(response.headers_mut());
        response
    }
}

/// An OpenRosa response document (`couchforms/openrosa_response.py`).
pub(crate) fn openrosa(status: StatusCode, nature: &str, message: &str) -> Response {
    let body = format!(
        "<OpenRosaResponse xmlns=\"http://openrosa.org/http/response\"><message nature=\"{}\">{}</message></OpenRosaResponse>",
        escape(nature),
        escape(message)
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

/// XML text and attribute escaping; characters XML 1.0 cannot carry become U+FFFD.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if u32::from(c) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}
