//! CommCare HQ's data APIs as `commcare-export` reads them (API.md §3, §4):
//! `GET /a/{domain}/api/v0.5/{case,form,user,group}/` and `/case/{id}/`, `/form/{id}/`.
//!
//! Lists are tastypie envelopes, `{"meta":{limit,offset,next,previous,total_count},"objects"}`.
//! Cases and forms come in `indexed_on` order (the only order served): a unique, strictly
//! increasing time the projections derive from the log position of each object's last change
//! (`projections` module `indexed`), so paging by `indexed_on_start=<last value>` never repeats
//! a page. `indexed_on_start`/`_end` are naive ISO times, inclusive, in UTC, in the formats HQ's
//! `validate_date` takes. Callers: API keys (admin, service, auditor) of the URL's project space;
//! a mobile worker is refused (403): HQ gives the data APIs only to users with API access.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use domain::{Case, CaseId, FormEntry, FormId, Position, Timestamp};
use engine::{Engine, EngineError};
use projections::{Indexed, IndexedPage, IndexedQuery};
use serde_json::{json, Map, Value};

use crate::auth::Access;
use crate::{AppState, Principal, ServerError};

/// The routes of this module.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/a/{domain}/api/v0.5/case/", get(case_list))
        .route("/a/{domain}/api/v0.5/case/{id}/", get(case_detail))
        .route("/a/{domain}/api/v0.5/form/", get(form_list))
        .route("/a/{domain}/api/v0.5/form/{id}/", get(form_detail))
        .route("/a/{domain}/api/v0.5/user/", get(user_list))
        .route("/a/{domain}/api/v0.5/group/", get(group_list))
}

/// Page size without `limit` (tastypie's default).
const DEFAULT_LIMIT: usize = 20;
/// The most cases one page holds (HQ's case resource `max_limit`); a larger `limit` is cut.
const MAX_CASES: usize = 5000;
/// The most forms, users or groups one page holds (tastypie's `max_limit`).
const MAX_OTHERS: usize = 1000;

/// Query parameters every list takes and ignores (credentials in the query, output format).
const IGNORED: [&str; 3] = ["format", "username", "api_key"];

/// A list request's paging and `indexed_on` range.
struct ListParams {
    limit: usize,
    offset: usize,
    start: Option<u64>,
    end: Option<u64>,
    include_archived: bool,
    /// The parameters as sent, for `next` and `previous`.
    pairs: Vec<(String, String)>,
}

impl ListParams {
    /// Reads and checks the parameters; `indexed` says whether the resource is listed in
    /// `indexed_on` order (cases, forms) and so takes `order_by` and the range.
    fn parse(
        pairs: Vec<(String, String)>,
        max: usize,
        indexed: bool,
        archive: bool,
    ) -> Result<Self, ServerError> {
        let mut out = ListParams {
            limit: DEFAULT_LIMIT,
            offset: 0,
            start: None,
            end: None,
            include_archived: false,
            pairs: Vec::new(),
        };
        for (k, v) in &pairs {
            match k.as_str() {
                "limit" => {
                    let n: usize = number(k, v)?;
                    // tastypie: 0 asks for the most, more than the most is cut to it.
                    out.limit = if n == 0 { max } else { n.min(max) };
                }
                "offset" => out.offset = number(k, v)?,
                "order_by" if indexed => {
                    if v != "indexed_on" {
                        return Err(ServerError::BadRequest(format!(
                            "order_by={v} is not served; order_by=indexed_on is"
                        )));
                    }
                }
                "indexed_on_start" if indexed => out.start = Some(parse_date(k, v)?),
                "indexed_on_end" if indexed => out.end = Some(parse_date(k, v)?),
                "include_archived" if archive => out.include_archived = v == "true",
                k if IGNORED.contains(&k) => {}
                other => {
                    // HQ reads other names as search filters; silently ignoring one would
                    // return rows the caller did not ask for.
                    return Err(ServerError::BadRequest(format!(
                        "{other:?} is not a parameter this server filters on"
                    )));
                }
            }
        }
        out.pairs = pairs;
        Ok(out)
    }

    fn query(&self) -> IndexedQuery {
        IndexedQuery {
            start: self.start,
            end: self.end,
            offset: self.offset,
            limit: self.limit,
            include_archived: self.include_archived,
        }
    }

