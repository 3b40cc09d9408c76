//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, and read-only twin queries over the
//! partitions this instance owns. It never changes state.
//!
//! Twins are read from the store, so an answer may lag the pipeline by the batch in flight.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{Coordinator, Shared};

/// Largest page of `GET /twins`.
pub const MAX_PAGE: usize = 1000;

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    pub(crate) shared: Arc<Shared>,
    pub(crate) coordinator: Arc<Coordinator>,
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
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/twins", get(list_twins))
        .route("/twins/{id}", get(get_twin))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn metrics(State(s): State<ApiState>) -> Response {
    s.shared
        .metrics
        .store_bytes
        .set(s.shared.store.size_bytes() as i64);
    let body = prometheus::TextEncoder::new()
        .encode_to_string(&s.shared.metrics.registry().gather())
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"));
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response()
}

/// Live unless wedged: a partition with input waiting whose position has not moved for
/// `processing.stall_after`.
async fn healthz(State(s): State<ApiState>) -> Response {
    let stalled = s.coordinator.stalled();
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
    let assigned = s.coordinator.assigned();
    if assigned.is_empty() {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no partitions assigned yet",
        )
    } else if !s.coordinator.ready() {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "restoring twins from the changelog",
        )
    } else {
        Json(serde_json::json!({ "ready": true, "partitions": assigned })).into_response()
    }
}

async fn get_twin(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let codec = &s.shared.topology.codec;
    for partition in s.coordinator.assigned() {
        match s.shared.store.partition(partition).twin(&id) {
            Ok(Some(bytes)) => {
                return match codec.decode_twin(&bytes) {
                    Ok(twin) => Json(codec.twin_json(&twin)).into_response(),
                    Err(e) => error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("stored twin {id} is unreadable: {e}"),
                    ),
                };
            }
            Ok(None) => {}
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
    error(
        StatusCode::NOT_FOUND,
        format!("no twin '{id}' in the partitions this instance owns"),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_twins(
    State(s): State<ApiState>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(page)) = page else {
        return error(
            StatusCode::BAD_REQUEST,
            "query parameters are limit (1..=1000) and after (an asset id)",
        );
    };
    let limit = page.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_PAGE}"),
        );
    }
    let mut rows = Vec::new();
    for partition in s.coordinator.assigned() {
        match s
            .shared
            .store
            .partition(partition)
            .scan(page.after.as_deref(), limit)
        {
            Ok(mut r) => rows.append(&mut r),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows.truncate(limit);
    let codec = &s.shared.topology.codec;
    let twins: Vec<_> = rows
        .iter()
        .filter_map(|(_, bytes)| codec.decode_twin(bytes).ok())
        .map(|t| codec.twin_json(&t))
        .collect();
    let next = if rows.len() == limit {
        rows.last().map(|(id, _)| id.clone())
    } else {
        None
    };
    Json(serde_json::json!({ "twins": twins, "next_after": next })).into_response()
}
