//! `POST /ingest` and `POST /ingest/{asset_id}`: readings from devices that speak HTTP, with
//! a write credential.
//!
//! The body is a JSON array of readings or NDJSON (one per line), each an object with the
//! telemetry schema's field names (`asset_id` may be left out under `/ingest/{asset_id}`).
//! Every reading is checked against the model first: if any is invalid the answer is 400
//! with the problem of each, and nothing is written. Otherwise each is written to the
//! telemetry topic, keyed by asset id, in the topic's format, on the partition of the
//! asset's twin when the view knows it; the answer is 202 only once Kafka has acknowledged
//! every one, with where each went (a retry after a failure may write a reading twice: the
//! pipeline skips the duplicate).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::{Extension, Json};

use super::desired::Writer;
use super::{Answer, ApiState, error};
use crate::codec::Format;
use crate::metrics::DeadLetterReason;
use crate::twin::Reading;

/// How full the writer's queue may be before a request is turned away with 429.
const QUEUE_HIGH_WATER: i32 = 50_000;

pub(super) async fn ingest(
    State(s): State<ApiState>,
    Extension(writer): Extension<Writer>,
    body: Bytes,
) -> Answer {
    write(s, writer, None, body).await
}

pub(super) async fn ingest_asset(
    State(s): State<ApiState>,
    Extension(writer): Extension<Writer>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Bytes,
) -> Answer {
    let Path(id) = id.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    write(s, writer, Some(id), body).await
}

/// The readings of a body: a JSON array of objects, or one object per line.
fn objects(body: &[u8]) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8: {e}"))?;
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(text)
            .map_err(|e| format!("not a JSON array of readings: {e}"));
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l).map_err(|e| format!("line {}: not a JSON object: {e}", n + 1))
        })
        .collect()
}

/// Checks one reading object against the model into `reading`; returns its JSON bytes, or
/// why it is refused (the dead-letter reason the pipeline would give, and a message). The
/// pipeline's JSON input ignores fields it does not know (devices may send more than the
/// model has); a request is answered, so a misspelt one is named (`invalid`).
pub(super) fn check(
    topology: &crate::topology::Topology,
    object: &serde_json::Map<String, serde_json::Value>,
    reading: &mut Reading,
) -> Result<Vec<u8>, (DeadLetterReason, String)> {
    let known =
        |k: &str| k == "asset_id" || k == "event_time" || topology.model.property(k).is_some();
    if let Some(unknown) = object.keys().find(|k| !known(k)) {
        let why = format!("'{unknown}' is not a property of the model");
        return Err((DeadLetterReason::Invalid, why));
    }
    let json = serde_json::to_vec(object).expect("JSON values serialize");
    (topology.codec)
        .decode_reading(Format::Json, &json, reading)
        .map_err(|e| (DeadLetterReason::Decode, e.to_string()))?;
    (topology.model)
        .validate(reading)
        .map_err(|why| (DeadLetterReason::Invalid, why))?;
    Ok(json)
}

