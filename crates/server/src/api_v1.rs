//! caseledger's own API: JSON commands and queries under `/api/v1/{domain}/…`, mirroring the
//! CLI (docs/API.md, "caseledger's own API").
//!
//! Every handler takes [`ApiPrincipal`] (the [`Principal`] extractor answering in JSON) and
//! carries a `#[utoipa::path]`; [`router`] registers them through `utoipa_axum::routes!`, so
//! the router and `/api/v1/openapi.json` are built from the same list.
//!
//! What must hold:
//! - Authorization: admins (API key) do everything in their project space; services read and
//!   submit (as anyone); auditors read everything and write nothing (403); mobile workers
//!   submit as themselves and read only their own case list, the cases in it, their groups
//!   and their own feed (everything else, the audit queries included, is 403). No credential
//!   reaches another project space (the extractor looks it up in the URL's only).
//! - Read-your-writes: every write answers its last log position (`position` and
//!   `X-Caseledger-Position`); every query takes `min_position` and waits for the projections
//!   to reach it, at most `wait_ms` (default 5 s, at most 30 s), then answers 503 with
//!   `Retry-After`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use domain::{AppId, CaseId, Command, GroupId, Position, Timestamp, UserId};
use engine::{AsOf, Engine, SubmitOutcome, SubmitStatus};
use projections::CaseAt;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api_types::{
    CaseJson, ConflictJson, DiagnosticJson, ErrorBody, GroupJson, HistoryEntryJson, NewApp,
    NewGroup, NewUser, Sharing, SubmitResult, ViewerJson, WhoCouldSeeJson, WriteResult,
};
use crate::error::ApiError;
use crate::{Access, AppState, Principal, ServerError, POSITION_HEADER};

/// How long a query waits for `min_position` unless `wait_ms` says less.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
/// The most a query waits, whatever `wait_ms` says.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// How often a waiting query looks at the checkpoint.
const POLL: Duration = Duration::from_millis(5);

/// The routes of `/api/v1/{domain}`, with their OpenAPI paths.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_user))
        .routes(routes!(create_group))
        .routes(routes!(set_group_sharing))
        .routes(routes!(add_member, remove_member))
        .routes(routes!(create_app))
        .routes(routes!(set_app_sharing))
        .routes(routes!(submit))
        .routes(routes!(case))
        .routes(routes!(cases))
        .routes(routes!(groups))
        .routes(routes!(diagnostics))
        .routes(routes!(case_history))
        .routes(routes!(who_could_see))
        .routes(routes!(conflicts))
        .routes(routes!(conflict))
}

/// [`Principal`], rejecting in the API's JSON.
pub struct ApiPrincipal(pub Principal);

impl FromRequestParts<AppState> for ApiPrincipal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Principal::from_request_parts(parts, state)
            .await
            .map(ApiPrincipal)
            .map_err(ApiError)
    }
}

/// Query parameters, rejecting in the API's JSON.
pub struct Q<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(t)| Q(t))
            .map_err(|e| ApiError(ServerError::BadRequest(e.body_text())))
    }
}

/// A JSON body, rejecting in the API's JSON.
pub struct J<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for J<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(request, state)
            .await
            .map(|Json(t)| J(t))
            .map_err(|e| ApiError(ServerError::Body(e.status(), e.body_text())))
    }
}

/// Runs blocking projection reads without stalling the runtime's other tasks.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Waits until the projections of `engine` have folded `min` (read-your-writes), at most
/// `wait` (capped at [`MAX_WAIT`]); then [`ServerError::NotCaughtUp`].
pub(crate) async fn caught_up(
    engine: &Engine,
    min: Option<u64>,
    wait_ms: Option<u64>,
) -> Result<(), ServerError> {
    let Some(min) = min else {
        return Ok(());
    };
    let bound = wait_ms
        .map_or(DEFAULT_WAIT, Duration::from_millis)
        .min(MAX_WAIT);
    let deadline = Instant::now() + bound;
    if engine.upstream().is_some() && engine.projections().checkpoint().0 < min {
        // A replica: the write may have gone through another server; ask the stream now rather
        // than wait for the follower. Unreachable, the wait below still ends in a 503.
        if let Err(e) = engine.pull().await {
            tracing::debug!(error = %e, "pull for min_position failed");
        }
    }
    loop {
        let reached = engine.projections().checkpoint().0;
        if reached >= min {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ServerError::NotCaughtUp {
                wanted: min,
                reached,
                retry_after: Duration::from_secs(1),
            });
        }
        tokio::time::sleep(POLL.min(deadline - now)).await;
    }
}

