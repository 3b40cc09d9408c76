//! Readings over HTTP (`POST /ingest`, `POST /ingest/{asset_id}`) on the embedded mock
//! cluster: written to the telemetry topic only when all are valid, answered after Kafka
//! has them, applied by the pipeline like any reading; credentials and limits.

mod common;

use std::collections::BTreeMap;

use common::{on_embedded, vehicle_topology};
use twinflow::config::Secret;

const READ: &str = "read-token-0123456789";
const WRITE: &str = "device-gateway-token-0123";

async fn post(
    p: &common::TestPipeline,
    path: &str,
    token: &str,
    body: String,
) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{}{path}", p.http.unwrap()))
        .bearer_auth(token)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_over_http_become_twins_and_bad_ones_are_refused_whole() {
    let (_kafka, mut p) = on_embedded(vehicle_topology());
    p.token = Some(Secret(READ.into()));
    p.writers = BTreeMap::from([("gateway".into(), Secret(WRITE.into()))]);
    p.ingest_readings_per_minute = 5;
    p.start();
    let t = p.now() - 1000;

    // NDJSON of two devices, and a JSON array for one device by path.
    let lines = format!(
        "{{\"asset_id\": \"van-1\", \"event_time\": {t}, \"speed_kmh\": 42.0}}\n\
         {{\"asset_id\": \"van-2\", \"event_time\": {t}, \"temperature_c\": 4.5}}\n"
    );
    let (status, body) = post(&p, "/ingest", WRITE, lines).await;
    assert_eq!(
        (status, &body["written"]),
        (202, &serde_json::json!(2)),
        "{body}"
    );
    // Each reading's record: on the partition of the telemetry topic it was given.
    let results = body["results"].as_array().unwrap();
    assert_eq!(results[0]["asset_id"], "van-1");
    assert!(
        results.iter().all(|r| r["offset"].as_i64().is_some()),
        "{body}"
    );
    let array = format!("[{{\"event_time\": {}, \"battery_pct\": 77.0}}]", t + 1);
    assert_eq!(post(&p, "/ingest/van-1", WRITE, array).await.0, 202);
    let twins = p.changelog(3);
    let van1 = twins.iter().rfind(|t| t.asset_id == "van-1").unwrap();
    let battery = p.topology.model.property("battery_pct").unwrap();
    assert_eq!(van1.value(battery).and_then(|v| v.as_f64()), Some(77.0));

    // One bad reading refuses the whole request, naming each problem; nothing is written.
    let consumed = p.metrics().total("twinflow_records_consumed_total");
    let mixed = format!(
        "{{\"asset_id\": \"van-3\", \"event_time\": {t}, \"speed_kmh\": 10.0}}\n\
         {{\"asset_id\": \"van-3\", \"event_time\": {t}, \"speed_kmh\": 900.0}}\n\
         {{\"asset_id\": \"van-3\", \"event_time\": {t}, \"speed\": 1}}\n"
    );
    let (status, body) = post(&p, "/ingest", WRITE, mixed).await;
    assert_eq!(status, 400, "{body}");
    let invalid = body["invalid"].as_array().unwrap();
    assert_eq!(invalid.len(), 2, "{body}");
    assert!(
        invalid[0]["error"].as_str().unwrap().contains("speed_kmh"),
        "{body}"
    );
    assert!(
        invalid[1]["error"].as_str().unwrap().contains("speed"),
        "{body}"
    );
    // The path's asset id is the reading's.
    let other = format!("{{\"asset_id\": \"van-9\", \"event_time\": {t}}}");
    assert_eq!(post(&p, "/ingest/van-1", WRITE, other).await.0, 400);
    assert_eq!(post(&p, "/ingest", WRITE, "not json".into()).await.0, 400);

    // Credentials and limits.
    let one = format!("{{\"asset_id\": \"van-4\", \"event_time\": {t}}}");
    assert_eq!(post(&p, "/ingest", READ, one.clone()).await.0, 403);
    assert_eq!(post(&p, "/ingest", "nope", one.clone()).await.0, 401);
    let many = (0..1001)
        .map(|_| one.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(post(&p, "/ingest", WRITE, many).await.0, 413);
    assert_eq!(post(&p, "/ingest", WRITE, "x".repeat(2 << 20)).await.0, 413);

    // A device flooding: five readings a minute per asset, here.
    let of = |asset: &str, n: usize| {
        (0..n)
            .map(|i| {
                format!(
                    "{{\"asset_id\": \"{asset}\", \"event_time\": {}}}",
                    t + i as i64
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let retry = |asset: &str, n: usize| {
        let body = of(asset, n);
        async move {
            let r = reqwest::Client::new()
                .post(format!("http://{}/ingest", p.http.unwrap()))
                .bearer_auth(WRITE)
                .body(body)
                .send()
                .await
                .unwrap();
            let after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), after)
        }
    };
    assert_eq!(
        retry("van-7", 6).await,
        (429, Some("60".into())),
        "more than a minute's worth"
    );
    assert_eq!(retry("van-8", 5).await.0, 202);
    assert_eq!(retry("van-8", 1).await, (429, Some("12".into())));
    p.clock.advance(12_000);
    assert_eq!(retry("van-8", 1).await.0, 202);

    // None of the refused readings reached the pipeline.
    let m = p.metrics();
    let accepted = m.counter("twinflow_ingest_records_total", &[("result", "accepted")]);
    assert_eq!(accepted, 3 + 5 + 1);
    p.wait_consumed(consumed + 6).await;
    assert_eq!(m.total("twinflow_records_consumed_total"), consumed + 6);
    assert_eq!(
        m.counter("twinflow_ingest_records_total", &[("result", "invalid")]),
        3
    );
    p.stop().await;
}
