//! `PATCH /twins/{id}/desired`: a desired-state write, as a JSON Merge Patch of the twin's
//! desired values, with a write credential; and `DELETE /twins/{id}`, a control record
//! on the same topic.
//!
//! The API decides nothing about the twin: it checks the values against the model (400
//! naming the property), the asset's rate (429), and writes the record to the desired-state
//! topic, on the partition of the asset's twin. The partition's owner applies it in the
//! twin's commit and decides (ISSUED, or REJECTED on a version conflict), as for a write an
//! enterprise system sends to the topic itself. With `?wait=` the API waits for that
//! decision on the command event topic and answers 200 or 409; else, or when the decision
//! takes longer, 202 with the command id.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::{Answer, ApiState, Params, error, params};
use crate::pipeline::{WriteRecord, desired_write, encode_write};

/// Longest wait for a decision a request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Largest desired-write body.
pub const MAX_BODY: usize = 16 * 1024;

/// Who writes: the name of the write credential presented.
#[derive(Clone, Debug)]
pub struct Writer(pub String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WriteQuery {
    /// How long to wait for the decision, e.g. `5s`.
    wait: Option<String>,
}

/// The `If-Match` header: a `desired_version`, bare or as an entity tag (`"3"`).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, Response> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .map(|v| v.trim().trim_matches('"'))
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|v| *v >= 0)
        .map(Some)
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "If-Match: expected the twin's desired_version, e.g. If-Match: \"3\"",
            )
        })
}

fn wait(q: &WriteQuery) -> Result<Option<Duration>, Response> {
    let Some(text) = &q.wait else {
        return Ok(None);
    };
    humantime::parse_duration(text)
        .ok()
        .filter(|d| *d <= MAX_WAIT)
        .map(Some)
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                format!(
                    "wait: expected a duration up to {}s, e.g. wait=5s",
                    MAX_WAIT.as_secs()
                ),
            )
        })
}

/// A fresh command id: 128 random bits.
fn new_command_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Where a write to the twin of `id` goes: the twin's changelog partition (the owner of that
/// partition applies it; `None` when the view has not seen the twin change lately, and the
/// key decides), once the twin is known (else 404) and within the rate limit of writes to it
/// (else 429 with `Retry-After`).
fn owner(s: &ApiState, id: &str) -> Result<Option<i32>, Response> {
    let internal = |e: crate::error::Error| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    if s.view.twin(id).map_err(internal)?.is_none() {
        return Err(error(StatusCode::NOT_FOUND, format!("no twin '{id}'")));
    }
    limit(s, id)?;
    s.view.partition(id).map_err(internal)
}

/// 503 for a write Kafka did not take.
fn unavailable(topic: &str) -> impl Fn(crate::error::Error) -> Response + '_ {
    move |e| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("writing to {topic}: {e}"),
        )
    }
}

/// The rate limit of writes to the twin of `id`: 429 with `Retry-After` beyond it.
fn limit(s: &ApiState, id: &str) -> Result<(), Response> {
    let Err(seconds) = s.writes.take(&[(id, 1)], s.clock.now_ms()) else {
        return Ok(());
    };
    s.metrics.desired_writes_limited.inc();
    let mut r = error(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "more than {} desired writes a minute for '{id}'",
            s.writes.per_minute()
        ),
    );
    r.headers_mut().insert(header::RETRY_AFTER, seconds.into());
    Err(r)
}

/// `DELETE /twins/{id}`: sends the control record that deletes the twin to the desired-state
/// topic, on the partition of the twin; the partition's owner deletes it in one commit
/// (tombstone, alerts CLEARED, commands CANCELLED). 202 once Kafka has the record; with
/// `?wait=`, 200 once this instance's view has applied the tombstone.
pub(super) async fn delete_twin(
    State(s): State<ApiState>,
    Extension(writer): Extension<Writer>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    q: Params<WriteQuery>,
) -> Answer {
    let id = id
        .map(|Path(id)| id)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let wait = wait(&params(q)?)?;
    let partition = owner(&s, &id)?;
    let deletion = wait.map(|w| (s.view.deletion(&id), w));
    let topology = s.view.topology();
    let topic = &topology.topics.desired.name;
    let by = format!("http:{}", writer.0);
    let headers: [(&str, &[u8]); 2] = [
        (crate::headers::CONTROL, b"delete"),
        (crate::headers::CONTROL_BY, by.as_bytes()),
    ];
    s.writer
        .write_control(topic, partition, id.as_bytes(), &headers)
        .await
        .map_err(unavailable(topic))?;
    s.metrics.desired_writes.inc();
    let pending = serde_json::json!({ "asset_id": id, "state": "PENDING" });
    let Some((deletion, within)) = deletion else {
        return Ok((StatusCode::ACCEPTED, Json(pending)).into_response());
    };
    Ok(match deletion.wait(within).await {
        Some(_) => (
            StatusCode::OK,
            Json(serde_json::json!({ "asset_id": id, "state": "DELETED" })),
        ),
        None => (StatusCode::ACCEPTED, Json(pending)),
    }
    .into_response())
}

pub(super) async fn patch_desired(
    State(s): State<ApiState>,
    Extension(writer): Extension<Writer>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    q: Params<WriteQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let id = id
        .map(|Path(id)| id)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let q = params(q)?;
    let wait = wait(&q)?;
    let if_match = if_match(&headers)?;
    let patch: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&body)
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("the body must be a JSON Merge Patch of desired values, {{\"<property>\": <value or null>}}: {e}"),
            )
        })?;
    let topology = s.view.topology();
    let command_id = new_command_id();
    let record = WriteRecord {
        desired: patch,
        if_match,
        command_id: Some(command_id.clone()),
        by: Some(format!("http:{}", writer.0)),
    };
    desired_write(&topology.model, record.clone(), command_id.clone())
        .map_err(|why| error(StatusCode::BAD_REQUEST, why))?;
    let partition = owner(&s, &id)?;
    let decision = wait.map(|w| (s.view.decision(&command_id), w));
    let topic = &topology.topics.desired.name;
    let value = encode_write(&record, topology.topics.desired_format());
    s.writer
        .write(topic, partition, id.as_bytes(), &value)
        .await
        .map_err(unavailable(topic))?;
    s.metrics.desired_writes.inc();
    let pending = serde_json::json!({
        "command_id": command_id,
        "asset_id": id,
        "state": "PENDING",
    });
    let Some((decision, within)) = decision else {
        return Ok((StatusCode::ACCEPTED, Json(pending)).into_response());
    };
    Ok(match decision.wait(within).await {
        Some(event) if event["state"] == "REJECTED" => (StatusCode::CONFLICT, Json(event)),
        Some(event) => (StatusCode::OK, Json(event)),
        None => (StatusCode::ACCEPTED, Json(pending)),
    }
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_takes_a_version_bare_or_quoted() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::IF_MATCH, v.parse().unwrap());
            if_match(&h).ok()
        };
        assert_eq!(if_match(&HeaderMap::new()).ok(), Some(None));
        assert_eq!(with("3"), Some(Some(3)));
        assert_eq!(with("\"3\""), Some(Some(3)));
        assert_eq!(with("*"), None);
        assert_eq!(with("-1"), None);
    }
}