fn require_admin(p: &Principal) -> Result<(), ServerError> {
    if p.access == Access::Admin {
        Ok(())
    } else {
        Err(ServerError::Forbidden(format!(
            "{} may not change users, groups or apps of {}: that takes an admin API key",
            p.user_id, p.domain
        )))
    }
}

/// Refuses mobile workers: the query reads beyond their own case list.
fn require_overview(p: &Principal) -> Result<(), ServerError> {
    if p.access == Access::MobileWorker {
        Err(ServerError::Forbidden(format!(
            "{} is a mobile worker: it reads only its own case list, its cases and its groups",
            p.user_id
        )))
    } else {
        Ok(())
    }
}

/// Where a time-travel query looks.
fn as_of(at: Option<u64>, as_of: Option<&str>) -> Result<AsOf, ServerError> {
    match (at, as_of) {
        (Some(_), Some(_)) => Err(ServerError::BadRequest("give at or as_of, not both".into())),
        (Some(p), None) => Ok(AsOf::Position(Position(p))),
        (None, Some(t)) => Timestamp::parse_rfc3339(t)
            .map(AsOf::Time)
            .map_err(|e| ServerError::BadRequest(format!("as_of: {e}"))),
        (None, None) => Ok(AsOf::Head),
    }
}

/// Executes commands in order, as one group; a refused one is the error. Answers the write's
/// position (the checkpoint when nothing was appended) in the body and the header.
async fn execute(
    state: &AppState,
    p: &Principal,
    commands: Vec<Command>,
) -> Result<(Position, usize, Vec<engine::Outcome>), ServerError> {
    let started = Instant::now();
    let requests = commands.into_iter().map(engine::Request::new).collect();
    let results = p.engine.execute_many(requests).await?;
    state.inner.metrics.observe_append(started.elapsed());
    let mut outcomes = Vec::with_capacity(results.len());
    for r in results {
        outcomes.push(r?);
    }
    let events: usize = outcomes.iter().map(|o| o.events.len()).sum();
    let last = outcomes
        .iter()
        .filter_map(|o| o.events.last().map(|e| e.position))
        .max()
        .unwrap_or_else(|| p.engine.projections().checkpoint());
    Ok((last, events, outcomes))
}

fn positioned(status: StatusCode, position: Position, body: impl serde::Serialize) -> Response {
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(POSITION_HEADER, HeaderValue::from(position.0));
    response
}

async fn write(
    state: &AppState,
    p: &Principal,
    commands: Vec<Command>,
) -> Result<Response, ApiError> {
    require_admin(p)?;
    let (position, events, _) = execute(state, p, commands).await?;
    tracing::info!(domain = %p.domain, user = %p.user_id, position = position.0, "api write");
    Ok(positioned(
        StatusCode::OK,
        position,
        WriteResult {
            ok: true,
            position: position.0,
            events,
        },
    ))
}