    /// The query string of the page at `offset`: the request's parameters with that offset.
    fn at(&self, path: &str, offset: usize) -> String {
        let mut pairs: Vec<(String, String)> = self
            .pairs
            .iter()
            .filter(|(k, _)| k != "offset" && k != "limit")
            .cloned()
            .collect();
        pairs.push(("limit".into(), self.limit.to_string()));
        pairs.push(("offset".into(), offset.to_string()));
        let query: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        format!("{path}?{}", query.join("&"))
    }

    /// The tastypie envelope around `objects`, of `total` in all.
    fn envelope(&self, path: &str, objects: Vec<Value>, total: u64) -> Value {
        let shown = self.offset.saturating_add(objects.len());
        let more = u64::try_from(shown).unwrap_or(u64::MAX) < total && !objects.is_empty();
        let next = more.then(|| self.at(path, shown));
        let previous =
            (self.offset > 0).then(|| self.at(path, self.offset.saturating_sub(self.limit)));
        json!({
            "meta": {
                "limit": self.limit,
                "offset": self.offset,
                "next": next,
                "previous": previous,
                "total_count": total,
            },
            "objects": objects,
        })
    }
}

fn number(name: &str, value: &str) -> Result<usize, ServerError> {
    value
        .parse()
        .map_err(|_| ServerError::BadRequest(format!("{name}={value:?} is not a whole number")))
}

