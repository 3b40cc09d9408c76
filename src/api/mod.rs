//! The HTTP endpoint: operations (`/metrics`, `/healthz`, `/readyz`) and the twin API
//! (`/twins`, `/twins/{id}`, `/alerts`, `/fleet`, the live `/twins/stream`), the fleet page
//! at `/` and the API's OpenAPI document at `/openapi.json`. Its writes need a write
//! credential and change no state themselves: `PATCH /twins/{id}/desired` ([`desired`])
//! sends the write to the desired-state topic, where the twin's owner decides;
//! `POST /ingest` ([`ingest`]) sends devices' readings to the telemetry topic.
//!
//! Twins are read from the fleet view ([`crate::view`]): every instance answers for every
//! twin, as of the changelog it has read (see `ARCHITECTURE.md` for how stale that is).

use std::sync::Arc;

mod desired;
mod explain;
mod history;
mod ingest;
mod limit;
mod simulate;

pub use limit::RateLimit;

use axum::extract::{Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::kafka::RecordWriter;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::twin::{Severity, Status, Twin};
use crate::view::{EventKind, FleetView};

/// Largest page of `GET /twins` and `GET /alerts`.
pub const MAX_PAGE: usize = 1000;

/// Twins one list request reads at most; a filtered page that needs more ends early, with
/// `next_after` saying where to go on.
const SCAN_BUDGET: usize = 100_000;

/// Longest query string accepted.
const MAX_QUERY: usize = 2048;

/// The fleet page: one static file, no build step, no outside resources.
const PAGE: &str = include_str!("page.html");
/// Leaflet, vendored from npm (`leaflet/README`): the page's map, served from the binary.
const LEAFLET_JS: &str = include_str!("leaflet/leaflet.js");
const LEAFLET_CSS: &str = include_str!("leaflet/leaflet.css");

/// The fleet page with the map settings of `http` (tile URL template and attribution).
pub fn page(http: &crate::config::HttpConfig) -> String {
    let map = serde_json::json!({ "tiles": http.map_tiles, "attribution": http.map_attribution });
    // As JSON inside a script element: `</` could end the element.
    PAGE.replace(
        "null /* map settings */",
        &map.to_string().replace("</", "<\\/"),
    )
}

/// A static file of the page, cached for a day.
async fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// How the instance's partitions are doing, as `/healthz` and `/readyz` tell.
pub trait Health: Send + Sync {
    /// Partitions whose worker ended unexpectedly, with why.
    fn failed(&self) -> Vec<(i32, String)>;
    /// Partitions with input waiting that made no progress for `processing.stall_after`.
    fn stalled(&self) -> Vec<i32>;
    /// Partitions assigned to this instance.
    fn assigned(&self) -> Vec<i32>;
    /// Whether every assigned partition is restored and processing.
    fn ready(&self) -> bool;
}

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    pub(crate) health: Arc<dyn Health>,
    pub(crate) metrics: Metrics,
    /// For its size on `/metrics`.
    pub(crate) store: Store,
    pub(crate) view: Arc<FleetView>,
    /// Whether the view runs (`[view] enabled`): without it the twin API answers 503.
    pub(crate) view_enabled: bool,
    pub(crate) token: Option<String>,
    /// Write credentials: token and name.
    pub(crate) writers: Arc<Vec<(String, String)>>,
    /// Desired writes per asset.
    pub(crate) writes: Arc<RateLimit>,
    /// Readings per asset through `POST /ingest`.
    pub(crate) readings: Arc<RateLimit>,
    /// Where desired writes go.
    pub(crate) writer: Arc<RecordWriter>,
    /// Processing time, for the rate limit.
    pub(crate) clock: Arc<dyn Clock>,
    /// Readings one ingestion request may carry, and its largest body.
    pub(crate) ingest_max_readings: usize,
    pub(crate) ingest_max_bytes: usize,
    /// The fleet page, with its map settings.
    pub(crate) page: Arc<str>,
    /// Cancelled when the instance stops: open streams end.
    pub(crate) stop: CancellationToken,
}

/// Serves the endpoint on `listener` until `stop` is cancelled.
///
/// # Errors
/// When the server fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    Ok(())
}

