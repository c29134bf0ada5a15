//! The server's OpenAPI 3.1 document, built from the same route list as the router.
//!
//! [`routes`] gathers every documented route (`/api/v1`, the streams, `/metrics`, the health
//! probes and this document) through `utoipa_axum`, which registers each handler under the
//! path and method of its `#[utoipa::path]`: the router and the document come out of one list,
//! so a route cannot be served undocumented, nor documented unserved. CommCare's own routes
//! (`/a/{domain}/receiver/`, `/phone/restore/`) are HQ's contract, described in docs/API.md,
//! and stay out of it.

use std::sync::OnceLock;

use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::{api_v1, metrics, sse, AppState};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "caseledger",
        description = "caseledger's own API: commands, queries, time travel, audit queries and live subscriptions (docs/API.md)."
    ),
    modifiers(&Schemes),
    security(("apikey" = []), ("basic" = [])),
    tags(
        (name = "commands", description = "Writes; each answers its log position."),
        (name = "queries", description = "Reads; `min_position` waits for one's own writes, `at`/`as_of` travel in time."),
        (name = "audit", description = "Case history, who could see a case, conflicts."),
        (name = "subscriptions", description = "Server-Sent Events; `id:` is the log position."),
        (name = "operations", description = "Health, metrics, this document.")
    )
)]
struct ApiDoc;

struct Schemes;

impl utoipa::Modify for Schemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()),
        );
        components.add_security_scheme(
            "apikey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "`ApiKey user:key`",
            ))),
        );
    }
}

/// Every documented route, with the document.
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(api_v1::router())
        .merge(sse::router())
        .routes(routes!(metrics::metrics))
        .routes(routes!(crate::healthz))
        .routes(routes!(crate::readyz))
        .routes(routes!(openapi_json))
}

/// The document, built once.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(|| routes().into_openapi())
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations", security(()),
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json")))]
async fn openapi_json() -> Response {
    Json(document()).into_response()
}