/// Percent-encoding of a query component (RFC 3986 unreserved characters kept).
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A date in one of the formats of HQ's `validate_date` (`%Y-%m-%d`, `%Y-%m-%dT%H:%M:%S`,
/// `%Y-%m-%dT%H:%M:%S.%f`, `%Y-%m-%dT%H:%MZ`), naive, read as UTC: µs since the epoch.
pub(crate) fn parse_date(name: &str, text: &str) -> Result<u64, ServerError> {
    let bad = || {
        ServerError::BadRequest(format!(
            "{name}={text:?} is not a date: use YYYY-MM-DD, YYYY-MM-DDTHH:MM:SS[.ffffff] or YYYY-MM-DDTHH:MMZ (UTC)"
        ))
    };
    let digits = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (date, time) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let mut ymd = date.split('-');
    let (Some(y), Some(mo), Some(d), None) = (ymd.next(), ymd.next(), ymd.next(), ymd.next())
    else {
        return Err(bad());
    };
    if y.len() != 4 || mo.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let (y, mo, d) = (
        digits(y).ok_or_else(bad)?,
        digits(mo).ok_or_else(bad)?,
        digits(d).ok_or_else(bad)?,
    );
    let (h, mi, s, micros) = match time {
        None => (0, 0, 0, 0),
        Some(t) => {
            if let Some(hm) = t.strip_suffix('Z') {
                let (h, mi) = hm.split_once(':').ok_or_else(bad)?;
                if h.len() != 2 || mi.len() != 2 {
                    return Err(bad());
                }
                (
                    digits(h).ok_or_else(bad)?,
                    digits(mi).ok_or_else(bad)?,
                    0,
                    0,
                )
            } else {
                let (hms, fraction) = match t.split_once('.') {
                    Some((hms, f)) => (hms, Some(f)),
                    None => (t, None),
                };
                let mut parts = hms.split(':');
                let (Some(h), Some(mi), Some(s), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad());
                };
                if h.len() != 2 || mi.len() != 2 || s.len() != 2 {
                    return Err(bad());
                }
                let micros = match fraction {
                    None => 0,
                    Some(f) if (1..=6).contains(&f.len()) => {
                        let n = digits(f).ok_or_else(bad)?;
                        n * 10i64.pow(6 - u32::try_from(f.len()).unwrap_or(6))
                    }
                    Some(_) => return Err(bad()),
                };
                (
                    digits(h).ok_or_else(bad)?,
                    digits(mi).ok_or_else(bad)?,
                    digits(s).ok_or_else(bad)?,
                    micros,
                )
            }
        }
    };
    let at = Timestamp::from_parts(y, mo, d, h, mi, s, micros / 1000).ok_or_else(bad)?;
    let micros_total =
        at.0.checked_mul(1000)
            .and_then(|ms| ms.checked_add(micros % 1000))
            .ok_or_else(bad)?;
    // Before the epoch nothing was indexed: the start of the epoch is as good.
    Ok(u64::try_from(micros_total).unwrap_or(0))
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` of µs since the epoch.
pub(crate) fn format_micros(micros: u64) -> String {
    let ms = i64::try_from(micros / 1000).unwrap_or(i64::MAX);
    let (y, mo, d, h, mi, s, _) = Timestamp::from_unix_millis(ms).parts();
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:06}Z",
        micros % 1_000_000
    )
}

/// [`format_micros`] of a millisecond time.
fn format_ms(at: Timestamp) -> String {
    format_micros(u64::try_from(at.0).unwrap_or(0).saturating_mul(1000))
}

fn json_response(value: &Value) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => ServerError::Internal(format!("encoding JSON: {e}")).into_response(),
    }
}

/// Refuses mobile workers: the data APIs need API access (an API key).
fn require_reader(principal: &Principal) -> Result<(), ServerError> {
    match principal.access {
        Access::MobileWorker => Err(ServerError::Forbidden(format!(
            "{} has no API access; the data APIs take an API key",
            principal.user_id
        ))),
        _ => Ok(()),
    }
}

/// Runs store reads off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServerError> + Send + 'static,
) -> Result<T, ServerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServerError::Internal(format!("data API task: {e}")))?
}

fn projection_error(e: projections::ProjectionError) -> ServerError {
    ServerError::Engine(EngineError::from(e))
}

fn log_error(e: eventlog::LogError) -> ServerError {
    ServerError::Internal(format!("reading the log: {e}"))
}

/// The received time of the event at `position`.
fn received_at(engine: &Engine, position: Position) -> Result<Option<Timestamp>, ServerError> {
    Ok(engine
        .log()
        .read_at(position)
        .map_err(log_error)?
        .map(|ev| ev.recorded_at))
}

/// A case as HQ's v0.5 case resource shows it (API.md §3.3).
fn case_json(engine: &Engine, domain: &str, indexed: &Indexed<Case>) -> Result<Value, ServerError> {
    let c = &indexed.item;
    let opened = match engine
        .projections()
        .history(&c.case_id)
        .map_err(projection_error)?
        .first()
    {
        Some(p) => received_at(engine, *p)?,
        None => None,
    };
    let mut properties = Map::new();
    for (k, v) in &c.properties {
        properties.insert(k.clone(), json!(v));
    }
    // The known properties last, so a dynamic property cannot hide them.
    properties.insert("case_type".into(), json!(c.case_type));
    properties.insert("case_name".into(), json!(c.case_name));
    properties.insert("owner_id".into(), json!(c.owner_id));
    properties.insert("external_id".into(), json!(c.external_id));
    properties.insert("date_opened".into(), json!(c.opened_on.map(format_ms)));
    let indices: BTreeMap<&str, Value> = c
        .indices
        .iter()
        .map(|(name, ix)| {
            (
                name.as_str(),
                json!({
                    "case_type": ix.case_type,
                    "case_id": ix.case_id.as_str(),
                    "relationship": ix.relationship.as_str(),
                }),
            )
        })
        .collect();
    let id = c.case_id.as_str();
    Ok(json!({
        "id": id,
        "case_id": id,
        "domain": domain,
        "user_id": c.user_id,
        "closed": c.closed,
        "date_closed": c.closed_on.map(format_ms),
        "date_modified": c.modified_on.map(format_ms),
        "server_date_modified": format_ms(indexed.changed_at),
        "server_date_opened": opened.map(format_ms),
        "indexed_on": format_micros(indexed.indexed_on),
        "opened_by": c.opened_by,
        "closed_by": c.closed_by,
        "properties": properties,
        "indices": indices,
        "xform_ids": c.xform_ids.iter().map(FormId::as_str).collect::<Vec<_>>(),
        "resource_uri": format!("/a/{domain}/api/v0.5/case/{}/", encode(id)),
    }))
}

/// A form as HQ's v0.5 form resource shows it (API.md §3.4), as far as the log's facts go:
/// the XML itself is not turned into JSON; `form` holds its xmlns, meta and case blocks.
fn form_json(
    engine: &Engine,
    domain: &str,
    id: &FormId,
    indexed: &Indexed<FormEntry>,
) -> Result<Value, ServerError> {
    let e = &indexed.item;
    let received_on = if e.original == e.position {
        Some(indexed.changed_at)
    } else {
        received_at(engine, e.original)?
    };
    let event = engine.log().read_at(e.position).map_err(log_error)?;
    let cases: Vec<Value> = event
        .as_ref()
        .and_then(|ev| ev.event.form_blocks())
        .map(|(_, blocks)| {
            blocks
                .iter()
                .map(|b| {
                    json!({
                        "@case_id": b.case_id.as_str(),
                        "@user_id": b.user,
                        "@date_modified": format_ms(b.date),
                        "@xmlns": "http://commcarehq.org/case/transaction/v2",
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let username = e.user_id.as_deref().and_then(|u| {
        engine
            .projections()
            .directory()
            .users
            .get(&domain::UserId::new(u))
            .map(|user| user.username.clone())
    });
    let mut form = json!({
        "@xmlns": e.xmlns,
        "meta": {
            "instanceID": id.as_str(),
            "userID": e.user_id,
            "username": username,
            "appVersion": null,
            "deviceID": null,
            "timeStart": null,
            "timeEnd": null,
        },
    });
    // XML-to-JSON as HQ does it: one element is an object, several are a list.
    match cases.len() {
        0 => {}
        1 => form["case"] = cases.into_iter().next().unwrap_or(Value::Null),
        _ => form["case"] = Value::Array(cases),
    }
    Ok(json!({
        "id": id.as_str(),
        "domain": domain,
        "form": form,
        "type": "data",
        "version": "1",
        "uiversion": "1",
        "metadata": {
            "instanceID": id.as_str(),
            "userID": e.user_id,
            "username": username,
        },
        "received_on": received_on.map(format_ms),
        "server_modified_on": format_ms(indexed.changed_at),
        "edited_on": (e.original != e.position).then(|| format_ms(indexed.changed_at)),
        "indexed_on": format_micros(indexed.indexed_on),
        "app_id": e.app_id.as_ref().map(|a| a.as_str().to_owned()),
        "build_id": null,
        "initial_processing_complete": true,
        "problem": e.error.as_ref().map(|r| r.message.clone()),
        "archived": e.archived,
        "attachments": {},
        "is_phone_submission": true,
        "edited_by_user_id": null,
        "submit_ip": null,
        "resource_uri": format!("/a/{domain}/api/v0.5/form/{}/", encode(id.as_str())),
    }))
}

/// `GET /a/{domain}/api/v0.5/case/`.
async fn case_list(
    principal: Principal,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ServerError> {
    require_reader(&principal)?;
    let params = ListParams::parse(pairs, MAX_CASES, true, false)?;
    let domain = principal.domain.to_string();
    let engine = Arc::clone(&principal.engine);
    let body = blocking(move || {
        let page: IndexedPage<Case> = engine
            .projections()
            .cases_by_indexed_on(&params.query())
            .map_err(projection_error)?;
        let objects = page
            .items
            .iter()
            .map(|c| case_json(&engine, &domain, c))
            .collect::<Result<Vec<_>, _>>()?;
        let path = format!("/a/{domain}/api/v0.5/case/");
        Ok(params.envelope(&path, objects, page.total))
    })
    .await?;
    tracing::info!(domain = %principal.domain, user = %principal.user_id, "case list");
    Ok(json_response(&body))
}

/// `GET /a/{domain}/api/v0.5/case/{id}/`.
async fn case_detail(
    principal: Principal,
    Path((_, id)): Path<(String, String)>,
) -> Result<Response, ServerError> {
    require_reader(&principal)?;
    let domain = principal.domain.to_string();
    let engine = Arc::clone(&principal.engine);
    let body = blocking(move || {
        let case = engine
            .projections()
            .case_indexed(&CaseId::new(id.as_str()))
            .map_err(projection_error)?
            .ok_or_else(|| ServerError::NotFound(format!("no case {id:?} in {domain}")))?;
        case_json(&engine, &domain, &case)
    })
    .await?;
    Ok(json_response(&body))
}

/// `GET /a/{domain}/api/v0.5/form/`: accepted forms; archived ones with `include_archived=true`.
async fn form_list(
    principal: Principal,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ServerError> {
    require_reader(&principal)?;
    let params = ListParams::parse(pairs, MAX_OTHERS, true, true)?;
    let domain = principal.domain.to_string();
    let engine = Arc::clone(&principal.engine);
    let body = blocking(move || {
        let page = engine
            .projections()
            .forms_by_indexed_on(&params.query())
            .map_err(projection_error)?;
        let objects = page
            .items
            .into_iter()
            .map(|i| {
                let (id, entry) = i.item;
                let indexed = Indexed {
                    indexed_on: i.indexed_on,
                    changed_at: i.changed_at,
                    position: i.position,
                    item: entry,
                };
                form_json(&engine, &domain, &id, &indexed)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let path = format!("/a/{domain}/api/v0.5/form/");
        Ok(params.envelope(&path, objects, page.total))
    })
    .await?;
    tracing::info!(domain = %principal.domain, user = %principal.user_id, "form list");
    Ok(json_response(&body))
}

/// `GET /a/{domain}/api/v0.5/form/{id}/`: an accepted form, archived or not.
async fn form_detail(
    principal: Principal,
    Path((_, id)): Path<(String, String)>,
) -> Result<Response, ServerError> {
    require_reader(&principal)?;
    let domain = principal.domain.to_string();
    let engine = Arc::clone(&principal.engine);
    let body = blocking(move || {
        let form_id = FormId::new(id.as_str());
        let form = engine
            .projections()
            .form_indexed(&form_id)
            .map_err(projection_error)?
            .ok_or_else(|| ServerError::NotFound(format!("no form {id:?} in {domain}")))?;
        form_json(&engine, &domain, &form_id, &form)
    })
    .await?;
    Ok(json_response(&body))
}

/// `GET /a/{domain}/api/v0.5/user/`: mobile workers by id (API.md §3.5).
async fn user_list(
    principal: Principal,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ServerError> {
    require_reader(&principal)?;
    let params = ListParams::parse(pairs, MAX_OTHERS, false, false)?;
    let domain = principal.domain.to_string();
    let directory = principal.engine.projections().directory();
    let total = directory.users.len();
    let objects: Vec<Value> = directory
        .users
        .iter()
        .skip(params.offset)
        .take(params.limit)
        .map(|(id, user)| {
            let groups: Vec<&str> = directory
                .groups
                .iter()
                .filter(|(_, g)| g.members.contains(id))
                .map(|(g, _)| g.as_str())
                .collect();
            let sharing = directory.case_sharing_groups(id.as_str());
            json!({
                "id": id.as_str(),
                "username": user.username,
                "first_name": "",
                "last_name": "",
                "default_phone_number": null,
                "email": "",
                "phone_numbers": [],
                "groups": groups,
                "user_data": {
                    "commcare_project": domain,
                    "commcare_location_id": null,
                    "commcare_location_ids": null,
                    "commcare_primary_case_sharing_id": sharing.first().map(|g| g.as_str()),
                },
                "locations": [],
                "primary_location": null,
                "date_joined": user.created_on.map(format_ms),
                "resource_uri": format!("/a/{domain}/api/v0.5/user/{}/", encode(id.as_str())),
            })
        })
        .collect();
    let path = format!("/a/{domain}/api/v0.5/user/");
    Ok(json_response(&params.envelope(
        &path,
        objects,
        u64::try_from(total).unwrap_or(u64::MAX),
    )))
}

/// `GET /a/{domain}/api/v0.5/group/` (API.md §3.5).
async fn group_list(
    principal: Principal,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ServerError> {
    require_reader(&principal)?;
    let params = ListParams::parse(pairs, MAX_OTHERS, false, false)?;
    let domain = principal.domain.to_string();
    let directory = principal.engine.projections().directory();
    let total = directory.groups.len();
    let objects: Vec<Value> = directory
        .groups
        .iter()
        .skip(params.offset)
        .take(params.limit)
        .map(|(id, g)| {
            json!({
                "id": id.as_str(),
                "domain": domain,
                "name": g.name,
                "users": g.members.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                "case_sharing": g.case_sharing,
                "reporting": true,
                "metadata": {},
                "resource_uri": format!("/a/{domain}/api/v0.5/group/{}/", encode(id.as_str())),
            })
        })
        .collect();
    let path = format!("/a/{domain}/api/v0.5/group/");
    Ok(json_response(&params.envelope(
        &path,
        objects,
        u64::try_from(total).unwrap_or(u64::MAX),
    )))
}