fn router(state: ApiState) -> Router {
    let ingest_limit = axum::extract::DefaultBodyLimit::max(state.ingest_max_bytes);
    Router::new()
        .route(
            "/",
            get(|State(s): State<ApiState>| async move { Html(String::from(&*s.page)) }),
        )
        .route(
            "/assets/leaflet.js",
            get(|| asset(LEAFLET_JS, "text/javascript")),
        )
        .route(
            "/assets/leaflet.css",
            get(|| asset(LEAFLET_CSS, "text/css")),
        )
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/twins", get(list_twins))
        .route("/twins/stream", get(stream))
        .route(
            "/twins/{id}",
            get(history::get_twin).delete(desired::delete_twin),
        )
        .route("/twins/{id}/history", get(history::history))
        .route("/twins/{id}/explain", get(explain::explain_twin))
        .route(
            "/twins/{id}/simulate",
            post(simulate::simulate)
                .layer(axum::extract::DefaultBodyLimit::max(simulate::MAX_BODY)),
        )
        .route(
            "/twins/{id}/desired",
            patch(desired::patch_desired)
                .layer(axum::extract::DefaultBodyLimit::max(desired::MAX_BODY)),
        )
        .route("/ingest", post(ingest::ingest).layer(ingest_limit))
        .route(
            "/ingest/{id}",
            post(ingest::ingest_asset).layer(ingest_limit),
        )
        .route("/alerts", get(list_alerts))
        .route("/fleet", get(fleet))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint; see /openapi.json") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(1024))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// Limits and authentication, before any handler: the query string's length, and the
/// bearer token (header or `access_token` parameter) on everything but `/healthz`. A write
/// needs a write credential in the header (never in the URL, where logs keep it); the read
/// token gets 403 on every write. A write credential also reads.
async fn guard(State(s): State<ApiState>, mut request: Request, next: Next) -> Response {
    let query = request.uri().query().unwrap_or("");
    if query.len() > MAX_QUERY {
        return error(
            StatusCode::BAD_REQUEST,
            format!("query string longer than {MAX_QUERY} bytes"),
        );
    }
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let param = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("access_token="));
    let writer_of = |t: Option<&str>| {
        let t = t?;
        s.writers
            .iter()
            .find(|(token, _)| token == t)
            .map(|(_, name)| name.clone())
    };
    let path = request.uri().path();
    if !s.view_enabled && needs_view(path) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this instance keeps no fleet view ([view] enabled = false): ask an instance that serves the twin API",
        );
    }
    let write = (request.method() == Method::PATCH
        && path.starts_with("/twins/")
        && path.ends_with("/desired"))
        || (request.method() == Method::DELETE && path.starts_with("/twins/"))
        || (request.method() == Method::POST
            && (path == "/ingest" || path.starts_with("/ingest/")));
    if write {
        if s.writers.is_empty() {
            return error(
                StatusCode::FORBIDDEN,
                "this instance takes no writes: configure a write credential in [http.writers]",
            );
        }
        let Some(name) = writer_of(bearer) else {
            if bearer.is_some() && bearer == s.token.as_deref() {
                return error(
                    StatusCode::FORBIDDEN,
                    "the read token cannot write: use a write credential ([http.writers])",
                );
            }
            return unauthorized(
                "a write credential is required: Authorization: Bearer <write token>",
            );
        };
        request.extensions_mut().insert(desired::Writer(name));
        return next.run(request).await;
    }
    if let Some(token) = &s.token
        && request.uri().path() != "/healthz"
        && !request.uri().path().starts_with("/assets/")
    {
        let reads = |t: Option<&str>| t == Some(token.as_str()) || writer_of(t).is_some();
        if !reads(bearer) && !reads(param) {
            return unauthorized(
                "a bearer token is required: Authorization: Bearer <token>, or ?access_token=<token>",
            );
        }
    }
    next.run(request).await
}

/// Whether answering `path` takes the fleet view: the twin API and the page, not the
/// operations endpoints, the OpenAPI document or ingestion.
fn needs_view(path: &str) -> bool {
    path == "/"
        || path == "/fleet"
        || path == "/alerts"
        || path == "/twins"
        || path.starts_with("/twins/")
}

fn unauthorized(message: &str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        "Bearer".parse().expect("valid header"),
    );
    r
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(s): State<ApiState>) -> Response {
    s.metrics.store_bytes.set(s.store.size_bytes() as i64);
    let body = prometheus::TextEncoder::new()
        .encode_to_string(&s.metrics.registry().gather())
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"));
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response()
}

/// Live unless wedged: a partition with input waiting whose position has not moved for
/// `processing.stall_after`.
async fn healthz(State(s): State<ApiState>) -> Response {
    let failed = s.health.failed();
    if !failed.is_empty() {
        let why: Vec<String> = failed
            .iter()
            .map(|(p, why)| format!("partition {p}: {why}"))
            .collect();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "failed: the worker of {} ended; the instance is stopping\n",
                why.join("; ")
            ),
        )
            .into_response();
    }
    let stalled = s.health.stalled();
    if stalled.is_empty() {
        "ok\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("wedged: partitions {stalled:?} have input waiting and made no progress for processing.stall_after\n"),
        )
            .into_response()
    }
}

