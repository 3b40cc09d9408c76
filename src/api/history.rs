//! A twin's past: `GET /twins/{id}/history` (its versions, paged) and
//! `GET /twins/{id}?as_of=T` (the twin as it was then), from the versions the fleet view
//! keeps (`[view] history_versions`, `history_retention`; the history topic has them all).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{Answer, ApiState, Params, error, page_limit, params};
use crate::view::HistoryQuery;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryParams {
    from: Option<String>,
    to: Option<String>,
    limit: Option<usize>,
    after: Option<u64>,
    order: Option<String>,
    time: Option<String>,
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// A time parameter: epoch milliseconds or RFC 3339.
fn time(name: &str, value: Option<&str>) -> Result<Option<i64>, Response> {
    let Some(v) = value else { return Ok(None) };
    crate::codec::parse_time(v).map(Some).ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            format!("{name}: '{v}' is neither epoch milliseconds nor an RFC 3339 time"),
        )
    })
}

/// Whether `time` says processing time (`processing`) or event time (`event`, the default).
fn processing(time: Option<&str>) -> Result<bool, Response> {
    match time {
        None | Some("event") => Ok(false),
        Some("processing") => Ok(true),
        Some(other) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("time: '{other}' is neither 'event' nor 'processing'"),
        )),
    }
}

pub(super) async fn history(
    State(s): State<ApiState>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    q: Params<HistoryParams>,
) -> Answer {
    let Path(id) = id.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let q = params(q)?;
    let limit = page_limit(q.limit)?;
    let descending = match q.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("order: '{other}' is neither 'asc' nor 'desc'"),
            ));
        }
    };
    let query = HistoryQuery {
        from: time("from", q.from.as_deref())?,
        to: time("to", q.to.as_deref())?,
        processing: processing(q.time.as_deref())?,
        after: q.after,
        descending,
        limit,
    };
    let view = s.view.clone();
    let now = s.clock.now_ms();
    let found =
        tokio::task::spawn_blocking(move || view.history(&id, &query, now).map(|p| (id, p)))
            .await
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (id, page) = found;
    let Some((versions, next)) = page else {
        return Err(error(StatusCode::NOT_FOUND, format!("no twin '{id}'")));
    };
    let codec = &s.view.topology().codec;
    let versions: Vec<serde_json::Value> = versions.iter().map(|t| codec.twin_json(t)).collect();
    // Moved into the answer, not copied (as `json!` would copy a page of twins).
    let mut answer = serde_json::Map::new();
    answer.insert("asset_id".into(), id.into());
    answer.insert("versions".into(), serde_json::Value::Array(versions));
    answer.insert("next".into(), next.map(|v| v.to_string()).into());
    Ok(Json(serde_json::Value::Object(answer)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TwinParams {
    as_of: Option<String>,
    time: Option<String>,
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// `GET /twins/{id}`, now or `?as_of=T`.
pub(super) async fn get_twin(
    State(s): State<ApiState>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    q: Params<TwinParams>,
) -> Answer {
    // A path that does not decode (not UTF-8, say) gets the JSON error every other 400 has.
    let Path(id) = id.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let q = params(q)?;
    let processing = processing(q.time.as_deref())?;
    let internal = |e: crate::error::Error| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let twin = match time("as_of", q.as_of.as_deref())? {
        None => s.view.twin(&id).map_err(internal)?,
        Some(at) => match s.view.as_of(&id, at, processing).map_err(internal)? {
            None => None,
            Some(Some(twin)) => Some(twin),
            Some(None) => {
                return Err(error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no kept version of '{id}' at or before {at} (see [view] history_versions)"
                    ),
                ));
            }
        },
    };
    match twin {
        Some(twin) => Ok(Json(s.view.topology().codec.twin_json(&twin)).into_response()),
        None => Err(error(StatusCode::NOT_FOUND, format!("no twin '{id}'"))),
    }
}
