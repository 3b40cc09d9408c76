//! A forecast rule through the pipeline on the embedded cluster: a draining battery raises
//! LOW_BATTERY_PREDICTED with its prediction on the alert topic; the window lives in the
//! twin, so an instance that restores into an empty store goes on with it; when the real
//! LOW_BATTERY raises, the forecast clears as breached and the outcome is counted.

mod common;

use std::time::{Duration, Instant};

use apache_avro::types::Value as AV;
use common::{TestPipeline, on_embedded, text};
use rdkafka::Message;

const MINUTE: i64 = 60_000;

/// Waits until the alert topic holds an event of `code` in `state`; all events so far.
fn until_alert(
    p: &TestPipeline,
    code: &str,
    state: &str,
) -> Vec<std::collections::BTreeMap<String, AV>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alerts = p.alerts(0);
        if alerts
            .iter()
            .any(|a| text(&a["code"]) == code && text(&a["state"]) == state)
        {
            return alerts;
        }
        assert!(Instant::now() < deadline, "no {state} {code}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_battery_is_forecast_survives_a_restore_and_ends_breached() {
    let paths = common::fleet_forecast_topology();
    let (kafka, mut p) = on_embedded(paths.clone());
    p.start();
    // 1 %/min from 60 %, a reading a minute: 15 % is crossed 45 minutes in.
    let t0 = p.now() - 60 * MINUTE;
    for m in 0..20 {
        p.send(
            "truck-9",
            t0 + m * MINUTE,
            &[("battery_pct", 60.0 - m as f64)],
        )
        .await;
    }
    let alerts = until_alert(&p, "LOW_BATTERY_PREDICTED", "RAISED");
    let raised = alerts
        .iter()
        .find(|a| text(&a["code"]) == "LOW_BATTERY_PREDICTED")
        .unwrap();
    let AV::Union(1, forecast) = &raised["forecast"] else {
        panic!("the RAISED event carries its forecast: {raised:?}")
    };
    let AV::Record(fields) = &**forecast else {
        panic!("a record")
    };
    let field = |name: &str| &fields.iter().find(|(k, _)| k == name).unwrap().1;
    assert_eq!(field("breach_at"), &AV::TimestampMillis(t0 + 45 * MINUTE));
    assert_eq!(
        raised["event_time"],
        AV::TimestampMillis(t0 + 15 * MINUTE),
        "raised once the window is full"
    );
    // The twins forecast to breach soon: once the view has all twenty readings, the crossing
    // is 26 minutes after the newest.
    let base = format!("http://{}", p.http.unwrap());
    let get = async |path: &str| {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get("/twins/truck-9").await.1["version"] != 20 {
        assert!(Instant::now() < deadline, "the view never had version 20");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, soon) = get("/twins?breach_within=30m").await;
    assert_eq!(status, 200, "{soon}");
    let twin = &soon["twins"][0];
    assert_eq!(twin["asset_id"], "truck-9", "{soon}");
    let forecast = &twin["forecasts"][0];
    assert_eq!(forecast["code"], "LOW_BATTERY_PREDICTED");
    assert_eq!(
        forecast["breach_at"],
        twinflow::codec::rfc3339(t0 + 45 * MINUTE)
    );
    assert_eq!(forecast["time_to_breach_seconds"], 26.0 * 60.0);
    let later = get("/twins?breach_within=20m").await.1;
    assert_eq!(later["twins"], serde_json::json!([]));
    assert_eq!(get("/twins?breach_within=soon").await.0, 400);
    p.stop().await;

    // A new instance on an empty store restores the twin with its window and goes on.
    let mut q = TestPipeline::new(&kafka.bootstrap_servers(), paths, &[]);
    q.group = p.group.clone();
    q.clock = p.clock.clone();
    q.start();
    q.send("truck-9", t0 + 20 * MINUTE, &[("battery_pct", 40.0)])
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let window = loop {
        let twins = q.read(
            &q.topology.topics.changelog.name,
            1,
            Duration::from_secs(30),
        );
        let last = twins
            .last()
            .and_then(|m| m.payload())
            .map(|v| q.topology.codec.decode_twin(v).unwrap());
        if let Some(t) = last.filter(|t| t.version == 21) {
            break t.forecasts;
        }
        assert!(Instant::now() < deadline, "no version 21 of truck-9");
    };
    assert_eq!(window.len(), 1);
    assert_eq!(
        window[0].points.len(),
        16,
        "the fifteen minutes before, both ends: kept across the restore"
    );

    for m in 21..47 {
        q.send(
            "truck-9",
            t0 + m * MINUTE,
            &[("battery_pct", 60.0 - m as f64)],
        )
        .await;
    }
    let alerts = until_alert(&q, "LOW_BATTERY_PREDICTED", "CLEARED");
    let codes: Vec<(String, String, String)> = alerts
        .iter()
        .map(|a| {
            let reason = match &a["reason"] {
                AV::Union(1, r) => text(r),
                _ => String::new(),
            };
            (text(&a["code"]), text(&a["state"]), reason)
        })
        .collect();
    let event = |code: &str, state: &str, reason: &str| {
        (code.to_owned(), state.to_owned(), reason.to_owned())
    };
    assert_eq!(
        codes,
        [
            event("LOW_BATTERY_PREDICTED", "RAISED", ""),
            event("LOW_BATTERY", "RAISED", ""),
            event("LOW_BATTERY_PREDICTED", "CLEARED", "breached"),
        ]
    );
    let m = q.metrics();
    let outcome = |o: &str| {
        m.counter(
            "twinflow_forecast_outcomes_total",
            &[("rule", "LOW_BATTERY_PREDICTED"), ("outcome", o)],
        )
    };
    assert_eq!(
        (outcome("breached"), outcome("averted"), outcome("stale")),
        (1, 0, 0)
    );
    q.stop().await;
}