async fn readyz(State(s): State<ApiState>) -> Response {
    let assigned = s.health.assigned();
    if assigned.is_empty() {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no partitions assigned yet",
        )
    } else if !s.health.ready() {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "restoring twins from the changelog",
        )
    } else {
        Json(serde_json::json!({ "ready": true, "partitions": assigned })).into_response()
    }
}

/// A query string that did not parse, as a 400 saying why.
type Params<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn params<T>(p: Params<T>) -> Result<T, Response> {
    p.map(|Query(q)| q)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TwinQuery {
    limit: Option<usize>,
    after: Option<String>,
    status: Option<Status>,
    alert: Option<String>,
    /// `south,west,north,east` in degrees.
    bbox: Option<String>,
    /// Only twins a forecast rule predicts to cross its threshold within this, e.g. `1h`.
    breach_within: Option<String>,
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// A span of the form `<up to 6 digits><ms|s|m|h|d>`, e.g. `90m`, in milliseconds.
fn span(text: &str) -> Option<i64> {
    let digits = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(digits);
    let n: i64 = n.parse().ok().filter(|_| (1..=6).contains(&digits))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(n * ms)
}

/// A span in milliseconds as [`span`] reads it, in the largest unit that divides it: `90s`,
/// `15m`, `1500ms`.
pub(crate) fn span_text(ms: i64) -> String {
    let ms = ms.max(0);
    let unit = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ]
    .into_iter()
    .find(|(size, _)| ms > 0 && ms % size == 0);
    match unit {
        Some((size, name)) => format!("{}{name}", ms / size),
        None => format!("{ms}ms"),
    }
}

/// What the forecast rules of `rules` predict for `twin`, as JSON: `{code, prediction,
/// points}` with `prediction` one of `unknown`, `clear`, `breached` or `crossing`, and for a
/// crossing `breach_at`, `time_to_breach_seconds`, `slope_per_minute` and `fit`. With
/// `within`, only the crossings within that many ms of the twin's newest reading.
pub(crate) fn predictions(
    rules: &crate::rules::RuleSet,
    twin: &Twin,
    within: Option<i64>,
) -> Vec<serde_json::Value> {
    use crate::rules::Prediction;
    (0..rules.rules.len())
        .filter(|i| rules.rules[*i].forecast.is_some())
        .filter_map(|i| {
            let rule = &rules.rules[i];
            let prediction = rules.predict(i, twin);
            let points = (twin.forecasts.iter())
                .find(|w| w.code == rule.code)
                .map_or(0, |w| w.points.len());
            let mut json = serde_json::json!({ "code": rule.code, "points": points });
            match prediction {
                Prediction::Crossing(f) => {
                    if within.is_some_and(|w| f.time_to_breach > w) {
                        return None;
                    }
                    json["prediction"] = "crossing".into();
                    json["breach_at"] = crate::codec::rfc3339(f.breach_at).into();
                    json["time_to_breach_seconds"] = (f.time_to_breach as f64 / 1000.0).into();
                    json["slope_per_minute"] = f.slope_per_minute.into();
                    json["fit"] = f.fit.into();
                }
                _ if within.is_some() => return None,
                Prediction::Unknown => json["prediction"] = "unknown".into(),
                Prediction::Clear => json["prediction"] = "clear".into(),
                Prediction::Breached => json["prediction"] = "breached".into(),
            }
            Some(json)
        })
        .collect()
}

/// A rule as JSON, with the model file's names: `code`, `kind`, `severity`, `property`,
/// `op`, `threshold`, `clear_threshold`, `for`, and a forecast's `horizon`,
/// `clear_horizon`, `window`, `min_samples`, `min_span` and `min_fit`; spans as `40m` (as
/// a simulation's overrides take them).
pub(crate) fn rule_json(
    rule: &crate::rules::Rule,
    model: &crate::twin::Model,
) -> serde_json::Value {
    use crate::rules::RuleKind;
    let span = span_text;
    let kind = match rule.kind {
        RuleKind::Threshold => "threshold",
        RuleKind::Forecast => "forecast",
        RuleKind::Offline => "offline",
        RuleKind::Desired => "desired",
    };
    let property = model
        .properties
        .get(rule.property)
        .map_or(rule.property_name.as_str(), |p| p.name.as_str());
    let mut json = serde_json::json!({
        "code": rule.code, "kind": kind, "severity": rule.severity, "property": property,
        "op": rule.op.symbol(), "threshold": rule.threshold,
        "clear_threshold": rule.clear_threshold, "for": rule.min_duration.map(span),
    });
    if let Some(f) = &rule.forecast {
        json["horizon"] = span(f.horizon).into();
        json["clear_horizon"] = span(f.clear_horizon).into();
        json["window"] = span(f.window).into();
        json["min_samples"] = f.min_samples.into();
        json["min_span"] = span(f.min_span).into();
        json["min_fit"] = f.min_fit.into();
    }
    json
}

/// A latitude/longitude box.
struct BBox {
    south: f64,
    west: f64,
    north: f64,
    east: f64,
}

impl BBox {
    /// Four finite numbers. A box need not lie on the globe: parts beyond the poles hold no
    /// twin, `south > north` holds none, and `west > east` crosses the antimeridian.
    fn parse(text: &str) -> Result<BBox, String> {
        let v: Vec<f64> = text
            .split(',')
            .map(|x| x.trim().parse::<f64>().ok().filter(|v| v.is_finite()))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("bbox '{text}': expected four numbers south,west,north,east"))?;
        let [south, west, north, east] = v[..] else {
            return Err(format!(
                "bbox '{text}': expected four numbers south,west,north,east"
            ));
        };
        Ok(BBox {
            south,
            west,
            north,
            east,
        })
    }

    fn contains(&self, (lat, lng): (f64, f64)) -> bool {
        let east_of_west = lng >= self.west;
        let west_of_east = lng <= self.east;
        (self.south..=self.north).contains(&lat)
            && if self.west <= self.east {
                east_of_west && west_of_east
            } else {
                east_of_west || west_of_east // across the antimeridian
            }
    }
}

