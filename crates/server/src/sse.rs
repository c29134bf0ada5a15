//! Live subscriptions over Server-Sent Events: the event stream and three change feeds.
//!
//! - `/api/v1/{domain}/events`: every log event from a position on; `id:` is its position.
//! - `/api/v1/{domain}/users/{user_id}/cases/feed`: changes of a user's case list.
//! - `/api/v1/{domain}/cases/{case_id}/feed`: a case as each position changed it.
//! - `/api/v1/{domain}/diagnostics/feed`: diagnostics as they are raised.
//!
//! What must hold:
//! - Each SSE `id:` is the log position that made the event, and a position yields at most one
//!   event per stream, so `Last-Event-ID: N` resumes at N + 1 with no gap and no duplicate (it
//!   wins over `?from=`; with neither, a stream starts after the current head).
//! - Writers never wait for a subscriber: every stream is a pull cursor over the durable log
//!   ([`eventlog::Subscription`]), reading a page of at most 256 events at a time when the
//!   client's socket takes more. A subscriber that falls behind is not dropped nor buffered
//!   without bound: it reads on from the log where it is, however far behind.
//! - On shutdown every stream sends `event: end` and closes, so the graceful shutdown ends.
//! - A feed reads the projections as of the event's position, after waiting for them to fold
//!   it (they may trail the durable log by one batch).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use domain::{CaseId, Event, Position, RecordedEvent, UserId};
use engine::Engine;
use eventlog::{EventStore, Subscription};
use futures_util::Stream;
use projections::CaseAt;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api_types::{
    CaseChange, CaseJson, CaseListChanges, DiagnosticJson, DiagnosticsRaised, ErrorBody, EventJson,
};
use crate::api_v1::{blocking, ApiPrincipal, Q};
use crate::error::ApiError;
use crate::metrics::{Metrics, SubscriberGuard};
use crate::{Access, AppState, Principal, ServerError};

/// The routes of the streams, with their OpenAPI paths.
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(events))
        .routes(routes!(case_list_feed))
        .routes(routes!(case_feed))
        .routes(routes!(diagnostics_feed))
}

/// `from`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct FromParams {
    /// First position to send (default: after the current head). `Last-Event-ID` wins.
    from: Option<u64>,
}

/// `from`, `include_closed`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListFeedParams {
    /// First position to follow (default: after the current head). `Last-Event-ID` wins.
    from: Option<u64>,
    /// Count closed cases as in the list.
    #[serde(default)]
    include_closed: bool,
}

/// Where a stream starts, and whether it resumes (`Last-Event-ID`).
fn start(
    headers: &HeaderMap,
    from: Option<u64>,
    engine: &Engine,
) -> Result<(Position, bool), ServerError> {
    if let Some(v) = headers.get("last-event-id") {
        let id: u64 = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| ServerError::BadRequest("Last-Event-ID is not a log position".into()))?;
        return Ok((Position(id.saturating_add(1)), true));
    }
    Ok((
        Position(
            from.unwrap_or_else(|| engine.log().durable_head().0 + 1)
                .max(1),
        ),
        false,
    ))
}

/// What a stream turns each log event into: SSE events with that position as `id:`.
trait Step: Send + 'static {
    /// Called once per durable event, in order, after the projections folded it.
    fn step(
        &mut self,
        engine: &Engine,
        event: &RecordedEvent,
    ) -> Result<Vec<SseEvent>, ServerError>;
}

/// A running stream: the cursor, what it makes of events, the shutdown signal.
struct Stream_<S> {
    engine: Arc<Engine>,
    sub: Subscription,
    step: S,
    /// Whether the step reads projections (and must wait for them to fold each event).
    reads_projections: bool,
    shutdown: tokio::sync::watch::Receiver<bool>,
    outbox: VecDeque<SseEvent>,
    done: bool,
    _counted: SubscriberGuard,
}

fn json_event(name: &str, position: Position, body: &impl serde::Serialize) -> SseEvent {
    let event = SseEvent::default().event(name).id(position.0.to_string());
    match event.clone().json_data(body) {
        Ok(e) => e,
        Err(e) => event.event("error").data(e.to_string()),
    }
}

fn ending(reason: &str) -> SseEvent {
    SseEvent::default().event("end").data(reason)
}