/// Create a user (a mobile worker), with a password when one is given. Admin only.
#[utoipa::path(post, path = "/api/v1/{domain}/users", tag = "commands",
    params(("domain" = String, Path, description = "Project space")),
    request_body = NewUser,
    responses((status = 200, body = WriteResult, headers(("X-Caseledger-Position" = u64))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_user(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    J(body): J<NewUser>,
) -> Result<Response, ApiError> {
    require_admin(&p)?;
    let mut commands = vec![Command::CreateUser {
        id: UserId::new(body.id.as_str()),
        username: body.username,
    }];
    if let Some(password) = body.password {
        if password.is_empty() || password.len() > 1024 {
            return Err(ServerError::BadRequest("a password has 1 to 1024 bytes".into()).into());
        }
        let hash = tokio::task::spawn_blocking(move || crate::secret::hash(&password))
            .await
            .map_err(|e| ServerError::Internal(format!("hashing task: {e}")))?
            .map_err(|e| ServerError::Internal(e.to_string()))?;
        commands.push(Command::SetPassword {
            user: UserId::new(body.id.as_str()),
            hash,
        });
    }
    write(&state, &p, commands).await
}

/// Create a group. Admin only.
#[utoipa::path(post, path = "/api/v1/{domain}/groups", tag = "commands",
    params(("domain" = String, Path, description = "Project space")),
    request_body = NewGroup,
    responses((status = 200, body = WriteResult), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_group(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    J(body): J<NewGroup>,
) -> Result<Response, ApiError> {
    let cmd = Command::CreateGroup {
        id: GroupId::new(body.id.as_str()),
        name: body.name,
        case_sharing: body.case_sharing,
    };
    write(&state, &p, vec![cmd]).await
}

/// Turn a group's case sharing on or off. Admin only.
#[utoipa::path(put, path = "/api/v1/{domain}/groups/{group_id}/case-sharing", tag = "commands",
    params(("domain" = String, Path, description = "Project space"), ("group_id" = String, Path)),
    request_body = Sharing,
    responses((status = 200, body = WriteResult), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn set_group_sharing(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    Path((_, group)): Path<(String, String)>,
    J(body): J<Sharing>,
) -> Result<Response, ApiError> {
    let cmd = Command::SetGroupCaseSharing {
        group: GroupId::new(group.as_str()),
        on: body.on,
    };
    write(&state, &p, vec![cmd]).await
}

/// Add a user to a group. Admin only.
#[utoipa::path(put, path = "/api/v1/{domain}/groups/{group_id}/members/{user_id}", tag = "commands",
    params(("domain" = String, Path, description = "Project space"), ("group_id" = String, Path), ("user_id" = String, Path)),
    responses((status = 200, body = WriteResult), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn add_member(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    Path((_, group, user)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let cmd = Command::AddMember {
        group: GroupId::new(group.as_str()),
        user: UserId::new(user.as_str()),
    };
    write(&state, &p, vec![cmd]).await
}

/// Remove a user from a group. Admin only.
#[utoipa::path(delete, path = "/api/v1/{domain}/groups/{group_id}/members/{user_id}", tag = "commands",
    params(("domain" = String, Path, description = "Project space"), ("group_id" = String, Path), ("user_id" = String, Path)),
    responses((status = 200, body = WriteResult), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn remove_member(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    Path((_, group, user)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let cmd = Command::RemoveMember {
        group: GroupId::new(group.as_str()),
        user: UserId::new(user.as_str()),
    };
    write(&state, &p, vec![cmd]).await
}

/// Create an app. Admin only.
#[utoipa::path(post, path = "/api/v1/{domain}/apps", tag = "commands",
    params(("domain" = String, Path, description = "Project space")),
    request_body = NewApp,
    responses((status = 200, body = WriteResult), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_app(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    J(body): J<NewApp>,
) -> Result<Response, ApiError> {
    let cmd = Command::CreateApp {
        id: AppId::new(body.id.as_str()),
        name: body.name,
        case_sharing: body.case_sharing,
        case_types: body.case_types,
    };
    write(&state, &p, vec![cmd]).await
}

/// Turn an app's case sharing on or off. Admin only.
#[utoipa::path(put, path = "/api/v1/{domain}/apps/{app_id}/case-sharing", tag = "commands",
    params(("domain" = String, Path, description = "Project space"), ("app_id" = String, Path)),
    request_body = Sharing,
    responses((status = 200, body = WriteResult), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn set_app_sharing(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    Path((_, app)): Path<(String, String)>,
    J(body): J<Sharing>,
) -> Result<Response, ApiError> {
    let cmd = Command::SetAppCaseSharing {
        app: AppId::new(app.as_str()),
        on: body.on,
    };
    write(&state, &p, vec![cmd]).await
}

/// `?app=` of a submission.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SubmitParams {
    /// The app the form comes through.
    app: Option<String>,
}

/// Submit one form (raw XML body). 201 accepted or edited, 200 duplicate, 422 rejected (stored
/// all the same, with its error); the body is the outcome either way. Admins and services
/// submit as anyone; a mobile worker only as itself (meta userID); auditors not at all.
#[utoipa::path(post, path = "/api/v1/{domain}/submit", tag = "commands",
    params(("domain" = String, Path, description = "Project space"), SubmitParams),
    request_body(content = String, content_type = "application/xml"),
    responses((status = 201, body = SubmitResult), (status = 200, body = SubmitResult),
        (status = 422, body = SubmitResult), (status = 403, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn submit(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    Q(params): Q<SubmitParams>,
    body: Bytes,
) -> Result<Response, ApiError> {
    p.require_submit()?;
    if body.is_empty() {
        return Err(ServerError::BadRequest("empty submission".into()).into());
    }
    let app = params.app.map(AppId::new);
    if let Some(a) = &app {
        if !p.engine.projections().directory().apps.contains_key(a) {
            return Err(ServerError::NotFound(format!("unknown app {a}")).into());
        }
    }
    let submission = p.engine.prepare_submission(body.to_vec(), app);
    if let Ok(form) = &submission.parsed {
        p.require_user(form.user_id.as_deref().unwrap_or_default())?;
    }
    let (position, _, outcomes) =
        execute(&state, &p, vec![Command::SubmitForm(Box::new(submission))]).await?;
    let events = outcomes
        .into_iter()
        .next()
        .map(|o| o.events)
        .unwrap_or_default();
    let outcome = SubmitOutcome::from_events(&events)?;
    let status = match outcome.outcome {
        SubmitStatus::Accepted | SubmitStatus::Edited => StatusCode::CREATED,
        SubmitStatus::Duplicate => StatusCode::OK,
        SubmitStatus::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
    };
    Ok(positioned(status, position, SubmitResult::from(&outcome)))
}

/// `min_position`, `wait_ms`, `at`, `as_of`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct AtParams {
    /// Wait until the projections reach this position (read-your-writes), then answer.
    min_position: Option<u64>,
    /// Wait at most this long for `min_position` (default 5000, at most 30000), then 503.
    wait_ms: Option<u64>,
    /// As of this log position (after its event).
    at: Option<u64>,
    /// As of this server received time (RFC 3339).
    as_of: Option<String>,
}

impl AtParams {
    async fn resolve(&self, engine: &Engine) -> Result<Position, ServerError> {
        caught_up(engine, self.min_position, self.wait_ms).await?;
        let at = as_of(self.at, self.as_of.as_deref())?;
        Ok(engine.resolve(at)?)
    }

    fn is_set(&self) -> bool {
        self.at.is_some() || self.as_of.is_some()
    }
}

/// `min_position`, `wait_ms`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ReadParams {
    /// Wait until the projections reach this position (read-your-writes), then answer.
    min_position: Option<u64>,
    /// Wait at most this long for `min_position` (default 5000, at most 30000), then 503.
    wait_ms: Option<u64>,
}

/// True when `user`'s case list held `case` at `at` (a mobile worker reads only those).
fn in_case_list(
    engine: &Engine,
    user: &UserId,
    case: &CaseId,
    at: Position,
) -> Result<bool, ServerError> {
    let list = engine.query(|p| p.cases_for_user_at(user.as_str(), true, at))?;
    Ok(list.iter().any(|c| &c.case_id == case))
}

/// One case, now or as of a point. 404 when it does not exist (or did not yet, or was deleted).
#[utoipa::path(get, path = "/api/v1/{domain}/cases/{case_id}", tag = "queries",
    params(("domain" = String, Path, description = "Project space"), ("case_id" = String, Path), AtParams),
    responses((status = 200, body = CaseJson), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn case(
    ApiPrincipal(p): ApiPrincipal,
    Path((_, case_id)): Path<(String, String)>,
    Q(params): Q<AtParams>,
) -> Result<Json<CaseJson>, ApiError> {
    let at = params.resolve(&p.engine).await?;
    let id = CaseId::new(case_id.as_str());
    let engine = Arc::clone(&p.engine);
    let found = blocking(|| -> Result<_, ServerError> {
        if p.access == Access::MobileWorker && !in_case_list(&engine, &p.user_id, &id, at)? {
            return Err(ServerError::Forbidden(format!(
                "case {id} is not in the case list of {}",
                p.user_id
            )));
        }
        Ok(engine.query(|proj| proj.case_at(&id, at))?)
    })?;
    match found {
        CaseAt::Exists(case) => Ok(Json(CaseJson::from(&*case))),
        CaseAt::NotYet => Err(ServerError::NotFound(format!(
            "case {case_id} did not exist at position {at}"
        ))
        .into()),
        CaseAt::Deleted { since } => Err(ServerError::NotFound(format!(
            "case {case_id} was deleted at position {since}"
        ))
        .into()),
    }
}

/// `user` or `owner`, `include_closed`, and the time-travel and wait parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct CasesParams {
    /// The cases this user sees (owned by the user or its case-sharing groups, R44).
    user: Option<String>,
    /// The cases this id owns.
    owner: Option<String>,
    /// Include closed cases.
    #[serde(default)]
    include_closed: bool,
    /// Wait until the projections reach this position (read-your-writes), then answer.
    min_position: Option<u64>,
    /// Wait at most this long for `min_position` (default 5000, at most 30000), then 503.
    wait_ms: Option<u64>,
    /// As of this log position (after its event).
    at: Option<u64>,
    /// As of this server received time (RFC 3339).
    as_of: Option<String>,
}

/// A case list: by user (R44) or by owner, now or as of a point. A mobile worker asks for its
/// own (`user` defaults to it) or for an owner id of its own.
#[utoipa::path(get, path = "/api/v1/{domain}/cases", tag = "queries",
    params(("domain" = String, Path, description = "Project space"), CasesParams),
    responses((status = 200, body = Vec<CaseJson>), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn cases(
    ApiPrincipal(p): ApiPrincipal,
    Q(q): Q<CasesParams>,
) -> Result<Json<Vec<CaseJson>>, ApiError> {
    let time = AtParams {
        min_position: q.min_position,
        wait_ms: q.wait_ms,
        at: q.at,
        as_of: q.as_of.clone(),
    };
    let at = time.resolve(&p.engine).await?;
    let mine = p.access == Access::MobileWorker;
    let user = match (&q.user, &q.owner) {
        (Some(_), Some(_)) => {
            return Err(ServerError::BadRequest("give user or owner, not both".into()).into())
        }
        (None, None) if mine => Some(p.user_id.0.clone()),
        (None, None) => return Err(ServerError::BadRequest("give user or owner".into()).into()),
        (u, _) => u.clone(),
    };
    let engine = Arc::clone(&p.engine);
    let list = blocking(|| -> Result<_, ServerError> {
        let directory = if time.is_set() {
            Arc::new(engine.query(|proj| proj.directory_at(at))?)
        } else {
            engine.projections().directory()
        };
        match (&user, &q.owner) {
            (Some(u), _) => {
                p.require_user(u)?;
                if !directory.users.contains_key(&UserId::new(u.as_str())) {
                    return Err(ServerError::NotFound(format!("unknown user {u}")));
                }
                Ok(if time.is_set() {
                    engine.query(|proj| proj.cases_for_user_at(u, q.include_closed, at))?
                } else {
                    engine.query(|proj| proj.cases_for_user(u, q.include_closed))?
                })
            }
            (None, Some(o)) => {
                if mine && !directory.owner_ids(p.user_id.as_str()).contains(o) {
                    return Err(ServerError::Forbidden(format!(
                        "{o} is not an owner id of {}",
                        p.user_id
                    )));
                }
                Ok(if time.is_set() {
                    engine.query(|proj| proj.cases_by_owner_at(o, q.include_closed, at))?
                } else {
                    engine.query(|proj| proj.cases_by_owner(o, q.include_closed))?
                })
            }
            (None, None) => Err(ServerError::BadRequest("give user or owner".into())),
        }
    })?;
    Ok(Json(list.iter().map(CaseJson::from).collect()))
}

/// `user`, and the time-travel and wait parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct GroupsParams {
    /// Only groups listing this user.
    user: Option<String>,
    /// Wait until the projections reach this position (read-your-writes), then answer.
    min_position: Option<u64>,
    /// Wait at most this long for `min_position` (default 5000, at most 30000), then 503.
    wait_ms: Option<u64>,
    /// As of this log position (after its event).
    at: Option<u64>,
    /// As of this server received time (RFC 3339).
    as_of: Option<String>,
}

/// Groups and their members, now or as of a point. A mobile worker sees its own groups only.
#[utoipa::path(get, path = "/api/v1/{domain}/groups", tag = "queries",
    params(("domain" = String, Path, description = "Project space"), GroupsParams),
    responses((status = 200, body = Vec<GroupJson>), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn groups(
    ApiPrincipal(p): ApiPrincipal,
    Q(q): Q<GroupsParams>,
) -> Result<Json<Vec<GroupJson>>, ApiError> {
    let time = AtParams {
        min_position: q.min_position,
        wait_ms: q.wait_ms,
        at: q.at,
        as_of: q.as_of.clone(),
    };
    let at = time.resolve(&p.engine).await?;
    let user = match q.user {
        Some(u) => Some(u),
        None if p.access == Access::MobileWorker => Some(p.user_id.0.clone()),
        None => None,
    };
    if let Some(u) = &user {
        p.require_user(u)?;
    }
    let groups = if time.is_set() {
        blocking(|| p.engine.query(|proj| proj.groups_at(user.as_deref(), at)))?
    } else {
        p.engine.projections().groups(user.as_deref())
    };
    Ok(Json(groups.iter().map(GroupJson::from).collect()))
}

/// Validation diagnostics (R59–R66), now or as of a point. Not for mobile workers.
#[utoipa::path(get, path = "/api/v1/{domain}/diagnostics", tag = "queries",
    params(("domain" = String, Path, description = "Project space"), AtParams),
    responses((status = 200, body = Vec<DiagnosticJson>), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn diagnostics(
    ApiPrincipal(p): ApiPrincipal,
    Q(q): Q<AtParams>,
) -> Result<Json<Vec<DiagnosticJson>>, ApiError> {
    require_overview(&p)?;
    let at = q.resolve(&p.engine).await?;
    let rows = if q.is_set() {
        blocking(|| p.engine.query(|proj| proj.diagnostics_at(at)))?
    } else {
        blocking(|| p.engine.query(|proj| proj.diagnostics()))?
    };
    Ok(Json(rows.iter().map(DiagnosticJson::from).collect()))
}

/// Every change to a case, oldest first. Not for mobile workers.
#[utoipa::path(get, path = "/api/v1/{domain}/cases/{case_id}/history", tag = "audit",
    params(("domain" = String, Path, description = "Project space"), ("case_id" = String, Path), ReadParams),
    responses((status = 200, body = Vec<HistoryEntryJson>), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn case_history(
    ApiPrincipal(p): ApiPrincipal,
    Path((_, case_id)): Path<(String, String)>,
    Q(q): Q<ReadParams>,
) -> Result<Json<Vec<HistoryEntryJson>>, ApiError> {
    require_overview(&p)?;
    caught_up(&p.engine, q.min_position, q.wait_ms).await?;
    let id = CaseId::new(case_id.as_str());
    let entries = blocking(|| p.engine.query(|proj| proj.case_history(&id)))?;
    if entries.is_empty() {
        return Err(ServerError::NotFound(format!("no case {case_id}")).into());
    }
    Ok(Json(entries.iter().map(HistoryEntryJson::from).collect()))
}

/// The users whose case list held the case, and since which position. Not for mobile
/// workers.
#[utoipa::path(get, path = "/api/v1/{domain}/cases/{case_id}/who-could-see", tag = "audit",
    params(("domain" = String, Path, description = "Project space"), ("case_id" = String, Path), AtParams),
    responses((status = 200, body = WhoCouldSeeJson), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn who_could_see(
    ApiPrincipal(p): ApiPrincipal,
    Path((_, case_id)): Path<(String, String)>,
    Q(q): Q<AtParams>,
) -> Result<Json<WhoCouldSeeJson>, ApiError> {
    require_overview(&p)?;
    let at = q.resolve(&p.engine).await?;
    let id = CaseId::new(case_id.as_str());
    let viewers = blocking(|| -> Result<_, ServerError> {
        if p.engine.query(|proj| proj.case_at(&id, at))? == CaseAt::NotYet {
            return Err(ServerError::NotFound(format!(
                "case {case_id} did not exist yet at position {at}"
            )));
        }
        Ok(p.engine.query(|proj| proj.who_could_see(&id, at))?)
    })?;
    Ok(Json(WhoCouldSeeJson {
        case_id,
        at: at.0,
        viewers: viewers.iter().map(ViewerJson::from).collect(),
    }))
}

/// `case`, `user`, and the wait parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ConflictsParams {
    /// Only this case's.
    case: Option<String>,
    /// Only those where this user made either side.
    user: Option<String>,
    /// Wait until the projections reach this position (read-your-writes), then answer.
    min_position: Option<u64>,
    /// Wait at most this long for `min_position` (default 5000, at most 30000), then 503.
    wait_ms: Option<u64>,
}

/// Conflicts between offline edits. Not for mobile workers.
#[utoipa::path(get, path = "/api/v1/{domain}/conflicts", tag = "audit",
    params(("domain" = String, Path, description = "Project space"), ConflictsParams),
    responses((status = 200, body = Vec<ConflictJson>), (status = 403, body = ErrorBody)))]
async fn conflicts(
    ApiPrincipal(p): ApiPrincipal,
    Q(q): Q<ConflictsParams>,
) -> Result<Json<Vec<ConflictJson>>, ApiError> {
    require_overview(&p)?;
    caught_up(&p.engine, q.min_position, q.wait_ms).await?;
    let rows = blocking(|| -> Result<_, ServerError> {
        Ok(match &q.case {
            Some(c) => {
                let mut rows = p
                    .engine
                    .query(|proj| proj.case_conflicts(&CaseId::new(c.as_str())))?;
                rows.retain(|r| {
                    q.user
                        .as_deref()
                        .is_none_or(|u| r.conflict.mine.user == u || r.conflict.theirs.user == u)
                });
                rows
            }
            None => p.engine.query(|proj| proj.conflicts(q.user.as_deref()))?,
        })
    })?;
    Ok(Json(rows.iter().map(ConflictJson::from).collect()))
}

/// One conflict, three-way, with the positions to time-travel to. Not for mobile workers.
#[utoipa::path(get, path = "/api/v1/{domain}/conflicts/{conflict_id}", tag = "audit",
    params(("domain" = String, Path, description = "Project space"), ("conflict_id" = String, Path), ReadParams),
    responses((status = 200, body = ConflictJson), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn conflict(
    ApiPrincipal(p): ApiPrincipal,
    Path((_, conflict_id)): Path<(String, String)>,
    Q(q): Q<ReadParams>,
) -> Result<Json<ConflictJson>, ApiError> {
    require_overview(&p)?;
    caught_up(&p.engine, q.min_position, q.wait_ms).await?;
    let rows = blocking(|| p.engine.query(|proj| proj.conflicts(None)))?;
    rows.iter()
        .find(|r| r.id == conflict_id)
        .map(|r| Json(ConflictJson::from(r)))
        .ok_or_else(|| ServerError::NotFound(format!("no conflict {conflict_id}")).into())
}