/// Longest asset id accepted as a page cursor (`after`): no longer id is ever accepted on input.
const MAX_ID: usize = crate::twin::MAX_ASSET_ID_BYTES;

fn cursor(after: Option<String>) -> Result<Option<String>, Response> {
    match after {
        Some(a) if a.len() > MAX_ID => Err(error(
            StatusCode::BAD_REQUEST,
            format!("after: longer than {MAX_ID} bytes, so not an asset id"),
        )),
        a => Ok(a),
    }
}

fn page_limit(limit: Option<usize>) -> Result<usize, Response> {
    let limit = limit.unwrap_or(100);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_PAGE}"),
        ))
    }
}

/// Walks the view in asset id order from `after`, handing each twin to `take` until it
/// says the page is full or [`SCAN_BUDGET`] twins were read. Returns where to go on.
fn walk(
    view: &FleetView,
    after: Option<String>,
    mut take: impl FnMut(&Twin) -> bool,
) -> Result<Option<String>, Response> {
    let mut cursor = after;
    let mut read = 0;
    loop {
        let chunk = view
            .scan(cursor.as_deref(), 1000)
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let Some(last) = chunk.last() else {
            return Ok(None); // the end of the fleet
        };
        let last_id = last.asset_id.clone();
        for twin in &chunk {
            read += 1;
            if take(twin) {
                return Ok(Some(twin.asset_id.clone()));
            }
        }
        if read >= SCAN_BUDGET {
            return Ok(Some(last_id));
        }
        cursor = Some(last_id);
    }
}

/// A handler's answer: the response, or the error response that ended it early.
type Answer = Result<Response, Response>;