/// Waits until the projections folded `p`; false on shutdown.
async fn folded(
    engine: &Engine,
    p: Position,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    while engine.projections().checkpoint() < p {
        if *shutdown.borrow() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

fn stream<S: Step>(
    state: &AppState,
    engine: Arc<Engine>,
    sub: Subscription,
    step: S,
    reads_projections: bool,
    first: Vec<SseEvent>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let s = Stream_ {
        engine,
        sub,
        step,
        reads_projections,
        shutdown: state.inner.shutdown.subscribe(),
        outbox: first.into(),
        done: false,
        _counted: Metrics::subscriber(state),
    };
    let events = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(e) = s.outbox.pop_front() {
                return Some((Ok(e), s));
            }
            if s.done {
                return None;
            }
            let next = tokio::select! {
                biased;
                _ = s.shutdown.wait_for(|stop| *stop) => None,
                r = s.sub.next() => Some(r),
            };
            let event = match next {
                None => {
                    s.done = true;
                    s.outbox.push_back(ending("shutdown"));
                    continue;
                }
                Some(Err(e)) => {
                    s.done = true;
                    s.outbox
                        .push_back(SseEvent::default().event("error").data(e.to_string()));
                    continue;
                }
                Some(Ok(event)) => event,
            };
            if s.reads_projections && !folded(&s.engine, event.position, &mut s.shutdown).await {
                s.done = true;
                s.outbox.push_back(ending("shutdown"));
                continue;
            }
            let engine = Arc::clone(&s.engine);
            match blocking(|| s.step.step(&engine, &event)) {
                Ok(out) => s.outbox.extend(out),
                Err(e) => {
                    s.done = true;
                    s.outbox
                        .push_back(SseEvent::default().event("error").data(e.to_string()));
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

async fn subscribe(engine: &Engine, from: Position) -> Result<Subscription, ServerError> {
    engine
        .log()
        .subscribe(from)
        .await
        .map_err(|e| ServerError::Engine(e.into()))
}

/// The event as the stream shows it: raw submission and attachment bytes by length only.
pub(crate) fn event_json(e: &RecordedEvent) -> EventJson {
    let value = match &e.event {
        Event::FormAttachmentsV1(a) => serde_json::json!({
            "form_id": a.form_id,
            "files": a.files.iter().map(|f| serde_json::json!({"name": f.name, "len": f.bytes.len()})).collect::<Vec<_>>(),
        }),
        other => payload(other),
    };
    EventJson {
        position: e.position.0,
        recorded_at: e.recorded_at.to_string(),
        command_id: e.command_id.0.clone(),
        kind: e.event.type_name().to_owned(),
        version: e.event.type_version(),
        event: value,
    }
}

/// An event's fields without its type tag; a form's raw bytes as their length and its content
/// hash in hex.
fn payload(event: &Event) -> serde_json::Value {
    let mut value = match serde_json::to_value(event) {
        // Externally tagged: `{"FormAcceptedV1": {…}}`; the type is in `type` and `version`.
        Ok(serde_json::Value::Object(tagged)) if tagged.len() == 1 => tagged
            .into_iter()
            .next()
            .map_or(serde_json::Value::Null, |(_, inner)| inner),
        Ok(other) => other,
        Err(e) => serde_json::json!({"unserializable": e.to_string()}),
    };
    if let (Some(record), Some(form)) = (
        event.form_record(),
        value.get_mut("form").and_then(|f| f.as_object_mut()),
    ) {
        form.insert("raw".into(), serde_json::json!({"len": record.raw.len()}));
        let hex: String = record
            .content_hash
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        form.insert("content_hash".into(), serde_json::Value::String(hex));
    }
    value
}

struct AllEvents;

impl Step for AllEvents {
    fn step(&mut self, _: &Engine, e: &RecordedEvent) -> Result<Vec<SseEvent>, ServerError> {
        Ok(vec![json_event(
            e.event.type_name(),
            e.position,
            &event_json(e),
        )])
    }
}

/// The log's events from a position on, live: SSE `event:` is the type name, `id:` the
/// position, `data:` an [`EventJson`]. Not for mobile workers (it is the whole project space).
#[utoipa::path(get, path = "/api/v1/{domain}/events", tag = "subscriptions",
    params(("domain" = String, Path, description = "Project space"), FromParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this position")),
    responses((status = 200, content_type = "text/event-stream", body = EventJson), (status = 403, body = ErrorBody)))]
async fn events(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    headers: HeaderMap,
    Q(q): Q<FromParams>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    overview(&p)?;
    let (from, _) = start(&headers, q.from, &p.engine)?;
    let sub = subscribe(&p.engine, from).await?;
    Ok(stream(
        &state,
        Arc::clone(&p.engine),
        sub,
        AllEvents,
        false,
        Vec::new(),
    ))
}

fn overview(p: &Principal) -> Result<(), ServerError> {
    if p.access == Access::MobileWorker {
        return Err(ServerError::Forbidden(format!(
            "{} is a mobile worker: it follows only its own case list",
            p.user_id
        )));
    }
    Ok(())
}

/// True for events that can change a case or whose cases a user sees.
fn may_change_cases(e: &Event) -> bool {
    !matches!(
        e,
        Event::UserPasswordSetV1(_)
            | Event::ApiKeyCreatedV1(_)
            | Event::ApiKeyRevokedV1(_)
            | Event::FormLastSyncTokenV1(_)
            | Event::DiagnosticRaisedV1(_)
            | Event::FormRejectedV1(_)
            | Event::FormDuplicateV1(_)
            | Event::FormAttachmentsV1(_)
    )
}

struct CaseList {
    user: String,
    include_closed: bool,
    /// The list as of the last position looked at, by case id.
    list: BTreeMap<String, CaseJson>,
}

impl CaseList {
    fn at(&self, engine: &Engine, p: Position) -> Result<BTreeMap<String, CaseJson>, ServerError> {
        if p.0 == 0 {
            return Ok(BTreeMap::new());
        }
        let cases =
            engine.query(|proj| proj.cases_for_user_at(&self.user, self.include_closed, p))?;
        Ok(cases
            .iter()
            .map(|c| (c.case_id.0.clone(), CaseJson::from(c)))
            .collect())
    }
}

impl Step for CaseList {
    fn step(&mut self, engine: &Engine, e: &RecordedEvent) -> Result<Vec<SseEvent>, ServerError> {
        if !may_change_cases(&e.event) {
            return Ok(Vec::new());
        }
        let now = self.at(engine, e.position)?;
        let mut changes = CaseListChanges {
            position: e.position.0,
            ..CaseListChanges::default()
        };
        for (id, case) in &now {
            match self.list.get(id) {
                None => changes.entered.push(case.clone()),
                Some(before) if before != case => changes.changed.push(case.clone()),
                Some(_) => {}
            }
        }
        for (id, case) in &self.list {
            if !now.contains_key(id) {
                changes.left.push(case.clone());
            }
        }
        self.list = now;
        if changes.entered.is_empty() && changes.left.is_empty() && changes.changed.is_empty() {
            return Ok(Vec::new());
        }
        Ok(vec![json_event("changes", e.position, &changes)])
    }
}

/// Changes of a user's case list (R44: cases owned by the user or its case-sharing groups,
/// with memberships and sharing flags as they change): SSE `changes` events, one per position
/// that changed it, each a [`CaseListChanges`]. A new stream first sends `snapshot`: the list
/// just before `from`, as `entered`. A mobile worker follows only its own list.
#[utoipa::path(get, path = "/api/v1/{domain}/users/{user_id}/cases/feed", tag = "subscriptions",
    params(("domain" = String, Path, description = "Project space"), ("user_id" = String, Path), ListFeedParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this position")),
    responses((status = 200, content_type = "text/event-stream", body = CaseListChanges),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn case_list_feed(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    Path((_, user)): Path<(String, String)>,
    headers: HeaderMap,
    Q(q): Q<ListFeedParams>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    p.require_user(&user)?;
    if !p
        .engine
        .projections()
        .directory()
        .users
        .contains_key(&UserId::new(user.as_str()))
    {
        return Err(ServerError::NotFound(format!("unknown user {user}")).into());
    }
    let (from, resumed) = start(&headers, q.from, &p.engine)?;
    let mut step = CaseList {
        user,
        include_closed: q.include_closed,
        list: BTreeMap::new(),
    };
    let base = Position(from.0 - 1);
    // The baseline is read as of `base`, which must be folded (and in the log).
    let base = base.min(p.engine.projections().checkpoint());
    let sub = subscribe(&p.engine, Position(base.0 + 1)).await?;
    step.list = blocking(|| step.at(&p.engine, base))?;
    let first = if resumed {
        Vec::new()
    } else {
        let snapshot = CaseListChanges {
            position: base.0,
            entered: step.list.values().cloned().collect(),
            ..CaseListChanges::default()
        };
        vec![json_event("snapshot", base, &snapshot)]
    };
    Ok(stream(
        &state,
        Arc::clone(&p.engine),
        sub,
        step,
        true,
        first,
    ))
}

struct OneCase {
    id: CaseId,
    last: CaseAt,
}

fn case_change(position: Position, at: &CaseAt) -> CaseChange {
    let (state, case) = match at {
        CaseAt::NotYet => ("not_yet", None),
        CaseAt::Exists(c) => ("exists", Some(CaseJson::from(&**c))),
        CaseAt::Deleted { .. } => ("deleted", None),
    };
    CaseChange {
        position: position.0,
        state: state.to_owned(),
        case,
    }
}

impl Step for OneCase {
    fn step(&mut self, engine: &Engine, e: &RecordedEvent) -> Result<Vec<SseEvent>, ServerError> {
        let touches = matches!(
            e.event,
            Event::FormAcceptedV1(_)
                | Event::FormEditedV1(_)
                | Event::FormArchivedV1(_)
                | Event::FormUnarchivedV1(_)
        );
        if !touches {
            return Ok(Vec::new());
        }
        let now = engine.query(|proj| proj.case_at(&self.id, e.position))?;
        if now == self.last {
            return Ok(Vec::new());
        }
        self.last = now;
        Ok(vec![json_event(
            "case",
            e.position,
            &case_change(e.position, &self.last),
        )])
    }
}

/// A case as each position changes it: SSE `case` events ([`CaseChange`]). A new stream first
/// sends `snapshot`: the case just before `from`. A mobile worker follows only cases in its
/// case list.
#[utoipa::path(get, path = "/api/v1/{domain}/cases/{case_id}/feed", tag = "subscriptions",
    params(("domain" = String, Path, description = "Project space"), ("case_id" = String, Path), FromParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this position")),
    responses((status = 200, content_type = "text/event-stream", body = CaseChange), (status = 403, body = ErrorBody)))]
async fn case_feed(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    Path((_, case_id)): Path<(String, String)>,
    headers: HeaderMap,
    Q(q): Q<FromParams>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let id = CaseId::new(case_id.as_str());
    if p.access == Access::MobileWorker {
        let mine = blocking(|| {
            p.engine
                .query(|proj| proj.cases_for_user(p.user_id.as_str(), true))
        })?;
        if !mine.iter().any(|c| c.case_id == id) {
            return Err(ServerError::Forbidden(format!(
                "case {id} is not in the case list of {}",
                p.user_id
            ))
            .into());
        }
    }
    let (from, resumed) = start(&headers, q.from, &p.engine)?;
    let base = Position(from.0 - 1).min(p.engine.projections().checkpoint());
    let sub = subscribe(&p.engine, Position(base.0 + 1)).await?;
    let last = if base.0 == 0 {
        CaseAt::NotYet
    } else {
        blocking(|| p.engine.query(|proj| proj.case_at(&id, base)))?
    };
    let first = if resumed {
        Vec::new()
    } else {
        vec![json_event("snapshot", base, &case_change(base, &last))]
    };
    let step = OneCase { id, last };
    Ok(stream(
        &state,
        Arc::clone(&p.engine),
        sub,
        step,
        true,
        first,
    ))
}

struct Diagnostics;

impl Step for Diagnostics {
    fn step(&mut self, engine: &Engine, e: &RecordedEvent) -> Result<Vec<SseEvent>, ServerError> {
        let before = Position(e.position.0 - 1);
        let rows = engine.query(|proj| proj.diagnostics_between(before, e.position))?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let raised = DiagnosticsRaised {
            position: e.position.0,
            diagnostics: rows.iter().map(DiagnosticJson::from).collect(),
        };
        Ok(vec![json_event("diagnostics", e.position, &raised)])
    }
}

/// Diagnostics as positions raise them: SSE `diagnostics` events ([`DiagnosticsRaised`]). Not
/// for mobile workers.
#[utoipa::path(get, path = "/api/v1/{domain}/diagnostics/feed", tag = "subscriptions",
    params(("domain" = String, Path, description = "Project space"), FromParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this position")),
    responses((status = 200, content_type = "text/event-stream", body = DiagnosticsRaised), (status = 403, body = ErrorBody)))]
async fn diagnostics_feed(
    ApiPrincipal(p): ApiPrincipal,
    State(state): State<AppState>,
    headers: HeaderMap,
    Q(q): Q<FromParams>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    overview(&p)?;
    let (from, _) = start(&headers, q.from, &p.engine)?;
    let sub = subscribe(&p.engine, from).await?;
    Ok(stream(
        &state,
        Arc::clone(&p.engine),
        sub,
        Diagnostics,
        true,
        Vec::new(),
    ))
}
