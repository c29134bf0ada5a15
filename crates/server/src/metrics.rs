//! `/metrics` in Prometheus' text exposition format (version 0.0.4), hand-rolled: four series
//! do not earn a metrics crate.
//!
//! - `caseledger_http_request_duration_seconds{route,method,status}`: histogram of every
//!   request, by the route's pattern (never the raw path, so ids do not explode the label set);
//!   an SSE stream counts until its headers are sent.
//! - `caseledger_append_duration_seconds`: histogram of appends, from the command's arrival at
//!   the engine to its acknowledgement (durable and projected), for the receiver and `/api/v1`.
//! - `caseledger_projection_lag_events{domain}`: log head − projection checkpoint, per project
//!   space, read when scraped.
//! - `caseledger_sse_subscribers`: SSE streams open now.
//!
//! Recording takes a short mutex per request; nothing here waits on IO.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;

/// Upper bounds of the latency buckets, in seconds.
const BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One histogram: counts per bucket (not cumulative), sum and count.
#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; BOUNDS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BOUNDS.iter().position(|b| secs <= *b) {
            if let Some(b) = self.buckets.get_mut(i) {
                *b += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines; `labels` is `k="v",…` or empty.
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in BOUNDS.iter().zip(self.buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// The server's metrics, in [`AppState`].
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// By (route, method, status).
    requests: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    appends: Mutex<Histogram>,
    subscribers: AtomicI64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Metrics {
    /// Records one append's latency.
    pub(crate) fn observe_append(&self, d: Duration) {
        lock(&self.appends).observe(d);
    }

    /// Counts an SSE stream until the guard is dropped.
    pub(crate) fn subscriber(state: &AppState) -> SubscriberGuard {
        state
            .inner
            .metrics
            .subscribers
            .fetch_add(1, Ordering::Relaxed);
        SubscriberGuard {
            state: state.clone(),
        }
    }
}

/// Held by an SSE stream; dropping it (the stream ended or the client left) uncounts it.
pub(crate) struct SubscriberGuard {
    state: AppState,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.state
            .inner
            .metrics
            .subscribers
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Middleware: times every request by its route pattern.
pub(crate) async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    lock(&state.inner.metrics.requests)
        .entry((route, method, status))
        .or_default()
        .observe(started.elapsed());
    response
}

/// Escapes a label value (`\`, `"`, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition: request and append latency, projection lag, SSE subscribers.
#[utoipa::path(get, path = "/metrics", tag = "operations", security(()),
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let m = &state.inner.metrics;
    let mut out = String::new();
    out.push_str("# HELP caseledger_http_request_duration_seconds HTTP request latency by route pattern, method and status.\n");
    out.push_str("# TYPE caseledger_http_request_duration_seconds histogram\n");
    for ((route, method, status), h) in lock(&m.requests).iter() {
        let labels = format!(
            "route=\"{}\",method=\"{}\",status=\"{status}\"",
            label(route),
            label(method)
        );
        h.write(
            &mut out,
            "caseledger_http_request_duration_seconds",
            &labels,
        );
    }
    out.push_str("# HELP caseledger_append_duration_seconds Latency of appends until acknowledged (durable and projected).\n");
    out.push_str("# TYPE caseledger_append_duration_seconds histogram\n");
    let appends = lock(&m.appends).clone();
    appends.write(&mut out, "caseledger_append_duration_seconds", "");
    out.push_str("# HELP caseledger_projection_lag_events Log head minus projection checkpoint, per project space.\n");
    out.push_str("# TYPE caseledger_projection_lag_events gauge\n");
    let mut engines = state.engines();
    engines.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    for (domain, engine) in &engines {
        let lag = engine
            .log()
            .written_head()
            .0
            .saturating_sub(engine.projections().checkpoint().0);
        let _ = writeln!(
            out,
            "caseledger_projection_lag_events{{domain=\"{}\"}} {lag}",
            label(domain.as_str())
        );
    }
    type Gauge = fn(&engine::Engine) -> u64;
    let replica: [(&str, &str, &str, Gauge); 3] = [
        (
            "caseledger_replica_head_position",
            "gauge",
            "Last position copied from the JetStream stream, per project space.",
            |e| e.log().written_head().0,
        ),
        (
            "caseledger_replica_refused_appends_total",
            "counter",
            "Appends the stream refused because another writer had moved its head; each was decided again.",
            engine::Engine::refused_appends,
        ),
        (
            "caseledger_replica_overlapped_groups_total",
            "counter",
            "Groups decided while the group before them was being appended to the stream.",
            engine::Engine::overlapped_groups,
        ),
    ];
    if engines.iter().any(|(_, e)| e.upstream().is_some()) {
        for (name, kind, help, value) in replica {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (domain, engine) in engines.iter().filter(|(_, e)| e.upstream().is_some()) {
                let _ = writeln!(
                    out,
                    "{name}{{domain=\"{}\"}} {}",
                    label(domain.as_str()),
                    value(engine)
                );
            }
        }
    }
    out.push_str("# HELP caseledger_sse_subscribers Server-Sent Event streams open now.\n");
    out.push_str("# TYPE caseledger_sse_subscribers gauge\n");
    let _ = writeln!(
        out,
        "caseledger_sse_subscribers {}",
        m.subscribers.load(Ordering::Relaxed)
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