async fn list_twins(State(s): State<ApiState>, q: Params<TwinQuery>) -> Answer {
    let q = params(q)?;
    let limit = page_limit(q.limit)?;
    let bbox = q
        .bbox
        .as_deref()
        .map(BBox::parse)
        .transpose()
        .map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    let model = &s.view.topology().model;
    if bbox.is_some() && model.location().is_none() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bbox: this model has no location (properties named lat and lng)",
        ));
    }
    let within = q
        .breach_within
        .as_deref()
        .map(|w| {
            span(w).ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    format!("breach_within: expected a span such as 90m or 1h, not '{w}'"),
                )
            })
        })
        .transpose()?;
    let rules = &s.view.topology().rules;
    let codec = &s.view.topology().codec;
    let mut twins = Vec::new();
    let next = walk(&s.view, cursor(q.after)?, |t| {
        let forecasts = within.map(|w| predictions(rules, t, Some(w)));
        let keep = forecasts.as_ref().is_none_or(|f| !f.is_empty())
            && q.status.is_none_or(|st| t.status == st)
            && q.alert
                .as_ref()
                .is_none_or(|code| t.alerts.iter().any(|a| &a.code == code))
            && bbox
                .as_ref()
                .is_none_or(|b| model.location_of(t).is_some_and(|at| b.contains(at)));
        if keep {
            let mut json = codec.twin_json(t);
            if let Some(f) = forecasts {
                json["forecasts"] = f.into();
            }
            twins.push(json);
        }
        twins.len() == limit
    })?;
    Ok(Json(serde_json::json!({ "twins": twins, "next_after": next })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertQuery {
    limit: Option<usize>,
    after: Option<String>,
    code: Option<String>,
    severity: Option<Severity>,
    #[allow(dead_code)]
    access_token: Option<String>,
}

async fn list_alerts(State(s): State<ApiState>, q: Params<AlertQuery>) -> Answer {
    let q = params(q)?;
    let limit = page_limit(q.limit)?;
    let codec = &s.view.topology().codec;
    let mut alerts = Vec::new();
    // A page ends after a whole twin, so it may hold a few more than `limit` alerts.
    let next = walk(&s.view, cursor(q.after)?, |t| {
        let json = codec.twin_json(t);
        for (a, j) in t
            .alerts
            .iter()
            .zip(json["active_alerts"].as_array().into_iter().flatten())
        {
            if q.code.as_ref().is_none_or(|c| &a.code == c)
                && q.severity.is_none_or(|sev| a.severity == sev)
            {
                let mut j = j.clone();
                j["asset_id"] = t.asset_id.clone().into();
                alerts.push(j);
            }
        }
        alerts.len() >= limit
    })?;
    Ok(Json(serde_json::json!({ "alerts": alerts, "next_after": next })).into_response())
}

async fn fleet(State(s): State<ApiState>) -> Response {
    let counts = s.view.counts();
    Json(serde_json::json!({
        "twins": counts.twins,
        "by_status": counts.by_status,
        "by_alert": counts.by_alert,
        "caught_up": s.view.caught_up(),
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    asset: Option<String>,
    alert: Option<String>,
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// Server-sent events: `twin` (the twin after a change), `deleted` (the twin was deleted),
/// `alert` (an alert event) and `command` (a command event),
/// optionally only for one asset or one alert code. A client behind gets the latest event of
/// each asset (and alert) it has not read, in the order of their last change; one so far
/// behind that more than [`crate::view::STREAM_BUFFER`] assets changed since gets a `close`
/// event saying so and is dropped. The pipeline never waits for it.
async fn stream(State(s): State<ApiState>, q: Params<StreamQuery>) -> Answer {
    let q = params(q)?;
    let rx = s.view.subscribe();
    let metrics = s.metrics.clone();
    metrics.stream_clients.inc();
    Ok(Sse::new(events(rx, q, s.stop.clone(), metrics))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn events(
    rx: crate::view::Subscription,
    q: StreamQuery,
    stop: CancellationToken,
    metrics: crate::metrics::Metrics,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    // Counts the client out however the stream ends, the client going away included.
    struct Open(crate::metrics::Metrics);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.stream_clients.dec();
        }
    }
    let open = Arc::new(Open(metrics));
    futures::stream::unfold(Some((rx, q, stop, open)), |state| async move {
        let (mut rx, q, stop, open) = state?;
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => Err(None),
                next = rx.next() => next.map_err(Some),
            };
            match next {
                Ok(e) => {
                    let wanted = q.asset.as_ref().is_none_or(|a| *a == e.asset_id)
                        && q.alert.as_ref().is_none_or(|c| e.codes.contains(c));
                    if wanted {
                        let name = match e.kind {
                            EventKind::Twin => "twin",
                            EventKind::Alert => "alert",
                            EventKind::Command => "command",
                            EventKind::Deleted => "deleted",
                        };
                        let event = SseEvent::default().event(name).data(e.json.clone());
                        return Some((Ok(event), Some((rx, q, stop, open))));
                    }
                }
                Err(Some(n)) => {
                    open.0.stream_dropped.inc();
                    let reason = format!(
                        "client too slow: {n} changes it had not read are gone (the latest of at most {} assets are kept); reconnect and reload the snapshot",
                        crate::view::STREAM_BUFFER
                    );
                    let event = SseEvent::default()
                        .event("close")
                        .data(serde_json::json!({ "reason": reason }).to_string());
                    return Some((Ok(event), None));
                }
                Err(None) => {
                    let event = SseEvent::default()
                        .event("close")
                        .data(r#"{"reason":"server shutting down"}"#);
                    return Some((Ok(event), None));
                }
            }
        }
    })
}