async fn write(s: ApiState, writer: Writer, path_id: Option<String>, body: Bytes) -> Answer {
    let objects = objects(&body).map_err(|why| error(StatusCode::BAD_REQUEST, why))?;
    let limit = s.ingest_max_readings;
    if objects.len() > limit {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} readings; at most {limit} a request (http.ingest_max_readings)",
                objects.len()
            ),
        ));
    }
    if objects.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "no reading in the body"));
    }
    let topology = s.view.topology();
    let format = topology.topics.telemetry_format();
    if format == Format::ConfluentAvro {
        return Err(error(
            StatusCode::NOT_IMPLEMENTED,
            "the telemetry topic is confluent_avro: HTTP ingestion writes avro or json topics only",
        ));
    }
    // Check every reading first: all are written, or none.
    let mut records = Vec::with_capacity(objects.len());
    let mut problems = Vec::new();
    let mut reading = Reading::default();
    for (index, mut object) in objects.into_iter().enumerate() {
        if let Some(id) = &path_id {
            match object.get("asset_id") {
                None => {
                    object.insert("asset_id".into(), id.clone().into());
                }
                Some(given) if given.as_str() != Some(id) => {
                    problems.push(serde_json::json!({
                        "index": index,
                        "error": format!("asset_id {given} is not the path's '{id}'"),
                    }));
                    continue;
                }
                Some(_) => {}
            }
        }
        let checked = check(topology, &object, &mut reading).map_err(|(_, why)| why);
        match checked {
            Ok(json) => {
                let value = match format {
                    Format::Json => json,
                    _ => {
                        let mut avro = Vec::new();
                        topology.codec.encode_reading(&reading, &mut avro);
                        avro
                    }
                };
                records.push((reading.asset_id.clone(), value));
            }
            Err(why) => problems.push(serde_json::json!({ "index": index, "error": why })),
        }
    }
    let metrics = &s.metrics;
    if !problems.is_empty() {
        metrics.ingest(&[("invalid", problems.len() as u64)]);
        return Err((
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({
                "error": "invalid readings; none was written",
                "invalid": problems,
            })),
        )
            .into_response());
    }
    let mut per_asset: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
    for (id, _) in &records {
        *per_asset.entry(id.as_str()).or_default() += 1;
    }
    let wants: Vec<(&str, u32)> = per_asset.into_iter().collect();
    if let Err(seconds) = s.readings.take(&wants, s.clock.now_ms()) {
        metrics.ingest(&[("limited", records.len() as u64)]);
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "an asset of this request is over {} readings a minute (http.ingest_readings_per_minute)",
                s.readings.per_minute()
            ),
        );
        r.headers_mut().insert(header::RETRY_AFTER, seconds.into());
        return Err(r);
    }
    if s.writer.in_flight() > QUEUE_HIGH_WATER {
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "the Kafka producer's queue is nearly full",
        );
        r.headers_mut().insert(header::RETRY_AFTER, 1.into());
        return Err(r);
    }
    let topic = &topology.topics.telemetry.name;
    let sends = records.iter().map(|(id, value)| async {
        let partition = s.view.partition(id).ok().flatten();
        s.writer.write(topic, partition, id.as_bytes(), value).await
    });
    let results = futures::future::join_all(sends).await;
    let failed: Vec<serde_json::Value> = results
        .iter()
        .enumerate()
        .filter_map(|(index, r)| {
            let e = r.as_ref().err()?;
            Some(serde_json::json!({ "index": index, "error": e.to_string() }))
        })
        .collect();
    // Where each reading went: its record on the telemetry topic.
    let placed: Vec<serde_json::Value> = results
        .iter()
        .zip(&records)
        .map(|(r, (id, _))| match r {
            Ok((partition, offset)) => {
                serde_json::json!({ "asset_id": id, "partition": partition, "offset": offset })
            }
            Err(_) => serde_json::json!({ "asset_id": id, "error": "not written" }),
        })
        .collect();
    let written = (records.len() - failed.len()) as u64;
    metrics.ingest(&[("accepted", written), ("failed", failed.len() as u64)]);
    tracing::debug!(writer = %writer.0, written, "HTTP readings ingested.");
    if !failed.is_empty() {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "error": "Kafka did not take every reading; send the failed ones again",
                "written": written,
                "failed": failed,
                "results": placed,
            })),
        )
            .into_response());
    }
    let answer = serde_json::json!({ "written": written, "results": placed });
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_a_json_array_or_one_object_per_line() {
        let array = objects(br#"[{"a": 1}, {"a": 2}]"#).unwrap();
        assert_eq!(array.len(), 2);
        let lines = objects(b"{\"a\": 1}\n\n{\"a\": 2}\n").unwrap();
        assert_eq!(lines, array);
        assert!(
            objects(b"{\"a\": 1}\nnot json")
                .unwrap_err()
                .starts_with("line 2")
        );
        assert!(objects(b"[1, 2]").is_err(), "readings are objects");
        assert!(objects(&[0xff]).is_err());
    }
}
